"""Operations: every call inside a module's ``forward`` as a site (nnsight's ``.source``).

A function's source is parsed once; each call in its body gets nnsight's name (the called
expression's dotted name joined by ``_``, and a counter per name: ``self_c_attn_0``,
``split_0``, ``attention_interface_0``; inner calls are named before the calls around
them). The *instrumented* version of the function is the same code with every call
``f(*args)`` routed through ``__fxsight_op__(f, "name")(*args)``: a dispatcher given by
:class:`~fxsight.capture.events.ModuleEvents` that makes the call's inputs and its return
value boundary events, sites ``<module path>.source.<name>`` of kind ``input``/``output``.

Nothing is installed anywhere by this module: the instrumented function is bound to a
module as an instance ``forward`` only while events are installed (capture, scan, the
hooks backend), and taken off in their ``finally``. The compiled code keeps the original
file name and line numbers, so tracebacks and the captured graph's ``stack_trace`` point
at the model's own lines.

An *operations spec* (hashable, part of the capture and scan cache keys) says what to
instrument: a frozenset of chains ``(forward function, op name, op name, ...)``; ``(f,)``
instruments ``f`` in every module whose class's ``forward`` is ``f``, ``(f, "a_0")``
also instruments the function that ``a_0`` calls, and so on.
"""

from __future__ import annotations

import __future__
import ast
import copy
import importlib.machinery
import inspect
import linecache
import textwrap
import types
import weakref
from collections import defaultdict
from dataclasses import dataclass
from types import CodeType
from typing import Any, Callable

import torch

SOURCE = "source"  # the path part between a module (or an operation) and an operation
DISPATCH = "__fxsight_op__"
MARK = "__fxsight_operations__"  # attribute of an instrumented function

# calls that cannot go through a wrapper: zero-argument ``super()`` reads the caller's
# frame, and so do ``locals()``, ``vars()``, ``globals()``
_UNWRAPPED = frozenset({"super", "locals", "vars", "globals"})


class SourceError(Exception):
    """A function whose source cannot be shown or instrumented (no source, a lambda...)."""


@dataclass
class Parsed:
    """A function's source with its operations."""

    reference: Any  # weakref.ref to the innermost function (decorators unwrapped)
    name: str
    filename: str
    first_line: int  # the ``def`` line in ``filename`` (1-based)
    lines: list[str]  # dedented source lines, ``lines[0]`` is the first line of the source
    def_index: int  # index in ``lines`` of the ``def`` line (after decorators)
    operations: dict[str, int]  # name -> index in ``lines``, in naming order
    factory: Callable  # factory(dispatch, *closure values) -> instrumented function
    decorators: list[tuple[str, Any]]  # (source, code) of each decorator, outermost first
    # name -> (line, column) of the call in its file: the same call of a function defined
    # inside another one has a name in each (see :func:`enclosing_names`)
    positions: dict[str, tuple[int, int]] = None

    @property
    def function(self) -> Callable:
        return self.reference()

    def nearest(self, name: str, n: int = 5) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, list(self.operations), n=n, cutoff=0.4)


class _Namer(ast.NodeTransformer):
    """nnsight's naming and the rewrite of each call."""

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)
        self.operations: dict[str, int] = {}
        self.positions: dict[str, tuple[int, int]] = {}  # (line, column in the parsed text)
        self.start: int | None = None
        self.decorators: list[ast.expr] = []

    @staticmethod
    def base(func: ast.AST) -> str:
        if isinstance(func, ast.Name):
            return func.id
        if isinstance(func, ast.Attribute):
            parts = []
            current = func
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name):
                parts.append(current.id)
            return "_".join(reversed(parts))
        return "unknown"

    def visit_FunctionDef(self, node):
        if self.start is not None:
            return self.generic_visit(node)  # (a function defined inside the forward)
        # the function itself: only its body runs in a call. Its decorators, defaults and
        # annotations are evaluated when it is defined: not operations, not rewritten
        self.start = node.lineno
        self.decorators = node.decorator_list
        node.decorator_list = []
        body = ast.Module(body=node.body, type_ignores=[])
        node.body = self.visit(body).body
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node):
        self.generic_visit(node)
        base = self.base(node.func)
        if isinstance(node.func, ast.Name) and node.func.id in _UNWRAPPED:
            return node
        index = self.counts[base]
        self.counts[base] = index + 1
        name = f"{base}_{index}"
        self.operations[name] = node.lineno - 1
        self.positions[name] = (node.lineno, node.col_offset)
        return ast.Call(
            func=ast.Call(func=ast.Name(id=DISPATCH, ctx=ast.Load()),
                          args=[node.func, ast.Constant(value=name)], keywords=[]),
            args=node.args, keywords=node.keywords)


