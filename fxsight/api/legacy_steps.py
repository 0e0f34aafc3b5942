"""nnsight 0.4's ``envoy.all()`` in ``lm.generate``: the lines inside apply at every
decoding step, written on a module (``with lm.all():``, ``with lm.transformer.h[0].all():``)
rather than on the tracer (``with tracer.all():``, nnsight >= 0.5's, which it maps onto)."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from ..errors import TraceError, at_line, user_line
from ..record.program import Kind
from ..record.sites import module_label
from .call_site import is_with_statement, next_instruction
from .calls import CallScope


class ModuleSteps:
    """``with envoy.all():`` in ``lm.generate``: ``with tracer.all():`` for the lines inside
    (recorded once, applied at every step; a saved value is a list, one per step). nnsight
    0.4 applies a module's ``.all()`` to that module's (and its submodules') reads and
    writes only: a read or write of another module inside is refused when the block ends,
    naming its line (it would apply at every step here, at the first in nnsight 0.4)."""

    def __init__(self, tracer: Any, scope: Any, path: str, call: str):
        self.tracer = tracer
        self.scope = scope  # the tracer's ``tracer.all()``
        self.path = path
        self.call = call
        self.first = 0

    def __enter__(self) -> Any:
        self.first = len(self.tracer.program.nodes)
        return self.scope.__enter__()

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        self.scope.close(sys._getframe(1), exc_type is not None)
        if exc_type is None and self.path:
            for node in self.tracer.program.nodes[self.first:]:
                if node.kind in (Kind.READ, Kind.WRITE) and not _under(node.site.path,
                                                                      self.path):
                    raise TraceError(at_line(
                        f"{module_label(node.site.path)} inside `with {self.call}:`: "
                        f"nnsight 0.4's .all() of a module applies to that module's calls "
                        f"only, and this module's would apply at every step here; write "
                        f"`with tracer.all():` for every module's lines, and this one "
                        f"outside it for the first step", node.line))
        return False


def envoy_all(envoy: Any, tracer: Any, frame: FrameType) -> ModuleSteps:
    """``envoy.all()`` called in ``frame`` inside ``tracer``: in a ``with`` statement, the
    context of :class:`ModuleSteps`; elsewhere (on a line of its own, or used as a value)
    a TraceError that names the tracer's spelling."""
    label = module_label(envoy._path)
    call = f"{label}.all()"
    scope = tracer.all()
    if isinstance(scope, CallScope):  # a trace: calls of a module, not decoding steps
        raise TraceError(at_line(
            f"nnsight's `{call}` (every call of a module) is written with the tracer in a "
            f"trace: `for i in tracer.all():` records the loop's body once per call",
            user_line()))
    if is_with_statement(frame):
        return ModuleSteps(tracer, scope, envoy._path, call)
    instruction = next_instruction(frame)
    how = "on a line of its own" if instruction is not None and \
        instruction.opname == "POP_TOP" else "used as a value"
    # (on a line of its own, the lines after it would take every step up to the end of
    # their block: `lm.generator.output` too, which is no step's)
    raise TraceError(at_line(
        f"nnsight 0.4's `{call}` ({how}) applies the module's later reads and writes to "
        f"every decoding step; write them in `with tracer.all():` (or `with {call}:`)",
        user_line()))


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")
