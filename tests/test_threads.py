"""Traces from several threads: each thread's interventions stay its own, results equal a
hand-written reference, and no process-wide torch flag is left set afterwards."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.fx._symbolic_trace as fx_symbolic_trace

from fxsight import NNsight
from hook_references import hooked_logits
from models import mlp, tiny_gpt2


def _run_threads(targets):
    """Run each callable in its own thread, started together; re-raise the first error."""
    start = threading.Barrier(len(targets))
    errors = []

    def body(target):
        try:
            start.wait()
            target()
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]


def _global_flags():
    return (torch.compiler.is_exporting(), torch.compiler.is_compiling(),
            fx_symbolic_trace.is_fx_tracing())


def _gpt2_reference(model, ids, position):
    def hook(module, args, output):
        output = output.clone()
        output[:, position] = 0
        return output
    return hooked_logits(model, ids, hooks={"transformer.h.0": hook})


def _mlp_reference(model, x, column, scale):
    def hook(module, args, output):
        output = output.clone()
        output[:, column] = output[:, column] * scale
        return output
    handle = model.layer1.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_two_threads_two_models_leave_no_global_flag_set():
    gpt2, net = tiny_gpt2(), mlp()
    lm, nn_ = NNsight(gpt2), NNsight(net)
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    gpt2_refs = {p: _gpt2_reference(gpt2, ids, p) for p in range(7)}
    mlp_refs = {(c, s): _mlp_reference(net, x, c, float(s)) for c in range(10) for s in (2, 3)}
    assert _global_flags() == (False, False, False)
    gpt2_results, mlp_results = [], []

    def trace_gpt2():
        for i in range(20):
            position = i % 7  # a new structure for each position
            with lm.trace(ids, use_cache=False) as tracer:
                lm.transformer.h[0].output[:, position] = 0
                logits = lm.output.logits.save()
            assert tracer.backend == "fx"
            gpt2_results.append((position, logits))

    def trace_mlp():
        for i in range(20):
            column, scale = i % 10, 2 + i % 2
            with nn_.trace(x) as tracer:
                nn_.layer1.output[:, column] = nn_.layer1.output[:, column] * float(scale)
                out = nn_.output.save()
            assert tracer.backend == "fx"
            mlp_results.append(((column, scale), out))

    _run_threads([trace_gpt2, trace_mlp])
    assert len(gpt2_results) == len(mlp_results) == 20
    for position, logits in gpt2_results:
        torch.testing.assert_close(logits, gpt2_refs[position], rtol=1e-5, atol=1e-5)
    for key, out in mlp_results:
        torch.testing.assert_close(out, mlp_refs[key], rtol=1e-6, atol=1e-6)

    # the process is as it was: no torch flag left set, torch.compile works as usual
    assert _global_flags() == (False, False, False)
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    def fn(a):
        return torch.sin(a) * 2 + 1

    a = torch.randn(3)
    assert torch.equal(torch.compile(fn, backend=counting_backend)(a), fn(a))
    assert len(compiled_graphs) == 1


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_one_model_four_threads_keep_their_own_interventions(backend):
    model = tiny_gpt2()
    lm = NNsight(model)
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    steering = {t: torch.randn(64, generator=torch.Generator().manual_seed(10 + t))
                for t in range(4)}

    def plan(thread, i):  # (position zeroed in h.0, scale of h.1's output, steering?)
        return (thread + i) % 7, float(1 + thread + (i % 3)), thread % 2 == 0

    def reference(thread, i):
        position, scale, steer = plan(thread, i)

        def h0(module, args, output):
            output = output.clone()
            output[:, position] = 0
            return output

        def h1(module, args, output):
            output = output * scale
            return output + steering[thread] if steer else output

        return hooked_logits(model, ids, hooks={"transformer.h.0": h0, "transformer.h.1": h1})

    expected = {(t, i): reference(t, i) for t in range(4) for i in range(15)}
    results = {}

    def worker(thread):
        def run():
            for i in range(15):
                position, scale, steer = plan(thread, i)
                with lm.trace(ids, use_cache=False, backend=backend) as tracer:
                    lm.transformer.h[0].output[:, position] = 0
                    h1 = lm.transformer.h[1].output * scale
                    if steer:
                        h1 = h1 + steering[thread]
                    lm.transformer.h[1].output = h1
                    logits = lm.output.logits.save()
                assert tracer.backend == backend
                results[(thread, i)] = logits
        return run

    _run_threads([worker(t) for t in range(4)])
    assert set(results) == set(expected)
    for key, logits in results.items():
        torch.testing.assert_close(logits, expected[key], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, key=key: f"thread/trace {key}: {m}")
    assert _global_flags() == (False, False, False)
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert "forward" not in vars(module), name


def test_plain_forwards_in_another_thread_see_no_intervention():
    """A hooks trace installs hooks (and a skip replaces a forward) on the shared model:
    a plain forward in another thread meanwhile is a plain forward."""
    model = tiny_gpt2()
    lm = NNsight(model)
    ids = torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
    traced, plain_results = [], []

    def trace():
        for _ in range(30):
            with lm.trace(ids, use_cache=False, backend="hooks") as tracer:
                lm.transformer.h[0].output[:] = 0
                lm.transformer.h[1].mlp.skip(lm.transformer.h[1].mlp.input * 0)
                logits = lm.output.logits.save()
            assert tracer.backend == "hooks"
            traced.append(logits)

    def forward():
        for _ in range(60):
            with torch.no_grad():
                plain_results.append(model(ids, use_cache=False).logits)

    _run_threads([trace, forward])
    assert len(traced) == 30 and len(plain_results) == 60
    for logits in plain_results:
        assert torch.equal(logits, plain)
    assert not torch.allclose(traced[0], plain)
    for logits in traced:
        assert torch.equal(logits, traced[0])
