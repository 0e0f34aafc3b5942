"""The whole model's values inside generate (its output, its inputs, a whole-model cache)
and generate's own output per invoke, against transformers' generate with plain hooks."""

import warnings

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from hook_references import hooked_generate
from models import tiny_gpt2

PROMPTS = ["The Eiffel Tower is in", "Hello there"]
SAME_LENGTH = ["Hello there", "Jello there"]  # (as many tokens: no padding)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(vocab_size=len(tokenizer))


def _generate_with_hook(model, tokenizer, prompts, hook, pre=False, **options):
    """transformers' generate with a plain forward hook (or pre-hook with keywords) on
    the whole model."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    hooks = {"pre_hooks" if pre else "hooks": {"": hook}}  # ("": the model itself)
    return hooked_generate(model, **encoded, **{"do_sample": False, **options}, **hooks)


def _same_cache(a, b):
    return type(a) is type(b) and len(a.layers) == len(b.layers) and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(a.layers, b.layers))


def _same_value(a, b):
    """Equal tensors, caches of equal tensors, in equal structures."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if type(a).__name__ == "DynamicCache":
        return _same_cache(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and \
            all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_value, a, b))
    return a == b


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_models_output_at_every_step_runs_on_fx_as_a_plain_hook_sees_it(
        model, tokenizer, use_cache):
    """lm.output (its logits, and the cache object it holds) under the default backend
    runs on the fx graph (it fell back to hooks: the cache object was made inside the
    step's graph), as a plain hook on the model sees it: each step's logits, and the
    cache object generate holds (after generation: the whole generation's)."""
    seen = []
    expected = _generate_with_hook(model, tokenizer, PROMPTS,
                                   lambda m, a, output: seen.append(output),
                                   max_new_tokens=3, use_cache=use_cache)
    lm = LanguageModel(model, tokenizer=tokenizer)
    for backend in ("auto", "hooks"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (no fallback)
            with lm.generate(PROMPTS, max_new_tokens=3, backend=backend,
                             use_cache=use_cache) as tracer:
                with tracer.all():
                    logits = lm.output.logits.save()
                first = lm.output.save()
                tokens = tracer.result.save()
        assert tracer.backend == ("hooks" if backend == "hooks" else "fx")
        assert torch.equal(tokens, expected)
        assert len(logits) == len(seen) == 3
        for mine, theirs in zip(logits, seen):
            assert torch.equal(mine, theirs.logits)
        assert type(first) is type(seen[0]) and torch.equal(first.logits, seen[0].logits)
        cache = first.past_key_values
        if use_cache:
            assert cache.get_seq_length() == expected.shape[1] - 1
            assert _same_cache(cache, seen[0].past_key_values)
        else:
            assert cache is None


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_model_output_replaced_at_a_step_steers_generation_on_fx(model, tokenizer,
                                                                   use_cache):
    """lm.output.logits replaced at step 1 (a new tensor, not an in-place change) is what
    generate picks from, on fx as on hooks and as a plain hook returning a changed
    output (on fx the written logits were saved but generate got the model's own)."""
    favoured = torch.zeros(len(tokenizer))
    favoured[7] = 1000.0
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            output.logits = output.logits + favoured
        return output

    expected = _generate_with_hook(model, tokenizer, PROMPTS, hook, max_new_tokens=3,
                                   use_cache=use_cache)
    lm = LanguageModel(model, tokenizer=tokenizer)
    for backend in ("fx", "hooks"):
        with lm.generate(PROMPTS, max_new_tokens=3, backend=backend,
                         use_cache=use_cache) as tracer:
            with tracer.iter[1]:
                lm.output.logits = lm.output.logits + favoured
            tokens = tracer.result.save()
        assert tracer.backend == backend
        assert torch.equal(tokens, expected)
        assert (tokens[:, -2] == 7).all()


def test_a_whole_model_cache_runs_on_fx_as_on_hooks(model, tokenizer):
    """tracer.cache() of the whole model runs on fx under the default backend: every
    module's output at every step, as on hooks (the root's is the model's output as a
    plain hook sees it)."""
    seen = []
    expected = _generate_with_hook(model, tokenizer, PROMPTS,
                                   lambda m, a, output: seen.append(output),
                                   max_new_tokens=3)
    lm = LanguageModel(model, tokenizer=tokenizer)
    caches = {}
    for backend in ("auto", "hooks"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with lm.generate(PROMPTS, max_new_tokens=3, backend=backend) as tracer:
                caches[backend] = tracer.cache()
                tokens = tracer.result.save()
        assert tracer.backend == ("hooks" if backend == "hooks" else "fx")
        assert torch.equal(tokens, expected)
    fx, hooks = caches["auto"], caches["hooks"]
    assert list(fx.keys()) == list(hooks.keys())
    for path in hooks.keys():
        assert len(fx[path]) == len(hooks[path]) == 3, path
        for mine, theirs in zip(fx[path], hooks[path]):
            assert _same_value(mine.output, theirs.output), path
    for entry, output in zip(fx["model"], seen):
        assert torch.equal(entry.output.logits, output.logits)


def test_the_models_inputs_run_on_hooks_as_generate_passes_them(model, tokenizer):
    """lm.inputs at a decoding step are generate's keywords to the model (its order,
    return_dict, its cache object): the fx decoding step calls the model with keywords of
    its own, so the default backend runs it on hooks, naming why; backend="fx" refuses
    (it ran on fx and saved the step graph's keywords)."""
    seen = []
    expected = _generate_with_hook(model, tokenizer, PROMPTS,
                                   lambda m, args, kwargs: seen.append((args, dict(kwargs))),
                                   pre=True, max_new_tokens=3)
    lm = LanguageModel(model, tokenizer=tokenizer)
    with pytest.warns(RuntimeWarning, match=r"hooks backend: the model's inputs"):
        with lm.generate(PROMPTS, max_new_tokens=3) as tracer:
            with tracer.all():
                inputs = lm.inputs.save()
            tokens = tracer.result.save()
    assert tracer.backend == "hooks" and torch.equal(tokens, expected)
    assert len(inputs) == len(seen) == 3
    for (args, kwargs), (want_args, want_kwargs) in zip(inputs, seen):
        assert args == want_args and list(kwargs) == list(want_kwargs)
        for name, value in kwargs.items():
            want = want_kwargs[name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, want), name
            elif name in ("cache", "past_key_values"):
                assert _same_cache(value, want)
            else:
                assert value == want, name
    with pytest.raises(fxsight.TraceError, match="the model's inputs"):
        with lm.generate(PROMPTS, max_new_tokens=3, backend="fx"):
            lm.inputs.save()


@pytest.mark.parametrize("beams", [2, 1])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_invokes_generate_output_is_its_prompts_alone(model, tokenizer, backend, beams):
    """With return_dict_in_generate (a beam search or not), an invoke's tracer.result is
    what transformers' generate gives for its prompt alone: its sequences, scores,
    beam_indices counted from its own first beam (they were the whole batch's numbers:
    2 and 3 for the second prompt's beams, 0 and 1 alone), and a cache of its rows (it
    was the whole batch's cache object)."""
    options = dict(max_new_tokens=3, num_beams=beams, do_sample=False,
                   return_dict_in_generate=True, output_scores=True)
    alone = [model.generate(**tokenizer([prompt], return_tensors="pt"), **options)
             for prompt in SAME_LENGTH]
    together = model.generate(**tokenizer(SAME_LENGTH, return_tensors="pt"), **options)
    if beams > 1:
        assert together.beam_indices[1].max() >= 2  # (the batch's numbering)
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.generate(backend=backend, **options) as tracer:
        results = []
        for prompt in SAME_LENGTH:
            with tracer.invoke(prompt):
                results.append(tracer.result.save())
        whole = tracer.result.save()
    assert tracer.backend == backend
    for mine, theirs in zip(results, alone):
        assert type(mine) is type(theirs) and list(mine.keys()) == list(theirs.keys())
        assert torch.equal(mine.sequences, theirs.sequences)
        if beams > 1:
            assert torch.equal(mine.beam_indices, theirs.beam_indices)
            torch.testing.assert_close(mine.sequences_scores, theirs.sequences_scores)
        for a, b in zip(mine.scores, theirs.scores):
            torch.testing.assert_close(a, b)
        for a, b in zip(mine.cache.layers, theirs.cache.layers):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
    if beams > 1:  # (the whole: unchanged)
        assert torch.equal(whole.beam_indices, together.beam_indices)
    assert whole.cache.layers[0].keys.shape[0] == together.cache.layers[0].keys.shape[0]


def _tiny_encoder_decoder(kind, tokenizer):
    from transformers import (BartConfig, BartForConditionalGeneration, T5Config,
                              T5ForConditionalGeneration)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "t5":
            config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                              num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2,
                              decoder_start_token_id=0)
            return T5ForConditionalGeneration(config).eval(), "decoder.block"
        config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2,
                            decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                            forced_eos_token_id=None)
        return BartForConditionalGeneration(config).eval(), "model.decoder.layers"


