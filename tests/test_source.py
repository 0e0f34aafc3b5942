"""``envoy.source``: every call inside a module's forward is a site (nnsight's ``.source``).

References are independent of fxsight: transformers' own ``output_attentions=True``, plain
PyTorch forward hooks, and hand-written computations.
"""

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.errors import ShapeError, TraceError
from fxsight.generate.steps import CACHE

from models import ReluNet, tiny_gpt2, tiny_llama

BACKENDS = ("fx", "hooks")


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
    net = NNsight(ReluNet())
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


def _gpt2_counting_forwards():
    """A tiny eager GPT-2 whose final LayerNorm appends to the list returned with it, per
    call, whether the call was a real forward pass (captures and scans run on fake
    tensors)."""
    model = tiny_gpt2(attn_implementation="eager")
    calls = []

    class CountingLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            calls.append(type(x) is torch.Tensor)
            return super().forward(x)

    model.transformer.ln_f.__class__ = CountingLayerNorm
    return model, calls


def test_wrong_shape_write_fails_before_running(ids):
    model, calls = _gpt2_counting_forwards()
    net = NNsight(model)
    for backend in BACKENDS:
        with pytest.raises(ShapeError) as info:
            with net.trace(ids, use_cache=False, backend=backend):
                net.transformer.h[0].attn.source.split_1.output = torch.zeros(3)
        assert "test_source.py" in str(info.value)
    assert not any(calls)  # no real forward pass ran
    model(ids)
    assert calls[-1]  # (the count sees a real one)


