"""Patching experiments: activation patching sweeps, steering sweeps, attribution patching.

All three return a :class:`PatchingResult`: a tensor of scores with named axes.

- :func:`activation_patching` patches the clean run's activation into the corrupted run at
  every (site kind, layer, position) cell and measures ``metric`` on the patched logits.
  The cells run in large batches with the corrupted run's computation before the patched
  layer reused (see :mod:`fxsight.experiments.sweeps`); the numbers are those of a
  one-cell-at-a-time loop.
- :func:`steering_sweep` adds ``scale * vector`` to the residual stream at every (vector,
  layer, scale) cell, with the same machinery.
- :func:`attribution` estimates activation patching's scores from one forward and one
  backward pass (``(clean - corrupted) · d metric / d activation``, Nanda's attribution
  patching).

Scores are *effects*: the metric of the patched (steered) run minus the metric of the
unpatched run (``result.baseline``); ``result.normalized()`` divides activation patching's by
``reference - baseline`` (the clean run's metric minus the corrupted run's), so 1 means
"restores the clean behaviour".
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from ..api.envoy import Envoy
from ..api.functions import apply_pure
from ..errors import TraceError
from . import suffix as suffix_path
from .heads import head_patching
from .modes import check_reproducible
from .result import Cell, PatchingResult
from .jobs import (Experiment, Group as JobGroup, Item, Refs, check_same_length,
                   dataset_result, is_dataset,
                   job_info, kwargs_key, value_key, pairs_of, position_in, position_labels,
                   prompts_of, run_job, summary)
from .sweeps import (DEFAULT_MEMORY_BUDGET, Sweep, Target, can_keep_last, check_distinct,
                     check_kinds, check_layers,
                     check_positions, choose_batch_size, expanded, find_layout,
                     forward_kwargs as _forward_kwargs, hidden,
                     metric_values, reads_last_position_only, reference_run, row_bytes,
                     score_dtype, stacked, token_ids, token_labels, trace_options,
                     with_hidden)

__all__ = ["PatchingResult", "Cell", "activation_patching", "head_patching", "steering_sweep",
           "attribution", "block_envoys"]


# --- activation patching -------------------------------------------------------------------
def activation_patching(model: Envoy, clean: Any, corrupted: Any = None,
                        metric: Callable | Sequence[Callable] | None = None,
                        sites: Sequence[str] = ("resid", "attn", "mlp"),
                        positions: Any = "all", layers: Iterable[int] | None = None,
                        batch_size: int | None = None,
                        memory_budget: int | float = DEFAULT_MEMORY_BUDGET,
                        progress: bool = True, backend: str | None = None,
                        compile: Any = None, checkpoint: Any = None,
                        distributed: bool | None = None, suffix: bool | None = None,
                        blocks: Any = None, **forward_kwargs: Any) -> PatchingResult:
    """Patch the clean run's activation into the corrupted run, one cell at a time in
    effect, for every site kind × layer × position; return the effect of each patch on
    ``metric``.

    ``model``: an ``NNsight`` (``clean``/``corrupted`` are token ids of shape (1, T) or
    (T,)) or a ``LanguageModel`` (strings too). Both prompts must have the same number of
    tokens. ``metric(logits)`` maps logits of shape (rows, T, vocab) to one number per row,
    e.g. ``lambda logits: logits[:, -1, paris] - logits[:, -1, rome]``.

    ``sites``: ``"resid"`` (a block's output: the residual stream after it), ``"attn"``
    (the block's attention output, item 0 if it returns a tuple), ``"mlp"`` (its MLP's
    output), ``"resid_pre"`` (a block's input; layer 0: the embeddings). ``positions``:
    ``"all"`` or a list of token positions; ``layers``: all or a list. Batches are sized
    to ``memory_budget`` bytes of activations unless ``batch_size`` is given; ``progress``
    shows a tqdm bar. ``blocks``: the ``ModuleList`` of blocks (its path, e.g.
    ``"model.decoder.layers"``, or its envoy), needed where the model has several (an
    encoder-decoder); by default its one stack of blocks. Other keywords go to the model's
    forward.

    **Datasets**: ``clean`` and ``corrupted`` may be sequences of prompts (or ``clean`` a
    sequence of dicts with ``"clean"``, ``"corrupted"`` and optionally ``"metric"``, with
    ``corrupted=None``), and ``metric`` one callable per pair: ``values`` is then the mean
    over pairs, ``per_pair`` each pair's scores, ``stderr`` the standard error (pairs of
    different lengths are grouped by length, positions counted from the end; see
    docs/sweeps.md). Under an initialized ``torch.distributed`` process group the batches
    are shared among the ranks and every rank returns the full result (``distributed=False``
    to not). ``checkpoint="path"`` saves finished batches there and a repeated call resumes
    from them.

    **Suffix path** (``suffix=None``: where valid; ``False``: never; ``True``: required):
    for one pair on a causal decoder that takes a key-value cache, with a metric that reads
    only the last position, each cell runs only the positions from the patched one on, over
    the corrupted run's cache, packed into rows (see :mod:`fxsight.experiments.suffix`);
    ``result.info["suffix"]`` is ``True`` or says why the full-length path ran. A cell whose
    clean value equals the corrupted one (every position before the first token where the
    prompts differ) is not run there: its score is 0 exactly
    (``result.info["cells_not_run"]``).

    Returns scores with ``dims == ("site", "layer", "position")``: the patched run's metric
    minus the corrupted run's (``result.baseline``); ``result.reference`` is the clean
    run's, ``result.normalized()`` the fraction restored.

    >>> from fxsight.experiments import demo
    >>> lm = demo.load()  # the built-in 2-layer GPT-2 (fxsight/data)
    >>> vocab = lm.tokenizer.get_vocab()
    >>> def metric(logits):  # the clean answer's logit minus the corrupted one's
    ...     return logits[:, -1, vocab["1"]] - logits[:, -1, vocab["7"]]
    >>> result = activation_patching(lm, demo.CLEAN, demo.CORRUPTED, metric,
    ...                              sites=["resid"], progress=False)
    >>> result.dims, tuple(result.values.shape)  # one site kind, 2 layers, 7 tokens
    (('site', 'layer', 'position'), (1, 2, 7))
    >>> round(result.normalized().values[0, 1, -1].item(), 2)  # last block, last token
    1.0
    """

    start = time.perf_counter()
    check_reproducible(model, "activation patching")
    kinds = check_kinds(sites)
    items, dataset = pairs_of(model, clean, corrupted, metric)
    layout = find_layout(model, blocks)
    layer_list = check_layers(layers, layout.n_layers)
    labels = position_labels(positions, [item.length for item in items])
    kwargs = _forward_kwargs(model, forward_kwargs)
    options = trace_options(backend, compile)
    # the two reference runs need every activation and the full logits: plain forward
    # passes with hooks (no capture for batch size 1); the sweep's batches use the graph
    reference_options = options if backend is not None else {**options, "backend": "hooks"}

    # the reference runs: every value the cells patch (clean), and every value they start
    # from (corrupted): the patched value itself and the modules before it
    plans = {(kind, layer): _plan(layout, kind, layer) for kind in kinds
             for layer in layer_list}
    clean_targets = [target for target, _ in plans.values()]
    corrupt_targets = [t for target, prefix in plans.values() for t in (*prefix, target)]
    sweep = Sweep(model, None, None, kwargs, options, "attr", 1, progress,
                  "activation patching")
    seen: dict = {}
    coords = {"site": kinds, "layer": layer_list, "position": labels}
    settings = suffix_path.Settings(backend, checkpoint, distributed, kwargs, options,
                                    reference_options, batch_size, memory_budget, progress,
                                    start)
    fast, suffix_note = suffix_path.attempt(suffix, lambda: suffix_path.run_pair(
        model, items, dataset, *_suffix_cells(layout, kinds, layer_list, labels, plans),
        clean_targets, corrupt_targets, coords, "activation patching", layout, settings))
    if fast is not None:
        return fast

    def refs(item: Item) -> Refs:
        clean_run, corrupt_run = sweep.reference_pair(
            item.clean, item.corrupted, clean_targets, corrupt_targets, reference_options)
        for target in clean_targets:
            shape = hidden(clean_run.outputs[target.key]).shape
            if shape[:2] != (1, item.length):
                raise ValueError(f"{target.key} has shape {tuple(shape)}; patching needs "
                                 f"(batch, tokens, ...)")
        seen.setdefault("reference", clean_run)
        return Refs.of_pair(item, clean_run, corrupt_run)

    can_keep = can_keep_last(model, kwargs)

    def per_row(length: int, kept: int, probe: Refs) -> int:
        clean_run = probe.runs[0]
        value = hidden(clean_run.outputs[clean_targets[0].key])
        return row_bytes(model, length, kept, value.shape[-1], clean_run.logits.shape[-1],
                         value.dtype)

    def groups(length: int) -> list[JobGroup]:
        cells = [(j, p) for j, label in enumerate(labels)
                 if (p := position_in(label, length)) is not None]
        return [JobGroup(f"{kind} {layer}", cells, [(k, l, j) for j, _ in cells],
                         _patches(*plans[kind, layer]))
                for k, kind in enumerate(kinds) for l, layer in enumerate(layer_list)]

    experiment = Experiment("activation patching", items,
                            (len(kinds), len(layer_list), len(labels)), refs, groups,
                            per_row, can_keep, [kinds, layer_list, labels, kwargs_key(kwargs),
                                                [b.path for b in layout.blocks]])
    job = run_job(experiment, sweep, batch_size, memory_budget, choose_batch_size, progress,
                  checkpoint, distributed)
    info = job_info(job, len(items), 2, sweep, seen, kwargs, start)
    info["suffix"] = suffix_note
    if not dataset:
        return PatchingResult(
            job.scores[0], ("site", "layer", "position"), coords,
            baseline=float(job.baselines[0]), reference=float(job.references[0]),
            tokens=token_labels(model, items[0].clean), method="activation patching",
            info=info)
    return dataset_result(job, ("site", "layer", "position"), coords,
                           "activation patching", info)


def _suffix_cells(layout, kinds: list[str], layer_list: list[int], labels: list[int],
                  plans: dict) -> tuple[list[suffix_path.Cell], Callable]:
    """Activation patching's cells on the suffix path (one per site kind and layer, see
    :func:`suffix.sweep_pair`) and their units: the pair's position of each label."""
    cells = [(kind, layer, *plans[kind, layer], _local(layout, kind, layer))
             for kind in kinds for layer in layer_list]

    def units(item: Item, clean_run: Any) -> list:
        return [(position_in(label, item.length), None) for label in labels]
    return cells, units


