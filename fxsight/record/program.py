"""The Program: a trace's recorded interventions, a small graph of their own.

Each :class:`Node` has a :class:`Kind` from a closed set and typed fields; its scope (the
invoke whose rows it sees, the decoding steps it runs at) and the user's source line are
set when it is recorded and never change afterwards.
"""

from __future__ import annotations

import copy
import enum
import itertools
import operator
from types import FunctionType
from typing import Any, Callable

import torch

from .._torch import pytree, tensor_version
from ..errors import TraceError, at_line
from .scope import Scope, Steps
from .sites import Site, module_label

INPUT_ACCESSORS = ("input", "inputs")
_INDEX = operator.attrgetter("index")


class Kind(enum.Enum):
    """What a Program node is."""

    INPUT = "input"  # a real value the user brought in (``Program.input_values``)
    READ = "read"  # a module's inputs or output (``site``, ``accessor``)
    WRITE = "write"  # replaces them with ``args[0]`` (``skip``: ``env.skip(value)``)
    OP = "op"  # any recorded operation (torch function, tensor method, operator, apply)
    GRAD = "grad"  # ``proxy.grad``: the gradient of ``args[0]``
    GRAD_WRITE = "grad_write"  # ``proxy.grad = v``: replace the gradient of ``args[0]``


INPUT_PART = Kind.INPUT.value  # an input's part of the structure key starts with it


def READ(*_):  # noqa: N802 - sentinel target, never called
    raise RuntimeError("fxsight READ sentinel must be spliced, not run")


def WRITE(*_):  # noqa: N802
    raise RuntimeError("fxsight WRITE sentinel must be spliced, not run")


def SKIP(*_):  # noqa: N802 - a write that replaces a module's whole computation
    raise RuntimeError("fxsight SKIP sentinel must be spliced, not run")


def GRAD(*_):  # noqa: N802 - sentinel target of ``proxy.grad``, never called
    raise RuntimeError("fxsight GRAD sentinel must not run")


def GRAD_WRITE(*_):  # noqa: N802 - sentinel target of ``proxy.grad = v``, never called
    raise RuntimeError("fxsight GRAD_WRITE sentinel must not run")


def AUTOGRAD_GRAD(*_):  # noqa: N802 - ``torch.autograd.grad(loss, inputs)``, never called
    """Sentinel target of a recorded ``torch.autograd.grad``: a ``backward()`` that puts
    the gradients into its inputs' grad reads only (the backward phase runs it)."""
    raise RuntimeError("fxsight AUTOGRAD_GRAD sentinel must not run")


def setitem(target, key, value):
    """``target[key] = value`` in place, returning ``target`` (so later uses depend on it)."""
    target[key] = value
    return target


def set_attribute(target, name, value):
    """``target.name = value`` on a module's output or inputs object (a dataclass, a
    ``ModelOutput``): a copy of it with that attribute set (the walkers write it back to
    the site, as ``setitem`` on a dict value)."""
    new = copy.copy(target)
    setattr(new, name, value)
    return new


# targets of fxsight's own, keyed by themselves in a structure key (one object each)
_SENTINELS = frozenset({READ, WRITE, SKIP, GRAD, GRAD_WRITE, AUTOGRAD_GRAD, setitem,
                        set_attribute})


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, setitem, set_attribute,
}

# Ops that return a view of their first argument: an in-place change through their result
# changes the argument too.
_VIEW_METHODS = {"view", "view_as", "reshape", "narrow", "select", "transpose", "permute",
                 "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
                 "t", "T", "mT", "unfold", "split", "chunk", "unbind", "diagonal", "movedim"}
_VIEW_FUNCTIONS = {operator.getitem, torch.narrow, torch.select, torch.transpose,
                   torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.reshape, torch.split, torch.chunk, torch.unbind, torch.diagonal,
                   torch.movedim}


