"""The trace context: ``with model.trace(inputs) as tracer:``.

It is thin: a :class:`~fxsight.record.recorder.Recorder` turns the block's lines into a
Program, :func:`~fxsight.run.forward.run_program` runs it when the block ends, and the
caller's names for saved values are bound to the results.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from threading import get_ident
from typing import Any

import torch
import torch.fx as fx

from .._torch import as_own_work, pytree
from ..bind import bind_frame, bind_objects, find_stored
from ..errors import InputError, TraceError, at_line, user_line
from ..locks import model_lock
from ..record.active import active_sessions, active_tracers
from ..record.program import Kind, Node
from ..record.proxy import Proxy
from ..record.modes import ambient_modes, entry_frame
from ..record.recorder import Recorder
from ..record.scope import ALL, Steps
from ..record.sites import OUTPUT, Site, is_operation
from ..run.forward import run_program
from ..run.options import RunOptions
from ..splice.attention_masks import known_masks
from ..splice.rows import Rows
from ..splice.meta_walker import MetaWalker
from ..stats import bump
from .cache import CacheRequest
from .calls import CallIndexer, CallScope
from .invokes import Barrier, Invoke, WholeBatch
from .step_appends import StepAppends
from .trace_metadata import TraceMetadata


class Tracer(TraceMetadata):
    """``with model.trace(inputs) as tracer:`` records interventions; they run on exit.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(2, 4)) as tracer:
    ...     hidden = net[0].output.save()
    ...     net[1].output[:, 0] = 0
    ...     out = net.output.save()
    >>> hidden.shape, out[:, 0].tolist(), tracer.backend
    (torch.Size([2, 3]), [0.0, 0.0], 'fx')
    """

    def __init__(self, model: Any, args: tuple, kwargs: dict, options: RunOptions):
        # model: the NNsight wrapper (fxsight.api.nnsight, which imports this module)
        self.model = model
        self.options = options
        self.recorder = Recorder(self, model._token_indexing)
        self.invokes: list[Invoke] = []
        self.backend: str | None = None
        self.graph_module: fx.GraphModule | None = None
        self._args, self._kwargs = args, kwargs
        self._line = user_line()  # where the trace was opened
        self._implicit: Invoke | None = None
        self._state = "new"
        self._results: dict[Node, Any] = {}
        self._output: Any = None
        self._output_kept = False
        self._meta_walkers: dict[Any, MetaWalker] = {}
        self._barriers: list[Barrier] = []
        self._cache_requests: list[CacheRequest] = []  # tracer.cache(...) calls
        self._stop_line: Any = None  # tracer.stop(): where, and how many Program nodes
        self._stop_after = 0  # were recorded before it
        self._kept: list[Any] = []  # fxsight.save(obj) on lists, dicts, user objects
        self._step_appends = StepAppends()  # appended per decoding step (generate's)
        self._logs: list[tuple] = []  # the values of each tracer.log(...) call
        # shapes read while recording: (node, the dimensions read or None for all, the
        # shape seen, line), checked against the batch's before the run
        self._shapes_read: list[tuple[Node, tuple | None, tuple, Any]] = []
        # token indexes recorded: (node indexed, positions from the end it reaches, line),
        # checked against the value's dimension 1 in the batch before the run
        self._token_reads: list[tuple[Node, int, Any]] = []
        # envoy(value, hook=True) calls: module path -> (node's proxy, line), the latest
        self.hooked_calls: dict[str, tuple[Proxy, Any]] = {}
        self._paths_run: set[str] | None = None

    def __getattr__(self, name: str) -> Any:
        """The model's modules through the tracer, as nnsight's docs write them:
        ``with NNsight(model).trace(x) as model: model.layer2.output.save()``."""
        if name.startswith("_") or name in ("model", "recorder", "options"):
            raise AttributeError(name)
        try:
            return getattr(self.model, name)
        except AttributeError:
            hint = "; nnsight 0.4's tracer.next() is `with tracer.iter[i]:` (or `for step " \
                "in tracer.iter[...]:`) here" if name == "next" else ""
            raise AttributeError(at_line(
                f"'{type(self).__name__}' object has no attribute {name!r}, and the model "
                f"has none either{hint}", user_line())) from None

    @property
    def program(self):
        """The recorded Program (see :mod:`fxsight.record.program`)."""
        return self.recorder.program

    # --- context ----------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        if self._state != "new":
            raise TraceError("a tracer can be entered once")
        self._state = "recording"
        self.model._forget_paths()  # (modules registered elsewhere since the last trace)
        if self._args or _holds_tensor(self._kwargs):
            try:  # (bad input raises here, before the tracer is open)
                self._implicit = self._add_invoke(self._args, dict(self._kwargs))
            except BaseException:
                self._state = "done"
                raise
        self.recorder.open, self.recorder.thread = True, get_ident()
        self.recorder.modes, self.recorder.entry = ambient_modes(), entry_frame()
        self.recorder.made = []  # (what the block stores unsaved: see _save_stored)
        active_tracers().append(self)
        if self._implicit is not None:
            self._implicit.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.exit_into(sys._getframe(1), exc_type is not None)
        return False

    def exit_into(self, frame: Any, failed: bool) -> None:
        """End the block: run (unless it ``failed``) and bind the saved values in
        ``frame``, the caller's. The user's modes around the trace see the model's forward
        and the block's operations only (see ``user_modes_resumed``), not fxsight's own
        work."""
        as_own_work(self._exit_into, frame, failed)

    def _exit_into(self, frame: Any, failed: bool) -> None:
        if self._implicit is not None:
            self._implicit.__exit__(None, None, None)
        sessions = active_sessions()
        kept = self._kept + [obj for s in sessions for obj in s.kept] if sessions else \
            self._kept
        if not failed and (kept or sessions):
            self._save_reachable(kept, frame if sessions else None)
        if not failed and not sessions:
            self._save_stored(frame)
        self.recorder.open = False
        stack = active_tracers()
        if self in stack:
            stack.remove(self)
        if failed:
            self._state = "done"
            return
        try:
            with model_lock(self.model._module):  # one trace of a model runs at a time
                self._execute()
            self.recorder.finish(self._results)
        finally:
            self._state = "done"
        self._print_logs()
        spreads = self._step_appends.spreads if self._step_appends else None
        bind_frame(frame, self._resolve, self.recorder.live_saved, spreads=spreads)
        if kept:
            bind_objects(kept, self._resolve, self.recorder.live_saved, spreads=spreads)
        self._let_go()

    def _print_logs(self) -> None:
        logs, self._logs = self._logs, []
        for values in logs:
            print(*self.recorder.settle(values))

    def _let_go(self) -> None:
        """After the run: nothing this trace made refers back to it any more (its invokes
        and barriers did), so that the trace, its Program and the values it kept are
        freed when the caller lets go of them, not at the next garbage collection."""
        for invoke in self.invokes:
            invoke.tracer = None
        self._barriers = []
        self._step_appends.clear()
        self._shapes_read = []
        self._token_reads = []

    def keep(self, value: Any) -> None:
        """``fxsight.save(obj)``: traced values put into ``obj`` are saved at the end."""
        if not any(value is other for other in self._kept):
            self._kept.append(value)

    def _save_reachable(self, kept: list, frame: Any) -> None:
        """Save this trace's proxies inside ``kept`` objects, and (in a session, where a
        later trace may use them) those the caller's ``frame`` holds."""
        recorder = self.recorder
        # (in a session: the proxies made and not saved; found all, the walks end)
        waiting = recorder.waiting()
        if waiting is not None and not waiting:
            return

        def save(proxy: Proxy) -> tuple[bool, Any]:
            if proxy._recorder is recorder and not recorder.is_saved(proxy):
                recorder.save(proxy)
            if waiting is not None:
                waiting.pop(id(proxy), None)
            return False, None

        until = None if waiting is None else (lambda: not waiting)
        if frame is not None:  # (first: the names bound to a proxy are found in C)
            bind_frame(frame, save, None, until)
        if kept and (waiting is None or waiting):
            bind_objects(kept, save, until=until)

    def _save_stored(self, frame: Any) -> None:
        """Save this trace's values the block stored, unsaved, into the lists, dicts and
        objects the caller's ``frame`` reaches (``captured[k] = value``,
        ``results.append(value)``, ``obj.attr = value``): in nnsight the block's code
        really runs, so they hold real values after it, as they do here once bound."""
        recorder = self.recorder

        def waiting() -> list[Proxy]:
            return list(recorder.waiting().values())

        find_stored(frame, waiting, recorder.save, self._held_by_tracer)

    def _held_by_tracer(self, proxy: Proxy) -> int:
        """How many references this tracer's own records hold to ``proxy``."""
        return sum(held is proxy for held, _ in self.hooked_calls.values())

    # --- user API -----------------------------------------------------------------------
    def invoke(self, *args, **kwargs) -> Invoke | WholeBatch:
        """Add an input to the batch; reads and writes inside the block see only its rows.

        With no input, the block sees the whole batch.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(3, 3))
        >>> with net.trace() as tracer:
        ...     with tracer.invoke(torch.ones(1, 3)):
        ...         first = net.output.save()
        ...     with tracer.invoke(torch.zeros(2, 3)):
        ...         net.output[:] = first  # a value of invoke 0 written into invoke 1
        ...     with tracer.invoke():
        ...         everything = net.output.save()
        >>> everything.shape, bool((everything == first).all())
        (torch.Size([3, 3]), True)
        """
        if self._implicit is not None and self.recorder.scope.invoke == self._implicit.index \
                and (args or kwargs):
            raise TraceError(at_line("trace(inputs) already has its input; use "
                                     "trace() with no inputs to batch several invokes",
                                     user_line()))
        if not args and not kwargs:
            return WholeBatch(self)
        merged = dict(kwargs)  # trace(**options) apply to every invoke, after its own
        for key, value in self._kwargs.items():
            merged.setdefault(key, value)
        return self._add_invoke(args, merged)

    def _add_invoke(self, args: tuple, kwargs: dict) -> Invoke:
        invoke = Invoke(self, len(self.invokes), args, kwargs)
        # (its checks of the inputs: fxsight's own reads)
        invoke.prepared = as_own_work(self.model._prepare_invoke, args, kwargs, invoke)
        self.invokes.append(invoke)
        return invoke

    def cache(self, modules: Any = None, device: Any = torch.device("cpu"), dtype: Any = None,
              detach: bool = True, include_output: bool = True, include_inputs: bool = False,
              rename: dict | None = None, alias: dict | None = None,
              non_blocking: bool = False):
        """Cache modules' outputs (and inputs) of this trace, after interventions.

        Returns a ``CacheDict`` filled when the block ends (see :mod:`fxsight.api.cache`).
        ``modules`` may list operations too (``envoy.source.<name>``, or their path
        strings): each is cached like a module, under ``"model.<module>.source.<name>"``.
        ``non_blocking`` (nnsight's) is accepted: the copies to ``device`` are complete when
        the block ends either way (an asynchronous copy could be read before it lands).

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
        >>> with net.trace(torch.ones(1, 2)) as tracer:
        ...     cache = tracer.cache()
        >>> sorted(cache.keys())
        ['model', 'model.0', 'model.1']
        >>> cache["model.1"].output.shape == cache.model[1].output.shape == (1, 2)
        True
        """
        self.recorder.check_open()
        request = CacheRequest(self.model, modules, device, dtype, detach, include_output,
                               include_inputs, rename, alias, self.recorder.scope)
        # operations asked for (``envoy.source.<name>``): their forwards are instrumented
        self.recorder.operations.update(p for p in request.paths or () if is_operation(p))
        self._cache_requests.append(request)
        return request.cache

    def stop(self) -> None:
        """End the forward pass as soon as everything recorded so far is computed; nothing
        may be recorded after it.

        The forward pass ends after the last module event the trace uses, on every
        backend: nothing after it runs, not even for its side effects (a BatchNorm's
        statistics, a dropout's draws from the generator), as in a forward stopped there.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> with net.trace(torch.ones(1, 2), backend="hooks") as tracer:
        ...     first = net[0].output.save()
        ...     tracer.stop()
        >>> first.shape
        torch.Size([1, 2])
        """
        self.recorder.check_open()
        if self._stop_line is None:
            self._stop_line = user_line()
            self._stop_after = len(self.program.nodes)

    def log(self, *values: Any) -> None:
        """nnsight's ``tracer.log(...)``: print ``values`` once the trace has run, traced
        values as their real values (several calls print in the order they were written).

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> with net.trace(torch.ones(1, 2)) as tracer:
        ...     tracer.log("sum:", net.output.detach().sum())
        sum: tensor(4.)
        """
        self.recorder.check_open()
        for leaf in pytree.tree_leaves(values):
            if isinstance(leaf, Proxy):
                leaf.save()
        self._logs.append(values)

    @property
    def iter(self) -> CallIndexer:
        """``for i in tracer.iter[0:3]:`` over a module called several times in one forward
        (a layer applied in a loop): inside the body, ``module.output`` is its ``i``-th
        call. The body is recorded once per call, ``i`` a real int.

        >>> import torch, fxsight
        >>> class Loop(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         for _ in range(3):
        ...             x = self.layer(x)
        ...         return x
        >>> net = fxsight.NNsight(Loop())
        >>> with net.trace(torch.ones(1, 2)) as tracer:
        ...     outs = fxsight.save(list())
        ...     for i in tracer.iter[:]:  # i = 0, 1, 2
        ...         outs.append(net.layer.output)
        ...     out = net.output.save()
        >>> len(outs), torch.equal(outs[2], out)
        (3, True)
        """
        return CallIndexer(self)

    def all(self) -> CallScope:
        """``for i in tracer.all():`` every call of the modules read in the body."""
        return CallScope(self, Steps(ALL))

    def barrier(self, n: int) -> Barrier:
        """nnsight's ``tracer.barrier(n)`` (accepted and checked; see :class:`Barrier`)."""
        barrier = Barrier(self, n)
        self._barriers.append(barrier)
        return barrier

    @property
    def result(self) -> Any:
        """The model's return value (a proxy inside the block)."""
        if self._state == "recording":
            return self.recorder.create_read(Site("", OUTPUT, 0), "output")
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

    # --- the recorder's host: answers that need the model or the inputs -----------------
    def value_of(self, proxy: Proxy) -> Any:
        if self._state != "done":
            raise TraceError(at_line(".value is only available after the trace has run",
                                     user_line()))
        ok, value = self._resolve(proxy)
        if not ok:
            raise TraceError(at_line("this value was not saved: call .save() on it inside "
                                     "the trace", user_line()))
        return value

    def token_indexer(self, proxy: Proxy) -> Any:
        return self.model._token_indexer(self, proxy)

    # --- execution ---------------------------------------------------------------------
    def _batched(self) -> tuple[tuple, dict, dict[Any, Rows]]:
        if not self.invokes:
            raise InputError(at_line(
                f"the trace of {type(self.model._module).__name__} has no input: pass the "
                f"model's inputs to trace(...), positionally or as keywords (e.g. "
                f"input_ids=...), or add them with tracer.invoke(...)", self._line))
        self.model._check_invokes(self.invokes)  # (what their preparation left, at once)
        if len(self.invokes) == 1:  # (the common case)
            invoke = self.invokes[0]
            args, kwargs = self.model._batch_inputs([invoke.prepared], self.invokes)
            whole = Rows(0, invoke.prepared[2], invoke.prepared[2])
            return args, kwargs, {None: whole, invoke.index: whole}
        prepared = [inv.prepared for inv in self.invokes]
        args, kwargs = self.model._batch_inputs(prepared, self.invokes)
        total = sum([size for _, _, size in prepared])
        rows: dict[Any, Rows] = {None: Rows(0, total, total)}
        start = 0
        for inv, (_, _, size) in zip(self.invokes, prepared):
            rows[inv.index] = Rows(start, start + size, total)
            start += size
        return args, kwargs, rows

    def _prepare_run(self, load: bool = True) -> tuple[tuple, dict, dict[Any, Rows]]:
        """Checks and additions before the run: barriers, what follows a ``stop()``, the
        nodes of ``tracer.cache()`` calls (after every intervention: they see its
        effects). Returns the batched inputs and the invokes' rows. ``load``: make the
        model ready to run (a LanguageModel loads its weights)."""
        for barrier in self._barriers:
            barrier.check()
        program = self.recorder.program
        if program.input_values:
            program.check_inputs()
        args, kwargs, rows = self._batched()
        if load:
            self.model._before_run()  # may replace the module
            self.model._check_batch(self, args, kwargs)
        if self._stop_line is not None:
            late = [n for n in program.nodes[self._stop_after:] if n.kind is not Kind.INPUT]
            if late:
                raise TraceError(at_line(
                    f"this comes after tracer.stop() ({self._stop_line}), which ends the "
                    f"forward pass: it would never run", late[0].line))
        if self._cache_requests:
            source = self._metadata_source(args, kwargs)
            # a stop ends the forward pass where the lines before it are done: a cache
            # holds what ran by then, and does not make the forward pass go on
            before_stop = program.nodes[:self._stop_after] \
                if self._stop_line is not None else None
            for request in self._cache_requests:
                request.record(program, source, rows, before_stop, self.hooked_calls)
        return args, kwargs, rows

    def _check_token_index(self, line: str) -> None:
        """Raises where ``proxy.token[...]`` recorded now could not count the prompts'
        tokens (see :class:`~fxsight.api.generation.Generator`)."""

    def _cached_tokens(self, kwargs: dict | None = None) -> int:
        """How many of each prompt's first tokens no forward of the trace computes (those
        a cache given to ``generate`` holds): a token index below it is refused."""
        return 0

    def _execute(self) -> None:
        args, kwargs, rows = self._prepare_run()
        self._check_shapes_read(args, kwargs, rows)
        bump("traces")
        known = self.model._known_masks(self, kwargs)
        with known_masks(known) if known else nullcontext():
            outcome = run_program(self.model._module, self.recorder.program, args, kwargs,
                                  rows, self.options, self.model._fallback_warned,
                                  stop=self._stop_line is not None,
                                  last=getattr(self.model, "_last_run", None))
        self.backend = outcome.backend
        self.graph_module = outcome.graph_module
        self._output, self._output_kept = outcome.output, outcome.output_kept
        self._results = outcome.values
        if self._stop_line is None:  # (a stopped run's caches are not its whole pass)
            self.model._after_run(self.invokes, kwargs, [
                *([outcome.output] if outcome.output_kept else []), *outcome.values.values()])
        if self._cache_requests:
            self._fill_caches()

    def _fill_caches(self) -> None:
        for request in self._cache_requests:
            request.fill(self._results)

    # --- results -------------------------------------------------------------------------
    def _resolve(self, proxy: Proxy) -> tuple[bool, Any]:
        return self.recorder.resolve(proxy)


