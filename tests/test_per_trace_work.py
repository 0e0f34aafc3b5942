"""Work a trace does per run, counted: what it walks or copies of the model must not grow
with the model's size where the model gives it no reason to (no CUDA in the process, no
buffer the forward writes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxsight import NNsight, TraceError


class _Counted(torch.nn.Sequential):
    """A stack of linear layers whose ``parameters()`` counts the parameters it yields."""

    def __init__(self, layers: int = 12):
        super().__init__(*(torch.nn.Linear(4, 4) for _ in range(layers)))
        self.visited = 0

    def parameters(self, recurse: bool = True):
        for parameter in super().parameters(recurse):
            self.visited += 1
            yield parameter


def test_a_trace_without_cuda_walks_no_parameters_for_random_generators():
    """Without CUDA initialised in the process no tensor can be on a CUDA device: the
    trace does not walk every parameter to find the CUDA generators to save (was: all
    24 parameters per hooks trace that writes with gradients on)."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process")
    model = _Counted()
    x = torch.randn(2, 4)
    reference = model(x).detach()
    net = NNsight(model)
    for backend in ("hooks", "fx"):
        with net.trace(x, backend=backend):  # (first: captures and scans)
            net[3].output = net[3].output * 2
            out = net.output.save()
        model.visited = 0
        with net.trace(x, backend=backend):
            net[3].output = net[3].output * 2
            out = net.output.save()
        assert model.visited <= 1, (backend, model.visited)  # (the first one's dtype)
        handle = model[3].register_forward_hook(lambda m, a, o: o * 2)
        try:
            torch.testing.assert_close(out, model(x))
        finally:
            handle.remove()
    torch.testing.assert_close(model(x), reference)


