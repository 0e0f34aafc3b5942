"""Boundaries that share memory: a module's output is the next module's input (the same
tensor), so an in-place edit at one changes the other. A line recorded after such an edit
sees it, a line recorded before does not, as in eager PyTorch (forward hooks written here,
run in the block's order) and nnsight; on the fx and hooks backends alike."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fxsight import NNsight
from fxsight.errors import OrderError
from fxsight.capture.captures import cached_capture
from fxsight.capture.scan import scan
from models import mlp

BACKENDS = ("fx", "hooks")
# (the earlier boundary, the later one that holds the same tensor) in the toy MLP
SHARED = [(("layer1", "output"), ("act1", "input")),
          (("act1", "output"), ("layer2", "input")),
          (("layer2", "output"), ("act2", "input")),
          (("act2", "output"), ("layer3", "input"))]


def _x(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(1))


def _value(output, inputs):
    return output if output is not None else inputs[0]


def _forward_hooked(model, hooks, x=None):
    """``model(x)`` (by default ``_x()``) by hand, with ``hooks``: ``(path, accessor, fn)``, a forward hook at
    an output, a pre-hook at an input (in the order given), removed afterwards."""
    handles = []
    try:
        for path, accessor, fn in hooks:
            module = model.get_submodule(path)
            handles.append(module.register_forward_hook(fn) if accessor == "output"
                           else module.register_forward_pre_hook(fn))
        with torch.no_grad():
            return model(_x() if x is None else x)
    finally:
        for handle in handles:
            handle.remove()


def _reference(model, x, read, edit, column, fill):
    """Sums of the value read at ``read``, before and after the edit at ``edit`` (the
    same tensor), and the model's output, by hand: forward hooks that run the block's
    lines where eager PyTorch reaches them."""
    kept = {}

    def keep(module, args, output=None):
        kept["value"] = _value(output, args)
        kept["before"] = kept["value"].sum()

    def change(module, args, output=None):
        _value(output, args)[:, column] = fill

    def after(module, args, output):
        kept["after"] = kept["value"].sum()

    output = _forward_hooked(model, [(*read, keep), (*edit, change),
                                     ("layer3", "output", after)], x)
    return kept["before"], kept["after"], output


def _traced(net, x, backend, read, edit, column, fill):
    with torch.no_grad(), net.trace(x, backend=backend) as tracer:
        value = getattr(getattr(net, read[0]), read[1])
        before = value.sum().save()
        getattr(getattr(net, edit[0]), edit[1])[:, column] = fill
        after = value.sum().save()
        output = net.output.save()
    assert tracer.backend == backend
    return before, after, output


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("read, edit", SHARED)
def test_a_line_after_an_edit_of_the_same_tensor_sees_it(backend, read, edit):
    model = mlp()
    expected = _reference(model, _x(), read, edit, 0, 100.0)
    got = _traced(NNsight(model), _x(), backend, read, edit, 0, 100.0)
    for a, e in zip(got, expected):
        assert torch.equal(a, e), (a, e)
    assert not torch.equal(got[0], got[1])  # (the edit changed the value read)


@settings(max_examples=25, deadline=None)
@given(pair=st.sampled_from(SHARED), order=st.sampled_from(["earlier read", "later read",
                                                           "one boundary"]),
       column=st.integers(0, 9), fill=st.floats(-5, 5, width=32),
       backend=st.sampled_from(BACKENDS))
def test_reads_and_edits_of_one_tensor_at_either_boundary(pair, order, column, fill,
                                                          backend):
    """The value read at one of two boundaries holding one tensor and edited at the
    other (or at the same one): the sums recorded before and after the edit are those of
    hooks where the model reaches each boundary (an edit at the earlier boundary is in
    place before a read at the later one, whatever the block's order)."""
    earlier, later = pair
    read, edit = {"earlier read": (earlier, later), "later read": (later, earlier),
                  "one boundary": (later, later)}[order]
    model = mlp()
    expected = _reference(model, _x(), read, edit, column, fill)
    got = _traced(NNsight(model), _x(), backend, read, edit, column, fill)
    for a, e in zip(got, expected):
        assert torch.equal(a, e), (a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_edits_of_one_tensor_apply_in_the_blocks_order(backend):
    """An edit at act1.input, then one of the same column at layer1.output (the same
    tensor): the later line wins, as where hooks run the lines in order."""
    model = mlp()

    def both(module, args):
        args[0][:, 0] = 100.0
        args[0][:, 0] = 5.0

    expected = _forward_hooked(model, [("act1", "input", both)])
    net = NNsight(model)
    with torch.no_grad(), net.trace(_x(), backend=backend):
        net.act1.input[:, 0] = 100.0
        net.layer1.output[:, 0] = 5.0
        out = net.output.save()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_of_other_memory_orders_nothing(backend, reference_hooks):
    """layer2's input is ReLU's output, a new tensor: editing it in place does not hold
    back a value computed from layer1's output, which may still be written at layer1."""
    model = mlp()

    def edit(module, args, kwargs):
        args[0][:, 0] = 100.0

    with reference_hooks(model, hooks={"layer1": lambda m, i, o: o * 2},
                         pre_hooks={"layer2": edit}), torch.no_grad():
        expected = model(_x())
    net = NNsight(model)
    with torch.no_grad(), net.trace(_x(), backend=backend):
        h = net.layer1.output
        net.layer2.input[:, 0] = 100.0
        net.layer1.output = h * 2
        out = net.output.save()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_residual_stream_read_before_an_edit_of_the_next_blocks_input(
        backend, core_gpt2, core_ids, reference_hooks):
    """GPT-2: block 0's output is block 1's input. A sum of block 0's output recorded
    after an in-place edit of block 1's input sees the edit."""
    kept = {}

    def keep(module, args, output):
        kept["h"] = output

    def edit(module, args, kwargs):
        args[0][:, 0] = 0.0

    def after(module, args, output):
        kept["sum"] = (kept["h"] * 2).sum()

    with reference_hooks(core_gpt2, hooks={"transformer.h.0": keep, "transformer.h.1": after},
                         pre_hooks={"transformer.h.1": edit}), torch.no_grad():
        expected = core_gpt2(core_ids, use_cache=False).logits
    net = NNsight(core_gpt2)
    with torch.no_grad(), net.trace(core_ids, use_cache=False, backend=backend):
        h = net.transformer.h[0].output
        net.transformer.h[1].input[:, 0] = 0.0
        total = (h * 2).sum().save()
        logits = net.lm_head.output.save()
    assert torch.equal(total, kept["sum"])
    assert torch.equal(logits, expected)


def test_a_capture_and_a_scan_agree_on_which_boundaries_share_memory(core_gpt2, core_ids):
    """What orders the lines is the same on both backends: the capture (graph nodes back
    through markers, views and dropout in eval) and the scan (storages of the tensors the
    forward passed) pair the same boundaries of GPT-2, among them dropout's input and
    output (eval: the same tensor) and a block's output and the next block's input."""
    kwargs = {"use_cache": False}
    with torch.no_grad():
        scanned = scan(core_gpt2, (core_ids,), kwargs)
        captured = cached_capture(core_gpt2, (core_ids,), kwargs)
    sites = [site for site in scanned.events if site in captured.index]

    def pairs(source):
        return {(a, b) for a, b in itertools.combinations(sites, 2)
                if source.alias_keys(a) & source.alias_keys(b)}

    found = pairs(scanned)
    assert found == pairs(captured)
    labels = {(a.path, a.kind, b.path, b.kind) for a, b in found}
    assert ("transformer.drop", "input", "transformer.drop", "output") in labels
    assert ("transformer.h.0", "output", "transformer.h.1", "input") in labels
    assert ("transformer.h.0", "output", "transformer.h.1.attn", "input") not in labels


@pytest.mark.compile
def test_compiled_a_line_after_an_edit_of_the_same_tensor_sees_it():
    """The same order under ``compile=True`` (inductor keeps the rewritten graph's in-place
    semantics; its sums may round differently)."""
    model = mlp()
    read, edit = SHARED[0]
    expected = _reference(model, _x(), read, edit, 0, 100.0)
    net = NNsight(model)
    with torch.no_grad(), net.trace(_x(), compile=True):
        value = net.layer1.output
        before = value.sum().save()
        net.act1.input[:, 0] = 100.0
        after = value.sum().save()
        output = net.output.save()
    for a, e in zip((before, after, output), expected):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-4), (a, e)
    assert after > before + 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_held_back_by_an_edit_of_its_memory_says_so(backend):
    """A value computed after an in-place edit of the tensor it reads comes after the edit:
    written at the earlier module, the OrderError names the edit and its line (not only
    the later module)."""
    net = NNsight(mlp())
    with pytest.raises(OrderError) as caught:
        with net.trace(_x(), backend=backend):
            h = net.layer1.output
            net.act1.input[:, 0] = 100.0  # the edit
            net.layer1.output = h * 2
    message = str(caught.value)
    assert "in-place change of act1.input" in message
    assert "# the edit" in message  # (its line, with its source)
    with pytest.raises(OrderError) as caught:  # a value that depends on a later module
        with net.trace(_x(), backend=backend):
            net.layer1.output = net.layer2.output[:, :10] * 0
    assert "in-place change" not in str(caught.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_in_one_invokes_rows_holds_back_no_line_of_another_invoke(backend):
    """Invoke A edits act1's input (layer1's output) in place, invoke B then writes layer1's
    output from its own read: B's rows are not A's, so B's line is not held back by A's edit
    (was: an OrderError, the write said to depend on act1's input); the numbers are a
    batch's with hooks doing each invoke's lines on its rows. A line on the whole batch
    still sees an invoke's edit."""
    model = mlp()

    def scale_b(module, args, output):
        return torch.cat([output[:2], output[2:] * 2])

    def edit_a(module, args):
        args[0][:2, 0] = 100.0

    expected = _forward_hooked(model, [("layer1", "output", scale_b),
                                       ("act1", "input", edit_a)])
    net = NNsight(model)
    with torch.no_grad(), net.trace(backend=backend) as tracer:
        with tracer.invoke(_x()[:2]):
            net.act1.input[:, 0] = 100.0
        with tracer.invoke(_x()[2:]):
            net.layer1.output = net.layer1.output * 2
        out = net.output.save()
    assert torch.equal(out, expected)
    with pytest.raises(OrderError, match="in-place change of act1.input"):
        with torch.no_grad(), net.trace(backend=backend) as tracer:
            with tracer.invoke(_x()[:2]):
                net.act1.input[:, 0] = 100.0
            with tracer.invoke():  # the whole batch: A's rows too
                net.layer1.output = net.layer1.output * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_site_written_with_another_sites_read_shares_its_memory(backend):
    """``layer3.input = a`` (a = act1.output) makes layer3's input act1's tensor, as a hook
    returning it does: an in-place edit of layer3's input is an edit of ``a``, and a sum
    of ``a`` recorded after it sees it."""
    model = mlp()
    kept = {}

    def keep(module, args, output):
        kept["a"] = output

    def write_and_edit(module, args):
        kept["a"][:, 0] = 100.0
        return (kept["a"],)

    def after(module, args, output):
        kept["sum"] = kept["a"].sum()

    expected = _forward_hooked(model, [("act1", "output", keep),
                                       ("layer3", "input", write_and_edit),
                                       ("layer3", "output", after)])
    net = NNsight(model)
    with torch.no_grad(), net.trace(_x(), backend=backend):
        a = net.act1.output
        net.layer3.input = a
        net.layer3.input[:, 0] = 100.0
        total = a.sum().save()
        out = net.output.save()
    assert torch.equal(total, kept["sum"])
    assert torch.equal(out, expected)


# --- random blocks written in the model's order, against hooks that run each line where
# the block has reached (nnsight's order) -------------------------------------------------
_SITES = [("layer1", "output"), ("act1", "input"), ("act1", "output"), ("layer2", "input"),
          ("layer2", "output"), ("act2", "input"), ("act2", "output"), ("layer3", "input")]


@st.composite
def _blocks(draw):
    """Lines reading, editing in place and writing the toy MLP's 10-wide boundaries in
    the order the model reaches them, and sums of what was read."""
    lines, reached, reads = [], 0, []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["read", "edit", "write", "sum"]))
        if kind in ("write", "sum") and not reads:
            kind = "read"
        if kind == "sum":
            lines.append(("sum", draw(st.integers(0, len(reads) - 1))))
            continue
        reached = draw(st.integers(reached, min(reached + 2, len(_SITES) - 1)))
        if kind == "read":
            reads.append(reached)
            lines.append(("read", reached))
        elif kind == "edit":
            lines.append(("edit", reached, draw(st.integers(0, 9)),
                          draw(st.sampled_from([0.0, 7.0, -3.0]))))
        else:
            lines.append(("write", reached, draw(st.integers(0, len(reads) - 1)),
                          draw(st.sampled_from([None, 2.0]))))
    return lines


