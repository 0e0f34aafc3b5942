"""Padded batches of a model that takes an attention_mask and ignores it are refused before
anything runs (the pads would change the rows they pad), whatever the model: found from
its captured graph on the fx backend, from a forward pass on fake tensors on the hooks
backend and in ``generate``. Models that honour the mask are not refused, and each
invoke's values equal its prompt run alone (plain forward, forward hooks)."""

from __future__ import annotations

import sys

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


# --- the check reads no device value where the invokes' padding is known -------------------
_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.equal, torch.Tensor.equal,
          torch.is_nonzero}


def _fxsight_code(frame) -> bool:
    path = frame.f_code.co_filename.replace("\\", "/")
    return "/fxsight/" in path or path.startswith("<fxsight")


class _CountReads(torch.overrides.TorchFunctionMode):
    """Every read of a tensor's values into Python (on a GPU: a wait for its queue) that
    fxsight's code makes (not the model's own), with the fxsight functions it was read in
    (innermost first)."""

    def __init__(self):
        super().__init__()
        self.reads: list[list[str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and _fxsight_code(sys._getframe(1)):
            frame, names = sys._getframe(1), []
            while frame is not None:
                path = frame.f_code.co_filename.replace("\\", "/")
                if "/fxsight/" in path or path.startswith("<fxsight"):
                    names.append(f"{path.rsplit('/fxsight/', 1)[-1]}:{frame.f_code.co_name}")
                frame = frame.f_back
            self.reads.append(names)
        return func(*args, **(kwargs or {}))


def _outside_invokes_and_graph(reads: list[list[str]]) -> list[list[str]]:
    """The reads made neither while an invoke's input was prepared (its token ids checked)
    nor inside the rewritten graph (the eager forward's own all-ones check of the mask)."""
    return [names for names in reads
            if not any(n.endswith(":_prepare_invoke") or n.startswith("<fxsight") or
                       n == "run/executable.py:__call__" for n in names)]


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_batch_of_unpadded_invokes_reads_no_device_value_to_check_its_mask(backend):
    """Whether a batch is padded was read from its mask on the device at every trace
    (``bool(mask.all())``: on a GPU a wait for its queue, once per trace of a loop); the
    invokes' own preparation knows it on the host. The end of the block now reads no value
    outside the graph, and a padded invoke still leads to the check (refused below)."""
    lm = LanguageModel(tiny_gpt2())
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11, 12]])
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), _CountReads() as counted:
            with lm.trace(backend=backend) as tracer:
                with tracer.invoke(a):
                    value = lm.transformer.h[0].output.save()
                with tracer.invoke(b):
                    lm.transformer.h[0].output = value
                    logits = lm.output.logits.save()
            with lm.trace(a, backend=backend) as tracer:
                cache = tracer.cache()
    assert _outside_invokes_and_graph(counted.reads) == []
    assert logits.shape == (1, 4, lm.config.vocab_size) and len(cache) > 0


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_invoke_padded_by_its_own_mask_beside_an_unpadded_one_is_refused(backend):
    """Invokes of equal lengths, the second's mask with a zero: its padding, known as it was
    prepared, leads to the check, which refuses a model that ignores the mask."""
    lm = LanguageModel(_model(_IgnoresMask))
    with pytest.raises(TraceError, match=r"the batch's rows are padded.*_IgnoresMask"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke([1, 2, 3, 4]):
                lm.output.save()
            with tracer.invoke({"input_ids": [[5, 6, 7, 8]],
                                "attention_mask": [[0, 1, 1, 1]]}):
                lm.output.save()
