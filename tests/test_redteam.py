"""Findings of red-team issue 18 (S6, S7, U2, U3, U4, C1): each result equals a
hand-written forward hook or plain PyTorch, on both backends, or is a clear error before
anything runs."""

from __future__ import annotations

import pytest
import torch

from fxsight import NNsight
from fxsight.errors import TraceError

BACKENDS = ("fx", "hooks")


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))


# --- S6: a tensor changed in place later in the block ----------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_changed_in_place_between_uses_is_an_error_naming_the_first_line(backend):
    # nnsight (and hooks by hand) would write 1 into layer 0, 2 into layer 2; the
    # Program runs when the block ends, so the first line would read 2: refused
    net = NNsight(_mlp())
    buf = torch.zeros(3)
    with pytest.raises(TraceError, match=r"changed in\s+place later in the block") as info:
        with net.trace(torch.randn(3, 4), backend=backend):
            for i in (0, 2):
                buf[:] = i + 1
                net[i].output[:, 0] = buf
    assert "net[i].output[:, 0] = buf" in str(info.value)
    assert buf.tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_per_use_gives_the_value_of_each_line(backend, reference_hooks):
    model = _mlp()
    x = torch.randn(3, 4)

    def writer(value):
        def hook(module, args, output):
            output = output.clone()
            output[:, 0] = value
            return output
        return hook

    with reference_hooks(model, hooks={"0": writer(1.0), "2": writer(3.0)}):
        expected = model(x)
    net = NNsight(model)
    buf = torch.zeros(3)
    with net.trace(x, backend=backend):
        for i in (0, 2):
            buf[:] = i + 1
            net[i].output[:, 0] = buf.clone()
        out = net.output.save()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_changed_in_place_after_its_last_use_is_an_error(backend):
    net = NNsight(_mlp())
    steer = torch.ones(4)
    with pytest.raises(TraceError, match=r"changed in\s+place later in the block") as info:
        with net.trace(torch.randn(2, 4), backend=backend):
            net[0].output[:] = steer  # the line named
            steer += 1
    assert "net[0].output[:] = steer" in str(info.value)


# --- S7: decoding steps that never happened --------------------------------------------
@pytest.fixture(scope="module")
def lm(tokenizer):
    from fxsight import LanguageModel
    from models import tiny_gpt2
    return LanguageModel(tiny_gpt2(vocab_size=len(tokenizer)), tokenizer=tokenizer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_past_max_new_tokens_is_an_error_naming_the_line_before_running(lm,
                                                                            backend):
    """A step ``max_new_tokens`` cannot reach (``tracer.iter[7]``, a list with one, a
    ``for step in tracer.iter[:10]`` loop's later steps) is refused before the model runs
    (it was refused after generating, the model run for nothing)."""
    calls = []
    handle = lm._module.transformer.wte.register_forward_hook(lambda *a: calls.append(1)) \
        if backend == "hooks" else None
    try:
        with pytest.raises(TraceError, match=r"decoding step 7.*max_new_tokens=3 makes at "
                                             r"most 3 step") as info:
            with lm.generate("Hello there", max_new_tokens=3, do_sample=False,
                             backend=backend) as tracer:
                with tracer.iter[7]:
                    late = lm.transformer.h[0].output.save()  # the line named
        assert "late = lm.transformer.h[0].output.save()" in str(info.value)
        with pytest.raises(TraceError, match=r"decoding step 5.*max_new_tokens=3"):
            with lm.generate("Hello there", max_new_tokens=3, do_sample=False,
                             backend=backend) as tracer:
                with tracer.iter[[1, 5]]:
                    lm.transformer.h[0].output[:] = 0
        with pytest.raises(TraceError, match=r"step loop is for decoding step 3.*"
                                             r"max_new_tokens=3"):
            with lm.generate("Hello there", max_new_tokens=3, do_sample=False,
                             backend=backend) as tracer:
                for step in tracer.iter[:10]:
                    lm.transformer.h[0].output.save()
    finally:
        if handle is not None:
            handle.remove()
    assert calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_an_eos_token_cut_off_is_an_error_naming_the_line(lm, backend):
    """Within ``max_new_tokens``, a step that an eos token cut off is known after the run:
    an error naming the line and the steps that ran."""
    ids = lm.tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        first = lm._module.generate(**ids, max_new_tokens=1, do_sample=False)[0, -1]
    with pytest.raises(TraceError, match=r"decoding step 2.*ran 1 step"):
        with lm.generate("Hello there", max_new_tokens=3, do_sample=False,
                         eos_token_id=int(first), pad_token_id=int(first),
                         backend=backend) as tracer:
            with tracer.iter[2]:
                lm.transformer.h[0].output.save()  # the line named


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slice_past_the_last_step_runs_the_steps_that_exist(lm, backend):
    with lm.generate("Hello there", max_new_tokens=3, do_sample=False,
                     backend=backend) as tracer:
        with tracer.iter[1:10]:
            some = lm.lm_head.output.save()
        with tracer.all():
            every = lm.lm_head.output.save()
    assert len(some) == 2 and len(every) == 3
    torch.testing.assert_close(some, every[1:])


# --- U2: a prompt longer than the model's positions --------------------------------------
def test_a_prompt_longer_than_the_positions_is_an_error_at_the_invoke(tokenizer):
    from fxsight import LanguageModel
    from models import tiny_gpt2
    model = tiny_gpt2(vocab_size=len(tokenizer))
    limit = model.config.n_positions
    lm = LanguageModel(model, tokenizer=tokenizer)
    ids = torch.randint(4, 100, (1, limit + 3))
    with pytest.raises(TraceError, match=rf"{limit + 3} tokens long.*{limit} positions") \
            as info:
        with lm.trace() as tracer:
            with tracer.invoke(ids):  # the line named
                lm.transformer.h[0].output.save()
    assert "with tracer.invoke(ids):" in str(info.value)
    with lm.trace(ids[:, :limit]):  # as long as the positions: fine
        out = lm.lm_head.output.save()
    assert out.shape[1] == limit



def test_a_cache_and_an_input_longer_than_the_positions_is_an_error_at_the_line(tokenizer):
    """The check counts a cache's tokens too (was: torch's bare "index out of range in
    self" from inside the position embedding, on fx and hooks)."""
    from fxsight import LanguageModel
    from models import tiny_gpt2
    model = tiny_gpt2(vocab_size=len(tokenizer), n_positions=16)
    lm = LanguageModel(model, tokenizer=tokenizer)
    with torch.no_grad():
        cache = model(torch.randint(4, 100, (1, 12)), use_cache=True).past_key_values
    with pytest.raises(TraceError, match=r"cache's 12 tokens and the input's 6 are 18 tokens"
                                         r", longer than the model's 16 positions") as info:
        with lm.trace(torch.randint(4, 100, (1, 6)), past_key_values=cache):  # the line
            lm.output.save()
    assert "past_key_values=cache):  # the line" in str(info.value)
    assert cache.get_seq_length() == 12  # (nothing ran)

# --- U3: a module registered under two names ---------------------------------------------
class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 4)
        self.b = self.a  # the same module under a second name
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.b(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_name_of_a_shared_module_reads_and_writes_its_sites(backend, reference_hooks):
    model = _Shared()
    x = torch.randn(3, 4)
    seen = {}

    def hook(module, args, output):
        output = output.clone()
        output[:, 0] = 5.0  # (an in-place edit: the saved read sees it, as in nnsight)
        seen["out"] = output
        return output

    with reference_hooks(model, hooks={"a": hook}):
        expected = model(x)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        by_b = net.b.output.save()
        by_a = net.a.output.save()
        net.b.output[:, 0] = 5.0
        out = net.output.save()
    torch.testing.assert_close(by_b, seen["out"])
    torch.testing.assert_close(by_a, seen["out"])
    torch.testing.assert_close(out, expected)


# --- U4: unpacking the keyword arguments of .inputs ---------------------------------------
class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, scale=1.0, shift=0.0):
        return self.lin(x) * scale + shift


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = _Scaled()

    def forward(self, x):
        return self.sub(x, scale=2.0, shift=1.0)


