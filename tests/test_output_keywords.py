"""A model's own keyword outputs (``output_hidden_states``, ``output_attentions``) beside an
intervention, in ``trace`` and ``generate``, on both backends.

The reference is plain PyTorch: the same write done by a forward hook on a fresh copy of the
model (its hook registered before transformers installs the hooks that collect those outputs,
so the collected value is the written one, as in transformers' own per-layer loop).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fxsight import LanguageModel
from models import tiny_gpt2, tiny_llama

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in"


def _build(kind: str, tokenizer) -> torch.nn.Module:
    build = tiny_gpt2 if kind == "gpt2" else tiny_llama
    model = build(vocab_size=len(tokenizer), n_embd=32, n_head=2) if kind == "gpt2" else \
        build(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    model.config._attn_implementation = "eager"  # (sdpa gives no attentions)
    return model


def _blocks(module):
    return module.transformer.h if hasattr(module, "transformer") else module.model.layers


def _doubled(module, args, output):
    return (output[0] * 2, *output[1:]) if isinstance(output, tuple) else output * 2


def _plain_doubled(model, **kwargs):
    """Plain PyTorch on a fresh copy: block 0's output doubled by a forward hook."""
    fresh = copy.deepcopy(model)
    handle = _blocks(fresh)[0].register_forward_hook(_doubled)
    try:
        with torch.no_grad():
            return fresh(**kwargs)
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hidden_states_of_a_written_block_are_the_written_ones(tokenizer, kind, backend):
    """(was: once transformers had installed its collecting hooks, by any earlier forward
    asking for hidden states, ``output.hidden_states[1]`` was block 0's output before the
    write, on both backends, while every later layer saw the written one)"""
    model = _build(kind, tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = _plain_doubled(model, input_ids=ids, output_hidden_states=True,
                              output_attentions=True)
    with torch.no_grad():  # transformers installs its collecting hooks on this model now
        model(ids, output_hidden_states=True, output_attentions=True)
    order = [list(m._forward_hooks) for m in model.modules()]
    lm = LanguageModel(model, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace(ids, output_hidden_states=True, output_attentions=True,
                                   backend=backend) as tracer:
        block = _blocks(lm)[0]
        block.output = block.output * 2
        hidden = lm.output.hidden_states.save()
        attentions = lm.output.attentions.save()
        logits = lm.output.logits.save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    assert len(hidden) == len(expected.hidden_states) == 3
    for got, want in zip(hidden, expected.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(attentions) == len(expected.attentions) == 2
    for got, want in zip(attentions, expected.attentions):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the model's hooks are as they were, in their order
    assert [list(m._forward_hooks) for m in model.modules()] == order


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_hidden_states_of_a_written_block_are_the_written_ones(tokenizer, kind):
    """As in a trace, at every step of ``generate`` (``output_hidden_states`` makes generate
    run on the hooks backend: ``auto`` falls back, ``fx`` refuses it)."""
    model = _build(kind, tokenizer)
    encoded = tokenizer([PROMPT, "Hello"], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                   output_hidden_states=True, output_scores=True)
    fresh = copy.deepcopy(model)
    handle = _blocks(fresh)[0].register_forward_hook(_doubled)
    try:
        with torch.no_grad():
            expected = fresh.generate(**encoded, **options)
    finally:
        handle.remove()
    with torch.no_grad():  # transformers installs its collecting hooks on this model now
        model(encoded["input_ids"], output_hidden_states=True)
    lm = LanguageModel(model, tokenizer=tokenizer)
    with torch.no_grad(), lm.generate(dict(encoded), backend="hooks", **options) as tracer:
        with tracer.all():
            block = _blocks(lm)[0]
            block.output = block.output * 2
        output = lm.generator.output.save()
    assert torch.equal(output.sequences, expected.sequences)
    for got, want in zip(output.scores, expected.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for got_step, want_step in zip(output.hidden_states, expected.hidden_states, strict=True):
        for got, want in zip(got_step, want_step, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_of_logits_kept_short_is_refused_at_the_line(tokenizer, backend):
    """``logits_to_keep`` makes the logits hold the last positions only: ``.token[0]`` of
    them is a TokenIndexError naming the line, before the run (was: an IndexError from
    inside the run, naming no line); an index the kept positions hold is the plain
    forward's."""
    from fxsight import TokenIndexError
    model = _build("llama", tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = [PROMPT, "Hi"]
    before = fxsight_traces()
    with pytest.raises(TokenIndexError, match=r"dimension 1 has only 2(.|\n)*the line named"):
        with torch.no_grad(), lm.trace(prompts, logits_to_keep=2, backend=backend):
            lm.lm_head.output.token[0].save()  # the line named
    assert fxsight_traces() == before
    with torch.no_grad(), lm.trace(prompts, logits_to_keep=2, backend=backend):
        last = lm.lm_head.output.token[-1].save()
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(last[row], alone, atol=1e-5, rtol=0)


def fxsight_traces() -> int:
    import fxsight
    return fxsight.stats()["traces"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attentions_of_written_attention_weights_are_the_written_ones(tokenizer, backend):
    """``output.attentions`` collects each attention module's weights (its output[1]): a
    write of them comes back written, as from a plain hook (was: the weights before the
    write, once transformers had installed its collecting hooks)."""
    model = _build("llama", tokenizer)
    encoded = tokenizer([PROMPT, "Hi there"], return_tensors="pt", padding=True)
    fresh = copy.deepcopy(model)
    handle = fresh.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, output: (output[0], output[1] * 0.5))
    try:
        with torch.no_grad():
            expected = fresh(**encoded, output_attentions=True)
    finally:
        handle.remove()
    with torch.no_grad():
        model(**encoded, output_attentions=True)
    from fxsight import NNsight
    wrapped = NNsight(model)
    with torch.no_grad(), wrapped.trace(**encoded, output_attentions=True,
                                        backend=backend) as tracer:
        attention = wrapped.model.layers[0].self_attn
        attention.output = (attention.output[0], attention.output[1] * 0.5)
        attentions = wrapped.output.attentions.save()
    assert tracer.backend == backend
    for got, want in zip(attentions, expected.attentions, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_users_hook_still_runs_before_a_trace_reads_the_output(tokenizer):
    """Only transformers' collecting hooks move after fxsight's: a user's own forward hook
    (registered after them) still changes the output before the trace reads it, and the
    hidden states hold the value after both (was, with every hook after the first
    collecting one moved: the trace read the output before the user's hook)."""
    from fxsight import NNsight
    model = _build("gpt2", tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids, output_hidden_states=True)  # transformers' collecting hooks: first
    block = model.transformer.h[0]
    handle = block.register_forward_hook(lambda module, args, output: output + 1)
    recorded = {}
    recorder = block.register_forward_hook(  # (after the user's hook: what it gave)
        lambda module, args, output: recorded.setdefault("output", output.clone()))
    with torch.no_grad():
        model(ids)
    recorder.remove()
    order = list(block._forward_hooks)
    try:
        wrapped = NNsight(model)
        with torch.no_grad(), wrapped.trace(ids, output_hidden_states=True) as tracer:
            seen = wrapped.transformer.h[0].output.save()
            wrapped.transformer.h[0].output = wrapped.transformer.h[0].output * 2
            hidden = wrapped.output.hidden_states.save()
        assert tracer.backend == "hooks"  # (a model with a user's hook is not captured)
        assert list(block._forward_hooks) == order
    finally:
        handle.remove()
    torch.testing.assert_close(seen, recorded["output"], atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden[1], recorded["output"] * 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_with_a_cache_and_prompts_of_different_lengths(tokenizer, backend):
    """``generate`` takes the whole sequence; a cache given to it holds its first tokens.
    Left padding for prompts of different lengths went before the cache's tokens: the
    shorter prompt's last cached tokens were fed again and real ones masked, its tokens
    other than transformers' own ``generate`` gives it (silently, on both backends; then
    refused). Now the pads go after the cache's tokens: invokes of different lengths and
    a ragged list each generate transformers' own tokens for the prompt alone."""
    model = _build("llama", tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    past = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    short = torch.cat([past, tokenizer(" Paris", return_tensors="pt")["input_ids"]], 1)
    long = torch.cat([past, tokenizer(" Rome is a", return_tensors="pt")["input_ids"]], 1)
    assert long.shape[1] > short.shape[1]

    def cache(rows):
        with torch.no_grad():
            return model(past.repeat(rows, 1), use_cache=True).past_key_values

    options = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        expected = [model.generate(ids, past_key_values=cache(1), **options)[0, -3:]
                    for ids in (short, long)]
    with lm.generate(past_key_values=cache(2), backend=backend, **options) as tracer:
        with tracer.invoke(short):
            pass
        with tracer.invoke(long):
            pass
        invoked = tracer.result.save()
    with torch.no_grad(), lm.generate([short[0].tolist(), long[0].tolist()],
                                      past_key_values=cache(2), backend=backend,
                                      **options):
        listed = lm.generator.output.save()
    for got in (invoked, listed):
        assert all(torch.equal(got[row, -3:], want) for row, want in enumerate(expected))