def _envoy(lm, path):
    for part in path.split("."):
        lm = getattr(lm, part)
    return lm


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_an_encoder_decoders_decoder_shapes_are_step_0s_or_refused_later(
        tokenizer, kind, use_cache):
    """A shape read of a decoder value in an encoder-decoder generate is of decoding
    step 0 (the decoder's start token: the read crashed in transformers, the scan gave
    the decoder no ids); read for later steps, where the decoder's token dimension (its
    keys' with a cache) grows from it, it is refused at its line."""
    model, blocks = _tiny_encoder_decoder(kind, tokenizer)
    seen = []
    handle = model.get_submodule(blocks)[1].register_forward_hook(
        lambda m, a, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        # (an encoder-decoder's prompts are right-padded: BART's positions are by index)
        expected = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True,
                                              padding_side="right"),
                                  max_new_tokens=3, do_sample=False, use_cache=use_cache)
    finally:
        handle.remove()
    lm = LanguageModel(model, tokenizer=tokenizer)
    options = dict(max_new_tokens=3, use_cache=use_cache, backend="hooks")
    with lm.generate(PROMPTS, **options) as tracer:
        hidden = _envoy(lm, blocks)[1].output
        hidden = hidden[0] if kind == "t5" else hidden
        length = hidden.shape[1]
        last = hidden[:, length - 1].save()
        tokens = tracer.result.save()
    assert length == 1 and torch.equal(tokens, expected)
    assert torch.equal(last, seen[0][:, -1])
    with pytest.raises(fxsight.TraceError, match="token dimension") as error:
        with lm.generate(PROMPTS, **options) as tracer:
            with tracer.all():
                hidden = _envoy(lm, blocks)[1].output
                hidden = hidden[0] if kind == "t5" else hidden
                hidden[:, hidden.shape[1] - 1].save()  # the refused line
    assert "the refused line" in str(error.value)


