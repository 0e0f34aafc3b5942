"""One module object registered at several paths (``self.b = self.a``, one block twice in a
ModuleList): its sites are its calls, counted over every path, as a forward hook on the
module object sees them (and as nnsight's envoys, aliases of one another, read them). A read
through a path other than the first says so once; an envoy reached by such a path follows
the model when the first path is given another module."""

from __future__ import annotations

import warnings

import pytest
import torch
from profiled import run_profiled

from fxsight import NNsight


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class _Shared(torch.nn.Module):
    """``a`` and ``b`` are one Linear; ``h`` holds one block twice."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = self.a
        block = _Inner()
        self.h = torch.nn.ModuleList([block, block])

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        for layer in self.h:
            x = layer(x)
        return x


def _model():
    torch.manual_seed(0)
    return _Shared().eval()


def _with_hook(model, module, call, change, x):
    """``model(x)`` with ``change`` applied to ``module``'s output at its call ``call``,
    and every output ``module`` gave (a plain forward hook on the module object)."""
    seen = []

    def hook(mod, args, output):
        seen.append(output)
        return change(output) if len(seen) - 1 == call else None

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x), seen
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("path", ["a", "b", "h.0", "h.1", "h.1.proj"])
@pytest.mark.parametrize("call", [0, 1])
def test_every_path_reads_and_writes_the_calls_a_forward_hook_sees(backend, path, call):
    model = _model()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    envoy = nm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (said: another test)
        with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
            with tracer.iter[call]:
                read = envoy.output.save()
                envoy.output = envoy.output * 2
            out = nm.output.save()
    expected, seen = _with_hook(model, model.get_submodule(path), call, lambda o: o * 2, x)
    torch.testing.assert_close(read, seen[call])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_read_through_a_later_path_says_which_call_it_is(backend):
    nm = NNsight(_model())
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match=r"model\.h\.1 is the module object registered "
                      r"first as model\.h\.0.*first call.*tracer\.iter"):
        with torch.no_grad(), nm.trace(x, backend=backend):
            nm.h[1].output.save()
    with pytest.warns(RuntimeWarning, match=r"model\.h\.1\.proj is the module object "
                      r"registered first as model\.h\.0\.proj"):
        with torch.no_grad(), nm.trace(x, backend=backend):
            nm.h[1].proj.output.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (once per envoy; the first path says nothing)
        with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
            nm.h[1].output.save()
            nm.h[0].output.save()
            with tracer.iter[1]:
                nm.b.output.save()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_path_follows_the_model_when_the_first_path_gets_another_module(backend):
    # model.b's envoy read the sites of model.a (the first path of their module); after
    # model.a = new, model.b used to read the new module's output (silently)
    model = _model()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad(), nm.trace(x, backend=backend):
            nm.b.output.save()
    torch.manual_seed(1)
    model.a = torch.nn.Linear(4, 4)
    with torch.no_grad(), nm.trace(x, backend=backend):
        read_b = nm.b.output.save()
        read_a = nm.a.output.save()
    _, seen_b = _with_hook(model, model.b, None, None, x)
    _, seen_a = _with_hook(model, model.a, None, None, x)
    torch.testing.assert_close(read_b, seen_b[0])
    torch.testing.assert_close(read_a, seen_a[0])


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_envoy_follows_its_module_registered_at_an_earlier_path_since(backend):
    """``model.b``'s envoy, reached while ``b`` was its module's only path, reads the module's
    calls after ``model.a = model.b`` (its first path now ``a``), as a forward hook on it
    sees them (was: "model.b has no output call #0 ... the module never runs", the envoy
    keeping the path ``b`` the events no longer use)."""
    torch.manual_seed(0)
    model = _TwoLinears().eval()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    with torch.no_grad(), nm.trace(x, backend=backend):
        nm.b.output.save()
    model.a = model.b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (said: another test)
        with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
            first = nm.b.output.save()
            with tracer.iter[1]:
                nm.b.output = nm.b.output * 2
            out = nm.output.save()
    expected, seen = _with_hook(model, model.b, 1, lambda o: o * 2, x)
    torch.testing.assert_close(first, seen[0])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_the_cache_is_reachable_by_every_path(backend):
    """``tracer.cache()`` holds a shared module's calls under its first path, reachable by
    every path, by key and by attribute (was: ``cache["model.b"]`` a KeyError,
    ``cache.model.h[1]`` an IndexError)."""
    model = _model()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
        cache = tracer.cache()
    for path in ("a", "b", "h.0", "h.1", "h.0.proj", "h.1.proj"):
        _, seen = _with_hook(model, model.get_submodule(path), None, None, x)
        by_key = [entry.output for entry in cache[f"model.{path}"]]
        view = cache.model
        for part in path.split("."):
            view = view[int(part)] if part.isdigit() else getattr(view, part)
        assert len(by_key) == len(seen) == 2, path
        for got, expected, also in zip(by_key, seen, view.output):
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(also, expected)
    assert sorted(cache.keys()) == ["model", "model.a", "model.h.0", "model.h.0.proj"]
    assert {"model.b", "model.h.1", "model.h.1.proj"} <= set(cache.keys(alias=True))


class _Outer(torch.nn.Module):
    """Two Linears below the root: ``outer.a`` then ``outer.b``."""

    def __init__(self):
        super().__init__()
        self.outer = _TwoLinears()

    def forward(self, x):
        return self.outer(x)


def _walks(monkeypatch) -> list:
    """Every walk of the model's modules that envoys make to find first paths."""
    from fxsight.api import envoy

    walks = []
    original = envoy.module_paths
    monkeypatch.setattr(envoy, "module_paths", lambda model: walks.append(model) or
                        original(model))
    return walks


