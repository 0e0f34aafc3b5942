"""The padding check per attention, for attentions whose scores are not four-dimensional
SDPA's: a softmax over scores of three dimensions (batch * heads, queries, keys:
``torch.bmm`` attention as XGLM had it, ``nn.MultiheadAttention`` with ``need_weights``;
its fused fast path in eval, which the hooks backend's scan runs, also in
``nn.TransformerEncoderLayer``), and a softmax over the
keys and a learned sink logit (GPT-OSS) whose sink column is dropped before the values
are weighed. A model whose every layer masks the pads runs, each invoke's logits its
prompt's alone; one layer dropping the mask is refused before running, naming that layer
(the plain padded forward's row differs from the prompt alone). A softmax of a router's
logits (three dimensions, as many experts as tokens, weighing the experts' outputs) is no
attention: not refused."""

from __future__ import annotations

import pytest
import torch

import zoo
from fxsight import LanguageModel, TraceError

_A, _B = [5, 6, 7, 8, 9, 10], [12, 13, 14]
_WIDTH, _HEADS = 16, 2


def _keep(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, 1, queries, keys): the keys each token reads where ``mask`` (batch, tokens)
    marks the real ones (a pad reads itself too, so no row is all masked); earlier ones
    only where ``causal``."""
    n = mask.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    keep = mask.bool()[:, None, None, :] | eye
    return keep & torch.ones_like(eye).tril() if causal else keep


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, width) -> (batch * heads, tokens, head width)."""
    b, t, _ = x.shape
    return x.unflatten(-1, (_HEADS, -1)).transpose(1, 2).reshape(b * _HEADS, t, -1)


class _BmmAttention(torch.nn.Module):
    """XGLM's old attention: heads folded into the batch, ``torch.bmm`` scores and a softmax
    over three dimensions, a dropout module, ``torch.bmm`` with the values."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(_WIDTH, 3 * _WIDTH), torch.nn.Linear(_WIDTH, _WIDTH)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x, keep, mask=None):
        b, t, _ = x.shape
        q, k, v = map(_heads, self.qkv(x).chunk(3, -1))
        scores = torch.bmm(q, k.transpose(1, 2)) / q.shape[-1] ** 0.5
        scores = scores.view(b, _HEADS, t, t).masked_fill(~keep, float("-inf"))
        probs = self.dropout(scores.view(b * _HEADS, t, t).softmax(-1))
        h = torch.bmm(probs, v).view(b, _HEADS, t, -1).transpose(1, 2).reshape(b, t, -1)
        return x + self.out(h)


class _SinkAttention(torch.nn.Module):
    """GPT-OSS's eager attention: a learned sink logit per head beside the scores, the
    softmax over both, the sink's column dropped before the values are weighed."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(_WIDTH, 3 * _WIDTH), torch.nn.Linear(_WIDTH, _WIDTH)
        self.sinks = torch.nn.Parameter(torch.randn(_HEADS))

    def forward(self, x, keep, mask=None):
        b, t, _ = x.shape
        q, k, v = (z.unflatten(-1, (_HEADS, -1)).transpose(1, 2)
                   for z in self.qkv(x).chunk(3, -1))
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep,
                                                                           float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)
        probs = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
        return x + self.out((probs @ v).transpose(1, 2).flatten(-2))


class _Multihead(torch.nn.Module):
    """``nn.MultiheadAttention`` given the pads as ``key_padding_mask``, or as a
    three-dimensional ``attn_mask`` (batch * heads, queries, keys); ``need_weights``
    as given."""

    def __init__(self, need_weights: bool, as_attn_mask: bool):
        super().__init__()
        self.need_weights, self.as_attn_mask = need_weights, as_attn_mask
        self.attention = torch.nn.MultiheadAttention(_WIDTH, _HEADS, batch_first=True)

    def forward(self, x, keep, mask):
        if keep is None:
            masks = {}
        elif self.as_attn_mask:
            masks = {"attn_mask": ~keep.expand(-1, _HEADS, -1, -1).flatten(0, 1)}
        else:
            masks = {"key_padding_mask": ~mask.bool()}
        return x + self.attention(x, x, x, need_weights=self.need_weights, **masks)[0]


