"""``python -m fxsight.demo``: activation patching on a small built-in GPT-2.

Builds a 4-layer GPT-2 with fixed random weights, runs a clean and a corrupted prompt in one
batched trace, patches the clean residual stream into the corrupted run at every layer and
position, and shows how much of the clean prediction each patch restores. Every number is
checked against the same patch done with hand-written forward hooks.
"""

from __future__ import annotations

import time

import torch

from fxsight import NNsight


def build_model(seed: int = 0) -> torch.nn.Module:
    """A small GPT-2 (4 layers, 64 wide, 96 tokens) with fixed random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=96, n_positions=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        initializer_range=0.3)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    torch.random.set_rng_state(generator_state)
    return model


def _hooks_patch(model, clean_ids, corrupt_ids, layer, position) -> torch.Tensor:
    """The same patch with plain forward hooks: the reference."""
    store = {}
    block = model.transformer.h[layer]
    handle = block.register_forward_hook(lambda m, a, o: store.__setitem__("h", o))
    with torch.no_grad():
        model(clean_ids, use_cache=False)
    handle.remove()

    def patch(module, args, output):
        output = output.clone()
        output[:, position] = store["h"][:, position]
        return output

    handle = block.register_forward_hook(patch)
    with torch.no_grad():
        logits = model(corrupt_ids, use_cache=False).logits
    handle.remove()
    return logits[:, -1]


def main() -> None:
    torch.set_num_threads(2)
    model = build_model()
    lm = NNsight(model)
    clean = torch.tensor([[5, 17, 42, 8, 23, 61, 30, 12]])
    corrupt = torch.tensor([[5, 17, 77, 8, 23, 61, 30, 12]])  # one token differs
    layers, positions = len(model.transformer.h), clean.shape[1]

    with torch.no_grad(), lm.trace(torch.cat([clean, corrupt]), use_cache=False) as tracer:
        logits = lm.lm_head.output[:, -1].save()
    answer = int(logits[0].argmax())
    baseline = (logits[1, answer] - logits[0, answer]).item()
    print(f"clean prediction: token {answer}; the corrupted run gives it "
          f"{baseline:+.3f} logits relative to clean ({tracer.backend} backend)\n")

    restored = torch.zeros(layers, positions)
    start = time.perf_counter()
    with torch.no_grad():
        for layer in range(layers):
            for position in range(positions):
                with lm.trace(use_cache=False) as tracer:
                    with tracer.invoke(clean):
                        h = lm.transformer.h[layer].output[:, position]
                    with tracer.invoke(corrupt):
                        lm.transformer.h[layer].output[:, position] = h
                        patched = lm.lm_head.output[:, -1].save()
                reference = _hooks_patch(model, clean, corrupt, layer, position)
                assert torch.allclose(patched, reference, atol=1e-5), (layer, position)
                restored[layer, position] = patched[0, answer] - logits[1, answer]
    elapsed = time.perf_counter() - start

    print("logit of the clean answer restored by patching the clean residual stream")
    print("(rows: layer, columns: token position; the corrupted token is at position 2)")
    print("        " + " ".join(f"{p:>7d}" for p in range(positions)))
    for layer in range(layers):
        print(f"layer {layer} " + " ".join(f"{v:+7.3f}" for v in restored[layer].tolist()))
    best = divmod(int(restored.abs().argmax()), positions)
    print(f"\nlargest effect: layer {best[0]}, position {best[1]}")
    print(f"{layers * positions} patched traces in {elapsed:.2f} s, each equal to the "
          f"hand-written forward-hook patch; backend: {tracer.backend}")


if __name__ == "__main__":
    main()
