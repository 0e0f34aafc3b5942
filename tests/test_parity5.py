"""nnsight parity, part 5: `trace(trace=False)` without an input is a ValueError (as
nnsight documents), pre-split words (`List[List[str]]`) with `is_split_into_words=True`,
methods that are no context managers refused in a `with` before they run, and a trace
(also one that fails) leaves the model, its hooks and the envoys as they were."""

import contextlib

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from fxsight.errors import TraceError
from models import mlp, tiny_gpt2

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in"
WORDS = [["The", "Eiffel", "Tower"], ["is", "in"]]


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_gpt2(vocab_size=len(tokenizer), n_embd=32)


# --- 1. trace(trace=False) with nothing to run on -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_run_without_inputs_is_a_value_error(gpt2, tokenizer, backend):
    """nnsight's ``trace``: "Raises: ValueError – If trace is False and no inputs were
    provided". It is a TraceError too (``except TraceError`` keeps working), raised before
    the model runs, naming the line."""
    calls = []
    handle = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for wrapper in (NNsight(gpt2), LanguageModel(gpt2, tokenizer=tokenizer)):
            with pytest.raises(ValueError, match="no input") as raised:
                wrapper.trace(trace=False, backend=backend)
            assert isinstance(raised.value, TraceError)
            assert "wrapper.trace(trace=False, backend=backend)" in str(raised.value)
        lm = LanguageModel(gpt2, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="no input"):
            lm.generate(max_new_tokens=2, trace=False, backend=backend)
        with pytest.raises(ValueError, match="no input"):
            with lm.trace(backend=backend):  # (no invoke either)
                lm.output.save()
    finally:
        handle.remove()
    assert calls == []
    # with an input it runs plainly, as before
    ids = tokenizer([PROMPT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = LanguageModel(gpt2, tokenizer=tokenizer).trace(ids, trace=False,
                                                             backend=backend)
        torch.testing.assert_close(out.logits, gpt2(ids).logits, rtol=0, atol=0)


# --- 2. pre-split words ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_split_words_are_the_tokenizers_own_encoding(gpt2, tokenizer, backend):
    """``lm.trace(words, is_split_into_words=True)`` (``words``: a list of word lists, or one
    word list) runs on what ``tokenizer(words, is_split_into_words=True)`` gives, left
    padded as the tokenizer pads."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    encoded = tokenizer(WORDS, is_split_into_words=True, padding=True, return_tensors="pt")
    with lm.trace(WORDS, is_split_into_words=True, backend=backend):
        ids = lm.transformer.wte.inputs[0][0].save()
        last = lm.output.logits[:, -1].save()
    assert torch.equal(ids, encoded["input_ids"])
    with torch.no_grad():
        expected = gpt2(**encoded).logits[:, -1]
    # (the padded row's positions count its real tokens: compare the unpadded row exactly)
    torch.testing.assert_close(last[0], expected[0], rtol=0, atol=0)
    one = tokenizer(WORDS[0], is_split_into_words=True, return_tensors="pt")
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(WORDS[0], is_split_into_words=True):
            ids = lm.transformer.wte.inputs[0][0].save()
    assert torch.equal(ids, one["input_ids"])
    # lm.generate takes it as the trace does (generate itself has no such keyword)
    with lm.generate(WORDS, is_split_into_words=True, max_new_tokens=2, do_sample=False,
                     backend=backend):
        generated = lm.generator.output.save()
    with torch.no_grad():
        expected = gpt2.generate(**encoded, max_new_tokens=2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(generated, expected)


def test_word_lists_without_is_split_into_words_are_refused(gpt2, tokenizer):
    """Without ``is_split_into_words=True`` transformers reads an inner list of two strings
    as a text pair (and refuses three); nnsight hands the lists to ``tokenizer.pad``, which
    raises ValueError. fxsight says what to pass, before anything runs."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="is_split_into_words=True") as raised:
        with lm.trace(WORDS):
            lm.output.save()
    assert isinstance(raised.value, TraceError)
    with pytest.raises(TraceError, match="is_split_into_words=True takes"):
        with lm.trace(PROMPT, is_split_into_words=True):
            lm.output.save()


# --- 3. methods that are no context managers, in a with ------------------------------------
def _refused(call, gpt2, *needles):
    """``call()`` in a with statement raises a TraceError naming the line, before the model
    runs."""
    calls = []
    handle = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TraceError) as raised:
            call()
    finally:
        handle.remove()
    assert calls == [], "the model ran before the error"
    for needle in ("with statement", *needles):
        assert needle in str(raised.value)
    return raised.value


def test_plain_runs_in_a_with_statement_are_refused_before_they_run(gpt2, tokenizer):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)

    def trace_false():
        with lm.trace(PROMPT, trace=False):
            pass

    def generate_false():
        with lm.generate(PROMPT, max_new_tokens=2, trace=False):
            pass

    def forward():  # nnsight traces a method of the model called in a with
        with lm.forward(torch.tensor([[3, 4]])):
            pass

    def calling():
        with lm(torch.tensor([[3, 4]])):
            pass

    def export():
        with NNsight(gpt2).export(torch.tensor([[3, 4]])):
            pass

    error = _refused(trace_false, gpt2, "trace=False", "lm.trace(PROMPT, trace=False)")
    assert "with lm.trace(...)" in str(error) or "drop trace=False" in str(error)
    _refused(generate_false, gpt2, "trace=False")
    _refused(forward, gpt2, "forward", "model.trace(")
    _refused(calling, gpt2, "model.trace(")
    _refused(export, gpt2, "export")
    # without a with they run as before
    with torch.no_grad():
        assert lm.forward(torch.tensor([[3, 4]])).logits.shape == (1, 2, len(tokenizer))
        assert lm.trace(PROMPT, trace=False).logits.shape[0] == 1


