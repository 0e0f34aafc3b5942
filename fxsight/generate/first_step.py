"""Decoding step 0 of a ``generate`` on the hooks backend, checked before it runs: the
nodes that run at it on its own values (walked on the shapes of a scan of the first
step's forward pass, as the fx backend's splice of step 0 walks them), and how many rows
``generate`` runs each prompt row as (beams, sequences)."""

from __future__ import annotations

from typing import Any

import torch

from ..record.program import Kind, Node
from ..record.sites import is_operation
from .interleave import needs_generated_ids


def first_step_nodes(program: Any) -> list[Node]:
    """The nodes that run at decoding step 0 (recorded outside ``tracer.iter``, or for
    steps that include 0) on values of that step only: none that uses the generated ids,
    an operation's site (``.source``) or a value of another step."""
    after = needs_generated_ids(program)
    walked: set[Node] = set()
    for node in program.nodes:
        if node.kind is Kind.INPUT:  # (the values the user brought in)
            walked.add(node)
            continue
        if node in after or (node.steps is not None and 0 not in node.steps) or \
                (node.site is not None and is_operation(node.site.path)):
            continue
        if all(n in walked for n in node.all_input_nodes):
            walked.add(node)
    nodes = [node for node in program.nodes if node in walked]
    return nodes if any(node.kind is not Kind.INPUT for node in nodes) else []


def row_repeats(module: torch.nn.Module, generate_kwargs: dict) -> int:
    """How many consecutive rows ``generate`` runs each prompt row as: transformers
    expands the inputs by ``max(num_beams, num_return_sequences)`` (its keywords, else
    the generation config's)."""
    configs = (generate_kwargs, generate_kwargs.get("generation_config"),
               getattr(module, "generation_config", None))
    counts = [next((value for value in (
        config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        for config in configs) if value is not None), 1)
        for name in ("num_beams", "num_return_sequences")]
    return max(1, *counts)


def repeated_rows(kwargs: dict, repeats: int, total: int) -> dict:
    """``kwargs`` with each batched tensor's rows repeated ``repeats`` times, one after
    another (``repeat_interleave``), as ``generate`` expands its inputs."""
    return {name: value.repeat_interleave(repeats, dim=0)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and
            value.shape[0] == total else value for name, value in kwargs.items()}
