"""Pruning, tracer.stop() and env.skip(value).

- A trace that saves layer 3 of a gpt2-small-shaped model computes nothing of layers 4..11,
  the final norm or the head (asserted on the rewritten graph).
- tracer.stop(): the fx backend prunes the rest; the hooks backend stops the model after
  the last event the trace needs; anything recorded after the stop is an error.
- skip: the module does not run (its nodes are pruned on fx, its forward is not called on
  hooks) and the result equals a hand-written equivalent.
- A write of a whole value (``.input = v``, ``.output = v``, a tensor or a number) needs
  only its shape: on fx, what only computed the old value is pruned.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from fxsight import CaptureError, NNsight, OrderError, ShapeError, TraceError
from hook_references import hooked_logits
from models import mlp, tiny_gpt2

BACKENDS = ("fx", "hooks")


@pytest.fixture(scope="module")
def gpt2_small_shape():
    """GPT-2 small's shape (12 layers x 768, 12 heads), random weights, untied head (so
    the head's weight has a name of its own), small vocabulary (it only sizes the head)."""
    return tiny_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=512,
                     tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def _ids(vocab: int = 128, rows: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(4, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))


def _modules_in(graph_module) -> set[str]:
    """Every module path that a node of the graph computes in."""
    paths = set()
    for node in graph_module.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            paths.add(path)
    return paths


def _after_layer(paths: set[str], layer: int, n_layers: int) -> set[str]:
    later = tuple(f"transformer.h.{i}" for i in range(layer + 1, n_layers))
    return {p for p in paths if p.startswith(("lm_head", "transformer.ln_f")) or
            any(p == name or p.startswith(name + ".") for name in later)}


class _Counter:
    """Forward hooks counting real calls of some modules (a hand-written observer; calls on
    fake tensors, by a scan that learns shapes, do not count)."""

    def __init__(self, model, paths):
        self.calls = dict.fromkeys(paths, 0)
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p))
                        for p in paths]

    def _hook(self, path):
        def hook(module, args, output):
            if not any(isinstance(t, FakeTensor) for t in pytree.tree_leaves(output)):
                self.calls[path] += 1
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


# --- pruning -------------------------------------------------------------------------------
def test_saving_layer_3_computes_no_later_layer(gpt2_small_shape):
    module = gpt2_small_shape
    x = _ids(512, 1, 16)
    expected = {}
    hooked_logits(module, x, hooks={
        "transformer.h.3": lambda m, i, o: expected.setdefault("h3", o)})

    model = NNsight(module)
    with torch.no_grad(), model.trace(x, use_cache=False, backend="fx") as tracer:
        h3 = model.transformer.h[3].output.save()
    assert torch.equal(h3, expected["h3"])
    paths = _modules_in(tracer.graph_module)
    assert "transformer.h.3.mlp.c_proj" in paths and "transformer.wte" in paths
    assert _after_layer(paths, 3, 12) == set()
    attrs = [n.target for n in tracer.graph_module.graph.nodes if n.op == "get_attr"]
    assert attrs and not [a for a in attrs if a.startswith(
        ("lm_head", "transformer.ln_f", *(f"transformer.h.{i}." for i in range(4, 12))))]
    with pytest.raises(TraceError, match="not computed"):
        tracer.result  # noqa: B018 - the head was pruned


# --- stop --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_ends_the_forward_pass_after_the_last_needed_value(gpt2, backend):
    x = _ids()
    expected = {}
    hooked_logits(gpt2, x, hooks={
        "transformer.h.0": lambda m, i, o: expected.setdefault("h0", o)})

    # (hooks on the model run it on the hooks backend: the fx graph is inspected instead)
    counter = _Counter(gpt2, ["transformer.h.0", "transformer.h.1", "lm_head"]
                       if backend == "hooks" else [])
    try:
        model = NNsight(gpt2)
        with torch.no_grad(), model.trace(x, use_cache=False, backend=backend,
                                          prune=False) as tracer:
            h0 = model.transformer.h[0].output.save()
            tracer.stop()
    finally:
        counter.remove()
    assert tracer.backend == backend
    assert torch.equal(h0, expected["h0"])
    if backend == "hooks":
        assert counter.calls == {"transformer.h.0": 1, "transformer.h.1": 0, "lm_head": 0}
        assert not any(module._forward_hooks or module._forward_pre_hooks
                       for module in gpt2.modules())
    else:
        assert _after_layer(_modules_in(tracer.graph_module), 0, 2) == set()
    with pytest.raises(TraceError, match="tracer.stop"):
        tracer.result  # noqa: B018