def test_the_wrappers_other_methods_in_a_with_statement_are_refused():
    net = NNsight(mlp())
    with torch.no_grad():
        net.layer1.weight.zero_()  # (a change `to` would undo, were it to run)
    with pytest.raises(TraceError, match="clear_edits.*with statement"):
        with net.clear_edits():
            pass
    with pytest.raises(TraceError, match=r"model.to\(...\).*with statement"):
        with net.to(torch.float64):
            pass
    assert net.layer1.weight.dtype == torch.float32  # (not moved)
    with pytest.raises(TraceError, match=r"model.modules\(\).*with statement"):
        with net.modules():
            pass
    with pytest.raises(TraceError, match=r"model.named_modules\(\).*with statement"):
        with net.named_modules():
            pass
    with pytest.raises(TraceError, match=r"model.get\(...\).*with statement"):
        with net.get("layer1"):
            pass
    with pytest.raises(TraceError, match=r"model.layer1.extra_repr\(...\).*with statement"):
        with net.layer1.extra_repr():
            pass
    # without a with they are as before; a method that gives a context manager is the
    # model's own in a with too
    assert [e._path for e in net.modules()][-1] == ""
    assert net.get("layer1") is net.layer1
    with NNsight(_WithContext()).doubled() as factor:
        assert factor == 2


class _WithContext(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)

    @contextlib.contextmanager
    def doubled(self):
        yield 2


# --- 4. what a trace leaves behind ----------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks",
                 "_global_forward_hooks_always_called", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def _model_state(model):
    """Every module's attributes (by identity, with the contents of its containers by
    identity), its hook dicts, torch's global module hooks and global switches."""
    from torch.nn.modules import module as torch_module
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            content = None
            if isinstance(value, dict):
                content = [(k, id(v)) for k, v in value.items()]
            elif isinstance(value, (list, tuple, set)):
                content = [id(v) for v in value]
            state[name, key] = (id(value), content)
        for key in _HOOK_DICTS:
            state[name, "hooks", key] = list(getattr(module, key, {}).items())
        for param_name, param in module.named_parameters(recurse=False):
            state[name, "param", param_name] = (param.requires_grad, param.grad is None,
                                                param._version)
    for key in _GLOBAL_HOOKS:
        state["global", key] = list(getattr(torch_module, key, {}).items())
    state["torch"] = (torch.is_grad_enabled(), torch.get_default_dtype(),
                      torch.is_inference_mode_enabled(),
                      torch.are_deterministic_algorithms_enabled())
    return state