def is_mutation(op: str, target: Any) -> bool:
    """Whether a recorded operation changes its first argument in place."""
    if op == "call_method":
        return target.endswith("_") and not target.startswith("_")
    if target in _INPLACE_OPERATORS:
        return True
    name = getattr(target, "__name__", "")
    return getattr(target, "__module__", None) == "torch" and name.endswith("_") and \
        not name.startswith("_")


def is_view(node: "Node") -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.target in _VIEW_FUNCTIONS


# operations that draw from the random generators (the block's draws run in its order)
_RANDOM_METHODS = {"normal_", "uniform_", "bernoulli_", "bernoulli", "random_",
                   "exponential_", "cauchy_", "log_normal_", "geometric_", "multinomial"}
_RANDOM_FUNCTIONS = {torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli,
                     torch.normal, torch.multinomial, torch.poisson, torch.dropout,
                     torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
                     torch.rrelu, torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                     torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                     torch.nn.functional.alpha_dropout,
                     torch.nn.functional.feature_alpha_dropout, torch.nn.functional.rrelu,
                     torch.nn.functional.gumbel_softmax}


def draws_random(node: "Node") -> bool:
    """Whether a recorded operation may draw from the random generators: a random
    function or method, a module in training mode called on traced values, or a function
    of the user's (``fxsight.apply(fn, ...)``: what ``fn`` draws is unknown before it runs,
    and whether it draws may depend on the values it gets)."""
    if node.lenient:  # (an applied function: see ``fxsight.apply``)
        return True
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if isinstance(node.target, ModuleCall):
        return any(module.training for module in node.target.module.modules())
    try:
        return node.target in _RANDOM_FUNCTIONS
    except TypeError:  # (an unhashable target)
        return False


def is_backward(node: "Node") -> bool:
    """Whether ``node`` is a ``loss.backward()`` call (or a ``torch.autograd.grad``)."""
    return node.kind is Kind.OP and (
        node.op == "call_method" and node.target == "backward" or
        node.target is AUTOGRAD_GRAD)


class Node:
    """One recorded step of a Program.

    ``op``/``target``/``args``/``kwargs``/``name``/``all_input_nodes`` mirror the part of
    ``torch.fx.Node``'s interface the engine uses (``args`` refer to earlier nodes); the
    other fields are typed and fixed when the node is recorded.
    """

    __slots__ = ("index", "kind", "op", "target", "args", "kwargs", "all_input_nodes",
                 "line", "invoke", "steps", "site", "accessor", "skip", "mutation",
                 "lenient", "at_read", "input_index", "__weakref__")

    def __init__(self, index: int, kind: Kind, op: str, target: Any, args: tuple,
                 kwargs: dict, inputs: list["Node"], line: Any = None,
                 scope: Scope = Scope(), site: Site | None = None,
                 accessor: str | None = None, skip: bool = False, mutation: bool = False,
                 lenient: bool = False, input_index: int | None = None,
                 at_read: bool = False):
        self.index = index
        self.kind = kind
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs
        self.all_input_nodes = inputs
        self.line = line  # the user's source line (a SourceLine, or a string)
        self.invoke: int | None = scope.invoke  # whose rows it sees (None: every row)
        self.steps: Steps | None = scope.steps  # decoding steps (None: the first only)
        self.site = site  # reads and writes: the boundary event
        self.accessor = accessor  # reads and writes: "output", "input" or "inputs"
        self.skip = skip  # a write that replaces the module's computation (env.skip)
        self.mutation = mutation  # an op that changes its first argument in place
        self.lenient = lenient  # an op whose shapes may be unknowable (fxsight.apply)
        # an op taken where its arguments' reads are, as a hook there would take it (a
        # cache's conversion): in-place changes recorded before it at later events of
        # memory it shares do not hold it back
        self.at_read = at_read
        self.input_index = input_index  # inputs: the index in Program.input_values

    @property
    def scope(self) -> Scope:
        return Scope(self.invoke, self.steps)

    @property
    def name(self) -> str:
        """A Python identifier naming the node (for messages and generated code)."""
        kind = self.kind
        if kind is Kind.READ:
            return _safe_name(self.site, self.accessor)
        if kind is Kind.INPUT:
            return f"input_{self.input_index}"
        target = self.target if isinstance(self.target, str) else \
            getattr(self.target, "__name__", "op")
        return f"{target.strip('_').lower() or 'op'}_{self.index}"

    def __repr__(self) -> str:
        return self.name


