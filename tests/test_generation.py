"""Interventions across decoding steps, against hand-written hooks + transformers generate."""

import warnings

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from models import tiny_gpt2, tiny_llama, train_tokenizer

PROMPTS = ["The Eiffel Tower is in", "Hello there"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _models(tokenizer):
    vocab = len(tokenizer)
    return {"gpt2": (tiny_gpt2(vocab_size=vocab), "transformer.h"),
            "llama": (tiny_llama(vocab_size=vocab), "model.layers")}


@pytest.fixture(scope="module")
def models(tokenizer):
    return _models(tokenizer)


def _steer_vector(width=64, seed=0):
    return torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 4


def _reference(model, tokenizer, prompts, block, steer, steps=None, rows=None, **kwargs):
    """Hand-written: a forward hook adding ``steer`` at the last position of ``rows``."""
    calls = {"n": 0}

    def hook(module, args, output):
        step = calls["n"]
        calls["n"] += 1
        if steps is not None and step not in steps:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        selected = slice(None) if rows is None else rows
        hidden[selected, -1] += steer
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.get_submodule(block).register_forward_hook(hook)
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        return model.generate(**encoded, do_sample=False, **kwargs)
    finally:
        handle.remove()


def _block(lm, path):
    envoy = lm
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_steering_every_step_matches_hooks(models, tokenizer, name, use_cache, backend):
    model, blocks = models[name]
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = _steer_vector()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with lm.generate(PROMPTS[0], max_new_tokens=5, do_sample=False, use_cache=use_cache,
                         backend=backend) as tracer:
            with tracer.all():
                _block(lm, blocks)[1].output[:, -1] += steer
            tokens = lm.generator.output.save()
    expected = _reference(model, tokenizer, [PROMPTS[0]], f"{blocks}.1", steer,
                          max_new_tokens=5, use_cache=use_cache)
    plain = model.generate(**tokenizer([PROMPTS[0]], return_tensors="pt"), do_sample=False,
                           max_new_tokens=5, use_cache=use_cache)
    assert tracer.backend == "hooks"
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, plain), "the steering vector should change the output"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_chosen_steps_and_several_prompts(models, tokenizer, name):
    model, blocks = models[name]
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = _steer_vector(seed=1)
    with lm.generate(max_new_tokens=5, do_sample=False, backend="hooks") as tracer:
        with tracer.invoke(PROMPTS[0]):
            for _ in tracer.iter[1:4]:
                _block(lm, blocks)[0].output[:, -1] += steer
        with tracer.invoke(PROMPTS[1]):
            pass
        tokens = tracer.result.save()
    expected = _reference(model, tokenizer, PROMPTS, f"{blocks}.0", steer, steps={1, 2, 3},
                          rows=slice(0, 1), max_new_tokens=5)
    assert torch.equal(tokens, expected)


def test_saves_inside_steps_collect_one_value_per_step(models, tokenizer):
    model, blocks = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.generate(PROMPTS[0], max_new_tokens=4, do_sample=False, backend="hooks") as tracer:
        first = lm.transformer.h[0].output.save()
        with tracer.all():
            each = lm.transformer.h[0].output[:, -1].save()
        with tracer.iter[2]:
            third = lm.lm_head.output.save()
    prompt_length = len(tokenizer(PROMPTS[0])["input_ids"])
    assert isinstance(first, torch.Tensor) and first.shape[1] == prompt_length
    assert isinstance(each, list) and len(each) == 4
    assert [tuple(e.shape) for e in each] == [(1, 64)] * 4
    assert isinstance(third, list) and len(third) == 1 and third[0].shape[1] == 1
    # the last-position activation of step 0 is the same as in the full first read
    torch.testing.assert_close(each[0], first[:, -1])


def test_fx_backend_warns_once_and_falls_back(tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    with pytest.warns(RuntimeWarning, match="hooks backend"):
        with lm.generate(PROMPTS[0], max_new_tokens=2, do_sample=False):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with lm.generate(PROMPTS[0], max_new_tokens=2, do_sample=False):
            pass


def test_generator_output_outside_generate(models, tokenizer):
    model, _ = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    with pytest.raises(fxsight.TraceError, match="generate"):
        with lm.trace(PROMPTS[0]):
            lm.generator.output.save()
