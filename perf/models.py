"""The benchmark models: GPT-2 and Llama shapes with fixed random weights (nothing is
downloaded)."""

from __future__ import annotations

from typing import Any

import torch

# Llama shapes by name (``LlamaConfig`` fields): a tiny one for smoke runs on a CPU, and a
# 1B shape (TinyLlama-1.1B's: 16 layers of 2048 with grouped-query attention)
LLAMA = {
    "tiny-llama (2x64)": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=256, vocab_size=1000),
    "llama-1b shape (16x2048)": dict(hidden_size=2048, num_hidden_layers=16,
                                     num_attention_heads=32, num_key_value_heads=8,
                                     intermediate_size=8192, vocab_size=32000),
}


def gpt2(n_layer: int, n_embd: int, n_head: int, vocab_size: int,
         n_positions: int = 64) -> torch.nn.Module:
    """A ``GPT2LMHeadModel`` in eval mode, seeded without touching the global RNG."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.eval()


def llama(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
          max_position_embeddings: int = 1024) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of shape ``LLAMA[name]`` in eval mode, its weights drawn on
    ``device`` (a 1B model initialises in well under a second on a GPU, not on a CPU) from a
    fixed seed without touching the global RNG: two processes on one device get the same
    weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = LlamaConfig(**LLAMA[name], max_position_embeddings=max_position_embeddings,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def blocks(model: Any) -> Any:
    """The decoder blocks of a GPT-2 (``transformer.h``) or Llama (``model.layers``) model,
    or of an fxsight or nnsight wrapper of one."""
    try:
        return model.transformer.h
    except AttributeError:
        return model.model.layers
