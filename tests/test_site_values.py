"""Writes into what a module returns or takes besides plain tensors: items of a dict-like
output (a ``ModelOutput``), and Python values a module is called with. Each equals a
hand-written forward hook, or is refused on the fx backend and honoured on hooks
(issue 18: S1, S2)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxsight
from fxsight import NNsight
from models import tiny_gpt2

BACKENDS = ("fx", "hooks")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigning_a_key_of_a_model_output_changes_what_later_modules_see(gpt2, backend,
                                                                          reference_hooks):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(2, 5, 64)

    def hook(module, args, output):
        output["last_hidden_state"] = zeros
        return output

    with reference_hooks(gpt2, hooks={"transformer": hook}):
        expected = gpt2(ids, use_cache=False).logits
    assert not torch.equal(expected, gpt2(ids, use_cache=False).logits)  # it matters
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        out = net.transformer.output
        out["last_hidden_state"] = zeros
        hidden = out["last_hidden_state"].save()
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.equal(hidden, zeros)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x, scale=1.0):
        return self.linear(x) * scale


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _Scaled()

    def forward(self, x):
        return self.sub(x, scale=2.0)


def _reference_with_scale(model, x, reference_hooks, scale):
    with reference_hooks(model, pre_hooks={"sub": lambda m, a, k: (a, {**k, "scale": scale})}):
        return model(x)


def test_changing_a_python_input_runs_on_hooks_under_auto(reference_hooks):
    torch.manual_seed(0)
    model, x = _Outer(), torch.randn(2, 3)
    expected = _reference_with_scale(model, x, reference_hooks, 5.0)
    net = NNsight(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with net.trace(x) as tracer:
            args, kwargs = net.sub.inputs
            net.sub.inputs = (args, {"scale": 5.0})
            out = net.output.save()
    assert tracer.backend == "hooks"
    assert any("scale" in str(w.message) or "constant" in str(w.message) for w in caught)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_changing_a_python_input_is_refused_on_fx_and_honoured_on_hooks(reference_hooks):
    torch.manual_seed(0)
    model, x = _Outer(), torch.randn(2, 3)
    expected = _reference_with_scale(model, x, reference_hooks, 5.0)
    net = NNsight(model)
    with pytest.raises(fxsight.TraceError, match="constant") as error:
        with net.trace(x, backend="fx"):
            args, kwargs = net.sub.inputs
            net.sub.inputs = (args, {"scale": 5.0})
    assert "test_site_values.py" in str(error.value)
    with net.trace(x, backend="hooks"):
        args, kwargs = net.sub.inputs
        net.sub.inputs = (args, {"scale": 5.0})
        out = net.output.save()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_passing_the_python_inputs_on_stays_on_the_chosen_backend(backend, reference_hooks):
    """Tensors changed, the module's own keyword values passed on as they were read: the
    fx backend honours it."""
    torch.manual_seed(0)
    model, x = _Outer(), torch.randn(2, 3)
    with reference_hooks(model, pre_hooks={"sub": lambda m, a, k: ((a[0] * 3,), k)}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        args, kwargs = net.sub.inputs
        net.sub.inputs = ((args[0] * 3,), kwargs)
        out = net.output.save()
    assert tracer.backend == backend
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