def test_a_trace_of_an_unchanged_model_finds_its_paths_without_a_walk(monkeypatch):
    """A trace's first envoy lookup walked every module of the model to find first paths
    (a loop of small traces paid for it every trace); while no module's submodules changed
    since the last walk, the paths found then are used."""
    model = _model()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    walks = _walks(monkeypatch)
    for _ in range(3):
        with torch.no_grad(), nm.trace(x):
            nm.h[0].proj.output.save()
    assert len(walks) == 1
    model.h[1] = _Inner()  # (a change: walked again)
    with torch.no_grad(), nm.trace(x):
        nm.h[1].proj.output.save()
    assert len(walks) == 2


def _by_attribute(outer):
    outer.a = outer.b


def _by_item(outer):
    outer._modules["a"] = outer.b


def _by_new_dict(outer):
    outer._modules = {"a": outer.b, "b": outer.b}


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("change", [_by_attribute, _by_item, _by_new_dict])
def test_a_path_follows_a_change_below_the_root_between_traces(backend, change):
    """``outer.b``'s envoy, reached while ``outer.b`` was its module's first path, reads the
    module's calls after the module is registered at ``outer.a`` too (by attribute, by the
    ``_modules`` item, or in a new ``_modules`` dict), as a forward hook on it sees them: the
    paths found before are not kept for a tree that changed below the root."""
    torch.manual_seed(0)
    model = _Outer().eval()
    nm = NNsight(model)
    x = torch.randn(2, 4)
    with torch.no_grad(), nm.trace(x, backend=backend):
        nm.outer.b.output.save()
    change(model.outer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a read through a later path)
        with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
            first = nm.outer.b.output.save()
            with tracer.iter[1]:
                nm.outer.b.output = nm.outer.b.output * 2
            out = nm.output.save()
    expected, seen = _with_hook(model, model.outer.b, 1, lambda o: o * 2, x)
    torch.testing.assert_close(first, seen[0])
    torch.testing.assert_close(out, expected)


def _top_level_walks(run) -> int:
    """How many walks of a module tree (``named_modules`` calls not made by another) ``run``
    makes, seen by a profile function (no class is patched)."""
    code, frames = torch.nn.Module.named_modules.__code__, []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code and \
                (frame.f_back is None or frame.f_back.f_code is not code):
            frames.append(frame)  # (kept: a generator's resumes are one frame)

    run_profiled(run, profile)
    return len({id(frame) for frame in frames})


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_cache_of_an_unchanged_model_finds_the_other_paths_without_a_walk(backend):
    """Filling ``tracer.cache()`` walked every module twice per trace to find the other
    paths of shared modules (a loop of cache traces paid for it every trace); while no
    module's submodules changed since, the paths found then are used, and a module
    registered at one more path since is reachable by it."""
    model = _model()
    nm = NNsight(model)
    x = torch.randn(2, 4)

    def trace(cached=True):
        with torch.no_grad(), nm.trace(x, backend=backend) as tracer:
            cache = tracer.cache() if cached else nm.output.save()
        return cache

    trace(), trace(cached=False)
    found = []
    # (the hooks backend finds the modules it hooks from its last walk too:
    # ``module_tree.first_paths``)
    assert _top_level_walks(lambda: found.append(trace())) == \
        _top_level_walks(lambda: trace(cached=False)) == 0
    assert {"model.b", "model.h.1"} <= set(found[0].keys(alias=True))
    model.c = model.a  # (one more path: walked again)
    cache = trace()
    _, seen = _with_hook(model, model.a, None, None, x)
    assert [e.output for e in cache["model.c"]] == [e.output for e in cache["model.a"]]
    for got, expected in zip(cache["model.c"], seen):
        torch.testing.assert_close(got.output, expected)
