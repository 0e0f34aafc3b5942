"""Keyword inputs: ``trace(**kwargs)``, ``tracer.invoke(**kwargs)``, dicts and
``BatchEncoding``s, for ``NNsight`` and ``LanguageModel``, on fx and hooks.

Every number is compared with the plain forward called with the same keywords (with
hand-written forward hooks for writes); bad input is refused before anything runs.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel,
                          T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel)

import fxsight
from fxsight.errors import TraceError
from fxsight.record.active import active_tracers
from models import tiny_gpt2

BACKENDS = ("fx", "hooks")
TEXTS = ["The capital of France is", "Big Ben"]


# --- models (one layer each: a capture per model and input shape, reused by the tests) ---
def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(n_layer=1)


@pytest.fixture(scope="module")
def bert():
    return _seeded(lambda: BertModel(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)))


@pytest.fixture(scope="module")
def bart():
    return _seeded(lambda: BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64)))


@pytest.fixture(scope="module")
def vit():
    return _seeded(lambda: ViTModel(ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64)))


@pytest.fixture(scope="module")
def encoded(tokenizer):
    """Two left-padded prompts (2 x 14) as the tokenizer returns them: the GPT-2 tests
    share this shape (and so their captures)."""
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _ids(rows: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def _mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded first row
    return mask


def _zero_last(module, args, output):
    output = output.clone()
    output[:, -1] = 0
    return output


def _keep(saved: dict, name: str, pick=lambda output: output):
    """A forward hook that keeps (a part of) a module's output and changes nothing."""
    def hook(module, args, output):
        saved[name] = pick(output)
    return hook


def _untouched(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
                   for m in model.modules())