@pytest.mark.parametrize("backend", BACKENDS)
def test_anything_after_a_stop_is_a_clear_error(gpt2, backend):
    model = NNsight(gpt2)
    with pytest.raises(TraceError, match=r"after tracer\.stop\(\)") as info:
        with model.trace(_ids(), use_cache=False, backend=backend) as tracer:
            model.transformer.h[0].output.save()
            tracer.stop()
            model.lm_head.output.save()
    assert "model.lm_head.output.save()" in str(info.value)  # the user's line


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_with_a_write_runs_the_write(backend):
    net = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    model = NNsight(net)
    with model.trace(x, backend=backend) as tracer:
        model.layer1.output[:] = 1.0
        h2 = model.layer2.output.save()
        tracer.stop()
    assert torch.equal(h2, net.layer2(torch.ones(3, 10)).detach())


def test_a_stop_calls_no_always_call_hook_of_a_module_still_running(gpt2):
    """(was: the hooks backend stopped the forward with an ``Exception``, so torch called
    the ``always_call=True`` hooks of every module still running, here ``transformer``'s,
    with the output ``None``: a call a plain forward up to the stop never makes)"""
    x = _ids()
    with torch.no_grad():
        reference = gpt2.transformer.h[0](gpt2.transformer.drop(
            gpt2.transformer.wte(x) + gpt2.transformer.wpe(torch.arange(x.shape[1]))))
    seen: dict[str, list] = {"transformer": [], "h0": [], "global": []}

    def observer(name):
        return lambda module, args, output: seen[name].append(output)

    handles = [gpt2.transformer.register_forward_hook(observer("transformer"),
                                                      always_call=True),
               gpt2.transformer.h[0].register_forward_hook(observer("h0"),
                                                           always_call=True),
               torch.nn.modules.module.register_module_forward_hook(
                   lambda m, a, o: seen["global"].append(o) if m is gpt2.transformer
                   else None, always_call=True)]
    try:
        model = NNsight(gpt2)
        with torch.no_grad(), model.trace(x, use_cache=False, backend="hooks") as tracer:
            h0 = model.transformer.h[0].output.save()
            tracer.stop()
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(h0[0], reference[0])
    assert seen["transformer"] == [] and seen["global"] == []  # (still running at the stop)
    assert len(seen["h0"]) == 1 and torch.equal(seen["h0"][0][0], reference[0])
    assert not any(module._forward_hooks or module._forward_pre_hooks
                   for module in gpt2.modules())
    # on fx the hooked model is refused, naming the hook
    handle = gpt2.transformer.register_forward_hook(observer("transformer"),
                                                    always_call=True)
    try:
        with pytest.raises(CaptureError, match="forward hook"):
            with model.trace(x, use_cache=False, backend="fx") as tracer:
                model.transformer.h[0].output.save()
                tracer.stop()
    finally:
        handle.remove()
    assert seen["transformer"] == []


class _Fallback(torch.nn.Module):
    """A forward that falls back to another path when its first one raises."""

    def __init__(self):
        super().__init__()
        self.fast = torch.nn.Linear(4, 4)
        self.slow = torch.nn.Linear(4, 4)
        self.register_buffer("fallbacks", torch.zeros(()))

    def forward(self, x):
        try:
            return self.fast(x)
        except Exception:
            self.fallbacks += 1
            return self.slow(x)


def test_a_stop_is_no_error_that_the_forward_handles():
    """(was: the forward's ``except Exception:`` caught the stop and ran its fallback path,
    which a plain forward never runs; the trace then ran on past the stop)"""
    net = _Fallback()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    model = NNsight(net)
    with model.trace(x, backend="hooks") as tracer:
        fast = model.fast.output.save()
        tracer.stop()
    assert torch.equal(fast, net.fast(x).detach())
    assert net.fallbacks.item() == 0
    with pytest.raises(TraceError, match="tracer.stop"):
        tracer.result  # noqa: B018


