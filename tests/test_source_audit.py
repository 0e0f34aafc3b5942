"""An audit of ``.source`` as researchers use it: the operations inside attention modules
(GPT-2, Llama's rotary embedding, BERT), a custom module with control flow and a function
called several times in one forward, generation steps, ``.skip()``, and the errors where
fxsight cannot do what is asked.

References are independent of fxsight: transformers' ``output_attentions=True``, plain
PyTorch forward hooks with a hand-written copy of the computation, and manual loops.
"""

import pytest
import torch

import fxsight
from fxsight import NNsight
from fxsight.errors import TraceError

from models import tiny_gpt2, tiny_llama

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


# --- Llama: the rotary embedding, one function level further in -------------------------------
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_attention_by_hand(module, hidden, cos, sin, rotate_keys=True):
    """LlamaAttention's forward written out (causal, no padding): the output, the queries
    and keys after the rotary embedding, and the probabilities. ``rotate_keys=False``
    leaves out the keys' ``rotate_half(k) * sin`` term."""
    batch, length, _ = hidden.shape
    size = module.head_dim
    q, k, v = (proj(hidden).view(batch, length, -1, size).transpose(1, 2)
               for proj in (module.q_proj, module.k_proj, module.v_proj))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + (_rotate_half(k) * sin if rotate_keys else 0)
    groups = module.num_key_value_groups
    keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ keys.transpose(2, 3) * module.scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probabilities = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    mixed = (probabilities @ values).transpose(1, 2).reshape(batch, length, -1)
    return module.o_proj(mixed), q, k, probabilities


def _llama_by_hand(model, ids, layer=None):
    """Each layer's attention recomputed by hand in a forward hook (the keys' rotation
    left out in ``layer``): the logits, and per layer ``(q, k, probabilities)``."""
    found = {}

    def hook_for(index):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            out, q, k, p = _llama_attention_by_hand(module, hidden, cos, sin,
                                                    rotate_keys=index != layer)
            found[index] = (q, k, p)
            return out, p
        return hook

    handles = [block.self_attn.register_forward_hook(hook_for(i), with_kwargs=True)
               for i, block in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, found


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_rotary_queries_keys_and_their_patch(llama, ids, backend):
    """``apply_rotary_pos_emb_0`` gives the rotated queries and keys, its ``.source`` the
    two ``rotate_half`` calls (one function called twice, two names) and, one level
    further, the ``torch.cat`` inside the second; zeroing that rotation changes the
    attention as a hand-written forward leaving the term out does."""
    logits, by_hand = _llama_by_hand(llama, ids)
    with torch.no_grad():
        plain = llama(ids, use_cache=False, output_attentions=True)
    assert torch.allclose(logits, plain.logits, atol=1e-5)  # (the hand copy is right)
    net = NNsight(llama)
    with torch.no_grad(), net.trace(ids, use_cache=False, backend=backend):
        read = []
        for layer in net.model.layers:
            rotary = layer.self_attn.source.apply_rotary_pos_emb_0
            q, k = rotary.output
            inner = rotary.source
            read.append((q.save(), k.save(), inner.rotate_half_0.input.save(),
                         inner.rotate_half_0.output.save(),
                         inner.rotate_half_1.input.save(),
                         inner.rotate_half_1.source.torch_cat_0.output.save()))
    assert len(read) == 2
    for index, (q, k, unrotated_q, rotated_q, unrotated_k, rotated_k) in enumerate(read):
        want_q, want_k, _ = by_hand[index]
        assert torch.allclose(q, want_q, atol=1e-6) and torch.allclose(k, want_k, atol=1e-6)
        assert torch.equal(rotated_q, _rotate_half(unrotated_q))
        assert torch.equal(rotated_k, _rotate_half(unrotated_k))
        assert unrotated_k.shape[1] == llama.config.num_key_value_heads  # (k's, not q's)
    expected, _ = _llama_by_hand(llama, ids, layer=1)
    assert not torch.allclose(expected, logits, atol=1e-4)
    for deeper in (False, True):
        with torch.no_grad(), net.trace(ids, use_cache=False, backend=backend):
            rotary = net.model.layers[1].self_attn.source.apply_rotary_pos_emb_0.source
            operation = rotary.rotate_half_1
            if deeper:
                operation = operation.source.torch_cat_0
            operation.output[:] = 0
            patched = net.output.logits.save()
        assert torch.allclose(patched, expected, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_rotary_keys_at_every_generation_step(llama, backend):
    """In ``generate`` with the KV cache, layer 0's rotated keys at each step (the prompt,
    then one position) equal a hand-written greedy loop's, read through forward hooks
    recomputing the attention."""
    prompt = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    keys = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        batch, length, _ = hidden.shape
        k = module.k_proj(hidden).view(batch, length, -1, module.head_dim).transpose(1, 2)
        keys.append(k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1))

    handle = llama.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = llama.generate(prompt, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    lm = fxsight.LanguageModel(llama)
    with lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        got = fxsight.save(list())
        for step in tracer.all():
            got.append(lm.model.layers[0].self_attn.source.apply_rotary_pos_emb_0.output[1])
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)
    assert len(got) == len(keys) == 3
    assert [k.shape[-2] for k in got] == [5, 1, 1]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, keys))


