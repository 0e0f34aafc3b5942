"""Generation with a steering vector added at every decoding step: tokens per second.

Greedy, KV cache on, batch 1, a 16-token prompt, ``min_new_tokens = max_new_tokens``.
Variants, eager (compared with ``plain generate`` and ``hooks``):

- ``plain generate``: transformers' ``generate``, no intervention;
- ``hooks``: a hand-written forward hook adding the vector at the last position;
- ``fxsight hooks``: ``lm.generate(..., backend="hooks")`` with
  ``for _ in tracer.iter[0:n]: block.output[:, -1] += v`` (recording and binding
  included);
- ``fxsight eager``: the same on the fx backend (every step a rewritten graph);
- ``nnsight``: the same with nnsight's ``LanguageModel``, in a child process (importing
  nnsight breaks ``torch.export`` in the process that does), timed against that process's
  own plain ``generate``.

Variants, compiled (compared with ``compiled generate`` and ``compiled + steering hook``):

- ``compiled generate``: a copy of the model whose ``forward`` is compiled
  (``model.forward = torch.compile(model.forward)``, the usual way to compile what
  ``generate`` calls), no intervention;
- ``compiled + steering hook``: the same on a copy whose block has the steering hook
  registered before compilation (dynamo traces it into the graphs);
- ``fxsight compiled``: fxsight's steered generation with ``compile=True`` (the first step
  and the decoding step compiled once each).

Each round runs every variant once, in a seeded random order; medians and minima after two
warm-up calls (the compiled variants compile, and recompile once for dynamic lengths,
there). Every variant's ids are compared with the hand-written hook's.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any, Callable

import torch

from perf.child import run_in_child
from perf.models import blocks, gpt2, llama
from perf.timing import (SEED, SHUFFLED, compiled_graphs, estimators, ratio,
                         shuffled_rounds, synced, unique_compile)

ORDER = SHUFFLED

PROMPT_TOKENS = 16
SHAPES = {"tiny (2x64)": (2, 64, 4, 128), "gpt2-small shape (12x768)": (12, 768, 12, 50257)}


class _IdsTokenizer:
    """A stand-in tokenizer: prompts here are token ids already."""

    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    pad_token = "<pad>"


def _setup(name: str, new_tokens: int, device: str = "cpu", dtype: str = "float32"
           ) -> tuple[torch.nn.Module, dict, torch.Tensor, int, dict]:
    """The model ``name`` (a GPT-2 of ``SHAPES`` or a Llama of ``perf.models.LLAMA``) on
    ``device`` in ``dtype``, the prompt, the steering vector, the steered layer and the
    options of ``generate``."""
    if name in SHAPES:
        model = gpt2(*SHAPES[name], n_positions=1024)
    else:
        model = llama(name, device)
    model = model.to(device, getattr(torch, dtype))
    config = model.config
    ids = torch.randint(1, config.vocab_size, (1, PROMPT_TOKENS),
                        generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    steer = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (model, inputs, steer.to(device, model.dtype), config.num_hidden_layers // 2,
            options)


def _plain(model: torch.nn.Module, inputs: dict, options: dict) -> Callable:
    return lambda: model.generate(**inputs, **options)


def _adder(steer: torch.Tensor) -> Callable:
    """A forward hook adding ``steer`` at the last position of a block's output."""
    def add(module, args, output):
        output = output.clone()
        output[:, -1] += steer
        return output
    return add


def _hooks(model: torch.nn.Module, inputs: dict, steer: torch.Tensor, layer: int,
           options: dict) -> Callable:
    block = blocks(model)[layer]
    add = _adder(steer)

    def run():
        handle = block.register_forward_hook(add)
        try:
            return model.generate(**inputs, **options)
        finally:
            handle.remove()
    return run


def _compiled(model: torch.nn.Module, inputs: dict, options: dict, label: str,
              steer: torch.Tensor | None = None, layer: int = 0) -> Callable:
    """``generate`` on a copy of ``model`` whose ``forward`` is compiled; with ``steer``,
    the copy's block ``layer`` has the steering hook, registered before compilation."""
    twin = copy.deepcopy(model)
    if steer is not None:
        blocks(twin)[layer].register_forward_hook(_adder(steer))
    twin.forward = unique_compile(twin.forward, label)
    return lambda: twin.generate(**inputs, **options)


