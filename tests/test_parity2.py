"""nnsight parity, part 2 (issue 13): Python per decoding step (`for step in tracer.all()`,
`step` a real int), `tracer.iter` over a module called several times in one forward,
`fxsight.save(list())`, `model.session()`; against hand-written hooks and plain
transformers."""

import pytest
import torch

import fxsight
from fxsight import LanguageModel, NNsight
from hook_references import hooked_generate

BACKENDS = ["fx", "hooks"]
PROMPT = "The Eiffel Tower is in"


def _generate_with_hooks(model, tokenizer, hooks, steps=4):
    """Plain transformers generate with hand-written forward hooks ``{path: fn(call, out)}``
    (``call``: the decoding step, counted per module); returns the generated ids."""
    def counting(fn):
        calls = {"n": 0}

        def hook(module, args, output):
            step = calls["n"]
            calls["n"] += 1
            return fn(step, output)
        return hook

    encoded = tokenizer([PROMPT], return_tensors="pt")
    return hooked_generate(model, **encoded, do_sample=False, max_new_tokens=steps,
                           hooks={path: counting(fn) for path, fn in hooks.items()})


def _steer(seed):
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 4


# --- 1. per-step Python in generate -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_an_int_in_a_generate_loop(gpt2, tokenizer, backend):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    steers = [_steer(i) for i in range(4)]
    seen = []
    with lm.generate(PROMPT, max_new_tokens=4, do_sample=False, backend=backend) as tracer:
        logits = fxsight.save(list())
        for step in tracer.all():
            seen.append(step)
            if step % 2 == 1:  # Python on the step number
                lm.transformer.h[1].output[:, -1] += steers[step]  # indexing by it
            logits.append(lm.lm_head.output[:, -1])
        tokens = tracer.result.save()
    assert seen == [0, 1, 2, 3] and tracer.backend == backend

    expected_logits = []

    def steer(step, output):
        if step % 2 == 1:
            output = output.clone()
            output[:, -1] += steers[step]
            return output

    def keep(step, output):
        expected_logits.append(output[:, -1].clone())

    expected = _generate_with_hooks(gpt2, tokenizer, {"transformer.h.1": steer,
                                                      "lm_head": keep})
    assert torch.equal(tokens, expected)
    assert len(logits) == 4 and all(type(v) is torch.Tensor for v in logits)
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_loop_values_flow_between_steps(gpt2, tokenizer, backend):
    """A value of step 0 written at step 2; a value saved in a step loop is that step's."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.generate(PROMPT, max_new_tokens=4, do_sample=False, backend=backend) as tracer:
        for step in tracer.iter[0:3]:
            if step == 0:
                first = lm.transformer.h[0].output[:, -1]
            if step == 2:
                lm.transformer.h[0].output[:, -1] = first * 3
                third = lm.transformer.h[0].output.save()
        tokens = tracer.result.save()
    kept = {}

    def hook(step, output):
        if step == 0:
            kept["first"] = output[:, -1].clone()
        if step == 2:
            output = output.clone()
            output[:, -1] = kept["first"] * 3
            kept["third"] = output
            return output

    expected = _generate_with_hooks(gpt2, tokenizer, {"transformer.h.0": hook})
    assert torch.equal(tokens, expected)
    assert type(third) is torch.Tensor
    torch.testing.assert_close(third, kept["third"])


def test_step_loop_with_chosen_steps_and_break(gpt2, tokenizer):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with lm.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
        steps = []
        for step in tracer.iter[1::2]:  # open-ended: up to max_new_tokens
            steps.append(step)
        for step in tracer.all():
            if step == 2:
                break
            lm.transformer.h[0].output[:, -1] += 1.0  # steps 0 and 1 only
        with tracer.all():  # the context manager records once: a list per step
            each = lm.lm_head.output.save()
        tokens = tracer.result.save()
    assert steps == [1, 3] and len(each) == 5

    def hook(step, output):
        if step < 2:
            output = output.clone()
            output[:, -1] += 1.0
            return output

    expected = _generate_with_hooks(gpt2, tokenizer, {"transformer.h.0": hook}, steps=5)
    assert torch.equal(tokens, expected)


def test_open_ended_step_loop_needs_max_new_tokens(gpt2, tokenizer):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(fxsight.TraceError, match="max_new_tokens.*\n?.*test_parity2.py"):
        with lm.generate(PROMPT, max_length=12, do_sample=False) as tracer:
            for _ in tracer.all():
                pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_loop_cut_short_by_eos_is_an_error(gpt2, tokenizer, backend):
    encoded = tokenizer([PROMPT], return_tensors="pt")
    first = gpt2.generate(**encoded, do_sample=False, max_new_tokens=1)[0, -1]
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(fxsight.TraceError, match="ended after 1 step(.|\n)*test_parity2.py"):
        with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend,
                         eos_token_id=int(first)) as tracer:
            for _ in tracer.all():
                lm.lm_head.output.save()


# --- 1b. tracer.iter over a module called several times in one forward ------------------------
class Loop(torch.nn.Module):
    """A layer applied three times."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.layer(x))
        return self.head(x)


