"""Gradients inside traces: .grad read/assign and backward(), against torch.autograd."""

import pytest
import torch

import fxsight
from fxsight import NNsight, TraceError, patching
from models import mlp, tiny_gpt2

BACKENDS = ["fx", "hooks"]


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def _reference_grads(model, ids, paths, loss_fn, scale=None):
    """torch.autograd.grad of the loss w.r.t. module outputs, with forward hooks."""
    acts = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(
            lambda m, a, o, path=path: acts.__setitem__(path, o if torch.is_tensor(o) else o[0])))
    if scale is not None:
        path, factor = scale
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda m, a, o: o.register_hook(lambda g: g * factor) and None))
    try:
        out = model(ids, use_cache=False) if not isinstance(model, torch.nn.Sequential) \
            else model(ids)
        loss = loss_fn(out)
        return dict(zip(paths, torch.autograd.grad(loss, [acts[p] for p in paths])))
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_reads_match_autograd(gpt2, backend):
    net = NNsight(gpt2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    paths = ["transformer.h.0", "transformer.h.1.mlp", "transformer.ln_f"]
    with net.trace(ids, use_cache=False, backend=backend) as tracer:
        g0 = net.transformer.h[0].output.grad.save()
        g1 = net.transformer.h[1].mlp.output.grad.save()
        g2 = net.transformer.ln_f.output.grad.save()
        net.lm_head.output[:, -1, 5].sum().backward()
    assert tracer.backend == backend
    reference = _reference_grads(gpt2, ids, paths, lambda o: o.logits[:, -1, 5].sum())
    for got, path in zip([g0, g1, g2], paths):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, reference[path], rtol=1e-5, atol=1e-6)
        assert got.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_assignment_changes_upstream_gradients(gpt2, backend):
    net = NNsight(gpt2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with net.trace(ids, use_cache=False, backend=backend):
        g0 = net.transformer.h[0].output.grad.save()
        h1 = net.transformer.h[1].output
        h1.grad = h1.grad * 3
        with net.lm_head.output[:, -1, 7].sum().backward():
            pass
    reference = _reference_grads(gpt2, ids, ["transformer.h.0"],
                                 lambda o: o.logits[:, -1, 7].sum(),
                                 scale=("transformer.h.1", 3.0))
    torch.testing.assert_close(g0, reference["transformer.h.0"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_gradient_edit(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5)
    with net.trace(x, backend=backend):
        g1 = net.layer1.output.grad.save()
        net.layer2.output.grad[:, :5] = 0
        net.output.sum().backward()
    acts = {}
    h1 = model.layer1.register_forward_hook(lambda m, a, o: acts.__setitem__("a", o))

    def zero(m, a, o):
        def edit(g):
            g = g.clone()
            g[:, :5] = 0
            return g
        o.register_hook(edit)
    h2 = model.layer2.register_forward_hook(zero)
    out = model(x)
    reference = torch.autograd.grad(out.sum(), acts["a"])[0]
    h1.remove()
    h2.remove()
    torch.testing.assert_close(g1, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_per_invoke(gpt2, backend):
    net = NNsight(gpt2)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    with net.trace(use_cache=False, backend=backend) as tracer:
        with tracer.invoke(ids[:1]):
            ga = net.transformer.h[0].output.grad.save()
            la = net.lm_head.output[:, -1, 3].sum()
        with tracer.invoke(ids[1:]):
            gb = net.transformer.h[0].output.grad.save()
            lb = net.lm_head.output[:, -1, 3].sum()
        (la + lb).backward()
    full = _reference_grads(gpt2, ids, ["transformer.h.0"],
                            lambda o: o.logits[:, -1, 3].sum())["transformer.h.0"]
    torch.testing.assert_close(ga, full[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, full[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_compiled_gradients_equal_eager():
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5)
    results = []
    for compile in (False, True):
        with net.trace(x, compile=compile):
            g = net.layer2.output.grad.save()
            net.output.pow(2).sum().backward()
        results.append(g)
    torch.testing.assert_close(results[0], results[1])


def test_grad_errors(gpt2):
    net = NNsight(mlp())
    x = torch.randn(2, 5)
    with pytest.raises(fxsight.TraceError, match="never calls backward"):
        with net.trace(x):
            net.layer1.output.grad.save()
    with pytest.raises(fxsight.TraceError, match=r"under torch\.no_grad\(\)"):
        with torch.no_grad(), net.trace(x):
            net.layer1.output.grad.save()
            net.output.sum().backward()
    with pytest.raises(fxsight.TraceError, match=r"under torch\.inference_mode\(\)"):
        with torch.inference_mode(), net.trace(x):
            net.layer1.output.grad.save()
            net.output.sum().backward()
    with pytest.raises(fxsight.ShapeError, match="gradient"):
        with net.trace(x):
            net.layer1.output.grad = torch.zeros(3)
            net.output.sum().backward()


def test_attribution_patching_matches_manual_computation(gpt2):
    net = NNsight(gpt2)
    clean = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 1) % 128

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    result = patching.attribution(net, clean, corrupted, metric, use_cache=False)
    acts = {}
    handles = [block.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o))
               for i, block in enumerate(gpt2.transformer.h)]
    with torch.no_grad():
        gpt2(clean, use_cache=False)
    clean_acts = dict(acts)
    out = gpt2(corrupted, use_cache=False)
    grads = torch.autograd.grad(metric(out.logits).sum(), [acts[0], acts[1]])
    for handle in handles:
        handle.remove()
    expected = torch.stack([((clean_acts[i] - acts[i].detach()) * grads[i]).sum(-1).sum(0)
                            for i in range(2)])
    torch.testing.assert_close(result.values, expected, rtol=1e-5, atol=1e-6)
    assert result.sites == ["transformer.h.0", "transformer.h.1"]
    assert result.values.shape == (2, 8)


def _mlp_reference_grad(model, x, weights=None):
    """d(model(x).sum()) / d(layer1 output) (with ``weights``: the vector-Jacobian product
    of model(x) with them), by torch.autograd.grad on a plain forward."""
    acts = {}
    handle = model.layer1.register_forward_hook(lambda m, a, o: acts.__setitem__("h", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    if weights is None:
        return torch.autograd.grad(out.sum(), acts["h"])[0]
    return torch.autograd.grad(out, acts["h"], weights)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_read_recorded_after_backward(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    with net.trace(x, backend=backend):
        h = net.layer1.output
        net.output.sum().backward()
        g = h.grad.save()
    torch.testing.assert_close(g, _mlp_reference_grad(model, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_read_inside_backward_block(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    with net.trace(x, backend=backend):
        h = net.layer1.output
        with net.output.sum().backward():
            g = h.grad.save()
            doubled = (h.grad * 2).save()
    reference = _mlp_reference_grad(model, x)
    torch.testing.assert_close(g, reference)
    torch.testing.assert_close(doubled, reference * 2)


def _two_loss_reference(model, x, scale_layer2=None):
    """Gradients of two losses (output columns 0 and 1) w.r.t. layer1's output, by hand;
    ``scale_layer2``: the second loss's gradient through layer2's output is scaled."""
    acts = {}
    handles = [model.layer1.register_forward_hook(lambda m, a, o: acts.__setitem__("h", o)),
               model.layer2.register_forward_hook(lambda m, a, o: acts.__setitem__("h2", o))]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    first = torch.autograd.grad(out[:, 0].sum(), acts["h"], retain_graph=True)[0]
    if scale_layer2 is not None:
        acts["h2"].register_hook(lambda g: g * scale_layer2)
    second = torch.autograd.grad(out[:, 1].sum(), acts["h"])[0]
    return first, second


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["calls", "blocks"])
def test_two_backward_calls_give_each_its_own_gradients(backend, form):
    """A gradient read belongs to its ``with loss.backward():`` block, or to the next
    backward() call after it: the second call's reads see the second loss's gradient."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    with net.trace(x, backend=backend):
        if form == "calls":
            first = net.layer1.output.grad.save()
            net.output[:, 0].sum().backward(retain_graph=True)
            second = net.layer1.output.grad.save()
            net.output[:, 1].sum().backward()
        else:
            with net.output[:, 0].sum().backward(retain_graph=True):
                first = net.layer1.output.grad.save()
            with net.output[:, 1].sum().backward():
                second = net.layer1.output.grad.save()
    expected_first, expected_second = _two_loss_reference(model, x)
    assert not torch.allclose(expected_first, expected_second)
    torch.testing.assert_close(first, expected_first)
    torch.testing.assert_close(second, expected_second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_write_applies_to_its_own_backward_call(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    with net.trace(x, backend=backend):
        with net.output[:, 0].sum().backward(retain_graph=True):
            first = net.layer1.output.grad.save()
        with net.output[:, 1].sum().backward():
            net.layer2.output.grad = net.layer2.output.grad * 10
            second = net.layer1.output.grad.save()
    expected_first, expected_second = _two_loss_reference(model, x, scale_layer2=10)
    torch.testing.assert_close(first, expected_first)
    torch.testing.assert_close(second, expected_second)


def _written_output_reference(model, x, scale):
    """Gradients of ``model(x).sum()`` w.r.t. layer1's output as the model computed it and
    w.r.t. the value a forward hook wrote over it (``scale`` times it), by hand."""
    acts = {}

    def write(module, args, output):
        acts["computed"], acts["written"] = output, output * scale
        return acts["written"]

    handle = model.layer1.register_forward_hook(write)
    try:
        out = model(x)
    finally:
        handle.remove()
    return torch.autograd.grad(out.sum(), [acts["computed"], acts["written"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_a_read_after_a_write_is_the_written_value_s(backend):
    """``.output`` read after ``.output = v`` is ``v``, and so is its ``.grad``: the
    gradient of the written value (was: the gradient of the value the module computed,
    which the write's own computation scales)."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(6))
    with net.trace(x, backend=backend):
        before = net.layer1.output.grad.save()
        net.layer1.output = net.layer1.output * 3
        written = net.layer1.output.save()
        after = net.layer1.output.grad.save()
        net.output.sum().backward()
    d_computed, d_written = _written_output_reference(model, x, 3)
    assert not torch.allclose(d_computed, d_written)
    torch.testing.assert_close(written, model.layer1(x) * 3)
    torch.testing.assert_close(before, d_computed)
    torch.testing.assert_close(after, d_written)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_write_after_a_write_changes_the_written_value_s_gradient(backend):
    """A gradient written after ``.output = v`` is ``v``'s: it flows back through the
    write's computation to the module's own output."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    with net.trace(x, backend=backend):
        computed = net.layer1.output
        net.layer1.output = computed * 3
        written = net.layer1.output
        written.grad = written.grad + 1
        g = computed.grad.save()
        net.output.sum().backward()
    _, d_written = _written_output_reference(model, x, 3)
    torch.testing.assert_close(g, (d_written + 1) * 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_of_a_frozen_model_names_the_line(backend):
    """A frozen model (``requires_grad_(False)``) on plain inputs gives a loss that needs
    no grad: a TraceError at the backward() line says so (was: torch's bare RuntimeError,
    naming no line); writing a value that requires grad at a module makes it work."""
    model = mlp().requires_grad_(False)
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(8))
    with pytest.raises(fxsight.TraceError, match=r"does not require grad(.|\n)*"
                                                 r"at .*test_gradients.py.*backward\(\)"):
        with net.trace(x, backend=backend):
            net.layer1.output.grad.save()
            net.output.sum().backward()
    with net.trace(x, backend=backend):
        net.layer1.output = net.layer1.output.detach().requires_grad_()
        g = net.layer1.output.grad.save()
        net.output.sum().backward()
    model.requires_grad_(True)
    torch.testing.assert_close(g, _mlp_reference_grad(model, x))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_backward_names_the_line(backend):
    """torch's error from backward() (a second call without retain_graph) keeps its type
    and carries the user's line as a note."""
    net = NNsight(mlp())
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="second time") as caught:
        with net.trace(x, backend=backend):
            loss = net.output.sum()
            loss.backward()
            loss.backward()
    assert any("test_gradients.py" in note and "loss.backward()" in note
               for note in caught.value.__notes__)


def _attribution_by_hand(model, clean, corrupted, metric):
    """Attribution of every site kind of every layer, by forward hooks and
    torch.autograd.grad on the plain model: ``(kinds, layers, positions)``."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    acts, handles = {}, []

    def keep(key):
        return lambda m, a, o: acts.__setitem__(key, o if torch.is_tensor(o) else o[0])

    for i, block in enumerate(blocks):
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        handles += [block.register_forward_hook(keep(("resid", i))),
                    attn.register_forward_hook(keep(("attn", i))),
                    block.mlp.register_forward_hook(keep(("mlp", i))),
                    block.register_forward_pre_hook(
                        lambda m, a, i=i: acts.__setitem__(("resid_pre", i), a[0]))]
    try:
        with torch.no_grad():
            model(clean, use_cache=False)
        clean_acts = dict(acts)
        with torch.enable_grad():
            out = model(corrupted, use_cache=False)
            keys = [(kind, i) for kind in ["resid", "attn", "mlp", "resid_pre"]
                    for i in range(len(blocks))]
            grads = torch.autograd.grad(metric(out.logits).sum(), [acts[k] for k in keys])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([((clean_acts[k] - acts[k].detach()) * g).sum(-1).sum(0)
                        for k, g in zip(keys, grads)]).reshape(4, len(blocks), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
def test_attribution_leaves_no_parameter_grads_and_works_frozen(backend, frozen):
    """``patching.attribution`` gives the hand-computed scores of every site kind, leaves
    the parameters' ``.grad`` as they were (was: the backward pass accumulated into them,
    changing a caller's gradients) and works on a frozen model (was: a RuntimeError)."""
    from models import tiny_llama
    model = tiny_llama()
    clean = torch.randint(4, 128, (1, 7), generator=torch.Generator().manual_seed(9))
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % 128

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    expected = _attribution_by_hand(model, clean, corrupted, metric)
    own = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = own[name].clone()
    if frozen:
        model.requires_grad_(False)
    result = patching.attribution(NNsight(model), clean, corrupted, metric,
                                  sites=["resid", "attn", "mlp", "resid_pre"],
                                  use_cache=False, backend=backend)
    torch.testing.assert_close(result.values, expected, rtol=1e-5, atol=1e-6)
    assert result.values.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.requires_grad is not frozen
        torch.testing.assert_close(p.grad, own[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_a_model_output_field(gpt2, backend):
    """``.grad`` of a field of a transformers output read as an attribute
    (``.output.logits``, ``.output.last_hidden_state``), as nnsight takes it (was: a
    TraceError calling it a computed value; ``.output["logits"]`` worked)."""
    net = NNsight(gpt2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(10))
    with net.trace(ids, use_cache=False, backend=backend):
        hidden = net.transformer.output.last_hidden_state.grad.save()
        logits = net.output.logits.grad.save()
        (net.output.logits[:, -1] ** 2).sum().backward()
    acts = {}
    handle = gpt2.transformer.register_forward_hook(
        lambda m, a, o: acts.__setitem__("h", o.last_hidden_state))
    try:
        out = gpt2(ids, use_cache=False)
    finally:
        handle.remove()
    expected = torch.autograd.grad((out.logits[:, -1] ** 2).sum(),
                                   [acts["h"], out.logits])
    torch.testing.assert_close(hidden, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected[1])
    # a computed value's gradient (see test_ported_research.py) is that tensor's, as a
    # hook on it sees it: a view the loss is not computed from gets none
    with pytest.raises(fxsight.TraceError, match="never computed"):
        with net.trace(ids, use_cache=False, backend=backend):
            net.output.logits.mT.grad.save()
            net.output.logits.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_backward_and_autograd_grad(backend):
    """``torch.autograd.backward(out, g)`` in a trace is ``out.backward(g)`` (was: a
    ShapeError "backward fails on these shapes"); ``torch.autograd.grad(out, h, g)`` on
    traced values gives the gradients as a tuple, as on a plain forward (was: refused)."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(11))
    weights = torch.randn(3, 2, generator=torch.Generator().manual_seed(12))
    with net.trace(x, backend=backend):
        g = net.layer1.output.grad.save()
        torch.autograd.backward(net.output, weights)
    torch.testing.assert_close(g, _mlp_reference_grad(model, x, weights))
    model.zero_grad(set_to_none=True)
    with net.trace(x, backend=backend):
        grads = torch.autograd.grad(net.output, net.layer1.output, weights)
        first = grads[0].save()
    assert isinstance(grads, tuple) and len(grads) == 1
    torch.testing.assert_close(first, _mlp_reference_grad(model, x, weights), rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())  # (nothing accumulated)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_equals_plain_pytorch(gpt2, backend):
    """``torch.autograd.grad(loss, [h0, h1])`` in a trace equals it on a plain forward
    (forward hooks), in an invoke too (its rows), and accumulates into no parameter."""
    gpt2.zero_grad(set_to_none=True)  # (an earlier test's backward() filled them)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    paths = ["transformer.h.0", "transformer.h.1"]
    expected = _reference_grads(gpt2, ids, paths, lambda out: out.logits[:, -1, 5].sum())
    net = NNsight(gpt2)
    with net.trace(ids, use_cache=False, backend=backend):
        blocks = [net.transformer.h[0].output, net.transformer.h[1].output]
        loss = net.output.logits[:, -1, 5].sum()
        grads = [g.save() for g in torch.autograd.grad(loss, blocks)]
    for grad, path in zip(grads, paths):
        torch.testing.assert_close(grad, expected[path], rtol=0, atol=0)
    with net.trace(use_cache=False, backend=backend) as tracer:
        with tracer.invoke(ids[1:]):
            loss = net.output.logits[:, -1, 5].sum()
            (row,) = torch.autograd.grad(loss, net.transformer.h[0].output)
            row = row.save()
        with tracer.invoke(ids[:1]):
            pass
    torch.testing.assert_close(row, expected[paths[0]][1:], rtol=0, atol=0)
    assert all(p.grad is None for p in gpt2.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_options_as_in_torch(backend):
    """``retain_graph`` then ``backward()`` (the parameters' gradients as on a plain
    forward), ``create_graph`` (a gradient penalty's backward), ``allow_unused`` (None
    for an input the loss does not reach; without it, a TraceError naming the value)."""
    model = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(21))

    def plain(create_graph):
        hidden = model.layer1(x)
        rest = model.layer3(model.act2(model.layer2(model.act1(hidden))))
        loss = (rest ** 2).sum()
        (grad,) = torch.autograd.grad(loss, hidden, retain_graph=True,
                                      create_graph=create_graph)
        ((grad ** 2).sum() if create_graph else loss).backward()
        params = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return grad.detach(), params

    net = NNsight(model)
    for create_graph in (False, True):
        expected, expected_params = plain(create_graph)
        with net.trace(x, backend=backend):
            hidden = net.layer1.output
            loss = (net.output ** 2).sum()
            (grad,) = torch.autograd.grad(loss, hidden, retain_graph=True,
                                          create_graph=create_graph)
            grad = grad.save()
            ((grad ** 2).sum() if create_graph else loss).backward()
        params = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(grad.detach(), expected, rtol=0, atol=0)
        for got, want in zip(params, expected_params):
            torch.testing.assert_close(got, want)
    with net.trace(x, backend=backend):
        loss = net.layer1.output.sum()
        used, unused = torch.autograd.grad(loss, [net.layer1.output, net.output],
                                           allow_unused=True)
        used, unused = used.save(), fxsight.save(unused)
    assert unused is None and torch.equal(used, torch.ones(3, 10))
    with pytest.raises(fxsight.TraceError, match=r"gradient of model\.output.*autograd\.grad"):
        with net.trace(x, backend=backend):
            torch.autograd.grad(net.layer1.output.sum(), net.output)[0].save()


def _ln_input_reference(model, ids, edit=False):
    """The gradients of ``logits[:, -1, 3].sum()`` w.r.t. block 0's ``ln_1`` and ``ln_2``
    inputs (each also the residual its block adds back), by torch.autograd.grad; with
    ``edit``, ``ln_2``'s input is zeroed at position 0 in place, as a pre-hook would, and
    the two are the gradients of ``ln_2``'s input before the edit (what a tensor hook
    registered before it sees) and after it."""
    acts = {}

    def keep(name):
        def hook(module, args):
            acts[name] = args[0]
            if edit and name == "ln_2":
                args[0].register_hook(lambda g: acts.__setitem__("before edit", g))
                args[0][:, 0] = 0
        return hook

    block = model.transformer.h[0]
    handles = [block.ln_1.register_forward_pre_hook(keep("ln_1")),
               block.ln_2.register_forward_pre_hook(keep("ln_2"))]
    try:
        out = model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(out.logits[:, -1, 3].sum(), [acts["ln_1"], acts["ln_2"]])
    if edit:  # (torch.autograd.grad: w.r.t. the edited value)
        grads = (acts["before edit"], grads[1])
    return out.logits.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_an_input_is_the_tensor_s_from_all_its_uses(gpt2, backend):
    """``ln_2.input.grad`` is the gradient of the tensor ``ln_2`` gets, which the block
    also adds back as its residual, as torch (and nnsight's tensor hooks) give it (was: the
    gradient through ``ln_2`` only, missing the residual's)."""
    net = NNsight(gpt2)
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(13))
    with net.trace(ids, use_cache=False, backend=backend):
        first = net.transformer.h[0].ln_1.input.grad.save()
        second = net.transformer.h[0].ln_2.input.grad.save()
        block = net.transformer.h[0].input.grad.save()
        net.lm_head.output[:, -1, 3].sum().backward()
    _, (expected_first, expected_second) = _ln_input_reference(gpt2, ids)
    torch.testing.assert_close(first, expected_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, expected_second, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block, expected_first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_read_changes_no_forward_value(gpt2, backend):
    """An in-place edit of ``ln_2``'s input changes the residual too (the same tensor), with
    or without a ``.grad`` read of it (was: reading its gradient made the edit reach
    ``ln_2`` only: a copy was edited). A gradient read recorded before the edit is of the
    value before it, one recorded after the edit of the edited value, as tensor hooks
    registered where the lines run see them (was: both before)."""
    net = NNsight(gpt2)
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(14))
    with net.trace(ids, use_cache=False, backend=backend):
        net.transformer.h[0].ln_2.input[:, 0] = 0
        plain = net.lm_head.output.save()
    with net.trace(ids, use_cache=False, backend=backend):
        before = net.transformer.h[0].ln_2.input.grad.save()
        net.transformer.h[0].ln_2.input[:, 0] = 0
        after = net.transformer.h[0].ln_2.input.grad.save()
        read = net.lm_head.output.save()
        net.lm_head.output[:, -1, 3].sum().backward()
    expected, (expected_before, expected_after) = _ln_input_reference(gpt2, ids, edit=True)
    assert not torch.allclose(expected_before, expected_after)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(read, expected)
    torch.testing.assert_close(before, expected_before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, expected_after, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_an_input_that_requires_grad_leave_no_hook(backend):
    """A gradient written at the model's input (a tensor of the caller's that requires
    grad) applies once per trace, and no hook stays on the tensor after the trace."""
    model = mlp()
    net = NNsight(model)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(15)).requires_grad_()
    expected = torch.autograd.grad(model(x).sum(), x)[0]
    for _ in range(2):
        x.grad = None
        with net.trace(x, backend=backend):
            g = net.layer1.input.grad.save()
            net.layer1.input.grad = net.layer1.input.grad * 2
            net.output.sum().backward()
        torch.testing.assert_close(g, expected)
        torch.testing.assert_close(x.grad, expected * 2)
        assert not x._backward_hooks


def test_grad_taps_report_from_autograd_s_other_threads():
    """A CUDA backward calls tensor hooks on its device thread, not the one that called
    backward(): a grad tap reports to its own run's backward phase from any thread (was:
    a thread-local lookup, which found no phase there, so the gradient was never
    computed). Simulated on CPU by calling the tap's hook from another thread."""
    import threading

    from fxsight.splice.gradients import TapHooks, grad_tap, set_active_sink

    class Sink:
        def __init__(self):
            self.seen = []

        def on_grad(self, key, grad):
            self.seen.append((key, threading.get_ident()))
            return grad * 2

    value = torch.ones(3, requires_grad=True) * 1
    sink = Sink()
    with TapHooks():
        assert grad_tap(value, "site/0") is value
        set_active_sink(sink)
        (hook,) = value._backward_hooks.values()
        returned = []
        worker = threading.Thread(target=lambda: returned.append(hook(torch.ones(3))))
        worker.start()
        worker.join()
    assert [key for key, _ in sink.seen] == ["site/0"]
    assert sink.seen[0][1] != threading.get_ident()
    torch.testing.assert_close(returned[0], torch.full((3,), 2.0))
    assert not value._backward_hooks  # (removed when the run's taps end)



def _hooked_backward(model, run):
    """The gradients the full backward hooks of ``model[0]`` and ``model[2]`` see while
    ``run()`` runs (in the order they fire)."""
    seen = []
    handles = [model[i].register_full_backward_hook(
        lambda module, grad_in, grad_out, i=i: seen.append((i, grad_out[0].clone())))
        for i in (0, 2)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad()
    return seen


def _write_then_backward(net):
    net[1].input = net[0].output * 2
    net.output.sum().backward()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_a_full_backward_hook_sees_the_traces_backward_or_it_is_refused():
    """A module's full backward hook runs on the gradient of a loss from a later output,
    as in the plain backward; a loss from (or a write computed from) the hooked module's
    own ``.output`` would skip it (torch wraps the output after forward hooks), so it is
    refused before running (was: the hook silently did not run)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    net = NNsight(model)
    expected = _hooked_backward(model, lambda: (model(x) ** 2).sum().backward())

    def traced():
        with net.trace(x) as tracer:  # (auto: the hooks backend, as the hooks need)
            (net.output ** 2).sum().backward()
        assert tracer.backend == "hooks"

    seen = _hooked_backward(model, traced)
    assert [i for i, _ in seen] == [i for i, _ in expected] == [2, 0]
    for (_, got), (_, want) in zip(seen, expected):
        assert torch.equal(got, want)
    for program in (lambda: net[0].output.sum().backward(), lambda: _write_then_backward(net)):
        def refused():
            with pytest.raises(fxsight.TraceError, match=r"0\.output.*full backward hook") \
                    as error:
                with net.trace(x, backend="hooks"):
                    program()
            assert "test_gradients.py" in str(error.value)

        assert _hooked_backward(model, refused) == []  # (nothing ran)


def _block_output_reference_grad(model, ids):
    """The gradient of ``logits[:, -1, 3].sum()`` w.r.t. block 0's output, by a forward
    hook and torch.autograd.grad."""
    acts = {}
    handle = model.transformer.h[0].register_forward_hook(
        lambda m, a, o: acts.__setitem__("h0", o))
    try:
        out = model(ids, use_cache=False)
    finally:
        handle.remove()
    return torch.autograd.grad(out.logits[:, -1, 3].sum(), acts["h0"])[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["requires_grad_", "mul_", "setitem"])
def test_grad_of_a_read_changed_in_place_through_its_variable(gpt2, backend, change):
    """``h = env.output; h.requires_grad_(); h.grad`` (or after ``h.mul_(1.0)``,
    ``h[:, 0] = h[:, 0]``) is the gradient of the module's output, as with
    ``env.output.grad`` read again after the change (was: a TraceError saying `.grad` is
    not available on computed values)."""
    net = NNsight(gpt2)
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(21))
    with net.trace(ids, use_cache=False, backend=backend):
        h = net.transformer.h[0].output
        if change == "setitem":
            h[:, 0] = h[:, 0]
        else:
            getattr(h, change)(*([1.0] if change == "mul_" else []))
        grad = h.grad.save()
        net.lm_head.output[:, -1, 3].sum().backward()
    torch.testing.assert_close(grad, _block_output_reference_grad(gpt2, ids),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requires_grad_on_a_read_leaves_later_traces_alone(gpt2, backend):
    """``env.output.requires_grad_()`` in one trace changes nothing the next trace sees
    (was, on hooks: the scan's cached meta value of the output was made a leaf that
    requires grad, and an in-place edit of that output in any later trace raised
    "a view of a leaf Variable that requires grad is being used in an in-place
    operation")."""
    net = NNsight(gpt2)
    ids = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(22))
    with net.trace(ids, use_cache=False, backend=backend):
        net.transformer.h[0].output.requires_grad_()
        net.lm_head.output.save()
    with net.trace(ids, use_cache=False, backend=backend):
        net.transformer.h[0].output[:, 0] = 0
        logits = net.lm_head.output.save()
    handle = gpt2.transformer.h[0].register_forward_hook(
        lambda m, a, o: torch.cat([torch.zeros_like(o[:, :1]), o[:, 1:]], 1))
    try:
        with torch.no_grad():
            expected = gpt2(ids, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_a_row_of_a_tensor_output_says_to_index_the_gradient(backend):
    """``h[0].grad`` where ``h`` is a module's tensor output: a TraceError that says to
    index the whole tensor's gradient (was: "use an item of it (e.g. `.output[0]`)", the
    very line the user wrote)."""
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    with pytest.raises(TraceError, match=r"index it \(`h.grad\[0\]`"):
        with net.trace(x, backend=backend):
            net.layer1.output[0].grad.save()
            net.output.sum().backward()
    with net.trace(x, backend=backend):  # the rewrite
        row = net.layer1.output.grad[0].save()
        net.output.sum().backward()
    assert row.shape == (10,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_error_names_the_first_offending_line(gpt2, backend):
    """Several invokes with the same unsupported ``.grad`` (of an item inside a tensor):
    the error names the first one in the block's order, on both backends."""
    net = NNsight(gpt2)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(TraceError) as caught:
        with net.trace(backend=backend, use_cache=False) as tracer:
            with tracer.invoke(ids):
                first_line = _line_after()
                net.transformer.h[0].output[0][0].grad.save()
            for _ in range(5):
                with tracer.invoke(ids):
                    net.transformer.h[0].output[0][0].grad.save()
    assert ".grad of a part of a tensor" in str(caught.value)
    assert f":{first_line}:" in str(caught.value)


def _line_after() -> int:
    """The line number after the caller's line."""
    import inspect
    return inspect.currentframe().f_back.f_lineno + 1
