"""``.token[i]`` indexes a value's dimension 1 as its token dimension (positions counted from
each prompt's first real token). On a value whose dimension 1 is something else (attention
weights ``(batch, heads, q, k)``, a transposed hidden state ``(batch, hidden, t)``, a pooled
``(batch, hidden)``) it would pick along that dimension wherever the index is in range: it is
refused before the run, naming the line and the shape; so is one whose dimension 1 is as
long as the tokens without following the input's length (as many heads as tokens), found by
walking the shapes of an input one token longer or shorter, and one where neither walk runs.
The legitimate cases (hidden states, a module's input, logits) give what plain forward hooks
on the same model give.
"""

from __future__ import annotations

import pytest
import torch

from fxsight import LanguageModel, TokenIndexError, TraceError
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The Eiffel Tower is in", "Hi there"]


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


def _heads_as_tokens(tokenizer):
    """A GPT-2 of 4 heads (head size 8) and the prompts it is given, the longest 4 tokens."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_embd=32, n_head=4, n_layer=1)
    model.config._attn_implementation = "eager"
    prompts = ["Hi there", "Hi"]
    assert len(tokenizer(prompts[0])["input_ids"]) == 4
    return model, prompts


def _per_head(lm, form):
    """A ``(batch, heads, head_dim)`` value of 4 heads, as long as the prompts' 4 tokens."""
    block = lm.transformer.h[0]
    if form == "pooled":  # pooled over the tokens, then split into heads
        return block.output.mean(1).unflatten(-1, (4, 8))
    return block.attn.output[0][:, -1].unflatten(-1, (4, 8))  # the last token's, per head


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["pooled", "last token"])
@pytest.mark.parametrize("key", ["[-1]", "[0]", "[-2:]", "[0] = 0"])
def test_token_index_of_a_value_per_head_is_refused(tokenizer, backend, form, key):
    """(was: ``.token[-1]`` of a ``(2, 4, 8)`` value, 4 heads of 8 for prompts of 4 tokens,
    picked the last head, silently: dimension 1 was taken for the tokens because no other
    dimension was as long)"""
    model, prompts = _heads_as_tokens(tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    before = _traces()
    with pytest.raises(TokenIndexError, match=r"\(2, 4, 8\)(.|\n)*does not grow"):
        with torch.no_grad(), lm.trace(prompts, backend=backend):
            value = _per_head(lm, form)
            if key == "[0] = 0":
                value.token[0] = 0
            else:
                {"[-1]": lambda: value.token[-1], "[0]": lambda: value.token[0],
                 "[-2:]": lambda: value.token[-2:]}[key]().save()
    assert _traces() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_where_no_other_length_runs_is_refused(tokenizer, backend):
    """Lines that fit the prompts' length alone (a bias of 4 x 4 added to the weights): the
    shapes of another length cannot be walked, so whether dimension 1 is the tokens is not
    known (was: the attention weights plus the bias, ``(2, 4, 4, 4)``, indexed as tokens:
    ``.token[-1]`` the last head)"""
    model, prompts = _heads_as_tokens(tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    before = _traces()
    with pytest.raises(TokenIndexError, match=r"\(2, 4, 4, 4\)(.|\n)*cannot tell(.|\n)*"
                                              r"one token longer(.|\n)*the line named"):
        with torch.no_grad(), lm.trace(prompts, output_attentions=True, backend=backend):
            weights = lm.transformer.h[0].attn.output[1] + torch.zeros(4, 4)
            weights.token[-1].save()  # the line named
    assert _traces() == before


def _bert(tokenizer, positions: int):
    from transformers import BertConfig, BertModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=positions,
            pad_token_id=0))
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_where_a_longer_input_cannot_run(tokenizer, backend):
    """A BERT with as many positions as the prompts' 4 tokens: its forward fails on an input
    one token longer (its position ids are a buffer of 4), so that scan cannot tell the 4
    heads from the tokens; one token shorter does (was: the attention weights
    ``(2, 4, 4, 4)`` indexed as tokens, ``.token[-1]`` the last head, silently)"""
    model = _bert(tokenizer, 4)
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = ["Hi there", "Hi there"]
    assert len(tokenizer(prompts[0])["input_ids"]) == 4
    before = _traces()
    with pytest.raises(TokenIndexError, match=r"\(2, 4, 4, 4\)(.|\n)*does not grow"):
        with torch.no_grad(), lm.trace(prompts, output_attentions=True, backend=backend):
            lm.encoder.layer[0].attention.self.output[1].token[-1].save()
    assert _traces() == before
    # its hidden states are the tokens: as forward hooks see them, each prompt alone
    with torch.no_grad(), lm.trace(prompts, backend=backend):
        last = lm.encoder.layer[0].output.token[-1].save()
        first = lm.encoder.layer[0].output.token[0].save()
    got = {}
    handle = model.encoder.layer[0].register_forward_hook(
        lambda m, a, o: got.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(**tokenizer(prompts[0], return_tensors="pt"))
    finally:
        handle.remove()
    for row in range(2):
        torch.testing.assert_close(last[row], got["out"][0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(first[row], got["out"][0, 0], atol=1e-5, rtol=0)


def test_token_slice_of_different_counts_names_the_slice(model, tokenizer):
    """(was: named ``1:3:``, a slice with an empty step)"""
    lm = LanguageModel(model, tokenizer=tokenizer)
    with pytest.raises(TraceError, match=r"token slice 1:3 selects a different number of "
                                         r"tokens(.|\n)*\(2, 1\)"):
        with torch.no_grad(), lm.trace(["Hi there", "Hi"]):
            lm.transformer.h[0].output.token[1:3].save()
    with pytest.raises(TraceError, match=r"token slice ::2 selects"):
        with torch.no_grad(), lm.trace(["Hi there", "Hi"]):
            lm.transformer.h[0].output.token[::2].save()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_trace_walks_no_other_length(tokenizer, backend, monkeypatch):
    """Whether dimension 1 follows the input's length is walked once per input layout and
    Program: a trace that repeats another (the same lines, inputs of the same shapes) scans
    and walks no other length again, and gives what hooks give"""
    import fxsight.api.token_dimension as token_dimension
    scans = []
    real = token_dimension.cached_scan
    monkeypatch.setattr(token_dimension, "cached_scan",
                        lambda *args: scans.append(args) or real(*args))
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_embd=32, n_head=2, n_layer=1).eval()
    lm = LanguageModel(model, tokenizer=tokenizer)
    for _ in range(3):
        with torch.no_grad(), lm.trace(PROMPTS, backend=backend):
            last = lm.transformer.h[0].output.token[-1].save()
    assert len(scans) == 1
    for row, prompt in enumerate(PROMPTS):
        want = _hooked(model, tokenizer, prompt)["block"]
        torch.testing.assert_close(last[row], want[0, -1], atol=1e-5, rtol=0)


def _logger_state(logger):
    return (logger.level, list(logger.handlers), logger.propagate, list(logger.filters),
            logger.disabled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_walk_of_another_length_logs_nothing(tokenizer, backend, caplog):
    """The walk of an input one token longer fails on this BERT (its position ids are a
    buffer of 4): torch's fake-tensor logger logged the failure with its traceback (to
    stderr: "failed while attempting to run meta for aten.expand.default"), although
    fxsight handles it. Quiet during fxsight's own walk only: the logger's level,
    handlers, propagation and filters are as before after the trace, refused or not, and
    a record of the user's own is logged as before."""
    import logging
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    before = _logger_state(logger)
    model = _bert(tokenizer, 4)
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = ["Hi there", "Hi there"]
    with pytest.raises(TokenIndexError, match=r"does not grow"):
        with torch.no_grad(), lm.trace(prompts, output_attentions=True, backend=backend):
            lm.encoder.layer[0].attention.self.output[1].token[-1].save()
    assert _logger_state(logger) == before
    with torch.no_grad(), lm.trace(prompts, backend=backend):
        lm.encoder.layer[0].output.token[-1].save()
    assert _logger_state(logger) == before
    logged = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert logged == [], logged
    logger.error("the user's own record")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == [
        "the user's own record"]
