"""Arbitrary PyTorch models wrapped with ``NNsight``, second round: dataclass outputs in
invokes, channels_last inputs, LSTM state edits, skips, packed sequences, torch's capture
warnings, and models not tried before; each checked against a plain forward (hooks)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from fxsight import NNsight, TraceError

BACKENDS = ["fx", "hooks", "auto"]


def _hooked(model: nn.Module, path: str, *args, **kwargs):
    """A plain forward with one forward hook: (the module's output, the model's)."""
    seen = []
    module = model.get_submodule(path) if path else model
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0], out


# ----------------------------------------------------------------------------------------
# 1. a dataclass output read inside one of several invokes

@dataclasses.dataclass
class _Out:
    hidden: torch.Tensor


class _DataclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> _Out:
        self.calls += 1
        return _Out(self.proj(x))


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_dataclass_output_in_invokes_is_refused_before_running(backend):
    torch.manual_seed(0)
    model = _DataclassNet()
    net = NNsight(model)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TraceError, match="_Out.*whole batch of 4 rows"):
            with net.trace(backend=backend) as tracer:
                with tracer.invoke(x1):
                    net.output.save()
                with tracer.invoke(x2):
                    net.output.save()
    assert model.calls == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x1, backend=backend):
            whole = net.output.save()
    assert torch.equal(whole.hidden, model.proj(x1))


# ----------------------------------------------------------------------------------------
# 2. channels_last inputs: a patch across invokes, BatchNorm's running stats, a whole write

class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def _channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_patch_across_invokes_is_bit_equal(backend):
    torch.manual_seed(0)
    base = _ConvNet().train()
    x1, x2 = _channels_last(2, 3, 8, 8), _channels_last(2, 3, 8, 8)
    reference = copy.deepcopy(base)

    def patch(module, args, out):
        out = out.clone()
        out[2:] = out[:2]
        return out

    handle = reference.conv1.register_forward_hook(patch)
    expected = reference(torch.cat([x1, x2]))
    handle.remove()
    model = copy.deepcopy(base)
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(backend=backend) as tracer:
            with tracer.invoke(x1):
                h = net.conv1.output
            with tracer.invoke(x2):
                net.conv1.output = h
            out = net.output.save()
    assert torch.equal(out, expected)
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(model.bn.running_var, reference.bn.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_whole_write_of_a_callers_tensor_is_bit_equal(backend):
    torch.manual_seed(0)
    base = _ConvNet().train()
    x, v = _channels_last(4, 3, 8, 8), _channels_last(4, 8, 8, 8)
    reference = copy.deepcopy(base)
    handle = reference.conv1.register_forward_hook(lambda m, a, o: v)
    expected = reference(x)
    handle.remove()
    net = NNsight(copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x, backend=backend):
            net.conv1.output = v
            out = net.output.save()
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------
# 3. an LSTM (an opaque call on fx): an in-place edit of h_n, its batch-first output's layout

class _LSTMSum(nn.Module):
    """A batch-first LSTM whose output (a transposed view) is reduced over time."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.rnn(x)
        return self.head(h[-1]) + out.sum(1).sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_h_n_in_place_edit_is_bit_equal(backend):
    torch.manual_seed(0)
    base, x = _LSTMSum(), torch.randn(3, 5, 4)
    reference = copy.deepcopy(base)

    def edit(module, args, output):
        out, (h, c) = output
        h = h.clone()
        h[:, 0] = 0
        return out, (h, c)

    handle = reference.rnn.register_forward_hook(edit)
    expected = reference(x)
    handle.remove()
    net = NNsight(copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x, backend=backend):
            net.rnn.output[1][0][:, 0] = 0
            out = net.output.save()
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------
# 4. .skip() of nn.MultiheadAttention with (v, None) on its fused fast path

class _AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_of_multihead_attention_with_no_weights_on_its_fast_path(backend):
    torch.manual_seed(0)
    model, x, v = _AttentionNet().eval(), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        assert model.attn(x, x, x, need_weights=False)[1] is None  # (what it returns)
        expected = model.head(v)
        net = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with net.trace(x, backend=backend):
                net.attn.skip((v, None))
                out = net.output.save()
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------
# 5. packed sequences into an LSTM: read and write its output (h_n) on every backend

class _PackedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequence_lstm_output_read_and_write(backend):
    torch.manual_seed(0)
    base, x, lengths = _PackedNet(), torch.randn(3, 5, 4), torch.tensor([5, 3, 2])
    reference = copy.deepcopy(base)
    want_rnn, _ = _hooked(reference, "rnn", x, lengths)

    def edit(module, args, output):
        out, (h, c) = output
        return out, (torch.zeros_like(h), c)

    handle = reference.rnn.register_forward_hook(edit)
    expected = reference(x, lengths)
    handle.remove()
    net = NNsight(copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x, lengths, backend=backend):
            h_n = net.rnn.output[1][0].save()
        with net.trace(x, lengths, backend=backend):
            net.rnn.output[1][0][:] = 0
            out = net.output.save()
    assert torch.equal(h_n, want_rnn[1][0])
    assert torch.equal(out, expected)


def test_packed_sequence_cache_on_hooks():
    torch.manual_seed(0)
    model, x, lengths = _PackedNet(), torch.randn(3, 5, 4), torch.tensor([5, 3, 2])
    want_rnn, _ = _hooked(model, "rnn", x, lengths)
    net = NNsight(model)
    with net.trace(x, lengths, backend="hooks") as tracer:
        cache = tracer.cache()
    got = cache["model.rnn"].output
    assert torch.equal(got[0].data, want_rnn[0].data)
    assert torch.equal(got[0].batch_sizes, want_rnn[0].batch_sizes)
    assert torch.equal(got[1][0], want_rnn[1][0])
