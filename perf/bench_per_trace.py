"""A trace's warm fixed cost on tiny models, beside the strongest hand-written baseline.

Interpretability loops run thousands of small traces (activation patching over every layer
and token), where the model's forward is a small part of each. Every case runs, in one
process and in shuffled rounds (``perf/timing.py``), fxsight on the fx backend, fxsight
on the hooks backend, and the same experiment written with plain PyTorch forward hooks
(registered, run, removed: what a competent user writes); nnsight 0.8 runs the same code
in a process of its own where it is importable (``perf/child.py``), timed against that
process's own hand-written hooks. Medians and minima of the rounds after warm-up; every
answer is compared with the hand-written hooks'.

Cases (GPT-2 of width 32, vocab 1000, prompts of 16 token ids, ``use_cache=False``):

- ``patch``: 2 layers; two invokes of one prompt each: the first reads block 0's output
  at position 5, the second writes it there and saves the logits (hooks: the two prompts
  as one batch, a hook copying row 0's position 5 into row 1);
- ``cache``: 12 layers, one prompt, every block's output saved (hooks: one per block);
- ``steer``: 2 layers, one prompt, a vector added in place to block 0's output at the
  last position, the logits saved;
- ``generate``: 2 layers, greedy ``generate`` of 5 new tokens (KV cache on), the vector
  added at block 0's last position at every step (``tracer.iter[0:5]``); the answer is the
  generated ids.

``python -m perf --only per_trace --threads 1 [--rounds N] [--write]``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from perf.child import nnsight_version, run_in_child
from perf.models import gpt2
from perf.timing import SEED, SHUFFLED, estimators, shuffled_rounds, warm

ORDER = SHUFFLED
CASES = ("patch", "cache", "steer", "generate")
VARIANTS = ("hand-written hooks", "fxsight fx", "fxsight hooks", "nnsight")
WIDTH, VOCAB, TOKENS, POSITION, NEW_TOKENS = 32, 1000, 16, 5, 5
LAYERS = {"patch": 2, "cache": 12, "steer": 2, "generate": 2}


def _tokenizer() -> Any:
    """A word-level tokenizer that only pads: the prompts are token ids already (nnsight's
    ``LanguageModel`` batches invokes through its tokenizer's ``pad``)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<pad>")
    tokenizer.padding_side = "left"
    return tokenizer


def _setup(case: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The case's model, its two prompts (1 x TOKENS each) and the steering vector."""
    model = gpt2(LAYERS[case], WIDTH, 4, VOCAB)
    ids = torch.randint(1, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(0))
    steer = torch.randn(WIDTH, generator=torch.Generator().manual_seed(1))
    return model, ids, steer


# --- the hand-written baseline ---------------------------------------------------------
def _hand_written(case: str, model: torch.nn.Module, ids: torch.Tensor,
                  steer: torch.Tensor) -> Callable[[], Any]:
    blocks = model.transformer.h

    if case == "patch":
        both = ids

        def patch(module, args, output):
            output[1, POSITION] = output[0, POSITION]
            return output

        def run():
            handle = blocks[0].register_forward_hook(patch)
            try:
                return model(both, use_cache=False).logits[1:]
            finally:
                handle.remove()
        return run

    if case == "cache":
        def run():
            saved: list[torch.Tensor] = []
            handles = [block.register_forward_hook(lambda m, a, out: saved.append(out))
                       for block in blocks]
            try:
                model(ids[:1], use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            return saved
        return run

    def add(module, args, output):
        output[:, -1] += steer
        return output

    if case == "steer":
        def run():
            handle = blocks[0].register_forward_hook(add)
            try:
                return model(ids[:1], use_cache=False).logits
            finally:
                handle.remove()
        return run

    def run():
        handle = blocks[0].register_forward_hook(add)
        try:
            return model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                  max_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=0)
        finally:
            handle.remove()
    return run


# --- the same in nnsight's API (fxsight's and nnsight's LanguageModel) -----------------------
def _traced(case: str, lm: Any, ids: torch.Tensor, steer: torch.Tensor,
            **trace_kwargs: Any) -> Callable[[], Any]:
    blocks = lm.transformer.h

    if case == "patch":
        def run():
            with lm.trace(**trace_kwargs) as tracer:
                barrier = tracer.barrier(2)  # nnsight runs invokes as threads
                with tracer.invoke(ids[:1], use_cache=False):
                    clean = blocks[0].output[:, POSITION]
                    barrier()
                with tracer.invoke(ids[1:], use_cache=False):
                    barrier()
                    blocks[0].output[:, POSITION] = clean
                    logits = lm.lm_head.output.save()
            return logits
        return run

    if case == "cache":
        def run():
            saved = []  # (a loop: nnsight's block cannot hold a comprehension)
            with lm.trace(ids[:1], use_cache=False, **trace_kwargs):
                for block in blocks:
                    saved.append(block.output.save())
            return saved
        return run

    if case == "steer":
        def run():
            with lm.trace(ids[:1], use_cache=False, **trace_kwargs):
                blocks[0].output[:, -1] += steer
                logits = lm.lm_head.output.save()
            return logits
        return run

    def run():
        with lm.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, **trace_kwargs) as tracer:
            for _ in tracer.iter[0:NEW_TOKENS]:
                blocks[0].output[:, -1] += steer
            tokens = tracer.result.save()
        return tokens
    return run


def _max_diff(got: Any, want: Any) -> float:
    got_leaves = torch.utils._pytree.tree_leaves(got)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return float("nan")
    return max((float((g.double() - w.double()).abs().max())
                for g, w in zip(got_leaves, want_leaves)), default=0.0)


def _timed(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int
           ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, str]]:
    """Each variant's estimators (seconds), its max |diff| from the hand-written hooks'
    answer, and the variants that failed."""
    answers, failed, _ = warm(fns, warmup)
    fns = {name: fn for name, fn in fns.items() if name not in failed}
    times, _ = shuffled_rounds(fns, rounds, SEED)
    want = answers["hand-written hooks"]
    diffs = {name: _max_diff(answer, want) for name, answer in answers.items()}
    return {name: estimators(t) for name, t in times.items()}, diffs, failed


