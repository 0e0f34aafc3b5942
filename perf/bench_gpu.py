"""The GPU benchmark: fxsight against plain PyTorch, ``torch.compile``, CUDA graphs and
nnsight, side by side in one run, in bf16 (medians and minima of shuffled rounds after
warm-up; every call followed by a device synchronization).

The GPU run is one command on a machine with a CUDA device (about 7 minutes on an H200 with
empty compile caches; the parts stop at a time budget of 480 s, ``FXSIGHT_BENCH_BUDGET_S``,
so give the command a 600 s timeout): ``perf/gpu_run.sh``. Here, once,
``bash perf/gpu_run.sh --fetch`` downloads into ``.whl/`` the wheels it installs there
(transformers at CI's version, the GPU image's being older, and nnsight with what it needs,
for Python 3.12); then the device tool's ``run`` with ``carry=[".whl"]``,
``timeout_s=600`` and the command ``bash perf/gpu_run.sh``. Copy ``gpu.md`` and
``gpu.json`` from the returned files into ``perf/results/``, then
``python -c "from perf import report; report.render()"``. Without the wheels the nnsight
rows say it was skipped and the image's transformers runs; everything else runs.
``--quick`` (fewer rounds, 16 new tokens) makes a GPU smoke run of about 5 minutes, most of
it compiling.

Parts (``--only gpu/NAME``), in the order they run, the most wanted first (a part that
would not finish within the budget is skipped, and reported so):

- ``forward``: gpt2-small shape (12x768, vocab 50257, random weights), batch 8x32,
  ``use_cache=False``: the plain eager forward, ``torch.compile(model)``,
  ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs), the hand-written hooks,
  and bench_core's two-invoke ``patch`` experiment traced by fxsight eager, compiled
  (``compile=True``) and compiled with ``compile={"mode": "reduce-overhead"}``, and by
  nnsight (its own process, against its own plain forward);
- ``profile``: the same model and batch, eager: plain forward, fxsight ``save`` (every
  block's output and the logits) and fxsight ``patch``, counted with ``torch.profiler``:
  aten operators, device kernels, kernel launches and host synchronizations
  (``aten::_local_scalar_dense``, ``cudaStreamSynchronize``, ``cudaEventSynchronize``,
  synchronous ``cudaMemcpy``) per forward, the host's time until the call returns and the
  synchronized time, and the operators fxsight calls more often than the plain forward;
- ``large-batch``: the same model at 32x256: plain eager against fxsight eager patch,
  ``torch.compile`` (static shapes) against fxsight compiled patch;
- ``generation``: bench_generation's experiment (greedy, batch 1, a 16-token prompt, 64 new
  tokens, the vector added at the last position of the middle block at every step): plain
  ``generate``, the hand-written hook, the model's ``forward`` compiled with the hook
  registered before compiling (inside ``generate``), ``generate`` with transformers' static
  cache and the hook (on a GPU transformers compiles the forward itself, with CUDA graphs:
  the baseline of fxsight's reduce-overhead row), fxsight eager, ``compile=True``,
  ``compile={"mode": "reduce-overhead"}``, nnsight (own process); ms per new token. On a
  GPU also fxsight eager and the hook in fp32 (ids must be equal);
- ``llama-forward``: a 1B Llama shape (16x2048, 32 heads, 8 key-value heads, MLP 8192,
  vocab 32000) at 8x32: plain eager, hooks, CUDA graphs (plain forward), fxsight eager patch,
  fxsight compiled reduce-overhead patch;
- ``sweep``: bench_sweep's activation-patching sweep (fxsight against prefix reuse, hooks
  and an nnsight loop) on the device, in the run's dtype;
- ``llama-generation``: the 1B Llama shape generating: plain ``generate``, hooks, compiled
  forward with the hook, fxsight compiled, fxsight reduce-overhead, nnsight.

Every fxsight answer is compared with the hand-written hooks' (forward: ``max abs diff`` of
the patched rows' logits; generation: the new ids, equal or the first step that differs; in
bf16 compiled code may differ slightly). A variant whose warm-up made inductor skip CUDA
graphs for a graph (it would have recorded one) says how often in its check, and so does
the targets' list (on a CPU every CUDA-graph variant says so: there are none). A variant that raises is a row with its error's
first line, never the end of the run. On a machine without a GPU the same parts run on tiny
shapes in fp32 (a smoke test of this code, not a measurement: ``python -m perf --device cpu
--only gpu --quick``), and ``--write`` does not store them (``DEVICES``).
``FXSIGHT_BENCH_DTYPE`` (``bfloat16``, ``float32``) overrides the dtype.
"""

