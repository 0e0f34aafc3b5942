"""An invoke's model inputs: positional and keyword inputs checked against the model's
``forward``, their batch size, and several invokes' inputs batched into one forward pass.

Every check here runs when an invoke is added (or ``trace(...)`` opened), so bad input is
a :class:`~fxsight.errors.TraceError` naming the user's line before anything runs:

- a keyword that is not a parameter of ``forward`` (and ``forward`` takes no
  ``**kwargs``) names the keyword, the model class and the close matches; where
  ``forward`` has ``**kwargs`` (transformers models: a misspelled keyword is ignored
  there), a keyword that is no known name but close to one is refused the same way;
- inputs ``forward`` cannot bind (a missing required argument, a value given twice);
- an invoke without any tensor input;
- inputs that disagree on the batch size: the first positional tensor and every keyword
  tensor that always holds one row per example (``input_ids``, ``attention_mask``,
  ``pixel_values``, ... see :data:`BATCH_KEYWORDS`).

Invokes are batched leaf by leaf (a keyword's value may be a container of tensors): a
tensor with one row per example in every invoke is concatenated along dimension 0 (its
other dimensions must agree); a tensor that has another first dimension in every invoke is
shared and must be equal in all of them; other values (``use_cache=False``) must be equal.
A tensor whose first dimension happens to equal its invoke's batch size is taken as one
row per example.
"""

from __future__ import annotations

import difflib
import inspect
import typing
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .._torch import pytree
from ..errors import InputError, TraceError, at_line

# keyword inputs that hold one row per example whenever they are tensors
BATCH_KEYWORDS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
    "labels", "pixel_values", "pixel_mask", "decoder_input_ids", "decoder_attention_mask",
    "decoder_inputs_embeds", "decoder_position_ids", "input_features", "input_values",
    "bool_masked_pos",
})
# keywords transformers' forward decorators take besides the signature's
_DECORATOR_KEYWORDS = frozenset({"return_dict", "output_attentions", "output_hidden_states"})
_CLOSE = 0.8  # difflib ratio above which an unknown keyword is taken for a misspelling


