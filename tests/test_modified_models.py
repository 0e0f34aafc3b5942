"""Models as people modify them with torch's utilities: pruning (``torch.nn.utils.prune``),
weight and spectral norm (as parametrizations and the old hook-based ones), custom and
orthogonal parametrizations, dynamic quantization, fp16/bf16, and transformers models with
resized (tied or untied) embeddings, in eval and train mode.

Each trace (a read and steer, a ``.skip()``, gradients, ``tracer.cache()``, a two-invoke
patch) is checked against the plain forward with hand-written forward hooks (the module
replaced for a skip): the same values bit for bit, the model changed as the plain forward
changes it (parameters, buffers and their version counters, gradients, hook dicts,
parametrization objects, attributes), the random generator left where the plain forward
leaves it, and a later trace and plain forward still right. Where fx cannot capture (a
forward pre-hook, a TorchScript object), ``backend="fx"`` refuses naming the module and the
reason, and ``backend="auto"`` warns and runs on hooks."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import fxsight
from fxsight import LanguageModel, NNsight
from models import mlp, tiny_gpt2, tiny_llama

X1 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
X2 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))


# --- the modifications ------------------------------------------------------------------

class _Symmetric(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def _global_prune(model: nn.Module) -> None:
    prune.global_unstructured([(model.layer1, "weight"), (model.layer2, "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.4)


def _pruned_then_removed(model: nn.Module) -> None:
    prune.l1_unstructured(model.layer2, "weight", amount=0.3)
    prune.remove(model.layer2, "weight")


def _old_weight_norm(model: nn.Module) -> None:
    with warnings.catch_warnings():  # (deprecated, still used)
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(model.layer2)


# name -> (what it does to the MLP, the module fx refuses and why: None where fx captures)
MODIFIED: dict[str, tuple[Callable[[nn.Module], Any], tuple[str, str] | None]] = {
    "l1_unstructured": (lambda m: prune.l1_unstructured(m.layer2, "weight", amount=0.3),
                        ("layer2", "forward pre-hook \\(L1Unstructured\\)")),
    "random_unstructured": (
        lambda m: prune.random_unstructured(m.layer2, "weight", amount=0.3),
        ("layer2", "forward pre-hook \\(RandomUnstructured\\)")),
    "global_unstructured": (_global_prune, ("layer1", "forward pre-hook \\(CustomFromMask\\)")),
    "prune_removed": (_pruned_then_removed, None),
    "weight_norm": (lambda m: parametrizations.weight_norm(m.layer2), None),
    "spectral_norm": (lambda m: parametrizations.spectral_norm(m.layer2), None),
    "old_weight_norm": (_old_weight_norm, ("layer2", "forward pre-hook \\(WeightNorm\\)")),
    "old_spectral_norm": (lambda m: nn.utils.spectral_norm(m.layer2),
                          ("layer2", "forward pre-hook \\(SpectralNorm\\)")),
    "symmetric": (lambda m: parametrize.register_parametrization(m.layer2, "weight",
                                                                 _Symmetric()), None),
    "orthogonal": (lambda m: parametrizations.orthogonal(m.layer2), None),
    "quantize_dynamic": (
        lambda m: torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8),
        ("layer1._packed_params", "TorchScript object .*quantized")),
    "half": (lambda m: m.half(), None),
    "bfloat16": (lambda m: m.to(torch.bfloat16), None),
}


def _modified(name: str, train: bool) -> nn.Module:
    """The MLP with ``name``'s modification, the same for the same arguments (spectral
    norm's vectors and random pruning's mask are drawn from the global generator)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.ao.quantization is deprecated)
        torch.manual_seed(5)
        model = mlp()
        model = MODIFIED[name][0](model) if name == "quantize_dynamic" else \
            (MODIFIED[name][0](model), model)[1]
    return model.train(train)


def _dtype(model: nn.Module) -> torch.dtype:
    weight = model.layer3.weight if not callable(model.layer3.weight) else \
        model.layer3.weight()
    return weight.dtype if weight.is_floating_point() else torch.float32


# --- what a forward changes on the model --------------------------------------------------

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
               "_backward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")
_OWN = {"_parameters", "_buffers", "_modules", *_HOOK_DICTS}


def _tensor_state(tensor: torch.Tensor) -> tuple:
    grad = tensor.grad if tensor.is_leaf else None
    if tensor.is_quantized:
        return ("quantized", tensor.int_repr().numpy().tobytes(), tensor._version)
    return (tensor.dtype, tuple(tensor.shape), tensor.detach().float().numpy().tobytes(),
            tensor._version, tensor.requires_grad,
            None if grad is None else grad.float().numpy().tobytes())


