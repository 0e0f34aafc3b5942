"""``lm.generate`` with a cache of a shared prefix and prompts of different lengths (a
ragged list, invokes of different lengths, right-padded rows): the batch is laid out
``[the cache's columns][pads][each prompt's own tokens]``, so every row generates what
transformers' own ``generate`` gives that prompt alone with a copy of the cache; against
it (ids equal, step logits close), on the fx and hooks backends, GPT-2 and a tiny Llama
(rotary positions). What cannot be laid out so is refused before anything runs."""

import pytest
import torch
from transformers import DynamicCache, GPT2LMHeadModel

import fxsight
from fxsight import LanguageModel
from models import tiny_gpt2, tiny_llama

BACKENDS = ["fx", "hooks"]
PREFIX = "The Eiffel Tower is in"
ENDINGS = [" Paris", " the city of Rome is", " a"]
NEW = 3


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"gpt2": tiny_gpt2(vocab_size=len(tokenizer), n_embd=32),
            "llama": tiny_llama(vocab_size=len(tokenizer), hidden_size=32,
                                intermediate_size=64)}


def _prefix(tokenizer) -> torch.Tensor:
    return tokenizer(PREFIX, return_tensors="pt")["input_ids"]


def _prompts(tokenizer) -> list[torch.Tensor]:
    """Each prompt's ids: the prefix's, then its own."""
    prefix = _prefix(tokenizer)[0]
    return [torch.cat([prefix, torch.tensor(tokenizer(e)["input_ids"])]) for e in ENDINGS]


