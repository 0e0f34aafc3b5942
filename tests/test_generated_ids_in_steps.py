"""``lm.generator.output`` (the generated ids, known once generation has ended) read in
every spelling of a generate block: after the steps, inside ``with tracer.all()`` /
``tracer.iter[...]``, in a ``for step in ...`` loop, appended to an ``fxsight.list()``;
and a module's ``.output`` saved per step beside it. Against transformers' own
``generate`` with a forward hook, on the fx and hooks backends alike."""

import pytest
import torch

import fxsight
from fxsight import LanguageModel, TraceError
from hook_references import hooked_generate

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The Eiffel Tower is in", "Hello there"]
STEPS = 3


def _reference(model, tokenizer):
    """transformers' ``generate``'s ids, and block 0's output at each step (a hook)."""
    seen = []
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids = hooked_generate(model, **encoded, do_sample=False, max_new_tokens=STEPS, hooks={
        "transformer.h.0": lambda module, args, output: seen.append(
            (output[0] if isinstance(output, tuple) else output).clone())})
    return ids, seen


def _record(lm, tracer, spelling):
    """The saved value of the generated ids in ``spelling``."""
    if spelling == "after":
        return lm.generator.output.save()
    if spelling == "result":
        with tracer.all():
            return tracer.result.save()
    if spelling == "with all":
        with tracer.all():
            return lm.generator.output.save()
    if spelling == "with iter":
        with tracer.iter[1:]:
            return lm.generator.output.save()
    if spelling == "with one step":
        with tracer.iter[1]:
            return lm.generator.output.save()
    if spelling == "list in with all":
        kept = fxsight.list().save()
        with tracer.all():
            kept.append(lm.generator.output)
        return kept
    if spelling == "for step":
        for step in tracer.all():
            ids = lm.generator.output.save()
        return ids
    if spelling == "list in for step":
        kept = fxsight.list().save()
        for step in tracer.all():
            kept.append(lm.generator.output)
        return kept
    raise AssertionError(spelling)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spelling", ["after", "result", "with all", "with iter",
                                      "with one step", "list in with all", "for step",
                                      "list in for step"])
def test_generated_ids_are_generates_ids_in_every_spelling(gpt2, tokenizer, backend,
                                                           spelling):
    """The generated ids are one value of the whole generation: a tensor wherever they are
    read (inside a step scope too: nnsight's generator is called once, after generation);
    appended to a list, one entry per append (once in a ``with``, once per step in a
    ``for step`` loop). A module's ``.output`` saved in ``with tracer.all()`` beside them
    stays one tensor per step."""
    expected, blocks = _reference(gpt2, tokenizer)
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        ids = _record(lm, tracer, spelling)
        with tracer.all():
            hidden = lm.transformer.h[0].output.save()
    assert tracer.backend == backend
    if spelling.startswith("list"):
        assert isinstance(ids, list)
        assert len(ids) == (STEPS if spelling == "list in for step" else 1)
        for entry in ids:
            assert type(entry) is torch.Tensor and torch.equal(entry, expected)
    else:
        assert type(ids) is torch.Tensor and torch.equal(ids, expected)
    assert type(hidden) is list and len(hidden) == len(blocks) == STEPS
    for got, want in zip(hidden, blocks):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_with_a_steps_value_in_a_step_loop(gpt2, tokenizer, backend):
    """In ``for step in tracer.all():`` a value of the generated ids and that step's
    module output is that step's, computed once generation has ended."""
    expected, blocks = _reference(gpt2, tokenizer)
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    mixed = []
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        for step in tracer.all():
            mixed.append((lm.generator.output[:, -1].float().sum() +
                          lm.transformer.h[0].output[:, -1].sum()).save())
    assert len(mixed) == STEPS
    for got, block in zip(mixed, blocks):
        want = expected[:, -1].float().sum() + block[:, -1].sum()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_with_values_of_every_step_is_an_error_naming_the_line(gpt2, tokenizer, backend):
    """Inside ``with tracer.all():`` the ids are one value, a module's output one per step:
    a value of both is refused before anything runs, naming the line (it was a KeyError
    on fx, and the last step's value alone on hooks)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(TraceError, match=r"(?s)generated ids.*# the line"):
        with lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                         backend=backend) as tracer:
            with tracer.all():
                ids, hidden = lm.generator.output, lm.transformer.h[0].output
                (ids.float().mean() + hidden.mean()).save()  # the line


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("choice", ["all", "iter[1:]", "iter[2]"])
def test_a_steps_value_appended_to_a_list_in_a_with_block_is_one_entry_per_step(
        gpt2, tokenizer, backend, choice):
    """nnsight's ``hs = nnsight.list().save()`` then ``with tracer.all():
    hs.append(h.output)``: the block's body runs once per step there, so the list holds
    one entry per step (it held one entry, the list of every step's value); a plain
    Python list too (see tests/test_step_appends.py). Against a forward hook on
    transformers' generate."""
    _, blocks = _reference(gpt2, tokenizer)
    chosen = {"all": blocks, "iter[1:]": blocks[1:], "iter[2]": blocks[2:]}[choice]
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    plain = []
    with torch.no_grad(), lm.generate(PROMPTS, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        kept = fxsight.list().save()
        scope = {"all": tracer.all, "iter[1:]": lambda: tracer.iter[1:],
                 "iter[2]": lambda: tracer.iter[2]}[choice]()
        with scope:
            kept.append(lm.transformer.h[0].output)
            plain.append(lm.transformer.h[0].output.save())
    assert type(kept) is fxsight.list and len(kept) == len(chosen)
    for got, want in zip(kept, chosen):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(plain) == len(chosen)
    for got, want in zip(plain, chosen):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
