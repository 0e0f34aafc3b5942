"""The eager runner calls ATen entry points directly (fxsight.eager): same values as the
rewritten graph's own generated forward, with every torch.ops call rebound."""

from __future__ import annotations

import torch

from fxsight import NNsight
from fxsight.run.eager import fast_forward
from models import tiny_gpt2


def test_fast_forward_rebinds_every_aten_call_and_gives_the_same_values():
    model = tiny_gpt2()
    ids = torch.randint(0, model.config.vocab_size, (2, 7),
                        generator=torch.Generator().manual_seed(0))
    wrapper = NNsight(model)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with wrapper.trace(ids, use_cache=False) as tracer:
        wrapper.transformer.h[0].output[:, -1] += steer
        hidden = wrapper.transformer.h[1].output.save()
    graph_module = tracer.graph_module
    assert "torch.ops.aten." in graph_module.code
    fast = fast_forward(graph_module)
    code = fast.__func__.__code__
    assert code.co_filename.startswith("<fxsight rewritten forward")
    # no call in the rewritten code goes through torch.ops any more
    assert "ops" not in code.co_names and "ops" in graph_module.forward.__code__.co_names
    inputs = [ids, False, steer, -1, -1]  # (the model's, the Program's, `-1` twice)
    expected = graph_module.forward(*inputs)
    got = fast(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    torch.testing.assert_close(got[0], hidden)


# --- torch's own bindings of the ATen calls (run.eager.bound_forward) ----------------------
def _steered_trace(wrapper, ids, steer):
    with wrapper.trace(ids, use_cache=False) as tracer:
        wrapper.transformer.h[0].output[:, -1] += steer
        hidden = wrapper.transformer.h[1].output.save()
        logits = wrapper.output.logits.save()
    return tracer, hidden, logits


def _reference(model, ids, steer):
    """The same steering by a hand-written forward hook."""
    seen = {}

    def add(module, args, output):
        output = output.clone()
        output[:, -1] += steer
        return output

    handles = [model.transformer.h[0].register_forward_hook(add),
               model.transformer.h[1].register_forward_hook(
                   lambda module, args, output: seen.__setitem__("hidden", output))]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen["hidden"], logits


def test_bound_forward_binds_the_models_operators_and_gives_the_same_values():
    from fxsight.run.eager import bound_forward

    model = tiny_gpt2()
    ids = torch.randint(0, model.config.vocab_size, (2, 7),
                        generator=torch.Generator().manual_seed(0))
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    tracer, hidden, logits = _steered_trace(NNsight(model), ids, steer)
    want_hidden, want_logits = _reference(model, ids, steer)
    assert torch.equal(hidden, want_hidden) and torch.equal(logits, want_logits)
    bound = bound_forward(tracer.graph_module)
    assert bound is not None
    names = bound.__func__.__globals__
    bindings = {name: value for name, value in names.items() if name.startswith("_aten_")}
    # torch's bindings for the model's common operators
    assert bindings["_aten_aten_addmm_default"] is torch.addmm
    assert bindings["_aten_aten_view_default"] is torch.Tensor.view
    assert bindings["_aten_aten_layer_norm_default"] is torch.layer_norm
    assert bindings["_aten_aten_add_Tensor"] is torch.add
    assert bindings["_aten_aten_transpose_int"] is torch.transpose
    assert bindings["_aten_aten_scaled_dot_product_attention_default"] is \
        torch.nn.functional.scaled_dot_product_attention
    # the rest keep the entry points; none goes through torch.ops
    assert "ops" not in bound.__func__.__code__.co_names
    inputs = [ids, False, steer, -1, -1]  # (the model's, the Program's, `-1` twice)
    expected = tracer.graph_module.forward(*inputs)
    got = bound(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_a_binding_that_makes_other_calls_than_the_overload_is_not_used():
    from fxsight.run import eager

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, 4)
    added = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    graph.output(added)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    node = added
    assert eager._same_calls(torch.ops.aten.add.Tensor, torch.add, node)
    assert not eager._same_calls(torch.ops.aten.add.Tensor, torch.sub, node)
    assert not eager._same_calls(torch.ops.aten.add.Tensor, torch.mul, node)
    # (a binding whose arguments do not parse is refused, not raised)
    assert not eager._same_calls(torch.ops.aten.add.Tensor, torch.Tensor.view, node)
    assert eager.bound_forward(module) is not None


def test_bound_forward_is_not_used_under_a_torch_function_mode_or_for_subclasses():
    """A binding answers to ``__torch_function__``, an ``OpOverload`` call does not: with
    a torch function mode active (or a tensor subclass among the inputs) the run takes
    the entry points, and a mode sees what it saw before the bindings."""
    from torch.overrides import TorchFunctionMode

    from fxsight.run import executable
    from fxsight.run.eager import plainly_bindable

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Marked(torch.Tensor):
        pass

    x = torch.randn(2)
    assert plainly_bindable([x, 3, None])
    assert not plainly_bindable([x.as_subclass(Marked)])
    with Seen():
        assert not plainly_bindable([x])

    model = tiny_gpt2()
    wrapper = NNsight(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7),
                        generator=torch.Generator().manual_seed(0))
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    seen = {}
    original = executable.bound_forward
    for bindings in (False, True):
        executable.forget(model)
        if not bindings:
            executable.bound_forward = lambda gm: None
        try:
            tracer, _, _ = _steered_trace(wrapper, ids, steer)  # (made and cached)
            with Seen() as mode:
                _, hidden, logits = _steered_trace(wrapper, ids, steer)
        finally:
            executable.bound_forward = original
        seen[bindings] = sorted(set(mode.names))
        want_hidden, want_logits = _reference(model, ids, steer)
        assert torch.equal(hidden, want_hidden) and torch.equal(logits, want_logits)
    assert seen[True] == seen[False]
    assert "addmm" not in seen[True]


