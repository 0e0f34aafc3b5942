"""``.source`` costs what it reads: the attention probabilities of layer l of a gpt2-small
shape (12 layers, 768 wide, vocab 50257, eager attention, batch 1x32), read through
``attn.source.attention_interface_0.output[1]``, against a plain forward (no intervention)
and a forward with ``output_attentions=True``; nnsight's ``.source`` on the same model in
its own process where ``import nnsight`` works.

On the fx backend the trace is pruned: reading layer l runs blocks 0..l only, so its cost
is about (l + 1)/12 of a forward without the head (the head is ~1/4 of this model's
forward at this batch). Variants are shuffled each round; medians after one warm-up round.
"""

from __future__ import annotations

import json
import statistics
from typing import Any, Callable

import torch

from perf.child import run_in_child
from perf.models import gpt2
from perf.timing import SHUFFLED, shuffled_rounds

ORDER = SHUFFLED

LAYERS, WIDTH, HEADS, VOCAB, TOKENS = 12, 768, 12, 50257, 32
READ = (0, 5, 11)


def _model() -> torch.nn.Module:
    model = gpt2(LAYERS, WIDTH, HEADS, VOCAB, n_positions=64)
    model.set_attn_implementation("eager")
    return model


def _ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def _time(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per variant over ``rounds`` shuffled rounds after one warm-up."""
    for fn in variants.values():
        fn()
    times, _ = shuffled_rounds(variants, rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def _fxsight_variants(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable]:
    from fxsight import NNsight
    net = NNsight(model)
    variants: dict[str, Callable] = {
        "plain forward": lambda: model(ids, use_cache=False),
        "plain forward, output_attentions": lambda: model(ids, use_cache=False,
                                                          output_attentions=True),
    }

    def reader(layer: int) -> Callable:
        def run():
            with net.trace(ids, use_cache=False, backend="fx"):
                probs = net.transformer.h[layer].attn.source.attention_interface_0 \
                    .output[1].save()
            return probs
        return run

    for layer in READ:
        variants[f"fxsight .source layer {layer}"] = reader(layer)
    return variants


def _nnsight_worker(rounds: int, threads: int) -> None:
    """(In nnsight's process.) Prints the medians of nnsight's ``.source`` reads."""
    import nnsight
    torch.set_num_threads(threads)
    model, ids = _model(), _ids()
    wrapped = nnsight.NNsight(model)
    variants: dict[str, Callable] = {"plain forward": lambda: model(ids, use_cache=False)}

    def reader(layer: int) -> Callable:
        def run():
            with wrapped.trace(ids, use_cache=False):
                probs = wrapped.transformer.h[layer].attn.source.attention_interface_0 \
                    .output[1].save()
            return probs
        return run

    for layer in READ:
        variants[f"nnsight .source layer {layer}"] = reader(layer)
    with torch.no_grad():
        print(json.dumps(_time(variants, rounds)))


def run(quick: bool = False, rounds: int = 15) -> list[dict[str, Any]]:
    """One dict per variant: median ms and the ratio to the plain forward of its process."""
    rounds = 3 if quick else rounds
    model, ids = _model(), _ids()
    with torch.no_grad():
        medians = _time(_fxsight_variants(model, ids), rounds)
        reference = model(ids, use_cache=False, output_attentions=True).attentions
        from fxsight import NNsight
        net = NNsight(model)
        with net.trace(ids, use_cache=False, backend="fx"):
            probs = net.transformer.h[5].attn.source.attention_interface_0.output[1].save()
        assert torch.allclose(probs, reference[5], atol=1e-5)
    results = [dict(variant=k, median_ms=v * 1e3, ratio=v / medians["plain forward"],
                    process="fxsight") for k, v in medians.items()]
    other = run_in_child(f"from perf.bench_source import _nnsight_worker; "
                         f"_nnsight_worker({rounds}, {torch.get_num_threads()})")
    if isinstance(other, dict):
        results += [dict(variant=k, median_ms=v * 1e3, ratio=v / other["plain forward"],
                         process="nnsight") for k, v in other.items()]
    else:
        results.append(dict(variant="nnsight .source", error=other, process="nnsight"))
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table: median ms and the ratio to the plain forward of its process."""
    lines = ["| variant | process | median ms | ÷ plain forward |", "|---|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['process']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['variant']} | {r['process']} | {r['median_ms']:.1f} | "
                         f"{r['ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
