"""Compiled runs whose outputs live in memory the next run overwrites (CUDA graphs).

A graph compiled with CUDA graphs (``compile={"mode": "reduce-overhead"}``) replays into
the same output buffers every time: a tensor a run returned is overwritten by the next
run of that graph. fxsight copies what a run returns before handing it on (saves, the
model's output, the KV cache a decoding step passes to the next), so a saved value keeps
its value and a generation reads each step's real cache.

CPU has no CUDA graphs: ``reusing_backend`` below does what they do to outputs (copies
them into buffers kept per graph and returns those), so the buffer handling is tested
here; the same tests against the unchanged code (``copies_outputs`` off) show the
overwriting they would suffer.
"""

from __future__ import annotations

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from fxsight.run import executable
from fxsight.run.options import CompileOptions
from models import mlp, tiny_gpt2

PROMPT = "The Eiffel Tower is in"


# every graph the stand-in backend compiled: how often it ran, and what it saw that would
# keep CUDA graphs from being used
GRAPHS: list[dict] = []


def reusing_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """A torch.compile backend that runs ``gm`` eagerly and returns each output tensor
    (but those in an input's memory) in a buffer of its own that every later run with
    that output's shape overwrites, as a CUDA-graph replay does.

    It also notes (``GRAPHS``) a run that changes an input in place that dynamo did not
    take as a static address (``torch._dynamo.mark_static_address``, as transformers'
    static cache marks its tensors): inductor's CUDA graphs copy every other input into a
    buffer of their own, and skip the graph for such a run (they would change the copy)."""
    buffers: dict[int, torch.Tensor] = {}
    # (how aot_autograd finds a dynamo graph's static inputs; checked torch 2.11-2.13)
    static = [bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))
              for node in gm.graph.find_nodes(op="placeholder")]
    seen = {"runs": 0, "skipped": []}
    GRAPHS.append(seen)

    def run(*args):
        versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        outputs = gm(*args)
        seen["runs"] += 1
        for position, (arg, version) in enumerate(zip(args, versions)):
            if version is not None and arg._version != version and not static[position]:
                seen["skipped"].append(f"input {position} changed in place, not static")
        flat, spec = torch.utils._pytree.tree_flatten(outputs)
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        returned = []
        for position, value in enumerate(flat):
            if isinstance(value, torch.Tensor) and \
                    value.untyped_storage().data_ptr() not in inputs:
                buffer = buffers.get(position)
                if buffer is None or buffer.shape != value.shape or \
                        buffer.stride() != value.stride() or buffer.dtype != value.dtype:
                    buffer = buffers[position] = torch.empty_strided(
                        value.shape, value.stride(), dtype=value.dtype, device=value.device)
                with torch.no_grad():
                    buffer.copy_(value)
                value = buffer
            returned.append(value)
        return torch.utils._pytree.tree_unflatten(returned, spec)

    return run


REUSING = {"backend": reusing_backend, "mode": "reduce-overhead"}


@pytest.fixture
def without_copies(monkeypatch):
    """fxsight as it was: compiled outputs handed on as they are."""
    monkeypatch.setattr(CompileOptions, "reuses_outputs", property(lambda self: False))


@pytest.mark.parametrize("value, reuses", [
    (True, False),
    ({"mode": "reduce-overhead"}, True),
    ({"mode": "max-autotune"}, True),
    ({"mode": "max-autotune-no-cudagraphs"}, False),
    ({"options": {"triton.cudagraphs": True}}, True),
    ({"backend": "cudagraphs"}, True),
    ({"backend": "aot_eager"}, False),
    ({"backend": "aot_eager", "mode": "reduce-overhead"}, True),
])
def test_which_compile_options_reuse_their_outputs(value, reuses):
    assert CompileOptions.of(value).reuses_outputs is reuses


def _two_traces(net, compile):
    first_x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    second_x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    values = []
    for x in (first_x, second_x):
        with net.trace(x, compile=compile, backend="fx"):
            hidden = net.layer1.output.save()
            out = net.output.save()
        values.append((hidden, out))
    return (first_x, second_x), values


def _mlp_reference(model, x):
    seen = {}
    handle = model.layer1.register_forward_hook(
        lambda module, args, output: seen.__setitem__("hidden", output.clone()))
    try:
        out = model(x)
    finally:
        handle.remove()
    return seen["hidden"], out


def test_saves_of_earlier_traces_keep_their_values():
    model = mlp()
    net = NNsight(model)
    inputs, values = _two_traces(net, REUSING)
    for x, (hidden, out) in zip(inputs, values):
        want_hidden, want_out = _mlp_reference(model, x)
        assert torch.equal(hidden, want_hidden)
        assert torch.equal(out, want_out)