class _OnBackend:
    """Asserts that a trace ran on the backend asked for: on fx, captured (no fallback)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.fallbacks = fxsight.stats()["fallbacks"]

    def check(self, tracer) -> None:
        assert tracer.backend == self.backend
        assert fxsight.stats()["fallbacks"] == self.fallbacks


# --- NNsight: each kind of model with its keywords ---------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_keywords_save_and_write(gpt2, encoded, backend, reference_hooks):
    inputs = dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                  use_cache=False)
    saved_ref = {}
    hooks = {"transformer.h.0.attn": _keep(saved_ref, "attn", lambda o: o[0]),
             "transformer.h.0.mlp": _zero_last}
    with reference_hooks(gpt2, hooks=hooks):
        expected = gpt2(**inputs).logits
    net = fxsight.NNsight(gpt2)
    on = _OnBackend(backend)
    with net.trace(backend=backend, **inputs) as tracer:
        attn = net.transformer.h[0].attn.output[0].save()
        net.transformer.h[0].mlp.output[:, -1] = 0
        logits = net.output.logits.save()
    on.check(tracer)
    torch.testing.assert_close(attn, saved_ref["attn"], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, gpt2(**inputs).logits)  # the write changed it
    assert _untouched(gpt2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_batch_encoding_spread_or_positional(gpt2, encoded, backend):
    assert isinstance(encoded, transformers.BatchEncoding)
    expected = gpt2(**encoded, use_cache=False).logits
    net = fxsight.NNsight(gpt2)
    on = _OnBackend(backend)
    with net.trace(**encoded, use_cache=False, backend=backend) as tracer:
        spread = net.output.logits.save()
    on.check(tracer)
    handmade = transformers.BatchEncoding({"input_ids": encoded["input_ids"],
                                           "attention_mask": encoded["attention_mask"]})
    with net.trace(handmade, use_cache=False, backend=backend) as tracer:
        positional = net.output.logits.save()
    on.check(tracer)
    with net.trace(backend=backend) as tracer:
        with tracer.invoke(**encoded, use_cache=False):
            invoked = net.output.logits.save()
    on.check(tracer)
    for logits in (spread, positional, invoked):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_plain_dict_of_forward_parameters_is_spread(gpt2):
    ids = _ids()
    inputs = {"input_ids": ids, "attention_mask": _mask(ids)}
    expected = gpt2(**inputs, use_cache=False).logits
    net = fxsight.NNsight(gpt2)
    out = net.trace(inputs, use_cache=False, trace=False)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


def test_a_dict_the_model_takes_is_passed_as_it_is():
    class TakesADict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, batch):
            return self.linear(batch["x"]) * batch["scale"]

    model = TakesADict()
    x = torch.randn(2, 3)
    net = fxsight.NNsight(model)
    for backend in BACKENDS:
        with net.trace({"x": x, "scale": 2.0}, backend=backend):
            out = net.output.save()
        torch.testing.assert_close(out, model({"x": x, "scale": 2.0}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_input_ids_token_type_ids_attention_mask(bert, backend, reference_hooks):
    ids = _ids()
    token_types = torch.zeros_like(ids)
    token_types[:, 4:] = 1
    inputs = dict(input_ids=ids, token_type_ids=token_types, attention_mask=_mask(ids))
    plain = bert(**inputs).last_hidden_state
    saved_ref = {}
    hooks = {"embeddings": _keep(saved_ref, "embeddings"),
             "encoder.layer.0.intermediate": _zero_last}
    with reference_hooks(bert, hooks=hooks):
        expected = bert(**inputs).last_hidden_state
    net = fxsight.NNsight(bert)
    on = _OnBackend(backend)
    with net.trace(backend=backend, **inputs) as tracer:
        embeddings = net.embeddings.output.save()
        net.encoder.layer[0].intermediate.output[:, -1] = 0
        hidden = net.output.last_hidden_state.save()
    on.check(tracer)
    torch.testing.assert_close(embeddings, saved_ref["embeddings"], rtol=0, atol=0)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden, plain)
    assert _untouched(bert)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_decoder_input_ids_and_decoder_input_ids(bart, backend, reference_hooks):
    ids = _ids()
    inputs = dict(input_ids=ids, attention_mask=_mask(ids), decoder_input_ids=_ids(2, 5, 1),
                  use_cache=False)
    plain = bart(**inputs).logits
    saved_ref = {}
    hooks = {"model.encoder": _keep(saved_ref, "encoder", lambda o: o.last_hidden_state),
             "model.decoder.layers.0.fc2": _zero_last}
    with reference_hooks(bart, hooks=hooks):
        expected = bart(**inputs).logits
    net = fxsight.NNsight(bart)
    on = _OnBackend(backend)
    with net.trace(backend=backend, **inputs) as tracer:
        encoded = net.model.encoder.output.last_hidden_state.save()
        net.model.decoder.layers[0].fc2.output[:, -1] = 0
        logits = net.output.logits.save()
    on.check(tracer)
    assert encoded.shape == (2, 7, 32) and logits.shape == (2, 5, 128)
    torch.testing.assert_close(encoded, saved_ref["encoder"], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_pixel_values(vit, backend, reference_hooks):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs = dict(pixel_values=pixels, output_hidden_states=True)  # (a non-tensor keyword)
    plain = vit(**inputs).last_hidden_state
    saved_ref = {}
    hooks = {"embeddings": _keep(saved_ref, "embeddings"), "layers.0.mlp.fc1": _zero_last}
    with reference_hooks(vit, hooks=hooks):
        expected = vit(**inputs)
    net = fxsight.NNsight(vit)
    on = _OnBackend(backend)
    with net.trace(**inputs, backend=backend) as tracer:
        embeddings = net.embeddings.output.save()
        net.layers[0].mlp.fc1.output[:, -1] = 0
        out = net.output.save()
    on.check(tracer)
    torch.testing.assert_close(embeddings, saved_ref["embeddings"], rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.last_hidden_state, plain)
    assert len(out.hidden_states) == len(expected.hidden_states) == 2
    for got, want in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- several invokes with keyword inputs ----------------------------------------------------
def _per_row_write(module, args, output):
    """Invoke #0 (row 0): last position zeroed; invoke #1 (row 1): first position + 1."""
    output = output.clone()
    output[0, -1] = 0
    output[1, 0] += 1
    return output


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_invokes_with_keywords_are_batched(gpt2, encoded, backend, reference_hooks):
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with reference_hooks(gpt2, hooks={"transformer.h.0.mlp": _per_row_write}):
        expected = gpt2(input_ids=ids, attention_mask=mask, use_cache=False).logits
    net = fxsight.NNsight(gpt2)
    on = _OnBackend(backend)
    with net.trace(use_cache=False, backend=backend) as tracer:
        with tracer.invoke(input_ids=ids[:1], attention_mask=mask[:1]):
            net.transformer.h[0].mlp.output[:, -1] = 0
            first = net.output.logits.save()
        with tracer.invoke({"input_ids": ids[1:], "attention_mask": mask[1:]}):
            net.transformer.h[0].mlp.output[:, 0] += 1
            second = net.output.logits.save()
        with tracer.invoke():
            both = net.output.logits.save()
    on.check(tracer)
    assert first.shape == second.shape == (1, 14, 128)
    torch.testing.assert_close(first, expected[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_invokes_bert_keywords_batched(bert, backend, reference_hooks):
    ids = _ids()
    token_types = torch.zeros_like(ids)
    token_types[1, 3:] = 1
    mask = _mask(ids)
    with reference_hooks(bert, hooks={"encoder.layer.0.intermediate": _per_row_write}):
        expected = bert(input_ids=ids, token_type_ids=token_types,
                        attention_mask=mask).last_hidden_state
    net = fxsight.NNsight(bert)
    on = _OnBackend(backend)
    with net.trace(backend=backend) as tracer:
        for row in range(2):
            with tracer.invoke(input_ids=ids[row:row + 1],
                               token_type_ids=token_types[row:row + 1],
                               attention_mask=mask[row:row + 1]):
                if row == 0:
                    net.encoder.layer[0].intermediate.output[:, -1] = 0
                else:
                    net.encoder.layer[0].intermediate.output[:, 0] += 1
        with tracer.invoke():
            hidden = net.output.last_hidden_state.save()
    on.check(tracer)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


# --- LanguageModel ----------------------------------------------------------------------------
def _alone(model, text, tokenizer):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return model(input_ids=ids, use_cache=False).logits[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_spread_batch_encoding(gpt2, tokenizer, encoded, backend):
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    on = _OnBackend(backend)
    with lm.trace(**encoded, backend=backend) as tracer:
        spread = lm.output.logits.save()
    on.check(tracer)
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(**tokenizer(TEXTS[:1], return_tensors="pt")):
            first = lm.output.logits.save()
        with tracer.invoke(input_ids=tokenizer(TEXTS[1:], return_tensors="pt")["input_ids"]):
            second = lm.output.logits.save()
    on.check(tracer)
    for text, row, invoked in ((TEXTS[0], 0, first[0]), (TEXTS[1], 1, second[0])):
        alone = _alone(gpt2, text, tokenizer)
        n = alone.shape[0]
        torch.testing.assert_close(spread[row, -n:], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(invoked[-n:], alone, rtol=1e-4, atol=1e-5)


def test_language_model_right_padded_keywords_keep_their_layout(bert, tokenizer):
    """Right-padded keyword inputs keep their layout in a trace (was: re-packed to the
    left, so the user's right-padded index read another token), token_type_ids with the
    ids: the values are the plain forward's on the same batch with positions from the mask,
    and each row's what it computes alone."""
    lm = fxsight.LanguageModel(bert, tokenizer=tokenizer)
    ids = _ids(2, 6)
    token_types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # row 1: 4 tokens
    with lm.trace(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                  backend="hooks"):
        hidden = lm.output.last_hidden_state.save()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                        position_ids=positions).last_hidden_state
    for row, n in ((0, 6), (1, 4)):
        alone = bert(input_ids=ids[row:row + 1, :n],
                     token_type_ids=token_types[row:row + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(hidden[row, :n], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hidden[row, :n], expected[row, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_right_padded_last_token_lookup(gpt2, backend):
    """The usual right-padding lookup ``logits[i, lengths[i] - 1]`` on a right-padded
    batch given to a trace reads each prompt's last token, as each prompt alone gives it,
    and ``.token[-1]`` the same (was: the rows were re-packed to the left, so the lookup
    read another position, silently)."""
    lm = fxsight.LanguageModel(gpt2)
    ids = _ids(3, 6, seed=7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    lengths = mask.sum(1)
    with lm.trace(input_ids=ids, attention_mask=mask, backend=backend):
        logits = lm.output.logits.save()
        last = lm.output.logits.token[-1].save()
    with lm.trace({"input_ids": ids, "attention_mask": mask}, backend=backend):
        from_dict = lm.output.logits.save()
    looked_up = logits[torch.arange(3), lengths - 1]
    with torch.no_grad():
        alone = torch.stack([gpt2(input_ids=ids[i:i + 1, :n]).logits[0, -1]
                             for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(looked_up, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_dict[torch.arange(3), lengths - 1], alone, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(last, alone, rtol=1e-4, atol=1e-5)
    # beside a longer invoke, the right-padded one gets left pads before its own layout
    longer = _ids(1, 8, seed=8)
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(input_ids=ids, attention_mask=mask):
            last = lm.output.logits.token[-1].save()
            first = lm.output.logits.token[0].save()
        with tracer.invoke(longer):
            other = lm.output.logits.save()
    with torch.no_grad():
        firsts = torch.stack([gpt2(input_ids=ids[i:i + 1, :1]).logits[0, 0] for i in range(3)])
        expected = gpt2(input_ids=longer).logits
    torch.testing.assert_close(last, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first, firsts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(other, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_token_keywords_beside_the_input_move_with_its_rows(gpt2, backend):
    """Token keywords given beside ids or a dict (``lm.trace(enc, position_ids=p)``,
    nnsight's ``lm.trace(ids, attention_mask=m)``) stay with the input's rows (was: a
    right-padded dict's rows were rolled to the left and the keywords' were not,
    so a row's positions were another token's, silently; a 2-D mask beside ids was
    refused as given twice)."""
    lm = fxsight.LanguageModel(gpt2)
    ids = _ids(2, 6, seed=3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # row 1: 3 tokens
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 6, 7, 0, 0, 0]])  # row 1 from 5
    with lm.trace({"input_ids": ids, "attention_mask": mask}, position_ids=positions,
                  backend=backend):
        logits = lm.output.logits.save()
    with lm.trace(ids, attention_mask=mask, position_ids=positions, backend=backend):
        beside_ids = lm.output.logits.save()
    with torch.no_grad():
        expected = gpt2(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, n in ((0, 6), (1, 3)):  # (a right-padded input keeps its layout in a trace)
        torch.testing.assert_close(logits[row, :n], expected[row, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(beside_ids[row, :n], expected[row, :n], rtol=1e-4,
                                   atol=1e-5)
    with _raises(gpt2, r"'attention_mask' is given twice"):
        with lm.trace({"input_ids": ids, "attention_mask": mask}, attention_mask=mask):
            pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_encoder_decoder_keeps_its_decoder_tokens(backend):
    """An encoder-decoder's decoder inputs (``decoder_input_ids``, ``labels``) as long as
    its input are the decoder's tokens: a right-padded input's rows are re-packed, the
    decoder's are not (was: they were rolled with the input's rows, silently: logits off
    by 0.6, another loss). T5: its relative positions make re-packing exact."""
    t5 = _seeded(lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0)))
    lm = fxsight.LanguageModel(t5, automodel=type(t5))
    ids = _ids(2, 6, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # row 1 right-padded
    decoder_ids, labels = _ids(2, 6, seed=5), _ids(2, 6, seed=6)
    labels[1, -2:] = -100
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    with torch.no_grad():
        expected = t5(**inputs, labels=labels, use_cache=False)
    with torch.no_grad(), lm.trace(dict(inputs, labels=labels), use_cache=False,
                                   backend=backend) as tracer:
        logits = lm.output.logits.save()
        loss = lm.output.loss.save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_encoder_decoder_keeps_a_right_padded_input(bart, backend):
    """An encoder-decoder's right-padded input stays as it is: BART's encoder places tokens
    by index (learned positions, no position_ids), so rows re-packed to the left would
    compute others (was: logits off by 1e-3, silently). ``.token`` counts each row's
    real tokens wherever its padding is."""
    lm = fxsight.LanguageModel(bart, automodel=type(bart))
    ids = _ids(2, 6, seed=7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # row 1: 3 tokens
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=_ids(2, 4, seed=8))
    with torch.no_grad():
        expected = bart(**inputs, use_cache=False)
    with torch.no_grad(), lm.trace(inputs, use_cache=False, backend=backend) as tracer:
        logits = lm.output.logits.save()
        encoded = lm.model.encoder.output.last_hidden_state
        first, last = encoded.token[0].save(), encoded.token[-1].save()
        firsts = encoded.token[:2].save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    states = expected.encoder_last_hidden_state
    torch.testing.assert_close(first, states[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(firsts, states[:, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, states[[0, 1], [5, 2]], rtol=1e-5, atol=1e-5)


def test_language_model_generate_scan_and_plain_run_take_keywords(gpt2, tokenizer, encoded):
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.generate(TEXTS, max_new_tokens=2, do_sample=False, backend="hooks"):
        by_text = lm.generator.output.save()
    with lm.generate(**encoded, max_new_tokens=2, do_sample=False, backend="hooks"):
        by_keywords = lm.generator.output.save()
    assert torch.equal(by_text, by_keywords)
    with lm.scan(**encoded):
        shape = lm.transformer.h[0].mlp.output.shape
    assert tuple(shape) == (2, 14, 64)
    net = fxsight.NNsight(gpt2)
    with net.scan(**encoded, use_cache=False):
        shape = net.transformer.h[0].mlp.output.shape
    assert tuple(shape) == (2, 14, 64)
    plain = net.trace(**encoded, use_cache=False, trace=False)
    torch.testing.assert_close(plain.logits, gpt2(**encoded, use_cache=False).logits,
                               rtol=0, atol=0)



@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_generate_takes_a_mask_beside_the_ids(gpt2, tokenizer, encoded,
                                                              backend):
    """nnsight's ``lm.generate(ids, attention_mask=mask, ...)``: the mask is the ids' (was:
    a TypeError from transformers' generate, given the mask twice); a right-padded one is
    re-packed to the left with its ids."""
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad():
        expected = gpt2.generate(**encoded, max_new_tokens=2, do_sample=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with lm.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                     backend=backend):
        given = lm.generator.output.save()
    assert torch.equal(given, expected)
    shifts = [int(n) for n in (mask == 0).sum(-1)]  # the same rows, right-padded
    right_ids = torch.stack([row.roll(-n) for row, n in zip(ids, shifts)])
    right_mask = torch.stack([row.roll(-n) for row, n in zip(mask, shifts)])
    with lm.generate(right_ids, attention_mask=right_mask, max_new_tokens=2, do_sample=False,
                     backend=backend):
        repacked = lm.generator.output.save()
    assert torch.equal(repacked, expected)

# --- non-tensor keywords ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_keywords_pass_through_invokes(vit, backend, reference_hooks):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with reference_hooks(vit, hooks={"layers.0.mlp.fc1": _per_row_write}):
        expected = vit(pixel_values=pixels, output_hidden_states=True)
    net = fxsight.NNsight(vit)
    on = _OnBackend(backend)
    with net.trace(backend=backend) as tracer:
        with tracer.invoke(pixel_values=pixels[:1], output_hidden_states=True):
            net.layers[0].mlp.fc1.output[:, -1] = 0
        with tracer.invoke(pixel_values=pixels[1:], output_hidden_states=True):
            net.layers[0].mlp.fc1.output[:, 0] += 1
        with tracer.invoke():
            out = net.output.save()
    on.check(tracer)
    assert len(out.hidden_states) == len(expected.hidden_states) == 2
    for got, want in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state,
                               rtol=1e-5, atol=1e-5)


# --- bad input: a clear error before anything runs -------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x, mask=None):
        return self.linear(x) if mask is None else self.linear(x) * mask


def _raises(model, match):
    """``pytest.raises(TraceError)`` that also checks the message names this file's line
    and that the model was left untouched."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(TraceError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert "test_keyword_inputs.py" in str(self.info.value)
            assert _untouched(model)
            assert not active_tracers()
            return handled
    return Check()


def test_unknown_keyword_names_keyword_class_and_close_matches():
    model = _Net()
    net = fxsight.NNsight(model)
    with _raises(model, r"'maks' is not a parameter of _Net\.forward; did you mean 'mask'"):
        with net.trace(x=torch.ones(2, 3), maks=torch.ones(2, 3)):
            net.output.save()
    with _raises(model, r"'weights' is not a parameter of _Net\.forward; it takes mask, x"):
        with net.trace(torch.ones(2, 3), weights=torch.ones(2, 3)):
            net.output.save()
    with _raises(model, r"'validate' is not a parameter.*nnsight's validate= option"):
        with net.trace(torch.ones(2, 3), validate=False):  # (nnsight before 0.5)
            net.output.save()


def test_misspelled_keyword_into_var_kwargs_is_refused(gpt2, tokenizer):
    ids = _ids()
    net = fxsight.NNsight(gpt2)
    match = r"'attention_maks' is not a parameter of GPT2LMHeadModel\.forward.*'attention_mask'"
    with _raises(gpt2, match):
        with net.trace(input_ids=ids, attention_maks=_mask(ids)):
            net.output.save()
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    with _raises(gpt2, match):
        with lm.trace(input_ids=ids, attention_maks=_mask(ids)):
            lm.output.save()
    with _raises(gpt2, match):
        with lm.trace() as tracer:
            with tracer.invoke({"input_ids": ids, "attention_maks": _mask(ids)}):
                lm.output.save()


def test_invoke_without_input(gpt2, tokenizer):
    net = fxsight.NNsight(gpt2)
    with _raises(gpt2, r"invoke #0 has no input: its inputs \(use_cache\) hold no tensor"):
        with net.trace() as tracer:
            with tracer.invoke(use_cache=False):
                net.output.save()
    with _raises(gpt2, r"the trace of GPT2LMHeadModel has no input"):
        with net.trace(use_cache=False):
            net.output.save()
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    with _raises(gpt2, r"invoke #0 has no input: no input_ids among its keywords \(use_cache\)"):
        with lm.trace() as tracer:
            with tracer.invoke(use_cache=False):
                lm.output.save()


def test_batch_sizes_disagree_within_an_invoke(gpt2, tokenizer):
    ids = _ids()
    net = fxsight.NNsight(gpt2)
    match = r"disagree on the batch size \(input_ids has 2, attention_mask has 3 rows\)"
    with _raises(gpt2, match):
        with net.trace(input_ids=ids, attention_mask=torch.ones(3, 7)):
            net.output.save()
    lm = fxsight.LanguageModel(gpt2, tokenizer=tokenizer)
    with _raises(gpt2, r"token_type_ids has 3 rows"):
        with lm.trace(input_ids=ids, token_type_ids=torch.zeros(3, 7, dtype=torch.long)):
            lm.output.save()


def test_invokes_disagree(gpt2):
    ids, mask = _ids(), _mask(_ids())
    net = fxsight.NNsight(gpt2)
    with _raises(gpt2, r"invokes #0 and #1 disagree on 'use_cache' \(False vs True\)"):
        with net.trace() as tracer:
            with tracer.invoke(input_ids=ids, use_cache=False):
                pass
            with tracer.invoke(input_ids=ids, use_cache=True):
                pass
    with _raises(gpt2, r"invoke #1 passes other keyword inputs than invoke #0 \(it lacks "
                       r"attention_mask\)"):
        with net.trace(use_cache=False) as tracer:
            with tracer.invoke(input_ids=ids, attention_mask=mask):
                pass
            with tracer.invoke(input_ids=ids):
                pass
    with _raises(gpt2, r"give 'input_ids' of shapes \(2, 7\) and \(1, 5\)"):
        with net.trace(use_cache=False) as tracer:
            with tracer.invoke(input_ids=ids):
                pass
            with tracer.invoke(input_ids=ids[:1, :5]):
                pass


def test_input_given_twice_and_unbindable(gpt2):
    ids = _ids()
    net = fxsight.NNsight(gpt2)
    with _raises(gpt2, r"'input_ids' is given twice"):
        with net.trace({"input_ids": ids}, input_ids=ids):
            pass
    with _raises(gpt2, r"GPT2LMHeadModel\.forward cannot take these inputs: multiple values "
                       r"for argument 'input_ids'"):
        with net.trace(ids, input_ids=ids):
            pass
