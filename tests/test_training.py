"""Models in training configurations: gradient checkpointing, scripted submodules.

Each behaviour is checked against the same intervention done by hand in plain PyTorch
(forward hooks, a plain backward)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fxsight import NNsight, TraceError
from models import tiny_gpt2

IDS = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))


def _checkpointed_gpt2():
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (renamed in transformers 6)
        model.gradient_checkpointing_enable()
    return model.train()


def _plain_grads(model, path, factor):
    """Parameter gradients of ``logits.sum()`` with ``path``'s output scaled by a hook."""
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: o * factor)
    try:
        torch.manual_seed(0)
        model(IDS, use_cache=False).logits.sum().backward()
    finally:
        handle.remove()
    return {name: p.grad for name, p in model.named_parameters()}


def _writing(net, envoy, backward=True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback to hooks: transformers' input hook)
        with net.trace(IDS, use_cache=False) as tracer:
            envoy.output = envoy.output * 2
            if backward:
                net.output.logits.sum().backward()
    return tracer


def test_a_write_inside_a_checkpointed_layer_is_refused_before_running():
    """The backward pass reruns a checkpointed layer's forward, where a plain hook writes
    its value again and fxsight's hooks did not: the parameter gradients were those of the
    unwritten values (off by ~40), silently."""
    model = _checkpointed_gpt2()
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"(?s)transformer\.h\.0\.ln_1\.output, inside "
                       r"model\.transformer\.h\.0.*checkpointed.*test_training\.py"):
        _writing(net, net.transformer.h[0].ln_1)
    assert all(p.grad is None for p in model.parameters())  # (nothing ran)
    with pytest.raises(TraceError, match="checkpointed"):  # (a backward after the trace)
        _writing(net, net.transformer.h[1].mlp, backward=False)


def test_a_write_of_a_checkpointed_layers_output_gives_the_plain_gradients():
    """The layer's own hooks run outside its checkpoint: a write there is made once, as a
    plain hook's is, and the gradients are the plain ones (also without checkpointing)."""
    net = NNsight(_checkpointed_gpt2())
    _writing(net, net.transformer.h[0])
    reference = _plain_grads(tiny_gpt2().train(), "transformer.h.0", 2)
    for name, param in net._model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-6)


def test_a_write_inside_a_checkpointed_layer_runs_where_nothing_is_checkpointed():
    """Without gradients (or in eval mode) the layer is not checkpointed: the write runs."""
    net = NNsight(_checkpointed_gpt2())
    plain = tiny_gpt2().train()
    handle = plain.transformer.h[0].ln_1.register_forward_hook(lambda m, a, o: o * 2)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = plain(IDS, use_cache=False).logits
    handle.remove()
    torch.manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback to hooks)
        with net.trace(IDS, use_cache=False):
            net.transformer.h[0].ln_1.output = net.transformer.h[0].ln_1.output * 2
            logits = net.output.logits.save()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


