"""Models as researchers load them at scale: ``LanguageModel(path, ...)`` with a dtype, a
device map (CPU, disk offload), ``low_cpu_mem_usage``, lazily (on the meta device until the
first trace), and changed between traces.

Every trace is compared with a plain forward of the same loaded model with hand-written
forward hooks (bit-equal: the same operations in the same order), on the fx, hooks and
auto backends; the model's hooks (its own and accelerate's), its parameters' devices and
the files accelerate reads offloaded weights from are as before after each trace. A lazily
loaded model loads its weights once for every wrapper of it (an edited copy shares them),
builds its meta structure from the config it will load (``num_hidden_layers=1``), and
refuses to drop a change made to the meta structure before the weights are loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings

import pytest
import torch

from fxsight import LanguageModel
from fxsight.errors import CaptureError, TraceError
from models import saved_language_model

BACKENDS = ("fx", "hooks", "auto")
IDS = torch.tensor([[5, 17, 9, 33, 8, 21]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaded")
    return {kind: saved_language_model(root / kind, kind=kind) for kind in ("gpt2", "llama")}


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _by_hand(module: torch.nn.Module, ids: torch.Tensor = IDS):
    """Block 0's output with position 2 set to 0.5, and the logits, by a forward hook."""
    got = {}

    def patch(m, i, o):
        h = _hidden(o).clone()
        h[:, 2] = 0.5
        got["h"] = h.clone()
        return (h, *o[1:]) if isinstance(o, tuple) else h

    handle = _blocks(module)[0].register_forward_hook(patch)
    try:
        with torch.no_grad():
            logits = module(ids).logits
    finally:
        handle.remove()
    return got["h"], logits


