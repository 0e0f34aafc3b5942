"""fxsight next to nnsight (people porting have both): a model nnsight wrapped has the
forward of each module replaced by nnsight's objects, which torch.export cannot trace;
fxsight says so once, naming nnsight, and gives the same numbers on hooks. A model nnsight
never wrapped captures on fx with nnsight imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from fxsight import NNsight
from fxsight.errors import CaptureError

from models import mlp


class _Controller:
    """Stands for nnsight's per-module forward wrapper (its class lives in nnsight)."""

    __module__ = "nnsight.intervention.source"

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def _wrapped_like_nnsight(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        module.forward = _Controller(module.forward)
    return model


def _reference(model, x):
    acts = {}

    def keep(module, inputs, output):
        acts["h"] = output.clone()

    handles = [model.layer1.register_forward_hook(keep),
               model.layer2.register_forward_hook(lambda m, i, o: o * 0 + 1)]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return acts["h"], out


def test_a_model_nnsight_wrapped_runs_on_hooks_naming_nnsight():
    torch.manual_seed(0)
    model = _wrapped_like_nnsight(mlp())
    x = torch.randn(3, 5)
    net = NNsight(model)
    with pytest.warns(RuntimeWarning, match=r"forward replaced by nnsight"):
        with net.trace(x) as tracer:
            h = net.layer1.output.save()
            net.layer2.output = net.layer2.output * 0 + 1
            out = net.output.save()
    assert tracer.backend == "hooks"
    ref_h, ref_out = _reference(model, x)
    assert torch.equal(h, ref_h) and torch.equal(out, ref_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (said once per input signature)
        with net.trace(x):
            net.output.save()
    with pytest.raises(CaptureError, match=r"nnsight\.NNsight wrapped this model"):
        with net.trace(x, backend="fx"):
            net.output.save()


def test_a_wrapper_of_another_package_is_not_mistaken_for_nnsight():
    class Wrapper:
        def __init__(self, forward):
            self.forward = forward

        def __call__(self, *args, **kwargs):
            return self.forward(*args, **kwargs)

    model = mlp()
    model.layer1.forward = Wrapper(model.layer1.forward)
    x = torch.randn(2, 5)
    net = NNsight(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with net.trace(x):
            out = net.output.save()
    assert not any("nnsight" in str(w.message) for w in caught)
    assert torch.equal(out, model(x))


_SCRIPT = textwrap.dedent("""
    import warnings, torch
    import nnsight, fxsight
    from transformers import GPT2LMHeadModel, GPT2Config
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100,
                                   n_positions=32)).eval()
    ids = torch.randint(0, 100, (2, 8))
    acts = {}
    def keep(module, inputs, output):
        acts["h"] = output[0].clone()
    h0 = m.transformer.h[0].register_forward_hook(keep)
    ref = m(ids)
    h0.remove()
    env = fxsight.NNsight(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with env.trace(ids) as tr:
            h = env.transformer.h[0].output[0].save()
            out = env.output.save()
    assert tr.backend == "fx", [str(w.message) for w in caught]
    assert torch.equal(h, acts["h"]) and torch.equal(out.logits, ref.logits)
    wrapped = nnsight.NNsight(m)
    with wrapped.trace(ids):
        n_h = wrapped.transformer.h[0].output[0].save()
    assert torch.equal(n_h, acts["h"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with env.trace(ids) as tr:
            h = env.transformer.h[0].output[0].save()
    assert tr.backend == "hooks"
    assert any("replaced by nnsight" in str(w.message) for w in caught), caught
    assert torch.equal(h, acts["h"])
    print("ok")
""")


def test_with_nnsight_imported_in_the_same_process():
    """Runs in a child process (nnsight patches the interpreter when imported)."""
    if importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed (PYTHONPATH=... to a folder holding it)")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
