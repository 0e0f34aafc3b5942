"""The fixed cost of one small trace: what a loop of thousands of tiny traces pays per trace.

Activation-patching loops open one ``with model.trace(...)`` per cell on a small model,
so fxsight's own Python per trace (and, on a GPU, any read of a device value per trace,
which waits for the queue) is most of the time. Three experiments, each beside the plain
forward and hand-written forward hooks doing the same:

- ``mlp save``: ``NNsight`` of a tiny MLP (5 -> 10 -> 10 -> 2, batch 4), one module's
  output saved; hooks: one forward hook that keeps it;
- ``lm patch``: ``LanguageModel`` of a tiny GPT-2 (2 layers, 64 wide, vocab 1000), two
  invokes of one 16-token prompt each: the first saves block 0's output, the second
  writes it there and saves the logits; hooks: one forward of the two prompts batched,
  a hook on block 0 copying row 0's output into row 1;
- ``lm cache``: the same model, one prompt, ``tracer.cache()`` (every module's output,
  detached, on the CPU); hooks: a forward hook on every module keeping its output, detached
  and on the CPU.

Every round runs each variant once in a seeded random order (``perf/timing.py``); medians
and minima of the rounds after warm-up, and ``own µs``: a trace minus the time inside
fxsight's rewritten graph (``Executable.__call__``). Answers are compared with the hooks'.
``--device cuda`` runs the models on the GPU (each call followed by a synchronisation).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

import torch

from perf.bench_core import GraphClock
from perf.models import gpt2
from perf.timing import (SEED, SHUFFLED, estimators, ratio, shuffled_rounds, synced,
                         warm)

ORDER = SHUFFLED
EXPERIMENTS = ("mlp save", "lm patch", "lm cache")
VARIANTS = ("plain forward", "hand-written hooks", "fxsight")
TOKENS = 16
DEVICE = os.environ.get("FXSIGHT_BENCH_DEVICE", "cpu")


class _IdsTokenizer:
    """A stand-in tokenizer: the prompts are token ids already."""

    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    pad_token = "<pad>"


def _mlp() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(OrderedDict(
            layer1=torch.nn.Linear(5, 10), act1=torch.nn.ReLU(),
            layer2=torch.nn.Linear(10, 10), act2=torch.nn.Sigmoid(),
            layer3=torch.nn.Linear(10, 2))).eval()


def _mlp_save(device: str) -> dict[str, Callable[[], Any]]:
    import fxsight

    model = _mlp().to(device)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(device)
    wrapped = fxsight.NNsight(model)

    def plain() -> Any:
        return model(x)

    def hooks() -> Any:
        found = []
        handle = model.layer2.register_forward_hook(lambda m, a, out: found.append(out))
        try:
            model(x)
        finally:
            handle.remove()
        return found[0]

    def traced() -> Any:
        with wrapped.trace(x):
            out = wrapped.layer2.output.save()
        return out

    return {"plain forward": plain, "hand-written hooks": hooks, "fxsight": traced}


def _lm(device: str) -> tuple[torch.nn.Module, Any, torch.Tensor, torch.Tensor]:
    from fxsight import LanguageModel

    model = gpt2(2, 64, 4, 1000).to(device)
    ids = torch.randint(1, 1000, (2, TOKENS), generator=torch.Generator().manual_seed(0))
    clean, corrupt = ids[:1].to(device), ids[1:].to(device)
    return model, LanguageModel(model, tokenizer=_IdsTokenizer()), clean, corrupt


def _lm_patch(device: str) -> dict[str, Callable[[], Any]]:
    model, lm, clean, corrupt = _lm(device)
    both = torch.cat([clean, corrupt])
    mask = torch.ones_like(both)
    block = model.transformer.h[0]

    def plain() -> Any:
        return model(input_ids=both, attention_mask=mask).logits[1:]

    def patch(module, args, output):
        output = output.clone()
        output[1:] = output[:1]
        return output

    def hooks() -> Any:
        handle = block.register_forward_hook(patch)
        try:
            return model(input_ids=both, attention_mask=mask).logits[1:]
        finally:
            handle.remove()

    def traced() -> Any:
        with lm.trace() as tracer:
            with tracer.invoke(clean):
                value = lm.transformer.h[0].output.save()
            with tracer.invoke(corrupt):
                lm.transformer.h[0].output = value
                logits = lm.lm_head.output.save()
        return logits

    return {"plain forward": plain, "hand-written hooks": hooks, "fxsight": traced}


def _lm_cache(device: str) -> dict[str, Callable[[], Any]]:
    model, lm, clean, _ = _lm(device)
    mask = torch.ones_like(clean)
    modules = list(model.named_modules())

    def plain() -> Any:
        return model(input_ids=clean, attention_mask=mask).logits

    def hooks() -> Any:
        cache: dict[str, Any] = {}

        def keep(name):
            def hook(module, args, output):
                cache[name] = torch.utils._pytree.tree_map(
                    lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, output)
            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in modules]
        try:
            model(input_ids=clean, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return cache["transformer.h.1"][0] if isinstance(cache["transformer.h.1"], tuple) \
            else cache["transformer.h.1"]

    def traced() -> Any:
        with lm.trace(clean) as tracer:
            cache = tracer.cache()
        return cache["model.transformer.h.1"].output

    return {"plain forward": plain, "hand-written hooks": hooks, "fxsight": traced}


BUILDERS = {"mlp save": _mlp_save, "lm patch": _lm_patch, "lm cache": _lm_cache}


def _diff(got: Any, want: Any) -> float:
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    return float((got.float().cpu() - want.float().cpu()).abs().max())


def run(quick: bool = False, only: str | None = None, threads: int = 2,
        rounds: int | None = None, log: Callable[[str], None] = print
        ) -> list[dict[str, Any]]:
    """One dict per (experiment, variant): µs per call (median, min), fxsight's own µs
    (the trace minus its graph), the ratios to the plain forward and to the hooks, and the
    largest difference of fxsight's answer from the hooks'."""
    torch.set_num_threads(threads)
    count = rounds or (40 if quick else 400)
    results = []
    with torch.no_grad():
        for experiment in EXPERIMENTS:
            if only and "/" in only and only.split("/", 1)[1] not in experiment:
                continue
            fns = {v: synced(fn, DEVICE) for v, fn in BUILDERS[experiment](DEVICE).items()}
            answers, failed, _ = warm(fns, 20)
            if failed:
                raise RuntimeError(f"{experiment}: {failed}")
            with GraphClock() as clock:
                times, own = shuffled_rounds(fns, count, SEED, clock.total)
            log(f"  overhead/{experiment}: {count} rounds")
            plain, hooks = estimators(times["plain forward"]), estimators(times[VARIANTS[1]])
            for variant in VARIANTS:
                found = estimators(times[variant])
                row = dict(experiment=experiment, variant=variant, rounds=count,
                           us={k: v * 1e6 for k, v in found.items()},
                           vs_plain=ratio(found, plain), vs_hooks=ratio(found, hooks))
                if variant == "fxsight":
                    row["max_abs_diff"] = _diff(answers[variant], answers[VARIANTS[1]])
                    row["own_us"] = {k: v * 1e6 for k, v in estimators(own[variant]).items()}
                    row["over_hooks_us"] = {k: (found[k] - hooks[k]) * 1e6 for k in found}
                results.append(row)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| experiment | variant | µs per call (median / min) | ÷ plain forward | "
             "÷ hooks | fxsight's own µs (trace − graph) | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        own = f"{r['own_us']['median']:.0f} / {r['own_us']['min']:.0f}" if "own_us" in r \
            else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        lines.append(
            f"| {r['experiment']} | {r['variant']} | {r['us']['median']:.0f} / "
            f"{r['us']['min']:.0f} | {r['vs_plain']['median']:.2f} | "
            f"{r['vs_hooks']['median']:.2f} | {own} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(quick=True)))
