"""The trace context: records a Program, runs it on the chosen backend, binds the results."""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..stats import bump
from ..record.active import active_tracers
from ..bind import bind_frame
from ..capture.export import CaptureError, cached_capture, flat_inputs, signature
from ..errors import TraceError, at_line, user_line, user_stacklevel
from ..locks import model_lock
from ..run.hooks import run_with_hooks
from ..record.program import Node, Program, setitem
from ..splice.gradients import GRAD, GRAD_WRITE, BackwardPhase, backward_phase, forward_exports
from ..record.proxy import Proxy, from_where
from ..splice.rows import Rows
from ..run.executable import normalize_options, runner_for
from ..capture.scan import cached_scan
from ..record.sites import OUTPUT, Site
from ..splice.walker import MetaWalker

if TYPE_CHECKING:
    from ..api.nnsight import NNsight

BACKENDS = ("auto", "fx", "hooks")
_PLAIN_ARGS = frozenset({int, float, bool, str, type(None), type(Ellipsis)})


class Invoke:
    """One input of a batched trace: inside its block, reads and writes see its rows."""

    def __init__(self, tracer: "Tracer", index: int, args: tuple, kwargs: dict):
        self.tracer = tracer
        self.index = index
        self.args = args
        self.kwargs = kwargs
        self.prepared: tuple[tuple, dict, int] | None = None

    def __enter__(self) -> "Invoke":
        if self.tracer._invoke is not None:
            raise TraceError(at_line("invokes cannot be nested", user_line()))
        self.tracer._invoke = self.index
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer._invoke = None
        return False


class Barrier:
    """nnsight's barrier: all ``n`` invokes reach it before any goes on.

    fxsight runs every invoke in one dependency-ordered pass, so values flow between
    invokes without it; calling it is accepted and checked (``n`` distinct invokes)."""

    def __init__(self, tracer: "Tracer", participants: int):
        self.tracer = tracer
        self.participants = participants
        self.arrived: set[int | None] = set()
        self.line = user_line()

    def __call__(self) -> None:
        self.arrived.add(self.tracer._invoke)

    def check(self) -> None:
        if self.arrived and len(self.arrived) != self.participants:
            reached = ", ".join("the whole batch" if i is None else f"#{i}"
                                for i in sorted(self.arrived, key=lambda i: (i is None, i)))
            raise TraceError(at_line(
                f"barrier({self.participants}) was reached by {len(self.arrived)} invoke(s) "
                f"({reached}); each of the {self.participants} participating invokes must "
                f"call it", self.line))


