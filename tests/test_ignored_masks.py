"""Padded batches of a model that takes an attention_mask and ignores it (or reads it only
as token positions, or only in a loss) are refused before anything runs (the pads would
change the rows they pad), whatever the model: found from
its captured graph on the fx backend, from a forward pass on fake tensors on the hooks
backend and in ``generate``. Models that honour the mask are not refused, and each
invoke's values equal its prompt run alone (plain forward, forward hooks)."""

from __future__ import annotations


import pytest
import torch
from device_reads import CountReads
from models import tiny_gpt2, tiny_llama
from transformers import (AutoConfig, AutoModelForCausalLM, BartConfig,
                          BartForConditionalGeneration, GPT2LMHeadModel, LlamaForCausalLM,
                          T5Config, T5ForConditionalGeneration)
from transformers.models.bart.modeling_bart import BartDecoder
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.t5.modeling_t5 import T5Stack

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


class _PositionsFromMask(_IgnoresMask):
    """Reads the mask only for its tokens' positions (the rows of a position embedding);
    every token reads the ones before it, pads included."""

    def __init__(self):
        super().__init__()
        self.positions = torch.nn.Embedding(16, 8)

    def forward(self, input_ids, attention_mask=None):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.head(self.body(self.embed(input_ids) + self.positions(positions)))


class _LossFromMask(_IgnoresMask):
    """Reads the mask only in a loss over its real tokens; its logits read the pads."""

    def forward(self, input_ids, attention_mask=None):
        logits = self.head(self.body(self.embed(input_ids)))
        loss = (logits.logsumexp(-1) * attention_mask).sum() / attention_mask.sum()
        return CausalLMOutput(loss=loss, logits=logits)


class _AlibiFromMask(_IgnoresMask):
    """Attention with ALiBi's bias built from the mask's running count (as Bloom builds it)
    and a causal mask of its own: no key is masked, so every token reads the pads before
    it."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, input_ids, attention_mask=None):
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, -1)
        n = input_ids.shape[1]
        alibi = 0.5 * (attention_mask.cumsum(-1) - 1)  # (the keys' positions, no masking)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5 + alibi[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        return self.head(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)


class _BloomAlibiFromMask(_AlibiFromMask):
    """ALiBi's bias as Bloom builds it, its positions zeroed at the pads by the mask
    (``(mask.cumsum(-1) - 1) * mask``), and no key masked."""

    def forward(self, input_ids, attention_mask=None):
        q, k, v = self.qkv(self.embed(input_ids)).chunk(3, -1)
        n = input_ids.shape[1]
        alibi = 0.5 * ((attention_mask.cumsum(-1) - 1) * attention_mask)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5 + alibi[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        return self.head(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)


def _positions_from_mask(mask):
    """transformers' generate's positions of left-padded rows."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _GPT2PositionsFromMask(GPT2LMHeadModel):
    """GPT-2 whose forward takes the mask's positions (its learned position embedding's
    rows) and attends to every token, pads included."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, position_ids=_positions_from_mask(
            attention_mask), **kwargs)


class _LlamaPositionsFromMask(LlamaForCausalLM):
    """Llama whose forward takes the mask's positions (rotary angles) and attends to
    every token, pads included."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, position_ids=_positions_from_mask(
            attention_mask), **kwargs)


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


def _logits(output):
    return output if isinstance(output, torch.Tensor) else output.logits


