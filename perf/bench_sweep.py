"""Activation-patching sweep: fxsight vs hand-written batched hooks vs an nnsight loop.

A gpt2-small shape (12 layers x 768, 12 heads, vocabulary 50257, random weights), a clean
and a corrupted prompt of 32 tokens (one token differs), the residual stream (block output)
patched at every layer x position: 384 cells, each scored by a logit difference at the last
position.

- ``fxsight``: ``fxsight.patching.activation_patching(..., sites=["resid"])`` (batches of
  32 cells; prefix reuse: a cell at layer l runs blocks l+1.. only; the head on the last
  position only, since the metric reads nothing else).
- ``hooks (batched)``: what one writes by hand with the same batching: the clean block
  outputs saved once, then per layer one forward of 32 corrupted rows with a forward hook
  that puts row r's clean position r in place; the logits as ``model(...).logits``.
- ``hooks (batched, last logits)``: the same with ``logits_to_keep=1`` (only the head's
  share of the saving is left out of the comparison).
- ``nnsight loop``: the idiomatic nnsight loop, one two-invoke trace per cell (clean
  invoke reads, a barrier, corrupted invoke writes and saves the logits), when
  ``import nnsight`` works (skipped otherwise); on its own copy of the model, since nnsight
  replaces the forward of the model it wraps.

Every method's scores are checked against the batched hooks' (``max_abs_diff``). Methods
alternate run by run; fxsight's first sweep (it captures the model and splices one graph per
layer) is a warm-up, reported on its own row; the nnsight loop is timed once (hundreds of
traces). ``fxsight x``: each method's time over fxsight's (warm) time. ``--quick``: a
4-layer model of the same width, 16 positions, one timed run.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any, Callable

import torch

from perf.models import gpt2

TOKENS = 32
A, B = 11, 22  # the metric: logit of token A minus logit of token B at the last position


def _model(n_layer: int) -> torch.nn.Module:
    return gpt2(n_layer, 768, 12, 50257)


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def _prompts(vocab: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (1, tokens), generator=generator)
    corrupt = clean.clone()
    corrupt[0, tokens // 3] = (clean[0, tokens // 3] + 1) % vocab
    return clean, corrupt


def _fxsight(model, clean, corrupt, batch: int) -> Callable[[], torch.Tensor]:
    from fxsight import NNsight
    from fxsight.patching import activation_patching

    net = NNsight(model)

    def sweep() -> torch.Tensor:
        result = activation_patching(net, clean, corrupt, metric, sites=["resid"],
                                     batch_size=batch, progress=False)
        assert result.info["backend"] == "fx", result.info
        return result.values[0] + result.baseline

    return sweep


def _hooks(model, clean, corrupt, batch: int, last_only: bool) -> Callable[[], torch.Tensor]:
    blocks = model.transformer.h
    kwargs = {"use_cache": False, **({"logits_to_keep": 1} if last_only else {})}

    def sweep() -> torch.Tensor:
        tokens = clean.shape[1]
        saved: dict[int, torch.Tensor] = {}
        handles = [block.register_forward_hook(
            lambda m, a, o, i=i: saved.__setitem__(i, o)) for i, block in enumerate(blocks)]
        try:
            model(clean, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        scores = torch.zeros(len(blocks), tokens)
        for layer, block in enumerate(blocks):
            for start in range(0, tokens, batch):
                positions = torch.arange(start, start + batch).clamp(max=tokens - 1)
                rows = torch.arange(batch)

                def patch(module, args, output, positions=positions, layer=layer):
                    output = output.clone()
                    output[rows, positions] = saved[layer][0, positions]
                    return output

                handle = block.register_forward_hook(patch)
                try:
                    logits = model(corrupt.expand(batch, tokens), **kwargs).logits
                finally:
                    handle.remove()
                count = min(batch, tokens - start)
                scores[layer, start:start + count] = metric(logits)[:count]
        return scores

    return sweep


def _nnsight(model, clean, corrupt) -> Callable[[], torch.Tensor] | None:
    try:
        import nnsight
    except Exception:  # noqa: BLE001 - not installed (or broken): skipped
        return None
    import warnings

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # nnsight batches invokes in LanguageModel (its NNsight refuses several invokes); the
    # prompts are token ids, so a one-word stand-in tokenizer only pads
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>", padding_side="left")
    model = copy.deepcopy(model)  # nnsight replaces the forward of the model it wraps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = nnsight.LanguageModel(model, tokenizer=tokenizer)

    def sweep() -> torch.Tensor:
        tokens = clean.shape[1]
        scores = torch.zeros(len(model.transformer.h), tokens)
        for layer in range(len(model.transformer.h)):
            for position in range(tokens):
                with wrapped.trace() as tracer:
                    barrier = tracer.barrier(2)
                    with tracer.invoke(clean):
                        h = wrapped.transformer.h[layer].output[:, position]
                        barrier()
                    with tracer.invoke(corrupt):
                        barrier()
                        wrapped.transformer.h[layer].output[:, position] = h
                        logits = wrapped.lm_head.output.save()
                logits = getattr(logits, "value", logits)
                scores[layer, position] = metric(logits)[0]
        return scores

    return sweep


def run(quick: bool = False, repeats: int = 2) -> list[dict[str, Any]]:
    """One dict per method: ``seconds`` (median of the timed runs), ``cells_per_s``,
    ``speedup`` (the method's time over fxsight's) and ``max_abs_diff`` from the batched
    hooks' scores."""
    torch.set_grad_enabled(False)
    n_layer, tokens = (4, 16) if quick else (12, TOKENS)
    repeats = 1 if quick else repeats
    model = _model(n_layer)
    clean, corrupt = _prompts(model.config.vocab_size, tokens)
    batch = tokens
    methods: dict[str, Callable | None] = {
        "fxsight": _fxsight(model, clean, corrupt, batch),
        "hooks (batched)": _hooks(model, clean, corrupt, batch, last_only=False),
        "hooks (batched, last logits)": _hooks(model, clean, corrupt, batch, last_only=True),
        "nnsight loop": _nnsight(model, clean, corrupt),
    }
    shape = f"gpt2 {n_layer}x768"
    cells = n_layer * tokens
    results: list[dict[str, Any]] = []
    live = {name: fn for name, fn in methods.items() if fn is not None}
    for name in [n for n, fn in methods.items() if fn is None]:
        results.append(dict(model=shape, method=name, skipped="nnsight is not importable"))
    times: dict[str, list[float]] = {name: [] for name in live}
    scores: dict[str, torch.Tensor] = {}
    slow = {"nnsight loop"}  # timed once: hundreds of traces take minutes
    start = time.perf_counter()  # fxsight's first sweep captures and splices: a warm-up
    cold_scores = live["fxsight"]()
    cold = time.perf_counter() - start
    for repeat in range(repeats):
        for name, fn in live.items():
            if name in slow and repeat > 0:
                continue
            start = time.perf_counter()
            scores[name] = fn()
            times[name].append(time.perf_counter() - start)
    reference = scores["hooks (batched)"]
    fx_time = statistics.median(times["fxsight"])
    for name in live:
        seconds = statistics.median(times[name])
        results.append(dict(model=shape, method=name, cells=cells, batch=batch,
                            repeats=len(times[name]), seconds=seconds,
                            cells_per_s=cells / seconds,
                            speedup=seconds / fx_time,
                            max_abs_diff=float((scores[name] - reference).abs().max())))
    results.append(dict(model=shape, method="fxsight (first call)", cells=cells, batch=batch,
                        repeats=1, seconds=cold, cells_per_s=cells / cold,
                        speedup=cold / fx_time,
                        max_abs_diff=float((cold_scores - reference).abs().max())))
    order = ["fxsight", "fxsight (first call)", *list(methods)[1:]]
    results.sort(key=lambda r: order.index(r["method"]))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<14}{'method':<30}{'cells':>6}{'seconds':>9}{'cells/s':>9}"
             f"{'fxsight x':>11}{'max |diff|':>12}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['model']:<14}{r['method']:<30}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['model']:<14}{r['method']:<30}{r['cells']:>6}{r['seconds']:>9.2f}"
                     f"{r['cells_per_s']:>9.1f}{r['speedup']:>10.2f}x{r['max_abs_diff']:>12.1e}")
    targets = {"hooks (batched)": 2.0, "nnsight loop": 3.0}
    notes = []
    for r in results:
        if r.get("method") in targets and "speedup" in r:
            target = targets[r["method"]]
            verdict = "met" if r["speedup"] >= target else "NOT met"
            notes.append(f"target fxsight >= {target:.0f}x {r['method']}: "
                         f"{r['speedup']:.2f}x ({verdict})")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(2)
    quick = "--quick" in argv
    print(f"activation-patching sweep, residual stream, every layer x position; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(table(run(quick=quick)))


if __name__ == "__main__":
    main()
