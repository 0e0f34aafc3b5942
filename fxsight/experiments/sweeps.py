"""The batching engine behind patching and steering sweeps.

A sweep is many *cells* (patch this site of this layer at this position; add this vector at
this layer with this scale). Every cell is one forward pass of the same prompt that differs
from an unpatched run from one layer on. The engine runs them like this:

- **Reference activations once.** One trace per prompt saves every site the cells need.
- **Prefix reuse.** A cell that changes layer ``l`` starts from the unpatched run's values
  at layer ``l``: the modules before the patched site are *skipped* with the saved values
  (``envoy.skip(value)``, see :class:`Target`), so in the fx backend nothing before layer
  ``l`` is in the rewritten graph (pruned: no saved value or write needs it). A
  residual-stream cell skips the block itself with the patched residual stream: only the
  blocks after ``l`` and the head run. (Skipping rather than writing ``block.input``: a
  write keeps the replaced value's computation alive, as the shape it is conformed to.)
- **Batches of one structure.** The cells of one (site kind, layer) run as rows of a batch
  (of one pair, or of several pairs of one length: see :mod:`.jobs`);
  each row's patched value is built beforehand and brought into the trace as a tensor (a
  Program input), so every batch of the group has the same Program structure, the last
  batch is padded to the batch size, and the runner cache makes every batch after the first
  a cache hit (no new splice, no new validation).
- **Batch size** from a memory budget (an estimate of one row's activation memory), or
  given.
- **Only the logits the metric reads.** When the metric only looks at the last position
  (checked on the clean logits) and the model takes ``logits_to_keep``, the head runs on
  the last position only.

Nothing here is specific to GPT-2 or Llama beyond :data:`ATTENTION_NAMES` and
:data:`MLP_NAMES`, the names under which blocks keep their attention and MLP modules.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from .._torch import pytree

from ..api.envoy import Envoy
from ..record.proxy import Proxy

KINDS = ("resid", "attn", "mlp", "resid_pre")
ATTENTION_NAMES = ("attn", "self_attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of activations per batch (1 GiB)


# --- where the sites are ---------------------------------------------------------------------
@dataclass
class Layout:
    """The model's stack of blocks and, per block, its attention and MLP modules."""

    blocks: list[Envoy]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def site(self, kind: str, layer: int) -> Envoy:
        """The module whose output is the ``kind`` site of ``layer``: the block itself for
        ``"resid"`` (its output is the residual stream) and ``"resid_pre"`` (its input),
        else its attention or MLP."""
        block = self.blocks[layer]
        if kind in ("resid", "resid_pre"):
            return block
        names = {"attn": ATTENTION_NAMES, "mlp": MLP_NAMES}.get(kind)
        if names is None:
            raise ValueError(f"unknown site kind {kind!r}; the kinds are {', '.join(KINDS)}")
        children = dict(block._module.named_children())
        for name in names:
            if name in children:
                return getattr(block, name)
        raise ValueError(f"{block.path} ({type(block._module).__name__}) has no {kind} module "
                         f"(looked for {', '.join(names)}; it has {', '.join(children)})")


def find_layout(model: Envoy, blocks: Any = None) -> Layout:
    """The blocks of ``model``: ``blocks`` where given (the path of a ``ModuleList``, such
    as ``"model.decoder.layers"``, or its envoy), else its one outermost ``ModuleList`` of
    blocks (``transformer.h`` of GPT-2, ``model.layers`` of Llama; not the experts of a
    block, however many).

    The candidates are the ``ModuleList`` modules not inside another's items whose items have
    submodules (blocks; where none has, every outermost ``ModuleList``). Where there are
    several (an encoder-decoder model's encoder and decoder blocks), which one is meant
    cannot be told: a ``ValueError`` lists them and asks for ``blocks=``."""
    if blocks is not None:
        return Layout(list(_module_list(model, blocks)))
    lists = [(path, module) for path, module in model._module.named_modules()
             if isinstance(module, torch.nn.ModuleList)]
    outermost = [(path, module) for path, module in lists
                 if not any(path.startswith(f"{outer}.") for outer, _ in lists
                            if outer != path)]
    stacks = [(path, module) for path, module in outermost
              if len(module) and all(next(item.children(), None) is not None
                                     for item in module)]
    candidates = stacks or outermost
    if not candidates:
        raise ValueError("the model has no ModuleList of blocks to sweep over")
    if len(candidates) > 1:
        listed = ", ".join(f"{path!r} ({len(module)} x {type(module[0]).__name__})"
                           if len(module) else f"{path!r} (empty)"
                           for path, module in candidates)
        raise ValueError(f"the model has several stacks of blocks: {listed}; say which one "
                         f"to sweep over with blocks= (e.g. blocks={candidates[0][0]!r})")
    return Layout(list(_module_list(model, candidates[0][0])))