from __future__ import annotations

import collections
import copy
import os
import signal
import time
from typing import Any, Callable

import torch

from perf import bench_core as core
from perf import bench_generation as gen
from perf import bench_sweep
from perf.child import nnsight_version
from perf.models import blocks, gpt2, llama
from perf.timing import (SHUFFLED, estimators, first_line, ratio, shuffled_rounds, synced,
                         unique_compile, warm)

ORDER = SHUFFLED
# ``python -m perf --device cuda`` runs this benchmark (and ``--device cpu`` does not
# without ``--only gpu``); ``--write`` stores its section from a run on these devices only
DEVICES = ("cuda",)

# seconds after which a GPU run stops (the part under way is interrupted and reported, the
# rest skipped); a CPU run has no budget unless FXSIGHT_BENCH_BUDGET_S sets one
BUDGET_S = float(os.environ.get("FXSIGHT_BENCH_BUDGET_S", "480"))
# the shapes: on a GPU, and on a CPU (the smoke test)
SHAPES = {
    "cuda": dict(gpt2=(12, 768, 12, 50257), gpt2_name="gpt2-small shape (12x768)",
                 large=(32, 256), llama="llama-1b shape (16x2048)",
                 generation="gpt2-small shape (12x768)"),
    "cpu": dict(gpt2=(2, 64, 4, 1000), gpt2_name="tiny-gpt2 (2x64)", large=(16, 64),
                llama="tiny-llama (2x64)", generation="tiny (2x64)"),
}
# each part's seconds on an H200 with empty compile caches (a guess): on a GPU a part
# starts only if it would end within the budget
PARTS = {"forward": 70, "profile": 15, "large-batch": 30, "generation": 90,
         "llama-forward": 60, "sweep": 45, "llama-generation": 120}

PLAIN, HOOKS, CUDAGRAPHS = "plain eager", "hooks (the reference)", \
    "CUDA graphs (torch.compile reduce-overhead)"
REDUCE_OVERHEAD = {"mode": "reduce-overhead"}
NO_NNSIGHT = "skipped: nnsight is not importable (FXSIGHT_BENCH_NNSIGHT_PATH)"


class TimeBudget(BaseException):
    """Raised by the alarm when the run reaches its time budget (not an ``Exception``: the
    handlers that report a failing variant let it through)."""


