"""No side effects on the user's objects: generate() leaves the model's attributes and
forward as they were; an accessor typo inside a trace raises instead of setting an
attribute on the real module."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from fxsight import LanguageModel, NNsight
from models import mlp, tiny_gpt2, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _generate(model, tokenizer, backend):
    lm = LanguageModel(model, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        with lm.generate("The Eiffel Tower is in", max_new_tokens=3, do_sample=False,
                         backend=backend) as tracer:
            with tracer.all():
                lm.transformer.h[0].output[:, -1] += 1.0
            ids = lm.generator.output.save()
    assert tracer.backend == backend
    return ids


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_generate_leaves_the_model_as_it_was(tokenizer, backend):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    ids = _generate(model, tokenizer, backend)
    assert ids.shape[0] == 1
    after = {name: dict(vars(module)) for name, module in model.named_modules()}
    assert set(after) == set(before)
    for name in before:
        assert set(after[name]) == set(before[name]), name
        assert "forward" not in after[name], name
    assert model.forward.__func__ is type(model).forward
    # a second generate reuses what the first one built (no new attribute either)
    _generate(model, tokenizer, backend)
    assert set(vars(model)) == set(before[""])


def test_generate_does_not_keep_the_model_alive(tokenizer):
    def run():
        model = tiny_gpt2(vocab_size=len(tokenizer))
        _generate(model, tokenizer, "fx")
        return weakref.ref(model)

    ref = run()
    gc.collect()
    assert ref() is None
