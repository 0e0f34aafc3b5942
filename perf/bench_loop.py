"""A patching loop as researchers write it: one trace per (layer, position) cell.

The sweep benchmark (``perf/bench_sweep.py``) measures fxsight's own sweep functions. This
one measures the loop most scripts contain instead, written once in nnsight's API and run on
fxsight and on nnsight: per cell, one trace with a clean invoke that reads block ``l``'s
output at position ``p`` and a corrupted invoke that writes it there and saves the logits
at the last position (nnsight's activation-patching tutorial, one cell at a time).

Models: a tiny GPT-2 (2 layers, 64 wide, vocab 1000) with every layer x 16 positions, and a
gpt2-small shape (12 layers x 768, vocab 50257) with its first 3 layers x 16 positions;
prompts of 16 tokens, one token apart; ``use_cache=False`` and ``logits_to_keep=1`` (the
head on the last position only: what a competent user passes when only it is scored) in
every variant's forward passes; no autograd.

Passes (each over every cell):

- ``fxsight, first pass``: a fresh copy of the model whose capture is made beforehand (by a
  trace that only saves the logits) but which has run no patching trace: every cell's
  Program is new to it. Before integer indices were graph inputs, every position spliced
  and compiled a graph of its own here;
- ``fxsight, again``: the same loop once more (every cell's runner is cached);
- ``nnsight``: the same code on nnsight 0.8.1, in its own process (``FXSIGHT_BENCH_NNSIGHT_PATH``);
- ``hand-written hooks``: what one writes in plain PyTorch for the same cells: the clean
  prompt's block outputs kept by one forward, then per cell a forward of the corrupted prompt
  with a forward hook that writes the clean value (half the rows of a two-invoke trace);
- ``fxsight, clean kept``: that algorithm in fxsight: one trace saves the clean block
  outputs, then one single-invoke trace per cell writes them (the like-for-like port).

Rounds run the passes in a seeded random order (each first pass on its own model copy); medians
and minima over rounds. Every pass's scores (the last position's logits) are compared with
the hand-written hooks'.
"""

from __future__ import annotations

import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from perf.child import NNSIGHT_PATH, NNSIGHT_PYTHON
from perf.models import gpt2
from perf.timing import SEED, SHUFFLED

ORDER = SHUFFLED

TOKENS = 16
# every forward of a cell: no cache, and the head on the last position only (the score)
OPTIONS = dict(use_cache=False, logits_to_keep=1)
MODELS = {
    "tiny": ("tiny-gpt2 2x64 (vocab 1000)", (2, 64, 4, 1000), 2),
    "small": ("gpt2-small 12x768 (first 3 layers)", (12, 768, 12, 50257), 3),
}