# parsed functions, weakly by function (a class's forward lives as long as its class)
_PARSED: "weakref.WeakKeyDictionary[Callable, Parsed]" = weakref.WeakKeyDictionary()


def innermost(function: Any) -> Callable:
    """The plain function under bound methods and ``functools.wraps`` decorators."""
    function = getattr(function, "__func__", function)
    return inspect.unwrap(function)


def parse(function: Any) -> Parsed:
    """The operations of ``function`` (a function, a method, a decorated function), and
    a factory of its instrumented version. Raises :class:`SourceError`."""
    inner = innermost(function)
    cached = _PARSED.get(inner)
    if cached is not None:
        return cached
    if not inspect.isfunction(inner):
        raise SourceError(f"{_describe(function)} is not a Python function (no source to "
                          f"show)")
    if inner.__name__ == "<lambda>":
        raise SourceError(f"{_describe(function)} is a lambda")
    try:
        raw, first = inspect.getsourcelines(inner)
    except (OSError, TypeError) as error:
        raise SourceError(f"the source of {_describe(function)} is not available "
                          f"({error})") from None
    lines, tree, margin = _parsed_lines(raw, function)
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise SourceError(f"the source of {_describe(function)} is not a def statement")
    def_index = definition.lineno - 1
    owner = _defining_class(inner)
    freevars = _free_variables(inner)
    filename = inner.__code__.co_filename
    flags = inner.__code__.co_flags & _FUTURE_FLAGS
    if _compiled_from_its_file(inner):  # (see there: what can be compared)
        _check_unchanged(function, inner, _Mangler(owner).visit(copy.deepcopy(tree)),
                         freevars, filename, flags)
    namer = _Namer()
    # (named as written; ``self.__x`` in a method of ``Cls`` is then ``self._Cls__x``)
    tree = _Mangler(owner).visit(namer.visit(tree))
    definition = tree.body[0]
    module = _factory(definition, freevars)
    ast.increment_lineno(module, first - 1)
    # (its annotations are kept as strings: binding the copy evaluates none)
    code = compile(module, filename, "exec", dont_inherit=True,
                   flags=flags | __future__.annotations.compiler_flag)
    namespace: dict[str, Any] = {}
    exec(code, inner.__globals__, namespace)  # (binds the factory in ``namespace`` only)
    decorators = [(ast.unparse(d), compile(ast.Expression(body=d), filename, "eval"))
                  for d in namer.decorators] if inner is not getattr(
                      function, "__func__", function) else []
    parsed = Parsed(weakref.ref(inner), inner.__qualname__, filename, first + def_index, lines,
                    def_index,
                    namer.operations, namespace["__fxsight_factory__"], decorators,
                    {name: (first - 1 + line, margin + column)
                     for name, (line, column) in namer.positions.items()})
    _PARSED[inner] = parsed
    linecache.getlines(filename)  # (keep the file's lines for tracebacks)
    return parsed


def _factory(definition: ast.AST, freevars: list[str]) -> ast.Module:
    """``def __fxsight_factory__(dispatch, *free variables)`` returning the function
    ``definition`` defines: its free variables (a closure's, ``__class__`` for
    zero-argument ``super()``) are the factory's cells."""
    factory = ast.FunctionDef(
        name="__fxsight_factory__",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=DISPATCH)] +
                           [ast.arg(arg=v) for v in freevars],
                           kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[definition, ast.Return(value=ast.Name(id=definition.name, ctx=ast.Load()))],
        decorator_list=[], returns=None)
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    return module


# the compiler flags of ``from __future__ import ...`` (a function's copy keeps its own)
_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag


