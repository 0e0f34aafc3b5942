"""``envoy.source``: the operations inside a module's forward, each a site.

``model.transformer.h[0].attn.source`` prints the module's ``forward`` with nnsight's name
on each call (``attention_interface_0``, ``self_c_attn_0``, ``split_0``); each name is an
:class:`OperationEnvoy` whose ``.output``, ``.input`` and ``.inputs`` read and write the
call's return value and arguments inside a trace, exactly like a module's. ``.source`` of an
operation shows the function it calls (``attention_interface_0.source`` is transformers'
``eager_attention_forward`` with ``attn_implementation="eager"``), one level further in.

The sites are ``<module path>.source.<name>`` (``capture.operations``): the capture marks
the calls of the forwards a trace needs, so reads, writes, invokes, ``.save()`` and the
checks before running are the modules' own.
"""

from __future__ import annotations

import difflib
import weakref
from typing import Any, Callable

import torch

from ..capture.fast_paths import fast_path_refusal
from ..capture.operations import (SOURCE, Differing, Opaque, Parsed, SourceError, describe,
                                  forward_slot, parse)
from ..errors import TraceError, at_line, outside_a_trace, user_line
from ..record.active import current_tracer
from ..record.proxy import Proxy
from ..record.recorder import Recorder
from ..record.sites import INPUT, OUTPUT, Site, module_label

# the functions operations called in the last trace of a model that looked (op path ->
# function): ``op.source`` outside a trace
_CALLEES: "weakref.WeakKeyDictionary[Any, dict[str, Callable]]" = weakref.WeakKeyDictionary()

# transformers' attention functions that compute attention in one kernel
_FUSED = ("sdpa", "flash", "flex", "paged")