def _module_list(model: Envoy, blocks: Any) -> Envoy:
    """The envoy of the ``ModuleList`` ``blocks`` names (a path or an envoy), checked."""
    if isinstance(blocks, Envoy):  # (the model's own envoy of that module)
        paths = [path for path, module in model._module.named_modules()
                 if module is blocks._module]
        if not paths:
            raise ValueError(f"blocks={blocks.path!r} ({type(blocks._module).__name__}) is not "
                             f"a module of the model swept over")
        blocks = paths[0]
    if isinstance(blocks, str):
        envoy = model
        for part in blocks.split("."):
            if part not in dict(envoy._module.named_children()):
                raise ValueError(f"blocks={blocks!r}: the model has no module {blocks!r} "
                                 f"({type(envoy._module).__name__} has no {part!r})")
            envoy = getattr(envoy, part)
    else:
        raise TypeError(f"blocks must be the path of a ModuleList (a string) or its envoy, "
                        f"not {type(blocks).__name__}")
    if not isinstance(envoy._module, torch.nn.ModuleList) or not len(envoy._module):
        raise ValueError(f"blocks={blocks!r} is a "
                         f"{type(envoy._module).__name__}, not a non-empty ModuleList of "
                         f"blocks")
    return envoy


@dataclass(frozen=True)
class Target:
    """A value a sweep reads and replaces: a module's output, or its first input."""

    envoy: Envoy
    accessor: str = "output"  # or "input"

    @property
    def key(self) -> str:
        return f"{self.envoy.path}.{self.accessor}"

    def read(self) -> Any:
        return self.envoy.input if self.accessor == "input" else self.envoy.output

    def replace(self, value: Any) -> None:
        """Inside a trace: the module is skipped with ``value`` (so nothing that only feeds
        it is computed), or its input is replaced."""
        if self.accessor == "input":
            self.envoy.input = value
        else:
            self.envoy.skip(value)


def check_kinds(kinds: Sequence[str] | str) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"sites must be some of {', '.join(map(repr, KINDS))}, not {kinds!r}")
    check_distinct(kinds, kinds, "site")
    return kinds


def check_distinct(labels: list, given: list, what: str, unit: str = "") -> None:
    """Raise where two of ``given`` (as the caller wrote them) are one label of a result's
    axis (``labels``, the same entries normalized): the axis would name one cell twice, and
    ``result.sel`` would find only the first."""
    seen: dict = {}
    for label, value in zip(labels, given):
        if label in seen:
            same = f"{what}s {seen[label]!r} and {value!r} are the same {what}{unit}" \
                if seen[label] != value else f"{what} {value!r} is given twice"
            raise ValueError(f"{same}: give each {what} once (a result's axis labels each "
                             f"of its cells once)")
        seen[label] = value


def integers(values: Any, what: str) -> list[int]:
    """One integer or an iterable of them (Python, NumPy or integer tensor elements) as
    a list of ints; anything else (a bool, a float) is a ``ValueError`` naming it."""
    try:
        values = [values] if not isinstance(values, (str, bytes)) and \
            operator.index(values) is not None else values
    except TypeError:
        pass
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{what}s must be an integer or a list of integers, not "
                         f"{values!r}") from None
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            out.append(operator.index(item))
        except TypeError:
            raise ValueError(f"{what} {item!r} is not an integer") from None
    return out


def check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = integers(layers, "layer")
    if not layers:
        raise ValueError("layers is empty: give at least one layer (None: all of them)")
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers")
    chosen = [layer % n_layers for layer in layers]
    check_distinct(chosen, layers, "layer", f" (of {n_layers})")
    return chosen