def test_no_binding_is_checked_under_a_users_dispatch_mode():
    """Checking a binding runs it on fake tensors: under a user's dispatch mode, which would
    see those calls, nothing is checked (the entry points run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fxsight.run import eager

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, 4)
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, x)))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    eager._CHECKED.clear()
    with Seen() as mode:
        assert eager.bound_forward(module) is None
    assert mode.calls == [] and not eager._CHECKED
    assert eager.bound_forward(module) is not None


def test_a_language_models_graph_with_its_mask_check_takes_the_bindings(tokenizer):
    """A LanguageModel's eager graph computes the model's mask only where a padding mask
    is not all ones (``attention_masks._MaskUnless``, an object of fxsight's running the
    model's own mask code): it takes torch's bindings all the same (it took the entry
    points: every LanguageModel trace), with the values the entry points give, for
    padded and unpadded batches, and equal to a hand-written hook's where unpadded."""
    from fxsight import LanguageModel
    from fxsight.run import executable

    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = torch.randint(4, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    prompts = {"unpadded": (ids[:1], ids[1:]), "padded": (ids[:1], ids[1:, 2:])}
    made = []
    original = executable.bound_forward

    def patch(first, second):
        with torch.no_grad(), lm.trace() as tracer:
            with tracer.invoke(first):
                clean = lm.transformer.h[0].output[:, -1]
            with tracer.invoke(second):
                lm.transformer.h[0].output[:, -1] = clean + steer
                logits = lm.lm_head.output.save()
        assert tracer.backend == "fx"
        return logits

    results = {}
    for bindings in (True, False):
        executable.forget(model)
        executable.bound_forward = (lambda gm: made.append(original(gm)) or made[-1]) \
            if bindings else (lambda gm: None)
        try:
            results[bindings] = {name: [patch(*pair) for _ in range(2)]
                                 for name, pair in prompts.items()}
        finally:
            executable.bound_forward = original
    executable.forget(model)
    assert made and all(bound is not None for bound in made)
    for name in prompts:
        for got, want in zip(results[True][name], results[False][name]):
            assert torch.equal(got, want), name

    def hook(module, args, output):
        output = output.clone()
        output[1, -1] = output[0, -1] + steer
        return output

    handle = model.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = model(ids, use_cache=False).logits[1:]
    finally:
        handle.remove()
    assert torch.equal(results[True]["unpadded"][0], want)
