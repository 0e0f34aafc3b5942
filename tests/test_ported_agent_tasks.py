"""nnsight's agent-eval tasks (``tests/agent-evals`` of nnsight: 19 researcher scripts, from
trace-and-save to a steering vector), written as an nnsight user writes them, ported by
changing the import, on a tiny random GPT-2 with the test tokenizer, on the fx and hooks
backends; each checked against plain PyTorch (forward hooks, a manual backward,
transformers' own ``generate``).

Only the spellings no other test covers are here. Covered elsewhere: trace and save
(``test_core_interventions``), zeroing and clone-before-modify (``test_core_interventions``),
``.input`` (``test_core_interventions``), several invokes and the prompt-less invoke
(``test_invokes``), ``model.generator.output`` (``test_generation``), ``tracer.iter[:]``
appends (``test_step_appends``), ``model.edit()`` (``test_edit``, ``test_parity3``),
``tracer.cache()`` (``test_cache``, ``test_parity3``), ``.skip()`` (``test_stop_skip``),
``model.scan()`` (``test_scan``), the logit lens (``test_ported_tutorials``), steering with
``+=`` (``test_generation``, ``test_compile``).

The tasks' text prompts differ in length under the test tokenizer where GPT-2's would not:
invokes are left-padded into one batch, as nnsight pads them, and the references run that
padded batch. Where the eval's spelling is one of fxsight's deliberate differences
(``list().save()``, ``if`` on a traced value, ``with tracer.iter[:] as step``,
``envoy.next()``), ``docs/porting.md`` gives the rewrite and other tests pin the error.
"""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import LanguageModel
from hook_references import hooked_generate
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]
N_LAYER = 6
WIDTH = 32


def _gpt2(tokenizer, seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(n_layer=N_LAYER, n_embd=WIDTH, n_head=2, vocab_size=len(tokenizer),
                     seed=seed)


@pytest.fixture(scope="module")
def base(tokenizer):
    """The tiny GPT-2 the tasks run on (6 layers, 32 wide), shared read-only."""
    return _gpt2(tokenizer)


def _padded_logits(model, tokenizer, prompts: list[str], reference_hooks, hooks: dict):
    """The logits of one plain forward of ``prompts`` left-padded into one batch (as a
    trace's invokes are: positions counted from each row's first real token, as
    ``generate`` counts them), with forward hooks ``{path: fn}`` installed."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with reference_hooks(model, hooks=hooks), torch.no_grad():
        return model(**batch, position_ids=positions, use_cache=False).logits


# --- task 02: logits and the predicted token ------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_predicted_token_taken_inside_the_trace(base, tokenizer, backend):
    """``logits = lm_head.output.save()`` and ``predicted_token = logits[0, -1].argmax()
    .save()`` in the block: the logits and a 0-d int64 token id, the plain forward's."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    prompt = "The capital of France is"
    with model.trace(prompt):
        logits = model.lm_head.output.save()
        predicted_token = logits[0, -1].argmax().save()

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert predicted_token.shape == () and predicted_token.dtype == torch.int64
    assert int(predicted_token) == int(expected[0, -1].argmax())
    assert isinstance(model.tokenizer.decode(predicted_token), str)


# --- task 07: activation patching between invokes -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_the_last_token_between_invokes_of_other_lengths(base, tokenizer,
                                                                  reference_hooks, backend):
    """The first invoke's last-token hidden state at layer 5 written into the second's
    (``h[5].output[:, -1, :] = clean``), prompts of 15 and 13 tokens: the second invoke's
    logits are the padded batch's with that row patched by a forward hook."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    clean_prompt, corrupt_prompt = "The Eiffel Tower is in", "The Colosseum is in"
    with model.trace() as tracer:
        with tracer.invoke(clean_prompt):
            clean = model.transformer.h[5].output[:, -1, :]
        with tracer.invoke(corrupt_prompt):
            model.transformer.h[5].output[:, -1, :] = clean
            patched_logits = model.lm_head.output.save()

    def patch(module, args, output):
        output = output.clone()
        output[1, -1] = output[0, -1]
        return output

    prompts = [clean_prompt, corrupt_prompt]
    expected = _padded_logits(base, tokenizer, prompts, reference_hooks,
                              {f"transformer.h.{N_LAYER - 1}": patch})
    unpatched = _padded_logits(base, tokenizer, prompts, reference_hooks, {})
    assert patched_logits.shape == (1, *expected.shape[1:])
    torch.testing.assert_close(patched_logits[0], expected[1], rtol=0, atol=1e-5)
    assert not torch.allclose(expected[1, -1], unpatched[1, -1], atol=1e-3)


# --- task 10: gradients -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_a_read_made_to_require_grad_inside_a_backward_block(tokenizer, backend):
    """``hs = h[5].output; hs.requires_grad_(True); loss = lm_head.output.sum()`` and
    ``with loss.backward(): hidden_grad = hs.grad.save()``: the gradient of the summed
    logits with respect to layer 5's output, as a plain backward with ``retain_grad``
    gives it; the parameters' gradients are the plain backward's too."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    prompt = "Hello world"
    with model.trace(prompt):
        hs = model.transformer.h[5].output
        hs.requires_grad_(True)
        loss = model.lm_head.output.sum()
        with loss.backward():
            hidden_grad = hs.grad.save()
    traced_param_grads = {name: p.grad.clone() for name, p in base.named_parameters()}
    base.zero_grad(set_to_none=True)

    kept = {}

    def keep(module, args, output):
        output.retain_grad()
        kept["h5"] = output

    handle = base.transformer.h[5].register_forward_hook(keep)
    try:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        base(ids, use_cache=False).logits.sum().backward()
    finally:
        handle.remove()
    assert hidden_grad.shape == kept["h5"].shape and hidden_grad.abs().sum() > 0
    torch.testing.assert_close(hidden_grad, kept["h5"].grad)
    for name, p in base.named_parameters():
        torch.testing.assert_close(traced_param_grads[name], p.grad, msg=name)


