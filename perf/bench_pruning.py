"""Pruning: a trace that only saves block 3 of a gpt2-small shape, against a full forward.

The fx backend removes every node no saved value needs, so saving ``transformer.h[3]``'s
output computes the embeddings and blocks 0..3 only (4 of 12 blocks, no final norm, no
head). Variants, side by side in one run (gpt2-small shape: 12 layers x 768, vocab 50257,
random weights; token ids of batch 4 x 32; ``use_cache=False``; no autograd):

- ``plain forward``: the model's forward (the baseline of every ratio);
- ``fxsight full``: a trace that saves the logits (nothing pruned);
- ``fxsight save h.3``: a trace that saves block 3's output (pruned);
- ``fxsight hooks + stop``: the same on the hooks backend with ``tracer.stop()``;
- ``hand-written early exit``: a forward hook on block 3 that keeps its output and raises
  to end the forward pass (what one would write by hand).

``expected`` is the share of a forward's multiply-adds in the embeddings and blocks 0..3
(blocks: 12 d^2 per token plus attention; the head: d x vocab per token). The variants take
turns, one call each per round, in a seeded random order; medians of the rounds after one
warm-up round.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from perf.models import gpt2
from perf.timing import SHUFFLED, shuffled_rounds

ORDER = SHUFFLED

LAYERS, WIDTH, HEADS, VOCAB = 12, 768, 12, 50257
ROWS, TOKENS = 4, 32
SAVED = 3


def _model() -> torch.nn.Module:
    return gpt2(LAYERS, WIDTH, HEADS, VOCAB, n_positions=max(TOKENS, 64))


def _expected_ratio() -> float:
    """Multiply-adds of the embeddings + blocks 0..SAVED over a whole forward."""
    block = 12 * WIDTH * WIDTH + 2 * TOKENS * WIDTH  # projections + attention, per token
    head = WIDTH * VOCAB
    return (SAVED + 1) * block / (LAYERS * block + head)


class _EarlyExit(Exception):
    pass


def _variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    from fxsight import NNsight

    wrapped = NNsight(model)

    def plain():
        return model(x, use_cache=False).logits

    def full():
        with wrapped.trace(x, use_cache=False, backend="fx"):
            logits = wrapped.lm_head.output.save()
        return logits

    def pruned():
        with wrapped.trace(x, use_cache=False, backend="fx"):
            hidden = wrapped.transformer.h[SAVED].output.save()
        return hidden

    def hooks_stop():
        with wrapped.trace(x, use_cache=False, backend="hooks") as tracer:
            hidden = wrapped.transformer.h[SAVED].output.save()
            tracer.stop()
        return hidden

    def early_exit():
        kept = {}

        def hook(module, args, output):
            kept["h"] = output
            raise _EarlyExit

        handle = model.transformer.h[SAVED].register_forward_hook(hook)
        try:
            model(x, use_cache=False)
        except _EarlyExit:
            pass
        finally:
            handle.remove()
        return kept["h"]

    return {"plain forward": plain, "fxsight full": full, "fxsight save h.3": pruned,
            "fxsight hooks + stop": hooks_stop, "hand-written early exit": early_exit}


def run(quick: bool = False, repeats: int = 7) -> list[dict[str, Any]]:
    """One dict per variant: ``median_ms``, ``min_ms``, ``ratio_to_full`` (medians, against
    the plain forward), ``expected_ratio``, and for the fxsight traces the number of graph
    nodes run and whether any node of blocks 4..11 or the head was left in."""
    repeats = 3 if quick else repeats
    with torch.no_grad():
        model = _model()
        x = torch.randint(4, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
        variants = _variants(model, x)
        values = {name: fn() for name, fn in variants.items()}  # warm-up: captures, splices
        times, _ = shuffled_rounds(variants, repeats)
        nodes = _graph_facts(model, x)
    base = statistics.median(times["plain forward"])
    expected = _expected_ratio()
    results = []
    for name, timing in times.items():
        median = statistics.median(timing)
        result = dict(model=f"gpt2-small shape ({LAYERS}x{WIDTH}, vocab {VOCAB})",
                      variant=name, batch=f"{ROWS}x{TOKENS}", repeats=repeats,
                      median_ms=median * 1e3, min_ms=min(timing) * 1e3,
                      ratio_to_full=median / base, expected_ratio=expected)
        if name in nodes:
            result.update(nodes[name])
        results.append(result)
    same = torch.equal(values["fxsight save h.3"], values["hand-written early exit"]) and \
        torch.equal(values["fxsight hooks + stop"], values["hand-written early exit"])
    for result in results:
        result["same_values"] = same
    return results


def _graph_facts(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    from fxsight import NNsight

    wrapped = NNsight(model)
    facts = {}
    for name, layer in (("fxsight full", None), ("fxsight save h.3", SAVED)):
        with wrapped.trace(x, use_cache=False, backend="fx") as tracer:
            if layer is None:
                wrapped.lm_head.output.save()
            else:
                wrapped.transformer.h[layer].output.save()
        graph = tracer.graph_module.graph
        later = tuple(f"transformer.h.{i}" for i in range(SAVED + 1, LAYERS)) + \
            ("transformer.ln_f", "lm_head")
        touched = any(path == p or path.startswith(p + ".")
                      for node in graph.nodes
                      for path, _ in (node.meta.get("nn_module_stack") or {}).values()
                      for p in later)
        facts[name] = dict(graph_nodes=len(graph.nodes), later_blocks_or_head_in_graph=touched)
    return facts


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':<26} {'median ms':>10} {'min ms':>9} {'ratio':>7}  graph",
             "-" * 70]
    for r in results:
        graph = ""
        if "graph_nodes" in r:
            graph = f"{r['graph_nodes']} nodes" + \
                (", later blocks/head present" if r["later_blocks_or_head_in_graph"] else
                 ", no node of blocks 4..11 or the head")
        lines.append(f"{r['variant']:<26} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} "
                     f"{r['ratio_to_full']:>7.3f}  {graph}")
    r = results[0]
    pruned = next(x for x in results if x["variant"] == "fxsight save h.3")
    lines.append("")
    lines.append(f"{r['model']}, batch {r['batch']}, {r['repeats']} rounds. Saving block "
                 f"{SAVED}: measured {pruned['ratio_to_full']:.3f} of a full forward; expected "
                 f"{r['expected_ratio']:.3f} (multiply-adds of embeddings + blocks 0..{SAVED} "
                 f"over blocks + head; {SAVED + 1}/{LAYERS} of the blocks alone = "
                 f"{(SAVED + 1) / LAYERS:.3f}). Saved values equal the hand-written early "
                 f"exit's: {r['same_values']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    quick = "--quick" in sys.argv
    results = run(quick=quick)
    for result in results:
        print(result)
    print()
    print(table(results))
