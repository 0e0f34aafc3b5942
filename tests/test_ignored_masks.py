"""Padded batches of a model that takes an attention_mask and ignores it are refused before
anything runs (the pads would change the rows they pad), whatever the model: found from
its captured graph on the fx backend, from a forward pass on fake tensors on the hooks
backend and in ``generate``. Models that honour the mask are not refused, and each
invoke's values equal its prompt run alone (plain forward, forward hooks)."""

from __future__ import annotations

import pytest
import torch
from models import tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel

from fxsight import LanguageModel, TraceError


class _Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, h, attention_mask=None):
        return self.proj(h.cumsum(1))  # (each token sees the earlier: pads included)


class _IgnoresMask(torch.nn.Module):
    """A causal LM whose forward takes an attention_mask and ignores it (it is passed on to
    a layer that ignores it too)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.body = _Body()
        self.head = torch.nn.Linear(8, 50)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.body(self.embed(input_ids), attention_mask=attention_mask))


class _ShapeOfMask(_IgnoresMask):
    """Reads only the mask's shape through an operator (``ones_like``), not its values."""

    def forward(self, input_ids, attention_mask=None):
        keep = torch.ones_like(attention_mask).unsqueeze(-1).float()
        return self.head(self.body(self.embed(input_ids) * keep))


class _WritesMaskIntoBuffer(_IgnoresMask):
    """Honours the mask, copying it into a slice of a tensor of its own first."""

    def forward(self, input_ids, attention_mask=None):
        keep = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1)
        keep[:, 1:] = attention_mask  # (an in-place write through a view)
        h = self.embed(input_ids) * keep[:, 1:].unsqueeze(-1)
        return self.head(self.body(h))


class _GPT2IgnoresMask(GPT2LMHeadModel):
    """GPT-2 with a forward that takes an attention_mask and drops it."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("cls", [_IgnoresMask, _ShapeOfMask])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_invokes_of_different_lengths_are_refused(cls, backend):
    lm = LanguageModel(_model(cls))
    with pytest.raises(TraceError, match=rf"(?s)invoke #1 is 2 tokens long and invoke #0 4.*"
                       rf"{cls.__name__} ignores the attention_mask.*test_ignored_masks.py"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke([1, 2, 3, 4]):
                lm.output.save()
            with tracer.invoke([5, 6]):
                lm.output.save()
    with pytest.raises(TraceError, match="the batch's rows are padded"):
        with lm.trace([[1, 2, 3, 4], [5, 6]], backend=backend):
            lm.output.save()
    with pytest.raises(TraceError, match=rf"the batch's rows are padded.*{cls.__name__}"):
        lm.trace([[1, 2, 3, 4], [5, 6]], trace=False)  # (a plain run)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_generate_with_prompts_of_different_lengths_is_refused(backend):
    lm = LanguageModel(_GPT2IgnoresMask(tiny_gpt2().config).eval())
    with pytest.raises(TraceError, match="_GPT2IgnoresMask ignores the attention_mask"):
        with lm.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=2, do_sample=False,
                         backend=backend):
            lm.generator.output.save()
    with pytest.raises(TraceError, match="_GPT2IgnoresMask ignores the attention_mask"):
        with lm.trace([[5, 6, 7, 8], [9, 10]], backend=backend):
            lm.output.logits.save()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_invokes_of_equal_lengths_equal_each_prompt_alone(backend):
    model = _model(_IgnoresMask)
    lm = LanguageModel(model)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.save()
        with tracer.invoke(b):
            lm.body.output[:, 0] = 0
            lb = lm.output.save()
    seen = {}
    with torch.no_grad():
        ra = model(torch.tensor([a]))
        hook = model.body.register_forward_hook(
            lambda m, i, o: (seen.setdefault("b", o), o.index_fill(1, torch.tensor(0), 0))[1])
        rb = model(torch.tensor([b]))
        hook.remove()
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb, rb)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_mask_written_into_a_tensor_of_the_models_is_read(backend):
    model = _model(_WritesMaskIntoBuffer)
    lm = LanguageModel(model)
    a, b = [1, 2, 3, 4], [5, 6]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.save()
        with tracer.invoke(b):
            lb = lm.output.save()
    with torch.no_grad():
        ra, rb = (model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                  for ids in (a, b))
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb[:, -2:], rb)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_models_that_honour_the_mask_are_not_refused(make, backend):
    model = make()
    lm = LanguageModel(model)
    a, b = [5, 6, 7, 8, 9, 10], [12, 13, 14]
    layer = lambda m: m.transformer.h[0] if hasattr(m, "transformer") else m.model.layers[0]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.logits.save()
        with tracer.invoke(b):
            hb = layer(lm).output.save()
            lb = lm.output.logits.save()
    seen = {}
    with torch.no_grad():
        ra = model(torch.tensor([a])).logits
        hook = layer(model).register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
        rb = model(torch.tensor([b])).logits
        hook.remove()
    hb = hb[0] if isinstance(hb, tuple) else hb
    h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb[:, -3:], rb)
    torch.testing.assert_close(hb[:, -3:], h)
