"""Running a benchmark worker in another interpreter (nnsight's, which must not share a
process with fxsight: importing nnsight breaks ``torch.export`` in that process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# the interpreter that has nnsight (default: this one)
NNSIGHT_PYTHON = os.environ.get("FXSIGHT_BENCH_NNSIGHT_PYTHON", sys.executable)


def run_in_child(code: str, python: str = NNSIGHT_PYTHON, **env: str) -> dict | str:
    """Run ``code`` (which prints one JSON line last) with ``perf`` importable; its JSON,
    or the last line of its error output where it failed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]), **env)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=root,
                          env=environment)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1][:160] if lines else f"exit status {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])
