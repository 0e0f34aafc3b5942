"""``python -m perf [--quick] [--only NAME] [--write] [--rounds N] [--json PATH] [--threads N]
[--device D]``.

fxsight's benchmark suite: every ``perf/bench_*.py`` module that exposes ``run()``, the core
benchmark (``perf/bench_core.py``) first. ``--only NAME`` runs one benchmark; ``NAME`` is
its file name without ``bench_`` (``core``, ``generation``, ``first_call``, ``patching``,
...), optionally followed by ``/`` and a part that the benchmark's ``run(only=...)``
selects (``core/tiny``, ``core/small/patch``, ``generation/tiny``). ``--write`` stores each
section that ran under ``perf/results/`` and rewrites ``docs/performance.md``
(``perf/report.py``); ``make bench`` runs everything that way.

A benchmark's ``run`` is called with ``quick=...`` and, where its signature has them,
``only``, ``threads``, ``log`` and ``rounds``; it returns its results. Its ``table(results)`` (text or
markdown), ``targets(results)`` and ``noise(results)`` are printed and written where it
defines them. A module's ``DEVICES`` (default ``("cpu",)``) names the devices it is made
for: without ``--only``, ``--device D`` runs the benchmarks made for ``D`` (``--device
cuda``: the GPU benchmark, ``perf/bench_gpu.py``), and ``--write`` stores the section of a
module that names its ``DEVICES`` only from a run on one of them (a smoke run of the GPU
benchmark on a CPU is printed, not stored).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time

import torch


def benchmarks() -> list[str]:
    """The short names of the benchmark modules, the core one first."""
    here = os.path.dirname(__file__)
    names = sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([here])
                   if m.name.startswith("bench_"))
    return sorted(names, key=lambda name: name != "core")


def _made_for(module, device: str) -> bool:
    """Whether ``module``'s benchmark is made for ``device`` (``cuda:1`` counts as
    ``cuda``)."""
    return device.split(":")[0] in getattr(module, "DEVICES", ("cpu",))


def _call(run, args, only: str | None):
    """``run`` with the keyword arguments its signature accepts."""
    offered = dict(quick=args.quick, only=only, threads=args.threads, rounds=args.rounds,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.rounds is None:
        del offered["rounds"]  # each benchmark's own default
    accepted = inspect.signature(run).parameters
    return run(**{k: v for k, v in offered.items() if k in accepted})


def _command(argv: list[str]) -> str:
    """The command line that reproduces this run (with nnsight's folder, if given)."""
    prefix = "".join(f"{key}={os.environ[key]} " for key in
                     ("FXSIGHT_BENCH_NNSIGHT_PATH", "FXSIGHT_BENCH_NNSIGHT_PYTHON")
                     if os.environ.get(key))
    return f"{prefix}python -m perf {' '.join(argv)}".rstrip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m perf", description="fxsight's benchmark suite")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", metavar="NAME", help="run one benchmark (core, generation, "
                        "first_call, ...), or a part of one (core/tiny, core/small/patch)")
    parser.add_argument("--write", action="store_true", help="store the sections that ran "
                        "under perf/results/ and rewrite docs/performance.md")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--rounds", type=int, help="timed rounds, for the benchmarks whose "
                        "run() takes rounds (core, generation); default: theirs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="where the models of the core and "
                        "the GPU benchmark run (cpu, cuda); without --only, --device cuda "
                        "runs the GPU benchmark only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["FXSIGHT_BENCH_DEVICE"] = args.device
    from perf import bench_core, report, timing
    from perf.child import nnsight_version
    bench_core.DEVICE = args.device

    machine = timing.machine()
    if args.device.startswith("cuda"):
        machine += f", device {torch.cuda.get_device_name()}"
    machine += f", nnsight {nnsight_version() or 'not importable (skipped)'}"
    print(f"# fxsight benchmarks: {machine}; load average {timing.load():.1f}; "
          f"`{_command(argv)}`", flush=True)
    head = args.only.split("/")[0] if args.only else None
    everything: dict[str, object] = {}
    start = time.perf_counter()
    for name in benchmarks():
        if head is not None and head != name:
            continue
        module = importlib.import_module(f"perf.bench_{name}")
        run = getattr(module, "run", None)
        if run is None or (head is None and not _made_for(module, args.device)):
            continue
        print(f"\n## {name} (perf/bench_{name}.py)\n", flush=True)
        load_start = timing.load()
        try:
            results = _call(run, args, args.only)
        except Exception as error:  # noqa: BLE001 - one broken benchmark does not stop the rest
            print(f"failed: {type(error).__name__}: {error}")
            continue
        everything[name] = results
        context = dict(command=_command(argv), date=report.now(), machine=machine,
                       load_start=f"{load_start:.1f}", load_end=f"{timing.load():.1f}")
        markdown = report.section(module, results, context)
        print(markdown, flush=True)
        if args.write and (not hasattr(module, "DEVICES") or _made_for(module, args.device)):
            report.store(name, markdown, results)
        elif args.write:
            print(f"(not stored: perf/bench_{name}.py's section is written from a run on "
                  f"{' or '.join(module.DEVICES)} only)")
    if args.write:
        report.render()
        print(f"wrote {report.PAGE}")
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average "
          f"{timing.load():.1f} at the end)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(everything, file, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