def test_a_cache_given_to_generate_keeps_its_own_attributes_on_fx(model, tokenizer):
    """The decoding steps' cache state is written into the cache object generate holds:
    its layers take the step's state, its own attributes (what generate set on it, one
    of the caller's) stay, as after a plain generate."""
    from transformers import DynamicCache

    from fxsight.generate.steps import CACHE

    theirs = DynamicCache(config=model.config)
    theirs.note = "the caller's"
    expected = model.generate(**tokenizer(PROMPTS[:1], return_tensors="pt"),
                              max_new_tokens=3, do_sample=False, **{CACHE: theirs})
    mine = DynamicCache(config=model.config)
    mine.note = "the caller's"
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.generate(PROMPTS[:1], max_new_tokens=3, backend="fx", **{CACHE: mine}) as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)
    assert vars(mine).keys() == vars(theirs).keys()
    for name, value in vars(theirs).items():
        if name != "layers":
            assert getattr(mine, name) == value, name
    assert _same_cache(mine, theirs)


def test_decoder_ids_given_to_generate_set_the_decoders_shapes_in_each_invoke(tokenizer):
    """decoder_input_ids given to an encoder-decoder generate (for the whole batch) are
    the decoder's ids at step 0 in every invoke's shape reads: an invoke's read is of
    its rows at their length (it was a refused shape of the whole batch's rows)."""
    model, _ = _tiny_encoder_decoder("t5", tokenizer)
    decoder_ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    seen = []
    handle = model.decoder.block[1].register_forward_hook(
        lambda m, a, output: seen.append(output[0]))
    try:
        # (right-padded, as fxsight pads an encoder-decoder's prompts: the tokenizer's own
        # side may be either, as the module's tests leave it)
        expected = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True,
                                              padding_side="right"),
                                  decoder_input_ids=decoder_ids, max_new_tokens=2,
                                  do_sample=False)
    finally:
        handle.remove()
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.generate(max_new_tokens=2, decoder_input_ids=decoder_ids,
                     backend="hooks") as tracer:
        with tracer.invoke(PROMPTS[0]):
            pass
        with tracer.invoke(PROMPTS[1]):
            hidden = lm.decoder.block[1].output[0]
            length = hidden.shape[1]
            last = hidden[:, length - 1].save()
        tokens = tracer.result.save()
    assert length == 3 and torch.equal(tokens, expected)
    assert torch.equal(last, seen[0][1:, -1])