# --- task 12: sessions --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_patches_a_later_traces_prompt(base, tokenizer, reference_hooks, backend):
    """In a session, layer 3's output read (not saved) in a trace of one prompt replaces
    layer 3's output in the next trace of another prompt of as many tokens (GPT-2's
    tokenizer gives the task's two prompts 3 tokens each): the second trace's logits are a
    plain forward's with that output written by a forward hook."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    first, second = "The weather is", "The bridge is"  # 7 tokens each
    with model.session():
        with model.trace(first):
            layer3 = model.transformer.h[3].output
        with model.trace(second):
            model.transformer.h[3].output = layer3
            session_logits = model.lm_head.output.save()

    seen = {}
    _padded_logits(base, tokenizer, [first], reference_hooks,
                   {"transformer.h.3": lambda m, a, o: seen.__setitem__("h3", o.clone())})
    expected = _padded_logits(base, tokenizer, [second], reference_hooks,
                              {"transformer.h.3": lambda m, a, o: seen["h3"]})
    unpatched = _padded_logits(base, tokenizer, [second], reference_hooks, {})
    torch.testing.assert_close(session_logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, unpatched, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_patch_into_a_prompt_of_another_length_names_the_line(base, tokenizer,
                                                                      backend):
    """The task's own prompts are 7 and 8 tokens under the test tokenizer: writing the
    first trace's whole output into the second is a ShapeError naming the module, both
    shapes and the line (nnsight would run the model on the new length)."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with pytest.raises(fxsight.ShapeError,
                       match=r"\(1, 7, 32\).*transformer\.h\.3\.output.*\(1, 8, 32\)"
                             r"(.|\n)*test_ported_agent_tasks\.py.*output = layer3"):
        with model.session():
            with model.trace("The weather is"):
                layer3 = model.transformer.h[3].output
            with model.trace("The climate is"):
                model.transformer.h[3].output = layer3
                model.lm_head.output.save()


