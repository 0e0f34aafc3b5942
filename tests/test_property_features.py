"""Property tests over random intervention programs that use what researchers write beyond
plain reads and writes: ``.inputs`` writes of positional and keyword arguments, ``.source``
operations, a module called several times (``tracer.iter``), ``.skip()``, ``tracer.stop()``,
``tracer.cache()``, ``.grad`` reads and writes, reads of one module used in a write at another
(order errors), and compiled traces.

The reference is plain PyTorch: the model's forward written out by hand, with a hook point
``at(site, value)`` wherever a site's value exists, running the same steps on real tensors
(and tensor hooks for gradients). The fx and hooks backends must agree with it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxsight
from fxsight import NNsight
from test_core_property import CONSTANTS, Step, apply_step, assert_identical, steer_tensor

BACKENDS = ("fx", "hooks")
WIDTH = 6


# --- the model: keyword arguments, a module called three times, ops inside a module ------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, scale, shift=None):
        h = self.lin(x) * scale
        if shift is not None:
            h = h + shift
        return torch.relu(h)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return torch.tanh(self.lin(x)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, WIDTH)
        self.block = Block()
        self.shared = Shared()
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.block(h, 2.0, shift=torch.ones(x.shape[0], WIDTH))
        for _ in range(3):
            h = self.shared(h)
        return self.out(h)


torch.manual_seed(0)
MODEL = Net().eval()
NET = NNsight(MODEL)
X = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Site:
    """Where a value is: ``path`` an envoy path (``block.source.self_lin_0`` an operation),
    ``accessor`` ``output``/``input`` or ``shift`` (the keyword argument of ``.inputs``),
    ``call`` the module's call (``tracer.iter[call]``), ``width`` the last dimension."""
    path: str
    accessor: str
    call: int | None = None
    width: int = WIDTH
    in_block: bool = False


SITES = [  # in the order they run
    Site("inp", "output"),
    Site("block", "input"),
    Site("block", "shift"),
    Site("block.source.self_lin_0", "input", in_block=True),
    Site("block.source.self_lin_0", "output", in_block=True),
    Site("block.source.torch_relu_0", "input", in_block=True),
    Site("block.source.torch_relu_0", "output", in_block=True),
    Site("block", "output"),
    Site("shared", "input", 0),
    Site("shared.source.torch_tanh_0", "output", 0),
    Site("shared", "output", 0),
    Site("shared", "input", 1),
    Site("shared.lin", "output", 1),
    Site("shared", "output", 1),
    Site("shared.source.self_lin_0", "input", 2),
    Site("shared.source.torch_tanh_0", "output", 2),
    Site("shared", "output", 2),
    Site("out", "input"),
    Site("out", "output", width=3),
]
INDEX = {site: i for i, site in enumerate(SITES)}


def reference_forward(model: Net, x: torch.Tensor, at) -> torch.Tensor:
    """``Net.forward`` by hand; ``at(site_index, value)`` returns the value to go on with."""
    def site(path, accessor, call=None):
        return INDEX[next(s for s in SITES if (s.path, s.accessor, s.call) ==
                          (path, accessor, call))]

    h = at(site("inp", "output"), model.inp(x))
    h = at(site("block", "input"), h)
    shift = at(site("block", "shift"), torch.ones(x.shape[0], WIDTH))
    lin_in = at(site("block.source.self_lin_0", "input"), h)
    lin = at(site("block.source.self_lin_0", "output"), model.block.lin(lin_in))
    pre = lin * 2.0 + shift
    pre = at(site("block.source.torch_relu_0", "input"), pre)
    h = at(site("block.source.torch_relu_0", "output"), torch.relu(pre))
    h = at(site("block", "output"), h)
    def maybe(path, accessor, call, value):
        if any((s.path, s.accessor, s.call) == (path, accessor, call) for s in SITES):
            return at(site(path, accessor, call), value)
        return value

    for call in range(3):
        h = maybe("shared", "input", call, h)
        lin_in = maybe("shared.source.self_lin_0", "input", call, h)
        lin = maybe("shared.lin", "output", call, model.shared.lin(lin_in))
        lin = maybe("shared.source.self_lin_0", "output", call, lin)
        tanh = maybe("shared.source.torch_tanh_0", "output", call, torch.tanh(lin))
        h = maybe("shared", "output", call, tanh + h)
    h = at(site("out", "input"), h)
    return at(site("out", "output"), model.out(h))