class Program:
    """The recorded interventions of one trace, in recording order.

    Its structure key (what a compiled runner is cached by) is built as nodes are
    recorded, so looking a runner up costs no walk over the Program."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.input_values: list[Any] = []
        self.saves: list[Node] = []
        self.uses_gradients = False  # set by .grad, .grad = v and backward()
        # gradient reads and writes recorded inside a ``with loss.backward():`` block: that
        # backward() call (the others belong to the next backward() after them)
        self.backward_blocks: dict[Node, Node] = {}
        # id -> (node, value, {tensor version at a use: the first line using it})
        self._input_ids: dict[int, tuple] = {}
        self._parts: list[tuple] = []
        self.site_paths: set[str] = set()  # the paths of the reads' and writes' sites
        # the nodes copied from a ``model.edit()`` (``api.edit.seed``): an error at one
        # says the line is an edit's
        self.from_edits: set[Node] = set()

    # --- building -------------------------------------------------------------------
    def _add(self, kind: Kind, op: str, target: Any, args: tuple, kwargs: dict,
             line: Any, scope: Scope, site: Site | None = None, accessor: str | None = None,
             skip: bool = False, mutation: bool = False, lenient: bool = False,
             at_read: bool = False) -> Node:
        inputs: list[Node] = []
        if type(target) is FunctionType:  # (reads and writes: their own key, no call)
            target_key = target if target in _SENTINELS else _function_key(target)
        else:
            try:
                hash(target)
                target_key = target
            except TypeError:
                target_key = id(target)
        # (plain strings and tuples only: hashed and compared in C at every lookup;
        # ``_value_``, not ``value``: the property runs Python code)
        key = (kind._value_, op, target_key,
               _structure(args, inputs) if args else None,
               _structure(kwargs, inputs) if kwargs else None,
               (site.path, site.kind, site.call) if site is not None else None, accessor,
               scope.invoke)
        node = Node(len(self.nodes), kind, op, target, args, kwargs,
                    list(dict.fromkeys(inputs)) if len(inputs) > 1 else inputs, line, scope,
                    site, accessor, skip, mutation, lenient, at_read=at_read)
        self.nodes.append(node)
        self._parts.append(key)
        if site is not None and (kind is Kind.READ or kind is Kind.WRITE):
            self.site_paths.add(site.path)
        return node

    def input(self, value: Any, line: Any = None) -> Node:
        """A placeholder for a real value (deduplicated by identity). For a tensor, the
        version of each use is kept: :meth:`check_inputs` refuses a run that would read a
        value changed in place after a line used it."""
        use = self._input_ids.get(id(value))
        if use is None:
            index = len(self.input_values)
            node = Node(len(self.nodes), Kind.INPUT, "placeholder", f"input_{index}", (), {},
                        [], input_index=index)
            self.nodes.append(node)
            self._parts.append((INPUT_PART, _value_key(value)))
            self.input_values.append(value)
            use = self._input_ids[id(value)] = (node, value, {})
        if isinstance(value, torch.Tensor):
            use[2].setdefault(tensor_version(value), line)  # the first line per version
        return use[0]

    def check_inputs(self) -> None:
        """Before running: no tensor the block used was changed in place after a line
        used it (the run reads tensors when the block ends, a line means the value it saw;
        copying every tensor at every use would cost memory and time)."""
        for _, value, uses in self._input_ids.values():
            now = tensor_version(value) if uses else None
            stale = [line for version, line in uses.items() if version != now]
            if stale and now is not None:
                raise TraceError(at_line(
                    f"a tensor of shape {tuple(value.shape)} used on this line is changed in "
                    "place later in the block; the interventions run when the block ends and "
                    "would all see its last value, not the one this line saw. Pass a copy "
                    "here (`value.clone()`)", stale[0]))

    def read(self, site: Site, accessor: str, scope: Scope, line: Any) -> Node:
        """A module's ``accessor`` (``"output"``, ``"input"``, ``"inputs"``) at ``site``."""
        return self._add(Kind.READ, "call_function", READ, (), {}, line, scope, site, accessor)

    def write(self, site: Site, accessor: str, value: Any, scope: Scope, line: Any) -> Node:
        """Replace a module's ``accessor`` at ``site`` with ``value``."""
        return self._add(Kind.WRITE, "call_function", WRITE, (value,), {}, line, scope, site,
                         accessor)

    def skip(self, site: Site, value: Any, scope: Scope, line: Any) -> Node:
        """``env.skip(value)``: a write of the module's output whose value may not depend
        on anything the module computes; the module does not run."""
        return self._add(Kind.WRITE, "call_function", SKIP, (value,), {}, line, scope, site,
                         "output", skip=True)

    def op(self, op: str, target: Any, args: tuple, kwargs: dict, scope: Scope, line: Any,
           lenient: bool = False, at_read: bool = False) -> Node:
        """Any operation on recorded values (``op`` is ``"call_function"`` or
        ``"call_method"``, as in torch.fx); ``at_read``: see ``Node.at_read``."""
        if op == "call_function" and not hasattr(target, "__name__"):
            target = Named(target)  # fx names nodes and code globals after __name__
        if op == "call_method" and target == "backward" or target is AUTOGRAD_GRAD:
            self.uses_gradients = True
        return self._add(Kind.OP, op, target, args, kwargs, line, scope,
                         mutation=is_mutation(op, target), lenient=lenient,
                         at_read=at_read)

    def grad(self, target: Node, scope: Scope, line: Any) -> Node:
        """``target.grad``: the gradient of the ``backward()`` loss with respect to it."""
        self.uses_gradients = True
        return self._add(Kind.GRAD, "call_function", GRAD, (target,), {}, line, scope)

    def grad_write(self, target: Node, value: Any, scope: Scope, line: Any) -> Node:
        """``target.grad = value``: replace the gradient flowing back through it."""
        self.uses_gradients = True
        return self._add(Kind.GRAD_WRITE, "call_function", GRAD_WRITE, (target, value), {},
                         line, scope)

    def copy(self, node: Node, resolve: Callable[[Node], Node],
             scope: Scope | None = None) -> Node:
        """Record a copy of another Program's ``node`` (in ``scope``, or its own);
        ``resolve`` maps the nodes among its arguments to this Program's."""
        if node.kind in (Kind.GRAD, Kind.GRAD_WRITE) or is_backward(node):
            self.uses_gradients = True
        return self._add(node.kind, node.op, node.target, map_nodes(node.args, resolve),
                         map_nodes(node.kwargs, resolve), node.line,
                         node.scope if scope is None else scope, node.site, node.accessor,
                         node.skip, node.mutation, node.lenient, node.at_read)

    def save(self, node: Node) -> None:
        if node not in self.saves:
            self.saves.append(node)

    # --- queries ----------------------------------------------------------------------
    def sites(self) -> set[Site]:
        return {n.site for n in self.nodes if n.kind in (Kind.READ, Kind.WRITE)}

    def is_empty(self) -> bool:
        return not self.nodes

    def structure_key(self) -> tuple:
        """A hashable description of the Program's structure, blind to input values."""
        return (*self._parts, ("saves", tuple(map(_INDEX, self.saves))))


