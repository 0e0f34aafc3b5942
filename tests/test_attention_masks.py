"""Attention as the eager forward runs it (``splice.attention_masks``).

Eagerly, transformers calls ``scaled_dot_product_attention`` with ``is_causal=True`` and no
mask where no token is padded; the captured graph builds the mask it needs under
``torch.export`` and masks every call. Rewritten eager graphs make the eager forward's
calls again where that is exact: the same attention kernels with the same arguments,
bit-equal results, and the model's mask wherever a row is padded or an intervention
writes or edits the mask.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fxsight
from fxsight import LanguageModel, NNsight
from hook_references import hooked_logits
from models import tiny_gpt2, tiny_llama

# the kernel both paths reach on CPU: (query, key, value, dropout_p, is_causal, attn_mask)
KERNEL = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class AttentionCalls(TorchDispatchMode):
    """Records ``(is_causal, masked)`` of every attention kernel call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is KERNEL:
            is_causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)
            mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
            self.calls.append((bool(is_causal), mask is not None))
        return func(*args, **kwargs)


MODELS = {"gpt2": (tiny_gpt2, "transformer.h"), "llama": (tiny_llama, "model.layers")}


def _model(name, tokenizer):
    return MODELS[name][0](vocab_size=len(tokenizer))


def _plain(model, tokenizer, prompts):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with AttentionCalls() as seen, torch.no_grad():
        logits = model(**encoded, use_cache=False).logits
    return logits, seen.calls