def _plan(layout, kind: str, layer: int) -> tuple[Target, list[Target]]:
    """What a ``kind`` cell of ``layer`` patches, and the modules before it that it skips
    with the corrupted run's values (prefix reuse): the previous block (its output is this
    block's input) and, for an MLP cell, the block's attention.

    A residual-stream cell skips its block with the patched value (nothing up to it runs);
    ``resid_pre`` of layer ``l > 0`` is ``resid`` of layer ``l - 1``; of layer 0, it
    replaces the first block's input (the embeddings)."""
    if kind == "resid":
        return Target(layout.blocks[layer]), []
    if kind == "resid_pre":
        if layer > 0:
            return Target(layout.blocks[layer - 1]), []
        return Target(layout.blocks[0], "input"), []
    prefix = [Target(layout.blocks[layer - 1])] if layer > 0 else []
    if kind == "mlp":
        try:
            prefix.append(Target(layout.site("attn", layer)))
        except ValueError:
            pass  # no attention module to skip: it runs
    return Target(layout.site(kind, layer)), prefix


def _local(layout, kind: str, layer: int) -> list[Target]:
    """The modules after a ``kind`` cell's site in its block whose inputs change at the
    patched position only (the suffix path runs them there only): an attention cell's
    MLP. (An MLP cell's block has nothing left to compute; a residual cell's is
    skipped.)"""
    mlp = suffix_path.mlp_of(layout, layer) if kind == "attn" else None
    return [Target(mlp)] if mlp is not None else []


