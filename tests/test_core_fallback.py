"""Core engine, fallback: a model with a module that capture cannot handle still traces,
through the hooks backend, with one warning naming the module and the same numbers."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch

import fxsight
from fxsight import NNsight


class SignGate(torch.nn.Module):
    """Data-dependent Python control flow: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(10, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -x


def gated_mlp() -> torch.nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(OrderedDict(
            layer1=torch.nn.Linear(5, 10),
            gate=SignGate(),
            layer2=torch.nn.Linear(10, 10),
            act=torch.nn.Sigmoid(),
            layer3=torch.nn.Linear(10, 2),
        )).eval()


def _x(seed=1, rows=4):
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(seed))


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "fxsight" in str(w.message)]


def test_auto_falls_back_to_hooks_with_one_warning(reference_hooks):
    model = gated_mlp()
    x = _x()
    ref = {}

    def gate_hook(m, i, o):
        ref["gate"] = o
        return o * 2

    with reference_hooks(model, hooks={"gate": gate_hook,
                                       "layer1": lambda m, i, o: ref.__setitem__("h1", o)}):
        expected = model(x)

    net = NNsight(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with net.trace(x) as tracer:
            h1 = net.layer1.output.save()
            gate = net.gate.output.clone().save()
            net.gate.output = net.gate.output * 2
            out = net.output.save()
    # (the gate runs as an opaque call inside the captured graph: capture/opaque.py)
    assert tracer.backend == "fx"
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    message = str(found[0].message)
    assert "gate" in message and "hooks" in message
    assert found[0].filename == __file__  # attributed to the user's `with` line
    assert torch.equal(h1, ref["h1"])
    assert torch.equal(gate, ref["gate"])
    assert torch.equal(out, expected)

    # a second trace (same inputs) does not warn again, and still agrees
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with net.trace(x) as tracer:
            net.gate.output = net.gate.output * 2
            again = net.output.save()
    assert tracer.backend == "fx"
    assert not _fallback_warnings(record)
    assert torch.equal(again, expected)


def test_fallback_takes_both_branches(reference_hooks):
    model = gated_mlp()
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(6):
            x = _x(seed) * (1 if seed % 2 else -1) * 10
            with reference_hooks(model, pre_hooks={
                    "layer2": lambda m, a, k: ((a[0] + 1,), k)}):
                expected = model(x)
            with net.trace(x) as tracer:
                net.layer2.input = net.layer2.input + 1
                out = net.output.save()
            assert tracer.backend == "fx"  # (the opaque gate takes its branch at run time)
            assert torch.equal(out, expected)


def test_backend_fx_raises_capture_error():
    # the gate is an opaque call: a site inside it cannot be on the graph
    net = NNsight(gated_mlp())
    with pytest.raises(fxsight.TraceError, match="inside module 'gate'"):
        with net.trace(_x(), backend="fx"):
            net.gate.inner.output.save()


def test_backend_fx_names_the_trace_where_the_whole_model_is_not_captured():
    """A model that capture refuses as a whole (a forward hook of the user's) under
    ``backend="fx"``: the CaptureError names the trace's line (was: no line)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    handle = model[0].register_forward_hook(lambda module, args, output: None)
    try:
        with pytest.raises(fxsight.CaptureError, match=r"forward hook(.|\n)*"
                                                       r"at .*test_core_fallback\.py"):
            with NNsight(model).trace(torch.ones(1, 3), backend="fx"):
                pass
    finally:
        handle.remove()


def test_fallback_shapes_known_while_recording():
    model = gated_mlp()
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(_x()) as tracer:
            shape = net.gate.output.shape
            net.layer2.output[:, : shape[1] // 2] = 0
            out = net.output.save()
    assert shape == (4, 10)
    assert tracer.backend == "fx"

    def zero_half(m, i, o):
        o[:, :5] = 0

    handle = model.layer2.register_forward_hook(zero_half)
    try:
        expected = model(_x())
    finally:
        handle.remove()
    assert torch.equal(out, expected)


def test_fallback_leaves_no_hooks():
    model = gated_mlp()
    net = NNsight(model)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            with net.trace(_x()):
                net.gate.output[:] = 1
                net.output.save()
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert set(vars(module)) == before[name], name


def test_functional_trace_falls_back_too():
    model = gated_mlp()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with fxsight.trace(model, _x()) as m:
            out = m.output.save()
    found = _fallback_warnings(record)
    assert len(found) == 1 and found[0].filename == __file__
    assert "gate" in str(found[0].message)
    assert torch.equal(out, model(_x()))


def test_failed_capture_prints_nothing_but_the_warning(capfd):
    model = gated_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with NNsight(model).trace(_x()) as tracer:
            pass
    captured = capfd.readouterr()
    assert "def forward" not in captured.err and "def forward" not in captured.out
    assert torch.equal(tracer.result, model(_x()))



class FrozenFeatures(torch.nn.Module):
    """A frozen part of the forward: ``backbone`` runs in a ``torch.no_grad()`` block
    (torch.export captures the block as a nested subgraph, holding the backbone's
    boundary markers), ``head`` after it."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone(x)
        return self.head(features)


def _frozen_features() -> tuple[torch.nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), FrozenFeatures()).eval(), \
            torch.randn(3, 4)


