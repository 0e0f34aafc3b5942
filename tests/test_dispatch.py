"""Models dispatched by accelerate (``LanguageModel(path, device_map=..., offload_folder=...)``).

A tiny Llama saved with ``save_pretrained`` is loaded with a device map that puts one
decoder layer on "disk" (offload folder): accelerate's hooks load its weights in each
forward. Traces, generation with steering and an activation-patching sweep on that model
equal the same interventions made with plain PyTorch forward hooks on the same dispatched
model, and the undispatched model's; they run on the hooks backend with a warning saying
why, and leave accelerate's hooks as they were. A model whose modules carry accelerate
hooks that only move values between devices (a multi-GPU map without offload) is
captured on fx. On this CPU-only machine every device is the CPU: moving values between
real devices is checked only as placement logic (a written value goes to the device of
the value it replaces).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fxsight import LanguageModel, patching
from fxsight.stats import stats
from models import saved_language_model, tiny_llama

ATOL = dict(atol=1e-5, rtol=1e-5)
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    return saved_language_model(root / "llama", kind="llama"), root


@pytest.fixture(scope="module")
def dispatched(saved):
    path, root = saved
    lm = LanguageModel(path, device_map=DEVICE_MAP, offload_folder=str(root / "offload"),
                       dispatch=True)
    assert lm._module.hf_device_map["model.layers.1"] == "disk"
    assert lm._module.model.layers[1].mlp.up_proj.weight.is_meta  # really offloaded
    return lm


@pytest.fixture(scope="module")
def plain(saved):
    return LanguageModel(saved[0], dispatch=True)


def _hook_state(module: torch.nn.Module) -> list:
    """Everything accelerate and torch hang on the modules (compared by identity)."""
    out = []
    for path, m in module.named_modules():
        d = m.__dict__
        out.append((path, d.get("_hf_hook"), d.get("forward"), d.get("_old_forward"),
                    tuple(m._forward_hooks.items()), tuple(m._forward_pre_hooks.items()),
                    tuple((n, p.device, p.is_meta) for n, p in m.named_parameters(
                        recurse=False))))
    return out


def _ids():
    return torch.tensor([[5, 17, 9, 33, 8, 21]]), torch.tensor([[5, 17, 40, 33, 8, 21]])


def _with_hooks(module, hooks, fn):
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            return fn()
    finally:
        for h in handles:
            h.remove()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def test_trace_on_an_offloaded_model_equals_hooks_and_the_plain_model(dispatched, plain):
    clean, corrupted = _ids()
    module = dispatched._module
    before = _hook_state(module)
    with pytest.warns(RuntimeWarning, match=r"hooks backend.*accelerate offloads module "
                                            r"'model.layers.1' \(on 'disk'\)"):
        with dispatched.trace(clean):
            # a value read in an offloaded layer (1), kept for the next trace
            source = dispatched.model.layers[1].output.save()
    scans = stats()["scans"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (said above)
        with dispatched.trace(corrupted):
            saved0 = dispatched.model.layers[0].output.save()
            dispatched.model.layers[0].output[:, 2] = 0.5  # a cpu layer, in place
            dispatched.model.layers[1].output = source * 1.0  # into the offloaded one
            saved1 = dispatched.model.layers[1].output.save()
            normed = dispatched.model.norm.output.save()
            logits = dispatched.output.logits.save()
    assert _hook_state(module) == before  # accelerate's hooks as they were
    # (the weights accelerate swaps in each forward are no new model state: no new scan)
    assert stats()["scans"] == scans

    # the same with plain forward hooks on the same dispatched model
    got = {}

    def read1(m, i, o):
        got["source"] = _hidden(o).clone()

    _with_hooks(module, [(module.model.layers[1], read1)], lambda: module(clean))

    def patch0(m, i, o):
        h = _hidden(o).clone()
        h[:, 2] = 0.5
        got["h0"] = h.clone()  # (the saved tensor is the one edited in place after it)
        return _replace_hidden(o, h)

    def patch1(m, i, o):
        return _replace_hidden(o, got["source"] * 1.0)

    def read_norm(m, i, o):
        got["norm"] = o.clone()

    ref = _with_hooks(module, [(module.model.layers[0], patch0),
                               (module.model.layers[1], patch1),
                               (module.model.norm, read_norm)],
                      lambda: module(corrupted).logits)
    torch.testing.assert_close(source, got["source"], **ATOL)
    torch.testing.assert_close(saved0, got["h0"], **ATOL)
    torch.testing.assert_close(saved1, got["source"], **ATOL)
    torch.testing.assert_close(normed, got["norm"], **ATOL)
    torch.testing.assert_close(logits, ref, **ATOL)

    # and the undispatched model (fx) gives the same numbers
    with plain.trace(clean):
        plain_source = plain.model.layers[1].output.save()
    with plain.trace(corrupted):
        plain_saved0 = plain.model.layers[0].output.save()
        plain.model.layers[0].output[:, 2] = 0.5
        plain.model.layers[1].output = plain_source * 1.0
        plain_logits = plain.output.logits.save()
    torch.testing.assert_close(plain_source, source, **ATOL)
    torch.testing.assert_close(plain_logits, logits, **ATOL)
    torch.testing.assert_close(plain_saved0, saved0, **ATOL)
    assert not any(p.is_meta for p in plain._module.parameters())


def test_generate_with_steering_on_an_offloaded_model(dispatched, plain):
    prompt, _ = _ids()
    steer = torch.linspace(-1, 1, 64)
    module = dispatched._module
    before = _hook_state(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with dispatched.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
            with tracer.all():
                dispatched.model.layers[1].output[:, -1] += steer
            tokens = dispatched.generator.output.save()
    assert _hook_state(module) == before

    def steered(m, i, o):
        h = _hidden(o).clone()
        h[:, -1] += steer
        return _replace_hidden(o, h)

    ref = _with_hooks(module, [(module.model.layers[1], steered)],
                      lambda: module.generate(prompt, max_new_tokens=4, do_sample=False))
    assert torch.equal(tokens, ref)
    unsteered = module.generate(prompt, max_new_tokens=4, do_sample=False)
    with plain.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.all():
            plain.model.layers[1].output[:, -1] += steer
        plain_tokens = plain.generator.output.save()
    assert torch.equal(plain_tokens, tokens)
    assert not torch.equal(unsteered, tokens)  # (the steering changes the generation)


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


def test_activation_patching_sweep_on_an_offloaded_model(dispatched, plain):
    clean, corrupted = _ids()
    module = dispatched._module
    before = _hook_state(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = patching.activation_patching(dispatched, clean, corrupted, metric,
                                              sites=["resid"], progress=False)
    assert _hook_state(module) == before
    assert result.info["backend"] == "hooks"
    reference = patching.activation_patching(plain, clean, corrupted, metric,
                                             sites=["resid"], progress=False)
    torch.testing.assert_close(result.values, reference.values, **ATOL)
    assert result.values.abs().sum() > 0

    # two cells by hand with forward hooks on the dispatched model
    layers = module.model.layers
    clean_out = {}
    for layer in range(2):
        def keep(m, i, o, layer=layer):
            clean_out[layer] = _hidden(o).clone()
        _with_hooks(module, [(layers[layer], keep)], lambda: module(clean))
    base = float(_with_hooks(module, [], lambda: metric(module(corrupted).logits)))
    for layer, position in [(0, 2), (1, 5)]:
        def patch(m, i, o, layer=layer, position=position):
            h = _hidden(o).clone()
            h[:, position] = clean_out[layer][:, position]
            return _replace_hidden(o, h)
        value = float(_with_hooks(module, [(layers[layer], patch)],
                                  lambda: metric(module(corrupted).logits)))
        assert result.sel(site="resid", layer=[layer]).values.flatten()[position].item() == \
            pytest.approx(value - base, abs=1e-5)


def test_device_moving_hooks_without_offload_are_captured():
    """accelerate's AlignDevicesHook without offload (a multi-device map) only moves
    values: the model is captured through it (fx), numbers equal to plain hooks, and the
    hooks are left as they were."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    from fxsight import NNsight

    model = tiny_llama()
    ids, _ = _ids()
    for layer in model.model.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    try:
        before = _hook_state(model)
        wrapped = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            with wrapped.trace(ids, backend="fx") as tracer:
                wrapped.model.layers[0].output[:, 1] = 0.0
                h1 = wrapped.model.layers[1].output.save()
                logits = wrapped.output.logits.save()
        assert tracer.backend == "fx"
        assert _hook_state(model) == before
        got = {}

        def patch(m, i, o):
            h = _hidden(o).clone()
            h[:, 1] = 0.0
            return _replace_hidden(o, h)

        def read(m, i, o):
            got["h1"] = _hidden(o).clone()

        ref = _with_hooks(model, [(model.model.layers[0], patch), (model.model.layers[1], read)],
                          lambda: model(ids).logits)
        torch.testing.assert_close(h1, got["h1"], **ATOL)
        torch.testing.assert_close(logits, ref, **ATOL)
    finally:
        remove_hook_from_module(model, recurse=True)