def _patches(target: Target, prefix: list[Target]):
    """The replacements of a batch of cells at ``target``: the prefix modules skipped with
    the corrupted values, the target replaced by the corrupted value in which each row's
    position holds the clean one. Rows are ``(refs, (label index, position))`` of one pair
    or of several pairs of one length."""

    def replacements(rows: int, padded: list) -> list[tuple[Target, Any]]:
        index = torch.tensor([p for _, (_, p) in padded])
        first = padded[0][0]
        if all(r is first for r, _ in padded):
            clean, corrupt = first.runs[0].outputs, first.runs[1].outputs
            corrupt_hidden = hidden(corrupt[target.key])
            patched = corrupt_hidden.expand(rows, *corrupt_hidden.shape[1:]).clone()
            patched[torch.arange(rows), index] = hidden(clean[target.key])[0, index]
            pairs = [(t, expanded(corrupt[t.key], rows)) for t in prefix]
            pairs.append((target, with_hidden(corrupt[target.key], patched, rows)))
            return pairs
        corrupts = [r.runs[1].outputs for r, _ in padded]
        patched = torch.cat([hidden(c[target.key]) for c in corrupts])
        clean_rows = torch.cat([hidden(r.runs[0].outputs[target.key]) for r, _ in padded])
        row = torch.arange(rows)
        patched[row, index] = clean_rows[row, index]
        pairs = [(t, stacked([c[t.key] for c in corrupts])) for t in prefix]
        pairs.append((target, stacked([c[target.key] for c in corrupts], patched)))
        return pairs

    return replacements


