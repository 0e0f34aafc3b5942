"""Core engine, capture: GPT-2, Llama and an MLP are captured by the fx backend, and an
untouched trace gives exactly the plain model's output."""

from __future__ import annotations

import re

import pytest
import torch

import fxsight
from fxsight import NNsight
from models import mlp


def _x(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["auto", "fx"])
def test_mlp_is_captured_and_untouched_output_is_exact(backend):
    model = mlp()
    x = _x()
    expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        pass
    assert tracer.backend == "fx"
    assert isinstance(tracer.graph_module, torch.fx.GraphModule)
    assert torch.equal(tracer.result, expected)
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == "fx"
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected)


def test_mlp_hooks_backend_untouched_output_is_exact():
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x, backend="hooks") as tracer:
        out = net.output.save()
    assert tracer.backend == "hooks"
    assert tracer.graph_module is None
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("which", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_language_models_untouched_output_is_exact(which, backend, request, core_ids):
    model = request.getfixturevalue(f"core_{which}")
    expected = model(core_ids, use_cache=False).logits
    net = NNsight(model)
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.equal(logits, expected)
    # without saves, the whole ModelOutput is the result
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        pass
    assert type(tracer.result) is type(model(core_ids, use_cache=False))
    assert torch.equal(tracer.result.logits, expected)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_language_models_auto_backend_is_fx(which, request, core_ids):
    model = request.getfixturevalue(f"core_{which}")
    net = NNsight(model)
    with net.trace(core_ids, use_cache=False) as tracer:
        logits = net.output.logits.save()
    assert tracer.backend == "fx"
    assert torch.equal(logits, model(core_ids, use_cache=False).logits)


def test_capture_is_cached_per_signature():
    model = mlp()
    net = NNsight(model)
    before = fxsight.stats()["captures"]
    for _ in range(3):
        with net.trace(_x(4)):
            net.layer1.output.save()
    assert fxsight.stats()["captures"] == before + 1
    with net.trace(_x(6)):  # a new input shape is a new capture
        out = net.output.save()
    assert fxsight.stats()["captures"] == before + 2
    assert torch.equal(out, model(_x(6)))


def test_graph_code_shows_boundaries_and_interventions():
    net = NNsight(mlp())
    with net.trace(_x()) as tracer:
        h = net.layer1.output.save()
        net.layer2.output[:, 0] = 0
        net.layer3.output = net.layer3.output * 2 + h.mean()
        net.output.save()
    code = tracer.graph_module.code
    # the boundaries the Program touches are named nodes of the rewritten graph
    for name in ("layer1_output", "layer2_output", "layer3_output"):
        assert re.search(rf"\b{name}\b", code), (name, code)
    # the spliced interventions sit next to them
    assert "setitem" in code and "mean" in code
    lines = code.splitlines()
    where = {name: next(i for i, line in enumerate(lines) if line.strip().startswith(name))
             for name in ("layer1_output", "mean", "layer2_output", "setitem")}
    assert where["layer1_output"] < where["mean"] < where["layer2_output"] < where["setitem"]


def test_in_place_weight_change_after_capture_is_seen():
    model = mlp()
    net = NNsight(model)
    x = _x()
    with net.trace(x):
        net.output.save()
    with torch.no_grad():
        model.layer2.weight.mul_(-1.5)
    with net.trace(x) as tracer:
        out = net.output.save()
    assert tracer.backend == "fx"
    assert torch.equal(out, model(x))


def test_replaced_parameter_after_capture_is_seen():
    model = mlp()
    net = NNsight(model)
    x = _x()
    with net.trace(x):
        net.output.save()
    model.layer2.weight = torch.nn.Parameter(torch.randn(10, 10))
    with net.trace(x) as tracer:
        out = net.output.save()
    assert tracer.backend == "fx"
    assert torch.equal(out, model(x))


def test_gpt2_graph_code_names_module_boundaries(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False) as tracer:
        net.transformer.h[0].attn.output[0][:] = 0
        net.transformer.h[1].output[:, -1] *= 2
        logits = net.output.logits.save()
    code = tracer.graph_module.code
    for name in ("transformer_h_0_output", "transformer_h_1_output", "transformer_ln_f_output",
                 "transformer_h_0_attn_resid_dropout_output", "transformer_wte_output"):
        assert re.search(rf"^\s+{name} = ", code, re.M), name
    assert re.search(r"setitem\w* = \S+\(transformer_h_1_output,", code)
    graph = tracer.graph_module.graph
    graph.lint()
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)
    assert logits.shape == (2, 7, 128)


def test_user_hooks_added_or_removed_after_capture_are_honoured():
    """Export would run the user's own forward hooks and freeze what they did into the
    graph: a model with hooks runs on the hooks backend (``fx`` refuses it by name), and a
    hook removed later does not linger in a graph either."""
    import warnings
    model = mlp()
    net = NNsight(model)
    x = _x()

    def traced():
        results = {}
        for backend in ("auto", "hooks"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with net.trace(x, backend=backend) as tracer:
                    out = net.output.save()
            results[backend] = (tracer.backend, out)
        return results

    def check(expected_backend):
        results = traced()
        expected = model(x)
        assert results["auto"][0] == expected_backend and results["hooks"][0] == "hooks"
        assert torch.equal(results["auto"][1], expected)
        assert torch.equal(results["hooks"][1], expected)

    check("fx")
    handle = model.layer2.register_forward_hook(lambda m, i, o: o * 0)
    check("hooks")
    with pytest.raises(fxsight.CaptureError, match="module 'layer2' has a forward hook"):
        with net.trace(x, backend="fx"):
            net.output.save()
    handle.remove()
    check("fx")
    handle = model.layer1.register_forward_pre_hook(lambda m, a: (a[0] + 1,))
    try:
        check("hooks")
    finally:
        handle.remove()
    check("fx")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks