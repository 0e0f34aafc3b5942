"""The padding check per attention (``input_flow``'s attention records): a padded batch
is refused where one attention over the padded tokens reads every key, pads included,
while another masks them (the logits then carry the mask, through the masking layer,
and the outputs' check alone passed them); a custom encoder-decoder whose
cross-attention drops the mask is refused, with no ``get_encoder`` or
``is_encoder_decoder`` to find its decoder by; a key mask made of a position-times-mask
product (``mask.cumsum(-1) * mask > 0``) masks the pads, and is not refused. Each is
compared with the prompt run alone (a plain forward)."""

from __future__ import annotations

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention

from fxsight import LanguageModel, TraceError

_A, _B = [5, 6, 7, 8, 9, 10], [12, 13, 14]


def _attend(q, k, v, keep):
    """Attention of ``q`` over ``k, v`` (batch, heads, tokens, features), the keys where
    ``keep`` (broadcast to the scores) is false masked out."""
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


class _Attention(torch.nn.Module):
    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = (torch.nn.Linear(width, width),
                                     torch.nn.Linear(width, 2 * width),
                                     torch.nn.Linear(width, width))

    def _split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, memory, keep):
        k, v = self.kv(memory).chunk(2, -1)
        h = _attend(self._split(self.q(x)), self._split(k), self._split(v), keep)
        return x + self.out(h.transpose(1, 2).flatten(-2))


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _keys(keep: torch.Tensor) -> torch.Tensor:
    """The keys a token reads, where ``keep`` (batch, tokens) marks the real ones: the
    real keys and itself (a pad reads itself alone, so that no row of scores is all
    masked)."""
    n = keep.shape[-1]
    return keep[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=keep.device)


class _Layers(torch.nn.Module):
    """A causal LM of two attention layers; the layers in ``ignoring`` attend to every
    earlier key, pads included (their attention drops the mask), the others mask them."""

    def __init__(self, ignoring: tuple[int, ...] = ()):
        super().__init__()
        self.ignoring = ignoring
        self.embed = torch.nn.Embedding(32, 16)
        self.layers = torch.nn.ModuleList(_Attention() for _ in range(2))
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        causal = _causal(input_ids.shape[1], h.device)
        padded = causal & _keys(attention_mask.bool())
        for i, layer in enumerate(self.layers):
            h = layer(h, h, causal if i in self.ignoring else padded)
        return self.head(h)


class _KeyMaskFromPositions(_Layers):
    """Its only key mask is the tokens' positions times the mask (zero at the pads),
    compared with zero: it masks the pads."""

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        keep = (attention_mask.cumsum(-1) * attention_mask) > 0
        mask = _causal(input_ids.shape[1], h.device) & _keys(keep)
        for layer in self.layers:
            h = layer(h, h, mask)
        return self.head(h)


class _CausalFromMaskedPositions(_Layers):
    """Its only key mask compares the positions-times-mask of the keys with the
    queries': the pads (position zero) come before every token and are read."""

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        positions = attention_mask.cumsum(-1) * attention_mask
        mask = (positions[:, None, :, None] >= positions[:, None, None, :])
        for layer in self.layers:
            h = layer(h, h, mask)
        return self.head(h)


class _Seq2Seq(torch.nn.Module):
    """An encoder-decoder of its own (no config, no ``get_encoder``): an encoder
    attention layer masked by ``attention_mask``, a decoder's causal self-attention and
    its cross-attention over the encoder's states, masked unless ``dropping``."""

    def __init__(self, dropping: bool):
        super().__init__()
        self.dropping = dropping
        self.embed = torch.nn.Embedding(32, 16)
        self.encoder, self.decoder, self.cross = _Attention(), _Attention(), _Attention()
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        keep = _keys(attention_mask.bool())
        states = self.encoder(self.embed(input_ids), self.embed(input_ids), keep)
        h = self.embed(decoder_input_ids)
        h = self.decoder(h, h, _causal(h.shape[1], h.device))
        cross = attention_mask.bool()[:, None, None, :]
        cross = torch.ones_like(cross) if self.dropping else cross
        return self.head(self.cross(h, states, cross))


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


class _LlamaDropsMask(LlamaAttention):
    """Llama's attention dropping the mask it is given (causal over every key)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **{**kwargs, "attention_mask": None})


class _GPT2DropsMask(GPT2Attention):
    """GPT-2's attention dropping the mask it is given (causal over every key)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **{**kwargs, "attention_mask": None})


def _llama_dropping(implementation: str):
    model = tiny_llama(attn_implementation=implementation)
    model.model.layers[1].self_attn.__class__ = _LlamaDropsMask
    return model


def _gpt2_dropping(implementation: str):
    model = tiny_gpt2(attn_implementation=implementation)
    model.transformer.h[1].attn.__class__ = _GPT2DropsMask
    return model


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def _alone(model, ids, **kwargs):
    with torch.no_grad():
        return _logits(model(torch.tensor([ids]), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long), **kwargs))


