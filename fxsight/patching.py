"""Patching experiments built on traces: attribution patching (gradient approximation).

``attribution(model, clean, corrupted, metric)`` estimates, in one forward and one backward
pass, the effect on ``metric`` of patching each layer's clean activation into the corrupted
run at each position: ``(clean - corrupted) · d metric / d activation``, summed over the
hidden dimension (Nanda's attribution patching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .envoy import Envoy


@dataclass
class PatchingResult:
    """Scores of a patching experiment: ``values[i, p]`` for site ``sites[i]`` at token
    position ``p``."""

    values: torch.Tensor
    sites: list[str]
    positions: list[int]

    def to_dataframe(self):
        """The scores as a pandas DataFrame (rows: sites, columns: positions)."""
        import pandas as pd
        return pd.DataFrame(self.values.numpy(), index=self.sites, columns=self.positions)

    def top(self) -> tuple[str, int]:
        """The site and position with the largest absolute score."""
        index = int(self.values.abs().argmax())
        row, column = divmod(index, self.values.shape[1])
        return self.sites[row], self.positions[column]

    def plot(self, path: str | None = None, title: str = "patching"):
        """A site × position heatmap (matplotlib); saved to ``path`` when given."""
        import matplotlib
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(figsize=(1 + 0.5 * len(self.positions),
                                             1 + 0.4 * len(self.sites)))
        limit = float(self.values.abs().max()) or 1.0
        image = axes.imshow(self.values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit,
                            aspect="auto")
        axes.set_xticks(range(len(self.positions)), self.positions)
        axes.set_yticks(range(len(self.sites)), self.sites)
        axes.set_xlabel("position")
        axes.set_title(title)
        figure.colorbar(image)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path)
            plt.close(figure)
        return figure


def block_envoys(model: Envoy) -> list[Envoy]:
    """The model's main stack of blocks: the longest ModuleList in it."""
    best: tuple[int, str] | None = None
    for path, module in model._module.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > best[0]):
            best = (len(module), path)
    if best is None:
        raise ValueError("the model has no ModuleList of blocks; pass sites= explicitly")
    envoy = model
    for part in best[1].split("."):
        envoy = getattr(envoy, part)
    return list(envoy)


def attribution(model: Envoy, clean: Any, corrupted: Any,
                metric: Callable[[Any], Any], sites: Sequence[Envoy] | None = None,
                **trace_kwargs) -> PatchingResult:
    """Attribution patching of each site's output at every position, in one trace.

    ``metric`` receives the corrupted run's model output (as a traced value) and returns a
    scalar to differentiate, e.g. ``lambda out: out.logits[0, -1, a] - out.logits[0, -1, b]``.
    Sites default to the model's blocks (the residual stream after each block); their
    outputs must be tensors or tuples whose first item is the hidden state.
    """
    sites = list(sites) if sites is not None else block_envoys(model)
    with torch.enable_grad(), model.trace(**trace_kwargs) as tracer:
        with tracer.invoke(clean):
            clean_acts = [_hidden(site.output).detach().save() for site in sites]
        with tracer.invoke(corrupted):
            corrupt_acts = [_hidden(site.output).detach().save() for site in sites]
            grads = [_hidden(site.output).grad.save() for site in sites]
            metric(model.output).sum().backward()
    values = torch.stack([((c - k) * g).sum(-1).sum(0) for c, k, g
                          in zip(clean_acts, corrupt_acts, grads)]).detach()
    names = [site.path for site in sites]
    return PatchingResult(values, names, list(range(values.shape[1])))


def _hidden(value):
    """The hidden state of a block's output (item 0 of a tuple output)."""
    from .errors import TraceError
    try:
        value.shape
        return value
    except TraceError:
        return value[0]
