"""Generation with a steering vector added at every decoding step: tokens per second.

Variants, side by side in one run (greedy, KV cache on, batch 1, a 16-token prompt):

- ``plain generate``: transformers' ``generate``, no intervention (the baseline);
- ``hooks``: a hand-written forward hook adding the vector at the last position;
- ``fxsight``: ``with lm.generate(...): with tracer.all(): block.output[:, -1] += v``
  (decoding steps run through fxsight's hooks backend; recording and binding included);
- ``nnsight``: the same with nnsight, when ``import nnsight`` works.

Medians of repeated runs after one warm-up run.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable

import torch

from perf.models import gpt2

PROMPT_TOKENS = 16


def _model(n_layer: int, n_embd: int, n_head: int, vocab: int) -> torch.nn.Module:
    return gpt2(n_layer, n_embd, n_head, vocab, n_positions=1024)



class _IdsTokenizer:
    """A stand-in tokenizer: prompts here are token ids already."""

    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    pad_token = "<pad>"


def _median(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One dict per (model, variant): seconds per generation and tokens per second."""
    from fxsight import LanguageModel

    torch.set_grad_enabled(False)
    new_tokens = 8 if quick else 32
    repeats = 2 if quick else 5
    shapes = {"tiny (2x64)": (2, 64, 4, 128), "gpt2-small shape (12x768)": (12, 768, 12, 50257)}
    results = []
    for name, (layers, width, heads, vocab) in shapes.items():
        model = _model(layers, width, heads, vocab)
        ids = torch.randint(1, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        steer = torch.randn(width, generator=torch.Generator().manual_seed(1))
        block = model.transformer.h[layers // 2]
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        def plain():
            return model.generate(input_ids=ids, attention_mask=mask, **options)

        def hooks():
            def add(module, args, output):
                output = output.clone()
                output[:, -1] += steer
                return output
            handle = block.register_forward_hook(add)
            try:
                return model.generate(input_ids=ids, attention_mask=mask, **options)
            finally:
                handle.remove()

        lm = LanguageModel(model, tokenizer=_IdsTokenizer())
        envoy = lm.transformer.h[layers // 2]

        def fxsight_generate():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with lm.generate({"input_ids": ids, "attention_mask": mask},
                                 **options) as tracer:
                    with tracer.all():
                        envoy.output[:, -1] += steer
                    tokens = tracer.result.save()
            return tokens

        variants = {"plain generate": plain, "hooks": hooks, "fxsight": fxsight_generate}
        try:
            import nnsight

            nn_model = nnsight.LanguageModel(model, tokenizer=_IdsTokenizer())

            def nnsight_generate():
                with nn_model.generate({"input_ids": ids, "attention_mask": mask},
                                       **options) as tracer:
                    with tracer.all():
                        nn_model.transformer.h[layers // 2].output[:, -1] += steer
                    tokens = tracer.result.save()
                return tokens
            variants["nnsight"] = nnsight_generate
        except Exception:  # noqa: BLE001 - nnsight is optional
            pass
        reference = hooks()
        base = None
        for variant, fn in variants.items():
            try:
                same = variant == "plain generate" or torch.equal(fn(), reference)
                seconds = _median(fn, repeats)
            except Exception as error:  # noqa: BLE001
                results.append({"model": name, "variant": variant,
                                "skipped": f"{type(error).__name__}: {error}"})
                continue
            base = seconds if variant == "plain generate" else base
            results.append({"model": name, "variant": variant, "seconds": seconds,
                            "tokens_per_s": new_tokens / seconds,
                            "vs_plain": seconds / base, "same_tokens_as_hooks": same})
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | s / generation | tokens/s | time vs plain | same ids as hooks |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['variant']} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.4f} | "
                     f"{r['tokens_per_s']:.1f} | {r['vs_plain']:.2f}x | "
                     f"{r['same_tokens_as_hooks']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
