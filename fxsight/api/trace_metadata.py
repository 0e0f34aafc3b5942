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

from ..errors import TraceError, at_line, user_line
from ..locks import model_lock
from ..record.program import Kind, Node
from ..record.sites import OUTPUT, is_operation
from ..capture.operations import spec_for
from ..run.forward import metadata_source, run_source
from ..splice.rows import Rows
from ..splice.meta_walker import MetaWalker, UnknownMeta
from .token_dimension import check_token_reads, check_tokens_follow


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
            raise TraceError(at_line(f"the {what} of this value is not known inside the "
                                     f"block: {_unknown_because(node, walker.values)}",
                                     user_line()))
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
            check_token_reads(walker.values, self._token_reads, kwargs)
            check_tokens_follow(self, args, kwargs, rows, walker.values, needed,
                                walker.source)
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


def _unknown_because(node: Node, values: dict) -> str:
    """Why the meta value of ``node`` is unknown: the ``fxsight.apply`` it comes from."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        inputs = [n for n in current.all_input_nodes if isinstance(values.get(n), UnknownMeta)]
        if current.lenient and not inputs:
            name = getattr(current.target, "__name__", "fn")
            if not any(n.kind is not Kind.INPUT for n in current.all_input_nodes):
                return (f"it comes from fxsight.apply({name}, ...) ({current.line}), which "
                        f"has no traced value among its arguments, so it is called once, "
                        f"when the model runs (not before, to learn the shape); use the "
                        f"value after the block, or pass its shape along yourself")
            return (f"it comes from fxsight.apply({name}, ...) ({current.line}), which "
                    f"cannot be called on meta tensors (shapes only, no data)")
        stack.extend(inputs)
    return "it depends on real data (fxsight.apply of a function)"

