"""Gradients bit for bit: parameter and input gradients of a trace on the fx and hooks
backends equal those of the plain forward and backward (``torch.equal``), on tiny ViT,
BERT, GPT-2 and Llama models with SDPA and eager attention, in float32 and float64, with
and without interventions (against the same interventions as hand-written forward hooks).

Grouped-query attention with four or more query heads per key/value head is the case
the fx backend once missed: exported, transformers repeats the key/value heads (it has
a mask then), eagerly it hands them to the kernel unrepeated (``enable_gqa=True``); the
values are equal, the keys' and values' gradients were summed in another order
(:mod:`fxsight.splice.grouped_attention`)."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification)

from fxsight import NNsight

BACKENDS = ("hooks", "fx")
# each model: (its builder, its first layer's path, the input that carries gradients)
_LAYERS = {"vit": "vit.layers", "bert": "bert.encoder.layer", "gpt2": "transformer.h",
           "llama": "model.layers", "llama_gqa": "model.layers"}


def _seeded(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return make().eval()


def _model(name: str, attention: str, dtype: torch.dtype) -> torch.nn.Module:
    if name == "vit":
        config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           num_labels=5, attn_implementation=attention)
        model = _seeded(lambda: ViTForImageClassification(config))
    elif name == "bert":
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=32, attn_implementation=attention)
        model = _seeded(lambda: BertForMaskedLM(config))
    elif name == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                            bos_token_id=1, eos_token_id=2, attn_implementation=attention)
        model = _seeded(lambda: GPT2LMHeadModel(config))
    else:  # llama: 2 query heads per key/value head; llama_gqa: 8
        heads, groups = (4, 2) if name == "llama" else (16, 2)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64,
                             num_attention_heads=heads, num_key_value_heads=groups,
                             head_dim=8, vocab_size=64, max_position_embeddings=32,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             attn_implementation=attention)
        model = _seeded(lambda: LlamaForCausalLM(config))
    return model.to(dtype)


def _inputs(name: str, model: torch.nn.Module, dtype: torch.dtype,
            mask: str | None = None) -> dict[str, Any]:
    """The model's inputs, the one that carries gradients a leaf that requires them
    (pixels, or the token embeddings); ``mask``: an ``attention_mask`` of all ones
    (``"ones"``) or with padding (``"padded"``)."""
    generator = torch.Generator().manual_seed(1)
    if name == "vit":
        pixels = torch.randn(2, 3, 16, 16, generator=generator, dtype=dtype)
        return {"pixel_values": pixels.requires_grad_()}
    ids = torch.randint(3, 64, (2, 7), generator=generator)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    inputs: dict[str, Any] = {"inputs_embeds": embeds.requires_grad_()}
    if name != "bert":
        inputs["use_cache"] = False
    if mask is not None:
        attention_mask = torch.ones_like(ids)
        if mask == "padded":
            attention_mask[0, :2] = 0
        inputs["attention_mask"] = attention_mask
    return inputs


def _leaf(inputs: dict[str, Any]) -> torch.Tensor:
    return inputs.get("pixel_values", inputs.get("inputs_embeds"))


def _fresh(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with a new leaf (its own ``.grad``)."""
    leaf = _leaf(inputs)
    key = "pixel_values" if "pixel_values" in inputs else "inputs_embeds"
    return {**inputs, key: leaf.detach().clone().requires_grad_()}


def _loss(logits: Any) -> Any:
    return (logits ** 2).sum()


def _gradients(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if p.grad is not None}
    grads["<input>"] = _leaf(inputs).grad.clone()
    return grads


def _plain(model, inputs, hooks: dict[str, Callable] | None = None):
    """Parameter and input gradients of a plain forward and backward, with forward
    ``hooks`` (path -> hook) installed for it."""
    model.zero_grad(set_to_none=True)
    inputs = _fresh(inputs)
    handles = [model.get_submodule(path).register_forward_hook(hook)
               for path, hook in (hooks or {}).items()]
    try:
        output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    _loss(output.logits).backward()
    return _gradients(model, inputs), output.logits.detach()


def _traced(model, inputs, backend: str, block: Callable | None = None):
    """The same through a trace on ``backend``; ``block(net)`` records interventions
    first."""
    model.zero_grad(set_to_none=True)
    inputs = _fresh(inputs)
    net = NNsight(model)
    with net.trace(**inputs, backend=backend) as tracer:
        if block is not None:
            block(net)
        logits = net.output.logits.save()
        _loss(net.output.logits).backward()
    assert tracer.backend == backend
    return _gradients(model, inputs), logits.detach()


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  what: str) -> None:
    assert got.keys() == expected.keys(), what
    differ = {name: (got[name] - expected[name]).abs().max().item() for name in expected
              if not torch.equal(got[name], expected[name])}
    assert not differ, f"{what}: gradients not bit-equal (max abs diff): {differ}"


_CASES = [*itertools.product(("vit", "bert", "gpt2", "llama", "llama_gqa"),
                             ("sdpa", "eager"), (torch.float32,)),
          ("vit", "sdpa", torch.float64), ("bert", "sdpa", torch.float64),
          ("gpt2", "sdpa", torch.float64), ("llama_gqa", "sdpa", torch.float64)]


