"""Modes entered inside a trace block (torch function and dispatch modes, saved-tensor
hooks, the profiler), and the same modes around a whole trace.

A block's lines run when the trace ends, outside a mode the block opened: such a line is
refused (its plain reference, the same code in a forward hook, runs inside the mode). A
mode around the whole trace sees what it sees around a plain forward."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import fxsight
from fxsight import LanguageModel, NNsight, TraceError
from fxsight._torch import dispatch_modes, function_modes, saved_tensors_hooks_top

BACKENDS = ["fx", "hooks"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
W = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))


def _hooked(model, hook):
    """The plain reference: ``model(X)`` with ``hook`` on ``model[1]``."""
    handle = model[1].register_forward_hook(hook)
    try:
        return model(X)
    finally:
        handle.remove()


class _Names(TorchFunctionMode):
    """A user's torch function mode: the names of the functions called under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _Inner(_Names):
    pass


def _relu_twice(value):
    return torch.relu(value) * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_function_mode_entered_inside_the_block_is_refused(backend):
    """A user's ``TorchFunctionMode`` entered inside the block did not see the block's
    ``fxsight.apply`` (it runs when the trace ends, outside the mode): the plain hook's
    mode sees ``relu``, the trace's saw nothing of it. Now refused at the line, naming the
    mode; also where the line is a torch function, which torch hands to the mode first."""
    with _Names() as plain:
        pass
    _hooked(_model(), lambda m, a, o: _record(plain, _relu_twice, o))
    assert "relu" in plain.names
    net = NNsight(_model())
    with pytest.raises(TraceError, match=r"(?s)_Names.*around the whole trace.*test_modes"):
        with net.trace(X, backend=backend):
            h = net[1].output
            with _Names():
                net[1].output = fxsight.apply(_relu_twice, h)
    with pytest.raises(TraceError, match=r"(?s)_Names.*test_modes.py:\d+: net\[1\]\.output = "):
        with net.trace(X, backend=backend):
            h = net[1].output
            with _Names():
                net[1].output = torch.relu(h)
    with pytest.raises(TraceError, match=r"(?s)_Names.*test_modes"):
        with net.trace(X, backend=backend):
            with _Names():
                out = net.output.save()  # (the forward would not run in it)
    with _Names(), pytest.raises(TraceError, match=r"\(_Inner\)"):  # (the new mode only)
        with net.trace(X, backend=backend):
            h = net[1].output
            with _Inner():
                net[1].output = torch.relu(h)


