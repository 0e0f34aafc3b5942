"""A traced value appended to a list inside ``with tracer.all():`` / ``with
tracer.iter[...]:`` in ``lm.generate`` is one entry per decoding step after the block, as
nnsight's body, run once per step, appends once per step: in a plain Python list, one
kept with ``fxsight.save(list())`` (nnsight's ``list().save()``), an ``fxsight.list()``,
a list inside a dict or an object of the user's. Each entry is checked against a forward
hook on transformers' own ``generate``, on the fx and hooks backends.

Before: only ``fxsight.list()`` spread; every other list held one entry, the list of the
steps' values (``len(logits) == 1``).
"""

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from hook_references import hooked_generate

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The Eiffel Tower is in", "Hello there"]
STEPS = 3


@pytest.fixture(scope="module")
def reference(gpt2, tokenizer):
    """Block 0's output and the logits at each step of transformers' ``generate``."""
    blocks, logits = [], []
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    hooked_generate(gpt2, **encoded, do_sample=False, max_new_tokens=STEPS, hooks={
        "transformer.h.0": lambda m, a, out: blocks.append(
            out[0].clone() if isinstance(out, tuple) else out.clone()),
        "lm_head": lambda m, a, out: logits.append(out.clone())})
    return blocks, logits


def _same(got, want):
    assert len(got) == len(want)
    for value, expected in zip(got, want):
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)


class Recorder:
    """An object of the user's with a list attribute (``self.acts.append`` in a method)."""

    def __init__(self):
        self.acts = []

    def record(self, lm, tracer):
        with tracer.all():
            self.acts.append(lm.transformer.h[0].output.save())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_of_every_kind_get_one_entry_per_step(gpt2, tokenizer, reference, backend):
    blocks, logits = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    plain, by_name, holder = [], {"logits": []}, Recorder()
    nested = [[], []]
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        kept = fxsight.save(list())  # nnsight's `list().save()`
        savable = fxsight.list().save()
        with tracer.all():
            h = lm.transformer.h[0].output
            plain.append(h.save())
            kept.append(h)
            savable.append(lm.lm_head.output)
            by_name["logits"].append(lm.lm_head.output.save())
            nested[1].append(h.save())
    for got in (plain, kept, nested[1]):
        _same(got, blocks)
    for got in (savable, by_name["logits"]):
        _same(got, logits)
    assert nested[0] == []

    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        holder.record(lm, tracer)
    _same(holder.acts, blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chosen_steps_and_earlier_entries(gpt2, tokenizer, reference, backend):
    """``tracer.iter[1:]`` gives its steps' entries, after what the list already held
    (from an earlier trace, and appended before the scope in this one)."""
    blocks, _ = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    earlier = torch.zeros(1)
    acts = [earlier]
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        acts.append(lm.transformer.h[0].output.save())  # the first step
        with tracer.iter[1:]:
            acts.append(lm.transformer.h[0].output.save())
    assert acts[0] is earlier
    _same(acts[1:], blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_value_appended_after_the_scope_stays_one_entry(gpt2, tokenizer, reference,
                                                          backend):
    """A value saved inside the scope is the list of the steps' values; appended after
    the scope it is that one list (what the variable holds), not spread."""
    blocks, _ = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    acts = []
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        with tracer.all():
            h = lm.transformer.h[0].output.save()
        acts.append(h)
    assert len(acts) == 1 and acts[0] is h
    _same(h, blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_for_step_loop_and_the_ids_are_unchanged(gpt2, tokenizer, reference, backend):
    """``for step in tracer.all():`` records its body per step (one entry per step
    already); the generated ids appended in ``with tracer.all():`` are one value, once."""
    blocks, _ = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    looped, ids = [], []
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        for step in tracer.all():
            looped.append(lm.transformer.h[0].output.save())
        with tracer.all():
            ids.append(lm.generator.output.save())
    _same(looped, blocks)
    assert len(ids) == 1 and ids[0].shape[-1] == tokenizer(
        PROMPTS, return_tensors="pt", padding=True)["input_ids"].shape[-1] + STEPS


def test_a_failed_block_marks_nothing_and_leaves_the_list(gpt2, tokenizer):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    acts = []
    with pytest.raises(RuntimeError, match="stop here"):
        with lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False) as tracer:
            with tracer.all():
                acts.append(lm.transformer.h[0].output.save())
                raise RuntimeError("stop here")
    assert len(acts) == 1
    assert not tracer._step_appends


@pytest.mark.parametrize("backend", BACKENDS)
def test_nnsight_04_module_all(gpt2, tokenizer, reference, backend):
    """nnsight 0.4's ``with lm.transformer.h[0].all():`` spreads an append as
    ``with tracer.all():`` does."""
    blocks, _ = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    acts = []
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend):
        with lm.transformer.h[0].all():
            acts.append(lm.transformer.h[0].output.save())
    _same(acts, blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsaved_appends_get_one_entry_per_step(gpt2, tokenizer, reference, backend):
    """nnsight's agent-eval task "iterate generation": ``tokens.append(lm.lm_head.output)``
    without ``.save()`` inside ``with tracer.all():`` (nnsight's body runs for real, so the
    plain list holds each step's value). It held one unsaved proxy (``len(tokens) == 1``);
    now the value stored is saved and spread, one real entry per step."""
    _, logits = reference
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    tokens, by_name = [], {"logits": []}
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        with tracer.all():
            tokens.append(lm.lm_head.output)
            by_name["logits"].append(lm.lm_head.output[:, -1].max(-1).values)
    _same(tokens, logits)
    _same(by_name["logits"], [step[:, -1].max(-1).values for step in logits])
