"""Core engine, interventions: every kind of read, write and operation gives the same
tensors on the fx backend, the hooks backend and a hand-written PyTorch reference
(forward hooks written here)."""

from __future__ import annotations

import operator

import pytest
import torch

import fxsight
from fxsight import NNsight, Proxy
from models import mlp

BACKENDS = ("fx", "hooks")


def _x(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(seed))


def _plain(value):
    """A saved value after the trace: names are re-bound to real values already."""
    assert not isinstance(value, Proxy), "a saved value was not re-bound"
    return value


def _assert_same(actual, expected):
    flat_a, spec_a = torch.utils._pytree.tree_flatten(actual)
    flat_e, spec_e = torch.utils._pytree.tree_flatten(expected)
    assert spec_a == spec_e, (spec_a, spec_e)
    for a, e in zip(flat_a, flat_e):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor) and not isinstance(a, Proxy)
            assert a.shape == e.shape and a.dtype == e.dtype
            assert torch.equal(a, e), (a, e)
        else:
            assert a == e


# --- reads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_output_input_inputs(backend, reference_hooks):
    model = mlp()
    x = _x()
    ref = {}
    with reference_hooks(model, hooks={
        "layer1": lambda m, i, o: ref.__setitem__("h1", o),
        "layer3": lambda m, i, o: ref.__setitem__("out", o),
    }, pre_hooks={
        "layer2": lambda m, a, k: ref.__setitem__("in2", (a, k)),
    }):
        expected = model(x)

    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        h1 = net.layer1.output.save()
        a2 = net.layer2.input.save()
        args_kwargs = net.layer2.inputs.save()
        first_arg = net.layer2.inputs[0][0].save()
        out = net.output.save()
        model_in = net.input.save()
    assert tracer.backend == backend
    _assert_same(h1, ref["h1"])
    _assert_same(a2, ref["in2"][0][0])
    _assert_same(args_kwargs, ref["in2"])
    _assert_same(first_arg, ref["in2"][0][0])
    _assert_same(out, expected)
    _assert_same(model_in, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_kwargs_inputs_of_gpt2_block(backend, core_gpt2, core_ids, reference_hooks):
    ref = {}
    with reference_hooks(core_gpt2, pre_hooks={
        "transformer.h.1": lambda m, a, k: ref.__setitem__("inputs", (a, k)),
    }):
        core_gpt2(core_ids, use_cache=False)
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        inputs = net.transformer.h[1].inputs.save()
        hidden = net.transformer.h[1].input.save()
    assert tracer.backend == backend
    args, kwargs = inputs
    ref_args, ref_kwargs = ref["inputs"]
    assert len(args) == len(ref_args) and set(kwargs) == set(ref_kwargs)
    _assert_same(args[0], ref_args[0])
    _assert_same(args[1], ref_args[1])
    _assert_same(args[3:], ref_args[3:])
    _assert_same(kwargs, ref_kwargs)
    _assert_same(hidden, ref_args[0])
    # args[2] is the attention mask: see test_gpt2_block_attention_mask_matches_eager


@pytest.mark.xfail(strict=True, reason=(
    "transformers builds an explicit causal mask while torch.export traces the model "
    "(no is_causal shortcut under tracing), so the fx backend's block inputs hold a mask "
    "tensor where the eager model (and the hooks backend) pass None; outputs agree"))
def test_gpt2_block_attention_mask_matches_eager(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    masks = {}
    for backend in BACKENDS:
        with net.trace(core_ids, use_cache=False, backend=backend):
            mask = net.transformer.h[1].inputs[0][2].save()
        masks[backend] = mask
    assert masks["hooks"] is None
    assert masks["fx"] is None


# --- writes --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_example_in_place_and_replacement(backend, reference_hooks):
    model = mlp()
    x = _x()
    ref = {}

    def hook1(m, i, o):
        ref["h"] = o

    def hook2(m, i, o):
        o[:, 0] = 0

    def hook3(m, i, o):
        return o * 2 + ref["h"].mean()

    with reference_hooks(model, hooks={"layer1": hook1, "layer2": hook2, "layer3": hook3},
                         pre_hooks={"layer2": lambda m, a, k: ref.__setitem__("a", a[0])}):
        expected = model(x)

    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        h = net.layer1.output.save()
        a = net.layer2.input.save()
        net.layer2.output[:, 0] = 0
        net.layer3.output = net.layer3.output * 2 + h.mean()
        y = net.output.save()
    assert tracer.backend == backend
    _assert_same(h, ref["h"])
    _assert_same(a, ref["a"])
    _assert_same(y, expected)
    assert not torch.equal(y, model(x))  # the interventions changed something


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmented_assignment(backend, reference_hooks):
    model = mlp()
    x = _x()

    def hook(m, i, o):
        o += 1.5
        o *= 2

    with reference_hooks(model, hooks={"layer2": hook}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        net.layer2.output += 1.5
        net.layer2.output *= 2
        out = net.output.save()
    assert tracer.backend == backend
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_after_write_sees_the_written_value(backend, reference_hooks):
    model = mlp()
    x = _x()
    plain_mid = model.layer2(model.act1(model.layer1(x)))
    with reference_hooks(model, hooks={"layer2": lambda m, i, o: o * -3}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        before = net.layer2.output.clone().save()
        net.layer2.output = net.layer2.output * -3
        after = net.layer2.output.save()
        out = net.output.save()
    _assert_same(before, plain_mid)
    _assert_same(after, plain_mid * -3)
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_then_in_place_edit_aliases_like_hooks(backend, reference_hooks):
    model = mlp()
    x = _x()
    ref = {}

    def hook(m, i, o):
        ref["seen"] = o
        ref["copy"] = o.clone()
        o[:, 1:3] = -1.0

    with reference_hooks(model, hooks={"layer2": hook}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        seen = net.layer2.output.save()
        copy = net.layer2.output.clone().save()
        net.layer2.output[:, 1:3] = -1.0
        out = net.output.save()
    _assert_same(seen, ref["seen"])  # the saved activation shows the edit, as with hooks
    _assert_same(copy, ref["copy"])
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_input(backend, reference_hooks):
    model = mlp()
    x = _x()
    with reference_hooks(model, pre_hooks={
        "layer2": lambda m, a, k: ((a[0] * 0.5 + 1,), k),
    }):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        net.layer2.input = net.layer2.input * 0.5 + 1
        seen = net.layer2.input.save()
        out = net.output.save()
    assert tracer.backend == backend
    _assert_same(out, expected)
    _assert_same(seen, model.act1(model.layer1(x)) * 0.5 + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_inputs_tuple(backend, reference_hooks):
    model = mlp()
    x = _x()
    with reference_hooks(model, pre_hooks={
        "layer3": lambda m, a, k: ((torch.flip(a[0], dims=[1]),), k),
    }):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        args, kwargs = net.layer3.inputs
        net.layer3.inputs = ((torch.flip(args[0], dims=[1]),), {})
        out = net.output.save()
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_edit_of_model_input(backend, reference_hooks):
    model = mlp()

    def pre(m, a, k):
        a[0][:, 0] = 3.0

    x_ref = _x()
    with reference_hooks(model, pre_hooks={"layer1": pre}):
        expected = model(x_ref)
    net = NNsight(model)
    x = _x()
    with net.trace(x, backend=backend):
        net.layer1.input[:, 0] = 3.0
        out = net.output.save()
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_scalar_broadcasts(backend, reference_hooks):
    model = mlp()
    x = _x()
    with reference_hooks(model, hooks={"act1": lambda m, i, o: torch.zeros_like(o) + 0.25}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        net.act1.output = 0.25
        out = net.output.save()
    _assert_same(out, expected)
    with net.trace(x, backend=backend):
        net.act1.output = torch.full((10,), 0.25)  # a row broadcast over the batch
        out = net.output.save()
    _assert_same(out, expected)


# --- GPT-2: tuple outputs, ModelOutput, envoys called on proxies ---------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_tuple_output_read_and_write(backend, core_gpt2, core_ids, reference_hooks):
    ref = {}

    def attn_hook(m, i, o):
        assert isinstance(o, tuple)
        ref["attn"] = o[0].clone()
        new = o[0].clone()
        new[:, :, :8] = 0
        return (new * 1.5, *o[1:])

    with reference_hooks(core_gpt2, hooks={"transformer.h.0.attn": attn_hook}):
        expected = core_gpt2(core_ids, use_cache=False).logits
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        attn = net.transformer.h[0].attn.output[0].clone().save()
        net.transformer.h[0].attn.output[0][:, :, :8] = 0
        net.transformer.h[0].attn.output = (net.transformer.h[0].attn.output[0] * 1.5,
                                            *net.transformer.h[0].attn.output[1:])
        logits = net.output.logits.save()
    assert tracer.backend == backend
    _assert_same(attn, ref["attn"])
    _assert_same(logits, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_model_output_attribute_and_write(backend, core_gpt2, core_ids, reference_hooks):
    def head_hook(m, i, o):
        o = o.clone()
        o[:, -1] = 0
        return o

    with reference_hooks(core_gpt2, hooks={"lm_head": head_hook}):
        expected = core_gpt2(core_ids, use_cache=False).logits
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend):
        net.lm_head.output[:, -1] = 0
        logits = net.output.logits.save()
        also = net.output["logits"].save()
        first = net.output[0].save()
    _assert_same(logits, expected)
    _assert_same(also, expected)
    _assert_same(first, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_lens_calls_envoys_on_proxies(backend, core_gpt2, core_ids, reference_hooks):
    ref = {}
    with reference_hooks(core_gpt2, hooks={
        "transformer.h.0": lambda m, i, o: ref.__setitem__("h0", o),
    }):
        logits = core_gpt2(core_ids, use_cache=False).logits
    expected_lens = core_gpt2.lm_head(core_gpt2.transformer.ln_f(ref["h0"]))
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        hidden = net.transformer.h[0].output
        lens = net.lm_head(net.transformer.ln_f(hidden)).save()
        shape = lens.shape
        last = net.lm_head(net.transformer.ln_f(net.transformer.h[-1].output)).save()
        out = net.output.logits.save()
    assert tracer.backend == backend
    assert shape == (2, 7, 128)
    _assert_same(lens, expected_lens)
    _assert_same(last, logits)
    _assert_same(out, logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_write_and_read(backend, core_llama, core_ids, reference_hooks):
    ref = {}

    def mlp_hook(m, i, o):
        ref["mlp"] = o
        return o * 0.5

    with reference_hooks(core_llama, hooks={"model.layers.0.mlp": mlp_hook}):
        expected = core_llama(core_ids, use_cache=False).logits
    net = NNsight(core_llama)
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        before = net.model.layers[0].mlp.output.save()
        net.model.layers[0].mlp.output = net.model.layers[0].mlp.output * 0.5
        logits = net.output.logits.save()
    assert tracer.backend == backend
    _assert_same(before, ref["mlp"])
    _assert_same(logits, expected)


# --- operations ---------------------------------------------------------------------------
def _keep(value):
    return value


def _scale_rows(t, factor):
    return t * torch.arange(1, t.shape[0] + 1, dtype=t.dtype).unsqueeze(1) * factor


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_functions_methods_operators_apply(backend, reference_hooks):
    model = mlp()
    x = _x()
    ref = {}
    with reference_hooks(model, hooks={
        "layer1": lambda m, i, o: ref.__setitem__("h1", o),
        "layer2": lambda m, i, o: ref.__setitem__("h2", o),
    }):
        model(x)
    h1, h2 = ref["h1"], ref["h2"]
    expected = {
        "relu": torch.relu(h1),
        "softmax": h1.softmax(-1),
        "cat": torch.cat([h1, h2], dim=1),
        "where": torch.where(h1 > 0, h1, h2),
        "ops": (-h1 + 2 * h2 - h1 / 3) ** 2 // 1 % 5,
        "cmp": (h1 >= h2) & (h1 != 0) | ~(h2 < 0),
        "matmul": h1 @ h2.T,
        "abs": abs(h1),
        "method_chain": h1.reshape(2, 20).sum(dim=0).unsqueeze(0).expand(3, 20),
        "index": h1[1:, ::2][..., None],
        "t": h1.t(),
        "apply": _scale_rows(h2, 0.5),
        "apply_tuple": operator.itemgetter(0)((h1, h2)),
        "stack": torch.stack([h1.sum(), h2.max()]),
    }
    net = NNsight(model)
    with net.trace(x, backend=backend):
        a = net.layer1.output
        b = net.layer2.output
        got = {
            "relu": torch.relu(a),
            "softmax": a.softmax(-1),
            "cat": torch.cat([a, b], dim=1),
            "where": torch.where(a > 0, a, b),
            "ops": (-a + 2 * b - a / 3) ** 2 // 1 % 5,
            "cmp": (a >= b) & (a != 0) | ~(b < 0),
            "matmul": a @ b.T,
            "abs": abs(a),
            "method_chain": a.reshape(2, 20).sum(dim=0).unsqueeze(0).expand(3, 20),
            "index": a[1:, ::2][..., None],
            "t": a.t(),
            "apply": fxsight.apply(_scale_rows, b, 0.5),
            "apply_tuple": fxsight.apply(operator.itemgetter(0), (a, b)),
            "stack": torch.stack([a.sum(), b.max()]),
        }
        for value in got.values():
            value.save()
        assert got["cat"].shape == (4, 20) and got["matmul"].ndim == 2
        assert got["method_chain"].dtype == torch.float32
        assert got["method_chain"].size(0) == 3 and got["t"].size() == (10, 4)
        assert got["index"].device == torch.device("cpu")
    assert set(got) == set(expected)
    for key in expected:
        _assert_same(got[key], expected[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fxsight_save_function_and_apply_output(backend):
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x, backend=backend):
        pair = fxsight.save((net.layer1.output, net.layer3.output))
        halves = fxsight.apply(lambda t: (t[:2], t[2:]), net.layer1.output).save()
    h1 = model.layer1(x)
    assert isinstance(pair, tuple) and all(type(p) is torch.Tensor for p in pair)
    _assert_same(pair[0], h1)
    _assert_same(pair[1], model(x))
    _assert_same(halves, (h1[:2], h1[2:]))


# --- envoys ---------------------------------------------------------------------------------
def test_module_list_indexing_and_attribute_fall_through(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    assert net.transformer.h[-1].path == "transformer.h.1"
    assert net.transformer.h[-2].path == net.transformer.h[0].path == "transformer.h.0"
    assert net.transformer.h[-1] is net.transformer.h[1]
    assert len(net.transformer.h) == 2
    assert [e.path for e in net.transformer.h] == ["transformer.h.0", "transformer.h.1"]
    with pytest.raises(IndexError):
        net.transformer.h[2]
    with pytest.raises(IndexError):
        net.transformer.h[-3]
    assert net.config is core_gpt2.config and net.config.n_layer == 2
    assert net.transformer.wte.weight is core_gpt2.transformer.wte.weight
    assert "GPT2Block" in repr(net.transformer.h[0])
    with net.trace(core_ids, use_cache=False) as tracer:
        last = net.transformer.h[-1].output.save()
        first = net.transformer.h[-2].output.save()
    ref = {}
    for i in range(2):
        core_gpt2.transformer.h[i].register_forward_hook(
            lambda m, inp, o, i=i: ref.__setitem__(i, o))
    try:
        core_gpt2(core_ids, use_cache=False)
    finally:
        for block in core_gpt2.transformer.h:
            block._forward_hooks.clear()
    assert tracer.backend == "fx"
    _assert_same(last, ref[1])
    _assert_same(first, ref[0])


def test_replaced_submodule_is_seen_by_the_envoy():
    model = mlp()
    net = NNsight(model)
    old = net.layer2
    assert old.weight is model.layer2.weight
    model.layer2 = torch.nn.Linear(10, 10)
    assert net.layer2.weight is model.layer2.weight
    x = _x()
    with net.trace(x) as tracer:
        out = net.output.save()
    assert tracer.backend == "fx"
    _assert_same(out, model(x))


def test_sequential_indexing():
    model = mlp()
    net = NNsight(model)
    # nn.Sequential indexes by position; the envoy takes the module's own name (its sites)
    assert net[0].path == "layer1"
    assert net["layer1"] is net.layer1  # by name: any submodule (see test_parity.py)
    with pytest.raises(TypeError):
        net[1.5]


# --- real tensors become graph inputs --------------------------------------------------------
def test_real_tensors_become_graph_inputs(reference_hooks):
    model = mlp()
    x = _x()
    net = NNsight(model)
    results = []
    for seed in range(3):
        steer = torch.randn(10, generator=torch.Generator().manual_seed(seed))
        scale = torch.tensor(0.5 + seed)
        with net.trace(x) as tracer:
            net.layer2.output += steer
            net.layer3.output = net.layer3.output * scale
            out = net.output.save()
        with reference_hooks(model, hooks={
            "layer2": lambda m, i, o: o + steer,
            "layer3": lambda m, i, o: o * scale,
        }):
            expected = model(x)
        assert tracer.backend == "fx"
        _assert_same(out, expected)
        graph = tracer.graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == 3  # x, steer, scale
        constants = [n for n in graph.nodes if n.op == "get_attr"
                     and "constant" in str(n.target)]
        assert not constants
        for name, buf in list(tracer.graph_module.named_buffers()):
            assert buf is not steer and buf is not scale, name
        results.append(out)
    assert not torch.equal(results[0], results[1])
    with net.trace(x, backend="hooks"):
        net.layer2.output += steer
        net.layer3.output = net.layer3.output * scale
        hooked = net.output.save()
    _assert_same(hooked, results[-1])


def test_new_values_same_structure_reuse_the_rewritten_graph():
    net = NNsight(mlp())
    x = _x()
    graphs = []
    for value in (1.0, 2.0):
        with net.trace(x) as tracer:
            net.layer2.output += torch.full((10,), value)
            net.output.save()
        graphs.append(tracer.graph_module)
    assert graphs[0] is graphs[1]


# --- entry points ------------------------------------------------------------------------
def test_trace_false_runs_plainly():
    model = mlp()
    x = _x()
    net = NNsight(model)
    out = net.trace(x, trace=False)
    _assert_same(out, model(x))


def test_trace_false_language_model(core_gpt2, core_ids):
    net = NNsight(core_gpt2)
    out = net.trace(core_ids, use_cache=False, trace=False)
    _assert_same(out.logits, core_gpt2(core_ids, use_cache=False).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_trace(backend, reference_hooks):
    model = mlp()
    x = _x()
    with reference_hooks(model, hooks={"layer2": lambda m, i, o: o * 0}):
        expected = model(x)
    with fxsight.trace(model, x, backend=backend) as m:
        h = m.layer1.output.save()
        m.layer2.output = m.layer2.output * 0
        out = m.output.save()
    assert isinstance(m, NNsight)
    _assert_same(h, model.layer1(x))
    _assert_same(out, expected)


def test_model_output_and_tracer_result_after_the_block():
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x) as tracer:
        net.layer2.output[:] = 0
    expected = model.layer3(torch.sigmoid(torch.zeros(4, 10)))
    _assert_same(tracer.result, expected)
    _assert_same(tracer.output, expected)


# --- binding -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_names_are_rebound_in_locals_lists_and_dicts(backend):
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x, backend=backend):
        h = net.layer1.output.save()
        listed = [net.layer2.output.save(), net.layer3.output.save()]
        mapped = {"a": net.act1.output.save(), "b": 3}
        nested = {"deep": [net.act2.output.save()]}
        unsaved = net.layer1.output * 2
    assert type(h) is torch.Tensor
    assert all(type(v) is torch.Tensor for v in listed)
    assert type(mapped["a"]) is torch.Tensor and mapped["b"] == 3
    h1 = model.layer1(x)
    h2 = model.layer2(torch.relu(h1))
    _assert_same(h, h1)
    _assert_same(listed, [h2, model(x)])
    _assert_same(mapped["a"], torch.relu(h1))
    # nested deeper: re-bound too
    assert type(nested["deep"][0]) is torch.Tensor
    _assert_same(nested["deep"][0], torch.sigmoid(h2))
    assert isinstance(unsaved, Proxy)
    with pytest.raises(fxsight.TraceError, match="not saved"):
        unsaved.value


def _trace_in_helper(net, x):
    with net.trace(x):
        inner = net.layer1.output.save()
    return inner


def test_binding_inside_a_helper_function_and_value():
    model = mlp()
    x = _x()
    net = NNsight(model)
    inner = _trace_in_helper(net, x)
    assert type(inner) is torch.Tensor
    _assert_same(inner, model.layer1(x))
    with net.trace(x):
        kept = net.layer1.output.save()
        alias = kept
        holder = (kept,)
    assert type(kept) is torch.Tensor and type(alias) is torch.Tensor
    assert type(holder) is tuple and type(holder[0]) is torch.Tensor
    _assert_same(holder[0], model.layer1(x))


# --- more kinds, and regressions ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_root_output_write_and_keyword_input(backend, core_gpt2, core_ids):
    model = mlp()
    net = NNsight(model)
    with net.trace(_x(), backend=backend):
        net.output = net.output * 0 + 1
        out = net.output.save()
    _assert_same(out, torch.ones(4, 2))
    # GPT2LMHeadModel calls its transformer with keyword arguments only: .input is the
    # first of them (input_ids); writing the embedding's input changes the tokens
    lm = NNsight(core_gpt2)
    with lm.trace(core_ids, use_cache=False, backend=backend):
        ids_seen = lm.transformer.input.save()
        lm.transformer.wte.input = lm.transformer.wte.input.flip(1)
        logits = lm.output.logits.save()
    _assert_same(ids_seen, core_ids)
    _assert_same(logits, core_gpt2(core_ids.flip(1), use_cache=False).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_tensor_methods_and_proxy_indices(backend):
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x, backend=backend):
        net.layer1.output.clamp_(min=0.1)
        net.layer2.output[:, 0].zero_()
        idx = net.layer1.output.argmax(-1)
        net.layer3.output[torch.arange(4), idx % 2] = 5.0
        rows = torch.stack([row.sum() for row in net.layer1.output]).save()
        out = net.output.save()
    h1 = model.layer1(x).clamp(min=0.1)
    h2 = model.layer2(torch.relu(h1))
    h2[:, 0] = 0
    h3 = model.layer3(torch.sigmoid(h2))
    h3[torch.arange(4), h1.argmax(-1) % 2] = 5.0
    _assert_same(out, h3)
    _assert_same(rows, h1.sum(1))


def test_saving_twice_and_aliases():
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x):
        a = net.layer1.output.save()
        a.save()  # used to raise ControlFlowError (a WeakSet compared proxies with ==)
        fxsight.save(a)
        b = a
    assert type(a) is torch.Tensor and b is a
    _assert_same(a, model.layer1(x))


def test_a_dead_saved_proxy_hands_its_id_to_no_other_value():
    """Saved proxies are held weakly and found again by identity: where a temporary saved
    proxy dies and its id goes to another proxy, that one is not bound to its value (the
    id reuse is made certain here by filing the dead proxy's entry under the new id)."""
    net = NNsight(mlp())
    with net.trace(_x()):
        temporary = net.layer1.output.save()
        saved = temporary._recorder.saved
        entry = saved.pop(id(temporary))
        other = net.layer2.output
        saved[id(other)] = entry  # (as if ``other`` had been given the dead one's id)
        del temporary
        kept = net.layer2.output.save()
    assert isinstance(other, Proxy), "an unsaved proxy must not be bound to a value"
    assert isinstance(kept, torch.Tensor)


def test_binding_of_a_closure_variable():
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x):
        h = net.layer1.output.save()

    def read():
        return h

    assert type(read()) is torch.Tensor
    _assert_same(read(), model.layer1(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_with_callables_without_names(backend):
    import functools
    model = mlp()
    x = _x()
    net = NNsight(model)
    with net.trace(x, backend=backend) as tracer:
        doubled = fxsight.apply(functools.partial(torch.mul, other=2.0), net.layer1.output)
        net.layer2.output = fxsight.apply(operator.neg, net.layer2.output)
        second = fxsight.apply(operator.itemgetter(1), net.layer1.output).save()
        doubled.save()
        out = net.output.save()
    if backend == "fx":
        assert "partial" in tracer.graph_module.code
    h1 = model.layer1(x)
    _assert_same(doubled, h1 * 2)
    _assert_same(second, h1[1])
    _assert_same(out, model.layer3(torch.sigmoid(-model.layer2(torch.relu(h1)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_modules_alias_their_input(backend, core_gpt2, core_ids, reference_hooks):
    """Dropout in eval returns its input: an in-place edit of its output edits its input."""
    ref = {}

    def drop_hook(m, i, o):
        ref["out"] = o
        o[:, 0] = 0
        ref["in"] = i[0]

    with reference_hooks(core_gpt2, hooks={"transformer.drop": drop_hook}):
        expected = core_gpt2(core_ids, use_cache=False).logits
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend):
        out = net.transformer.drop.output.save()
        net.transformer.drop.output[:, 0] = 0
        inp = net.transformer.drop.input.save()
        logits = net.output.logits.save()
    _assert_same(out, ref["out"])
    _assert_same(inp, ref["in"])
    _assert_same(logits, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_read_after_an_aliasing_in_place_edit(backend, reference_hooks):
    """``h.sum()`` recorded after an in-place edit of act1.input (the same tensor as
    layer1.output) sees the edit, as in eager PyTorch and nnsight."""
    model = mlp()
    x = _x()
    ref = {}

    def pre(m, a, k):
        a[0][:, 0] = 100.0

    with reference_hooks(model, hooks={
        "layer1": lambda m, i, o: ref.__setitem__("h", o),
        "layer3": lambda m, i, o: o + ref["h"].sum(),
    }, pre_hooks={"act1": pre}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        h = net.layer1.output
        net.act1.input[:, 0] = 100.0
        net.layer3.output = net.layer3.output + h.sum()
        out = net.output.save()
    _assert_same(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_lens_on_a_module_that_is_also_a_site(backend, core_gpt2, core_ids,
                                                     reference_hooks):
    """Calling ln_f on an early hidden state must not count as ln_f's call in the forward
    pass (the hooks backend used to apply the ln_f write to the lens call instead)."""
    ref = {}

    def ln_f_hook(m, i, o):
        ref["ln_f"] = o
        return o * 2

    with reference_hooks(core_gpt2, hooks={
        "transformer.ln_f": ln_f_hook,
        "transformer.h.0": lambda m, i, o: ref.__setitem__("h0", o),
    }):
        expected = core_gpt2(core_ids, use_cache=False).logits
    expected_lens = core_gpt2.lm_head(core_gpt2.transformer.ln_f(ref["h0"]))
    net = NNsight(core_gpt2)
    with net.trace(core_ids, use_cache=False, backend=backend):
        lens = net.lm_head(net.transformer.ln_f(net.transformer.h[0].output)).save()
        net.transformer.ln_f.output = net.transformer.ln_f.output * 2
        ln_f = net.transformer.ln_f.output.save()
        logits = net.output.logits.save()
    _assert_same(lens, expected_lens)
    _assert_same(ln_f, ref["ln_f"] * 2)
    _assert_same(logits, expected)


# --- values as eager torch reads them: NumPy, 0-d index tensors, masks, named tuples ------
def _layer1_and_output(model, x, edit=None):
    """layer1's output and the model's output of a plain forward, with ``edit(h)`` applied
    to layer1's output in place by a forward hook."""
    ref = {}

    def hook(module, args, output):
        if edit is not None:
            edit(output)
        ref["h1"] = output

    handle = model.layer1.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return ref["h1"], out


def _numpy_reads(np, h, apply):
    """NumPy scalars and arrays used with ``h`` (a tensor, or a traced value: the same code
    is the reference and the recording); ``apply(h)`` the last entry."""
    return {
        "f32": h * np.float32(0.1), "f64": h * np.float64(2.0),
        "reflected": np.float32(3.0) * h, "int_times_f32": h.argmax(-1) * np.float32(0.5),
        "bool_scalar": (h > 0) * np.bool_(True),  # (torch reads np.bool_ as a float)
        "index_int": h[:, np.int64(3)], "index_array": h[:, np.arange(2)],
        "index_0d_array": h[:, np.array(4)], "slice": h[:, np.int64(1):np.int64(3)],
        "narrow": h.narrow(1, np.int64(1), 2), "array": h + np.ones(10, dtype=np.float32),
        "apply": apply(h),
    }


# (eager torch hands `tensor + array` to NumPy, whose wrapping back warns under NumPy 2)
@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_and_arrays_as_eager_torch_reads_them(backend):
    np = pytest.importorskip("numpy")
    model, x = mlp(), _x()
    h1, _ = _layer1_and_output(model, x)
    _, written = _layer1_and_output(model, x, edit=lambda o: o.__setitem__((slice(None), 2),
                                                                            0.5))
    expected = _numpy_reads(np, h1, apply=lambda h: h * 2.0)

    def takes_numpy(t, scale):
        assert isinstance(scale, np.float32)  # (fxsight.apply gets NumPy values as they are)
        return t * float(scale)

    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        a = net.layer1.output
        got = _numpy_reads(np, a,
                           apply=lambda h: fxsight.apply(takes_numpy, h, np.float32(2.0)))
        for value in got.values():
            value.save()
    for key in expected:
        _assert_same(got[key], expected[key])
    with torch.no_grad(), net.trace(x, backend=backend):
        net.layer1.output[:, np.int64(2)] = np.float64(0.5)
        out = net.output.save()
    _assert_same(out, written)


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_operator_with_a_numpy_array_is_a_new_value_as_in_eager(backend):
    np = pytest.importorskip("numpy")
    model, x = mlp(), _x()
    h1, out_plain = _layer1_and_output(model, x)
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        h = net.layer1.output
        h += np.ones(10, dtype=np.float32)  # eager: `h = h + array`, layer1 unchanged
        shifted = h.save()
        out = net.output.save()
    _assert_same(shifted, h1 + np.ones(10, dtype=np.float32))
    _assert_same(out, out_plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_tensors_of_the_caller_and_0d_traced_indices(backend):
    model, x = mlp(), _x()
    pos, rows = torch.tensor(3), torch.tensor([True, False, True, True])
    cells = torch.rand(4, 10, generator=torch.Generator().manual_seed(2)) > 0.5
    h1, _ = _layer1_and_output(model, x)
    _, zeroed = _layer1_and_output(model, x, edit=lambda o: o.__setitem__((slice(None), pos), 0))
    _, through_view = _layer1_and_output(model, x, edit=lambda o: o[:, pos].mul_(3))
    expected = {"pos": h1[:, pos], "traced_0d": h1[0, h1[0].argmax()],
                "flat_0d": h1.flatten()[h1.argmax()], "rows": h1[rows], "cells": h1[cells],
                "apply_mask": h1[h1 > 0]}
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        a = net.layer1.output
        got = {"pos": a[:, pos], "traced_0d": a[0, a[0].argmax()],
               "flat_0d": a.flatten()[a.argmax()], "rows": a[rows], "cells": a[cells],
               "apply_mask": fxsight.apply(lambda h: h[h > 0], a)}
        for value in got.values():
            value.save()
    for key in expected:
        _assert_same(got[key], expected[key])
    with torch.no_grad(), net.trace(x, backend=backend):
        net.layer1.output[:, pos] = 0
        out = net.output.save()
    _assert_same(out, zeroed)
    with torch.no_grad(), net.trace(x, backend=backend):
        net.layer1.output[:, pos].mul_(3)  # (a view, as torch's select at pos.item())
        out = net.output.save()
    _assert_same(out, through_view)


def _named_tuple_fields(h):
    """The fields of torch's named-tuple results read from ``h`` (a tensor, or a traced value:
    the same code is the reference and the recording)."""
    return {"topk_values": h.topk(3, dim=-1).values, "topk_indices": h.topk(3, dim=-1).indices,
            "topk_item": h.topk(3, dim=-1)[1], "max_values": h.max(dim=-1).values,
            "max_indices": h.max(-1).indices, "min_item": h.min(-1)[0],
            "sort": torch.sort(h, dim=-1).values, "kthvalue": h.kthvalue(2, -1).indices,
            "aminmax_max": torch.aminmax(h, dim=0).max,
            "aminmax_min": torch.aminmax(h, dim=0).min,
            "method_max": h.max(), "method_values_chain": h.sort(-1).values * 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fields_of_torch_named_tuples(backend):
    model, x = mlp(), _x()
    h1, _ = _layer1_and_output(model, x)
    expected = _named_tuple_fields(h1)
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        got = _named_tuple_fields(net.layer1.output)
        for value in got.values():
            value.save()
    assert got.keys() == expected.keys()
    for key in expected:
        _assert_same(got[key], expected[key])
