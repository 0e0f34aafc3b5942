"""Integers that index tensors are inputs of the spliced graph (``fxsight.splice.indices``):
a loop that patches one position after another splices one graph, and each position's
answer is the one hand-written forward hooks give. Integers that pick an item of a tuple,
and integers inside slices, stay constants; an index out of range still raises before
anything runs."""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.errors import TraceError

TOL = dict(rtol=1e-5, atol=1e-5)


def _patched(model, clean_ids, corrupt_ids, layer, position, **options):
    """fxsight: the clean run's block output at ``position`` written into the corrupted
    run's (two invokes of one trace)."""
    with model.trace(**options) as tracer:
        with tracer.invoke(clean_ids):
            clean = model.transformer.h[layer].output[:, position]
        with tracer.invoke(corrupt_ids):
            model.transformer.h[layer].output[:, position] = clean
            logits = model.lm_head.output.save()
    return logits


def _patched_by_hand(model, clean_ids, corrupt_ids, layer, position):
    """The same with plain PyTorch: a hook keeps the clean value, another writes it."""
    block = model.transformer.h[layer]
    kept = {}

    def keep(module, args, output):
        kept["clean"] = output[:, position].clone()

    handle = block.register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(clean_ids)
    finally:
        handle.remove()

    def write(module, args, output):
        output = output.clone()
        output[:, position] = kept["clean"]
        return output

    handle = block.register_forward_hook(write)
    try:
        with torch.no_grad():
            return model(corrupt_ids).logits
    finally:
        handle.remove()


@pytest.fixture
def prompts(core_ids):
    clean = core_ids[:1]
    corrupt = clean.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 1) % 128
    return clean, corrupt


def test_a_loop_over_positions_splices_once_and_matches_hand_written_hooks(core_gpt2, prompts):
    model = NNsight(core_gpt2)
    clean, corrupt = prompts
    n = clean.shape[1]
    with torch.no_grad():
        _patched(model, clean, corrupt, 1, 0)  # (the capture, the first splice)
        fxsight.reset_stats()
        for position in [*range(1, n), -1, -n]:
            got = _patched(model, clean, corrupt, 1, position)
            want = _patched_by_hand(core_gpt2, clean, corrupt, 1, position)
            torch.testing.assert_close(got, want, **TOL)
    stats = fxsight.stats()
    assert stats["splices"] == 0  # every position ran the graph spliced for position 0
    assert stats["executable_hits"] == n + 1
    # and was validated by checking its index against the walk of position 0's Program
    assert stats["walks_skipped"] == n + 1


def test_positions_differ_where_the_graph_is_shared(core_gpt2, prompts):
    """Not one position's answer for all: each differs from the corrupted run exactly at
    and after its position (causal attention)."""
    model = NNsight(core_gpt2)
    clean, corrupt = prompts
    with torch.no_grad():
        plain = core_gpt2(corrupt).logits
        for position in range(clean.shape[1]):
            logits = _patched(model, clean, corrupt, 0, position)
            changed = (logits - plain).abs().amax(dim=-1)[0] > 1e-6
            # (the prompts differ at 2: before it, the clean value is the corrupted one)
            expected = [position >= 2 and p >= position for p in range(clean.shape[1])]
            assert changed.tolist() == expected, position


def test_an_index_out_of_range_raises_before_running_on_a_shared_graph(core_gpt2, prompts):
    model = NNsight(core_gpt2)
    clean, corrupt = prompts
    with torch.no_grad():
        _patched(model, clean, corrupt, 1, 3)
        for position in (clean.shape[1], -clean.shape[1] - 1):
            with pytest.raises((TraceError, IndexError)) as raised:
                _patched(model, clean, corrupt, 1, position)
            assert "test_index_inputs.py" in str(raised.value)


def test_items_of_a_tuple_and_slice_bounds_stay_constants():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 3

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            a, b = self.pair(x)
            return self.linear(a - b)

    net = NNsight(Net())
    x = torch.randn(2, 4)
    with torch.no_grad():
        for item, stop in ((0, 2), (1, 3), (0, 1)):
            with net.trace(x):
                value = net.pair.output[item][:, :stop].save()
            torch.testing.assert_close(value, ((x + 1, x * 3)[item])[:, :stop])
        for item in (0, 1, 0):  # (Programs that differ in that integer only)
            with net.trace(x):
                value = net.pair.output[item].save()
            torch.testing.assert_close(value, (x + 1, x * 3)[item])


def test_a_steering_loop_over_positions_compiles_a_bounded_number_of_times():
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(),
                                      torch.nn.Linear(6, 3)))
    x, vector = torch.randn(2, 5, 6), torch.randn(6)

    def steered(position, **options):
        with net.trace(x, **options):
            net[0].output[:, position] += vector
            out = net.output.save()
        return out

    with torch.no_grad():
        fxsight.reset_stats()
        positions = [0, 1, 2, 3, 4, -1, 0, 2, -2]
        for position in positions:
            torch.testing.assert_close(steered(position, compile=True), steered(position),
                                       **TOL)
    stats = fxsight.stats()
    assert stats["splices"] == 2  # one eager graph, one compiled
    # inductor specializes an index first compiled at 0, and one position's sign: the
    # other values get compilations of their own, and every call runs without dynamo
    assert stats["compilations"] <= 3
    assert stats["direct_runs"] == len(positions)


def test_several_integers_in_one_key_select_the_dimensions_they_name():
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()))
    x = torch.randn(2, 5, 6)
    first = net._module[0]
    with torch.no_grad():
        for row, position, feature in ((0, 1, 2), (1, 4, 0), (1, -1, -2), (0, 2, 5)):
            with net.trace(x):
                read = net[0].output[row, :, feature].save()
                net[0].output[:, position, feature] = 7.0
                out = net.output.save()
            hidden = first(x)
            viewed = hidden[row, :, feature]  # (a view: the write below shows in it too)
            hidden[:, position, feature] = 7.0
            torch.testing.assert_close(read, viewed)
            torch.testing.assert_close(out, torch.tanh(hidden))


def test_static_compilation_keeps_integers_as_constants():
    """``compile={"dynamic": False}``: dynamo would recompile for each new integer up to
    its recompile limit and then run eagerly; each position keeps a graph of its own."""
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        fxsight.reset_stats()
        for position in (0, 2):
            with net.trace(x, compile={"dynamic": False}):
                net[0].output[:, position] = 0
                out = net.output.save()
            want = net._module[0](x)
            want[:, position] = 0
            torch.testing.assert_close(out, torch.relu(want), **TOL)
    assert fxsight.stats()["splices"] == 2