def check_positions(positions: Any, length: int) -> list[int]:
    """``"all"``, an int or a list of ints (negative ones count from the end), as positions
    of a prompt of ``length`` tokens; an empty list, one out of range, or two that are one
    token (``1`` and ``-4`` of 5) are a ``ValueError``."""
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be 'all' or a list of token positions, "
                             f"not {positions!r}")
        return list(range(length))
    positions = check_position_labels(integers(positions, "position"), length)
    chosen = [p % length for p in positions]
    check_distinct(chosen, positions, "position", f" of the {length}-token prompt")
    return chosen


def check_position_labels(positions: list[int], length: int) -> list[int]:
    """``positions`` (ints) checked to be some, each in range for ``length`` tokens."""
    if not positions:
        raise ValueError("positions is empty: give at least one token position ('all': "
                         "every one)")
    for p in positions:
        if not -length <= p < length:
            raise ValueError(f"position {p!r} is out of range for {length} tokens")
    return positions


# --- inputs ------------------------------------------------------------------------------------
def token_ids(model: Envoy, prompt: Any, what: str) -> torch.Tensor:
    """A prompt as token ids of shape (1, T): a string (tokenized with ``model.tokenizer``),
    a list of ints, or an integer tensor of shape (T,) or (1, T)."""
    if isinstance(prompt, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"{what} is a string but the model has no tokenizer; wrap it as "
                            f"LanguageModel(module, tokenizer=...) or pass token ids")
        return torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.long).reshape(1, -1)
    ids = torch.as_tensor(prompt)
    if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or \
            ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
        raise ValueError(f"{what} must be a string or the token ids of one prompt (shape (T,) "
                         f"or (1, T)), not a {ids.dtype} tensor of shape {tuple(ids.shape)}")
    return ids.long().reshape(1, -1)


def token_labels(model: Envoy, ids: torch.Tensor) -> list[str] | None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    try:
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    except Exception:  # noqa: BLE001 - labels are a nicety
        return None