def _run_line(line, value, reads, sums):
    """One line where the forward is at its boundary (``value``: the boundary's value
    there); returns the boundary's value after it."""
    kind = line[0]
    if kind == "read":
        reads.append(value)
    elif kind == "edit":
        value[:, line[2]] = line[3]
    elif kind == "write":
        read, scale = reads[line[2]], line[3]
        value = read if scale is None else read * scale
    else:
        sums.append(reads[line[1]].sum())
    return value


def _block_by_hand(model, x, lines):
    """Each line runs in a hook at the boundary the block has reached by then."""
    at: dict[int, list] = {}
    reached = 0
    for line in lines:
        if line[0] != "sum":
            reached = line[1]
        at.setdefault(reached, []).append(line)
    reads, sums = [], []

    def at_output(index):
        def hook(module, args, output):
            for line in at[index]:
                output = _run_line(line, output, reads, sums)
            return output
        return hook

    def at_input(index):
        def hook(module, args):
            value = args[0]
            for line in at[index]:
                value = _run_line(line, value, reads, sums)
            return (value, *args[1:])
        return hook

    hooks = [(*_SITES[index], at_output(index) if _SITES[index][1] == "output"
              else at_input(index)) for index in at]
    output = _forward_hooked(model, hooks, x)
    return sums, output


