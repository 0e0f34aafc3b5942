"""Encoder-decoders (BART, T5) in a ``LanguageModel`` with prompts of different lengths:
each prompt's values equal the prompt run alone through plain transformers. BART's encoder
places tokens by index (learned positions, no ``position_ids``), so its input is padded
on the right, where padding moves no real token; T5 (relative positions) is the control."""

from __future__ import annotations

import pytest
import torch
from transformers import (BartConfig, BartForConditionalGeneration, T5Config,
                          T5ForConditionalGeneration)

from fxsight import LanguageModel, TraceError

_A, _B = [5, 6, 7, 8, 9, 10], [12, 13, 14]  # 6 and 3 tokens
_DECODER = [[2, 5, 7]]
_GENERATE = dict(max_new_tokens=4, do_sample=False, decoder_start_token_id=2)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval()
        with torch.no_grad():  # (larger weights: positions and greedy tokens matter)
            for parameter in model.parameters():
                parameter.normal_(0, 0.3)
    return model


def _model(name: str):
    if name == "bart":
        return _seeded(lambda: BartForConditionalGeneration(BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)))
    return _seeded(lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=2)))


def _encoder(model):
    return model.model.encoder if isinstance(model, BartForConditionalGeneration) \
        else model.encoder


def _written(model):
    """The module whose output the tests write (its encoder's last normalization)."""
    encoder = _encoder(model)
    return encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else \
        encoder.layernorm_embedding


def _envoy(lm, model, module):
    path = next(name for name, m in model.named_modules() if m is module)
    envoy = lm
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def _alone(model, ids, write: bool = False):
    """(logits, encoder hidden states) of the prompt run alone, the last token of the
    written module's output zeroed where ``write``."""
    def zero_last(module, args, output):
        output = output.clone()
        output[:, -1] = 0
        return output
    handle = _written(model).register_forward_hook(zero_last) if write else None
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), decoder_input_ids=torch.tensor(_DECODER),
                        use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return out.logits, out.encoder_last_hidden_state


