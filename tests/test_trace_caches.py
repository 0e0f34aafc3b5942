"""The per-trace caches of the hot path: bounded, and never a reason to miss a change.

(Speed is measured apart, never asserted; these tests check what each cache relies on.)
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
        assert inputs.plainly_batchable(first, other)
        inputs._batched(first, other, 1, None)
        inputs.check_batchable(first, other, 1, None)
    else:
        assert not inputs.plainly_batchable(first, other)
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


# --- the remembered runs (run.forward.LastRun) ---------------------------------------------
def _gpt2():
    from tests.models import tiny_gpt2

    return tiny_gpt2(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)


def _steer_by_hand(model, ids, vec, layer=1):
    """The steering trace below, as forward hooks: (block 0's output, logits). (The
    steering hook goes first: steering block 0 in place changes the value kept of it.)"""
    kept = {}
    handles = [model.transformer.h[layer].register_forward_hook(
                   lambda m, a, out: out + vec),
               model.transformer.h[0].register_forward_hook(
                   lambda m, a, out: kept.__setitem__("h0", out.clone()))]
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return kept["h0"], logits


def _steer_traced(wrapped, ids, vec, layer=1, **options):
    with wrapped.trace(ids, use_cache=False, **options):
        h0 = wrapped.transformer.h[0].output.save()
        wrapped.transformer.h[layer].output[:] += vec
        logits = wrapped.lm_head.output.save()
    return h0, logits


def _equal(got, want):
    return all(torch.equal(g, w) for g, w in zip(got, want))


@torch.no_grad()
def test_a_repeated_trace_reruns_its_runner_and_sees_every_change_between():
    """A trace like the previous one runs the remembered runner (no capture or runner
    lookup), and is exactly the hand-written hooks each time, also after changes to the
    model between traces that only the state check sees."""
    model = _gpt2()
    wrapped = fxsight.NNsight(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1))
    assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
    assert len(wrapped._last_run) == 1
    before = fxsight.stats()
    for _ in range(3):
        assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
    after = fxsight.stats()
    assert after["runner_hits"] - before["runner_hits"] == 3
    assert after["captures"] == before["captures"] and after["splices"] == before["splices"]

    # a shape, an option, another Program of as many nodes: each its own run
    longer = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    assert _equal(_steer_traced(wrapped, longer, vec), _steer_by_hand(model, longer, vec))
    assert _equal(_steer_traced(wrapped, ids, vec, backend="hooks"),
                  _steer_by_hand(model, ids, vec))
    assert _equal(_steer_traced(wrapped, ids, vec, layer=0),
                  _steer_by_hand(model, ids, vec, layer=0))
    changes = [
        lambda: setattr(model.transformer.h[1].attn, "scale_attn_weights", False),
        lambda: model.transformer.h[0].mlp.c_fc.weight.data.mul_(2),  # (values: same graph)
        lambda: setattr(model.transformer.h[0].mlp, "act", torch.nn.ReLU()),
        lambda: setattr(model.transformer.ln_f, "eps", 0.5),
    ]
    for change in changes:
        assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
        change()
        assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
    model.transformer.h[1].ln_1.register_forward_hook(lambda m, a, out: out * 0.5)
    with pytest.warns(RuntimeWarning, match="hooks backend"):
        assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))


def _block_output_by_hand(model, ids, layer):
    kept = {}
    handle = model.transformer.h[layer].register_forward_hook(
        lambda m, a, out: kept.__setitem__("out", out.clone()))
    try:
        model(ids, use_cache=False)
    finally:
        handle.remove()
    return kept["out"]


@torch.no_grad()
def test_remembered_runs_are_bounded_and_never_mix_programs():
    """Programs of as many nodes and saves are told apart by their structure; at most
    MAX_LAST_RUNS are remembered per wrapper."""
    from fxsight.run import forward

    model = _gpt2()
    wrapped = fxsight.NNsight(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = model(ids, use_cache=False).logits
    for _ in range(2):
        for n_saves in range(forward.MAX_LAST_RUNS + 2):
            with wrapped.trace(ids, use_cache=False):
                kept = [wrapped.transformer.h[i % 2].output.save() for i in range(n_saves)]
                logits = wrapped.lm_head.output.save()
            assert len(wrapped._last_run) <= forward.MAX_LAST_RUNS
            assert torch.equal(logits, plain)
            assert all(torch.equal(k, _block_output_by_hand(model, ids, i % 2))
                       for i, k in enumerate(kept))
        for layer in (0, 1, 0, 1):  # (as many nodes and saves, other sites)
            with wrapped.trace(ids, use_cache=False):
                out = wrapped.transformer.h[layer].output.save()
            assert torch.equal(out, _block_output_by_hand(model, ids, layer))


def test_trace_options_are_made_once_per_wrapper():
    """The same ``trace(...)`` arguments give the same options object (a remembered run
    is found by it); dict compile options are made each time."""
    net = fxsight.NNsight(Net())
    first = net._run_options(None, False)
    assert net._run_options(None, False) is first
    assert net._run_options("hooks", False) is not first
    assert net._run_options("hooks", False).backend == "hooks"
    assert net._run_options(None, {"mode": "default"}) is not \
        net._run_options(None, {"mode": "default"})
    assert net._run_options(None, {"mode": "default"}).compile.mode == "default"
    for backend in ("auto", "fx", "hooks", None):
        for compile in (None, False, True):
            for prune in (False, True):
                made = net._run_options(backend, compile, prune)
                assert made is net._run_options(backend, compile, prune)
                assert (made.compile is None) == (not compile) and made.prune == prune
    from fxsight.api import nnsight as api

    assert len(net._options_made) <= api._MAX_OPTIONS


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, attention_mask=None, scale=None):
        return self.lin(x) if scale is None else self.lin(x) * scale


_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(_shapes, min_size=0, max_size=3),
       keywords=st.dictionaries(st.sampled_from(["scale", "attention_mask", "shift"]),
                                st.one_of(st.none(), st.floats(0, 2), st.booleans(),
                                          st.just("x"), _shapes)))
def test_the_plain_batch_size_agrees_with_the_full_checks(shapes, keywords):
    """Where the one-pass shortcut for an invoke's inputs answers, the full checks
    (mapping expansion, keyword check, batch size) pass and give the same rows."""
    module = TwoInputs()
    args = tuple(torch.zeros(shape) for shape in shapes)
    kwargs = {k: torch.zeros(v) if isinstance(v, list) else v for k, v in keywords.items()}

    def full():
        a, k = inputs.expand_mapping(module, args, kwargs, "the input", None)
        inputs.check_keywords(module, a, k, "the input", None)
        return inputs.batch_size(inputs.named_inputs(module, a, k), bool(a), "the input", None)

    try:
        expected = full()  # (a layout that passes is accepted from now on)
    except TraceError:
        expected = None
    size = inputs.plain_batch_size(module, args, kwargs)
    if size is not None:
        assert size == expected


@torch.no_grad()
def test_remembered_runs_keep_nothing_the_runner_cache_lets_go():
    """A remembered run holds its runner weakly: once the runner cache drops it (here:
    all of the model's runners), the next trace looks it up again, and the old runner and
    its graph are freed."""
    import gc
    import weakref

    from fxsight.run import executable

    model = _gpt2()
    wrapped = fxsight.NNsight(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1))
    _steer_traced(wrapped, ids, vec)
    (remembered,) = wrapped._last_run.values()
    runner = weakref.ref(remembered.runner())
    executable.forget(model)
    gc.collect()
    assert runner() is None and remembered.runner() is None
    before = fxsight.stats()["runner_hits"]
    assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
    assert fxsight.stats()["runner_hits"] == before  # (looked up and built again)
    assert _equal(_steer_traced(wrapped, ids, vec), _steer_by_hand(model, ids, vec))
    assert fxsight.stats()["runner_hits"] == before + 1


@pytest.mark.parametrize("run", ["fx", "hooks", "scan"])
@pytest.mark.parametrize("first_in_autocast", [False, True], ids=["plain-first",
                                                                   "autocast-first"])
def test_shapes_and_dtypes_follow_the_autocast_state(run, first_in_autocast):
    """The same inputs in and out of ``torch.autocast``: a site's ``.dtype`` in a trace or
    scan is the dtype its forward computes in now (autocast is part of the capture and
    scan keys: their meta values were recorded in one state), and the saves equal a plain
    forward's in that state."""
    from models import mlp

    model, x = mlp(), torch.randn(4, 5)
    net = fxsight.NNsight(model)
    for in_autocast in (first_in_autocast, not first_in_autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=in_autocast):
            expected = model.layer1(x)
            if run == "scan":
                with net.scan(x):
                    dtype = net.layer1.output.dtype
                saved = expected
            else:
                with net.trace(x, backend=run):
                    dtype = net.layer1.output.dtype
                    saved = net.layer1.output.save()
        assert dtype == expected.dtype == (torch.bfloat16 if in_autocast else torch.float32)
        assert torch.equal(saved, expected)
