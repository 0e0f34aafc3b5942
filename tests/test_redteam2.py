"""Findings of red-team issue 18, second part (S5, T3, T2, S4, T4, S10): a trace's effect
on the model and the process is a plain forward's, on every backend: buffers, Python
state, running statistics, the user's own hooks and the global random generator."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxsight
from fxsight import NNsight

BACKENDS = ("fx", "hooks")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (fallback notices)
        yield


class Masker(torch.nn.Module):
    """A forward that keeps a tensor on the module (S5)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        self._mask = torch.ones_like(x)
        return self.lin(x) * self._mask


class Counter(torch.nn.Module):
    """A forward that counts its calls in a Python attribute and a buffer (T3)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("rows", torch.zeros(3))

    def forward(self, x):
        self.calls += 1
        self.seen += 1
        self.rows += x.shape[0]
        return self.lin(x)


class Bumper(torch.nn.Module):
    """Buffers changed in place by the forward, a Python counter left alone (fx-capturable)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("rows", torch.zeros(3))

    def forward(self, x):
        self.seen += 1
        self.rows += x.shape[0]
        return self.lin(x)


def _x(rows=3):
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(0))


# --- S5: a scan leaves nothing fake in the model ---------------------------------------------
@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_tensor_kept_by_the_forward_is_real_after_traces_and_scans(backend):
    model = Masker()
    net = NNsight(model)
    x = _x()
    with net.scan(x):
        net.lin.output.save()
    assert not hasattr(model, "_mask")  # (a scan is no forward)
    with net.trace(x, backend=backend):
        out = net.output.save()
    assert type(model._mask) is torch.Tensor and type(out) is torch.Tensor
    assert type(model(x)) is torch.Tensor
    torch.testing.assert_close(out, model(x))


# --- T3: Python state and buffers changed once per trace ------------------------------------
@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_counting_forward_counts_once_per_trace(backend):
    model = Counter()
    net = NNsight(model)
    for rows in (3, 2, 3):  # (new input shapes: new scans)
        with net.trace(_x(rows), backend=backend) as tracer:
            net.lin.output.save()
    with net.scan(_x(5)):
        net.lin.output.save()
    assert tracer.backend == "hooks"
    assert model.calls == 3 and model.seen.item() == 3
    assert model.rows.tolist() == [8.0, 8.0, 8.0]


def test_a_counting_forward_is_refused_by_fx_naming_the_attribute():
    model = Counter()
    net = NNsight(model)
    with pytest.raises(fxsight.CaptureError, match=r"module 'model', attribute 'calls'"):
        with net.trace(_x(), backend="fx"):
            net.lin.output.save()
    assert model.calls == 0 and model.seen.item() == 0  # (undone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_changed_in_place_move_as_in_a_plain_forward(backend):
    model, reference = Bumper(), Bumper()
    net = NNsight(model)
    for rows in (3, 2, 3):
        with net.trace(_x(rows), backend=backend) as tracer:
            net.lin.output.save()
        reference(_x(rows))
    assert tracer.backend == backend
    assert model.seen.item() == reference.seen.item() == 3
    assert model.rows.tolist() == reference.rows.tolist()


# --- T2: BatchNorm in train mode ----------------------------------------------------------------
def _bn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 2)).train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saved", (0, 2, 5))
def test_batchnorm_running_statistics_move_as_in_a_plain_forward(backend, saved):
    model, reference = _bn(), _bn()
    net = NNsight(model)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        with net.trace(x, backend=backend) as tracer:
            h = net[saved].output.save()  # (saving layer 0: everything later is pruned)
        expected = {}
        handle = reference[saved].register_forward_hook(
            lambda m, a, o: expected.setdefault("h", o))
        reference(x)
        handle.remove()
        torch.testing.assert_close(h, expected["h"])
    assert tracer.backend == backend
    for (name, got), want in zip(model.state_dict().items(),
                                 reference.state_dict().values()):
        assert torch.equal(got, want), name


# --- S4: the user's hooks see real values once per trace -------------------------------------
@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_users_hook_sees_real_values_once_per_trace(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    seen, before = [], []
    handles = [model[0].register_forward_hook(lambda m, a, o: seen.append(o)),
               model[2].register_forward_pre_hook(lambda m, a: before.append(a[0]))]
    net = NNsight(model)
    x = _x()
    try:
        with net.scan(x):
            net[0].output.save()
        assert seen == [] and before == []  # a scan is no forward
        for _ in range(2):
            with net.trace(x, backend=backend) as tracer:
                h = net[0].output.save()
        with pytest.raises(fxsight.CaptureError, match=r"module '0' has a forward hook"):
            with net.trace(x, backend="fx"):
                net[0].output.save()
        expected = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert tracer.backend == "hooks"
    assert [type(v) for v in seen + before] == [torch.Tensor] * 6
    for value in seen:
        torch.testing.assert_close(value, h)
    for value in before:
        torch.testing.assert_close(value, torch.relu(h))
    torch.testing.assert_close(expected, model(x))


# --- T4: the random generator after a pruned trace ---------------------------------------------
def _dropouts(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 8), torch.nn.Dropout(0.3),
                               torch.nn.Linear(8, 2), torch.nn.Dropout(0.2)).train()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("saved", (0, 1, 3, 5))