def _envoy(net, path: str):
    envoy = net
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def _accessors(net, site: Site):
    envoy = _envoy(net, site.path)
    if site.accessor == "shift":
        def get():
            return envoy.inputs[1]["shift"]

        def set_(value):
            args, kwargs = envoy.inputs
            envoy.inputs = (args, {**kwargs, "shift": value})
    else:
        def get():
            return getattr(envoy, site.accessor)

        def set_(value):
            setattr(envoy, site.accessor, value)
    return get, set_


class _Scope:
    """``tracer.iter[call]`` for a site of a module's ``call``-th call, else nothing."""

    def __init__(self, tracer, site: Site) -> None:
        self.inner = tracer.iter[site.call] if site.call is not None else None

    def __enter__(self):
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc):
        if self.inner is not None:
            return self.inner.__exit__(*exc)
        return False


def _steers(steps) -> dict:
    return {(s.a, SITES[s.site].width): steer_tensor(s.a, SITES[s.site].width)
            for s in steps if s.kind == "steer"}


def _examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _steps(kinds_plain=("save_raw", "save_sum", "relu", "where"),
           kinds_const=("save_scaled", "scale", "add", "iadd", "add_usable_mean", "steer"),
           kinds_index=("setslice", "imulslice", "save_row", "setcol", "imulcol"),
           sites=None, max_size=6):
    site = st.sampled_from(sites) if sites is not None else st.integers(0, len(SITES) - 1)
    const = st.sampled_from(CONSTANTS)
    idx = st.integers(0, 64)
    step = st.one_of(
        st.builds(Step, st.sampled_from(kinds_plain), site),
        st.builds(Step, st.sampled_from(kinds_const), site, c=const, a=idx),
        st.builds(Step, st.sampled_from(kinds_index), site, idx, idx, const),
    )
    return st.lists(step, min_size=1, max_size=max_size).map(
        lambda steps: sorted(steps, key=lambda s: s.site))


# --- 1. reads and writes at inputs, keyword arguments, operations and repeated calls ----------
BLOCK_OUTPUT = INDEX[Site("block", "output")]


class _Stop(Exception):
    pass


def run_reference(steps, x, *, skip: float | None = None, stop: bool = False):
    """The steps on real tensors in ``reference_forward``; ``skip``: the block's output is its
    input times ``skip`` (its forward's values are not used); ``stop``: the forward ends after
    the last step's site."""
    steers = _steers(steps)
    saved, usable, block_input = [], [], []

    def at(index, value):
        box = {"v": value}
        if skip is not None and index == BLOCK_OUTPUT:
            box["v"] = block_input[0] * skip
        for step in steps:
            if step.site == index:
                apply_step(step, SITES[index].width, lambda: box["v"],
                           lambda v: box.__setitem__("v", v), saved, usable, steers)
        if index == INDEX[Site("block", "input")]:
            block_input.append(box["v"])
        if stop and index == steps[-1].site:
            raise _Stop
        return box["v"]

    try:
        out = reference_forward(MODEL, x, at)
    except _Stop:
        out = None
    return saved, out


def run_fxsight(steps, x, backend, *, skip: float | None = None, stop: bool = False,
                compile: bool = False):
    steers = _steers(steps)
    with NET.trace(x, backend=backend, compile=compile) as tracer:
        saved, usable = [], []
        skipped = skip is None
        for step in steps:
            site = SITES[step.site]
            if not skipped and step.site >= BLOCK_OUTPUT:
                NET.block.skip(NET.block.input * skip)
                skipped = True
            get, set_ = _accessors(NET, site)
            with _Scope(tracer, site):
                apply_step(step, site.width, get, set_, saved, usable, steers)
        if not skipped:
            NET.block.skip(NET.block.input * skip)
        for value in saved:
            value.save()
        if stop:
            tracer.stop()
        out = None if stop else NET.output.save()
    assert tracer.backend == backend
    return saved, out