class Run:
    """One run's settings and the models its parts share."""

    def __init__(self, device: str, quick: bool, rounds: int | None, log: Callable):
        self.device, self.quick, self.log = device, quick, log
        self.cuda = device.startswith("cuda")
        self.shapes = SHAPES["cuda" if self.cuda else "cpu"]
        self.dtype = os.environ.get("FXSIGHT_BENCH_DTYPE",
                                    "bfloat16" if self.cuda else "float32")
        self.rounds = rounds or ((10 if quick else 30) if self.cuda else 3)
        self.generation_rounds = 2 if quick or not self.cuda else 5
        self.new_tokens = (16 if quick else 64) if self.cuda else 8
        self.warmup = 3  # CUDA graphs: a warm-up call, a recording, then replays
        self.nnsight = nnsight_version()
        self._gpt2: tuple | None = None
        # variant -> the CUDA-graph skips its warm-up calls caused (see _graph_skips)
        self.graph_skips: dict[str, int] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def gpt2(self) -> tuple[torch.nn.Module, Any]:
        """The gpt2 model of the forward parts (positions for the large batch) and its
        fxsight wrapper, built once."""
        if self._gpt2 is None:
            import fxsight

            positions = max(64, self.shapes["large"][1])
            model = gpt2(*self.shapes["gpt2"], n_positions=positions)
            model = model.to(self.device, getattr(torch, self.dtype))
            self._gpt2 = model, fxsight.NNsight(model)
        return self._gpt2

    def inputs(self, model: torch.nn.Module, rows: int = core.ROWS,
               tokens: int = core.TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        return (core._ids(model, rows, tokens).to(self.device),
                core._steer(model).to(self.device, model.dtype))


# --- measuring ----------------------------------------------------------------------------
def _measure(run: Run, fns: dict[str, Callable], args: tuple, warmup: int, rounds: int
             ) -> tuple[dict, dict, dict, dict]:
    """Every variant warmed up (a failure is kept, not raised), then timed in shuffled
    rounds; the estimators (seconds), the first answers, the failures, the first calls."""
    fns = {variant: synced(fn, run.device) for variant, fn in fns.items()}
    run.graph_skips.update(dict.fromkeys(fns, 0))
    answers, failed, first = warm({variant: _counting_skips(run, variant, fn)
                                   for variant, fn in fns.items()}, warmup, *args)

    def guarded(variant: str, fn: Callable) -> Callable:
        def call():
            if variant not in failed:
                try:
                    fn(*args)
                except Exception as error:  # noqa: BLE001 - a failing variant is reported
                    failed[variant] = first_line(error)
        return call

    times, _ = shuffled_rounds({v: guarded(v, fn) for v, fn in fns.items()
                                if v not in failed}, rounds)
    stats = {v: estimators(t) for v, t in times.items() if v not in failed}
    return stats, answers, failed, first


def _graph_skips() -> int:
    """How often inductor has skipped CUDA graphs for a graph it compiled (it logs why:
    mutated inputs that are not static addresses, CPU tensors, ...), in this process
    (dynamo's counters; no public API, checked torch 2.11-2.13)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _counting_skips(run: Run, variant: str, fn: Callable) -> Callable:
    """``fn``, adding the CUDA-graph skips its calls cause to ``run.graph_skips``."""
    def call(*args):
        before = _graph_skips()
        try:
            return fn(*args)
        finally:
            run.graph_skips[variant] += _graph_skips() - before
    return call


def _rows(run: Run, part: str, model: str, stats: dict, failed: dict, first: dict,
          baselines: dict[str, str], checks: dict[str, str], scale: float = 1e3,
          unit: str = "ms", order: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per variant (in ``order``): its median and min (seconds × ``scale``, in
    ``unit``), the ratio to its baseline, its first call and its check; or its error."""
    rows = []
    for variant in order or [*stats, *failed]:
        if variant not in stats and variant not in failed:
            continue
        row = dict(part=part, model=model, variant=variant, unit=unit)
        if variant in failed:
            row["error"] = failed[variant]
        else:
            row.update(median=stats[variant]["median"] * scale,
                       min=stats[variant]["min"] * scale, first_s=first.get(variant))
            base = baselines.get(variant)
            if base in stats:
                row.update(baseline=base, vs=ratio(stats[variant], stats[base]))
        if variant in checks:
            row["check"] = checks[variant]
        skips = run.graph_skips.get(variant)
        if skips:  # (a compile with CUDA graphs ran some graph without them)
            row["check"] = f"{row.get('check', '')}; CUDA graphs skipped {skips}×".lstrip("; ")
        rows.append(row)
    return rows


def _diff(got: Any, want: Any, eager: bool) -> str:
    diff = core._max_diff(got, want)
    flag = " DIFFERS" if eager and diff != 0 else ""
    return f"max abs diff {diff:.1e}{flag}"


# --- forward parts ------------------------------------------------------------------------
def _forward_rows(run: Run, part: str, name: str, model: torch.nn.Module, wrapper: Any,
                  ids: torch.Tensor, steer: torch.Tensor, variants: dict[str, Callable],
                  baselines: dict[str, str]) -> list[dict[str, Any]]:
    """Time ``variants`` (plus the plain forward and the reference hooks) and check every
    fxsight answer against the hooks'."""
    layer = len(blocks(model)) // 2
    fns = {PLAIN: core._plain(model), HOOKS: core._hooks(model, "patch", layer, steer),
           **variants}
    stats, answers, failed, first = _measure(run, fns, (ids,), run.warmup, run.rounds)
    checks = {v: _diff(answers[v], answers[HOOKS], "eager" in v) for v in answers
              if v.startswith("fxsight") and HOOKS in answers}
    run.log(f"  {part}: {len(stats)} variants timed, {len(failed)} failed")
    return _rows(run, part, f"{name}, batch {ids.shape[0]}x{ids.shape[1]}", stats, failed,
                 first, {HOOKS: PLAIN, **baselines}, checks, order=list(fns))


def _patch(wrapper: Any, model: torch.nn.Module, steer: torch.Tensor, **trace_kwargs
           ) -> Callable:
    """bench_core's two-invoke patch, traced by fxsight on its fx backend."""
    n_layer = len(blocks(model))
    return core._traced(wrapper, "patch", n_layer // 2, n_layer, steer, core._fx_backend,
                        **trace_kwargs)


def part_forward(run: Run) -> list[dict[str, Any]]:
    model, wrapper = run.gpt2()
    ids, steer = run.inputs(model)
    variants = {
        "torch.compile": core._plain(unique_compile(model, "gpu gpt2 compile",
                                                    dynamic=False)),
        CUDAGRAPHS: core._plain(unique_compile(model, "gpu gpt2 cudagraphs",
                                               mode="reduce-overhead", dynamic=False)),
        "fxsight eager patch": _patch(wrapper, model, steer, compile=False),
        "fxsight compiled patch": _patch(wrapper, model, steer, compile=True),
        "fxsight compiled patch, reduce-overhead": _patch(wrapper, model, steer,
                                                          compile=REDUCE_OVERHEAD),
    }
    baselines = {"torch.compile": PLAIN, CUDAGRAPHS: PLAIN, "fxsight eager patch": PLAIN,
                 "fxsight compiled patch": "torch.compile",
                 "fxsight compiled patch, reduce-overhead": CUDAGRAPHS}
    name = run.shapes["gpt2_name"]
    rows = _forward_rows(run, "forward", name, model, wrapper, ids, steer, variants,
                         baselines)
    rows.append(_nnsight_forward(run, name))
    return rows


def _nnsight_forward(run: Run, name: str) -> dict[str, Any]:
    """nnsight's patch in its own process (bench_core's worker, this run's dtype)."""
    row = dict(part="forward", model=f"{name}, batch {core.ROWS}x{core.TOKENS}",
               variant="nnsight patch (own process)", unit="ms")
    if run.nnsight is None:
        return {**row, "error": NO_NNSIGHT}
    key = "small" if run.cuda else "tiny"
    child = core._nnsight_in_child(key, ("patch",), run.rounds, run.warmup, run.dtype)
    if not isinstance(child, dict):
        return {**row, "error": child}
    there = child["patch"]
    return {**row, "median": there["nnsight"]["median"] * 1e3,
            "min": there["nnsight"]["min"] * 1e3, "baseline": "plain eager (its process)",
            "vs": ratio(there["nnsight"], there["plain eager"]),
            "check": f"max abs diff {there['diff']:.1e}"}


def part_large_batch(run: Run) -> list[dict[str, Any]]:
    model, wrapper = run.gpt2()
    ids, steer = run.inputs(model, *run.shapes["large"])
    variants = {
        "torch.compile": core._plain(unique_compile(model, "gpu gpt2 large compile",
                                                    dynamic=False)),
        "fxsight eager patch": _patch(wrapper, model, steer, compile=False),
        "fxsight compiled patch": _patch(wrapper, model, steer, compile=True),
    }
    baselines = {"torch.compile": PLAIN, "fxsight eager patch": PLAIN,
                 "fxsight compiled patch": "torch.compile"}
    return _forward_rows(run, "large-batch", run.shapes["gpt2_name"], model, wrapper, ids,
                         steer, variants, baselines)


def part_llama_forward(run: Run) -> list[dict[str, Any]]:
    import fxsight

    name = run.shapes["llama"]
    model = llama(name, run.device, getattr(torch, run.dtype))
    wrapper = fxsight.NNsight(model)
    ids, steer = run.inputs(model)
    variants = {
        CUDAGRAPHS: core._plain(unique_compile(model, "gpu llama cudagraphs",
                                               mode="reduce-overhead", dynamic=False)),
        "fxsight eager patch": _patch(wrapper, model, steer, compile=False),
        "fxsight compiled patch, reduce-overhead": _patch(wrapper, model, steer,
                                                          compile=REDUCE_OVERHEAD),
    }
    baselines = {CUDAGRAPHS: PLAIN, "fxsight eager patch": PLAIN,
                 "fxsight compiled patch, reduce-overhead": CUDAGRAPHS}
    return _forward_rows(run, "llama-forward", name, model, wrapper, ids, steer, variants,
                         baselines)


# --- the profile --------------------------------------------------------------------------
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaEventSynchronize",
         "cudaMemcpy")