class Named:
    """A callable without ``__name__`` (``operator.itemgetter(0)``, a ``functools.partial``,
    an object with ``__call__``) given one, so it can be an fx node target."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = type(fn).__name__

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Named) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(id(self.fn))


def own_rows(value: Any) -> Any:
    """A node target: ``value``, computed for every row of the batch, narrowed to the rows of
    the invoke the node is recorded in (the walkers narrow it; outside an invoke, and run
    directly, it is ``value``)."""
    return value


class ModuleCall:
    """A module of the model applied to recorded values (the logit lens), as a node target."""

    def __init__(self, module: torch.nn.Module, path: str):
        self.module = module
        self.path = path
        self.__name__ = (path or "model").replace(".", "_")

    def __call__(self, *args, **kwargs):
        return self.collect(lambda: self.module(*args, **kwargs))

    def collect(self, run: Callable[[], Any]) -> Any:
        """The value of the call ``run()`` makes of the module."""
        return run()

    def device(self) -> torch.device:
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleCall) and other.module is self.module

    def __hash__(self) -> int:
        return hash(id(self.module))


class HookedCall(ModuleCall):
    """``envoy(value, hook=True)``: the module applied with its submodules' boundaries
    visible. The value is ``{"result": output, "calls": {relative path: [{"inputs":
    (args, kwargs), "output": output}, one per call]}}`` (the module itself at ``""``);
    forward hooks collect it during the call and are removed after it."""

    def collect(self, run: Callable[[], Any]) -> Any:
        calls: dict[str, list] = {}

        def keeper(path: str) -> Callable:
            def hook(module, args, kwargs, output):
                calls.setdefault(path, []).append(
                    {"inputs": (tuple(args), dict(kwargs)), "output": output})
            return hook

        handles = [module.register_forward_hook(keeper(path), with_kwargs=True)
                   for path, module in self.module.named_modules()]
        try:
            result = run()
        finally:
            for handle in handles:
                handle.remove()
        return {"result": result, "calls": calls}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HookedCall) and other.module is self.module

    def __hash__(self) -> int:
        return hash((id(self.module), "hooked"))


# the constants a function's defaults and closure may hold for it to be keyed by its code
_CONSTANT_KINDS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _constant_key(value: Any) -> Any:
    """``value`` as a key that only an identical constant shares (``-0.0`` is not ``0.0``,
    ``True`` is not ``1``), or ``None`` where it is not a plain constant."""
    kind = type(value)
    if kind in _CONSTANT_KINDS:
        return (kind.__name__, repr(value))
    if kind is tuple:
        items = [_constant_key(v) for v in value]
        return None if any(item is None for item in items) else ("tuple", tuple(items))
    return None


def _function_key(fn: Any) -> Any:
    """A Python function as a node target's key: its code, defaults and closure where
    those hold plain constants only, so that a lambda made anew in each trace
    (``fxsight.apply(lambda t: t * 2, h)``) keeps one graph; itself (by identity)
    otherwise. Functions with equal keys compute the same thing: the same code over the
    same globals, with the same constants, and the very same closure cells (the graph
    calls the function it was made with: a cell of another scope could change after the
    key was taken; lambdas made in a loop of one scope share its cells)."""
    closure, defaults, kwdefaults = fn.__closure__, fn.__defaults__, fn.__kwdefaults__
    if fn.__dict__:  # (attributes set on it: not keyed by its code)
        return fn
    if closure is None and defaults is None and kwdefaults is None:  # (most functions)
        return ("function", fn.__code__, id(fn.__globals__))
    try:
        cells = tuple(cell.cell_contents for cell in closure or ())
    except ValueError:  # (an empty cell)
        return fn
    constants = _constant_key((defaults or (), tuple(sorted((kwdefaults or {}).items())),
                               cells))
    if constants is None:
        return fn
    return ("function", fn.__code__, id(fn.__globals__), constants,
            tuple(map(id, closure or ())))


def _safe_name(site: Site, accessor: str) -> str:
    name = (site.path or "model").replace(".", "_")
    return f"{name}_{accessor}" + (f"_{site.call}" if site.call else "")


def _value_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # (the device itself: its ``.type`` builds a string, microseconds on a cold cache)
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    return ("value", type(value).__name__)


_PLAIN_KINDS = frozenset({int, str, type(None), type(Ellipsis)})  # keyed by value
_WHOLE_SLICE = ("slice", None, None, None)  # ``:``'s key (as _structure makes it)


def _structure(value: Any, inputs: list[Node]) -> Any:
    """``value``'s structure (nodes by index) as a hashable key; its nodes go to ``inputs``."""
    kind = type(value)
    if kind is Node:
        inputs.append(value)
        return ("node", value.index)
    if kind in _PLAIN_KINDS:
        return value
    if kind is tuple or kind is list:  # (plain items, nodes and `:` inline: no call each)
        items = []
        for item in value:
            item_kind = type(item)
            if item_kind in _PLAIN_KINDS:
                items.append(item)
            elif item_kind is Node:
                inputs.append(item)
                items.append(("node", item.index))
            elif item_kind is slice and item.start is None and item.stop is None and \
                    item.step is None:
                items.append(_WHOLE_SLICE)
            else:
                items.append(_structure(item, inputs))
        return (kind.__name__, tuple(items))
    if kind is slice:
        start, stop, step = value.start, value.stop, value.step
        if type(start) in _PLAIN_KINDS and type(stop) in _PLAIN_KINDS and \
                type(step) in _PLAIN_KINDS:
            return ("slice", start, stop, step)
        return ("slice", _structure(start, inputs), _structure(stop, inputs),
                _structure(step, inputs))
    if kind is bool or kind is float:
        # tagged: ``True == 1 == 1.0`` would make ``x[:, True]`` share ``x[:, 1]``'s graph
        return (kind.__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v, inputs) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v, inputs)) for k, v in value.items()))
    try:
        hash(value)
        return (type(value), value)
    except TypeError:
        return ("id", id(value))