def _envoy_state(lm):
    """Each envoy's attribute names, and whether any value (or an item of a container
    value) is something of a trace: a proxy or a tracer."""
    from fxsight import Proxy
    from fxsight.api.tracer import Tracer
    state = {}
    for envoy in lm.modules():
        found = []
        for key, value in vars(envoy).items():
            items = list(value.values()) if isinstance(value, dict) else \
                list(value) if isinstance(value, (list, tuple, set)) else [value]
            found += [key for item in items if isinstance(item, (Proxy, Tracer))]
        state[envoy._path] = (sorted(vars(envoy)), found)
    return state


def _boom(t):
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return t
    raise RuntimeError("boom at run time")


def _trace(lm, backend, how):
    with lm.trace(PROMPT, backend=backend) as tracer:
        h = lm.transformer.h[0].output[0]
        lm.transformer.h[1].mlp.output[:, -1] = 0
        lm.transformer.h[0].attn.source.attention_interface_0.output.save()
        tracer.cache(modules=[lm.transformer.h[1]])
        if how == "raise":
            raise KeyError("the user's own error")
        if how == "run":
            lm.transformer.h[1].output = (fxsight.apply(_boom, lm.transformer.h[1].output[0]),
                                          *lm.transformer.h[1].output[1:])
        if how == "stop":
            h.save()
            tracer.stop()
            return
        lm.output.logits.save()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_trace_leaves_the_model_and_the_envoys_as_they_were(gpt2, tokenizer, backend):
    """After a trace, also one that stopped or failed (while recorded, or while the model
    ran), every module's attributes, hooks and parameters are the same objects with the
    same contents, torch's global hooks and switches are as they were, and no envoy holds
    anything of the trace (nnsight leaves fake values on its envoys)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    _trace(lm, backend, "plain")  # (the envoys' caches fill up once)
    model_before, envoys_before = _model_state(gpt2), _envoy_state(lm)
    assert all(not found for _, found in envoys_before.values())
    for how, error in [("plain", None), ("stop", None), ("raise", KeyError),
                       ("run", RuntimeError)]:
        if error is None:
            _trace(lm, backend, how)
        else:
            with pytest.raises(error):
                _trace(lm, backend, how)
        assert _model_state(gpt2) == model_before, how
        assert _envoy_state(lm) == envoys_before, how
        with pytest.raises(TraceError, match="only available inside a trace.*save"):
            lm.transformer.h[0].output  # noqa: B018 - nothing of the trace is left


# --- 5. nnsight's module-level helpers -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nnsights_list_dict_and_log_helpers(gpt2, tokenizer, reference_hooks, backend,
                                            capsys):
    """nnsight 0.4's ``nnsight.list().save()``, ``nnsight.dict().save()`` and
    ``nnsight.log(...)`` (were ``AttributeError: list`` / ``dict`` / ``log``): the
    containers hold the real values after the block, as plain hooks see them; ``log``
    prints the real value once the trace has run, as ``tracer.log`` does."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.trace(PROMPT, backend=backend):
        outs = fxsight.list().save()
        by_layer = fxsight.dict(first=lm.transformer.h[0].output).save()
        for layer in lm.transformer.h:
            outs.append(layer.output)
        by_layer["last"] = lm.transformer.h[-1].output
        fxsight.log("logits sum", lm.output.logits.sum())
    kept = {}
    hooks = {f"transformer.h.{i}": (lambda i: lambda m, a, o: kept.__setitem__(i, o))(i)
             for i in range(2)}
    with reference_hooks(gpt2, hooks=hooks), torch.no_grad():
        logits = gpt2(tokenizer([PROMPT], return_tensors="pt")["input_ids"]).logits
    assert isinstance(outs, list) and len(outs) == 2
    for i in range(2):
        torch.testing.assert_close(outs[i], kept[i], rtol=0, atol=0)
    assert set(by_layer) == {"first", "last"} and isinstance(by_layer, dict)
    torch.testing.assert_close(by_layer["first"], kept[0], rtol=0, atol=0)
    torch.testing.assert_close(by_layer["last"], kept[1], rtol=0, atol=0)
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("logits sum tensor(")
    assert float(printed.split("tensor(")[1].split(")")[0].split(",")[0]) == \
        pytest.approx(logits.sum().item(), rel=1e-5)
    with pytest.raises(TraceError, match="inside a trace"):
        fxsight.list().save()