class _EncoderLayer(torch.nn.Module):
    """``nn.TransformerEncoderLayer`` given the pads as ``src_key_padding_mask``."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(_WIDTH, _HEADS, 2 * _WIDTH, dropout=0.0,
                                                      batch_first=True)

    def forward(self, x, keep, mask):
        return self.layer(x, src_key_padding_mask=None if keep is None else ~mask.bool())


class _Model(torch.nn.Module):
    """Two attention layers of ``kind``; the layer ``dropping`` (if any) attends to every
    key, pads included (its attention drops the mask)."""

    def __init__(self, kind: str, dropping: int | None = None):
        super().__init__()
        self.kind, self.dropping = kind, dropping
        self.embed = torch.nn.Embedding(32, _WIDTH)
        self.layers = torch.nn.ModuleList(_layer(kind) for _ in range(2))
        self.head = torch.nn.Linear(_WIDTH, 32)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        causal = self.kind in ("bmm", "sink")
        keep = _keep(attention_mask, causal)
        unmasked = _keep(torch.ones_like(attention_mask), causal)
        for i, layer in enumerate(self.layers):
            dropped = unmasked if causal else None
            h = layer(h, dropped if i == self.dropping else keep, attention_mask)
        return self.head(h)


def _layer(kind: str) -> torch.nn.Module:
    if kind == "bmm":
        return _BmmAttention()
    if kind == "sink":
        return _SinkAttention()
    if kind == "encoder_layer":
        return _EncoderLayer()
    _, weights, mask = kind.split("-")
    return _Multihead(weights == "weights", mask == "attn_mask")


_KINDS = ["bmm", "sink", "mha-weights-key_padding_mask", "mha-noweights-key_padding_mask",
          "mha-weights-attn_mask", "mha-noweights-attn_mask", "encoder_layer"]


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def _alone(model, ids):
    with torch.no_grad():
        return _logits(model(torch.tensor([ids]), attention_mask=torch.ones(
            1, len(ids), dtype=torch.long)))


def _padded(model):
    """The plain model's logits of ``_B`` left-padded beside ``_A`` (its own tokens')."""
    pads = len(_A) - len(_B)
    ids = torch.tensor([_A, [0] * pads + _B])
    mask = torch.tensor([[1] * len(_A), [0] * pads + [1] * len(_B)])
    with torch.no_grad():
        return _logits(model(ids, attention_mask=mask))[1:, -len(_B):]


def _traced(model, backend):
    lm = LanguageModel(model)
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(_A):
            la = lm.output.save()
        with tracer.invoke(_B):
            lb = lm.output.save()
    return _logits(la), _logits(lb)


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_every_layer_masking_the_pads_runs(kind, backend):
    """Each invoke's logits are its prompt's alone (run by the plain model)."""
    model = _model(_Model, kind)
    la, lb = _traced(model, backend)
    torch.testing.assert_close(la, _alone(model, _A))
    torch.testing.assert_close(lb[:, -len(_B):], _alone(model, _B))


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_layer_dropping_the_mask_is_refused(kind, backend):
    """Layer 1 reads the pads: the padded row differs from the prompt alone (by 0.08 to
    1.1), and the batch is refused before running, naming that layer and the user's line
    (was run, silently wrong: the three-dimensional softmax was no attention to the
    check, nor the fused ``MultiheadAttention`` the scan runs, also in a
    ``TransformerEncoderLayer``, and the sink's softmax had one column more than the
    mask)."""
    model = _model(_Model, kind, 1)
    assert not torch.allclose(_padded(model), _alone(model, _B), atol=1e-3)
    with pytest.raises(TraceError, match=r"(?s)invoke #1 is 3 tokens long.*ignores the "
                                         r"attention_mask.*attention in layers\.1\b.*"
                                         r"masks them.*test_attention_shapes_padding"):
        _traced(model, backend)


class _Routed(_Model):
    """Masked ``torch.bmm`` attention layers, each followed by a soft mixture of as many
    experts as the longer prompt's tokens: a softmax of the router's logits over three
    dimensions (batch, tokens, experts) weighing the experts' outputs in a product of
    matrices. No attention: each token's mixture is its own."""

    def __init__(self):
        super().__init__("bmm")
        self.router = torch.nn.Linear(_WIDTH, len(_A))
        self.experts = torch.nn.Linear(_WIDTH, len(_A) * _WIDTH)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        keep = _keep(attention_mask, True)
        for layer in self.layers:
            h = layer(h, keep)
            weights = self.router(h).softmax(-1)  # (batch, tokens, experts)
            outputs = self.experts(h).unflatten(-1, (len(_A), _WIDTH))
            h = h + (weights.unsqueeze(-2) @ outputs).squeeze(-2)
        return self.head(h)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_routers_softmax_is_no_attention(backend):
    """The router's softmax reads no mask, over as many columns as the mask, its
    probabilities weighing values: its logits are no product of queries and keys, so it
    is no attention reading the pads (was refused, with the check's first version of
    three-dimensional softmaxes). Each invoke's logits are its prompt's alone."""
    model = _model(_Routed)
    la, lb = _traced(model, backend)
    torch.testing.assert_close(la, _alone(model, _A))
    torch.testing.assert_close(lb[:, -len(_B):], _alone(model, _B))


