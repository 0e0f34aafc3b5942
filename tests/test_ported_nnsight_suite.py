"""nnsight's own test-suite (``tests/test_tiny.py``, ``test_lm.py``, ``test_batching.py``,
``test_backward.py``, ``test_0516_features.py``), ported by changing the import, on tiny
random models, on the fx and hooks backends. Only what no other test file covers is here:
each case is checked against plain PyTorch (forward hooks, a manual loop) or pins the
exception class an nnsight script catches.

Where fxsight deliberately differs from nnsight (a read after ``tracer.stop()``, ``if`` on
a traced value, a write that changes a module's shape, reads in any order), its own tests
cover the clear error it raises instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from models import tiny_gpt2, train_tokenizer

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in the city of"
OTHER = "The capital of France is"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _gpt2(tokenizer, seed: int = 0) -> torch.nn.Module:
    return tiny_gpt2(n_layer=3, n_embd=32, n_head=2, vocab_size=len(tokenizer), seed=seed)


class _MLP(torch.nn.Module):
    """test_backward.py's model: ``fc2(relu(fc1(x)))``, 8 wide."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp(seed: int = 0) -> _MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MLP()


def _fc1_grad(model: _MLP, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient of ``scale * model(x).sum()`` with respect to fc1's output, by hand."""
    hidden = model.fc1(x)
    hidden.retain_grad()
    (model.fc2(torch.relu(hidden)).sum() * scale).backward()
    model.zero_grad()
    return hidden.grad


# --- test_lm.py::test_retain_grad ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_grad_fills_the_saved_values_grad(backend):
    """``h = env.output.save(); h.retain_grad(); loss.backward()`` in the block: after it
    ``h.grad`` is the gradient, summed over the backward() calls after retain_grad() as
    torch accumulates it (was: None, the call ignored)."""
    model = _mlp()
    net = NNsight(model, backend=backend)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with net.trace(x):
        hidden = net.fc1.output.save()
        hidden.retain_grad()
        loss = net.output.sum()
        loss.backward(retain_graph=True)
        (loss * 3).backward()
    expected = _fc1_grad(model, x) + _fc1_grad(model, x, scale=3.0)
    assert isinstance(hidden, torch.Tensor)
    torch.testing.assert_close(hidden.grad, expected)
    model.zero_grad()

    with net.trace(x):  # no backward() after it: nothing to fill, as in torch
        hidden = net.fc1.output.save()
        hidden.retain_grad()
    assert hidden.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_grad_on_a_language_models_block(tokenizer, backend):
    """test_lm.py's own spelling: a block's output, the logits' sum, per invoke."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with model.trace() as tracer:
        with tracer.invoke("Hello World"):
            hidden = model.transformer.h[-1].output.save()
            hidden.retain_grad()
            model.lm_head.output.sum().backward()
    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["h"] = output

    handle = base.transformer.h[-1].register_forward_hook(keep)
    try:
        base(**tokenizer("Hello World", return_tensors="pt")).logits.sum().backward()
    finally:
        handle.remove()
        base.zero_grad()
    torch.testing.assert_close(hidden.grad, seen["h"].grad)


# --- test_lm.py::test_iter_and_skip, test_iter_idx --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_with_iter_as_target_is_no_step_number(tokenizer, backend):
    """``with tracer.iter[:] as it: if it != 1:``: the body is recorded once for every
    step, so ``it`` cannot be one step's number: comparing it, indexing a module list
    with it or computing with it raises, naming ``for it in tracer.iter[:]`` (was:
    ``it != 1`` silently True at every step, so the ``else`` branch never ran)."""
    model = LanguageModel(_gpt2(tokenizer), tokenizer=tokenizer, backend=backend)
    uses = [lambda it: it != 1, lambda it: model.transformer.h[it], lambda it: it + 1,
            lambda it: bool(it)]
    for use in uses:
        with pytest.raises(fxsight.ControlFlowError, match=r"for it in tracer\.iter\[:\]|"
                                                           r"for step in tracer\.iter\[:\]"):
            with model.generate("_", max_new_tokens=3) as tracer:
                with tracer.iter[:] as it:
                    use(it)
    with pytest.raises(fxsight.ControlFlowError, match=r"tracer\.all\(\)"):
        with model.generate("_", max_new_tokens=2) as tracer:
            with tracer.all() as step:
                if step == 0:
                    pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_one_iter_step_binds_its_number(tokenizer, backend):
    """``with tracer.iter[1] as it:`` binds the int 1 (nnsight's ``it``), usable as an
    index: ``h[it]`` is layer 1, read at decoding step 1 (a value saved in a ``with``
    block over steps is a list, one entry per step; against hooks on transformers'
    generate)."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with model.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.iter[1] as it:
            number = it
            hidden = model.transformer.h[it].output.save()
    assert number == 1 and type(number) is int
    outputs = []
    handle = base.transformer.h[1].register_forward_hook(
        lambda module, args, output: outputs.append(output))
    try:
        with torch.no_grad():
            base.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=3,
                          do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert len(hidden) == 1
    torch.testing.assert_close(hidden[0], outputs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_list_takes_a_numpy_integer(tokenizer, backend):
    """``model.transformer.h[np.int64(1)]`` (a layer index from a NumPy array) is
    layer 1, as a ModuleList takes it (was: TypeError)."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    layers = np.arange(3)
    with model.trace(PROMPT):
        hidden = model.transformer.h[layers[1]].output.save()
    seen = {}
    handle = base.transformer.h[1].register_forward_hook(
        lambda module, args, output: seen.__setitem__("h", output))
    try:
        with torch.no_grad():
            base(**tokenizer(PROMPT, return_tensors="pt"))
    finally:
        handle.remove()
    torch.testing.assert_close(hidden, seen["h"])


# --- test_0516_features.py, test_batching.py, test_lm.py: what nnsight raises -----------
@pytest.mark.parametrize("backend", BACKENDS)
def test_misuses_nnsight_raises_valueerror_for_are_valueerrors(tokenizer, backend):
    """An nnsight script's ``except ValueError`` / ``pytest.raises(ValueError)`` catches
    fxsight's errors for an empty prompt, nested invokes, a barrier not every invoke
    reaches and a read inside a skipped module (were TraceErrors only)."""
    model = LanguageModel(_gpt2(tokenizer), tokenizer=tokenizer, backend=backend)
    with pytest.raises(ValueError, match="no tokens"):
        with model.trace(""):
            model.transformer.h[0].output.save()
    with pytest.raises(ValueError, match="nested"):
        with model.trace() as tracer:
            with tracer.invoke(PROMPT):
                with tracer.invoke(OTHER):
                    pass
    with pytest.raises(ValueError, match=r"barrier\(3\) was reached by 2"):
        with model.trace() as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(PROMPT):
                barrier()
            with tracer.invoke(OTHER):
                barrier()
    with pytest.raises(ValueError, match="skipped"):
        with model.trace("Hello World"):
            model.transformer.h[1].skip(model.transformer.h[0].output)
            model.transformer.h[1].attn.output.save()
    with pytest.raises(fxsight.TraceError):  # (still fxsight's own class too)
        with model.trace(""):
            model.transformer.h[0].output.save()


# --- test_lm.py::test_cache_attribute_access --------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_index_of_a_module_without_numbered_children_is_a_keyerror(tokenizer,
                                                                        backend):
    """``cache.model.transformer[0]``: KeyError as in nnsight (was TypeError); the rest of
    test_cache_attribute_access against hooks."""
    base = _gpt2(tokenizer)
    model = LanguageModel(base, tokenizer=tokenizer, backend=backend)
    with model.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[layer for layer in model.transformer.h] +
                             [model.lm_head])
    assert len(cache) == 4
    with pytest.raises(KeyError, match="holds no indexed modules"):
        cache.model.transformer[0]
    with pytest.raises(IndexError):
        cache.model.transformer.h[3]
    with pytest.raises(AttributeError):
        cache.model.transformer.h[0].mlp
    seen = {}
    handle = base.transformer.h[0].register_forward_hook(
        lambda module, args, output: seen.__setitem__("h", output))
    try:
        with torch.no_grad():
            base(**tokenizer(PROMPT, return_tensors="pt"))
    finally:
        handle.remove()
    torch.testing.assert_close(cache.model.transformer["h.0"].output, seen["h"])
    torch.testing.assert_close(cache["model.transformer.h.0"].output, seen["h"])


# --- test_backward.py::TestBackwardAcrossInvokes ----------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_edits_stay_within_their_invoke(backend):
    """Two invokes of different row counts, one backward() each (the first retaining the
    graph): each gradient is its own rows', an edit of the first invoke's gradient leaves
    the second's as it was (against plain autograd on each input alone)."""
    model = _mlp()
    net = NNsight(model, backend=backend)
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 8, generator=generator), torch.randn(3, 8, generator=generator)
    with net.trace() as tracer:
        with tracer.invoke(x0):
            hidden0 = net.fc1.output
            with net.output.sum().backward(retain_graph=True):
                hidden0.grad = hidden0.grad * 3.0
                grad0 = fxsight.save(hidden0.grad.clone())
        with tracer.invoke(x1):
            hidden1 = net.fc1.output
            with net.output.sum().backward():
                grad1 = fxsight.save(hidden1.grad.clone())
    torch.testing.assert_close(grad0, _fc1_grad(model, x0) * 3.0)
    torch.testing.assert_close(grad1, _fc1_grad(model, x1))


# --- test_batching.py::TestMultiInvokeSkip (nnsight refuses the partial skip) ------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skip_in_one_invoke_leaves_the_others_rows_computed(backend):
    """One invoke skips fc1 with its own value, the other runs it: nnsight refuses ("cover
    every row"); fxsight gives each invoke its rows: the skip value, and the module's
    real output and the model's (against the model run on each input alone)."""
    model = _mlp()
    net = NNsight(model, backend=backend)
    generator = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(2, 8, generator=generator), torch.randn(3, 8, generator=generator)
    with net.trace() as tracer:
        with tracer.invoke(x0):
            net.fc1.skip(torch.ones(2, 8))
            skipped = net.fc1.output.save()
            out0 = net.output.save()
        with tracer.invoke(x1):
            ran = net.fc1.output.save()
            out1 = net.output.save()
    with torch.no_grad():
        torch.testing.assert_close(skipped, torch.ones(2, 8))
        torch.testing.assert_close(out0, model.fc2(torch.relu(torch.ones(2, 8))))
        torch.testing.assert_close(ran, model.fc1(x1))
        torch.testing.assert_close(out1, model(x1))