def _padded_rows_differ(model, a, b, **kwargs):
    """The reference: the plain model's padded row of ``b`` is not ``b`` alone."""
    ids = torch.tensor([a, [0] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    with torch.no_grad():
        batched = _logits(model(ids, attention_mask=mask, **kwargs))
        alone = _logits(model(torch.tensor([b]), attention_mask=torch.ones(
            1, len(b), dtype=torch.long), **kwargs))
    n = alone.shape[1]
    return not torch.allclose(batched[1:, -n:], alone, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: _model(_PositionsFromMask), lambda: _model(_LossFromMask),
    lambda: _model(_AlibiFromMask), lambda: _model(_BloomAlibiFromMask),
    lambda: _GPT2PositionsFromMask(tiny_gpt2().config).eval(),
    lambda: _LlamaPositionsFromMask(tiny_llama().config).eval()],
    ids=["positions", "loss", "alibi", "bloom-alibi", "gpt2-positions", "llama-rotary"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_mask_read_only_for_positions_or_a_loss_is_refused(make, backend):
    """A mask that reaches the logits only as token positions (an embedding's rows,
    rotary angles, ALiBi's bias from its running count), or reaches only a loss, does
    not keep the rows from the pads: the
    plain model's padded row differs from the prompt alone, so fxsight refuses the
    padded batch before running (was run: the mask reached an output). (Prompts of one
    length run: ``test_invokes_of_equal_lengths_equal_each_prompt_alone``.)"""
    model = make()
    a, b = [5, 6, 7, 8, 9, 10], [12, 13, 14]
    assert _padded_rows_differ(model, a, b)
    name = type(model).__name__
    lm = LanguageModel(model)
    why = r"(token positions|logits is not computed from it, only its loss)"
    with pytest.raises(TraceError, match=rf"(?s)invoke #1 is 3 tokens long.*{name} ignores "
                                         rf"the attention_mask.*{why}.*test_ignored_masks"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke(a):
                lm.output.save()
            with tracer.invoke(b):
                lm.output.save()
    if isinstance(model, GPT2LMHeadModel):
        with pytest.raises(TraceError, match=rf"{name} ignores the attention_mask.*{why}"):
            with lm.generate([a, b], max_new_tokens=2, do_sample=False, backend=backend):
                lm.generator.output.save()


def _alibi_model(name: str):
    config = dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "falcon":
        config.update(alibi=True, new_decoder_architecture=False, multi_query=True)
    config = AutoConfig.for_model(name, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["bloom", "falcon"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_alibi_models_that_mask_the_pads_are_not_refused(name, backend):
    """Bloom and Falcon build ALiBi's bias from the mask's running count and mask the pads
    too: a padded invoke's rows equal its prompt run alone (a plain forward)."""
    model = _alibi_model(name)
    lm = LanguageModel(model)
    a, b = [5, 6, 7, 8, 9, 10], [12, 13, 14]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.logits.save()
        with tracer.invoke(b):
            lb = lm.output.logits.save()
    with torch.no_grad():
        ra, rb = (model(torch.tensor([ids])).logits for ids in (a, b))
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb[:, -3:], rb)


class _StackIgnoresMask(T5Stack):
    """T5's encoder with a forward that takes an attention_mask and drops it (the
    decoder's cross-attention still reads the mask)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


def _large_weights(model_class, config):
    """``model_class(config)`` in eval mode, seeded, every parameter drawn again from
    N(0, 0.3) (larger weights: the greedy tokens vary)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.3)
    return model


def _t5(ignoring: bool):
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=None)
    model = _large_weights(T5ForConditionalGeneration, config)
    if ignoring:
        model.encoder.__class__ = _StackIgnoresMask
    return model


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_encoder_decoder_whose_encoder_ignores_the_mask_is_refused(backend):
    """An encoder-decoder's rows are its encoder's hidden states too: where its encoder
    ignores the mask (its decoder reads it), ``generate`` and a trace of prompts of
    different lengths are refused (were run: the padded row's tokens differ from
    transformers' generate of the prompt alone); a T5 that honours it gives each
    prompt's tokens. (Its start token is given to ``generate`` only: the check's forward
    pass starts the decoder with it, as generate does.)"""
    a, b = [5, 6, 7, 8, 9, 10], [12, 13, 14]
    options = dict(max_new_tokens=4, do_sample=False, decoder_start_token_id=0)
    for ignoring in (True, False):
        model = _t5(ignoring)
        lm = LanguageModel(model)
        with torch.no_grad():
            alone = [model.generate(torch.tensor([ids]), **options)[0] for ids in (a, b)]
        if ignoring:
            with torch.no_grad():
                batched = model.generate(torch.tensor([a, [0] * 3 + b]), attention_mask=
                                         torch.tensor([[1] * 6, [0] * 3 + [1] * 3]), **options)
            assert not torch.equal(batched[1], alone[1])  # (the reference: refuse it)
            with pytest.raises(TraceError, match=r"(?s)T5ForConditionalGeneration ignores "
                                                 r"the attention_mask.*encoder_last_hidden_"
                                                 r"state is not computed.*test_ignored"):
                with lm.generate([a, b], backend=backend, **options):
                    lm.generator.output.save()
            if backend == "hooks":  # (a trace too; on fx its capture takes seconds)
                with pytest.raises(TraceError, match="encoder_last_hidden_state"):
                    with lm.trace([a, b], decoder_input_ids=torch.tensor([[0, 5], [0, 5]]),
                                  backend=backend):
                        lm.output.logits.save()
            continue
        if backend == "fx":
            continue  # (an encoder-decoder's generate runs on hooks)
        with torch.no_grad(), lm.generate([a, b], backend=backend, **options):
            tokens = lm.generator.output.save()
        assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


# --- the check reads no device value where the invokes' padding is known -------------------
def _outside_invokes_and_graph(reads: list[list[str]]) -> list[list[str]]:
    """The reads made neither by the checks of the invokes' token ids (as an input is
    prepared, or for all its trace's invokes at once) nor inside the rewritten graph (the
    eager forward's own all-ones check of the mask)."""
    return [names for names in reads
            if not any(n.endswith(":_prepare_invoke") or n.endswith(":_check_invokes") or
                       n.startswith("<fxsight") or
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
        with torch.no_grad(), CountReads() as counted:
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


def test_a_plain_run_of_an_unpadded_input_reads_no_device_value_to_check_its_mask():
    """``trace=False`` read the mask it had just made (``bool(mask.all())``: on a GPU a
    wait for its queue) to decide whether to check the batch; its preparation knows. It now
    reads nothing outside the model (whose own reads are the plain forward's), gives the
    plain forward's logits, and a padded input of a model ignoring its mask is still
    refused (its refusal is tested above)."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), CountReads() as counted:
        out = lm.trace(ids, trace=False)
    assert _outside_invokes_and_graph(counted.reads) == []
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(TraceError, match=r"the batch's rows are padded.*_IgnoresMask"):
        LanguageModel(_model(_IgnoresMask)).trace(
            {"input_ids": [[1, 2, 3, 4]], "attention_mask": [[0, 1, 1, 1]]}, trace=False)


def test_unpadded_invokes_run_their_graph_without_reading_the_mask():
    """The rewritten graph checked at every run that the batch's mask is all ones
    (``attention_masks.all_ones``: a read, on a GPU a wait for its queue, per trace); the
    invokes' preparation knows it on the host. An fx trace of unpadded invokes now reads
    nothing but its invokes' token checks, with the plain forward's logits; a padded
    batch, and a caller's mask with a zero written into it after its invoke, still run
    masked, as their preparation found them."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11, 12]])
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend="fx") as tracer:
                with tracer.invoke(a):
                    first = lm.output.logits.save()
                with tracer.invoke(b):
                    second = lm.output.logits.save()
    assert tracer.backend == "fx"
    assert [n for n in counted.reads if not any(x.endswith((":_prepare_invoke",
                                                           ":_check_invokes"))
                                                for x in n)] == []
    with torch.no_grad():
        expected = model(torch.cat([a, b])).logits
        torch.testing.assert_close(torch.cat([first, second]), expected)
        mask = torch.ones(1, 4, dtype=torch.long)
        with lm.trace({"input_ids": b, "attention_mask": mask}, backend="fx"):
            mask[0, 0] = 0  # (after its invoke: the input is as it was given)
            kept = lm.output.logits.save()
        torch.testing.assert_close(kept, model(b).logits)
        with lm.trace([[5, 6, 7, 8], [9, 10]], backend="fx"):
            padded = lm.output.logits.save()
        torch.testing.assert_close(padded[1, 2:], model(torch.tensor([[9, 10]])).logits[0])


def test_a_padded_batch_runs_its_graph_without_reading_the_mask():
    """The rewritten graph read the mask of a batch that its invokes' preparation knew
    padded (prompts of different lengths, a mask of the caller's with a zero) to find it
    not all ones; it now reads nothing inside the graph, and each row is its prompt's
    alone (the plain forward's)."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend="fx") as tracer:
                with tracer.invoke([5, 6, 7, 8]):
                    long = lm.output.logits.save()
                with tracer.invoke([9, 10]):
                    short = lm.output.logits.save()
                with tracer.invoke({"input_ids": [[1, 11, 12, 13]],
                                    "attention_mask": [[0, 1, 1, 1]]}):
                    masked = lm.output.logits.save()
    assert tracer.backend == "fx"
    assert [n for n in counted.reads if any(x.startswith("<fxsight") or
                                            x == "run/executable.py:__call__"
                                            for x in n)] == []
    with torch.no_grad():
        torch.testing.assert_close(long, model(torch.tensor([[5, 6, 7, 8]])).logits)
        torch.testing.assert_close(short[:, 2:], model(torch.tensor([[9, 10]])).logits)
        torch.testing.assert_close(masked[:, 1:], model(torch.tensor([[11, 12, 13]])).logits)


class _DecoderDropsEncoderMask(BartDecoder):
    """BART's decoder with a forward that drops the encoder's attention_mask: its
    cross-attention reads every position of the encoder's hidden states, pads included
    (the encoder still honours the mask)."""

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=encoder_hidden_states, **kwargs)


def _bart(dropping: bool):
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    model = _large_weights(BartForConditionalGeneration, config)
    if dropping:
        model.model.decoder.__class__ = _DecoderDropsEncoderMask
    return model


def _seq2seq(name: str, dropping: bool = False):
    return _bart(dropping) if name == "bart" else _t5(False)


_A, _B, _DECODER = [5, 6, 7, 8, 9, 10], [12, 13, 14], [[2, 5, 7]]
_GENERATE = dict(max_new_tokens=4, do_sample=False, decoder_start_token_id=2)


def _invokes(lm, backend):
    """The logits of two invokes of different lengths (the second padded)."""
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(_A, decoder_input_ids=torch.tensor(_DECODER)):
            la = lm.output.logits.save()
        with tracer.invoke(_B, decoder_input_ids=torch.tensor(_DECODER)):
            lb = lm.output.logits.save()
    return la, lb


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_encoder_decoder_whose_decoder_drops_the_encoder_mask_is_refused(backend):
    """An encoder-decoder whose encoder honours the mask and whose decoder's
    cross-attention drops it: its logits are computed from the mask (through the encoder's
    hidden states), yet the padded row's decoder reads the pads' states, so its logits and
    tokens differ from the prompt alone (the reference: the plain model, transformers'
    generate). A trace of prompts of different lengths and ``generate`` are refused (were
    run: the padded invoke's logits differed from the prompt alone, without error)."""
    model = _bart(dropping=True)
    decoder = torch.tensor(_DECODER * 2)
    with torch.no_grad():
        batched = model(torch.tensor([_A, [1] * 3 + _B]), decoder_input_ids=decoder,
                        attention_mask=torch.tensor([[1] * 6, [0] * 3 + [1] * 3])).logits
        alone = model(torch.tensor([_B]), decoder_input_ids=decoder[:1]).logits
    assert not torch.allclose(batched[1:], alone, atol=1e-4)  # (the reference: refuse it)
    lm = LanguageModel(model)
    why = r"(?s)BartForConditionalGeneration ignores the attention_mask.*decoder's " \
          r"cross-attention.*test_ignored_masks"
    with pytest.raises(TraceError, match=rf"(?s)invoke #1 is 3 tokens long.*{why[4:]}"):
        _invokes(lm, backend)
    with pytest.raises(TraceError, match=why):
        with lm.generate([_A, _B], backend=backend, **_GENERATE):
            lm.generator.output.save()


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_encoder_decoders_that_honour_the_mask_are_not_refused(name, backend):
    """Real BART and T5 (the decoder's cross-attention reads the mask) are not refused:
    each invoke's logits, and each prompt's generated tokens, equal the prompt run alone
    (a plain forward; transformers' generate). An encoder-decoder's input is right-padded,
    so BART's learned positions (by index) are the prompt alone's too (were the left-padded
    batch's: see tests/test_encoder_decoder_padding.py)."""
    model = _seq2seq(name)
    lm = LanguageModel(model)
    decoder = torch.tensor(_DECODER)
    la, lb = _invokes(lm, backend)
    with torch.no_grad():
        ra = model(torch.tensor([_A]), decoder_input_ids=decoder).logits
        rb = model(torch.tensor([_B]), decoder_input_ids=decoder).logits
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb, rb)
    if backend == "fx":
        return  # (an encoder-decoder's generate runs on hooks)
    options = {**_GENERATE, "decoder_start_token_id": 0}
    with torch.no_grad():
        alone = [model.generate(torch.tensor([ids]), **options)[0] for ids in (_A, _B)]
    with torch.no_grad(), lm.generate([_A, _B], backend=backend, **options):
        tokens = lm.generator.output.save()
    assert torch.equal(tokens[0], alone[0]) and torch.equal(tokens[1], alone[1])


class _FailsOnPads(_IgnoresMask):
    """A model whose forward cannot run a padded batch (as the zoo's tiny DeepSeek-V3
    cannot: a shape error in its attention)."""

    def forward(self, input_ids, attention_mask=None):
        if not bool(attention_mask.all()):
            raise ValueError("left padding is not supported")
        return self.head(self.body(self.embed(input_ids) * attention_mask[..., None]))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_check_whose_forward_cannot_run_refuses_naming_the_model(backend):
    """Where the check's own forward pass fails, the padded batch is refused naming the
    model and the failure (was skipped: the check passed and the model's own error came
    from the run)."""
    lm = LanguageModel(_model(_FailsOnPads))
    with pytest.raises(TraceError, match=r"(?s)whether _FailsOnPads keeps them from the pads "
                                         r"cannot be told.*ValueError: left padding is not "
                                         r"supported.*test_ignored_masks"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke([1, 2, 3, 4]):
                lm.output.save()
            with tracer.invoke([5, 6]):
                lm.output.save()


class _TakesNoEncoderOutputs(BartForConditionalGeneration):
    """An encoder-decoder whose forward cannot be given the encoder's hidden states: its
    decoder cannot be run apart to see that it reads the mask."""

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               decoder_input_ids=decoder_input_ids)


def test_an_encoder_decoder_whose_decoder_cannot_be_checked_is_refused():
    """Its decoder could drop the mask (as ``_DecoderDropsEncoderMask`` does) unseen: a
    padded batch is refused, naming why (was run unchecked)."""
    model = _bart(dropping=True)
    model.__class__ = _TakesNoEncoderOutputs
    lm = LanguageModel(model)
    with pytest.raises(TraceError, match=r"(?s)whether _TakesNoEncoderOutputs keeps them .*"
                                         r"cannot be run apart from its encoder.*"
                                         r"test_ignored_masks"):
        _invokes(lm, "hooks")