def forward_parameters(model: Envoy) -> set[str]:
    try:
        return set(inspect.signature(model._module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def forward_kwargs(model: Envoy, given: dict) -> dict:
    """The keyword arguments of every forward pass: ``use_cache=False`` where the model
    takes it (a sweep never decodes), then the caller's."""
    for name, value in given.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
            raise ValueError(
                f"{name}= of shape {tuple(value.shape)}: a sweep runs its cells as the rows "
                f"of one batch, so a forward keyword cannot hold one prompt's row; each "
                f"prompt runs unpadded (no attention_mask is needed), and its positions "
                f"are its own")
    kwargs = {}
    if "use_cache" in forward_parameters(model):
        kwargs["use_cache"] = False
    kwargs.update(given)
    return kwargs


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: ``output.logits``, the output itself when it is a
    tensor, else its first item."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in the model's output ({type(output).__name__})")


def _logits_proxy(model: Envoy, output_kind: str):
    output = model.output
    if output_kind == "attr":
        return output.logits
    if output_kind == "item":
        return output[0]
    return output


def output_kind(output: Any) -> str:
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return "attr"
    return "tensor" if isinstance(output, torch.Tensor) else "item"


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores of a metric of ``dtype`` are kept in: the metric's own, at least
    float32 (a float64 model's scores stay float64; a half-precision or integer metric's
    differences are taken in float32, which holds them without rounding them again)."""
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def metric_values(metric: Callable, logits: torch.Tensor, rows: int) -> torch.Tensor:
    """``metric(logits)`` as one number per row, in :func:`score_dtype` of its dtype."""
    value = metric(logits)
    if not isinstance(value, torch.Tensor):  # Python numbers: double precision
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            value = torch.as_tensor(value)
    if value.dim() > 1 and value.shape[1:].numel() == 1:
        value = value.reshape(value.shape[0])
    if value.dim() == 0 and rows == 1:
        value = value.reshape(1)
    if value.shape != (rows,):
        raise ValueError(f"the metric must give one number per row of the logits (shape "
                         f"({rows},) for logits of shape {tuple(logits.shape)}); it gave "
                         f"shape {tuple(value.shape)}")
    return value.detach().to(score_dtype(value.dtype))


def check_rows_apart(metric: Callable, clean_logits: torch.Tensor,
                     corrupt_logits: torch.Tensor, reference: float, baseline: float) -> None:
    """Raise unless ``metric`` gives each row of a batch what it gives that row alone:
    on the clean and corrupted logits together, their metrics (``reference``,
    ``baseline``). A batch of cells is many rows: a metric that sums or averages over the
    rows gives one number for them all, and one that mixes them (``logits[0, ...]``,
    ``.softmax(0)``, minus the batch mean) gives one number per row that is not the
    row's."""
    both = metric_values(metric, torch.cat([clean_logits, corrupt_logits]), 2)
    alone = torch.tensor([reference, baseline], dtype=both.dtype)
    if not torch.allclose(both, alone, rtol=1e-4, atol=1e-6, equal_nan=True):
        raise ValueError(
            f"the metric gives a row of the logits another value in a batch of rows than "
            f"alone (the clean and corrupted runs' logits together: {both.tolist()}; each "
            f"alone: {alone.tolist()}): it mixes the rows (e.g. logits[0, ...] instead of "
            f"logits[:, ...], a softmax or mean over dim 0), but a sweep runs many cells "
            f"as the rows of one batch")


def reads_last_position_only(metric: Callable, logits: torch.Tensor) -> bool:
    """Whether ``metric`` gives the same on ``logits[:, -1:]`` as on the full logits and
    does not look at the other positions (they are set to NaN to check)."""
    if logits.dim() < 3 or logits.shape[1] < 2:
        return False
    try:
        full = torch.as_tensor(metric(logits))
        last = torch.as_tensor(metric(logits[:, -1:]))
        blinded = logits.clone()
        blinded[:, :-1] = float("nan")
        probe = torch.as_tensor(metric(blinded))
    except Exception:  # noqa: BLE001 - any failure: keep every position
        return False
    return full.shape == last.shape == probe.shape and torch.equal(full, last) and \
        torch.equal(full, probe)


# --- reference runs ---------------------------------------------------------------------------
@dataclass
class Reference:
    """One prompt's unpatched forward pass: the saved output of each needed module (as the
    module returns it) and the logits."""

    ids: torch.Tensor
    outputs: dict[str, Any]  # Target.key -> the value
    logits: torch.Tensor
    output_kind: str
    backend: str | None = None
    output: Any = None  # the model's output, where asked for (keep_output)


def reference_run(model: Envoy, ids: torch.Tensor, targets: Iterable[Target], kwargs: dict,
                  trace_options: dict, keep_output: bool = False) -> Reference:
    """One trace of ``ids`` saving every target's value and the model output."""
    saved: dict[str, Any] = {}
    with torch.no_grad(), model.trace(ids, **kwargs, **trace_options) as tracer:
        for target in targets:
            if target.key not in saved:
                saved[target.key] = target.read().save()
        output = model.output.save()
    saved = {path: _real(value) for path, value in saved.items()}
    output = _real(output)
    return Reference(ids, saved, logits_of(output).detach(), output_kind(output),
                     tracer.backend, output if keep_output else None)


def _real(value: Any) -> Any:
    return value.value if isinstance(value, Proxy) else value


def hidden(value: Any) -> torch.Tensor:
    """The hidden state in a module's output (item 0 of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple whose first item is one, not "
                    f"{type(value).__name__}")


def with_hidden(output: Any, new: torch.Tensor, rows: int) -> Any:
    """``output`` (a saved one-row module output) for ``rows`` rows with its hidden state
    replaced by ``new``: the value to skip the module with. Other tensors are expanded."""
    def grow(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            return t.expand(rows, *t.shape[1:])
        return t

    if isinstance(output, torch.Tensor):
        return new
    items = list(output)
    items[0] = new
    rest = pytree.tree_map(grow, items[1:])
    return type(output)([new, *rest]) if isinstance(output, tuple) else [new, *rest]


def stacked(outputs: list, new: torch.Tensor | None = None) -> Any:
    """Saved one-row module outputs (one per row, of different prompts) as one output of
    ``len(outputs)`` rows, its hidden state replaced by ``new`` when given."""
    def cat(*ts: Any) -> Any:
        if isinstance(ts[0], torch.Tensor) and ts[0].dim() > 0 and ts[0].shape[0] == 1:
            return torch.cat(ts)
        return ts[0]

    first = outputs[0]
    hidden_rows = new if new is not None else torch.cat([hidden(o) for o in outputs])
    if isinstance(first, torch.Tensor):
        return hidden_rows
    rest = pytree.tree_map(cat, list(first)[1:], *[list(o)[1:] for o in outputs[1:]])
    return type(first)([hidden_rows, *rest]) if isinstance(first, tuple) \
        else [hidden_rows, *rest]


def expanded(output: Any, rows: int) -> Any:
    """A saved one-row module output as ``rows`` identical rows (views, no copies)."""
    return with_hidden(output, hidden(output).expand(rows, *hidden(output).shape[1:]), rows)


# --- batches --------------------------------------------------------------------------------
def row_bytes(model: Envoy, length: int, kept_positions: int, hidden_size: int,
              vocab: int, dtype: torch.dtype) -> int:
    """An estimate of the activation memory of one row of a forward pass: the residual
    stream and its temporaries, the MLP's hidden layer, attention scores and the logits."""
    config = getattr(model._module, "config", None)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
        or 4 * hidden_size
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    elements = 16 * length * hidden_size + 3 * length * inner + 3 * heads * length * length \
        + 2 * kept_positions * vocab
    return int(size * elements)


def choose_batch_size(batch_size: int | None, memory_budget: int | float | None,
                      per_row: int, cells_per_group: int) -> int:
    """The batch size: as given, else as many rows as the memory budget holds, at most the
    cells of one group (more rows would be padding)."""
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        return int(batch_size)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    fits = max(1, int(budget // max(per_row, 1)))
    return max(1, min(fits, cells_per_group))


@dataclass
class Sweep:
    """Runs the batches of a sweep (planned and scheduled by :mod:`.jobs`): one trace per
    batch, counting traces and backends."""

    model: Envoy
    ids: Any  # unused (the ids are per batch); kept for compatibility
    metric: Any  # unused (metrics are per pair)
    kwargs: dict
    trace_options: dict
    output_kind: str
    batch_size: int
    progress: bool = True
    description: str = "sweep"
    last_tracer: Any = None
    traces: int = 0
    backends: set = field(default_factory=set)

    def run_batch(self, ids: torch.Tensor, replacements: list[tuple[Target, Any]],
                  kwargs: dict | None = None) -> torch.Tensor:
        model = self.model
        kwargs = self.kwargs if kwargs is None else kwargs
        with model.trace(ids, **kwargs, **self.trace_options) as tracer:
            for target, value in replacements:
                target.replace(value)
            logits = _logits_proxy(model, self.output_kind).save()
        self.last_tracer = tracer
        self.traces += 1
        self.backends.add(tracer.backend)
        return _real(logits)

    def reference_pair(self, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor,
                       clean_targets: Iterable[Target], corrupt_targets: Iterable[Target],
                       trace_options: dict) -> tuple[Reference, Reference]:
        """The clean and the corrupted prompt's reference runs (with the sweep's forward
        kwargs and ``trace_options``, the reference runs' own); the sweep's batches read
        their logits from an output like the corrupted run's."""
        clean_run = reference_run(self.model, clean_ids, clean_targets, self.kwargs,
                                  trace_options)
        corrupt_run = reference_run(self.model, corrupted_ids, corrupt_targets, self.kwargs,
                                    trace_options)
        self.output_kind = corrupt_run.output_kind
        return clean_run, corrupt_run


def can_keep_last(model: Envoy, kwargs: dict) -> bool:
    """Whether the sweep may ask the model for the last position's logits only: its
    forward takes ``logits_to_keep`` and the user did not pass one."""
    return "logits_to_keep" not in kwargs and "logits_to_keep" in forward_parameters(model)


def logits_kwargs(model: Envoy, kwargs: dict, metric: Callable,
                   logits: torch.Tensor) -> tuple[dict, int]:
    """The forward kwargs of the sweep's batches and how many positions of logits they
    compute: only the last where the metric reads nothing else and the model can."""
    if can_keep_last(model, kwargs) and reads_last_position_only(metric, logits):
        return {**kwargs, "logits_to_keep": 1}, 1
    return dict(kwargs), logits.shape[1]


def trace_options(backend: str | None, compile: Any) -> dict:
    options = {}
    if backend is not None:
        options["backend"] = backend
    if compile is not None:
        options["compile"] = compile
    return options