def _state(model: nn.Module) -> dict[tuple, Any]:
    """The model's state: its tensors by value and version (comparable across two
    models), its hook dicts, attributes and parametrization objects by identity (to
    compare one model before and after)."""
    state: dict[tuple, Any] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        state[("training", path)] = module.training
        state[("children", path)] = tuple((n, id(m)) for n, m in module._modules.items())
        for name in _HOOK_DICTS:
            state[("hooks", path, name)] = tuple(
                (key, id(hook)) for key, hook in getattr(module, name).items())
        for name, value in vars(module).items():
            if name not in _OWN:
                state[("attribute", path, name)] = id(value)
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                state[("tensor", path, name)] = _tensor_state(tensor)
    return state


def _changes(before: dict, after: dict) -> set[tuple]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def _tensors(state: dict) -> dict:
    return {key: value for key, value in state.items() if key[0] == "tensor"}


@contextlib.contextmanager
def _replaced(model: nn.Module, path: str, value: torch.Tensor):
    """The forward with the module at ``path`` replaced by one returning ``value``: the
    reference of ``.skip(value)``."""
    class Skipped(nn.Module):
        def forward(self, *args, **kwargs):
            return value

    original = model.get_submodule(path)
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent)
    owner._modules[name] = Skipped()
    try:
        yield
    finally:
        owner._modules[name] = original


def _hooked(model: nn.Module, hooks: dict[str, Callable]):
    handles = [model.get_submodule(p).register_forward_hook(fn) for p, fn in hooks.items()]
    return contextlib.ExitStack() if not handles else _removed(handles)


