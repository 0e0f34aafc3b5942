"""Hand-written plain-PyTorch references for the sweeps (forward hooks, one cell at a time),
shared by the sweep tests: a clean/corrupted pair of prompts, the metric, and the loops of
activation patching, head patching and steering."""

from __future__ import annotations

import torch


def first(value):
    """A module's hidden state: its output, or the first item of a tuple output."""
    return value[0] if isinstance(value, tuple) else value


def logits_of(output):
    """The logits of a model's output (a tensor, ``.logits``, or the first item)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def blocks(model):
    """The stack of blocks of a GPT-2, Llama or plain model with ``.layers``."""
    if hasattr(model, "transformer"):
        return model.transformer.h
    return model.model.layers if hasattr(model, "model") else model.layers


def site(model, kind: str, layer: int):
    """The module of a site: the block (resid, resid_pre), its attention or its MLP."""
    block = blocks(model)[layer]
    if kind in ("resid", "resid_pre"):
        return block
    if kind == "attn":
        return block.attn if hasattr(block, "attn") else block.self_attn
    return block.mlp


def forward_with(model, ids, module=None, pre=False, change=None, store=None):
    """One forward of ``ids``; ``change`` rewrites the module's hidden state (output, or
    first input with ``pre``), ``store`` keeps a copy of it."""
    handle = None
    if module is not None:
        if pre:
            def hook(m, args):
                if store is not None:
                    store.append(args[0].detach().clone())
                return None if change is None else (change(args[0]), *args[1:])
            handle = module.register_forward_pre_hook(hook)
        else:
            def hook(m, args, output):
                if store is not None:
                    store.append(first(output).detach().clone())
                if change is None:
                    return None
                new = change(first(output))
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return logits_of(model(ids))
    finally:
        if handle is not None:
            handle.remove()


def patching_loop(model, clean, corrupted, metric, kinds, layers, positions):
    """(kinds, layers, positions) scores: metric of the corrupted run with the clean value at
    one (site, layer, position), minus the corrupted run's metric. Positions may be negative
    (from the end); one missing from the prompt is NaN."""
    length = clean.shape[1]
    baseline = metric(forward_with(model, corrupted))[0]
    out = torch.full((len(kinds), len(layers), len(positions)), float("nan"),
                     dtype=baseline.dtype)
    for k, kind in enumerate(kinds):
        for l, layer in enumerate(layers):
            module, pre = site(model, kind, layer), kind == "resid_pre"
            store: list = []
            forward_with(model, clean, module, pre, store=store)
            for i, position in enumerate(positions):
                if not -length <= position < length:
                    continue

                def change(h, p=position, value=store[0]):
                    h = h.clone()
                    h[:, p] = value[:, p]
                    return h
                out[k, l, i] = metric(forward_with(model, corrupted, module, pre, change))[0] \
                    - baseline
    return out


def head_loop(model, clean, corrupted, metric, layers, positions, heads):
    """(layers, heads, positions): the clean run's head columns of the attention output
    projection's input patched at one position."""
    baseline = metric(forward_with(model, corrupted))[0]
    out = torch.zeros(len(layers), heads, len(positions), dtype=baseline.dtype)
    for l, layer in enumerate(layers):
        attention = site(model, "attn", layer)
        projection = next(getattr(attention, name) for name in ("c_proj", "o_proj", "out_proj")
                          if hasattr(attention, name))
        store: list = []
        forward_with(model, clean, projection, True, store=store)
        size = store[0].shape[-1] // heads
        for h in range(heads):
            for i, position in enumerate(positions):
                def change(x, p=position, h=h, value=store[0]):
                    x = x.clone()
                    x[:, p, h * size:(h + 1) * size] = value[:, p, h * size:(h + 1) * size]
                    return x
                out[l, h, i] = metric(forward_with(model, corrupted, projection, True,
                                               change))[0] - baseline
    return out


def steering_loop(model, prompt, vectors, layers, scales, metric, positions):
    baseline = metric(forward_with(model, prompt))[0]
    out = torch.zeros(len(vectors), len(layers), len(scales), dtype=baseline.dtype)
    for v, vector in enumerate(vectors):
        for l, layer in enumerate(layers):
            for s, scale in enumerate(scales):
                def change(h, vector=vector, scale=scale):
                    h = h.clone()
                    h[:, positions] += scale * vector.to(h.dtype)
                    return h
                out[v, l, s] = metric(forward_with(model, prompt, blocks(model)[layer], False,
                                               change))[0] - baseline
    return out


def pair(length: int, seed: int = 1, position: int = 1, vocab: int = 128, shift: int = 1
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean prompt of random ids (seeded) and its corrupted copy: the id at
    ``position`` moved by ``shift``."""
    clean = torch.randint(4, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
    corrupted = clean.clone()
    corrupted[0, position] = (clean[0, position] + shift) % vocab
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


def metric_all_positions(logits):  # reads every position: the full-length path
    return logits[:, :, 7].mean(-1) - logits[:, -1, 6]
