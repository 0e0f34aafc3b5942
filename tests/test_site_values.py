"""Writes into what a module returns or takes besides plain tensors: items of a dict-like
output (a ``ModelOutput``), and Python values a module is called with. Each equals a
hand-written forward hook, or is refused on the fx backend and honoured on hooks
(issue 18: S1, S2)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

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
    # (the message names both values: was "a value computed")
    with pytest.raises(fxsight.TraceError, match=r"\(2\.0 -> 5\.0\).*constant") as error:
        with net.trace(x, backend="fx"):
            args, kwargs = net.sub.inputs
            net.sub.inputs = (args, {"scale": 5.0})
    assert "test_site_values.py" in str(error.value)
    # the value the forward passes, written back, is kept on fx (pinned in the graph)
    with net.trace(x, backend="fx"):
        args, kwargs = net.sub.inputs
        net.sub.inputs = (args, {"scale": 2.0})
        same = net.output.save()
    torch.testing.assert_close(same, model(x), rtol=0, atol=0)
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


# --- outputs that are named tuples, dataclasses ------------------------------------------
class _Pair(NamedTuple):
    first: torch.Tensor
    rest: tuple


@dataclasses.dataclass
class _Fields:
    scaled: torch.Tensor
    extra: dict


class _PairLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.linear(x)
        return _Pair(h, (h * 2, h + 1))


class _FieldsLayer(torch.nn.Module):
    def forward(self, x):
        return _Fields(x * 3, {"pair": (x, x - 1)})


class _StructuredOutputs(torch.nn.Module):
    """Modules returning a named tuple and a dataclass (not a pytree node)."""

    def __init__(self):
        super().__init__()
        self.pair = _PairLayer()
        self.fields = _FieldsLayer()

    def forward(self, x):
        pair = self.pair(x)
        fields = self.fields(pair.rest[1])
        return fields.scaled + fields.extra["pair"][1] + pair.first


def _structured():
    torch.manual_seed(0)
    return _StructuredOutputs(), torch.randn(2, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_a_named_tuple_output_whole_equals_a_hook(backend, reference_hooks):
    """(was: ``TypeError: _Pair.__new__() missing 1 required positional argument``: the
    named tuple was rebuilt from one generator argument)"""
    model, x = _structured()
    with reference_hooks(model, hooks={"pair": lambda m, a, out: _Pair(out.first + 1,
                                                                        out.rest)}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        out = net.pair.output
        net.pair.output = _Pair(out.first + 1, out.rest)
        result = net.output.save()
    assert tracer.backend == backend
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_a_dataclass_output_is_refused_on_fx_naming_the_module_and_line():
    """The tensors inside an object that is not a pytree node have no graph nodes (was:
    the capture's fake tensors returned as the saved values, or a ``NameError`` in the
    rewritten graph's code)."""
    model, x = _structured()
    for read in (lambda net: net.fields.output, lambda net: net.fields.output.scaled,
                 lambda net: net.fields.output.extra["pair"][1] * 2):
        net = NNsight(model)
        with pytest.raises(fxsight.TraceError, match="fields.output") as error:
            with net.trace(x, backend="fx"):
                read(net).save()
        assert "_Fields" in str(error.value) and "test_site_values.py" in str(error.value)


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_dataclass_output_is_read_from_the_run(backend, reference_hooks):
    model, x = _structured()
    seen = {}
    with reference_hooks(model, hooks={"fields": lambda m, a, out: seen.update(out=out)}):
        expected = model(x)
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x, backend=backend) as tracer:
            whole = net.fields.output.save()
            doubled = (net.fields.output.extra["pair"][1] * 2).save()
            result = net.output.save()
    assert tracer.backend == "hooks"
    assert type(whole) is _Fields
    torch.testing.assert_close(whole.scaled, seen["out"].scaled, rtol=0, atol=0)
    assert type(doubled) is torch.Tensor  # (a real tensor, not a capture's fake one)
    torch.testing.assert_close(doubled, seen["out"].extra["pair"][1] * 2, rtol=0, atol=0)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_value_inside_a_dataclass_is_refused_at_its_line(backend, reference_hooks):
    """(was: on hooks the model got the dataclass holding the proxies themselves and
    failed later in its own code, "this trace has ended")"""
    model, x = _structured()
    net = NNsight(model)
    with pytest.raises(fxsight.TraceError, match=r"fxsight.apply\(_Fields") as error:
        with net.trace(x, backend=backend):
            h = net.fields.input
            net.fields.output = _Fields(h * 0, {"pair": (h, h)})
    assert "test_site_values.py" in str(error.value)

    def replace(m, args, out):
        return _Fields(args[0] * 0, {"pair": (args[0], args[0])})

    with reference_hooks(model, hooks={"fields": replace}):
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x, backend="hooks"):
            h = net.fields.input
            net.fields.output = fxsight.apply(
                lambda v: _Fields(v * 0, {"pair": (v, v)}), h)
            result = net.output.save()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