def _backend(sweep: Sweep, reference) -> str:
    backends = sweep.backends or {reference.backend}
    return ",".join(sorted(str(b) for b in backends))


def _token_note(model: Envoy, ids: torch.Tensor) -> str:
    labels = token_labels(model, ids)
    return f"tokens {labels}" if labels is not None else "tokens"


# --- steering ------------------------------------------------------------------------------
def steering_sweep(model: Envoy, prompt: Any, vectors: Any,
                   layers: Iterable[int] | None = None,
                   scales: Sequence[float] = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0),
                   metric: Callable | Sequence[Callable] | None = None,
                   positions: Any = "all", batch_size: int | None = None,
                   memory_budget: int | float = DEFAULT_MEMORY_BUDGET,
                   progress: bool = True, backend: str | None = None, compile: Any = None,
                   checkpoint: Any = None, distributed: bool | None = None,
                   blocks: Any = None, **forward_kwargs: Any) -> PatchingResult:
    """Add ``scale * vector`` to the residual stream (a block's output) at every
    (vector, layer, scale) cell and measure ``metric`` on the steered logits.

    ``vectors``: one tensor of shape (hidden,), a (k, hidden) stack of k vectors, a list of
    vectors, or a dict name -> vector. An item of a list or dict of shape (n_layers,
    hidden) is one vector per layer (row ``l`` at layer ``l``); a bare 2-D tensor is
    always a stack (each row added at every layer), whatever its length: pass
    ``[per_layer]`` or ``{"name": per_layer}`` for one per-layer vector. ``positions``:
    where the vector is added (``"all"`` or a list; over a dataset, a pair lacking one of
    them has NaN scores, left out of the mean, as in activation patching).
    ``metric(logits)`` gives one number per row; by default the log-probability of the
    unsteered run's prediction at the last position.

    Returns scores with ``dims == ("vector", "layer", "scale")``: the steered metric minus
    the unsteered one (``result.baseline``).

    >>> from fxsight.experiments import demo
    >>> lm = demo.load()
    >>> vocab = lm.tokenizer.get_vocab()
    >>> result = steering_sweep(lm, demo.CLEAN, {"noise": torch.ones(64)}, scales=[0.0, 4.0],
    ...                         metric=lambda logits: logits[:, -1, vocab["1"]],
    ...                         progress=False)
    >>> result.dims, result.values[..., 0].abs().max().item() < 1e-4  # scale 0: no change
    (('vector', 'layer', 'scale'), True)
    """

    start = time.perf_counter()
    check_reproducible(model, "steering sweep")
    items, dataset = prompts_of(model, prompt, metric)
    layout = find_layout(model, blocks)
    layer_list = check_layers(layers, layout.n_layers)
    lengths = [item.length for item in items]
    if len(set(lengths)) == 1:
        position_list = check_positions(positions, lengths[0])
    else:  # each prompt's own positions ("all": every one; negative: from its end)
        position_list = position_labels(positions, lengths)
    scale_list = [float(s) for s in scales]
    if not scale_list:
        raise ValueError("scales is empty")
    check_distinct(scale_list, list(scales), "scale")
    kwargs = _forward_kwargs(model, forward_kwargs)
    options = trace_options(backend, compile)
    blocks = [Target(layout.site("resid", layer)) for layer in layer_list]
    reference_options = options if backend is not None else {**options, "backend": "hooks"}
    named = _named_vectors(vectors, layout.n_layers)
    names = list(named)
    sweep = Sweep(model, None, None, kwargs, options, "attr", 1, progress, "steering sweep")
    seen: dict = {}

    def refs(item: Item) -> Refs:
        run = reference_run(model, item.corrupted, blocks, kwargs, reference_options)
        chosen = item.metric
        if chosen is None:
            token = int(run.logits[0, -1].argmax())

            def chosen(logits, token=token):
                return logits[:, -1].to(score_dtype(logits.dtype)).log_softmax(-1)[:, token]
        size_hidden = hidden(run.outputs[blocks[0].key]).shape[-1]
        for name, vector in named.items():
            if vector.shape[-1] != size_hidden:
                raise ValueError(f"vector {name!r} has size {vector.shape[-1]}; the residual "
                                 f"stream has {size_hidden}")
        sweep.output_kind = run.output_kind
        seen.setdefault("reference", run)
        measured = metric_values(chosen, run.logits, 1)
        return Refs(item.corrupted, chosen, float(measured[0]), None,
                    reads_last_position_only(chosen, run.logits), run, measured.dtype)

    can_keep = can_keep_last(model, kwargs)

    def per_row(length: int, kept: int, probe: Refs) -> int:
        base = hidden(probe.runs.outputs[blocks[0].key])
        return row_bytes(model, length, kept, base.shape[-1], probe.runs.logits.shape[-1],
                         base.dtype)

    def groups(length: int) -> list[JobGroup]:
        if not isinstance(positions, str) and \
                any(position_in(label, length) is None for label in position_list):
            return []  # (a prompt without one of the positions: NaN, as when patching)
        out = []
        for l, (layer, block) in enumerate(zip(layer_list, blocks)):

            def skips(rows, padded, block=block, layer=layer):
                first = padded[0][0]
                state = hidden(first.runs.outputs[block.key])
                # (on the model's device: a vector made on the CPU steers a GPU model)
                mask = torch.zeros(length, 1, dtype=state.dtype, device=state.device)
                mask[[p for label in position_list
                      if (p := position_in(label, length)) is not None]] = 1
                deltas = {name: (v[layer] if v.dim() == 2 else v).to(state.device,
                                                                     state.dtype) * mask
                          for name, v in named.items()}
                steered = torch.stack([hidden(r.runs.outputs[block.key])[0]
                                       + scale * deltas[name] for r, (name, scale) in padded])
                if all(r is first for r, _ in padded):
                    return [(block, with_hidden(first.runs.outputs[block.key], steered, rows))]
                return [(block, stacked([r.runs.outputs[block.key] for r, _ in padded],
                                        steered))]

            cells = [(name, scale) for name in names for scale in scale_list]
            indices = [(v, l, s) for v in range(len(names)) for s in range(len(scale_list))]
            out.append(JobGroup(f"layer {layer}", cells, indices, skips))
        return out

    experiment = Experiment("steering sweep", items,
                            (len(names), len(layer_list), len(scale_list)), refs, groups,
                            per_row, can_keep,
                            [layer_list, scale_list, position_list, kwargs_key(kwargs),
                             value_key(named), [b.path for b in layout.blocks]])
    job = run_job(experiment, sweep, batch_size, memory_budget, choose_batch_size, progress,
                  checkpoint, distributed)
    info = job_info(job, len(items), 1, sweep, seen, kwargs, start)
    coords = {"vector": names, "layer": layer_list, "scale": scale_list}
    if not dataset:
        return PatchingResult(
            job.scores[0], ("vector", "layer", "scale"), coords,
            baseline=float(job.baselines[0]), tokens=token_labels(model, items[0].corrupted),
            method="steering sweep", info=info)
    return dataset_result(job, ("vector", "layer", "scale"), coords, "steering sweep", info,
                          has_reference=False)