def _outermost_ops(events: list) -> collections.Counter:
    """The aten operators called from outside any other aten operator, by name."""
    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False
    return collections.Counter(e.name for e in events
                               if e.name.startswith("aten::") and not nested(e))


def _profile(run: Run, fn: Callable, ids: torch.Tensor, calls: int) -> dict[str, Any]:
    """Counts per call of ``fn`` under ``torch.profiler``, and its host and synchronized
    times (medians, ms) without the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(run.warmup):
        fn(ids)
    run.sync()
    host, synced_ = [], []
    for _ in range(calls):
        start = time.perf_counter()
        fn(ids)
        returned = time.perf_counter()
        run.sync()
        host.append(returned - start)
        synced_.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn(ids)
        run.sync()
    events = list(prof.events())
    names = collections.Counter(e.name for e in events)
    ops = _outermost_ops(events)
    return dict(
        ops=sum(ops.values()) / calls, by_op={k: v / calls for k, v in ops.items()},
        kernels=sum(e.device_type == DeviceType.CUDA for e in events) / calls
        if run.cuda else None,
        launches=sum(names[n] for n in LAUNCHES) / calls if run.cuda else None,
        syncs=sum(names[n] for n in SYNCS) / calls,
        host_ms=estimators(host)["median"] * 1e3, synced_ms=estimators(synced_)["median"] * 1e3)


def part_profile(run: Run) -> list[dict[str, Any]]:
    model, wrapper = run.gpt2()
    ids, steer = run.inputs(model)
    n_layer = len(blocks(model))
    fns = {PLAIN: core._plain(model),
           "fxsight eager save": core._traced(wrapper, "save", n_layer // 2, n_layer, steer,
                                              core._fx_backend, compile=False),
           "fxsight eager patch": _patch(wrapper, model, steer, compile=False)}
    calls = 5 if run.quick or not run.cuda else 20
    rows, plain = [], None
    for variant, fn in fns.items():
        row = dict(part="profile", model=f"{run.shapes['gpt2_name']}, batch "
                   f"{core.ROWS}x{core.TOKENS}", variant=variant)
        try:
            found = _profile(run, fn, ids, calls)
        except Exception as error:  # noqa: BLE001 - a failing variant is reported
            rows.append({**row, "error": first_line(error)})
            continue
        plain = plain or (found["by_op"] if variant == PLAIN else None)
        if plain is not None and variant != PLAIN:
            extra = {op: n - plain.get(op, 0) for op, n in found["by_op"].items()}
            found["extra_ops"] = sorted(((op, n) for op, n in extra.items() if n > 0),
                                        key=lambda item: -item[1])[:6]
        rows.append({**row, **found})
    run.log(f"  profile: {len(rows)} variants, {calls} calls each")
    return rows


# --- generation ---------------------------------------------------------------------------
def _ids_check(tokens: Any, reference: torch.Tensor) -> str:
    """``same ids``, or the first new token that differs from the reference's."""
    got, want = torch.as_tensor(tokens).cpu(), reference.cpu()
    if got.shape != want.shape:
        return f"ids DIFFER (shape {tuple(got.shape)}, not {tuple(want.shape)})"
    differs = (got != want).any(0).nonzero()
    if not len(differs):
        return "same ids"
    return f"ids DIFFER from new token {int(differs[0]) - gen.PROMPT_TOKENS}"


