"""Per-head activation patching against a hand-written one-cell-at-a-time hooks loop: on the
suffix path (fx), the full-length path (fx, ``suffix=False``) and the hooks backend."""

import pytest
import torch

from fxsight import NNsight, patching
from models import tiny_gpt2, tiny_llama

MODELS = {"gpt2": (tiny_gpt2, "transformer.h.{}.attn.c_proj"),
          "llama": (tiny_llama, "model.layers.{}.self_attn.o_proj")}


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


def _one_cell_at_a_time(model, projection, clean, corrupted, layers, heads, head_dim):
    inputs = {}
    handles = [model.get_submodule(projection.format(layer)).register_forward_pre_hook(
        lambda module, args, layer=layer: inputs.__setitem__(layer, args[0].clone()))
        for layer in range(layers)]
    with torch.no_grad():
        model(clean, use_cache=False)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        baseline = metric(model(corrupted, use_cache=False).logits)
    expected = torch.zeros(layers, heads, clean.shape[1])
    for layer in range(layers):
        for head in range(heads):
            for position in range(clean.shape[1]):
                columns = slice(head * head_dim, (head + 1) * head_dim)

                def patch(module, args):
                    value = args[0].clone()
                    value[:, position, columns] = inputs[layer][:, position, columns]
                    return (value,)

                handle = model.get_submodule(projection.format(layer)).register_forward_pre_hook(
                    patch)
                with torch.no_grad():
                    expected[layer, head, position] = \
                        (metric(model(corrupted, use_cache=False).logits) - baseline).item()
                handle.remove()
    return expected


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("backend, suffix", [("fx", None), ("fx", False), ("hooks", None)])
def test_head_patching_equals_one_cell_loop(name, backend, suffix):
    build, projection = MODELS[name]
    model = build()
    clean = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, 1] = 9
    result = patching.head_patching(NNsight(model), clean, corrupted, metric, progress=False,
                                    backend=backend, batch_size=5, use_cache=False,
                                    suffix=suffix)
    expected = _one_cell_at_a_time(model, projection, clean, corrupted, 2, 4, 16)
    on_suffix = backend == "fx" and suffix is None
    assert (result.info["suffix"] is True) == on_suffix, result.info["suffix"]
    if on_suffix:
        assert result.info["last_mlp_on_last_tokens"] is True
        assert result.info["traces"] == 2 * 5 + 3  # 2 layers x 24 cells in 5-cell traces
    assert result.dims == ("layer", "head", "position")
    assert result.values.shape == (2, 4, 6)
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=1e-4)
    assert result.values.abs().max() > 0


def test_head_patching_rejects_prompts_of_different_lengths():
    with pytest.raises(ValueError, match="same number of tokens"):
        patching.head_patching(NNsight(tiny_gpt2()), torch.tensor([[1, 2, 3]]),
                               torch.tensor([[1, 2]]), metric, progress=False)