# --- BERT: a padded batch -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_probabilities_and_queries_with_padding(backend):
    from transformers import BertConfig, BertModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16,
            attn_implementation="eager")).eval()
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    queries = {}
    handle = model.encoder.layer[1].attention.self.query.register_forward_hook(
        lambda module, args, output: queries.setdefault("q", output))
    try:
        with torch.no_grad():
            expected = model(tokens, attention_mask=mask, output_attentions=True).attentions
    finally:
        handle.remove()
    net = NNsight(model)
    with torch.no_grad(), net.trace(tokens, attention_mask=mask, backend=backend):
        attention = net.encoder.layer[1].attention.self.source
        probabilities = (attention.attention_interface_0.source.nn_functional_softmax_0
                         .output.save())
        query = attention.self_query_0.output.save()
        heads = attention.transpose_0.output.save()
    assert torch.allclose(probabilities, expected[1], atol=1e-6)
    assert (probabilities[1, :, :, 3:] == 0).all()  # (the padded keys)
    assert torch.equal(query, queries["q"])
    assert torch.equal(heads, queries["q"].view(2, 5, 2, 8).transpose(1, 2))


# --- a custom module: control flow, one function called several times ------------------------
def _squash(x, times=2):
    for _ in range(times):
        x = torch.tanh(x) * 2
    return x


class _Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 4)

    def forward(self, x, mode: str = "squash"):
        h = self.fc(x)
        if mode == "squash":
            h = _squash(h)
        else:
            h = torch.relu(h)
        for shift in range(2):  # one operation, two calls
            h = _squash(h, times=1) + shift
        return _squash(self.out(h))


