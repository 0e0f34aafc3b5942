"""Two-invoke activation patching: fxsight vs hand-written forward hooks vs nnsight.

One batched forward of 8 rows x 32 tokens (built from token ids): 4 clean rows and 4
corrupted rows; the clean rows' output of one transformer block at one position replaces
the corrupted rows' and the corrupted rows' logits are read. Models: a tiny GPT-2 (2 layers,
64 wide) and a gpt2-small shape (12 layers, 768 wide, random weights).

- ``fxsight``: ``LanguageModel`` (fx backend), ``tracer.invoke(clean)`` then
  ``tracer.invoke(corrupt)``, recording included in the time of every call;
- ``hooks``: the same patch as a plain forward hook on the block, one forward;
- ``nnsight``: nnsight's two-invoke version, when nnsight is importable (skipped otherwise).

Medians (and minima) after warm-up, methods interleaved call by call (the first fxsight
call captures and splices the graph; it is not timed). ``run()`` returns one dict per
(model, method); ``python perf/bench_patching.py`` (or ``python -m perf.bench_patching``)
prints the table.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

import torch

from perf.models import gpt2

ROWS, TOKENS = 8, 32
POSITION = 5


def _gpt2(n_layer: int, n_embd: int, n_head: int, vocab_size: int) -> torch.nn.Module:
    return gpt2(n_layer, n_embd, n_head, vocab_size, n_positions=max(TOKENS, 64))


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "tiny-gpt2 (2x64)": lambda: _gpt2(2, 64, 4, 128),
    "gpt2-small shape (12x768)": lambda: _gpt2(12, 768, 12, 50257),
}


def _inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab_size, (ROWS // 2, TOKENS), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(4, vocab_size, (ROWS // 2,), generator=generator)
    return clean, corrupt


Patch = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _fxsight(model: torch.nn.Module, layer: int) -> Patch:
    from fxsight import LanguageModel

    lm = LanguageModel(model, backend="fx")

    def patch(clean, corrupt):
        with lm.trace() as tracer:
            with tracer.invoke(clean):
                h = lm.transformer.h[layer].output[:, POSITION]
            with tracer.invoke(corrupt):
                lm.transformer.h[layer].output[:, POSITION] = h
                logits = lm.lm_head.output.save()
        assert tracer.backend == "fx"
        return logits

    return patch


def _hooks(model: torch.nn.Module, layer: int) -> Patch:
    half = ROWS // 2

    def hook(module, args, output):
        output = output.clone()
        output[half:, POSITION] = output[:half, POSITION]
        return output

    def patch(clean, corrupt):
        ids = torch.cat([clean, corrupt])
        handle = model.transformer.h[layer].register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           use_cache=False).logits
        finally:
            handle.remove()
        return logits[half:]

    return patch


def _nnsight(model: torch.nn.Module, layer: int) -> Patch | None:
    try:
        import nnsight  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed (or broken): skipped
        return None
    wrapped = nnsight.NNsight(model)

    def patch(clean, corrupt):
        with wrapped.trace() as tracer:
            with tracer.invoke(clean, use_cache=False):
                output = wrapped.transformer.h[layer].output
                h = (output[0] if isinstance(output, tuple) else output)[:, POSITION]
            with tracer.invoke(corrupt, use_cache=False):
                output = wrapped.transformer.h[layer].output
                (output[0] if isinstance(output, tuple) else output)[:, POSITION] = h
                logits = wrapped.lm_head.output.save()
        return getattr(logits, "value", logits)

    return patch


def _time(methods: dict[str, Callable], args: tuple, repeats: int, warmup: int,
          ) -> dict[str, tuple[list[float], Any] | Exception]:
    """Per method: (seconds of each timed call, last result), or the error it raised.
    Methods are interleaved call by call, so load from elsewhere hits them alike."""
    results: dict[str, Any] = {}
    live = dict(methods)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                results[name] = ([], fn(*args))
        except Exception as error:  # noqa: BLE001 - a failing method is reported
            results[name] = error
            del live[name]
    for _ in range(repeats):
        for name, fn in live.items():
            start = time.perf_counter()
            value = fn(*args)
            results[name][0].append(time.perf_counter() - start)
            results[name] = (results[name][0], value)
    return results


def run(repeats: int = 7, quick: bool = False) -> list[dict[str, Any]]:
    """Time each method on each model; one dict per (model, method) with ``median_ms``,
    ``min_ms``, ``ratio_to_hooks`` (of medians) and ``max_abs_diff`` (from the hand-written
    hooks' logits). Methods that cannot run have ``skipped`` (the reason) instead."""
    with torch.no_grad():
        return _run(repeats, quick)


def _run(repeats: int, quick: bool) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for name, build in MODELS.items():
        model = build()
        layer = len(model.transformer.h) // 2
        clean, corrupt = _inputs(model.config.vocab_size)
        if "small" in name:  # about a second per call
            model_repeats = max(2, repeats // 3) if quick else repeats
        else:  # milliseconds per call: more calls for a stable median
            model_repeats = repeats * 5
        methods = {"hooks": _hooks(model, layer), "fxsight": _fxsight(model, layer),
                   "nnsight": _nnsight(model, layer)}
        for method in [m for m, fn in methods.items() if fn is None]:
            results.append(dict(model=name, method=method, skipped="not installed"))
            del methods[method]
        timings = _time(methods, (clean, corrupt), model_repeats, warmup=1 if quick else 2)
        base_times, base_logits = timings["hooks"]
        base = statistics.median(base_times)
        for method, timing in timings.items():
            if isinstance(timing, Exception):
                results.append(dict(model=name, method=method,
                                    skipped=f"{type(timing).__name__}: {timing}"))
                continue
            times, logits = timing
            median = statistics.median(times)
            results.append(dict(
                model=name, method=method, layer=layer, batch=f"{ROWS}x{TOKENS}",
                repeats=model_repeats, median_ms=median * 1e3, min_ms=min(times) * 1e3,
                ratio_to_hooks=median / base,
                max_abs_diff=float((logits - base_logits).abs().max())))
    order = {"hooks": 0, "fxsight": 1, "nnsight": 2}
    results.sort(key=lambda r: (list(MODELS).index(r["model"]), order[r["method"]]))
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<28}{'method':<10}{'median ms':>11}{'min ms':>10}{'x hooks':>9}"
             f"{'max |diff|':>12}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['model']:<28}{r['method']:<10}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['model']:<28}{r['method']:<10}{r['median_ms']:>11.2f}"
                     f"{r['min_ms']:>10.2f}{r['ratio_to_hooks']:>9.2f}"
                     f"{r['max_abs_diff']:>12.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    print(f"two-invoke clean->corrupted patching at one layer, batch {ROWS}x{TOKENS} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(run(quick=quick)))


if __name__ == "__main__":
    main()