def _cache(model, tokenizer, rows: int) -> DynamicCache:
    """The prefix run once, its cache expanded to ``rows`` rows."""
    made = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_prefix(tokenizer), past_key_values=made, use_cache=True)
    made.batch_repeat_interleave(rows)
    return made


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _alone(model, tokenizer, ids: torch.Tensor, steer: torch.Tensor | None = None):
    """Transformers' own greedy ``generate`` of one prompt with a copy of the prefix's
    cache: its sequences, step logits, and block 0's output at step 0 (with ``steer``
    added to its last position at every step by a forward hook)."""
    seen = []

    def hook(module, args, output):
        if steer is not None:
            output = output.clone()
            output[:, -1] += steer
        seen.append(output.clone())
        return output

    cache = _cache(model, tokenizer, 1)
    handle = _blocks(model)[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.generate(ids[None], past_key_values=cache,
                                 max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    return out.sequences[0, ids.shape[0]:], torch.cat(out.logits), seen[0]


def _generate(lm, tokenizer, form: str, backend: str, steer: torch.Tensor | None = None):
    """fxsight's generate of the prompts in one batch (``form``: one ragged list, one
    invoke each, or right-padded rows with their mask): its ids, and per row its step
    logits and block 0's ``.token[-1]`` / first token after the cache at step 0."""
    prompts = _prompts(tokenizer)
    past = _prefix(tokenizer).shape[1]
    cache = _cache(lm._module, tokenizer, len(prompts))
    options = dict(past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                   do_sample=False, backend=backend)
    block = _blocks(lm)[0]
    reads = []

    def body(tracer):
        with tracer.all():
            if steer is not None:
                block.output[:, -1] += steer
            logits = lm.lm_head.output[:, -1].save()
        reads.append((block.output.token[-1].save(), block.output.token[past].save()))
        return logits

    if form == "invokes":
        with lm.generate(**options) as tracer:
            logits = []
            for ids in prompts:
                with tracer.invoke([ids.tolist()]):
                    logits.append(body(tracer))
            out = tracer.result.save()
        logits = [torch.stack(step)[:, 0] for step in logits]
        reads = [(last[0], first[0]) for last, first in reads]
    else:
        if form == "list":
            given = [ids.tolist() for ids in prompts]
        else:  # right-padded rows and their mask, as a tokenizer padding on the right
            width = max(len(ids) for ids in prompts)
            given = {"input_ids": torch.stack([torch.cat([ids, ids.new_zeros(
                width - len(ids))]) for ids in prompts]),
                "attention_mask": torch.stack([torch.arange(width) < len(ids)
                                               for ids in prompts]).long()}
        with lm.generate(given, **options) as tracer:
            steps = body(tracer)
            out = tracer.result.save()
        logits = list(torch.stack(steps).transpose(0, 1))
        last, first = reads[0]
        reads = list(zip(last, first))
    return out, logits, reads, cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["list", "invokes", "right"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_prompts_of_different_lengths_continue_a_prefix_cache_as_each_alone(
        models, tokenizer, name, form, backend):
    """Every row's new tokens and step logits are transformers' own for that prompt
    alone with the prefix's cache (was: refused before running, a TraceError), block 0's
    ``.token[-1]`` and first token after the cache at step 0 its values, with a
    steering vector added to the last position at every step."""
    model = models[name]
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(model.config.hidden_size if name == "llama" else model.config.n_embd,
                        generator=torch.Generator().manual_seed(1))
    prompts = _prompts(tokenizer)
    out, logits, reads, _ = _generate(lm, tokenizer, form, backend, steer)
    width = max(len(ids) for ids in prompts)
    for row, ids in enumerate(prompts):
        tokens, want_logits, hidden = _alone(model, tokenizer, ids, steer)
        assert torch.equal(out[row, width:], tokens)
        torch.testing.assert_close(logits[row], want_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(reads[row][0], hidden[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(reads[row][1], hidden[0, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cache_given_is_left_as_transformers_generate_leaves_it(models, tokenizer,
                                                                    backend):
    """``generate`` extends the cache object it is given: after fxsight's generate the
    cache passed holds what a plain ``model.generate`` of the same layout leaves in its
    own (the cache's columns, the pads, the prompts', the new tokens but the last), and
    the ids are that call's."""
    model = models["llama"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = _prompts(tokenizer)
    past = _prefix(tokenizer).shape[1]
    width = max(len(ids) for ids in prompts)
    ids = torch.stack([torch.cat([ids[:past], ids.new_zeros(width - len(ids)), ids[past:]])
                       for ids in prompts])
    mask = torch.stack([torch.cat([torch.ones(past), torch.zeros(width - len(ids)),
                                   torch.ones(len(ids) - past)]) for ids in prompts]).long()
    plain = _cache(model, tokenizer, len(prompts))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, past_key_values=plain,
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    out, _, _, given = _generate(lm, tokenizer, "list", backend)
    assert torch.equal(out, want)
    assert given.get_seq_length() == plain.get_seq_length() == width + NEW - 1
    for mine, theirs in zip(given.layers, plain.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-6, rtol=0)


def _counting(model, backend: str):
    """A forward hook counting block 0's calls (on hooks only: on fx a model with a hook
    of the user's is not captured; there the cache's length tells no step ran)."""
    calls = []
    if backend != "hooks":
        return calls, None
    handle = _blocks(model)[0].register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


class _NoPositions(GPT2LMHeadModel):
    """A GPT-2 whose forward takes no position_ids (``generate`` gives it none)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_cannot_be_laid_out_after_the_cache_is_refused_before_running(
        models, tokenizer, backend):
    """Refused naming the line, the model never called: a model whose forward takes no
    position_ids (its positions would count the pads), a mask that pads the cache's
    columns (a cache of padded rows), a prompt no longer than the cache."""
    prompts = _prompts(tokenizer)
    past = _prefix(tokenizer).shape[1]
    model = models["gpt2"]
    plain = _NoPositions(model.config).eval()
    plain.load_state_dict(model.state_dict())
    cases = [
        (plain, [ids.tolist() for ids in prompts], "takes no position_ids"),
        (model, {"input_ids": torch.stack([prompts[0], prompts[0]]),
                 "attention_mask": torch.tensor([[1] * len(prompts[0]),
                                                 [0] + [1] * (len(prompts[0]) - 1)])},
         "pads row 1 within its first"),
        (model, [prompts[0].tolist(), prompts[0][:past].tolist()],
         f"has {past} tokens, not more than the cache's {past}"),
    ]
    for module, given, message in cases:
        lm = LanguageModel(module, tokenizer=tokenizer)
        cache = _cache(module, tokenizer, len(given) if isinstance(given, list) else 2)
        calls, handle = _counting(module, backend)
        try:
            with pytest.raises(fxsight.TraceError, match=message) as caught:
                with lm.generate(given, past_key_values=cache,  # the line
                                 max_new_tokens=NEW, backend=backend):
                    lm.generator.output.save()
        finally:
            if handle is not None:
                handle.remove()
        assert "# the line" in str(caught.value) and calls == []
        assert cache.get_seq_length() == past


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cached_token_of_a_shorter_invoke_is_refused(models, tokenizer, backend):
    """``.token[i]`` of a token the cache holds, in an invoke shorter than another: its
    row's position there is a pad's of the batch (step 0 computes the tokens after the
    cache's), so a TokenIndexError naming the line before anything runs, not a pad's
    value."""
    model = models["gpt2"]
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = _prompts(tokenizer)
    past = _prefix(tokenizer).shape[1]
    cache = _cache(model, tokenizer, 2)
    calls, handle = _counting(model, backend)
    try:
        with pytest.raises(fxsight.TokenIndexError, match="cache") as caught:
            with lm.generate(past_key_values=cache, max_new_tokens=NEW,
                             backend=backend) as tracer:
                with tracer.invoke([prompts[1].tolist()]):
                    pass
                with tracer.invoke([prompts[0].tolist()]):
                    _blocks(lm)[0].output.token[past - 1].save()  # a cached token
    finally:
        if handle is not None:
            handle.remove()
    assert "# a cached token" in str(caught.value) and calls == []
    assert cache.get_seq_length() == past
