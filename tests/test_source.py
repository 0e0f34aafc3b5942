"""``envoy.source``: every call inside a module's forward is a site (nnsight's ``.source``).

References are independent of fxsight: transformers' own ``output_attentions=True``, plain
PyTorch forward hooks, and hand-written computations.
"""

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.errors import ShapeError, TraceError

from models import tiny_gpt2, tiny_llama

BACKENDS = ("fx", "hooks")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h * 2)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(attn_implementation="eager")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(attn_implementation="eager")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _attention(model):
    if hasattr(model, "transformer"):
        return lambda net, i: net.transformer.h[i].attn
    return lambda net, i: net.model.layers[i].self_attn


# --- names ---------------------------------------------------------------------------------
def test_names_follow_nnsight(gpt2):
    net = NNsight(gpt2)
    source = net.transformer.h[0].attn.source
    names = source.operations
    # nnsight's naming: dotted name joined by "_", a counter per name, inner calls first
    assert {"self_c_attn_0", "split_0", "attention_interface_0", "self_c_proj_0",
            "transpose_0", "key_states_view_0"} <= set(names)
    assert names.index("self_c_attn_0") < names.index("split_0")
    text = str(source)
    assert "attention_interface_0" in text and "def forward(" in text
    line = next(l for l in text.splitlines() if l.lstrip().startswith("attention_interface_0"))
    assert "attention_interface(" in line and "->" in line
    assert "attention_interface_0" in dir(source)


def test_nested_source_inside_a_trace(gpt2, ids):
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False):
        nested = net.transformer.h[0].attn.source.attention_interface_0.source
        names = nested.operations
    assert nested.function.__name__ == "eager_attention_forward"
    assert {"torch_matmul_0", "nn_functional_softmax_0", "torch_matmul_1"} <= set(names)
    # outside a trace, the last trace's function is known
    assert "nn_functional_softmax_0" in str(
        net.transformer.h[0].attn.source.attention_interface_0.source)


def test_small_module_read_and_write():
    torch.manual_seed(0)
    net = NNsight(Net())
    x = torch.randn(4, 3)
    assert net.source.operations == ["self_fc_0", "torch_relu_0", "self_out_0"]
    for backend in BACKENDS:
        with net.trace(x, backend=backend) as tracer:
            pre = net.source.torch_relu_0.input.save()
            args = net.source.self_out_0.inputs.save()
            net.source.torch_relu_0.output[:, 0] = 5.0
            out = net.output.save()
        assert tracer.backend == backend
        module = net._module
        assert torch.equal(pre, module.fc(x))
        h = torch.relu(module.fc(x))
        h[:, 0] = 5.0
        assert torch.allclose(out, module.out(h * 2))
        assert torch.allclose(args[0][0], h * 2)


