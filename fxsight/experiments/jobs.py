"""Sweeps beyond one pair and one process: datasets of pairs, ranks, checkpoints.

A sweep is a *job*: items (clean/corrupted pairs, or prompts for steering) times cells.
The job is planned the same way in every process, whatever the number of processes:

- **Buckets by length.** Items are grouped by their number of tokens (no padding: every
  row of a batch has the real positions of its prompt). Within a bucket, items are cut in
  *chunks* of as many items as one batch holds cells of one group.
- **Batches.** For each chunk and each group of cells of one Program structure (a site
  kind and layer), the rows ``(item, cell)`` are split into batches of the bucket's batch
  size (the last one padded by repeating its last row). One pair with ``n`` cells per group
  gives exactly the batches of a one-pair sweep.
- **Ranks.** Under an initialized ``torch.distributed`` process group, batch ``i`` of
  ``N`` goes to rank ``i * world // N`` (contiguous shares, so a rank needs the reference
  runs of few items); the scores are gathered with ``all_gather_object`` and every rank
  returns the full result. Each rank first sends whether it succeeded: a rank that failed
  makes the others raise an error naming it instead of waiting for it; a rank that died
  without raising is named after ``FXSIGHT_RANK_TIMEOUT`` seconds (60) without its
  heartbeat (:mod:`.ranks`).
- **Checkpoints.** With ``checkpoint=path`` finished batches (their scores, and each item's
  clean and corrupted metrics) are written to ``path`` (``path.rank<r>`` per rank) after
  each batch at most every ``CHECKPOINT_SECONDS`` and when the job ends or fails; a job
  started again with the same arguments loads them (from every rank's file, so the number of
  processes may change) and runs only the batches that are missing. A checkpoint of another
  job (other prompts, cells, batch size) is refused by name, and so is one of other weights
  (a digest of the model's parameters and buffers, :mod:`.weights`, computed once per job
  with a checkpoint) and one of another configuration (what else decides the forward: the
  modules' settings and the transformers config, :mod:`.configuration`).
"""

from __future__ import annotations

import glob
import hashlib
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .ranks import Ranks
from .progress import progress_bar
from .result import PatchingResult
from .sweeps import (Sweep, check_rows_apart, metric_values, reads_last_position_only,
                     token_ids)
from .configuration import differences, model_configuration
from .weights import weights_digest

CHECKPOINT_SECONDS = 10.0


# --- items ----------------------------------------------------------------------------------
@dataclass
class Item:
    """One pair of a dataset (``clean`` is None for steering prompts)."""

    index: int
    clean: torch.Tensor | None
    corrupted: torch.Tensor  # (1, T): the ids every cell of this item runs on
    metric: Callable | None

    @property
    def length(self) -> int:
        return self.corrupted.shape[1]