@pytest.mark.parametrize("path", ["1", ""])
def test_a_scripted_module_is_refused_when_wrapped_naming_it(path):
    """A ``torch.jit.script``ed module runs in TorchScript: torch refuses forward hooks on
    it ("not supported on ScriptModules") and no capture sees its calls. Every trace of a
    model holding one failed with a bare RuntimeError of fxsight's state check
    ("dict_version expects a dict"), naming nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.jit.script(_Block()))
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        model[1].register_forward_hook(lambda m, a, o: None)  # (the plain reference)
    model = model if path else torch.jit.script(model)
    label = "model.1" if path else "model"
    with pytest.raises(TypeError, match=rf"{label} is a TorchScript module"):
        NNsight(model)


class _CheckpointedNet(torch.nn.Module):
    """A forward that checkpoints a block itself (``torch.utils.checkpoint``)."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def test_a_write_inside_torch_checkpoint_is_refused_on_hooks_and_right_on_fx():
    """The hooks backend's write inside a block the forward checkpoints was missing from the
    backward's rerun of the block: parameter gradients off by ~1, silently. The fx graph holds
    the block's operations once (no rerun): its gradients are the plain hook's."""
    torch.manual_seed(0)
    model = _CheckpointedNet()
    x = torch.randn(4, 8)
    reference = _CheckpointedNet()
    reference.load_state_dict(model.state_dict())
    handle = reference.block.lin.register_forward_hook(lambda m, a, o: o * 2)
    reference(x).sum().backward()
    handle.remove()
    net = NNsight(model)
    with net.trace(x, backend="fx"):
        net.block.lin.output = net.block.lin.output * 2
        net.output.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, dict(reference.named_parameters())[name].grad)
    with pytest.raises(TraceError, match=r"(?s)block\.lin\.output.*checkpoint.*test_training"):
        with net.trace(x, backend="hooks"):
            net.block.lin.output = net.block.lin.output * 2
            net.output.sum().backward()
    with torch.no_grad(), net.trace(x, backend="hooks"):  # (nothing checkpointed)
        net.block.lin.output = net.block.lin.output * 2


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_gradient_of_another_dtype_is_refused_before_running(backend):
    """torch refuses a tensor hook that changes a gradient's dtype, in the backward pass
    ("has changed the type of value"); fxsight raised the same bare RuntimeError there,
    naming a hook '<unknown>' and no line."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4)).to(torch.bfloat16)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    handle = model[1].register_forward_hook(
        lambda m, a, o: o.register_hook(lambda g: g.float()) and None)
    with pytest.raises(RuntimeError, match="changed the type"):  # (the plain reference)
        model(x).float().sum().backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"(?s)float32 gradient cannot replace the "
                       r"gradient of 1\.output.*bfloat16.*test_training"):
        with net.trace(x, backend=backend):
            out = net[1].output
            out.grad = out.grad.float()
            net.output.float().sum().backward()
    assert all(p.grad is None for p in model.parameters())  # (nothing ran)


def _grad_free_write(m, a, o):
    with torch.no_grad():
        return o * 2


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_line_under_no_grad_or_autocast_inside_the_block_is_refused(backend):
    """A ``with torch.no_grad():`` (or autocast) block inside the trace was silently not
    applied: the lines run when the trace ends, in the trace's modes, so a value written
    from it carried gradients a plain hook's does not (``layer0.weight.grad`` set where
    the plain backward leaves it ``None``), and autocast's dtypes were not used."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x = torch.randn(5, 6)
    handle = model[1].register_forward_hook(_grad_free_write)
    model(x).sum().backward()
    handle.remove()
    assert model[0].weight.grad is None  # (the plain reference)
    model.zero_grad(set_to_none=True)
    net = NNsight(model)
    with pytest.raises(TraceError, match=r"(?s)grad.*detach.*test_training"):
        with net.trace(x, backend=backend):
            with torch.no_grad():
                net[1].output = net[1].output * 2
            net.output.sum().backward()
    with pytest.raises(TraceError, match=r"(?s)autocast.*test_training"):
        with net.trace(x, backend=backend):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net[1].output = (net[1].output @ torch.eye(8)).float()
    assert all(p.grad is None for p in model.parameters())  # (nothing ran)
    with torch.no_grad(), net.trace(x, backend=backend):  # (the trace's own mode: fine)
        net[1].output = net[1].output * 2


