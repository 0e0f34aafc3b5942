"""No side effects on the user's objects: generate() leaves the model's attributes and
forward as they were; an accessor typo inside a trace raises instead of setting an
attribute on the real module."""

from __future__ import annotations

import gc
import sys
import warnings
import weakref

import pytest
import torch

from fxsight import LanguageModel, NNsight
from models import mlp, tiny_gpt2


def _generate(model, tokenizer, backend):
    lm = LanguageModel(model, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        with lm.generate("The Eiffel Tower is in", max_new_tokens=3, do_sample=False,
                         backend=backend) as tracer:
            with tracer.all():
                lm.transformer.h[0].output[:, -1] += 1.0
            ids = lm.generator.output.save()
    assert tracer.backend == backend
    return ids


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_generate_leaves_the_model_as_it_was(tokenizer, backend):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    ids = _generate(model, tokenizer, backend)
    assert ids.shape[0] == 1
    after = {name: dict(vars(module)) for name, module in model.named_modules()}
    assert set(after) == set(before)
    for name in before:
        assert set(after[name]) == set(before[name]), name
        assert "forward" not in after[name], name
    assert model.forward.__func__ is type(model).forward
    # a second generate reuses what the first one built (no new attribute either)
    _generate(model, tokenizer, backend)
    assert set(vars(model)) == set(before[""])


def test_generate_does_not_keep_the_model_alive(tokenizer):
    def run():
        model = tiny_gpt2(vocab_size=len(tokenizer))
        _generate(model, tokenizer, "fx")
        return weakref.ref(model)

    ref = run()
    gc.collect()
    assert ref() is None


def _module_attributes(model):
    return {name: set(vars(module)) for name, module in model.named_modules()}


def _attribute_objects(model):
    return {(name, key): value for name, module in model.named_modules()
            for key, value in vars(module).items()}


def _replaced(model, before):
    now = _attribute_objects(model)
    return sorted(k for k, v in before.items() if now.get(k, v) is not v)


@pytest.mark.parametrize("backend", ("fx", "hooks", "scan"))
def test_a_trace_leaves_every_module_attribute_the_same_object(backend):
    """A reference the caller holds to a module's attribute (transformers' ``_tp_plan``
    dict, a LayerNorm's ``normalized_shape``) stays the model's, as after a plain forward
    (torch.export puts back equal copies of containers and tuples)."""
    model = tiny_gpt2()
    ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    before = _attribute_objects(model)
    with torch.no_grad():
        model(ids, use_cache=False)
    assert _replaced(model, before) == []  # (the reference: a plain forward)
    net = NNsight(model)
    with torch.no_grad():
        # (a scan entered: `net.scan(ids)` alone on a line scanned nothing, silently)
        context = net.scan(ids, use_cache=False) if backend == "scan" else \
            net.trace(ids, use_cache=False, backend=backend)
        with context:
            net.transformer.h[0].output[0][:] = 0
            net.output.save()
    assert _replaced(model, before) == []


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_accessor_typo_inside_a_trace_raises_and_leaves_the_module_untouched(backend):
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5)
    before = _module_attributes(model)
    with pytest.raises(AttributeError) as raised:
        with net.trace(x, backend=backend):
            net.layer1.ouput = net.layer1.output * 2
    message = str(raised.value)
    assert "model.layer1" in message and "'ouput'" in message
    assert "did you mean 'output'" in message
    assert "net.layer1.ouput = net.layer1.output * 2" in message  # the user's line
    assert _module_attributes(model) == before
    assert not hasattr(model.layer1, "ouput")

    with pytest.raises(AttributeError, match="did you mean 'inputs'"):
        with net.trace(x, backend=backend):
            net.layer2.inputs_ = net.layer2.inputs
    with pytest.raises(AttributeError, match="did you mean 'weight'"):
        with net.trace(x, backend=backend):
            net.layer2.wieght = torch.zeros(10, 10)
    assert _module_attributes(model) == before

    # the model still traces, and its result is the plain one
    with net.trace(x, backend=backend):
        out = net.output.save()
    assert torch.equal(out, model(x))


def test_accessor_typo_on_a_language_model_block_raises():
    model = tiny_gpt2()
    lm = NNsight(model)
    ids = torch.randint(4, 128, (1, 5))
    before = _module_attributes(model)
    with pytest.raises(AttributeError, match=r"model\.transformer\.h\.0.*'outptu'.*"
                                             r"did you mean 'output'"):
        with lm.trace(ids, use_cache=False):
            lm.transformer.h[0].outptu = 0
    assert _module_attributes(model) == before


