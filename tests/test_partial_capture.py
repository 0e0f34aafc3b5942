"""Partial capture: a module that cannot be captured runs as one opaque call
(``fxsight::opaque``) inside an otherwise captured graph (``capture/opaque.py``)."""

import warnings

import pytest
import torch

import fxsight
from fxsight.capture.opaque import opaque_modules
from fxsight.errors import TraceError


class Routed(torch.nn.Module):
    """Data-dependent control flow: ``torch.export`` cannot capture it."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)

    def forward(self, x):
        if (x.sum() > 0).item():
            return self.inner(x) * 2
        return self.inner(x) - 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.routed = Routed()
        self.b = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.routed(self.a(x)))))


def _net():
    torch.manual_seed(0)
    return Net()


def _trace(net, x, body, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with net.trace(x, **kw) as tracer:
            values = body()
    return tracer, values, [str(w.message) for w in caught]


def test_opaque_module_inside_a_captured_graph():
    model = _net()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    net = fxsight.NNsight(model)

    def body():
        return net.routed.output.save(), net.b.output.save(), net.output.save()

    tracer, (routed, b, out), messages = _trace(net, x, body)
    assert tracer.backend == "fx"
    assert opaque_modules(tracer.graph_module) == ["routed"]
    assert any("module 'routed' runs as one opaque call" in m for m in messages), messages
    with torch.no_grad():
        expected_routed = model.routed(model.a(x))
        expected = model(x)
    assert torch.equal(routed, expected_routed)
    assert torch.equal(out, expected)
    assert "forward" not in vars(model.routed)  # nothing left on the module


def test_writes_around_an_opaque_module_equal_hooks():
    model = _net()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    value = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    net = fxsight.NNsight(model)
    for backend in ("auto", "hooks"):
        def body():
            net.a.output = value  # into the opaque module's input
            return net.routed.output.save(), net.output.save()
        tracer, (routed, out), _ = _trace(net, x, body, backend=backend)
        handle = model.a.register_forward_hook(lambda m, i, o: value)
        try:
            with torch.no_grad():
                expected = model(x)
        finally:
            handle.remove()
        assert torch.equal(out, expected), backend
    # replacing the opaque module's output
    def body():
        net.routed.output = value
        return net.output.save()
    tracer, out, _ = _trace(net, x, body)
    assert tracer.backend == "fx"
    with torch.no_grad():
        expected = model.c(torch.relu(model.b(value)))
    assert torch.equal(out, expected)


def test_an_opaque_call_is_kept_for_what_it_may_change():
    """What a module that could not be captured changes is unknown (its running
    statistics, random draws, Python state): its call runs, as in a plain forward, though
    no saved value needs it (it used to be pruned)."""
    model = _net()
    x = torch.randn(3, 8)
    net = fxsight.NNsight(model)
    tracer, saved, _ = _trace(net, x, lambda: net.a.output.save())
    assert tracer.backend == "fx" and opaque_modules(tracer.graph_module) == ["routed"]
    assert torch.equal(saved, model.a(x))


def _statistics_model() -> torch.nn.Sequential:
    """A BatchNorm, then one keeping a cumulative average (``momentum=None``: its forward
    reads its counter as a Python number, so it is not captured: an opaque call, and the
    shapes are learnt by a real forward), and a dropout after it, in training mode."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8, momentum=None),
                               torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)).train()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("read", ["output", "first layer"])
def test_a_trace_changes_statistics_and_generators_as_a_plain_forward(backend, read):
    """The running statistics, the dropout mask and the generator after a trace are the
    plain forward's: learning the shapes by a real forward (when fake tensors cannot run
    the model) leaves no update of BatchNorm's statistics behind (its kernel updates them
    without bumping their version counter), and an opaque BatchNorm runs though no saved
    value needs it."""
    model, reference = _statistics_model(), _statistics_model()
    net = fxsight.NNsight(model)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(2):
            torch.manual_seed(seed)
            expected = reference(x)
            generator = torch.random.get_rng_state()
            torch.manual_seed(seed)
            with net.trace(x, backend=backend) as tracer:
                saved = (net.output if read == "output" else net[0].output).save()
            assert tracer.backend == backend
            assert torch.equal(torch.random.get_rng_state(), generator)
            if read == "output":
                assert torch.equal(saved, expected)
            for (name, value), plain in zip(model.state_dict().items(),
                                            reference.state_dict().values()):
                assert torch.equal(value, plain), name


def test_sites_inside_an_opaque_module_run_on_hooks():
    model = _net()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    net = fxsight.NNsight(model)

    def body():
        net.routed.inner.output[:] = 0
        return net.output.save()

    tracer, out, messages = _trace(net, x, body)
    assert tracer.backend == "hooks"
    assert any("inside module 'routed'" in m and "runs with the hooks backend" in m
               for m in messages), messages
    with torch.no_grad():
        expected = model.c(torch.relu(model.b(torch.zeros(3, 8) * 2 - 0)))
        h = model.a(x)
        inner = torch.zeros(3, 8)
        routed = inner * 2 if (h.sum() > 0) else inner - 1
        expected = model.c(torch.relu(model.b(routed)))
    assert torch.equal(out, expected)
    with pytest.raises(TraceError, match="inside module 'routed'"):
        with net.trace(x, backend="fx"):
            net.routed.inner.output[:] = 0


def test_gradients_through_an_opaque_module_run_on_hooks():
    model = _net()
    x = torch.randn(3, 8)
    net = fxsight.NNsight(model)

    def body():
        grad = net.a.output.grad.save()
        net.output.sum().backward()
        return grad

    tracer, grad, messages = _trace(net, x, body)
    assert tracer.backend == "hooks"
    assert any("gradients" in m and "'routed'" in m for m in messages), messages
    assert grad.shape == (3, 8)


def test_export_of_a_partly_captured_model_is_refused():
    from fxsight.errors import CaptureError
    net = fxsight.NNsight(_net())
    with pytest.raises(CaptureError, match="module 'routed' runs as an opaque call"):
        net.export(torch.randn(3, 8))


def test_a_forward_that_changes_its_state_is_opaque_there():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * 3

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Counting(), torch.nn.Linear(4, 2))
    net = fxsight.NNsight(model)
    x = torch.randn(2, 4)
    tracer, out, messages = _trace(net, x, lambda: net[1].output.save())
    assert tracer.backend == "fx"
    assert any("module '1' runs as one opaque call" in m for m in messages), messages
    assert torch.equal(out, model[0](x) * 3)
    assert model[1].calls >= 1 and "forward" not in vars(model[1])


def test_partial_capture_under_autocast():
    """Inside ``torch.autocast`` the outputs that an opaque call's fake implementation
    returns are recorded with autocast's cache of weight casts off: the capture succeeds
    and the trace equals plain PyTorch in the same kind of block, as does a plain forward
    after it in the same block."""
    model = _net()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_b = model.b(model.routed(model.a(x)))
        expected = model(x)
    net = fxsight.NNsight(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracer, (b, out), _ = _trace(net, x, lambda: (net.b.output.save(),
                                                      net.output.save()), backend="fx")
        after = model(x)
    assert opaque_modules(tracer.graph_module) == ["routed"]
    assert torch.equal(b, expected_b) and torch.equal(out, expected)
    assert type(after) is torch.Tensor and torch.equal(after, expected)