@_examples(80)
@given(_steps())
def test_random_programs_at_inputs_keywords_operations_and_calls(steps):
    with torch.no_grad():
        expected = run_reference(steps, X.clone())
    for backend in BACKENDS:
        with torch.no_grad():
            actual = run_fxsight(steps, X.clone(), backend)
        assert_identical(actual, expected, backend)


OUTSIDE_BLOCK = [i for i, site in enumerate(SITES) if not site.in_block]


@_examples(60)
@given(_steps(sites=OUTSIDE_BLOCK), st.sampled_from(CONSTANTS))
def test_random_programs_with_the_block_skipped(steps, skip):
    with torch.no_grad():
        expected = run_reference(steps, X.clone(), skip=skip)
    for backend in BACKENDS:
        with torch.no_grad():
            actual = run_fxsight(steps, X.clone(), backend, skip=skip)
        assert_identical(actual, expected, backend)


@_examples(60)
@given(_steps())
def test_random_programs_stopped_after_their_last_site(steps):
    with torch.no_grad():
        expected = run_reference(steps, X.clone(), stop=True)
    for backend in BACKENDS:
        with torch.no_grad():
            actual = run_fxsight(steps, X.clone(), backend, stop=True)
        assert_identical(actual, expected, backend, output=expected[1] is not None)


# --- 2. a read at one site used in a write at another: in order it runs, else an OrderError ---
SAME_EVENT = {frozenset({INDEX[Site("block", "input")], INDEX[Site("block", "shift")]})}


@_examples(80)
@given(read=st.integers(0, len(SITES) - 1), write=st.integers(0, len(SITES) - 1),
       form=st.sampled_from(["add_usable_mean", "iaddslice_usable"]),
       lo=st.integers(0, 6), hi=st.integers(0, 6))
def test_a_read_used_in_a_write_elsewhere_runs_in_order_or_raises(read, write, form, lo, hi):
    steps = [Step("save_sum", read), Step(form, write, a=lo, b=hi)]
    later = read > write and frozenset({read, write}) not in SAME_EVENT
    if not later:
        with torch.no_grad():
            expected = run_reference(steps, X.clone())
    for backend in BACKENDS:
        if later:
            with pytest.raises(fxsight.OrderError, match="only computed after"):
                with torch.no_grad():
                    run_fxsight(steps, X.clone(), backend)
        else:
            with torch.no_grad():
                actual = run_fxsight(steps, X.clone(), backend)
            assert_identical(actual, expected, backend)


# --- 3. gradients: .grad read and written at random sites, against tensor hooks ---------------
GRAD_SITES = [i for i, s in enumerate(SITES) if s.accessor != "shift"]


@dataclass(frozen=True)
class GradStep:
    site: int
    kind: str  # "read", "scale" (h.grad = h.grad * c), "add" (h.grad = h.grad + c)
    c: float


def _grad_steps():
    step = st.builds(GradStep, st.sampled_from(GRAD_SITES),
                     st.sampled_from(["read", "scale", "add"]), st.sampled_from(CONSTANTS))
    # one step per site; a site's gradient arrives before the gradients of earlier sites
    return st.lists(step, min_size=1, max_size=5, unique_by=lambda s: s.site)


def _hook_gradient(value: torch.Tensor, step: GradStep, index: int, got: dict) -> None:
    """Plain PyTorch: ``step`` on ``value``'s gradient (read into ``got[index]``, scaled or
    shifted by ``step.c``)."""
    if step.kind == "read":
        value.register_hook(lambda g: got.__setitem__(index, g))
    elif step.kind == "scale":
        value.register_hook(lambda g, c=step.c: g * c)
    else:
        value.register_hook(lambda g, c=step.c: g + c)


