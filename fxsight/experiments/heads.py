"""Per-head activation patching: each attention head's contribution, at each position.

A head's contribution to the residual stream is its slice of the input of the attention's
output projection (``c_proj`` in GPT-2, ``o_proj`` in Llama): patching that slice with the
clean run's is patching the head. Cells run in batches like every sweep (the block before
the patched layer is skipped with the corrupted run's output: prefix reuse).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..api.envoy import Envoy
from .result import PatchingResult
from .sweeps import (DEFAULT_MEMORY_BUDGET, Group, Layout, Sweep, Target, check_layers,
                     check_positions, choose_batch_size, expanded, find_layout, forward_kwargs,
                     logits_kwargs, metric_values, reference_run, row_bytes, token_ids,
                     token_labels, trace_options)

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


def head_patching(model: Envoy, clean: Any, corrupted: Any, metric: Callable,
                  positions: Any = "all", layers: Iterable[int] | None = None,
                  batch_size: int | None = None,
                  memory_budget: int | float = DEFAULT_MEMORY_BUDGET,
                  progress: bool = True, backend: str | None = None, compile: Any = None,
                  **forward_kwargs_given: Any):
    """Patch each attention head's clean output into the corrupted run, at each position.

    Arguments as in :func:`fxsight.patching.activation_patching`. Returns scores with
    ``dims == ("layer", "head", "position")``: the patched run's metric minus the corrupted
    run's."""
    clean_ids = token_ids(model, clean, "clean")
    corrupt_ids = token_ids(model, corrupted, "corrupted")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"the clean and corrupted prompts must have the same number of "
                         f"tokens: {clean_ids.shape[1]} and {corrupt_ids.shape[1]}")
    layout = find_layout(model)
    layer_list = check_layers(layers, layout.n_layers)
    length = clean_ids.shape[1]
    position_list = check_positions(positions, length)
    heads = head_count(model)
    kwargs = forward_kwargs(model, forward_kwargs_given)
    options = trace_options(backend, compile)
    reference_options = options if backend is not None else {**options, "backend": "hooks"}

    targets = {layer: Target(output_projection(layout, layer), "input") for layer in layer_list}
    prefixes = {layer: [Target(layout.blocks[layer - 1])] if layer > 0 else []
                for layer in layer_list}
    clean_run = reference_run(model, clean_ids, targets.values(), kwargs, reference_options)
    corrupt_run = reference_run(model, corrupt_ids,
                                [t for layer in layer_list for t in (*prefixes[layer],
                                                                     targets[layer])],
                                kwargs, reference_options)
    reference = float(metric_values(metric, clean_run.logits, 1)[0])
    baseline = float(metric_values(metric, corrupt_run.logits, 1)[0])
    width = clean_run.outputs[targets[layer_list[0]].key].shape[-1]
    if width % heads:
        raise ValueError(f"the output projection's input width {width} is not a multiple of "
                         f"{heads} heads")
    head_dim = width // heads

    run_kwargs, kept = logits_kwargs(model, kwargs, metric, clean_run.logits)
    cells = [(h, p) for h in range(heads) for p in range(len(position_list))]
    per_row = row_bytes(model, length, kept, width, clean_run.logits.shape[-1],
                        clean_run.logits.dtype)
    size = choose_batch_size(batch_size, memory_budget, per_row, len(cells))

    def patches(layer: int):
        target = targets[layer]
        clean_in = clean_run.outputs[target.key]
        corrupt_in = corrupt_run.outputs[target.key]

        def replacements(rows: int, chosen: list[tuple[int, int]]):
            patched = corrupt_in.expand(rows, *corrupt_in.shape[1:]).clone()
            row = torch.arange(rows)
            position = torch.tensor([position_list[p] for _, p in chosen])
            columns = torch.tensor([h * head_dim for h, _ in chosen])[:, None] + \
                torch.arange(head_dim)
            patched[row[:, None], position[:, None], columns] = \
                clean_in[0, position[:, None], columns]
            pairs = [(t, expanded(corrupt_run.outputs[t.key], rows)) for t in prefixes[layer]]
            pairs.append((target, patched))
            return pairs

        return replacements

    groups = [Group(f"heads {layer}", list(cells), [(i, h, p) for h, p in cells],
                    patches(layer)) for i, layer in enumerate(layer_list)]
    sweep = Sweep(model, corrupt_ids, metric, run_kwargs, options, corrupt_run.output_kind,
                  size, progress, "head patching")
    values = torch.zeros(len(layer_list), heads, len(position_list))
    sweep.run(groups, values)
    values -= baseline
    return PatchingResult(
        values, ("layer", "head", "position"),
        {"layer": layer_list, "head": list(range(heads)), "position": position_list},
        baseline=baseline, reference=reference, tokens=token_labels(model, clean_ids),
        method="head patching",
        info=dict(batch_size=size, traces=sweep.traces + 2, cells=values.numel()))