def _block_traced(model, lines, backend):
    net = NNsight(model)
    reads, sums = [], []
    with torch.no_grad(), net.trace(_x(), backend=backend):
        for line in lines:
            kind = line[0]
            if kind == "sum":
                sums.append(reads[line[1]].sum().save())
                continue
            path, accessor = _SITES[line[1]]
            envoy = getattr(net, path)
            if kind == "read":
                reads.append(getattr(envoy, accessor))
            elif kind == "edit":
                getattr(envoy, accessor)[:, line[2]] = line[3]
            else:
                read, scale = reads[line[2]], line[3]
                setattr(envoy, accessor, read if scale is None else read * scale)
        output = net.output.save()
    return sums, output


@settings(max_examples=60, deadline=None)
@given(lines=_blocks(), backend=st.sampled_from(BACKENDS))
# (the shapes that order lines: a sum after an edit at the next boundary, of the same
# tensor; a read written raw at a later boundary and edited there; two edits of one tensor)
@example(lines=[("read", 0), ("edit", 1, 0, 7.0), ("sum", 0)], backend="fx")
@example(lines=[("read", 2), ("write", 7, 0, None), ("edit", 7, 3, 0.0), ("sum", 0)],
         backend="hooks")
@example(lines=[("read", 4), ("edit", 5, 1, 7.0), ("edit", 5, 1, -3.0), ("sum", 0)],
         backend="fx")