def _nnsight_worker(cases: list[str], rounds: int, warmup: int, threads: int) -> None:
    """(In the child process.) Print JSON: per case, nnsight's and the hand-written hooks'
    estimators and nnsight's max |diff| from the hooks."""
    import nnsight

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    out = {}
    for case in cases:
        model, ids, steer = _setup(case)
        lm = nnsight.LanguageModel(model, tokenizer=_tokenizer())
        fns = {"hand-written hooks": _hand_written(case, model, ids, steer),
               "nnsight": _traced(case, lm, ids, steer)}
        times, diffs, failed = _timed(fns, rounds, warmup)
        out[case] = {"times": times, "diff": diffs.get("nnsight"), "failed": failed}
    print(json.dumps(out))


def run(quick: bool = False, only: str | None = None, threads: int = 1,
        rounds: int | None = None, log: Callable[[str], None] = print
        ) -> list[dict[str, Any]]:
    """One dict per (case, variant): µs per call (median, min), ÷ the hand-written hooks
    (median ÷ median, min ÷ min), max |diff| from the hooks' answer."""
    from fxsight import LanguageModel

    torch.set_num_threads(threads)
    count = rounds or (30 if quick else 300)
    warmup = 5 if quick else 30
    part = only.split("/", 1)[1] if only and "/" in only else None
    cases = [case for case in CASES if part is None or part == case]
    child: dict | str = "nnsight is not importable"
    if nnsight_version() is not None:
        child = run_in_child(
            f"from perf.bench_per_trace import _nnsight_worker; "
            f"_nnsight_worker({cases!r}, {count}, {warmup}, {threads})")
    results = []
    with torch.no_grad():
        for case in cases:
            model, ids, steer = _setup(case)
            lm = LanguageModel(model, tokenizer=_tokenizer())
            fns = {"hand-written hooks": _hand_written(case, model, ids, steer),
                   "fxsight fx": _traced(case, lm, ids, steer, backend="fx"),
                   "fxsight hooks": _traced(case, lm, ids, steer, backend="hooks")}
            times, diffs, failed = _timed(fns, count, warmup)
            log(f"  per_trace/{case}: {count} rounds")
            there = child.get(case) if isinstance(child, dict) else None
            for variant in VARIANTS:
                row: dict[str, Any] = dict(case=case, variant=variant, rounds=count)
                if variant == "nnsight":
                    if there is None or "nnsight" not in there["times"]:
                        row["skipped"] = there["failed"].get("nnsight") if there \
                            else str(child)
                    else:
                        own, anchor = there["times"]["nnsight"], \
                            there["times"]["hand-written hooks"]
                        row.update(us={k: v * 1e6 for k, v in own.items()},
                                   vs_hooks={k: own[k] / anchor[k] for k in own},
                                   max_abs_diff=there["diff"], own_process=True)
                elif variant in failed:
                    row["skipped"] = failed[variant]
                else:
                    found, anchor = times[variant], times["hand-written hooks"]
                    row.update(us={k: v * 1e6 for k, v in found.items()},
                               vs_hooks={k: found[k] / anchor[k] for k in found},
                               max_abs_diff=diffs[variant])
                results.append(row)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| case | variant | µs per trace (median / min) | ÷ hand-written hooks "
             "(median / min) | max abs diff |", "|---|---|---:|---:|---:|"]
    for r in results:
        name = r["variant"] + (" (own process)" if r.get("own_process") else "")
        if "skipped" in r:
            lines.append(f"| {r['case']} | {name} | skipped: {r['skipped']} | | |")
            continue
        lines.append(f"| {r['case']} | {name} | {r['us']['median']:.0f} / "
                     f"{r['us']['min']:.0f} | {r['vs_hooks']['median']:.2f} / "
                     f"{r['vs_hooks']['min']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(quick=True)))