def _named_vectors(vectors: Any, n_layers: int) -> dict[str, torch.Tensor]:
    if isinstance(vectors, dict):
        named = {str(k): torch.as_tensor(v) for k, v in vectors.items()}
    elif isinstance(vectors, torch.Tensor) and vectors.dim() == 1:
        named = {"vector": vectors}
    elif isinstance(vectors, torch.Tensor) and vectors.dim() == 2:
        named = {str(i): v for i, v in enumerate(vectors)}
    elif isinstance(vectors, (list, tuple)):
        named = {str(i): torch.as_tensor(v) for i, v in enumerate(vectors)}
    else:
        raise TypeError(f"vectors must be a tensor, a list or a dict of tensors, not "
                        f"{type(vectors).__name__}")
    if not named:
        raise ValueError("no steering vectors given")
    for name, vector in named.items():
        if vector.dim() == 2 and vector.shape[0] != n_layers:
            raise ValueError(f"vector {name!r} has shape {tuple(vector.shape)}: a per-layer "
                             f"vector needs one row per layer ({n_layers})")
        if vector.dim() not in (1, 2):
            raise ValueError(f"vector {name!r} has shape {tuple(vector.shape)}")
    return {name: v.detach() for name, v in named.items()}


# --- attribution patching ------------------------------------------------------------------
def block_envoys(model: Envoy, blocks: Any = None) -> list[Envoy]:
    """The model's stack of blocks: its one outermost ``ModuleList`` of blocks, or
    ``blocks`` (a path or an envoy) where it has several (see
    :func:`~fxsight.experiments.sweeps.find_layout`)."""
    return find_layout(model, blocks).blocks