class _NormedCheckpointNet(torch.nn.Module):
    """A BatchNorm (its running statistics change in train mode), then a block the forward
    checkpoints itself."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(8)
        self.block = _Block()
        self.head = torch.nn.Linear(8, 2)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, self.norm(x),
                                              use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("path", ["block.lin", "block"])
def test_a_write_inside_torch_checkpoint_is_refused_before_the_forward_runs(reentrant, path):
    """The refusal came as the forward reached the write: the BatchNorm before the block
    had already updated its running statistics and the user's hooks had run. The scan sees
    which boundaries the forward reaches inside the checkpoint: nothing runs now. (The
    block's own output is inside too: its hooks run within the checkpointed call.)"""
    torch.manual_seed(0)
    model = _NormedCheckpointNet(reentrant).train()
    calls = []
    model.norm.register_forward_hook(lambda m, a, o: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net = NNsight(model)
    envoy = net.block.lin if path == "block.lin" else net.block
    with pytest.raises(TraceError, match=rf"(?s){path}\.output.*checkpoint.*test_training"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with net.trace(torch.randn(4, 8), backend="hooks"):
                envoy.output = envoy.output * 2
                net.output.sum().backward()
    assert calls == []  # (the user's hook never ran)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())


def _checkpointed_gpt2_reentrant(reentrant: bool):
    model = tiny_gpt2(n_embd=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


def test_a_gradient_inside_a_reentrant_checkpointed_layer_is_refused_naming_it():
    """A reentrant checkpoint runs the layer without gradients (and the backward reruns it
    on fresh tensors): the gradient of a value inside it is never computed. The error said
    only "the loss does not depend on it", after the forward and backward had run."""
    net = NNsight(_checkpointed_gpt2_reentrant(True))
    with pytest.raises(TraceError, match=r"(?s)gradient of transformer\.h\.0\.mlp\.output, "
                       r"inside model\.transformer\.h\.0.*use_reentrant=True.*reentrant "
                       r"checkpoint computes that code without gradients.*test_training"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with net.trace(IDS, use_cache=False):
                grad = net.transformer.h[0].mlp.output.grad.save()
                net.output.logits.sum().backward()
    assert all(p.grad is None for p in net._model.parameters())  # (nothing ran)


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_gradient_of_a_checkpointed_layers_output_is_the_plain_one(reentrant):
    """The layer's own output is outside its checkpoint: its gradient is right with either
    kind of checkpoint (checked against a plain backward without checkpointing)."""
    plain = tiny_gpt2(n_embd=32).train()
    kept = []
    plain.transformer.h[0].register_forward_hook(lambda m, a, o: (o.retain_grad(),
                                                                  kept.append(o)) and None)
    torch.manual_seed(0)
    plain(IDS, use_cache=False).logits.sum().backward()
    net = NNsight(_checkpointed_gpt2_reentrant(reentrant))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(IDS, use_cache=False):
            grad = net.transformer.h[0].output.grad.save()
            net.output.logits.sum().backward()
    torch.testing.assert_close(grad, kept[0].grad, rtol=1e-5, atol=1e-6)


def test_a_reentrant_checkpoint_in_the_forward_refuses_a_gradient_inside_it():
    """The same with a forward that checkpoints a block itself (use_reentrant=True)."""
    net = NNsight(_NormedCheckpointNet(True).train())
    with pytest.raises(TraceError, match=r"(?s)gradient of block\.lin\.output.*"
                       r"use_reentrant=True.*test_training"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with net.trace(torch.randn(4, 8), backend="hooks"):
                grad = net.block.lin.output.grad.save()
                net.output.sum().backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_an_in_place_write_of_a_checkpointed_layers_output_gives_the_plain_gradients(
        reentrant):
    """``layer.output[0][:] = ...`` (GPT2Block returns a tensor: its first row) is made
    after the checkpointed forward returns (transformers checkpoints ``forward``, not the
    hooks): the parameter gradients are those of a plain hook without checkpointing."""
    plain = tiny_gpt2(n_embd=32).train()

    def hook(module, args, output):
        output = output.clone()
        output[0][:] = output[0] * 5
        return output
    plain.transformer.h[0].register_forward_hook(hook)
    torch.manual_seed(0)
    plain(IDS, use_cache=False).logits.sum().backward()
    model = _checkpointed_gpt2_reentrant(reentrant)
    net = NNsight(model)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(IDS, use_cache=False):
            net.transformer.h[0].output[0][:] = net.transformer.h[0].output[0] * 5
            net.output.logits.sum().backward()
    reference = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name].grad, rtol=1e-5, atol=1e-6)


class _GradOnlyCheckpointNet(_NormedCheckpointNet):
    """Checkpoints its block only with gradients on, as transformers' layers do: the scan
    (run without gradients) does not see the checkpoint."""

    def forward(self, x):
        h = self.norm(torch.nn.functional.dropout(x, 0.5, self.training))
        if torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_write_refused_as_the_forward_reaches_it_leaves_the_model_as_it_was(reentrant):
    """A checkpoint the scan cannot see is refused as the forward reaches the write: the
    BatchNorm's running statistics had changed and the dropout had drawn from the global
    generator. Both are put back as they were."""
    torch.manual_seed(0)
    model = _GradOnlyCheckpointNet(reentrant).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    net = NNsight(model)
    generator = torch.random.get_rng_state()
    with pytest.raises(TraceError, match=r"(?s)block\.lin\.output.*checkpoint.*forward "
                       r"reached.*test_training"):
        with net.trace(x, backend="hooks"):
            net.block.lin.output = net.block.lin.output * 2
            net.output.sum().backward()
    assert torch.equal(torch.random.get_rng_state(), generator)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _DefaultDouble:
    """``torch.set_default_dtype(torch.float64)`` around a block."""

    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


_IGNORED_MODES = {
    "sdpa_kernel": (lambda: torch.nn.attention.sdpa_kernel(
        torch.nn.attention.SDPBackend.MATH), "attention kernels"),
    "detect_anomaly": (lambda: torch.autograd.set_detect_anomaly(True), "anomaly detection"),
    "default_dtype": (_DefaultDouble, "default dtype"),
    "cudnn": (lambda: torch.backends.cudnn.flags(enabled=False), "cuDNN settings"),
    "mkldnn": (lambda: torch.backends.mkldnn.flags(enabled=False), "oneDNN settings"),
}


def _modes():
    return (torch.get_default_dtype(), torch.is_anomaly_enabled(),
            torch.backends.cuda.flash_sdp_enabled(), torch.backends.cudnn.enabled,
            torch.backends.mkldnn.enabled)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("mode", sorted(_IGNORED_MODES))
def test_a_line_under_another_torch_mode_inside_the_block_is_refused(backend, mode):
    """``sdpa_kernel``, ``set_detect_anomaly``, a default dtype, cuDNN or oneDNN flags set
    around lines inside the trace were silently not applied: the lines run when the trace
    ends, after the mode has ended (an int tensor times 0.5 was float32, float64 in a
    plain hook under a float64 default). The reference: a plain hook runs in the mode."""
    make, words = _IGNORED_MODES[mode]
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x = torch.randn(5, 6)

    def hook(module, args, output):
        with make():
            seen.append(_modes())
    handle = model[1].register_forward_hook(hook)
    model(x)
    handle.remove()
    assert seen[0] != _modes()  # (the mode is in force in the plain hook)
    net = NNsight(model)
    with pytest.raises(TraceError, match=rf"(?s){words}.*test_training"):
        with net.trace(x, backend=backend):
            with make():
                net[1].output = net[1].output * ((net[1].output > 0).long() * 0.5).sum()
    with pytest.raises(TraceError, match=rf"(?s){words}.*test_training"):
        with net.trace(x, backend=backend):  # (a read alone: the forward runs at the end)
            with make():
                net.output.save()
    with net.trace(backend=backend) as tracer:  # (fxsight's own with-forms are no mode)
        with tracer.invoke(x):
            net[1].output = net[1].output * 2


def test_a_gradient_inside_a_reentrant_checkpoint_the_scan_cannot_see_is_refused():
    """A reentrant checkpoint called only with gradients on: the gradient read inside it
    said only "the loss does not depend on it", after the forward and backward had run
    (the BatchNorm statistics and the generator changed). Now refused as the forward
    reaches it, naming why, with both put back."""
    torch.manual_seed(0)
    model = _GradOnlyCheckpointNet(True).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net, x = NNsight(model), torch.randn(4, 8)
    generator = torch.random.get_rng_state()
    with pytest.raises(TraceError, match=r"(?s)gradient of block\.lin\.output.*"
                       r"use_reentrant=True.*forward reached.*test_training"):
        with net.trace(x, backend="hooks"):
            grad = net.block.lin.output.grad.save()
            net.output.sum().backward()
    assert torch.equal(torch.random.get_rng_state(), generator)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
