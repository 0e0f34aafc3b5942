"""``nn.TransformerEncoderLayer`` on torch's fused fast path (eval mode, no gradients,
``batch_first=True``: ``torch._transformer_encoder_layer_fwd``), in a vision-transformer-like
model (layers called in a loop, or in an ``nn.TransformerEncoder``, nested tensors on or
off), with ``norm_first`` both ways, relu and gelu, ``src_key_padding_mask`` and
``src_mask``, in fp32 and fp64: every backend gives the plain forward's values bit for bit
(a forward without hooks, its layers run by hand where an edit replaces one's output) for
reads, writes and ``.skip()`` of a layer's output; an operation of the slow path read
through ``.source`` is a ``TraceError`` before running on every backend, naming the layer;
with gradients on or in train mode (the plain forward's slow path) the model is captured.

Was: the fx backend captured the slow path (up to 4.8e-7 off in fp32 and 6.7e-16 in fp64,
silently), and the hooks backend's own forward hook on a layer turned its fast path off
(torch's test for hooks), so a read or a write of a layer's output was as far off there."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import pytest
import torch
from torch import nn

from fxsight import NNsight, TraceError
from fxsight.errors import NotOnGraph

_WIDTH, _HEADS, _TOKENS, _PATCH = 8, 2, 4, 12


class _ViT(nn.Module):
    """Patch embedding, two encoder layers (called in a loop, or an
    ``nn.TransformerEncoder`` of them: ``encoder`` "nested" or "plain" for its
    ``enable_nested_tensor``), a head."""

    def __init__(self, norm_first: bool, activation: str, encoder: str | None):
        super().__init__()
        self.patch = nn.Linear(_PATCH, _WIDTH)
        layers = [nn.TransformerEncoderLayer(_WIDTH, _HEADS, 2 * _WIDTH, dropout=0.0,
                                             activation=activation, batch_first=True,
                                             norm_first=norm_first) for _ in range(2)]
        if encoder is None:
            self.layers = nn.ModuleList(layers)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (no nested tensors where norm_first)
                self.encoder = nn.TransformerEncoder(layers[0], 2,
                                                     enable_nested_tensor=encoder == "nested")
        self.head = nn.Linear(_WIDTH, 3)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers if hasattr(self, "encoder") else self.layers

    def forward(self, x, mask=None, key_padding_mask=None):
        h = self.patch(x)
        if hasattr(self, "encoder"):
            return self.head(self.encoder(h, mask=mask, src_key_padding_mask=key_padding_mask))
        for layer in self.layers:
            h = layer(h, src_mask=mask, src_key_padding_mask=key_padding_mask)
        return self.head(h)


def _envoy(net: NNsight, model: _ViT, i: int):
    """The envoy of layer ``i`` of ``model`` (in the loop, or in the encoder)."""
    return net.encoder.layers[i] if hasattr(model, "encoder") else net.layers[i]


def _model(norm_first=False, activation="relu", encoder=None, dtype=torch.float32) -> _ViT:
    torch.manual_seed(0)
    return _ViT(norm_first, activation, encoder).to(dtype).eval()


def _inputs(masks: str, dtype=torch.float32) -> tuple:
    """(patches, src_mask, src_key_padding_mask): a padded second row, a mask of
    scattered keys (no causal mask: nn.TransformerEncoder would detect it)."""
    x = torch.randn(2, _TOKENS, _PATCH, generator=torch.Generator().manual_seed(1),
                    dtype=dtype)
    pads = torch.tensor([[False] * _TOKENS, [False] * 2 + [True] * 2])
    scattered = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]],
                             dtype=torch.bool)
    return (x, scattered if masks in ("src_mask", "both") else None,
            pads if masks in ("key_padding_mask", "both") else None)


def _by_hand(model: _ViT, x, mask, pads, edits: dict[int, Callable] | None = None):
    """The plain forward without hooks, its layers run by hand: (each layer's output,
    the model's); ``edits``: layer index -> what replaces that layer's output (given
    the layer's input)."""
    edits = edits or {}
    h, outputs = model.patch(x), []
    for i, layer in enumerate(model.blocks):
        h = edits[i](h) if i in edits else layer(h, src_mask=mask, src_key_padding_mask=pads)
        outputs.append(h)
    return outputs, model.head(h)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fx backend's note of an opaque call)
        yield


def _assert_nothing_left(model: nn.Module) -> None:
    for module in model.modules():
        assert "forward" not in vars(module)
        assert not module._forward_hooks and not module._forward_pre_hooks


# (norm_first, activation, masks, dtype, encoder)
_CASES = [
    (False, "relu", "key_padding_mask", torch.float32, None),
    (True, "gelu", "key_padding_mask", torch.float32, None),
    (False, "gelu", "src_mask", torch.float64, None),
    (True, "relu", "both", torch.float64, None),
    (False, "relu", "key_padding_mask", torch.float32, "plain"),
    (True, "gelu", "both", torch.float32, "plain"),
    (False, "relu", "src_mask", torch.float32, "nested"),  # (no pads: no nested tensors)
]
_IDS = [f"{'pre' if nf else 'post'}-{act}-{masks}-{str(dtype)[-7:]}-{encoder or 'loop'}"
        for nf, act, masks, dtype, encoder in _CASES]


# ----------------------------------------------------------------------------------------
# reads, writes and skips: the plain forward's values, bit for bit

@pytest.mark.parametrize("case", _CASES, ids=_IDS)
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_reads_are_the_plain_forwards(backend, case):
    norm_first, activation, masks, dtype, encoder = case
    model = _model(norm_first, activation, encoder, dtype)
    x, mask, pads = _inputs(masks, dtype)
    with torch.no_grad():
        want = model(x, mask, pads)
        layers, by_hand = _by_hand(model, x, mask, pads)
        assert torch.equal(by_hand, want)  # (the reference is the plain forward)
        net = NNsight(model)
        # (on fx an encoder that may run nested tensors, or given a mask it tests in
        # Python, is one opaque call: its layers' values are read on hooks)
        inside_opaque = backend == "fx" and encoder is not None and \
            (encoder == "nested" or mask is not None)
        with _quiet(), contextlib.ExitStack() as stack:
            if inside_opaque:
                stack.enter_context(pytest.raises(NotOnGraph, match=r"encoder"))
            with net.trace(x, mask, pads, backend=backend) as tracer:
                first = _envoy(net, model, 0).output.save()
                out = net.output.save()
        if not inside_opaque:
            assert tracer.backend == backend
            assert torch.equal(first, layers[0])
            assert torch.equal(out, want)
        with _quiet(), net.trace(x, mask, pads, backend=backend):
            out = net.output.save()
    assert torch.equal(out, want)
    _assert_nothing_left(model)


@pytest.mark.parametrize("case", _CASES[:5], ids=_IDS[:5])  # (each layer a site on fx)
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_write_and_a_skip_are_the_plain_forwards(backend, case):
    norm_first, activation, masks, dtype, encoder = case
    model = _model(norm_first, activation, encoder, dtype)
    x, mask, pads = _inputs(masks, dtype)
    v = torch.randn(2, _TOKENS, _WIDTH, generator=torch.Generator().manual_seed(2),
                    dtype=dtype)
    with torch.no_grad():
        layer = model.blocks[0]
        _, want_written = _by_hand(model, x, mask, pads, {
            0: lambda h: layer(h, src_mask=mask, src_key_padding_mask=pads) * 2})
        _, want_skipped = _by_hand(model, x, mask, pads, {0: lambda h: v})
        net = NNsight(model)
        with _quiet(), net.trace(x, mask, pads, backend=backend) as tracer:
            _envoy(net, model, 0).output = _envoy(net, model, 0).output * 2
            written = net.output.save()
        assert tracer.backend == backend
        with _quiet(), net.trace(x, mask, pads, backend=backend) as tracer:
            _envoy(net, model, 0).skip(v)
            skipped = net.output.save()
    assert tracer.backend == backend
    assert torch.equal(written, want_written)
    assert torch.equal(skipped, want_skipped)  # (layer 1 on its fast path)
    _assert_nothing_left(model)


def test_the_fx_and_hooks_backends_steer_alike():
    model = _model(True, "gelu")
    x, mask, pads = _inputs("both")
    got = {}
    with torch.no_grad():
        layer = model.blocks[0]

        def steered(h):
            h = layer(h, src_mask=mask, src_key_padding_mask=pads)
            return h + h.mean(dim=1, keepdim=True)

        layers, out = _by_hand(model, x, mask, pads, {0: steered})
        for backend in ("fx", "hooks"):
            net = NNsight(model)
            with _quiet(), net.trace(x, mask, pads, backend=backend):
                h = _envoy(net, model, 0).output
                _envoy(net, model, 0).output = h + h.mean(dim=1, keepdim=True)
                got[backend] = (_envoy(net, model, 1).output.save(), net.output.save())
    assert all(torch.equal(a, b) for a, b in zip(got["fx"], got["hooks"]))
    assert torch.equal(got["fx"][0], layers[1]) and torch.equal(got["fx"][1], out)


# ----------------------------------------------------------------------------------------
# nn.TransformerEncoder: nested tensors for a padding mask, a mask checked in Python

@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("backend", ["fx", "hooks", "auto"])
def test_an_encoder_with_a_padding_mask_is_the_plain_forwards(backend, nested):
    """With nested tensors the layers' values are nested (a read of one is refused, see
    test_arbitrary_models); without, each layer is its fused kernel, its output read."""
    model = _model(encoder="nested" if nested else "plain")
    x, _, pads = _inputs("key_padding_mask")
    with torch.no_grad():
        want = model(x, None, pads)
        layers, _ = _by_hand(model, x, None, pads)
        net = NNsight(model)
        with _quiet(), net.trace(x, None, pads, backend=backend):
            out = net.output.save()
            first = None if nested else _envoy(net, model, 0).output.save()
    assert torch.equal(out, want)
    assert nested or torch.equal(first, layers[0])


def test_an_encoder_given_a_mask_is_one_opaque_call_on_fx():
    """``nn.TransformerEncoder`` tests a ``mask`` for causality in Python (data-dependent:
    export fails in it): it runs as one opaque call around its fused layers (was a
    ``CaptureError``, the fx backend refusing the model)."""
    model = _model(encoder="plain")
    x, mask, _ = _inputs("src_mask")
    with torch.no_grad(), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        want = model(x, mask)
        net = NNsight(model)
        with net.trace(x, mask, backend="fx"):
            out = net.output.save()
    assert torch.equal(out, want)
    assert any("module 'encoder' runs as one opaque call" in str(w.message) for w in shown)


# ----------------------------------------------------------------------------------------
# inside a layer on its fast path

_SLOW = r"(?s)model\.layers\.0\.source\.self__sa_block_1.*model\.layers\.0 runs torch's " \
        r"fused fast path.*nn\.TransformerEncoderLayer.*Read model\.layers\.0\.output.*" \
        r"set_fastpath_enabled\(False\).*test_encoder_layer_fast_path"


@pytest.mark.parametrize("backend", ["fx", "hooks", "auto"])
def test_source_of_the_slow_path_is_refused_before_running(backend):
    model = _model()
    x, _, pads = _inputs("key_padding_mask")
    net = NNsight(model)
    with torch.no_grad(), _quiet(), pytest.raises(TraceError, match=_SLOW):
        with net.trace(x, None, pads, backend=backend):
            net.layers[0].source.self__sa_block_1.output.save()


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_source_of_the_fused_kernel_reads_the_layers_output(backend):
    """The fused kernel's call is what the plain forward runs: read on hooks (``auto``
    too; on fx it is inside the layer's opaque call)."""
    model = _model()
    x, _, pads = _inputs("key_padding_mask")
    with torch.no_grad():
        layers, _ = _by_hand(model, x, None, pads)
        net = NNsight(model)
        with _quiet(), net.trace(x, None, pads, backend=backend):
            fused = net.layers[0].source.torch__transformer_encoder_layer_fwd_0.output.save()
    assert torch.equal(fused, layers[0])


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_a_module_inside_the_fast_path_never_runs(backend):
    """The fused kernel calls no submodule: reading one is a ``TraceError`` before
    running (the hooks backend's forward hook on it turned the fast path off, and read
    the slow path's value)."""
    model = _model()
    x, _, pads = _inputs("key_padding_mask")
    net = NNsight(model)
    with torch.no_grad(), _quiet(), pytest.raises(
            TraceError, match=r"(?s)model\.layers\.0\.linear1 has no output call #0.*"
                              r"never runs.*test_encoder_layer_fast_path"):
        with net.trace(x, None, pads, backend=backend):
            net.layers[0].linear1.output.save()
    _assert_nothing_left(model)


def test_a_users_hook_keeps_the_slow_path():
    """A forward hook of the user's on a layer turns its fast path off in the plain
    forward (torch's test): the trace (on hooks: a capture runs no Python hook) takes the
    slow path with it."""
    model = _model()
    x, _, pads = _inputs("key_padding_mask")
    handle = model.layers[0].register_forward_hook(lambda module, args, output: None)
    try:
        with torch.no_grad():
            want = model(x, None, pads)
            net = NNsight(model)
            with _quiet(), net.trace(x, None, pads) as tracer:
                out = net.output.save()
    finally:
        handle.remove()
    assert tracer.backend == "hooks"
    assert torch.equal(out, want)
    with torch.no_grad():
        assert not torch.equal(want, model(x, None, pads))  # (the fused kernel's differ)


# ----------------------------------------------------------------------------------------
# gradients on, train mode: the plain forward's slow path, captured

@pytest.mark.parametrize("mode", ["gradients", "train"])
def test_the_slow_path_is_captured(mode):
    model = _model()
    model.train(mode == "train")
    x, _, pads = _inputs("key_padding_mask")
    grad = contextlib.nullcontext() if mode == "gradients" else torch.no_grad()
    with grad:
        layer = model.layers[0]
        want_attention = layer._sa_block(model.patch(x), None, pads)
        want = model(x, None, pads)
        net = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no opaque call, no fallback)
            with net.trace(x, None, pads, backend="fx"):
                attention = net.layers[0].source.self__sa_block_1.output.save()
                out = net.output.save()
            with net.trace(x, None, pads, backend="hooks"):
                out_hooks = net.output.save()
    assert torch.equal(attention, want_attention)
    assert torch.equal(out, want) and torch.equal(out_hooks, want)


def test_a_write_of_one_of_a_self_attentions_inputs_runs_on_hooks():
    """The slow path calls ``self_attn(x, x, x)``: one tensor in the captured graph, so
    that ``F.multi_head_attention_forward`` projects query, key and value in one product
    as the plain forward does (its ``query is key`` test; three copies of it took the
    other branch, 1.8e-7 off in fp32). A write giving the key another value is
    ``NotOnGraph`` on fx; ``auto`` runs it on hooks, as the plain forward with that edit."""
    model = _model()
    x, _, pads = _inputs("key_padding_mask")

    def double_key(module, args, kwargs):
        return (args[0], args[1] * 2, args[2]), kwargs

    handle = model.layers[0].self_attn.register_forward_pre_hook(double_key, with_kwargs=True)
    try:
        want = model(x, None, pads)
    finally:
        handle.remove()
    net = NNsight(model)
    with pytest.raises(NotOnGraph, match=r"(?s)one tensor object as several.*"
                                         r"test_encoder_layer_fast_path"):
        with net.trace(x, None, pads, backend="fx"):
            args, kwargs = net.layers[0].self_attn.inputs
            net.layers[0].self_attn.inputs = ((args[0], args[1] * 2, args[2]), kwargs)
    with _quiet(), net.trace(x, None, pads) as tracer:
        args, kwargs = net.layers[0].self_attn.inputs
        net.layers[0].self_attn.inputs = ((args[0], args[1] * 2, args[2]), kwargs)
        out = net.output.save()
    assert tracer.backend == "hooks"
    assert torch.equal(out, want)
