"""Suffix sweeps: patching cells of a causal decoder computed from the patched position on.

Patching a site at (layer ``l``, position ``p``) of a causal decoder changes nothing at the
positions before ``p``, in any layer: a cell only needs the layers from ``l`` on at the
positions ``p..T-1``, whose attention reads the corrupted run's keys and values at the
positions before ``p``. So a sweep of the sites of one layer at every position runs, per
cell, a *suffix* of ``T - p`` tokens over a key-value cache of the corrupted run (about
half of the tokens of the full-length rows, summed over the positions), and:

- **Only cells whose patch changes something.** At a position where the clean run's value
  equals the corrupted run's bit for bit (every position before the first token where
  the prompts differ), the patched run is the corrupted run: its score is 0 exactly, as a
  one-cell loop computes it, and the cell is not run (``result.info["cells_not_run"]``).
- **Packing.** Suffixes of different lengths share rows: they are packed first-fit by
  decreasing length into rows one token longer than the longest (with every position from
  ``p0`` on, the cells at ``p`` and ``T - 1 - p + p0`` fill one row exactly). A 4-D
  additive mask lets each token see the cache's first ``p`` positions and its own segment
  causally; ``position_ids`` hold each token's position in the prompt. Padding tokens see
  only themselves; their results are dropped.
- **One graph per (site, layer).** The batch is one fxsight trace over the model's own
  forward with the cache passed in: the modules before the patched site are skipped with
  the corrupted run's values (packed), the site with the patched ones, the head's input is
  saved and the trace stopped, so the cache's updates are not outputs (a stopped trace
  leaves a passed-in cache as it was) and the rewritten graph holds only the blocks after
  the site (asserted in ``tests/test_sweeps.py``).
- **The last block's MLP on the last tokens only.** Only each segment's last token of the
  last block's output is read, so its MLP (most of a block's work) runs on those tokens
  only: inside the trace, the MLP's input at the segments' last tokens goes through the MLP
  module, and the MLP is skipped with those outputs in place (zeros elsewhere, whose block
  outputs nothing reads). Where the self-check of this on the corrupted prompt fails (an
  MLP that is not applied token by token, a block that does not add its MLP's output), the
  whole last block runs.
- **The patched block on the patched tokens only.** A head's output at (layer ``l``,
  position ``p``) changes nothing else in layer ``l``: the attention's output projection
  and the MLP after it see new inputs at ``p`` only (so does an attention cell's MLP). A
  cell names these modules (``local``): each runs on the segments' first tokens only
  (one-token rows; a head's projection is given the patched value there) and takes the
  corrupted run's outputs at every other token, so layer ``l`` costs two small matrix
  products per head cell. The
  sweep's self-check runs this too, at every swept layer at once, and compares each
  module's one-token outputs with its outputs in the whole run; where it fails (a module
  that mixes tokens, or computes otherwise on one token), the cells run layer ``l`` at
  every token of their suffix.
- **Only what the metric reads.** The head runs on each segment's last token only; when
  the head is a ``Linear`` and the metric reads fixed vocabulary entries at the last
  position (found by tracing the metric with ``torch.fx``, and checked on the clean run's
  logits), only those rows of the head's weight are used.

It is used only where it is valid: a model whose forward takes a cache object, a 4-D
``attention_mask`` and ``position_ids``, that returns a ``DynamicCache`` of plain layers,
and whose packed suffix run reproduces its own logits (checked once per sweep on the
corrupted prompt), and a metric that reads only the last position. Anything else runs the
full-length path; ``result.info["suffix"]`` says which and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..api.envoy import Envoy
from .progress import progress_bar
from .result import PatchingResult
from .suffix_batch import Unit, pack, reproduces, run_layer
from .suffix_vocabulary import head_logits, vocabulary_reads
from .sweeps import (Layout, Target, check_rows_apart, choose_batch_size, find_layout,
                     forward_parameters, hidden, metric_values, reference_run, row_bytes,
                     score_dtype, token_labels)

CACHE_NAMES = ("cache", "past_key_values")
# a (site, layer) of a sweep: its kind, layer, the value patched, the modules before it
# skipped with the corrupted run's values, and the modules after it in its block that run
# on the patched tokens only (module outputs; the first may be the module whose input is
# patched)
Cell = tuple[str, int, Any, list, list]


# --- when it applies ---------------------------------------------------------------------
def cache_name(model: Envoy) -> str | None:
    parameters = forward_parameters(model)
    if not {"attention_mask", "position_ids"} <= parameters:
        return None
    return next((name for name in CACHE_NAMES if name in parameters), None)


def head_of(model: Envoy) -> Envoy | None:
    """The envoy of the model's output embeddings (``get_output_embeddings()``)."""
    get = getattr(model._module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    for path, module in model._module.named_modules():
        if module is head and path:
            envoy = model
            for part in path.split("."):
                envoy = getattr(envoy, part)
            return envoy
    return None


def last_only(metric: Callable, length: int, vocab: int) -> bool:
    """Whether ``metric`` reads only the last position (checked on random logits)."""
    from .sweeps import reads_last_position_only

    probe = torch.randn(1, length, vocab, generator=torch.Generator().manual_seed(0))
    try:
        return reads_last_position_only(metric, probe)
    except Exception:  # noqa: BLE001
        return False


def prefix_cache(output: Any) -> Any:
    """The key-value cache in a model output (``(keys, values)`` per layer), or ``None``
    where it is not a ``DynamicCache`` of plain layers."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    cache = None
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            break
    if type(cache) is not DynamicCache or \
            not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


# --- a whole single-pair sweep -----------------------------------------------------------
def why_not(model: Envoy, dataset: bool, backend: str | None, checkpoint: Any,
            distributed: bool | None, kwargs: dict, last_only: bool) -> str | None:
    """Why the suffix path does not apply to this sweep (``None``: it may; the model is
    checked by :func:`plan`)."""
    if dataset:
        return "a dataset of pairs runs the full-length path"
    if backend == "hooks":
        return "the hooks backend runs the full-length path"
    if checkpoint is not None:
        return "checkpointed sweeps run the full-length path"
    if distributed or (distributed is None and torch.distributed.is_available()
                       and torch.distributed.is_initialized()):
        return "distributed sweeps run the full-length path"
    if not last_only:
        return "the metric reads positions other than the last"
    # (the suffix path sets these itself: a packed run's logits_to_keep is its own)
    taken = {"attention_mask", "position_ids", "inputs_embeds", "logits_to_keep",
             *CACHE_NAMES} & set(kwargs)
    if taken:
        return f"the forward is given {', '.join(sorted(taken))}"
    if cache_name(model) is None:
        return "the model's forward takes no cache, attention_mask and position_ids"
    if head_of(model) is None:
        return "the model has no output embeddings (get_output_embeddings)"
    return None


def attempt(suffix: bool | None, sweep: Callable[[], Any]) -> tuple[Any, Any]:
    """A sweep's suffix path as ``suffix=`` asks (``None``: where it applies; ``False``:
    never; ``True``: required, else ``ValueError``): ``(its result or None, the value of
    result.info["suffix"])``. ``sweep()`` returns a result, or why the path does not apply."""
    if suffix is False:
        return None, "suffix=False"
    fast = sweep()
    if not isinstance(fast, str):
        return fast, True
    if suffix:
        raise ValueError(f"suffix=True, but the suffix path does not apply: {fast}")
    return None, fast


@dataclass
class Settings:
    """The arguments of a sweep call (activation or head patching) that its suffix path
    takes as they are."""

    backend: str | None
    checkpoint: Any
    distributed: bool | None
    kwargs: dict  # the model's forward keywords
    options: dict  # every trace's (backend, compile)
    reference_options: dict  # the reference runs'
    batch_size: int | None
    memory_budget: int | float
    progress: bool
    start: float  # time.perf_counter() when the call began (result.info["seconds"])


def run_pair(model: Envoy, items: list, dataset: bool, cells: list[Cell],
             units: Callable[[Any, Any], list[Unit]], clean_targets: list[Target],
             corrupt_targets: list[Target], coords: dict, method: str,
             layout: Layout, settings: Settings) -> PatchingResult | str:
    """A sweep call's one pair on the suffix path, as its result (``dims``: ``coords``'
    keys), or why the path does not apply. ``units(item, clean_run)``: the cells of each
    of ``cells`` (see :func:`sweep_pair`)."""
    item = single_pair(model, items, dataset, settings.backend, settings.checkpoint,
                       settings.distributed, settings.kwargs)
    if isinstance(item, str):
        return item
    swept = sweep_pair(model, item, cells, lambda clean_run: units(item, clean_run),
                       clean_targets, corrupt_targets, settings.kwargs, settings.options,
                       settings.reference_options, settings.batch_size,
                       settings.memory_budget, settings.progress, method, layout)
    if isinstance(swept, str):
        return swept
    return swept.result(tuple(coords), coords, token_labels(model, item.clean), method,
                        settings.start)


def single_pair(model: Envoy, items: list, dataset: bool, backend: str | None,
                checkpoint: Any, distributed: bool | None, kwargs: dict) -> Any:
    """The one clean/corrupted item a sweep's suffix path would run, or why it does not
    apply (a string; the model itself is checked by :func:`plan`)."""
    if dataset or len(items) != 1:
        return "a dataset of pairs runs the full-length path"
    given = {k: v for k, v in kwargs.items() if k != "use_cache"}
    reason = why_not(model, dataset, backend, checkpoint, distributed, given, True)
    return reason if reason is not None else items[0]


@dataclass
class Plan:
    name: str
    head: Envoy
    layers: list  # the corrupted prompt's cache: (keys, values) per layer
    columns: list[int] | None
    small_metric: Callable | None
    tail: Envoy | None = None  # the last block's MLP, run on the segments' last tokens only
    local: bool = False  # cells' local modules run on the patched tokens only
    checks: int = 1  # the self-check traces run


def plan(model: Envoy, corrupted: torch.Tensor, kwargs: dict, corrupt_run: Any,
         clean_logits: torch.Tensor, metric: Callable, local: list | None = None,
         layout: Layout | None = None) -> Plan | str:
    """The suffix path's set-up for a pair (the prefix cache, the head, the vocabulary
    entries the metric reads), or why it does not apply to this model. ``corrupt_run``:
    the corrupted reference run with ``use_cache=True`` and its output kept (with the
    outputs of ``local``, the cells' local modules, whose restriction to the patched
    tokens is checked here)."""
    name = cache_name(model)
    head = head_of(model)
    corrupt_logits = corrupt_run.logits
    layers = prefix_cache(corrupt_run.output)
    if layers is None:
        return "the model's cache is not a DynamicCache of plain layers"
    tail = mlp_of(layout if layout is not None else find_layout(model), -1)
    on_patched = bool(local) and all(
        isinstance(corrupt_run.outputs.get(t.key), torch.Tensor) for t in local)
    # One check of everything at once where the restrictions touch different modules; only
    # where it fails (or they overlap) is each checked apart, keeping those that hold.
    checks = 0

    def check(last: Envoy | None = None, restricted: list | None = None) -> str | None:
        nonlocal checks  # (one self-check trace)
        checks += 1
        return reproduces(model, name, head, corrupted, layers, kwargs, corrupt_logits, last,
                          local=restricted, corrupt=corrupt_run.outputs)

    overlap = on_patched and tail is not None and any(_covers(t, tail) for t in local)
    if not overlap:
        reason = check(tail, local if on_patched else None)
        if reason is None:
            return Plan(name, head, layers, *_reads(metric, clean_logits, head), tail,
                        on_patched, checks)
        if tail is None and not on_patched:
            return reason
    reason = check()
    if reason is not None:
        return reason
    if tail is not None and check(tail) is not None:
        tail = None  # (the whole last block runs)
    if on_patched:
        on_patched = check(restricted=local) is None
    return Plan(name, head, layers, *_reads(metric, clean_logits, head), tail, on_patched,
                checks)


def _reads(metric: Callable, clean_logits: torch.Tensor, head: Envoy
           ) -> tuple[list[int] | None, Callable | None]:
    """The vocabulary entries the metric reads and the metric on those columns (where the
    head is a ``Linear``), else ``(None, None)``."""
    reads = vocabulary_reads(metric, clean_logits)
    if reads is None or not isinstance(head._module, torch.nn.Linear):
        return None, None
    return reads


def mlp_of(layout: Any, layer: int) -> Envoy | None:
    """The MLP module of block ``layer`` of ``layout`` (a sweeps ``Layout``), or ``None``
    where the blocks have none."""
    try:
        return layout.site("mlp", layer)
    except ValueError:
        return None


def tail_after(tail: Envoy | None, target: Target, prefix: list[Target],
               local: list[Target] = ()) -> Envoy | None:
    """``tail`` where it runs after every module a cell replaces or runs on the patched
    tokens only (not the MLP itself or a module that contains it), else ``None``."""
    if tail is None or any(_covers(t, tail) for t in (target, *prefix, *local)):
        return None
    return tail


def _covers(target: Target, module: Envoy) -> bool:
    """Whether ``target`` is the output of ``module`` or of a module containing it."""
    path = target.envoy.path
    return target.accessor == "output" and (path == module.path
                                            or module.path.startswith(path + "."))


def run_sweep(model: Envoy, setup: Plan, cells: list[Cell],
              clean: dict, corrupt: dict, corrupted: torch.Tensor, units: list[Unit],
              metric: Callable, baseline: float, kwargs: dict, options: dict,
              cells_per_trace: int, progress: bool, description: str):
    """Every (site, layer) of ``cells`` at every unit: scores (len(cells), len(units)), the
    number of traces, the last tracer and the number of cells not run (see
    :func:`changing_units`: their scores are 0)."""
    live = [changing_units(units, hidden(corrupt[target.key]), hidden(clean[target.key]))
            for _, _, target, _, _ in cells]
    batches = [[which[i:i + cells_per_trace] for i in range(0, len(which), cells_per_trace)]
               for which in live]
    packings = {}
    dtype = hidden(corrupt[cells[0][2].key]).dtype
    device = hidden(corrupt[cells[0][2].key]).device
    scores = None  # in the metric's dtype (see metric_values), once the first cell ran
    tracer = None
    traces = 0
    bar = progress_bar(total=sum(map(len, batches)), desc=description, unit="batch",
                       disable=not progress, leave=False)
    try:
        for c, (_, _, target, prefix, local) in enumerate(cells):
            local = local if setup.local else []
            for which in batches[c]:
                chunk = [units[i] for i in which]
                key = tuple(p for p, _ in chunk)
                if key not in packings:
                    packings[key] = pack(corrupted, list(key), dtype).to(device)
                packing = packings[key]
                inputs, tracer = run_layer(model, setup.name, setup.head, setup.layers,
                                           packing, target, prefix, clean, corrupt, chunk,
                                           kwargs, options,
                                           tail_after(setup.tail, target, prefix, local),
                                           local)
                traces += 1
                with torch.no_grad():
                    logits = head_logits(setup.head._module, inputs, setup.columns)
                    chosen = setup.small_metric if setup.columns is not None else metric
                    values = metric_values(chosen, logits, len(which)).cpu()
                if scores is None:
                    scores = torch.zeros(len(cells), len(units), dtype=values.dtype)
                scores[c, which] = (values - baseline).to(scores.dtype)
                bar.update(1)
    finally:
        bar.close()
    if scores is None:  # no cell changes anything: every score is 0
        scores = torch.zeros(len(cells), len(units), dtype=score_dtype(dtype))
    return scores, traces, tracer, len(cells) * len(units) - sum(map(len, live))


def changing_units(units: list[Unit], corrupted: torch.Tensor, clean: torch.Tensor
                   ) -> list[int]:
    """The indices of the units whose patch changes the value: where the clean run's value
    at the unit (its position, its columns) equals the corrupted run's bit for bit (at every
    position before the first token where the prompts differ, in a causal model), the
    patched run is the corrupted run itself, so its score is 0 exactly, as a one-cell loop
    computes it; such a cell is not run."""
    changing = []
    for i, (p, columns) in enumerate(units):
        where = slice(None) if columns is None else columns
        if not torch.equal(corrupted[0, p, where], clean[0, p, where]):
            changing.append(i)
    return changing


@dataclass
class Swept:
    """A single-pair sweep on the suffix path: ``scores`` (cells, units), the corrupted and
    clean runs' metrics, the cells per trace, the traces run (the reference runs too), the
    last tracer, the plan and the number of cells whose patch changes nothing."""

    scores: torch.Tensor
    baseline: float
    reference: float
    per_trace: int
    traces: int
    tracer: Any
    setup: Plan
    unchanged: int = 0  # cells whose patch changes nothing: not run, their scores 0

    def result(self, dims: tuple[str, ...], coords: dict, tokens: Any, method: str,
               start: float) -> PatchingResult:
        """The sweep's :class:`~fxsight.experiments.result.PatchingResult` (its scores
        reshaped to ``coords``' lengths)."""
        values = self.scores.reshape(*[len(coords[d]) for d in dims])
        return PatchingResult(values, dims, coords, baseline=self.baseline,
                              reference=self.reference, tokens=tokens, method=method,
                              info=self.info(start))

    def info(self, start: float) -> dict:
        """The sweep's part of ``result.info``."""
        return dict(batch_size=self.per_trace, traces=self.traces,
                    cells=int(self.scores.numel()),
                    backend=getattr(self.tracer, "backend", None), logits_to_keep=1,
                    seconds=time.perf_counter() - start,
                    graph_module=getattr(self.tracer, "graph_module", None), suffix=True,
                    vocabulary=self.setup.columns,
                    last_mlp_on_last_tokens=self.setup.tail is not None,
                    patched_block_on_patched_tokens=self.setup.local,
                    cells_not_run=self.unchanged)