@pytest.mark.parametrize("name, attention, dtype", _CASES)
def test_gradients_equal_the_plain_backward_bit_for_bit(name, attention, dtype):
    model = _model(name, attention, dtype)
    inputs = _inputs(name, model, dtype)
    expected, logits = _plain(model, inputs)
    for backend in BACKENDS:
        got, traced_logits = _traced(model, inputs, backend)
        assert torch.equal(traced_logits, logits), backend
        _assert_equal(got, expected, f"{name} {attention} {dtype} on {backend}")


@pytest.mark.parametrize("mask", ["ones", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_query_gradients_with_a_padding_mask(mask, dtype):
    """An ``attention_mask`` of all ones: the graph checks it at each run and attends
    unmasked on the unrepeated heads, as the eager forward; padded: with the mask, on
    the repeated heads, as the eager forward too."""
    model = _model("llama_gqa", "sdpa", dtype)
    inputs = _inputs("llama_gqa", model, dtype, mask=mask)
    expected, logits = _plain(model, inputs)
    for backend in BACKENDS:
        got, traced_logits = _traced(model, inputs, backend)
        assert torch.equal(traced_logits, logits), backend
        _assert_equal(got, expected, f"mask {mask} {dtype} on {backend}")


@pytest.mark.parametrize("name, attention", [("vit", "sdpa"), ("bert", "eager"),
                                             ("gpt2", "sdpa"), ("llama_gqa", "sdpa")])
def test_gradients_through_interventions_equal_hand_written_hooks(name, attention):
    """A steering vector added to layer 0's output and row 0 of layer 1's output patched
    into row 1, with the patched value's ``.grad`` read: parameter, input and site
    gradients equal those of the same edits made by plain forward hooks."""
    dtype = torch.float32
    model = _model(name, attention, dtype)
    inputs = _inputs(name, model, dtype)
    first, second = f"{_LAYERS[name]}.0", f"{_LAYERS[name]}.1"
    width = model.config.hidden_size
    steer = torch.randn(width, generator=torch.Generator().manual_seed(2), dtype=dtype)
    patched: dict[str, torch.Tensor] = {}

    def steer_hook(module, args, output):
        return output + steer

    def patch_hook(module, args, output):
        value = output.clone()
        value[1] = value[0]
        value.retain_grad()
        patched["h"] = value
        return value

    expected, logits = _plain(model, inputs, {first: steer_hook, second: patch_hook})
    expected["<site>"] = patched["h"].grad

    for backend in BACKENDS:
        site: dict[str, Any] = {}

        def block(net):
            layer0, layer1 = _envoy(net, first), _envoy(net, second)
            layer0.output = layer0.output + steer  # (the layers return tensors)
            hidden = layer1.output
            hidden[1] = hidden[0]
            site["grad"] = hidden.grad.save()

        got, traced_logits = _traced(model, inputs, backend, block)
        got["<site>"] = site["grad"]
        assert torch.equal(traced_logits, logits), backend
        _assert_equal(got, expected, f"{name} {attention} with interventions on {backend}")


def _envoy(net: Any, path: str) -> Any:
    envoy = net
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def test_grouped_heads_follow_transformers_own_choice(monkeypatch):
    """Where transformers' ``use_gqa_in_sdpa`` says no (a head size over its limit, say),
    the eager forward repeats the key/value heads even without a mask: the graph keeps
    its repeat, and the gradients are the plain backward's still."""
    from transformers.integrations import sdpa_attention
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: False)
    model = _model("llama_gqa", "sdpa", torch.float32)
    inputs = _inputs("llama_gqa", model, torch.float32)
    expected, logits = _plain(model, inputs)
    got, traced_logits = _traced(model, inputs, "fx")
    assert torch.equal(traced_logits, logits)
    _assert_equal(got, expected, "transformers repeating the heads")


class _RepeatingAttention(torch.nn.Module):
    """Not a transformers model: its own attention repeats one key/value head for eight
    query heads and always passes a mask made from ``attention_mask``."""

    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(16, 16)
        self.key_value = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        query = self.query(x).view(batch, tokens, 8, 2).transpose(1, 2)
        key, value = self.key_value(x).view(batch, tokens, 2, 1, 2).transpose(1, 3).unbind(2)
        key = key[:, :, None].expand(batch, 1, 8, tokens, 2).reshape(batch, 8, tokens, 2)
        value = value[:, :, None].expand(batch, 1, 8, tokens, 2).reshape(batch, 8, tokens, 2)
        mask = attention_mask[:, None, None, :].bool().expand(batch, 1, tokens, tokens)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, mask)


def test_another_models_repeated_heads_stay_repeated():
    """Only transformers' attention hands unrepeated heads to the kernel without a mask:
    another model's repeat is kept (its gradients are its plain backward's)."""
    model = _seeded(_RepeatingAttention)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    grads = []
    for backend in (None, "fx"):
        model.zero_grad(set_to_none=True)
        if backend is None:
            model(x, mask).pow(2).sum().backward()
        else:
            net = NNsight(model)
            with net.trace(x, mask, backend=backend) as tracer:
                net.output.pow(2).sum().backward()
            assert tracer.backend == backend
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    _assert_equal(grads[1], grads[0], "another model's attention")
