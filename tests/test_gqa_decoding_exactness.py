"""Grouped-query attention (a tiny Llama, 8 query heads on 2 or 1 key/value heads, SDPA)
generating for a left-padded batch of prompts of different lengths, greedy, float32: every
step's logits and the ids are transformers' own ``generate``'s bit for bit
(``torch.equal``), on the fx and hooks backends; so are a trace's logits of the padded
batch against the plain forward.

Eagerly, transformers runs a decoding step's attention (one query token, a mask) with the
query heads folded onto their key/value heads (``pack_gqa``); the captured step graph holds
the compiled route (``repeat_kv``), whose values differ in the last bits (up to 1.5e-7 on
the fx backend before :mod:`fxsight.splice.single_query_attention`)."""

from __future__ import annotations

import pytest
import torch

from transformers import DynamicCache

from fxsight import LanguageModel
from models import tiny_llama

NEW = 4
LENGTHS = (6, 3, 8)  # each prompt's real tokens; the batch is left-padded to the longest


def _model(kv_heads: int):
    return tiny_llama(num_attention_heads=8, num_key_value_heads=kv_heads, hidden_size=64,
                      attn_implementation="sdpa")


def _batch(padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (pad 0) and their mask; unpadded: every row the longest's length."""
    generator = torch.Generator().manual_seed(3)
    width = max(LENGTHS)
    ids = torch.randint(3, 128, (len(LENGTHS), width), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate(LENGTHS):
            ids[row, :width - length] = 0
            mask[row, :width - length] = 0
    return ids, mask


def _transformers_generate(model, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, list(out.logits)


def _fxsight_generate(model, ids, mask, backend: str):
    lm = LanguageModel(model)
    with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=NEW,
                     min_new_tokens=NEW, do_sample=False, backend=backend) as tracer:
        with tracer.all():
            logits = lm.lm_head.output[:, -1].save()
        sequences = tracer.result.save()
    return sequences, list(logits)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_padded_generation_is_transformers_generate_bit_for_bit(kv_heads, backend):
    model = _model(kv_heads)
    ids, mask = _batch()
    want_ids, want_logits = _transformers_generate(model, ids, mask)
    got_ids, got_logits = _fxsight_generate(model, ids, mask, backend)
    assert len(got_logits) == len(want_logits) == NEW
    for step, (got, want) in enumerate(zip(got_logits, want_logits)):
        assert torch.equal(got, want), \
            f"step {step}: max diff {(got - want).abs().max().item():.3g}"
    assert torch.equal(got_ids, want_ids)


def test_unpadded_generation_stays_bit_for_bit():
    model = _model(2)
    ids, mask = _batch(padded=False)
    want_ids, want_logits = _transformers_generate(model, ids, mask)
    got_ids, got_logits = _fxsight_generate(model, ids, mask, "fx")
    assert all(torch.equal(g, w) for g, w in zip(got_logits, want_logits))
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_trace_of_a_padded_batch_is_the_plain_forward(backend):
    model = _model(2)
    ids, mask = _batch()
    # a trace passes positions counted from the mask, as transformers' generate does
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    lm = LanguageModel(model)
    with lm.trace({"input_ids": ids, "attention_mask": mask}, backend=backend):
        got = lm.output.logits.save()
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_one_token_continuing_a_padded_cache_is_the_plain_forward(backend):
    """A trace of one new token per row after a padded batch's cache (a graph of static
    shapes, whose mask fxsight computes only for a padded batch)."""
    model = _model(2)
    ids, mask = _batch()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def cache() -> DynamicCache:
        made = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions,
                  past_key_values=made, use_cache=True)
        return made

    token = torch.tensor([[7], [9], [11]])
    longer = torch.cat([mask, torch.ones_like(token)], dim=1)
    after = positions[:, -1:] + 1
    with torch.no_grad():
        want = model(input_ids=token, attention_mask=longer, position_ids=after,
                     past_key_values=cache()).logits
    lm = LanguageModel(model)
    with lm.trace({"input_ids": token, "attention_mask": longer, "position_ids": after},
                  past_key_values=cache(), backend=backend):
        got = lm.output.logits.save()
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


def test_an_edit_at_every_step_is_the_hooks_backends_bit_for_bit():
    """A padded batch's generation with layer 0's attention output scaled at every step:
    the fx backend's step logits and ids are the hooks backend's (the edit done by
    forward hooks on the eager model)."""
    model = _model(2)
    ids, mask = _batch()
    lm = LanguageModel(model)
    results = {}
    for backend in ("hooks", "fx"):
        with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, backend=backend) as tracer:
            with tracer.all():
                lm.model.layers[0].self_attn.output[0][:] *= 1.5
                logits = lm.lm_head.output[:, -1].save()
            sequences = tracer.result.save()
        results[backend] = (sequences, list(logits))
    (want_ids, want_logits), (got_ids, got_logits) = results["hooks"], results["fx"]
    assert len(got_logits) == NEW
    assert all(torch.equal(g, w) for g, w in zip(got_logits, want_logits))
    assert torch.equal(got_ids, want_ids)
