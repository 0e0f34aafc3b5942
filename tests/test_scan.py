"""model.scan(): nothing runs for real (fake tensors), yet every module's input and output
shapes are known inside the block -- also for a model whose weights are on the meta
device -- and a mis-shaped intervention raises."""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import NNsight, ShapeError, TraceError
from models import tiny_gpt2, tiny_llama

FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _ids(rows: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(4, 128, (rows, seq), generator=torch.Generator().manual_seed(0))


def _meta_model(which: str) -> torch.nn.Module:
    with torch.device("meta"):
        return FACTORIES[which]()


def _shapes(value):
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else t
            for t in torch.utils._pytree.tree_leaves(value)]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_meta_model_scan_gives_the_shapes_of_a_real_run(which):
    x = _ids()
    real = NNsight(FACTORIES[which]())
    with real.trace(x, use_cache=False) as tracer:
        expected = tracer.cache(include_inputs=True)

    fake = NNsight(_meta_model(which))
    assert next(fake._module.parameters()).is_meta
    before = fxsight.stats()
    with fake.scan(x, use_cache=False) as tracer:
        scanned = tracer.cache(include_inputs=True)
        layers = fake.transformer.h if which == "gpt2" else fake.model.layers
        hidden_shape = layers[0].output.shape
        hidden_dtype = layers[0].output.dtype
        logits = fake.lm_head.output.save()
    after = fxsight.stats()
    assert tracer.backend == "scan"
    # nothing was captured or run on real values
    assert after.get("real_scans", 0) == before.get("real_scans", 0)
    assert after["captures"] == before["captures"]
    assert hidden_shape == (2, 7, 64) and hidden_dtype == torch.float32
    assert logits.is_meta and logits.shape == (2, 7, 128)
    assert set(scanned.keys()) == set(expected.keys())
    for key in expected:
        assert _shapes(scanned[key].output) == _shapes(expected[key].output), key
        # the fx run's attention masks are explicit where eager passes None: compare args
        assert _shapes(scanned[key].inputs[0]) == _shapes(expected[key].inputs[0]), key


def test_scan_shapes_follow_the_inputs():
    model = NNsight(_meta_model("gpt2"))
    with model.scan(_ids(3, 5), use_cache=False):
        mlp_in = model.transformer.h[1].mlp.input.shape
        wide = model.transformer.h[1].mlp.c_fc.output.shape
        out = model.output.save()
    assert mlp_in == (3, 5, 64) and wide == (3, 5, 256)
    assert out.logits.shape == (3, 5, 128) and out.logits.is_meta


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_scan_raises_on_a_mis_shaped_write(which):
    model = NNsight(_meta_model(which))
    layers = (lambda: model.transformer.h) if which == "gpt2" else (lambda: model.model.layers)
    with pytest.raises(ShapeError, match="index 10 is out of bounds"):
        with model.scan(_ids(), use_cache=False):
            layers()[0].output[:, 10] = 0
    with pytest.raises(ShapeError, match=r"\(3,\) cannot be written"):
        with model.scan(_ids(), use_cache=False):
            layers()[1].output = torch.zeros(3)
    with pytest.raises(ShapeError):
        with model.scan(_ids(), use_cache=False):
            model.lm_head.output = layers()[0].output @ torch.ones(5, 2)
    # a well-shaped one passes, and a broadcast is fine
    with model.scan(_ids(), use_cache=False):
        layers()[0].output[:, 3] = 0
        layers()[1].output = layers()[1].output + torch.ones(64)


def test_scan_of_a_real_model_computes_nothing():
    module = tiny_gpt2()
    calls, hooked = [], []
    block = module.transformer.h[0]
    forward = block.forward

    def recorded(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append(type(output[0] if isinstance(output, tuple) else output).__name__)
        return output

    block.forward = recorded
    handle = block.register_forward_hook(lambda m, i, o: hooked.append(o))
    try:
        model = NNsight(module)
        with model.scan(_ids(), use_cache=False) as tracer:
            h = model.transformer.h[0].output.save()
            model.transformer.h[1].output[:] = h * 2
    finally:
        handle.remove()
        del block.forward
    assert calls == ["FakeTensor"]  # the module ran once, on fake tensors
    assert hooked == []  # the user's hooks never see fake tensors
    assert h.is_meta and h.shape == (2, 7, 64)
    assert tracer.result.logits.shape == (2, 7, 128)


def test_values_of_a_scan_are_not_there_outside_it():
    model = NNsight(_meta_model("gpt2"))
    with model.scan(_ids(), use_cache=False):
        h = model.transformer.h[0].output
    with pytest.raises(TraceError):
        h.shape  # noqa: B018 - the scan has ended