def _branching_by_hand(module, x, zero=None):
    """The forward written out; each tanh as ``(name of the _squash call, its call)``,
    the one named ``zero`` zeroed."""
    tanhs, calls = [], {}

    def squash(h, name, times=2):
        for _ in range(times):
            t = torch.tanh(h)
            key = (name, calls.get(name, 0))
            calls[name] = key[1] + 1
            tanhs.append((key, t))
            h = (torch.zeros_like(t) if key == zero else t) * 2
        return h

    with torch.no_grad():
        h = squash(module.fc(x), "_squash_0")
        for shift in range(2):
            h = squash(h, "_squash_1", times=1) + shift
        return squash(module.out(h), "_squash_2"), dict(tanhs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_function_called_several_times_and_its_operations(backend):
    """``_squash_1`` is called twice (a loop), each call calling ``torch.tanh`` once;
    ``_squash_0``'s call calls it twice. ``for i in tracer.iter[:]`` reads each call of
    a nested operation, ``with tracer.iter[1]:`` writes the second only."""
    torch.manual_seed(0)
    module = _Branching().eval()
    x = torch.randn(3, 4)
    expected, tanhs = _branching_by_hand(module, x)
    net = NNsight(module)
    with torch.no_grad(), net.trace(x, backend=backend) as tracer:
        first = net.source._squash_2.source.torch_tanh_0.output.save()
        loop = fxsight.save(list())
        for i in tracer.iter[:]:
            loop.append(net.source._squash_1.source.torch_tanh_0.output)
        inner = fxsight.save(list())
        for i in tracer.iter[:]:
            inner.append(net.source._squash_0.source.torch_tanh_0.output)
        out = net.output.save()
    assert torch.allclose(out, expected)
    assert torch.equal(first, tanhs[("_squash_2", 0)])
    assert len(loop) == len(inner) == 2
    for call in range(2):
        assert torch.equal(loop[call], tanhs[("_squash_1", call)])
        assert torch.equal(inner[call], tanhs[("_squash_0", call)])
    for name in ("_squash_0", "_squash_1"):
        patched, _ = _branching_by_hand(module, x, zero=(name, 1))
        with torch.no_grad(), net.trace(x, backend=backend) as tracer:
            with tracer.iter[1]:
                getattr(net.source, name).source.torch_tanh_0.output[:] = 0
            out = net.output.save()
        assert torch.allclose(out, patched), name
    with torch.no_grad(), net.trace(x, mode="relu", backend=backend):
        relu = net.source.torch_relu_0.output.save()
    assert torch.equal(relu, torch.relu(module.fc(x)))
    with pytest.raises(TraceError, match="torch_relu_0 .*not reached"):
        with torch.no_grad(), net.trace(x, backend=backend):
            net.source.torch_relu_0.output.save()


# --- .skip() ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_and_operations(gpt2, ids, backend):
    """An operation inside a skipped module is refused; an operation calling a skipped
    module returns the skip's value, and a write of its output replaces that."""
    net = NNsight(gpt2)
    with pytest.raises(TraceError, match=r"attention_interface_0.*skipped"):
        with torch.no_grad(), net.trace(ids, use_cache=False, backend=backend):
            net.transformer.h[0].attn.skip((torch.zeros(2, 7, 64), None))
            net.transformer.h[0].attn.source.attention_interface_0.output[1].save()
    with torch.no_grad(), net.trace(ids, use_cache=False, backend=backend):
        net.transformer.h[0].attn.c_proj.skip(torch.ones(2, 7, 64))
        called = net.transformer.h[0].attn.source.self_c_proj_0.output.save()
    assert torch.equal(called, torch.ones(2, 7, 64))
    with pytest.raises(AttributeError, match="cannot be skipped.*assign its .output"):
        net.transformer.h[0].attn.source.attention_interface_0.skip(None)


# --- errors where fxsight cannot do what is asked ---------------------------------------------
def _constant():
    return 3.0


class _NoArguments(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) * _constant()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write", [False, True])
def test_input_of_a_call_without_arguments_names_it(backend, write):
    """``.input`` of an operation called without arguments is a TraceError naming the
    operation and the user's line, before anything runs (was: a bare IndexError, "the
    module was called without arguments")."""
    net = NNsight(_NoArguments())
    with pytest.raises(TraceError, match=r"model\.source\._constant_0\.input: the operation "
                                         r"was called without arguments(.|\n)*"
                                         r"test_source_audit\.py"):
        with net.trace(torch.ones(2, 3), backend=backend):
            if write:
                net.source._constant_0.input = torch.zeros(2, 3)
            else:
                net.source._constant_0.input.save()
    with net.trace(torch.ones(2, 3), backend=backend):
        inputs = net.source._constant_0.inputs.save()
    assert inputs == ((), {})


def test_source_of_a_container_says_it_has_no_forward():
    """A ModuleList has no forward: its ``.source`` says so (was: the source of torch's
    ``_forward_unimplemented``, with operations that never run)."""
    net = NNsight(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)])))
    with pytest.raises(TraceError, match="ModuleList has no forward of its own"):
        net[0].source  # noqa: B018
    assert "Sequential.forward" in str(net.source)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_step_choices_in_generate_are_refused(gpt2, backend):
    """In generate, ``tracer.iter`` / ``tracer.all()`` choose decoding steps: one inside
    another is refused (was: the inner choice replaced the outer one, so every pass of
    ``for step in tracer.all():`` read the inner loop's steps, silently). An operation
    called several times in one step is in ``tracer.cache`` entries, every call of
    every step, equal to forward hooks on the modules it calls."""
    llama = tiny_llama(attn_implementation="eager")
    prompt = torch.randint(4, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    lm = fxsight.LanguageModel(llama)
    with pytest.raises(TraceError, match=r"inside another: in generate both choose "
                                         r"decoding steps(.|\n)*test_source_audit\.py"):
        with lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
            for step in tracer.all():
                for call in tracer.iter[:]:
                    lm.model.source.decoder_layer_0.output.save()
    with pytest.raises(TraceError, match="inside another"):
        with lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
            with tracer.all():
                with tracer.iter[1]:
                    lm.model.layers[0].output.save()
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o))
               for layer in llama.model.layers]
    try:
        with torch.no_grad():
            llama.generate(prompt, max_new_tokens=3, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    with lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        cache = tracer.cache(modules=[lm.model.source.decoder_layer_0])
        with tracer.all():
            first_calls = lm.model.source.decoder_layer_0.output.save()
    entries = cache["model.model.source.decoder_layer_0"]
    assert len(outputs) == len(entries) == 6  # (3 steps, 2 layers each)
    assert all(torch.allclose(e.output, o, atol=1e-6) for e, o in zip(entries, outputs))
    assert all(torch.allclose(a, o, atol=1e-6) for a, o in zip(first_calls, outputs[::2]))


def test_nested_call_choices_in_a_trace_are_refused():
    """In a trace, ``tracer.iter`` chooses the call of every module and operation its
    body uses: one inside another is refused (was: the inner choice won, silently)."""
    torch.manual_seed(0)
    net = NNsight(_Branching())
    with pytest.raises(TraceError, match=r"inside another: both choose the call"):
        with net.trace(torch.randn(3, 4)) as tracer:
            for i in tracer.iter[:]:
                with tracer.iter[0]:
                    net.source._squash_1.output.save()