def grad_reference(steps, x):
    saved = {}

    def at(index, value):
        for step in steps:
            if step.site != index:
                continue
            if not value.requires_grad:
                return value
            _hook_gradient(value, step, index, saved)
        return value

    out = reference_forward(MODEL, x, at)
    out[:, 1].sum().backward()
    return [saved.get(s.site) for s in steps if s.kind == "read"]


def grad_fxsight(steps, x, backend, *, compile: bool = False):
    with NET.trace(x, backend=backend, compile=compile) as tracer:
        grads = []
        for step in steps:
            site = SITES[step.site]
            get, _ = _accessors(NET, site)
            with _Scope(tracer, site):
                value = get()
                if step.kind == "read":
                    grads.append(value.grad.save())
                elif step.kind == "scale":
                    value.grad = value.grad * step.c
                else:
                    value.grad = value.grad + step.c
        NET.output[:, 1].sum().backward()
    return grads


@_examples(60)
@given(_grad_steps())
def test_random_gradient_reads_and_writes(steps):
    expected = grad_reference(steps, X.clone())
    for backend in BACKENDS:
        MODEL.zero_grad(set_to_none=True)
        actual = grad_fxsight(steps, X.clone(), backend)
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert type(a) is torch.Tensor, (backend, i, steps)
            assert torch.equal(a, e), (backend, i, steps, (a - e).abs().max())
    MODEL.zero_grad(set_to_none=True)


# --- 4. tracer.cache() of random modules with random writes: the values after the writes --------
CACHE_MODULES = ["inp", "block", "block.lin", "out"]


@_examples(40)
@given(_steps(sites=[i for i, s in enumerate(SITES) if s.call is None]),
       st.lists(st.sampled_from(CACHE_MODULES), min_size=1, max_size=4, unique=True),
       st.booleans())
def test_cache_of_random_modules_holds_the_values_after_random_writes(steps, modules,
                                                                      inputs):
    # the model's output against the hand-written forward; each cached entry against the
    # trace's own reads of the module after the steps
    with torch.no_grad():
        _, expected_out = run_reference(steps, X.clone())
    for backend in BACKENDS:
        with torch.no_grad(), NET.trace(X.clone(), backend=backend) as tracer:
            cache = tracer.cache(modules=[_envoy(NET, m) for m in modules],
                                 include_inputs=inputs)
            steers = _steers(steps)
            saved, usable = [], []
            for step in steps:
                get, set_ = _accessors(NET, SITES[step.site])
                apply_step(step, SITES[step.site].width, get, set_, saved, usable, steers)
            block_out = NET.block.output.save()
            block_in = NET.block.input.save()
            lin_out = NET.block.lin.output.save()  # the module's own output: before a
            # write at the operation that calls it (block.source.self_lin_0.output)
            inp_out = NET.inp.output.save()
            out_in = NET.out.input.save()
            out = NET.output.save()
        assert torch.equal(out, expected_out), backend
        expect = {"inp": (None, inp_out), "block": (block_in, block_out),
                  "block.lin": (None, lin_out), "out": (out_in, out)}
        assert sorted(cache.keys()) == sorted(f"model.{m}" for m in modules)
        for m in modules:
            entry = cache[f"model.{m}"]
            assert torch.equal(entry.output, expect[m][1]), (backend, m)
            if inputs and expect[m][0] is not None:
                assert torch.equal(entry.input, expect[m][0]), (backend, m)


# --- 5. compiled traces: a handful of random programs, compiled, against the reference --------
@pytest.mark.compile
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_steps(max_size=4))
def test_random_programs_compiled(steps):
    """(inductor fuses reductions: the last bits of a sum may differ from eager's)"""
    with torch.no_grad():
        expected = run_reference(steps, X.clone())
        actual = run_fxsight(steps, X.clone(), "fx", compile=True)
    assert len(actual[0]) == len(expected[0])
    for a, e in zip(actual[0], expected[0]):
        assert type(a) is torch.Tensor
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-6)


