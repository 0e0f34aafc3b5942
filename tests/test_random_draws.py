"""Random numbers drawn in a block (``torch.randn_like(h)``, ``F.dropout``, ``x.normal_()``)
are drawn where the block has reached, in the order it is written, as nnsight and forward
hooks written in that order draw them: a draw recorded after a read of a later module runs
no earlier than that module, so the model's own dropouts and the block's draws take the
same numbers from the generator as in the plain forward with hooks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.errors import OrderError
from models import mlp, tiny_gpt2

BACKENDS = ("fx", "hooks")


def _keeper(kept: dict, name: str):
    """A plain forward hook that keeps its module's output in ``kept[name]``."""
    def keep(module, args, output):
        kept[name] = output
    return keep


def _seeded_reference(reference_hooks, model, hooks: dict, run):
    """``run()`` from seed 0, without gradients, with plain forward ``hooks`` on ``model``:
    its value and the generator's state after it."""
    torch.manual_seed(0)
    with torch.no_grad(), reference_hooks(model, hooks=hooks):
        value = run()
    return value, torch.get_rng_state()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_from_an_earlier_read_is_drawn_after_the_later_dropouts(backend, core_ids,
                                                                        reference_hooks):
    """Train mode (dropout draws): noise shaped as block 0's output, added to block 1's,
    is drawn after block 1's dropouts (the block reached block 1 first); it used to be
    drawn right after block 0, shifting the numbers of block 1's dropouts."""
    model = tiny_gpt2().train()
    kept = {}

    def add_noise(module, args, output):
        return output + torch.randn_like(kept["h0"])

    expected, expected_rng = _seeded_reference(
        reference_hooks, model, {"transformer.h.0": _keeper(kept, "h0"),
                                 "transformer.h.1": add_noise},
        lambda: model(core_ids).logits)
    net = NNsight(model)
    torch.manual_seed(0)
    with net.trace(core_ids, backend=backend) as tracer:
        h0 = net.transformer.h[0].output
        net.transformer.h[1].output = net.transformer.h[1].output + torch.randn_like(h0)
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.equal(logits, expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_keep_the_blocks_order(backend, reference_hooks):
    """Two draws written after a read of ``layer2``, the second from ``layer1``'s value:
    drawn in the written order (it used to draw the second one first, at ``layer1``)."""
    model, x = mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    got = {}

    def draw(module, args, output):
        got["a"] = torch.randn_like(output)
        got["b"] = torch.rand_like(got["layer1"])
        got["c"] = torch.nn.functional.dropout(got["layer1"], 0.5)

    _seeded_reference(reference_hooks, model,
                      {"layer1": _keeper(got, "layer1"), "layer2": draw}, lambda: model(x))
    net = NNsight(model)
    torch.manual_seed(0)
    with net.trace(x, backend=backend):
        a = torch.randn_like(net.layer2.output).save()
        b = torch.rand_like(net.layer1.output).save()
        c = torch.nn.functional.dropout(net.layer1.output, 0.5).save()
    assert torch.equal(a, got["a"]) and torch.equal(b, got["b"]) and torch.equal(c, got["c"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_draw_written_into_a_module_the_block_has_passed_says_why(backend):
    model, x = mlp(), torch.randn(3, 5)
    net = NNsight(model)
    with pytest.raises(OrderError, match=r"(?s)draws random numbers.*layer2.*test_random"):
        with net.trace(x, backend=backend):
            later = net.layer2.output.save()
            net.layer1.output = net.layer1.output + torch.randn_like(net.layer1.output)


def _noisy(t: torch.Tensor) -> torch.Tensor:
    return t + torch.rand_like(t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_applied_function_runs_where_the_block_has_reached(backend, reference_hooks):
    """``fxsight.apply(fn, ...)`` of a function that draws random numbers, written after a
    draw at ``layer2``, draws after it, as a plain hook at ``layer2`` written in that order
    does; fxsight cannot see inside ``fn``, so every applied function runs no earlier than
    the block has reached (it used to run as soon as ``layer1``'s output existed, taking
    the numbers before ``a``'s)."""
    model, x = mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    got = {}

    def draw(module, args, output):
        got["a"] = torch.randn_like(output)
        got["b"] = _noisy(got["layer1"])
        got["c"] = got["layer1"] * 2

    expected, expected_rng = _seeded_reference(
        reference_hooks, model, {"layer1": _keeper(got, "layer1"), "layer2": draw},
        lambda: model(x))
    net = NNsight(model)
    torch.manual_seed(0)
    with net.trace(x, backend=backend) as tracer:
        a = torch.randn_like(net.layer2.output).save()
        b = fxsight.apply(_noisy, net.layer1.output).save()
        c = fxsight.apply(lambda t: t * 2, net.layer1.output).save()
        out = net.output.save()
    assert tracer.backend == backend
    assert torch.equal(a, got["a"]) and torch.equal(b, got["b"])
    assert torch.equal(c, got["c"]) and torch.equal(out, expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_applied_function_in_train_mode_draws_after_the_dropouts_before_it(
        backend, core_ids, reference_hooks):
    """Train mode: noise applied to block 0's output and written into block 1's output is
    drawn after block 1's dropouts, as a plain hook at block 1 draws it."""
    model = tiny_gpt2().train()
    kept = {}

    def add_noise(module, args, output):
        return output + _noisy(kept["h0"])

    expected, expected_rng = _seeded_reference(
        reference_hooks, model, {"transformer.h.0": _keeper(kept, "h0"),
                                 "transformer.h.1": add_noise},
        lambda: model(core_ids).logits)
    net = NNsight(model)
    torch.manual_seed(0)
    with torch.no_grad(), net.trace(core_ids, backend=backend) as tracer:
        h0 = net.transformer.h[0].output
        h1 = net.transformer.h[1].output
        net.transformer.h[1].output = h1 + fxsight.apply(_noisy, h0)
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.equal(logits, expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_applied_function_written_into_a_module_the_block_has_passed_says_why(backend):
    model, x = mlp(), torch.randn(3, 5)
    net = NNsight(model)
    with pytest.raises(OrderError, match=r"(?s)fxsight.apply.*layer2.*test_random"):
        with net.trace(x, backend=backend):
            later = net.layer2.output.save()
            net.layer1.output = fxsight.apply(_noisy, net.layer1.output)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_applied_function_whose_value_is_not_used_still_runs(backend, reference_hooks):
    """(was: on fx an applied function whose result nothing used was pruned, so its draws
    were missing and the generator ended elsewhere than after a plain hook calling it)"""
    model, x = mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(0))

    def draw(module, args, output):
        _noisy(output)

    expected, expected_rng = _seeded_reference(
        reference_hooks, model, {"layer1": draw},
        lambda: model.layer2(model.act1(model.layer1(x))))
    net = NNsight(model)
    torch.manual_seed(0)
    with net.trace(x, backend=backend) as tracer:
        fxsight.apply(_noisy, net.layer1.output)
        h2 = net.layer2.output.save()
    assert tracer.backend == backend
    assert torch.equal(h2, expected)
    assert torch.equal(torch.get_rng_state(), expected_rng)


def _dropout_mlp() -> torch.nn.Sequential:
    """A tiny MLP with dropouts, in train mode (each dropout draws)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(OrderedDict(
            fc1=torch.nn.Linear(5, 8), drop1=torch.nn.Dropout(0.5),
            fc2=torch.nn.Linear(8, 8), drop2=torch.nn.Dropout(0.5),
            fc3=torch.nn.Linear(8, 2)))
    return model.train()


@pytest.mark.compile
def test_an_applied_draw_in_a_compiled_trace_takes_the_eager_numbers(reference_hooks):
    """``compile=True``: an applied function drawing ``torch.rand_like``, written into
    ``fc2``'s output, draws after ``drop1`` and before ``drop2`` with the same numbers as
    the eager trace and a plain hook at ``fc2`` (inductor keeps the fallback generator for
    it), and leaves the generator where they leave it."""
    model = _dropout_mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    kept = {}

    def add_noise(module, args, output):
        return output + _noisy(kept["drop1"])[:, :8]

    expected, expected_rng = _seeded_reference(
        reference_hooks, model, {"drop1": _keeper(kept, "drop1"), "fc2": add_noise},
        lambda: model(x))
    net = NNsight(model)
    for compile in (False, True):
        torch.manual_seed(0)
        with torch.no_grad(), net.trace(x, backend="fx", compile=compile) as tracer:
            h = net.drop1.output
            net.fc2.output = net.fc2.output + fxsight.apply(_noisy, h)[:, :8]
            out = net.output.save()
        assert tracer.backend == "fx"
        assert torch.equal(out, expected), f"compile={compile}"
        assert torch.equal(torch.get_rng_state(), expected_rng), f"compile={compile}"