# each fxsight pass's baseline: the same code on nnsight, or the same algorithm by hand
BASELINES = {"fxsight, first pass": "nnsight", "fxsight, again": "nnsight",
             "fxsight, clean kept": "hand-written hooks"}


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(4, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[0, TOKENS // 2] = (corrupt[0, TOKENS // 2] + 1) % vocab
    return clean, corrupt


def _tutorial_loop(wrapped: Any, clean: torch.Tensor, corrupt: torch.Tensor,
                   layers: int) -> Callable[[], torch.Tensor]:
    """The loop in nnsight's API (runs on fxsight's and on nnsight's wrappers)."""

    def loop() -> torch.Tensor:
        scores = []
        for layer in range(layers):
            for position in range(TOKENS):
                with wrapped.trace() as tracer:
                    barrier = tracer.barrier(2)  # (nnsight runs invokes as threads)
                    with tracer.invoke(clean, **OPTIONS):
                        value = wrapped.transformer.h[layer].output[:, position]
                        barrier()
                    with tracer.invoke(corrupt, **OPTIONS):
                        barrier()
                        wrapped.transformer.h[layer].output[:, position] = value
                        logits = wrapped.lm_head.output[:, -1].save()
                scores.append(getattr(logits, "value", logits))
        return torch.cat(scores)

    return loop


def _clean_kept_loop(wrapped: Any, clean: torch.Tensor, corrupt: torch.Tensor,
                     layers: int) -> Callable[[], torch.Tensor]:
    def loop() -> torch.Tensor:
        with wrapped.trace(clean, **OPTIONS):
            kept = [wrapped.transformer.h[layer].output.save() for layer in range(layers)]
        scores = []
        for layer in range(layers):
            for position in range(TOKENS):
                with wrapped.trace(corrupt, **OPTIONS):
                    wrapped.transformer.h[layer].output[:, position] = kept[layer][:, position]
                    logits = wrapped.lm_head.output[:, -1].save()
                scores.append(logits)
        return torch.cat(scores)

    return loop


def _hooks_loop(model: torch.nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                layers: int) -> Callable[[], torch.Tensor]:
    blocks = model.transformer.h

    def loop() -> torch.Tensor:
        kept: dict[int, torch.Tensor] = {}
        handles = [blocks[layer].register_forward_hook(
            lambda module, args, output, layer=layer: kept.__setitem__(layer, output))
            for layer in range(layers)]
        try:
            model(clean, **OPTIONS)
        finally:
            for handle in handles:
                handle.remove()
        scores = []
        for layer in range(layers):
            for position in range(TOKENS):
                def write(module, args, output, layer=layer, position=position):
                    output = output.clone()
                    output[:, position] = kept[layer][:, position]
                    return output

                handle = blocks[layer].register_forward_hook(write)
                try:
                    scores.append(model(corrupt, **OPTIONS).logits[:, -1])
                finally:
                    handle.remove()
        return torch.cat(scores)

    return loop


def _fresh_fxsight(model: torch.nn.Module, clean: torch.Tensor, corrupt: torch.Tensor,
                   layers: int) -> Callable[[], torch.Tensor]:
    """A first pass on a fresh copy of the model (its capture made beforehand)."""
    from fxsight import NNsight

    copies: list[torch.nn.Module] = []

    def loop() -> torch.Tensor:
        fresh = copies.pop()
        wrapped = NNsight(fresh)
        return _tutorial_loop(wrapped, clean, corrupt, layers)()

    def prepare() -> None:
        from fxsight import NNsight as Wrapper

        fresh = copy.deepcopy(model)
        wrapped = Wrapper(fresh)
        with wrapped.trace() as tracer:  # the capture of the two-invoke batch
            with tracer.invoke(clean, **OPTIONS):
                pass
            with tracer.invoke(corrupt, **OPTIONS):
                wrapped.lm_head.output.save()
        copies.append(fresh)

    loop.prepare = prepare  # type: ignore[attr-defined]
    return loop


# --- nnsight, in its own process ---------------------------------------------------------
def _nnsight_child(name: str, rounds: int) -> None:
    """(Run with nnsight importable.) A warm-up pass, then ``rounds`` timed passes; prints
    JSON: the seconds of each and the scores."""
    import warnings

    from perf.bench_core import _nnsight_wrapper

    torch.set_grad_enabled(False)
    torch.set_num_threads(int(os.environ.get("FXSIGHT_BENCH_THREADS", "2")))
    _, shape, layers = MODELS[name]
    model = gpt2(*shape)
    clean, corrupt = _prompts(model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = _nnsight_wrapper(model)  # (batches invokes as fxsight's NNsight does)
        loop = _tutorial_loop(wrapped, clean, corrupt, layers)
        loop()
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            scores = loop()
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "scores": scores.tolist()}))


def _nnsight(name: str, rounds: int) -> tuple[list[float], torch.Tensor] | str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, NNSIGHT_PATH, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)),
               FXSIGHT_BENCH_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([NNSIGHT_PYTHON, "-m", "perf.bench_loop", "--nnsight-child", name,
                           str(rounds)], env=env, capture_output=True, text=True, cwd=root)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return f"nnsight did not run ({lines[-1][:120] if lines else done.returncode})"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], torch.tensor(result["scores"])