# --- task 17: barrier synchronisation -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_barrier_patches_embeddings_between_padded_prompts(base, tokenizer, reference_hooks,
                                                           backend):
    """``tracer.barrier(2)``: the first invoke ("Paris is the capital of", 12 tokens) reads
    ``wte.output`` and waits; the second ("_ _ _ _ _", 9 tokens, left-padded to 12) waits
    and writes them as its own: its logits are the padded batch's with the embeddings row
    copied by a forward hook (its own attention mask kept), and the first invoke's are
    untouched."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    source, target = "Paris is the capital of", "_ _ _ _ _"
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            paris_embeddings = model.transformer.wte.output
            barrier()
            source_logits = model.lm_head.output.save()
        with tracer.invoke(target):
            barrier()
            model.transformer.wte.output = paris_embeddings
            barrier_logits = model.lm_head.output.save()

    def copy_row(module, args, output):
        output = output.clone()
        output[1] = output[0]
        return output

    prompts = [source, target]
    expected = _padded_logits(base, tokenizer, prompts, reference_hooks,
                              {"transformer.wte": copy_row})
    unpatched = _padded_logits(base, tokenizer, prompts, reference_hooks, {})
    torch.testing.assert_close(barrier_logits[0], expected[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(source_logits[0], unpatched[0], rtol=0, atol=1e-5)
    assert not torch.allclose(expected[1], unpatched[1], atol=1e-3)


# --- task 18: logit lens -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_lens_over_a_slice_of_the_layers(base, tokenizer, backend):
    """``for layer in model.transformer.h[:4]:`` (the eval's "first N layers"): a slice of a
    module list is a list of its envoys, as nnsight slices them (was: a TypeError); each
    layer's argmax through ``lm_head(ln_f(h))`` is the plain forward's."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    first = model.transformer.h[:4]
    assert isinstance(first, list) and [e._path for e in first] == \
        [f"transformer.h.{i}" for i in range(4)]
    assert [e._path for e in model.transformer.h[-2::-2]] == \
        [f"transformer.h.{i}" for i in (4, 2, 0)]
    prompt = "The Eiffel Tower is in"
    layer_predictions, layer_logits = [], []
    with model.trace(prompt):
        for layer in model.transformer.h[:4]:
            logits = model.lm_head(model.transformer.ln_f(layer.output))
            layer_predictions.append(logits[0, -1].argmax(dim=-1).save())
            layer_logits.append(logits[0, -1].save())

    outputs = []
    handles = [block.register_forward_hook(lambda m, a, o: outputs.append(o))
               for block in base.transformer.h[:4]]
    try:
        with torch.no_grad():
            base(**tokenizer(prompt, return_tensors="pt"), use_cache=False)
            expected = [base.lm_head(base.transformer.ln_f(o))[0, -1] for o in outputs]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(torch.stack(layer_logits), torch.stack(expected),
                               rtol=0, atol=1e-5)
    assert [int(p) for p in layer_predictions] == [int(e.argmax()) for e in expected]


def test_indexing_a_module_list_with_a_float_names_the_line(base, tokenizer):
    """An index that is no int, slice or name: a TypeError naming the module list and the
    user's line."""
    model = LanguageModel(base, tokenizer=tokenizer)
    with pytest.raises(TypeError, match=r"transformer\.h \(ModuleList\) cannot be indexed "
                                        r"with 1\.5(.|\n)*test_ported_agent_tasks\.py"):
        model.transformer.h[1.5]


# --- the eval's advanced_11: steering in the generate body ---------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_steering_written_outside_iter_applies_at_the_prompts_step(base, tokenizer, backend):
    """``h[4].output[:, -1] += 0.1 * direction.to(h[4].output.device)`` in a generate block,
    outside any ``tracer.iter``: applied in the prompt's forward pass only, as nnsight runs
    lines outside ``iter`` (the eval's text says every step; its check reads the shape
    only). ``tracer.result`` and every step's logits are transformers' ``generate`` with
    the same change made by a forward hook at its first call."""
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    direction = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3)) * 10
    prompt, steps = "I think that", 4
    with model.generate(prompt, max_new_tokens=steps) as tracer:
        layer = model.transformer.h[4]
        layer.output[:, -1] += 0.1 * direction.to(layer.output.device)
        step_logits = fxsight.save(list())
        with tracer.all():
            step_logits.append(model.lm_head.output[:, -1])
        gen_result = tracer.result.save()

    def reference(steered_calls: int | None):
        """transformers' greedy generate, ``direction`` added at the first
        ``steered_calls`` calls of layer 4 (every call where None)."""
        calls = []

        def steer(module, args, output):
            calls.append(1)
            if steered_calls is not None and len(calls) > steered_calls:
                return None
            output = output.clone()
            output[:, -1] += 0.1 * direction
            return output

        out = hooked_generate(base, **tokenizer(prompt, return_tensors="pt"),
                              max_new_tokens=steps, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True,
                              hooks={"transformer.h.4": steer})
        return out.sequences, torch.stack(out.logits)

    expected_ids, expected_logits = reference(steered_calls=1)
    _, every_step_logits = reference(steered_calls=None)
    _, plain_logits = reference(steered_calls=0)
    assert torch.equal(gen_result, expected_ids)
    assert len(step_logits) == steps
    torch.testing.assert_close(torch.stack(step_logits), expected_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(expected_logits[0], plain_logits[0], atol=1e-3)
    assert not torch.allclose(expected_logits[1:], every_step_logits[1:], atol=1e-3)