def _gpt_oss(dropping: bool):
    """The zoo's tiny GPT-OSS (eager: sinks), its layer 1's attention dropping the mask
    where ``dropping``."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    class _Dropping(GptOssAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **{**kwargs, "attention_mask": None})

    model = zoo.build(zoo.BY_NAME["gpt_oss"])
    if dropping:
        model.model.layers[1].self_attn.__class__ = _Dropping
    return model


@pytest.mark.parametrize("backend", [pytest.param("fx", marks=pytest.mark.slow), "hooks"])
def test_gpt_oss_sinks(backend):
    """GPT-OSS's softmax has a sink column beside the keys: a layer dropping the mask is
    refused (was run: its padded row differs by 0.09), the model itself runs, each
    invoke's logits its prompt's alone. (The fx backend's captures take 8 s: slow.)"""
    model = _gpt_oss(True)
    assert not torch.allclose(_padded(model), _alone(model, _B), atol=1e-3)
    with pytest.raises(TraceError, match=r"(?s)ignores the attention_mask.*attention in "
                                         r"model\.layers\.1\.self_attn\b"):
        _traced(model, backend)
    model = _gpt_oss(False)
    la, lb = _traced(model, backend)
    torch.testing.assert_close(la, _alone(model, _A))
    torch.testing.assert_close(lb[:, -len(_B):], _alone(model, _B))


class _FlexLayer(torch.nn.Module):
    """``flex_attention`` with a block mask."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(_WIDTH, 3 * _WIDTH)

    def forward(self, h, block):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = (z.unflatten(-1, (_HEADS, -1)).transpose(1, 2)
                   for z in self.qkv(h).chunk(3, -1))
        return h + flex_attention(q, k, v, block_mask=block).transpose(1, 2).flatten(-2)


class _FlexModel(torch.nn.Module):
    """Two ``flex_attention`` layers whose block mask keeps the pads out (the layer
    ``dropping``: causal only)."""

    def __init__(self, dropping: int | None = None):
        super().__init__()
        self.dropping = dropping
        self.embed = torch.nn.Embedding(32, _WIDTH)
        self.layers = torch.nn.ModuleList(_FlexLayer() for _ in range(2))
        self.head = torch.nn.Linear(_WIDTH, 32)

    def forward(self, input_ids, attention_mask=None):
        from torch.nn.attention.flex_attention import create_block_mask

        h, (b, t) = self.embed(input_ids), input_ids.shape
        keep = attention_mask.bool()

        def causal(batch, head, query, key):
            return key <= query

        def padded(batch, head, query, key):
            return (key <= query) & (keep[batch, key] | (key == query))

        for i, layer in enumerate(self.layers):
            h = layer(h, create_block_mask(causal if i == self.dropping else padded, b, None,
                                           t, t, device=h.device))
        return self.head(h)


@pytest.mark.slow  # (9 s: flex_attention compiles its score function)
def test_flex_attention_is_an_attention_in_a_captured_graph():
    """``flex_attention`` (its higher-order operator in the captured graph) is an
    attention: a layer whose block mask drops the pads' mask is found, the masked model
    passes the check (was passed: no attention recorded). A padded trace runs neither
    (the captured graph fails at its run; the hooks backend's scan cannot run
    ``flex_attention``'s inner ``torch.compile`` under its dispatch mode, so the batch
    is refused as one the check cannot tell): never silently wrong. (Run last: after
    ``flex_attention`` ran under a dispatch mode, torch's dynamo fails on later plain
    calls of it in the process, a torch 2.13 bug a plain ``TorchDispatchMode`` shows.)"""
    from fxsight.api.mask_reads import mask_unread
    from fxsight.capture.captures import cached_capture

    masked, dropping = _model(_FlexModel), _model(_FlexModel, 1)
    assert not torch.allclose(_padded(dropping), _alone(dropping, _B), atol=1e-3)
    ids, mask = torch.tensor([_A, [0, 0, 0] + _B]), torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    kwargs = {"input_ids": ids, "attention_mask": mask}
    reasons = []
    for model in (masked, dropping):
        with torch.no_grad():
            capture = cached_capture(model, (), kwargs)
        reasons.append(mask_unread(model, capture, (), kwargs, mask))
    assert reasons[0] is None
    assert reasons[1] is not None and "attention in layers.1 reads every key" in reasons[1]
    for model in (masked, dropping):
        with pytest.raises(Exception):  # noqa: B017 - (not run: any error, no value)
            _traced(model, "fx")
        with pytest.raises(TraceError, match="cannot be told"):
            _traced(model, "hooks")
