"""The result of a patching experiment: scores with named axes, and their plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .plots import new_figure


class Cell(tuple):
    """One cell of a result: a tuple of its coordinates (``("attn", 1, 8)``) with the
    axes as attributes (``cell.site``, ``cell.layer``, ``cell.position``) and its score
    (``cell.value``)."""

    def __new__(cls, coords: dict[str, Any], value: float):
        cell = super().__new__(cls, coords.values())
        cell.coords = dict(coords)
        cell.value = value
        return cell

    def __getnewargs__(self) -> tuple[dict[str, Any], float]:
        # (copy and pickle build a tuple subclass from these: a Cell needs its coordinates
        # by name and its value, not the bare tuple)
        return self.coords, self.value

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["coords"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.coords.items())
        return f"Cell({inner}, value={self.value:.4g})"


@dataclass(eq=False)
class PatchingResult:
    """Scores with named axes: ``values`` has one dimension per name in ``dims``, and
    ``coords[dim]`` labels its entries.

    Activation patching: ``dims == ("site", "layer", "position")``,
    ``values[i, l, p]`` the effect of patching site kind ``sites[i]`` of layer
    ``layers[l]`` at token position ``positions[p]``. Steering:
    ``("vector", "layer", "scale")``. Attribution over explicit modules:
    ``("site", "position")`` with module paths as sites.
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    coords: dict[str, list]
    baseline: float | None = None  # metric of the unpatched (corrupted / unsteered) run
    reference: float | None = None  # metric of the clean run (activation patching)
    tokens: list[str] | None = None  # the prompt's tokens, labels of the position axis
    method: str = "activation patching"
    info: dict = field(default_factory=dict)  # batch size, traces, backend, timing
    # a dataset of pairs: each pair's scores (axis 0: the pair, then ``dims``), NaN where
    # a pair has no such cell (a position its length lacks); ``values`` is their mean
    per_pair: torch.Tensor | None = None
    baselines: torch.Tensor | None = None  # each pair's unpatched metric
    references: torch.Tensor | None = None  # each pair's clean metric

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        if self.values.dim() != len(self.dims):
            raise ValueError(f"values have {self.values.dim()} dimensions, dims name "
                             f"{len(self.dims)}: {self.dims}")
        for dim, size in zip(self.dims, self.values.shape):
            if len(self.coords.get(dim, ())) != size:
                raise ValueError(f"axis {dim!r} has {size} entries but "
                                 f"{len(self.coords.get(dim, ()))} labels")

    # --- axes ------------------------------------------------------------------------------
    @property
    def sites(self) -> list:
        return list(self.coords.get("site", []))

    @property
    def layers(self) -> list:
        return list(self.coords.get("layer", []))

    @property
    def positions(self) -> list:
        return list(self.coords.get("position", []))

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    # --- datasets ------------------------------------------------------------------------------
    @property
    def n_pairs(self) -> int:
        """The number of pairs (prompts for steering) the scores are the mean of."""
        return 1 if self.per_pair is None else self.per_pair.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """How many pairs each cell's mean is over (fewer than ``n_pairs`` where pairs of
        other lengths lack a position)."""
        if self.per_pair is None:
            return torch.ones(self.values.shape, dtype=torch.long)
        return (~self.per_pair.isnan()).sum(0)

    @property
    def stderr(self) -> torch.Tensor:
        """The standard error of each cell's mean over pairs (sample standard deviation
        over the square root of the count); NaN where fewer than two pairs have the cell
        (and for a one-pair result)."""
        if self.per_pair is None:
            return torch.full(self.values.shape, float("nan"), dtype=self.values.dtype)
        present = ~self.per_pair.isnan()
        counts = present.sum(0)
        deviation = torch.where(present, self.per_pair - self.values, 0.0)
        variance = (deviation ** 2).sum(0) / (counts - 1).clamp(min=1)
        stderr = (variance / counts.clamp(min=1)).sqrt()
        return torch.where(counts > 1, stderr, torch.tensor(float("nan")))

    def pair(self, index: int) -> "PatchingResult":
        """The scores of one pair of a dataset, as a one-pair result."""
        if self.per_pair is None:
            raise ValueError(f"this {self.method} result is of one pair, not a dataset")
        return PatchingResult(
            self.per_pair[index], self.dims, dict(self.coords),
            None if self.baselines is None else float(self.baselines[index]),
            None if self.references is None else float(self.references[index]),
            None, self.method, {**self.info, "pair": index})

    def normalized(self) -> "PatchingResult":
        """Scores divided by ``reference - baseline`` (clean minus corrupted metric): the
        fraction of the clean behaviour a patch restores."""
        if self.reference is None or self.baseline is None:
            raise ValueError(f"{self.method} has no clean reference to normalize by")
        span = self.reference - self.baseline
        if span == 0:
            raise ValueError("the clean and corrupted runs give the same metric: nothing "
                             "to normalize by")
        # a dataset: every pair's scores by the mean span too (the mean stays the mean)
        return self._with(self.values / span, per_pair=None if self.per_pair is None
                          else self.per_pair / span)

    def sel(self, **selection: Any) -> "PatchingResult":
        """The scores at some coordinates: ``result.sel(site="resid")`` drops the site axis,
        ``result.sel(layer=[0, 1])`` keeps it with two entries."""
        values, dims, coords = self.values, list(self.dims), dict(self.coords)
        per_pair = self.per_pair
        for dim, wanted in selection.items():
            if dim not in dims:
                raise KeyError(f"no axis {dim!r}; the axes are {', '.join(dims)}")
            axis = dims.index(dim)
            labels = coords[dim]
            many = isinstance(wanted, (list, tuple, range))
            keys = list(wanted) if many else [wanted]
            missing = [k for k in keys if k not in labels]
            if missing:
                raise KeyError(f"{dim} {missing[0]!r} is not in this result ({labels})")
            index = torch.tensor([labels.index(k) for k in keys])
            values = values.index_select(axis, index)
            if per_pair is not None:
                per_pair = per_pair.index_select(axis + 1, index)
            if many:
                coords[dim] = keys
            else:
                values = values.squeeze(axis)
                if per_pair is not None:
                    per_pair = per_pair.squeeze(axis + 1)
                dims.pop(axis)
                del coords[dim]
        return self._with(values, tuple(dims), coords, per_pair=per_pair)

    def _with(self, values: torch.Tensor, dims: tuple | None = None,
              coords: dict | None = None, per_pair: Any = "same") -> "PatchingResult":
        return PatchingResult(values, dims if dims is not None else self.dims,
                              coords if coords is not None else dict(self.coords),
                              self.baseline, self.reference, self.tokens, self.method,
                              dict(self.info),
                              self.per_pair if isinstance(per_pair, str) else per_pair,
                              self.baselines, self.references)

    # --- summaries ---------------------------------------------------------------------------
    def top_k(self, k: int = 5, **selection: Any) -> list[Cell]:
        """The ``k`` cells with the largest absolute score (optionally among a selection:
        ``result.top_k(3, site="attn")``)."""
        result = self.sel(**selection) if selection else self
        flat = result.values.reshape(-1)
        # NaN marks a cell that does not exist (a position a pair's length lacks): never
        # a top cell (argsort would put it first)
        present = (~flat.isnan()).nonzero().flatten()
        order = present[flat[present].abs().argsort(descending=True, stable=True)][:k]
        cells = []
        for index in order.tolist():
            coords = {dim: v for dim, v in selection.items()
                      if not isinstance(v, (list, tuple, range))}
            rest = index
            position = {}
            for dim, size in reversed(list(zip(result.dims, result.values.shape))):
                rest, i = divmod(rest, size)
                position[dim] = result.coords[dim][i]
            ordered = {dim: coords.get(dim, position.get(dim)) for dim in self.dims
                       if dim in coords or dim in position}
            cells.append(Cell(ordered, float(flat[index])))
        return cells

    def top(self, **selection: Any) -> Cell:
        """The cell with the largest absolute score: ``("attn", 1, 8)`` for
        ``(site, layer, position)`` (a :class:`Cell`, with ``.value``)."""
        cells = self.top_k(1, **selection)
        if not cells:
            raise ValueError(f"this {self.method} result has no cell"
                             + (f" at {selection}" if selection else "")
                             + " (every score is NaN, or there are none)")
        return cells[0]

    def to_records(self) -> list[dict]:
        """One dict per cell: its coordinates, ``value`` and, where known, ``token``."""
        records = []
        for index in range(self.values.numel()):
            rest, record = index, {}
            for dim, size in reversed(list(zip(self.dims, self.values.shape))):
                rest, i = divmod(rest, size)
                record[dim] = self.coords[dim][i]
            record = {dim: record[dim] for dim in self.dims}
            if self.tokens is not None and "position" in record:
                record["token"] = self.tokens[record["position"]]
            record["value"] = float(self.values.reshape(-1)[index])
            records.append(record)
        return records

    def to_dataframe(self):
        """The scores as a long-format pandas DataFrame: one row per cell, one column per
        axis, ``token`` (where known) and ``value``."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "PatchingResult.to_dataframe() needs pandas, which is not installed "
                "(pip install pandas). Without it: result.values is a tensor with axes "
                f"{self.dims}, result.coords labels them, and result.to_records() gives one "
                "dict per cell.") from None
        return pd.DataFrame(self.to_records())

    def table(self, digits: int = 2, **selection: Any) -> str:
        """The scores as text: one table per entry of the first axis (for 3 axes), rows
        along the next-to-last axis and columns along the last."""
        result = self.sel(**selection) if selection else self
        if result.values.dim() == 3:
            first = result.dims[0]
            return "\n\n".join(f"{first} {label}:\n" + result.sel(**{first: label})
                               .table(digits) for label in result.coords[first])
        values = result.values
        if values.dim() == 0:
            return f"{float(values):.{digits}f}"
        if values.dim() == 1:
            values = values.unsqueeze(0)
            rows_dim, row_labels = "", [""]
        else:
            rows_dim, row_labels = result.dims[0], result.coords[result.dims[0]]
        column_dim = result.dims[-1]
        columns = [str(c) for c in result.coords[column_dim]]
        if column_dim == "position" and self.tokens is not None:
            columns = [f"{c}:{self.tokens[int(c)]}" for c in columns]
        width = max(digits + 4, *(len(c) for c in columns))
        label_width = max(len(f"{rows_dim} {r}") for r in row_labels)
        lines = [" " * label_width + " " + " ".join(c[:width].rjust(width) for c in columns)]
        for label, row in zip(row_labels, values.tolist()):
            name = f"{rows_dim} {label}".ljust(label_width)
            lines.append(name + " " + " ".join(f"{v:+.{digits}f}".rjust(width) for v in row))
        return "\n".join(lines)

    def __repr__(self) -> str:
        axes = ", ".join(f"{d}={len(self.coords[d])}" for d in self.dims)
        if self.per_pair is not None:
            axes += f"; mean of {self.n_pairs} pairs"
        extra = "" if self.baseline is None else f", baseline={self.baseline:.4g}"
        extra += "" if self.reference is None else f", reference={self.reference:.4g}"
        top = f"; top {self.top()!r}" if (~self.values.isnan()).any() else ""
        return f"PatchingResult({self.method}: {axes}{extra}{top})"

    # --- plotting ----------------------------------------------------------------------------
    def plot(self, path: str | None = None, title: str | None = None,
             normalized: bool = False, cmap: str = "RdBu"):
        """A heatmap (matplotlib): one panel per site kind (per vector for steering), rows
        along layers, columns along positions (scales); saved to ``path`` when given (with
        the Agg backend, so no display is needed). Returns the figure."""
        result = self.normalized() if normalized else self
        values = result.values
        if values.dim() == 1:
            values = values.unsqueeze(0)
        panels_dim = result.dims[0] if values.dim() == 3 else None
        panels = result.coords[panels_dim] if panels_dim else [None]
        grids = [values[i] for i in range(values.shape[0])] if panels_dim else [values]
        row_dim = result.dims[-2] if len(result.dims) >= 2 else ""
        column_dim = result.dims[-1]
        rows = result.coords.get(row_dim, [""])
        columns = [str(c) for c in result.coords[column_dim]]
        if column_dim == "position" and self.tokens is not None:
            columns = [f"{self.tokens[int(c)]}\n{c}" for c in columns]
        present = values[~values.isnan()]  # (NaN: a cell a pair lacks, left blank)
        limit = float(present.abs().max()) if present.numel() else 0.0
        limit = limit or 1.0
        rotate = 90 if max(len(c.split("\n")[0]) for c in columns) > 5 else 0
        size = (2.5 + 0.5 * len(columns),
                1.2 + (1.0 if rotate else 0.3) + len(panels) * (0.45 + 0.3 * len(rows)))
        figure, axes_list = new_figure(len(panels), 1, size, path, sharex=True)
        axes_list = axes_list[:, 0]
        image = None
        for axes, panel, grid in zip(axes_list, panels, grids):
            image = axes.imshow(grid.numpy(), cmap=cmap, vmin=-limit, vmax=limit,
                                aspect="auto", interpolation="nearest")
            axes.set_yticks(range(len(rows)), [str(r) for r in rows])
            axes.set_ylabel(row_dim)
            if panel is not None:
                axes.set_title(f"{panels_dim} {panel}", fontsize=10)
        axes_list[-1].set_xticks(range(len(columns)), columns, rotation=rotate)
        axes_list[-1].set_xlabel(column_dim)
        label = "fraction of clean restored" if normalized else "effect on metric"
        figure.colorbar(image, ax=list(axes_list), label=label, shrink=0.8)
        figure.suptitle(title or self.method)
        if path is not None:
            figure.savefig(path, dpi=110, bbox_inches="tight")
        return figure