def _generation(run: Run, part: str, name: str, eager: bool) -> list[dict[str, Any]]:
    """bench_generation's steering experiment on ``name``: ms per new token."""
    from fxsight import LanguageModel

    model, inputs, steer, layer, options = gen._setup(name, run.new_tokens, run.device,
                                                      run.dtype)
    lm = LanguageModel(model, tokenizer=gen._IdsTokenizer())
    steered = "compiled forward + steering hook"
    static = "static cache + steering hook (transformers compiles the forward)"
    fns = {"plain generate": gen._plain(model, inputs, options),
           HOOKS: gen._hooks(model, inputs, steer, layer, options),
           steered: gen._compiled(model, inputs, options, f"gpu {part} steered", steer,
                                  layer),
           static: _static_steered(model, inputs, options, steer, layer)}
    if eager:
        fns["fxsight eager"] = gen._steered(lm, inputs, steer, layer, options, backend="fx")
    fns["fxsight compile=True"] = gen._steered(lm, inputs, steer, layer, options,
                                               backend="fx", compile=True)
    fns["fxsight reduce-overhead"] = gen._steered(lm, inputs, steer, layer, options,
                                                  backend="fx", compile=REDUCE_OVERHEAD)
    stats, answers, failed, first = _measure(run, fns, (), 1, run.generation_rounds)
    reference = answers.get(HOOKS)
    checks = {v: _ids_check(answers[v], reference) for v in answers
              if v != "plain generate" and v != HOOKS and reference is not None}
    baselines = {HOOKS: "plain generate", steered: "plain generate",
                 static: "plain generate", "fxsight eager": "plain generate",
                 "fxsight compile=True": steered, "fxsight reduce-overhead": static}
    unit = f"ms/token ({run.new_tokens} new)"
    rows = _rows(run, part, f"{name}, batch 1", stats, failed, first, baselines, checks,
                 scale=1e3 / run.new_tokens, unit=unit, order=list(fns))
    if eager and run.dtype != "float32" and reference is not None:
        rows.append(_fp32_check(run, part, name, model, inputs, steer, layer, options))
    rows.append(_nnsight_generation(run, part, name, reference, unit))
    run.log(f"  {part}: {len(stats)} variants timed, {len(failed)} failed")
    return rows