@pytest.mark.parametrize("order", ["long_first", "short_first"])
@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_invokes_of_different_lengths_equal_each_prompt_alone(name, backend, order):
    """Each invoke's logits, encoder hidden states (``.token`` reads included) and a write
    at its last token equal its prompt alone (was BART: the shorter invoke, left-padded,
    had its tokens at other learned positions: logits off, silently)."""
    model = _model(name)
    lm = LanguageModel(model)
    prompts = [_A, _B] if order == "long_first" else [_B, _A]
    encoder = _envoy(lm, model, _encoder(model))
    written = _envoy(lm, model, _written(model))
    saved = []
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        for ids in prompts:
            with tracer.invoke(ids, decoder_input_ids=torch.tensor(_DECODER)):
                states = encoder.output.last_hidden_state
                saved.append((lm.output.logits.save(), states.token[:].save(),
                              states.token[-1].save(), states.token[0:2].save()))
        with tracer.invoke():  # (the whole batch: each row's last token)
            lasts = encoder.output.last_hidden_state.token[-1].save()
    assert tracer.backend == backend
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(lasts[row], _alone(model, ids)[1][0, -1], rtol=1e-5,
                                   atol=1e-5)
    for ids, (logits, states, last, first_two) in zip(prompts, saved):
        ref_logits, ref_states = _alone(model, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, ref_states[:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first_two, ref_states[:, :2], rtol=1e-5, atol=1e-5)
    # a write at each invoke's last token (.token[-1]) of the encoder's last norm
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        logits = []
        for ids in prompts:
            with tracer.invoke(ids, decoder_input_ids=torch.tensor(_DECODER)):
                written.output.token[-1] = torch.zeros(32)
                logits.append(lm.output.logits.save())
    for ids, value in zip(prompts, logits):
        torch.testing.assert_close(value, _alone(model, ids, write=True)[0], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_a_list_of_prompts_of_different_lengths_equals_each_alone(name):
    """One invoke of prompts of different lengths: each row's logits are the prompt's
    alone (was BART: the shorter row left-padded, its positions moved)."""
    model = _model(name)
    lm = LanguageModel(model)
    with torch.no_grad(), lm.trace([_A, _B], decoder_input_ids=torch.tensor(_DECODER * 2),
                                   use_cache=False, backend="hooks"):
        logits = lm.output.logits.save()
    for row, ids in enumerate((_A, _B)):
        torch.testing.assert_close(logits[row:row + 1], _alone(model, ids)[0], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_generate_of_invokes_of_different_lengths_equals_each_prompt_alone(name):
    """``lm.generate`` with two invokes of different lengths: each invoke's tokens are
    transformers' generate of its prompt alone (an encoder-decoder's generate runs on
    hooks)."""
    model = _model(name)
    lm = LanguageModel(model)
    with torch.no_grad():
        alone = [model.generate(torch.tensor([ids]), **_GENERATE)[0] for ids in (_A, _B)]
    with torch.no_grad(), lm.generate(**_GENERATE) as tracer:
        with tracer.invoke(_B):
            short = lm.generator.output.save()
        with tracer.invoke(_A):
            long = lm.generator.output.save()
    assert torch.equal(long[0], alone[0]) and torch.equal(short[0], alone[1])


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_token_of_a_decoder_value_counts_from_the_end(backend):
    """The decoder's ids are not padded: ``logits.token[-1]`` is the decoder's last token
    in every invoke, where the decoder is longer than the encoder's input too (was, with
    the encoder's input counted from its start: the encoder's last position, silently)."""
    model = _model("bart")
    lm = LanguageModel(model)
    decoder = torch.tensor([[2, 5, 7, 9, 11, 13, 15, 17]])  # longer than both prompts
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        lasts = []
        for ids in (_B, _A):
            with tracer.invoke(ids, decoder_input_ids=decoder):
                lasts.append(lm.output.logits.token[-1].save())
    for ids, last in zip((_B, _A), lasts):
        with torch.no_grad():
            expected = model(torch.tensor([ids]), decoder_input_ids=decoder).logits[:, -1]
        torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_token_of_a_decoder_value_counts_the_decoders_own_tokens(backend):
    """``.token`` on a decoder value counts the decoder's tokens: those given to each
    invoke are not padded, so ``.token[i]`` is position ``i`` of every row, whatever the
    input's padding (was: counted with the encoder input's padding, so position 0 was
    another token, and a decoder as long as the padded input read past its end); those
    made from the input shifted are right-padded as it is. Checked against each prompt
    alone through plain transformers."""
    model = _model("bart")
    lm = LanguageModel(model)
    for decoder in ([[2, 5, 7, 9, 11, 13, 15, 17]], [[2, 5, 7, 9, 11, 13]], [[2, 5]]):
        given = torch.tensor(decoder)
        n = given.shape[1]
        with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
            saved = []
            for ids in (_B, _A):
                with tracer.invoke(ids, decoder_input_ids=given):
                    logits = lm.output.logits
                    saved.append((logits.token[0].save(), logits.token[-1].save(),
                                  logits.token[n - 1].save(), logits.token[:].save()))
        for ids, (first, last, again, whole) in zip((_B, _A), saved):
            with torch.no_grad():
                expected = model(torch.tensor([ids]), decoder_input_ids=given).logits
            for got, want in ((first, expected[:, 0]), (last, expected[:, -1]),
                              (again, expected[:, -1]), (whole, expected)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        shifted = []
        for ids in (_B, _A):
            with tracer.invoke(ids):
                logits = lm.output.logits
                shifted.append((logits.token[-1].save(), logits.token[0].save()))
    for ids, (last, first) in zip((_B, _A), shifted):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits
        torch.testing.assert_close(last, expected[:, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, expected[:, 0], rtol=1e-5, atol=1e-5)


def _right_padded_batch(model):
    """``(input_ids, attention_mask)`` of ``_A`` and ``_B`` right-padded to one width."""
    pad = model.config.pad_token_id
    ids = torch.tensor([_A, _B + [pad] * (len(_A) - len(_B))])
    mask = torch.tensor([[1] * len(_A), [1] * len(_B) + [0] * (len(_A) - len(_B))])
    return ids, mask


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_cache_passed_in_holds_the_decoders_tokens(name, backend):
    """A cache passed in (``past_key_values=``, from a forward of the decoder's first
    tokens) continues the decoder: the input's mask stays the encoder's, right-padded or
    not, with the encoder's outputs given too and in invokes of different lengths; each
    row's logits are the plain forward's of the whole decoder on the same batch and its
    prompt's alone (was: the mask got the cache's decoder tokens as columns before the
    encoder's input: the fx capture failed, a padded batch was refused as unknown)."""
    model = _model(name)
    lm = LanguageModel(model)
    decoder, following = torch.tensor(_DECODER * 2), torch.tensor([[3], [4]])
    whole = torch.cat([decoder, following], 1)
    for ids, mask in (_right_padded_batch(model), (torch.tensor([_A, _A[::-1]]), None)):
        inputs = {"input_ids": ids} if mask is None else {"input_ids": ids,
                                                          "attention_mask": mask}

        def cache():
            with torch.no_grad():
                return model(**inputs, decoder_input_ids=decoder,
                             use_cache=True).past_key_values
        with torch.no_grad():
            expected = model(**inputs, decoder_input_ids=whole).logits[:, -1:]
            encoded = model.get_encoder()(**inputs)
        for extra in ({}, {"encoder_outputs": encoded}):
            with torch.no_grad(), lm.trace(**inputs, decoder_input_ids=following,
                                           past_key_values=cache(), backend=backend,
                                           **extra):
                logits = lm.output.logits.save()
                last = lm.output.logits.token[-1].save()
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last, expected[:, -1], rtol=1e-5, atol=1e-5)
    ids, mask = _right_padded_batch(model)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                      use_cache=True).past_key_values
    with torch.no_grad(), lm.trace(past_key_values=cache, backend=backend) as tracer:
        saved = []
        for row, prompt in enumerate((_A, _B)):
            with tracer.invoke(prompt, decoder_input_ids=following[row:row + 1]):
                saved.append(lm.output.logits.save())
    for row, prompt in enumerate((_A, _B)):
        with torch.no_grad():
            alone = model(torch.tensor([prompt]), decoder_input_ids=whole[row:row + 1]).logits
        torch.testing.assert_close(saved[row], alone[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_encoder_outputs_given_beside_a_right_padded_input(name, backend):
    """The encoder's outputs given (``encoder_outputs=``) beside a right-padded input and
    its mask: the logits (and ``.token[-1]``) are the plain forward's on the same batch,
    each row its prompt's alone (was: refused, the given encoder states taken for ones
    the model computes without the mask)."""
    model = _model(name)
    lm = LanguageModel(model)
    ids, mask = _right_padded_batch(model)
    decoder = torch.tensor(_DECODER * 2)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        plain = model(attention_mask=mask, encoder_outputs=encoded,
                      decoder_input_ids=decoder).logits
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, encoder_outputs=encoded,
                                   decoder_input_ids=decoder, backend=backend):
        logits, last = lm.output.logits.save(), lm.output.logits.token[-1].save()
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, plain[:, -1], rtol=1e-5, atol=1e-5)
    for row, prompt in enumerate((_A, _B)):
        torch.testing.assert_close(logits[row:row + 1], _alone(model, prompt)[0], rtol=1e-5,
                                   atol=1e-5)


def _decoder_block(model):
    """The decoder's last layer (its output is written by the tests)."""
    decoder = model.model.decoder if isinstance(model, BartForConditionalGeneration) \
        else model.decoder
    return (decoder.layers if hasattr(decoder, "layers") else decoder.block)[-1]


@pytest.mark.parametrize("name", ["bart", "t5"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_invokes_of_other_decoder_lengths_are_right_padded(name, backend):
    """Invokes whose decoder tokens differ in length (``decoder_input_ids``, ``labels``)
    are right-padded with a ``decoder_attention_mask`` (was: a TraceError before running):
    each invoke's logits at its decoder tokens, ``.token[-1]`` (of an invoke and of the
    whole batch) and a ``.token[-1]`` write of the decoder's last layer are its prompt
    alone; the logits are the plain forward of the batch so padded; the loss over labels
    is that of each prompt's own pairs."""
    model = _model(name)
    lm = LanguageModel(model)
    decoders = [[2, 5, 7, 9], [2, 11]]
    block = _envoy(lm, model, _decoder_block(model))

    def alone(prompt, decoder, write=False, **extra):
        def zero_last(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] = 0
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handle = _decoder_block(model).register_forward_hook(zero_last) if write else None
        try:
            with torch.no_grad():
                return model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder]),
                             use_cache=False, **extra).logits[0]
        finally:
            if handle is not None:
                handle.remove()
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        saved = []
        for prompt, decoder in zip((_A, _B), decoders):
            with tracer.invoke(prompt, decoder_input_ids=torch.tensor([decoder])):
                saved.append((lm.output.logits.save(), lm.output.logits.token[-1].save()))
        with tracer.invoke():
            lasts = lm.output.logits.token[-1].save()
            whole = lm.output.logits.save()
    pad = model.config.pad_token_id
    with torch.no_grad():
        plain = model(torch.tensor([_A, _B + [pad] * 3]),
                      attention_mask=torch.tensor([[1] * 6, [1] * 3 + [0] * 3]),
                      decoder_input_ids=torch.tensor([decoders[0], decoders[1] + [pad] * 2]),
                      decoder_attention_mask=torch.tensor([[1] * 4, [1, 1, 0, 0]]),
                      use_cache=False).logits
    torch.testing.assert_close(whole, plain, rtol=1e-5, atol=1e-5)
    for row, (prompt, decoder) in enumerate(zip((_A, _B), decoders)):
        expected, n = alone(prompt, decoder), len(decoder)
        logits, last = saved[row]
        torch.testing.assert_close(logits[0, :n], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[0], expected[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lasts[row], expected[-1], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        written = []
        for prompt, decoder in zip((_A, _B), decoders):
            with tracer.invoke(prompt, decoder_input_ids=torch.tensor([decoder])):
                hidden = block.output if name == "bart" else block.output[0]  # (T5: a tuple)
                hidden.token[-1] = 0
                written.append(lm.output.logits.save())
    for row, (prompt, decoder) in enumerate(zip((_A, _B), decoders)):
        torch.testing.assert_close(written[row][0, :len(decoder)],
                                   alone(prompt, decoder, write=True), rtol=1e-5, atol=1e-5)
    labels = [[5, 7, 9, 2], [11, 2]]
    with torch.no_grad(), lm.trace(backend=backend, use_cache=False) as tracer:
        for prompt, label in zip((_A, _B), labels):
            with tracer.invoke(prompt, labels=torch.tensor([label])):
                pass
    with torch.no_grad():
        pairs = [(model(torch.tensor([p]), labels=torch.tensor([label]),
                        use_cache=False).logits[0], torch.tensor(label))
                 for p, label in zip((_A, _B), labels)]
    expected = torch.nn.functional.cross_entropy(torch.cat([p[0] for p in pairs]),
                                                 torch.cat([p[1] for p in pairs]))
    torch.testing.assert_close(tracer.result.loss, expected, rtol=1e-5, atol=1e-5)


def test_other_decoder_lengths_in_generate_and_encoder_outputs_are_refused():
    """Invokes whose encoder outputs differ in length, or whose decoder tokens do in
    ``lm.generate`` (its new tokens go after the last column: not padded), are refused
    before the run, naming the keyword and the line; the message shows shapes, not the
    tensors' values."""
    model = _model("bart")
    lm = LanguageModel(model)
    with torch.no_grad():
        encoded = [model.get_encoder()(input_ids=torch.tensor([p])) for p in (_A, _B)]
    with pytest.raises(TraceError, match="disagree on 'encoder_outputs'") as info:
        with lm.trace() as tracer:
            with tracer.invoke(_A, encoder_outputs=encoded[0]):
                pass
            with tracer.invoke(_B, encoder_outputs=encoded[1]):  # the line
                lm.output.save()
    assert "# the line" in str(info.value) and "tensor(" not in str(info.value)
    with pytest.raises(TraceError, match="disagree on 'decoder_input_ids'") as info:
        with lm.generate(**_GENERATE) as tracer:
            with tracer.invoke(_A, decoder_input_ids=torch.tensor([[2, 5, 7]])):
                pass
            with tracer.invoke(_B, decoder_input_ids=torch.tensor([[2, 5]])):  # the line
                pass
    assert "# the line" in str(info.value) and "lm.generate" in str(info.value)