class _TrainingTail(torch.nn.Module):
    """In training, after its first layer: a BatchNorm, dropouts, a counter buffer and the
    input changed in place: what a forward leaves behind besides its output."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.first(x)
        h = self.drop(self.norm(h)) + torch.randn_like(h)
        self.calls += 1
        x.mul_(2)
        return self.head(h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prune", [True, False])
def test_a_stopped_forward_leaves_what_the_forward_up_to_the_stop_leaves(backend, prune):
    """(was: on fx the statistics, the counter, the input and the random generator were
    left as the whole forward leaves them, since pruning keeps side effects; the hooks
    backend and nnsight stop the model there)"""
    torch.manual_seed(0)
    reference, model = _TrainingTail().train(), _TrainingTail().train()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    expected = reference.first(x)  # the forward up to the stop
    generator_state = torch.get_rng_state()
    net = NNsight(model)
    given = x.clone()
    torch.manual_seed(1)
    with net.trace(given, backend=backend, prune=prune) as tracer:
        first = net.first.output.save()
        tracer.stop()
    assert tracer.backend == backend
    assert torch.equal(first, expected)
    assert torch.equal(torch.get_rng_state(), generator_state)
    assert torch.equal(given, x)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # a trace that is not stopped leaves what the whole forward leaves
    torch.manual_seed(1)
    reference(x.clone())
    generator_state = torch.get_rng_state()
    torch.manual_seed(1)
    with net.trace(x.clone(), backend=backend, prune=prune):
        net.first.output.save()
    assert torch.equal(torch.get_rng_state(), generator_state)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


class _LoopedBlock(torch.nn.Module):
    """A block with a BatchNorm and a dropout, called three times, then a dropout."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                                         torch.nn.Dropout(0.5))
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        for _ in range(3):
            x = self.block(x)
        return self.drop(x)


def _generator_state() -> torch.Tensor:
    return torch.get_rng_state().clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("skipped", ["block.1", "block.2"])
def test_a_skipped_module_draws_nothing_and_updates_no_statistics(backend, prune, skipped):
    """In training, skipping a BatchNorm or a dropout (every call) equals the forward with
    it replaced (was: on fx the skipped dropout still drew its numbers, so the next one
    drew others: a different output; a skipped BatchNorm updated its statistics)."""
    torch.manual_seed(0)
    model = _LoopedBlock().train()
    reference = _LoopedBlock().train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 4)
    reference.block[int(skipped[-1])] = torch.nn.Identity()
    torch.manual_seed(1)
    expected = reference(x)
    generator_state = _generator_state()
    net = NNsight(model)
    torch.manual_seed(1)
    with net.trace(x, backend=backend, prune=prune) as tracer:
        for _ in tracer.iter[0:3]:
            module = net.block[int(skipped[-1])]
            module.skip(module.input)
        out = net.output.save()
    assert torch.equal(out, expected)
    assert torch.equal(_generator_state(), generator_state)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_batch_norm_keeps_its_statistics(backend):
    torch.manual_seed(0)
    model = _TrainingTail().train()
    statistics = {k: v.clone() for k, v in model.norm.state_dict().items()}
    net = NNsight(model)
    with net.trace(torch.randn(6, 4), backend=backend):
        net.norm.skip(net.norm.input)
        net.output.save()
    for name, value in statistics.items():
        assert torch.equal(model.norm.state_dict()[name], value), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_one_call_of_a_block_leaves_what_the_other_calls_leave(backend):
    """(was: on fx the skipped call's ``num_batches_tracked += 1`` still ran: the graph
    chains each call's change to the last one's)"""
    torch.manual_seed(0)
    model = _LoopedBlock().train()
    reference = _LoopedBlock().train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    h = x
    for call in range(3):
        h = h * 2 if call == 1 else reference.block(h)
    expected = reference.drop(h)
    generator_state = _generator_state()
    net = NNsight(model)
    torch.manual_seed(1)
    with net.trace(x, backend=backend) as tracer:
        with tracer.iter[1]:
            net.block.skip(net.block.input * 2)
        out = net.output.save()
    assert torch.equal(out, expected)
    assert torch.equal(_generator_state(), generator_state)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("value", ["tensor", "number"])
