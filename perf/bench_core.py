"""The core benchmark of issue 4: what an intervention costs, side by side in one run.

Models: a tiny GPT-2 (2 layers, 64 wide) and a gpt2-small shape (12 layers, 768 wide,
random weights); token ids of batch 8 x 32; ``use_cache=False``; no autograd.

Experiments:

- ``save``: every block's output and the logits are kept (``.save()``);
- ``patch``: two-invoke activation patching at the middle block: rows 0-3 (clean) are read
  at one position, rows 4-7 (corrupted) get them written there, and their logits are kept.

Variants (each experiment):

- ``plain eager``: the model's forward, no intervention (the baseline);
- ``plain compiled``: ``torch.compile(model)``'s forward, no intervention (the floor);
- ``hooks``: the experiment with hand-written forward hooks (registered and removed per call);
- ``fxsight eager`` / ``fxsight compiled``: ``NNsight(model).trace(...)``, recording,
  lookup, run and binding included in every call;
- ``nnsight``: nnsight's ``NNsight`` with the same code, when ``import nnsight`` works.

The variants take turns, one call each per round (so drift hits all alike); medians of the
rounds after warm-up (the compiled variants' first call, which compiles, is reported apart).
``overhead µs`` is the issue's per-trace overhead: fxsight's time minus the plain forward's
(of the same mode, eager or compiled), paired by round, median over rounds. ``python µs`` is
fxsight's own Python time per trace: the whole trace minus the time inside the rewritten
graph, measured on the same calls (it includes the cost of Python running on caches the
forward pass has just evicted, which the plain forward's own Python pays too).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

from perf.child import NNSIGHT_PYTHON, run_in_child
from perf.models import gpt2

ROWS, TOKENS = 8, 32
POSITION = 5


def _gpt2(n_layer: int, n_embd: int, n_head: int, vocab_size: int) -> torch.nn.Module:
    return gpt2(n_layer, n_embd, n_head, vocab_size, n_positions=max(TOKENS, 64))


MODELS: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "tiny": ("tiny-gpt2 2x64", lambda: _gpt2(2, 64, 4, 128)),
    "small": ("gpt2-small 12x768", lambda: _gpt2(12, 768, 12, 50257)),
}
EXPERIMENTS = ("save", "patch")
VARIANTS = ("plain eager", "plain compiled", "hooks", "fxsight eager", "fxsight compiled",
            "nnsight")


# --- the experiments, once per library --------------------------------------------------
def _plain(model: torch.nn.Module) -> Callable:
    def run(ids):
        return model(ids, use_cache=False).logits
    return run


def _hooks(model: torch.nn.Module, experiment: str, layer: int) -> Callable:
    blocks = model.transformer.h
    half = ROWS // 2

    if experiment == "save":
        def run(ids):
            saved = []
            handles = [block.register_forward_hook(
                lambda module, args, output: saved.append(output)) for block in blocks]
            try:
                logits = model(ids, use_cache=False).logits
            finally:
                for handle in handles:
                    handle.remove()
            return saved, logits
        return run

    def patch(module, args, output):
        output = output.clone()
        output[half:, POSITION] = output[:half, POSITION]
        return output

    def run(ids):
        handle = blocks[layer].register_forward_hook(patch)
        try:
            logits = model(ids, use_cache=False).logits
        finally:
            handle.remove()
        return logits[half:]
    return run


def _traced(wrapped: Any, experiment: str, layer: int, n_layer: int,
            check: Callable[[Any], None] = lambda tracer: None, **trace_kwargs) -> Callable:
    """The experiment in nnsight's API: runs on fxsight's and on nnsight's wrappers."""
    half = ROWS // 2

    if experiment == "save":
        def run(ids):
            saved = []
            with wrapped.trace(ids, use_cache=False, **trace_kwargs) as tracer:
                for i in range(n_layer):
                    saved.append(wrapped.transformer.h[i].output.save())
                logits = wrapped.lm_head.output.save()
            check(tracer)
            return saved, logits
        return run

    def run(ids):
        with wrapped.trace(**trace_kwargs) as tracer:
            barrier = tracer.barrier(2)  # nnsight runs invokes as threads: share through it
            with tracer.invoke(ids[:half], use_cache=False):
                clean = wrapped.transformer.h[layer].output[:, POSITION]
                barrier()
            with tracer.invoke(ids[half:], use_cache=False):
                barrier()
                wrapped.transformer.h[layer].output[:, POSITION] = clean
                logits = wrapped.lm_head.output.save()
        check(tracer)
        return logits
    return run


