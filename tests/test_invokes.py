"""Invokes: several inputs in one forward pass, each block seeing (and writing) only its rows;
``tracer.invoke()`` with no input sees the whole batch; values flow between invokes in any
direction the forward order allows; barriers; errors raised before anything runs.

References are plain PyTorch: the model run by hand on the concatenated batch, with forward
hooks written here.
"""

from __future__ import annotations

import pytest
import torch

from fxsight import LanguageModel, NNsight, OrderError, ShapeError, TraceError
from models import mlp, tiny_gpt2, train_tokenizer

BACKENDS = ["fx", "hooks"]
ATOL = 1e-5


def _x(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 5, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def net():
    module = mlp()
    return NNsight(module), module


@pytest.fixture(scope="module")
def gpt2():
    module = tiny_gpt2()
    return LanguageModel(module, tokenizer=train_tokenizer()), module


def _run_with_hooks(model, x, hooks):
    """Plain forward of ``model`` on ``x`` with ``{path: hook}`` forward hooks installed."""
    handles = [model.get_submodule(p).register_forward_hook(h) for p, h in hooks.items()]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()


# --- rows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_invoke_reads_its_rows_and_the_whole_batch_reads_all(net, backend):
    wrapper, model = net
    a, b = _x(1, 0), _x(3, 1)
    with torch.no_grad(), wrapper.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            ha = wrapper.layer2.output.save()
            ia = wrapper.layer2.input.save()
        with tracer.invoke(b):
            hb = wrapper.layer2.output.save()
            ib = wrapper.layer2.inputs.save()
        with tracer.invoke():
            everything = wrapper.layer2.output.save()
            out = wrapper.output.save()
    seen = {}
    expected = _run_with_hooks(model, torch.cat([a, b]), {
        "layer2": lambda m, args, o: seen.update(out=o.clone(), inp=args[0].clone())})
    assert ha.shape == (1, 10) and hb.shape == (3, 10) and everything.shape == (4, 10)
    torch.testing.assert_close(ha, seen["out"][:1], atol=0, rtol=0)
    torch.testing.assert_close(hb, seen["out"][1:], atol=0, rtol=0)
    torch.testing.assert_close(ia, seen["inp"][:1], atol=0, rtol=0)
    torch.testing.assert_close(ib[0][0], seen["inp"][1:], atol=0, rtol=0)
    torch.testing.assert_close(everything, seen["out"], atol=0, rtol=0)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_touch_only_their_invokes_rows(net, backend):
    wrapper, model = net
    a, b, c = _x(2, 0), _x(1, 1), _x(2, 2)
    with torch.no_grad(), wrapper.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            wrapper.layer1.output[:, 0] = 5.0
        with tracer.invoke(b):
            wrapper.layer2.output = wrapper.layer2.output * 2
        with tracer.invoke(c):
            pass
        with tracer.invoke():
            out = wrapper.output.save()

    def first(m, args, o):
        o = o.clone()
        o[:2, 0] = 5.0
        return o

    def second(m, args, o):
        o = o.clone()
        o[2:3] = o[2:3] * 2
        return o

    expected = _run_with_hooks(model, torch.cat([a, b, c]), {"layer1": first, "layer2": second})
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_batch_write_changes_every_row(net, backend):
    wrapper, model = net
    a, b = _x(2, 0), _x(1, 1)
    with torch.no_grad(), wrapper.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            wrapper.act1.output = wrapper.act1.output + 1
            out = wrapper.output.save()
    expected = _run_with_hooks(model, torch.cat([a, b]), {"act1": lambda m, args, o: o + 1})
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


# --- values between invokes -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_flow_from_an_earlier_invoke_to_a_later_one(gpt2, backend):
    lm, model = gpt2
    clean = torch.tensor([[5, 17, 42, 8, 23, 61]])
    corrupt = torch.tensor([[5, 17, 77, 8, 23, 61]])
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(clean):
            h = lm.transformer.h[0].output
        with tracer.invoke(corrupt):
            lm.transformer.h[1].output[:, 3] = h[:, 3] * 0.5
            logits = lm.lm_head.output.save()
    store = {}

    def keep(m, args, o):
        store["h0"] = o.clone()

    def patch(m, args, o):
        o = o.clone()
        o[1, 3] = store["h0"][0, 3] * 0.5
        return o

    expected = _run_with_hooks(model, torch.cat([clean, corrupt]),
                               {"transformer.h.0": keep, "transformer.h.1": patch}).logits
    torch.testing.assert_close(logits[0], expected[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_flow_from_a_later_invoke_to_an_earlier_one(gpt2, backend):
    """The second invoke's layer-0 output is computed before the first invoke's layer 1, so
    the first invoke may use it: re-entering the first invoke's block (its rows) after the
    second one was recorded."""
    lm, model = gpt2
    first_ids = torch.tensor([[9, 10, 11, 12, 13]])
    second_ids = torch.tensor([[20, 21, 22, 23, 24]])
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(first_ids) as first:
            early_logits = lm.lm_head.output.save()
        with tracer.invoke(second_ids):
            late = lm.transformer.h[0].output
            other_logits = lm.lm_head.output.save()
        with tracer.invoke(first_ids):
            untouched = lm.lm_head.output.save()
        with first:  # back in the first invoke's rows
            lm.transformer.h[1].output = lm.transformer.h[1].output + late
    store = {}

    def keep(m, args, o):
        store["h0"] = o.clone()

    def add(m, args, o):
        o = o.clone()
        o[0] = o[0] + store["h0"][1]
        return o

    batch = torch.cat([first_ids, second_ids, first_ids])
    expected = _run_with_hooks(model, batch,
                               {"transformer.h.0": keep, "transformer.h.1": add}).logits
    torch.testing.assert_close(early_logits[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(other_logits[0], expected[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(untouched[0], expected[2], atol=ATOL, rtol=0)
    assert not torch.allclose(expected[0], expected[2])  # the write did change invoke 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nnsight_barrier_example(gpt2, backend):
    """nnsight's barrier pattern: the first invoke's embeddings replace the second's."""
    lm, model = gpt2
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[30, 31, 32, 33]])
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            embeddings = lm.transformer.wte.output
            barrier()
            out_a = lm.lm_head.output.save()
        with tracer.invoke(b):
            barrier()
            lm.transformer.wte.output = embeddings
            out_b = lm.lm_head.output.save()
    torch.testing.assert_close(out_b, out_a, atol=ATOL, rtol=0)
    with torch.no_grad():
        expected = model(a, use_cache=False).logits
    torch.testing.assert_close(out_a, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_cannot_use_a_value_computed_after_it(gpt2, backend):
    from torch._subclasses.fake_tensor import FakeTensor

    lm, model = gpt2
    runs = []  # real runs of the model (shape probing on fake tensors does not count)
    forward = model.lm_head.forward

    def counted(x):  # (not a hook: a model with hooks runs on the hooks backend)
        out = forward(x)
        if not isinstance(out, FakeTensor):
            runs.append(1)
        return out

    model.lm_head.forward = counted
    try:
        with pytest.raises(OrderError, match=r"transformer\.h\.0\.output depends on "
                                             r"transformer\.h\.1\.output(.|\n)*"
                                             r"transformer\.h\[0\]\.output = late"):
            with lm.trace(backend=backend) as tracer:
                with tracer.invoke([5, 6, 7]):
                    late = lm.transformer.h[1].output
                with tracer.invoke([8, 9, 10]):
                    lm.transformer.h[0].output = late
    finally:
        del model.lm_head.forward
    assert not runs


# --- the whole batch on a language model --------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_batch_of_left_padded_prompts(gpt2, backend):
    lm, model = gpt2
    a, b = [5, 6, 7, 8, 9], [40, 41]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            pass
        with tracer.invoke():
            last = lm.lm_head.output.t[-1].save()
            first = lm.lm_head.output.t[0].save()
            logits = lm.output.logits.save()
    assert logits.shape[:2] == (2, 5)
    for row, ids in enumerate([a, b]):
        with torch.no_grad():
            expected = model(torch.tensor([ids]), use_cache=False).logits[0]
        torch.testing.assert_close(last[row], expected[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(first[row], expected[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[row, -len(ids):], expected, atol=ATOL, rtol=0)


def test_whole_batch_token_index_before_a_later_invoke_is_an_error(gpt2):
    lm, _ = gpt2
    with pytest.raises(ShapeError, match=r"written when the batch had 1 rows, but it has 2"):
        with lm.trace(backend="hooks") as tracer:
            with tracer.invoke([5, 6, 7]):
                pass
            with tracer.invoke():
                lm.lm_head.output.t[-1].save()
            with tracer.invoke([8, 9]):
                pass


# --- misuse -------------------------------------------------------------------------------------
def test_invokes_cannot_nest(net):
    wrapper, _ = net
    with pytest.raises(TraceError, match="invokes cannot be nested"):
        with wrapper.trace() as tracer:
            with tracer.invoke(_x(1, 0)):
                with tracer.invoke(_x(1, 1)):
                    pass


def test_invokes_must_pass_the_same_structure(net):
    wrapper, _ = net
    with pytest.raises(TraceError, match="same structure"):
        with wrapper.trace() as tracer:
            with tracer.invoke(_x(1, 0)):
                pass
            with tracer.invoke((_x(1, 1),)):
                pass


def test_invokes_of_a_language_model_must_agree_on_forward_kwargs(gpt2):
    lm, _ = gpt2
    with pytest.raises(TraceError, match=r"invoke #1 passes other inputs than invoke #0 "
                                         r"\(input_ids, attention_mask, use_cache vs "
                                         r"input_ids, attention_mask\)"):
        with lm.trace() as tracer:
            with tracer.invoke([5, 6]):
                pass
            with tracer.invoke([7, 8], use_cache=True):
                pass
    with pytest.raises(TraceError, match=r"invokes #0 and #1 disagree on .use_cache. "
                                         r"\(False vs True\)(.|\n)*use_cache=True\)"):
        with lm.trace() as tracer:
            with tracer.invoke([5, 6], use_cache=False):
                pass
            with tracer.invoke([7, 8], use_cache=True):
                pass


def test_barrier_reached_by_too_few(net):
    wrapper, _ = net
    with pytest.raises(TraceError, match=r"barrier\(3\) was reached by 2 invoke\(s\) "
                                         r"\(#0, #1\)"):
        with wrapper.trace() as tracer:
            barrier = tracer.barrier(3)
            for seed in range(3):
                with tracer.invoke(_x(1, seed)):
                    if seed < 2:
                        barrier()


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_shape_read_in_an_invoke_that_the_batch_pads_is_refused(gpt2, backend):
    """``h.shape`` inside an invoke is its prompt's alone; in the batch its rows are
    left-padded to the longest invoke, so ``h[:, h.shape[1] - 1]`` picked another token
    than the last, silently (was: the 9th real token of a 14-token prompt padded to 18).
    Now a TraceError names the line that read the shape; dimensions padding does not
    change (``h.size(-1)``, ``len(h)``) and invokes of one length are not refused."""
    lm, module = gpt2
    short, long = "The capital of France is", "The Eiffel Tower is in the city of"
    with pytest.raises(TraceError, match=r"left-padded(.|\n)*test_invokes.py"):
        with lm.trace(backend=backend) as tracer:
            with tracer.invoke(long):
                pass
            with tracer.invoke(short):
                h = lm.transformer.h[0].output
                h[:, h.shape[1] - 1].save()
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(long):
            pass
        with tracer.invoke(short):
            h = lm.transformer.h[0].output
            half = h[:, -1, : h.size(-1) // 2].save()
            rows = len(h)
        with tracer.invoke(long):
            h = lm.transformer.h[0].output
            last = h[:, h.shape[1] - 1].save()
    encoded = lm.tokenizer([long, short, long], return_tensors="pt", padding=True)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
    got = {}
    handle = module.transformer.h[0].register_forward_hook(
        lambda m, a, o: got.__setitem__("h", o))
    try:
        with torch.no_grad():
            module(**encoded, position_ids=positions)
    finally:
        handle.remove()
    assert rows == 1
    torch.testing.assert_close(half, got["h"][1:2, -1, :32])
    torch.testing.assert_close(last, got["h"][2:, -1])
