"""Head-patching sweep: fxsight vs the same sweep written by hand with prefix reuse.

A gpt2-small shape (12 layers x 768, 12 heads, vocabulary 50257, random weights), a clean
and a corrupted prompt of 16 tokens (one token differs); every head of layers 3 and 9 is
patched at every position (each head's slice of the attention output projection's input,
``c_proj``): 2 x 12 x 16 = 384 cells, each scored by a logit difference at the last
position. (Two layers, not twelve: the hand-written sweep of every layer takes minutes here.)

- ``fxsight``: ``head_patching(...)``: the suffix path (each cell runs from its position on,
  over the corrupted run's key-value cache, packed; the last block's MLP and the head on
  each cell's last token; see ``fxsight/experiments/suffix.py``).
- ``fxsight (full-length)``: the same with ``suffix=False`` (prefix reuse by skipped
  modules, full-length rows, ``logits_to_keep=1``).
- ``hand-written prefix reuse``: plain PyTorch, as a competent user writes it: the clean
  and corrupted runs once (the projection's inputs and the blocks' outputs kept by hooks),
  then per layer the 12 x 16 head-position-patched copies of the corrupted projection input
  through the projection, the rest of the block (residual, ``ln_2``, MLP), the later blocks,
  and the final norm and head at the last position only.
- ``hand-written, changed cells only``: the same, with rows only for the (head, position)
  cells whose clean value differs from the corrupted one (the positions before the token
  where the prompts differ patch nothing and score the corrupted run's metric): fxsight
  skips those cells too, so this is the like-for-like baseline.

Scores are checked against the hand-written sweep's (``max |diff|``). Each round runs every
method once in a shuffled order (``random.Random(17 + round)``); fxsight's first call
(captures, splices) is timed apart. ``fxsight x``: a method's median over fxsight's.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable

import torch

from perf.bench_sweep import _prompts, metric
from perf.models import gpt2
from perf.timing import SHUFFLED

ORDER = SHUFFLED

TOKENS = 16
LAYERS = (3, 9)
TARGETS = {"hand-written prefix reuse": 2.0, "hand-written, changed cells only": 2.0}


def _fxsight(model, clean, corrupt, layers, suffix: bool) -> Callable[[], torch.Tensor]:
    from fxsight import NNsight
    from fxsight.patching import head_patching

    net = NNsight(model)

    def sweep() -> torch.Tensor:
        result = head_patching(net, clean, corrupt, metric, layers=list(layers),
                               progress=False, suffix=suffix)
        assert result.info["backend"] == "fx", result.info
        assert (result.info["suffix"] is True) == suffix, result.info["suffix"]
        return result.values + result.baseline

    return sweep


def _runs(model, ids) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor],
                              torch.Tensor]:
    """The projection inputs and the block outputs of one run, by layer, and its
    last-position logits."""
    z: dict[int, torch.Tensor] = {}
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, i=i: z.__setitem__(i, a[0])))
        handles.append(block.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        logits = model(ids, use_cache=False, logits_to_keep=1).logits
    finally:
        for handle in handles:
            handle.remove()
    return z, out, logits


def _prefix_reuse(model, clean, corrupt, layers, changed_only: bool = False
                  ) -> Callable[[], torch.Tensor]:
    """Hand-written head patching with prefix reuse in plain PyTorch (GPT-2's block).
    ``changed_only``: rows only for the (head, position) cells where the clean projection
    input differs from the corrupted one (the others score the corrupted run's metric)."""
    blocks = model.transformer.h
    heads = model.config.n_head
    size = model.config.n_embd // heads

    def sweep() -> torch.Tensor:
        tokens = clean.shape[1]
        z_clean, _, _ = _runs(model, clean)
        z_corrupt, out_corrupt, corrupt_logits = _runs(model, corrupt)
        embeddings = model.transformer.wte(corrupt) + model.transformer.wpe(
            torch.arange(tokens))
        scores = metric(corrupt_logits).expand(len(layers), heads * tokens).clone()
        for i, layer in enumerate(layers):
            head = torch.arange(heads).repeat_interleave(tokens)
            position = torch.arange(tokens).repeat(heads)
            if changed_only:
                differs = (z_clean[layer][0] != z_corrupt[layer][0]).reshape(
                    tokens, heads, size).any(-1)  # (position, head)
                keep = differs[position, head]
                head, position = head[keep], position[keep]
            rows = torch.arange(len(head))
            block = blocks[layer]
            z = z_corrupt[layer].expand(len(head), tokens, -1).clone()
            columns = (head * size)[:, None] + torch.arange(size)
            z[rows[:, None], position[:, None], columns] = \
                z_clean[layer][0, position[:, None], columns]
            residual = out_corrupt[layer - 1] if layer > 0 else embeddings
            h = residual + block.attn.c_proj(z)
            h = h + block.mlp(block.ln_2(h))
            for later in blocks[layer + 1:]:
                h = later(h)
                h = h[0] if isinstance(h, tuple) else h
            logits = model.lm_head(model.transformer.ln_f(h[:, -1:]))
            scores[i, head * tokens + position] = metric(logits)
        return scores.reshape(len(layers), heads, tokens)

    return sweep


def run(quick: bool = False, rounds: int = 2, log: Callable[[str], None] = print
        ) -> list[dict[str, Any]]:
    """One dict per method: ``seconds`` (median), ``cells_per_s``, ``speedup`` (over
    fxsight's) and ``max_abs_diff`` from the hand-written sweep's scores."""
    torch.set_grad_enabled(False)
    n_layer, tokens, layers = (4, 8, (1, 3)) if quick else (12, TOKENS, LAYERS)
    rounds = 1 if quick else rounds
    model = gpt2(n_layer, 768, 12, 50257)
    clean, corrupt = _prompts(model.config.vocab_size, tokens)
    methods = {"fxsight": _fxsight(model, clean, corrupt, layers, True),
               "fxsight (full-length)": _fxsight(model, clean, corrupt, layers, False),
               "hand-written prefix reuse": _prefix_reuse(model, clean, corrupt, layers),
               "hand-written, changed cells only": _prefix_reuse(model, clean, corrupt, layers,
                                                                 True)}
    shape = f"gpt2 {n_layer}x768"
    cells = len(layers) * model.config.n_head * tokens
    first: dict[str, tuple[float, torch.Tensor]] = {}
    for name in ("fxsight", "fxsight (full-length)"):
        start = time.perf_counter()
        value = methods[name]()
        first[name] = (time.perf_counter() - start, value)
    times: dict[str, list[float]] = {name: [] for name in methods}
    scores: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        order = list(methods)
        random.Random(17 + r).shuffle(order)
        for name in order:
            start = time.perf_counter()
            scores[name] = methods[name]()
            times[name].append(time.perf_counter() - start)
            log(f"round {r}: {name} {times[name][-1]:.2f} s")
    reference = scores["hand-written prefix reuse"]
    fx_time = statistics.median(times["fxsight"])
    results = []
    for name in methods:
        seconds = statistics.median(times[name])
        results.append(dict(model=shape, method=name, cells=cells, repeats=len(times[name]),
                            seconds=seconds, cells_per_s=cells / seconds,
                            speedup=seconds / fx_time,
                            max_abs_diff=float((scores[name] - reference).abs().max())))
    seconds, value = first["fxsight"]
    results.insert(1, dict(model=shape, method="fxsight (first call)", cells=cells, repeats=1,
                           seconds=seconds, cells_per_s=cells / seconds,
                           speedup=seconds / fx_time,
                           max_abs_diff=float((value - reference).abs().max())))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | method | cells | seconds (median) | cells/s | fxsight x | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['method']} | {r['cells']} | {r['seconds']:.2f} | "
                     f"{r['cells_per_s']:.1f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> str:
    notes = []
    for r in results:
        if r["method"] in TARGETS:
            target = TARGETS[r["method"]]
            verdict = "met" if r["speedup"] >= target else "NOT met"
            notes.append(f"- fxsight >= {target:.0f}x {r['method']}: {r['speedup']:.2f}x "
                         f"({verdict})")
    return "\n".join(notes)


if __name__ == "__main__":
    print(table(run()))