class SourceEnvoy:
    """The operations of one function (a module's ``forward``, or what an operation
    calls). Print it to read the names; ``source.<name>`` is an :class:`OperationEnvoy`."""

    def __init__(self, root: Any, function: Any, prefix: str, owner: str):
        # root: the wrapper (for the current tracer); prefix: the sites' path before the
        # operation's name (``h.0.attn.source``); owner: what calls it, as users read it
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_owner", owner)
        try:
            parsed = parse(function)
        except SourceError as error:
            raise TraceError(at_line(f"{owner}.source: {error}", user_line())) from None
        object.__setattr__(self, "_parsed", parsed)
        object.__setattr__(self, "_function", parsed.function)  # (kept alive)
        object.__setattr__(self, "_operations", {})

    @property
    def operations(self) -> list[str]:
        """The operation names, in the order they are named (inner calls first)."""
        return list(self._parsed.operations)

    @property
    def function(self) -> Callable:
        """The function whose source this is."""
        return self._function

    def __getattr__(self, name: str) -> "OperationEnvoy":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name not in self._parsed.operations:
            raise AttributeError(at_line(_unknown(self, name), user_line()))
        known = self._operations
        if name not in known:
            known[name] = OperationEnvoy(self, name)
        return known[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(at_line(
            f"{self._owner}.source.{name} cannot be set: set an operation's "
            f".output, .input or .inputs", user_line()))

    def __dir__(self) -> list[str]:
        return [*self._parsed.operations, "operations", "function"]

    def __iter__(self):
        return (getattr(self, name) for name in self._parsed.operations)

    def __repr__(self) -> str:
        return render(self._parsed, f"{self._owner}.source")

    __str__ = __repr__


class OperationEnvoy:
    """One call inside a function: ``.output`` (its return value), ``.inputs``
    (``(args, kwargs)``) and ``.input`` (its first argument) read and, assigned, write
    inside a trace; ``.source`` shows the function it calls."""

    def __init__(self, source: SourceEnvoy, name: str):
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_path", f"{source._prefix}.{name}")
        object.__setattr__(self, "_call", 0)

    @property
    def path(self) -> str:
        """The operation's site path (``transformer.h.0.attn.source.split_0``)."""
        return self._path

    @property
    def label(self) -> str:
        return module_label(self._path)

    def _recorder(self, what: str) -> Recorder:
        tracer = current_tracer(self._source._root)
        if tracer is None:
            raise TraceError(at_line(outside_a_trace(self.label, what), user_line()))
        hooked = _hooked_call_around(tracer, self._path)
        if hooked is not None:
            prefix, line = hooked
            raise TraceError(at_line(
                f"{self.label}.{what}: {module_label(prefix)} was called with hook=True "
                f"({line}), and the operations inside it are not sites of that call (only "
                f"its modules' .output/.input/.inputs are); use the value the call returns "
                f"or its modules' envoys", user_line()))
        recorder = tracer.recorder
        recorder.check_open()
        recorder.operations.add(self._path)
        return recorder

    def _site(self, kind: str) -> Site:
        """The site of this operation's ``kind`` values: its ``call``-th call inside
        ``for call in tracer.iter[...]`` (as a module's), else its first."""
        tracer = current_tracer(self._source._root)
        call = tracer.recorder.scope.call if tracer is not None else None
        return Site(self._path, kind, self._call if call is None else call)

    @property
    def output(self) -> Proxy:
        """The operation's return value (a proxy inside a trace); assign to replace it."""
        return self._recorder("output").create_read(self._site(OUTPUT), "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._recorder("output").create_write(self._site(OUTPUT), "output", value)

    @property
    def inputs(self) -> Proxy:
        """The operation's arguments as ``(args, kwargs)``; assign to replace them."""
        return self._recorder("inputs").create_read(self._site(INPUT), "inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._recorder("inputs").create_write(self._site(INPUT), "inputs", value)

    @property
    def input(self) -> Proxy:
        """The operation's first argument (first positional, else first keyword one)."""
        return self._recorder("input").create_read(self._site(INPUT), "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._recorder("input").create_write(self._site(INPUT), "input", value)

    @property
    def source(self) -> SourceEnvoy:
        """The operations of the function this operation calls (known from a forward
        pass: inside a trace, of its inputs; outside, of the last trace that looked)."""
        root = self._source._root
        tracer = current_tracer(root)
        if tracer is not None and tracer.invokes:
            callees = tracer.callees({self._path}, tracer.recorder.scope.invoke)
            _CALLEES.setdefault(root, {}).update(callees)
        else:  # (outside a trace, or in one without inputs: an edit's, as the last trace)
            callees = _CALLEES.get(root, {})
        if self._path not in callees:
            if tracer is None:
                raise TraceError(at_line(
                    f"{self.label} calls a function known only once the model runs: use "
                    f".source of it inside a trace (`with model.trace(...):`)",
                    user_line()))
            if not tracer.invokes:
                raise TraceError(at_line(
                    f"{self.label} calls a function known only once the model runs, and "
                    f"this block has no inputs: give it the model's inputs "
                    f"(`model.edit(inputs)`), or use .source of it in a trace first",
                    user_line()))
            why = fast_path_refusal(self._path, callees.__contains__)
            raise TraceError(at_line(
                f"{self.label} is not called in this forward pass ("
                f"{why or 'its line is not reached with these inputs'})", user_line()))
        called = callees[self._path]
        if isinstance(called, Differing):
            raise TraceError(at_line(
                f"{self.label} calls different functions in different calls "
                f"({_name_of(called.first)} and {_name_of(called.other)} in one forward "
                f"pass): its .source cannot show one function for all of its calls; read "
                f"the operations of each function where it is called on a line of its own, "
                f"or read {self.label}.output", user_line()))
        if isinstance(called, Opaque):
            raise TraceError(at_line(_no_source(self.label, called, root), user_line()))
        return SourceEnvoy(root, called, f"{self._path}.{SOURCE}", self.label)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        hint = _NNSIGHT_METHODS.get(name)
        hint = f"; {hint}" if hint else ""
        raise AttributeError(at_line(
            f"{self.label} has no attribute {name!r} (an operation has .output, .input, "
            f".inputs and .source){hint}", user_line()))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)  # (the property setters)
            return
        raise AttributeError(at_line(
            f"{self.label} has no attribute {name!r} to set; an operation's values are "
            f"set with .output, .input and .inputs", user_line()))

    def __repr__(self) -> str:
        parsed = self._source._parsed
        index = parsed.operations[self._name]
        lines = parsed.lines
        start, end = max(parsed.def_index, index - 3), min(len(lines), index + 4)
        out = [f"{self.label}: {describe(parsed.function)}, line "
               f"{parsed.first_line + index - parsed.def_index}"]
        for i in range(start, end):
            marker = "-->" if i == index else "   "
            out.append(f" {marker} {parsed.first_line + i - parsed.def_index:5d}  {lines[i]}")
        return "\n".join(out)


# envoy methods of older nnsight versions that fxsight spells with the tracer
_NNSIGHT_METHODS = {
    "next": "nnsight's `op.next()` (the operation's next call) is written with the tracer: "
            "`with tracer.iter[1]: h = op.output` (or `for i in tracer.iter[0:3]:`)",
    "all": "nnsight's `op.all()` (every call) is written with the tracer: `with "
           "tracer.all(): op.output[:] = 0` (or `for i in tracer.all():`)",
    "iter": "nnsight's `op.iter[...]` is written with the tracer: `with tracer.iter[1:3]: "
            "...` (or `for i in tracer.iter[1:3]:`)",
    "skip": "an operation cannot be skipped: assign its .output to replace what it returns "
            "(the call still runs), or .skip() the module it calls (its own envoy)",
}


def _name_of(called: Any) -> str:
    """A callee as users read it (``a()``, ``Linear``, ``relu()``)."""
    return called.name if isinstance(called, Opaque) else describe(called)


def _no_source(label: str, called: Opaque, root: Any) -> str:
    """Why an operation calling ``called`` (a module, a builtin) has no ``.source``."""
    module = called.module() if called.module is not None else None
    if module is None:
        return (f"{label} calls {called.name}, which is not a Python function: it has no "
                f"source to show or instrument")
    path = next((p for p, m in root._module.named_modules() if m is module), None)
    where = f"model.{path}.source" if path else ("model.source" if path == "" else
                                                  "the module's envoy's .source")
    return (f"{label} calls a module ({called.name}): an operation that calls a module "
            f"has no .source of its own; the module's operations are {where}")


def _hooked_call_around(tracer: Any, path: str) -> tuple[str, Any] | None:
    """``(module path, line)`` of this trace's ``envoy(..., hook=True)`` call that the
    operation at ``path`` (``<module>.source.<name>...``) is inside, else ``None``."""
    calls = getattr(tracer, "hooked_calls", None)
    if not calls:
        return None
    module = "" if path.startswith(f"{SOURCE}.") else path.split(f".{SOURCE}.")[0]
    for prefix, (_, line) in calls.items():
        if not prefix or module == prefix or module.startswith(prefix + "."):
            return prefix, line
    return None


def render(parsed: Parsed, title: str) -> str:
    """A function's source with each operation's name at the left of its line."""
    by_line: dict[int, list[str]] = {}
    for name, index in parsed.operations.items():
        by_line.setdefault(index, []).append(name)
    width = max((len(n) for n in parsed.operations), default=0) + 4
    first = parsed.first_line - parsed.def_index
    out = [f"{title}: {describe(parsed.function)} ({parsed.filename}:{parsed.first_line})"]
    for i, line in enumerate(parsed.lines):
        names = by_line.get(i, [])
        number = first + i
        if not names:
            out.append(f" {'':<{width}}  {number:5d}  {line}")
            continue
        out.append(f" {names[0]:<{width - 3}} ->  {number:5d}  {line}")
        out.extend(f" {name:<{width - 3}} ->  {number:5d}" for name in names[1:])
    return "\n".join(out)


def _unknown(source: SourceEnvoy, name: str) -> str:
    """Why ``source.<name>`` is not an operation: the nearest names, and where the
    function is a fused attention kernel, that there is no probability tensor in it."""
    parsed = source._parsed
    near = difflib.get_close_matches(name, list(parsed.operations), n=5, cutoff=0.4)
    hint = f"; the nearest names: {', '.join(near)}" if near else ""
    message = (f"{source._owner}.source ({describe(parsed.function)}) has no operation "
               f"{name!r}{hint} (print {source._owner}.source to see them all)")
    function = parsed.function.__name__.lower()
    if any(kind in function for kind in _FUSED):
        message += (f". {describe(parsed.function)} computes attention in one fused kernel "
                    f"(the model's attn_implementation is not \"eager\"): there is no "
                    f"attention-probability tensor in it to read or write. Load the model "
                    f"with attn_implementation=\"eager\" (e.g. "
                    f"AutoModelForCausalLM.from_pretrained(..., attn_implementation=\"eager\") "
                    f"or config._attn_implementation = \"eager\") to reach the softmax "
                    f"through .source")
    return message


def source_of(envoy: Any) -> SourceEnvoy:
    """``envoy.source``: the operations of the module's ``forward``."""
    module = envoy._module
    label = module_label(envoy._path)
    if forward_slot(module) is None:
        raise TraceError(at_line(
            f"{label}.source: the module has a forward of its own (an instance attribute); "
            f"only its class's forward can be instrumented", user_line()))
    if type(module).forward is torch.nn.Module.forward:
        raise TraceError(at_line(
            f"{label}.source: {type(module).__name__} has no forward of its own (a "
            f"container: the modules in it are called by the forward of the module that "
            f"holds it); use .source of that module, or of each module in it",
            user_line()))
    prefix = f"{envoy._path}.{SOURCE}" if envoy._path else SOURCE
    return SourceEnvoy(envoy._root, type(module).forward, prefix, label)