def _static_steered(model: torch.nn.Module, inputs: dict, options: dict,
                    steer: torch.Tensor, layer: int) -> Callable:
    """``generate`` with transformers' static cache on a copy of ``model`` with the
    steering hook: on a GPU transformers compiles the forward itself (CUDA graphs, its
    default compile config), the fastest steered generation a user gets from it."""
    twin = copy.deepcopy(model)
    gen.blocks(twin)[layer].register_forward_hook(gen._adder(steer))
    return lambda: twin.generate(**inputs, **options, cache_implementation="static")


def _fp32_check(run: Run, part: str, name: str, model, inputs, steer, layer, options
                ) -> dict[str, Any]:
    """fxsight eager and the hand-written hook in fp32: their ids must be equal."""
    from fxsight import LanguageModel

    row = dict(part=part, model=f"{name}, batch 1", variant="fxsight eager, fp32 (check)",
               unit="")
    try:
        twin = copy.deepcopy(model).float()
        lm = LanguageModel(twin, tokenizer=gen._IdsTokenizer())
        want = gen._hooks(twin, inputs, steer.float(), layer, options)()
        got = gen._steered(lm, inputs, steer.float(), layer, options, backend="fx")()
        return {**row, "check": _ids_check(got, want) + " (fp32, against the fp32 hook)"}
    except Exception as error:  # noqa: BLE001 - a failing check is reported
        return {**row, "error": first_line(error)}


def _nnsight_generation(run: Run, part: str, name: str, reference: torch.Tensor | None,
                        unit: str) -> dict[str, Any]:
    row = dict(part=part, model=f"{name}, batch 1", variant="nnsight (own process)",
               unit=unit)
    if run.nnsight is None:
        return {**row, "error": NO_NNSIGHT}
    child = gen._nnsight_in_child(name, run.new_tokens, run.generation_rounds, run.device,
                                  run.dtype)
    if not isinstance(child, dict):
        return {**row, "error": child}
    own = child["nnsight"]
    check = _ids_check(torch.tensor(child["tokens"]), reference) \
        if reference is not None else ""
    return {**row, "median": own["median"] * 1e3 / run.new_tokens,
            "min": own["min"] * 1e3 / run.new_tokens, "first_s": child["first"],
            "baseline": "plain generate (its process)",
            "vs": ratio(own, child["plain generate"]), "check": check}


def part_generation(run: Run) -> list[dict[str, Any]]:
    return _generation(run, "generation", run.shapes["generation"], eager=True)


