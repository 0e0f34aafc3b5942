"""New input shapes under ``compile=True``: exact-shape graphs vs a dynamic-shape capture.

A steering experiment on the tiny GPT-2 runs compiled for several sequence lengths (batch
8), in three ways (``compile={"dynamic": ...}``):

- ``False``: one exact-shape capture and one compilation per shape;
- ``None`` (the default): the first shape exactly, then, from the second shape on, one
  dynamic-shape capture (``torch.export`` with ``Dim.AUTO``) compiled once for all;
- ``True``: the dynamic-shape capture from the first trace.

Reported: compilations, captures, the seconds the whole sweep took (captures and
compilations included; inductor's FX graph cache is off, so every compilation is cold), and
the median time of one compiled trace at 8x32 afterwards (a symbolic-shape kernel against
an exact-shape one; the three take turns in a seeded random order).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from perf.timing import SHUFFLED, shuffled_rounds

ORDER = SHUFFLED
LENGTHS = (16, 24, 32, 40, 48)


def run(quick: bool = False) -> list[dict[str, Any]]:
    import fxsight
    from perf.bench_core import MODELS

    torch.set_num_threads(2)
    lengths = LENGTHS[:3] if quick else LENGTHS
    results = []
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0))
    traces = {}
    with torch.no_grad():
        for dynamic in (False, None, True):
            model = MODELS["tiny"][1]()  # a fresh model: nothing cached
            net = fxsight.NNsight(model, compile={"dynamic": dynamic})

            def trace(ids, net=net):
                with net.trace(ids, use_cache=False) as tracer:
                    net.transformer.h[0].output[:, 3] += steer
                    logits = net.lm_head.output.save()
                assert tracer.backend == "fx"
                return logits

            before = fxsight.stats()
            start = time.perf_counter()
            with torch._inductor.config.patch(fx_graph_cache=False):
                for length in lengths:
                    trace(torch.randint(4, 128, (8, length),
                                        generator=torch.Generator().manual_seed(length)))
            sweep = time.perf_counter() - start
            after = fxsight.stats()
            traces[repr(dynamic)] = trace
            results.append(dict(
                dynamic=repr(dynamic), shapes=len(lengths),
                compilations=after["compilations"] - before["compilations"],
                captures=after["captures"] - before["captures"],
                dynamic_captures=after.get("dynamic_captures", 0) -
                before.get("dynamic_captures", 0),
                sweep_s=sweep))
        # one compiled trace at 8x32 (a shape of the sweep): the variants take turns
        ids = torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(32))
        for trace in traces.values():
            for _ in range(3):
                trace(ids)
        times, _ = shuffled_rounds({name: (lambda t=trace: t(ids))
                                    for name, trace in traces.items()}, 15 if quick else 60)
    for row in results:
        row["trace_8x32_ms"] = statistics.median(times[row["dynamic"]]) * 1e3
        row["trace_8x32_min_ms"] = min(times[row["dynamic"]]) * 1e3
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| compile dynamic= | shapes | compilations | captures (dynamic) | sweep s "
             "| one trace 8x32: median ms | min ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['dynamic']} | {r['shapes']} | {r['compilations']} | "
                     f"{r['captures']} ({r['dynamic_captures']}) | {r['sweep_s']:.1f} | "
                     f"{r['trace_8x32_ms']:.2f} | {r['trace_8x32_min_ms']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
