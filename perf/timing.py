"""Timing helpers shared by the benchmarks: shuffled interleaved rounds, both estimators
(median and minimum), the machine and its load, and torch.compile baselines that cannot
share compiled code with one another.

Why shuffled: in a fixed order, the variant that runs right after a large one pays for its
evicted caches every round (a fixed order once put a 15% gap between two identical
forwards). Each round here runs every variant once, in an order drawn from
``random.Random(seed + round)``; the seed is reported with the results.
"""

from __future__ import annotations

import functools
import os
import platform
import random
import statistics
import time
from typing import Any, Callable

import torch

SEED = 17
# how a benchmark that uses ``shuffled_rounds`` describes its order (``ORDER`` in the module)
SHUFFLED = (f"variants in a random order each round (`random.Random({SEED} + round)`, "
            f"perf/timing.py)")


def shuffled_rounds(fns: dict[str, Callable[[], Any]], rounds: int, seed: int = SEED,
                    probe: Callable[[], float] | None = None
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of every variant over ``rounds`` rounds, the variants in a seeded
    random order each round.

    ``probe`` (optional) returns a running total of seconds spent somewhere inside a call
    (e.g. inside fxsight's graph); the second dict holds, per variant, each call's time
    minus what the probe counted during it."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    inner: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_ in range(rounds):
        random.Random(seed + round_).shuffle(order)
        for name in order:
            before = probe() if probe else 0.0
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            if probe:
                inner[name].append(elapsed - (probe() - before))
    return times, inner


def estimators(samples: list[float]) -> dict[str, float]:
    """``median`` and ``min`` of ``samples`` (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples)}


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """``a / b`` per estimator (median ÷ median, min ÷ min)."""
    return {key: a[key] / b[key] for key in ("median", "min")}


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def machine() -> str:
    """One line: the CPU, cores, torch and its threads, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def unique_compile(fn: Callable, label: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of a wrapper around ``fn`` whose code object is this call's own.

    Dynamo caches compiled code per code object and, by default, does not guard on module
    hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``). Two baselines compiled
    through the same code (``torch.compile(model)`` and ``torch.compile(copy_with_hooks)``
    both compile ``Module._call_impl``; ``model.forward = torch.compile(model.forward)`` on
    two copies compiles the same ``forward``) can therefore silently share one graph: the
    hooked copy runs without its hooks, or the plain one with them. A wrapper compiled from
    its own source gives every baseline its own cache entry."""
    namespace: dict[str, Any] = {"fn": fn}
    exec(compile("def call(*args, **kwargs):\n    return fn(*args, **kwargs)\n",
                 f"<perf baseline {label}>", "exec"), namespace)
    wrapper = functools.wraps(fn)(namespace["call"])
    return torch.compile(wrapper, **compile_kwargs)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (baselines and fxsight alike)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def synced(fn: Callable, device: str) -> Callable:
    """``fn`` followed by a synchronization of ``device`` where it is a GPU, so that a
    timing covers the kernels the call launched (and the next call starts on an idle
    device); ``fn`` itself elsewhere."""
    if not str(device).startswith("cuda"):
        return fn

    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result
    return run


def first_line(error: BaseException) -> str:
    """An error as one short line: its class and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:100] if lines else ''}".rstrip(": ")


def kept(value: Any) -> Any:
    """``value`` with every tensor in it cloned: an answer that a later call cannot
    overwrite (CUDA graphs reuse their output memory on the next replay)."""
    return torch.utils._pytree.tree_map(
        lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, value)


def warm(fns: dict[str, Callable], warmup: int, *args: Any
         ) -> tuple[dict[str, Any], dict[str, str], dict[str, float]]:
    """Every variant's first call with ``args`` (compiling where it compiles), then
    ``warmup`` more; the first answers (cloned), the variants that raised (their error's
    first line) and each first call's seconds."""
    answers, failed, first = {}, {}, {}
    for variant, fn in fns.items():
        try:
            start = time.perf_counter()
            answers[variant] = kept(fn(*args))
            first[variant] = time.perf_counter() - start
            for _ in range(warmup):
                fn(*args)
        except Exception as error:  # noqa: BLE001 - a failing variant is reported
            failed[variant] = first_line(error)
            answers.pop(variant, None)
    return answers, failed, first