def test_setting_attributes_inside_and_outside_traces():
    model = mlp()
    net = NNsight(model)
    x = torch.randn(4, 5)
    # an attribute the module has: set on the module, as a plain assignment would
    with net.trace(x):
        net.act1.inplace = False
        out = net.output.save()
    assert model.act1.inplace is False
    assert torch.equal(out, model(x))
    # outside a trace, attributes are set on the module (as reads fall through to it)
    net.layer1.note = "probe"
    assert model.layer1.note == "probe"
    assert net.layer1.note == "probe"
    del model.layer1.note


def _rss_mb():
    import os
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _new_structure(net, x, i):
    """A trace whose intervention structure is new for every ``i`` (an int is a constant of
    the rewritten graph): different modules, positions and operations."""
    layer = (net.layer1, net.layer2)[i % 2]
    with net.trace(x):
        if i % 3 == 0:
            layer.output[:, i % 10] = i
        elif i % 3 == 1:
            layer.output[:, i % 10] += layer.output[:, (i + 1) % 10] * i
        else:
            layer.output = layer.output.clamp(max=i)
        out = net.output.save()
    return out


def test_evicted_rewritten_graphs_leave_no_generated_source_behind(monkeypatch):
    import linecache

    from fxsight.run import executable

    # small runner caches: eviction starts early (the same code path as at 256/128)
    monkeypatch.setattr(executable, "MAX_RUNNERS", 32)
    monkeypatch.setattr(executable, "MAX_EXECUTABLES", 16)
    net = NNsight(mlp())
    x = torch.randn(4, 5)
    for i in range(200):  # warm-up: every bounded cache full (the largest, validated
        # Programs, holds 128 per model) and evicting, the allocator at its plateau
        _new_structure(net, x, i)
    gc.collect()
    lines, rss, blocks = len(linecache.cache), _rss_mb(), sys.getallocatedblocks()
    for i in range(200, 700):
        _new_structure(net, x, i)
        if i % 50 == 0:
            gc.collect()  # (evicted graphs are cyclic garbage: RSS should not wait for it)
    gc.collect()
    # each structure compiled one rewritten forward, whose source fx kept in linecache
    # (and in its loader) for good: 500 more entries before; a handful of others now
    assert len(linecache.cache) - lines < 20, len(linecache.cache) - lines
    grown_blocks = sys.getallocatedblocks() - blocks
    assert grown_blocks < 1_000, f"{grown_blocks} Python memory blocks more"
    assert _rss_mb() - rss < 4, f"RSS grew by {_rss_mb() - rss:.1f} MB"


def test_a_users_tokenizer_is_left_as_it_was(tokenizer):
    """fxsight pads token ids itself: a tokenizer the user passes is not changed (pad token,
    padding side), while traces of text still batch with left padding."""
    tokenizer.padding_side = "right"
    pad_before = tokenizer.pad_token
    lm = LanguageModel(tiny_gpt2(), tokenizer=tokenizer)
    with lm.trace() as tracer:
        with tracer.invoke("a b c d"):
            long = lm.lm_head.output.save()
        with tracer.invoke("a"):
            short = lm.lm_head.output.save()
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == pad_before
    assert long.shape[1] == short.shape[1]