class ForwardSignature:
    """What a ``forward`` takes: its named parameters, whether it has ``*args`` or
    ``**kwargs``, and the keys of a ``**kwargs: Unpack[SomeTypedDict]`` annotation."""

    def __init__(self, signature: inspect.Signature, typed: frozenset[str] | None):
        self.signature = signature
        params = list(signature.parameters.values())
        self.names = tuple(p.name for p in params
                           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        self.positional = tuple(p.name for p in params
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self.keywords = frozenset(p.name for p in params  # may be passed by name
                                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        self.var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        self.typed = typed
        # (number of positional inputs, keyword names) that passed check_keywords: the
        # check depends on nothing else (bounded: cleared when full)
        self.accepted: set[tuple[int, tuple]] = set()

    def known(self) -> frozenset[str]:
        """Every keyword name ``forward`` is known to use."""
        return frozenset(self.keywords) | (self.typed or frozenset()) | (
            _DECORATOR_KEYWORDS if self.var_keyword else frozenset())


MAX_ACCEPTED = 64  # input layouts remembered per forward signature as accepted

_SIGNATURES: "weakref.WeakKeyDictionary[Any, ForwardSignature | None]" = \
    weakref.WeakKeyDictionary()


def forward_signature(module: torch.nn.Module) -> ForwardSignature | None:
    """The signature of ``module.forward`` (cached per function), or ``None`` where it
    cannot be read."""
    forward = module.forward
    function = getattr(forward, "__func__", forward)
    try:
        return _SIGNATURES[function]
    except (KeyError, TypeError):
        pass
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        found = None
    else:
        found = ForwardSignature(signature, _typed_keywords(forward, signature))
    try:
        _SIGNATURES[function] = found
    except TypeError:  # not weak-referenceable: not cached
        pass
    return found


def _typed_keywords(forward: Any, signature: inspect.Signature) -> frozenset[str] | None:
    """The keys of ``**kwargs: Unpack[TypedDict]`` (transformers' ``TransformersKwargs``)."""
    var = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    if not var or var[0].annotation is inspect.Parameter.empty:
        return None
    annotation = var[0].annotation
    if isinstance(annotation, str):
        try:
            annotation = inspect.signature(forward, eval_str=True).parameters[
                var[0].name].annotation
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: unknown
            return None
    if typing.get_origin(annotation) is not typing.Unpack:
        return None
    (typed,) = typing.get_args(annotation) or (None,)
    keys = getattr(typed, "__annotations__", None)
    return frozenset(keys) if isinstance(keys, dict) else None


def describe(invoke: Any) -> str:
    """How an error names the invoke: ``invoke #i`` (``trace(inputs)``'s is #0); the input
    of a run without a trace (``None``, or an ``Alone``): ``the input``."""
    index = getattr(invoke, "index", None)
    return "the input" if index is None else f"invoke #{index}"


def earlier_invokes(invoke: Any) -> list:
    """The invokes recorded before ``invoke`` in its trace (none where it has no tracer:
    ``None``, or the input of a run without a trace)."""
    tracer = getattr(invoke, "tracer", None)
    return tracer.invokes if tracer is not None else []


def _model_name(module: torch.nn.Module) -> str:
    return f"{type(module).__name__}.forward"


# --- one invoke ---------------------------------------------------------------------------
def expand_mapping(module: torch.nn.Module, args: tuple, kwargs: dict, where: str,
                   line: Any) -> tuple[tuple, dict]:
    """A single positional dict of keyword inputs (a tokenizer's ``BatchEncoding``, or a
    dict whose keys are all parameters of ``forward``) becomes keyword inputs."""
    if len(args) != 1:
        return args, kwargs
    value = args[0]
    if not (is_batch_encoding(value) or isinstance(value, Mapping)):
        return args, kwargs
    data = dict(value.items())
    if not is_batch_encoding(value):
        signature = forward_signature(module)
        if signature is None or not data or not all(
                isinstance(k, str) and k in signature.keywords for k in data):
            return args, kwargs  # the model takes a dict as its input
    twice = [k for k in data if k in kwargs]
    if twice:
        raise TraceError(at_line(f"{where}: {twice[0]!r} is given twice (in the input dict "
                                 f"and as a keyword)", line))
    return (), {**data, **kwargs}


def is_batch_encoding(value: Any) -> bool:
    """Whether ``value`` is a transformers ``BatchEncoding`` (without importing it)."""
    return type(value).__name__ == "BatchEncoding" and hasattr(value, "items")


# options of nnsight's trace() before 0.5 that fxsight has no use for (a model's forward
# that takes a keyword of that name gets it, as in a plain call)
_NNSIGHT_TRACE_OPTIONS = frozenset({"scan", "validate"})


def check_keywords(module: torch.nn.Module, args: tuple, kwargs: dict, where: str,
                   line: Any) -> None:
    """Raise unless ``module.forward`` takes these inputs (see the module docstring)."""
    signature = forward_signature(module)
    if signature is None:
        return
    layout = (len(args), tuple(kwargs))
    if layout in signature.accepted:
        return  # (these keyword names and this many positional inputs passed before)
    known = signature.known()
    for name in kwargs:
        if name in signature.keywords or (signature.var_keyword and name in known):
            continue
        close = difflib.get_close_matches(name, sorted(known | set(signature.names)), n=3,
                                          cutoff=_CLOSE if signature.var_keyword else 0.6)
        if signature.var_keyword and not close:
            continue  # forward's **kwargs takes it, as in a plain call
        hint = f"; did you mean {_or(close)}?" if close else \
            f"; it takes {_and(signature.keywords)}" if signature.keywords else \
            "; it takes no keyword inputs"
        if name in _NNSIGHT_TRACE_OPTIONS and not close:
            hint += (f" (nnsight's {name}= option, before 0.5, is not needed: every trace's "
                     f"shapes are checked before it runs; leave it out)")
        kind = " (it would go to forward's **kwargs, where a misspelled name is ignored)" \
            if signature.var_keyword else ""
        raise TraceError(at_line(f"{where}: {name!r} is not a parameter of "
                                 f"{_model_name(module)}{kind}{hint}", line))
    try:
        signature.signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TraceError(at_line(f"{where}: {_model_name(module)} cannot take these inputs: "
                                 f"{error}", line)) from None
    if len(signature.accepted) >= MAX_ACCEPTED:
        signature.accepted.clear()
    signature.accepted.add(layout)


_PLAIN_OPTIONS = frozenset({bool, int, float, str, type(None)})  # (``use_cache=False``)


def plain_batch_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
    """The common case of an invoke's inputs, checked in one pass: tensors passed
    positionally, all with the same first dimension (their rows), plain keyword values
    (``use_cache=False``), in a layout ``forward`` took before. Returns the number of rows,
    or ``None`` where the full checks decide (:func:`expand_mapping`,
    :func:`check_keywords`, :func:`batch_size`): they would change nothing here."""
    if not args:
        return None
    size = None
    for value in args:
        if type(value) is not torch.Tensor or value.dim() == 0:
            return None
        if size is None:
            size = value.shape[0]
        elif value.shape[0] != size:
            return None
    for value in kwargs.values():
        if type(value) not in _PLAIN_OPTIONS:
            return None
    signature = forward_signature(module)
    if signature is not None and (len(args), tuple(kwargs)) not in signature.accepted:
        return None
    return size


def named_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """Each top-level input with its name: a keyword's, a positional input's parameter
    name, or ``argument i``."""
    signature = forward_signature(module)
    positional = signature.positional if signature is not None else ()
    named = [(positional[i] if i < len(positional) else f"argument {i}", value)
             for i, value in enumerate(args)]
    named.extend(kwargs.items())
    return named


def batch_size(named: list[tuple[str, Any]], first_positional: bool, where: str,
               line: Any) -> int:
    """The number of rows of an invoke's inputs; raises where the inputs that always hold
    one row per example disagree, or where no input is a tensor."""
    rows: list[tuple[str, int]] = []
    for i, (name, value) in enumerate(named):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and (
                name in BATCH_KEYWORDS or (i == 0 and first_positional)):
            rows.append((name, value.shape[0]))
    if len({n for _, n in rows}) > 1:
        sizes = ", ".join(f"{name} has {n}" for name, n in rows)
        raise TraceError(at_line(f"{where}: the inputs disagree on the batch size ({sizes} "
                                 f"rows); every input of an invoke holds its rows", line))
    if rows:
        return rows[0][1]
    for _, value in named:
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                return leaf.shape[0]
    given = ", ".join(name for name, _ in named)
    what = f"its inputs ({given}) hold no tensor with a batch dimension" if given else \
        "it passes no input"
    raise InputError(at_line(
        f"{where} has no input: {what}. Pass the model's inputs (positionally or as "
        f"keywords, e.g. input_ids=...); `tracer.invoke()` with nothing in it is a block "
        f"over the whole batch", line))


# --- several invokes ------------------------------------------------------------------------
def _leaves(value: Any, name: str) -> tuple[list[tuple[str, Any]], Any]:
    """``value``'s leaves named after their place in it, and its structure."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple, dict)):
        return [(name, value)], None
    leaves, spec = pytree.tree_flatten_with_path(value)
    return [(name + pytree.keystr(path), leaf) for path, leaf in leaves], spec


def check_batchable(first: tuple[tuple, dict, int], other: tuple[tuple, dict, int],
                    index: int, line: Any) -> None:
    """Raise unless invoke ``index``'s prepared inputs can share a batch with invoke #0's
    (see the module docstring for the rule)."""
    if not plainly_batchable(first, other):
        _batched(first, other, index, line)


def plainly_batchable(first: tuple[tuple, dict, int], other: tuple[tuple, dict, int]) -> bool:
    """The common case of :func:`_batched` that passes, checked without naming leaves:
    positional tensors of one row per example, of one dtype and the same other dimensions,
    and the same keywords with equal plain values (``use_cache=False``). ``False``: the
    full check decides (and says why it refuses)."""
    args0, kwargs0, rows0 = first
    args1, kwargs1, rows1 = other
    if len(args0) != len(args1) or kwargs0.keys() != kwargs1.keys():
        return False
    for v0, v1 in zip(args0, args1):
        if type(v0) is not torch.Tensor or type(v1) is not torch.Tensor or \
                v0.dim() == 0 or v1.dim() == 0 or v0.shape[0] != rows0 or \
                v1.shape[0] != rows1 or v0.shape[1:] != v1.shape[1:] or v0.dtype != v1.dtype:
            return False
    for key, v0 in kwargs0.items():
        v1 = kwargs1[key]
        if type(v0) not in _PLAIN_OPTIONS or type(v1) not in _PLAIN_OPTIONS or not v0 == v1:
            return False
    return True


def batch(prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict]:
    """Several invokes' inputs as one batch (each checked with :func:`check_batchable`)."""
    if len(prepared) == 1:
        return prepared[0][0], prepared[0][1]
    first_args, first_kwargs, _ = prepared[0]
    columns = [_batched(prepared[0], other, i, None) for i, other in
               enumerate(prepared[1:], 1)]
    args = tuple(_join(first_args[i], [c[0][i] for c in columns])
                 for i in range(len(first_args)))
    kwargs = {key: _join(first_kwargs[key], [c[1][key] for c in columns])
              for key in first_kwargs}
    return args, kwargs


class _Leaf:
    """How a leaf is batched: ``concat`` (one row per example) or ``shared``."""

    def __init__(self, concat: bool, value: Any):
        self.concat = concat
        self.value = value


def _batched(first: tuple[tuple, dict, int], other: tuple[tuple, dict, int], index: int,
             line: Any) -> tuple[list, dict]:
    """Check ``other`` against ``first`` (invoke #0); returns ``other``'s inputs with each
    leaf marked as concatenated or shared."""
    args0, kwargs0, rows0 = first
    args1, kwargs1, rows1 = other
    if len(args1) != len(args0):
        raise TraceError(at_line(
            f"invoke #{index} passes {len(args1)} positional inputs, invoke #0 {len(args0)}; "
            f"the invokes of a trace run in one batch", line))
    if set(kwargs1) != set(kwargs0):
        lacks = [k for k in kwargs0 if k not in kwargs1]
        adds = [k for k in kwargs1 if k not in kwargs0]
        differ = "; ".join(part for part in (
            f"it lacks {', '.join(lacks)}" if lacks else "",
            f"it adds {', '.join(adds)}" if adds else "") if part)
        raise TraceError(at_line(
            f"invoke #{index} passes other keyword inputs than invoke #0 ({differ}); the "
            f"invokes of a trace run in one batch", line))
    pairs = [(f"positional input {i}", a0, a1) for i, (a0, a1) in
             enumerate(zip(args0, args1))]
    pairs += [(key, kwargs0[key], kwargs1[key]) for key in kwargs0]
    marked = []
    for name, value0, value1 in pairs:
        leaves0, spec0 = _leaves(value0, name)
        leaves1, spec1 = _leaves(value1, name)
        if spec0 != spec1 or len(leaves0) != len(leaves1):
            raise TraceError(at_line(
                f"invokes #0 and #{index} pass {name} in different structures; invokes "
                f"must pass inputs of the same structure to be batched together", line))
        marks = [_mark(leaf_name, v0, v1, rows0, rows1, index, line)
                 for (leaf_name, v0), (_, v1) in zip(leaves0, leaves1)]
        marked.append((spec0, marks))
    return marked[:len(args0)], dict(zip(kwargs0, marked[len(args0):]))


def _mark(name: str, v0: Any, v1: Any, rows0: int, rows1: int, index: int,
          line: Any) -> _Leaf:
    pair, shown = f"invokes #0 and #{index}", _shown(name)
    tensors = isinstance(v0, torch.Tensor), isinstance(v1, torch.Tensor)
    if tensors == (True, True):
        batched0 = v0.dim() > 0 and v0.shape[0] == rows0
        batched1 = v1.dim() > 0 and v1.shape[0] == rows1
        if batched0 and batched1:
            if v0.shape[1:] != v1.shape[1:]:
                raise TraceError(at_line(
                    f"{pair} give {shown} of shapes {tuple(v0.shape)} and {tuple(v1.shape)}: "
                    f"the invokes' inputs are concatenated along the batch dimension, so "
                    f"their other dimensions must agree (pad them to one length; "
                    f"LanguageModel pads token ids itself)", line))
            if v0.dtype != v1.dtype:
                raise TraceError(at_line(
                    f"{pair} give {shown} of dtypes {v0.dtype} and {v1.dtype}; the invokes "
                    f"of a trace run in one batch", line))
            return _Leaf(True, v1)
        if not batched0 and not batched1 and v0.shape == v1.shape and (
                v0 is v1 or torch.equal(v0, v1.to(v0.device))):
            return _Leaf(False, v1)
        raise TraceError(at_line(
            f"{pair} disagree on {shown} ({_brief(v0, rows0)} vs {_brief(v1, rows1)}): an "
            f"input is either one row per example in every invoke (concatenated) or the "
            f"same in all of them", line))
    if tensors != (False, False) or not _same(v0, v1):
        raise TraceError(at_line(
            f"{pair} disagree on {shown} ({_brief(v0, rows0)} vs {_brief(v1, rows1)}); the "
            f"invokes of a trace run in one batch, with one value of each non-tensor input",
            line))
    return _Leaf(False, v1)


def _join(first: Any, marked: list[tuple[Any, list[_Leaf]]]) -> Any:
    """Invoke #0's value of one input joined with the other invokes' marked leaves."""
    spec, marks0 = marked[0]
    leaves0 = [first] if spec is None else pytree.tree_leaves(first)
    joined = []
    for j, leaf in enumerate(leaves0):
        if marks0[j].concat:
            joined.append(torch.cat([leaf, *(m[j].value.to(leaf.device)
                                             for _, m in marked)], dim=0))
        else:
            joined.append(leaf)
    return joined[0] if spec is None else pytree.tree_unflatten(joined, spec)


def _shown(name: str) -> str:
    return name if name.startswith("positional input") else repr(name)


def _brief(value: Any, rows: int) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} with {rows} rows in the invoke"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality
        return a is b


def _or(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _and(names: Any) -> str:
    return ", ".join(sorted(names))