def _fx_backend(tracer: Any) -> None:
    if tracer.backend != "fx":
        raise RuntimeError(f"fxsight ran on the {tracer.backend} backend, not fx")


# --- nnsight, in a subprocess -------------------------------------------------------------
# Importing nnsight changes global state that torch.export then trips over (fxsight's
# capture fails with nnsight imported), so nnsight is timed in a child process, together
# with the plain eager forward there; its ratios are relative to that process's own plain
# forward. FXSIGHT_BENCH_NNSIGHT_PYTHON names an interpreter that has nnsight (default: this).
# where models run (``python -m perf --device cuda``; the child process reads it too)
DEVICE = os.environ.get("FXSIGHT_BENCH_DEVICE", "cpu")


def _synced(fn: Callable) -> Callable:
    """``fn`` followed by a device synchronization (so a timing covers the kernels)."""
    if not DEVICE.startswith("cuda"):
        return fn

    def run(ids):
        result = fn(ids)
        torch.cuda.synchronize()
        return result
    return run


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


def nnsight_version(python: str = NNSIGHT_PYTHON) -> str | None:
    """nnsight's version in ``python`` (``None`` where it is not importable)."""
    done = subprocess.run([python, "-c", "import nnsight; print(nnsight.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _nnsight_worker(key: str, experiments: list[str], rounds: int, warmup: int,
                    threads: int = 2) -> None:
    """(In the child process.) Print JSON: per experiment, nnsight's and the plain eager
    forward's medians, the first call, and nnsight's max |diff| from the hooks."""
    torch.set_num_threads(threads)
    out = {}
    with torch.no_grad():
        model = MODELS[key][1]().to(DEVICE)
        n_layer = len(model.transformer.h)
        ids = _ids(model).to(DEVICE)
        wrapped = _nnsight_wrapper(model)
        for experiment in experiments:
            fns = {"plain eager": _plain(model),
                   "hooks": _hooks(model, experiment, n_layer // 2),
                   "nnsight": _traced(wrapped, experiment, n_layer // 2, n_layer)}
            fns = {name: _synced(fn) for name, fn in fns.items()}
            start = time.perf_counter()
            answer = fns["nnsight"](ids)
            first = time.perf_counter() - start
            for fn in fns.values():
                for _ in range(warmup):
                    fn(ids)
            times = {v: [] for v in fns}
            for _ in range(rounds):
                for variant, fn in fns.items():
                    start = time.perf_counter()
                    fn(ids)
                    times[variant].append(time.perf_counter() - start)
            out[experiment] = dict(
                nnsight=statistics.median(times["nnsight"]), min=min(times["nnsight"]),
                eager=statistics.median(times["plain eager"]), first=first,
                diff=_max_diff(answer, fns["hooks"](ids)))
    print(json.dumps(out))


def _nnsight_in_child(key: str, experiments: tuple[str, ...], rounds: int,
                      warmup: int) -> dict | str:
    return run_in_child(
        f"from perf.bench_core import _nnsight_worker; _nnsight_worker({key!r}, "
        f"{list(experiments)!r}, {rounds}, {warmup}, {torch.get_num_threads()})")


# --- timing ------------------------------------------------------------------------------
class _GraphClock:
    """Time spent inside fxsight's rewritten graph (Executable.__call__)."""

    def __init__(self):
        from fxsight.run import executable as runner
        self.runner = runner
        self.original = runner.Executable.__call__
        self.seconds = 0.0

    def __enter__(self):
        original, clock = self.original, self

        def timed(executable, flat_inputs):
            start = time.perf_counter()
            try:
                return original(executable, flat_inputs)
            finally:
                clock.seconds += time.perf_counter() - start

        self.runner.Executable.__call__ = timed
        return self

    def __exit__(self, *exc):
        self.runner.Executable.__call__ = self.original


def _max_diff(got: Any, want: Any) -> float:
    got_leaves = torch.utils._pytree.tree_leaves(got)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return float("nan")
    return max((float((g.float() - w.float()).abs().max()) for g, w in zip(got_leaves, want_leaves)),
               default=0.0)


def _ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (ROWS, TOKENS),
                         generator=torch.Generator().manual_seed(0))


def bench_model(key: str, experiments: tuple[str, ...], rounds: int, warmup: int,
                with_nnsight: bool = True,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every variant of ``experiments`` on one model; one dict per (experiment, variant)."""
    import fxsight

    name, build = MODELS[key]
    model = build().to(DEVICE)
    n_layer = len(model.transformer.h)
    layer = n_layer // 2
    ids = _ids(model).to(DEVICE)
    compiled_model = torch.compile(model)
    wrapper = fxsight.NNsight(model)
    results = []
    for experiment in experiments:
        fns: dict[str, Callable] = {
            "plain eager": _plain(model),
            "plain compiled": _plain(compiled_model),
            "hooks": _hooks(model, experiment, layer),
            "fxsight eager": _traced(wrapper, experiment, layer, n_layer, _fx_backend,
                                     compile=False),
            "fxsight compiled": _traced(wrapper, experiment, layer, n_layer, _fx_backend,
                                        compile=True),
        }
        fns = {name: _synced(fn) for name, fn in fns.items()}
        first: dict[str, float] = {}
        answers: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for variant, fn in fns.items():
            try:
                start = time.perf_counter()
                answers[variant] = fn(ids)
                first[variant] = time.perf_counter() - start
                for _ in range(warmup):
                    fn(ids)
            except Exception as error:  # noqa: BLE001 - a failing variant is reported
                failed[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
        live = [v for v in fns if v not in failed]
        times: dict[str, list[float]] = {v: [] for v in live}
        python: dict[str, list[float]] = {v: [] for v in live if v.startswith("fxsight")}
        compiles_before = fxsight.stats()["compilations"]
        for _ in range(rounds):
            for variant in live:
                clock = _GraphClock() if variant in python else None
                if clock is not None:
                    clock.__enter__()
                try:
                    start = time.perf_counter()
                    fns[variant](ids)
                    elapsed = time.perf_counter() - start
                finally:
                    if clock is not None:
                        clock.__exit__()
                times[variant].append(elapsed)
                if clock is not None:
                    python[variant].append(elapsed - clock.seconds)
        new_compiles = fxsight.stats()["compilations"] - compiles_before
        medians = {v: statistics.median(t) for v, t in times.items()}
        child = _nnsight_in_child(key, (experiment,), rounds, warmup) if with_nnsight \
            else "nnsight is not importable"
        nn_ratio = None
        if isinstance(child, dict):
            nn = child[experiment]
            nn_ratio = nn["nnsight"] / nn["eager"]  # relative to its own process's forward
        for variant in VARIANTS:
            row = dict(model=name, experiment=experiment, variant=variant)
            if variant == "nnsight":
                if nn_ratio is None:
                    row["skipped"] = child
                else:
                    row.update(median_ms=nn["nnsight"] * 1e3, min_ms=nn["min"] * 1e3,
                               first_s=nn["first"],
                               rounds=rounds, vs_eager=nn_ratio,
                               vs_floor=nn_ratio * medians["plain eager"] /
                               medians["plain compiled"], max_abs_diff=nn["diff"],
                               child_eager_ms=nn["eager"] * 1e3)
            elif variant in failed:
                row["skipped"] = failed[variant]
            else:
                median = medians[variant]
                row.update(median_ms=median * 1e3, min_ms=min(times[variant]) * 1e3,
                           first_s=first[variant], rounds=rounds,
                           vs_eager=median / medians["plain eager"],
                           vs_floor=median / medians["plain compiled"])
                if variant in python:
                    base = "plain compiled" if variant.endswith("compiled") else "plain eager"
                    # the issue's "fxsight minus the plain forward", paired by round (the
                    # two calls of a round run back to back): robust to load drifting
                    row["overhead_us"] = statistics.median(
                        f - p for f, p in zip(times[variant], times[base])) * 1e6
                    row["paired_ratio"] = statistics.median(
                        f / p for f, p in zip(times[variant], times[base]))
                    row["python_us"] = statistics.median(python[variant]) * 1e6
                    if nn_ratio is not None:
                        row["vs_nnsight"] = row["vs_eager"] / nn_ratio
                if "hooks" in answers and not variant.startswith("plain"):
                    row["max_abs_diff"] = _max_diff(answers[variant], answers["hooks"])
            results.append(row)
        log(f"  {name} / {experiment}: done ({rounds} rounds; compilations during the "
            f"timed rounds: {new_compiles})")
        if new_compiles:
            results.append(dict(model=name, experiment=experiment, variant="!",
                                skipped=f"{new_compiles} compilation(s) during timing"))
    return results


def run(quick: bool = False, only: str | None = None, threads: int = 2,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The whole core suite (``only``: run the (model/experiment) names containing it)."""
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
            rounds = (3 if small else 15) if quick else (10 if small else 60)
            warmup = 1 if small else 5
            results += bench_model(key, experiments, rounds, warmup, with_nnsight, log)
    return results


# --- reporting ----------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the results."""
    head = ("| model | experiment | variant | median ms | min ms | × plain eager "
            "| × compiled floor | × nnsight | overhead µs | python µs | first call s "
            "| max abs diff |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['experiment']} | {r['variant']} | "
                         f"skipped: {r['skipped']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['experiment']} | {r['variant']} | {r['median_ms']:.3f} | "
            f"{r['min_ms']:.3f} | {r['vs_eager']:.2f} | {r['vs_floor']:.2f} | {_fmt(r.get('vs_nnsight'), '.2f')} | "
            f"{_fmt(r.get('overhead_us'), '.0f')} | {_fmt(r.get('python_us'), '.0f')} | "
            f"{r['first_s']:.2f} | {_fmt(r.get('max_abs_diff'), '.1e')} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> str:
    """Issue 4's targets, checked against the results."""
    def find(model_key, experiment, variant):
        name = MODELS[model_key][0]
        for r in results:
            if (r["model"], r["experiment"], r["variant"]) == (name, experiment, variant) \
                    and "skipped" not in r:
                return r
        return None

    lines = []
    for experiment in EXPERIMENTS:
        fxc = find("tiny", experiment, "fxsight compiled")
        fxe = find("tiny", experiment, "fxsight eager")
        if fxc:
            lines.append(f"- tiny/{experiment}: fxsight compiled = {fxc['vs_eager']:.2f}× plain "
                         f"eager forward (target ≤ 1.00): "
                         f"{'met' if fxc['vs_eager'] <= 1 else 'NOT met'}")
            if "vs_nnsight" in fxc:
                lines.append(f"- tiny/{experiment}: fxsight compiled = {fxc['vs_nnsight']:.2f}× "
                             f"nnsight (target ≤ 0.60): "
                             f"{'met' if fxc['vs_nnsight'] <= 0.6 else 'NOT met'}")
        for r in (fxe, fxc):
            if r:
                base = "compiled" if r["variant"].endswith("compiled") else "eager"
                lines.append(f"- tiny/{experiment}: {r['variant']} per-trace overhead over the "
                             f"plain {base} forward {r['overhead_us']:.0f} µs (target < 100): "
                             f"{'met' if r['overhead_us'] < 100 else 'NOT met'}; fxsight's "
                             f"own Python in that trace {r['python_us']:.0f} µs")
        for variant in ("fxsight eager", "fxsight compiled"):
            r = find("small", experiment, variant)
            if r:
                base = "plain compiled" if variant.endswith("compiled") else "plain eager"
                ratio = r["paired_ratio"]
                forward = find("small", experiment, base)
                share = r["python_us"] / (forward["median_ms"] * 1e3) if forward else None
                lines.append(
                    f"- small/{experiment}: {variant} = {100 * (ratio - 1):+.1f}% vs {base} "
                    f"(median of per-round ratios; target < +1%: "
                    f"{'met' if ratio < 1.01 else 'NOT met'}); fxsight's Python per trace = "
                    f"{100 * share:.2f}% of that forward")
    return "\n".join(lines)
