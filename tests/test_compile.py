"""Compiled execution (issue 4): the rewritten graph under torch.compile gives the answers
of the eager fx backend and of the hooks backend, compiles once per Program structure
(new values and new inputs of the same shapes reuse it), handles new shapes with a bounded
number of compiles, and falls back to eager execution with one warning when compiling
fails. Compiling on CPU is slow: the models are tiny and each test compiles few graphs.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch

import fxsight
from fxsight.run.options import RunOptions
from fxsight import NNsight
from models import mlp, tiny_gpt2

TOL = dict(rtol=1e-4, atol=1e-5)


def _compiles() -> int:
    return fxsight.stats()["compilations"]


def _no_compile_warnings(record) -> None:
    messages = [str(w.message) for w in record if str(w.message).startswith("fxsight")]
    assert not messages, messages


# --- intervention programs on the MLP: compiled == eager fx == hooks ------------------------
def _save_reads(net, x, v):
    with net.trace(x) as tracer:
        a = net.layer1.output.save()
        b = net.act2.output.save()
        out = net.output.save()
    return tracer, [a, b, out]


def _setitem_zero(net, x, v):
    with net.trace(x) as tracer:
        net.layer2.output[:, 3] = 0
        out = net.output.save()
    return tracer, [out]


def _steer_inplace(net, x, v):
    with net.trace(x) as tracer:
        net.layer1.output += v
        h = net.act1.output.save()
        out = net.output.save()
    return tracer, [h, out]


def _input_write_and_ops(net, x, v):
    with net.trace(x) as tracer:
        h = net.layer3.input
        net.layer3.input = torch.relu(h * 2 - h.mean(dim=-1, keepdim=True))
        norm = net.layer2.output.norm(dim=-1).save()
        out = net.output.save()
    return tracer, [norm, out]


def _two_invoke_patch(net, x, v):
    with net.trace() as tracer:
        with tracer.invoke(x[:2]):
            clean = net.layer2.output
        with tracer.invoke(x[2:]):
            net.layer2.output = clean + v[:1]
            out = net.output.save()
    return tracer, [out]


def _skip(net, x, v):
    with net.trace(x) as tracer:
        net.act1.skip(net.layer1.output * 0.5)
        out = net.output.save()
    return tracer, [out]


PROGRAMS = [_save_reads, _setitem_zero, _steer_inplace, _input_write_and_ops,
            _two_invoke_patch, _skip]


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.__name__.strip("_"))
def test_compiled_equals_eager_fx_equals_hooks(program):
    net = NNsight(mlp())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    v = torch.randn(10, generator=torch.Generator().manual_seed(1))
    results = {}
    before = _compiles()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for name, options in [("eager", dict(compile=False)), ("compiled", dict(compile=True)),
                              ("hooks", dict(backend="hooks"))]:
            with _defaults(net, **options):
                tracer, values = program(net, x, v)
            assert tracer.backend == ("hooks" if name == "hooks" else "fx")
            results[name] = values
    _no_compile_warnings(record)
    assert _compiles() - before == 1  # fullgraph=True: one graph, no silent breaks
    for name in ("compiled", "hooks"):
        for got, want in zip(results[name], results["eager"]):
            torch.testing.assert_close(got, want, **TOL)


class _defaults:
    """Set a wrapper's default backend / compile for the programs above."""

    def __init__(self, net, backend="auto", compile=None):
        self.net, self.values = net, dict(_options=RunOptions.of(backend, compile))

    def __enter__(self):
        self.old = {k: getattr(self.net, k) for k in self.values}
        for k, v in self.values.items():
            object.__setattr__(self.net, k, v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            object.__setattr__(self.net, k, v)


# --- GPT-2: a loop of 20 experiments with new values compiles once --------------------------
@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def test_gpt2_loop_of_20_new_values_compiles_once(gpt2):
    net = NNsight(gpt2, compile=True)  # the wrapper's default
    generator = torch.Generator().manual_seed(0)
    fxsight.reset_stats()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        for step in range(20):
            ids = torch.randint(4, 128, (2, 8), generator=generator)
            steer = torch.randn(64, generator=generator)
            with net.trace(ids, use_cache=False) as tracer:
                net.transformer.h[0].output[:, 3] += steer
                hidden = net.transformer.h[1].output.save()
                logits = net.lm_head.output.save()
            if step in (0, 19):  # the same experiment eagerly and with hooks
                for options in (dict(compile=False), dict(backend="hooks")):
                    with net.trace(ids, use_cache=False, **options):
                        net.transformer.h[0].output[:, 3] += steer
                        hidden_ref = net.transformer.h[1].output.save()
                        logits_ref = net.lm_head.output.save()
                    torch.testing.assert_close(hidden, hidden_ref, **TOL)
                    torch.testing.assert_close(logits, logits_ref, **TOL)
    _no_compile_warnings(record)
    stats = fxsight.stats()
    assert stats["compilations"] == 1, stats
    assert stats["compile_failures"] == 0
    assert stats["runner_hits"] >= 19
    assert tracer.backend == "fx"


def test_gpt2_new_sequence_lengths_compile_a_bounded_number_of_times(gpt2):
    """Three (then five) input shapes: the first is compiled for its exact shape, the
    second brings a dynamic-shape capture compiled once for all later ones."""
    net = NNsight(gpt2)
    generator = torch.Generator().manual_seed(1)
    fxsight.reset_stats()
    with torch.no_grad():
        for rows, tokens in [(2, 6), (2, 9), (2, 13), (3, 11), (2, 6)]:
            ids = torch.randint(4, 128, (rows, tokens), generator=generator)
            with net.trace(ids, use_cache=False, compile=True):
                net.transformer.h[1].mlp.output[:, -1] = 0
                logits = net.lm_head.output.save()
            with net.trace(ids, use_cache=False, compile=False):
                net.transformer.h[1].mlp.output[:, -1] = 0
                expected = net.lm_head.output.save()
            assert logits.shape == (rows, tokens, 128)
            torch.testing.assert_close(logits, expected, **TOL)
    stats = fxsight.stats()
    assert stats["compilations"] <= 2, stats
    assert stats["dynamic_captures"] == 1, stats


# --- failures fall back to eager with one warning -----------------------------------------
def _breaks_the_graph(h):
    torch._dynamo.graph_break()  # a no-op eagerly; dynamo cannot compile it with fullgraph
    return h * 3


def test_compile_failure_runs_eagerly_with_one_warning():
    net = NNsight(mlp())
    x = torch.randn(3, 5)
    fxsight.reset_stats()
    outs = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            with net.trace(x, compile=True) as tracer:
                net.layer2.output = fxsight.apply(_breaks_the_graph, net.layer2.output)
                outs.append(net.output.save())
    failures = [w for w in record if "torch.compile failed" in str(w.message)]
    assert len(failures) == 1
    assert "graph_break" in str(failures[0].message) or "Unsupported" in \
        str(failures[0].message)
    assert fxsight.stats()["compile_failures"] == 1
    with net.trace(x) as tracer:
        net.layer2.output = net.layer2.output * 3
        expected = net.output.save()
    for out in outs:
        torch.testing.assert_close(out, expected)
    assert tracer.backend == "fx"


def test_backend_failure_falls_back_and_names_the_reason():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    net = NNsight(mlp())
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        with net.trace(x, compile={"backend": broken_backend}):
            out = net.layer3.output.save()
    torch.testing.assert_close(out, net._module(x))


def test_compile_options_pass_through_and_are_part_of_the_key():
    net = NNsight(mlp())
    x = torch.randn(3, 5)
    fxsight.reset_stats()
    for _ in range(2):
        with net.trace(x, compile={"backend": "eager", "dynamic": False}):
            out = net.layer1.output.save()
    with net.trace(x, compile={"backend": "aot_eager"}):
        out2 = net.layer1.output.save()
    assert fxsight.stats()["compilations"] == 2
    torch.testing.assert_close(out, out2)
    with pytest.raises(TypeError, match="unknown torch.compile option"):
        net.trace(x, compile={"modes": "fast"})


# --- compiled modules are never hooked unawares ---------------------------------------------
def test_compiled_module_is_unwrapped_and_hooks_backend_sees_the_real_module():
    model = mlp()
    compiled = torch.compile(model)
    net = NNsight(compiled)
    assert net._module is model
    x = torch.randn(3, 5)
    with net.trace(x, backend="hooks") as tracer:
        net.layer2.output = net.layer2.output * 0
        out = net.output.save()
    assert tracer.backend == "hooks"
    expected = model.layer3(model.act2(torch.zeros(3, 10)))
    torch.testing.assert_close(out, expected)


def test_compiled_submodule_is_refused():
    model = torch.nn.Sequential(OrderedDict(a=torch.nn.Linear(2, 2),
                                            b=torch.compile(torch.nn.Linear(2, 2))))
    with pytest.raises(TypeError, match=r"model\.b is a torch.compile'd module"):
        NNsight(model)


def test_stats_report_the_compile_counters():
    stats = fxsight.stats()
    for key in ("traces", "captures", "splices", "runner_hits", "compilations",
                "compile_failures", "fallbacks"):
        assert key in stats


def test_new_float_coefficients_reuse_the_graph_and_compile_at_most_twice():
    """Python floats in a trace are graph inputs: a coefficient sweep splices once, and
    dynamo compiles the specialized graph plus at most one float-generic one."""
    import fxsight
    from fxsight import NNsight
    from models import mlp

    net = NNsight(mlp())
    x = torch.randn(4, 5)
    fxsight.reset_stats()
    for i in range(5):
        with net.trace(x, compile=True):
            net.layer2.output = net.layer2.output * (i / 10) + 0.5
            compiled = net.output.save()
        reference = net.layer3(torch.sigmoid(net.layer2(torch.relu(net.layer1(x))) * (i / 10)
                                             + 0.5))
        torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-6)
    counts = fxsight.stats()
    assert counts["splices"] == 1
    assert counts["compilations"] <= 2