@pytest.mark.parametrize("backend", ("auto", "hooks"))
def test_unpacking_the_keyword_arguments_of_inputs(backend, reference_hooks):
    torch.manual_seed(0)
    model, x = _Outer(), torch.randn(2, 3)
    with reference_hooks(model, pre_hooks={"sub": lambda m, a, k: (a, {**k, "scale": 5.0})}):
        expected = model(x)
    net = NNsight(model)
    with pytest.warns(RuntimeWarning) if backend == "auto" else _nothing():
        with net.trace(x, backend=backend) as tracer:
            args, kw = net.sub.inputs
            assert kw.keys() == ["scale", "shift"] and list(kw) == ["scale", "shift"]
            assert [key for key, _ in kw.items()] == ["scale", "shift"]
            assert len(kw.values()) == 2
            net.sub.inputs = (args, {**kw, "scale": 5.0})
            out = net.output.save()
    assert tracer.backend == "hooks"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_unpacking_the_keyword_arguments_of_inputs_is_refused_on_fx():
    torch.manual_seed(0)
    net = NNsight(_Outer())
    with pytest.raises(TraceError, match="constant"):
        with net.trace(torch.randn(2, 3), backend="fx"):
            args, kw = net.sub.inputs
            net.sub.inputs = (args, {**kw, "scale": 5.0})


def _nothing():
    import contextlib
    return contextlib.nullcontext()


# --- C1: metadata of one invoke ignores other invokes' nodes -----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_of_an_earlier_invoke_after_a_whole_batch_token_write(lm, backend):
    prompts = ["The Eiffel Tower is in the city of", ["Hello", "Big Ben is"]]
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(prompts[0]):
            first = lm.transformer.h[0].output.save()
        with tracer.invoke(prompts[1]):
            second = lm.transformer.h[0].output.save()
        with tracer.invoke():
            lm.transformer.h[1].output.token[0] = 0
            everything = lm.transformer.h[1].output.save()
        # after the write (the shorter invoke's rows: the batch pads its tokens, so only
        # its row count is read; its whole shape is refused, see test_invokes)
        shapes = (tuple(first.shape), second.size(0))
    assert shapes[0] == tuple(first.shape)  # (the longest prompt: no padding)
    assert shapes[0][0] == 1 and shapes[1] == 2 == second.shape[0]
    mask = lm.tokenizer(prompts[0])["attention_mask"]
    assert shapes[0][1] == len(mask)
    # the first real token of every row is zero, and nothing else is
    for row, length in enumerate([len(mask)] + [len(lm.tokenizer(p)["input_ids"])
                                                for p in prompts[1]]):
        first_real = everything.shape[1] - length
        assert everything[row, first_real].abs().sum() == 0
        assert everything[row, first_real + 1:].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_named_sequential_indexed_by_position_reads_its_module(backend):
    from models import mlp
    model = mlp()
    x = torch.randn(2, model.layer1.in_features)
    net = NNsight(model)
    with net.trace(x, backend=backend):
        by_index = net[0].output.save()
    torch.testing.assert_close(by_index, model.layer1(x))
