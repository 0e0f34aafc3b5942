"""Core engine, bad input: each mistake raises a clear exception that names the module and
the user's source line, before anything runs."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch

import fxsight
from fxsight import NNsight

THIS_FILE = os.path.basename(__file__)
BACKENDS = ("fx", "hooks")
RUNS = {"count": 0}


@torch.library.custom_op("fxsight_core_tests::count_runs", mutates_args=())
def count_runs(x: torch.Tensor) -> torch.Tensor:
    """Identity that counts real executions (export and fake scans use the fake below)."""
    RUNS["count"] += 1
    return x.clone()


@count_runs.register_fake
def _(x):
    return torch.empty_like(x)


class Counter(torch.nn.Module):
    def forward(self, x):
        return count_runs(x)


def counted_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(
        count=Counter(),
        layer1=torch.nn.Linear(5, 10),
        act1=torch.nn.ReLU(),
        layer2=torch.nn.Linear(10, 10),
        act2=torch.nn.Sigmoid(),
        layer3=torch.nn.Linear(10, 2),
    )).eval()


@pytest.fixture
def net():
    model = counted_mlp()
    wrapped = NNsight(model)
    x = torch.randn(3, 5)
    # warm up, and prove the counter sees real runs on both backends
    for backend in BACKENDS:
        before = RUNS["count"]
        with wrapped.trace(x, backend=backend):
            wrapped.output.save()
        assert RUNS["count"] == before + 1
    RUNS["count"] = 0
    yield wrapped
    assert_clean(model)


def assert_clean(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def x_in() -> torch.Tensor:
    return torch.randn(3, 5)


def check(error: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(error.value)
    assert THIS_FILE in message, message  # the user's source line
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert RUNS["count"] == 0, "the model ran although the trace was rejected"
    return message


# --- unknown module ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_module_path(net, backend):
    with pytest.raises(AttributeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer9.output.save()
    message = check(error, "model", "'layer9'", "layer1, act1, layer2, act2, layer3",
                    "net.layer9.output.save()")
    assert "has no submodule" in message


def test_unknown_nested_module_path(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    with pytest.raises(AttributeError) as error:
        with net.trace(core_ids, use_cache=False):
            net.transformer.h[0].mlpp.output.save()
    message = str(error.value)
    assert "model.transformer.h.0" in message and "'mlpp'" in message
    assert "attn" in message and "mlp" in message and THIS_FILE in message


def test_module_list_index_out_of_range(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    with pytest.raises(IndexError) as error:
        with net.trace(core_ids, use_cache=False):
            net.transformer.h[5].output.save()
    assert "model.transformer.h" in str(error.value) and THIS_FILE in str(error.value)


# --- order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_depending_on_a_later_module(net, backend):
    with pytest.raises(fxsight.OrderError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer1.output = net.layer3.output.sum() * torch.ones(10)
    check(error, "layer1.output", "layer3.output", "net.layer1.output = net.layer3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_edit_depending_on_a_later_module(net, backend):
    with pytest.raises(fxsight.OrderError) as error:
        with net.trace(x_in(), backend=backend):
            h = net.layer1.output
            h[:, 0] = net.layer2.output[:, 0]
    check(error, "layer1.output", "layer2.output", "h[:, 0] = net.layer2.output[:, 0]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_input_depending_on_own_output(net, backend):
    with pytest.raises(fxsight.OrderError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.input = net.layer2.output[:, :10] * 0
    check(error, "layer2.input", "layer2.output")


def test_order_error_is_a_trace_error():
    assert issubclass(fxsight.OrderError, fxsight.TraceError)
    assert issubclass(fxsight.ShapeError, fxsight.TraceError)
    assert issubclass(fxsight.ControlFlowError, fxsight.TraceError)
    assert issubclass(fxsight.TraceError, fxsight.FxsightError)


# --- shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_that_cannot_broadcast(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = torch.zeros(3, 7)
    check(error, "layer2.output", "(3, 7)", "(3, 10)", "torch.zeros(3, 7)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_that_only_broadcasts_the_other_way(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer3.output = net.layer3.output.unsqueeze(0).expand(4, 3, 2)
    check(error, "layer3.output", "(4, 3, 2)", "(3, 2)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_setitem_that_cannot_broadcast(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output[:, 0] = torch.zeros(5)
    check(error, "model.layer2.output", "net.layer2.output[:, 0] = torch.zeros(5)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tuple_write_into_tensor_output(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = (net.layer2.output, net.layer2.output)
    check(error, "layer2.output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_that_fails_on_shapes(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            (net.layer1.output @ net.layer3.output).save()
    check(error, "model.layer1.output", "model.layer3.output")


# --- Python control flow -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_if_on_a_proxy(net, backend):
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in(), backend=backend):
            if net.layer1.output.sum() > 0:
                net.layer2.output[:] = 0
    check(error, "torch.where", "model.layer1.output", "if net.layer1.output.sum() > 0:")


@pytest.mark.parametrize("convert", [bool, int, float])
def test_bool_int_float_of_a_proxy(net, convert):
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in()):
            convert(net.layer2.output.sum())
    check(error, "torch.where", f"{convert.__name__}()", "model.layer2.output",
          "convert(net.layer2.output.sum())")


def test_proxy_as_python_index(net):
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in()):
            [1, 2, 3][net.layer3.output.argmax()]
    check(error, "torch.where", "model.layer3.output")


def test_proxy_in_while_loop(net):
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in()):
            h = net.layer1.output
            while h.max() > 1:
                h = h / 2
    check(error, "torch.where", "model.layer1.output", "while h.max() > 1:")


# --- outside a trace -------------------------------------------------------------------------
def test_output_outside_a_trace(net):
    with pytest.raises(fxsight.TraceError) as error:
        net.layer1.output
    check(error, "model.layer1.output", "inside a trace")
    with pytest.raises(fxsight.TraceError) as error:
        net.layer1.input = torch.zeros(3, 5)
    check(error, "model.layer1.input")


def test_save_outside_a_trace(net):
    with net.trace(x_in()):
        kept = net.layer2.output
    RUNS["count"] = 0
    with pytest.raises(fxsight.TraceError) as error:
        kept.save()
    check(error, "model.layer2.output", ".save()", "kept.save()")
    with pytest.raises(fxsight.TraceError) as error:
        kept * 2
    check(error, "model.layer2.output", "kept * 2")


def test_proxy_from_an_earlier_trace(net):
    with net.trace(x_in()):
        old = net.layer1.output
    RUNS["count"] = 0
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in()):
            net.layer2.output = old
    check(error, "model.layer1.output", "earlier", "net.layer2.output = old")
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in()):
            torch.add(net.layer1.output, old).save()
    check(error, "model.layer1.output", "earlier")
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in()):
            (old + net.layer1.output).save()
    check(error, "model.layer1.output", "(old + net.layer1.output).save()")


def test_module_that_never_runs():
    class PartlyUsed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(5, 5)
            self.unused = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.used(x)

    model = PartlyUsed()
    net = NNsight(model)
    for backend in BACKENDS:
        with pytest.raises(fxsight.TraceError) as error:
            with net.trace(torch.randn(2, 5), backend=backend):
                net.unused.output.save()
        assert "unused" in str(error.value) and THIS_FILE in str(error.value)
    assert_clean(model)


# --- after an error, everything still works ----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_works_after_an_error(net, backend):
    x = x_in()
    with pytest.raises(fxsight.ShapeError):
        with net.trace(x, backend=backend):
            net.layer2.output = torch.zeros(3, 7)
    with pytest.raises(ZeroDivisionError):  # an exception of the user's own
        with net.trace(x, backend=backend):
            net.layer2.output.save()
            1 / 0
    assert RUNS["count"] == 0
    with net.trace(x, backend=backend) as tracer:
        out = net.output.save()
    assert tracer.backend == backend
    assert torch.equal(out, net._module(x))


def test_rejected_trace_fires_no_forward_hook_on_the_hooks_backend():
    """The plain-PyTorch view of "nothing ran": a forward hook counting real calls."""
    from torch._subclasses.fake_tensor import FakeTensor
    model = counted_mlp()
    net = NNsight(model)
    calls = []

    def count(module, args, output):
        if not isinstance(output, FakeTensor) and output.device.type != "meta":
            calls.append(module)

    handle = model.layer3.register_forward_hook(count)
    try:
        with net.trace(x_in(), backend="hooks"):
            net.output.save()
        assert len(calls) == 1
        calls.clear()
        for bad in (_order_mistake, _shape_mistake):
            with pytest.raises(fxsight.TraceError):
                bad(net)
        assert calls == []
    finally:
        handle.remove()
    assert_clean(model)


def _order_mistake(net):
    with net.trace(x_in(), backend="hooks"):
        net.layer1.output = net.layer3.output.mean() + torch.zeros(10)


def _shape_mistake(net):
    with net.trace(x_in(), backend="hooks"):
        net.act1.output = torch.zeros(2, 2)


# --- writes of what a site cannot hold (issue 18: S9, S11, U1) ------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_none_is_an_error_not_ignored(net, backend):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = None
    check(error, "layer2.output", "NoneType", "net.layer2.output = None")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, shown", [
    ("text", "str"), (object(), "object"), (torch.zeros(3, 10, dtype=torch.float64), "float64"),
    (torch.zeros(3, 10, dtype=torch.int64), "int64"), (torch.zeros(3, 10, dtype=torch.bool), "bool"),
])
def test_writing_a_value_of_another_kind_or_dtype_is_an_error(net, backend, value, shown):
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = value
    check(error, "layer2.output", shown)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_meta_tensor_brought_into_a_trace_is_an_error(net, backend):
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output[:] = torch.zeros(10, device="meta")
    check(error, "meta device")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_smaller_batch_is_not_stretched_over_the_batch(net, backend):
    """A forward hook returning ``h[:1]`` would shrink the batch; fxsight cannot change a
    captured shape, and stretching the row over the batch would be silently different."""
    with pytest.raises(fxsight.ShapeError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = net.layer2.output[:1]
    check(error, "(1, 10)", "(3, 10)", "net.layer2.output[:1]")


# --- values that do not exist while recording, and what cannot be recorded --------------
_DATA_DEPENDENT = {  # (the user's line of each is the lambda's)
    "mask": (lambda h: h[h > 0], "lambda h: h[h > 0]"),
    "nonzero": (lambda h: h.nonzero(), "lambda h: h.nonzero()"),
    "masked_select": (lambda h: torch.masked_select(h, h > 0), "torch.masked_select(h"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_DATA_DEPENDENT))
def test_a_result_whose_shape_depends_on_the_data(net, backend, case):
    fn, shown = _DATA_DEPENDENT[case]
    with pytest.raises(fxsight.DataDependentError) as error:
        with net.trace(x_in(), backend=backend):
            fn(net.layer1.output).save()
    check(error, "shape depends on the values of model.layer1.output", "torch.where",
          "fxsight.apply(", shown)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convert", ["item", "tolist", "numpy"])
def test_python_values_of_a_proxy_while_recording(net, backend, convert):
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in(), backend=backend):
            getattr(net.layer2.output, convert)()
    check(error, f"`.{convert}()`", "model.layer2.output", "after the block",
          "getattr(net.layer2.output, convert)()")


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_conversion_of_a_proxy_while_recording(net, backend):
    np = pytest.importorskip("numpy")
    with pytest.raises(fxsight.ControlFlowError) as error:
        with net.trace(x_in(), backend=backend):
            np.asarray(net.layer2.output)
    check(error, "np.asarray", "model.layer2.output", "np.asarray(net.layer2.output)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_with_a_numpy_array_that_numpy_would_promote_otherwise(net, backend):
    np = pytest.importorskip("numpy")
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in(), backend=backend):
            (net.layer1.output.argmax(-1) + np.ones(3, dtype=np.float32)).save()
    check(error, "NumPy gives float64", "torch would give float32", "torch.as_tensor",
          "net.layer1.output.argmax(-1) + np.ones(3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_value_moved_to_the_meta_device(net, backend):
    with pytest.raises(fxsight.TraceError) as error:
        with net.trace(x_in(), backend=backend):
            net.layer2.output = net.layer2.output.to("meta")
    check(error, "meta device", "no data", 'net.layer2.output.to("meta")')


class _Pair(torch.nn.Module):
    def forward(self, x):
        return x, x * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_item_assignment_into_a_tuple_output(backend):
    net = NNsight(torch.nn.Sequential(OrderedDict(pair=_Pair(), head=torch.nn.Identity())))
    with pytest.raises(fxsight.ItemAssignmentError) as error:
        with net.trace(torch.ones(2, 3), backend=backend):
            net.pair.output[0] = torch.zeros(2, 3)
    assert isinstance(error.value, TypeError)  # (as Python's own)
    message = str(error.value)
    for fragment in ("'tuple' object does not support item assignment",
                     "model.pair.output = (new, *rest)", "model.pair.output[0][:] = new",
                     THIS_FILE, "net.pair.output[0] = torch.zeros(2, 3)"):
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_written_with_too_few_arguments_names_where(core_gpt2, core_ids, backend):
    """``.inputs = ((h,), kwargs)`` for a block called with four positional arguments
    says the arguments' tuple is the one that differs (was: "holds a tuple of 2; the
    written value is a tuple of 2", the outer pair, which looks like a match)."""
    net = NNsight(core_gpt2)
    with pytest.raises(fxsight.ShapeError,
                       match=rf"at \[0\]: a tuple of 1 where it holds a tuple of 4"
                             rf"(.|\n)*{THIS_FILE}"):
        with net.trace(core_ids, backend=backend):
            args, kwargs = net.transformer.h[1].inputs
            net.transformer.h[1].inputs = ((args[0] * 0.5,), kwargs)


def test_a_value_of_the_enclosing_trace_in_a_nested_one_says_so():
    """(was: "a value from another (earlier) trace", though the enclosing trace is not
    earlier: it has not run yet)"""
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(fxsight.TraceError, match=r"enclosing trace, which has not run yet(.|\n)*"
                                         r"test_core_errors\.py"):
        with net.trace(torch.ones(1, 3)):
            outer = net[0].output
            with net.trace(torch.ones(1, 3)):
                net[0].output[:] = outer