@contextlib.contextmanager
def _removed(handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the operations: (plain reference, trace) -----------------------------------------

def _steer_plain(model, dtype):
    seen = []

    def steer(module, args, output):
        seen.append(output.detach().clone())
        return output + 0.5

    with _hooked(model, {"layer2": steer}), torch.no_grad():
        out = model(X1.to(dtype))
    return [seen[0], out]


def _steer_traced(net, dtype, backend):
    with net.trace(X1.to(dtype), backend=backend):
        h = net.layer2.output.save()
        net.layer2.output = net.layer2.output + 0.5
        out = net.output.save()
    return [h, out]


def _skip_plain(model, dtype):
    with _replaced(model, "layer2", torch.ones(3, 10, dtype=dtype)), torch.no_grad():
        return [model(X1.to(dtype))]


def _skip_traced(net, dtype, backend):
    with net.trace(X1.to(dtype), backend=backend):
        net.layer2.skip(torch.ones(3, 10, dtype=dtype))
        out = net.output.save()
    return [out]


def _grad_plain(model, dtype):
    x = X1.to(dtype).clone().requires_grad_()
    grads = []
    with _hooked(model, {"layer2": lambda m, a, o: o.register_hook(grads.append) and None}):
        model(x).sum().backward()
    return [grads[0], x.grad]


def _grad_traced(net, dtype, backend):
    x = X1.to(dtype).clone().requires_grad_()
    with net.trace(x, backend=backend):
        grad = net.layer2.output.grad.save()
        net.output.sum().backward()
    return [grad, x.grad]


_LAYERS = ("layer1", "layer2", "layer3")


def _cache_plain(model, dtype):
    seen = {}
    hooks = {p: (lambda m, a, o, p=p: seen.__setitem__(p, o.detach())) for p in _LAYERS}
    with _hooked(model, hooks), torch.no_grad():
        model(X1.to(dtype))
    return [seen[p] for p in _LAYERS]


def _cache_traced(net, dtype, backend):
    with net.trace(X1.to(dtype), backend=backend) as tracer:
        cache = tracer.cache()
    return [cache[f"model.{p}"].output for p in _LAYERS]


def _patch_plain(model, dtype):
    def patch(module, args, output):
        output = output.clone()
        output[3:] = output[:3]
        return output

    with _hooked(model, {"layer1": patch}), torch.no_grad():
        return [model(torch.cat([X1, X2]).to(dtype))[3:]]


def _patch_traced(net, dtype, backend):
    with net.trace(backend=backend) as tracer:
        with tracer.invoke(X1.to(dtype)):
            h = net.layer1.output
        with tracer.invoke(X2.to(dtype)):
            net.layer1.output = h
            out = net.output.save()
    return [out]


OPERATIONS = {"steer": (_steer_plain, _steer_traced), "skip": (_skip_plain, _skip_traced),
              "grad": (_grad_plain, _grad_traced), "cache": (_cache_plain, _cache_traced),
              "patch": (_patch_plain, _patch_traced)}


def _check_like_plain(name: str, train: bool, backend: str) -> None:
    reference, model = _modified(name, train), _modified(name, train)
    dtype = _dtype(model)
    net = NNsight(model)
    for operation, (plain, traced) in OPERATIONS.items():
        if operation == "grad" and name == "quantize_dynamic":
            continue  # (no gradient through quantized weights)
        before, reference_before = _state(model), _state(reference)
        torch.manual_seed(7)
        expected = plain(reference, dtype)
        generator = torch.get_rng_state()
        torch.manual_seed(7)
        got = traced(net, dtype, backend)
        assert torch.equal(torch.get_rng_state(), generator), operation
        for value, reference_value in zip(got, expected, strict=True):
            assert torch.equal(value, reference_value), (operation, float(
                (value.double() - reference_value.double()).abs().max()))
        after, reference_after = _state(model), _state(reference)
        assert _changes(before, after) == _changes(reference_before, reference_after), \
            operation
        assert _tensors(after) == _tensors(reference_after), operation
    # a later plain forward and trace
    with torch.no_grad():
        assert torch.equal(model(X1.to(dtype)), reference(X1.to(dtype)))
    assert all(torch.equal(a, b) for a, b in zip(_steer_traced(net, dtype, backend),
                                                 _steer_plain(reference, dtype)))
    assert _tensors(_state(model)) == _tensors(_state(reference))


@pytest.mark.parametrize("name, train", [(name, True) for name in MODIFIED] + [
    ("spectral_norm", False), ("old_spectral_norm", False)])  # (eval: no power iteration)
def test_a_modified_model_on_hooks_is_the_plain_forward(name, train):
    _check_like_plain(name, train, "hooks")


@pytest.mark.parametrize("name", [n for n, (_, refused) in MODIFIED.items() if refused is None])
def test_a_modified_model_fx_captures_is_the_plain_forward(name):
    _check_like_plain(name, True, "fx")


@pytest.mark.parametrize("name", [n for n, (_, refused) in MODIFIED.items() if refused])
def test_fx_refuses_a_modified_model_naming_the_module_and_auto_runs_it_on_hooks(name):
    path, reason = MODIFIED[name][1]
    model = _modified(name, True)
    dtype = _dtype(model)
    net = NNsight(model)
    before = _state(model)
    with pytest.raises(fxsight.CaptureError, match=f"module '{path}'.*{reason}"):
        with net.trace(X1.to(dtype), backend="fx"):
            net.output.save()
    assert _state(model) == before  # (refused before anything ran)
    with pytest.warns(RuntimeWarning, match=f"hooks backend.*module '{path}'.*{reason}"):
        with net.trace(X1.to(dtype), backend="auto") as tracer:
            out = net.output.save()
    reference = _modified(name, True)
    with torch.no_grad():
        assert tracer.backend == "hooks" and torch.equal(out, reference(X1.to(dtype)))


# --- regressions ------------------------------------------------------------------------

class _Twice(nn.Module):
    """One spectral-normed (hook-based) layer called twice."""

    def __init__(self):
        super().__init__()
        self.layer = nn.utils.spectral_norm(nn.Linear(4, 4))

    def forward(self, x):
        return self.layer(self.layer(x))


def test_a_skipped_call_runs_none_of_torchs_weight_reparametrization_hooks():
    """The old ``spectral_norm``'s pre-hook updates ``weight_u``, ``weight_v`` at each call
    in train mode: a skipped call is the module replaced, which runs no hook (was: on the
    hooks backend the hook still ran, so the vectors, and every later forward, differed
    from the plain forward's); a call not skipped still runs it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Twice().train()
        torch.manual_seed(0)
        reference = _Twice().train()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.layer(x)  # (call 0; call 1, skipped, returns its input)
    net = NNsight(model)
    with net.trace(x, backend="hooks") as tracer:
        with tracer.iter[1]:
            net.layer.skip(net.layer.input)
        out = net.output.save()
    assert torch.equal(out, expected)
    for name in ("weight_u", "weight_v", "weight_orig"):
        mine, theirs = getattr(model.layer, name), getattr(reference.layer, name)
        assert torch.equal(mine, theirs) and mine._version == theirs._version, name
    hooks = list(model.layer._forward_pre_hooks.values())
    assert len(hooks) == 1 and type(hooks[0]).__name__ == "SpectralNorm"  # (put back)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
    lambda: nn.Sequential(nn.Linear(4, 4), parametrizations.spectral_norm(nn.Linear(4, 2))),
], ids=["batch_norm", "spectral_norm"])
def test_buffers_a_shape_pass_writes_keep_the_plain_forwards_version_counters(make):
    """The hooks backend learns shapes by a forward on fake tensors, in which an operation
    on real buffers alone runs for real (``num_batches_tracked += 1``, spectral norm's
    power iteration): their values were put back, but each write and its undoing bumped
    the version counters (3 bumps where the plain forward makes 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make().train()
        torch.manual_seed(0)
        reference = make().train()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference(x)
    with NNsight(model).trace(x, backend="hooks"):
        pass
    buffers = dict(reference.named_buffers())
    assert buffers
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
        assert buffer._version == buffers[name]._version, name


# --- transformers models --------------------------------------------------------------

def _gpt2_resized(vocab_size: int) -> nn.Module:
    model = tiny_gpt2(n_embd=32, vocab_size=vocab_size)  # (tied embeddings)
    model.resize_token_embeddings(vocab_size + 8)
    return model


def _llama_resized_bf16(vocab_size: int) -> nn.Module:
    model = tiny_llama(hidden_size=32, intermediate_size=64, vocab_size=vocab_size)
    model.resize_token_embeddings(vocab_size + 8)  # (untied: lm_head resized too)
    return model.to(torch.bfloat16)


LANGUAGE_MODELS = {"gpt2_resized_tied": _gpt2_resized,
                   "llama_resized_untied_bf16": _llama_resized_bf16}


def _language_model(name: str, vocab_size: int, train: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)  # (the resized rows are drawn)
        return LANGUAGE_MODELS[name](vocab_size).train(train)


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("name, train", [("gpt2_resized_tied", False),
                                         ("gpt2_resized_tied", True),
                                         ("llama_resized_untied_bf16", False)])
def test_a_resized_language_model_is_the_plain_forward(tokenizer, name, train, backend):
    """A steer, a two-invoke patch and gradients (train mode: GPT-2's dropouts draw the
    plain forward's numbers from the same seed), the tie of the embeddings kept."""
    reference = _language_model(name, len(tokenizer), train)
    model = _language_model(name, len(tokenizer), train)
    tied = _tied(model)
    assert tied == (name == "gpt2_resized_tied")
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = torch.randint(4, len(tokenizer), (4, 6), generator=torch.Generator().manual_seed(0))
    block, reference_block = _blocks(lm)[0], _blocks(reference)[0]

    def steer(module, args, output):
        output = output.clone()
        output[2:, -1] = output[:2, -1] + 0.5
        return output

    torch.manual_seed(3)
    with _removed([reference_block.register_forward_hook(steer)]):
        expected = reference(ids, use_cache=False).logits[2:]
        expected.sum().backward()
    generator = torch.get_rng_state()
    torch.manual_seed(3)
    with lm.trace(backend=backend, use_cache=False) as tracer:
        with tracer.invoke(ids[:2]):
            h = block.output[:, -1]
        with tracer.invoke(ids[2:]):
            block.output[:, -1] = h + 0.5
            logits = lm.output.logits.save()
            logits.sum().backward()
    assert tracer.backend == backend
    assert torch.equal(torch.get_rng_state(), generator)
    assert torch.equal(logits, expected)
    assert _tied(model) == tied
    for (key, parameter), (_, theirs) in zip(model.named_parameters(),
                                              reference.named_parameters(), strict=True):
        assert torch.equal(parameter, theirs) and torch.equal(parameter.grad, theirs.grad), key
    torch.manual_seed(4)
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    torch.manual_seed(4)
    with torch.no_grad():
        assert torch.equal(after, reference(ids, use_cache=False).logits)


@pytest.mark.parametrize("name", ["l1_unstructured", "spectral_norm", "old_spectral_norm",
                                  "quantize_dynamic"])
def test_a_trace_changes_the_process_as_the_plain_forward(name):
    """The whole process (torch's flags, configs, modes, generators, global hooks,
    warnings, the model's hook dicts, parametrizations and tensors; see
    ``process_state``) changed by a steering trace exactly where a plain forward with a
    steering hook changes it (after a first trace of each: what a first call sets up once
    in the process is no change of the model)."""
    from process_state import changes, describe, snapshot
    reference, model = _modified(name, True), _modified(name, True)
    dtype = _dtype(model)
    net = NNsight(model)
    for _ in range(2):
        before = snapshot(reference)
        _steer_plain(reference, dtype)
        plain = changes(before, snapshot(reference))
        before = snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (auto's fallback warning)
            _steer_traced(net, dtype, "auto")
        after = snapshot(model)
        traced = changes(before, after)
    different = set(plain) ^ set(traced)
    assert not different, "\n".join(describe(different, before, after))