def _traced(lm, prompts, **options):
    """The trace's logits, attention calls and tracer; the calls of a second run (a first
    one also captures the model, whose tracing reaches the recorder)."""
    for _ in range(2):
        with AttentionCalls() as seen:
            with lm.trace(prompts, use_cache=False, **options) as tracer:
                logits = lm.output.logits.save()
    return logits, seen.calls, tracer


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_unpadded_rows_attend_as_the_eager_forward(name, tokenizer):
    model = _model(name, tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = ["The Eiffel Tower is in", "The Colosseum is in a"]
    prompts = [p for p in prompts if len(tokenizer(p)["input_ids"]) ==
               len(tokenizer(prompts[0])["input_ids"])] or prompts[:1]
    expected, plain_calls = _plain(model, tokenizer, prompts)
    before = fxsight.stats().get("masks_elided", 0)
    logits, calls, tracer = _traced(lm, prompts, backend="fx")
    assert tracer.backend == "fx"
    assert plain_calls == [(True, False)] * model.config.num_hidden_layers
    assert calls == plain_calls
    assert torch.equal(logits, expected)
    assert "scaled_dot_product_attention" in tracer.graph_module.code
    assert fxsight.stats().get("masks_elided", 0) >= before


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_padded_rows_keep_the_models_mask(name, tokenizer):
    model = _model(name, tokenizer)
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompts = ["The Eiffel Tower is in the city of", "Hi"]
    expected, hooks_calls, _ = _traced(lm, prompts, backend="hooks")
    logits, calls, _ = _traced(lm, prompts, backend="fx")
    assert hooks_calls == [(False, True)] * model.config.num_hidden_layers
    assert calls == hooks_calls
    assert torch.equal(logits, expected)


def test_no_mask_given_needs_no_check(tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    with AttentionCalls() as plain, torch.no_grad():
        expected = model(ids, use_cache=False).logits
    net = NNsight(model)
    for _ in range(2):  # (the first run captures: see _traced)
        with net.trace(ids, use_cache=False, backend="fx"):
            net.output.logits.save()
    with AttentionCalls() as seen:
        with net.trace(ids, use_cache=False, backend="fx") as tracer:
            logits = net.output.logits.save()
    assert seen.calls == plain.calls == [(True, False)] * 2
    assert torch.equal(logits, expected)
    assert "all_ones" not in tracer.graph_module.code


def _custom_mask(length: int) -> torch.Tensor:
    """Causal, with the first token hidden from every later query."""
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    mask[1:, 0] = False
    return mask[None, None]


def _with_mask_at_block_1(model, ids, mask):
    """The logits of a plain forward whose block 1 is called with ``mask`` (a pre-hook)."""

    def pre_hook(module, args, kwargs):
        return (args[0], args[1], mask, *args[3:]), kwargs

    return hooked_logits(model, ids, pre_hooks={"transformer.h.1": pre_hook})


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_mask_written_at_a_block_is_the_one_its_attention_uses(backend, tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    custom = _custom_mask(6).expand(2, 1, 6, 6)

    expected = _with_mask_at_block_1(model, ids, custom)
    net = NNsight(model)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        args, kwargs = net.transformer.h[1].inputs
        net.transformer.h[1].inputs = ((args[0], args[1], custom, *args[3:]), kwargs)
        logits = net.output.logits.save()
    assert tracer.backend == backend
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        unmasked = model(ids, use_cache=False).logits
    assert not torch.allclose(logits, unmasked)


def test_a_mask_edited_in_place_is_honoured(tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(2))
    custom = _custom_mask(6).expand(2, 1, 6, 6)

    expected = _with_mask_at_block_1(model, ids, custom)
    net = NNsight(model)
    with net.trace(ids, use_cache=False, backend="fx") as tracer:
        mask = net.transformer.h[1].inputs[0][2]
        mask[:, :, 1:, 0] = False  # (the graph's mask: h.0 ran before, with it unedited)
        logits = net.output.logits.save()
    assert tracer.backend == "fx"
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_compiled_traces_attend_unmasked_where_no_row_is_padded(tokenizer):
    """A compiled graph cannot read the padding masks' values: it keeps the mask, and a
    twin compiled without it runs where the padding masks are all ones (each compiled
    at its first use; results as the eager graphs')."""
    import warnings

    compiled_code = []

    def recording_backend(gm, example_inputs, **kwargs):
        compiled_code.append(gm.code)
        return gm.forward

    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    for prompts, unmasked in ((["The Eiffel Tower is in"], True),
                              (["The Eiffel Tower is in the city of", "Hi"], False)):
        eager, _, _ = _traced(lm, prompts, backend="fx")
        compiled_code.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (a compile failure would warn and run eagerly)
            for _ in range(2):  # (no dispatch mode: it stops torch.compile)
                with lm.trace(prompts, use_cache=False, backend="fx",
                              compile={"backend": recording_backend}) as tracer:
                    compiled = lm.output.logits.save()
        assert torch.equal(compiled, eager)
        assert len(compiled_code) == 1
        attention = [line for line in compiled_code[0].splitlines()
                     if "= torch.ops.aten.scaled_dot_product_attention" in line]
        assert len(attention) == model.config.n_layer
        assert all(("is_causal = True" in line) is unmasked for line in attention), attention


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       name=st.sampled_from(["gpt2", "llama"]), seed=st.integers(0, 2 ** 16))
def test_random_padding_fx_matches_hooks_and_eager_calls(lengths, name, seed):
    """Random left padding: fx and hooks give bit-equal logits, and the fx graph makes the
    attention calls the eager forward makes."""
    model = _MODELS_BY_NAME[name]
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), width), generator=generator)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    with AttentionCalls() as plain, torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    net = NNsight(model)
    results = {}
    for backend in ("fx", "hooks"):
        with net.trace(input_ids=ids, attention_mask=mask, use_cache=False, backend=backend):
            net.output.logits.save()  # (the first run captures: see _traced)
        with AttentionCalls() as seen:
            with net.trace(input_ids=ids, attention_mask=mask, use_cache=False,
                           backend=backend) as tracer:
                logits = net.output.logits.save()
        assert tracer.backend == backend
        results[backend] = (logits, seen.calls)
    assert results["fx"][1] == plain.calls
    assert torch.equal(results["fx"][0], results["hooks"][0])
    assert torch.equal(results["fx"][0], expected)


_MODELS_BY_NAME = {"gpt2": tiny_gpt2(), "llama": tiny_llama()}


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``bool(t)``, ``int(t)``, ``.item()``:
    each waits for a GPU's queue to drain)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("invokes", [1, 2])
def test_a_trace_reads_values_no_more_often_than_the_eager_forward(invokes, tokenizer):
    """The checks of an invoke's tokens read the device once, as one ``tolist`` (not
    counted here); the rest of a trace reads no more values than the eager forward."""
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(3))
    with ScalarReads() as plain, torch.no_grad():
        model(ids, use_cache=False)

    def trace():
        with lm.trace(backend="fx") as tracer:
            for _ in range(invokes):
                with tracer.invoke(ids, use_cache=False):
                    lm.transformer.h[0].output.save()
        return tracer

    trace()
    with ScalarReads() as seen:
        assert trace().backend == "fx"
    assert seen.reads <= plain.reads, (seen.reads, plain.reads)
