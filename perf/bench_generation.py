"""Generation with a steering vector added at every decoding step: tokens per second.

Greedy, KV cache on, batch 1, a 16-token prompt, ``min_new_tokens = max_new_tokens``.
Variants, timed in interleaved rounds (one call each per round; medians after warm-up):

- ``plain generate``: transformers' ``generate``, no intervention (the baseline);
- ``hooks``: a hand-written forward hook adding the vector at the last position;
- ``fxsight hooks``: ``lm.generate(..., backend="hooks")`` with
  ``for _ in tracer.iter[0:n]: block.output[:, -1] += v`` (recording and binding
  included);
- ``fxsight eager``: the same on the fx backend (every step a rewritten graph);
- ``fxsight compiled``: the same with ``compile=True`` (the first step and the decoding
  step compiled once each; the first call, which compiles, is reported apart);
- ``nnsight``: the same with nnsight's ``LanguageModel``, in a child process (importing
  nnsight breaks ``torch.export`` in the process that does), timed against that process's
  own plain ``generate``; the interpreter is ``FXSIGHT_BENCH_NNSIGHT_PYTHON``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from perf.child import run_in_child
from perf.models import gpt2

PROMPT_TOKENS = 16
SHAPES = {"tiny (2x64)": (2, 64, 4, 128), "gpt2-small shape (12x768)": (12, 768, 12, 50257)}


class _IdsTokenizer:
    """A stand-in tokenizer: prompts here are token ids already."""

    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    pad_token = "<pad>"


def _setup(name: str, new_tokens: int) -> tuple[torch.nn.Module, dict, torch.Tensor, int, dict]:
    layers, width, heads, vocab = SHAPES[name]
    model = gpt2(layers, width, heads, vocab, n_positions=1024)
    ids = torch.randint(1, vocab, (1, PROMPT_TOKENS),
                        generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    steer = torch.randn(width, generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return model, inputs, steer, layers // 2, options


def _plain(model: torch.nn.Module, inputs: dict, options: dict) -> Callable:
    return lambda: model.generate(**inputs, **options)


def _hooks(model: torch.nn.Module, inputs: dict, steer: torch.Tensor, layer: int,
           options: dict) -> Callable:
    block = model.transformer.h[layer]

    def add(module, args, output):
        output = output.clone()
        output[:, -1] += steer
        return output

    def run():
        handle = block.register_forward_hook(add)
        try:
            return model.generate(**inputs, **options)
        finally:
            handle.remove()
    return run


def _steered(lm: Any, inputs: dict, steer: torch.Tensor, layer: int, options: dict,
             **generate_kwargs) -> Callable:
    """The experiment in nnsight 0.8's API (runs on fxsight's and nnsight's LanguageModel).

    Every step is named (``tracer.iter[0:n]``): nnsight never runs what follows an
    unbounded ``tracer.all()`` in the block."""
    steps = options["max_new_tokens"]

    def run():
        with lm.generate(dict(inputs), **options, **generate_kwargs) as tracer:
            for _ in tracer.iter[0:steps]:
                lm.transformer.h[layer].output[:, -1] += steer
            tokens = tracer.result.save()
        return tokens
    return run


def _interleaved(fns: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _nnsight_worker(name: str, new_tokens: int, repeats: int) -> None:
    """(In the child process.) Print JSON: nnsight's and plain generate's medians, the
    first call, and nnsight's generated ids."""
    import nnsight

    torch.set_grad_enabled(False)
    torch.set_num_threads(int(os.environ.get("FXSIGHT_BENCH_THREADS", "2")))
    model, inputs, steer, layer, options = _setup(name, new_tokens)
    lm = nnsight.LanguageModel(model, tokenizer=_IdsTokenizer())
    fns = {"plain generate": _plain(model, inputs, options),
           "nnsight": _steered(lm, inputs, steer, layer, options)}
    start = time.perf_counter()
    tokens = fns["nnsight"]()
    first = time.perf_counter() - start
    fns["plain generate"]()
    times = _interleaved(fns, repeats)
    print(json.dumps({"plain": statistics.median(times["plain generate"]),
                      "nnsight": statistics.median(times["nnsight"]), "first": first,
                      "tokens": torch.as_tensor(tokens).tolist()}))


