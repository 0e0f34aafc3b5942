"""Decoding step 0 of ``lm.generate`` as transformers runs it (logits of the last position
only), and lines that cannot be honoured at step 0 refused before anything runs; against
transformers' own ``generate`` with forward hooks, on the fx and hooks backends."""

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from hook_references import hooked_generate
from models import tiny_gpt2, tiny_llama

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The Eiffel Tower is in", "Hello there"]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"gpt2": tiny_gpt2(vocab_size=len(tokenizer), n_embd=32),
            "llama": tiny_llama(vocab_size=len(tokenizer))}


def _appends_output(seen: list):
    """A forward hook appending a copy of its module's output to ``seen``."""
    return lambda module, args, output: seen.append(output.clone())


def _head_outputs(model, tokenizer, **options):
    """What transformers' ``generate`` gives ``lm_head`` at each step (a forward hook)."""
    seen = []
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    hooked_generate(model, **encoded, do_sample=False, **options,
                    hooks={"lm_head": _appends_output(seen)})
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_step_0_logits_are_the_last_positions_as_generate_keeps_them(models, tokenizer,
                                                                    name, backend):
    """``generate`` passes ``logits_to_keep=1``: at step 0 the logits hold the prompts'
    last position only. Their shape read while recording is that one (was the prompt's
    length, 15, silently), and ``.token[-1]`` / ``[:, -1]`` of ``lm_head.output`` and of
    ``lm.output.logits`` are transformers' own."""
    model = models[name]
    lm = LanguageModel(model, tokenizer=tokenizer)
    seen = _head_outputs(model, tokenizer, max_new_tokens=3)
    with lm.generate(PROMPTS, max_new_tokens=3, do_sample=False, backend=backend):
        head = lm.lm_head.output
        shape = tuple(head.shape)
        last = head.token[-1].save()
        column = head[:, -1].save()
        logits = lm.output.logits.token[-1].save()
    assert shape == tuple(seen[0].shape) == (2, 1, len(tokenizer))
    for value in (last, column, logits):
        torch.testing.assert_close(value, seen[0][:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read", ["head", "logits"])
def test_a_token_of_the_prompt_in_step_0_logits_is_refused_before_running(
        models, tokenizer, backend, read):
    """``logits.token[0]`` at step 0 would be the prompt's first token, which
    ``generate``'s logits do not hold (one position per step): a TokenIndexError naming
    the line before anything runs (was: torch's IndexError from inside the run, the
    model already called)."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    calls = []
    handle = model.transformer.h[0].register_forward_hook(lambda *args: calls.append(1)) \
        if backend == "hooks" else None  # (fx would run it as a model it cannot capture)
    state = torch.get_rng_state()
    try:
        with pytest.raises(fxsight.TokenIndexError, match=r"logits_to_keep") as caught:
            with lm.generate(PROMPTS, max_new_tokens=3, do_sample=True, backend=backend):
                if read == "head":
                    lm.lm_head.output.token[0].save()  # the first token
                else:
                    lm.output.logits.token[0].save()  # the first token
    finally:
        if handle is not None:
            handle.remove()
    assert "# the first token" in str(caught.value) and "[:, -1]" in str(caught.value)
    assert isinstance(caught.value, IndexError)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edits_later_call_under_generate_is_refused_before_anything_runs(
        models, tokenizer, backend):
    """An edit's bounded ``tracer.iter`` loop counts a module's calls in one forward
    pass, which a decoding step has one of: refused naming the edit's line before any
    step runs, on hooks too (was: after step 0 had run and sampled, RNG advanced)."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    with lm.edit() as (tracer, edited):
        for _ in tracer.iter[:2]:
            lm.transformer.h[0].output[0][:] = 0  # the edit's line
    calls = []
    handle = model.transformer.h[1].register_forward_hook(lambda *args: calls.append(1)) \
        if backend == "hooks" else None
    state = torch.get_rng_state()
    try:
        with pytest.raises(fxsight.TraceError, match=r"model\.edit\(\)'s") as caught:
            with edited.generate(PROMPTS[0], max_new_tokens=3, do_sample=True,
                                 backend=backend):
                pass
    finally:
        if handle is not None:
            handle.remove()
    assert "the edit's line" in str(caught.value)
    assert "no output call #1" in str(caught.value)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_0_with_a_cache_is_the_tokens_after_the_caches(models, tokenizer, backend):
    """``generate(ids, past_key_values=cache)`` takes the whole sequence; its step 0
    computes the tokens after the cache's. A shape read there is that step's (was the
    whole sequence's, 4 tokens longer, silently), ``.token[i]`` counts the prompt's tokens
    (``.token[4]`` is the first after a cache of 4, as transformers' own step 0 has it),
    and ``.token[0]``, held in the cache, is a TokenIndexError before anything runs (was
    an IndexError from inside the run)."""
    from transformers import DynamicCache
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = tokenizer(["The Eiffel Tower is in the city of"], return_tensors="pt")["input_ids"]

    def cache():
        made = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :4], past_key_values=made, use_cache=True)
        return made

    given = cache()
    seen = []
    want = hooked_generate(model, ids, past_key_values=given, max_new_tokens=2,
                           do_sample=False, hooks={"transformer.h.0": _appends_output(seen)})
    with lm.generate(ids, past_key_values=cache(), max_new_tokens=2, do_sample=False,
                     backend=backend) as tracer:
        hidden = lm.transformer.h[0].output
        shape = tuple(hidden.shape)
        first = hidden.token[4].save()
        last = hidden.token[-1].save()
        got = tracer.result.save()
    assert shape == tuple(seen[0].shape) == (1, ids.shape[1] - 4, model.config.n_embd)
    torch.testing.assert_close(first, seen[0][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(last, seen[0][:, -1], rtol=0, atol=0)
    assert torch.equal(got, want)
    calls, given = [], cache()
    handle = model.transformer.h[1].register_forward_hook(lambda *args: calls.append(1)) \
        if backend == "hooks" else None
    try:
        with pytest.raises(fxsight.TokenIndexError, match="cache") as caught:
            with lm.generate(ids, past_key_values=given, max_new_tokens=2,
                             do_sample=False, backend=backend):
                lm.transformer.h[0].output.token[0].save()  # a cached token
    finally:
        if handle is not None:
            handle.remove()
    assert "# a cached token" in str(caught.value) and calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_invokes_step_0_with_a_cache_is_its_rows_after_the_caches(models, tokenizer,
                                                                     backend):
    """Invokes of one length continuing a cache of two rows: a shape read inside an
    invoke is its first step's, with its rows of the cache (was the whole sequence's),
    and its saves are its rows of transformers' own batched generate."""
    from transformers import DynamicCache
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    past = tokenizer("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.cat([past, tokenizer(word, return_tensors="pt")["input_ids"]], 1)
                     for word in (" Paris", " Rome")])

    def cache():
        made = DynamicCache(config=model.config)
        with torch.no_grad():
            model(past.repeat(2, 1), past_key_values=made, use_cache=True)
        return made

    given = cache()
    seen = []
    want = hooked_generate(model, ids, attention_mask=torch.ones_like(ids),
                           past_key_values=given, max_new_tokens=2, do_sample=False,
                           hooks={"transformer.h.0": _appends_output(seen)})
    with lm.generate(past_key_values=cache(), max_new_tokens=2, do_sample=False,
                     backend=backend) as tracer:
        with tracer.invoke(ids[:1]):
            pass
        with tracer.invoke(ids[1:]):
            shape = tuple(lm.transformer.h[0].output.shape)
            last = lm.transformer.h[0].output.token[-1].save()
        got = tracer.result.save()
    assert shape == (1, ids.shape[1] - past.shape[1], model.config.n_embd)
    torch.testing.assert_close(last, seen[0][1:, -1], rtol=0, atol=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read", ["token", "column", "tuple", "all steps", "write"])
@pytest.mark.parametrize("options", [{"do_sample": True},
                                     {"do_sample": False, "num_beams": 2},
                                     {"do_sample": True, "num_return_sequences": 3}],
                         ids=["sampling", "beams", "sequences"])
def test_an_index_out_of_range_at_step_0_is_refused_before_running(models, tokenizer,
                                                                  backend, read, options):
    """An index past the first step's values (``.token[7]`` of a 3-token prompt,
    ``[:, 9]`` of 3 positions, in ``tracer.all()`` too, or a write there) is the same
    error on both backends, naming the line, before the model runs: on hooks it was
    torch's IndexError from inside step 0 (the model called, the line unnamed), as the
    fx backend's splice of step 0 raises it (ShapeIndexError / TokenIndexError). Also
    where ``generate`` runs each prompt as several rows (beams, sequences): the hooks
    backend did not check those (torch's IndexError from inside step 0)."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = torch.tensor([[5, 6, 7]])
    calls = []
    handle = model.transformer.wte.register_forward_hook(lambda *args: calls.append(1)) \
        if backend == "hooks" else None  # (fx would run it as a model it cannot capture)
    state = torch.get_rng_state()
    kind = fxsight.TokenIndexError if read == "token" else fxsight.ShapeIndexError
    try:
        with pytest.raises(kind) as caught:
            with lm.generate(ids, max_new_tokens=3, backend=backend,
                             **options) as tracer:
                block = lm.transformer.h[0]
                if read == "token":
                    block.output.token[7].save()  # out of range
                elif read == "column":
                    block.output[:, 9].save()  # out of range
                elif read == "tuple":
                    block.attn.output[0][:, 9].save()  # out of range
                elif read == "all steps":
                    with tracer.all():
                        block.output[:, 9].save()  # out of range
                else:
                    block.output[:, 9] = 0  # out of range
    finally:
        if handle is not None:
            handle.remove()
    assert isinstance(caught.value, IndexError) and "# out of range" in str(caught.value)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beams_step_0_edits_that_fit_run_as_hooks_give_them(models, tokenizer, backend):
    """With beams, step 0 runs each prompt row as ``num_beams`` rows: an edit of the
    first step that fits those rows (checked on them before running, on hooks too) gives
    what a forward pre-hook adding the same vector to block 1's input at step 0 gives."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    vector = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(3))
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    calls = []

    def steer(module, args):
        calls.append(1)
        if len(calls) == 1:
            return (args[0] + vector, *args[1:])
        return None

    handle = model.transformer.h[1].register_forward_pre_hook(steer)
    try:
        with torch.no_grad():
            want = model.generate(**encoded, do_sample=False, num_beams=2, max_new_tokens=3)
    finally:
        handle.remove()
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=3, do_sample=False,
                                      num_beams=2, backend=backend):
        lm.transformer.h[0].output[:] += vector
        ids = lm.generator.output.save()
    assert torch.equal(ids, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"do_sample": False, "num_beams": 2},
                                     {"do_sample": True, "num_return_sequences": 3}],
                         ids=["beams", "sequences"])
def test_step_0_shape_reads_count_the_rows_generate_runs(models, tokenizer, backend,
                                                         options):
    """With beams or several sequences, step 0 runs each prompt as several rows: a shape
    read while recording is of those rows (it was the prompts' own, 2 rows for 4 or 6),
    so a loop over ``h.shape[0]`` edits every row, as a forward hook on transformers'
    ``generate`` does (it edited the first prompt's rows only, silently)."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    vector = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(5))
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    rows = len(PROMPTS) * max(options.get("num_beams", 1),
                              options.get("num_return_sequences", 1))
    calls = []

    def steer(module, args, output):
        calls.append(output.shape[0])
        if len(calls) == 1:
            output = output.clone()
            output[:, -1] += vector
            return output
        return None

    handle = model.transformer.h[0].register_forward_hook(steer)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            want = model.generate(**encoded, max_new_tokens=3, **options)
    finally:
        handle.remove()
    assert calls[0] == rows
    torch.manual_seed(0)
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=3, backend=backend,
                                      **options):
        h = lm.transformer.h[0].output
        count = h.shape[0]
        for row in range(count):
            h[row, -1] += vector
        ids = lm.generator.output.save()
    assert count == rows
    assert torch.equal(ids, want)