def attribution(model: Envoy, clean: Any, corrupted: Any = None,
                metric: Callable[[Any], Any] | Sequence[Callable] | None = None,
                sites: Sequence[Envoy] | Sequence[str] | None = None,
                blocks: Any = None, **trace_kwargs) -> PatchingResult:
    """Attribution patching of each site's output at every position, in one trace.

    ``metric`` receives the corrupted run's logits (as a traced value; the model's output
    when it is a tensor, else its ``.logits``) and returns a scalar to differentiate, as in
    :func:`activation_patching`: ``lambda logits: logits[:, -1, a] - logits[:, -1, b]``.

    ``sites``: site kinds (``["resid", "attn", "mlp"]``: scores with ``dims ==
    ("site", "layer", "position")``, comparable cell by cell with
    :func:`activation_patching`), or modules (envoys; scores with ``dims == ("site",
    "position")`` and module paths as sites). By default, the blocks' outputs (the residual
    stream), as modules. Module outputs must be tensors or tuples whose first item is the
    hidden state.

    **Datasets** as in :func:`activation_patching` (one trace per pair): ``values`` is the
    mean over pairs, ``per_pair`` each pair's scores; pairs of different lengths are aligned
    at their ends (positions ``-longest .. -1``, NaN where a pair is shorter).

    >>> from fxsight.experiments import demo
    >>> lm = demo.load()
    >>> vocab = lm.tokenizer.get_vocab()
    >>> result = attribution(lm, demo.CLEAN, demo.CORRUPTED,
    ...                      lambda logits: logits[:, -1, vocab["1"]] - logits[:, -1, vocab["7"]],
    ...                      sites=["resid"])
    >>> result.method, tuple(result.values.shape)
    ('attribution patching', (1, 2, 7))
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attribution differentiates the metric: it cannot run under "
                           "torch.inference_mode() (no tensor made there records gradients); "
                           "call it outside, or under torch.no_grad() (it enables them)")
    check_reproducible(model, "attribution patching")
    if is_dataset(clean):
        return _attribution_dataset(model, clean, corrupted, metric, sites, blocks,
                                    trace_kwargs)
    # both prompts in one trace: a LanguageModel would pad prompts of different lengths to
    # one, and the positions would no longer correspond
    ids = _pair_ids(model, clean, corrupted)
    kinds = None
    if isinstance(sites, str):
        sites = [sites]  # one site kind, as in activation_patching
    if sites is not None and any(isinstance(s, str) for s in sites):
        if not all(isinstance(s, str) for s in sites):
            raise TypeError(f"sites must be site kinds (strings) or modules (envoys), not "
                            f"both: {list(sites)!r}")
        kinds = check_kinds(sites)
        layout = find_layout(model, blocks)
        targets = [_attribution_target(layout, kind, layer) for kind in kinds
                   for layer in range(layout.n_layers)]
    else:
        targets = [Target(site) for site in
                   (list(sites) if sites is not None else block_envoys(model, blocks))]
    with torch.enable_grad(), model.trace(**trace_kwargs) as tracer:
        with tracer.invoke(clean):
            clean_acts = [_hidden(t.read()).detach().save() for t in targets]
        with tracer.invoke(corrupted):
            differentiated = [_differentiable(t) for t in targets]
            corrupt_acts = [_hidden(t.read()).detach().save() for t in targets]
            grads = [_hidden(t.read()).grad.save() for t in targets]
            measured = metric(_logits(model.output))
            score = measured.sum()
            baseline = [score.detach().save()]
            shape = tuple(measured.shape)  # one row: one number (checked below)
            # only the sites' gradients: none for the parameters (nothing left in .grad)
            score.backward(inputs=differentiated)
    if math.prod(shape) != 1:
        raise ValueError(f"the metric must give one number per row of the logits (one for "
                         f"the corrupted prompt's row); it gave shape {shape}, which "
                         f"attribution would have summed")
    values = torch.stack([((c - k) * g).sum(-1).sum(0) for c, k, g
                          in zip(clean_acts, corrupt_acts, grads)]).detach()
    positions = list(range(values.shape[1]))
    baseline_value = float(baseline[0]) if isinstance(baseline[0], torch.Tensor) else None
    tokens = None if ids is None else token_labels(model, ids[0])
    if kinds is not None:
        n_layers = len(targets) // len(kinds)
        values = values.reshape(len(kinds), n_layers, -1)
        return PatchingResult(values, ("site", "layer", "position"),
                              {"site": kinds, "layer": list(range(n_layers)),
                               "position": positions},
                              baseline=baseline_value, tokens=tokens,
                              method="attribution patching")
    return PatchingResult(values, ("site", "position"),
                          {"site": [t.envoy.path for t in targets], "position": positions},
                          baseline=baseline_value, tokens=tokens,
                          method="attribution patching")


def _pair_ids(model: Envoy, clean: Any, corrupted: Any
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The token ids of a pair of prompts (strings, id lists, tensors), checked to be of
    one length; ``None`` for other input forms (given to the trace as they are)."""
    try:
        ids = token_ids(model, clean, "clean"), token_ids(model, corrupted, "corrupted")
    except (TypeError, ValueError, RuntimeError):
        return None
    check_same_length(model, *ids)
    return ids


