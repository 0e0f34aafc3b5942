"""How many tiny random-init transformers architectures capture on the fx backend when
called with transformers' default arguments (``use_cache`` on: cache objects in outputs).

    python -m perf.cache_capture          # one line per architecture, then the count

Each model: ``NNsight(model).trace(ids, backend="fx")`` saving the output; "fx" where it
ran on the fx backend and its output (logits and cache tensors) equals the plain forward's.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import transformers as tf

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs():
    yield "gpt2", tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=32, n_head=4,
                                                    vocab_size=128, n_positions=64)
    for name, cls, cfg in [("llama", tf.LlamaForCausalLM, tf.LlamaConfig),
                           ("mistral", tf.MistralForCausalLM, tf.MistralConfig),
                           ("qwen2", tf.Qwen2ForCausalLM, tf.Qwen2Config),
                           ("qwen3", tf.Qwen3ForCausalLM, tf.Qwen3Config),
                           ("gemma", tf.GemmaForCausalLM, tf.GemmaConfig),
                           ("gemma2", tf.Gemma2ForCausalLM, tf.Gemma2Config),
                           ("phi3", tf.Phi3ForCausalLM, tf.Phi3Config),
                           ("olmo", tf.OlmoForCausalLM, tf.OlmoConfig)]:
        extra = {"head_dim": 8} if name in ("gemma", "gemma2", "qwen3") else {}
        if name == "gemma2":
            extra["sliding_window"] = 4
        yield name, cls, cfg(**SMALL, **extra)
    yield "phi", tf.PhiForCausalLM, tf.PhiConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64)
    yield "opt", tf.OPTForCausalLM, tf.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32)
    yield "gpt_neox", tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64)
    yield "falcon", tf.FalconForCausalLM, tf.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    yield "bloom", tf.BloomForCausalLM, tf.BloomConfig(
        hidden_size=32, n_layer=2, n_head=4, vocab_size=128)
    yield "gptj", tf.GPTJForCausalLM, tf.GPTJConfig(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, rotary_dim=4)
    yield "t5", tf.T5ForConditionalGeneration, tf.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128)
    yield "bart", tf.BartForConditionalGeneration, tf.BartConfig(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        vocab_size=128, max_position_embeddings=64)
    yield "mamba", tf.MambaForCausalLM, tf.MambaConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=4)


def _tensors(value, seen=None):
    """Every tensor inside ``value`` (outputs, cache objects), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) or hasattr(value, "items") and callable(value.items):
        return [t for k in value.keys() for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "__dict__") and type(value).__module__.startswith("transformers"):
        return [t for k, v in sorted(vars(value).items()) for t in _tensors(v)]
    return []


def check(name, cls, config) -> str:
    from fxsight import NNsight

    torch.manual_seed(0)
    try:
        model = cls(config).eval()
    except Exception as error:  # noqa: BLE001 - report it
        return f"not built: {type(error).__name__}: {str(error).splitlines()[0][:100]}"

    ids = torch.randint(4, 128, (2, 7))
    kwargs = {"decoder_input_ids": ids[:, :5]} if config.is_encoder_decoder else {}
    with torch.no_grad():
        ref = model(ids, **kwargs)
    wrapped = NNsight(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad(), wrapped.trace(ids, backend="fx", **kwargs):
                out = wrapped.output.save()
    except Exception as error:  # noqa: BLE001 - report it
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:150]}"
    a, b = _tensors(out), _tensors(ref)
    same = len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, atol=1e-5)
                                    for x, y in zip(a, b))
    return "fx" if same else f"fx but output differs ({len(a)} vs {len(b)} tensors)"


def main() -> None:
    torch.set_num_threads(1)
    captured = total = 0
    for name, cls, config in _configs():
        start = time.perf_counter()
        result = check(name, cls, config)
        total += 1
        captured += result == "fx"
        print(f"{name:10s} {result}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"captured on fx with default arguments: {captured}/{total}")


if __name__ == "__main__":
    sys.exit(main())