def test_a_whole_write_prunes_what_only_computed_the_old_value(value):
    net = mlp()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    new = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)) \
        if value == "tensor" else 0.25
    model = NNsight(net)
    results = {}
    for backend in BACKENDS:
        with model.trace(x, backend=backend) as tracer:
            model.layer2.input = new
            out = model.output.save()
        results[backend] = out
        if backend == "fx":
            used = {n.target for n in tracer.graph_module.graph.nodes if n.op == "get_attr"}
            assert used and not any("layer1" in str(t) for t in used), used
    hidden = new if value == "tensor" else torch.full((3, 10), 0.25)
    with torch.no_grad():
        expected = net.layer3(net.act2(net.layer2(hidden)))
    for backend, out in results.items():
        assert torch.equal(out, expected), backend


# --- skip --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_replaces_a_block_which_does_not_run(gpt2, backend):
    x = _ids()
    # hand-written: block 1 returns block 0's output (replacing its forward), as skip means
    saved = {}
    h0_hook = gpt2.transformer.h[0].register_forward_hook(
        lambda m, i, o: saved.setdefault("h0", o))
    gpt2.transformer.h[1].forward = lambda *args, **kwargs: saved["h0"]
    try:
        with torch.no_grad():
            expected = gpt2(x, use_cache=False).logits
    finally:
        h0_hook.remove()
        del gpt2.transformer.h[1].forward

    counter = _Counter(gpt2, ["transformer.h.1.attn", "transformer.h.1.mlp"]
                       if backend == "hooks" else [])
    try:
        model = NNsight(gpt2)
        with torch.no_grad(), model.trace(x, use_cache=False, backend=backend) as tracer:
            h0 = model.transformer.h[0].output
            model.transformer.h[1].skip(h0)
            h1 = model.transformer.h[1].output.save()
            logits = model.lm_head.output.save()
    finally:
        counter.remove()
    assert torch.equal(h1, saved["h0"])
    assert torch.equal(logits, expected)
    assert backend == "fx" or \
        counter.calls == {"transformer.h.1.attn": 0, "transformer.h.1.mlp": 0}
    # the module's forward is its own again: nothing left behind
    assert "forward" not in vars(gpt2.transformer.h[1])
    if backend == "fx":
        paths = _modules_in(tracer.graph_module)
        assert not {p for p in paths if p == "transformer.h.1" or
                    p.startswith("transformer.h.1.")}
        assert "transformer.h.0.mlp" in paths and "lm_head" in paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_with_a_computed_value_and_a_later_write(backend):
    net = mlp()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    model = NNsight(net)
    with model.trace(x, backend=backend) as tracer:
        model.layer2.skip(model.layer2.input * 2 + 1)  # from its own input: allowed
        model.act2.output[:, 0] = 0.5
        out = model.output.save()
    h = net.act1(net.layer1(x)) * 2 + 1
    a = torch.sigmoid(h)
    a[:, 0] = 0.5
    assert torch.equal(out, net.layer3(a).detach())


def test_skip_errors_are_clear(gpt2):
    model = NNsight(gpt2)
    x = _ids()
    with pytest.raises(ShapeError, match=r"skip\(\.\.\.\) needs a value shaped like"):
        with model.trace(x, use_cache=False):
            model.transformer.h[1].skip(torch.zeros(64))
    with pytest.raises(ShapeError, match="skip"):
        with model.trace(x, use_cache=False):
            model.transformer.h[1].skip(model.transformer.h[0].output[:, :3])
    with pytest.raises(TraceError, match="skipped"):
        with model.trace(x, use_cache=False):
            model.transformer.h[1].skip(model.transformer.h[1].mlp.output)
    with pytest.raises(OrderError):
        with model.trace(x, use_cache=False):
            model.transformer.h[0].skip(model.transformer.h[1].output)
    with pytest.raises(TraceError, match="skipped"):
        with model.trace(x, use_cache=False, backend="hooks"):
            model.transformer.h[1].skip(model.transformer.h[0].output)
            model.transformer.h[1].attn.output.save()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_in_one_invoke_leaves_the_other_rows_alone(backend):
    net = mlp()
    a = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    b = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    model = NNsight(net)
    with model.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            model.layer2.skip(torch.zeros(2, 10))
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    torch.testing.assert_close(out_a, net.layer3(torch.sigmoid(torch.zeros(2, 10))).detach())
    torch.testing.assert_close(out_b, net(b).detach())