def is_dataset(value: Any) -> bool:
    """Whether ``value`` is many prompts (a list of strings, id lists, tensors or dicts, a
    (N, T) tensor with N > 1, any other iterable such as a ``datasets.Dataset``) rather than
    one prompt (a string, a list of ints, a (T,) or (1, T) tensor)."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 2 and value.shape[0] != 1
    if isinstance(value, (list, tuple)):
        return not value or not isinstance(value[0], numbers.Integral)
    return hasattr(value, "__iter__") or hasattr(value, "__getitem__")


def _listed(value: Any, what: str) -> list:
    if isinstance(value, torch.Tensor):
        return list(value)
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{what} must be a prompt or a sequence of prompts, not "
                        f"{type(value).__name__}") from None


def _metrics(metric: Any, n: int) -> list:
    if metric is None or callable(metric):
        return [metric] * n
    metrics = _listed(metric, "metric")
    if len(metrics) != n or not all(callable(m) for m in metrics):
        raise ValueError(f"metric must be one callable or one callable per pair ({n}); got "
                         f"{len(metrics)} items")
    return metrics


def pairs_of(model, clean: Any, corrupted: Any, metric: Any) -> tuple[list[Item], bool]:
    """The clean/corrupted pairs of a call and whether it is a dataset: two prompts; two
    sequences of prompts; or one sequence of dicts with ``"clean"`` and ``"corrupted"``
    (and optionally ``"metric"``) and ``corrupted=None``."""
    if corrupted is None and is_dataset(clean):
        rows = _listed(clean, "clean")
        metrics = _metrics(metric, len(rows))
        items = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "clean" not in row or "corrupted" not in row:
                raise ValueError(f"item {i} of the dataset must be a dict with 'clean' and "
                                 f"'corrupted' (and optionally 'metric'), not "
                                 f"{type(row).__name__}"
                                 + (f" with keys {sorted(row)}" if isinstance(row, dict) else ""))
            items.append(_pair(model, i, row["clean"], row["corrupted"],
                               row.get("metric", metrics[i])))
        return _nonempty(items), True
    if is_dataset(clean) or is_dataset(corrupted):
        if not (is_dataset(clean) and is_dataset(corrupted)):
            raise ValueError("clean and corrupted must both be one prompt or both be "
                             "sequences of prompts (one corrupted prompt per clean one)")
        cleans, corrupts = _listed(clean, "clean"), _listed(corrupted, "corrupted")
        if len(cleans) != len(corrupts):
            raise ValueError(f"{len(cleans)} clean prompts but {len(corrupts)} corrupted ones")
        metrics = _metrics(metric, len(cleans))
        return _nonempty([_pair(model, i, c, k, m) for i, (c, k, m)
                          in enumerate(zip(cleans, corrupts, metrics))]), True
    if not callable(metric):
        raise TypeError(f"metric must be a callable, not {type(metric).__name__}")
    return [_pair(model, 0, clean, corrupted, metric, single=True)], False


def _pair(model, i: int, clean: Any, corrupted: Any, metric: Callable,
          single: bool = False) -> Item:
    name = "" if single else f" of pair {i}"
    clean_ids = token_ids(model, clean, "clean" + name)
    corrupt_ids = token_ids(model, corrupted, "corrupted" + name)
    check_same_length(model, clean_ids, corrupt_ids, name)
    if not callable(metric):
        raise TypeError(f"the metric{name} must be a callable, not {type(metric).__name__}")
    return Item(i, clean_ids, corrupt_ids, metric)


def check_same_length(model, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor,
                      name: str = "") -> None:
    """Raise where a pair's token ids (each ``(1, T)``) differ in length: its positions
    would not correspond (``name``: which pair, as `` of pair i``)."""
    if clean_ids.shape == corrupt_ids.shape:
        return
    from .sweeps import token_labels

    def note(ids):
        labels = token_labels(model, ids)
        return f"tokens {labels}" if labels is not None else "tokens"
    raise ValueError(
        f"the clean and corrupted prompts{name} must have the same number of tokens to "
        f"be patched position by position: clean has {clean_ids.shape[1]} "
        f"{note(clean_ids)}, corrupted has {corrupt_ids.shape[1]} {note(corrupt_ids)}")


def prompts_of(model, prompt: Any, metric: Any) -> tuple[list[Item], bool]:
    """Steering: one prompt, a sequence of prompts, or a sequence of dicts with
    ``"prompt"`` (and optionally ``"metric"``)."""
    if not is_dataset(prompt):
        return [Item(0, None, token_ids(model, prompt, "prompt"), metric)], False
    rows = _listed(prompt, "prompt")
    metrics = _metrics(metric, len(rows))
    items = []
    for i, row in enumerate(rows):
        m = metrics[i]
        if isinstance(row, dict):
            if "prompt" not in row:
                raise ValueError(f"item {i} of the dataset must have a 'prompt' (keys: "
                                 f"{sorted(row)})")
            row, m = row["prompt"], row.get("metric", m)
        items.append(Item(i, None, token_ids(model, row, f"prompt {i}"), m))
    return _nonempty(items), True


def _nonempty(items: list[Item]) -> list[Item]:
    if not items:
        raise ValueError("the dataset is empty")
    return items


# --- the plan -------------------------------------------------------------------------------
@dataclass
class Refs:
    """An item's reference runs and what the cells need of them."""

    ids: torch.Tensor  # (1, T) the ids its cells run on
    metric: Callable
    baseline: float  # metric of the unpatched run
    reference: float | None  # metric of the clean run
    last_only: bool  # the metric reads only the last position (checked on its logits)
    runs: Any  # experiment-specific: the saved activations
    dtype: torch.dtype = torch.float32  # the metric's (its scores'), see score_dtype

    @classmethod
    def of_pair(cls, item: Any, clean_run: Any, corrupt_run: Any) -> "Refs":
        """A clean/corrupted pair's references from its two reference runs (each with
        ``.logits``); ``runs`` holds both."""
        measured = metric_values(item.metric, corrupt_run.logits, 1)
        baseline = float(measured[0])
        reference = float(metric_values(item.metric, clean_run.logits, 1)[0])
        check_rows_apart(item.metric, clean_run.logits, corrupt_run.logits, reference,
                         baseline)
        return cls(item.corrupted, item.metric, baseline, reference,
                   reads_last_position_only(item.metric, clean_run.logits),
                   (clean_run, corrupt_run), measured.dtype)


