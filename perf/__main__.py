"""``python -m perf [--quick] [--only NAME] [--json PATH] [--threads N] [--device D]``.

fxsight's benchmark suite.

Runs the core benchmark (``perf/bench_core.py``: plain eager / compiled forward, hand-written
hooks, fxsight eager / compiled, nnsight when importable; tiny GPT-2 and a gpt2-small shape;
saving every block, two-invoke patching) and every other ``perf/bench_*.py`` module that
exposes ``run(quick=...)`` (e.g. ``bench_patching``). ``--only NAME`` runs the benchmarks
whose name contains NAME: ``core``, ``core/tiny``, ``core/small/patch``, ``patching``, ...
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time

import torch


def _others() -> list[str]:
    here = os.path.dirname(__file__)
    return sorted(m.name for m in pkgutil.iter_modules([here])
                  if m.name.startswith("bench_") and m.name != "bench_core")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf", description="fxsight's benchmark suite")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", metavar="NAME", help="run only benchmarks whose name "
                        "contains NAME (core/tiny/save, core/small/patch, patching, ...)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="where the core benchmark's models "
                        "run (cpu, cuda)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["FXSIGHT_BENCH_DEVICE"] = args.device
    from perf import bench_core
    bench_core.DEVICE = args.device
    nnsight_version = bench_core.nnsight_version() or "not importable (skipped)"
    print(f"# fxsight benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"of {os.cpu_count()} cores, {platform.machine()}, python "
          f"{platform.python_version()}, nnsight {nnsight_version}, load average "
          f"{os.getloadavg()[0]:.1f} at start, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}"
          f"; `python -m perf {' '.join(argv or sys.argv[1:])}`")
    everything: dict[str, object] = {}
    start = time.perf_counter()

    core_names = [f"core/{m}/{e}" for m in bench_core.MODELS for e in bench_core.EXPERIMENTS]
    if args.only is None or any(args.only in name for name in core_names):
        print("\n## core: batch 8x32 tokens, no autograd, medians after warm-up\n", flush=True)
        results = bench_core.run(quick=args.quick, only=args.only, threads=args.threads,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
        everything["core"] = results
        print(bench_core.table(results))
        print("\nTargets (issue 4):\n" + bench_core.targets(results), flush=True)

    for name in _others():
        short = name.removeprefix("bench_")
        if args.only is not None and args.only not in short:
            continue
        module = importlib.import_module(f"perf.{name}")
        run = getattr(module, "run", None)
        if run is None:
            continue
        print(f"\n## {short} (perf/{name}.py)\n", flush=True)
        try:
            results = run(quick=args.quick)
        except Exception as error:  # noqa: BLE001 - one broken benchmark does not stop the rest
            print(f"failed: {type(error).__name__}: {error}")
            continue
        everything[short] = results
        table = getattr(module, "table", None)
        print(table(results) if table else "\n".join(map(str, results)), flush=True)

    print(f"\n(total {time.perf_counter() - start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(everything, file, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