def _attribution_dataset(model, clean, corrupted, metric, sites, blocks, trace_kwargs):
    """Attribution over a dataset of pairs: one trace per pair (no batching), the mean,
    standard error and each pair's scores as in :func:`activation_patching`. Pairs of
    different lengths are aligned at their ends: positions ``-longest .. -1``, NaN where a
    pair is shorter, the mean over the pairs that have the position."""
    items, _ = pairs_of(model, clean, corrupted, metric)
    results = [attribution(model, item.clean, item.corrupted, item.metric, sites, blocks,
                           **trace_kwargs) for item in items]
    first = results[0]
    lengths = [item.length for item in items]
    coords, info = first.coords, {"pairs": len(items)}
    if len(set(lengths)) == 1:
        per_pair = torch.stack([r.values for r in results])
        mean = per_pair.mean(0)
    else:
        longest = max(lengths)
        per_pair = torch.full((len(results), *first.values.shape[:-1], longest), float("nan"),
                              dtype=first.values.dtype)
        for i, (r, length) in enumerate(zip(results, lengths)):
            per_pair[i, ..., longest - length:] = r.values
        mean = summary(per_pair)[0].to(per_pair.dtype)
        coords = {**coords, "position": list(range(-longest, 0))}
        counted: dict[int, int] = {}
        for length in lengths:
            counted[length] = counted.get(length, 0) + 1
        info.update(lengths=dict(sorted(counted.items())), different_lengths=(
            "aligned at their ends: positions are counted from the end; a pair without a "
            "position has NaN there and the mean is over the pairs that have it "
            "(result.counts)"))
    baselines = None if first.baseline is None else \
        torch.tensor([r.baseline for r in results], dtype=score_dtype(per_pair.dtype))
    return PatchingResult(mean, first.dims, coords,
                          baseline=None if baselines is None else float(baselines.mean()),
                          method=first.method, info=info,
                          per_pair=per_pair, baselines=baselines)


