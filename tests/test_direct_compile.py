"""Compiled graphs called without dynamo (``fxsight.run.direct``): a rewritten graph of torch
operations is compiled by inductor directly and called after fxsight's own versions of
dynamo's guards. Each call the direct compilation cannot vouch for (gradients on, a
parameter or input of another layout, inputs sharing storage, a mode) goes through
``torch.compile`` as before; every answer is checked against the eager fx backend. CPU
compiles are slow: one tiny MLP, a handful of compilations."""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import NNsight
from models import mlp

TOL = dict(rtol=1e-4, atol=1e-5)


def _direct_runs() -> int:
    return fxsight.stats()["direct_runs"]


def _steered(net, x, v, **options):
    with net.trace(x, **options):
        net.layer1.output[:, :3] += v
        hidden = net.act2.output.save()
        out = net.output.save()
    return hidden, out


@pytest.fixture
def net():
    return NNsight(mlp(seed=3))


def _check(net, x, v, expect_direct: bool):
    before = _direct_runs()
    got = _steered(net, x, v, compile=True)
    ran_direct = _direct_runs() > before
    want = _steered(net, x, v, compile=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert ran_direct == expect_direct


def test_a_compiled_trace_without_gradients_runs_its_graph_directly(net):
    x, v = torch.randn(4, 5), torch.randn(3)
    with torch.no_grad():
        fxsight.reset_stats()
        _check(net, x, v, expect_direct=True)
        _check(net, x * 2, v + 1, expect_direct=True)  # new values: the same compilation
        assert fxsight.stats()["compilations"] == 1


def test_calls_the_direct_compilation_cannot_vouch_for_go_through_torch_compile(net):
    x, v = torch.randn(4, 5), torch.randn(3)
    with torch.no_grad():
        _check(net, x, v, expect_direct=True)
        # an input of another layout (same shape): its strides are guarded
        _check(net, torch.randn(5, 4).t(), v, expect_direct=False)
        # a parameter given another layout in place (the model's state is the same)
        weight = net._module.layer2.weight
        weight.data = weight.data.t().contiguous().t()
        _check(net, x, v, expect_direct=False)
        weight.data = weight.data.contiguous()
        _check(net, x, v, expect_direct=True)
        # a parameter changed in place is read as it is now
        weight.mul_(-1)
        _check(net, x, v, expect_direct=True)
    # gradients on (the compilation was made without them)
    _check(net, x, v, expect_direct=False)
    # deterministic algorithms: part of the capture's key (its own capture, compiled and
    # run directly in that state)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.no_grad():
            _check(net, x, v, expect_direct=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    # an ambient state that is not part of the key (saved-tensor hooks): dynamo decides
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.no_grad():
        _check(net, x, v, expect_direct=False)


def test_autocast_has_its_own_capture_and_direct_compilation(net):
    """Autocast is part of the capture's key: a trace under it is captured and compiled in
    that state, and the compilation made without it never runs under it (or the reverse)."""
    x, v = torch.randn(4, 5), torch.randn(3)
    with torch.no_grad():
        _check(net, x, v, expect_direct=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _steered(net, x, v, compile=True)
            want = _steered(net, x, v, compile=False)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        _check(net, x, v, expect_direct=True)  # (float32 again: the first compilation)


def test_inputs_that_share_storage_are_not_run_directly(net):
    x = torch.randn(4, 5)
    with torch.no_grad():
        _check(net, x, torch.randn(3), expect_direct=True)
        both = torch.randn(6)
        before = _direct_runs()
        with net.trace(x, compile=True):  # two steering values, views of one tensor
            net.layer1.output[:, :3] += both[:3]
            net.layer1.output[:, 3:6] += both[3:]
            out = net.output.save()
        assert _direct_runs() == before
        with net.trace(x, compile=False):
            net.layer1.output[:, :3] += both[:3]
            net.layer1.output[:, 3:6] += both[3:]
            want = net.output.save()
        torch.testing.assert_close(out, want, **TOL)


def _patched(net, x, **options):
    with net.trace(**options) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(x[:2]):
            clean = net.layer1.output[:, 4]
            barrier()
        with tracer.invoke(x[2:]):
            barrier()
            net.layer1.output[:, 4] = clean
            out = net.output.save()
    return out


def test_two_invoke_patching_runs_directly_with_its_rows_narrowed(net):
    """Each invoke reads its rows of the batch (fxsight's row narrowing, written as a slice
    for inductor) and the patch writes in place (fxsight's setitem, written as
    ``operator.setitem``): the direct compilation gives the eager answer."""
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, 5)
            before = _direct_runs()
            got = _patched(net, x, compile=True)
            assert _direct_runs() == before + 1
            torch.testing.assert_close(got, _patched(net, x, compile=False), **TOL)


def test_a_broadcast_write_runs_its_graph_directly(net):
    """A row written into every row of a module's output (``conform_to`` in the graph
    expands it) ran its graph directly; the suspension of a user's modes in that helper
    then stopped inductor's tracing of it (its fake and proxy modes put aside), and every
    call went through ``torch.compile``. Now direct again, with the eager values."""
    x, row = torch.randn(4, 5), torch.randn(10)

    def written(**options):
        with net.trace(x, **options):
            net.layer1.output = net.layer1.output[0] * 0 + row
            out = net.output.save()
        return out

    with torch.no_grad():
        before = _direct_runs()
        got = written(compile=True)
        assert _direct_runs() > before
        torch.testing.assert_close(got, written(compile=False), **TOL)
        torch.testing.assert_close(got, net._module[1:](row.expand(4, 10)), **TOL)
