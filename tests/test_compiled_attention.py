"""A model whose attention transformers runs through ``torch.compile`` inside its forward
(``attn_implementation="flex_attention"``) is refused before anything runs, naming the
setting and the user's line, and the process is left as it was: the model's next plain
call gives the plain call's logits. Before, fxsight's passes on fake tensors made dynamo
recompile transformers' compiled flex attention under fxsight's modes, failed
(NotImplementedError on hooks, a CaptureError on fx), and left torch's compiled-code cache
so changed that the next plain call failed ("Attempted to call function marked as
skipped")."""

import pytest
import torch

from fxsight import LanguageModel, TraceError
from models import tiny_llama, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture()
def flex_llama(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    model.set_attn_implementation("flex_attention")
    return model


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(["a b c d"], return_tensors="pt")).logits


@pytest.mark.parametrize("backend", ["fx", "hooks", "auto"])
@pytest.mark.parametrize("call", ["trace", "generate"])
def test_flex_attention_is_refused_and_the_plain_call_still_works(flex_llama, tokenizer,
                                                                  backend, call):
    before = _logits(flex_llama, tokenizer)
    lm = LanguageModel(flex_llama, tokenizer=tokenizer)
    calls = []
    handle = flex_llama.model.embed_tokens.register_forward_hook(
        lambda *args: calls.append(1))
    try:
        with pytest.raises(TraceError, match=r"(?s)flex_attention.*set_attn_implementation"
                                             r".*# the line") as caught:
            if call == "trace":
                with torch.no_grad(), lm.trace("a b c d", backend=backend):
                    lm.model.layers[0].output.shape  # the line
                    lm.output.logits.save()
            else:
                with torch.no_grad(), lm.generate("a b c d", max_new_tokens=2,
                                                  do_sample=False, backend=backend):
                    lm.model.layers[0].output.shape  # the line
    finally:
        handle.remove()
    assert "# the line" in str(caught.value)
    assert calls == []
    torch.testing.assert_close(_logits(flex_llama, tokenizer), before, rtol=0, atol=0)


def test_the_same_model_traces_with_sdpa(flex_llama, tokenizer):
    """The way out the error names: the model set to sdpa traces, equal to its plain
    forward."""
    flex_llama.set_attn_implementation("sdpa")
    want = _logits(flex_llama, tokenizer)
    lm = LanguageModel(flex_llama, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace("a b c d"):
        got = lm.output.logits.save()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