def _steered(lm: Any, inputs: dict, steer: torch.Tensor, layer: int, options: dict,
             **generate_kwargs) -> Callable:
    """The experiment in nnsight 0.8's API (runs on fxsight's and nnsight's LanguageModel).

    Every step is named (``tracer.iter[0:n]``): nnsight never runs what follows an
    unbounded ``tracer.all()`` in the block."""
    steps = options["max_new_tokens"]

    def run():
        with lm.generate(dict(inputs), **options, **generate_kwargs) as tracer:
            for _ in tracer.iter[0:steps]:
                blocks(lm)[layer].output[:, -1] += steer
            tokens = tracer.result.save()
        return tokens
    return run


def _nnsight_worker(name: str, new_tokens: int, repeats: int, device: str = "cpu",
                    dtype: str = "float32") -> None:
    """(In the child process.) Print JSON: nnsight's, plain generate's and the hook's
    estimators, the first call, and nnsight's generated ids."""
    import nnsight

    torch.set_grad_enabled(False)
    torch.set_num_threads(int(os.environ.get("FXSIGHT_BENCH_THREADS", "2")))
    model, inputs, steer, layer, options = _setup(name, new_tokens, device, dtype)
    lm = nnsight.LanguageModel(model, tokenizer=_IdsTokenizer())
    fns = {"plain generate": _plain(model, inputs, options),
           "hooks": _hooks(model, inputs, steer, layer, options),
           "nnsight": _steered(lm, inputs, steer, layer, options)}
    fns = {variant: synced(fn, device) for variant, fn in fns.items()}
    start = time.perf_counter()
    tokens = fns["nnsight"]()
    first = time.perf_counter() - start
    for fn in fns.values():
        fn()
    times, _ = shuffled_rounds(fns, repeats, SEED)
    print(json.dumps({**{k: estimators(t) for k, t in times.items()}, "first": first,
                      "tokens": torch.as_tensor(tokens).tolist()}))


def _nnsight_in_child(name: str, new_tokens: int, repeats: int, device: str = "cpu",
                      dtype: str = "float32") -> dict | str:
    return run_in_child(f"from perf.bench_generation import _nnsight_worker; "
                        f"_nnsight_worker({name!r}, {new_tokens}, {repeats}, {device!r}, "
                        f"{dtype!r})",
                        FXSIGHT_BENCH_THREADS=str(torch.get_num_threads()))


EAGER = ("plain generate", "hooks", "fxsight hooks", "fxsight eager", "nnsight")
COMPILED = ("compiled generate", "compiled + steering hook", "fxsight compiled")
BASELINES = {**{v: ("plain generate", "hooks") for v in EAGER},
             **{v: ("compiled generate", "compiled + steering hook") for v in COMPILED}}


def _variants(name: str, model, lm, inputs, steer, layer, options) -> dict[str, Callable]:
    return {
        "plain generate": _plain(model, inputs, options),
        "hooks": _hooks(model, inputs, steer, layer, options),
        "fxsight hooks": _steered(lm, inputs, steer, layer, options, backend="hooks"),
        "fxsight eager": _steered(lm, inputs, steer, layer, options, backend="fx"),
        "compiled generate": _compiled(model, inputs, options, f"{name} generate"),
        "compiled + steering hook": _compiled(model, inputs, options, f"{name} steered",
                                              steer, layer),
        "fxsight compiled": _steered(lm, inputs, steer, layer, options, backend="fx",
                                     compile=True),
    }


def _first_calls(fns: dict[str, Callable], reference: torch.Tensor
                 ) -> tuple[dict[str, float], dict[str, bool]]:
    """Every variant's first call (seconds; it compiles where it compiles), whether its
    ids equal ``reference``, then one more warm-up call (the compiled variants' second
    length recompiles with dynamic shapes there)."""
    first, same = {}, {}
    for variant, fn in fns.items():
        start = time.perf_counter()
        tokens = fn()
        first[variant] = time.perf_counter() - start
        same[variant] = variant.endswith("generate") or torch.equal(tokens, reference)
        fn()
    return first, same


