"""The core benchmark: what one trace costs, against honest baselines of its own mode.

Models: a tiny GPT-2 (2 layers, 64 wide, vocab 1000) and a gpt2-small shape (12 layers,
768 wide, vocab 50257, random weights); token ids of batch 8 x 32; ``use_cache=False``; no
autograd.

Experiments:

- ``save``: every block's output and the logits are kept (``.save()``);
- ``patch``: two-invoke activation patching at the middle block: rows 0-3 (clean) are read
  at one position, rows 4-7 (corrupted) get them written there, and their logits are kept;
- ``steer``: block 0's output is kept, a steering vector is added in place to block 1's
  output (``h[1].output[:] += vec``) and the logits are kept.

Variants, eager:

- ``plain eager``: the model's forward, no intervention;
- ``hooks``: the experiment as hand-written forward hooks (registered and removed per call);
- ``fxsight eager``: ``NNsight(model).trace(...)`` (recording, lookups, run, binding);
- ``nnsight``: nnsight's ``NNsight`` with the same code, in its own process (importing
  nnsight breaks ``torch.export`` in the process that does), timed against that
  process's own plain forward.

Variants, compiled (never compared with the eager ones):

- ``torch.compile``: ``torch.compile(model)``, no intervention;
- ``torch.compile + hooks``: a copy of the model with the experiment's hooks registered
  *before* it is compiled (dynamo traces them into the graph; hooks added after the first
  call are ignored), the hooks kept for every call;
- ``fxsight compiled``: ``trace(..., compile=True)``.

Every round runs each variant once, in a seeded random order (``perf/timing.py``); medians
and minima of the rounds after warm-up. ``own µs`` is fxsight's own cost per trace: the
whole trace minus the time inside the rewritten graph it runs (the call of fxsight's
``Executable``, timed on the same calls). Every answer is compared with the eager hooks'
(``max abs diff``; eager must be equal, compiled close).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import torch

from perf.child import run_in_child
from perf.models import blocks, gpt2
from perf.timing import (SEED, SHUFFLED, compiled_graphs, estimators, ratio,
                         shuffled_rounds, synced, unique_compile, warm)

ORDER = SHUFFLED

ROWS, TOKENS = 8, 32
POSITION = 5
SAVED, STEERED = 0, 1  # the steer experiment: keep block 0's output, steer block 1's


def _gpt2(n_layer: int, n_embd: int, n_head: int, vocab_size: int) -> torch.nn.Module:
    return gpt2(n_layer, n_embd, n_head, vocab_size, n_positions=max(TOKENS, 64))


MODELS: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "tiny": ("tiny-gpt2 2x64 (vocab 1000)", lambda: _gpt2(2, 64, 4, 1000)),
    "small": ("gpt2-small 12x768", lambda: _gpt2(12, 768, 12, 50257)),
}
EXPERIMENTS = ("save", "patch", "steer")
EAGER = ("plain eager", "hooks", "fxsight eager", "nnsight")
COMPILED = ("torch.compile", "torch.compile + hooks", "fxsight compiled")
# each variant's baselines: (the plain forward, the hand-written hooks) of its mode
BASELINES = {**{v: ("plain eager", "hooks") for v in EAGER},
             **{v: ("torch.compile", "torch.compile + hooks") for v in COMPILED}}

# where models run (``python -m perf --device cuda``; the child process reads it too)
DEVICE = os.environ.get("FXSIGHT_BENCH_DEVICE", "cpu")


# --- the experiments ----------------------------------------------------------------------
def _ids(model: torch.nn.Module, rows: int = ROWS, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (rows, tokens),
                         generator=torch.Generator().manual_seed(0))


def _steer(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))


def _plain(model: Callable) -> Callable:
    def run(ids):
        return model(ids, use_cache=False).logits
    return run


class _Hooks:
    """The experiment as hand-written forward hooks on ``model``, and what they keep."""

    def __init__(self, model: torch.nn.Module, experiment: str, layer: int,
                 steer: torch.Tensor):
        self.experiment = experiment
        self.kept: dict[int, torch.Tensor] = {}
        layers = blocks(model)

        def keep(i):
            return lambda module, args, output: self.kept.__setitem__(i, output)

        def patch(module, args, output):
            half = len(output) // 2
            output = output.clone()
            output[half:, POSITION] = output[:half, POSITION]
            return output

        def add(module, args, output):
            output[:] += steer

        if experiment == "save":
            self.hooks = [(block, keep(i)) for i, block in enumerate(layers)]
        elif experiment == "patch":
            self.hooks = [(layers[layer], patch)]
        else:
            self.hooks = [(layers[SAVED], keep(SAVED)), (layers[STEERED], add)]

    def register(self) -> list:
        """Register the hooks; their handles."""
        return [module.register_forward_hook(fn) for module, fn in self.hooks]

    def answer(self, logits: torch.Tensor) -> Any:
        """The experiment's result from the logits and the kept values (then forgotten)."""
        kept, self.kept = self.kept, {}
        if self.experiment == "save":
            return [kept[i] for i in sorted(kept)], logits
        if self.experiment == "patch":
            return logits[len(logits) // 2:]
        return kept[SAVED], logits


def _hooks(model: torch.nn.Module, experiment: str, layer: int, steer: torch.Tensor
           ) -> Callable:
    """Eager hand-written hooks, registered and removed around every forward."""
    hooks = _Hooks(model, experiment, layer, steer)

    def run(ids):
        handles = hooks.register()
        try:
            logits = model(ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return hooks.answer(logits)
    return run


def _compiled_hooks(model: torch.nn.Module, experiment: str, layer: int,
                    steer: torch.Tensor, label: str) -> Callable:
    """``torch.compile`` of a copy of ``model`` whose hooks were registered before it was
    compiled (and stay registered)."""
    twin = copy.deepcopy(model)
    hooks = _Hooks(twin, experiment, layer, steer)
    hooks.register()
    compiled = unique_compile(twin, label)

    def run(ids):
        return hooks.answer(compiled(ids, use_cache=False).logits)
    return run


def _traced(wrapped: Any, experiment: str, layer: int, n_layer: int, steer: torch.Tensor,
            check: Callable[[Any], None] = lambda tracer: None, **trace_kwargs) -> Callable:
    """The experiment in nnsight's API: runs on fxsight's and on nnsight's wrappers (of a
    GPT-2 or a Llama model; ``patch`` reads the first half of the rows, writes the second)."""
    layers = blocks(wrapped)

    if experiment == "save":
        def run(ids):
            saved = []
            with wrapped.trace(ids, use_cache=False, **trace_kwargs) as tracer:
                for i in range(n_layer):
                    saved.append(layers[i].output.save())
                logits = wrapped.lm_head.output.save()
            check(tracer)
            return saved, logits
        return run

    if experiment == "steer":
        def run(ids):
            with wrapped.trace(ids, use_cache=False, **trace_kwargs) as tracer:
                kept = layers[SAVED].output.save()
                layers[STEERED].output[:] += steer
                logits = wrapped.lm_head.output.save()
            check(tracer)
            return kept, logits
        return run

    def run(ids):
        half = len(ids) // 2
        with wrapped.trace(**trace_kwargs) as tracer:
            barrier = tracer.barrier(2)  # nnsight runs invokes as threads: share through it
            with tracer.invoke(ids[:half], use_cache=False):
                clean = layers[layer].output[:, POSITION]
                barrier()
            with tracer.invoke(ids[half:], use_cache=False):
                barrier()
                layers[layer].output[:, POSITION] = clean
                logits = wrapped.lm_head.output.save()
        check(tracer)
        return logits
    return run


def _fx_backend(tracer: Any) -> None:
    if tracer.backend != "fx":
        raise RuntimeError(f"fxsight ran on the {tracer.backend} backend, not fx")


def _max_diff(got: Any, want: Any) -> float:
    got_leaves = torch.utils._pytree.tree_leaves(got)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return float("nan")
    return max((float((g.float() - w.float()).abs().max())
                for g, w in zip(got_leaves, want_leaves)), default=0.0)


# --- nnsight, in a child process ----------------------------------------------------------
def _nnsight_wrapper(model: torch.nn.Module) -> Any:
    import nnsight

    class Batched(nnsight.NNsight):
        """nnsight's NNsight with the batching of fxsight's NNsight (concatenate the
        invokes' tensors along dim 0), so two invokes run as one batch."""

        def _batch_size(self, *inputs, **kwargs):
            for value in (*inputs, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    return value.shape[0]
            return 0  # no rows (an empty invoke, keyword parameters only)

        def _batch(self, invokes, fn):
            if len(invokes) == 1:
                return invokes[0]
            args = tuple(torch.cat(column) for column in zip(*(a for a, _ in invokes)))
            return args, invokes[0][1]

    return Batched(model)


def _nnsight_worker(key: str, experiments: list[str], rounds: int, warmup: int,
                    threads: int = 2, seed: int = SEED, dtype: str = "float32") -> None:
    """(In the child process.) Print JSON: per experiment, nnsight's and the plain eager
    forward's estimators (seconds) and nnsight's max |diff| from the hooks."""
    torch.set_num_threads(threads)
    out = {}
    with torch.no_grad():
        model = MODELS[key][1]().to(DEVICE, getattr(torch, dtype))
        n_layer = len(model.transformer.h)
        ids = _ids(model).to(DEVICE)
        steer = _steer(model).to(DEVICE, getattr(torch, dtype))
        wrapped = _nnsight_wrapper(model)
        for experiment in experiments:
            fns = {"plain eager": _plain(model),
                   "hooks": _hooks(model, experiment, n_layer // 2, steer),
                   "nnsight": _traced(wrapped, experiment, n_layer // 2, n_layer, steer)}
            fns = {name: synced(fn, DEVICE) for name, fn in fns.items()}
            answer = fns["nnsight"](ids)
            for fn in fns.values():
                for _ in range(warmup):
                    fn(ids)
            times, _ = shuffled_rounds({k: (lambda f=f: f(ids)) for k, f in fns.items()},
                                       rounds, seed)
            out[experiment] = {name: estimators(t) for name, t in times.items()}
            out[experiment]["diff"] = _max_diff(answer, fns["hooks"](ids))
    print(json.dumps(out))


def _nnsight_in_child(key: str, experiments: tuple[str, ...], rounds: int,
                      warmup: int, dtype: str = "float32") -> dict | str:
    return run_in_child(
        f"from perf.bench_core import _nnsight_worker; _nnsight_worker({key!r}, "
        f"{list(experiments)!r}, {rounds}, {warmup}, {torch.get_num_threads()}, "
        f"dtype={dtype!r})")


# --- fxsight's graph, timed inside the trace ----------------------------------------------
class GraphClock:
    """Seconds spent inside fxsight's rewritten graphs (``Executable.__call__``), summed
    while installed (``None`` where this version of fxsight has no such call)."""

    def __init__(self):
        try:
            from fxsight.run import executable as runner
            self.cls = runner.Executable
            self.original = self.cls.__call__
        except (ImportError, AttributeError):
            self.cls = None
        self.seconds = 0.0

    def total(self) -> float:
        return self.seconds

    def __enter__(self) -> "GraphClock":
        if self.cls is None:
            return self
        original, clock = self.original, self

        def timed(executable, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(executable, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        self.cls.__call__ = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.cls is not None:
            self.cls.__call__ = self.original


# --- one model ----------------------------------------------------------------------------
def _variants(model, compiled_model, wrapper, experiment, steer, label) -> dict[str, Callable]:
    n_layer = len(model.transformer.h)
    layer = n_layer // 2
    fns = {
        "plain eager": _plain(model),
        "hooks": _hooks(model, experiment, layer, steer),
        "fxsight eager": _traced(wrapper, experiment, layer, n_layer, steer, _fx_backend,
                                 compile=False),
        "torch.compile": _plain(compiled_model),
        "torch.compile + hooks": _compiled_hooks(model, experiment, layer, steer,
                                                 f"{label} {experiment} hooks"),
        "fxsight compiled": _traced(wrapper, experiment, layer, n_layer, steer, _fx_backend,
                                    compile=True),
    }
    return {name: synced(fn, DEVICE) for name, fn in fns.items()}


def _rows(name, experiment, times, own, answers, failed, child) -> list[dict[str, Any]]:
    """One dict per variant of one experiment."""
    stats = {v: estimators(t) for v, t in times.items()}
    rows = []
    for variant in EAGER + COMPILED:
        row = dict(model=name, experiment=experiment, variant=variant,
                   mode="eager" if variant in EAGER else "compiled")
        plain, hooks = BASELINES[variant]
        if variant == "nnsight":
            if not isinstance(child, dict):
                row["skipped"] = child
            else:
                there = child[experiment]
                row.update(median_ms=there["nnsight"]["median"] * 1e3,
                           min_ms=there["nnsight"]["min"] * 1e3, max_abs_diff=there["diff"],
                           vs_plain=ratio(there["nnsight"], there["plain eager"]),
                           vs_hooks=ratio(there["nnsight"], there["hooks"]))
        elif variant in failed:
            row["skipped"] = failed[variant]
        else:
            row.update(median_ms=stats[variant]["median"] * 1e3,
                       min_ms=stats[variant]["min"] * 1e3)
            if plain in stats:
                row["vs_plain"] = ratio(stats[variant], stats[plain])
            if hooks in stats:
                row["vs_hooks"] = ratio(stats[variant], stats[hooks])
            if own.get(variant):
                row["own_us"] = {k: v * 1e6 for k, v in estimators(own[variant]).items()}
            if "hooks" in answers and variant not in ("plain eager", "torch.compile"):
                row["max_abs_diff"] = _max_diff(answers[variant], answers["hooks"])
            elif variant == "torch.compile" and "plain eager" in answers:
                row["max_abs_diff"] = _max_diff(answers[variant], answers["plain eager"])
        if "max_abs_diff" in row:
            limit = 0.0 if row["mode"] == "eager" else 1e-4
            row["same"] = row["max_abs_diff"] <= limit
        rows.append(row)
    nn = next((r for r in rows if r["variant"] == "nnsight" and "vs_plain" in r), None)
    for row in rows:
        if nn and row["variant"].startswith("fxsight") and "vs_plain" in row:
            # fxsight eager ÷ plain eager, over nnsight ÷ its own process's plain eager
            eager = ratio(stats[row["variant"]], stats["plain eager"])
            row["vs_nnsight"] = {k: eager[k] / nn["vs_plain"][k] for k in eager}
    return rows


def bench_model(key: str, experiments: tuple[str, ...], rounds: int, warmup: int,
                with_nnsight: bool = True,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every variant of ``experiments`` on one model; one dict per (experiment, variant)."""
    import fxsight

    name, build = MODELS[key]
    model = build().to(DEVICE)
    ids, steer = _ids(model).to(DEVICE), _steer(model).to(DEVICE)
    compiled_model = unique_compile(model, f"{key} plain")
    wrapper = fxsight.NNsight(model)
    child = _nnsight_in_child(key, experiments, rounds, warmup) if with_nnsight \
        else "nnsight is not importable"
    results = []
    for experiment in experiments:
        fns = _variants(model, compiled_model, wrapper, experiment, steer, key)
        answers, failed, _ = warm(fns, warmup, ids)
        live = {v: (lambda f=fn: f(ids)) for v, fn in fns.items() if v not in failed}
        graphs, compiles = compiled_graphs(), fxsight.stats()["compilations"]
        with GraphClock() as clock:
            times, own = shuffled_rounds(live, rounds, SEED, clock.total)
        own = {v: t for v, t in own.items() if v.startswith("fxsight") and clock.cls}
        results += _rows(name, experiment, times, own, answers, failed, child)
        new = (compiled_graphs() - graphs, fxsight.stats()["compilations"] - compiles)
        log(f"  {name} / {experiment}: {rounds} rounds; graphs compiled while timing: "
            f"{new[0]} (fxsight: {new[1]})")
        if any(new):
            results.append(dict(model=name, experiment=experiment, variant="!",
                                skipped=f"{new[0]} compilation(s) during timing"))
    return results


def run(quick: bool = False, only: str | None = None, threads: int = 2,
        log: Callable[[str], None] = print, rounds: int | None = None
        ) -> list[dict[str, Any]]:
    """The whole core suite (``only``: run the (model/experiment) names containing it;
    ``rounds``: timed rounds per experiment instead of the defaults)."""
    from perf.child import nnsight_version

    torch.set_num_threads(threads)
    results = []
    with_nnsight = nnsight_version() is not None
    with torch.no_grad():
        for key in MODELS:
            experiments = tuple(e for e in EXPERIMENTS
                                if only is None or only in f"core/{key}/{e}")
            if not experiments:
                continue
            small = key == "small"
            count = rounds or ((3 if small else 30) if quick else (8 if small else 150))
            warmup = 1 if small else 5
            results += bench_model(key, experiments, count, warmup, with_nnsight, log)
    return results


# --- reporting ----------------------------------------------------------------------------
def _pair(value: dict[str, float] | None, spec: str) -> str:
    """``median / min`` of an estimator pair."""
    if not value:
        return ""
    return f"{format(value['median'], spec)} / {format(value['min'], spec)}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown tables, one per model: eager variants ÷ eager baselines, compiled variants
    ÷ compiled baselines."""
    out = []
    for name in dict.fromkeys(r["model"] for r in results):
        out += [f"**{name}**, batch {ROWS}×{TOKENS}; each cell with two numbers is "
                f"median / min", "",
                "| experiment | variant | median ms | min ms | ÷ plain of its mode "
                "| ÷ hooks of its mode | ÷ nnsight | own µs per trace | max abs diff |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in results if r["model"] == name):
            if "skipped" in r:
                out.append(f"| {r['experiment']} | {r['variant']} | skipped: "
                           f"{r['skipped']} | | | | | | |")
                continue
            ms = (f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}")
            note = " (own process)" if r["variant"] == "nnsight" else ""
            diff = "" if "max_abs_diff" not in r else \
                f"{r['max_abs_diff']:.1e}{'' if r['same'] else ' DIFFERS'}"
            out.append(f"| {r['experiment']} | {r['variant']}{note} | {ms[0]} | {ms[1]} | "
                       f"{_pair(r.get('vs_plain'), '.2f')} | {_pair(r.get('vs_hooks'), '.2f')} | "
                       f"{_pair(r.get('vs_nnsight'), '.2f')} | {_pair(r.get('own_us'), '.0f')} | "
                       f"{diff} |")
        out.append("")
    return "\n".join(out).rstrip()


def _find(results, experiment: str, variant: str, key: str = "tiny") -> dict | None:
    name = MODELS[key][0]
    return next((r for r in results if (r["model"], r["experiment"], r["variant"]) ==
                 (name, experiment, variant) and "skipped" not in r), None)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(results: list[dict[str, Any]]) -> str:
    """Issue 17's per-trace targets on the tiny model (median, min in brackets)."""
    lines = []
    for experiment in EXPERIMENTS:
        for variant in ("fxsight eager", "fxsight compiled"):
            r = _find(results, experiment, variant)
            if r and "own_us" in r:
                own = r["own_us"]
                lines.append(f"- tiny/{experiment}: {variant}'s own cost per trace "
                             f"{own['median']:.0f} µs (min {own['min']:.0f}; target < 100): "
                             f"{_verdict(own['median'] < 100)}")
        for variant, limit in (("fxsight eager", 1.0), ("fxsight compiled", 0.6)):
            r = _find(results, experiment, variant)
            if r and "vs_nnsight" in r:
                got = r["vs_nnsight"]
                lines.append(f"- tiny/{experiment}: {variant} ÷ nnsight = "
                             f"{got['median']:.2f} (min {got['min']:.2f}; target ≤ "
                             f"{limit:.1f}): {_verdict(got['median'] <= limit)}")
        for r in filter(None, (_find(results, experiment, v) for v in EAGER + COMPILED)):
            if r.get("same") is False:
                lines.append(f"- tiny/{experiment}: {r['variant']}'s answer DIFFERS from "
                             f"the hooks' (max abs diff {r['max_abs_diff']:.1e})")
    return "\n".join(lines)


def noise(results: list[dict[str, Any]]) -> str:
    """The spread of each model's plain eager forward: median over min, per experiment's
    rounds (differences between variants below it are not measurements)."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in results):
        spreads = [r["median_ms"] / r["min_ms"] - 1 for r in results
                   if r["model"] == name and r["variant"] in ("plain eager", "torch.compile")
                   and "skipped" not in r]
        if spreads:
            lines.append(f"- {name}: the plain forwards' median is {100 * min(spreads):.0f}–"
                         f"{100 * max(spreads):.0f}% above their minimum")
    return "\n".join(lines)
