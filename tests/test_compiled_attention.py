"""A model whose attention transformers runs through ``torch.compile`` inside its forward
(``attn_implementation="flex_attention"``): on the hooks backend (``backend="auto"`` falls
back to it, with its warning) a trace, a write, ``lm.generate`` and a padded batch give the
plain model's values; the fx backend's capture fails before anything runs; either way the
model's next plain call gives the plain call's logits. Before, fxsight's passes on fake
tensors made dynamo recompile transformers' compiled flex attention under fxsight's modes,
failed (NotImplementedError: no rule for flex attention's operator in fxsight's dispatch
mode), and left torch's compiled-code cache so changed that the next plain call failed
("Attempted to call function marked as skipped")."""

import warnings

import pytest
import torch

from fxsight import CaptureError, LanguageModel
from models import tiny_llama

PROMPT = "a b c d"


@pytest.fixture()
def flex_llama(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    model.set_attn_implementation("flex_attention")
    return model


def _logits(model, tokenizer, prompts=(PROMPT,)):
    with torch.no_grad():
        return model(**tokenizer(list(prompts), return_tensors="pt")).logits


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_flex_attention_traces_writes_and_generates_as_the_plain_model(flex_llama, tokenizer,
                                                                       backend):
    before = _logits(flex_llama, tokenizer)
    vector = torch.randn(flex_llama.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    handle = flex_llama.model.layers[0].register_forward_hook(
        lambda module, args, output: output + vector)
    try:
        want = _logits(flex_llama, tokenizer)
        encoded = tokenizer([PROMPT], return_tensors="pt")
        with torch.no_grad():
            want_ids = flex_llama.generate(**encoded, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    lm = LanguageModel(flex_llama, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (auto: the fallback's warning)
        with torch.no_grad(), lm.trace(PROMPT, backend=backend) as tracer:
            lm.model.layers[0].output[:] += vector
            got = lm.output.logits.save()
        with torch.no_grad(), lm.generate(PROMPT, max_new_tokens=3, do_sample=False,
                                          backend=backend) as generator:
            with generator.all():
                lm.model.layers[0].output[:] += vector
            ids = lm.generator.output.save()
        with torch.no_grad(), lm.trace([PROMPT, "e"], backend=backend):
            padded = lm.output.logits.save()
    assert tracer.backend == "hooks"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(ids, want_ids)
    alone = _logits(flex_llama, tokenizer, ["e"])
    torch.testing.assert_close(padded[1, -1], alone[0, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(flex_llama, tokenizer), before, rtol=0, atol=0)


def test_flex_attention_on_fx_is_a_capture_error_and_the_plain_call_still_works(
        flex_llama, tokenizer):
    before = _logits(flex_llama, tokenizer)
    lm = LanguageModel(flex_llama, tokenizer=tokenizer)
    with pytest.raises(CaptureError):
        with torch.no_grad(), lm.trace(PROMPT, backend="fx"):
            lm.output.logits.save()
    torch.testing.assert_close(_logits(flex_llama, tokenizer), before, rtol=0, atol=0)