def test_random_blocks_in_the_models_order_match_hooks_run_where_the_block_is(lines,
                                                                            backend):
    """Reads, in-place edits, writes (of a read itself or of a new value) and sums,
    written in the order the model reaches the boundaries: the same sums and output as
    hooks that run each line at the boundary the block has reached (nnsight's order);
    boundaries share tensors (a module's output is the next one's input) and a written
    read is the site's value itself."""
    model = mlp()
    expected_sums, expected = _block_by_hand(model, _x(), lines)
    sums, output = _block_traced(model, lines, backend)
    assert len(sums) == len(expected_sums)
    for got, want in zip(sums, expected_sums):
        assert torch.equal(got, want), (lines, got, want)
    assert torch.equal(output, expected), lines


@st.composite
def _blocks_in_any_order(draw):
    """As ``_blocks``, with the boundaries in any order (fxsight's recording allows it)."""
    lines, reads = [], 0
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["read", "edit", "write", "sum"]))
        if kind in ("write", "sum") and not reads:
            kind = "read"
        if kind == "sum":
            lines.append(("sum", draw(st.integers(0, reads - 1))))
            continue
        site = draw(st.integers(0, len(_SITES) - 1))
        if kind == "read":
            reads += 1
            lines.append(("read", site))
        elif kind == "edit":
            lines.append(("edit", site, draw(st.integers(0, 9)),
                          draw(st.sampled_from([0.0, 7.0]))))
        else:
            lines.append(("write", site, draw(st.integers(0, reads - 1)),
                          draw(st.sampled_from([None, 2.0]))))
    return lines


def _outcome(lines, backend):
    try:
        return _block_traced(mlp(), lines, backend)
    except OrderError as error:  # (the same refusal on both backends)
        return str(error)


@settings(max_examples=40, deadline=None)
@given(lines=_blocks_in_any_order())
def test_random_blocks_in_any_order_agree_on_both_backends(lines):
    """Where the block reads and writes boundaries out of the model's order, the fx and
    hooks backends order its lines alike (the same memory shared, the same lines held
    back): the same sums and output, or the same OrderError."""
    fx, hooks = _outcome(lines, "fx"), _outcome(lines, "hooks")
    if isinstance(fx, str) or isinstance(hooks, str):
        assert fx == hooks, lines
        return
    for got, want in zip(fx[0], hooks[0]):
        assert torch.equal(got, want), lines
    assert torch.equal(fx[1], hooks[1]), lines
