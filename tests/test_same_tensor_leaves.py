"""A module given one tensor object as several arguments (``attn(h, h, h)``) or returning
one tensor as several outputs: the captured forward sees one object too, as the plain
forward does, so Python that branches on ``query is key`` (torch's attention,
``nn.MultiheadAttention``) takes the plain forward's path on fx (was: each argument got a
boundary marker of its own, the capture took the path for different tensors, values off in
the last bits for ``nn.MultiheadAttention``'s slow path, and wholly off for a module whose
branches compute different things). A write giving such leaves values of their own runs
on hooks (``backend="auto"``), refused before running on fx, naming the line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fxsight import NNsight
from fxsight.errors import NotOnGraph

BACKENDS = ("fx", "hooks")


class _Pair(nn.Module):
    """Computes one thing for one tensor given twice and another for two tensors."""

    def forward(self, a, b):
        return a * 3 if a is b else a + b


class _Twice(nn.Module):
    def forward(self, x):
        h = torch.tanh(x)
        return h, h


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = _Pair()
        self.twice = _Twice()

    def forward(self, x):
        h = self.lin(x)
        y = self.pair(h, h)
        a, b = self.twice(y)
        return a * 5 if a is b else a - b


def _model():
    torch.manual_seed(0)
    return _Model()


def _x():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_tensor_given_twice_takes_the_plain_path(backend):
    model, x = _model(), _x()
    plain = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        inputs = net.pair.inputs.save()
        pair = net.pair.output.save()
        out = net.output.save()
    assert torch.equal(out, plain)
    assert torch.equal(pair, model.lin(x) * 3)
    (a, b), _ = inputs
    assert torch.equal(a, model.lin(x)) and torch.equal(b, a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_written_output_given_twice_stays_one_tensor(backend):
    """A write of the module before, whose output is passed twice: both are the value
    written, one object still."""
    model, x = _model(), _x()
    handle = model.lin.register_forward_hook(lambda m, a, o: o * 2)
    try:
        want = model(x)
    finally:
        handle.remove()
    net = NNsight(model)
    with net.trace(x, backend=backend):
        net.lin.output = net.lin.output * 2
        out = net.output.save()
    assert torch.equal(out, want)


def _with_first_argument_doubled(model, x):
    handle = model.pair.register_forward_pre_hook(lambda m, args: (args[0] * 2, args[1]))
    try:
        return model(x)
    finally:
        handle.remove()


def _write_first_argument(net, x, backend):
    with net.trace(x, backend=backend) as tracer:
        (a, b), kwargs = net.pair.inputs
        net.pair.inputs = ((a * 2, b), kwargs)
        out = net.output.save()
    return out, tracer


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_write_of_one_of_them_runs_the_plain_forward_of_two_tensors(backend):
    model, x = _model(), _x()
    want = _with_first_argument_doubled(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, tracer = _write_first_argument(NNsight(model), x, backend)
    assert torch.equal(out, want)
    assert tracer.backend == "hooks"
    if backend == "auto":
        assert any("one tensor object as several" in str(w.message) for w in caught)


def test_a_write_of_one_of_them_is_refused_on_fx_naming_the_line():
    model, x = _model(), _x()
    with pytest.raises(NotOnGraph, match=r"(?s)pair\.input.*one tensor object as several.*"
                                         r"test_same_tensor_leaves\.py.*net\.pair\.inputs ="):
        _write_first_argument(NNsight(model), x, "fx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_self_attention_with_gradients_is_the_plain_forward(backend):
    """``nn.MultiheadAttention(h, h, h)`` with gradients on (its slow path): one packed
    input projection where ``query is key``, as the plain forward computes it."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Sequential(nn.LayerNorm(8))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn = model[0], attn

        def forward(self, x):
            h = self.norm(x)
            return self.attn(h, h, h)

    block = Block()
    want, want_weights = block(x)
    net = NNsight(block)
    with net.trace(x, backend=backend) as tracer:
        probs = net.attn.source.F_multi_head_attention_forward_1.source.softmax_0.output
        probs = probs.detach().save()
        out = net.output.save()
    assert tracer.backend == backend
    assert torch.equal(out[0], want) and torch.equal(out[1], want_weights)
    assert torch.equal(probs.view(2, 2, 5, 5).mean(dim=1), want_weights.detach())
    if backend == "fx":
        code = tracer.graph_module.code
        assert code.count("aten.linear") == 2, code  # (packed in-projection, out-projection)