# --- 6. gradients after forward writes at the same and other sites -----------------------------
DIFFERENTIABLE = ("scale", "add", "iadd", "steer", "relu", "where", "setslice", "imulslice",
                  "iaddindex", "setlast", "copyrow", "save_sum", "add_usable_mean")


def grad_after_writes_reference(writes, grads, x):
    steers = _steers(writes)
    saved, usable, got = [], [], {}

    def at(index, value):
        box = {"v": value}
        for step in writes:
            if step.site == index:
                apply_step(step, SITES[index].width, lambda: box["v"],
                           lambda v: box.__setitem__("v", v), saved, usable, steers)
        value = box["v"]
        for step in grads:
            if step.site == index and value.requires_grad:
                _hook_gradient(value, step, index, got)
        return value

    out = reference_forward(MODEL, x, at)
    out[:, 1].sum().backward()
    return [got.get(s.site) for s in grads if s.kind == "read"], out.detach()


def grad_after_writes_fxsight(writes, grads, x, backend):
    steers = _steers(writes)
    with NET.trace(x, backend=backend) as tracer:
        saved, usable, got = [], [], {}
        for index in sorted({s.site for s in writes} | {s.site for s in grads}):
            site = SITES[index]
            get, set_ = _accessors(NET, site)
            with _Scope(tracer, site):
                for step in writes:
                    if step.site == index:
                        apply_step(step, site.width, get, set_, saved, usable, steers)
                for step in grads:
                    if step.site == index:
                        if step.kind == "read":
                            got[index] = get().grad.save()
                        elif step.kind == "scale":
                            get().grad = get().grad * step.c
                        else:
                            get().grad = get().grad + step.c
        out = NET.output.save()
        NET.output[:, 1].sum().backward()
    return [got[s.site] for s in grads if s.kind == "read"], out.detach()


@_examples(60)
@given(_steps(kinds_plain=("relu", "where", "save_sum"),
              kinds_const=("scale", "add", "iadd", "steer", "add_usable_mean"),
              kinds_index=("setslice", "imulslice", "iaddindex", "setlast", "copyrow"),
              sites=GRAD_SITES, max_size=4),
       _grad_steps())
def test_random_gradients_after_random_forward_writes(writes, grads):
    try:
        expected, expected_out = grad_after_writes_reference(writes, grads, X.clone())
    except RuntimeError as error:  # an in-place edit of a value autograd saved
        assert "modified by an inplace operation" in str(error)
        for backend in BACKENDS:
            MODEL.zero_grad(set_to_none=True)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                grad_after_writes_fxsight(writes, grads, X.clone(), backend)
        MODEL.zero_grad(set_to_none=True)
        return
    MODEL.zero_grad(set_to_none=True)
    for backend in BACKENDS:
        actual, out = grad_after_writes_fxsight(writes, grads, X.clone(), backend)
        MODEL.zero_grad(set_to_none=True)
        assert torch.equal(out, expected_out), backend
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert type(a) is type(e), (backend, i, type(a), type(e))
            if e is not None:
                assert torch.equal(a, e), (backend, i, (a - e).abs().max())


# --- 7. tracer.cache() with tracer.stop(): the modules that ran before the stop ----------------
def _modules_run_before_stop(steps) -> dict[str, int]:
    """Plain PyTorch: ``{cache key: calls}`` of the modules whose forward returned before the
    forward pass was stopped after the last step's site."""
    calls: dict[str, int] = {}
    handles = [module.register_forward_hook(
        lambda m, a, o, key="model" + (f".{path}" if path else ""):
        calls.__setitem__(key, calls.get(key, 0) + 1))
        for path, module in MODEL.named_modules()]
    try:
        with torch.no_grad():
            run_reference(steps, X.clone(), stop=True)
    finally:
        for handle in handles:
            handle.remove()
    # the hand-written forward calls the submodules of the block and of the shared module,
    # not the two modules themselves: they have returned where their output's site is passed
    last = steps[-1].site
    if last >= BLOCK_OUTPUT:
        calls["model.block"] = 1
    if last >= INDEX[Site("out", "input")]:
        calls["model.shared"] = 3
    return calls