def test_a_written_value_goes_to_the_device_of_the_value_it_replaces():
    """Placement logic (no second real device here: the meta device stands in)."""
    from fxsight.splice.rows import conform, splice_rows

    old = torch.empty(2, 3, device="meta")
    new = torch.ones(3)
    assert conform(new, old).device.type == "meta"
    assert conform(new, old).shape == (2, 3)
    assert splice_rows(old, torch.ones(1, 3), 0, 1, 2).device.type == "meta"
    assert conform(torch.ones(2, 3), torch.zeros(2, 3)).device.type == "cpu"


def test_offload_detection_names_the_map_entries(dispatched, plain):
    from fxsight.capture import dispatch

    assert dispatch.offloaded(plain._module) == []
    assert dispatch.offload_reason(plain._module) is None
    path, why = dispatch.offload_reason(dispatched._module)
    assert path == "model.layers.1" and "'disk'" in why
    assert all(p.startswith("model.layers.1") for p in dispatch.offloaded(dispatched._module))


def test_device_map_auto_with_max_memory(saved, plain):
    """``device_map="auto"`` with a ``max_memory`` too small for the model: accelerate puts
    the rest on disk; a trace equals the undispatched model's."""
    path, root = saved
    lm = LanguageModel(path, device_map="auto", max_memory={"cpu": "200KB"},
                       offload_folder=str(root / "offload-auto"))
    ids, _ = _ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lm.trace(ids):
            lm.model.layers[0].output[:, -1] *= 2
            h1 = lm.model.layers[1].output.save()
            logits = lm.output.logits.save()
    assert "disk" in lm._module.hf_device_map.values()
    assert any("accelerate offloads module" in str(w.message) for w in caught)
    with plain.trace(ids):
        plain.model.layers[0].output[:, -1] *= 2
        plain_h1 = plain.model.layers[1].output.save()
        plain_logits = plain.output.logits.save()
    torch.testing.assert_close(h1, plain_h1, **ATOL)
    torch.testing.assert_close(logits, plain_logits, **ATOL)


