"""Per-head activation patching: each attention head's contribution, at each position.

A head's contribution to the residual stream is its slice of the input of the attention's
output projection (``c_proj`` in GPT-2, ``o_proj`` in Llama): patching that slice with the
clean run's is patching the head. Cells run in batches like every sweep (the block before
the patched layer is skipped with the corrupted run's output: prefix reuse), on the suffix
path where it applies (one pair, a causal decoder with a key-value cache, a metric of the
last position: each cell runs from its position on, see :mod:`fxsight.experiments.suffix`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

import torch

from ..api.envoy import Envoy
from . import suffix as suffix_path
from .jobs import (Experiment, Group, Refs, dataset_result, job_info, kwargs_key, pairs_of,
                   position_in, position_labels, run_job)
from .modes import check_reproducible
from .result import PatchingResult
from .sweeps import (DEFAULT_MEMORY_BUDGET, Layout, Sweep, Target, check_layers,
                     choose_batch_size, expanded, find_layout, forward_kwargs,
                     can_keep_last, row_bytes, stacked, token_labels, trace_options)

OUTPUT_PROJECTION_NAMES = ("c_proj", "o_proj", "out_proj", "dense")


def output_projection(layout: Layout, layer: int) -> Envoy:
    """The attention output projection of ``layer``, whose input holds the heads' outputs."""
    attention = layout.site("attn", layer)
    children = dict(attention._module.named_children())
    for name in OUTPUT_PROJECTION_NAMES:
        if name in children:
            return getattr(attention, name)
    raise ValueError(f"{attention.path} ({type(attention._module).__name__}) has no output "
                     f"projection (looked for {', '.join(OUTPUT_PROJECTION_NAMES)}; it has "
                     f"{', '.join(children)})")


def head_count(model: Envoy) -> int:
    config = getattr(model._module, "config", None)
    for name in ("num_attention_heads", "n_head", "num_heads"):
        count = getattr(config, name, None)
        if isinstance(count, int):
            return count
    raise ValueError("the model's config does not say how many attention heads it has")