class _Buffered(torch.nn.Module):
    """A large table the forward only reads, a step counter and BatchNorm statistics it
    updates in place (the statistics without a version bump)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.register_buffer("table", torch.randn(1 << 16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1
        return self.norm(self.lin(x)) + self.table[:4]


class _Copies(TorchDispatchMode):
    """Counts the copies made of each watched tensor's memory (a clone of it or of a view,
    a ``copy_`` from it)."""

    def __init__(self, watched: dict[str, torch.Tensor]):
        super().__init__()
        self.keys = {t.untyped_storage().data_ptr(): name for name, t in watched.items()}
        self.copies: dict[str, int] = {name: 0 for name in watched}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = None
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
            source = args[0]
        elif func is torch.ops.aten.copy_.default:
            source = args[1]
        if isinstance(source, torch.Tensor) and not source.is_meta:
            name = self.keys.get(source.untyped_storage().data_ptr())
            if name is not None:
                self.copies[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_hooks_trace_that_writes_copies_no_buffer_the_forward_does_not_write():
    """A hooks trace that writes with gradients on keeps what it needs to put the buffers
    back should the forward be refused mid-way (a write inside a checkpoint): it copies the
    buffers the forward writes (the step counter, BatchNorm's statistics), not the table
    it only reads (was: every buffer, every trace: 4 x 4 MB took 173 ms a trace). The
    outputs, gradients and buffers after are those of plain PyTorch with a forward hook."""
    torch.manual_seed(0)
    model = _Buffered().train()
    plain = copy.deepcopy(model)
    x = torch.randn(3, 4)
    net = NNsight(model)
    handle = plain.lin.register_forward_hook(lambda m, a, o: o * 2)
    for trace in range(2):
        copies = _Copies(dict(model.named_buffers()))
        with copies:
            with net.trace(x, backend="hooks"):
                net.lin.output = net.lin.output * 2
                out = net.output.save()
                net.output.sum().backward()
        if trace:  # (the first scans the model, and its scan puts back what it changed)
            assert copies.copies["table"] == 0, copies.copies
        want = plain(x)
        want.sum().backward()
        torch.testing.assert_close(out, want)
        for name, value in plain.named_buffers():
            assert torch.equal(model.get_buffer(name), value), name
        for name, param in plain.named_parameters():
            torch.testing.assert_close(model.get_parameter(name).grad, param.grad)
    handle.remove()


class _Writer(torch.nn.Module):
    """Writes its buffers in place every way a forward may: a KV-style cache through views
    and an indexed assignment, a counter, ``.data``, a view of a view, BatchNorm's
    statistics; reads a table it never writes. ``branch``: data-dependent control flow
    (the scan runs it on real values)."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.register_buffer("cache", torch.zeros(2, 8, 4))
        self.register_buffer("table", torch.randn(10))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("halved", torch.ones(4))
        self.register_buffer("unused", torch.ones(3))
        self.branch = branch

    def forward(self, x):
        h = self.norm(self.lin(x))
        if self.branch and bool(h.sum() > 1e9):
            h = h * 2
        self.cache[:, 1].copy_(h[:2])
        self.cache[0, 2:4] = h[:2]
        self.position += 1
        self.ema.data.mul_(0.5).add_(h.detach().mean(0))
        self.halved.view(2, 2)[0].mul_(0.5)
        return h + self.table[:4].sum()


@pytest.mark.parametrize("branch", [False, True], ids=["fake", "real"])
def test_the_scan_names_the_buffers_a_plain_forward_changes(branch):
    """The buffers the scan finds written are those a plain forward changes (on a copy of
    the model), whether the scan runs on fake tensors or, for data-dependent code, on
    real ones; and the scan leaves every buffer as it was."""
    from fxsight.capture.scan import scan
    torch.manual_seed(0)
    model = _Writer(branch).train()
    x = torch.randn(3, 4)
    plain = copy.deepcopy(model)
    before = {name: b.clone() for name, b in plain.named_buffers()}
    plain(x)
    changed = {name for name, b in plain.named_buffers() if not torch.equal(b, before[name])}
    assert changed == {"cache", "position", "ema", "halved", "norm.running_mean",
                       "norm.running_var", "norm.num_batches_tracked"}
    result = scan(model, (x,), {})
    assert result.written_buffers == changed
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


class _CheckpointedWriter(_Writer):
    """``_Writer``'s writes, then a block it checkpoints only with gradients on (the scan,
    run without, does not see the checkpoint: a write there is refused mid-forward).
    ``grad_only_write``: with gradients on, it also counts its calls in ``unused``."""

    def __init__(self, grad_only_write: bool = False):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        self.grad_only_write = grad_only_write

    def forward(self, x):
        h = super().forward(x)
        if torch.is_grad_enabled():
            if self.grad_only_write:
                self.unused += 1
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        else:
            h = self.block(h)
        return h


def test_a_write_refused_mid_forward_puts_back_every_buffer_the_forward_wrote():
    """Refused as the forward reaches a write inside a checkpoint: the KV-style cache, the
    counter, the ``.data`` and view writes, BatchNorm's statistics, all written before the
    refusal, are put back as they were (copied alone, not the table it only reads)."""
    torch.manual_seed(0)
    model = _CheckpointedWriter().train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    net, x = NNsight(model), torch.randn(3, 4)
    for attempt in range(2):
        copies = _Copies(dict(model.named_buffers()))
        with copies, pytest.raises(TraceError, match=r"(?s)block\.0\.output.*checkpoint"):
            with net.trace(x, backend="hooks"):
                net.block[0].output = net.block[0].output * 2
                net.output.sum().backward()
        for name, b in model.named_buffers():
            assert torch.equal(b, before[name]), name
        if attempt:
            assert copies.copies["table"] == 0 and copies.copies["unused"] == 0, copies.copies


def test_a_buffer_written_on_a_path_the_scan_did_not_take_is_named_by_the_refusal():
    """A buffer the forward writes only with gradients on (the scan runs without) is not
    copied beforehand: where the forward is then refused mid-way, the refusal says it was
    changed and is left so (the others are put back); without a refusal the trace leaves it
    as a plain forward does."""
    torch.manual_seed(0)
    model = _CheckpointedWriter(grad_only_write=True).train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    net, x = NNsight(model), torch.randn(3, 4)
    with pytest.raises(TraceError, match=r"(?s)block\.0\.output.*checkpoint.*buffers unused "
                                         r"in place.*left as it changed them"):
        with net.trace(x, backend="hooks"):
            net.block[0].output = net.block[0].output * 2
            net.output.sum().backward()
    for name, b in model.named_buffers():
        if name != "unused":
            assert torch.equal(b, before[name]), name
    assert torch.equal(model.unused, before["unused"] + 1)


def test_a_repeated_hooks_trace_walks_its_program_once(monkeypatch):
    """The hooks backend walks a Program on meta values before it runs (its checks, and
    where each node acts): once per scan, structure and rows, as the fx backend validates
    a runner once (was: at every trace). New values reuse the walk; a new input shape, a
    new steering shape and new rows walk again, and the check that raises before the run
    still raises. Every answer is a hand-written hook's."""
    from fxsight.splice.meta_walker import MetaWalker

    walks = []
    original = MetaWalker.run
    monkeypatch.setattr(MetaWalker, "run", lambda self, *a, **k: (
        walks.append(len(self.program.nodes)), original(self, *a, **k))[1])
    torch.manual_seed(0)
    model = _Counted(4)
    net = NNsight(model)

    def traced(x, steer):
        with torch.no_grad(), net.trace(x, backend="hooks"):
            net[1].output[:, 0] = net[0].output[:, 1] * 2 + steer
            out = net.output.save()
        return out

    def reference(x, steer):
        seen = {}
        handles = [model[0].register_forward_hook(lambda m, a, o: seen.update(h=o)),
                   model[1].register_forward_hook(lambda m, a, o: _put(o, seen, steer))]
        try:
            with torch.no_grad():
                return model(x)
        finally:
            for handle in handles:
                handle.remove()

    x = torch.randn(3, 4)
    for i in range(3):
        steer = torch.randn(3) * i
        assert torch.equal(traced(x, steer), reference(x, steer))
    assert len(walks) == 1, walks
    bigger = torch.randn(5, 4)
    assert torch.equal(traced(bigger, torch.ones(5)), reference(bigger, torch.ones(5)))
    assert len(walks) == 2
    assert torch.equal(traced(x, torch.ones(())), reference(x, torch.ones(())))
    assert len(walks) == 3  # (another steering shape: another structure)
    with pytest.raises(Exception, match="shape|size"):
        traced(x, torch.ones(4))  # (3 rows written with 4 values: refused before the run)
    with torch.no_grad(), net.trace(backend="hooks") as tracer:  # (two invokes: new rows)
        with tracer.invoke(x[:1]):
            net[1].output[:, 0] = net[0].output[:, 1] * 2
        with tracer.invoke(x[1:]):
            out = net.output.save()
    assert len(walks) == 5
    torch.testing.assert_close(out, model(x[1:]))


def _put(output, seen, steer):
    """The reference's write: column 0 of ``output`` from column 1 of the first layer's."""
    output = output.clone()
    output[:, 0] = seen["h"][:, 1] * 2 + steer
    return output


def test_a_trace_reads_its_call_sites_bytecode_once(monkeypatch):
    """``model.trace(...)`` alone on a line is refused by reading what the caller does
    with its value in the caller's bytecode: a call site's instructions are decoded once
    (was: the caller's whole code object at every trace, 0.1-0.3 ms), and a code object
    made anew (the same text again) is decoded anew, so the refusal still holds there."""
    import dis

    from fxsight.api import call_site

    decoded = []
    original = dis.get_instructions
    # (the call site's own decoding: bind.py reads the caller's bytecode too, once)
    monkeypatch.setattr(call_site, "dis", type(dis)("dis"))
    vars(call_site.dis).update(vars(dis), get_instructions=lambda code, *a, **k: (
        decoded.append(code), original(code, *a, **k))[1])
    net = NNsight(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    for _ in range(3):
        with torch.no_grad(), net.trace(x):
            out = net.output.save()
    assert len(decoded) == 1
    torch.testing.assert_close(out, net._module(x))
    for _ in range(2):  # (each exec compiles a new code object: decoded again, refused)
        scope = {"net": net, "x": x}
        with pytest.raises(TraceError, match="alone on a line"):
            exec("net.trace(x)\n", scope)
    assert len(decoded) == 3


class _Items(dict):
    """A ``_modules`` dict that counts the walks through it (``named_modules`` reads
    every module's ``_modules.items()``)."""

    walks = 0

    def items(self):
        type(self).walks += 1
        return super().items()


class _Walked(torch.nn.Module):
    """A small tree whose root's ``_modules`` counts the walks of it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.b = torch.nn.Linear(4, 4)
        self.shared = self.b  # (a second path of one module: its first path is "b")
        self._modules = _Items(self._modules)

    def forward(self, x):
        return self.shared(self.a(x))


def test_the_hooks_backend_walks_the_module_tree_only_where_it_changed():
    """A hooks trace finds each module's first path to hook it: walked once while the
    tree stays as it was (was: ``named_modules()`` at every trace, O(depth x modules)),
    and again after each kind of change below the root; the table holds no module, so a
    model whose submodule refers back to it is freed with it."""
    from fxsight.capture.events import module_paths

    model = _Walked()

    def walked_after(change) -> tuple[int, dict]:
        change()
        before = _Items.walks
        paths = module_paths(model)
        walks = _Items.walks - before
        want = {}
        for path, module in model.named_modules():
            want.setdefault(module, path)
        assert list(paths.items()) == list(want.items())
        return walks, paths

    assert walked_after(lambda: None)[0] == 1
    assert walked_after(lambda: None)[0] == 0
    assert walked_after(lambda: None)[1][model.b] == "b"
    assert walked_after(lambda: setattr(model, "c", torch.nn.Tanh()))[0] == 1
    assert walked_after(lambda: None)[0] == 0
    assert walked_after(lambda: model.a.append(torch.nn.Linear(4, 4)))[0] == 1  # (deeper)
    assert walked_after(lambda: model.a._modules.__setitem__("1", torch.nn.GELU()))[0] == 1
    assert walked_after(lambda: setattr(model.a, "_modules", dict(model.a._modules)))[0] == 1
    assert walked_after(lambda: delattr(model, "c"))[0] == 1
    assert walked_after(lambda: None)[0] == 0

    net, x = NNsight(model), torch.randn(2, 4)
    for _ in range(2):
        before = _Items.walks
        with torch.no_grad(), net.trace(x, backend="hooks"):
            net.a[0].output = net.a[0].output * 2
            out = net.output.save()
    assert _Items.walks == before  # (the second trace: no walk)
    handle = model.a[0].register_forward_hook(lambda m, a, o: o * 2)
    try:
        torch.testing.assert_close(out, model(x))
    finally:
        handle.remove()

    assert _freed_after_paths()


def _freed_after_paths() -> bool:
    """Whether a model whose submodule refers back to it is freed once its paths were
    found (in a scope of its own: an assertion's values would keep it)."""
    import gc
    import weakref

    from fxsight.capture.events import module_paths

    model = _Walked()
    object.__setattr__(model.b, "owner", model)  # (refers back to its root: no module)
    module_paths(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    return alive() is None