def _check_unchanged(function: Any, inner: Callable, tree: ast.Module, freevars: list[str],
                     filename: str, flags: int) -> None:
    """Raises :class:`SourceError` where the source text no longer compiles to the code
    that runs (the file was edited after the module was imported): an instrumented copy
    of it would run other code than the model's."""
    definition = tree.body[0]
    definition.decorator_list = []
    module = _factory(definition, freevars)
    try:
        code = compile(module, filename, "exec", flags=flags, dont_inherit=True)
    except SyntaxError:
        code = None
    factory = next((c for c in (code.co_consts if code else ()) if isinstance(c, CodeType)),
                   None)
    compiled = next((c for c in (factory.co_consts if factory else ())
                     if isinstance(c, CodeType) and c.co_name == definition.name), None)
    if compiled is None or not _same_code(compiled, inner.__code__):
        raise SourceError(
            f"the source of {_describe(function)} in {filename} is not the code that runs "
            f"(the file changed after it was imported): reload the module "
            f"(importlib.reload) or restart, then build the model again")


def _compiled_from_its_file(function: Callable) -> bool:
    """Whether ``function``'s module was compiled from its file as it was (Python's own
    loader), so that its code can be compared with the file's text: not where an import
    hook rewrote it (pytest's asserts), nor where compiled by hand from a string (the
    instrumented copy of a closure defined in a traced forward, a notebook's cell)."""
    if DISPATCH in function.__code__.co_freevars:
        return False
    loader = function.__globals__.get("__loader__")
    return type(loader) is importlib.machinery.SourceFileLoader


def _same_code(a: CodeType, b: CodeType) -> bool:
    """Whether two code objects are, as far as can be told apart, the same code: the same
    local variables, the same names read (globals, attributes, free variables) and the same
    numbers, here and in the functions they define. What else the compiler chooses depends
    on the rest of the module (a method call's opcodes, whether a recursive function finds
    itself as a global or a free variable, how a long call is built): not compared. An
    edit that changes only an operator or a string is not seen."""
    if a.co_varnames != b.co_varnames or \
            set(a.co_names + a.co_freevars) != set(b.co_names + b.co_freevars) or \
            sorted(map(repr, _numbers(a))) != sorted(map(repr, _numbers(b))):
        return False
    inner_a = [c for c in a.co_consts if isinstance(c, CodeType)]
    inner_b = [c for c in b.co_consts if isinstance(c, CodeType)]
    return len(inner_a) == len(inner_b) and \
        all(_same_code(x, y) for x, y in zip(inner_a, inner_b))


def _numbers(code: CodeType) -> list:
    return [c for c in code.co_consts
            if type(c) in (int, float, complex) and not isinstance(c, bool)]


def _defining_class(function: Callable) -> str | None:
    """The class whose body defines ``function`` (its private names are mangled), else
    ``None``."""
    parts = function.__qualname__.split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return None
    return parts[-2]


class _Mangler(ast.NodeTransformer):
    """Python's private-name mangling of a method of class ``owner``: ``__x`` (not ending
    in ``__``) is ``_owner__x`` in names, attributes, parameters and imports (not in
    keyword arguments of calls, as the compiler does)."""

    def __init__(self, owner: str | None):
        self.prefix = "_" + (owner or "").lstrip("_")
        self.active = bool((owner or "").lstrip("_"))
        self.top = True

    def mangled(self, name: str) -> str:
        if self.active and name.startswith("__") and not name.endswith("__") \
                and "." not in name:
            return self.prefix + name
        return name

    def visit_Name(self, node):
        node.id = self.mangled(node.id)
        return node

    def visit_Attribute(self, node):
        node.attr = self.mangled(node.attr)
        return self.generic_visit(node)

    def visit_arg(self, node):
        node.arg = self.mangled(node.arg)
        return self.generic_visit(node)

    def visit_alias(self, node):
        if node.asname:
            node.asname = self.mangled(node.asname)
        return node

    def visit_Global(self, node):
        node.names = [self.mangled(n) for n in node.names]
        return node

    visit_Nonlocal = visit_Global

    def visit_FunctionDef(self, node):
        if not self.top:
            node.name = self.mangled(node.name)
        self.top = False
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        return node  # (a class defined inside: its own mangling, rare; left as written)


def _free_variables(function: Callable) -> list[str]:
    """The free variables of ``function`` that its instrumented copy is given. A function
    defined inside an instrumented one (a closure of a traced forward) has the outer one's
    dispatcher among them: its copy has a dispatcher of its own instead."""
    return [name for name in function.__code__.co_freevars if name != DISPATCH]