def origin(node: Node) -> str:
    """The module boundaries a recorded value comes from, as users name them
    (``"model.layer1.output"``), for error messages; ``""`` when it reads none."""
    labels: list[str] = []
    seen: set[Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.kind is Kind.READ:
            site = current.site
            label = f"{module_label(site.path)}.{current.accessor}" + \
                (f"#{site.call}" if site.call else "")
            if label not in labels:
                labels.append(label)
        stack.extend(reversed(current.all_input_nodes))
    return ", ".join(labels)


def map_nodes(value: Any, fn: Callable[[Node], Any]) -> Any:
    """Replace every Program node inside ``value`` (tuples, lists, dicts, slices) by
    ``fn(node)``."""
    if type(value) is Node:
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_nodes(v, fn) for v in value)
    if isinstance(value, list):
        return [map_nodes(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_nodes(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_nodes(value.start, fn), map_nodes(value.stop, fn),
                     map_nodes(value.step, fn))
    return value


def node_args(value: Any) -> list[Node]:
    """Every Program node inside ``value``."""
    found: list[Node] = []
    map_nodes(value, lambda n: found.append(n))
    return found


def execute(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Run one recorded operation on real (or meta) values."""
    if op == "call_method":
        self_value, *rest = args
        return getattr(self_value, target)(*rest, **kwargs)
    return target(*args, **kwargs)


# --- accessors: which part of a site's value the user means --------------------------
class NoArguments(IndexError):
    """``.input`` of a call made without arguments: there is no first input."""


def select(value: Any, accessor: str) -> Any:
    """The part of a site's value an accessor names.

    Input sites hold ``(args, kwargs)``: ``"inputs"`` is all of it, ``"input"`` the first
    positional argument (or first keyword argument when there are none).
    """
    if accessor in ("output", "inputs"):
        return value
    args, kwargs = value
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise NoArguments("the call was made without arguments")


def replace(value: Any, accessor: str, new: Any) -> Any:
    """A site's value with the part named by ``accessor`` replaced by ``new``."""
    if accessor in ("output", "inputs"):
        return new
    args, kwargs = value
    if args:
        return ((new, *args[1:]), kwargs)
    key = next(iter(kwargs))
    return (args, {**kwargs, key: new})


def leaves(value: Any) -> list[Any]:
    return pytree.tree_leaves(value)
