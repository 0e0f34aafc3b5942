"""nnsight's ``LanguageModel(..., tokenizer_kwargs=...)``: options of loading the tokenizer
where fxsight loads it from the path, and settings of the tokenizer (``padding_side``) set
on it after fxsight's own defaults, whichever way it came; what cannot be applied is a
``TypeError`` at construction, never ignored."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import fxsight

from models import saved_language_model, tiny_gpt2, train_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_language_model(tmp_path_factory.mktemp("tokenizer_kwargs"))


def test_a_setting_is_applied_after_fxsights_defaults(saved):
    lm = fxsight.LanguageModel(saved, tokenizer_kwargs={"padding_side": "right"})
    assert lm.tokenizer.padding_side == "right"  # (fxsight's own default is "left")
    assert fxsight.LanguageModel(saved).tokenizer.padding_side == "left"
    # the tokenizer pads as asked: the same as the tokenizer loaded by hand with it
    by_hand = AutoTokenizer.from_pretrained(saved, padding_side="right")
    texts = ["a b c d e", "a"]
    ours = lm.tokenizer(texts, padding=True, return_tensors="pt")
    theirs = by_hand(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["attention_mask"][1, 0] == 1  # (right-padded: the short row starts real)


def test_a_loading_option_reaches_from_pretrained(saved):
    lm = fxsight.LanguageModel(saved, tokenizer_kwargs={"model_max_length": 7})
    assert lm.tokenizer.model_max_length == 7
    lm = fxsight.LanguageModel(saved, tokenizer_kwargs={"use_fast": True})
    assert lm.tokenizer.is_fast


def test_traces_run_with_the_settings_and_equal_the_plain_forward(saved):
    lm = fxsight.LanguageModel(saved, tokenizer_kwargs={"padding_side": "right"},
                               dispatch=True)
    ids = lm.tokenizer(["a b c"], return_tensors="pt")["input_ids"]
    with lm.trace(ids):
        logits = lm.lm_head.output.save()
    with torch.no_grad():
        expected = lm._module(ids).logits
    assert torch.equal(logits, expected)


def test_a_given_tokenizer_takes_its_attributes():
    tokenizer = train_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = fxsight.LanguageModel(model, tokenizer=tokenizer,
                               tokenizer_kwargs={"padding_side": "right"})
    assert lm.tokenizer is tokenizer and tokenizer.padding_side == "right"


def test_what_cannot_be_applied_is_a_type_error():
    tokenizer = train_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    with pytest.raises(TypeError, match="'use_fast'.*did not load it"):
        fxsight.LanguageModel(model, tokenizer=tokenizer, tokenizer_kwargs={"use_fast": False})
    with pytest.raises(TypeError, match="no tokenizer"):
        fxsight.LanguageModel(model, tokenizer_kwargs={"padding_side": "right"})
