"""Capture state: a capture is reused only while everything it baked in is unchanged.

The fx backend runs a graph captured from one forward pass: whatever that pass read from
the model (parameters and buffers by identity, dtypes, submodules, training flags, plain
Python attributes, hooks) is frozen into it. A change between traces must lead to a new
capture (or be refused with a clear error), never to a stale result. Each test compares
both backends with the plain model called by hand.

Also here: fxsight installs nothing at import (a user's ``torch.compile`` does not
recompile because fxsight is imported), the capture cache is bounded, and a capture never
reassigns the process-wide ``sys.stderr``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import types
import warnings

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.capture import captures as capture_cache

BACKENDS = ("fx", "hooks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Inner:
    """A settings object inside a settings object (a config's ``text_config``)."""

    def __init__(self):
        self.sign = 1.0


class Config:
    """A plain settings object, as transformers' configs are (read in forward)."""

    def __init__(self):
        self.negate = False
        self.signs = [1.0]  # (a list: changed in place, the object's attributes are not)
        self.inner = Inner()


@dataclasses.dataclass(slots=True)
class Options:
    """A settings object without a ``__dict__`` (its attributes in slots)."""

    gain: float = 1.0
    signs: list = dataclasses.field(default_factory=lambda: [1.0])


class Helper:
    """A settings object holding a tensor (a steering helper's vector) and a number."""

    def __init__(self):
        self.vector = torch.zeros(5)
        self.alpha = 1.0


class Doubler(torch.nn.Module):
    """Doubles its input in training mode only (a deterministic stand-in for dropout)."""

    def forward(self, x):
        return x * 2 if self.training else x


class Stateful(torch.nn.Module):
    """A model whose forward reads plain attributes, a plain tensor attribute, a settings
    object, a submodule's training flag, the dtype of its weights and a module list."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(5, 5)
            self.post = torch.nn.ModuleList([torch.nn.Linear(5, 5)])
        self.gate = Doubler()
        self.scale = 2.0
        self.offset = torch.ones(5)
        self.config = Config()
        self.factors = [1.0]
        self.table = {"bias": 0.0}
        self.vectors = {"shift": torch.zeros(5)}  # (tensors in plain containers, as a
        self.extras = [torch.zeros(5)]            # steering module keeps its vectors)
        self.options = Options()
        self.helper = Helper()

    def forward(self, x):
        h = self.lin(x.to(self.lin.weight.dtype)).to(x.dtype) * self.scale + self.offset
        h = h * self.factors[0] * self.config.signs[0] * self.config.inner.sign + \
            self.table["bias"]
        if self.config.negate:
            h = -h
        h = h + getattr(self, "shift", 0.0) + self.vectors["shift"] + sum(self.extras)
        h = h * self.options.gain * self.options.signs[0] + \
            self.helper.vector * self.helper.alpha
        for layer in self.post:
            h = layer(h)
        return self.gate(h)


def _x(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(1))


def _new_linear() -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return torch.nn.Linear(5, 5)


def _load_assign(model):
    state = {name: torch.randn_like(value) for name, value in model.state_dict().items()
             if name.startswith("lin.")}
    model.load_state_dict(state, strict=False, assign=True)


CHANGES = {
    "plain attribute": lambda m: setattr(m, "scale", 3.0),
    "added attribute": lambda m: setattr(m, "shift", 1.5),
    "plain tensor attribute replaced": lambda m: setattr(m, "offset", torch.full((5,), 2.0)),
    "settings object attribute": lambda m: setattr(m.config, "negate", True),
    "settings object replaced": lambda m: setattr(m, "config", type("C", (), {
        "negate": True, "signs": [1.0], "inner": Inner()})()),
    "nested settings object's attribute": lambda m: setattr(m.config.inner, "sign", -1.0),
    "submodule train()": lambda m: m.gate.train(),
    "parameter replaced": lambda m: setattr(m.lin, "weight", torch.nn.Parameter(torch.randn(5, 5))),
    "load_state_dict(assign=True)": _load_assign,
    "submodule to(float64)": lambda m: m.lin.to(torch.float64),
    "submodule added": lambda m: m.post.append(_new_linear()),
    "submodule removed": lambda m: m.post.__delitem__(0),
    "submodule replaced": lambda m: m.post.__setitem__(0, _new_linear()),
    # (no dict of the model changes: the dict-version fast path must compare these)
    "plain list attribute changed in place": lambda m: m.factors.__setitem__(0, 3.0),
    "plain dict attribute changed in place": lambda m: m.table.__setitem__("bias", 1.0),
    "settings object's list changed in place": lambda m: m.config.signs.__setitem__(0, -1.0),
    "tensor in a plain dict replaced": lambda m: m.vectors.__setitem__("shift", torch.ones(5)),
    "tensor appended to a plain list": lambda m: m.extras.append(torch.ones(5)),
    "helper object's tensor replaced": lambda m: setattr(m.helper, "vector", torch.ones(5)),
    "helper object's number": lambda m: (setattr(m.helper, "vector", torch.ones(5)),
                                         setattr(m.helper, "alpha", 3.0)),
    "slotted settings object's attribute": lambda m: setattr(m.options, "gain", 3.0),
    "slotted settings object's list changed in place":
        lambda m: m.options.signs.__setitem__(0, -1.0),
    "parameters' data to float64": lambda m: [setattr(p, "data", p.data.double())
                                              for p in m.lin.parameters()],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_traces_is_seen(change, backend):
    model = Stateful().eval()
    net = NNsight(model)
    x = _x()
    with net.trace(x, backend=backend) as tracer:
        first = net.lin.output.save()
        out = net.output.save()
    assert tracer.backend == backend
    assert torch.equal(out, model(x)) and torch.equal(first, model.lin(x))
    CHANGES[change](model)
    expected = model(x)
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend
    assert out.dtype == expected.dtype and torch.equal(out, expected), change
    # and back again (a state seen before may reuse its capture: it must still be right)
    with net.trace(x, backend=backend) as tracer:
        net.gate.output[:] = 0
        zeroed = net.output.save()
    assert torch.equal(zeroed, torch.zeros_like(expected))


class ReadsTorchSettings(torch.nn.Module):
    """A forward whose result depends on torch's process-wide settings: the default dtype
    (read in Python, as transformers' sinusoidal embeddings'
    ``emb.to(torch.get_default_dtype())``), and branches on inference mode, deterministic
    algorithms and the float32 matmul precision."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(5, 5)

    def forward(self, x):
        h = (self.lin(x) + torch.arange(5) / 3).to(torch.get_default_dtype())
        if torch.is_inference_mode_enabled():
            h = h * 2
        if torch.are_deterministic_algorithms_enabled():
            h = h - 1
        if torch.get_float32_matmul_precision() != "highest":
            h = h + 10
        return h


@contextlib.contextmanager
def _torch_setting(get, set_, value):
    """``set_(value)`` for the ``with`` block, then ``set_`` back what ``get()`` gave."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


TORCH_SETTINGS = {
    "default dtype": lambda: _torch_setting(
        torch.get_default_dtype, torch.set_default_dtype, torch.float64),
    "inference mode": torch.inference_mode,
    "deterministic algorithms": lambda: _torch_setting(
        torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, True),
    "float32 matmul precision": lambda: _torch_setting(
        torch.get_float32_matmul_precision, torch.set_float32_matmul_precision,
        "high" if torch.get_float32_matmul_precision() == "highest" else "highest"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(TORCH_SETTINGS))
def test_a_torch_setting_changed_between_traces_is_seen(setting, backend):
    """A graph captured under torch's settings of one trace is not reused under others
    (the fx backend used to give the first trace's dtype and branches, silently)."""
    model = ReadsTorchSettings()
    net = NNsight(model)
    x = _x()
    for changed in (False, True, False):
        with torch.no_grad(), (TORCH_SETTINGS[setting]() if changed else
                               contextlib.nullcontext()):
            expected = model(x)
            with net.trace(x, backend=backend) as tracer:
                out = net.output.save()
        assert tracer.backend == backend
        assert out.dtype == expected.dtype and torch.equal(out, expected), (setting, changed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_with_large_containers_is_watched(backend):
    """A config holding a container of more than 64 plain values (an ImageNet classifier's
    ``id2label``, the ``layer_types`` of an 80-layer Qwen2) is still a settings object: an
    attribute the forward reads (``use_cache``), changed between traces, is seen."""
    from models import tiny_gpt2

    model = tiny_gpt2(id2label={i: f"label {i}" for i in range(100)})
    net = NNsight(model)
    ids = torch.arange(6).unsqueeze(0)
    with net.trace(ids, backend=backend):
        out = net.output.save()
    assert out.past_key_values is not None
    labels = model.config.id2label
    model.config.use_cache = False
    expected = model(ids)
    assert expected.past_key_values is None
    with net.trace(ids, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend
    assert out.past_key_values is None and torch.equal(out.logits, expected.logits)
    assert model.config.id2label is labels  # (held as it is, never replaced)


class Scaled(torch.nn.Module):
    """A linear layer scaled by ``settings[0]`` or ``settings["scale"]``."""

    def __init__(self, settings):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(5, 5)
        self.settings = settings

    def forward(self, x):
        key = 0 if isinstance(self.settings, collections.deque) else "scale"
        return self.lin(x) * self.settings[key]


SETTINGS = {
    "OrderedDict": lambda: collections.OrderedDict(scale=2.0),
    "defaultdict": lambda: collections.defaultdict(float, scale=2.0),
    "deque": lambda: collections.deque([2.0]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(SETTINGS))
def test_containers_of_other_kinds_stay_the_models_and_are_watched(kind, backend):
    """An OrderedDict, defaultdict or deque attribute stays the model's own object after a
    capture (export puts back copies of every container it knows), so the caller's
    reference to it still changes the model; changed in place, it is seen."""
    model = Scaled(SETTINGS[kind]()).eval()
    held = model.settings
    net = NNsight(model)
    x = _x()
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend and torch.equal(out, model(x))
    assert model.settings is held
    held[0 if kind == "deque" else "scale"] = 5.0
    expected = model(x)
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend and torch.equal(out, expected)
    assert not torch.equal(expected, model.lin(x) * 2.0)


def _doubled(x):
    return x * 2


class Activated(torch.nn.Module):
    """A linear layer whose settings object holds its activation function."""

    def __init__(self, act):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(5, 5)
        self.cfg = types.SimpleNamespace(act=act, scale=1.0)

    def forward(self, x):
        return self.cfg.act(self.lin(x)) * self.cfg.scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [torch.tanh, _doubled, torch.nn.functional.gelu])
def test_a_settings_object_holding_a_function_is_watched(act, backend):
    """A settings object may hold a function (an activation) besides plain values: its
    plain attributes changed between traces are seen (the function by identity)."""
    model = Activated(act)
    net = NNsight(model)
    x = _x()
    with net.trace(x, backend=backend):
        net.output.save()
    model.cfg.scale = 3.0
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend and torch.equal(out, model(x))
    model.cfg.act = torch.sigmoid
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert torch.equal(out, model(x))


def test_an_unchanged_model_is_checked_by_its_dicts_versions(monkeypatch):
    """Between traces of an unchanged model, the state check reads the dicts' version tags
    and compares values only where no dict shows a change; after a change that leaves every
    value equal (a number set to an equal one), it compares values once, then reads
    versions again."""
    from fxsight._torch import dict_version_reader
    from fxsight.capture import state

    if dict_version_reader() is None:
        pytest.skip("this Python gives no dict version tags")
    model = Stateful().eval()
    net = NNsight(model)
    x = _x()
    for _ in range(2):  # (the capture puts the parameters back: values compared once)
        with net.trace(x):
            net.output.save()
    full = []
    original = state.Watch._unchanged_values
    monkeypatch.setattr(state.Watch, "_unchanged_values",
                        lambda self, *a: full.append(1) or original(self, *a))
    for _ in range(3):
        with net.trace(x):
            out = net.output.save()
    assert full == [] and torch.equal(out, model(x))
    model.scale = float("2.0")  # (equal: the same state, by value)
    for _ in range(3):
        with net.trace(x):
            out = net.output.save()
    assert full == [1] and torch.equal(out, model(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_toggling_train_and_eval_reuses_captures(backend):
    model = Stateful().eval()
    net = NNsight(model)
    x = _x()
    for _ in range(3):
        for mode in (True, False):
            model.gate.train(mode)
            with net.trace(x, backend=backend):
                out = net.output.save()
            assert torch.equal(out, model(x))
    if backend == "fx":  # two states, two captures, whatever the number of toggles
        captures = capture_cache._CACHE[model]
        assert len(captures) == 2


def test_user_hook_closures_are_never_stale():
    """A user's hook may read anything (its closure, globals): the fx backend cannot know
    when its effect changes, so a model whose hooks change values runs on the hooks
    backend (``auto``) or is refused by name (``fx``); never a graph with an old effect of
    the hook."""
    model = Stateful().eval()
    net = NNsight(model)
    x = _x()
    factor = [2.0]
    for hook in (lambda m, args, out: out * factor[0],  # a new output
                 lambda m, args, out: out.mul_(factor[0])):  # the output edited in place
        handle = model.lin.register_forward_hook(hook)
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                for value in (2.0, 5.0):
                    factor[0] = value
                    with net.trace(x) as tracer:
                        out = net.output.save()
                    assert tracer.backend == "hooks"
                    assert torch.equal(out, model(x))
            assert any("forward hook" in str(w.message) and "'lin'" in str(w.message)
                       for w in record)
            with pytest.raises(fxsight.CaptureError,
                               match=r"module 'lin' has a forward hook.*runs no Python hook"):
                with net.trace(x, backend="fx"):
                    net.output.save()
        finally:
            handle.remove()
    handle = model.post[0].register_forward_pre_hook(lambda m, args: (args[0] * factor[0],))
    try:
        with pytest.raises(fxsight.CaptureError, match=r"'post.0' has a forward pre-hook.*runs no Python hook"):
            with net.trace(x, backend="fx"):
                net.output.save()
    finally:
        handle.remove()
    with net.trace(x) as tracer:  # the hooks gone, the graph is back
        out = net.output.save()
    assert tracer.backend == "fx" and torch.equal(out, model(x))


BACKWARD_HOOKS = {
    "full backward hook": lambda m, seen: m.lin.register_full_backward_hook(
        lambda module, grad_in, grad_out: (seen.append(1), (grad_in[0] * 10,))[1]),
    "full backward pre-hook": lambda m, seen: m.post[0].register_full_backward_pre_hook(
        lambda module, grad_out: (seen.append(1), (grad_out[0] * 10,))[1]),
    "global full backward hook": lambda m, seen:
        torch.nn.modules.module.register_module_full_backward_hook(
            lambda module, grad_in, grad_out: seen.append(1)),
}


@pytest.mark.parametrize("kind", list(BACKWARD_HOOKS))
def test_backward_hooks_run_as_in_a_plain_backward(kind):
    """A graph calls no module, so a module's backward hook (or torch's global one) would
    never run on fx and the gradients would not be the plain backward's: such a model runs
    on the hooks backend (``auto``), and ``fx`` refuses it by name."""
    model = Stateful().eval()
    net = NNsight(model)
    with net.trace(_x(), backend="fx"):  # (captured before the hook: a new state after)
        net.output.sum().backward()
    seen: list = []
    handle = BACKWARD_HOOKS[kind](model, seen)
    try:
        x = _x().requires_grad_()
        model(x).sum().backward()
        expected, calls = x.grad, len(seen)
        assert calls
        seen.clear()
        x = _x().requires_grad_()
        with pytest.warns(RuntimeWarning, match="backward"):
            with net.trace(x) as tracer:
                net.output.sum().backward()
        assert tracer.backend == "hooks" and torch.equal(x.grad, expected)
        assert seen
        with pytest.raises(fxsight.CaptureError, match="backward (pre-)?hook"):
            with net.trace(_x(), backend="fx"):
                net.output.save()
    finally:
        handle.remove()
        model.zero_grad()


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_hooks_that_only_look_run_on_real_values_once_per_trace(backend):
    """A graph runs no Python hook: a model with hooks runs on the hooks backend (fx
    refuses it by name), where each hook sees the real values once per trace, as in a
    plain forward."""
    model = Stateful().eval()
    net = NNsight(model)
    x = _x()
    seen = []
    handle = model.lin.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                with net.trace(x, backend=backend) as tracer:
                    out = net.output.save()
        with pytest.raises(fxsight.CaptureError, match=r"module 'lin' has a forward hook"):
            with net.trace(x, backend="fx"):
                net.output.save()
        expected = model(x)
    finally:
        handle.remove()
    assert tracer.backend == "hooks" and torch.equal(out, expected)
    assert [type(v) for v in seen] == [torch.Tensor] * 3  # two traces, one plain forward
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[2])


class Counting(torch.nn.Module):
    """A forward that changes the module's own Python state (a captured graph would not)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


def test_a_forward_that_changes_its_module_is_not_captured():
    model = Counting()
    net = NNsight(model)
    x = _x()
    with pytest.raises(fxsight.CaptureError, match=r"'calls'"):
        with net.trace(x, backend="fx"):
            net.output.save()
    assert model.calls == 0  # (refused before running: the model is as it was)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for calls in range(1, 4):  # each trace counts once, as a plain forward does
            with net.trace(x) as tracer:
                out = net.output.save()
            assert tracer.backend == "hooks"
            assert model.calls == calls
            assert torch.equal(out, model.lin(x) * calls)


# --- nothing installed at import ------------------------------------------------------

def test_importing_fxsight_installs_no_global_module_hooks():
    module = torch.nn.modules.module
    for name in ("_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks", "_global_forward_hooks",
                 "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        hooks = getattr(module, name, {})
        assert not any(getattr(h, "__module__", "").startswith("fxsight")
                       for h in hooks.values()), name


_COMPILE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch._dynamo.utils import counters
    if sys.argv[1] == "with":  # imported, and used on another model
        import fxsight
        net = fxsight.NNsight(torch.nn.Linear(4, 4))
        with net.trace(torch.randn(2, 4)):
            net.output.save()

    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x, n: int = 2):
            for layer in self.layers[:n]:  # registers modules (a new ModuleList)
                x = layer(x)
            return x

    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    model = torch.compile(Sliced(), backend=backend)
    x = torch.randn(2, 4)
    for _ in range(6):
        model(x)
    print(len(compiled), counters["stats"]["unique_graphs"])
""")


def test_user_torch_compile_does_not_recompile_because_fxsight_is_imported():
    counts = {}
    for mode in ("without", "with"):
        result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, mode], cwd=ROOT,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, result.stderr
        graphs, unique = map(int, result.stdout.strip().splitlines()[-1].split())
        counts[mode] = (graphs, unique)  # (the backend's count, dynamo's own counter)
    assert counts["without"] == (1, 1)
    assert counts["with"] == counts["without"], counts


# --- a bounded capture cache ------------------------------------------------------------

def _captures_of(model) -> int:
    per_model = capture_cache._CACHE.get(model)
    return 0 if per_model is None else len(per_model)


def test_capture_cache_is_bounded_per_model():
    from models import mlp
    model = mlp()
    net = NNsight(model)
    for rows in range(1, 101):
        x = torch.randn(rows, 5)
        with net.trace(x, backend="fx"):
            out = net.output.save()
        assert torch.equal(out, model(x))
        assert _captures_of(model) <= capture_cache.MAX_CAPTURES
    assert _captures_of(model) == capture_cache.MAX_CAPTURES
    # the most recent shapes are still cached: no new capture for them
    assert capture_cache._CACHE[model].get(capture_cache.signature(
        model, (torch.randn(100, 5),), {})) is not None
    before = fxsight.stats()["captures"]
    with net.trace(torch.randn(100, 5), backend="fx"):
        net.output.save()
    assert fxsight.stats()["captures"] == before


class _RootGate(torch.nn.Module):
    """A data-dependent branch in the root's own forward: no submodule to make opaque, so
    capture fails outright."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5)

    def forward(self, x):
        h = self.lin(x)
        return h if h.sum() > 0 else -h


def test_failed_captures_are_bounded_too():
    model = _RootGate()
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in range(1, capture_cache.MAX_CAPTURES + 11):
            with net.trace(torch.randn(rows, 5)) as tracer:
                net.output.save()
            assert tracer.backend == "hooks"
    assert _captures_of(model) == capture_cache.MAX_CAPTURES


def _fail_twice(model):
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # a failure, then the failure remembered
            with net.trace(_x()) as tracer:
                net.output.save()
            assert tracer.backend == "hooks"


def test_a_model_whose_capture_failed_is_not_kept_alive():
    """A remembered failure keeps no traceback (whose frames hold the model)."""
    import gc
    import weakref
    model = _RootGate()
    _fail_twice(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_partly_captured_model_is_not_kept_alive():
    """The opaque calls of a partial capture find their module weakly."""
    import gc
    import weakref
    from test_core_fallback import gated_mlp
    def trace_twice(model):  # (in its own frame: binding reads the frame's locals)
        net = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                with net.trace(_x()) as tracer:
                    net.output.save()
                assert tracer.backend == "fx"

    model = gated_mlp()
    trace_twice(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_opaque_calls_of_evicted_captures_are_let_go(monkeypatch):
    """A partly captured model traced with many input shapes: the registry of its opaque
    calls stays as bounded as the capture cache (it used to keep one entry per capture
    for as long as the model lived), and the kept captures still run."""
    import gc
    from fxsight.capture import opaque
    from test_core_fallback import gated_mlp
    monkeypatch.setattr(capture_cache, "MAX_CAPTURES", 3)
    model = gated_mlp()
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in [*range(1, 9), 6, 7, 8]:
            x = torch.randn(rows, 5)
            with net.trace(x, backend="fx"):
                out = net.output.save()
            assert torch.equal(out, model(x))
    gc.collect()
    assert _captures_of(model) == 3
    calls = [call for call in opaque._CALLS.values() if call.module() is model.gate]
    assert len(calls) == 3


def test_dynamic_captures_are_bounded_too(monkeypatch):
    from models import mlp
    monkeypatch.setattr(capture_cache, "MAX_CAPTURES", 4)
    monkeypatch.setattr(capture_cache, "_MAX_VIEWS", 6)
    model = mlp()
    net = NNsight(model)
    for rank in range(2, 9):  # a new structure (general signature) each rank
        for size in (2, 3):  # a second shape: a dynamic capture (a base) for the rank
            x = torch.randn(*(size,) * (rank - 1), 5)
            with net.trace(x, backend="fx", compile={"backend": "eager"}):
                out = net.output.save()
            assert torch.allclose(out, model(x), atol=1e-6)
            cache = capture_cache._CACHE[model]
            assert len(cache) <= 4 and len(cache.views) <= 6 and len(cache.shapes) <= 6


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _clear_torch_caches():
    """torch's own caches that grow with every new shape, whoever exports (fake-tensor
    dispatch results, the source of generated code): not fxsight's to bound."""
    import gc
    from torch._subclasses.fake_tensor import FakeTensorMode
    FakeTensorMode.cache.clear()
    torch.fx.graph_module._loader.eval_cache.clear()
    gc.collect()


def test_memory_stays_flat_over_new_input_shapes(monkeypatch):
    from models import mlp
    monkeypatch.setattr(capture_cache, "MAX_CAPTURES", 8)
    model = mlp()
    net = NNsight(model)

    def trace(rows):
        with net.trace(torch.randn(rows, 5), backend="fx"):
            net.layer2.output[:, 0] = 0
            net.output.save()

    for rows in range(1, 81):  # fill every cache (and the allocator's arenas)
        trace(rows)
    _clear_torch_caches()
    before = _rss_mb()
    for rows in range(200, 240):  # 40 new shapes, each a new capture
        trace(rows)
    _clear_torch_caches()
    grown = _rss_mb() - before
    print(f"RSS grew {grown:.1f} MB over 40 new shapes")
    # (keeping every capture, and what was built on it, costs ~9 MB here)
    assert grown < 4, f"RSS grew {grown:.1f} MB over 40 new input shapes"
    assert _captures_of(model) == 8


# --- sys.stderr is the process's, during a capture too --------------------------------

class Observer(torch.nn.Module):
    """Records ``sys.stderr`` while its forward runs (during a capture too) and lets a
    thread write to it then."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5)
        self.fail = fail

    def forward(self, x):
        seen.append(sys.stderr)
        thread = threading.Thread(target=lambda: sys.stderr.write("from another thread\n"))
        thread.start()
        thread.join()
        h = self.lin(x)
        if self.fail and h.sum() > 0:  # data-dependent: the capture fails
            return h * 2
        return h


seen: list = []


@pytest.mark.parametrize("fail", [False, True])
def test_a_capture_never_reassigns_sys_stderr(fail, capfd):
    model = Observer(fail)
    real = sys.stderr
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with NNsight(model).trace(_x()) as tracer:
            pass
    assert tracer.backend == ("hooks" if fail else "fx")
    assert seen and all(s is real for s in seen)
    err = capfd.readouterr().err
    # every forward (the capture's and, after a failed capture, the hooks backend's) wrote
    assert err.count("from another thread") == len(seen)
    assert "def forward" not in err


# --- parametrize.cached() ------------------------------------------------------------------

class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return weight * 2


def _parametrized():
    from models import mlp
    import torch.nn.utils.parametrize as parametrize
    model = mlp()
    parametrize.register_parametrization(model.layer2, "weight", _Doubled())
    return model


def test_a_parametrize_cached_block_is_never_baked_into_a_graph():
    """Inside ``parametrize.cached()`` a capture would keep the block's cached weight as a
    constant for later blocks (after the weight changed: the old value, silently): fx
    refuses by name, auto runs on hooks, which use the block's cache as a plain forward."""
    import torch.nn.utils.parametrize as parametrize
    model = _parametrized()
    net = NNsight(model)
    x = _x()
    for _ in range(2):
        with parametrize.cached():
            expected = model(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with net.trace(x) as tracer:
                    out = net.output.save()
            assert tracer.backend == "hooks" and torch.equal(out, expected)
            with pytest.raises(fxsight.CaptureError,
                               match=r"'layer2' has parametrized.*parametrize.cached"):
                with net.trace(x, backend="fx"):
                    net.output.save()
        with torch.no_grad():
            model.layer2.parametrizations.weight.original.mul_(1.5)
        with net.trace(x) as tracer:  # (outside the block: the graph)
            out = net.output.save()
        assert tracer.backend == "fx" and torch.equal(out, model(x))


def test_learning_shapes_leaves_no_fake_tensor_in_the_parametrize_cache():
    """The hooks backend learns shapes by a forward on fake tensors: in a
    ``parametrize.cached()`` block whose cache is empty, that forward used to leave fake
    weights in the cache, and the real forward (and the user's after) then failed."""
    import torch.nn.utils.parametrize as parametrize
    model = _parametrized()
    net = NNsight(model)
    x = _x()
    expected = model(x)
    with parametrize.cached():
        with net.trace(x, backend="hooks"):
            out = net.output.save()
        after = model(x)
    assert torch.equal(out, expected) and torch.equal(after, expected)