# --- the benchmark -----------------------------------------------------------------------
def _one(name: str, rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from fxsight import NNsight

    label, shape, layers = MODELS[name]
    model = gpt2(*shape)
    clean, corrupt = _prompts(model.config.vocab_size)
    wrapped = NNsight(model)
    passes: dict[str, Callable[[], torch.Tensor]] = {
        "fxsight, first pass": _fresh_fxsight(model, clean, corrupt, layers),
        "fxsight, again": _tutorial_loop(wrapped, clean, corrupt, layers),
        "hand-written hooks": _hooks_loop(model, clean, corrupt, layers),
        "fxsight, clean kept": _clean_kept_loop(wrapped, clean, corrupt, layers),
    }
    passes["fxsight, again"]()  # warm-ups: captures, splices
    passes["fxsight, clean kept"]()
    times: dict[str, list[float]] = {p: [] for p in passes}
    scores: dict[str, torch.Tensor] = {}
    order = list(passes)
    for round_ in range(rounds):
        random.Random(SEED + round_).shuffle(order)
        for pass_ in order:
            fn = passes[pass_]
            if hasattr(fn, "prepare"):
                fn.prepare()
            start = time.perf_counter()
            scores[pass_] = fn()
            times[pass_].append(time.perf_counter() - start)
        log(f"loop/{name}: round {round_ + 1} of {rounds}")
    found = _nnsight(name, rounds)
    if isinstance(found, tuple):
        times["nnsight"], scores["nnsight"] = found
    cells = layers * TOKENS
    reference = scores["hand-written hooks"]
    rows = []
    for pass_, seconds in times.items():
        row = dict(model=label, variant=pass_, cells=cells, rounds=len(seconds),
                   median_s=statistics.median(seconds), min_s=min(seconds),
                   ms_per_cell=statistics.median(seconds) / cells * 1e3,
                   max_abs_diff=float((scores[pass_] - reference).abs().max()))
        rows.append(row)
    if isinstance(found, str):
        rows.append(dict(model=label, variant="nnsight", skipped=found))
    by_name = {r["variant"]: r for r in rows if "median_s" in r}
    for row in rows:
        base = by_name.get(BASELINES.get(row["variant"], ""))
        if "median_s" in row and base is not None:
            row["vs"] = base["variant"]
            row["ratio"] = {"median": row["median_s"] / base["median_s"],
                            "min": row["min_s"] / base["min_s"]}
    return rows


def run(quick: bool = False, only: str | None = None, rounds: int = 3,
        log: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """One dict per (model, pass): seconds (median, min), ms per cell, the ratio to its
    baseline (nnsight's pass for the tutorial code, the hand-written hooks for the
    clean-kept one) and the largest difference from the hooks' scores."""
    torch.set_grad_enabled(False)
    part = only.split("/")[1] if only and "/" in only else None
    names = [part] if part else (["tiny"] if quick else list(MODELS))
    rounds = 1 if quick else rounds
    results = []
    for name in names:
        results += _one(name, rounds, log)
    torch.set_grad_enabled(True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | pass | cells | median s | min s | ms per cell | ÷ its baseline "
             "(median / min) | max abs diff |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['variant']} | | | | | {r['skipped']} | |")
            continue
        versus = f"{r['ratio']['median']:.2f} / {r['ratio']['min']:.2f} ÷ {r['vs']}" \
            if "ratio" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['cells']} | {r['median_s']:.2f} "
                     f"| {r['min_s']:.2f} | {r['ms_per_cell']:.1f} | {versus} | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--nnsight-child"]:
        _nnsight_child(sys.argv[2], int(sys.argv[3]))
    else:
        print(table(run(quick="--quick" in sys.argv,
                        log=lambda line: print(line, file=sys.stderr))))