class Tracer:
    """``with model.trace(inputs) as tracer:`` records interventions; they run on exit."""

    def __init__(self, model: "NNsight", args: tuple, kwargs: dict, *,
                 backend: str = "auto", compile: Any = None, prune: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.model = model
        self.program = Program()
        self.invokes: list[Invoke] = []
        self._invoke: int | None = None
        self._implicit: Invoke | None = None
        self._args, self._kwargs = args, kwargs
        self._backend_choice = backend
        self._compile = _compile_options(compile if compile is not None else model._compile)
        self._prune = prune
        self._state = "new"
        self._saved: dict[int, Node] = {}
        self._results: dict[Node, Any] = {}
        self._output: Any = None
        self._output_kept = False
        self._record_walkers: dict[Any, MetaWalker] = {}
        self._barriers: list[Barrier] = []
        # saved proxies, kept alive so that their ids (the keys of _saved) stay theirs
        self._proxies: dict[int, Proxy] = {}
        self.backend: str | None = None
        self.graph_module: fx.GraphModule | None = None
        self._token_indexing = model._token_indexing
        self._cache_requests: list = []  # tracer.cache(...) calls, recorded at the run
        self._stop_line: str | None = None  # tracer.stop(): where, and how many Program
        self._stop_after = 0  # nodes were recorded before it

    # --- context ----------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        if self._state != "new":
            raise TraceError("a tracer can be entered once")
        self._state = "recording"
        active_tracers().append(self)
        if self._args:
            self._implicit = self.invoke(*self._args)
            self._implicit.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._exit(sys._getframe(1), exc_type is not None)
        return False

    def _exit(self, frame, failed: bool) -> None:
        if self._implicit is not None:
            self._implicit.__exit__(None, None, None)
        stack = active_tracers()
        if self in stack:
            stack.remove(self)
        if failed:
            self._state = "done"
            return
        try:
            with model_lock(self.model._module):  # one trace of a model runs at a time
                self._execute()
        finally:
            self._state = "done"
        bind_frame(frame, self._resolve)

    # --- user API -----------------------------------------------------------------------
    def invoke(self, *args, **kwargs) -> Invoke:
        """Add an input to the batch; reads and writes inside the block see only its rows.

        With no input, the block sees the whole batch."""
        if self._implicit is not None and self._invoke == self._implicit.index and args:
            raise TraceError(at_line("trace(inputs) already has its input; use "
                                     "trace() with no inputs to batch several invokes",
                                     user_line()))
        if not args and not kwargs:
            return _WholeBatch(self)
        kwargs = {**self._kwargs, **kwargs}  # trace(**kwargs) apply to every invoke
        invoke = Invoke(self, len(self.invokes), args, kwargs)
        invoke.prepared = self.model._prepare_invoke(args, kwargs, invoke)
        self.invokes.append(invoke)
        return invoke

    def cache(self, modules: Any = None, device: Any = torch.device("cpu"), dtype: Any = None,
              detach: bool = True, include_output: bool = True, include_inputs: bool = False,
              rename: dict | None = None, alias: dict | None = None):
        """Cache modules' outputs (and inputs) of this trace, after interventions: returns
        a ``CacheDict`` filled when the block ends (``cache["model.transformer.h.0"].output``,
        ``cache.model.transformer.h[0].output``). See :mod:`fxsight.cache`."""
        self._check_recording()
        from ..api.cache import CacheRequest
        request = CacheRequest(self.model, modules, device, dtype, detach, include_output,
                               include_inputs, rename, alias, self._invoke)
        self._cache_requests.append(request)
        return request.cache

    def stop(self) -> None:
        """End the forward pass as soon as everything recorded so far is computed; nothing
        may be recorded after it. (The fx backend prunes what no saved value needs anyway;
        the hooks backend stops the model after the last needed module event.)"""
        self._check_recording()
        if self._stop_line is None:
            self._stop_line = user_line()
            self._stop_after = len(self.program.nodes)

    def barrier(self, participants: int) -> Barrier:
        barrier = Barrier(self, participants)
        self._barriers.append(barrier)
        return barrier

    @property
    def result(self) -> Any:
        """The model's return value (a proxy inside the block)."""
        if self._state == "recording":
            return self._read(Site("", OUTPUT, 0), "output")
        if not self._output_kept and self._stop_line is not None:
            raise TraceError(at_line("the model's output was not computed: tracer.stop() "
                                     "ended the forward pass", self._stop_line))
        if not self._output_kept:
            raise TraceError(
                "the model's output was not computed: this trace saved values, and the fx "
                "backend prunes what no saved value needs. Save it inside the block "
                "(`out = model.output.save()`) or trace with prune=False.")
        return self._output

    output = result

    # --- recording ----------------------------------------------------------------------
    def _check_recording(self, used: Any = None) -> None:
        if self._state != "recording" or self not in active_tracers():
            where = next((from_where(v) for v in pytree.tree_leaves(used)
                          if isinstance(v, Proxy)), "")
            raise TraceError(at_line(f"this trace has ended: values{where} can only be used "
                                     "inside the `with ... trace(...)` block", user_line()))

    def _to_arg(self, value: Any) -> Any:
        if type(value) is float:  # a coefficient: an input, so new values reuse the graph
            return self.program.input(value)
        if type(value) in _PLAIN_ARGS:  # the common case, first
            return value
        if isinstance(value, Proxy):
            if value._tracer is not self:
                raise TraceError(at_line(
                    f"a value from another (earlier) trace{from_where(value)} was used here; "
                    "save it in its own trace and pass the real tensor instead", user_line()))
            return value._node
        if isinstance(value, torch.Tensor):
            return self.program.input(value)
        kind = type(value)
        if kind is tuple:
            return tuple([self._to_arg(v) for v in value])
        if kind is slice:
            if value.start is None and value.stop is None and value.step is None:
                return value  # `:`
            return slice(self._to_arg(value.start), self._to_arg(value.stop),
                         self._to_arg(value.step))
        if isinstance(value, (tuple, list)):
            return type(value)(self._to_arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self._to_arg(v) for k, v in value.items()}
        from ..api.envoy import Envoy
        if isinstance(value, Envoy):
            raise TraceError(at_line("a module was passed where a value was expected; "
                                     "use its .output or .input", user_line()))
        return value

    def _proxy(self, node: Node) -> Proxy:
        proxy = Proxy(self, node)
        return proxy

    def _record(self, op: str, target: Any, args: tuple, kwargs: dict,
                lenient: bool = False) -> Proxy:
        self._check_recording((args, kwargs))
        node = self.program.op(op, target, self._to_arg(tuple(args)),
                               self._to_arg(kwargs) if kwargs else {}, self._invoke,
                               user_line())
        if lenient:
            node.meta["lenient"] = True
        if node.meta["mutation"] and args and isinstance(args[0], Proxy):
            object.__setattr__(args[0], "_node", node)
            return args[0]
        return self._proxy(node)

    def _record_setitem(self, proxy: Proxy, key: Any, value: Any) -> None:
        self._record("call_function", setitem, (proxy, key, value), {})

    def _read(self, site: Site, accessor: str) -> Proxy:
        self._check_recording()
        node = self.program.read(site, accessor, self._invoke, user_line())
        return self._proxy(node)

    def _write(self, site: Site, accessor: str, value: Any) -> None:
        self._check_recording()
        self.program.write(site, accessor, self._to_arg(value), self._invoke, user_line())

    def _skip(self, site: Site, value: Any) -> None:
        self._check_recording()
        self.program.skip(site, self._to_arg(value), self._invoke, user_line())

    def _save(self, proxy: Proxy) -> Proxy:
        if proxy._tracer is not self or self._state != "recording":
            raise TraceError(at_line(".save() can only be called inside the trace that "
                                     f"created the value{from_where(proxy)}", user_line()))
        self.program.save(proxy._node)
        self._saved[id(proxy)] = proxy._node
        self._proxies[id(proxy)] = proxy
        return proxy

    # --- metadata while recording ----------------------------------------------------------
    def _meta_of(self, proxy: Proxy, what: str) -> Any:
        self._check_recording()
        invoke = proxy._node.meta.get("invoke", self._invoke)
        with model_lock(self.model._module):  # (captures, scans: see fxsight.locks)
            walker = self._record_walkers.get(invoke)
            if walker is None:
                args, kwargs = self._inputs_for_metadata(invoke)
                source = self._metadata_source(args, kwargs)
                rows = _WholeRows()
                walker = self._record_walkers[invoke] = MetaWalker(self.program, rows, source)
            walker.run()
        meta = walker.values[proxy._node]
        from ..splice.walker import UnknownMeta
        if isinstance(meta, UnknownMeta):
            raise TraceError(at_line(f"the {what} of this value depends on real data "
                                     f"(fxsight.apply on an opaque function)", user_line()))
        if what in ("shape", "dtype") and not isinstance(meta, torch.Tensor):
            raise TraceError(at_line(f"this value is a {type(meta).__name__}, not a tensor; "
                                     f"it has no {what}", user_line()))
        return meta

    def _metadata_source(self, args: tuple, kwargs: dict):
        """Boundary shapes for these inputs: from the capture where the fx backend will run
        (it is needed anyway), else from a scan."""
        module = self.model._module
        if self._backend_choice != "hooks":
            try:
                return cached_capture(module, args, kwargs)
            except CaptureError:
                pass
        return cached_scan(module, args, kwargs)

    def _device_of(self, proxy: Proxy) -> torch.device:
        self._meta_of(proxy, "device")
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

    # --- gradients -------------------------------------------------------------------------
    def _grad_of(self, proxy: Proxy) -> Proxy:
        """``proxy.grad``: the gradient of the backward() loss with respect to it."""
        self._check_recording()
        target = self._to_arg(proxy)
        self.program.uses_gradients = True
        node = self.program.add("call_function", GRAD, (target,), {}, {
            "kind": "grad", "invoke": target.meta.get("invoke", self._invoke),
            "line": user_line()})
        return self._proxy(node)

    def _set_grad(self, proxy: Proxy, value: Any) -> None:
        """``proxy.grad = value``: replace the gradient flowing back through it."""
        self._check_recording()
        target = self._to_arg(proxy)
        self.program.uses_gradients = True
        self.program.add("call_function", GRAD_WRITE, (target, self._to_arg(value)), {}, {
            "kind": "grad_write", "invoke": target.meta.get("invoke", self._invoke),
            "line": user_line()})

    def _prepare_gradients(self) -> None:
        self._backward_nodes = backward_phase(self.program)
        self._grad_keys: dict[Node, str] = {}
        for node in forward_exports(self.program, self._backward_nodes):
            self.program.save(node)
        if self._backward_nodes and self._compile is not None:
            # grad taps call back into the trace during backward(): the compiled graph
            # breaks around them
            self._compile = {**self._compile, "fullgraph": False}

    def _forward_saves(self) -> list[Node]:
        return [n for n in self.program.saves if n not in self._backward_nodes]

    def _run_backward(self, rows: dict[Any, Rows]) -> None:
        if not self._backward_nodes:
            return
        forward = {n: self._results[n] for n in self._forward_saves()}
        values = BackwardPhase(self.program, rows, self._backward_nodes, forward,
                               self._grad_keys).run()
        for node in self.program.saves:
            if node in self._backward_nodes:
                self._results[node] = values[node]

    def _token_indexer(self, proxy: Proxy):
        return self.model._token_indexer(self, proxy)

    # --- execution ---------------------------------------------------------------------
    def _batched(self) -> tuple[tuple, dict, dict[Any, Rows]]:
        if not self.invokes:
            raise TraceError("the trace has no input: pass inputs to trace(...) or use "
                             "tracer.invoke(...)")
        prepared = [inv.prepared for inv in self.invokes]
        args, kwargs = self.model._batch_inputs(prepared)
        total = sum(size for _, _, size in prepared)
        rows: dict[Any, Rows] = {None: Rows(0, total, total)}
        start = 0
        for inv, (_, _, size) in zip(self.invokes, prepared):
            rows[inv.index] = Rows(start, start + size, total)
            start += size
        return args, kwargs, rows

    def _execute(self) -> None:
        for barrier in self._barriers:
            barrier.check()
        args, kwargs, rows = self._batched()
        self.model._before_run()  # may replace the module (LanguageModel loads weights)
        module = self.model._module
        self._before_execute(args, kwargs)
        self._prepare_gradients()
        bump("traces")
        keep_output = (not self._prune or not self.program.saves) and self._stop_line is None
        backend = self._backend_choice
        captured = None
        flat = flat_inputs(args, kwargs)
        if backend in ("auto", "fx"):
            try:
                captured = cached_capture(module, args, kwargs,
                                          dynamic=_dynamic_policy(self._compile), flat=flat)
            except CaptureError as error:
                if backend == "fx":
                    raise
                self._warn_fallback(error, args, kwargs)
        if captured is not None:
            self._run_fx(captured, module, flat[0], rows, keep_output)
        else:
            self._run_hooks(module, args, kwargs, rows)
        self._run_backward(rows)
        self._after_execute()

    def _before_execute(self, args: tuple, kwargs: dict, source: Any = None) -> None:
        """Check what follows a tracer.stop(); add the nodes of tracer.cache() calls (after
        every intervention, so they see its effects)."""
        if self._stop_line is not None:
            late = [n for n in list(self.program.nodes)[self._stop_after:]
                    if n.meta["kind"] != "input"]
            if late:
                raise TraceError(at_line(
                    f"this comes after tracer.stop() ({self._stop_line}), which ends the "
                    f"forward pass: it would never run", late[0].meta.get("line")))
        if self._cache_requests:
            if source is None:
                source = self._metadata_source(args, kwargs)
            for request in self._cache_requests:
                request.record(self.program, source)

    def _after_execute(self) -> None:
        for request in self._cache_requests:
            request.fill(self._results)

    def _warn_fallback(self, error: CaptureError, args, kwargs) -> None:
        bump("fallbacks")
        warned = self.model._fallback_warned
        key = signature(self.model._module, args, kwargs)
        if key not in warned:
            warned.add(key)
            warnings.warn(f"fxsight: {error}; this model runs with the hooks backend",
                          RuntimeWarning, stacklevel=user_stacklevel())

    def _run_fx(self, captured, module, flat: list[Any], rows, keep_output) -> None:
        program = self.program
        runner = runner_for(module, captured, program, rows, keep_output, self._compile,
                            _freeze(self._compile))
        output, saves = runner(flat + program.input_values)
        self.backend = "fx"
        self.graph_module = runner.graph_module
        self._output, self._output_kept = output, keep_output
        self._results = dict(zip(self._forward_saves(), saves))
        if runner.spliced.grad_keys:
            nodes = list(program.nodes)
            self._grad_keys = {nodes[i]: key for i, key in runner.spliced.grad_keys.items()}

    def _run_hooks(self, module, args, kwargs, rows) -> None:
        program = self.program
        source = cached_scan(module, args, kwargs)
        walker = MetaWalker(program, rows, source)
        walker.run()
        output, values = run_with_hooks(module, program, rows, source.index,
                                        walker.positions, args, kwargs,
                                        stop=self._stop_line is not None,
                                        grad_keys=self._grad_keys)
        self.backend = "hooks"
        self._output, self._output_kept = output, self._stop_line is None
        self._results = {node: values[node] for node in self._forward_saves()}

    # --- results -------------------------------------------------------------------------
    def _resolve(self, proxy: Proxy) -> tuple[bool, Any]:
        if proxy._tracer is not self:
            return False, None
        node = self._saved.get(id(proxy))
        if node is None or node not in self._results:
            return False, None
        return True, self._results[node]

    def _value_of(self, proxy: Proxy) -> Any:
        if self._state != "done":
            raise TraceError(at_line(".value is only available after the trace has run",
                                     user_line()))
        ok, value = self._resolve(proxy)
        if not ok:
            raise TraceError(at_line("this value was not saved: call .save() on it inside "
                                     "the trace", user_line()))
        return value


class ScanTracer(Tracer):
    """``with model.scan(inputs):`` records like a trace, then only checks it: the Program
    is walked on the meta values of a fake-tensor scan (nothing runs for real; the weights
    may be on the meta device). Saved values are bound to meta tensors, a cache holds meta
    values, ``tracer.result`` is the output's meta value."""

    def __init__(self, model: "NNsight", args: tuple, kwargs: dict):
        super().__init__(model, args, kwargs, backend="hooks")

    def _execute(self) -> None:
        for barrier in self._barriers:
            barrier.check()
        args, kwargs, rows = self._batched()
        source = cached_scan(self.model._module, args, kwargs)
        self._before_execute(args, kwargs, source)
        walker = MetaWalker(self.program, rows, source)
        walker.run()
        self.backend = "scan"
        self._output, self._output_kept = source.output, True
        self._results = {node: walker.values[node] for node in self.program.saves}
        self._after_execute()


class _WholeBatch:
    """``tracer.invoke()`` with no input: the block sees the whole batch."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self._previous: int | None = None

    def __enter__(self) -> "_WholeBatch":
        self._previous = self.tracer._invoke
        self.tracer._invoke = None
        return self

    def __exit__(self, *exc) -> bool:
        self.tracer._invoke = self._previous
        return False


class _WholeRows(dict):
    """Rows for metadata while recording: every invoke alone is a whole batch."""

    def __missing__(self, key):
        return Rows(0, 1, 1)


_DEFAULT_COMPILE = normalize_options({})


def _compile_options(value: Any) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        return _DEFAULT_COMPILE  # (never changed in place: a tracer replaces it)
    if isinstance(value, dict):
        return normalize_options(dict(value))
    raise TypeError(f"compile must be a bool or a dict of torch.compile options, not {value!r}")


def _dynamic_policy(options: dict | None) -> str:
    """How a trace uses dynamic-shape captures: only compiled traces do (``dynamic=None``:
    after a second input shape, ``True``: at once, ``False``: never)."""
    if options is None or options.get("dynamic") is False:
        return "never"
    return "always" if options.get("dynamic") else "auto"


def _freeze(value: Any) -> Any:
    if value is None:
        return None
    if value is _DEFAULT_COMPILE:
        return _DEFAULT_KEY
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


_DEFAULT_KEY = _freeze(dict(_DEFAULT_COMPILE))
