"""The benchmark models: GPT-2 shapes with fixed random weights (nothing is downloaded)."""

from __future__ import annotations

import torch


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
