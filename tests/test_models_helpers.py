"""Quick checks of the test helpers in ``tests/models.py`` (no fxsight import)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from models import mlp, saved_language_model, tiny_gpt2, tiny_llama, train_tokenizer

SENTENCES = [
    "The Eiffel Tower is in the city of Paris",
    "The Colosseum is in the city of Rome",
    "Hello, World! 42 ~ {x: y}",
]


def test_tokenizer_basics() -> None:
    tok = train_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 128
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.eos_token is not None and tok.bos_token is not None
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(ids) == 4 and max(ids) < len(tok)


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_round_trip(text: str) -> None:
    tok = train_tokenizer()
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_is_cached_but_independent() -> None:
    a, b = train_tokenizer(), train_tokenizer()
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    a.padding_side = "right"
    assert b.padding_side == "left"
    assert train_tokenizer().padding_side == "left"


def test_tokenizer_left_padding() -> None:
    tok = train_tokenizer()
    batch = tok(["The city", SENTENCES[0]], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    short_len = int(mask[0].sum())
    assert 0 < short_len < ids.shape[1]
    # Left padding: pads (mask 0) come first, real tokens are right-aligned.
    assert mask[0, -short_len:].all() and not mask[0, :-short_len].any()
    assert (ids[0, :-short_len] == tok.pad_token_id).all()
    assert mask[1].all()
    assert tok.decode(ids[0, -short_len:]) == "The city"


@pytest.mark.parametrize(
    "factory, cls", [(tiny_gpt2, GPT2LMHeadModel), (tiny_llama, LlamaForCausalLM)]
)
def test_language_model_forward_shapes(factory, cls) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = factory()
    assert isinstance(model, cls) and not model.training
    input_ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids)
    assert out.logits.shape == (3, 7, 128)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, mlp])
def test_models_are_deterministic(factory) -> None:
    a, b, c = factory(seed=0), factory(seed=0), factory(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_mlp_structure() -> None:
    model = mlp()
    assert [name for name, _ in model.named_children()] == [
        "layer1", "act1", "layer2", "act2", "layer3",
    ]
    assert not model.training
    assert model(torch.randn(4, 5)).shape == (4, 2)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_saved_language_model_round_trip(tmp_path, kind: str) -> None:
    path = saved_language_model(tmp_path, kind=kind)
    assert isinstance(path, str)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == len(train_tokenizer())
    assert tok.padding_side == "left"
    assert tok.pad_token_id == model.config.pad_token_id

    ref_tok = train_tokenizer()
    ref_model = (tiny_gpt2 if kind == "gpt2" else tiny_llama)(vocab_size=len(ref_tok))
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    ref_batch = ref_tok(SENTENCES[:2], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref_batch["input_ids"])
    with torch.no_grad():
        logits = model(**batch).logits
        ref_logits = ref_model(**ref_batch).logits
    assert torch.equal(logits, ref_logits)
