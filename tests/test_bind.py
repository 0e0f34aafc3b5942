"""Saved values are real values after the block wherever the caller put them (issue 12):
nested containers, object attributes, values saved in helper functions; a saved proxy
that could not be reached still stands for its value."""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import bind
from fxsight import NNsight
from models import mlp

BACKENDS = ("fx", "hooks")
_ELSEWHERE: list = []


class _Store:
    def __init__(self):
        self.acts = {}
        self.pairs = []


def _put_elsewhere(value):
    _ELSEWHERE.clear()
    _ELSEWHERE.append(value)


def _taken_from_elsewhere():
    return _ELSEWHERE.pop()


def _saved_by_a_helper(net):
    return net.layer1.output.save()


@pytest.fixture
def setup():
    model = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    return model, NNsight(model), x


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_values_are_bound_wherever_they_are_kept(setup, backend):
    model, net, x = setup
    hidden = model.layer1(x)
    out = model(x)
    store, nested = _Store(), {"pair": None, "deep": [[None]]}
    with net.trace(x, backend=backend):
        a = net.layer1.output.save()
        b = net.output.save()
        nested["pair"] = (a, b)
        nested["deep"][0][0] = b
        store.acts["layer1"] = a
        store.pairs.append((a, {"out": b}))
        from_helper = _saved_by_a_helper(net)
        both = [a, a]  # the same proxy twice
    for value in (a, nested["pair"][0], store.acts["layer1"], store.pairs[0][0],
                  from_helper, both[0], both[1]):
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, hidden, rtol=0, atol=0)
    for value in (b, nested["pair"][1], nested["deep"][0][0], store.pairs[0][1]["out"]):
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, out, rtol=0, atol=0)
    assert type(nested["pair"]) is tuple


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_proxy_out_of_reach_stands_for_its_value(setup, backend):
    model, net, x = setup
    hidden = model.layer1(x)
    with net.trace(x, backend=backend):
        _put_elsewhere(net.layer1.output.save())  # (a global the block's code never names)
    proxy = _taken_from_elsewhere()
    assert isinstance(proxy, fxsight.Proxy)
    torch.testing.assert_close(proxy.value, hidden, rtol=0, atol=0)
    assert proxy.shape == hidden.shape and proxy.dtype == hidden.dtype
    torch.testing.assert_close(proxy + 1, hidden + 1, rtol=0, atol=0)
    torch.testing.assert_close(torch.relu(proxy), torch.relu(hidden), rtol=0, atol=0)
    torch.testing.assert_close(proxy.sum(dim=0), hidden.sum(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(proxy[0], hidden[0], rtol=0, atol=0)
    assert bool(proxy.sum() == hidden.sum())
    assert float(proxy[0, 0]) == float(hidden[0, 0])
    assert repr(proxy) == repr(hidden)


def test_an_unsaved_proxy_after_the_trace_is_a_clear_error(setup):
    """A value only a variable holds, unsaved, stays a proxy whose use says to save it
    (stored into a list, dict or object it is saved: see test_parity7.py)."""
    model, net, x = setup
    with net.trace(x):
        hidden = net.layer1.output  # not saved
        net.output.save()
    with pytest.raises(fxsight.TraceError, match="not saved"):
        hidden + 1


class _Walked(list):
    """A user's list that counts the reads of its items (a binding walk reads them)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


class _WalkedDict(dict):
    """A user's dict that counts the walks over its keys."""

    def __init__(self, **items):
        super().__init__(**items)
        self.walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()


@pytest.mark.skipif(not bind._COUNTED, reason="this Python does not count references exactly")
def test_binding_stops_once_every_saved_proxy_is_replaced(setup):
    """A loop that keeps its results (thousands of them) pays nothing for them per trace:
    the walk ends once nothing but itself refers to a saved proxy."""
    model, net, x = setup
    hidden, out = model.layer1(x), model(x)
    results, history = _Walked(torch.zeros(1) for _ in range(1000)), _WalkedDict(a=1, b=[2])
    with net.trace(x):
        h = net.layer1.output.save()
    assert results.reads == 0 and history.walks == 0
    assert type(h) is torch.Tensor
    torch.testing.assert_close(h, hidden, rtol=0, atol=0)
    # a proxy kept in a container too: the walk goes on until that one is replaced as well
    with net.trace(x):
        h = net.layer1.output.save()
        history["last"] = h
        pair = [None, net.output.save()]
    assert history.walks >= 1
    assert type(h) is torch.Tensor and type(history["last"]) is torch.Tensor
    assert history["last"] is h and type(pair[1]) is torch.Tensor
    torch.testing.assert_close(pair[1], out, rtol=0, atol=0)
    assert results.reads == 0  # (walked last: the block's names come first, from the end)


def test_saved_values_are_bound_in_every_kind_of_frame(setup):
    """Closures' cells, generators, class bodies and exec'd code: each writes its
    variables back its own way (the walk's reference counts must see every write)."""
    model, net, x = setup
    hidden = model.layer1(x)

    def in_a_closure():
        with net.trace(x):
            h = net.layer1.output.save()

        def inner():
            return h
        return inner()

    def in_a_generator():
        with net.trace(x):
            h = net.layer1.output.save()
            pair = (h, [h])
        yield h, pair

    class InAClassBody:
        with net.trace(x):
            h = net.layer1.output.save()

    namespace = {"net": net, "x": x}
    exec("with net.trace(x):\n    h = net.layer1.output.save()\n    d = {'k': (h,)}\n",
         namespace)
    h, pair = next(in_a_generator())
    for value in (in_a_closure(), h, pair[0], pair[1][0], InAClassBody.h, namespace["h"],
                  namespace["d"]["k"][0]):
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, hidden, rtol=0, atol=0)


@pytest.mark.skipif(not bind._COUNTED, reason="this Python does not count references exactly")
def test_a_session_loop_does_not_walk_its_earlier_results(setup):
    """In a session every trace saves what a later trace may use (its unsaved proxies the
    caller can reach): the walk ends once each of them is found, so a loop that collects
    thousands of results does not walk them at every trace."""
    model, net, x = setup
    out = model(x)
    history = _Walked(torch.zeros(1) for _ in range(1000))
    with net.session():
        outs = fxsight.save(_Walked(torch.zeros(1) for _ in range(1000)))
        with net.trace(x):
            hidden = net.layer1.output  # no .save(): the next trace uses it
        for _ in range(3):
            with net.trace(x):
                net.layer1.output = hidden
                outs.append(net.output)  # (unsaved: saved by the session at the end)
    assert history.reads == 0
    assert outs.reads < 20  # (from the end: what the block appended)
    assert len(outs) == 1003
    for value in outs[1000:]:
        assert type(value) is torch.Tensor
        torch.testing.assert_close(value, out, rtol=0, atol=0)