def part_llama_generation(run: Run) -> list[dict[str, Any]]:
    return _generation(run, "llama-generation", run.shapes["llama"], eager=False)


# --- the sweep ----------------------------------------------------------------------------
def part_sweep(run: Run) -> list[dict[str, Any]]:
    found = bench_sweep.run(quick=run.quick, device=run.device, dtype=run.dtype,
                            nnsight=run.nnsight is not None,
                            size=None if run.cuda else (2, 8))
    for r in found:
        if "skipped" in r and run.nnsight is None:
            r["skipped"] = NO_NNSIGHT.removeprefix("skipped: ")
    return [dict(part="sweep", variant=r["method"], **r) for r in found]


# --- the run ------------------------------------------------------------------------------
def _alarm(signum, frame):
    raise TimeBudget(f"the run reached its time budget ({BUDGET_S:.0f} s)")


def run(quick: bool = False, only: str | None = None, log: Callable[[str], None] = print,
        rounds: int | None = None) -> list[dict[str, Any]]:
    """Every part on ``bench_core.DEVICE`` (``python -m perf --device``); ``only``: the
    parts whose ``gpu/NAME`` contains it; ``rounds``: the forward parts' timed rounds."""
    state = Run(core.DEVICE, quick, rounds, log)
    budget = state.cuda or "FXSIGHT_BENCH_BUDGET_S" in os.environ
    log(f"  {state.device}, {state.dtype}; nnsight {state.nnsight or 'not importable'}; "
        + (f"time budget {BUDGET_S:.0f} s" if budget else "no time budget"))
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(BUDGET_S) if budget else 0)
    try:
        with torch.no_grad():
            for part, seconds in PARTS.items():
                if only is not None and only not in f"gpu/{part}":
                    continue
                elapsed = time.perf_counter() - start
                if budget and elapsed + (seconds if state.cuda else 0) > BUDGET_S:
                    results.append(dict(part=part, variant="(the whole part)", error=
                                        f"skipped: {elapsed:.0f} s spent, {seconds} s "
                                        f"needed, budget {BUDGET_S:.0f} s"))
                    continue
                log(f"  {part} ...")
                part_start = time.perf_counter()
                try:
                    rows = globals()[f"part_{part.replace('-', '_')}"](state)
                except (Exception, TimeBudget) as error:  # noqa: BLE001 - reported
                    rows = [dict(part=part, variant="(the whole part)",
                                 error=first_line(error))]
                for row in rows:
                    row.setdefault("part_s", time.perf_counter() - part_start)
                results += rows
                log(table(rows))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return results


