"""Models as people call them, architecture by architecture: tiny random-init transformers
models traced with their usual inputs, against plain forwards and forward hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import RwkvConfig, RwkvForCausalLM

from fxsight import LanguageModel, TraceError


@pytest.fixture(scope="module")
def rwkv():
    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                        attention_hidden_size=32, intermediate_size=64, context_length=32)
    return RwkvForCausalLM(config).eval()


class _NoMask(torch.nn.Module):
    """A causal LM whose forward takes token ids only (no attention_mask)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).cumsum(1))  # (each token sees the earlier)


# --- models that ignore the attention mask ---------------------------------------------------
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_rwkv_refuses_invokes_that_would_be_padded(rwkv, backend):
    # RWKV takes attention_mask and ignores it: a left-padded row reads the pads
    lm = LanguageModel(rwkv)
    with pytest.raises(TraceError, match=r"(?s)invoke #1 is 3 tokens.*ignores the "
                       r"attention_mask.*test_architectures.py"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke([5, 6, 7, 8, 9]):
                lm.output.logits.save()
            with tracer.invoke([10, 11, 12]):
                lm.output.logits.save()
    with pytest.raises(TraceError, match="invoke #0: its rows are padded"):
        with lm.trace([[5, 6, 7, 8, 9], [10, 11, 12]], backend=backend):
            lm.output.logits.save()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_rwkv_invokes_of_equal_lengths_equal_each_prompt_alone(rwkv, backend):
    lm = LanguageModel(rwkv)
    a, b = [5, 6, 7, 8], [10, 11, 12, 13]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.logits.save()
        with tracer.invoke(b):
            lb = lm.output.logits.save()
    with torch.no_grad():
        ra, rb = (rwkv(torch.tensor([ids])).logits for ids in (a, b))
    torch.testing.assert_close(la, ra)
    torch.testing.assert_close(lb, rb)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_forward_without_attention_mask(backend):
    # it is not passed a mask (a plain call with one would be a TypeError); padding refused
    torch.manual_seed(0)
    model = _NoMask().eval()
    lm = LanguageModel(model)
    with torch.no_grad(), lm.trace([[1, 2, 3], [4, 5, 6]], backend=backend):
        out = lm.output.save()
    torch.testing.assert_close(out, model(torch.tensor([[1, 2, 3], [4, 5, 6]])))
    with pytest.raises(TraceError, match="_NoMask.forward takes no attention_mask"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke([1, 2, 3]):
                lm.output.save()
            with tracer.invoke([4, 5]):
                lm.output.save()


@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_rwkv_first_trace_rescales_its_weights_once(backend):
    # RWKV's first forward in eval mode divides its weights in place (rescale_every);
    # the shape-learning forwards used to divide them again (silently wrong values)
    import copy
    import warnings

    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                        attention_hidden_size=32, intermediate_size=64, context_length=32,
                        rescale_every=1)
    model = RwkvForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = reference(ids).logits
    lm = LanguageModel(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (auto: an opaque call, said)
        with torch.no_grad(), lm.trace(ids, backend=backend):
            logits = lm.output.logits.save()
    torch.testing.assert_close(logits, expected)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)


# --- positions a model counts itself -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_roberta_invokes_of_different_lengths_equal_each_prompt_alone(backend):
    # RoBERTa's learned positions count from padding_idx + 1 (pads at padding_idx): the
    # position_ids given with a padded batch used to count from 0 (every row silently wrong)
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, pad_token_id=1,
                           max_position_embeddings=34)
    model = RobertaForMaskedLM(config).eval()
    lm = LanguageModel(model, automodel=RobertaForMaskedLM)
    a, b = [5, 6, 7, 8, 9, 10], [12, 13, 14]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            la = lm.output.logits.save()
        with tracer.invoke(b):
            lb = lm.output.logits.save()
            hb = lm.roberta.encoder.layer[0].output.save()
    seen = {}
    with torch.no_grad():
        ra = model(torch.tensor([a])).logits
        hook = model.roberta.encoder.layer[0].register_forward_hook(
            lambda m, i, o: seen.setdefault("h", o))
        rb = model(torch.tensor([b])).logits
    hook.remove()
    torch.testing.assert_close(la, ra)
    # (an encoder's rows are padded on the right, as its tokenizer and nnsight pad them)
    torch.testing.assert_close(lb[:, :3], rb)
    torch.testing.assert_close(hb[:, :3], seen["h"])
    # (the longest input the positions allow: 34 rows from position 2)
    with pytest.raises(TraceError, match="longer than the model's 32 positions"):
        with lm.trace(list(range(4, 37)), backend=backend):
            lm.output.save()