class ScanTracer(Tracer):
    """``with model.scan(inputs):`` records like a trace, then only checks it: the Program
    is walked on the meta values of a fake-tensor scan (nothing runs for real; the weights
    may be on the meta device). Saved values are bound to meta tensors, a cache holds meta
    values, ``tracer.result`` is the output's meta value."""

    def __init__(self, model: Any, args: tuple, kwargs: dict):
        super().__init__(model, args, kwargs, RunOptions("hooks"))

    def _execute(self) -> None:
        args, kwargs, rows = self._prepare_run(load=False)
        source = self._metadata_source(args, kwargs)
        walker = MetaWalker(self.program, rows, source)
        walker.run()
        self.backend = "scan"
        self._output, self._output_kept = source.output, True
        self._results = {node: walker.values[node] for node in self.program.saves}
        self._fill_caches()


def _holds_tensor(kwargs: dict) -> bool:
    """Whether ``trace(**kwargs)`` brings inputs (a tensor with a batch dimension somewhere
    in its keywords), not only options that apply to every invoke (``use_cache=False``)."""
    for value in kwargs.values():
        if isinstance(value, (list, tuple, dict)) or hasattr(value, "items"):
            value = pytree.tree_leaves(dict(value.items()) if hasattr(value, "items")
                                       else value)
        else:
            value = [value]
        if any(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 for leaf in value):
            return True
    return False
