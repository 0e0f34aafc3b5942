"""LanguageModel: loading (meta device, dispatch, offline), text and token inputs, left-padded
batching that leaves every row equal to its prompt run alone, token indexing, patching.

Every expected value comes from plain PyTorch / transformers (forward hooks written here by
hand, the model run on one prompt at a time), never from fxsight itself.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import fxsight
from fxsight import LanguageModel, ShapeError, TraceError
from fxsight.generate.steps import CACHE
from models import saved_language_model, tiny_gpt2, tiny_llama, train_tokenizer

ATOL = 1e-5
PROMPT_A = "The Eiffel Tower is in the city of"
PROMPT_B = "Big Ben"
PROMPT_C = "The capital of France is Paris"
IDS_D = [5, 17, 42, 8]


# --- fixtures and plain-PyTorch references -------------------------------------------------
def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _block_envoys(lm):
    return lm.transformer.h if hasattr(lm._module, "transformer") else lm.model.layers


@pytest.fixture(scope="module")
def models(tokenizer):
    """kind -> (LanguageModel, the plain module it wraps); shared so captures are reused."""
    built = {}
    for kind, build in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        module = build(vocab_size=len(tokenizer))
        built[kind] = (LanguageModel(module, tokenizer=tokenizer), module)
    return built


def _ids(tokenizer, prompt) -> list[int]:
    return prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]


def alone(model, ids: list[int]):
    """Plain PyTorch, one prompt alone: (logits, [every block's output]) without batch dim."""
    outputs = []
    handles = [block.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone()))
               for block in _blocks(model)]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[0], [o[0] for o in outputs]


