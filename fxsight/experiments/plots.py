"""Figures: matplotlib set-up shared by the plots, and attention patterns (heads × query ×
key) read through ``.source``."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def new_figure(rows: int, columns: int, size: tuple[float, float], path: str | None,
               **subplots: Any) -> tuple[Any, Any]:
    """A figure and its ``rows × columns`` axes (a 2-D array): on the Agg backend when the
    figure is to be saved to ``path`` (no display needed), else through pyplot."""
    if path is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        figure = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(figure)
        return figure, figure.subplots(rows, columns, squeeze=False, **subplots)
    import matplotlib.pyplot as plt
    return plt.subplots(rows, columns, squeeze=False, figsize=size, layout="constrained",
                        **subplots)


def plot_attention(pattern: torch.Tensor, tokens: Sequence[str] | None = None,
                   heads: Sequence[int] | None = None, row: int = 0,
                   path: str | None = None, title: str | None = None,
                   cmap: str = "viridis", columns: int = 4):
    """Attention patterns as heatmaps, one panel per head (query positions down, key
    positions across); saved to ``path`` when given. Returns the figure.

    ``pattern``: ``(heads, query, key)``, or ``(batch, heads, query, key)`` (then ``row``
    picks the example), e.g. the probabilities read through ``.source``:

    >>> import torch
    >>> from fxsight.experiments.plots import plot_attention
    >>> probs = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
    >>> figure = plot_attention(probs, tokens=["a", "b", "c"], path="/dev/null")
    >>> len(figure.axes)  # two heads and the colour bar
    3
    """
    values = pattern.detach().float().cpu()
    if values.dim() == 4:
        values = values[row]
    if values.dim() != 3:
        raise ValueError(f"an attention pattern is (heads, query, key) or (batch, heads, "
                         f"query, key), got shape {tuple(pattern.shape)}")
    chosen = list(range(values.shape[0])) if heads is None else list(heads)
    for head in chosen:
        if not -values.shape[0] <= head < values.shape[0]:
            raise IndexError(f"head {head} out of range: the pattern has "
                             f"{values.shape[0]} heads")
    if tokens is not None and len(tokens) != values.shape[-1]:
        raise ValueError(f"{len(tokens)} tokens for {values.shape[-1]} key positions")
    columns = max(1, min(columns, len(chosen)))
    rows = -(-len(chosen) // columns)
    side = 1.0 + 0.35 * values.shape[-1]
    figure, axes = new_figure(rows, columns, (columns * side + 1.2, rows * side + 0.6), path)
    image = None
    labels = [str(t) for t in tokens] if tokens is not None else None
    for index, ax in enumerate(axes.flat):
        if index >= len(chosen):
            ax.set_axis_off()
            continue
        head = chosen[index]
        image = ax.imshow(values[head].numpy(), cmap=cmap, vmin=0.0,
                          vmax=float(values.max()) or 1.0, interpolation="nearest")
        ax.set_title(f"head {head % values.shape[0]}", fontsize=10)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=90)
            ax.set_yticks(range(values.shape[-2]), labels[-values.shape[-2]:])
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    figure.colorbar(image, ax=[a for a in axes.flat], label="attention", shrink=0.8)
    figure.suptitle(title or "attention patterns")
    if path is not None:
        figure.savefig(path, dpi=110, bbox_inches="tight")
    return figure