def _padded(model, **kwargs):
    """The plain model's logits of ``_B`` left-padded beside ``_A`` (its own tokens')."""
    ids = torch.tensor([_A, [0] * (len(_A) - len(_B)) + _B])
    mask = torch.tensor([[1] * len(_A), [0] * (len(_A) - len(_B)) + [1] * len(_B)])
    with torch.no_grad():
        out = _logits(model(ids, attention_mask=mask,
                            **{k: v.expand(2, -1) for k, v in kwargs.items()}))
    return out[1:] if kwargs else out[1:, -len(_B):]


def _traced(lm, backend, **kwargs):
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(_A, **kwargs):
            la = lm.output.save()
        with tracer.invoke(_B, **kwargs):
            lb = lm.output.save()
    return _logits(la), _logits(lb)


@pytest.mark.parametrize("make", [
    lambda: _model(_Layers, (1,)), lambda: _llama_dropping("sdpa"),
    lambda: _llama_dropping("eager"), lambda: _gpt2_dropping("eager")],
    ids=["custom", "llama-sdpa", "llama-eager", "gpt2-eager"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_layer_whose_attention_drops_the_mask_is_refused(make, backend):
    """One layer masks the pads and the other reads them: the plain model's padded row
    differs from the prompt alone (0.2 on the llama), and the batch is refused, naming the
    layer (was run: the logits carry the mask through the masking layer)."""
    model = make()
    assert not torch.allclose(_padded(model), _alone(model, _B), atol=1e-4)
    lm = LanguageModel(model)
    layer = r"(layers\.1|h\.1)"
    with pytest.raises(TraceError, match=rf"(?s)invoke #1 is 3 tokens long.*ignores the "
                                         rf"attention_mask.*attention.*{layer}.*"
                                         rf"test_attention_mask_reads"):
        _traced(lm, backend)


@pytest.mark.parametrize("make", [lambda: _model(_Layers), lambda: _model(
    _KeyMaskFromPositions)], ids=["masked", "key-mask-from-positions"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_every_attention_masking_the_pads_is_not_refused(make, backend):
    """Each layer masks the pads (by the mask, or by positions times the mask compared
    with zero: was refused as positions only): each invoke's logits are its prompt's
    alone."""
    model = make()
    la, lb = _traced(LanguageModel(model), backend)
    torch.testing.assert_close(la, _alone(model, _A))
    torch.testing.assert_close(lb[:, -len(_B):], _alone(model, _B))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_causal_mask_of_masked_positions_is_refused(backend):
    """Positions times the mask compared with each other (a causal mask of them) do not
    mask the pads, which come first: still refused as positions only."""
    model = _model(_CausalFromMaskedPositions)
    assert not torch.allclose(_padded(model), _alone(model, _B), atol=1e-4)
    with pytest.raises(TraceError, match=r"ignores the attention_mask.*token positions"):
        _traced(LanguageModel(model), backend)


_DECODER = torch.tensor([[3, 4, 5]])


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_custom_encoder_decoder_whose_cross_attention_drops_the_mask_is_refused(backend):
    """No ``get_encoder``, no ``is_encoder_decoder``: its cross-attention is found by the
    keys it reads (the encoder's states, of the padded tokens). Dropping the mask there,
    the padded row's logits differ from the prompt alone; the batch is refused (was run)."""
    model = _model(_Seq2Seq, True)
    assert not torch.allclose(_padded(model, decoder_input_ids=_DECODER),
                              _alone(model, _B, decoder_input_ids=_DECODER), atol=1e-4)
    with pytest.raises(TraceError, match=r"(?s)_Seq2Seq ignores the attention_mask.*cross"):
        _traced(LanguageModel(model), backend, decoder_input_ids=_DECODER)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_custom_encoder_decoder_that_masks_its_cross_attention_is_not_refused(backend):
    """Its decoder's self-attention reads the decoder's tokens, not the padded ones: no
    mask is needed there. Each invoke's logits are its prompt's alone."""
    model = _model(_Seq2Seq, False)
    la, lb = _traced(LanguageModel(model), backend, decoder_input_ids=_DECODER)
    torch.testing.assert_close(la, _alone(model, _A, decoder_input_ids=_DECODER))
    torch.testing.assert_close(lb, _alone(model, _B, decoder_input_ids=_DECODER))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_the_check_runs_once_per_shape(backend):
    """The attentions are recorded by the pass that follows the mask to the outputs (the
    captured graph's, kept with it; the scan's, cached): a second padded trace of the
    same shapes follows nothing again, and is refused all the same."""
    import fxsight

    lm = LanguageModel(_model(_Layers, (1,)))
    counts = []
    for _ in range(2):
        before = dict(fxsight.stats())
        with pytest.raises(TraceError, match="layers.1"):
            _traced(lm, backend)
        counts.append({key: fxsight.stats().get(key, 0) - before.get(key, 0)
                       for key in ("scans", "input_flows", "captures")})
    assert sum(counts[0].values()) >= 1
    assert counts[1] == {"scans": 0, "input_flows": 0, "captures": 0}