@_examples(40)
@given(_steps(sites=[i for i, s in enumerate(SITES) if s.call is None], max_size=3))
def test_a_cache_in_a_stopped_trace_holds_the_modules_that_ran_before_the_stop(steps):
    """(was: the cache made the forward pass run to its end, every module and its side
    effects, whatever the stop's place)"""
    steps = [*steps, Step("save_raw", steps[-1].site)]  # (the last site is used)
    expected = _modules_run_before_stop(steps)
    for backend in BACKENDS:
        with torch.no_grad(), NET.trace(X.clone(), backend=backend) as tracer:
            cache = tracer.cache()
            steers = _steers(steps)
            saved, usable = [], []
            for step in steps:
                get, set_ = _accessors(NET, SITES[step.site])
                apply_step(step, SITES[step.site].width, get, set_, saved, usable, steers)
            tracer.stop()
        got = {key: len(entry) if isinstance(entry, list) else 1
               for key, entry in cache.items()}
        assert got == expected, (backend, steps)


@pytest.mark.compile
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_grad_steps())
def test_random_gradient_reads_and_writes_compiled(steps):
    expected = grad_reference(steps, X.clone())
    MODEL.zero_grad(set_to_none=True)
    grads = grad_fxsight(steps, X.clone(), None, compile=True)  # (the default backend)
    MODEL.zero_grad(set_to_none=True)
    assert len(grads) == len(expected)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# --- 8. one call of the module called three times skipped; reads of its other calls ---------
def _skipped_call_reference(skipped: int, scale: float, x: torch.Tensor):
    """Plain PyTorch: the shared module's call ``skipped`` gives its input times ``scale``;
    the outputs of every call and of its ``lin`` in the calls that run."""
    outputs, lins = {}, {}
    h = MODEL.inp(x)
    h = MODEL.block(h, 2.0, shift=torch.ones(x.shape[0], WIDTH))
    for call in range(3):
        if call == skipped:
            h = h * scale
        else:
            lins[call] = MODEL.shared.lin(h)
            h = torch.tanh(lins[call]) + h
        outputs[call] = h
    return outputs, lins, MODEL.out(h)


@_examples(20)
@given(skipped=st.integers(0, 2), scale=st.sampled_from(CONSTANTS),
       reads=st.lists(st.tuples(st.sampled_from(["shared", "shared.lin", "op"]),
                                st.integers(0, 2)), min_size=1, max_size=4))
def test_a_skipped_call_keeps_the_other_calls_numbers(skipped, scale, reads):
    """``with tracer.iter[s]: shared.skip(...)``, then reads of the module, its submodule and
    its operation in the other calls, counted as in the forward: on both backends the values
    of those calls (was: on hooks a submodule's later call "never ran": the skipped call's
    inner calls were not counted); a read inside the skipped call is a TraceError."""
    with torch.no_grad():
        outputs, lins, expected_out = _skipped_call_reference(skipped, scale, X.clone())
    for backend in BACKENDS:
        inside = [(what, call) for what, call in reads if what != "shared" and call == skipped]
        with torch.no_grad():
            def run():
                with NET.trace(X.clone(), backend=backend) as tracer:
                    with tracer.iter[skipped]:
                        NET.shared.skip(NET.shared.input * scale)
                    got = []
                    for what, call in reads:
                        with tracer.iter[call]:
                            envoy = {"shared": NET.shared, "shared.lin": NET.shared.lin,
                                     "op": NET.shared.source.self_lin_0}[what]
                            got.append(envoy.output.save())
                    out = NET.output.save()
                return got, out
            if inside:
                with pytest.raises(fxsight.TraceError, match="skipped"):
                    run()
                continue
            got, out = run()
        assert torch.equal(out, expected_out), backend
        for (what, call), value in zip(reads, got):
            expected = outputs[call] if what == "shared" else lins[call]
            assert torch.equal(value, expected), (backend, what, call)
