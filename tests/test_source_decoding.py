"""``.source`` operations inside transformers' attention function (``sdpa_attention_forward``,
behind ``attention_interface_0``) in ``lm.generate`` steps and traces, on the fx and hooks
backends, against transformers' own ``generate`` / forward with forward hooks and its own
functions (``apply_rotary_pos_emb``, ``repeat_kv``, ``pack_gqa``) applied by hand.

Eagerly, the function takes one of three branches for a grouped-query model: no mask
(no padding: the kernel takes the key/value heads, ``use_gqa_in_sdpa`` is ``True``), a
mask and one query token (a decoding step of padded prompts: the query heads are grouped
per key/value head, ``pack_gqa``), a mask and several query tokens (padded prompts'
step 0: the key/value heads are repeated, ``repeat_kv``). The captured graph always holds
the last (it is made as when the model is exported). An operation the plain forward does
not call is the same ``TraceError`` before running on both backends, naming the module,
the operation, the step and the line; one it calls is its value on the hooks backend, and
on the fx backend its value where its graph holds it as the plain forward does, else a
``TraceError`` before running (``backend="auto"`` runs it on hooks).

Was: the fx backend gave ``repeat_kv_0``'s value at every decoding step and for unpadded
prompts (an operation the plain forward never ran), ``use_gqa_in_sdpa_0`` ``False`` where
the plain forward has ``True``, and refused ``pack_gqa_0`` as "not reached"; the hooks
backend said "not reached" once generate had run."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers.generation.streamers import BaseStreamer
from transformers.integrations.sdpa_attention import pack_gqa, repeat_kv
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fxsight import LanguageModel, TraceError
from fxsight.errors import NotOnGraph
from hook_references import hooked_generate, reference_hooks
from models import tiny_gpt2, tiny_llama

BACKENDS = ["fx", "hooks"]
NEW = 3
LENGTHS = (6, 3)  # each prompt's real tokens; left-padded to the longest
HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 8
ATTENTION = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      hidden_size=HEADS * HEAD_SIZE, attn_implementation="sdpa")


def _batch(padded: bool) -> dict:
    generator = torch.Generator().manual_seed(3)
    width = max(LENGTHS)
    ids = torch.randint(3, 128, (len(LENGTHS), width), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate(LENGTHS):
            ids[row, :width - length] = 0
            mask[row, :width - length] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _inner(lm: LanguageModel):
    """The operations of layer 0's attention function."""
    return lm.model.layers[0].self_attn.source.attention_interface_0.source


class _Streamer(BaseStreamer):
    """Counts what ``generate`` hands it: the prompts first, then each step's tokens."""

    def __init__(self):
        self.calls = 0

    def put(self, value):
        self.calls += 1

    def end(self):
        pass


def _head_runs(model) -> tuple[list, contextlib.AbstractContextManager]:
    """Real (not fake-tensor) calls of the head, counted by a forward hook for the block:
    the hooks backend's view of "nothing ran" (a hook would keep the fx backend from
    capturing the model)."""
    calls = []

    def count(module, args, output):
        if not isinstance(output, FakeTensor) and output.device.type != "meta":
            calls.append(1)

    return calls, reference_hooks(model, hooks={"lm_head": count})


def _refusal(run, model, backend: str) -> str:
    """The message of the TraceError ``run(streamer)`` raises, checked to be raised before
    ``generate`` started (a streamer sees the prompts first) or, on the hooks backend,
    before the model ran (a forward hook)."""
    streamer = _Streamer()
    calls, hooks = _head_runs(model) if backend == "hooks" else ([], contextlib.nullcontext())
    with hooks, pytest.raises(TraceError) as raised:
        run(streamer)
    assert streamer.calls == 0 and calls == [], "it ran before the error"
    return str(raised.value)


