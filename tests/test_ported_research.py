"""Patterns of third-party research code written for nnsight, ported by changing the
import, each checked against the same computation written with plain PyTorch hooks.

Sources of the patterns (public repositories, paraphrased, not copied):

- sparse feature circuits (``attribution.py``: ``_pe_attrib``, ``jvp``): an SAE attached to
  a module's output in the block, ``.grad`` read and written on the values computed from it
  (its features, the residual ``x - x_hat``, the reconstruction), ``x.grad = x_recon.grad``
  to pass the gradient straight through, ``.backward(retain_graph=True)`` in a loop;
- nnsight's model-editing tutorial (0.4): an edited model's trace read through the
  original model's envoys (``with edited.trace(x): model.lm_head.output``).
"""

from __future__ import annotations

import pytest
import torch

from fxsight import NNsight, TraceError
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]
MLPS = ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def _gpt2() -> torch.nn.Module:
    return tiny_gpt2(n_layer=2, n_embd=32, n_head=2)


def _ids(batch: int = 2, tokens: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (batch, tokens), generator=torch.Generator().manual_seed(seed))


class SAE(torch.nn.Module):
    """A small sparse autoencoder, ``forward(x, output_features=True)`` as
    dictionary_learning's returns ``(x_hat, f)``."""

    def __init__(self, seed: int, width: int = 32, features: int = 48):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.encoder = torch.nn.Parameter(torch.randn(width, features, generator=generator) / 4)
        self.decoder = torch.nn.Parameter(torch.randn(features, width, generator=generator) / 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.encoder)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.decoder

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        return (self.decode(f), f) if output_features else self.decode(f)


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5] - logits[:, -1, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_of_values_computed_from_an_attached_sae(backend):
    """feature circuits' attribution pass: ``.grad`` of an SAE's features and of the
    residual, read before ``backward()`` (nnsight 0.4), the residual's gradient zeroed,
    the output's gradient replaced by the reconstruction's (``x.grad = x_recon.grad``).
    Was: a TraceError (".grad ... not on computed values") on both backends."""
    model = _gpt2()
    saes = {path: SAE(seed=i) for i, path in enumerate(MLPS)}
    net = NNsight(model, backend=backend)
    grads = {}
    with net.trace(_ids()):
        for path in MLPS:
            submodule = net.get(path)
            x = submodule.output
            x_hat, f = saes[path](x, output_features=True)
            residual = x - x_hat
            grads[path] = (f.grad.save(), residual.grad.save())
            residual.grad = torch.zeros_like(residual)
            x_recon = x_hat + residual
            submodule.output = x_recon
            x.grad = x_recon.grad
        metric = _metric(net.lm_head.output).save()
        metric.sum().backward()

    seen = {}

    def attach(path):
        def hook(module, args, x):
            x_hat, f = saes[path](x, output_features=True)
            residual = x - x_hat
            f.register_hook(lambda g: seen.__setitem__((path, "f"), g))
            residual.register_hook(lambda g: seen.__setitem__((path, "res"), g))
            residual.register_hook(torch.zeros_like)
            x_recon = x_hat + residual
            x_recon.register_hook(lambda g: seen.__setitem__((path, "recon"), g))
            x.register_hook(lambda g: seen[(path, "recon")])
            return x_recon
        return hook

    handles = [model.get_submodule(p).register_forward_hook(attach(p)) for p in MLPS]
    try:
        expected = _metric(model(_ids()).logits)
        expected.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(metric, expected)
    for path in MLPS:
        torch.testing.assert_close(grads[path][0], seen[(path, "f")])
        torch.testing.assert_close(grads[path][1], seen[(path, "res")])
    assert grads[MLPS[0]][0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_computed_grads_over_several_backward_calls(backend):
    """feature circuits' ``jvp``: in a loop, the residual's gradient zeroed from its own
    gradient (``x_res.grad = zeros_like(x_res.grad)``), a feature gradient read, then
    ``g[idx].backward(retain_graph=True)``: each read is the next call's."""
    model = _gpt2()
    upstream, downstream = SAE(seed=0), SAE(seed=1)
    right = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(9))
    picks = [(0, 4, 3), (0, 2, 7)]
    net = NNsight(model, backend=backend)
    values = {}
    with net.trace(_ids(1)):
        x = net.get(MLPS[0]).output
        x_hat, f = upstream(x, output_features=True)
        x_res = x - x_hat
        net.get(MLPS[0]).output = x_hat + x_res
        _, g = downstream(net.get(MLPS[1]).output, output_features=True)
        for pick in picks:
            x_res.grad = torch.zeros_like(x_res.grad)
            vjv = (f.grad * right).sum()
            g[pick].backward(retain_graph=True)
            values[pick] = vjv.save()

    state = {}

    def up(module, args, x):
        x_hat, f = upstream(x, output_features=True)
        x_res = x - x_hat
        f.register_hook(lambda grad: state.__setitem__("f", grad))
        x_res.register_hook(torch.zeros_like)
        return x_hat + x_res

    def down(module, args, y):
        state["g"] = downstream(y, output_features=True)[1]

    handles = [model.get_submodule(MLPS[0]).register_forward_hook(up),
               model.get_submodule(MLPS[1]).register_forward_hook(down)]
    try:
        model(_ids(1))
    finally:
        for handle in handles:
            handle.remove()
    for pick in picks:
        state["g"][pick].backward(retain_graph=True)
        torch.testing.assert_close(values[pick], (state["f"] * right).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_computed_grads_in_invokes(backend):
    """``.grad`` of a value computed in an invoke is of that invoke's rows (the tensor the
    block has), not narrowed again."""
    model = _gpt2()
    sae = SAE(seed=2)
    net = NNsight(model, backend=backend)
    submodule = net.get(MLPS[1])
    with net.trace() as tracer:
        with tracer.invoke(_ids(1, seed=1)):
            f1 = sae.encode(submodule.output)
            grad1 = f1.grad.save()
            submodule.output = sae.decode(f1)
            loss1 = net.lm_head.output[:, -1, 3].sum()
        with tracer.invoke(_ids(2, seed=2)):
            f2 = sae.encode(submodule.output)
            grad2 = f2.grad.save()
            submodule.output = sae.decode(f2)
            loss2 = net.lm_head.output[:, -1, 4].sum()
        (loss1 + 2 * loss2).backward()

    expected = []
    for ids, token, weight in ((_ids(1, seed=1), 3, 1), (_ids(2, seed=2), 4, 2)):
        seen = {}

        def hook(module, args, x):
            f = sae.encode(x)
            f.register_hook(lambda g: seen.__setitem__("f", g))
            return sae.decode(f)

        handle = model.get_submodule(MLPS[1]).register_forward_hook(hook)
        try:
            (weight * model(ids).logits[:, -1, token].sum()).backward()
        finally:
            handle.remove()
        expected.append(seen["f"])
    torch.testing.assert_close(grad1, expected[0])
    torch.testing.assert_close(grad2, expected[1])


def test_grad_of_a_value_changed_in_place_is_refused():
    """Which version of a computed value changed in place the gradient means would be a
    guess: a TraceError at the line, before anything runs."""
    net = NNsight(_gpt2())
    sae = SAE(seed=0)
    with pytest.raises(TraceError, match="changed in place"):
        with net.trace(_ids()):
            f = sae.encode(net.get(MLPS[0]).output)
            f[..., 0] = 0
            f.grad.save()
            net.get(MLPS[0]).output = sae.decode(f)
            net.lm_head.output.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_model_traced_through_the_original_envoys(backend):
    """nnsight's editing tutorial: ``with edited.trace(x): model.lm_head.output`` reads
    the edited model's run (nnsight's edited model is a shallow copy sharing the envoys).
    Was: a TraceError ("only available inside a trace")."""
    model = _gpt2()
    net = NNsight(model, backend=backend)
    with net.trace(_ids(1, seed=1)):
        hidden = net.transformer.h[1].output[:, -1, :].save()
    with net.edit() as edited:
        net.transformer.h[1].output[:, -1, :] = hidden
    with net.trace(_ids(1, seed=2)):
        original = net.lm_head.output.save()
    with edited.trace(_ids(1, seed=2)):
        modified = net.lm_head.output.save()
        also = edited.lm_head.output.save()

    expected = _last_token_patched(model, hidden, _ids(1, seed=2))
    torch.testing.assert_close(modified, expected)
    torch.testing.assert_close(also, expected)
    torch.testing.assert_close(original, model(_ids(1, seed=2)).logits)


def _last_token_patched(model, hidden, ids):
    """The logits of ``ids`` with block 1's last position set to ``hidden`` (a hook)."""
    def patch(module, args, output):
        output = output.clone()
        output[:, -1] = hidden
        return output

    handle = model.transformer.h[1].register_forward_hook(patch)
    try:
        return model(ids).logits
    finally:
        handle.remove()


def _language_model(backend: str):
    from fxsight import LanguageModel
    from models import train_tokenizer
    tokenizer = train_tokenizer()
    model = tiny_gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    return model, LanguageModel(model, tokenizer=tokenizer, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_takes_nnsights_run_options(backend):
    """``lm.generate(..., scan=False, validate=False, remote=False)`` (research code's
    ``**tracer_kwargs``) generates as without them. Was: transformers' generate got them
    (``TypeError: 'bool' object is not callable`` for ``validate=``, "model_kwargs are not
    used" for ``scan=`` and ``remote=``)."""
    model, lm = _language_model(backend)
    prompt = _ids(1, 4)
    with lm.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0,
                     scan=False, validate=False, remote=False):
        tokens = lm.generator.output.save()
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_and_trace_take_remote_false(backend):
    """``with lm.session(remote=REMOTE):`` and ``lm.trace(x, remote=False)`` with
    ``REMOTE = False`` (function-vector code run locally) run locally; on a module whose
    forward takes no ``**kwargs`` too. Was: ``session()`` a TypeError, the trace of such a
    module a TraceError ("'remote' is not a parameter")."""
    model, lm = _language_model(backend)
    with lm.session(remote=False):
        with lm.trace(_ids(1, seed=1), remote=False):
            hidden = lm.transformer.h[1].output[:, -1, :]
        with lm.trace(_ids(1, seed=2), remote=False):
            lm.transformer.h[1].output[:, -1, :] = hidden
            patched = lm.lm_head.output.save()

    torch.testing.assert_close(patched, _last_token_patched(model, hidden, _ids(1, seed=2)))
    linear = torch.nn.Linear(3, 2)
    with NNsight(linear, backend=backend).trace(torch.ones(1, 3), remote=False) as net:
        out = net.output.save()
    torch.testing.assert_close(out, linear(torch.ones(1, 3)))


def test_remote_true_is_refused_before_running():
    """``remote=True`` (nnsight: run on NDIF's servers) cannot be honoured: a TraceError at
    the line. Was: a trace of GPT-2 ran locally, ``remote=True`` passed into its forward's
    ``**kwargs`` (silently)."""
    _, lm = _language_model("auto")
    with pytest.raises(TraceError, match="NDIF"):
        with lm.trace(_ids(1), remote=True):
            lm.lm_head.output.save()
    with pytest.raises(TraceError, match="NDIF"):
        with lm.generate(_ids(1, 4), max_new_tokens=2, remote=True):
            lm.generator.output.save()
    with pytest.raises(TraceError, match="NDIF"):
        with lm.session(remote=True):
            pass


def test_apply_of_no_traced_value_between_a_sessions_traces():
    """nnsight 0.4 mask training: ``nnsight.apply(model.zero_grad)`` between a session's
    traces runs the function (the session's Python runs as it is written). Was: a
    TraceError ("no traced value among the arguments") naming no line. Inside a trace such
    a call is recorded and runs where the block calls it, as nnsight's does: after the
    block's ``backward()``, the gradients are gone (was: refused at its line)."""
    import fxsight
    model, lm = _language_model("auto")
    with lm.session():
        with lm.trace(_ids(1)):
            lm.lm_head.output.sum().backward()
        assert model.lm_head.weight.grad is not None
        fxsight.apply(model.zero_grad)
        assert model.lm_head.weight.grad is None
    with lm.trace(_ids(1)):
        lm.lm_head.output.sum().backward()
        fxsight.apply(model.zero_grad)
    assert model.lm_head.weight.grad is None
    with lm.trace(_ids(1)):
        fxsight.apply(model.zero_grad)
        lm.lm_head.output.sum().backward()
    assert model.lm_head.weight.grad is not None
