"""Core engine, no leaks: 500 traces keep memory flat, and the model keeps no hooks and no
new attributes, on both backends."""

from __future__ import annotations

import gc
import sys
import warnings

import pytest
import torch

import fxsight
from fxsight import NNsight, Proxy
from fxsight.api.tracer import Tracer
from models import mlp

BACKENDS = ("fx", "hooks")


def _scale(t, c):
    return t * c


def _one_trace(net, x, backend):
    steer = torch.randn(10)  # a new real tensor every trace: a graph input each time
    with net.trace(x, backend=backend) as tracer:
        h = net.layer1.output.save()
        net.layer2.output[:, 0] = 0
        net.layer2.output += steer
        lens = net.layer3(net.act2.output).save()  # an envoy called on a proxy
        net.layer3.output = fxsight.apply(_scale, net.layer3.output, 2.0) + h.mean()
        out = net.output.save()
    assert tracer.backend == backend
    return h, lens, out


def _state(model):
    return {name: (set(vars(module)), dict(module._parameters), dict(module._buffers),
                   dict(module._modules))
            for name, module in model.named_modules()}


def _assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not getattr(module, "_forward_hooks_with_kwargs", None), name
        assert not module._backward_hooks, name


def _count(*types):
    gc.collect()
    counts = dict.fromkeys(types, 0)
    with warnings.catch_warnings():  # isinstance on deprecated module objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            for kind in types:
                if isinstance(obj, kind):
                    counts[kind] += 1
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_500_traces_keep_memory_flat(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5)
    before = _state(model)
    _assert_no_hooks(model)

    h, lens, out = _one_trace(net, x, backend)
    ref_h = model.layer1(x)
    assert torch.equal(h, ref_h)
    for _ in range(99):  # warm up caches, free lists and interned names
        _one_trace(net, x, backend)
    del h, lens, out
    objects_before = _count(Proxy, Tracer, torch.fx.GraphModule, torch.fx.Node,
                            torch.Tensor)
    gc.collect()
    blocks_before = sys.getallocatedblocks()
    for _ in range(400):
        _one_trace(net, x, backend)
    gc.collect()
    grown = sys.getallocatedblocks() - blocks_before
    objects_after = _count(Proxy, Tracer, torch.fx.GraphModule, torch.fx.Node, torch.Tensor)

    # a Program or a rewritten graph kept per trace would be >100 blocks a trace (>40,000
    # here); caches that fill up once and allocator noise are a few hundred
    print(f"{backend}: {grown} blocks over 400 traces")
    assert grown < 5_000, f"{grown} Python memory blocks more after 400 traces"
    assert objects_after[torch.Tensor] <= objects_before[torch.Tensor]
    assert objects_after[Proxy] <= objects_before[Proxy]
    assert objects_after[Tracer] <= objects_before[Tracer]
    assert objects_after[torch.fx.GraphModule] <= objects_before[torch.fx.GraphModule]
    assert objects_after[torch.fx.Node] <= objects_before[torch.fx.Node]
    _assert_no_hooks(model)
    assert _state(model) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_hooks_or_attributes_left_after_errors(backend):
    model = mlp()
    net = NNsight(model)
    before = _state(model)
    x = torch.randn(4, 5)
    with pytest.raises(fxsight.ShapeError):
        with net.trace(x, backend=backend):
            net.layer2.output = torch.zeros(4, 3)
    with pytest.raises(RuntimeError):
        with net.trace(x, backend=backend):
            net.layer2.output = fxsight.apply(_fail_at_run_time, net.layer2.output)
            net.output.save()
    with pytest.raises(fxsight.ControlFlowError):
        with net.trace(x, backend=backend):
            bool(net.layer1.output)
    _assert_no_hooks(model)
    assert _state(model) == before


def _fail_at_run_time(t):
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return t
    raise RuntimeError("boom")