def test_the_stand_in_backend_overwrites_outputs_fxsight_does_not_copy(without_copies):
    model = mlp()
    net = NNsight(model)
    inputs, values = _two_traces(net, REUSING)
    (first_hidden, _), (second_hidden, _) = values
    assert first_hidden.data_ptr() == second_hidden.data_ptr()  # one buffer, overwritten
    assert not torch.equal(first_hidden, _mlp_reference(model, inputs[0])[0])


def _generate(lm, steer, compile, backend="fx", new_tokens=6, **options):
    with lm.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False, compile=compile,
                     backend=backend, **options) as tracer:
        with tracer.all():
            each = lm.transformer.h[0].output[:, -1].save()
            lm.transformer.h[1].output[:, -1] += steer
        tokens = tracer.result.save()
    assert tracer.backend == backend
    return tokens, each


def test_generation_reads_each_steps_cache_and_keeps_each_steps_saves(tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    eager_tokens, eager_each = _generate(lm, steer, None)
    # (a cache that grows: each step's cache tensors are outputs the next step reads)
    tokens, each = _generate(lm, steer, REUSING, cache_implementation="dynamic")
    assert torch.equal(tokens, eager_tokens)
    assert len(each) == len(eager_each) == 6
    for got, want in zip(each, eager_each):
        assert torch.equal(got, want)
    assert len({value.data_ptr() for value in each}) == len(each)


def test_generation_without_the_copies_goes_wrong(tokenizer, without_copies):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    eager_tokens, eager_each = _generate(lm, steer, None)
    tokens, each = _generate(lm, steer, REUSING, cache_implementation="dynamic")
    assert not all(torch.equal(got, want) for got, want in zip(each, eager_each))


def test_outputs_in_an_input_are_not_copied():
    x = torch.randn(3)
    kept = x.view(3)
    fresh = x * 2
    owned = executable._owned((kept, [fresh, 7]), [x])
    assert owned[0] is kept
    assert owned[1][0] is not fresh and torch.equal(owned[1][0], fresh)
    assert owned[1][1] == 7
    # (inductor records CUDA graphs of CUDA tensors only: others are left as they are)
    assert executable._owned((fresh,), [x], "cuda")[0] is fresh


# --- generation with a static cache: every decoding step one graph ---------------------
def _stats(*names):
    counts = fxsight.stats()
    return {name: counts.get(name, 0) for name in names}


def _grown(before):
    after = _stats(*before)
    return {name: after[name] - before[name] for name in before}


def _same_steps(each, expected):
    """Per-step values alike: bit-equal at the decoding steps; at the first, within float
    rounding (eagerly, transformers attends to the first step's keys only, a slice of the
    static cache whose length it reads from the cache; the graph, which cannot read it,
    attends to the whole cache with a mask)."""
    assert len(each) == len(expected)
    torch.testing.assert_close(each[0], expected[0], rtol=0, atol=1e-6)
    for got, want in zip(each[1:], expected[1:]):
        assert torch.equal(got, want)


def test_static_cache_generation_matches_hooks_and_shares_one_graph(tokenizer):
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    hooks_tokens, hooks_each = _generate(lm, steer, None, backend="hooks",
                                         cache_implementation="static")
    before = _stats("captures", "splices")
    tokens, each = _generate(lm, steer, None, cache_implementation="static")
    assert torch.equal(tokens, hooks_tokens)
    _same_steps(each, hooks_each)
    # the first step and the decoding steps: two graphs for six steps
    assert _grown(before) == {"captures": 2, "splices": 2}
    before = _stats("captures", "splices")
    again, _ = _generate(lm, steer, None, cache_implementation="static")
    assert torch.equal(again, tokens)
    assert _grown(before) == {"captures": 0, "splices": 0}


def test_cuda_graph_generation_uses_a_static_cache_and_compiles_two_graphs(tokenizer):
    """Under a CUDA-graph compile, generation takes transformers' static cache (the call
    chose none): two compiled graphs for every step, the tokens of eager fxsight, and each
    step's saves its own."""
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    eager_tokens, eager_each = _generate(lm, steer, None)
    static_tokens, static_each = _generate(lm, steer, None, cache_implementation="static")
    before = _stats("compilations")
    tokens, each = _generate(lm, steer, REUSING, new_tokens=6)
    assert _grown(before) == {"compilations": 2}
    assert torch.equal(tokens, eager_tokens) and torch.equal(tokens, static_tokens)
    _same_steps(each, static_each)
    assert len({value.data_ptr() for value in each}) == len(each)


@pytest.mark.parametrize("marked", [True, False])
def test_a_static_caches_tensors_are_static_addresses_as_in_a_plain_forward(
        tokenizer, monkeypatch, marked):
    """transformers marks the tensors of a static cache's layers as static addresses when
    it allocates them outside compiled code, so that CUDA graphs update them in place; on
    the fx backend the first step's graph allocates them, and fxsight marks them as the
    plain forward does: they are marked alike after a plain ``generate`` and fxsight's,
    and the decoding steps' graph (which updates them in place) keeps its CUDA graphs.
    Without the marks (``marked=False``: the code before) they are skipped."""
    from transformers import StaticCache

    from fxsight.capture import caches
    from fxsight.generate.steps import CACHE

    if not marked:
        monkeypatch.setattr(caches, "mark_static_address", lambda tensor: None)
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4

    def static_types(cache):
        return [(getattr(layer.keys, "_dynamo_static_input_type", None),
                 getattr(layer.values, "_dynamo_static_input_type", None),
                 getattr(layer.cumulative_length, "_dynamo_static_input_type", None))
                for layer in cache.layers]

    plain_cache = StaticCache(config=model.config, max_cache_len=32)
    ids = lm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False, **{CACHE: plain_cache})
    assert all(kind is not None for layer in static_types(plain_cache) for kind in layer)
    expected, _ = _generate(lm, steer, None, cache_implementation="static")
    del GRAPHS[:]
    cache = StaticCache(config=model.config, max_cache_len=32)
    tokens, _ = _generate(lm, steer, REUSING, **{CACHE: cache})
    assert torch.equal(tokens, expected)
    # (the first step's graph and the decoding steps' one, run five times)
    assert sorted(graph["runs"] for graph in GRAPHS) == [1, 5]
    decoding = max(GRAPHS, key=lambda graph: graph["runs"])
    if marked:
        assert static_types(cache) == static_types(plain_cache)
        assert decoding["skipped"] == []
    else:
        assert decoding["skipped"]