def _loop_reference(model, x, change):
    """Hand-written: a hook on ``layer`` counting its calls, ``change(call, out)``."""
    seen, calls = [], {"n": 0}

    def hook(module, args, output):
        call = calls["n"]
        calls["n"] += 1
        new = change(call, output)
        seen.append((output if new is None else new).clone())
        return new

    handle = model.layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return seen, model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_over_the_calls_of_a_module(backend):
    model = Loop()
    net = NNsight(model)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    with net.trace(x, backend=backend) as tracer:
        outs = fxsight.save(list())
        calls = []
        for i in tracer.iter[:]:  # the layer's three calls
            calls.append(i)
            if i == 1:
                net.layer.output[:, 0] = 0
            outs.append(net.layer.output)
        with tracer.iter[2]:
            third_input = net.layer.input.save()
        out = net.output.save()

    def change(call, output):
        if call == 1:
            output = output.clone()
            output[:, 0] = 0
            return output

    seen, expected = _loop_reference(model, x, change)
    assert calls == [0, 1, 2] and tracer.backend == backend
    for got, want in zip(outs, seen):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(third_input, torch.tanh(seen[1]))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_past_the_calls_of_a_module_is_an_error(backend):
    net = NNsight(Loop())
    with pytest.raises(fxsight.FxsightError, match="test_parity2.py"):
        with net.trace(torch.ones(1, 4), backend=backend) as tracer:
            for _ in tracer.iter[0:5]:
                net.layer.output.save()
    with pytest.raises(fxsight.TraceError, match="uses none"):
        with net.trace(torch.ones(1, 4), backend=backend) as tracer:
            for _ in tracer.all():
                pass


# --- 2. fxsight.save(obj) ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_save_keeps_a_list_and_a_dict(backend):
    model = Loop()
    net = NNsight(model)
    x = torch.randn(3, 4)
    with net.trace(x, backend=backend):
        acts = fxsight.save(list())
        named = fxsight.save({})
        acts.append(net.head.input)
        named["out"] = net.output
        acts.append(named["out"] * 2)
    with torch.no_grad():
        expected = model(x)
    assert all(type(v) is torch.Tensor for v in acts)
    torch.testing.assert_close(named["out"], expected)
    torch.testing.assert_close(acts[1], expected * 2)


def test_save_of_a_list_outside_a_trace_is_an_error():
    with pytest.raises(fxsight.TraceError, match="inside a trace or a session"):
        fxsight.save(list())


# --- 3. model.session() --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_values_flow_between_traces(backend):
    model = Loop()
    net = NNsight(model)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with net.session() as session:
        outs = fxsight.save(list())  # collects over every trace of the session
        with net.trace(a, backend=backend):
            hidden = net.head.input  # no .save(): used by the next trace
        with net.trace(b, backend=backend):
            net.head.input = hidden
            outs.append(net.output)
        ran = 0
        for x in (a, b, a):  # a loop over traces, with a condition and a break
            if ran == 2:
                break
            with net.trace(x, backend=backend):
                outs.append(net.output)
            ran += 1
        if outs[-1].sum() > 1e9:  # real values between traces
            with net.trace(a, backend=backend):
                pass
    assert session is not None and len(outs) == 3
    with torch.no_grad():
        expected_hidden = torch.tanh(model.layer(torch.tanh(model.layer(torch.tanh(
            model.layer(a))))))
        torch.testing.assert_close(hidden, expected_hidden)
        torch.testing.assert_close(outs[0], model.head(expected_hidden))
        torch.testing.assert_close(outs[1], model(a))
        torch.testing.assert_close(outs[2], model(b))


def test_outside_a_session_an_unsaved_value_of_an_earlier_trace_is_refused():
    net = NNsight(Loop())
    with net.trace(torch.ones(1, 4)):
        hidden = net.head.input
    with pytest.raises(fxsight.TraceError, match="from an earlier trace was used here"):
        with net.trace(torch.ones(1, 4)):
            net.head.input = hidden


