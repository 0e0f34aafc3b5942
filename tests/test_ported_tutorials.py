"""nnsight's own tutorials and usage pages, ported by changing the import, on tiny random
models; each checked against plain PyTorch (forward hooks, transformers' ``generate``) on
the fx and hooks backends.

Sources: the nnsight-website tutorials (logit lens, walkthrough, attribution and
activation patching, function vectors, dictionary learning, LoRA) and nnsight's
``docs/usage`` pages (cache, iter/all, skip, edit, session, barrier, backward). Only the
spellings that failed before a fix, or that no other test covers, are kept here.
"""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]


def _gpt2(tokenizer) -> torch.nn.Module:
    return tiny_gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))


def _hooked_generate(model, tokenizer, prompt: str, steps: int, hooks: dict) -> tuple:
    """transformers' greedy ``generate`` with plain forward hooks ``{module: fn}``."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks.items()]
    try:
        with torch.no_grad():
            return model.generate(**tokenizer(prompt, return_tensors="pt"),
                                  max_new_tokens=steps, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_lens_reads_the_invokes_input_ids(tokenizer, backend):
    """The logit lens tutorial: ``input_tokens = invoker.inputs.save()`` inside the invoke,
    ``input_tokens[1]["input_ids"][0]`` after it (nnsight >= 0.5's ``(args, kwargs)``);
    was an AttributeError."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    prompt = "The Eiffel Tower is in the city of"
    probs_layers = []
    with model.trace() as tracer:
        with tracer.invoke(prompt) as invoker:
            input_tokens = invoker.inputs.save()
            for layer in model.transformer.h:
                layer_output = model.lm_head(model.transformer.ln_f(layer.output))
                probs_layers.append(torch.nn.functional.softmax(layer_output, dim=-1).save())
    probs = torch.cat(probs_layers)

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(input_tokens[1]["input_ids"][0], ids[0])
    assert input_tokens[0] == ()
    args, kwargs = input_tokens  # (as a call takes them)
    assert len(args) == 0 and list(kwargs) == list(input_tokens[1])
    # nnsight 0.4's spelling: an IndexError that says where the ids are
    with pytest.raises(IndexError, match=r'invoker\.inputs\[1\]\["input_ids"\]'):
        input_tokens[0][0]["input_ids"]
    outs = {}
    handles = [block.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
               for i, block in enumerate(base.transformer.h)]
    with torch.no_grad():
        base(ids)
        expected = torch.cat([torch.softmax(base.lm_head(base.transformer.ln_f(outs[i])), -1)
                              for i in range(len(base.transformer.h))])
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_walkthrough_saved_list_gets_one_entry_per_step(tokenizer, backend):
    """The walkthrough's ``hidden_states = list().save()`` (ported: ``fxsight.save(list())``)
    with ``with tracer.all(): hidden_states.append(model.lm_head.output)``: one entry per
    decoding step, as nnsight appends per step (was one entry: a list of the 3 steps)."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with model.generate("Hello", max_new_tokens=3, do_sample=False) as tracer:
        hidden_states = fxsight.save(list())
        with tracer.all():
            model.transformer.h[-1].mlp.output[:] = 0
            hidden_states.append(model.lm_head.output)
        out = model.generator.output.save()

    logits = []
    expected = _hooked_generate(base, tokenizer, "Hello", 3, {
        base.transformer.h[-1].mlp: lambda m, a, o: torch.zeros_like(o),
        base.lm_head: lambda m, a, o: logits.append(o.detach().clone())})
    assert torch.equal(out, expected)
    assert len(hidden_states) == 3
    for got, want in zip(hidden_states, logits):
        torch.testing.assert_close(got, want[:, -1:], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_edit_bound_as_tracer_says_how_to_bind_both(tokenizer, backend):
    """nnsight >= 0.5's edit page: ``with model.edit(inplace=True) as tracer:`` then
    ``for _ in tracer.iter[...]:``. fxsight binds the model there (nnsight 0.4's), so
    ``tracer.iter`` is an AttributeError: it now names the binding and the spelling that
    gives both, which runs as the plain hook does."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with pytest.raises(AttributeError, match=r"as \(tracer, edited\)"):
        with model.edit(inplace=True) as tracer:
            for _ in tracer.iter[:1]:
                model.transformer.h[0].output[:] = 0
    with model.edit(inplace=True) as (tracer, edited):
        for _ in tracer.iter[:1]:
            edited.transformer.h[0].output[:] = 0
    with model.trace("Hello world"):
        logits = model.lm_head.output.save()
    handle = base.transformer.h[0].register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            expected = base(**tokenizer("Hello world", return_tensors="pt")).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