@torch.compiler.disable
def _requiring_grad(value: torch.Tensor) -> torch.Tensor:
    """``value`` if it requires grad, else a leaf of its values that does (a frozen
    model's activations require none)."""
    return value if value.requires_grad else value.detach().requires_grad_()


def _differentiable(target: Target) -> Any:
    """Inside a trace: the target's hidden state written back as a tensor that requires
    grad (the value itself where it does), so that gradients reach it on a frozen model
    too; returns the written hidden state, what ``backward(inputs=...)`` differentiates."""
    value = target.read()
    whole = _hidden(value) is value  # (a tensor, not a tuple whose item 0 it is)
    hidden = apply_pure(_requiring_grad, _hidden(value))
    written = hidden if whole else (hidden, *value[1:])
    if target.accessor == "input":
        target.envoy.input = written
    else:
        target.envoy.output = written
    return hidden


def _attribution_target(layout, kind: str, layer: int) -> Target:
    if kind == "resid_pre":
        return Target(layout.blocks[layer], "input")
    return Target(layout.site(kind, layer))


def _logits(output):
    """The logits of a traced model output: the output itself if it is a tensor."""
    try:
        output.shape
        return output
    except TraceError:
        return output.logits


def _hidden(value):
    """The hidden state of a block's output (item 0 of a tuple output)."""
    try:
        value.shape
        return value
    except TraceError:
        return value[0]


