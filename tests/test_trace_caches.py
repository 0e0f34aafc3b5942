"""The per-trace caches of the hot path: bounded, and never a reason to miss a change.

(Speed is measured apart, never asserted; these tests check what each cache relies on.)
"""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight.api import inputs
from fxsight.errors import TraceError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, scale=None, shift=None):
        y = self.lin(x)
        if scale is not None:
            y = y * scale
        return y if shift is None else y + shift


class Other(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)


def test_accepted_input_layouts_are_bounded_and_per_layout():
    net = Net()
    signature = inputs.forward_signature(net)
    signature.accepted.clear()
    x = torch.ones(2, 3)
    inputs.check_keywords(net, (x,), {"scale": 2.0}, "the input", None)
    assert (1, ("scale",)) in signature.accepted
    # an accepted layout says nothing of another: a misspelled keyword, a missing input,
    # one positional input too many are still refused after it
    with pytest.raises(TraceError, match="not a parameter"):
        inputs.check_keywords(net, (x,), {"scael": 2.0}, "the input", None)
    with pytest.raises(TraceError, match="cannot take these inputs"):
        inputs.check_keywords(net, (), {"scale": 2.0}, "the input", None)
    with pytest.raises(TraceError, match="cannot take these inputs"):
        inputs.check_keywords(net, (x, x, x, x), {}, "the input", None)
    with pytest.raises(TraceError, match="cannot take these inputs"):
        inputs.check_keywords(net, (x, x), {"scale": 2.0}, "the input", None)
    assert len(signature.accepted) == 1  # (refusals are not remembered)
    signature.accepted.update((100 + n, ()) for n in range(inputs.MAX_ACCEPTED))
    inputs.check_keywords(net, (x,), {"shift": 1.0}, "the input", None)  # a new layout
    assert signature.accepted == {(1, ("shift",))}  # (full: cleared first)
    for kwargs in ({}, {"scale": 1.0}, {"shift": 1.0, "scale": 1.0}) * 50:
        inputs.check_keywords(net, (x,), kwargs, "the input", None)
        assert len(signature.accepted) <= inputs.MAX_ACCEPTED


def test_a_new_forward_is_checked_on_its_own():
    net = Net()
    wrapped = fxsight.NNsight(net)
    with wrapped.trace(torch.ones(2, 3), scale=2.0):
        out = wrapped.output.save()
    assert torch.equal(out, net(torch.ones(2, 3), scale=2.0))
    net.forward = Other().forward.__func__.__get__(net)  # a forward without ``scale``
    with pytest.raises(TraceError, match="not a parameter"):
        with wrapped.trace(torch.ones(2, 3), scale=2.0):
            pass


def test_program_site_paths_follow_the_reads_and_writes():
    net = Net()
    wrapped = fxsight.NNsight(net)
    with wrapped.trace(torch.ones(2, 3)) as tracer:
        wrapped.lin.output[:] = 0
        out = wrapped.output.save()
    program = tracer.program
    assert program.site_paths == {site.path for site in program.sites()} == {"lin", ""}
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.parametrize("first, other, message", [
    (((torch.ones(2, 3),), {"scale": 2.0}, 2), ((torch.ones(1, 3),), {"scale": 2.0}, 1), None),
    (((torch.ones(2, 3),), {"scale": 2.0}, 2), ((torch.ones(1, 4),), {"scale": 2.0}, 1),
     "shapes"),
    (((torch.ones(2, 3),), {}, 2), ((torch.ones(1, 3, dtype=torch.float64),), {}, 1),
     "dtypes"),
    (((torch.ones(2, 3),), {"scale": 2.0}, 2), ((torch.ones(1, 3),), {"scale": 3.0}, 1),
     "disagree"),
    (((torch.ones(2, 3),), {"scale": 2.0}, 2), ((torch.ones(1, 3),), {"shift": 2.0}, 1),
     "other keyword inputs"),
    (((torch.ones(2, 3),), {"scale": float("nan")}, 2),
     ((torch.ones(1, 3),), {"scale": float("nan")}, 1), "disagree"),
])
def test_plainly_batchable_agrees_with_the_full_check(first, other, message):
    """The shortcut for tensor invokes with plain options accepts what the full check
    accepts, and leaves every refusal to it."""
    if message is None:
        assert inputs._plainly_batchable(first, other)
        inputs._batched(first, other, 1, None)
        inputs.check_batchable(first, other, 1, None)
    else:
        assert not inputs._plainly_batchable(first, other)
        with pytest.raises(TraceError, match=message):
            inputs.check_batchable(first, other, 1, None)


@pytest.mark.parametrize("change", [
    lambda net: net.lin.register_buffer("mask", torch.ones(3)),  # into an empty dict
    lambda net: net.register_parameter("extra", torch.nn.Parameter(torch.ones(1))),
    lambda net: net.lin.register_parameter("bias", None),  # a held dict's entry
    lambda net: net.lin._parameters.pop("bias"),
])
def test_the_state_token_sees_tensors_added_to_any_module(change):
    """The state check compares the tensor dicts that held tensors with their copies and
    the empty ones by their length: a tensor added to either is a new state."""
    from fxsight.capture import state

    net = Net()
    token = state.state_token(net)
    assert state.state_token(net) == token
    watch = state.current_watch(net)
    assert watch.empty and watch.held  # (both kinds are there to check)
    change(net)
    assert state.state_token(net) != token
