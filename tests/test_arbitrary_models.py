"""Arbitrary PyTorch models (not transformers LMs) wrapped with ``NNsight``: values against
a plain forward (forward hooks), bit for bit where the computation is the same."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fxsight import NNsight, TraceError
from fxsight.errors import NotOnGraph

BACKENDS = ["fx", "hooks", "auto"]


class _LSTMNet(nn.Module):
    """Token ids -> a two-layer LSTM -> a head on the last position."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


class _Encoder(nn.Module):
    """Embeddings -> ``nn.TransformerEncoder`` (its fast path in eval) -> a head."""

    def __init__(self, nested: bool):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=pad))


def _hooked(model: nn.Module, path: str, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain forward with one forward hook: (the module's output, the model's)."""
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = model(*args)
    finally:
        handle.remove()
    return seen[0], out


def _trace(model: nn.Module, args: tuple, backend: str, path: str | None = None):
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (partly fx: the opaque module's warning)
        with net.trace(*args, backend=backend):
            site = net.get(path).output.save() if path else None
            out = net.output.save()
    return site, out


@pytest.fixture
def padded():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    return _Encoder(nested=True).eval(), (ids, pad)


@pytest.mark.parametrize("backend", ["fx", "auto"])
def test_an_lstm_as_an_opaque_call_computes_the_plain_forwards_values(backend):
    # the opaque call ran the LSTM with gradients off (autograd's forward of an operator),
    # where CPU picks another kernel: 7.45e-9 off in fp32; now the trace's grad mode
    torch.manual_seed(0)
    model = _LSTMNet().eval()
    ids = torch.randint(0, 20, (2, 5))
    want_rnn, want = _hooked(model, "rnn", (ids,))
    got_rnn, got = _trace(model, (ids,), backend, "rnn")
    assert torch.equal(got, want)
    assert torch.equal(got_rnn[0], want_rnn[0]) and torch.equal(got_rnn[1][1], want_rnn[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transformer_encoders_nested_fast_path_gives_the_plain_values(padded, backend):
    # in eval mode without gradients, a padding mask sends the encoder's layers through
    # nested tensors (padded rows come out as zeros); the captured graph held the slow
    # path: 0.66 off at the padded rows, silently
    model, args = padded
    with torch.no_grad():
        want = model(*args)
        _, got = _trace(model, args, backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_inside_a_nested_fast_path_is_a_clear_error(padded, backend):
    # its value is a nested tensor: the hooks backend failed with torch's "Internal error:
    # NestedTensorImpl doesn't support sizes"; the fx backend read the slow path's value
    model, args = padded
    error = NotOnGraph if backend == "fx" else TraceError
    net = NNsight(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=r"(?s)encoder.*test_arbitrary_models.py"):
            with net.trace(*args, backend=backend):
                net.encoder.layers[0].output.save()

