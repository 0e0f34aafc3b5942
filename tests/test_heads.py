"""Per-head activation patching against a hand-written one-cell-at-a-time hooks loop: on the
suffix path (fx), the full-length path (fx, ``suffix=False``) and the hooks backend.

On the suffix path, the rest of a head's layer (its output projection and MLP) runs on the
patched tokens only: the graph holds none of that layer's attention or MLP, the modules are
called on one row per cell, and an MLP that computes otherwise on one token fails the
self-check (the layer then runs at every token) with the same scores."""

import pytest
import torch

from fxsight import NNsight, patching
from graphs import graph_parameters, module_call_shapes
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
        # 2 layers x 20 cells in 5-cell traces (position 0 comes before the prompts
        # differ: its 4 heads' patches change nothing, they are not run), 2 reference
        # runs, 3 self-checks
        assert result.info["cells_not_run"] == 2 * 4
        assert result.info["traces"] == 2 * 4 + 2 + 3
    assert result.dims == ("layer", "head", "position")
    assert result.values.shape == (2, 4, 6)
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=1e-4)
    assert result.values.abs().max() > 0


def test_head_patching_rejects_prompts_of_different_lengths():
    with pytest.raises(ValueError, match="same number of tokens"):
        patching.head_patching(NNsight(tiny_gpt2()), torch.tensor([[1, 2, 3]]),
                               torch.tensor([[1, 2]]), metric, progress=False)


def test_a_head_cell_runs_the_rest_of_its_layer_on_the_patched_tokens_only(monkeypatch):
    model = tiny_gpt2(n_layer=3)
    shapes = module_call_shapes(monkeypatch)
    clean = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, 1] = 9
    result = patching.head_patching(NNsight(model), clean, corrupted, metric, layers=[0],
                                    progress=False, use_cache=False)
    assert result.info["patched_block_on_patched_tokens"] is True
    graph = result.info["graph_module"]
    used = graph_parameters(graph, model)
    # layer 0: only the layer norm between the projection and the MLP; layers 1 and 2 whole
    # (but layer 2's MLP, run on the last tokens)
    assert {n for n in used if n.startswith("transformer.h.0.")} == \
        {"transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias"}, sorted(used)
    assert "transformer.h.1.mlp.c_fc.weight" in used and "transformer.h.1.attn.c_attn.weight" \
        in used
    block = model.transformer.h[0]
    cells = 4 * 5  # heads x positions from the first where the prompts differ, one trace
    width = model.config.n_embd
    assert (block.mlp, (cells, 1, width)) in shapes  # (the projection's patched input is
    # a plain tensor: it is applied before the graph runs)
    expected = _one_cell_at_a_time(model, MODELS["gpt2"][1], clean, corrupted, 3, 4, 16)[:1]
    torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=1e-4)


def test_an_mlp_with_a_one_token_path_runs_at_every_token(monkeypatch):
    model = tiny_gpt2(n_layer=2)
    mlp = model.transformer.h[0].mlp
    plain = type(mlp).forward
    monkeypatch.setattr(mlp, "forward",
                        lambda h: plain(mlp, h) + (1.0 if h.shape[1] == 1 else 0.0))
    clean = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, 1] = 9
    net = NNsight(model)
    fast = patching.head_patching(net, clean, corrupted, metric, progress=False,
                                  use_cache=False)
    full = patching.head_patching(net, clean, corrupted, metric, progress=False,
                                  use_cache=False, suffix=False)
    assert fast.info["suffix"] is True
    assert fast.info["patched_block_on_patched_tokens"] is False
    assert fast.info["last_mlp_on_last_tokens"] is True
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)
    assert fast.values.abs().max() > 0