def _parsed_lines(raw: list[str], function: Any) -> tuple[list[str], ast.Module, int]:
    """The dedented lines of a function's source and their syntax tree (line 1: its first
    line). A method whose body holds a string with lines at a smaller indent than its
    ``def`` (a multi-line string literal) cannot be dedented as a whole: it is parsed as
    the body of an ``if`` block, its lines shown without the ``def``'s indent. The third
    value is the columns the parsed text lacks at the left of the file's lines."""
    text = textwrap.dedent("".join(raw))
    first, dedented = raw[0], text.splitlines()[0] if text else ""
    margin = (len(first) - len(first.lstrip())) - (len(dedented) - len(dedented.lstrip()))
    try:
        return text.splitlines(), ast.parse(text), margin
    except SyntaxError:
        pass
    first = raw[0]
    indent = first[:len(first) - len(first.lstrip())]
    try:
        if not indent:
            raise SyntaxError("not an indentation problem")
        block = ast.parse("if True:\n" + "".join(raw))
    except SyntaxError as error:
        raise SourceError(f"the source of {_describe(function)} could not be parsed "
                          f"({error})") from None
    tree = ast.Module(body=block.body[0].body, type_ignores=[])
    ast.increment_lineno(tree, -1)
    lines = [line[len(indent):] if line.startswith(indent) else line
             for line in "".join(raw).splitlines()]
    return lines, tree, 0


# decorators that only change documentation: not applied again (they need the class)
_DOC_ONLY = frozenset({"auto_docstring", "add_start_docstrings",
                       "add_start_docstrings_to_model_forward", "replace_return_docstrings",
                       "add_code_sample_docstrings"})


def instrumented(function: Any, dispatch: Callable) -> Callable:
    """``function``'s instrumented version calling ``dispatch(fn, name)`` for each
    operation. Where ``function`` is decorated (``functools.wraps`` kind), its decorators
    are evaluated again in its module and applied around the instrumented function (but
    documentation-only ones); one that cannot be is a :class:`SourceError`."""
    parsed = parse(function)
    inner = parsed.function
    names = inner.__code__.co_freevars
    cells = [cell.cell_contents for name, cell in zip(names, inner.__closure__ or ())
             if name != DISPATCH]
    new = parsed.factory(dispatch, *cells)
    new.__defaults__ = inner.__defaults__
    new.__kwdefaults__ = inner.__kwdefaults__
    for text, code in reversed(parsed.decorators):
        if text.split("(")[0].rsplit(".", 1)[-1] in _DOC_ONLY:
            continue
        try:
            new = eval(code, inner.__globals__)(new)  # noqa: S307 - the model's own code
        except Exception as error:  # noqa: BLE001
            raise SourceError(f"{_describe(function)}: its decorator @{text} could not "
                              f"be applied again to an instrumented copy ({error})") from None
    setattr(new, MARK, True)
    return new


def _describe(function: Any) -> str:
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return f"{name}()" if name else repr(function)


def describe(function: Any) -> str:
    return _describe(innermost(function))


@dataclass(frozen=True)
class Opaque:
    """What an operation called that has no Python source of its own (a callee of
    ``ModuleEvents.callees`` that is not a function): a module, weakly, or a builtin."""

    name: str  # the builtin's name (``relu()``), or the module's class name
    module: Any = None  # weakref.ref to the module called, else None


def enclosing_dispatch(function: Any) -> Any:
    """The dispatcher of the instrumented function that defined ``function`` (a function
    defined inside an instrumented forward: its calls are operations of that forward
    too), else ``None``."""
    inner = getattr(function, "__func__", function)
    names = getattr(getattr(inner, "__code__", None), "co_freevars", ())
    if DISPATCH not in names:
        return None
    return inner.__closure__[names.index(DISPATCH)].cell_contents


def enclosing_names(outer: Any, inner: Any) -> dict[str, str]:
    """``inner``'s operation names -> the names the same calls have in ``outer``'s source,
    the function whose body defines ``inner`` (``torch_tanh_0`` of a closure can be
    ``torch_tanh_1`` of the forward that defines it)."""
    outer_names = {position: name for name, position in parse(outer).positions.items()}
    return {name: outer_names[position] for name, position in parse(inner).positions.items()
            if position in outer_names}


@dataclass(frozen=True)
class Differing:
    """What ``.source`` of an operation shows where its calls called different functions
    (``for f in (a, b): x = f(x)``): nothing, an error naming both (``first`` and
    ``other``, as :func:`callee` gives them)."""

    first: Any
    other: Any


def same_callee(a: Any, b: Any) -> bool:
    """Whether two :func:`callee` values are the same function (a closure's copies, made
    per call, by their code)."""
    if inspect.isfunction(a) and inspect.isfunction(b):
        return a is b or a.__code__ is b.__code__
    return a == b