def _record(mode, fn, value):
    with mode:
        return fn(value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_device_context_entered_inside_the_block_is_refused(backend):
    """``with torch.device("meta"):`` inside the block did not apply to the block's
    ``fxsight.apply`` (run when the trace ends, on the default device): the plain hook's
    function sees the meta default device and adds 1, the trace's did not."""
    def plus_if_meta(value):
        return value + float(torch.get_default_device().type == "meta")

    model = _model()
    with torch.no_grad():
        expected = _hooked(model, lambda m, a, o: _record(torch.device("meta"),
                                                          plus_if_meta, o))
        unchanged = model(X)
    assert not torch.allclose(expected, unchanged)
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"(?s)torch\.device.*around the whole trace"):
        with net.trace(X, backend=backend):
            h = net[1].output
            with torch.device("meta"):
                net[1].output = fxsight.apply(plus_if_meta, h)
    with pytest.raises(TraceError, match=r"(?s)torch\.device.*test_modes"):
        with net.trace(X, backend=backend):
            with torch.device("cpu"):
                net[1].output = net[1].output + torch.ones(8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dispatch_mode_entered_inside_the_block_is_refused(backend):
    """``FlopCounterMode`` entered inside the block counted none of the block's matmul
    (it runs when the trace ends): the plain hook's counter counts 2 * 3 * 8 * 8 flops."""
    counter = FlopCounterMode(display=False)
    _hooked(_model(), lambda m, a, o: _record(counter, lambda v: v @ W, o))
    assert counter.get_total_flops() == 2 * 3 * 8 * 8
    net = NNsight(_model())
    with pytest.raises(TraceError, match=r"(?s)dispatch mode.*FlopCounter.*test_modes"):
        with net.trace(X, backend=backend):
            h = net[1].output
            with FlopCounterMode(display=False):
                net[1].output = h @ W


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensor_hooks_entered_inside_the_block_are_refused(backend):
    """``saved_tensors_hooks`` entered inside the block did not apply to the block's
    multiplication (run when the trace ends): the plain hook's unpack doubles what the
    product saved, and so the gradient of the first layer; the trace's did not."""
    def unpack(value):
        return value * 2

    def square(value):
        with saved_tensors_hooks(lambda t: t, unpack):
            return value * value

    model = _model()
    _hooked(model, lambda m, a, o: square(o)).sum().backward()
    expected = model[0].weight.grad
    model.zero_grad(set_to_none=True)
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"(?s)saved-tensor hooks.*around the whole trace"):
        with net.trace(X, backend=backend):
            h = net[1].output
            with saved_tensors_hooks(lambda t: t, unpack):
                net[1].output = h * h
            net.output.sum().backward()
    assert model[0].weight.grad is None  # (nothing ran)
    assert expected is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_profiler_entered_inside_the_block_is_refused(backend):
    """``torch.profiler.profile()`` entered inside the block profiled none of the block's
    matmul (run when the trace ends); the plain hook's profile holds it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as plain:
        _hooked(_model(), lambda m, a, o: o @ W)
    assert any(event.name == "aten::mm" for event in plain.events())
    net = NNsight(_model())
    with pytest.raises(TraceError, match=r"(?s)profiler.*test_modes"):
        with net.trace(X, backend=backend):
            h = net[1].output
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                net[1].output = h @ W


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_opened_and_closed_around_lines_that_record_nothing_are_fine(backend):
    model = _model()
    net = NNsight(model)
    with torch.no_grad():
        expected = _hooked(model, lambda m, a, o: torch.relu(o) + 1)
    with torch.no_grad(), net.trace(X, backend=backend):
        h = net[1].output
        with torch.device("cpu"):
            one = torch.ones(8)
        with FlopCounterMode(display=False), _Names(), saved_tensors_hooks(id, id):
            pass
        net[1].output = torch.relu(h) + one
        out = net.output.save()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_a_flop_counter_around_a_trace_counts_the_forward(backend):
    """FlopCounterMode around a trace counted fxsight's own shape pass on fake tensors as
    well: 960 flops where the plain forward makes 480. Now the plain forward's counts, per
    module too, with the block's matmul where a plain hook's is (in the parent's)."""
    with FlopCounterMode(display=False) as plain:
        _hooked(_model(), lambda m, a, o: o @ W)
    net = NNsight(_model())
    with FlopCounterMode(display=False) as counter:
        with net.trace(X, backend=None if backend == "auto" else backend):
            h = net[1].output
            net[1].output = h @ W
    assert counter.get_flop_counts() == plain.get_flop_counts()
    assert counter.get_total_flops() == 2 * 3 * (6 * 8 + 8 * 8 + 8 * 4)


def test_a_flop_counter_around_an_fx_trace_is_refused_naming_it():
    """Under ``backend="fx"`` a FlopCounterMode is refused before anything runs: it counts
    per module through torch's global module hooks, which a captured graph does not call
    (``backend="auto"`` runs the hooks backend). The refusal said "global forward hooks";
    it now names the hook and the counter that installs it."""
    net = NNsight(_model())
    with FlopCounterMode(display=False) as counter:
        with pytest.raises(fxsight.CaptureError,
                           match=r"ModuleTracker\._fw_pre_hook.*FlopCounterMode installs it"):
            with net.trace(X, backend="fx"):
                out = net.output.save()
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensor_hooks_around_a_trace_see_the_forwards_tensors_only(backend):
    """saved_tensors_hooks around a trace were also given fxsight's fake tensors (its
    capture of the model); the hooks apply to the forward's backward as in a plain one."""
    def run(fn):
        model, packed = _model(), []
        with saved_tensors_hooks(lambda t: packed.append(type(t)) or t, lambda t: t * 2):
            fn(model).sum().backward()
        return packed, model[0].weight.grad

    def traced(model):
        with NNsight(model).trace(X, backend=backend) as tracer:
            out = tracer.output.save()
        return out

    plain_packed, plain_grad = run(lambda model: model(X))
    packed, grad = run(traced)
    assert packed == plain_packed
    torch.testing.assert_close(grad, plain_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_around_a_trace_apply_to_its_torch_functions(backend):
    """A function mode or device context around the whole trace is the trace's own: the
    block's torch functions (which torch hands to the mode first) are not refused."""
    model = _model()
    net = NNsight(model)
    with torch.no_grad():
        expected = _hooked(model, lambda m, a, o: torch.relu(o))
    with torch.no_grad(), torch.device("cpu"), _Names():
        with net.trace(X, backend=backend):
            net[1].output = torch.relu(net[1].output)
            out = net.output.save()
    torch.testing.assert_close(out, expected)


class _Quiet(TorchFunctionMode):
    """A user's torch function mode whose method names its instance ``mode``."""

    def __torch_function__(mode, func, types, args=(), kwargs=None):  # noqa: N805
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_function_mode_naming_its_instance_otherwise_is_the_traces_own(backend):
    """A function mode around the trace whose ``__torch_function__`` calls its instance
    other than ``self`` was not found handing the block's ``torch.relu(h)`` on: the line
    was refused as if a mode had been left inside the block ("(none)"). Now it runs, as a
    plain hook's ``torch.relu`` does under the mode."""
    model = _model()
    with torch.no_grad():
        expected = _hooked(model, lambda m, a, o: torch.relu(o))
    net = NNsight(model)
    with torch.no_grad(), _Quiet():
        with net.trace(X, backend=backend):
            net[1].output = torch.relu(net[1].output)
            out = net.output.save()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_rng_around_a_trace_forks_its_dropouts(backend):
    """``torch.random.fork_rng()`` around a whole trace forks the forward's dropouts as it
    forks a plain forward's. (Entered inside the block it is not seen: see
    docs/porting.md.)"""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5)).train()
    torch.manual_seed(3)
    with torch.random.fork_rng():
        expected = model(X)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    with torch.random.fork_rng():
        with NNsight(model).trace(X, backend=backend) as tracer:
            out = tracer.output.save()
    torch.testing.assert_close(out, expected)
    assert torch.equal(torch.get_rng_state(), state)