def test_dropouts_draw_the_forwards_numbers_and_leave_the_generator_where_it_would(
        backend, saved):
    model = _dropouts()
    net = NNsight(model)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    expected = {}
    handle = model[saved].register_forward_hook(lambda m, a, o: expected.setdefault("h", o))
    torch.manual_seed(7)
    model(x)
    handle.remove()
    after = torch.get_rng_state()
    torch.manual_seed(7)
    with net.trace(x, backend=backend) as tracer:
        h = net[saved].output.save()
    assert tracer.backend == backend
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(h, expected["h"])
    if backend == "fx" and saved < 5:  # (and later layers were pruned)
        code = tracer.graph_module.code
        assert '"4_weight"' not in code and code.count("aten.dropout.default(") == 3


def test_dropout_in_eval_mode_is_pruned_entirely():
    model = _dropouts().eval()
    net = NNsight(model)
    with net.trace(_x(), backend="fx") as tracer:
        net[0].output.save()
    assert "dropout" not in tracer.graph_module.code and \
        "zeros" not in tracer.graph_module.code


# --- S10: random ops under torch.compile ---------------------------------------------------------
def test_compiled_dropouts_draw_the_eager_numbers():
    """(One small compile: inductor's ``fallback_random`` is passed per compile where the
    graph draws random numbers.)"""
    model = _dropouts()
    net = NNsight(model)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    expected = model(x)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    with net.trace(x, compile=True) as tracer:
        out = net.output.save()
    assert tracer.backend == "fx" and fxsight.stats()["compilations"] >= 1
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(out, expected)
    import torch._inductor.config as inductor_config  # noqa: PLC0415 - nothing left set
    assert inductor_config.fallback_random is False


# --- memory: flat over new shapes and new intervention structures ----------------------------
def _rss_mb() -> float:
    import os
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _clear_torch_caches():
    """torch's own caches that grow with every new shape (fake-tensor dispatch results, the
    source of generated code): not fxsight's to bound."""
    import gc
    from torch._subclasses.fake_tensor import FakeTensorMode
    FakeTensorMode.cache.clear()
    torch.fx.graph_module._loader.eval_cache.clear()
    gc.collect()


def _shapes(start):
    """New (batch, length) pairs: every one a new input signature."""
    for i in range(start, start + 10_000):
        yield 1 + i % 23, 1 + i // 23


def _trace_shape(net, shape, backend):
    x = torch.randn(*shape, 5)
    with net.trace(x, backend=backend):
        net.layer1.output[..., 0] = 0
        out = net.output.save()
    return out


def _trace_structure(net, x, i, backend):
    layer = (net.layer1, net.layer2)[i % 2]
    with net.trace(x, backend=backend):
        if i % 3 == 0:
            layer.output[:, i % 10] = i
        elif i % 3 == 1:
            layer.output[:, i % 10] += layer.output[:, (i + 1) % 10] * i
        else:
            layer.output = layer.output.clamp(max=i)
        out = net.output.save()
    return out


def _settled_rss_mb() -> float:
    """RSS once torch's per-shape caches are cleared and the allocator has given back its
    free memory (glibc's ``malloc_trim``; where there is none, RSS as it is)."""
    import ctypes
    _clear_torch_caches()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_mb()


def _grown_over(run, warm, count):
    """(RSS growth in MB, Python memory blocks more) over ``count`` runs after ``warm``."""
    import gc
    import sys
    for i in range(warm):
        run(i)
    before, blocks = _settled_rss_mb(), sys.getallocatedblocks()
    for i in range(warm, warm + count):
        run(i)
        if i % 50 == 0:
            gc.collect()
    rss = _settled_rss_mb() - before
    return rss, sys.getallocatedblocks() - blocks


# torch's fake-tensor machinery keeps some native memory per new input shape, whoever runs
# it (a bare ``FakeTensorMode`` running ``linear`` on 300 new shapes: ~3 MB, no fxsight
# involved); the hooks backend's scans (once per new signature) pay that too
_TORCH_PER_SHAPE_MB = 0.02


@pytest.mark.slow
def test_memory_stays_flat_over_500_new_shapes_and_structures_on_hooks():
    """(slow: ~60 s of CPU.) The scan LRU (32 per model) bounds what fxsight keeps."""
    from models import mlp
    net = NNsight(mlp())
    shapes = list(_shapes(0))
    grown, blocks = _grown_over(lambda i: _trace_shape(net, shapes[i], "hooks"), 80, 500)
    assert blocks < 2_000, f"{blocks} Python memory blocks more over 500 new shapes"
    assert grown < 2 + 500 * _TORCH_PER_SHAPE_MB, \
        f"RSS grew {grown:.1f} MB over 500 new input shapes (hooks)"
    x = torch.randn(4, 5)
    grown, blocks = _grown_over(lambda i: _trace_structure(net, x, i, "hooks"), 100, 500)
    assert blocks < 2_000, f"{blocks} Python memory blocks more over 500 new structures"
    assert grown < 2, f"RSS grew {grown:.1f} MB over 500 new structures (hooks)"