def merged_callee(known: Any, called: Any) -> Any:
    """What an operation that called ``known`` before and ``called`` now shows: ``known``
    where they are the same function, else a :class:`Differing`."""
    if known is None or isinstance(known, Differing) or same_callee(known, called):
        return called if known is None else known
    return Differing(known, called)


def callee(fn: Any) -> Any:
    """What ``.source`` of an operation calling ``fn`` shows: its plain function, else an
    :class:`Opaque` (keeps no module, no tensor alive)."""
    function = getattr(fn, "__func__", fn)
    if inspect.isfunction(function):
        return _without_variables(innermost(function))
    if isinstance(fn, torch.nn.Module):
        return Opaque(type(fn).__name__, weakref.ref(fn))
    name = getattr(fn, "__name__", None)
    return Opaque(f"{name}()" if isinstance(name, str) else f"a {type(fn).__name__} object")


def _without_variables(function: Callable) -> Callable:
    """``function``, or where it is a closure a call made (a function defined inside
    another one, the forward), a copy of it with empty cells: its source and names are its
    code's, and the caches keep neither that call's variables (its tensors) nor the
    instrumented forward's dispatcher (and through it the model)."""
    if not function.__closure__ or "<locals>" not in function.__qualname__:
        return function
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              None, tuple(types.CellType() for _ in function.__closure__))
    copy.__qualname__ = function.__qualname__
    return copy


# --- specs -------------------------------------------------------------------------------
def split_path(model: torch.nn.Module, path: str, modules: dict | None = None
               ) -> tuple[str, tuple[str, ...]] | None:
    """``(module path, (op, op, ...))`` of an operation site's path
    (``"h.0.attn.source.attention_interface_0.source.softmax_0"`` ->
    ``("h.0.attn", ("attention_interface_0", "softmax_0"))``), or ``None`` for a module's
    path."""
    parts = path.split(".") if path else []
    if SOURCE not in parts:
        return None
    modules = dict(model.named_modules()) if modules is None else modules
    for i, part in enumerate(parts):
        if part != SOURCE:
            continue
        prefix = ".".join(parts[:i])
        if prefix in modules and f"{prefix}.{SOURCE}".lstrip(".") not in modules:
            ops = parts[i + 1:]
            if len(ops) % 2 == 1 and all(p == SOURCE for p in ops[1::2]):
                return prefix, tuple(ops[0::2])
    return None


def module_forward(module: torch.nn.Module) -> Callable:
    """The function a module's calls run: its class's ``forward``."""
    return type(module).forward


def forward_slot(module: torch.nn.Module) -> str | None:
    """The instance attribute an instrumented forward is bound to while events are
    installed: ``"forward"``; ``"_old_forward"`` for a module accelerate dispatched
    (``add_hook_to_module`` gives the instance a ``forward`` of its own, which runs its
    hook around ``module._old_forward``, the class's ``forward`` bound); ``None`` for any
    other ``forward`` of the instance's own (not instrumented)."""
    attributes = vars(module)
    if "forward" not in attributes:
        return "forward"
    old = attributes.get("_old_forward")
    if "_hf_hook" in attributes and getattr(old, "__func__", None) is type(module).forward \
            and getattr(old, "__self__", None) is module:
        return "_old_forward"
    return None


def spec_for(model: torch.nn.Module, paths: Any) -> frozenset:
    """The operations spec the sites at ``paths`` need (empty where none is an
    operation)."""
    chains = set()
    modules = None
    for path in paths:
        if SOURCE not in path:
            continue
        if modules is None:
            modules = dict(model.named_modules())
        found = split_path(model, path, modules)
        if found is None:
            continue
        module_path, ops = found
        forward = module_forward(modules[module_path])
        for depth in range(len(ops)):
            chains.add((forward, *ops[:depth]))
    return frozenset(chains)


def tree_of(spec: frozenset, forward: Any) -> dict | None:
    """The nested instrumentation under ``forward``: ``{op: {op: {...}}}`` (``{}``: only
    ``forward``'s own operations), or ``None`` where ``forward`` is not instrumented."""
    tree = None
    for chain in spec:
        if chain[0] is not forward:
            continue
        tree = {} if tree is None else tree
        node = tree
        for op in chain[1:]:
            node = node.setdefault(op, {})
    return tree
