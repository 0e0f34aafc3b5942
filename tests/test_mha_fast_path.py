"""``nn.MultiheadAttention`` on torch's fused fast path (eval mode, no gradients, self-attention
with ``batch_first=True``), alone and in a vision-transformer-like block: every backend
gives the plain forward's values bit for bit (both elements of ``(attn_output,
attn_weights)``, with and without ``need_weights``, ``key_padding_mask``, ``attn_mask``, in
fp32 and fp64), for reads, writes and ``.skip()`` of the module's output; an operation of
its slow path read through ``.source`` (the softmax inside
``F.multi_head_attention_forward``) is a ``TraceError`` before running on every backend,
naming the module and the fast path, since the plain forward never calls it.

Was: the fx backend captured the slow path (1e-7 off in fp32, 4e-16 in fp64, silently), and
its ``.source`` read there returned the slow path's softmax, which the hooks backend called
"not reached"."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import fxsight
from fxsight import NNsight, TraceError

BACKENDS = ["fx", "hooks"]
_WIDTH, _HEADS, _TOKENS = 8, 2, 4


class _Block(nn.Module):
    """A vision-transformer block: layer norm, ``nn.MultiheadAttention``, residuals, MLP."""

    def __init__(self, need_weights: bool, batch_first: bool = True):
        super().__init__()
        self.need_weights = need_weights
        self.norm = nn.LayerNorm(_WIDTH)
        self.attn = nn.MultiheadAttention(_WIDTH, _HEADS, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(_WIDTH, 2 * _WIDTH), nn.GELU(),
                                 nn.Linear(2 * _WIDTH, _WIDTH))

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        h = self.norm(x)
        a, weights = self.attn(h, h, h, need_weights=self.need_weights,
                               key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        y = x + a
        return y + self.mlp(y), weights


def _masks(kind: str) -> tuple:
    if kind == "key_padding_mask":
        return torch.tensor([[False] * _TOKENS, [False, False, True, True]]), None
    if kind == "attn_mask":
        return None, torch.ones(_TOKENS, _TOKENS, dtype=torch.bool).triu(1)
    return None, None


def _block(need_weights: bool, dtype=torch.float32, batch_first: bool = True) -> _Block:
    torch.manual_seed(0)
    return _Block(need_weights, batch_first).to(dtype).eval()


def _x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, _TOKENS, _WIDTH, generator=torch.Generator().manual_seed(1),
                       dtype=dtype)


def _hooked(model: nn.Module, path: str, *args, hook=None):
    """A plain forward with a forward hook on ``path`` (``hook`` may replace the output):
    (the module's output as the hook saw it, the model's output)."""
    seen = []

    def record(module, inputs, output):
        seen.append(output)
        return None if hook is None else hook(output)

    handle = model.get_submodule(path).register_forward_hook(record)
    try:
        out = model(*args)
    finally:
        handle.remove()
    return seen[0], out


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fx backend's note of an opaque call)
        yield


# ----------------------------------------------------------------------------------------
# the module's output and the model's: bit-equal to the plain forward's

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masks", ["none", "key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_of_the_attention_and_the_block_is_bit_equal(backend, need_weights, masks,
                                                          dtype):
    model, x = _block(need_weights, dtype), _x(dtype)
    kpm, am = _masks(masks)
    with torch.no_grad():
        (want_attn, want_weights), (want, _) = _hooked(model, "attn", x, kpm, am)
        assert (want_weights is None) == (not need_weights)
        net = NNsight(model)
        with _quiet():
            with net.trace(x, kpm, am, backend=backend):
                attn = net.attn.output.save()
                out = net.output.save()
    assert torch.equal(attn[0], want_attn)
    assert _equal(attn[1], want_weights)
    assert torch.equal(out[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_alone_is_bit_equal(backend, need_weights, dtype):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(_WIDTH, _HEADS, batch_first=True).to(dtype).eval()
    x = _x(dtype)
    kpm, _ = _masks("key_padding_mask")
    with torch.no_grad():
        want = attn(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        net = NNsight(attn)
        with _quiet():
            with net.trace(x, x, x, key_padding_mask=kpm, need_weights=need_weights,
                           backend=backend):
                out = net.output.save()
    assert torch.equal(out[0], want[0])
    assert _equal(out[1], want[1])


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_of_the_attention_output_is_bit_equal(backend, need_weights):
    model, x = _block(need_weights), _x()
    kpm, _ = _masks("key_padding_mask")
    with torch.no_grad():
        _, (want, _) = _hooked(model, "attn", x, kpm, None,
                               hook=lambda out: (out[0] * 2, out[1]))
        net = NNsight(model)
        with _quiet():
            with net.trace(x, kpm, backend=backend):
                attn = net.attn.output
                net.attn.output = (attn[0] * 2, attn[1])
                out = net.output.save()
    assert torch.equal(out[0], want)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_of_the_attention_is_bit_equal(backend, need_weights):
    model, x = _block(need_weights), _x()
    v = torch.randn(2, _TOKENS, _WIDTH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (_, weights), _ = _hooked(model, "attn", x)
        _, (want, _) = _hooked(model, "attn", x, hook=lambda out: (v, out[1]))
        net = NNsight(model)
        with _quiet():
            with net.trace(x, backend=backend):
                net.attn.skip((v, weights))
                out = net.output.save()
    assert torch.equal(out[0], want)


# ----------------------------------------------------------------------------------------
# .source inside the module: its slow path's operations are not called

_SOFTMAX = r"(?s)model\.attn\.source\.F_multi_head_attention_forward_1.*not called.*" \
           r"model\.attn runs torch's fused fast path.*Read model\.attn\.output.*" \
           r"set_fastpath_enabled\(False\).*test_mha_fast_path"


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_source_inside_the_fast_path_is_refused_before_running(backend, need_weights):
    model, x = _block(need_weights), _x()
    net = NNsight(model)
    with torch.no_grad(), pytest.raises(TraceError, match=_SOFTMAX):
        with net.trace(x, backend=backend):
            net.attn.source.F_multi_head_attention_forward_1.source.softmax_0.output.save()


@pytest.mark.parametrize("backend", BACKENDS)
def test_operation_read_inside_the_fast_path_is_refused_before_running(backend):
    model, x = _block(True), _x()
    net = NNsight(model)
    with torch.no_grad(), pytest.raises(TraceError, match=_SOFTMAX.replace(
            "not called", "has no output call #0")):
        with net.trace(x, backend=backend):
            net.attn.source.F_multi_head_attention_forward_1.output.save()


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_with_gradients_reads_the_slow_paths_softmax(backend):
    """With gradients on, the plain forward takes the slow path: its softmax is read on
    every backend, and averaged over the heads it is the weights the module returns."""
    model, x = _block(True), _x()
    (_, want_weights), _ = _hooked(model, "attn", x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        probs = net.attn.source.F_multi_head_attention_forward_1.source.softmax_0.output
        probs = probs.detach().save()
    assert torch.equal(probs.view(2, _HEADS, _TOKENS, _TOKENS).mean(dim=1),
                       want_weights.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_turned_off_reaches_the_softmax(backend):
    """``torch.backends.mha.set_fastpath_enabled(False)``: the plain forward takes the slow
    path, and so does every backend (a capture made with the fast path on is not reused)."""
    model, x = _block(True), _x()
    net = NNsight(model)
    with torch.no_grad():
        with _quiet():
            with net.trace(x, backend=backend):
                net.attn.output.save()
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            (_, want_weights), (want, _) = _hooked(model, "attn", x)
            with net.trace(x, backend=backend):
                probs = net.attn.source.F_multi_head_attention_forward_1.source \
                    .softmax_0.output.save()
                out = net.output.save()
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    assert torch.equal(out[0], want)
    assert torch.equal(probs.view(2, _HEADS, _TOKENS, _TOKENS).mean(dim=1), want_weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_first_attention_takes_no_fast_path(backend):
    """``batch_first=False``: no fast path in the plain forward; the slow path's softmax is
    read on every backend, and the values are the plain forward's."""
    model = _block(True, batch_first=False)
    x = _x().transpose(0, 1).contiguous()
    with torch.no_grad():
        (_, want_weights), (want, _) = _hooked(model, "attn", x)
        net = NNsight(model)
        with net.trace(x, backend=backend):
            probs = net.attn.source.F_multi_head_attention_forward_1.source \
                .softmax_0.output.save()
            out = net.output.save()
    assert torch.equal(out[0], want)
    assert torch.equal(probs.view(2, _HEADS, _TOKENS, _TOKENS).mean(dim=1), want_weights)