# --- what a user's mode around a whole trace sees: the plain forward's calls only --------
IDS = torch.randint(4, 128, (2, 5), generator=torch.Generator().manual_seed(3))


def _gpt2():
    from models import tiny_gpt2
    return tiny_gpt2(n_embd=32, n_head=2)


class _Operators(TorchDispatchMode):
    """A user's dispatch mode: how often each ATen operator ran under it."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _plain_names(model, hook):
    """The functions ``_Names`` sees in a plain forward with ``hook`` on layer 0."""
    handle = model.transformer.h[0].register_forward_hook(hook)
    try:
        with _Names() as plain:
            model(IDS)
    finally:
        handle.remove()
    return plain.names


def test_a_function_mode_around_a_hooks_trace_sees_the_plain_forwards_calls():
    """A ``TorchFunctionMode`` around a trace also saw fxsight's own work: 265 calls
    where the plain forward (with a hook saving the same value) makes 145, from the checks
    of the inputs, the shape scan, the state checks (``Tensor.shape``, ``.dim()``,
    ``.numel()`` reads, a ``torch.empty``). Now the very calls of the plain forward, on the
    first trace (which scans the model) and later ones; an operation of the block is seen
    where the plain hook makes it, and once as its line records it."""
    model, saved = _gpt2(), []
    plain = _plain_names(model, lambda m, a, o: saved.append(o))
    net = NNsight(model)
    for _ in range(2):
        with _Names() as mode:
            with net.trace(IDS, backend="hooks"):
                h = net.transformer.h[0].output.save()
        assert mode.names == plain
    torch.testing.assert_close(h, saved[0])
    plain = _plain_names(model, lambda m, a, o: torch.relu(o))
    with _Names() as mode:
        with net.trace(IDS, backend="hooks"):
            net.transformer.h[0].output = torch.relu(net.transformer.h[0].output)
    assert mode.names == ["relu", *plain]


def test_a_function_mode_around_an_fx_trace_sees_the_graphs_operators_only():
    """Under ``backend="fx"`` the forward is the captured graph: a ``TorchFunctionMode``
    sees its ATen operators (and the ``torch.device`` it builds), not the model's Python
    calls, and none of fxsight's own (the capture, the scan, the attention-mask checks,
    the reads of shapes): the same calls on the first trace as on later ones."""
    net, seen = NNsight(_gpt2()), []
    for _ in range(2):
        with _Calls() as mode:
            with net.trace(IDS, backend="fx"):
                net.transformer.h[0].output = torch.relu(net.transformer.h[0].output)
                out = net.output.save()
        seen.append(mode.calls)
    assert seen[0] == seen[1]
    assert seen[0][0] is torch.relu  # (the line, as it records; the graph calls it too)
    assert seen[0].count(torch.relu) == 2
    others = [f for f in seen[0] if f is not torch.relu and f is not torch.device]
    assert others and all(getattr(f, "namespace", None) == "aten" for f in others)
    assert out.logits.shape == (2, 5, 128)


class _Calls(TorchFunctionMode):
    """A user's torch function mode: the functions called under it."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def _graph_names(counts: Counter) -> Counter:
    """A plain forward's operator counts as the captured graph runs them: export turns
    the ``lift_fresh`` of a ``torch.tensor(...)`` into ``lift_fresh_copy``."""
    counts = Counter(counts)
    counts["aten.lift_fresh_copy.default"] += counts.pop("aten.lift_fresh.default", 0)
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_gpt2, _model])
def test_a_dispatch_mode_around_a_trace_sees_the_plain_forwards_operators(backend, make):
    """A counting ``TorchDispatchMode`` around a first trace also counted fxsight's own
    operators: an ``aten.empty`` of the shape scan (hooks), the attention-mask checks'
    ``arange``, ``tril``, ``all``... (fx, GPT-2). Now the plain forward's operators, each
    as often; under fx those of the captured graph, which has none of the checks the
    model's Python makes on its inputs' values (GPT-2's pad-token check: an ``eq``, an
    ``any`` and the ``item()`` of it)."""
    model = make()
    inputs = IDS if make is _gpt2 else X
    with _Operators() as plain:
        expected = model(inputs)
    net = NNsight(model)
    for _ in range(2):
        with _Operators() as mode:
            with net.trace(inputs, backend=backend):
                out = net.output.save()
        if backend == "hooks" or make is _model:
            assert mode.counts == plain.counts
        else:
            assert mode.counts <= _graph_names(plain.counts)
            assert set(_graph_names(plain.counts) - mode.counts) == {
                "aten.index.Tensor", "aten.eq.Scalar", "aten.any.default",
                "aten._local_scalar_dense.default", "aten.lift_fresh_copy.default"}
    if make is _gpt2:
        out, expected = out.logits, expected.logits
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dispatch_mode_around_a_trace_with_gradients_sees_the_plain_backward(backend):
    """A gradient read copied each gradient as its tap fired (``aten.clone``: fxsight's
    copy, which a later backward may not overwrite), under the user's mode. Now the mode
    sees the plain forward and backward's operators, with a tensor hook reading the
    same gradient; the copy stays, unseen."""
    model, grads = _model(), []
    with _Operators() as plain:
        _hooked(model, lambda m, a, o: o.register_hook(grads.append) and None)\
            .sum().backward()
    model.zero_grad(set_to_none=True)
    net = NNsight(model)
    for _ in range(2):
        with _Operators() as mode:
            with net.trace(X, backend=backend):
                grad = net[1].output.grad.save()
                net.output.sum().backward()
        model.zero_grad(set_to_none=True)
        assert mode.counts == plain.counts
        torch.testing.assert_close(grad, grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_around_a_trace_that_raises_are_restored(backend):
    """A trace that raises (while recording, in the forward, in the backward phase)
    leaves the caller's modes as they were, each still seeing what runs after."""
    def fails(value):
        raise ValueError("no")

    net = NNsight(_model())
    def same(value):
        return value

    with _Names() as names, _Operators() as counts, saved_tensors_hooks(same, same):
        stack = (function_modes(), dispatch_modes(), saved_tensors_hooks_top())
        with pytest.raises(KeyError):
            with net.trace(X, backend=backend):
                net[1].output = torch.relu(net[1].output)
                raise KeyError("in the block")
        with pytest.raises(ValueError, match="no"):
            with net.trace(X, backend=backend):
                net[1].output = fxsight.apply(fails, net[1].output)
        with pytest.raises(ValueError, match="no"):
            with net.trace(X, backend=backend):
                fxsight.apply(fails, net[1].output.grad)
                net.output.sum().backward()
        assert (function_modes(), dispatch_modes(), saved_tensors_hooks_top()) == stack
        names.names.clear()
        counts.counts.clear()
        torch.tanh(X)
    assert names.names == ["tanh"] and counts.counts["aten.tanh.default"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dispatch_mode_around_generate_sees_the_plain_generates_operators(backend):
    """Around ``lm.generate`` a counting ``TorchDispatchMode`` also counted fxsight's own
    operators (hooks: a ``cat`` and the ``lift_fresh`` of two tensors it builds; fx: the
    steps' captures and mask checks on the first generation, 466 operators, 436 on the
    next). Now, on the hooks backend, plain ``model.generate``'s operators, each as often;
    on fx the same on every generation, with transformers' own loop (its ``argmax`` of
    each step) as in a plain one."""
    from models import tiny_gpt2, train_tokenizer
    tokenizer = train_tokenizer()
    model = tiny_gpt2(n_embd=32, n_head=2, vocab_size=len(tokenizer))
    prompt, lm, seen = "The Eiffel Tower is in", LanguageModel(model, tokenizer=tokenizer), []
    inputs = tokenizer([prompt], return_tensors="pt")
    with _Operators() as plain:
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for _ in range(2):
        with _Operators() as mode:
            with lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend):
                out = lm.generator.output.save()
        seen.append(mode.counts)
        torch.testing.assert_close(out, expected)
    if backend == "hooks":
        assert seen[0] == seen[1] == plain.counts
    else:
        assert seen[0] == seen[1]
        assert seen[0]["aten.argmax.default"] == plain.counts["aten.argmax.default"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dispatch_mode_around_invokes_sees_the_batchs_forward_only(backend):
    """Two invokes run as one batch; a counting ``TorchDispatchMode`` around the trace
    also counted fxsight's narrowing of each read to its invoke's rows and its splicing
    of a write into them (``slice``, ``cat``...). Now the batch's plain forward, with the
    block's own operation (each invoke's ``* 2``, on its rows)."""
    model = _model()
    with _Operators() as plain:
        _hooked(model, lambda m, a, o: None)
    rows = (X[:2], X[2:])
    with _Operators() as doubling:
        [part * 2 for part in rows]
    net = NNsight(model)
    for _ in range(2):
        with _Operators() as mode:
            with net.trace(backend=backend) as tracer:
                with tracer.invoke(rows[0]):
                    net[1].output = net[1].output * 2
                    first = net.output.save()
                with tracer.invoke(rows[1]):
                    net[1].output = net[1].output * 2
                    second = net.output.save()
        assert mode.counts == plain.counts + doubling.counts
    with torch.no_grad():
        expected = _hooked(model, lambda m, a, o: o * 2)
    torch.testing.assert_close(torch.cat([first, second]), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_around_a_trace_writing_a_callers_tensor_see_the_plain_hooks_calls(backend):
    """A tensor the caller brings into the block and writes as a module's output: a
    ``TorchFunctionMode`` also saw fxsight's reads of it as the line recorded it (its
    version, its shape), a ``TorchDispatchMode`` the dense copy fxsight writes in its place
    (so that the forward's in-place changes do not reach the caller's tensor: an
    ``aten.clone``). The copy stays, unseen: the modes see the plain forward with a hook
    returning the tensor (the function mode: on the hooks backend); fx prunes what the
    written value replaces (the first layer, the ``tanh``): the last layer's forward."""
    model, value = _model(), torch.ones(3, 8)
    with _Names() as names, _Operators() as plain:
        expected = _hooked(model, lambda m, a, o: value)
    if backend == "fx":
        with _Operators() as plain:
            model[2](value)
    net = NNsight(model)
    for _ in range(2):
        with _Names() as mode, _Operators() as counts:
            with net.trace(X, backend=backend):
                net[1].output = value
                out = net.output.save()
        assert counts.counts == plain.counts
        if backend == "hooks":
            assert mode.names == names.names
    torch.testing.assert_close(out, expected)