@dataclass
class Group:
    """Cells of one Program structure for items of one length: ``indices[c]`` is where cell
    ``c``'s score goes in an item's scores; ``replacements(rows, [(refs, cell), ...])`` the
    ``(target, value)`` pairs of a batch."""

    label: str
    cells: list[Any]
    indices: list[tuple[int, ...]]
    replacements: Callable[[int, list[tuple[Refs, Any]]], list]


@dataclass
class Batch:
    id: int
    length: int
    group: int
    rows: list[tuple[int, int]]  # (item position, cell index)
    size: int  # rows run (padded)


@dataclass
class Experiment:
    """What a job needs to know of its experiment."""

    name: str
    items: list[Item]
    shape: tuple[int, ...]  # one item's scores
    refs: Callable[[Item], Refs]
    groups: Callable[[int], list[Group]]  # by length
    row_bytes: Callable[[int, int, Refs], int]  # by length and positions of logits kept,
    # from a probe item's refs
    can_keep_last: bool  # the model's forward takes logits_to_keep (and it is not given)
    key: list  # what identifies the job beyond items (sites, layers, positions, ...)


def _plan(experiment: Experiment, probe: Refs, batch_size, memory_budget, choose) \
        -> tuple[list[Batch], dict[int, int], dict[int, list[Group]]]:
    buckets: dict[int, list[int]] = {}
    for position, item in enumerate(experiment.items):
        buckets.setdefault(item.length, []).append(position)
    batches: list[Batch] = []
    sizes, groups = {}, {}
    for length in sorted(buckets):
        members = buckets[length]
        groups[length] = experiment.groups(length)
        cells = max((len(g.cells) for g in groups[length]), default=0)
        if cells == 0:
            continue
        kept = 1 if experiment.can_keep_last and probe.last_only else length
        size = choose(batch_size, memory_budget, experiment.row_bytes(length, kept, probe),
                      cells * len(members))
        sizes[length] = size
        per_chunk = max(1, size // cells)
        for start in range(0, len(members), per_chunk):
            chunk = members[start:start + per_chunk]
            for g, group in enumerate(groups[length]):
                rows = [(i, c) for i in chunk for c in range(len(group.cells))]
                for s in range(0, len(rows), size):
                    batches.append(Batch(len(batches), length, g, rows[s:s + size], size))
    return batches, sizes, groups


def _fingerprint(experiment: Experiment, batches: list[Batch], probe: Refs) -> str:
    """What identifies a job (its checkpoint): the experiment, its key, the prompts, the
    batches and the scores' dtype (a float32 job's scores are not a float64 one's)."""
    digest = hashlib.sha256()
    digest.update(repr((experiment.name, experiment.shape, experiment.key,
                        str(probe.dtype))).encode())
    for item in experiment.items:
        for ids in (item.clean, item.corrupted):
            digest.update(b"-" if ids is None else ids.numpy().tobytes() + b"|")
    digest.update(repr([(b.length, b.group, b.rows, b.size) for b in batches]).encode())
    return digest.hexdigest()


# --- checkpoints ------------------------------------------------------------------------------
class Checkpoint:
    """A job's checkpoint file(s): its finished batches and items' metrics, with the job's
    fingerprint, the digest of the model's weights and the model's configuration (what
    else decides its forward) that wrote them."""

    def __init__(self, path: str | os.PathLike | None, ranks: Ranks, fingerprint: str,
                 weights: str | None = None, configuration: dict[str, str] | None = None):
        self.path = None if path is None else os.fspath(path)
        self.fingerprint = fingerprint
        self.weights = weights
        self.configuration = configuration
        self.own = self.path if (self.path is None or not ranks.on) \
            else f"{self.path}.rank{ranks.rank}"
        self.saved_at = time.monotonic()

    def load(self) -> tuple[dict, dict]:
        batches, items = {}, {}
        if self.path is None:
            return batches, items
        for name in sorted({self.path, *glob.glob(glob.escape(self.path) + ".rank*")}):
            if not os.path.exists(name) or name.endswith(".tmp"):
                continue
            state = torch.load(name, weights_only=True)
            if state.get("fingerprint") != self.fingerprint:
                raise ValueError(f"the checkpoint {name} was written by another sweep (other "
                                 f"prompts, cells, batch size or experiment); remove it or "
                                 f"give another checkpoint path")
            written = state.get("weights")
            if written is None:
                raise ValueError(
                    f"the checkpoint {name} holds no digest of the weights that wrote it (an "
                    f"earlier fxsight wrote it): it cannot be told to be this model's; remove "
                    f"it or give another checkpoint path")
            if written != self.weights:
                raise ValueError(
                    f"the checkpoint {name} was written by a model with other weights "
                    f"(the SHA-256 of its parameters and buffers was {written[:12]}..., this "
                    f"model's is {self.weights[:12]}...): its scores are not this model's; "
                    f"remove it or give another checkpoint path")
            self._check_configuration(name, state.get("configuration"))
            batches.update(state["batches"])
            items.update(state["items"])
        return batches, items

    def _check_configuration(self, name: str, written: dict[str, str] | None) -> None:
        if written is None:
            raise ValueError(
                f"the checkpoint {name} holds no record of the configuration of the model "
                f"that wrote it (an earlier fxsight wrote it): it cannot be told to be this "
                f"model's; remove it or give another checkpoint path")
        if written != self.configuration:
            raise ValueError(
                f"the checkpoint {name} was written by a model with another configuration "
                f"(same weights, another forward: "
                f"{differences(written, self.configuration or {})}): its scores are not "
                f"this model's; remove it or give another checkpoint path")

    def save(self, batches: dict, items: dict, force: bool = False) -> None:
        if self.own is None or not (force or
                                    time.monotonic() - self.saved_at >= CHECKPOINT_SECONDS):
            return
        directory = os.path.dirname(os.path.abspath(self.own))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{self.own}.tmp"
        torch.save({"fingerprint": self.fingerprint, "weights": self.weights,
                    "configuration": self.configuration, "batches": batches,
                    "items": items}, temporary)
        os.replace(temporary, self.own)
        self.saved_at = time.monotonic()


# --- running --------------------------------------------------------------------------------
@dataclass
class JobResult:
    scores: torch.Tensor  # (items, *shape): metric minus the item's baseline; NaN: no cell
    baselines: torch.Tensor
    references: torch.Tensor | None
    sizes: dict[int, int]
    traces: int
    batches: int
    resumed: int  # batches loaded from a checkpoint
    ranks: int
    keep_last: bool
    sweep: Sweep
    lengths: dict[int, int] = field(default_factory=dict)


def run_job(experiment: Experiment, sweep: Sweep, batch_size, memory_budget, choose,
            progress: bool, checkpoint=None, distributed: bool | None = None,
            on_batch: Callable[[Batch], None] | None = None) -> JobResult:
    """Run every batch of ``experiment`` that this rank owns and no checkpoint holds; gather
    the scores of all ranks (a rank that dies is noticed, see :mod:`.ranks`)."""
    with Ranks(distributed) as ranks:
        return _run_job(ranks, experiment, sweep, batch_size, memory_budget, choose,
                        progress, checkpoint, on_batch)


def _run_job(ranks: Ranks, experiment: Experiment, sweep: Sweep, batch_size, memory_budget,
             choose, progress: bool, checkpoint, on_batch) -> JobResult:
    items = experiment.items
    cache: dict[int, Refs] = {}
    item_metrics: dict[int, tuple[float, float | None]] = {}
    error = None
    try:
        probe = _refs(experiment, cache, 0, item_metrics)
        batches, sizes, groups = _plan(experiment, probe, batch_size, memory_budget, choose)
        fingerprint = _fingerprint(experiment, batches, probe)
        # (once per job, and only with a checkpoint: every byte of the model is read)
        weights = None if checkpoint is None else weights_digest(sweep.model._module)
        configuration = None if checkpoint is None \
            else model_configuration(sweep.model._module)
    except Exception as failure:  # noqa: BLE001 - sent to the other ranks, then raised
        error, fingerprint, weights, configuration = failure, None, None, None
    prints = ranks.exchange("planning", fingerprint, error)
    if any(p != prints[0] for p in prints):
        different = [r for r, p in enumerate(prints) if p != prints[0]]
        raise RuntimeError(f"ranks {different} planned another sweep than rank 0 (other "
                           f"prompts, arguments or batch size): every rank must make the "
                           f"same call")
    store = Checkpoint(checkpoint, ranks, fingerprint, weights, configuration)
    done, loaded_items = store.load()
    _check_resumed(store, item_metrics, loaded_items)
    resumed = len(done)
    item_metrics.update({k: v for k, v in loaded_items.items() if k not in item_metrics})
    n = len(batches)
    mine = [b for b in batches if b.id * ranks.world // max(n, 1) == ranks.rank]
    todo = [b for b in mine if b.id not in done]
    computed: dict[int, torch.Tensor] = {}
    keep_last = False
    error = None
    rows_total = sum(len(b.rows) for b in todo)
    last_use = {i: t for t, b in enumerate(todo) for i, _ in b.rows}
    try:
        with torch.no_grad(), progress_bar(total=rows_total, desc=sweep.description,
                                           unit="cell", leave=False,
                                           disable=not progress or ranks.rank != 0) as bar:
            for t, batch in enumerate(todo):
                group = groups[batch.length][batch.group]
                needed = sorted({i for i, _ in batch.rows})
                refs = {i: _refs(experiment, cache, i, item_metrics) for i in needed}
                rows = [(refs[i], group.cells[c]) for i, c in batch.rows]
                padded = rows + [rows[-1]] * (batch.size - len(rows))
                if len(needed) == 1:
                    ids = rows[0][0].ids.expand(batch.size, batch.length).contiguous()
                else:
                    ids = torch.cat([r.ids for r, _ in padded])
                last = experiment.can_keep_last and all(refs[i].last_only for i in needed)
                keep_last = keep_last or last
                kwargs = {**sweep.kwargs, "logits_to_keep": 1} if last else sweep.kwargs
                logits = sweep.run_batch(ids, group.replacements(batch.size, padded),
                                         kwargs)
                computed[batch.id] = _batch_metrics(logits, batch, refs).cpu()
                done[batch.id] = computed[batch.id]
                bar.update(len(batch.rows))
                for i in needed:
                    if last_use[i] == t:
                        cache.pop(i, None)  # its reference runs are not needed again here
                if on_batch is not None:
                    on_batch(batch)
                store.save(done, item_metrics)
    except Exception as failure:  # noqa: BLE001 - saved, sent to the other ranks, raised
        error = failure
    except BaseException:
        # interrupted (Ctrl-C, SystemExit): keep what finished, and stop at once (no
        # exchange with the other ranks, which notice this one's missing heartbeat)
        if store.own is not None and computed:
            store.save(done, item_metrics, force=True)
        raise
    if store.own is not None and (computed or error is None):
        store.save(done, item_metrics, force=True)
    payloads = ranks.exchange("running its batches",
                              (computed, item_metrics, sweep.traces, keep_last), error)
    for values, metrics, _, _ in payloads:
        done.update(values)
        item_metrics.update(metrics)
    for position in range(len(items)):
        if position not in item_metrics:  # no cell of its length: only its metrics
            _refs(experiment, cache, position, item_metrics)
            cache.pop(position, None)
    keep_last = any(p[3] for p in payloads)
    traces = sum(p[2] for p in payloads)

    # the scores keep the metric's dtype (float64 for a float64 model), at least float32
    dtype = torch.float32
    for values in done.values():
        dtype = torch.promote_types(dtype, values.dtype)
    scores = torch.full((len(items), *experiment.shape), float("nan"), dtype=dtype)
    for batch in batches:
        group = groups[batch.length][batch.group]
        for (i, c), value in zip(batch.rows, done[batch.id]):
            scores[(i, *group.indices[c])] = value
    baselines = torch.tensor([item_metrics[i][0] for i in range(len(items))], dtype=dtype)
    references = [item_metrics[i][1] for i in range(len(items))]
    scores -= baselines.reshape(-1, *[1] * len(experiment.shape))
    lengths: dict[int, int] = {}
    for item in items:
        lengths[item.length] = lengths.get(item.length, 0) + 1
    return JobResult(scores, baselines,
                     None if any(r is None for r in references)
                     else torch.tensor(references, dtype=dtype),
                     sizes, traces, len(batches), resumed, ranks.world, keep_last, sweep,
                     dict(sorted(lengths.items())))


def _check_resumed(store: Checkpoint, computed: dict, loaded: dict) -> None:
    """Refuse a checkpoint whose items' metrics differ from those just computed (the
    probe's): its scores are of another metric, which the fingerprint (prompts, cells,
    batch size) and the weights' digest cannot tell. (A tolerance, not bit equality: a job
    may be resumed on other hardware.)"""
    for position, metrics in computed.items():
        if position not in loaded:
            continue
        for now, then in zip(metrics, loaded[position]):
            if now is None and then is None:
                continue
            if now is None or then is None or not (
                    math.isclose(now, then, rel_tol=1e-3, abs_tol=1e-4)
                    or (math.isnan(now) and math.isnan(then))):
                raise ValueError(
                    f"the checkpoint {store.path} was written with another metric or model: "
                    f"pair {position}'s metrics were {loaded[position]}, they are now "
                    f"{metrics}; remove it or give another checkpoint path")


def _refs(experiment: Experiment, cache: dict, position: int, item_metrics: dict) -> Refs:
    if position not in cache:
        refs = experiment.refs(experiment.items[position])
        cache[position] = refs
        item_metrics[position] = (refs.baseline, refs.reference)
    return cache[position]


def _batch_metrics(logits: torch.Tensor, batch: Batch, refs: dict[int, Refs]) -> torch.Tensor:
    """One metric value per real row: the shared metric on the whole batch, or each item's
    metric on its rows."""
    metrics = {id(r.metric): r.metric for r in refs.values()}
    if len(metrics) == 1:
        return metric_values(next(iter(metrics.values())), logits, batch.size)[:len(batch.rows)]
    parts = []
    for i, r in refs.items():
        rows = torch.tensor([k for k, (j, _) in enumerate(batch.rows) if j == i])
        parts.append((rows, metric_values(r.metric, logits[rows], len(rows)).cpu()))
    dtype = parts[0][1].dtype
    for _, values in parts:
        dtype = torch.promote_types(dtype, values.dtype)
    out = torch.empty(len(batch.rows), dtype=dtype)
    for rows, values in parts:
        out[rows] = values.to(dtype)
    return out


def summary(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean over items (of those that have the cell), its standard error and the count."""
    present = ~scores.isnan()
    counts = present.sum(0)
    total = torch.where(present, scores, 0.0).sum(0)
    mean = total / counts.clamp(min=1)
    deviation = torch.where(present, scores - mean, 0.0)
    variance = (deviation ** 2).sum(0) / (counts - 1).clamp(min=1)
    stderr = (variance / counts.clamp(min=1)).sqrt()
    nan = torch.tensor(float("nan"))
    mean = torch.where(counts > 0, mean, nan)
    stderr = torch.where(counts > 1, stderr, nan)
    return mean, stderr, counts


def position_labels(positions: Any, lengths: list[int]) -> list[int]:
    """The position axis of a sweep over prompts of ``lengths`` tokens: as for one prompt
    when they have one length; else ``"all"`` is every position counted from the end
    (``-longest .. -1``) and given positions are kept as given (negative: from the end)."""
    from .sweeps import check_distinct, check_position_labels, check_positions, integers

    if len(set(lengths)) == 1:
        return check_positions(positions, lengths[0])
    longest = max(lengths)
    if isinstance(positions, str):
        check_positions(positions, longest)
        return list(range(-longest, 0))
    # (kept as given: 1 and -4 are one token of a 5-token pair, not of a 3-token one)
    labels = check_position_labels(integers(positions, "position"), longest)
    check_distinct(labels, labels, "position")
    return labels


def position_in(label: int, length: int) -> int | None:
    """The position of a label in a prompt of ``length`` tokens, None if it has none."""
    position = label + length if label < 0 else label
    return position if 0 <= position < length else None


# --- results --------------------------------------------------------------------------------
def value_key(value: Any) -> Any:
    """What identifies ``value`` in a job's key: a tensor by its dtype, shape and a hash of
    all its bytes (its ``repr`` elides entries and rounds them), containers item by item,
    anything else by its ``repr``."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
        return f"tensor({value.dtype}, {tuple(value.shape)}, sha256={digest})"
    if isinstance(value, dict):
        return sorted((repr(k), value_key(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, *[value_key(v) for v in value]]
    return repr(value)


def kwargs_key(kwargs: dict) -> list:
    """The forward keywords in a job's key (see :func:`value_key`)."""
    return sorted((k, value_key(v)) for k, v in kwargs.items())


def job_info(job, n_items: int, runs_per_item: int, sweep, seen: dict, kwargs: dict,
          start: float) -> dict:
    sizes = sorted(set(job.sizes.values()))
    reference = seen.get("reference")
    backends = sweep.backends or ({reference.backend} if reference is not None else set())
    info = dict(batch_size=sizes[0] if len(sizes) == 1 else dict(job.sizes),
                traces=job.traces + runs_per_item * n_items, cells=int(job.scores.numel()),
                backend=",".join(sorted(str(b) for b in backends)),
                logits_to_keep=kwargs.get("logits_to_keep", 1 if job.keep_last else None),
                seconds=time.perf_counter() - start,
                graph_module=getattr(sweep.last_tracer, "graph_module", None))
    if job.ranks > 1 or job.resumed:
        info.update(ranks=job.ranks, batches=job.batches, resumed_batches=job.resumed)
    return info


def dataset_result(job, dims: tuple, coords: dict, method: str, info: dict,
                    has_reference: bool = True) -> PatchingResult:
    mean, _, _ = summary(job.scores)
    info = {**info, "pairs": int(job.scores.shape[0]), "lengths": job.lengths,
            "batches": job.batches, "ranks": job.ranks, "resumed_batches": job.resumed}
    if len(job.lengths) > 1:
        info["different_lengths"] = (
            "grouped by length (no padding); positions are counted from the end where "
            "negative, from the start otherwise; a pair without a position has NaN there "
            "and the mean is over the pairs that have it (result.counts)")
    references = job.references if has_reference else None
    return PatchingResult(
        mean, dims, coords, baseline=float(job.baselines.mean()),
        reference=None if references is None else float(references.mean()),
        tokens=None, method=method, info=info, per_pair=job.scores,
        baselines=job.baselines, references=references)
