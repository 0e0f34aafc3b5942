"""tracer.cache(): every module's outputs (and inputs) of a trace, after interventions, equal
to what hand-written forward hooks capture; conversions honoured; navigation by path,
attribute, index and renamed path; clear errors for modules that are not there."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import fxsight
from fxsight import NNsight, TraceError
from fxsight.api.cache import CacheDict, Entry
from models import mlp, tiny_gpt2, tiny_llama
from profiled import run_profiled

BACKENDS = ("fx", "hooks")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


def _hook_capture(model: torch.nn.Module, x: torch.Tensor, edit=None):
    """Every module's inputs ``(args, kwargs)`` and output, by forward (pre-)hooks.
    ``edit(path, output)`` may return a replacement output (as an intervention would)."""
    outputs, inputs, handles = {}, {}, []

    def pre(path):
        def hook(module, args, kwargs):
            inputs[path] = (args, kwargs)
        return hook

    def post(path):
        def hook(module, args, output):
            if edit is not None:
                new = edit(path, output)
                if new is not None:
                    output = new
            outputs[path] = output
            return output
        return hook

    try:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post(path)))
        with torch.no_grad():
            model(x, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def _key(path: str) -> str:
    return f"model.{path}" if path else "model"


def _assert_same(actual, expected):
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    assert spec_a == spec_e, (spec_a, spec_e)
    for a, e in zip(flat_a, flat_e):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor)
            assert a.shape == e.shape and a.dtype == e.dtype
            assert torch.equal(a, e)
        else:
            assert a == e


def _assert_same_inputs(actual, expected, backend):
    """Inputs ``(args, kwargs)`` are equal -- except that the captured graph (fx backend)
    takes transformers' tracing path, which passes the causal attention mask explicitly
    where eager execution passes ``None`` and lets attention apply it implicitly."""
    if backend == "fx" and expected is None and isinstance(actual, torch.Tensor):
        seq = actual.shape[-1]
        assert actual.dtype == torch.bool
        assert torch.equal(actual.reshape(-1, seq, seq)[0],
                           torch.ones(seq, seq, dtype=torch.bool).tril())
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same_inputs(a, e, backend)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same_inputs(actual[key], expected[key], backend)
    else:
        _assert_same(actual, expected)


# --- contents equal hand-written hook captures ------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_cache_equals_forward_hooks(which, backend, request):
    module = request.getfixturevalue(which)
    x = _ids()
    ref_inputs, ref_outputs = _hook_capture(module, x)
    model = NNsight(module)
    with torch.no_grad(), model.trace(x, use_cache=False, backend=backend) as tracer:
        cache = tracer.cache(include_inputs=True)
    assert tracer.backend == backend
    assert isinstance(cache, CacheDict)
    assert set(cache.keys()) == {_key(p) for p in ref_outputs}
    for path, output in ref_outputs.items():
        entry = cache[_key(path)]
        assert isinstance(entry, Entry)
        _assert_same(entry.output, output)
        _assert_same_inputs(entry.inputs, ref_inputs[path], backend)
    # the whole model: output and input of the root
    _assert_same(cache["model"].output, ref_outputs[""])
    assert torch.equal(cache["model"].input, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_defaults_outputs_only_and_in_forward_order(gpt2, backend):
    x = _ids(1)
    _, ref_outputs = _hook_capture(gpt2, x)
    model = NNsight(gpt2)
    with model.trace(x, use_cache=False, backend=backend) as tracer:
        cache = tracer.cache()
    keys = list(cache.keys())
    assert keys.index("model.transformer.h.0") < keys.index("model.transformer.h.1") < \
        keys.index("model.lm_head")
    entry = cache["model.transformer.h.1"]
    assert entry.inputs is None and entry.input is None
    assert torch.equal(entry.output, ref_outputs["transformer.h.1"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_values_are_after_interventions(gpt2, backend):
    x = _ids(2)

    def zero_position_1(path, output):
        if path == "transformer.h.0":
            output = output.clone()
            output[:, 1] = 0
            return output
        return None

    ref_inputs, ref_outputs = _hook_capture(gpt2, x, edit=zero_position_1)
    model = NNsight(gpt2)
    with torch.no_grad(), model.trace(x, use_cache=False, backend=backend) as tracer:
        cache = tracer.cache(modules=["transformer.h.0", model.transformer.h[1],
                                      model.lm_head], include_inputs=True)
        model.transformer.h[0].output[:, 1] = 0
    assert list(cache.keys()) == ["model.transformer.h.0", "model.transformer.h.1",
                                  "model.lm_head"]
    assert (cache["model.transformer.h.0"].output[:, 1] == 0).all()
    for path in ("transformer.h.0", "transformer.h.1", "lm_head"):
        assert torch.equal(cache[_key(path)].output, ref_outputs[path])
    assert torch.equal(cache.model.transformer.h[1].input, ref_inputs["transformer.h.1"][0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_converted_entry_is_taken_where_its_module_returns(backend):
    """An in-place edit at the next module's input (the same tensor as layer1's output):
    a cache converting layer1's output (a copy: ``dtype``, or ``device`` off the model's)
    holds it as layer1 returned it, as a cache hook there does (was: the edit, recorded
    before the cache's read at the block's end, was in the copy); an unconverted entry is
    the tensor itself, which the edit changes, as a hook's ``output.detach()`` is."""
    model = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    kept = {}
    handles = [model.layer1.register_forward_hook(lambda m, a, o: kept.update(
                   copy=o.detach().to(torch.float64), alias=o.detach())),
               model.act1.register_forward_pre_hook(
                   lambda m, a: a[0].__setitem__((slice(None), 0), 100.0))]
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for handle in handles:
            handle.remove()
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend) as tracer:
        copied = tracer.cache(modules=["layer1"], dtype=torch.float64)
        aliased = tracer.cache(modules=["layer1"])
        net.act1.input[:, 0] = 100.0
        out = net.output.save()
    assert torch.equal(out, expected)
    assert torch.equal(copied["model.layer1"].output, kept["copy"])
    assert torch.equal(aliased["model.layer1"].output, kept["alias"])
    assert (kept["alias"][:, 0] == 100).all() and not (kept["copy"][:, 0] == 100).any()


