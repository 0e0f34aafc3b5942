"""Running a benchmark worker in another interpreter (nnsight's, which must not share a
process with fxsight: importing nnsight breaks ``torch.export`` in that process), or in a
fresh process of this interpreter (first calls with an empty compile cache)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

# the interpreter that has nnsight (default: this one)
NNSIGHT_PYTHON = os.environ.get("FXSIGHT_BENCH_NNSIGHT_PYTHON", sys.executable)
# a folder that holds nnsight, put on the child's path only (e.g. a ``pip install
# --target`` folder); the benchmark process itself never imports nnsight
NNSIGHT_PATH = os.environ.get("FXSIGHT_BENCH_NNSIGHT_PATH", "")


def run_in_child(code: str, python: str = NNSIGHT_PYTHON, nnsight: bool = True,
                 **env: str) -> dict | str:
    """Run ``code`` (which prints one JSON line last) with ``perf`` importable (and
    nnsight's folder where ``nnsight``); its JSON, or the last line of its error output
    where it failed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, NNSIGHT_PATH if nnsight else "", os.environ.get("PYTHONPATH", "")]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), **env)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=root,
                          env=environment)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1][:160] if lines else f"exit status {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def nnsight_version() -> str | None:
    """nnsight's version where the child process can import it (``None`` otherwise; asked
    once per process)."""
    found = run_in_child("import json, nnsight; print(json.dumps(nnsight.__version__))")
    return found if isinstance(found, str) and found[:1].isdigit() else None