@pytest.mark.parametrize("grad", (True, False))
def test_a_module_called_in_a_no_grad_block_of_a_forward(grad, reference_hooks):
    """A module called inside a ``torch.no_grad()`` block of its parent's forward: its
    output is read and written as with plain hooks. With gradients on, export puts the
    block in a nested subgraph, out of the splice's reach: the trace runs on hooks (one
    warning; ``backend="fx"`` raises naming the site and the line). The read used to be
    ``None`` on fx, without a word. Under ``torch.no_grad()`` the block is the ambient
    mode: it is captured on fx."""
    model, x = _frozen_features()
    got = {}

    def edit(module, args, output):
        got["features"] = output.clone()
        return output * 2

    with torch.set_grad_enabled(grad), reference_hooks(model, hooks={"1.backbone": edit}):
        expected = model(x)
    net = NNsight(model)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x):  # (a read alone)
            read = net[1].backbone.output.save()
    assert type(read) is torch.Tensor and torch.equal(read, got["features"])
    net = NNsight(model)
    with torch.set_grad_enabled(grad), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with net.trace(x) as tracer:
            features = net[1].backbone.output.save()
            net[1].backbone.output = net[1].backbone.output * 2
            output = net.output.save()
    assert tracer.backend == ("hooks" if grad else "fx")
    assert len([w for w in caught if "nested" in str(w.message)]) == (1 if grad else 0)
    assert type(features) is torch.Tensor and torch.equal(features, got["features"])
    assert torch.equal(output, expected)
    assert output.requires_grad == expected.requires_grad
    if grad:
        with pytest.raises(fxsight.errors.NotOnGraph,
                           match=r"(?s)1\.backbone\.output.*no_grad.*test_core_fallback"):
            with net.trace(x, backend="fx"):
                net[1].backbone.output.save()


class _Scaled(torch.nn.Module):
    def forward(self, x, scale):
        return x * scale


class _CallsWithPythonValues(torch.nn.Module):
    """``torch.pow(x, 2.0)`` and ``self.scaled(x, 3.0)``: Python values the captured graph
    holds as constants."""

    def __init__(self):
        super().__init__()
        self.scaled = _Scaled()

    def forward(self, x):
        return self.scaled(torch.pow(x, 2.0) + 1, 3.0)


@pytest.mark.parametrize("site", ["operation", "module"])
def test_an_inputs_write_keeping_a_python_value(site):
    """Writing ``.inputs`` with the Python value the model passes runs on the fx backend,
    as on hooks (was: ``NotOnGraph (2.0 -> 2.0)``, naming ``.input``). The graph holds the
    value as a constant: a later trace of the same lines writing another value is refused
    on the fx backend (its cached graph would keep the old one) and runs on hooks under
    ``"auto"``, with the value written."""
    torch.manual_seed(0)
    net = NNsight(_CallsWithPythonValues())
    x = torch.randn(2, 3)
    kept = 2.0 if site == "operation" else 3.0

    def run(value, backend):
        with net.trace(x, backend=backend) as tracer:
            envoy = net.source.torch_pow_0 if site == "operation" else net.scaled
            t = envoy.inputs[0][0]
            envoy.inputs = ((t * 2, value), {})
            out = net.output.save()
        return out, tracer.backend

    def expected(value):
        if site == "operation":
            return (torch.pow(2 * x, value) + 1) * 3.0
        return (torch.pow(x, 2.0) + 1) * 2 * value

    for backend in ("fx", "hooks"):
        out, used = run(kept, backend)
        assert used == backend and torch.equal(out, expected(kept))
    label = "model.source.torch_pow_0" if site == "operation" else "model.scaled"
    with pytest.raises(fxsight.errors.NotOnGraph,
                       match=rf"{label}\.inputs sets a Python value .*\({kept!r} -> 5\.0\)"):
        run(5.0, "fx")
    with pytest.warns(RuntimeWarning, match="hooks backend"):
        out, used = run(5.0, None)
    assert used == "hooks" and torch.equal(out, expected(5.0))
    out, used = run(kept, None)  # (the same value again: the fx graph)
    assert used == "fx" and torch.equal(out, expected(kept))
