"""model.edit(): interventions baked into every later trace of the edited wrapper (the
original untouched), inplace edits and clear_edits(); and export of an edited model as a
plain module that runs, saves and exports without fxsight."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxsight
from fxsight import NNsight, ShapeError, TraceError
from hook_references import hooked_logits
from models import ReluNet, mlp, tiny_gpt2

BACKENDS = ("fx", "hooks")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


def _steer() -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(7))


def _reference_logits(module, x, steer):
    """Hand-written: block 0's output at position 1 zeroed, block 1's output steered."""
    def zero(m, args, output):
        output = output.clone()
        output[:, 1] = 0
        return output

    return hooked_logits(module, x, hooks={"transformer.h.0": zero,
                                           "transformer.h.1": lambda m, a, o: o + steer})


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_wrapper_applies_edits_and_model_is_unchanged(gpt2, backend):
    x, steer = _ids(), _steer()
    expected = _reference_logits(gpt2, x, steer)
    with torch.no_grad():
        plain = gpt2(x, use_cache=False).logits

    model = NNsight(gpt2, backend=backend)
    with model.edit() as edited:
        model.transformer.h[0].output[:, 1] = 0
        edited.transformer.h[1].output = edited.transformer.h[1].output + steer
    assert edited is not model and edited._module is gpt2

    with torch.no_grad(), edited.trace(x, use_cache=False) as tracer:
        h0 = edited.transformer.h[0].output.save()  # the trace sees the edited value
        logits = edited.lm_head.output.save()
    assert tracer.backend == backend
    assert (h0[:, 1] == 0).all()
    assert torch.equal(logits, expected)
    with torch.no_grad(), edited.trace(x, use_cache=False):  # every later trace
        again = edited.output.save()
    assert torch.equal(again.logits, expected)
    with torch.no_grad():
        assert torch.equal(edited.trace(x, use_cache=False, trace=False).logits, expected)

    with torch.no_grad(), model.trace(x, use_cache=False) as tracer:
        untouched = model.lm_head.output.save()
    assert torch.equal(untouched, plain)


def test_inplace_edit_and_clear_edits():
    net = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    model = NNsight(net)
    with model.edit(inplace=True) as edited:
        model.layer1.output[:] = 0
    assert edited is model
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out, net.layer3(net.act2(net.layer2(torch.zeros(3, 10)))).detach())
    # edits stack: a second edit comes after the first
    with model.edit(inplace=True):
        model.layer2.output = model.layer2.output * 2
    with model.trace(x):
        out = model.output.save()
    doubled = net.layer2(torch.zeros(3, 10)) * 2
    assert torch.equal(out, net.layer3(net.act2(doubled)).detach())
    model.clear_edits()
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out, net(x).detach())


def test_edit_of_an_edited_model_keeps_both_and_leaves_the_first():
    net = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    model = NNsight(net)
    with model.edit() as first:
        model.act1.output[:] = 1.0
    with first.edit() as second:
        first.layer3.output = first.layer3.output + 1
    with first.trace(x):
        out1 = first.output.save()
    with second.trace(x):
        out2 = second.output.save()
    ones = net.layer3(net.act2(net.layer2(torch.ones(3, 10)))).detach()
    assert torch.equal(out1, ones)
    assert torch.equal(out2, ones + 1)


def test_edit_errors_are_clear(gpt2):
    model = NNsight(gpt2)
    with pytest.raises(TraceError, match="an edit cannot save"):
        with model.edit():
            model.transformer.h[0].output.save()
    with pytest.raises(ShapeError):  # with inputs, an edit is checked at its end
        with model.edit(_ids(), use_cache=False):
            model.transformer.h[0].output[:, 10] = 0
    assert model._edits == []


# --- export ------------------------------------------------------------------------------
def test_exported_edited_model_runs_saves_and_exports_without_fxsight(gpt2, tmp_path):
    x, steer = _ids(3), _steer()
    expected = _reference_logits(gpt2, x, steer)
    model = NNsight(gpt2)
    with model.edit() as edited:
        model.transformer.h[0].output[:, 1] = 0
        model.transformer.h[1].output = model.transformer.h[1].output + steer

    exported = edited.export(x, use_cache=False)
    assert isinstance(exported, torch.fx.GraphModule)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert all("fxsight" not in getattr(t, "__module__", "") for t in targets)
    with torch.no_grad():
        out = exported(x, use_cache=False)
    assert isinstance(out, tuple)  # a ModelOutput is given as its to_tuple()
    assert torch.equal(out[0], expected)

    path = tmp_path / "edited.pt"
    torch.save(exported, path)
    torch.save({"x": x, "logits": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        module = torch.load({str(path)!r}, weights_only=False)
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            logits = module(io["x"], use_cache=False)[0]
        assert torch.equal(logits, io["logits"]), (logits - io["logits"]).abs().max()
        program = torch.export.export(module, (io["x"],), {{"use_cache": False}})
        with torch.no_grad():
            assert torch.equal(program.module()(io["x"], use_cache=False)[0], io["logits"])
        assert "fxsight" not in sys.modules, "fxsight was imported"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_export_of_an_unedited_model_is_the_model():
    net = mlp()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    exported = NNsight(net).export(x)
    assert torch.equal(exported(x), net(x))
    assert not any(n.op == "placeholder" and n.name.startswith("edit_input")
                   for n in exported.graph.nodes)


def test_exported_model_keeps_the_models_parameter_names():
    """The exported module's state_dict speaks the model's names (``layer1.weight``), so
    ``load_state_dict`` of a fine-tuned copy of the model works on it."""
    net = mlp()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    wrapper = NNsight(net)
    with wrapper.edit(x) as edited:
        edited.layer1.output[:] = edited.layer1.output * 2
    exported = edited.export(x)
    assert set(exported.state_dict()) <= set(net.state_dict())
    assert any(name.startswith("layer1.") for name in exported.state_dict())
    tuned = {k: v + 1 for k, v in net.state_dict().items() if k in exported.state_dict()}
    exported.load_state_dict(tuned)
    assert torch.equal(exported.state_dict()["layer1.weight"], tuned["layer1.weight"])


# --- edits of operations inside a forward (.source) -------------------------------------
def test_an_edit_of_an_operation_applies_in_scans_later_edits_and_export():
    """An edit written on ``.source`` (was: a scan of the edited model, an edit of it with
    inputs and its export all raised that the operation's line is not reached: their
    forward was not instrumented for the edit's operations)."""
    torch.manual_seed(0)
    module = ReluNet()
    x = torch.randn(4, 3)
    with torch.no_grad():  # by hand: the relu's column 0 set to 5
        h = torch.relu(module.fc(x))
        h[:, 0] = 5.0
        expected = module.out(h * 2)
    model = NNsight(module)
    with model.edit() as edited:
        model.source.torch_relu_0.output[:, 0] = 5.0
    for backend in BACKENDS:
        with torch.no_grad(), edited.trace(x, backend=backend):
            out = edited.output.save()
        assert torch.equal(out, expected)
    with edited.scan(x):
        shape = edited.output.shape
    assert shape == (4, 2)
    with edited.edit(x) as second:  # (inputs: checked against the first edit too)
        edited.out.output[:] = edited.out.output + 1
    with torch.no_grad(), second.trace(x):
        out = second.output.save()
    assert torch.equal(out, expected + 1)
    exported = edited.export(x)
    with torch.no_grad():
        assert torch.equal(exported(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_apply_in_generate_at_the_first_step(gpt2, backend):
    """``edited.generate(...)`` runs the edits as nnsight runs an edit's interventions: as
    lines written outside ``tracer.iter``, at the first step (was: generate ignored the
    edits, silently)."""
    from fxsight import LanguageModel

    x, steer = _ids(4)[:, :5], _steer() * 3

    def first_call_only(module, args, output, calls=[]):
        calls.append(1)
        return output + steer if len(calls) == 1 else output

    handle = gpt2.transformer.h[0].register_forward_hook(first_call_only)
    try:
        with torch.no_grad():
            expected = gpt2.generate(x, max_new_tokens=3, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    model = LanguageModel(gpt2)
    with model.edit() as edited:
        model.transformer.h[0].output = model.transformer.h[0].output + steer
    with torch.no_grad(), edited.generate(x, max_new_tokens=3, do_sample=False,
                                          backend=backend) as tracer:
        scores = fxsight.save(list())
        for _ in tracer.all():
            scores.append(edited.lm_head.output[:, -1])
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected.sequences)
    assert len(scores) == 3
    for got, want in zip(scores, expected.scores):
        assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad(), model.generate(x, max_new_tokens=1, do_sample=False,
                                         backend=backend):
        plain = model.lm_head.output[:, -1].save()  # the unedited wrapper: no edit
    assert not torch.allclose(plain, expected.scores[0], atol=1e-3)


def test_an_edit_inside_a_session():
    """An edit in a session whose block holds a traced value in a variable (was: the
    session saved it, and the edit failed with "an edit cannot save values")."""
    net = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    model = NNsight(net)
    with model.session():
        with model.edit() as edited:
            hidden = model.layer1.output
            model.layer1.output = hidden * 0
        with edited.trace(x):
            out = edited.output.save()
    with torch.no_grad():
        expected = net.layer3(net.act2(net.layer2(net.act1(net.layer1(x) * 0))))
    assert torch.equal(out, expected)
    with pytest.raises(TraceError, match="an edit cannot save"):  # saving is still refused
        with model.session(), model.edit():
            fxsight.save(list()).append(model.layer1.output)