# --- attention probabilities -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_attention_probabilities_equal_output_attentions(which, backend, request, ids):
    model = request.getfixturevalue(which)
    attention = _attention(model)
    reference = model(ids, use_cache=False, output_attentions=True).attentions
    net = NNsight(model)
    layers = len(reference)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        patterns = [attention(net, i).source.attention_interface_0.output[1].save()
                    for i in range(layers)]
    assert tracer.backend == backend
    for pattern, expected in zip(patterns, reference):
        assert pattern.shape == expected.shape
        assert torch.allclose(pattern, expected, atol=1e-6)
    # the softmax inside eager_attention_forward, one level down
    with net.trace(ids, use_cache=False, backend=backend):
        softmax = [attention(net, i).source.attention_interface_0.source
                   .nn_functional_softmax_0.output.save() for i in range(layers)]
    for pattern, expected in zip(softmax, reference):
        assert torch.allclose(pattern, expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_zeroing_one_heads_pattern(which, backend, request, ids, reference_hooks):
    """Zeroing head 1's probabilities in layer 0 zeroes that head's slice of the attention
    output: the same as zeroing those columns of the output projection's input, done here
    with a plain forward pre-hook."""
    model = request.getfixturevalue(which)
    attention = _attention(model)
    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    proj = "transformer.h.0.attn.c_proj" if which == "gpt2" else "model.layers.0.self_attn.o_proj"

    def zero_head(module, args, kwargs):
        x = args[0].clone()
        x[..., head_dim:2 * head_dim] = 0
        return (x, *args[1:]), kwargs

    with reference_hooks(model, pre_hooks={proj: zero_head}):
        expected = model(ids, use_cache=False).logits
    plain = model(ids, use_cache=False).logits
    net = NNsight(model)
    with net.trace(ids, use_cache=False, backend=backend):
        softmax = attention(net, 0).source.attention_interface_0.source.nn_functional_softmax_0
        softmax.output[:, 1] = 0
        logits = net.output.logits.save() if which == "llama" else net.output[0].save()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_key_value_reads(gpt2, ids, backend, reference_hooks):
    seen = {}

    def keep(module, args, output):
        seen["qkv"] = output.detach().clone()

    with reference_hooks(gpt2, hooks={"transformer.h.1.attn.c_attn": keep}):
        gpt2(ids, use_cache=False)
    q, k, v = seen["qkv"].split(gpt2.config.n_embd, dim=2)
    heads = gpt2.config.n_head
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False, backend=backend):
        source = net.transformer.h[1].attn.source
        split = source.split_1.output.save()  # (split_0: the cross-attention branch)
        query = source.transpose_4.output.save()  # (query_states.view(...).transpose(1, 2))
    assert torch.allclose(split[0], q) and torch.allclose(split[1], k)
    assert torch.allclose(split[2], v)
    assert torch.allclose(query, q.view(2, 7, heads, -1).transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_invokes_read_their_rows(gpt2, ids, backend):
    reference = gpt2(ids, use_cache=False, output_attentions=True).attentions[0]
    net = NNsight(gpt2)
    with net.trace(use_cache=False, backend=backend) as tracer:
        with tracer.invoke(ids[:1]):
            first = net.transformer.h[0].attn.source.attention_interface_0.output[1].save()
        with tracer.invoke(ids[1:]):
            second = net.transformer.h[0].attn.source.attention_interface_0.output[1].save()
            # a write in one invoke's rows only
            net.transformer.h[0].attn.source.self_c_proj_0.output[:] = 0
            out = net.transformer.h[0].attn.output[0].save()
    assert first.shape[0] == second.shape[0] == 1
    assert torch.allclose(first, reference[:1], atol=1e-6)
    assert torch.allclose(second, reference[1:], atol=1e-6)
    assert torch.equal(out, torch.zeros_like(out))


# --- errors --------------------------------------------------------------------------------
def test_unknown_name_lists_the_nearest(gpt2):
    net = NNsight(gpt2)
    with pytest.raises(AttributeError) as info:
        net.transformer.h[0].attn.source.attention_interface  # noqa: B018
    message = str(info.value)
    assert "attention_interface_0" in message and "test_source.py" in message


def test_wrong_shape_write_fails_before_running(ids):
    model = tiny_gpt2(attn_implementation="eager")
    calls = []

    class CountingLayerNorm(torch.nn.LayerNorm):
        """Counts real forward passes (captures and scans run on fake tensors)."""

        def forward(self, x):
            calls.append(type(x) is torch.Tensor)
            return super().forward(x)

    model.transformer.ln_f.__class__ = CountingLayerNorm
    net = NNsight(model)
    for backend in BACKENDS:
        with pytest.raises(ShapeError) as info:
            with net.trace(ids, use_cache=False, backend=backend):
                net.transformer.h[0].attn.source.split_1.output = torch.zeros(3)
        assert "test_source.py" in str(info.value)
    assert not any(calls)  # no real forward pass ran
    model(ids)
    assert calls[-1]  # (the count sees a real one)


def test_sdpa_has_no_probabilities(ids):
    model = tiny_gpt2(attn_implementation="sdpa")
    net = NNsight(model)
    with pytest.raises(AttributeError) as info:
        with net.trace(ids, use_cache=False):
            nested = net.transformer.h[0].attn.source.attention_interface_0.source
            nested.nn_functional_softmax_0  # noqa: B018
    message = str(info.value)
    assert 'attn_implementation="eager"' in message and "fused" in message


def test_source_outside_a_trace_needs_one(gpt2):
    net = NNsight(tiny_gpt2(attn_implementation="eager"))
    with pytest.raises(TraceError, match="inside a trace"):
        net.transformer.h[0].attn.source.attention_interface_0.output  # noqa: B018
    with pytest.raises(TraceError, match="inside a trace"):
        net.transformer.h[0].attn.source.attention_interface_0.source  # noqa: B018


def test_operation_not_reached(gpt2, ids):
    net = NNsight(gpt2)
    with pytest.raises(TraceError, match="self_q_attn_0"):
        with net.trace(ids, use_cache=False):
            net.transformer.h[0].attn.source.self_q_attn_0.output.save()


def test_nothing_left_on_the_model(ids):
    torch.manual_seed(0)
    module = Net()
    net = NNsight(module)
    before = dict(vars(module))
    for backend in BACKENDS:
        with net.trace(torch.ones(1, 3), backend=backend):
            net.source.torch_relu_0.output.save()
    assert "forward" not in vars(module) and vars(module).keys() == before.keys()


def test_compiled(ids):
    torch.manual_seed(0)
    net = NNsight(Net())
    x = torch.randn(2, 3)
    with net.trace(x, compile=True, backend="fx"):
        net.source.torch_relu_0.output = torch.ones(2, 3)
        out = net.output.save()
    assert torch.allclose(out, net._module.out(torch.ones(2, 3) * 2))


class _Tanh(torch.nn.Linear):
    def forward(self, x):
        y = super().forward(x)  # (zero-argument super() keeps working when instrumented)
        return torch.tanh(y)


class _InPlace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        torch.nn.functional.relu(h, inplace=True)  # changes its argument in place
        return h * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_super_and_gradients(backend):
    torch.manual_seed(0)
    net = NNsight(torch.nn.Sequential(_Tanh(3, 3), torch.nn.Linear(3, 1)))
    assert net[0].source.operations == ["forward_0", "torch_tanh_0"]
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        tanh = net[0].source.torch_tanh_0.output.save()
        loss = net.output.sum()
        grad = net[0].source.torch_tanh_0.output.grad.save()
        loss.backward()
    first, second = net._module
    assert torch.allclose(tanh, first(x))
    assert torch.allclose(grad, second.weight.expand(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_operation_changing_its_argument_in_place(backend):
    torch.manual_seed(0)
    net = NNsight(_InPlace())
    x = torch.randn(4, 3)
    expected = net._module(x)
    with net.trace(x, backend=backend):
        relu = net.source.torch_nn_functional_relu_0.output.save()
        out = net.output.save()
    assert torch.equal(out, expected) and torch.equal(relu * 2, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_router_logits(backend):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(4, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model(ids, use_cache=False, output_router_logits=True).router_logits[0]
    net = NNsight(model)
    with net.trace(ids, use_cache=False, backend=backend):
        router = net.model.layers[0].mlp.gate.source
        logits = router.F_linear_0.output.save()
        probabilities = router.torch_nn_functional_softmax_0.output.save()
    assert torch.allclose(logits, expected)
    assert torch.allclose(probabilities, expected.float().softmax(-1))


def test_caches_keep_no_model_alive():
    import gc
    import weakref

    def run():
        module = Net()
        net = NNsight(module)
        for backend in BACKENDS:
            with net.trace(torch.ones(1, 3), backend=backend):
                net.source.torch_relu_0.output.save()
                net.source.self_out_0.output[0] = 3.0
        return weakref.ref(module), weakref.ref(net)

    module, net = run()
    gc.collect()
    assert module() is None and net() is None


class _ViewEdited(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        v = h.view(-1)
        v.mul_(2)  # changes h through the view an operation returned
        return h + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_view_returned_by_an_operation_keeps_aliasing(backend):
    torch.manual_seed(0)
    net = NNsight(_ViewEdited())
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = net._module(x)
        with net.trace(x, backend=backend):
            net.source.h_view_0.output.save()
            out = net.output.save()
    assert torch.equal(out, expected)


def test_generate_refuses_operations_clearly(gpt2):
    from models import train_tokenizer

    lm = fxsight.LanguageModel(gpt2, tokenizer=train_tokenizer())
    with pytest.raises(TraceError, match="generate"):
        with lm.generate("ab", max_new_tokens=2):
            lm.transformer.h[0].attn.source.attention_interface_0.output.save()


def test_plot_attention_shows_the_patterns_read_through_source(gpt2, ids, tmp_path):
    from fxsight.patching import plot_attention
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False):
        pattern = net.transformer.h[0].attn.source.attention_interface_0.output[1].save()
    path = tmp_path / "attention.png"
    figure = plot_attention(pattern, tokens=[f"t{i}" for i in range(ids.shape[1])],
                            heads=[1, 0], row=0, path=str(path))
    assert path.stat().st_size > 0
    images = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    assert len(images) == 2  # the chosen heads, in the order asked
    assert torch.equal(torch.as_tensor(images[0].data), pattern[0, 1].float())
    assert torch.equal(torch.as_tensor(images[1].data), pattern[0, 0].float())
    with pytest.raises(IndexError, match="head 9 out of range"):
        plot_attention(pattern, heads=[9])
    with pytest.raises(ValueError, match="tokens for"):
        plot_attention(pattern, tokens=["a"])