def _states(model, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layer 0's query and key heads after the rotary embedding at each step of
    transformers' own ``generate`` (forward hooks on the projections and the attention's
    position embeddings, the rest by hand as ``LlamaAttention.forward`` computes it)."""
    seen: dict[str, list] = {"q": [], "k": [], "position": []}

    def keep(name):
        return lambda module, args, output: seen[name].append(output.detach().clone())

    def positions(module, args, kwargs):
        seen["position"].append(kwargs["position_embeddings"])

    hooked_generate(model, **batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                    pad_token_id=0,
                    hooks={f"{ATTENTION}.q_proj": keep("q"), f"{ATTENTION}.k_proj": keep("k")},
                    pre_hooks={ATTENTION: positions})
    states = []
    for q, k, (cos, sin) in zip(seen["q"], seen["k"], seen["position"]):
        shape = (*q.shape[:-1], -1, HEAD_SIZE)
        states.append(apply_rotary_pos_emb(q.view(shape).transpose(1, 2),
                                           k.view(shape).transpose(1, 2), cos, sin))
    return states


@contextlib.contextmanager
def _no_fallback():
    """Warnings as errors for the block: the fx backend must not hand over to hooks."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


# --- operations the plain forward does not call: one TraceError, before running ---------

def _generate_reading(lm: LanguageModel, name: str, backend: str, padded: bool = True):
    def run(streamer):
        with lm.generate(_batch(padded), max_new_tokens=NEW, do_sample=False,
                         backend=backend, streamer=streamer) as tracer:
            with tracer.all():
                getattr(_inner(lm), name).output.save()  # the refused line
    return run


def test_repeat_kv_at_padded_decoding_steps_is_one_error_before_running(llama):
    """Step 1 of padded prompts groups the query heads (``pack_gqa``): ``repeat_kv_0`` is
    not called. Was: values on fx (of the compiled route), "not reached" after running on
    hooks."""
    lm = LanguageModel(llama)
    messages = {b: _refusal(_generate_reading(lm, "repeat_kv_0", b), llama, b)
                for b in BACKENDS}
    assert messages["fx"] == messages["hooks"]
    message = messages["fx"]
    assert f"{ATTENTION}.source.attention_interface_0.source.repeat_kv_0" in message
    assert "decoding step 1" in message and "sdpa_attention_forward" in message
    assert "test_source_decoding.py" in message and "the refused line" in message


def test_repeat_kv_of_unpadded_prompts_is_one_error_before_running(llama):
    """No padding: transformers passes no mask, and the kernel takes the key/value heads
    as they are, at step 0 too."""
    lm = LanguageModel(llama)
    messages = {b: _refusal(_generate_reading(lm, "repeat_kv_0", b, padded=False), llama, b)
                for b in BACKENDS}
    assert messages["fx"] == messages["hooks"]
    assert "repeat_kv_0" in messages["fx"] and "decoding step 0" in messages["fx"]

    def trace(backend):
        def run(streamer):
            with lm.trace(_batch(padded=False), backend=backend):
                _inner(lm).repeat_kv_0.output.save()
        return run

    messages = {b: _refusal(trace(b), llama, b) for b in BACKENDS}
    assert messages["fx"] == messages["hooks"]
    assert "repeat_kv_0 has no output call #0 in this forward pass" in messages["fx"]