def test_wrong_shape_write_in_generation_fails_before_running():
    model, calls = _gpt2_counting_forwards()
    net = fxsight.LanguageModel(model)
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    for backend in BACKENDS:
        with pytest.raises(ShapeError) as info:
            with net.generate(ids, max_new_tokens=2, backend=backend) as tracer:
                for step in tracer.all():
                    net.transformer.h[0].attn.source.split_1.output = torch.zeros(3)
        assert "test_source.py" in str(info.value) and "split_1" in str(info.value)
    assert not any(calls)  # no real forward pass ran


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_source_in_an_edit_without_inputs(ids, backend):
    """``op.source`` in ``model.edit()`` without inputs is the function the last trace
    that looked found, as outside a trace (was: "shapes are unknown before the trace has
    an input"); where no trace looked, an error saying to give the edit its inputs."""
    model = tiny_gpt2(attn_implementation="eager")
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"no inputs: give it the model's inputs"):
        with net.edit():
            net.transformer.h[0].attn.source.attention_interface_0.source  # noqa: B018
    assert net._edits == []
    with net.trace(ids, use_cache=False):
        net.transformer.h[0].attn.source.attention_interface_0.source  # noqa: B018
    with net.edit() as edited:
        inner = net.transformer.h[0].attn.source.attention_interface_0.source
        inner.nn_functional_softmax_0.output[:, 1] = 0
    with torch.no_grad(), edited.trace(ids, use_cache=False, backend=backend):
        logits = edited.output.logits.save()

    def zero_head(module, args, kwargs, output):  # by hand: head 1's probabilities zeroed
        hidden = args[0]
        batch, length, _ = hidden.shape
        heads, size = module.num_heads, module.head_dim
        q, k, v = module.c_attn(hidden).split(module.split_size, dim=2)
        q, k, v = (t.view(batch, length, heads, size).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / size ** 0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        probabilities = scores.masked_fill(~causal, torch.finfo(scores.dtype).min).softmax(-1)
        probabilities[:, 1] = 0
        mixed = (probabilities @ v).transpose(1, 2).reshape(batch, length, heads * size)
        return module.c_proj(mixed), output[1]

    handle = model.transformer.h[0].attn.register_forward_hook(zero_head, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
    finally:
        handle.remove()
    assert torch.allclose(logits, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(ids, use_cache=False).logits, expected, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_dispatched_by_accelerate(ids, backend):
    """A module accelerate dispatched (``add_hook_to_module``: a ``forward`` of the
    instance's own around ``_old_forward``) has its forward's operations, as in nnsight
    (was: "the module has a forward of its own"); its attributes are as they were."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_gpt2(attn_implementation="eager")
    plain = copy.deepcopy(model)
    for layer in model.transformer.h:
        add_hook_to_module(layer.attn, AlignDevicesHook(execution_device="cpu",
                                                        io_same_device=True))
    slots = ("forward", "_old_forward", "_hf_hook")
    before = {name: {key: vars(module)[key] for key in slots if key in vars(module)}
              for name, module in model.named_modules()}
    expected = plain(ids, use_cache=False, output_attentions=True).attentions
    results = {}
    for name, which in (("dispatched", model), ("plain", plain)):
        net = NNsight(which)
        with torch.no_grad(), net.trace(ids, use_cache=False, backend=backend):
            first = net.transformer.h[0].attn.source.attention_interface_0
            pattern = first.source.nn_functional_softmax_0.output.save()
            second = net.transformer.h[1].attn.source.attention_interface_0
            second.source.nn_functional_softmax_0.output[:, 2] = 0
            zeroed = second.output[1].save()
            logits = net.output.logits.save()
        results[name] = logits
    assert torch.allclose(pattern, expected[0], atol=1e-6)
    assert torch.equal(zeroed[:, 2], torch.zeros_like(zeroed[:, 2]))
    assert torch.allclose(zeroed[:, 3], expected[1][:, 3], atol=1e-6)
    assert torch.allclose(results["dispatched"], results["plain"], atol=1e-6)
    after = {name: {key: vars(module)[key] for key in slots if key in vars(module)}
             for name, module in model.named_modules()}
    assert before.keys() == after.keys()
    for name, attributes in before.items():  # (accelerate's forward and _old_forward)
        assert attributes.keys() == after[name].keys()
        assert all(after[name][key] is value for key, value in attributes.items())
    assert any(attributes for attributes in before.values())


class _Sae(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 6)
        self.dec = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


class _WithSae(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.sae = _Sae()

    def forward(self, x):
        return self.sae(self.fc(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_operation_inside_a_call_with_hook_true(backend):
    """After ``net.sae(h, hook=True)``, ``net.sae.source.<op>`` is refused, naming that
    call, as the module's envoys are where the forward also runs it (was: it read the
    forward's call, silently); before it, it is the forward's call."""
    torch.manual_seed(0)
    module = _WithSae()
    net = NNsight(module)
    x = torch.randn(2, 3)
    with torch.no_grad(), net.trace(x, backend=backend):
        before = net.sae.source.torch_relu_0.output.save()
        net.sae(net.fc.output * 2, hook=True)
    with torch.no_grad():
        assert torch.equal(before, torch.relu(module.sae.enc(module.fc(x))))
    with pytest.raises(TraceError, match=r"model.sae was called with hook=True"):
        with torch.no_grad(), net.trace(x, backend=backend):
            net.sae(net.fc.output * 2, hook=True)
            net.sae.source.torch_relu_0.output.save()


def test_operation_not_reached(gpt2, ids):
    net = NNsight(gpt2)
    with pytest.raises(TraceError, match="self_q_attn_0"):
        with net.trace(ids, use_cache=False):
            net.transformer.h[0].attn.source.self_q_attn_0.output.save()


def test_nothing_left_on_the_model(ids):
    torch.manual_seed(0)
    module = ReluNet()
    net = NNsight(module)
    before = dict(vars(module))
    for backend in BACKENDS:
        with net.trace(torch.ones(1, 3), backend=backend):
            net.source.torch_relu_0.output.save()
    assert "forward" not in vars(module) and vars(module).keys() == before.keys()


def test_compiled(ids):
    torch.manual_seed(0)
    net = NNsight(ReluNet())
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
def test_a_replaced_argument_of_an_operation_changing_it_in_place(backend):
    """``F.relu(h, inplace=True)`` given a written value changes that value, not ``h``,
    as calling it on the value by hand does (was: the change was copied into ``h``, on fx
    and hooks); an in-place edit of the argument still edits ``h`` itself."""
    torch.manual_seed(0)
    module = _InPlace()
    net = NNsight(module)
    x = torch.randn(4, 3)
    value = torch.full((4, 3), -1.0)
    value[:, 0] = 3.0
    with torch.no_grad():
        h = module.fc(x)
        edited = h.clone()
        edited[:, 1] = 2.0
        with net.trace(x, backend=backend):  # the argument replaced: h is as it was
            net.source.torch_nn_functional_relu_0.input = value
            relu = net.source.torch_nn_functional_relu_0.output.save()
            replaced = net.output.save()
        with net.trace(backend=backend) as tracer:  # invoke 1's rows replaced
            with tracer.invoke(x[:2]):
                pass
            with tracer.invoke(x[2:]):
                net.source.torch_nn_functional_relu_0.input = value[2:]
            with tracer.invoke():
                rows = net.output.save()
        with net.trace(x, backend=backend):  # edited in place: h itself changes
            net.source.torch_nn_functional_relu_0.input[:, 1] = 2.0
            in_place = net.output.save()
    assert torch.equal(relu, torch.relu(value))
    assert torch.equal(value[0], torch.tensor([3.0, -1.0, -1.0]))  # (the caller's: as it was)
    assert torch.equal(replaced, h * 2)
    assert torch.equal(rows, h * 2)
    assert torch.equal(in_place, torch.relu(edited) * 2)


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
        module = ReluNet()
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


class _Text(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        note = """
a line at column 0 (a method whose source cannot be dedented as a whole)
"""
        assert note
        return torch.relu(self.fc(x)) * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forward_with_a_string_at_column_0(backend):
    """A forward holding a multi-line string with lines left of its ``def`` has its
    operations (was: ``.source`` raised IndentationError)."""
    torch.manual_seed(0)
    module = _Text()
    net = NNsight(module)
    assert net.source.operations == ["self_fc_0", "torch_relu_0"]
    assert "column 0" in str(net.source) and "def forward(self, x):" in str(net.source)
    x = torch.randn(2, 3)
    with torch.no_grad():
        with net.trace(x, backend=backend):
            relu = net.source.torch_relu_0.output.save()
            net.source.torch_relu_0.output[:, 0] = 1.0
            out = net.output.save()
        expected = torch.relu(module.fc(x))
        expected[:, 0] = 1.0  # (the saved tensor is the one edited in place)
        assert torch.equal(relu, expected)
        assert torch.equal(out, expected * 2)


class _Loop(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        for _ in range(3):  # one operation, three calls
            x = torch.tanh(self.fc(x))
        return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_operation_called_several_times_in_tracer_iter(backend):
    """``for i in tracer.iter[...]`` reads and writes an operation's i-th call, as a
    module's (was: every pass read and wrote the first call)."""
    torch.manual_seed(0)
    module = _Loop()
    net = NNsight(module)
    x = torch.randn(4, 3)
    with torch.no_grad():
        calls, h = [], x
        for _ in range(3):
            h = torch.tanh(module.fc(h))
            calls.append(h)
        # by hand: the second call's output zeroed in column 0
        h = torch.tanh(module.fc(torch.tanh(module.fc(x))))
        h[:, 0] = 0
        expected = torch.tanh(module.fc(h))
        with net.trace(x, backend=backend) as tracer:
            outs = fxsight.save(list())
            for i in tracer.iter[:]:
                outs.append(net.source.torch_tanh_0.output)
        with net.trace(x, backend=backend) as tracer:
            with tracer.iter[1]:
                net.source.torch_tanh_0.output[:, 0] = 0
            out = net.output.save()
    assert len(outs) == 3
    for got, want in zip(outs, calls):
        assert torch.equal(got, want)
    assert torch.equal(out, expected)


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


# --- operations inside generation steps -----------------------------------------------------
def _greedy_attentions(model, ids, steps, use_cache, layers=(0,)):
    """Hand-written greedy decoding with transformers' ``output_attentions=True``: the
    attention probabilities of ``layers`` at each step, and the token ids."""
    sequence, past, attentions = ids, None, []
    with torch.no_grad():
        for _ in range(steps):
            if use_cache:
                given = sequence if past is None else sequence[:, -1:]
                out = model(given, **{CACHE: past}, use_cache=True, output_attentions=True)
                past = getattr(out, CACHE)
            else:
                out = model(sequence, use_cache=False, output_attentions=True)
            attentions.append([out.attentions[layer] for layer in layers])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
    return attentions, sequence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_reads_operations_at_every_step(gpt2, backend, use_cache):
    """Layer 0's and layer 1's attention probabilities at each decoding step equal a
    hand-written greedy loop's ``output_attentions``, with and without the KV cache."""
    net = fxsight.LanguageModel(gpt2)
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    expected, sequence = _greedy_attentions(gpt2, ids, 3, use_cache, layers=(0, 1))
    with net.generate(ids, max_new_tokens=3, do_sample=False, use_cache=use_cache,
                      backend=backend) as tracer:
        first = net.transformer.h[0].attn.source.attention_interface_0.output[1].save()
        per_step = fxsight.save(list())
        for step in tracer.all():  # (step a real int: one line per step)
            per_step.append([
                net.transformer.h[layer].attn.source.attention_interface_0.output[1]
                for layer in (0, 1)])
        with tracer.iter[1:3]:  # (recorded once: one value per chosen step)
            softmax = (net.transformer.h[1].attn.source.attention_interface_0.source
                       .nn_functional_softmax_0.output.save())
        tokens = tracer.result.save()
    assert tracer.backend == backend
    assert torch.equal(tokens, sequence)
    assert len(per_step) == 3 and len(softmax) == 2
    assert torch.allclose(first, expected[0][0], atol=1e-6)
    for got, want in zip(per_step, expected):
        for layer in (0, 1):
            assert got[layer].shape == want[layer].shape
            assert torch.allclose(got[layer], want[layer], atol=1e-6)
    for got, want in zip(softmax, expected[1:]):
        assert torch.allclose(got, want[1], atol=1e-6)
    if use_cache:  # one query row per decoding step after the first
        assert per_step[1][0].shape[-2:] == (1, 6) and per_step[2][0].shape[-2:] == (1, 7)


def _head_zeroed_at_step(model, layer_proj, head, head_dim, step):
    """A forward pre-hook zeroing one head's slice of the output projection's input (what
    zeroing its probabilities computes), at decoding step ``step`` only: calls of the
    model are counted by a forward pre-hook on the root."""
    calls = {"n": -1}

    def count(module, args, kwargs):
        calls["n"] += 1

    def zero(module, args):
        if calls["n"] != step:
            return None
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] = 0
        return (x, *args[1:])

    return {"": count}, {layer_proj: zero}


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_writes_an_operation_at_one_step(gpt2, backend):
    """Zeroing head 1's attention probabilities in layer 0 at decoding step 1 only gives
    the tokens and logits of a generation whose forward does that by hand."""
    heads = gpt2.config.n_head
    head_dim = gpt2.config.n_embd // heads
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    counter, zero = _head_zeroed_at_step(gpt2, "transformer.h.0.attn.c_proj", 1, head_dim, 1)
    handles = [gpt2.register_forward_pre_hook(counter[""], with_kwargs=True),
               gpt2.transformer.h[0].attn.c_proj.register_forward_pre_hook(
                   zero["transformer.h.0.attn.c_proj"])]
    try:
        expected = gpt2.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    plain = gpt2.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    net = fxsight.LanguageModel(gpt2)
    with net.generate(ids, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        for step in tracer.all():
            if step == 1:
                inner = net.transformer.h[0].attn.source.attention_interface_0.source
                inner.nn_functional_softmax_0.output[:, 1] = 0
        with tracer.all():
            logits = net.lm_head.output[:, -1].save()
        tokens = tracer.result.save()
    assert tracer.backend == backend
    assert torch.equal(tokens, expected.sequences)
    for got, want, before in zip(logits, expected.logits, plain.logits):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(logits[0], plain.logits[0], atol=1e-6)  # (step 0 untouched)
    assert not torch.allclose(logits[1], plain.logits[1], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_reads_sizes_an_operation_is_given(gpt2, backend):
    """Without a KV cache every step is longer: an operation given sizes
    (``query_states.view(shape)``) sees each step's own, also where the decoding steps
    share one dynamic-shape capture on the fx backend."""
    net = fxsight.LanguageModel(gpt2)
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    with net.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False,
                      backend=backend) as tracer:
        with tracer.all():
            shapes = net.transformer.h[0].attn.source.query_states_view_0.inputs.save()
            query = net.transformer.h[0].attn.source.query_states_view_0.output.save()
    assert tracer.backend == backend
    head_dim = gpt2.config.n_embd // gpt2.config.n_head
    assert [tuple(args[0]) for args, _ in shapes] == [(1, n, -1, head_dim) for n in (5, 6)]
    assert [tuple(q.shape) for q in query] == [(1, n, gpt2.config.n_head, head_dim)
                                             for n in (5, 6)]


# --- tracer.cache() with operations -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_operations_like_modules(gpt2, ids, backend):
    """Operations listed in ``tracer.cache(modules=...)`` (envoys or path strings) are
    cached like modules: the entry's output is the operation's output saved directly,
    its inputs its arguments; ``tracer.cache()`` alone caches modules only."""
    net = NNsight(gpt2)
    softmax_path = ("model.transformer.h.1.attn.source.attention_interface_0.source"
                    ".nn_functional_softmax_0")
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        operation = net.transformer.h[0].attn.source.attention_interface_0
        cache = tracer.cache(modules=[operation, softmax_path, net.transformer.h[1]],
                             include_inputs=True)
        everything = tracer.cache()
        direct = operation.output.save()
        arguments = operation.inputs.save()
        softmax = (net.transformer.h[1].attn.source.attention_interface_0.source
                   .nn_functional_softmax_0.output.save())
    assert tracer.backend == backend
    assert set(cache) == {"model.transformer.h.0.attn.source.attention_interface_0",
                          softmax_path, "model.transformer.h.1"}
    entry = cache.model.transformer.h[0].attn.source.attention_interface_0
    assert torch.equal(entry.output[0], direct[0]) and torch.equal(entry.output[1], direct[1])
    args, kwargs = entry.inputs
    assert args[0] is gpt2.transformer.h[0].attn and entry.input is args[0]
    assert all(torch.equal(a, b) for a, b in zip(args[1:4], arguments[0][1:4]))
    assert kwargs["scaling"] == arguments[1]["scaling"]
    assert torch.equal(cache[softmax_path].output, softmax)
    reference = gpt2(ids, use_cache=False, output_attentions=True).attentions
    assert torch.allclose(cache[softmax_path].output, reference[1], atol=1e-6)
    assert not any(".source." in key for key in everything)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_operations_across_generation_steps(gpt2, backend):
    """In generate, an operation's cache entry is a list, one entry per step, equal to
    saving its output at every step."""
    net = fxsight.LanguageModel(gpt2)
    ids = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with net.generate(ids, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        operation = net.transformer.h[0].attn.source.attention_interface_0
        cache = tracer.cache(modules=[operation])
        with tracer.all():
            direct = operation.output[1].save()
    entries = cache["model.transformer.h.0.attn.source.attention_interface_0"]
    assert len(entries) == len(direct) == 3
    assert all(torch.equal(e.output[1], d) for e, d in zip(entries, direct))
    expected, _ = _greedy_attentions(gpt2, ids, 3, True)
    assert all(torch.allclose(e.output[1], x[0], atol=1e-6) for e, x in zip(entries, expected))


def test_cache_unknown_operation_lists_the_nearest(gpt2, ids):
    net = NNsight(gpt2)
    with pytest.raises(AttributeError, match="attention_interface_0"):
        with net.trace(ids, use_cache=False) as tracer:
            tracer.cache(modules=["model.transformer.h.0.attn.source.attention_interface"])


# --- a pattern patched from another invoke -----------------------------------------------------
def _patched_head_reference(model, clean, corrupted, head):
    """Hand-written: layer 0's head ``head`` attends with the clean input's probabilities
    while the rest of the corrupted forward is unchanged: its slice of the output
    projection's input is the clean pattern times the corrupted values (forward hooks on
    ``c_attn`` and ``c_proj``)."""
    heads = model.config.n_head
    head_dim = model.config.n_embd // heads
    pattern = model(clean, use_cache=False, output_attentions=True).attentions[0][:, head]
    seen = {}

    def keep_values(module, args, output):
        value = output.split(model.config.n_embd, dim=2)[2]
        seen["v"] = value.view(*value.shape[:2], heads, head_dim).transpose(1, 2)[:, head]

    def patch(module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] = pattern @ seen["v"]
        return (x, *args[1:])

    attention = model.transformer.h[0].attn
    handles = [attention.c_attn.register_forward_hook(keep_values),
               attention.c_proj.register_forward_pre_hook(patch)]
    try:
        return model(corrupted, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def _patch_head_from_clean(net, clean, corrupted, head, **options):
    with net.trace(use_cache=False, **options) as tracer:
        with tracer.invoke(clean):
            inner = net.transformer.h[0].attn.source.attention_interface_0.source
            pattern = inner.nn_functional_softmax_0.output[:, head]
        with tracer.invoke(corrupted):
            inner = net.transformer.h[0].attn.source.attention_interface_0.source
            inner.nn_functional_softmax_0.output[:, head] = pattern
            logits = net.output.logits.save()
    return tracer, logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_one_heads_pattern_from_another_invoke(gpt2, backend):
    clean, corrupted = torch.randint(4, 128, (2, 1, 6),
                                     generator=torch.Generator().manual_seed(5))
    expected = _patched_head_reference(gpt2, clean, corrupted, head=2)
    plain = gpt2(corrupted, use_cache=False).logits
    tracer, logits = _patch_head_from_clean(NNsight(gpt2), clean, corrupted, 2,
                                            backend=backend)
    assert tracer.backend == backend
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)


def test_patching_one_heads_pattern_compiled():
    """The same patch in a compiled trace (a one-layer model: compiling on CPU is slow).

    Under ``no_grad``, as patching experiments run: with gradients on, writing the softmax's
    output in place would change a tensor its backward needs, and torch.compile refuses the
    graph (fxsight then runs it eagerly, with a warning)."""
    import warnings

    model = tiny_gpt2(n_layer=1, n_embd=32, attn_implementation="eager")
    clean, corrupted = torch.randint(4, 128, (2, 1, 6),
                                     generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = _patched_head_reference(model, clean, corrupted, head=1)
        compilations = fxsight.stats()["compilations"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (no eager fallback)
            tracer, logits = _patch_head_from_clean(NNsight(model), clean, corrupted, 1,
                                                    backend="fx", compile=True)
    assert tracer.backend == "fx"
    assert fxsight.stats()["compilations"] == compilations + 1
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, model(corrupted, use_cache=False).logits, atol=1e-3)


# --- writing q/k/v and router logits -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_query_key_value_writes(gpt2, ids, backend, reference_hooks):
    """Zeroing head 2's values and halving the keys inside layer 1's attention equals a forward hook doing the same to ``c_attn``'s output."""
    width = gpt2.config.n_embd
    head_dim = width // gpt2.config.n_head

    def edit(module, args, output):
        output = output.clone()
        output[..., width:2 * width] *= 0.5  # the keys
        output[..., 2 * width + 2 * head_dim:2 * width + 3 * head_dim] = 0  # head 2's values
        return output

    with reference_hooks(gpt2, hooks={"transformer.h.1.attn.c_attn": edit}):
        expected = gpt2(ids, use_cache=False).logits
    plain = gpt2(ids, use_cache=False).logits
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        source = net.transformer.h[1].attn.source
        # value_states (batch, heads, seq, head_dim): a view of one of split's outputs, which
        # torch lets no one change in place (a plain forward neither): a new value
        keep = torch.ones(gpt2.config.n_head, 1, 1)
        keep[2] = 0
        source.transpose_3.output = source.transpose_3.output * keep
        source.transpose_2.output = source.transpose_2.output * 0.5  # key_states
        logits = net.output[0].save()
    assert tracer.backend == backend
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_router_logits_write(backend):
    """Zeroing expert 0's router logit equals a copy of the model whose router weight row
    for expert 0 is zero (``F.linear(h, W)[:, 0] == h @ W[0]``)."""
    import copy

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(4, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[0].mlp.gate.weight[0] = 0
        expected = edited(ids, use_cache=False, output_router_logits=True)
    plain = model(ids, use_cache=False).logits
    net = NNsight(model)
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        router = net.model.layers[0].mlp.gate.source
        router.F_linear_0.output[:, 0] = 0
        probabilities = router.torch_nn_functional_softmax_0.output.save()
        logits = net.output.logits.save()
    assert tracer.backend == backend
    assert torch.allclose(probabilities, expected.router_logits[0].float().softmax(-1))
    assert torch.allclose(logits, expected.logits, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)


class _Sized(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        size = x.size()
        return self.fc(x).reshape(size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_size_an_operation_returns_stays_a_size(backend):
    """``x.size()`` read through ``.source`` is a ``torch.Size`` on both backends, and its
    methods work in the trace (fx: was a plain tuple, and ``.numel()`` failed)."""
    net = NNsight(_Sized())
    for length in (3, 5):  # (the second trace: another shape)
        x = torch.randn(2, length, 4)
        with net.trace(x, backend=backend):
            size = net.source.x_size_0.output
            saved = size.save()
            count = size.numel().save()
            tail = size[1:].save()
        assert type(saved) is torch.Size and saved == x.size()
        assert count == x.numel()
        assert type(tail) is torch.Size and tail == x.size()[1:]


# --- names: one-line forwards, signatures -----------------------------------------------------
class _OneLine(torch.nn.Module):
    def forward(self, x): return torch.relu(x) * 2  # noqa: E704


class _CallInDefault(torch.nn.Module):
    def forward(self, x,
                scale=float("2.0")):
        return torch.relu(x) * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forward_on_the_def_line_has_its_operations(backend):
    """A forward whose body is on its ``def`` line names its calls (was: none, since every
    call on the ``def`` line was taken for one in the signature)."""
    net = NNsight(_OneLine())
    assert net.source.operations == ["torch_relu_0"]
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        before = net.source.torch_relu_0.output.save()
        net.source.torch_relu_0.output = torch.ones(2, 3)
        out = net.output.save()
    assert torch.equal(before, torch.relu(x))
    assert torch.equal(out, torch.full((2, 3), 2.0))


def test_a_call_in_the_signature_is_not_an_operation():
    """A default computed by a call (``scale=float("2.0")``) runs once, when the function
    is defined, not in the forward pass: it is not an operation (was: ``float_0``, listed
    on the signature's line, with a value from binding the instrumented forward)."""
    net = NNsight(_CallInDefault())
    assert net.source.operations == ["torch_relu_0"]
    listing = str(net.source)
    assert not any("->" in line and "scale=" in line for line in listing.splitlines())
    x = torch.randn(2, 3)
    for backend in BACKENDS:
        with net.trace(x, backend=backend):
            out = net.output.save()
        assert torch.equal(out, torch.relu(x) * 2.0)


# --- errors -----------------------------------------------------------------------------------
def test_source_of_an_operation_calling_a_module_or_a_builtin_says_so():
    """``.source`` of an operation that calls a module points to the module's envoy, of
    one that calls a builtin says it has no Python source (was: both "not called in this
    forward pass (its line is not reached)")."""
    net = NNsight(ReluNet())
    x = torch.randn(2, 3)
    with pytest.raises(TraceError, match=r"self_fc_0 calls a module \(Linear\).*model\.fc\.source"):
        with net.trace(x):
            net.source.self_fc_0.source
    with pytest.raises(TraceError, match=r"torch_relu_0 calls relu\(\), which is not a Python "
                                         r"function"):
        with net.trace(x):
            net.source.torch_relu_0.source
    # outside a trace, from the last trace that looked
    with pytest.raises(TraceError, match=r"torch_relu_0 calls relu\(\)"):
        net.source.torch_relu_0.source


def test_nnsight_call_methods_of_an_operation_name_the_tracer_spelling():
    net = NNsight(_Loop())
    with pytest.raises(AttributeError, match=r"tracer\.iter\[1\]"):
        with net.trace(torch.randn(2, 3)):
            net.source.torch_tanh_0.next()


class _WithClosure(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        scale = 3.0

        def inner(t):  # (a closure of the forward: of its instrumented copy when traced)
            return torch.tanh(t) * scale
        return inner(self.fc(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_of_a_function_defined_inside_the_forward(backend):
    """``.source`` of an operation calling a closure the forward defines reads and writes
    its calls (was: a SyntaxError, the closure's dispatcher taken for a variable of its
    own)."""
    torch.manual_seed(0)
    module = _WithClosure()
    net = NNsight(module)
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        inner = net.source.inner_0.source
        tanh = inner.torch_tanh_0.output.save()
        inner.torch_tanh_0.output = tanh * 0 + 1
        out = net.output.save()
    assert inner.operations == ["torch_tanh_0"]
    assert torch.equal(tanh, torch.tanh(module.fc(x)))
    assert torch.equal(out, torch.full((2, 3), 3.0))


class _WithClosureAfterACall(torch.nn.Module):
    def forward(self, x):
        x = torch.tanh(x)

        def inner(t):  # (its torch_tanh_0 is the forward's torch_tanh_1)
            return torch.tanh(t) + 1
        return inner(x) * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closures_operation_read_by_both_names(backend):
    """A call in a function the forward defines is an operation of both, read by either
    name in one trace (was: reading the forward's name beside the closure's raised "has no
    output call #0", the closure's instrumented copy no longer calling the forward's
    dispatcher)."""
    torch.manual_seed(0)
    module = _WithClosure()
    net = NNsight(module)
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        outer = net.source.torch_tanh_0.output.save()
        inner = net.source.inner_0.source.torch_tanh_0.output.save()
        out = net.output.save()
    expected = torch.tanh(module.fc(x))
    assert torch.equal(outer, expected) and torch.equal(inner, expected)
    assert torch.equal(out, expected * 3.0)
    with net.trace(x, backend=backend):
        outer = net.source.torch_tanh_0.output.save()
        net.source.inner_0.source.torch_tanh_0.output = outer * 0 + 1
        out = net.output.save()
    assert torch.equal(out, torch.full((2, 3), 3.0))
    # names that differ: the closure's torch_tanh_0 is the forward's torch_tanh_1
    net = NNsight(_WithClosureAfterACall())
    with net.trace(x, backend=backend):
        first = net.source.torch_tanh_0.output.save()
        second = net.source.torch_tanh_1.output.save()
        inner = net.source.inner_0.source.torch_tanh_0.output.save()
        net.source.torch_tanh_1.output = second * 0
        out = net.output.save()
    assert torch.equal(first, torch.tanh(x))
    assert torch.equal(second, torch.tanh(torch.tanh(x)))
    # (the closure's name is the outer of the two: its output is the call's after the
    # forward's name's write)
    assert torch.equal(inner, torch.zeros_like(second))
    assert torch.equal(out, torch.full((2, 3), 2.0))


def _tanh_of(t):
    return torch.tanh(t)


class _ClosureCallingAFunction(torch.nn.Module):
    def forward(self, x):
        def inner(t):  # (its _tanh_of_0 is the forward's _tanh_of_0: one call, two names)
            return _tanh_of(t) * 2
        return inner(x) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_operations_of_a_call_read_through_both_of_its_names(backend):
    """``.source`` of one call reached by both its names (the forward's ``_tanh_of_0`` and
    the closure's ``inner_0.source._tanh_of_0``) in one trace: its operations are sites
    under both (was: a raw SourceError while running, a CaptureError on fx, naming no
    line). As one level up, the closure's name is the outer of the two."""
    net = NNsight(_ClosureCallingAFunction())
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with net.trace(x, backend=backend):
        outer = net.source._tanh_of_0.source.torch_tanh_0.output.save()
        inner = net.source.inner_0.source._tanh_of_0.source.torch_tanh_0.output.save()
        out = net.output.save()
    assert torch.equal(outer, torch.tanh(x)) and torch.equal(inner, torch.tanh(x))
    assert torch.equal(out, torch.tanh(x) * 2 + 1)
    with net.trace(x, backend=backend):
        outer = net.source._tanh_of_0.source.torch_tanh_0.output
        net.source._tanh_of_0.source.torch_tanh_0.output = outer * 0 + 3
        inner = net.source.inner_0.source._tanh_of_0.source.torch_tanh_0.output.save()
        net.source.inner_0.source._tanh_of_0.source.torch_tanh_0.output = inner + 1
        out = net.output.save()
    assert torch.equal(inner, torch.full((2, 3), 3.0))
    assert torch.equal(out, torch.full((2, 3), 9.0))
    # three names of one call: a closure inside a closure
    net = NNsight(_ClosureInAClosureCallingAFunction())
    with net.trace(x, backend=backend):
        names = [net.source._tanh_of_0, net.source.mid_0.source._tanh_of_0,
                 net.source.mid_0.source.inner_0.source._tanh_of_0]
        saved = [name.source.torch_tanh_0.output.save() for name in names]
        out = net.output.save()
    assert all(torch.equal(value, torch.tanh(x)) for value in saved)
    assert torch.equal(out, torch.tanh(x) * 2 + 1)


class _ClosureInAClosureCallingAFunction(torch.nn.Module):
    def forward(self, x):
        def mid(t):
            def inner(u):
                return _tanh_of(u) * 2
            return inner(t) + 1
        return mid(x)


def test_an_operation_calling_a_closure_keeps_nothing_alive():
    """What ``.source`` shows of a closure the forward defines is its code: the caches keep
    neither its variables (the trace's tensors) nor, through the instrumented forward's
    dispatcher, the model (was: the model was never collected)."""
    import gc
    import weakref

    def run(backend, nested):
        module = _WithClosure()
        net = NNsight(module)
        x = torch.randn(4, 3)
        with net.trace(x, backend=backend):
            operation = net.source.inner_0
            (operation.source.torch_tanh_0 if nested else operation).output.save()
        return weakref.ref(module), weakref.ref(net)

    for backend in BACKENDS:
        for nested in (False, True):
            module, net = run(backend, nested)
            gc.collect()
            assert module() is None and net() is None, (backend, nested)


class _Private(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.__scale = 3.0

    def forward(self, x):
        return torch.relu(x) * self.__scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forward_reading_a_private_attribute(backend):
    """``self.__scale`` in a method of ``_Private`` is ``self._Private__scale``, also in the
    instrumented forward (was: AttributeError ``'_Private' object has no attribute
    '__scale'``, the copy compiled outside the class body)."""
    module = _Private()
    net = NNsight(module)
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        net.source.torch_relu_0.output[:, 0] = 1.0
        out = net.output.save()
    expected = torch.relu(x)
    expected[:, 0] = 1.0
    assert torch.equal(out, expected * 3.0)


_EDITED = '''
import torch


class Edited(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))
'''


def test_a_model_file_edited_after_import_is_refused(tmp_path):
    """The source file of a loaded model edited on disk (in a notebook, before reloading
    the module) is not the code that runs: ``.source`` refuses it (was: the trace ran the
    edited file's forward, silently other numbers than the model's)."""
    import importlib.util
    path = tmp_path / "edited_model_for_source.py"
    path.write_text(_EDITED)
    spec = importlib.util.spec_from_file_location("edited_model_for_source", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    module = loaded.Edited()
    path.write_text(_EDITED.replace("torch.relu(self.fc(x))", "torch.relu(self.fc(x)) * 100"))
    net = NNsight(module)
    x = torch.randn(2, 3)
    for backend in BACKENDS:
        with pytest.raises(TraceError, match="not the code that runs"):
            with net.trace(x, backend=backend):
                net.source.torch_relu_0.output.save()
                out = net.output.save()
            assert torch.equal(out, module(x))  # (what it got before: the edited forward's)


def _relu_of(x):
    return torch.relu(x)


class _TwoFunctions(torch.nn.Module):
    def forward(self, x):
        for f in (_relu_of, _tanh_of):
            x = f(x)
        return x


class _OneFunctionTwice(torch.nn.Module):
    def forward(self, x):
        for f in (_tanh_of, _tanh_of):
            x = f(x)
        return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_of_an_operation_calling_different_functions(backend):
    """An operation whose calls call different functions has no one ``.source``: an error
    naming both (was: it listed the last call's function, ``_tanh_of``'s operations, while
    call 0, the default, ran ``_relu_of``)."""
    net = NNsight(_TwoFunctions())
    x = torch.randn(2, 3)
    with pytest.raises(TraceError, match=r"_relu_of\(\) and _tanh_of\(\)"):
        with net.trace(x, backend=backend):
            net.source.f_0.source
    with pytest.raises(TraceError, match=r"_relu_of\(\) and _tanh_of\(\)"):
        net.source.f_0.source  # (outside a trace: the last trace's)
    # the same function at every call: its operations, read at each call
    net = NNsight(_OneFunctionTwice())
    with net.trace(x, backend=backend) as tracer:
        inner = net.source.f_0.source
        first = inner.torch_tanh_0.output.save()
        with tracer.iter[1]:
            second = inner.torch_tanh_0.output.save()
    assert inner.operations == ["torch_tanh_0"]
    assert torch.equal(first, torch.tanh(x))
    assert torch.equal(second, torch.tanh(torch.tanh(x)))