# --- 4. tracer.cache() inside generate ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_inside_generate_has_an_entry_per_step(gpt2, tokenizer, backend):
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    steer = _steer(7)
    with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend) as tracer:
        with tracer.all():
            lm.transformer.h[0].output[:, -1] += steer
        cache = tracer.cache(modules=[lm.transformer.h[0], "lm_head"])
        with tracer.iter[1]:
            second = tracer.cache(modules=["lm_head"], include_inputs=True)
    expected = {"transformer.h.0": [], "lm_head": []}
    final_norm = []

    def steered(step, output):
        output = output.clone()
        output[:, -1] += steer
        expected["transformer.h.0"].append(output)
        return output

    def keep(step, output):
        expected["lm_head"].append(output)

    _generate_with_hooks(gpt2, tokenizer, {"transformer.h.0": steered, "lm_head": keep,
                                           "transformer.ln_f": lambda step, output:
                                           final_norm.append(output)}, steps=3)
    assert sorted(cache) == ["model.lm_head", "model.transformer.h.0"]
    for path, values in expected.items():
        entries = cache[f"model.{path}"]
        assert isinstance(entries, list) and len(entries) == 3
        for entry, want in zip(entries, values):
            torch.testing.assert_close(entry.output, want)
    entry = second["model.lm_head"]  # one step: a plain entry
    torch.testing.assert_close(entry.output, expected["lm_head"][1])
    torch.testing.assert_close(entry.input, final_norm[1])


# --- 5. lm.generator.streamer ----------------------------------------------------------------
@pytest.mark.parametrize("as_dict", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streamer_output_is_what_transformers_puts_at_each_step(gpt2, tokenizer, backend,
                                                                 as_dict):
    """nnsight's streamer is a module transformers' generate calls with each ``put``: the
    prompt's ids first, then each step's token; its call #step is decoding step ``step``'s
    value (was: the token chosen at the step, one call late, and never the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            pass

    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    # return_dict_in_generate: generate returns an output object; the tokens are the same
    with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, backend=backend,
                     return_dict_in_generate=as_dict) as tracer:
        tokens = fxsight.save(list())
        for step in tracer.all():
            tokens.append(lm.generator.streamer.output)
        first = lm.generator.streamer.output.save()  # outside a loop: the first step
    streamer = Collect()
    with torch.no_grad():
        gpt2.generate(**tokenizer([PROMPT], return_tensors="pt"), do_sample=False,
                      max_new_tokens=3, streamer=streamer)
    assert len(tokens) == 3 and len(streamer.puts) == 4  # the prompt, then 3 tokens
    for got, want in zip(tokens, streamer.puts):
        assert got.device == want.device and got.shape == want.shape
        assert torch.equal(got, want)
    assert torch.equal(first, streamer.puts[0])
    with pytest.raises(fxsight.TraceError, match="step loop"):
        with lm.generate(PROMPT, max_new_tokens=2, backend=backend) as tracer:
            with tracer.all():
                lm.generator.streamer.output.save()


# --- 5b. a module attached to the model, called with hook=True -------------------------------
class _SAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 8)
        self.decoder = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


class _WithSAE(torch.nn.Module):
    """Two layers; ``sae`` is attached but the forward never calls it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 2)
        self.sae = _SAE()

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attached_module_called_with_hook_true(backend):
    model = _WithSAE()
    net = NNsight(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    with net.trace(x, backend=backend) as tracer:
        reconstruction = net.sae(net.first.output, hook=True)
        codes = net.sae.encoder.output.save()
        decoder_input = net.sae.decoder.input.save()
        sae_args, _ = net.sae.inputs
        sae_input = sae_args[0].save()
        net.first.output = reconstruction  # the model continues with the SAE's output
        out = net.output.save()
    # hand-written: the SAE's inner values from forward hooks on a plain call
    seen = {}
    handles = [model.sae.encoder.register_forward_hook(
        lambda m, a, o: seen.__setitem__("codes", o)),
        model.sae.decoder.register_forward_hook(
        lambda m, a, o: seen.__setitem__("decoder_input", a[0]))]
    try:
        with torch.no_grad():
            hidden = model.first(x)
            expected_out = model.second(model.sae(hidden))
    finally:
        for handle in handles:
            handle.remove()
    assert tracer.backend == backend
    torch.testing.assert_close(codes, seen["codes"])
    torch.testing.assert_close(decoder_input, seen["decoder_input"])
    torch.testing.assert_close(sae_input, hidden)
    torch.testing.assert_close(out, expected_out)
    assert not any(m._forward_hooks for m in model.modules()), "no hook left behind"
    with pytest.raises(fxsight.TraceError, match="ambiguous(.|\n)*test_parity2.py"):
        with net.trace(x, backend=backend):
            net.second(net.first.output, hook=True)
            net.second.output.save()