def _nnsight_in_child(name: str, new_tokens: int, repeats: int) -> dict | str:
    return run_in_child(f"from perf.bench_generation import _nnsight_worker; "
                        f"_nnsight_worker({name!r}, {new_tokens}, {repeats})",
                        FXSIGHT_BENCH_THREADS=str(torch.get_num_threads()))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One dict per (model, variant): seconds per generation, tokens per second, ratios."""
    import fxsight
    from fxsight import LanguageModel

    torch.set_grad_enabled(False)
    new_tokens = 8 if quick else 32
    repeats = 3 if quick else 7
    results = []
    for name in SHAPES:
        model, inputs, steer, layer, options = _setup(name, new_tokens)
        lm = LanguageModel(model, tokenizer=_IdsTokenizer())
        fns = {
            "plain generate": _plain(model, inputs, options),
            "hooks": _hooks(model, inputs, steer, layer, options),
            "fxsight hooks": _steered(lm, inputs, steer, layer, options, backend="hooks"),
            "fxsight eager": _steered(lm, inputs, steer, layer, options, backend="fx"),
            "fxsight compiled": _steered(lm, inputs, steer, layer, options, backend="fx",
                                         compile=True),
        }
        reference = fns["hooks"]()
        first, same = {}, {}
        for variant, fn in fns.items():
            before = fxsight.stats()["compilations"]
            start = time.perf_counter()
            tokens = fn()
            first[variant] = (time.perf_counter() - start,
                              fxsight.stats()["compilations"] - before)
            same[variant] = variant == "plain generate" or torch.equal(tokens, reference)
            fn()  # warm-up
        compiles_before = fxsight.stats()["compilations"]
        times = _interleaved(fns, repeats)
        recompiles = fxsight.stats()["compilations"] - compiles_before
        base = statistics.median(times["plain generate"])
        for variant, samples in times.items():
            seconds = statistics.median(samples)
            results.append({"model": name, "variant": variant, "seconds": seconds,
                            "tokens_per_s": new_tokens / seconds, "vs_plain": seconds / base,
                            "first_s": first[variant][0],
                            "compilations": first[variant][1] if variant.endswith("compiled")
                            else None,
                            "same_tokens_as_hooks": same[variant]})
        if recompiles:
            results.append({"model": name, "variant": "!",
                            "skipped": f"{recompiles} compilation(s) during the timed rounds"})
        child = _nnsight_in_child(name, new_tokens, repeats)
        if isinstance(child, dict):
            ratio = child["nnsight"] / child["plain"]
            results.append({"model": name, "variant": "nnsight",
                            "seconds": ratio * base, "tokens_per_s": new_tokens / (ratio * base),
                            "vs_plain": ratio, "first_s": child["first"], "compilations": None,
                            "same_tokens_as_hooks": child["tokens"] == reference.tolist(),
                            "note": f"{child['nnsight']:.4f} s in its own process"})
        else:
            results.append({"model": name, "variant": "nnsight", "skipped": child})
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | s / generation | tokens/s | time vs plain | first call s "
             "(compilations) | same ids as hooks |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['variant']} | skipped: {r['skipped']} "
                         f"| | | | |")
            continue
        compiles = f" ({r['compilations']})" if r.get("compilations") is not None else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.4f} | "
                     f"{r['tokens_per_s']:.1f} | {r['vs_plain']:.2f}x | "
                     f"{r['first_s']:.2f}{compiles} | {r['same_tokens_as_hooks']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(quick="--quick" in sys.argv)))