def _traced(lm: LanguageModel, backend: str, ids: torch.Tensor = IDS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (an offloaded model: hooks)
        with torch.no_grad(), lm.trace(ids, backend=backend) as tracer:
            blocks = _blocks(lm)
            blocks[0].output[:, 2] = 0.5
            h = blocks[0].output.save()
            logits = lm.output.logits.save()
    return h, logits, tracer.backend


def _model_state(module: torch.nn.Module) -> list:
    """Hooks (torch's and accelerate's), forwards and the parameters' devices."""
    out = []
    for path, m in module.named_modules():
        d = m.__dict__
        out.append((path, d.get("_hf_hook"), d.get("forward"), d.get("_old_forward"),
                    tuple(m._forward_hooks.items()), tuple(m._forward_pre_hooks.items()),
                    tuple((n, p.device, p.dtype, p.is_meta)
                          for n, p in m.named_parameters(recurse=False))))
    return out


def _files(*folders: str) -> dict:
    """Contents and modification times of every file under ``folders``."""
    found = {}
    for folder in folders:
        for base, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    found[path] = (hashlib.sha256(f.read()).hexdigest(),
                                   os.stat(path).st_mtime_ns)
    return found


LOADINGS = {
    "bf16 device_map cpu": dict(device_map="cpu", torch_dtype=torch.bfloat16),
    "device_map auto": dict(device_map="auto", low_cpu_mem_usage=True),
    "lazy fp32": dict(),
    "disk offload": dict(device_map="auto", max_memory={"cpu": "100KB"}),
}


@pytest.mark.parametrize("loading", list(LOADINGS))
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_loaded_model_traces_as_its_plain_forward_with_hooks(saved, tmp_path, kind, loading):
    """Each backend gives the hand-written hooks' values bit for bit, and leaves the model's
    hooks, parameters and offload files as they were."""
    options = dict(LOADINGS[loading])
    if "max_memory" in options:
        options["offload_folder"] = str(tmp_path / "offload")
    lm = LanguageModel(saved[kind], dispatch=loading != "lazy fp32", **options)
    for backend in BACKENDS:
        loaded = lm.dispatched  # (a lazy model loads at its first trace)
        if loaded:
            _by_hand(lm._module)  # (a first plain forward: what it sets up is no trace's)
        before = _model_state(lm._module)
        files = _files(saved[kind], str(tmp_path))
        if loading == "disk offload":
            assert "disk" in lm._module.hf_device_map.values()
            assert next(_blocks(lm._module)[0].mlp.parameters()).is_meta
            if backend == "fx":  # (accelerate swaps the weights in: no graph can)
                with pytest.raises(CaptureError, match="accelerate offloads module"):
                    _traced(lm, backend)
                assert _model_state(lm._module) == before
                continue
        h, logits, used = _traced(lm, backend)
        if loaded:
            assert _model_state(lm._module) == before
        assert _files(saved[kind], str(tmp_path)) == files
        assert used == ("hooks" if backend == "hooks" or loading == "disk offload" else "fx")
        expected_h, expected = _by_hand(lm._module)
        assert logits.dtype == (torch.bfloat16 if "bf16" in loading else torch.float32)
        assert torch.equal(h, expected_h) and torch.equal(logits, expected)


CHANGES = {
    ".to(bfloat16)": lambda lm: lm.to(torch.bfloat16),
    ".half() then .float()": lambda lm: (lm._model.half(), lm._model.float()),
    "load_state_dict(assign=True)": lambda lm: lm._model.load_state_dict(
        {k: v * 1.5 for k, v in lm._model.state_dict().items()}, assign=True),
    "lm_head.weight = Parameter (unties)": lambda lm: setattr(
        lm._model.lm_head, "weight",
        torch.nn.Parameter(lm._model.lm_head.weight.detach() * 2)),
    "load_state_dict in place": lambda lm: lm._model.load_state_dict(
        {k: v * 0.5 for k, v in lm._model.state_dict().items()}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_model_changed_between_traces_is_never_run_with_a_stale_capture(saved, change):
    lm = LanguageModel(saved["gpt2"], dispatch=True)
    for backend in BACKENDS:
        _traced(lm, backend)  # (captured before the change)
    with torch.no_grad():
        CHANGES[change](lm)
    for backend in BACKENDS:
        h, logits, _ = _traced(lm, backend)
        expected_h, expected = _by_hand(lm._module)
        assert torch.equal(h, expected_h) and torch.equal(logits, expected), backend


def test_an_edited_copy_of_a_lazy_model_shares_its_weights(saved):
    """``model.edit()`` makes a new wrapper of the *same* module: for a model still on the
    meta device, its weights are loaded once, whichever wrapper runs first (each loaded
    its own copy: twice the memory, and a weight changed on one not seen by the other)."""
    lm = LanguageModel(saved["llama"])
    with lm.edit() as edited:
        lm.model.layers[0].output[:, 2] = 0.5
    assert not lm.dispatched and not edited.dispatched
    h, logits, _ = _traced(edited, "fx")
    with torch.no_grad(), lm.trace(IDS):
        plain = lm.output.logits.save()
    assert edited._module is lm._module
    assert not any(p.is_meta for p in lm._module.parameters())
    expected_h, expected = _by_hand(lm._module)
    assert torch.equal(h, expected_h) and torch.equal(logits, expected)
    with torch.no_grad():
        assert torch.equal(plain, lm._module(IDS).logits)  # (the original: unedited)
        lm._module.lm_head.weight.mul_(2)  # seen by both wrappers
    for wrapper in (lm, edited):
        h, logits, _ = _traced(wrapper, "fx")
        assert torch.equal(logits, _by_hand(lm._module)[1])
    # (the other order: the original runs first, the copy takes its weights)
    lm = LanguageModel(saved["llama"])
    with lm.edit() as edited:
        lm.model.layers[0].output[:, 2] = 0.5
    _traced(lm, "hooks")
    h, logits, _ = _traced(edited, "hooks")
    assert edited._module is lm._module
    assert torch.equal(logits, _by_hand(lm._module)[1])


META_CHANGES = {
    "a parameter replaced": (lambda lm: setattr(
        lm.lm_head, "weight", torch.nn.Parameter(torch.zeros(128, 64))),
        r"module 'lm_head', parameters"),
    "a module replaced": (lambda lm: setattr(lm.model.layers[0], "mlp", torch.nn.Identity()),
                          r"module 'model.layers.0.mlp' replaced"),
    ".half()": (lambda lm: lm._model.half(), r"dtype of its tensors \(now float16"),
    "a forward hook": (lambda lm: lm._model.model.layers[1].register_forward_hook(
        lambda *args: None), r"module 'model.layers.1': hooks"),
    ".train()": (lambda lm: lm._model.train(), r"training mode"),
    "requires_grad_(False)": (lambda lm: lm._model.requires_grad_(False), r"requires_grad"),
    "a config setting": (lambda lm: setattr(lm._model.config, "use_cache", False),
                         r"attribute 'use_cache'"),
}


@pytest.mark.parametrize("change", list(META_CHANGES))
def test_a_change_to_the_meta_model_before_loading_is_refused(saved, change):
    """A lazily loaded model is rebuilt from its path when its weights load: a change made
    to its meta structure before that would be lost silently (the trace ran the model as
    saved). It is refused at the trace that would load, naming the change and the line."""
    make, says = META_CHANGES[change]
    lm = LanguageModel(saved["llama"])
    make(lm)
    with pytest.raises(TraceError, match=r"changed before its weights were loaded") as error:
        with lm.trace(IDS):
            lm.output.save()
    assert re.search(says, str(error.value)), str(error.value)
    assert "test_loaded_models.py" in str(error.value)  # (the user's line)
    assert not lm.dispatched


def test_what_fxsight_does_on_the_meta_model_is_no_change(saved):
    """A scan (also one whose forward makes transformers install its output-capturing
    hooks), an edit with inputs and ``.source`` on the meta model (before the weights
    load) change nothing the load check sees; the trace then equals the plain model."""
    lm = LanguageModel(saved["llama"])
    with lm.scan(IDS):
        shape = lm.model.layers[0].output.save()
    with lm.scan(IDS, output_hidden_states=True):
        lm.output.save()
    with lm.edit(IDS, inplace=True):
        lm.model.layers[0].output[:, 2] = 0.5
    assert "self_attn" in repr(lm.model.layers[0].source)
    assert not lm.dispatched and shape.shape == (1, 6, 64)
    h, logits, _ = _traced(lm, "auto")
    expected_h, expected = _by_hand(lm._module)
    assert torch.equal(h, expected_h) and torch.equal(logits, expected)


def test_config_keywords_shape_the_meta_model_as_the_loaded_one(saved):
    """``LanguageModel(path, num_hidden_layers=1)`` (a keyword that names a config
    attribute, which ``from_pretrained`` applies) or ``config=``: the meta structure shown
    before the load is the loaded model's (it was the saved config's: two layers)."""
    from transformers import AutoConfig

    lm = LanguageModel(saved["llama"], num_hidden_layers=1, use_cache=False)
    assert not lm.dispatched
    assert len(lm._module.model.layers) == 1 and lm.config.use_cache is False
    config = AutoConfig.from_pretrained(saved["llama"])
    config.num_hidden_layers = 1
    given = LanguageModel(saved["llama"], config=config)
    assert len(given._module.model.layers) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers: the checkpoint's unused layer)
        for wrapper in (lm, given):
            h, logits, _ = _traced(wrapper, "fx")
            assert len(wrapper._module.model.layers) == 1
            expected_h, expected = _by_hand(wrapper._module)
            assert torch.equal(h, expected_h) and torch.equal(logits, expected)


def test_the_whole_model_offloaded_is_named_as_such(saved, tmp_path):
    """``device_map="auto"`` with a ``max_memory`` that fits nothing puts the whole model
    (device-map key ``''``) on disk: the reason says so (it said module 'model', the name
    of a Llama's decoder)."""
    from fxsight.capture import dispatch

    lm = LanguageModel(saved["llama"], device_map="auto", max_memory={"cpu": "100KB"},
                       offload_folder=str(tmp_path / "offload"), dispatch=True)
    assert lm._module.hf_device_map == {"": "disk"}
    path, why = dispatch.offload_reason(lm._module)
    assert path == "" and "'' (the whole model) (on 'disk') (device_map)" in why
    assert "'model'" not in why


def test_an_offloaded_model_loads_its_weights_as_a_plain_forward_does(saved, tmp_path,
                                                                      monkeypatch):
    """The offloaded weights are loaded module by module by accelerate's hooks, as in a
    plain forward, and put back on meta after each: a warm trace loads exactly what the
    plain forward loads; the first trace of a new input shape runs one more forward (the
    hooks backend's real probe of the shapes: a fake-tensor scan cannot load weights)."""
    import accelerate.hooks

    lm = LanguageModel(saved["llama"], device_map={
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
        "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"},
        offload_folder=str(tmp_path / "offload"), dispatch=True)
    loads = []
    real = accelerate.hooks.set_module_tensor_to_device

    def counted(module, name, device, value=None, **kwargs):
        if str(device) != "meta":
            loads.append(name)
        return real(module, name, device, value=value, **kwargs)

    monkeypatch.setattr(accelerate.hooks, "set_module_tensor_to_device", counted)
    _by_hand(lm._module)
    plain = len(loads)
    assert plain >= 18  # (every weight of both decoder layers)
    offloaded = [p for layer in lm._module.model.layers for p in layer.parameters()]
    for shape, factor in ((IDS, 2), (IDS, 1), (IDS[:, :4], 2), (IDS[:, :4], 1)):
        loads.clear()
        _traced(lm, "hooks", shape)
        assert len(loads) == factor * plain
        assert all(p.is_meta for p in offloaded)


@pytest.mark.parametrize("move, dtype", [("cpu", torch.float32), ("double", torch.float64)])
def test_a_lazy_models_device_and_dtype_moves_load_it_first(saved, move, dtype):
    """``lm.cpu()``, ``lm.double()``... on a model not loaded yet (nnsight's wrapper
    methods, as ``lm.to(...)``): the weights load first and the move applies to them
    (``lm.cpu()`` was torch's "Cannot copy out of meta tensor", ``lm.double()`` a change
    to the meta structure that the load would drop); the wrapper is returned, and its
    traces equal the plain model moved the same way."""
    lm = LanguageModel(saved["llama"])
    assert getattr(lm, move)() is lm
    assert lm.dispatched
    assert {p.dtype for p in lm._module.parameters()} == {dtype}
    assert not any(p.is_meta for p in lm._module.parameters())
    h, logits, _ = _traced(lm, "auto")
    expected_h, expected = _by_hand(lm._module)
    assert torch.equal(h, expected_h) and torch.equal(logits, expected)