# a skip whose value is computed from the skipped module's own input (read in the same
# trace), by plain ops or by calling the module itself (an envoy applied to a traced value)
_ENDS = (torch.tensor([0, 1]), torch.tensor([6, 4]))
_OWN_INPUT_SKIPS = {
    "input": lambda x, mlp: x,
    "input * 2": lambda x, mlp: x * 2,
    "mlp(input) * 0.5": lambda x, mlp: mlp(x) * 0.5,
    "mlp(mlp(input))": lambda x, mlp: mlp(mlp(x)),
    # the MLP on two tokens only, scattered into zeros (nothing else of the block's MLP)
    "index_put of mlp on two tokens": lambda x, mlp: torch.zeros_like(x).index_put(
        _ENDS, mlp(x[_ENDS][:, None])[:, 0]),
}


@pytest.mark.parametrize("name", list(_OWN_INPUT_SKIPS))
def test_skip_with_a_value_from_the_modules_own_input(gpt2, name):
    value = _OWN_INPUT_SKIPS[name]
    x = _ids()
    mlp_module = gpt2.transformer.h[1].mlp
    # hand-written: the MLP's forward replaced by the value, computed with its own forward
    own = mlp_module.forward
    mlp_module.forward = lambda h: value(h, own)
    try:
        with torch.no_grad():
            expected = gpt2(x, use_cache=False).logits
    finally:
        del mlp_module.forward

    model = NNsight(gpt2)
    got = {}
    for backend in BACKENDS:
        with torch.no_grad(), model.trace(x, use_cache=False, backend=backend):
            mlp = model.transformer.h[1].mlp
            mlp.skip(value(mlp.input, mlp))
            got[backend] = model.lm_head.output.save()
        assert "forward" not in vars(mlp_module)
    torch.testing.assert_close(got["fx"], expected)
    torch.testing.assert_close(got["hooks"], got["fx"])
    assert torch.equal(got["hooks"], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trace_calling_a_skipped_module_runs_the_module(gpt2, backend):
    """A call of a skipped module by the trace itself, after the skipped call (a lens on
    the final norm's output through the skipped MLP), runs the module, not the skip."""
    x = _ids()
    mlp_module = gpt2.transformer.h[1].mlp
    saved = {}
    mlp_module.forward = lambda h: torch.zeros_like(h)
    hook = gpt2.transformer.ln_f.register_forward_hook(
        lambda m, i, o: saved.setdefault("ln_f", o))
    try:
        with torch.no_grad():
            expected_logits = gpt2(x, use_cache=False).logits
    finally:
        hook.remove()
        del mlp_module.forward
    with torch.no_grad():
        expected_lens = mlp_module(saved["ln_f"])

    model = NNsight(gpt2)
    with torch.no_grad(), model.trace(x, use_cache=False, backend=backend):
        mlp = model.transformer.h[1].mlp
        mlp.skip(torch.zeros_like(mlp.input))
        lens = mlp(model.transformer.ln_f.output).save()
        logits = model.lm_head.output.save()
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(lens, expected_lens)


class _CountingBlock(torch.nn.Module):
    """Counts its calls in a buffer (an in-place side effect of the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_does_not_carry_a_stopped_forward_past_the_stop(backend):
    """``tracer.cache()`` then ``tracer.stop()`` after a read of the first module: the later
    module does not run (its buffer is as before, as in the forward stopped there) and the
    cache holds the first module only (was: the cache's reads of every module made the
    forward pass run to its end)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _CountingBlock())
    x = torch.randn(2, 3)
    expected = model[0](x)
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend) as tracer:
        cache = tracer.cache()
        first = net[0].output.save()
        tracer.stop()
    assert model[1].calls.item() == 0
    assert sorted(cache.keys()) == ["model.0"]
    assert torch.equal(cache["model.0"].output, expected.detach())
    assert torch.equal(first, expected.detach())
