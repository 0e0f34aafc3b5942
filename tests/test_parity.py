"""nnsight scripts that port unchanged: device moves, error classes, cache with skip,
rename=, submodules named like envoy properties; against hand-written hooks."""

import pytest
import torch

import fxsight
from fxsight import NNsight
from models import mlp

BACKENDS = ["fx", "hooks"]


def _layer1_output(model, x):
    got = {}
    handle = model.layer1.register_forward_hook(lambda m, a, o: got.__setitem__("h", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return got["h"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("move, dtype", [
    (lambda h: h.cpu(), torch.float32),
    (lambda h: h.to("cpu"), torch.float32),
    (lambda h: h.to(torch.device("cpu"), torch.float64), torch.float64),
    (lambda h: h.to(device="cpu", dtype=torch.float16), torch.float16),
    (lambda h: h.detach().cpu().clone(), torch.float32),
], ids=["cpu", "to_str", "to_device_dtype", "to_kwargs", "detach_cpu_clone"])
def test_device_moves_on_traced_values(backend, move, dtype):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    with net.trace(x, backend=backend):
        moved = move(net.layer1.output)
        shape = moved.shape
        doubled = (moved * 2).save()
        moved = moved.save()
    expected = _layer1_output(model, x).to(dtype)
    assert shape == expected.shape
    assert moved.dtype == dtype and moved.device.type == "cpu"
    torch.testing.assert_close(moved, expected)
    torch.testing.assert_close(doubled, expected * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_grad_is_accepted(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    with net.trace(x, backend=backend):
        h = net.layer1.output
        assert h.retain_grad() is None
        g = h.grad.save()
        net.output.sum().backward()
    acts = {}
    handle = model.layer1.register_forward_hook(lambda m, a, o: acts.__setitem__("h", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(g, torch.autograd.grad(out.sum(), acts["h"])[0])


# --- error classes: fxsight errors are also the built-in a script may catch ----------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_index_out_of_range_is_an_index_error(backend):
    net = NNsight(mlp())
    x = torch.randn(3, 5)
    for kind in (IndexError, fxsight.ShapeError, fxsight.ShapeIndexError):
        with pytest.raises(kind, match=r"index 999 is out of bounds(.|\n)*h\[999\]"):
            with net.trace(x, backend=backend):
                h = net.layer1.output
                h[999].save()
    with pytest.raises(fxsight.ShapeError) as info:  # other shape errors are not IndexErrors
        with net.trace(x, backend=backend):
            (net.layer1.output @ torch.ones(3, 3)).save()
    assert not isinstance(info.value, IndexError)


def test_token_index_out_of_range_is_an_index_error():
    from models import tiny_gpt2, train_tokenizer
    tokenizer = train_tokenizer()
    lm = fxsight.LanguageModel(tiny_gpt2(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    for kind in (IndexError, fxsight.TraceError, fxsight.TokenIndexError):
        with pytest.raises(kind, match="token index 99 is past the end of prompt 0"):
            with lm.trace("The cat sat"):
                lm.lm_head.output.t[99].save()


# --- tracer.cache() with .skip() -------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_with_skip(core_gpt2, core_ids, reference_hooks, backend):
    net = NNsight(core_gpt2)
    skipped = "transformer.h.0.mlp"
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        net.transformer.h[0].mlp.skip(net.transformer.h[0].mlp.input * 2)
        cache = tracer.cache()
    # reference: the skipped module's forward replaced by one returning the skip value
    expected = {}

    def keep(path):
        def hook(module, args, output):
            expected[f"model.{path}" if path else "model"] = output
        return hook

    hooks = {path: keep(path) for path, _ in core_gpt2.named_modules()
             if not path.startswith(skipped)}
    hooks[skipped] = lambda m, args, output: expected.__setitem__(
        f"model.{skipped}", args[0] * 2) or args[0] * 2
    with reference_hooks(core_gpt2, hooks=hooks), torch.no_grad():
        core_gpt2(core_ids, use_cache=False)
    assert not [k for k in cache if k.startswith(f"model.{skipped}.")]
    assert sorted(cache) == sorted(expected)
    for key, value in expected.items():
        got = cache[key].output
        if key == "model":
            torch.testing.assert_close(got.logits, value.logits)
        else:
            torch.testing.assert_close(got, value)


# --- rename= on the wrapper --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_rename_aliases_envoys_and_cache_keys(core_gpt2, core_ids, reference_hooks, backend):
    net = NNsight(core_gpt2, rename={"transformer.h": "layers", "mlp": "ffn"})
    with net.trace(core_ids, use_cache=False, backend=backend) as tracer:
        ffn = net.layers[0].ffn.output.save()
        net.layers[1].ffn.output = net.layers[1].ffn.output * 0
        out = net.output.logits.save()
        cache = tracer.cache(modules=[net.layers[0].ffn, net.transformer.h[1].mlp])
    assert net.layers[0].ffn.path == "transformer.h.0.mlp"
    assert net.layers[1] is net.transformer.h[1]
    got = {}
    hooks = {"transformer.h.0.mlp": lambda m, a, o: got.__setitem__("ffn", o),
             "transformer.h.1.mlp": lambda m, a, o: o * 0}
    with reference_hooks(core_gpt2, hooks=hooks), torch.no_grad():
        expected = core_gpt2(core_ids, use_cache=False).logits
    torch.testing.assert_close(ffn, got["ffn"])
    torch.testing.assert_close(out, expected)
    assert sorted(cache.keys()) == ["model.transformer.h.0.mlp", "model.transformer.h.1.mlp"]
    # every other spelling of each key (aliases compose through ancestors)
    assert sorted(cache.keys(alias=True)) == sorted(
        f"model.{head}.{i}.{tail}" for i in (0, 1) for head, tail in
        [("layers", "ffn"), ("layers", "mlp"), ("transformer.h", "ffn")])
    torch.testing.assert_close(cache["model.layers.0.ffn"].output, got["ffn"])
    torch.testing.assert_close(cache.model.layers[0].ffn.output, got["ffn"])


# --- a submodule named like an envoy attribute (BERT's BertLayer.output) ----------------------
@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(config).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_submodule_named_output_is_reached_by_item(tiny_bert, reference_hooks, backend):
    net = NNsight(tiny_bert)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    layer = net.encoder.layer[0]
    assert layer["output"]._module is tiny_bert.encoder.layer[0].output
    assert layer["output"].path == "encoder.layer.0.output"
    assert "reached by item" in repr(layer)
    with net.trace(ids, backend=backend):
        sub = layer["output"].output.save()  # the BertOutput module's output
        whole = layer.output.save()  # the BertLayer's own output
        layer["output"].dense.output = layer["output"].dense.output * 0.5
        last = net.output.last_hidden_state.save()
    got = {}
    hooks = {"encoder.layer.0.output": lambda m, a, o: got.__setitem__("sub", o),
             "encoder.layer.0": lambda m, a, o: got.__setitem__("whole", o),
             "encoder.layer.0.output.dense": lambda m, a, o: o * 0.5}
    with reference_hooks(tiny_bert, hooks=hooks), torch.no_grad():
        expected = tiny_bert(ids).last_hidden_state
    torch.testing.assert_close(sub, got["sub"])
    whole_ref = got["whole"]
    torch.testing.assert_close(whole[0] if isinstance(whole, tuple) else whole,
                               whole_ref[0] if isinstance(whole_ref, tuple) else whole_ref)
    torch.testing.assert_close(last, expected)
    with pytest.raises(KeyError, match=r"has no submodule .*outptu"):
        layer["outptu"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_models_modules_through_the_tracer_as_nnsights_docs_write_them(backend):
    """``with NNsight(model).trace(x) as model: model.layer2.input.save()`` (nnsight's
    models page) reads the wrapped model's modules through the tracer; a name neither
    has is an AttributeError naming both (was: AttributeError on the tracer)."""
    model = mlp()
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    with NNsight(model).trace(x, backend=backend) as traced:
        hidden = traced.layer1.output.save()
        output = traced.output.save()
    assert torch.equal(hidden, _layer1_output(model, x))
    with torch.no_grad():
        assert torch.equal(output, model(x))
    assert NNsight(model)._model is model  # (nnsight's name for the wrapped module)
    with pytest.raises(AttributeError, match="'Tracer' object has no attribute 'layer9'"):
        with NNsight(model).trace(x, backend=backend) as traced:
            traced.layer9.output.save()
    with pytest.raises(AttributeError, match=r"tracer\.next\(\) is `with tracer\.iter"):
        with NNsight(model).trace(x, backend=backend) as traced:
            traced.next()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracer_log_prints_real_values_after_the_run(capsys, backend):
    """nnsight's ``tracer.log(...)`` prints its values once they exist: traced values as
    the real tensors (was: AttributeError, 'Tracer' object has no attribute 'log')."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    with net.trace(x, backend=backend) as tracer:
        h = net.layer1.output
        tracer.log("first", h.shape, h[0, :2])
        tracer.log([h.sum()])
        out = net.output.save()
    expected = model.layer1(x)  # (with autograd on, as in the trace: grad_fn shown)
    assert capsys.readouterr().out == \
        f"first {expected.shape} {expected[0, :2]}\n{[expected.sum()]}\n"
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("method", ["next", "all"])
def test_nnsight_envoy_step_methods_say_the_rewrite(method):
    """nnsight 0.4's ``envoy.next()`` / ``envoy.all()`` raise an AttributeError naming the
    tracer form to use and the user's line (was: "has no submodule or attribute 'next';
    its submodules are: (none)"). ``envoy.all()`` is a method now (``with envoy.all():``
    in ``lm.generate``, see test_parity6): used as a value in a trace, a TraceError."""
    net = NNsight(mlp())
    error, named = (AttributeError, "envoy.next") if method == "next" else \
        (fxsight.TraceError, "model.layer1.all")
    with pytest.raises(error, match=rf"{named}\(\)(.|\n)*tracer\."
                                    rf"(.|\n)*test_parity.py"):
        with net.trace(torch.ones(1, 5)):
            getattr(net.layer1, method)().output.save()
