"""nnsight parity, part 4: an edit's bounded `tracer.iter` loop under generate, rename=
(lists of aliases, `*` keys, keys naming no module), envoys=; against hand-written forward
hooks and plain transformers."""

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from models import tiny_gpt2, train_tokenizer

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_gpt2(vocab_size=len(tokenizer), n_embd=32)


# --- an edit's bounded loop, then generate --------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edits_later_call_under_generate_says_what_is_wrong(gpt2, tokenizer, backend):
    """`for i in tracer.iter[:2]:` in an edit counts a module's calls in one forward pass;
    generate runs one forward pass per step, so call #1 never happens: the error names the
    edit's line and says the loop belongs in the generate block (was: "has no output call
    #1 in this forward pass (the module never runs with these inputs)", a module that
    does run). The rewrite it gives matches transformers' generate with a forward hook on
    steps 0 and 1."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.edit() as (tracer, edited):
        for _ in tracer.iter[:2]:
            lm.transformer.h[0].output[0][:] = 0  # the edit's line
    with pytest.raises(fxsight.TraceError, match=r"model\.edit\(\)'s") as caught:
        with edited.generate(PROMPT, max_new_tokens=4, do_sample=False, backend=backend):
            pass
    message = str(caught.value)
    assert "the edit's line" in message and "for step in tracer.iter" in message
    assert "never runs" not in message

    with lm.generate(PROMPT, max_new_tokens=4, do_sample=False, backend=backend) as tracer:
        for _ in tracer.iter[:2]:
            lm.transformer.h[0].output[0][:] = 0
        ids = tracer.result.save()
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] <= 2:
            output[0][:] = 0
    handle = gpt2.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = gpt2.generate(**tokenizer([PROMPT], return_tensors="pt"),
                                 do_sample=False, max_new_tokens=4)
    finally:
        handle.remove()
    assert torch.equal(ids, want)
