"""nnsight parity, part 4: an edit's bounded `tracer.iter` loop under generate, rename=
(lists of aliases, `*` keys, keys naming no module), envoys=; against hand-written forward
hooks and plain transformers."""

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from hook_references import hooked_logits
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in"


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


# --- rename= as nnsight documents it ------------------------------------------------------------
def _hooked_run(model, ids, hooks):
    """A plain forward with hand-written forward hooks ``{path: fn(output)}`` (a return
    value replaces the output); returns the logits."""
    return hooked_logits(model, ids, hooks={
        path: lambda m, a, o, fn=fn: fn(o) for path, fn in hooks.items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_rename_with_a_list_of_aliases(gpt2, tokenizer, backend):
    """nnsight's ``{".transformer": ["model", "mdl"]}``: every alias reaches the module
    (was: a ValueError for a list value)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer,
                       rename={".transformer": ["model", "mdl"], "mlp": ["ffn", "mlp_"]})
    assert lm.model.h[0] is lm.mdl.h[0] is lm.transformer.h[0]
    assert lm.mdl.h[1].ffn is lm.model.h[1].mlp_ is lm.transformer.h[1].mlp
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    with lm.trace(ids, use_cache=False, backend=backend) as tracer:
        read = lm.model.h[0].ffn.output.save()
        lm.mdl.h[1].mlp_.output = lm.mdl.h[1].mlp_.output * 0
        out = lm.output.logits.save()
        cache = tracer.cache(modules=[lm.model.h[0].ffn])
        by_name = tracer.cache(modules=["model.mdl.h.0.ffn"])  # a path spelled with aliases
    got = {}
    want = _hooked_run(gpt2, ids, {"transformer.h.0.mlp": lambda o: got.setdefault("mlp", o),
                                   "transformer.h.1.mlp": lambda o: o * 0})
    torch.testing.assert_close(read, got["mlp"])
    torch.testing.assert_close(out, want)
    for key in ("model.model.h.0.ffn", "model.mdl.h.0.mlp_", "model.transformer.h.0.mlp"):
        torch.testing.assert_close(cache[key].output, got["mlp"])
    torch.testing.assert_close(cache.model.mdl.h[0].ffn.output, got["mlp"])
    assert list(by_name.keys()) == ["model.transformer.h.0.mlp"]
    torch.testing.assert_close(by_name["model.model.h.0.ffn"].output, got["mlp"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rename_keys_relative_to_any_module_with_stars_and_classes(gpt2, tokenizer, backend):
    """A key is a path relative to every module, bound where it resolves: ``"*.h"`` (``*``
    any one submodule) mounts the layers on the model, ``"attn.c_proj"`` binds on each
    block, a module class names the one child of that class (was: a ValueError for each)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    lm = LanguageModel(gpt2, tokenizer=tokenizer,
                       rename={"*.h": "layers", "attn.c_proj": "attn_out", GPT2MLP: "ffn"})
    assert lm.layers[1] is lm.transformer.h[1]
    assert lm.layers[0].attn_out is lm.transformer.h[0].attn.c_proj
    assert lm.layers[0].ffn is lm.transformer.h[0].mlp
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    steer = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with lm.trace(ids, use_cache=False, backend=backend) as tracer:
        lm.layers[0].attn_out.output = lm.layers[0].attn_out.output + steer
        read = lm.layers[1].ffn.output.save()
        out = lm.output.logits.save()
        cache = tracer.cache(modules=[lm.layers[1].ffn])
    got = {}
    want = _hooked_run(gpt2, ids, {"transformer.h.0.attn.c_proj": lambda o: o + steer,
                                   "transformer.h.1.mlp": lambda o: got.setdefault("mlp", o)})
    torch.testing.assert_close(read, got["mlp"])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(cache["model.layers.1.ffn"].output, got["mlp"])
    with pytest.raises(ValueError, match="names 2 modules"):  # an alias names one module
        LanguageModel(gpt2, tokenizer=tokenizer, rename={"h.*": "block"})


def test_rename_key_naming_no_module_is_skipped(gpt2, tokenizer):
    """As nnsight: a key that resolves from no module is skipped, so one rename serves
    models that spell a module differently (was: a ValueError); its alias, read, is an
    AttributeError that says no key of it names a module there."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer,
                       rename={"self_attn": "att", "attn": "att", "model.layers": "layers"})
    assert lm.transformer.h[0].att is lm.transformer.h[0].attn
    with pytest.raises(AttributeError, match="rename= alias"):
        lm.layers


# --- envoys= as nnsight documents it ------------------------------------------------------------
class NormEnvoy(fxsight.Envoy):
    """An envoy class with a view of its own (nnsight's use of ``envoys=``)."""

    @property
    def output_norm(self):
        return self.output.norm(dim=-1)


class ScaledEnvoy(fxsight.Envoy):
    def scale_output(self, factor):
        self.output = self.output * factor


@pytest.mark.parametrize("backend", BACKENDS)
def test_envoys_choose_the_class_of_each_modules_envoy(gpt2, tokenizer, backend):
    """``envoys=`` (an Envoy subclass for every submodule, or a dict by module class or
    path suffix, class keys first, a single-name rename alias matching too): its views and
    methods read and write as a forward hook does (was: a TypeError, "no fxsight form")."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    lm = LanguageModel(gpt2, tokenizer=tokenizer, rename={"attn": "att"},
                       envoys={GPT2MLP: NormEnvoy, "att.c_proj": ScaledEnvoy,
                               "c_proj": NormEnvoy})
    assert type(lm.transformer.h[0].mlp) is NormEnvoy
    assert type(lm.transformer.h[1].attn.c_proj) is ScaledEnvoy
    assert type(lm.transformer.h[1].mlp.c_proj) is NormEnvoy  # (the path key)
    assert type(lm.transformer.h[0].ln_1) is fxsight.Envoy and type(lm) is LanguageModel
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    with lm.trace(ids, use_cache=False, backend=backend):
        lm.transformer.h[0].attn.c_proj.scale_output(3.0)
        norm = lm.transformer.h[1].mlp.output_norm.save()
        out = lm.output.logits.save()
    got = {}
    want = _hooked_run(gpt2, ids, {"transformer.h.0.attn.c_proj": lambda o: o * 3.0,
                                   "transformer.h.1.mlp": lambda o: got.setdefault("mlp", o)})
    torch.testing.assert_close(norm, got["mlp"].norm(dim=-1))
    torch.testing.assert_close(out, want)
    every = NNsight(gpt2, envoys=NormEnvoy)
    assert type(every.transformer.h[1]) is NormEnvoy and type(every) is NNsight

    class Wrapper(NNsight):  # a class default, as nnsight's subclasses set it
        envoys = {torch.nn.LayerNorm: NormEnvoy}
    assert type(Wrapper(gpt2).transformer.ln_f) is NormEnvoy
    assert type(Wrapper(gpt2, envoys=None).transformer.ln_f) is fxsight.Envoy
    with pytest.raises(TypeError, match="not a subclass of fxsight's Envoy"):
        NNsight(gpt2, envoys={"mlp": object})


# --- nnsight.models reference page: trace(..., invoker_args=...), NNsight(..., dispatch=) ------
@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_invoker_args_reach_the_tokenization(gpt2, tokenizer, backend):
    """``trace(prompt, invoker_args={"truncation": True, "max_length": 3})`` tokenizes the
    prompt with them, as nnsight's invoker does (was: handed to the model's ``**kwargs``
    and ignored, silently: the whole prompt ran)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.trace(PROMPT, invoker_args={"truncation": True, "max_length": 3},
                  backend=backend):
        logits = lm.lm_head.output.save()
    ids = tokenizer([PROMPT], truncation=True, max_length=3, return_tensors="pt").input_ids
    assert ids.shape[1] == 3
    with torch.no_grad():
        torch.testing.assert_close(logits, gpt2(ids).logits)
    with pytest.raises(fxsight.TraceError, match="invoker_args"):  # generate's max_length
        with lm.generate(PROMPT, max_new_tokens=2, invoker_args={"max_length": 3}):
            pass
    with pytest.raises(TypeError, match="given both"):
        lm.trace(PROMPT, max_length=3, invoker_args={"max_length": 3})


def test_nnsight_takes_dispatch_as_nnsight_does():
    """``NNsight(module, dispatch=True)`` (the reference page's signature): the module is
    loaded already, so there is nothing to dispatch (was: a TypeError)."""
    from models import mlp
    module = mlp()
    net = NNsight(module, dispatch=True)
    x = torch.randn(2, module[0].in_features)
    with net.trace(x):
        out = net.output.save()
    with torch.no_grad():
        torch.testing.assert_close(out, module(x))