def _traced_weakly(net, x, backend):
    import weakref
    with net.trace(x, backend=backend) as tracer:
        h = net.layer1.output.save()
    return weakref.ref(tracer), weakref.ref(h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_wrapper_does_not_keep_traces_or_values_alive(backend):
    net = NNsight(mlp())
    tracer_ref, value_ref = _traced_weakly(net, torch.randn(4, 5), backend)
    gc.collect()
    assert tracer_ref() is None
    assert value_ref() is None


def test_models_are_not_kept_alive_by_caches():
    import weakref
    refs = []
    for backend in BACKENDS:
        model = mlp()
        net = NNsight(model)
        _one_trace(net, torch.randn(4, 5), backend)
        refs.append(weakref.ref(model))
        del model, net
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_coefficient_sweep_keeps_memory_bounded():
    """A new coefficient each trace is a new graph input, not a new structure: 60 traces
    keep the graphs of one (the capture, the rewritten graph and export's modules), not
    sixty. (Counted as the growth of the GraphModules alive in the process: other tests'
    models may still hold theirs.)"""
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    before = _count(torch.fx.GraphModule)[torch.fx.GraphModule]
    for i in range(60):
        with net.trace(x):
            net.layer2.output = net.layer2.output * (i / 10)
            net.output.save()
    grown = _count(torch.fx.GraphModule)[torch.fx.GraphModule] - before
    assert grown < 10, f"{grown} GraphModules more after 60 traces of one structure"


def test_apply_with_a_new_lambda_each_trace_keeps_memory_bounded():
    """A function is keyed by its code and constants (``record.program._function_key``):
    a lambda made anew in each trace keeps one rewritten graph (counted as the growth of
    the GraphModules alive in the process, as above)."""
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    before = _count(torch.fx.GraphModule)[torch.fx.GraphModule]
    for _ in range(60):
        with net.trace(x):
            net.layer2.output = fxsight.apply(lambda t: t * 2, net.layer2.output)
            net.output.save()
    grown = _count(torch.fx.GraphModule)[torch.fx.GraphModule] - before
    assert grown < 10, f"{grown} GraphModules more after 60 traces of one structure"


def test_captures_leave_no_generated_source_of_exports_intermediate_graphs():
    """torch.export compiles several intermediate GraphModules per capture and fx keeps the
    source of each for the life of the process: a capture keeps only its own (the graphs
    still alive: the captured one and the rewritten one of each new shape)."""
    import gc
    import linecache

    from fxsight._torch import generated_source_keys
    net = fxsight.NNsight(mlp())
    gc.collect()
    before = generated_source_keys()
    def generated_lines():
        return {k for k in linecache.cache if "eval_with_key" in k}

    lines_before = generated_lines()
    for rows in range(1, 11):  # ten new input signatures: ten captures
        with net.trace(torch.randn(rows, 5), backend="fx"):
            net.layer2.output.save()
    gc.collect()
    grown = len(generated_source_keys() - before)
    assert grown <= 2 * 10, f"{grown} generated sources kept for 10 captures"
    assert len(generated_lines() - lines_before) <= 2 * 10


def test_captures_leave_the_callers_context_variables_as_they_were():
    """Each ``torch.*.config.patch()`` that ``torch.export`` enters leaves a context
    variable of its own in the context it ran in: captured in the caller's context, every
    new input signature would grow it for the life of the thread. The caller's context
    has the same variables before and after ten captures (nothing is set in it either)."""
    import contextvars

    net = fxsight.NNsight(mlp())
    with net.trace(torch.randn(1, 5), backend="fx"):  # (torch's first-use set-up)
        net.layer2.output.save()
    before = dict(contextvars.copy_context())
    for rows in range(2, 12):  # ten new input signatures: ten captures
        with net.trace(torch.randn(rows, 5), backend="fx") as tracer:
            net.layer2.output.save()
        assert tracer.backend == "fx"
    after = dict(contextvars.copy_context())
    assert set(after) == set(before), \
        f"{len(set(after) - set(before))} context variables added by ten captures"
    assert all(after[var] is before[var] for var in before)


@pytest.mark.compile
def test_compiled_structures_leave_the_callers_context_variables_as_they_were():
    """The same for dynamo's and inductor's config patches while compiling a new
    intervention structure under ``compile=True``."""
    import contextvars

    net = fxsight.NNsight(mlp())
    x = torch.randn(3, 5)

    def compiled_trace(column):
        with net.trace(x, compile=True):
            net.layer1.output[:, column] = column
            out = net.output.save()
        return out

    start = fxsight.stats()["compilations"]
    compiled_trace(0)
    before = dict(contextvars.copy_context())
    for column in (1, 2):  # two new structures: two compilations
        compiled_trace(column)
    assert fxsight.stats()["compilations"] - start == 3
    assert set(dict(contextvars.copy_context())) == set(before)


def _fxsight_objects(objects: list) -> list:
    """The objects among ``objects`` that fxsight made (its classes' instances, its
    functions and the cells of its closures are named by their module)."""
    def made(obj):
        module = getattr(obj, "__module__", None) if callable(obj) and \
            not isinstance(obj, type) else type(obj).__module__
        return isinstance(module, str) and module.startswith("fxsight")
    return [obj for obj in objects if made(obj)]


def _garbage_after(run) -> list:
    """The fxsight objects that only the garbage collector would free after ``run()``."""
    while gc.collect():  # (what earlier collections released: weak caches' values)
        pass
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return _fxsight_objects(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finished_trace_is_freed_without_the_garbage_collector(backend):
    """Once a trace has run, nothing it made refers back to it (no reference cycle): the
    tracer, its Program, its proxies and invokes and the values it kept go as soon as the
    caller lets go of them, not at the next collection (activations held until then would
    raise peak memory on a GPU)."""
    import weakref

    net, x = NNsight(mlp()), torch.randn(4, 5)
    refs = []

    def run():
        with net.trace(backend=backend) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(x[:2]):
                h = net.layer1.output.save()
                barrier()
            with tracer.invoke(x[2:]):
                barrier()
                net.layer1.output[:] = h
                out = net.output.save()
        refs.extend([weakref.ref(tracer), weakref.ref(h), weakref.ref(out),
                     weakref.ref(tracer.program)])

    run()  # (the first trace captures)
    refs.clear()
    assert _garbage_after(run) == []
    assert len(refs) == 4 and all(ref() is None for ref in refs), "freed when run() returned"


def test_a_finished_generation_leaves_nothing_for_the_garbage_collector():
    from fxsight import LanguageModel
    from models import tiny_gpt2, train_tokenizer

    tokenizer = train_tokenizer()
    lm = LanguageModel(tiny_gpt2(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    steer = torch.randn(64)

    def run():
        with lm.generate("Hello there", max_new_tokens=4, do_sample=False) as tracer:
            for _ in tracer.iter[0:4]:
                lm.transformer.h[1].output[:, -1] += steer
            tokens = lm.generator.output.save()
        assert tracer.backend == "fx" and tokens.shape[1] > 4

    run()  # (the first generation captures)
    assert _garbage_after(run) == []


def test_functions_alike_but_for_their_constants_keep_graphs_of_their_own():
    """Lambdas from one place whose closures or defaults differ compute different things:
    each answer is its own (``-0.0`` is not ``0.0``, ``True`` is not ``1``, a tensor in
    the closure is another function), against the same computation by hand."""
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    hidden = net._module.layer1(x)
    vectors = [torch.randn(10) for _ in range(2)]
    cases = [(2.0, None), (3.0, None), (0.0, None), (-0.0, None), (1, None), (True, None),
             (1.0, vectors[0]), (1.0, vectors[1])]
    for scale, vector in cases:
        def edit(t, scale=scale):
            out = 1.0 / (t * 0 + scale) if type(scale) is float else t * scale
            return out if vector is None else out + vector
        with net.trace(x):
            got = fxsight.apply(edit, net.layer1.output).save()
        torch.testing.assert_close(got, edit(hidden), rtol=0, atol=0, equal_nan=True)


def test_traces_recorded_from_new_code_keep_the_line_table_bounded(monkeypatch):
    """Each run of a notebook cell is new code: the table that remembers which code is
    fxsight's keeps at most ``_MAX_INSIDE`` of them (it used to keep every one alive)."""
    from fxsight import errors
    monkeypatch.setattr(errors, "_MAX_INSIDE", 20, raising=False)
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    for cell in range(60):
        namespace = {"net": net, "x": x}
        exec(compile("with net.trace(x, backend='hooks'):\n"
                     f"    h = (net.layer1.output * {cell}).save()\n", f"<cell {cell}>",
                     "exec"), namespace)  # (code objects of other constants: not equal)
        assert torch.equal(namespace["h"], net._module.layer1(x) * cell)
        assert all(len(table) <= 20 for table in errors._INSIDE.values())
