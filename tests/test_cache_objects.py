"""transformers' default call on the fx backend: cache objects pass through the graph.

A language model called with its default arguments (``use_cache`` on) returns a cache
object (``DynamicCache``, ``EncoderDecoderCache``); one passed in is updated in place.
References: the plain forward pass and hand-written forward hooks.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, DynamicCache, \
    EncoderDecoderCache

from fxsight import NNsight
from fxsight.errors import NotOnGraph
from fxsight.generate.steps import CACHE
from models import tiny_gpt2, tiny_llama

ATOL = 1e-5
BACKENDS = ("fx", "hooks")


def _layers(cache):
    """(keys, values) of every layer of a cache, as a plain list."""
    if isinstance(cache, EncoderDecoderCache):
        return _layers(cache.self_attention_cache) + _layers(cache.cross_attention_cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def assert_same_cache(got, expected):
    assert type(got) is type(expected)
    assert got.get_seq_length() == expected.get_seq_length()
    pairs = list(zip(_layers(got), _layers(expected)))
    assert len(pairs) == len(_layers(expected)) > 0
    for (k, v), (k0, v0) in pairs:
        assert k.shape == k0.shape and v.shape == v0.shape
        torch.testing.assert_close(k, k0, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, v0, atol=ATOL, rtol=0)


def tiny_bart():
    torch.manual_seed(0)
    config = BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, vocab_size=128,
                        max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2().eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_hidden_layers=1).eval()


@pytest.fixture
def ids():
    return torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def more_ids():
    return torch.randint(4, 128, (2, 3), generator=torch.Generator().manual_seed(1))


def _cache_copy(cache):
    copy = DynamicCache()
    for index, (k, v) in enumerate(_layers(cache)):
        copy.update(k.clone(), v.clone(), index)
    return copy


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart"])
def test_default_call_runs_on_fx_and_returns_the_cache(kind, request, ids):
    model = tiny_bart() if kind == "bart" else request.getfixturevalue(kind)
    kwargs = {"decoder_input_ids": ids[:, :4]} if kind == "bart" else {}
    with torch.no_grad():
        expected = model(ids, **kwargs)
    wrapped = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning under "auto"
        with torch.no_grad(), wrapped.trace(ids, **kwargs) as tracer:
            output = wrapped.output.save()
    assert tracer.backend == "fx"
    assert type(output) is type(expected)
    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    assert_same_cache(getattr(output, CACHE), getattr(expected, CACHE))
    expected_class = EncoderDecoderCache if kind == "bart" else DynamicCache
    assert type(getattr(output, CACHE)) is expected_class


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_save_and_patch_equal_hand_written_hooks(gpt2, ids, backend, reference_hooks):
    saved = {}

    def patch(module, args, output):
        output = output.clone()
        output[:, 2] = 0
        return output

    def keep(module, args, output):
        saved["h1"] = output.detach().clone()

    with torch.no_grad(), reference_hooks(gpt2, hooks={"transformer.h.0": patch,
                                                       "transformer.h.1": keep}):
        expected = gpt2(ids)
    wrapped = NNsight(gpt2)
    with torch.no_grad(), wrapped.trace(ids, backend=backend) as tracer:
        wrapped.transformer.h[0].output[:, 2] = 0
        h1 = wrapped.transformer.h[1].output.save()
        decoder = wrapped.transformer.output.save()
        output = wrapped.output.save()
    assert tracer.backend == backend
    torch.testing.assert_close(h1, saved["h1"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    # the cache holds the keys and values the patched forward pass computed
    assert_same_cache(getattr(output, CACHE), getattr(expected, CACHE))
    # a module output holding the cache is readable: the cache as the forward pass ends
    assert_same_cache(getattr(decoder, CACHE), getattr(expected, CACHE))
    assert getattr(decoder, CACHE) is getattr(output, CACHE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_passed_in_cache_is_updated_like_the_plain_forward(llama, ids, more_ids, backend):
    with torch.no_grad():
        prefix = getattr(llama(ids), CACHE)
        plain_cache = _cache_copy(prefix)
        expected = llama(more_ids, **{CACHE: plain_cache})
    cache = _cache_copy(prefix)
    layers = list(cache.layers)
    wrapped = NNsight(llama)
    with torch.no_grad(), wrapped.trace(more_ids, **{CACHE: cache}, backend=backend) as tracer:
        output = wrapped.output.save()
        attention = wrapped.model.layers[0].self_attn.output.save()
    assert tracer.backend == backend
    assert getattr(output, CACHE) is cache  # the user's object, as the plain forward returns it
    assert [id(x) for x in cache.layers] == [id(x) for x in layers]  # updated in place
    assert_same_cache(cache, plain_cache)
    assert cache.get_seq_length() == ids.shape[1] + more_ids.shape[1]
    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    assert attention[0].shape[:2] == more_ids.shape


def test_the_trace_leaves_a_passed_in_cache_as_one_plain_forward_would(llama, ids, more_ids):
    """Capture (export) and validation run the model too: the user's cache is updated
    exactly once, by the run itself."""
    with torch.no_grad():
        prefix = getattr(llama(ids), CACHE)
    cache = _cache_copy(prefix)
    wrapped = NNsight(llama)
    with torch.no_grad(), wrapped.trace(more_ids, **{CACHE: cache}, backend="fx"):
        pass
    assert cache.get_seq_length() == ids.shape[1] + more_ids.shape[1]


def _static_types(cache):
    """How compiled code would take each tensor of a static cache's layers (transformers
    marks them as static addresses when it allocates them outside compiled code)."""
    return [tuple(getattr(tensor, "_dynamo_static_input_type", None)
                  for tensor in (layer.keys, layer.values, layer.cumulative_length))
            for layer in cache.layers]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_static_cache_is_left_as_the_plain_forward_leaves_it(llama, ids, backend):
    """The forward pass allocates a fresh ``StaticCache``'s tensors: the trace leaves
    them with the plain forward's values and marked as it marks them (on the fx backend
    the graph allocates them, where transformers does not mark them)."""
    from transformers import StaticCache

    plain_cache = StaticCache(config=llama.config, max_cache_len=10)
    with torch.no_grad():
        expected = llama(ids, **{CACHE: plain_cache}).logits
    assert all(kind is not None for layer in _static_types(plain_cache) for kind in layer)
    cache = StaticCache(config=llama.config, max_cache_len=10)
    wrapped = NNsight(llama)
    with torch.no_grad(), wrapped.trace(ids, **{CACHE: cache}, backend=backend) as tracer:
        logits = wrapped.output.logits.save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert _static_types(cache) == _static_types(plain_cache)
    for (k, v), (k0, v0) in zip(_layers(cache), _layers(plain_cache)):
        torch.testing.assert_close(k, k0, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, v0, atol=ATOL, rtol=0)
    assert int(cache.layers[0].cumulative_length) == ids.shape[1]


def test_using_a_cache_object_inside_the_trace_is_refused_on_fx(gpt2, ids):
    wrapped = NNsight(gpt2)
    with pytest.raises(NotOnGraph, match="cache object"):
        with torch.no_grad(), wrapped.trace(ids, backend="fx"):
            getattr(wrapped.output, CACHE).get_seq_length().save()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), wrapped.trace(ids) as tracer:
            length = getattr(wrapped.output, CACHE).get_seq_length().save()
    assert tracer.backend == "hooks" and length == ids.shape[1]
    assert any("hooks backend" in str(w.message) for w in caught)


def test_language_model_output_holds_the_cache(gpt2, ids):
    from fxsight import LanguageModel
    from models import train_tokenizer

    lm = LanguageModel(gpt2, tokenizer=train_tokenizer())
    with torch.no_grad():
        expected = gpt2(ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), lm.trace(ids, backend="fx") as tracer:
        output = lm.output.save()
    assert tracer.backend == "fx"
    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    assert getattr(output, CACHE) is not None
    assert_same_cache(getattr(output, CACHE), getattr(expected, CACHE))


def test_a_write_that_replaces_a_cache_object_is_refused_on_fx(gpt2, ids):
    wrapped = NNsight(gpt2)
    with pytest.raises(NotOnGraph, match=r"transformer\.h\.0\.attn\.input.*cache object") as error:
        with torch.no_grad(), wrapped.trace(ids, backend="fx"):
            args, kwargs = wrapped.transformer.h[0].attn.inputs
            wrapped.transformer.h[0].attn.inputs = (args, {**kwargs, CACHE: None})
    assert "test_cache_objects.py" in str(error.value)  # the user's line


def _state_tensors(value):
    """Every tensor a cache object holds (its layers' attributes, dicts of states)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in value for t in _state_tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _state_tensors(v)]
    if hasattr(value, "__dict__"):
        return [t for k, v in sorted(vars(value).items()) for t in _state_tensors(v)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba", "gemma2"])
def test_state_space_and_sliding_window_caches(kind, ids, more_ids):
    """Mamba's cache holds convolution and recurrent states (dicts per layer), Gemma 2's
    sliding-window layers: both pass through the graph, returned and passed in."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "mamba":
        model = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=32, num_hidden_layers=2,
                                                   vocab_size=128, state_size=4))
    else:
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=128, sliding_window=4,
            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.eval()
    # the cache's keyword and attribute: Mamba's was ``cache_params`` where the others'
    # was ``past_key_values`` (transformers before 5.2x); ``cache`` for all since
    name = "cache_params" if kind == "mamba" and CACHE == "past_key_values" else CACHE
    wrapped = NNsight(model)
    with torch.no_grad():
        expected = model(ids)
        plain_cache = copy.deepcopy(getattr(expected, name))
        expected_next = model(more_ids, **{name: plain_cache})
    with torch.no_grad(), wrapped.trace(ids, backend="fx"):
        output = wrapped.output.save()
    torch.testing.assert_close(output.logits, expected.logits, atol=ATOL, rtol=0)
    got, want = _state_tensors(getattr(output, name)), _state_tensors(getattr(expected, name))
    assert type(getattr(output, name)) is type(getattr(expected, name))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    cache = getattr(output, name)
    with torch.no_grad(), wrapped.trace(more_ids, **{name: cache}, backend="fx"):
        following = wrapped.output.save()
    assert getattr(following, name) is cache
    torch.testing.assert_close(following.logits, expected_next.logits, atol=ATOL, rtol=0)
    for a, b in zip(_state_tensors(cache), _state_tensors(plain_cache), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_invokes_model_output_holds_its_own_rows_of_the_cache(gpt2, ids, backend):
    """The model's output read in an invoke holds a cache object of the invoke's rows, as
    the forward pass of its inputs alone returns it (it held the whole batch's object,
    while the output's tensors were the invoke's rows); the batch's object is untouched."""
    model = NNsight(gpt2)
    with model.trace(backend=backend) as tracer:
        with tracer.invoke(ids[:1]):
            first = model.output.save()
        with tracer.invoke(ids[1:]):
            second = model.output.save()
        whole = model.output.save()
    for rows, saved in ((slice(0, 1), first), (slice(1, 2), second)):
        assert_same_cache(saved.past_key_values, gpt2(ids[rows]).past_key_values)
        torch.testing.assert_close(saved.logits, gpt2(ids[rows]).logits, atol=ATOL, rtol=0)
    assert_same_cache(whole.past_key_values, gpt2(ids).past_key_values)