class _AddsInPlace(torch.nn.Module):
    """``h = layer(x); h += x``: the forward changes the layer's output in place after the
    layer returned it (as transformers' ResNet and Falcon do)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.layer(x)
        h += x
        return self.out(h)


def _written_then(model, x, write, backend, edit=None):
    """The output of a trace that writes ``write`` as ``model.layer``'s whole output
    (then runs ``edit(net)``), and whether ``write`` is unchanged after it."""
    kept = write.clone()
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        net.layer.output = write
        if edit is not None:
            edit(net)
        out = net.output.save()
    return out, torch.equal(write, kept)


def _by_hand(reference_hooks, model, x, write, edit=None):
    """The same by hand: a hook returns a copy of the written value (a hook returning the
    caller's tensor itself would let the forward change it)."""
    def hook(module, args, output):
        value = write.expand(output.shape).clone()
        if edit is not None:
            edit(value)
        return value

    with reference_hooks(model, hooks={"layer": hook}), torch.no_grad():
        return model(x)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_written_tensor_is_not_changed_by_the_models_in_place_ops(backend, reference_hooks):
    """A tensor written as a module's output is the caller's: the forward's own ``+=``
    on that output changes a copy. Two traces writing it give the same output."""
    torch.manual_seed(0)
    model, x = _AddsInPlace().eval(), torch.randn(3, 4)
    write = torch.ones(3, 4)
    first, unchanged = _written_then(model, x, write, backend)
    assert unchanged
    second, _ = _written_then(model, x, write, backend)
    assert torch.equal(first, second)
    assert torch.equal(first, _by_hand(reference_hooks, model, x, write))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
@pytest.mark.parametrize("shape", [(3, 4), (4,)], ids=["whole", "broadcast"])
def test_a_written_tensor_is_not_changed_by_a_later_edit(backend, shape, reference_hooks):
    """``layer.output = v`` then ``layer.output[:, 0] = 0``: the edit changes the module's
    value, not ``v`` (a value saved by an earlier trace, a steering vector); a broadcast
    ``v`` becomes a tensor of its own rather than an expanded view that torch cannot edit
    in place."""
    torch.manual_seed(0)
    model, x = _AddsInPlace().eval(), torch.randn(3, 4)
    write = torch.arange(4.0).expand(shape).clone()

    def edit(net):
        net.layer.output[:, 0] = 0

    def edit_by_hand(value):
        value[:, 0] = 0

    out, unchanged = _written_then(model, x, write, backend, edit)
    assert unchanged
    assert torch.equal(out, _by_hand(reference_hooks, model, x, write, edit_by_hand))


class _Items(torch.nn.Module):
    """A module whose output is a dict."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return {"a": h, "b": h * 2}


class _ChangesAnItem(torch.nn.Module):
    """The forward changes an item of a module's dict output in place."""

    def __init__(self):
        super().__init__()
        self.items = _Items()
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        items = self.items(x)
        first = items["a"]
        first += 1
        return self.out(first + items["b"])


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_tensor_written_as_an_item_of_a_dict_output_is_not_changed(backend,
                                                                     reference_hooks):
    """``module.output["a"] = v`` on a dict output is a write of that item: the forward's
    own ``+=`` on it changes a copy, not ``v``; the other item stays the model's."""
    torch.manual_seed(0)
    model, x, write = _ChangesAnItem().eval(), torch.randn(3, 4), torch.ones(3, 4)
    kept = write.clone()

    def hook(module, args, output):
        return {**output, "a": write.clone()}

    with reference_hooks(model, hooks={"items": hook}), torch.no_grad():
        expected = model(x)
    net = NNsight(model)
    with torch.no_grad(), net.trace(x, backend=backend):
        net.items.output["a"] = write
        out = net.output.save()
    assert torch.equal(write, kept)
    assert torch.equal(out, expected)


# --- autocast: fxsight's fake-tensor forwards leave the user's autocast cache alone ------

def _autocast_state() -> tuple:
    """Whether CPU autocast is on, its dtype, and whether its cache of weight casts is."""
    return (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.is_autocast_cache_enabled())


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _zero_first_column(module, args, output):
    output = output.clone()
    output[:, 0] = 0
    return output


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_saves_under_autocast_are_real_and_equal_hooks(backend, reference_hooks):
    """Inside ``torch.autocast`` (its cache on, the default), a trace's saves are real
    tensors equal to what forward hooks see in the same kind of autocast block: the scan
    that learns shapes on fake tensors leaves no fake weight cast in autocast's cache for
    the real forward to compute with."""
    model, x = mlp(), torch.randn(4, 5)
    with _bf16(), reference_hooks(model, hooks={"layer1": _zero_first_column}):
        seen = {}
        with reference_hooks(model, hooks={"layer2": lambda m, a, o: seen.update(h=o)}):
            expected = model(x)
    net = NNsight(model)
    with _bf16():
        with net.trace(x, backend=backend) as tracer:
            net.layer1.output[:, 0] = 0
            hidden = net.layer2.output.save()
            out = net.output.save()
    assert tracer.backend == backend
    for value in (hidden, out):
        assert type(value) is torch.Tensor and value.dtype == torch.bfloat16
    assert torch.equal(hidden, seen["h"])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("run", ["fx", "hooks", "scan"])
def test_a_plain_forward_after_a_trace_in_the_same_autocast_block_is_plain(run):
    """A plain ``model(x)`` after a trace or ``model.scan`` in the same autocast block is
    a real tensor equal to a plain forward's (autocast reuses a weight's cast until the
    outermost block ends: a fake cast left by fxsight would make it fake), and the trace
    leaves autocast's state (on, dtype, cache flag) as it was."""
    model, x = mlp(), torch.randn(4, 5)
    with _bf16():
        expected = model(x)
    net = NNsight(model)
    with _bf16():
        state = _autocast_state()
        if run == "scan":
            with net.scan(x):
                assert net.layer1.output.dtype == torch.bfloat16
        else:
            with net.trace(x, backend=run):
                net.output.save()
        assert _autocast_state() == state
        after = model(x)
    assert type(after) is torch.Tensor
    assert torch.equal(after, expected)


class _MovesToCpu(torch.nn.Module):
    """A head whose forward calls ``.cpu()``: it cannot run on meta tensors, so the shape
    walk runs it on fake tensors with its real weights."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, h):
        return self.lin(h).cpu()


class _WithHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.head = _MovesToCpu()

    def forward(self, x):
        return self.head(self.layer(x))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_module_called_in_a_trace_under_autocast_leaves_no_fake_cast(backend):
    """A trace that calls a module itself (``net.head(h)``, a logit lens) checks that call
    on fake tensors with the module's real weights: under autocast the call's result and a
    later plain forward are real and equal to plain PyTorch's."""
    torch.manual_seed(0)
    model, x = _WithHead().eval(), torch.randn(3, 4)
    with _bf16():
        expected_lens = model.head(model.layer(x) * 2)
        expected = model(x)
    net = NNsight(model)
    with _bf16():
        state = _autocast_state()
        with net.trace(x, backend=backend) as tracer:
            lens = net.head(net.layer.output * 2).save()
        assert _autocast_state() == state
        after = model(x)
    assert tracer.backend == backend
    assert type(lens) is torch.Tensor and torch.equal(lens, expected_lens)
    assert type(after) is torch.Tensor and torch.equal(after, expected)


class _RescalesOnce(torch.nn.Module):
    """Its first forward divides a weight in place (RWKV's in eval mode), then a flag."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.outer = torch.nn.Linear(4, 4)
        self.rescaled = False

    def forward(self, x):
        if not self.rescaled:
            with torch.no_grad():
                self.outer.weight.div_(2)
            self.rescaled = True
        return self.outer(self.inner(x))


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_weights_changed_in_place_by_the_forward_change_once(backend):
    # the forwards run to learn shapes (on fake tensors, which run an operation on real
    # tensors alone for real) used to halve the weight too: a quarter, silently
    import copy

    torch.manual_seed(0)
    model = _RescalesOnce()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4)
    expected = reference(x)
    net = NNsight(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (auto: the flag's change)
        with torch.no_grad(), net.trace(x, backend=backend):
            hidden = net.inner.output.save()
            out = net.output.save()
    torch.testing.assert_close(hidden, reference.inner(x))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.outer.weight, reference.outer.weight)
    assert model.rescaled


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_a_users_hooks_see_a_module_called_in_a_trace_once_with_real_values(backend):
    """A module called on a traced value (the logit lens) with the user's forward hook and
    pre-hook on it, and a global module hook: each hook runs as often as in the plain
    forward followed by the plain call, always on real tensors. The call's shape check
    used to run them once more on meta tensors (an activation recorder got a meta
    tensor)."""
    model = tiny_gpt2()
    ids = torch.tensor([[5, 17, 9, 33], [8, 21, 4, 6]])
    seen: list = []
    handles = [
        model.lm_head.register_forward_hook(lambda m, a, o: seen.append(("lm_head", o))),
        model.transformer.ln_f.register_forward_pre_hook(
            lambda m, a: seen.append(("ln_f pre", a[0]))),
        torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: seen.append(("global", o)) if m is model.lm_head else None)]
    try:
        with torch.no_grad():
            got = {}
            handle = model.transformer.h[0].register_forward_hook(
                lambda m, a, o: got.setdefault("h0", o))
            model(ids)
            handle.remove()
            expected_lens = model.lm_head(model.transformer.ln_f(got["h0"]))
        expected = [(name, value.device.type) for name, value in seen]
        seen.clear()
        net = NNsight(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (hooked: the hooks backend, with a warning)
            with net.trace(ids, backend=backend):
                lens = net.lm_head(net.transformer.ln_f(net.transformer.h[0].output)).save()
    finally:
        for handle in handles:
            handle.remove()
    assert [(name, value.device.type) for name, value in seen] == expected
    assert all(type(value) is torch.Tensor for _, value in seen)
    assert torch.equal(lens, expected_lens)