class _Slotted:
    __slots__ = ("hidden",)

    def __init__(self, hidden):
        self.hidden = hidden


class _SlottedLayer(torch.nn.Module):
    def forward(self, x):
        return _Slotted(x * 3)


class _SlottedOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.slotted = _SlottedLayer()

    def forward(self, x):
        return self.slotted(x).hidden + 1


def test_an_object_with_slots_holding_tensors_runs_on_hooks_under_auto():
    """(was: on fx the read gave the capture's FakeTensor)"""
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    net = NNsight(_SlottedOutput())
    with pytest.raises(fxsight.TraceError, match="_Slotted object at slotted.output"):
        with net.trace(x, backend="fx"):
            net.slotted.output.hidden.save()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x) as tracer:
            hidden = net.slotted.output.hidden.save()
    assert tracer.backend == "hooks"
    assert type(hidden) is torch.Tensor
    torch.testing.assert_close(hidden, x * 3, rtol=0, atol=0)


# --- PackedSequence (a named tuple that checks its fields) ---------------------------------
class _PackedLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.lstm = torch.nn.LSTM(4, 3, batch_first=True)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, ids, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(out + h[-1].unsqueeze(1))


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_packed_sequence_through_a_module_reads_and_writes_like_a_hook(backend,
                                                                         reference_hooks):
    """(was: ``ValueError: batch_sizes should always be on CPU`` from the scan that learns
    shapes, which remade the PackedSequence of meta tensors: no trace of such a model ran)"""
    torch.manual_seed(0)
    model = _PackedLSTM()
    ids, lengths = torch.randint(0, 10, (3, 5)), torch.tensor([5, 3, 2])
    seen = {}

    def hook(module, args, output):
        seen["data"] = output[0].data.clone()
        output[1][0][:] = 0

    with reference_hooks(model, hooks={"lstm": hook}):
        expected = model(ids, lengths)
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(ids, lengths, backend=backend) as tracer:
            packed = net.lstm.inputs[0][0].save()
            data = net.lstm.output[0].data.save()
            net.lstm.output[1][0][:] = 0
            out = net.output.save()
    assert tracer.backend == "hooks"
    assert type(packed) is torch.nn.utils.rnn.PackedSequence
    torch.testing.assert_close(data, seen["data"], rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- attributes of an output object set in the trace -------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_setting_an_attribute_of_a_model_output_equals_a_hook(gpt2, backend,
                                                              reference_hooks):
    """``out.last_hidden_state = v`` on a ``ModelOutput`` is a write of that item, as
    ``out["last_hidden_state"] = v`` (was: a TraceError)."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(2, 5, 64)

    def hook(module, args, output):
        output.last_hidden_state = zeros
        return output

    with reference_hooks(gpt2, hooks={"transformer": hook}):
        expected = gpt2(ids, use_cache=False).logits
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        out = net.transformer.output
        out.last_hidden_state = zeros
        hidden = out.last_hidden_state.save()
        item = net.transformer.output["last_hidden_state"].save()
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.equal(hidden, zeros) and torch.equal(item, zeros)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_setting_a_field_of_a_dataclass_output_equals_a_hook(reference_hooks):
    """On a dataclass output (hooks: fx does not see its tensors, so auto runs on hooks)
    a set field is what the later modules see."""
    model, x = _structured()
    fives = torch.full((2, 4), 5.0)

    def hook(module, args, output):
        return dataclasses.replace(output, scaled=fives)

    with reference_hooks(model, hooks={"fields": hook}):
        expected = model(x)
    for backend in ("hooks", "auto"):
        net = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (auto: the fallback's warning)
            with net.trace(x, backend=backend) as tracer:
                net.fields.output.scaled = fives
                result = net.output.save()
        assert tracer.backend == "hooks"
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    net = NNsight(model)
    with pytest.raises(fxsight.TraceError, match="fields.output") as error:
        with net.trace(x, backend="fx"):
            net.fields.output.scaled = fives
    assert "test_site_values.py" in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attributes_that_cannot_be_set_are_clear_errors(backend):
    """A named tuple's field and a tensor's attribute cannot be set: the error names the
    site or the line, before anything runs."""
    model, x = _structured()
    net = NNsight(model)
    with pytest.raises(fxsight.TraceError, match=r"'first' on pair\.output") as error:
        with net.trace(x, backend=backend):
            net.pair.output.first = torch.zeros(2, 4)
    assert "test_site_values.py" in str(error.value)
    with pytest.raises(fxsight.TraceError, match="cannot set attribute 'data'"):
        with net.trace(x, backend=backend):
            net.pair.output.first.data = torch.zeros(2, 4)