_FX_MEMORY_PROBE = """
import json, sys
sys.path[:0] = [{tests!r}]
import torch
from fxsight import NNsight
from models import mlp
import test_redteam2 as t
net = NNsight(mlp())
shapes = list(t._shapes(0))
grown_shapes, blocks_shapes = t._grown_over(lambda i: t._trace_shape(net, shapes[i], "fx"), 300, 500)
x = torch.randn(4, 5)
grown_structures, blocks_structures = t._grown_over(
    lambda i: t._trace_structure(net, x, i, "fx"), 300, 500)
print(json.dumps([grown_shapes, blocks_shapes, grown_structures, blocks_structures]))
"""


@pytest.mark.slow
def test_memory_stays_flat_over_500_new_shapes_and_structures_on_fx():
    """(slow: each new shape is a new capture.) The capture LRU (32 per model) and the
    runner LRUs (256/128) bound what is kept: measured after 300 new shapes, once every
    one of them is full (while the runner LRU fills, RSS grows ~7 MB over the first 200),
    in a fresh process, as a script runs (pytest's log capture would keep every DEBUG
    record ``torch.export`` emits)."""
    import json
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _FX_MEMORY_PROBE.format(tests=tests)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    grown, blocks, grown_structures, blocks_structures = json.loads(
        done.stdout.strip().splitlines()[-1])
    assert blocks < 2_000, f"{blocks} Python memory blocks more over 500 new shapes"
    assert grown < 2 + 500 * _TORCH_PER_SHAPE_MB, \
        f"RSS grew {grown:.1f} MB over 500 new input shapes (fx)"
    assert blocks_structures < 2_000, \
        f"{blocks_structures} Python memory blocks more over 500 new structures"
    assert grown_structures < 2, f"RSS grew {grown_structures:.1f} MB over 500 new structures (fx)"


def _capturing_state(model):
    """transformers' output-capturing hooks on each module, and the flag it marks them by."""
    hooks = [(path, len(sub._forward_hooks), len(sub._forward_pre_hooks))
             for path, sub in model.named_modules()]
    flags = [path for path, sub in model.named_modules()
             if "_output_capturing_hooks_installed" in vars(sub)]
    return hooks, flags


@pytest.mark.parametrize("first", ["output_attentions", "output_hidden_states"])
def test_a_first_trace_asking_for_transformers_outputs_captures_and_leaves_a_plain_state(
        first):
    """The first forward that asks for ``output_attentions`` / ``output_hidden_states``
    installs transformers' output-capturing hooks and a flag: a trace on fx that is that
    first forward captures, and leaves the hooks and the flag as the plain forward does
    (was: a CaptureError, the flag removed and the hooks left, so the model was refused on
    fx for good and every later forward installed the hooks again: a plain forward's
    hidden_states then held each layer twice)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                          n_positions=16)).eval()

    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    plain_model, model = build(), build()
    with torch.no_grad():
        plain = plain_model(ids, **{first: True})
    net = NNsight(model)
    with torch.no_grad(), net.trace(ids, **{first: True}, backend="fx") as tracer:
        out = net.output.save()
    assert tracer.backend == "fx"
    assert _capturing_state(model) == _capturing_state(plain_model)
    name = first[len("output_"):]
    assert len(getattr(out, name)) == len(getattr(plain, name))
    for got, want in zip(getattr(out, name), getattr(plain, name)):
        assert torch.equal(got, want)
    with torch.no_grad(), net.trace(ids, backend="fx") as tracer:  # (not refused since)
        logits = net.output.logits.save()
    assert tracer.backend == "fx" and torch.equal(logits, plain.logits)
    with torch.no_grad():
        again, plain_again = model(ids, **{first: True}), plain_model(ids, **{first: True})
    assert len(getattr(again, name)) == len(getattr(plain_again, name))


def test_transformers_output_capturing_hooks_are_traced_not_refused():
    """transformers installs forward hooks on a model the first time ``output_attentions``
    or ``output_hidden_states`` is asked for; they only fill the forward's own output, so
    the model still captures on fx, and the traced output equals the plain forward's."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                       n_positions=16, attn_implementation="eager")).eval()
    ids = torch.randint(0, 50, (2, 6))
    plain = model(ids, output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks for m in model.modules())  # (installed by transformers)
    net = NNsight(model)
    for asked in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with net.trace(ids, output_hidden_states=asked, output_attentions=asked,
                           backend="fx") as tracer:
                out = net.output.save()
        assert tracer.backend == "fx"
        assert torch.equal(out.logits, plain.logits)
        if asked:
            assert len(out.hidden_states) == len(plain.hidden_states) == 3
            for got, want in zip(out.hidden_states + out.attentions,
                                 plain.hidden_states + plain.attentions):
                assert torch.equal(got, want)
        else:
            assert out.hidden_states is None and out.attentions is None
