"""First calls, cold and warm: what the first compiled call costs in a new process.

The per-trace experiment of ``perf/bench_core.py`` (``steer`` on the tiny GPT-2: keep
block 0's output, add a vector in place to block 1's output, keep the logits), each
variant in a process of its own:

- ``cold``: a new process with an empty ``TORCHINDUCTOR_CACHE_DIR`` (a fresh temporary
  folder: inductor's FX graph cache, AOTAutograd cache and compiled C++ kernels all start
  empty);
- ``warm disk cache``: another new process on the folder the cold run filled (what a
  second run of a script sees).

Variants: ``torch.compile`` (no intervention), ``torch.compile + hooks`` (the hooks
registered before compilation), ``fxsight compiled`` (capture, splice and compile
included), and ``fxsight eager`` (capture and splice; nothing compiles). The time is the
first call's; model building and imports are not in it. Beside it: the part of it fxsight's
compile backend took (``fxsight.stats()["compile_ms"]``), and inductor's FX graph cache
hits and misses in that process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Any

import torch

from perf.child import run_in_child

ORDER = "each variant's first call in a new process of its own, one after the other"
VARIANTS = ("torch.compile", "torch.compile + hooks", "fxsight compiled", "fxsight eager")
QUICK_VARIANTS = ("torch.compile", "fxsight compiled")


def _worker(variant: str, threads: int) -> None:
    """(In a new process.) Print JSON: the first and the second call's seconds."""
    import fxsight
    from perf import bench_core as core
    from perf.timing import unique_compile

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model = core.MODELS["tiny"][1]()
    ids, steer = core._ids(model), core._steer(model)
    n_layer = len(model.transformer.h)
    if variant == "torch.compile":
        fn = core._plain(unique_compile(model, "first call"))
    elif variant == "torch.compile + hooks":
        fn = core._compiled_hooks(model, "steer", n_layer // 2, steer, "first call")
    else:
        fn = core._traced(fxsight.NNsight(model), "steer", n_layer // 2, n_layer, steer,
                          core._fx_backend, compile=variant == "fxsight compiled")
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        fn(ids)
        seconds.append(time.perf_counter() - start)
    from torch._dynamo.utils import counters
    inductor = counters["inductor"]
    print(json.dumps({"first_s": seconds[0], "second_s": seconds[1],
                      "compile_s": fxsight.stats().get("compile_ms", 0) / 1e3
                      if variant.startswith("fxsight") else None,
                      "cache": f"{inductor['fxgraph_cache_hit']}/"
                               f"{inductor['fxgraph_cache_miss']}"}))


def _in_child(variant: str, cache_dir: str) -> dict | str:
    return run_in_child(f"from perf.bench_first_call import _worker; "
                        f"_worker({variant!r}, {torch.get_num_threads()})",
                        nnsight=False, TORCHINDUCTOR_CACHE_DIR=cache_dir)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One dict per variant: ``cold_s``, ``warm_s`` (first calls) and ``second_s``."""
    results = []
    for variant in QUICK_VARIANTS if quick else VARIANTS:
        folder = tempfile.mkdtemp(prefix="fxsight-inductor-")
        try:
            cold = _in_child(variant, folder)
            warm = _in_child(variant, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row: dict[str, Any] = {"variant": variant}
        for key, got in (("cold", cold), ("warm", warm)):
            if isinstance(got, dict):
                row[f"{key}_s"] = got["first_s"]
                row["second_s"] = got["second_s"]
                row[f"{key}_compile_s"] = got.get("compile_s")
                row[f"{key}_cache"] = got.get("cache")
            else:
                row[f"{key}_error"] = got
        results.append(row)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the first calls."""
    lines = ["| variant | first call, cold s | first call, warm disk cache s "
             "| of which fxsight's compile s (cold / warm) | FX graph cache hits/misses "
             "(cold / warm) | second call ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        cold = f"{r['cold_s']:.2f}" if "cold_s" in r else f"failed: {r.get('cold_error')}"
        warm = f"{r['warm_s']:.2f}" if "warm_s" in r else f"failed: {r.get('warm_error')}"
        compile_s = " / ".join(f"{r[k]:.2f}" for k in ("cold_compile_s", "warm_compile_s")
                               if r.get(k) is not None)
        cache = " / ".join(str(r[k]) for k in ("cold_cache", "warm_cache") if r.get(k))
        second = f"{r['second_s'] * 1e3:.1f}" if "second_s" in r else ""
        lines.append(f"| {r['variant']} | {cold} | {warm} | {compile_s} | {cache} "
                     f"| {second} |")
    return "\n".join(lines)