# --- conversions ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_device_detach_honoured(gpt2, backend):
    x = _ids(3)
    _, ref_outputs = _hook_capture(gpt2, x)
    model = NNsight(gpt2)
    with torch.enable_grad(), model.trace(x, use_cache=False, backend=backend) as tracer:
        as_f64 = tracer.cache(modules=["transformer.h.0", "transformer.wte"],
                              dtype=torch.float64, include_inputs=True)
        on_meta = tracer.cache(modules=["transformer.h.0"], device=torch.device("meta"))
        attached = tracer.cache(modules=["transformer.h.0"], detach=False, device=None)
        detached = tracer.cache(modules=["transformer.h.0"])
    h0 = as_f64["model.transformer.h.0"].output
    assert h0.dtype == torch.float64
    assert torch.equal(h0, ref_outputs["transformer.h.0"].double())
    # integer tensors (token ids) keep their dtype
    assert as_f64["model.transformer.wte"].input.dtype == torch.long
    meta = on_meta["model.transformer.h.0"].output
    assert meta.is_meta and meta.shape == (2, 7, 64)
    live = attached["model.transformer.h.0"].output
    assert live.requires_grad and live.grad_fn is not None
    dead = detached["model.transformer.h.0"].output
    assert not dead.requires_grad and dead.grad_fn is None
    assert torch.equal(live.detach(), dead)


# --- navigation --------------------------------------------------------------------------
def test_navigation_by_path_attribute_index_and_rename(gpt2):
    x = _ids(4)
    model = NNsight(gpt2)
    with model.trace(x, use_cache=False) as tracer:
        cache = tracer.cache(include_inputs=True, rename={"transformer.h": "layers"})
        aliased = tracer.cache(modules=[model.transformer.h[1]],
                               alias={"blocks": "transformer.h"})
    by_key = cache["model.transformer.h.1"].output
    assert cache.model.transformer.h[1].output is by_key
    assert cache.model.transformer.h[-1].output is by_key  # two layers: -1 is 1
    assert cache.model.layers[1].output is by_key
    assert cache["model.layers.1"].output is by_key
    assert "model.layers.1" in cache and "model.transformer.h.1" in cache
    assert "model.layers.1" in list(cache.keys(alias=True))
    assert cache.model.transformer.h[1].input is cache["model.transformer.h.1"].inputs[0][0]
    assert cache.model.output is cache["model"].output
    assert aliased.model.blocks[1].output.shape == (2, 7, 64)
    assert torch.equal(aliased.model.blocks[1].output, by_key)
    # a navigated value is a CacheDict of the entries under it
    layers = cache.model.transformer.h
    assert isinstance(layers, CacheDict)
    assert "model.transformer.h.0.attn" in layers and "model.lm_head" not in layers
    with pytest.raises(IndexError):
        cache.model.transformer.h[5]
    with pytest.raises(AttributeError, match="never cached"):
        cache.model.decoder
    with pytest.raises(KeyError):
        cache["model.transformer.h.9"]
    with pytest.raises(AttributeError, match="not a cached module"):
        cache.model.transformer.h.output  # a ModuleList never runs by itself


# --- batches, scans, and bad input -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_inside_an_invoke_sees_its_rows(backend):
    net = mlp()
    a = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    b = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    model = NNsight(net)
    with model.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            first = tracer.cache(modules=["layer1"])
        with tracer.invoke(b):
            second = tracer.cache(modules=["layer1"])
    # (batched rows: the same numbers up to float rounding of a bigger matmul)
    torch.testing.assert_close(first["model.layer1"].output, net.layer1(a).detach())
    torch.testing.assert_close(second["model.layer1"].output, net.layer1(b).detach())
    assert first["model.layer1"].output.shape == (2, 10)
    assert second["model.layer1"].output.shape == (3, 10)