def padded_batch(tokenizer, prompts):
    """A left-padded batch built by hand: ids, mask and positions counting real tokens."""
    rows = [_ids(tokenizer, p) for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, [len(r) for r in rows]


# --- batched vs unbatched ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_each_invoke_equals_its_prompts_run_alone(models, tokenizer, kind, backend):
    lm, model = models[kind]
    invokes = [PROMPT_A, [PROMPT_B, PROMPT_C], IDS_D]
    layers = len(_blocks(model))
    saved = {}
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        for k, prompt in enumerate(invokes):
            with tracer.invoke(prompt):
                for layer in range(layers):
                    saved[k, layer] = _block_envoys(lm)[layer].output.save()
                saved[k, "logits"] = lm.lm_head.output.save()
                saved[k, "last"] = lm.lm_head.output.t[-1].save()
                saved[k, "first"] = _block_envoys(lm)[0].output.token[0].save()
    assert tracer.backend == backend
    rows = [(0, 0, PROMPT_A), (1, 0, PROMPT_B), (1, 1, PROMPT_C), (2, 0, IDS_D)]
    lengths = {len(_ids(tokenizer, p)) for _, _, p in rows}
    assert len(lengths) == 4, "the prompts must have different lengths"
    width = max(lengths)
    for k, row, prompt in rows:
        logits, hidden = alone(model, _ids(tokenizer, prompt))
        n = logits.shape[0]
        assert saved[k, "logits"].shape[1] == width  # padded to the longest prompt
        torch.testing.assert_close(saved[k, "logits"][row, -n:], logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(saved[k, "last"][row], logits[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(saved[k, "first"][row], hidden[0][0], atol=ATOL, rtol=0)
        for layer in range(layers):
            torch.testing.assert_close(saved[k, layer][row, -n:], hidden[layer],
                                       atol=ATOL, rtol=0)


def test_result_and_model_output(models, tokenizer):
    lm, model = models["gpt2"]
    logits, _ = alone(model, _ids(tokenizer, PROMPT_A))
    with torch.no_grad(), lm.trace(PROMPT_A) as tracer:
        out = lm.output.save()
        res = tracer.result.logits.save()
    torch.testing.assert_close(out.logits[0], logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(res[0], logits, atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace(PROMPT_A) as tracer:
        pass
    torch.testing.assert_close(tracer.result.logits[0], logits, atol=ATOL, rtol=0)
    # transformers' default call: the output holds the cache, as the plain model's does
    with torch.no_grad():
        expected = getattr(model(torch.tensor([_ids(tokenizer, PROMPT_A)])), CACHE)
    cache = getattr(tracer.result, CACHE)
    assert type(cache) is type(expected) and cache.get_seq_length() == expected.get_seq_length()
    for got, want in zip(cache.layers, expected.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


# --- patching -----------------------------------------------------------------------------------
def _hook_patch(model, clean, corrupt, layer, position):
    """Hand-written reference: one batched forward [clean; corrupt] whose block ``layer``
    output gets row 0's ``position`` copied into row 1."""
    def patch(module, args, output):
        output = output.clone()
        output[1, position] = output[0, position]
        return output

    handle = _blocks(model)[layer].register_forward_hook(patch)
    try:
        with torch.no_grad():
            return model(torch.tensor([clean, corrupt]), use_cache=False).logits[1]
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_patching_every_layer_and_position_equals_forward_hooks(models, backend):
    lm, model = models["gpt2"]
    clean = [5, 17, 42, 8, 23, 61, 30, 12]
    corrupt = [5, 17, 77, 8, 23, 61, 30, 12]
    for layer in range(len(_blocks(model))):
        for position in range(len(clean)):
            with torch.no_grad(), lm.trace(backend=backend) as tracer:
                with tracer.invoke(clean):
                    h = lm.transformer.h[layer].output[:, position]
                with tracer.invoke(corrupt):
                    lm.transformer.h[layer].output[:, position] = h
                    patched = lm.lm_head.output.save()
            assert tracer.backend == backend
            expected = _hook_patch(model, clean, corrupt, layer, position)
            torch.testing.assert_close(patched[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_patching_by_token_between_prompts_of_different_lengths(models, tokenizer, kind):
    """Clean and corrupted prompts of different lengths, patched at their last token with
    ``.t[-1]``; the reference pads by hand and patches with a forward hook."""
    lm, model = models[kind]
    clean, corrupt = PROMPT_A, "The Colosseum is in the city of"
    ids, mask, positions, lengths = padded_batch(tokenizer, [clean, corrupt])
    assert lengths[0] != lengths[1]
    layer = 1
    with torch.no_grad(), lm.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            h = _block_envoys(lm)[layer].output.t[-1].save()
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            _block_envoys(lm)[layer].output.t[-1] = h
            logits = lm.lm_head.output.t[-1].save()

    def patch(module, args, output):
        output = output.clone()
        output[1, -1] = output[0, -1]
        return output

    handle = _blocks(model)[layer].register_forward_hook(patch)
    try:
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, position_ids=positions,
                             use_cache=False).logits[1, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    _, hidden = alone(model, _ids(tokenizer, clean))
    torch.testing.assert_close(h[0], hidden[layer][-1], atol=ATOL, rtol=0)


# --- loading --------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    """No network: the hub's offline switches on, and any socket connection raises."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    return saved_language_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


def test_meta_model_prints_structure_and_dispatches_on_first_use(saved_gpt2, offline, tokenizer):
    lm = LanguageModel(saved_gpt2)
    assert not lm.dispatched
    assert all(p.is_meta for p in lm._module.parameters())
    text = repr(lm)
    assert text.startswith("GPT2LMHeadModel(") and "(h): ModuleList" in text
    assert "(lm_head): Linear(in_features=64, out_features=128" in text
    assert lm.config.n_layer == 2  # attribute fall-through, before any weight is loaded
    assert lm.tokenizer.padding_side == "left"
    block = lm.transformer.h[1]  # an envoy cached while the model is on meta
    with torch.no_grad(), lm.trace(PROMPT_A):
        h = lm.transformer.h[1].output.save()
        logits = lm.lm_head.output.save()
    assert lm.dispatched
    assert not any(p.is_meta for p in lm._module.parameters())
    assert block._module is lm._module.transformer.h[1]  # refreshed, not stale
    assert not block.ln_1.weight.is_meta
    reference = AutoModelForCausalLM.from_pretrained(saved_gpt2)
    expected_logits, hidden = alone(reference, _ids(tokenizer, PROMPT_A))
    torch.testing.assert_close(logits[0], expected_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(h[0], hidden[1], atol=ATOL, rtol=0)


def test_load_offline_with_dispatch_kwargs_and_to(saved_gpt2, offline, tokenizer):
    lm = LanguageModel(saved_gpt2, dispatch=True, device_map="cpu", dtype=torch.float64)
    assert lm.dispatched
    assert next(lm._module.parameters()).dtype == torch.float64
    assert lm.to(torch.float32) is lm
    assert next(lm._module.parameters()).dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(saved_gpt2)
    expected, _ = alone(reference, _ids(tokenizer, PROMPT_B))
    with torch.no_grad(), lm.trace(PROMPT_B):
        logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    lazy = LanguageModel(saved_gpt2)
    assert lazy.to("cpu") is lazy and lazy.dispatched  # moving needs the real weights


def test_saved_llama_with_its_tokenizer(tmp_path, offline):
    path = saved_language_model(tmp_path, "llama")
    lm = LanguageModel(path)
    assert "LlamaForCausalLM(" in repr(lm) and not lm.dispatched
    with torch.no_grad(), lm.trace([PROMPT_A, PROMPT_B], backend="hooks"):
        logits = lm.lm_head.output.save()
    reference = AutoModelForCausalLM.from_pretrained(path)
    for row, prompt in enumerate([PROMPT_A, PROMPT_B]):
        expected, _ = alone(reference, lm.tokenizer(prompt)["input_ids"])
        torch.testing.assert_close(logits[row, -expected.shape[0]:], expected, atol=ATOL,
                                   rtol=0)


def test_wraps_a_loaded_module(models, tokenizer):
    lm, model = models["gpt2"]
    assert lm.dispatched and lm._module is model
    assert lm.tokenizer is tokenizer and lm.config is model.config
    assert lm.to("cpu") is lm
    assert isinstance(fxsight.LanguageModel(model), LanguageModel)  # no tokenizer: ids only
    with pytest.raises(TypeError, match="LanguageModel wraps"):
        LanguageModel(42)


# --- inputs ---------------------------------------------------------------------------------------
def _input_forms(tokenizer):
    a, b = _ids(tokenizer, PROMPT_A), _ids(tokenizer, PROMPT_B)
    right = torch.tensor([b + [0] * (len(a) - len(b))])  # right-padded: kept so in a trace
    right_mask = torch.tensor([[1] * len(b) + [0] * (len(a) - len(b))])
    return [
        ("str", PROMPT_A, [a]),
        ("list of str", [PROMPT_A, PROMPT_B], [a, b]),
        ("list of ids", a, [a]),
        ("ragged list of ids", [a, b], [a, b]),
        ("1-D tensor", torch.tensor(a), [a]),
        ("2-D tensor", torch.tensor([a, a]), [a, a]),
        ("dict", {"input_ids": torch.tensor([a])}, [a]),
        ("dict, right padded", {"input_ids": right, "attention_mask": right_mask}, [b],
         True),
        ("BatchEncoding", tokenizer([PROMPT_A, PROMPT_B], return_tensors="pt", padding=True),
         [a, b]),
    ]


def test_input_forms(models, tokenizer):
    lm, model = models["gpt2"]
    for name, value, rows, *right in _input_forms(tokenizer):
        with torch.no_grad(), lm.trace(value, backend="hooks"):
            logits = lm.lm_head.output.save()
            first = lm.lm_head.output.t[0].save()
        assert logits.shape[0] == len(rows), name
        for row, ids in enumerate(rows):
            expected, _ = alone(model, ids)
            # (a right-padded input keeps its layout: its tokens first, then its pads)
            own = logits[row, :len(ids)] if right else logits[row, -len(ids):]
            torch.testing.assert_close(own, expected, atol=ATOL, rtol=0, msg=name)
            torch.testing.assert_close(first[row], expected[0], atol=ATOL, rtol=0, msg=name)


def test_input_ids_keyword_and_forward_kwargs(models, tokenizer):
    lm, model = models["gpt2"]
    ids = torch.tensor([_ids(tokenizer, PROMPT_A)])
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   backend="hooks"):
        logits = lm.lm_head.output.save()
        block_kwargs = lm.transformer.inputs.save()
    expected, _ = alone(model, ids[0].tolist())
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    assert block_kwargs[1]["use_cache"] is None  # transformers' default: as a plain call
    with torch.no_grad(), lm.trace(ids, use_cache=False, backend="hooks"):
        inner = lm.transformer.inputs.save()
    assert inner[1]["use_cache"] is False  # the user's choice
    out = lm.trace(PROMPT_A, trace=False)
    torch.testing.assert_close(out.logits[0], expected, atol=ATOL, rtol=0)


def test_explicit_position_ids_are_kept_and_padded(models, tokenizer):
    lm, model = models["gpt2"]
    a, b = _ids(tokenizer, PROMPT_A), _ids(tokenizer, PROMPT_B)
    shifted = torch.arange(len(b)).unsqueeze(0) + 7
    with torch.no_grad(), lm.trace(backend="hooks") as tracer:
        with tracer.invoke(a):
            first = lm.lm_head.output.save()
        with tracer.invoke({"input_ids": torch.tensor([b]), "position_ids": shifted}):
            second = lm.lm_head.output.save()
    with torch.no_grad():
        expected_a = model(torch.tensor([a]), use_cache=False).logits[0]
        expected_b = model(torch.tensor([b]), position_ids=shifted, use_cache=False).logits[0]
    torch.testing.assert_close(first[0], expected_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0, -len(b):], expected_b, atol=ATOL, rtol=0)


# --- token indexing ------------------------------------------------------------------------------
def test_token_indexing_per_row_of_an_invoke(models, tokenizer):
    """Rows of one invoke with different pad lengths: each row is indexed from its own
    first real token."""
    lm, model = models["gpt2"]
    prompts = [PROMPT_B, PROMPT_C]
    refs = [alone(model, _ids(tokenizer, p))[0] for p in prompts]
    with torch.no_grad(), lm.trace() as tracer:
        with tracer.invoke(PROMPT_A):
            pass
        with tracer.invoke(prompts):
            out = lm.lm_head.output
            t0, t1, last = out.t[0].save(), out.token[1].save(), out.t[-1].save()
            pair = out.t[1:3].save()
            minus = out.t[-3:-1].save()
    for row, ref in enumerate(refs):
        torch.testing.assert_close(t0[row], ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(t1[row], ref[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[row], ref[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(pair[row], ref[1:3], atol=ATOL, rtol=0)
        torch.testing.assert_close(minus[row], ref[-3:-1], atol=ATOL, rtol=0)


def test_token_write_touches_the_right_position_of_each_row(models, tokenizer):
    lm, model = models["gpt2"]
    prompts = [PROMPT_B, PROMPT_C]
    ids, mask, positions, lengths = padded_batch(tokenizer, prompts)
    with torch.no_grad(), lm.trace(prompts):
        lm.transformer.h[0].output.t[1] = 0.0
        logits = lm.lm_head.output.save()

    def zero(module, args, output):
        output = output.clone()
        for row, n in enumerate(lengths):
            output[row, ids.shape[1] - n + 1] = 0.0
        return output

    handle = model.transformer.h[0].register_forward_hook(zero)
    try:
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, position_ids=positions,
                             use_cache=False).logits
    finally:
        handle.remove()
    for row, n in enumerate(lengths):
        torch.testing.assert_close(logits[row, -n:], expected[row, -n:], atol=ATOL, rtol=0)


# --- errors: clear, naming the invoke and the line, raised before anything runs -----------------
def _traces() -> int:
    return fxsight.stats()["traces"]


def test_tokenizer_rejects_input(models):
    lm, _ = models["gpt2"]
    before = _traces()
    with pytest.raises(TraceError, match=r"invoke #1: a list input must hold .*\n.*"
                                         r"tracer\.invoke\(\[PROMPT_B, 3\]\)"):
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_A):
                lm.lm_head.output.save()
            with tracer.invoke([PROMPT_B, 3]):
                pass
    with pytest.raises(TraceError, match=r"invoke #0: cannot use a NoneType"):
        with lm.trace(None):
            pass
    with pytest.raises(TraceError, match=r"invoke #0: prompt 0 has no tokens"):
        with lm.trace(""):
            pass
    with pytest.raises(TraceError, match=r"token id 9999 is outside the model's vocabulary"):
        with lm.trace([5, 9999]):
            pass

    class Refusing:
        pad_token, eos_token, padding_side, pad_token_id = "<p>", "<e>", "left", 0

        def __call__(self, *args, **kwargs):
            raise ValueError("no thanks")

    picky = LanguageModel(lm._module, tokenizer=Refusing())
    with pytest.raises(TraceError, match=r"invoke #0: the tokenizer rejected this input "
                                         r"\(ValueError: no thanks\)\n  at .*picky\.trace"):
        with picky.trace(PROMPT_A):
            pass
    assert _traces() == before


def test_empty_prompt_list(models):
    lm, _ = models["gpt2"]
    before = _traces()
    with pytest.raises(TraceError, match=r"invoke #0: the prompt list is empty\n.*"
                                         r"tracer\.invoke\(\[\]\)"):
        with lm.trace() as tracer:
            with tracer.invoke([]):
                pass
    assert _traces() == before


def test_token_index_past_a_prompts_length(models, tokenizer):
    lm, _ = models["gpt2"]
    n = len(_ids(tokenizer, PROMPT_B))
    before = _traces()
    with pytest.raises(TraceError, match=rf"token index {n} is past the end of prompt 0 of "
                                         rf"invoke #1, which has {n} tokens\n.*\.t\[n\]"):
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_A):
                pass
            with tracer.invoke([PROMPT_B, PROMPT_C]):
                lm.lm_head.output.t[n].save()
    with pytest.raises(TraceError, match="selects a different number of tokens"):
        with lm.trace([PROMPT_B, PROMPT_C]):
            lm.lm_head.output.t[:n + 1].save()
    assert _traces() == before


def test_write_that_does_not_fit_the_invokes_rows(models):
    lm, model = models["gpt2"]
    from torch._subclasses.fake_tensor import FakeTensor

    calls = []  # real (not fake-tensor shape-probing) runs of the head
    handle = model.lm_head.register_forward_hook(
        lambda m, a, out: None if isinstance(out, FakeTensor) else calls.append(1))
    try:
        with pytest.raises(ShapeError, match=r"cannot be written into transformer\.h\.0\.output "
                                             r"of shape \(1, \d+, 64\) \(invoke #1: rows 1:2 "
                                             r"of a batch of 2\)\n.*= torch\.zeros\(2, 1, 64\)"):
            with lm.trace(backend="hooks") as tracer:
                with tracer.invoke(PROMPT_A):
                    pass
                with tracer.invoke(PROMPT_B):
                    lm.transformer.h[0].output = torch.zeros(2, 1, 64)
    finally:
        handle.remove()
    assert not calls  # the model never ran


def test_barrier_not_reached_by_every_participant(models):
    lm, _ = models["gpt2"]
    before = _traces()
    with pytest.raises(TraceError, match=r"barrier\(2\) was reached by 1 invoke\(s\) \(#1\)"
                                         r".*\n.*tracer\.barrier\(2\)"):
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(PROMPT_A):
                h = lm.transformer.h[0].output
            with tracer.invoke(PROMPT_C):
                barrier()
                lm.transformer.h[0].output.t[-1] = h[:, -1]
    assert _traces() == before


# --- property: any mix of prompt lengths, any token index --------------------------------------
_prompt = st.lists(st.integers(4, 127), min_size=1, max_size=9)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invokes=st.lists(st.lists(_prompt, min_size=1, max_size=2), min_size=1, max_size=3),
       index=st.integers(-9, 8))
def test_any_padding_keeps_rows_equal_to_their_prompts_alone(models, invokes, index):
    lm, model = models["gpt2"]
    shortest = min(len(p) for rows in invokes for p in rows)
    index = index % shortest if index >= 0 else -1 - ((-1 - index) % shortest)
    saved = {}
    with torch.no_grad(), lm.trace(backend="hooks") as tracer:
        for k, rows in enumerate(invokes):
            with tracer.invoke(rows):
                saved[k] = lm.lm_head.output.save()
                saved[k, "t"] = lm.lm_head.output.t[index].save()
    for k, rows in enumerate(invokes):
        for row, ids in enumerate(rows):
            expected, _ = alone(model, ids)
            torch.testing.assert_close(saved[k][row, -len(ids):], expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(saved[k, "t"][row], expected[index], atol=ATOL, rtol=0)


# --- a cache passed in: the input continues the cache's past tokens ------------------------------
def _continued(model, past_ids: list[int], ids: list[int]) -> torch.Tensor:
    """Plain PyTorch: the logits of ``ids`` after ``past_ids``, the whole sequence at once."""
    with torch.no_grad():
        return model(torch.tensor([past_ids + ids]), use_cache=False).logits[0, len(past_ids):]


def _past(model, past_ids: list[int], rows: int = 1):
    with torch.no_grad():
        return getattr(model(torch.tensor([past_ids] * rows), use_cache=True), CACHE)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cache_passed_in_is_the_past_of_the_input(models, tokenizer, kind, backend):
    """The mask LanguageModel makes covers the cache's tokens, as transformers needs (was:
    a mask of the input's tokens only, so the first tokens attended to too few keys: logits
    off by 0.1 on both backends, as a plain forward given that mask)."""
    lm, model = models[kind]
    past_ids, ids = _ids(tokenizer, PROMPT_A), _ids(tokenizer, " Paris")
    expected = _continued(model, past_ids, ids)
    with torch.no_grad():  # the plain forward given the cache and no mask
        plain = model(torch.tensor([ids]), **{CACHE: _past(model, past_ids)}).logits[0]
    torch.testing.assert_close(plain, expected, atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace(ids, **{CACHE: _past(model, past_ids)},
                                   backend=backend) as tracer:
        logits = lm.lm_head.output.save()
        first = lm.lm_head.output.token[0].save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(first[0], expected[0], atol=ATOL, rtol=0)
    # a mask of the past and the input's tokens in a dict, as transformers takes it
    mask = torch.ones(1, len(past_ids) + len(ids), dtype=torch.long)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": mask}
    with torch.no_grad(), lm.trace(inputs, **{CACHE: _past(model, past_ids)}, backend=backend):
        logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_invokes_of_different_lengths_continue_one_cache(models, tokenizer, backend):
    """Each invoke's rows are padded between the cache's tokens and their own, with
    positions that go on from the cache's."""
    lm, model = models["llama"]
    past_ids = _ids(tokenizer, PROMPT_A)
    long, short = _ids(tokenizer, " Paris is a city"), _ids(tokenizer, " Rome")
    assert len(long) > len(short)
    with torch.no_grad(), lm.trace(**{CACHE: _past(model, past_ids, rows=2)},
                                   backend=backend) as tracer:
        with tracer.invoke(long):
            a = lm.lm_head.output.save()
        with tracer.invoke(short):
            b = lm.lm_head.output.save()
            b_first = lm.lm_head.output.token[0].save()
    torch.testing.assert_close(a[0], _continued(model, past_ids, long), atol=ATOL, rtol=0)
    expected = _continued(model, past_ids, short)
    torch.testing.assert_close(b[0, -len(short):], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(b_first[0], expected[0], atol=ATOL, rtol=0)


# --- labels: the loss of the pairs each prompt has alone ------------------------------------------
def _loss_alone(model, rows: list[list[int]]) -> torch.Tensor:
    """Plain PyTorch: a causal LM's mean loss over every (position, next token) pair of each
    prompt run alone."""
    logits, targets = [], []
    for ids in rows:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=False).logits[0]
        logits.append(out[:-1])
        targets.append(torch.tensor(ids[1:]))
    return torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_labels_give_the_loss_of_each_prompts_own_pairs(models, tokenizer, kind, backend):
    """Padding that LanguageModel puts before a row (re-packing a right-padded row to the
    left, batching invokes of different lengths) adds no (pad, first token) pair to the
    loss (was: the label of a row's first token was predicted from the pad before it: a
    right-padded batch's loss differed from the plain forward's given the same labels)."""
    lm, model = models[kind]
    prompts = [PROMPT_A, PROMPT_B, PROMPT_C]
    rows = [_ids(tokenizer, p) for p in prompts]
    expected = _loss_alone(model, rows)
    right = train_tokenizer()
    right.padding_side = "right"
    encoded = right(prompts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**encoded, labels=labels, use_cache=False).loss
    torch.testing.assert_close(plain, expected, atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace(dict(encoded, labels=labels), backend=backend) as tracer:
        pass
    torch.testing.assert_close(tracer.result.loss, expected, atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        for ids in rows:
            with tracer.invoke({"input_ids": [ids], "labels": [ids]}):
                pass
    torch.testing.assert_close(tracer.result.loss, expected, atol=ATOL, rtol=0)


# --- position_ids as transformers takes them ---------------------------------------------------
def test_position_ids_of_one_row_or_one_dimension(models, tokenizer):
    """``position_ids`` beside a prompt as a 1-D tensor, or as one row for every row of an
    input, are taken as transformers takes them (was: an IndexError naming no line for
    the 1-D form beside text); a shape that fits no row is a TraceError at the line."""
    lm, model = models["gpt2"]
    ids = _ids(tokenizer, PROMPT_C)
    positions = torch.arange(3, 3 + len(ids))
    with torch.no_grad():
        expected = model(torch.tensor([ids]), position_ids=positions, use_cache=False).logits
    for backend in ("fx", "hooks"):
        with torch.no_grad(), lm.trace(PROMPT_C, position_ids=positions, backend=backend):
            logits = lm.output.logits.save()
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    rows = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        expected = model(rows, position_ids=positions[None], use_cache=False).logits
        with lm.trace(rows, position_ids=positions[None]):
            logits = lm.output.logits.save()
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(TraceError, match=r"position_ids has shape \(3,\)") as info:
        with lm.trace(PROMPT_C, position_ids=torch.arange(3)):  # the line named
            lm.output.save()
    assert "the line named" in str(info.value)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_continuing_the_cache_of_a_padded_batch(models, tokenizer, kind, backend):
    """The cache of prompts of different lengths (its rows' positions counting their real
    tokens), continued with the mask of its tokens and the new ones, with positions
    counted from it or without position_ids (fxsight remembers that its trace made the
    cache counting real tokens): each row goes on from its own real tokens, as the whole
    sequence run alone. A plain forward's cache of the same batch (its tokens at their
    columns), continued without position_ids, is the plain call on the same inputs."""
    lm, model = models[kind]
    a, b = _ids(tokenizer, PROMPT_A), _ids(tokenizer, PROMPT_B)
    caches = []
    for _ in range(2):
        with torch.no_grad(), lm.trace([a, b], use_cache=True, backend=backend):
            caches.append(getattr(lm.output, CACHE).save())
    width = caches[0].get_seq_length()
    new = _ids(tokenizer, " Paris")
    mask = torch.tensor([[1] * (width + len(new)),
                         [0] * (width - len(b)) + [1] * (len(b) + len(new))])
    inputs = {"input_ids": torch.tensor([new, new]), "attention_mask": mask}
    positions = (mask.cumsum(-1) - 1)[:, -len(new):]
    with torch.no_grad(), lm.trace(inputs, position_ids=positions, **{CACHE: caches[0]},
                                   backend=backend):
        logits = lm.output.logits.save()
    for row, ids in enumerate([a, b]):
        torch.testing.assert_close(logits[row], _continued(model, ids, new), atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace(inputs, **{CACHE: caches[1]}, backend=backend):
        logits = lm.output.logits.save()
    for row, ids in enumerate([a, b]):
        torch.testing.assert_close(logits[row], _continued(model, ids, new), atol=ATOL, rtol=0)
    past_ids = torch.tensor([a, [0] * (width - len(b)) + b])
    with torch.no_grad():
        cache = getattr(model(past_ids, attention_mask=mask[:, :width], use_cache=True), CACHE)
        plain = model(**inputs, **{CACHE: copy.deepcopy(cache)}).logits
    with torch.no_grad(), lm.trace(inputs, **{CACHE: cache}, backend=backend):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)


def test_the_facts_of_rows_and_of_unpadded_ids_are_those_of_their_tensors():
    """The token facts found without tensors (rows of Python ids, ragged or not: read from
    the lists) or without reading a mask (ids under a mask of ones the wrapper made) are
    those read from the ids and mask tensors the wrapper builds (was: a ragged list's rows
    taken as unpadded, their position ids not counting real tokens). Unpadded ids leave
    their range to be read with the other invokes' (``id_ranges``), which finds it too."""
    from fxsight.api.token_rows import id_ranges, row_facts, token_facts, unpadded_facts

    for rows, pad in (([[5, 6, 7]], 0), ([[5, 6, 7], [9]], 0), ([[5, 6], [3, 4]], 0),
                      ([[5, 6, 7], [9]], 11), ([[7]], 2)):
        length = max(map(len, rows))
        ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        assert row_facts(rows, pad) == token_facts(ids, mask)[0], (rows, pad)
    pairs = []
    for ids in (torch.tensor([[5, 6, 7]]), torch.tensor([[0, 9], [3, 1]])):
        facts, read = unpadded_facts(ids), token_facts(ids, torch.ones_like(ids))[0]
        assert facts.low is facts.high is None
        assert facts._replace(low=read.low, high=read.high) == read
        pairs.append((torch.stack([ids.min(), ids.max()]), (read.low, read.high)))
    assert id_ranges([extremes for extremes, _ in pairs]) == [found for _, found in pairs]
