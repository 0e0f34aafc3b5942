"""The suffix path's head on the vocabulary entries a metric reads: which entries a metric
reads at the last position (found by tracing it with ``torch.fx``, checked on real
logits), and the head applied to those rows of its weight only."""

from __future__ import annotations

import operator
from typing import Callable

import torch


# --- the metric on the vocabulary entries it reads -----------------------------------------
def vocabulary_reads(metric: Callable, logits: torch.Tensor) -> tuple[list[int], Callable] | None:
    """The vocabulary entries ``metric`` reads at the last position and the metric on
    logits of those entries only (shape (rows, 1, k)), when ``torch.fx`` can trace it into
    indexing of the logits by constants; checked on ``logits`` (``None`` otherwise)."""
    try:
        import torch.fx as fx

        traced = fx.symbolic_trace(metric)
    except Exception:  # noqa: BLE001 - not traceable: every entry is computed
        return None
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    columns: list[int] = []
    uses = list(placeholders[0].users)
    for use in uses:
        if use.op != "call_function" or use.target is not operator.getitem or \
                use.args[0] is not placeholders[0] or not isinstance(use.args[1], tuple):
            return None
        index = use.args[1]
        if len(index) != 3 or index[0] != slice(None) or index[1] not in (-1,) or \
                not isinstance(index[2], int) or isinstance(index[2], bool):
            return None
        if index[2] not in columns:
            columns.append(index[2])
    if not columns:
        return None
    for use in uses:
        _, _, column = use.args[1]
        use.args = (use.args[0], (slice(None), -1, columns.index(column)))
    traced.recompile()
    vocab = logits.shape[-1]
    if any(not -vocab <= c < vocab for c in columns):
        return None
    try:
        full = torch.as_tensor(metric(logits))
        small = torch.as_tensor(traced(logits[:, -1:, columns]))
    except Exception:  # noqa: BLE001
        return None
    if full.shape != small.shape or not torch.equal(full, small):
        return None
    return [c % vocab for c in columns], traced


def head_logits(head: torch.nn.Module, inputs: torch.Tensor,
                columns: list[int] | None) -> torch.Tensor:
    """The head on ``inputs`` (rows, d) as logits (rows, 1, vocab or k)."""
    if columns is not None and isinstance(head, torch.nn.Linear):
        index = torch.tensor(columns)
        bias = head.bias[index] if head.bias is not None else None
        return torch.nn.functional.linear(inputs, head.weight[index], bias)[:, None]
    return head(inputs)[:, None]
