"""nnsight parity, part 3: examples of nnsight's own documentation (usage pages and
patterns) ported by changing the import, against hand-written hooks: a tuple output
rebuilt from its items, ``model.edit() as (tracer, edited)``, an SAE attached to the model
and routed through it in an edit, the cache's views, ``envoy.modules()``."""

import copy

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in the city of"


def _ids(tokenizer, prompt=PROMPT):
    return tokenizer([prompt], return_tensors="pt")["input_ids"]


# --- access-and-modify.md: a tuple output replaced by a tuple built from its items --------
@pytest.mark.parametrize("backend", BACKENDS)
def test_tuple_output_rebuilt_from_its_items(gpt2, tokenizer, reference_hooks, backend):
    """``attn.output = (torch.zeros_like(attn_out),) + attn.output[1:]`` (was, on fx: a
    ShapeError "holds a tuple of 2; the written value is Node": the tuple's ``+`` was a
    graph node, not the tuple it makes)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.trace(PROMPT, backend=backend):
        attn_out = lm.transformer.h[0].attn.output[0]
        lm.transformer.h[0].attn.output = \
            (torch.zeros_like(attn_out),) + lm.transformer.h[0].attn.output[1:]
        doubled = lm.transformer.h[1].attn.output[:1] * 2  # a tuple repeated
        pair = fxsight.save(list(doubled))
        logits = lm.output.logits.save()
    kept = {}

    def zero(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:])

    hooks = {"transformer.h.0.attn": zero,
             "transformer.h.1.attn": lambda m, a, o: kept.__setitem__("attn", o[0])}
    with reference_hooks(gpt2, hooks=hooks), torch.no_grad():
        expected = gpt2(_ids(tokenizer)).logits
    torch.testing.assert_close(logits, expected)
    assert len(pair) == 2
    torch.testing.assert_close(pair[0], kept["attn"])
    torch.testing.assert_close(pair[1], kept["attn"])


# --- edit.md: `with model.edit() as (tracer, edited):` (nnsight >= 0.5) --------------------
def _two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def test_edit_binds_the_tracer_and_the_edited_model():
    """``as (tracer, edited)`` binds the tracer and the edited copy (was: the edited
    model's two submodules, unpacked from it: the edit went to its second layer's output,
    silently, where the line says the model's)."""
    net = _two_layers()
    model = NNsight(net)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with model.edit() as (tracer, edited):
        edited.output[:] = 0
        # (the nnsight form binds the same tracer the block records in)
        assert tracer.result is not None
    assert isinstance(edited, NNsight) and edited is not model
    with edited.trace(x):
        out = edited.output.save()
        first = edited[0].output.save()
    with model.trace(x):
        plain = model.output.save()
    assert torch.equal(out, torch.zeros(3, 2))
    with torch.no_grad():
        torch.testing.assert_close(first, net[0](x))
        torch.testing.assert_close(plain, net(x))
    with model.edit() as edited:  # the fxsight (and nnsight 0.4) form is unchanged
        edited[1].output[:] = 1
    assert isinstance(edited, NNsight)
    with edited.trace(x):
        ones = edited.output.save()
    assert torch.equal(ones, torch.ones(3, 2))


# --- sae-and-auxiliary-modules.md, pattern B: an SAE attached and routed in an edit -------
class _SAE(torch.nn.Module):
    def __init__(self, d_model, d_dict):
        super().__init__()
        self.encoder = torch.nn.Linear(d_model, d_dict)
        self.decoder = torch.nn.Linear(d_dict, d_model)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attached_sae_routed_in_an_edit_is_read_in_later_traces(gpt2, tokenizer,
                                                                 reference_hooks, backend):
    """``h.sae = sae``; ``with model.edit(inplace=True): h.output = h.sae(h.output,
    hook=True)``; then ``h.sae.encoder.output`` in a trace reads that call, each invoke
    its own rows (was: TraceError "has no output call #0")."""
    model = copy.deepcopy(gpt2)
    lm = LanguageModel(model, tokenizer=tokenizer)
    torch.manual_seed(3)
    lm.transformer.h[1].sae = _SAE(64, 256)
    sae = model.transformer.h[1].sae
    with lm.edit(inplace=True):
        acts = lm.transformer.h[1].output
        lm.transformer.h[1].output = lm.transformer.h[1].sae(acts, hook=True)
    with lm.trace(PROMPT, backend=backend):
        features = lm.transformer.h[1].sae.encoder.output.save()
        decoder_input = lm.transformer.h[1].sae.decoder.input.save()
        logits = lm.output.logits.save()
    kept = {}

    def through_sae(module, args, output):
        kept["features"] = sae.encoder(output)
        return sae(output)

    def expected_for(prompt):
        with reference_hooks(model, hooks={"transformer.h.1": through_sae}), \
                torch.no_grad():
            return model(_ids(tokenizer, prompt)).logits

    torch.testing.assert_close(logits, expected_for(PROMPT))
    torch.testing.assert_close(features, kept["features"])
    torch.testing.assert_close(decoder_input, torch.relu(kept["features"]))
    short, long = "The Colosseum is in", "The Brandenburg Gate is in the city of"
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(long):
            long_features = lm.transformer.h[1].sae.encoder.output.save()
        with tracer.invoke(short):
            short_features = lm.transformer.h[1].sae.encoder.output.save()
    expected_for(short)
    assert short_features.shape[0] == 1 and long_features.shape[0] == 1
    torch.testing.assert_close(short_features[:, -1], kept["features"][:, -1])
    expected_for(long)
    torch.testing.assert_close(long_features, kept["features"])
    assert not any(m._forward_hooks for m in model.modules()), "no hook left behind"


# --- cache.md --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_views_as_nnsights_docs_write_them(gpt2, tokenizer, reference_hooks, backend):
    """``cache.transformer.h[0].output`` (no ``model.``), ``cache[path].output`` of a module
    run at every decoding step (a list, one per step; was: AttributeError on the list of
    entries), ``non_blocking=`` (was: TypeError)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.trace(PROMPT, backend=backend) as tracer:
        cache = tracer.cache(modules=[lm.transformer.h[0]], non_blocking=False)
    kept = {}
    with reference_hooks(gpt2, hooks={"transformer.h.0": lambda m, a, o: kept.setdefault(
            "h", o)}), torch.no_grad():
        gpt2(_ids(tokenizer))
    torch.testing.assert_close(cache.transformer.h[0].output, kept["h"])
    torch.testing.assert_close(cache.model.transformer.h[0].output, kept["h"])
    with pytest.raises(IndexError, match=r"'model.transformer.h'\[7\] was not cached"):
        cache.transformer.h[7]
    with pytest.raises(AttributeError, match="'transformerr' was never cached"):
        cache.transformerr
    with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        steps = tracer.cache(modules=[lm.transformer.h[-1]], include_inputs=True)
    seen = []
    with reference_hooks(gpt2, hooks={"transformer.h.1": lambda m, a, o: seen.append(
            (a[0], o))}), torch.no_grad():
        gpt2.generate(**tokenizer([PROMPT], return_tensors="pt"), max_new_tokens=3,
                      do_sample=False)
    entries = steps["model.transformer.h.1"]
    assert len(entries) == 3 and len(entries.output) == 3 and len(entries.input) == 3
    for step, (inputs, output) in enumerate(seen):
        torch.testing.assert_close(entries.output[step], output)
        torch.testing.assert_close(entries[step].output, output)
        torch.testing.assert_close(entries.input[step], inputs)
        torch.testing.assert_close(entries.inputs[step][0][0], inputs)


class _Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(64, 64)

    def forward(self, x):
        return x + self.inner(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_holds_a_module_called_with_hook_true(gpt2, tokenizer, reference_hooks,
                                                    backend):
    """A whole-model cache holds an attached module called with ``hook=True`` and its
    submodules (was: left out, silently); one asked for by name is cached too."""
    model = copy.deepcopy(gpt2)
    lm = LanguageModel(model, tokenizer=tokenizer)
    torch.manual_seed(4)
    lm.transformer.h[1].adapter = _Adapter()
    adapter = model.transformer.h[1].adapter
    with lm.trace(PROMPT, backend=backend) as tracer:
        cache = tracer.cache(include_inputs=True)
        named = tracer.cache(modules=["model.transformer.h.1.adapter.inner"])
        acts = lm.transformer.h[1].output
        lm.transformer.h[1].output = lm.transformer.h[1].adapter(acts, hook=True)
    kept = {}

    def through(module, args, output):
        kept["h"], kept["inner"] = output, adapter.inner(output)
        return adapter(output)

    with reference_hooks(model, hooks={"transformer.h.1": through}), torch.no_grad():
        model(_ids(tokenizer))
    assert "model.transformer.h.1.adapter" in cache.keys()
    torch.testing.assert_close(cache["model.transformer.h.1.adapter"].output,
                               kept["h"] + kept["inner"])
    torch.testing.assert_close(cache["model.transformer.h.1.adapter"].input, kept["h"])
    torch.testing.assert_close(cache.transformer.h[1].adapter.inner.output, kept["inner"])
    assert list(named.keys()) == ["model.transformer.h.1.adapter.inner"]
    torch.testing.assert_close(named["model.transformer.h.1.adapter.inner"].output,
                               kept["inner"])


# --- save.md / envoy.md: envoy.modules() ----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_lists_envoys(gpt2, tokenizer, reference_hooks, backend):
    """``model.modules()`` / ``named_modules()`` are envoys, as nnsight's (was: the torch
    modules, so ``m.path`` and ``m.output`` were AttributeErrors)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.scan(PROMPT):
        paths = fxsight.save([m.path for m in lm.modules()])
    assert sorted(paths) == sorted(path for path, _ in gpt2.named_modules())
    assert paths[-1] == "" and paths.index("transformer.h.0.mlp") < \
        paths.index("transformer.h.0")  # (a module's tree before it, as nnsight's)
    named = lm.named_modules(include_fn=lambda e: isinstance(e._module, torch.nn.LayerNorm))
    assert [path for path, _ in named] == \
        [path for path, m in gpt2.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    with lm.trace(PROMPT, backend=backend):
        norms = fxsight.save({path: envoy.output for path, envoy in named})
    kept = {}
    hooks = {path: (lambda path: lambda m, a, o: kept.__setitem__(path, o))(path)
             for path, _ in named}
    with reference_hooks(gpt2, hooks=hooks), torch.no_grad():
        gpt2(_ids(tokenizer))
    assert sorted(norms) == sorted(kept)
    for path, value in kept.items():
        torch.testing.assert_close(norms[path], value)


# --- invoke-and-batching.md: the tokenizer's keywords on an invoke ----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_tokenizer_keywords_of_an_invoke_apply_to_its_tokenization(gpt2, tokenizer, backend):
    """``tracer.invoke("word " * 50, truncation=True, max_length=4)`` tokenizes with them
    (was: passed to the model's ``**kwargs`` and ignored, silently: 201 tokens ran)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    text = "word " * 50
    with lm.trace(text, truncation=True, max_length=4, backend=backend):
        alone = lm.output.logits.save()
    ids = tokenizer([text], truncation=True, max_length=4, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 4)
    with torch.no_grad():
        expected = gpt2(ids).logits
    torch.testing.assert_close(alone, expected)
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(text, truncation=True, max_length=4):
            short = lm.output.logits.save()
        with tracer.invoke("The Eiffel Tower", add_special_tokens=False):
            other = lm.output.logits.save()
    torch.testing.assert_close(short[:, -4:], expected)
    with torch.no_grad():
        torch.testing.assert_close(other[:, -1], gpt2(_ids(tokenizer, "The Eiffel Tower"))
                                   .logits[:, -1])
    with pytest.raises(fxsight.TraceError, match="truncation= is a keyword of the tokenizer"):
        with lm.trace(ids, truncation=True, backend=backend):
            pass


def test_an_edit_for_every_step_says_the_rewrite(gpt2, tokenizer):
    """``with model.edit() as (tracer, edited): for _ in tracer.iter[:]:`` (nnsight: the
    edit at every call or decoding step) is a TraceError saying what to write (was: "shapes
    are unknown before the trace has an input")."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(fxsight.TraceError, match=r"in an edit(.|\n)*write the loop in each "
                                                 r"trace(.|\n)*test_parity3.py"):
        with lm.edit() as (tracer, edited):
            for _ in tracer.iter[:]:
                edited.transformer.h[0].output[:, -1] = 0


# --- rename-modules.md: an alias that a name would shadow -------------------------------------
def test_rename_alias_that_a_name_would_shadow_is_refused(gpt2, tokenizer):
    """``rename={"lm_head": "output"}`` / ``{"lm_head": "config"}`` / ``{"mlp": "attn"}``
    raise at construction, as nnsight's (was: accepted; ``model.output`` stayed the model's
    output and ``model.config`` became the lm_head envoy, silently)."""
    for rename, match in [({"lm_head": "output"}, "name of the wrapper itself"),
                          ({"transformer.h": "config"}, "an attribute of that name"),
                          ({"mlp": "attn"}, "a submodule of that name")]:
        with pytest.raises(ValueError, match=match):
            LanguageModel(gpt2, tokenizer=tokenizer, rename=rename)
    lm = LanguageModel(gpt2, tokenizer=tokenizer, rename={"attn": "attn", "mlp": "ffn"})
    assert lm.transformer.h[0].ffn is lm.transformer.h[0].mlp
    assert lm.config is gpt2.config


# --- generate.md: called without a `with` ----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_called_without_with_returns_the_ids(gpt2, tokenizer, backend):
    """``ids = lm.generate("Hello", max_new_tokens=3)`` generates at once and returns the
    ids, as nnsight's (was: the tracer object, which nothing ran); in a ``with`` it is the
    tracer as before."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    ids = lm.generate("Hello", max_new_tokens=3, do_sample=False, backend=backend)
    with torch.no_grad():
        expected = gpt2.generate(**tokenizer(["Hello"], return_tensors="pt"),
                                 max_new_tokens=3, do_sample=False)
    assert type(ids) is torch.Tensor and torch.equal(ids, expected)
    with lm.generate("Hello", max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)

    def start(prompt):  # (a helper returning the tracer its caller enters: not run here)
        return lm.generate(prompt, max_new_tokens=3, do_sample=False, backend=backend)
    with start("Hello") as tracer:
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)


def test_loading_options_with_a_loaded_module_are_refused(gpt2, tokenizer):
    """``LanguageModel(module, torch_dtype=...)``: loading options for a module already
    loaded are a TypeError saying so (were ignored, silently: the model kept its dtype);
    ``envoys=`` of a class that is not fxsight's ``Envoy`` too (see test_parity4)."""
    with pytest.raises(TypeError, match="'torch_dtype' applies to loading a path(.|\n)*module.to"):
        LanguageModel(gpt2, tokenizer=tokenizer, torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="not a subclass of fxsight's Envoy"):
        LanguageModel(gpt2, tokenizer=tokenizer, envoys={"transformer.h.0": object})
    assert next(gpt2.parameters()).dtype == torch.float32


def test_get_fetches_an_envoy_or_a_value_by_path(gpt2, tokenizer, reference_hooks):
    """nnsight's ``model.get("transformer.h.0.mlp")`` (was: AttributeError)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    assert lm.get("transformer.h.0.mlp") is lm.transformer.h[0].mlp
    with lm.trace(PROMPT):
        value = lm.get("transformer.h.0.mlp.output").save()
    kept = {}
    with reference_hooks(gpt2, hooks={"transformer.h.0.mlp": lambda m, a, o: kept.setdefault(
            "mlp", o)}), torch.no_grad():
        gpt2(_ids(tokenizer))
    torch.testing.assert_close(value, kept["mlp"])