# --- operations it calls: the plain forward's values -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_kv_at_step_0_of_padded_prompts_is_the_plain_forwards(llama, backend):
    """Several query tokens with a mask: the key/value heads are repeated, as captured."""
    batch = _batch(padded=True)
    _, key = _states(llama, batch)[0]
    lm = LanguageModel(llama)
    with _no_fallback():
        with lm.generate(batch, max_new_tokens=NEW, do_sample=False, backend=backend):
            repeated = _inner(lm).repeat_kv_0.output.save()  # (step 0)
    assert torch.equal(repeated, repeat_kv(key, HEADS // KV_HEADS))


def _packed_queries(lm: LanguageModel, backend: str, streamer=None) -> list:
    with lm.generate(_batch(padded=True), max_new_tokens=NEW, do_sample=False,
                     backend=backend, streamer=streamer) as tracer:
        with tracer.iter[1:]:
            packed = _inner(lm).pack_gqa_0.output.save()
    return list(packed)


def test_pack_gqa_at_padded_decoding_steps_is_the_plain_forwards(llama):
    """Hooks: the grouped queries transformers computes at each step after the first.
    fx: its graph holds the compiled route instead, refused before running (was "not
    reached"); ``backend="auto"`` runs it on hooks, with a warning."""
    want = [pack_gqa(query, HEADS // KV_HEADS)
            for query, _ in _states(llama, _batch(padded=True))[1:]]
    lm = LanguageModel(llama)
    got = _packed_queries(lm, "hooks")
    assert len(got) == len(want) == NEW - 1
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    message = _refusal(lambda streamer: _packed_queries(lm, "fx", streamer), llama, "fx")
    assert "pack_gqa_0.output in decoding step 1" in message and 'backend="hooks"' in message
    with pytest.warns(RuntimeWarning, match="runs with the hooks backend"):
        auto = _packed_queries(lm, "auto")
    assert all(torch.equal(g, w) for g, w in zip(auto, want))


def test_use_gqa_in_sdpa_of_unpadded_prompts_is_the_plain_forwards(llama):
    """No mask: transformers' ``use_gqa_in_sdpa`` says ``True`` (``False`` was read on the
    fx backend, whose graph has a mask)."""
    lm = LanguageModel(llama)

    def read(backend):
        with lm.trace(_batch(padded=False), backend=backend):
            decided = _inner(lm).use_gqa_in_sdpa_0.output.save()
            given = _inner(lm).use_gqa_in_sdpa_0.inputs.save()
        return decided, given

    decided, (args, _) = read("hooks")
    assert decided is True and args[0] is None
    with pytest.raises(NotOnGraph, match="use_gqa_in_sdpa_0"):
        read("fx")
    with pytest.warns(RuntimeWarning, match="runs with the hooks backend"):
        assert read("auto")[0] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_head_attention_at_padded_steps_stays_on_its_backend(backend):
    """GPT-2 (no key/value groups) with a padding mask: the captured branch is the plain
    forward's at every step, so the fx backend runs it (no hand-over), and the kernel's
    output at each step is what transformers' ``generate`` hands to ``c_proj``."""
    model = tiny_gpt2(attn_implementation="sdpa")
    batch = _batch(padded=True)
    seen = []
    hooked_generate(model, **batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                    pad_token_id=0, pre_hooks={"transformer.h.0.attn.c_proj": lambda m, a, k:
                                               seen.append(a[0].clone())})
    lm = LanguageModel(model)
    with _no_fallback():
        with lm.generate(batch, max_new_tokens=NEW, do_sample=False, backend=backend) as tracer:
            with tracer.all():
                attention = lm.transformer.h[0].attn.source.attention_interface_0.source
                out = attention.torch_nn_functional_scaled_dot_product_attention_0.output
                outputs = out.save()
    assert len(outputs) == len(seen) == NEW
    for got, want in zip(outputs, seen):
        assert torch.equal(got.transpose(1, 2).reshape(want.shape), want)


def test_a_token_continuing_a_padded_cache_is_the_plain_forwards(llama):
    """One query token after a padded prompt's cache, in a trace: as a decoding step."""
    batch = _batch(padded=True)
    lm = LanguageModel(llama)
    with torch.no_grad():
        cache = llama(**batch, use_cache=True).past_key_values
    token = torch.tensor([[5], [7]])
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    inputs = {"input_ids": token, "attention_mask": mask}
    seen = []
    with reference_hooks(llama, hooks={f"{ATTENTION}.o_proj": lambda m, a, o:
                                       seen.append(a[0].clone())}), torch.no_grad():
        llama(**inputs, past_key_values=_copy(cache))
    with lm.trace(inputs, past_key_values=_copy(cache), backend="hooks"):
        packed = _inner(lm).pack_gqa_0.output.save()
        out = _inner(lm).attn_output_transpose_0.output.save()
    assert packed.shape == (2, KV_HEADS, HEADS // KV_HEADS, HEAD_SIZE)
    assert torch.equal(out.reshape(seen[0].shape), seen[0])
    for backend in BACKENDS:
        def run(streamer, backend=backend):
            with lm.trace(inputs, past_key_values=_copy(cache), backend=backend):
                _inner(lm).repeat_kv_0.output.save()
        assert "repeat_kv_0 has no output call #0" in _refusal(run, llama, backend)


def _copy(cache):
    return copy.deepcopy(cache)


def test_the_kernels_arguments_without_padding_are_the_plain_forwards():
    """GPT-2 without padding: transformers calls the kernel without a mask and with
    ``is_causal=True`` (was, on fx: the captured graph's mask and ``is_causal=False``,
    silently). Hooks: the plain forward's arguments (query, key and value as
    ``c_attn``'s output split into heads by hand); fx: refused before running; auto: on
    hooks, with a warning."""
    model = tiny_gpt2(attn_implementation="sdpa")
    batch = _batch(padded=False)
    seen = []
    with reference_hooks(model, hooks={"transformer.h.0.attn.c_attn": lambda m, a, o:
                                       seen.append(o.clone())}), torch.no_grad():
        model(**batch)
    heads = model.config.n_head
    want = [part.view(*part.shape[:2], heads, -1).transpose(1, 2)
            for part in seen[0].split(model.config.n_embd, dim=2)]
    lm = LanguageModel(model)

    def read(backend):
        with lm.trace(batch, backend=backend):
            attention = lm.transformer.h[0].attn.source.attention_interface_0.source
            given = attention.torch_nn_functional_scaled_dot_product_attention_0.inputs.save()
        return given

    args, kwargs = read("hooks")
    assert all(torch.equal(got, w) for got, w in zip(args[:3], want))
    assert kwargs["attn_mask"] is None and kwargs["is_causal"] is True
    with pytest.raises(NotOnGraph, match="scaled_dot_product_attention_0.inputs"):
        read("fx")
    with pytest.warns(RuntimeWarning, match="runs with the hooks backend"):
        _, kwargs = read("auto")
    assert kwargs["attn_mask"] is None and kwargs["is_causal"] is True


def test_writes_follow_the_plain_forwards_branch(llama):
    """A write to ``repeat_kv_0`` at step 0 of padded prompts changes the logits alike on
    both backends (bit for bit, and not as without it); at step 1, where it is not
    called, it is the same error before running on both."""
    lm = LanguageModel(llama)

    def zeroed(backend, step, streamer=None):
        with lm.generate(_batch(padded=True), max_new_tokens=2, do_sample=False,
                         backend=backend, streamer=streamer) as tracer:
            with tracer.iter[step]:
                _inner(lm).repeat_kv_0.output[:, 0] = 0
            logits = lm.lm_head.output.save()  # (step 0)
        return logits

    with _no_fallback():
        got = {backend: zeroed(backend, 0) for backend in BACKENDS}
    assert torch.equal(got["fx"], got["hooks"])
    with lm.generate(_batch(padded=True), max_new_tokens=2, do_sample=False):
        plain = lm.lm_head.output.save()
    assert not torch.equal(got["fx"], plain)

    def later(backend):
        return lambda streamer: zeroed(backend, 1, streamer)

    messages = {b: _refusal(later(b), llama, b) for b in BACKENDS}
    assert messages["fx"] == messages["hooks"] and "decoding step 1" in messages["fx"]


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_shapes_read_while_recording_are_the_plain_forwards(llama, backend):
    """Without padding the kernel gets the key/value heads as they are: a shape read
    while recording is theirs (was the repeated heads', 8 for 2, on every backend), as is
    the value saved."""
    batch = _batch(padded=False)
    _, key = _states(llama, batch)[0]
    lm = LanguageModel(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (auto: runs on hooks)
        with lm.trace(batch, backend=backend):
            kernel = _inner(lm).torch_nn_functional_scaled_dot_product_attention_0
            given = kernel.inputs[0][1]
            shape = tuple(given.shape)
            saved = given.save()
    assert shape == tuple(key.shape) == (len(LENGTHS), KV_HEADS, max(LENGTHS), HEAD_SIZE)
    assert torch.equal(saved, key)