def sweep_pair(model: Envoy, item: Any, cells: list[Cell],
               units: Callable[[Any], list[Unit]], clean_targets: list[Target],
               corrupt_targets: list[Target], kwargs: dict, options: dict,
               reference_options: dict, batch_size: int | None,
               memory_budget: int | float, progress: bool, description: str,
               layout: Layout | None = None) -> Swept | str:
    """The sweep of one clean/corrupted ``item`` on the suffix path, or why it does not
    apply to this model and metric. ``cells``: (kind, layer, target, prefix, local) per
    (site, layer) (the corrupted run also keeps ``local``'s outputs); ``units(clean_run)``:
    the cells of each; ``layout``: the blocks swept over (default: :func:`find_layout`)."""
    local = [t for cell in cells for t in cell[4]]
    corrupt_targets = [*corrupt_targets, *local]
    keep = {**kwargs, "logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) \
        else dict(kwargs)
    with torch.no_grad():  # the last position's logits only, the corrupted run's cache
        clean_run = reference_run(model, item.clean, clean_targets, keep, reference_options)
        corrupt_run = reference_run(model, item.corrupted, corrupt_targets,
                                    {**keep, "use_cache": True}, reference_options,
                                    keep_output=True)
    if not last_only(item.metric, item.length, clean_run.logits.shape[-1]):
        return "the metric reads positions other than the last"
    setup = plan(model, item.corrupted, kwargs, corrupt_run, clean_run.logits, item.metric,
                 local, layout)
    if isinstance(setup, str):
        return setup
    cell_units = units(clean_run)
    baseline = float(metric_values(item.metric, corrupt_run.logits, 1)[0])
    reference = float(metric_values(item.metric, clean_run.logits, 1)[0])
    # one number per row, each row's own, as every batch of cells needs (a metric that sums
    # or takes the mean over the rows gives one number for one row too): checked before
    # any cell runs
    check_rows_apart(item.metric, clean_run.logits, corrupt_run.logits, reference, baseline)
    length = item.length
    if batch_size is not None:
        per_trace = choose_batch_size(batch_size, None, 1, 1)  # (at least 1, or raises)
    else:  # two cells a packed row of T + 1 tokens (and its share of the cache)
        state = hidden(corrupt_run.outputs[cells[0][2].key])
        per_row = row_bytes(model, length + 1, 0, state.shape[-1], 0, state.dtype) + \
            sum(k[0].numel() + v[0].numel() for k, v in setup.layers) * 2 * \
            state.element_size()
        per_trace = min(len(cell_units), 2 * max(1, int(memory_budget // max(per_row, 1))))
    per_trace = max(1, per_trace)
    with torch.no_grad():
        scores, traces, tracer, unchanged = run_sweep(
            model, setup, cells, clean_run.outputs, corrupt_run.outputs, item.corrupted,
            cell_units, item.metric, baseline, kwargs, options, per_trace, progress,
            description)
    # (and the two reference runs and the self-checks)
    return Swept(scores, baseline, reference, per_trace, traces + 2 + setup.checks, tracer,
                 setup, unchanged)