def _rows(name, new_tokens, times, first, same, child, reference) -> list[dict[str, Any]]:
    stats = {v: estimators(t) for v, t in times.items()}
    rows = []
    for variant in EAGER + COMPILED:
        plain, hooks = BASELINES[variant]
        row = {"model": name, "variant": variant}
        if variant == "nnsight":
            if not isinstance(child, dict):
                rows.append({**row, "skipped": child})
                continue
            own = child["nnsight"]
            row.update(vs_plain=ratio(own, child["plain generate"]),
                       vs_hooks=ratio(own, child["hooks"]), first_s=child["first"],
                       same_tokens_as_hooks=child["tokens"] == reference.tolist())
        else:
            own = stats[variant]
            row.update(vs_plain=ratio(own, stats[plain]), vs_hooks=ratio(own, stats[hooks]),
                       first_s=first[variant], same_tokens_as_hooks=same[variant])
        row.update(seconds=own["median"], min_s=own["min"],
                   tokens_per_s=new_tokens / own["median"])
        rows.append(row)
    return rows


def run(quick: bool = False, only: str | None = None, rounds: int | None = None
        ) -> list[dict[str, Any]]:
    """One dict per (model, variant): seconds per generation (median, min), tokens per
    second, ratios to the baselines of the variant's mode (``{"median", "min"}``).
    ``only``: the model names (``tiny``, ``gpt2-small``) containing it; ``rounds``: timed
    rounds instead of the default."""
    import fxsight
    from fxsight import LanguageModel

    torch.set_grad_enabled(False)
    new_tokens = 8 if quick else 32
    repeats = rounds or (3 if quick else 9)
    results = []
    for name in SHAPES:
        if only and only not in f"generation/{name}":
            continue
        model, inputs, steer, layer, options = _setup(name, new_tokens)
        lm = LanguageModel(model, tokenizer=_IdsTokenizer())
        fns = _variants(name, model, lm, inputs, steer, layer, options)
        reference = fns["hooks"]()
        first, same = _first_calls(fns, reference)
        graphs, compiles = compiled_graphs(), fxsight.stats()["compilations"]
        times, _ = shuffled_rounds(fns, repeats, SEED)
        new = (compiled_graphs() - graphs, fxsight.stats()["compilations"] - compiles)
        child = _nnsight_in_child(name, new_tokens, repeats)
        results += _rows(name, new_tokens, times, first, same, child, reference)
        if any(new):
            results.append({"model": name, "variant": "!",
                            "skipped": f"{new[0]} graph(s) compiled during the timed rounds"})
    return results


def _pair(value: dict[str, float]) -> str:
    return f"{value['median']:.2f} / {value['min']:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table; ratios are median / min, against the baselines of each variant's
    mode (eager: plain generate, hooks; compiled: compiled generate, compiled + hook)."""
    lines = ["| model | variant | s / generation (median) | min s | tokens/s | "
             "÷ plain of its mode | ÷ hook of its mode | first call s | same ids as hook |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['variant']} | skipped: {r['skipped']} "
                         f"| | | | | | |")
            continue
        note = " (own process)" if r["variant"] == "nnsight" else ""
        seconds = "" if note else f"{r['seconds']:.4f}"
        minimum = "" if note else f"{r['min_s']:.4f}"
        tokens = "" if note else f"{r['tokens_per_s']:.1f}"
        lines.append(f"| {r['model']} | {r['variant']}{note} | {seconds} | {minimum} | "
                     f"{tokens} | {_pair(r['vs_plain'])} | {_pair(r['vs_hooks'])} | "
                     f"{r['first_s']:.2f} | {r['same_tokens_as_hooks']} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> str:
    """Issue 17's generation target: fxsight compiled ≤ 1.0× the compiled model with a
    steering hook."""
    lines = []
    for r in results:
        if r["variant"] == "fxsight compiled" and "vs_hooks" in r:
            got = r["vs_hooks"]
            lines.append(f"- {r['model']}: fxsight compiled steering ÷ compiled + steering "
                         f"hook = {got['median']:.2f} (min {got['min']:.2f}; target ≤ 1.0): "
                         f"{'met' if got['median'] <= 1.0 else 'NOT met'}")
        if r.get("same_tokens_as_hooks") is False:
            lines.append(f"- {r['model']}: {r['variant']}'s ids DIFFER from the hook's")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(quick="--quick" in sys.argv)))
