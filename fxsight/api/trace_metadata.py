"""What a trace's values are before it runs: the recorder's host questions.

While a block is recorded, ``.shape``, ``.dtype``, ``.device`` and ``len()`` of a traced
value, the calls of a module (an open-ended ``tracer.iter``) and the functions a forward's
operations call (``.source``) are answered from a capture or a scan of the trace's inputs,
the Program walked on meta tensors. Shapes read from one invoke's inputs are checked
against the batch's before the run.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenIndexError, TraceError, at_line, user_line
from ..locks import model_lock
from ..record.program import Node
from ..record.sites import OUTPUT, is_operation
from ..capture.operations import spec_for
from ..capture.scan import cached_scan
from ..run.forward import metadata_source, run_source
from ..splice.rows import Rows
from ..splice.meta_walker import MetaWalker, UnknownMeta


class TraceMetadata:
    """The metadata half of :class:`~fxsight.api.tracer.Tracer` (its base): shapes,
    dtypes and devices of recorded values, the module calls and operations of a forward
    of the trace's inputs. It reads the tracer's ``model``, ``options``, ``recorder``,
    ``program``, ``invokes``, ``_batched()``, ``_meta_walkers``, ``_shapes_read`` and
    ``_paths_run``."""

    def meta_of(self, node: Node, what: str) -> Any:
        with model_lock(self.model._module):  # (captures, scans: see fxsight.locks)
            operations = self._operations()
            key = (node.invoke, operations) if operations else node.invoke
            walker = self._meta_walkers.get(key)
            if walker is None:
                args, kwargs = self._inputs_for_metadata(node.invoke)
                source = self._metadata_source(args, kwargs, operations)
                walker = self._meta_walkers[key] = MetaWalker(
                    self.program, _WholeRows(), source)
            walker.run(_walked_for(self.program, node.invoke))
        meta = walker.values[node]
        if isinstance(meta, UnknownMeta):
            raise TraceError(at_line(f"the {what} of this value depends on real data "
                                     f"(fxsight.apply on an opaque function)", user_line()))
        if (what in ("shape", "dtype") or what.startswith("size(")) and \
                not isinstance(meta, torch.Tensor):
            raise TraceError(at_line(f"this value is a {type(meta).__name__}, not a tensor; "
                                     f"it has no {what}", user_line()))
        dims = _DIMS_READ.get(what, ()) if not what.startswith("size(") \
            else (int(what[5:-1]),)
        if dims != () and isinstance(meta, torch.Tensor):
            self._shapes_read.append((node, dims, tuple(meta.shape), user_line()))
        return meta

    def device_of(self, node: Node) -> torch.device:
        self.meta_of(node, "device")
        return self.model._device()

    def _inputs_for_metadata(self, invoke: int | None) -> tuple[tuple, dict]:
        if invoke is not None:
            args, kwargs, _ = self.invokes[invoke].prepared
            return args, kwargs
        if not self.invokes:
            raise TraceError(at_line("shapes are unknown before the trace has an input",
                                     user_line()))
        args, kwargs, _ = self._batched()
        return args, kwargs

    def _metadata_source(self, args: tuple, kwargs: dict,
                         operations: frozenset | None = None) -> Any:
        """Boundary shapes and layouts for these inputs (a capture or a scan), with the
        sites of ``operations`` (by default, of the operations recorded so far)."""
        operations = self._operations() if operations is None else operations
        return metadata_source(self.model._module, args, kwargs, self.options, operations)

    def _run_source(self, args: tuple, kwargs: dict) -> Any:
        """The capture (or scan) the run of this trace's Program will use."""
        return run_source(self.model._module, self.recorder.program, args, kwargs,
                          self.options)

    def _operations(self) -> frozenset:
        """The operations spec of the sites recorded so far (``.source``)."""
        paths = self._operation_paths()
        if not paths:
            return frozenset()
        return spec_for(self.model._module, paths)

    def _operation_paths(self) -> set[str]:
        """The paths of the operation sites (``.source``) of this trace: those recorded
        in it, and those of the edits seeded into its Program (``model.edit()``)."""
        if not getattr(self.model, "_edits", None):  # (the common case: no edits)
            return self.recorder.operations
        edited = {path for path in self.program.site_paths if is_operation(path)}
        return self.recorder.operations | edited if edited else self.recorder.operations

    def callees(self, paths: set[str], invoke: int | None) -> dict:
        """The functions operations called (op path -> function) in a forward pass of
        this trace's inputs instrumented for ``paths`` (operation sites' paths)."""
        with model_lock(self.model._module):
            args, kwargs = self._inputs_for_metadata(invoke)
            operations = spec_for(self.model._module, paths | self._operation_paths())
            source = self._metadata_source(args, kwargs, operations)
        return source.callees

    def _check_shapes_read(self, args: tuple, kwargs: dict, rows: dict[Any, Rows]) -> None:
        """A shape read while recording is of an invoke's input alone (or of the invokes
        so far); in the batch the value can be longer (prompts padded to the longest
        invoke's length: on the left, an encoder-decoder's on the right). A number taken
        from such a shape (``h[:, h.shape[1] - 1]``) would silently pick another token:
        refused, naming the line that read it."""
        shapes_read = self._shapes_read if len(self.invokes) > 1 else []
        if not shapes_read and not self._token_reads:
            return
        needed = {node for node, *_ in (*shapes_read, *self._token_reads)}
        for node in reversed(self.program.nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        with model_lock(self.model._module):
            walker = MetaWalker(self.program, rows, self._metadata_source(args, kwargs))
            walker.run([node for node in self.program.nodes if node in needed])
        _check_token_reads(walker.values, self._token_reads, kwargs)
        self._check_tokens_follow(args, kwargs, rows, walker.values, needed)
        for node, dims, seen, line in shapes_read:
            meta = walker.values.get(node)
            if not isinstance(meta, torch.Tensor):
                continue
            batched = tuple(meta.shape)
            dims = range(len(seen)) if dims is None else dims
            if len(batched) != len(seen) or any(seen[d] != batched[d] for d in dims):
                right = getattr(self.model, "_pads_right", lambda: False)()
                how = "right-padded to the longest (an encoder-decoder's input). Use" \
                    if right else "left-padded to the longest. Count tokens from the end " \
                    "(`h[:, -1]`) or use"
                raise TraceError(at_line(
                    f"this shape was read as {seen} while the block was recorded (the "
                    f"invoke's input alone, or the invokes recorded so far), but in the batch the "
                    f"value is {batched}: the invokes' prompts are {how} "
                    f"`h.token[i]`; read a dimension padding does not change with "
                    f"`h.size(-1)`", line))

    def _check_tokens_follow(self, args: tuple, kwargs: dict, rows: dict[Any, Rows],
                             values: dict, needed: set[Node]) -> None:
        """A value indexed by ``.token`` whose dimension 1 is as long as the input's tokens
        and so is another of its dimensions (attention weights ``(batch, heads, q, k)``
        with as many heads as tokens; a transposed ``(batch, hidden, t)``), or which has
        two dimensions (``(batch, hidden)`` pooled), may hold the tokens elsewhere: its
        shapes are walked again for an input one token longer (a fake-tensor scan), and
        where its dimension 1 does not grow with it, refused naming the line. Where that
        scan cannot run, the value is taken as it is (see docs/porting.md)."""
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        length = ids.shape[1]
        doubtful = [(node, line) for node, _, line in self._token_reads
                    if _doubtful(values.get(node), length)]
        if not doubtful:
            return
        longer = _one_token_longer(kwargs, ids)
        try:  # (a Program the longer input does not fit, a model it fails: can't tell)
            with model_lock(self.model._module):
                source = cached_scan(self.model._module, args, longer, self._operations())
                walker = MetaWalker(self.program, rows, source)
                walker.run([node for node in self.program.nodes if node in needed])
        except Exception:  # noqa: BLE001 (a value not checked is as before: documented)
            return
        for node, line in doubtful:
            meta = walker.values.get(node)
            if isinstance(meta, torch.Tensor) and meta.dim() >= 2 and \
                    meta.shape[1] == length + 1:
                continue
            shape = tuple(values[node].shape)
            raise TokenIndexError(at_line(
                f"token indexing indexes dimension 1 as the prompts' token dimension, but "
                f"this value's shape is {shape}: its dimension 1 is as long as the input's "
                f"{length} tokens without being them (it does not grow with the input; "
                f"attention weights are (batch, heads, query, key)). Index the dimension "
                f"meant directly (e.g. weights[:, :, -1])", line))

    def _calls_of(self, nodes: list[Node], line: Any) -> int:
        """How many times the modules ``nodes`` read and write are called in one forward
        (the most of them): the bound of an open-ended ``tracer.iter`` loop."""
        paths = {n.site.path for n in nodes if n.site is not None}
        if not paths:
            raise TraceError(at_line(
                "an open-ended `for i in tracer.iter[...]` (or tracer.all()) in a trace runs "
                "over the calls of the modules its body uses, and this body uses none: "
                "choose the calls (tracer.iter[0:3])", line))
        with model_lock(self.model._module):
            args, kwargs = self._inputs_for_metadata(None)
            source = self._metadata_source(args, kwargs, spec_for(
                self.model._module, paths | self._operation_paths()))
        return max(sum(1 for site in source.events if site.path == path
                       and site.kind == OUTPUT) for path in paths)

    def _forward_paths(self) -> set[str]:
        """The paths of the modules the model's forward runs (for these inputs)."""
        if self._paths_run is None:
            with model_lock(self.model._module):
                args, kwargs = self._inputs_for_metadata(None)
                source = self._metadata_source(args, kwargs)
            self._paths_run = {site.path for site in source.events}
        return self._paths_run


def _check_token_reads(values: dict, reads: list[tuple[Node, int, Any]],
                       kwargs: dict) -> None:
    """``value.token[i]`` indexes dimension 1 as the prompts' token dimension, from its end
    (from its start where the rows are right-padded), as far as the prompts' padded
    length. Refused before the run, naming the line:
    a value whose dimension 1 is not as long as the input's tokens (attention weights
    ``(batch, heads, q, k)``, a transposed or pooled value), which would pick along that
    dimension wherever the index is in range; and the logits of a forward given
    ``logits_to_keep``, which hold the last positions only, indexed further back (was: an
    IndexError from inside the run, naming no line)."""
    ids = kwargs.get("input_ids")
    length = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() > 0 else None
    kept = _kept_logits(kwargs, length)
    for node, extent, line in reads:
        meta = values.get(node)
        if not isinstance(meta, torch.Tensor):
            continue
        shape = tuple(meta.shape)
        if length is not None and (meta.dim() < 2 or shape[1] not in (length, kept)):
            found = f"has {shape[1]}" if meta.dim() >= 2 else "does not exist"
            raise TokenIndexError(at_line(
                f"token indexing indexes dimension 1 as the prompts' token dimension, but "
                f"this value's shape is {shape}: its dimension 1 {found}, not the input's "
                f"{length} tokens (attention weights are (batch, heads, query, key); a "
                f"transposed or pooled value has no token dimension 1). Index the dimension "
                f"meant directly (e.g. weights[:, :, -1])", line))
        if meta.dim() < 2 or shape[1] >= extent:
            continue
        raise TokenIndexError(at_line(
            f"token indexing counts positions of dimension 1 from each prompt's first "
            f"token and needs {extent} of them here, but this value's dimension 1 has only "
            f"{shape[1]} (shape {shape}; a forward given `logits_to_keep` returns the "
            f"last positions only, as lm.generate's steps are given 1: one position per "
            f"step; in lm.generate with a cache, step 0 holds the tokens after the "
            f"cache's): index it directly (e.g. [:, -1])", line))


def _doubtful(meta: Any, length: int) -> bool:
    """Whether a value whose dimension 1 is as long as the tokens may hold them elsewhere:
    another of its dimensions is as long, or it has only two."""
    return isinstance(meta, torch.Tensor) and meta.dim() >= 2 and meta.shape[1] == length \
        and (meta.dim() == 2 or length in tuple(meta.shape[2:]))


def _one_token_longer(kwargs: dict, ids: torch.Tensor) -> dict:
    """``kwargs`` with one more token: every tensor of the input's rows and tokens (ids,
    a 2-D mask, also one that covers a cache's tokens first, positions, labels) repeats
    its last column, ``cache_position`` goes on by one; a decoder's own tokens are left as
    they are."""
    longer = dict(kwargs)
    positions = kwargs.get("cache_position")
    if isinstance(positions, torch.Tensor) and positions.dim() == 1 and \
            positions.shape[0] == ids.shape[1]:
        longer["cache_position"] = torch.cat([positions, positions[-1:] + 1])
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or \
                key.startswith("decoder_") or value.shape[0] != ids.shape[0]:
            continue
        if value.shape[1] == ids.shape[1] or (key == "attention_mask" and value.dim() == 2):
            longer[key] = torch.cat([value, value[:, -1:]], dim=1)
    return longer


def _kept_logits(kwargs: dict, length: int | None) -> int | None:
    """How many last positions the logits hold where the forward is given
    ``logits_to_keep`` (an int, fewer than the input's tokens), else ``None``."""
    for name in ("logits_to_keep", "num_logits_to_keep"):
        keep = kwargs.get(name)
        if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 and \
                (length is None or keep < length):
            return keep
    return None


# the dimensions of a value a metadata question reads (``None``: all of them); a question
# not listed reads none (``size(d)`` reads ``d``)
_DIMS_READ = {"shape": None, "len()": (0,), "iteration": (0,)}


def _walked_for(program: Any, invoke: int | None) -> list[Node]:
    """The nodes the metadata of ``invoke`` (run on its inputs alone) needs: its own, and
    those of other invokes they depend on. Other invokes' nodes are sized for other rows
    (a whole-batch token index, say), and writes keep a site's shape, so leaving them out
    changes no shape of this invoke."""
    needed: set[Node] = set()
    for node in reversed(program.nodes):
        if node.invoke == invoke or node in needed:
            needed.update(node.all_input_nodes)
            needed.add(node)
    return [node for node in program.nodes if node in needed]


class _WholeRows(dict):
    """Rows for metadata while recording: every invoke alone is a whole batch."""

    def __missing__(self, key):
        return Rows(0, 1, 1)