# --- reporting ----------------------------------------------------------------------------
def _num(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _pair(value: dict[str, float] | None) -> str:
    return "" if not value else f"{value['median']:.2f} / {value['min']:.2f}"


def _failed(row: dict[str, Any]) -> str:
    error = row["error"]
    return error if error.startswith("skipped") else f"failed: {error}"


def _table_timed(rows: list[dict[str, Any]]) -> list[str]:
    unit = next((r["unit"] for r in rows if r.get("unit")), "ms")
    lines = [f"| model | variant | median {unit} | min | ÷ baseline (median / min) | "
             f"baseline | first call s | check |", "|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('model', '')} | {r['variant']} | {_failed(r)} | | | | | "
                         f"{r.get('check', '')} |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {_num(r.get('median'))} | "
                     f"{_num(r.get('min'))} | {_pair(r.get('vs'))} | {r.get('baseline', '')} "
                     f"| {_num(r.get('first_s'), '.2f')} | {r.get('check', '')} |")
    return lines


def _table_profile(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | variant | aten ops / forward | device kernels / forward | kernel "
             "launches / forward | host syncs / forward | host ms (until it returns) | "
             "synchronized ms | the ops called more often than in the plain forward |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('model', '')} | {r['variant']} | {_failed(r)} | | | | | | "
                         f"|")
            continue
        extra = ", ".join(f"{op.removeprefix('aten::')} +{n:g}"
                          for op, n in r.get("extra_ops", []))
        lines.append(f"| {r['model']} | {r['variant']} | {r['ops']:g} | "
                     f"{_num(r['kernels'], 'g')} | {_num(r['launches'], 'g')} | "
                     f"{r['syncs']:g} | {r['host_ms']:.3f} | {r['synced_ms']:.3f} | {extra} |")
    return lines


TITLES = {"forward": "Forward, two-invoke patch", "profile": "Profile of the eager forward",
          "large-batch": "Forward at a large batch (target: fxsight < 1% over plain)",
          "generation": "Generation with a steering vector at every step",
          "llama-forward": "Forward, 1B Llama shape", "sweep": "Patching sweep",
          "llama-generation": "Generation, 1B Llama shape"}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one table per part, in the order they ran."""
    out = []
    for part in dict.fromkeys(r["part"] for r in results):
        rows = [r for r in results if r["part"] == part]
        seconds = max((r.get("part_s", 0) for r in rows), default=0)
        out += [f"**{TITLES.get(part, part)}** (`gpu/{part}`, {seconds:.0f} s)", ""]
        if part == "profile":
            out += _table_profile(rows)
        elif part == "sweep" and all("error" not in r for r in rows):
            out += ["```", bench_sweep.table(rows), "```"]  # bench_sweep's own table
        else:
            out += _table_timed(rows)
        out.append("")
    return "\n".join(out).rstrip()


def _find(results, part: str, variant: str) -> dict | None:
    return next((r for r in results if r["part"] == part and r["variant"] == variant
                 and "vs" in r), None)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _median(results, part: str, variant: str) -> float | None:
    return next((r["median"] for r in results if r["part"] == part and
                 r["variant"] == variant and r.get("median") is not None), None)


def targets(results: list[dict[str, Any]]) -> str:
    """Issue 15's targets, each met or not (those whose rows ran), and every failure or
    differing answer."""
    lines = []
    for part, variant, bound in (
            ("forward", "fxsight eager patch", 1.05),
            ("forward", "fxsight compiled patch, reduce-overhead", 1.1),
            ("large-batch", "fxsight eager patch", 1.01),
            ("large-batch", "fxsight compiled patch", 1.01)):
        r = _find(results, part, variant)
        if r:
            got = r["vs"]["median"]
            lines.append(f"- {part}: {variant} ÷ {r['baseline']} = {got:.3f} (min "
                         f"{r['vs']['min']:.3f}; target ≤ {bound}): {_met(got <= bound)}")
    fastest = ("fxsight reduce-overhead", "fxsight compile=True")
    for part, per_token, over_nnsight in (("generation", 1.5, 5.0),
                                          ("llama-generation", None, 3.0)):
        times = {v: _median(results, part, v) for v in fastest}
        times = {v: t for v, t in times.items() if t is not None}
        if not times:
            continue
        best = min(times, key=times.get)
        got = times[best]
        if per_token is not None:
            lines.append(f"- {part}: {best} {got:.2f} ms/token (target ≤ {per_token}): "
                         f"{_met(got <= per_token)}")
            hooked = _median(results, part, "compiled forward + steering hook")
            if hooked:
                lines.append(f"- {part}: compiled forward + steering hook ÷ {best} = "
                             f"{hooked / got:.2f} (target ≥ 2.5): {_met(hooked / got >= 2.5)}")
        there = _median(results, part, "nnsight (own process)")
        if there:
            lines.append(f"- {part}: nnsight ÷ {best} = {there / got:.2f} (target ≥ "
                         f"{over_nnsight:g}): {_met(there / got >= over_nnsight)}")
    for r in results:
        if "error" in r and not r["error"].startswith("skipped"):
            lines.append(f"- {r['part']}: {r['variant']} failed: {r['error']}")
        elif "DIFFER" in r.get("check", "") or "CUDA graphs skipped" in r.get("check", ""):
            lines.append(f"- {r['part']}: {r['variant']}: {r['check']}")
    return "\n".join(lines)


def noise(results: list[dict[str, Any]]) -> str:
    """The spread of the plain baselines: median over min."""
    lines = []
    for r in results:
        if r.get("variant") in (PLAIN, "plain generate", "torch.compile", CUDAGRAPHS) \
                and r.get("min"):
            lines.append(f"- {r['part']} / {r['variant']}: median "
                         f"{100 * (r['median'] / r['min'] - 1):.1f}% above the minimum")
    return "\n".join(lines)