@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_logit_lens_on_offloaded_modules(backend):
    """Calling offloaded modules on a traced value (the logit lens; a whole offloaded MLP):
    the values equal the plain calls after a hooked forward, and the model is left as it
    was: meta parameters (no fake tensor left on a module), accelerate's hooks, the
    random generator. Shapes used to be learnt by running accelerate's weight loading in
    fake mode, which failed and left fake tensors as the model's parameters."""
    import accelerate

    from fxsight import NNsight

    model = accelerate.cpu_offload(tiny_llama(), execution_device="cpu")
    ids, _ = _ids()
    got = {}
    _with_hooks(model, [(model.model.layers[0], lambda m, i, o: got.setdefault("h0", o))],
                lambda: model(ids))
    with torch.no_grad():
        lens_ref = model.lm_head(model.model.norm(got["h0"]))
        mlp_ref = model.model.layers[1].mlp(got["h0"])
    before = _hook_state(model)
    rng = torch.get_rng_state()
    wrapped = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (offloaded: the hooks backend, with a warning)
        with wrapped.trace(ids, backend=backend):
            h0 = wrapped.model.layers[0].output
            lens = wrapped.lm_head(wrapped.model.norm(h0)).save()
            mlp = wrapped.model.layers[1].mlp(h0).save()
    assert torch.equal(lens, lens_ref) and torch.equal(mlp, mlp_ref)
    assert _hook_state(model) == before
    assert all(type(p) is torch.nn.Parameter and p.is_meta for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def _offload_hook_state(hook) -> dict:
    return {k: v for k, v in vars(hook).items()}


def test_cpu_offload_with_hook_on_its_execution_device_is_captured():
    """``cpu_offload_with_hook`` (a ``CpuOffload`` hook: it loads no weights, it moves the
    model to its execution device where its call finds it elsewhere): where the model is
    on that device already, its call is the plain forward, so the model is captured on fx
    (it used to run on hooks, the warning saying an AlignDevicesHook loads its weights).
    fx, hooks and plain forward hooks give the same numbers; the model, its hook and its
    tensors are left as they were; a weight changed between traces is seen."""
    import accelerate

    from fxsight import NNsight

    model, user_hook = accelerate.cpu_offload_with_hook(tiny_llama(),
                                                        execution_device=torch.device("cpu"))
    ids, _ = _ids()
    try:
        def patch(m, i, o):
            h = _hidden(o).clone()
            h[:, 1] = 0.0
            return _replace_hidden(o, h)

        got = {}
        ref = _with_hooks(model, [(model.model.layers[0], patch),
                                  (model.model.layers[1],
                                   lambda m, i, o: got.setdefault("h1", _hidden(o).clone()))],
                          lambda: model(ids).logits)
        before = _hook_state(model)
        hook_before = _offload_hook_state(model._hf_hook)
        wrapped = NNsight(model)
        values = {}
        for backend in ("fx", "hooks"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # (no fallback warning)
                with wrapped.trace(ids, backend=backend) as tracer:
                    wrapped.model.layers[0].output[:, 1] = 0.0
                    h1 = wrapped.model.layers[1].output.save()
                    logits = wrapped.output.logits.save()
            assert tracer.backend == backend
            torch.testing.assert_close(h1, got["h1"], **ATOL)
            torch.testing.assert_close(logits, ref, **ATOL)
            values[backend] = logits
            assert _hook_state(model) == before
            assert _offload_hook_state(model._hf_hook) == hook_before
        assert torch.equal(values["fx"], values["hooks"])
        with torch.no_grad():  # (the model's own tensors: a new one is seen)
            model.model.norm.weight.data = model.model.norm.weight.data * 2.0
            expected = model(ids).logits
        with wrapped.trace(ids, backend="fx"):
            logits = wrapped.output.logits.save()
        torch.testing.assert_close(logits, expected, **ATOL)
    finally:
        user_hook.remove()


def test_cpu_offload_with_hook_that_moves_says_what_it_does():
    """A ``CpuOffload`` hook that moves something at its call runs on the hooks backend
    (same numbers as the plain call), with a reason that says what the hook does (it
    used to say that an AlignDevicesHook loads the weights, from a device map)."""
    import accelerate

    from fxsight import CaptureError, NNsight

    ids, _ = _ids()
    first, first_hook = accelerate.cpu_offload_with_hook(tiny_llama(), execution_device="cpu")
    second, second_hook = accelerate.cpu_offload_with_hook(
        tiny_llama(), execution_device=torch.device("cpu"), prev_module_hook=first_hook)
    try:
        for model, says in ((first, r"moves the module and the call's inputs to its "
                                    r"execution device \('cpu'"),
                            (second, r"offloads the previous model of its pipeline "
                                     r"\(prev_module_hook\)")):
            with torch.no_grad():
                expected = model(ids).logits
            before = _hook_state(model)
            wrapped = NNsight(model)
            with pytest.raises(CaptureError, match=says) as error:
                with wrapped.trace(ids, backend="fx"):
                    wrapped.output.logits.save()
            assert "AlignDevicesHook" not in str(error.value)
            assert "CpuOffload hook (cpu_offload_with_hook) on module 'model'" in \
                str(error.value)
            with pytest.warns(RuntimeWarning, match=says):
                with wrapped.trace(ids) as tracer:
                    logits = wrapped.output.logits.save()
            assert tracer.backend == "hooks"
            torch.testing.assert_close(logits, expected, **ATOL)
            assert _hook_state(model) == before
    finally:
        second_hook.remove()
        first_hook.remove()


def test_the_weights_digest_of_a_disk_offloaded_model_is_the_plain_models(dispatched, plain):
    """A checkpoint's weights digest reads an offloaded layer's values from accelerate's
    weights_map (the offload folder), as its forward loads them: the same model dispatched
    with a disk offload and loaded whole has one digest, and a checkpoint of one resumes
    with the other (its configuration, what else decides the forward, is the plain
    model's too: the device map is where the model is, not how it computes)."""
    from fxsight.experiments.configuration import differences, model_configuration
    from fxsight.experiments.weights import weights_digest
    assert dispatched._module.model.layers[1].mlp.up_proj.weight.is_meta
    assert weights_digest(dispatched._module) == weights_digest(plain._module)
    offloaded, whole = (model_configuration(m._module) for m in (dispatched, plain))
    assert offloaded == whole, differences(whole, offloaded)
