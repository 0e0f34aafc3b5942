"""``.token[i]`` indexes a value's dimension 1 as its token dimension (positions counted from
each prompt's first real token). On a value whose dimension 1 is something else (attention
weights ``(batch, heads, q, k)``, a transposed hidden state ``(batch, hidden, t)``, a pooled
``(batch, hidden)``) it would pick along that dimension wherever the index is in range: it is
refused before the run, naming the line and the shape. The legitimate cases (hidden states,
a module's input, logits) give what plain forward hooks on the same model give.
"""

from __future__ import annotations

import pytest
import torch

from fxsight import LanguageModel, TokenIndexError
from models import tiny_gpt2, train_tokenizer

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The Eiffel Tower is in", "Hi there"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_embd=32, n_head=2, n_layer=1)
    model.config._attn_implementation = "eager"  # (sdpa gives no attention weights)
    return model.eval()


def _traces() -> int:
    import fxsight
    return fxsight.stats()["traces"]


def _hooked(model, tokenizer, prompt):
    """Plain PyTorch, one prompt alone: block 0's output and input, its attention's
    output, the logits."""
    got = {}
    block = model.transformer.h[0]
    handles = [
        block.register_forward_hook(lambda m, a, o: got.__setitem__("block", o)),
        block.register_forward_pre_hook(lambda m, a: got.__setitem__("input", a[0])),
        block.attn.register_forward_hook(lambda m, a, o: got.__setitem__("attn", o)),
    ]
    try:
        with torch.no_grad():
            got["logits"] = model(**tokenizer(prompt, return_tensors="pt"),
                                  output_attentions=True).logits
    finally:
        for handle in handles:
            handle.remove()
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["weights", "transposed", "pooled"])
def test_token_index_of_a_dimension_that_is_not_the_tokens_is_refused(
        model, tokenizer, backend, form):
    """(was: ``attn.output[1].token[-1]`` of weights ``(2, 2, 15, 15)`` silently picked the
    last head of each row, whatever token was meant; a transposed or pooled value picked
    the last hidden unit)"""
    lm = LanguageModel(model, tokenizer=tokenizer)
    before = _traces()
    shape = {"weights": r"\(2, 2, 15, 15\)", "transposed": r"\(2, 32, 15\)",
             "pooled": r"\(2, 32\)"}[form]
    with pytest.raises(TokenIndexError,
                       match=shape + r"(.|\n)*not the input's 15 tokens(.|\n)*the line named"):
        with torch.no_grad(), lm.trace(PROMPTS, output_attentions=True, backend=backend):
            attn = lm.transformer.h[0].attn
            if form == "weights":
                value = attn.output[1]
            elif form == "transposed":
                value = lm.transformer.h[0].output.transpose(1, 2)  # (batch, hidden, t)
            else:
                value = lm.transformer.h[0].output.sum(1)  # (batch, hidden)
            value.token[-1].save()  # the line named
    assert _traces() == before  # (refused before the run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_of_token_values_is_the_hooked_forward(model, tokenizer, backend):
    lm = LanguageModel(model, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace(PROMPTS, output_attentions=True, backend=backend):
        block = lm.transformer.h[0]
        hidden = block.output.token[0].save()
        given = block.input.token[-1].save()
        attended = block.attn.output[0].token[1].save()
        logits = lm.output.logits.token[-1].save()
    for row, prompt in enumerate(PROMPTS):
        want = _hooked(model, tokenizer, prompt)
        torch.testing.assert_close(hidden[row], want["block"][0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(given[row], want["input"][0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(attended[row], want["attn"][0][0, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[row], want["logits"][0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_of_as_many_heads_as_tokens_is_refused(tokenizer, backend):
    """Attention weights of 4 heads over 4 tokens, ``(2, 4, 4, 4)``: dimension 1 is as long
    as the tokens without being them; it does not grow with the input, and is refused
    (was: ``.token[-1]`` picked the last head)"""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_embd=32, n_head=4, n_layer=1)
    model.config._attn_implementation = "eager"
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = ["Hi there", "Hi"]
    assert len(tokenizer(prompts[0])["input_ids"]) == 4
    with pytest.raises(TokenIndexError, match=r"\(2, 4, 4, 4\)(.|\n)*does not grow"):
        with torch.no_grad(), lm.trace(prompts, output_attentions=True, backend=backend):
            lm.transformer.h[0].attn.output[1].token[-1].save()
    # a value of two dimensions that are the rows and the tokens (the ids an embedding
    # takes) grows with the input: indexed as tokens, as a hook sees them
    with torch.no_grad(), lm.trace(prompts, output_attentions=True, backend=backend):
        ids = lm.transformer.wte.input.token[0].save()
        weights = lm.transformer.h[0].attn.output[1][:, :, -1].save()  # (the last query)
    for row, prompt in enumerate(prompts):
        got = {}
        handles = [model.transformer.wte.register_forward_pre_hook(
                       lambda m, a: got.__setitem__("ids", a[0])),
                   model.transformer.h[0].attn.register_forward_hook(
                       lambda m, a, o: got.__setitem__("weights", o[1]))]
        try:
            with torch.no_grad():
                model(**tokenizer(prompt, return_tensors="pt"), output_attentions=True)
        finally:
            for handle in handles:
                handle.remove()
        assert ids[row].item() == got["ids"][0, 0].item()
        if row == 0:  # (the longest prompt: no padding among its keys)
            torch.testing.assert_close(weights[row], got["weights"][0, :, -1], atol=1e-5,
                                       rtol=0)