def test_several_fast_path_attentions_are_one_warning():
    """A model of 6 blocks, each with an ``nn.MultiheadAttention`` that runs as an opaque
    call: one warning naming them (it was one per attention: 12 for a ViT-B), and the
    values are the plain forward's."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.mlp(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block() for _ in range(6)]).eval()
    x = torch.randn(2, 5, 16)
    wrapped = NNsight(model)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with torch.no_grad(), wrapped.trace(x, backend="fx"):
            kept = wrapped[3].output.save()
    opaque = [str(w.message) for w in shown if "opaque" in str(w.message)]
    assert len(opaque) == 1 and "(6 in all)" in opaque[0], opaque
    with torch.no_grad():
        assert torch.equal(kept, model[:4](x))


def test_fast_path_attentions_that_cannot_be_opaque_fall_back_to_hooks(monkeypatch):
    """Where the attentions that may take the fused fast path cannot all be opaque calls
    (more than ``MAX_FAST_PATH`` of them, here 1 for 2), fx would trace their slow path,
    last bits off the plain forward (it did so silently): a ``CaptureError`` naming them;
    ``auto`` runs the hooks backend, bit-equal."""
    import fxsight.capture.partial as partial

    monkeypatch.setattr(partial, "MAX_FAST_PATH", 1)
    torch.manual_seed(0)
    model = nn.Sequential(*[_FastBlock() for _ in range(2)]).eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(fxsight.CaptureError, match=r"2 modules may take torch's fused"):
        with torch.no_grad(), NNsight(model).trace(x, backend="fx"):
            pass
    wrapped = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad(), wrapped.trace(x) as tracer:
            kept = wrapped[1].output.save()
    assert tracer.backend == "hooks"
    with torch.no_grad():
        assert torch.equal(kept, model(x))


class _FastBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        return self.mlp(x + self.attn(x, x, x, need_weights=False)[0])