def test_a_chosen_cache_is_kept_under_cuda_graphs(tokenizer):
    from fxsight.api.graph_generation import _with_static_cache
    from fxsight.run.options import RunOptions

    model = tiny_gpt2(vocab_size=len(tokenizer))
    graphs = RunOptions.of(compile={"mode": "reduce-overhead"})
    assert _with_static_cache(model, {}, {}, graphs) == {"cache_implementation": "static"}
    for options in ({"cache_implementation": "dynamic"}, {"use_cache": False}):
        assert _with_static_cache(model, {}, options, graphs) == options
    assert _with_static_cache(model, {"past_key_values": object()}, {}, graphs) == {}
    assert _with_static_cache(model, {}, {}, RunOptions.of(compile=True)) == {}


def test_a_static_caches_inputs_are_listed_as_the_generic_flattening_lists_them():
    """Later decoding steps list a static cache's tensors directly (its layout known from
    the step before): the leaves and layout key of the generic flattening, and the
    generic flattening again where the cache is laid out otherwise."""
    from transformers import StaticCache

    from fxsight.capture.captures import flat_inputs
    from fxsight.generate.step_io import CacheObjectLayout
    from fxsight.generate.steps import CACHE

    model = tiny_gpt2()
    cache = StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 5)), **{CACHE: cache})
    inputs = dict(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=None,
                  position_ids=None, cache=cache, use_cache=True, logits_to_keep=0)
    layout = CacheObjectLayout()
    for _ in range(2):
        flat, spec = layout.flat(inputs)
        want, want_spec = flat_inputs((), inputs)
        assert layout.plan is not None
        assert spec == want_spec and len(flat) == len(want)
        assert all(a is b for a, b in zip(flat, want))
    assert layout._listed(inputs) is not None
    cache.layers[1].max_cache_len = 13  # (a plain value of the layout changed)
    assert layout._listed(inputs) is None
    flat, spec = layout.flat(inputs)
    assert spec == flat_inputs((), inputs)[1] != want_spec


def test_transformers_does_not_compile_fxsights_step_runner(tokenizer):
    """For a static cache on a GPU, transformers' ``generate`` compiles the model's forward
    itself (and keeps it as ``model._compiled_call``); on the fx backend that forward is
    fxsight's step runner, whose graphs fxsight compiles (``compile=``): transformers'
    compile is off there. (On a CPU it is asked for with ``_compile_all_devices``.)"""
    from transformers import CompileConfig

    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    expected, _ = _generate(lm, steer, None, cache_implementation="static")
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    tokens, _ = _generate(lm, steer, None, cache_implementation="static",
                          compile_config=config)
    assert torch.equal(tokens, expected)
    assert "_compiled_call" not in vars(model)


@pytest.mark.parametrize("suffix", [True, False])
def test_a_sweep_under_reused_outputs_scores_as_eagerly(suffix):
    """A patching sweep under a compile that reuses its outputs scores as eagerly: what a
    batch's run returns lives only until the next batch's run, so a sweep that kept a
    batch's outputs to score later would score other batches' values."""
    from fxsight import patching

    model = tiny_gpt2()
    net = NNsight(model)
    clean = torch.randint(4, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 5) % 128

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 7]

    def sweep(**options):
        return patching.activation_patching(net, clean, corrupted, metric, progress=False,
                                            suffix=suffix, batch_size=4, **options)

    eager = sweep()
    reused = sweep(compile=REUSING)
    assert eager.values.abs().max() > 1e-3
    torch.testing.assert_close(reused.values, eager.values, rtol=0, atol=1e-6)