def head_patching(model: Envoy, clean: Any, corrupted: Any = None,
                  metric: Callable | Sequence[Callable] | None = None,
                  positions: Any = "all", layers: Iterable[int] | None = None,
                  batch_size: int | None = None,
                  memory_budget: int | float = DEFAULT_MEMORY_BUDGET,
                  progress: bool = True, backend: str | None = None, compile: Any = None,
                  checkpoint: Any = None, distributed: bool | None = None,
                  suffix: bool | None = None, blocks: Any = None,
                  **forward_kwargs_given: Any):
    """Patch each attention head's clean output into the corrupted run, at each position.

    Arguments as in :func:`fxsight.patching.activation_patching` (datasets of pairs,
    ``checkpoint``, ``distributed``, ``suffix`` and ``blocks`` included). Returns scores with
    ``dims == ("layer", "head", "position")``: the patched run's metric minus the corrupted
    run's."""
    start = time.perf_counter()
    check_reproducible(model, "head patching")
    items, dataset = pairs_of(model, clean, corrupted, metric)
    layout = find_layout(model, blocks)
    layer_list = check_layers(layers, layout.n_layers)
    labels = position_labels(positions, [item.length for item in items])
    heads = head_count(model)
    kwargs = forward_kwargs(model, forward_kwargs_given)
    options = trace_options(backend, compile)
    reference_options = options if backend is not None else {**options, "backend": "hooks"}

    targets = {layer: Target(output_projection(layout, layer), "input") for layer in layer_list}
    prefixes = {layer: [Target(layout.blocks[layer - 1])] if layer > 0 else []
                for layer in layer_list}
    corrupt_targets = [t for layer in layer_list for t in (*prefixes[layer], targets[layer])]
    coords = {"layer": layer_list, "head": list(range(heads)), "position": labels}
    settings = suffix_path.Settings(backend, checkpoint, distributed, kwargs, options,
                                    reference_options, batch_size, memory_budget, progress,
                                    start)
    fast, suffix_note = suffix_path.attempt(suffix, lambda: suffix_path.run_pair(
        model, items, dataset, *_suffix_cells(layout, layer_list, labels, heads, targets,
                                              prefixes),
        list(targets.values()), corrupt_targets, coords, "head patching", layout, settings))
    if fast is not None:
        return fast
    sweep = Sweep(model, None, None, kwargs, options, "attr", 1, progress, "head patching")
    seen: dict = {}

    def refs(item) -> Refs:
        clean_run, corrupt_run = sweep.reference_pair(
            item.clean, item.corrupted, targets.values(), corrupt_targets, reference_options)
        width = clean_run.outputs[targets[layer_list[0]].key].shape[-1]
        if width % heads:
            raise ValueError(f"the output projection's input width {width} is not a "
                             f"multiple of {heads} heads")
        seen.setdefault("reference", clean_run)
        return Refs.of_pair(item, clean_run, corrupt_run)

    can_keep = can_keep_last(model, kwargs)

    def per_row(length: int, kept: int, probe: Refs) -> int:
        clean_run = probe.runs[0]
        width = clean_run.outputs[targets[layer_list[0]].key].shape[-1]
        return row_bytes(model, length, kept, width, clean_run.logits.shape[-1],
                         clean_run.logits.dtype)

    def patches(layer: int):
        target = targets[layer]

        def replacements(rows: int, padded: list):
            first = padded[0][0]
            width = first.runs[0].outputs[target.key].shape[-1]
            head_dim = width // heads
            row = torch.arange(rows)
            position = torch.tensor([p for _, (_, p, _) in padded])
            columns = torch.tensor([h * head_dim for _, (h, _, _) in padded])[:, None] + \
                torch.arange(head_dim)
            if all(r is first for r, _ in padded):
                clean_in = first.runs[0].outputs[target.key]
                corrupt_in = first.runs[1].outputs[target.key]
                patched = corrupt_in.expand(rows, *corrupt_in.shape[1:]).clone()
                patched[row[:, None], position[:, None], columns] = \
                    clean_in[0, position[:, None], columns]
                pairs = [(t, expanded(first.runs[1].outputs[t.key], rows))
                         for t in prefixes[layer]]
            else:
                patched = torch.cat([r.runs[1].outputs[target.key] for r, _ in padded])
                clean_in = torch.cat([r.runs[0].outputs[target.key] for r, _ in padded])
                patched[row[:, None], position[:, None], columns] = \
                    clean_in[row[:, None], position[:, None], columns]
                pairs = [(t, stacked([r.runs[1].outputs[t.key] for r, _ in padded]))
                         for t in prefixes[layer]]
            pairs.append((target, patched))
            return pairs

        return replacements

    def groups(length: int) -> list:
        cells = [(h, p, j) for h in range(heads) for j, label in enumerate(labels)
                 if (p := position_in(label, length)) is not None]
        return [Group(f"heads {layer}", cells, [(i, h, j) for h, _, j in cells],
                      patches(layer)) for i, layer in enumerate(layer_list)]

    experiment = Experiment("head patching", items, (len(layer_list), heads, len(labels)),
                            refs, groups, per_row, can_keep,
                            [layer_list, labels, heads, kwargs_key(kwargs),
                             [t.key for t in targets.values()]])
    job = run_job(experiment, sweep, batch_size, memory_budget, choose_batch_size, progress,
                  checkpoint, distributed)
    info = job_info(job, len(items), 2, sweep, seen, kwargs, start)
    info["suffix"] = suffix_note
    if not dataset:
        return PatchingResult(
            job.scores[0], ("layer", "head", "position"), coords,
            baseline=float(job.baselines[0]), reference=float(job.references[0]),
            tokens=token_labels(model, items[0].clean), method="head patching", info=info)
    return dataset_result(job, ("layer", "head", "position"), coords, "head patching", info)


def _suffix_cells(layout: Layout, layer_list: list[int], labels: list[int], heads: int,
                  targets: dict, prefixes: dict) -> tuple[list[suffix_path.Cell], Callable]:
    """Head patching's cells on the suffix path (one per layer, see
    :func:`suffix.sweep_pair`) and their units: each head's columns at each position."""
    # the rest of a head's layer after its output projection: the projection and the MLP,
    # on the patched tokens only (their outputs elsewhere are the corrupted run's)
    cells = [("heads", layer, targets[layer], prefixes[layer],
              [Target(module) for module in (targets[layer].envoy,
                                             suffix_path.mlp_of(layout, layer))
               if module is not None])
             for layer in layer_list]
    key = targets[layer_list[0]].key

    def units(item: Any, clean_run: Any) -> list:
        width = clean_run.outputs[key].shape[-1]
        if width % heads:
            raise ValueError(f"the output projection's input width {width} is not a "
                             f"multiple of {heads} heads")
        size = width // heads
        return [(position_in(label, item.length), slice(h * size, (h + 1) * size))
                for h in range(heads) for label in labels]
    return cells, units