def test_cache_in_a_scan_holds_meta_values(gpt2):
    model = NNsight(gpt2)
    with model.scan(_ids(), use_cache=False) as tracer:
        cache = tracer.cache()
    out = cache.model.transformer.h[0].output
    assert out.is_meta and out.shape == (2, 7, 64)


def test_unknown_module_path_is_a_clear_error(gpt2):
    model = NNsight(gpt2)
    other = NNsight(tiny_gpt2())
    with pytest.raises(TraceError, match="not a module of this model"):
        with model.trace(_ids(), use_cache=False) as tracer:
            tracer.cache(modules=["transformer.h.7"])
    with pytest.raises(TraceError, match="another model"):
        with model.trace(_ids(), use_cache=False) as tracer:
            tracer.cache(modules=[other.transformer.h[0]])
    with pytest.raises(TypeError):
        with model.trace(_ids(), use_cache=False) as tracer:
            tracer.cache(modules=[3])


class _WithSpare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(5, 2)
        self.spare = torch.nn.Linear(5, 2)  # never called by forward

    def forward(self, x):
        return self.used(x)


def test_module_that_never_runs_is_a_clear_error():
    model = NNsight(_WithSpare())
    with pytest.raises(TraceError, match="never runs"):
        with model.trace(torch.randn(2, 5)) as tracer:
            tracer.cache(modules=["spare"])


def test_root_paths_and_model_prefixed_strings(llama):
    model = NNsight(llama)
    with model.trace(_ids(), use_cache=False) as tracer:
        # "model.layers.0" is Llama's own path (its decoder is called `model`)
        cache = tracer.cache(modules=["model.layers.0", "model.model.norm", "model"])
    # in forward order of the outputs: the root's comes last
    assert list(cache.keys()) == ["model.model.layers.0", "model.model.norm", "model"]
    assert cache.model.model.layers[0].output.shape == (2, 7, 64)
    assert cache.model.output.logits.shape == (2, 7, 128)
    assert fxsight.stats()["traces"] >= 1


class _Repeated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 3)

    def forward(self, x):
        for _ in range(3):  # fc: three calls
            x = torch.tanh(self.fc(x))
        return self.out(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_inside_tracer_iter_holds_that_call(backend):
    """``tracer.cache()`` in ``tracer.iter[i]`` of a plain trace caches the modules' call
    ``i`` (was: every call); a module asked for without a call ``i`` is a clear error."""
    torch.manual_seed(0)
    module = _Repeated()
    x = torch.randn(2, 3)
    calls = []
    handle = module.fc.register_forward_hook(lambda m, i, o: calls.append(o.detach()))
    with torch.no_grad():
        module(x)
    handle.remove()
    net = NNsight(module)
    with net.trace(x, backend=backend) as tracer:
        caches = fxsight.save(list())
        for _ in tracer.iter[0:3]:
            caches.append(tracer.cache(modules=[net.fc]))
        with tracer.iter[1]:
            everything = tracer.cache()
    for call, cache in enumerate(caches):
        assert isinstance(cache["model.fc"], Entry)
        assert torch.equal(cache["model.fc"].output, calls[call])
    assert sorted(everything.keys()) == ["model.fc"]  # (the others run once)
    assert torch.equal(everything["model.fc"].output, calls[1])
    with pytest.raises(TraceError, match=r"model\.out has no call 1"):
        with net.trace(x, backend=backend) as tracer:
            with tracer.iter[1]:
                tracer.cache(modules=[net.fc, net.out])


def _calls(function, run) -> int:
    """How many times ``run`` calls the plain Python ``function``, seen by a profile
    function (nothing is patched)."""
    code, count = function.__code__, [0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            count[0] += 1

    run_profiled(run, profile)
    return count[0]


def test_a_cache_trace_in_a_loop_lays_out_its_sites_once(gpt2):
    """``tracer.cache()`` made every site's meta value at every trace (meta tensors, a
    ModelOutput rebuilt) only for its layout, which the capture fixes: it is made once per
    capture. Each trace's values, at lengths a dynamic-shape capture may share, are still
    the forward hooks' (and their layouts the modules')."""
    from fxsight.capture.captured_forward import Captured

    model = NNsight(gpt2)
    for length in (5, 7, 5, 9, 9):
        x = _ids()[:, :length]
        _, expected = _hook_capture(gpt2, x)
        holder = []

        def trace():
            with torch.no_grad(), model.trace(x, use_cache=False, backend="fx") as tracer:
                holder.append(tracer.cache())

        made = _calls(Captured.meta_value, trace)
        for path, output in expected.items():
            _assert_same(holder[0][_key(path)].output, output)
    assert made == 0
