"""nnsight parity, part 6: `.token[[0, 2]]` (a list of positions) and `.token[::-1]` (a
negative step) counted from each prompt's first real token; nnsight 0.4's spellings
(`model.all()`, `envoy.next()`, a saved proxy's `.value`); a model's context-manager methods
in a `with` inside a trace; `model.scan(...)` and dispatch called inside an open trace.

Every expected value comes from plain PyTorch: forward hooks written here, each prompt run
alone, or transformers' own `generate`."""

import contextlib

import pytest
import torch

from fxsight import LanguageModel
from fxsight.errors import TokenIndexError, TraceError
from models import tiny_gpt2

BACKENDS = ["fx", "hooks"]
ATOL = 1e-5
LONG = "The Eiffel Tower is in the city of"
SHORT = "Big Ben"
MIDDLE = "The capital of France"


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_gpt2(vocab_size=len(tokenizer), n_embd=32)


def _ids(tokenizer, prompt):
    return tokenizer(prompt)["input_ids"]


def _alone(model, ids, module, edit=None):
    """``module``'s output and the logits of ``ids`` run alone (no padding), with
    ``edit(output)`` (in place) by a forward hook where given."""
    seen = []

    def hook(_, args, output):
        if edit is not None:
            edit(output)
        seen.append(output.detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits
    finally:
        handle.remove()
    return seen[0][0], logits[0]


# --- 4. token indexing with a list, and with a negative step ---------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_list_of_token_positions_is_each_prompts_own(gpt2, tokenizer, backend):
    """``h.token[[0, 2]]`` in invokes of different lengths (one of two prompts of different
    lengths, left-padded) is, for every row, that prompt's ``h[:, [0, 2]]`` run alone; the
    order of the list is kept (``[-1, 0]``), a 1-D tensor of ints is a list too."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    invokes = [LONG, [SHORT, MIDDLE]]
    keys = {"list": [0, 2], "backwards": [-1, 0], "tensor": torch.tensor([1, -2, 1])}
    saved = {}
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        for k, prompt in enumerate(invokes):
            with tracer.invoke(prompt):
                for name, key in keys.items():
                    saved[k, name] = lm.transformer.ln_f.output.token[key].save()
    assert tracer.backend == backend
    for k, row, prompt in [(0, 0, LONG), (1, 0, SHORT), (1, 1, MIDDLE)]:
        hidden, _ = _alone(gpt2, _ids(tokenizer, prompt), gpt2.transformer.ln_f)
        for name, key in keys.items():
            torch.testing.assert_close(saved[k, name][row], hidden[key], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_a_list_of_token_positions(gpt2, tokenizer, backend):
    """``h.token[[0, 2]] = 0`` in a batch of two left-padded prompts: each row's logits are
    its prompt's alone with ``h[:, [0, 2]] = 0`` written by a forward hook."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace([SHORT, LONG], backend=backend):
        lm.transformer.h[0].mlp.output.token[[0, 2]] = 0
        logits = lm.lm_head.output.save()

    def zero(output):
        output[:, [0, 2]] = 0

    for row, prompt in enumerate([SHORT, LONG]):
        ids = _ids(tokenizer, prompt)
        _, expected = _alone(gpt2, ids, gpt2.transformer.h[0].mlp, zero)
        torch.testing.assert_close(logits[row, -len(ids):], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_step_picks_each_prompts_tokens_backwards(gpt2, tokenizer, backend):
    """``h.token[::-1]`` and ``h.token[-1:-4:-1]`` per invoke of its own length: the
    prompt's tokens alone, backwards (torch's slices take no negative step: the reference
    indexes with the positions listed). Prompts of different lengths in one invoke select
    different numbers of tokens: a TokenIndexError naming the line, before anything runs."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(LONG):
            long_all = lm.transformer.ln_f.output.token[::-1].save()
        with tracer.invoke(SHORT):
            short_all = lm.transformer.ln_f.output.token[::-1].save()
            short_three = lm.transformer.ln_f.output.token[-1:-4:-1].save()
    for saved, prompt, key in [(long_all, LONG, slice(None, None, -1)),
                               (short_all, SHORT, slice(None, None, -1)),
                               (short_three, SHORT, slice(-1, -4, -1))]:
        ids = _ids(tokenizer, prompt)
        hidden, _ = _alone(gpt2, ids, gpt2.transformer.ln_f)
        positions = list(range(len(ids)))[key]
        torch.testing.assert_close(saved[0], hidden[positions], atol=ATOL, rtol=0)
    calls = []
    handle = gpt2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TokenIndexError, match="different number of tokens") as raised:
            with lm.trace([SHORT, LONG], backend=backend):
                lm.transformer.ln_f.output.token[::-1].save()  # the line
    finally:
        handle.remove()
    assert "# the line" in str(raised.value) and calls == []


@pytest.mark.parametrize("key", [[True, False], [[0, 1]], [0.5], [torch.tensor(0.5)],
                                 torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]),
                                 1.5])
def test_token_indices_that_are_no_positions_are_refused_at_the_line(gpt2, tokenizer, key):
    """A list of bools (a mask to torch), a nested list, floats: a TokenIndexError (an
    IndexError, as torch's for such an index) naming the line, before anything runs."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(TokenIndexError) as raised:
        with lm.trace(LONG):
            lm.transformer.ln_f.output.token[key].save()  # the line
    assert isinstance(raised.value, IndexError) and "# the line" in str(raised.value)
    with pytest.raises(TokenIndexError, match="(?s)past the end.*# the line"):
        with lm.trace(LONG):
            lm.transformer.ln_f.output.token[[0, 99]].save()  # the line


# --- 2. a model's context-manager methods in a with statement --------------------------------
class _Scaler:
    """What a method that is no generator function returns: a context manager object."""

    def __init__(self, module, scale):
        self.module, self.scale, self.old = module, scale, None

    def __enter__(self):
        self.old, self.module.scale = self.module.scale, self.scale
        return self.module

    def __exit__(self, *exc):
        self.module.scale = self.old
        return False


class _Scaled(torch.nn.Module):
    """A model whose methods set its ``scale`` for the length of a with statement."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.scale = 1.0

    def forward(self, x):
        return self.fc(x) * self.scale

    @contextlib.contextmanager
    def scaled(self, scale):  # a generator function
        old, self.scale = self.scale, scale
        try:
            yield self
        finally:
            self.scale = old

    def scaled_object(self, scale):  # returns an object with __enter__ / __exit__
        return _Scaler(self, scale)

    def scaled_annotated(self, scale) -> contextlib.AbstractContextManager:
        return _Scaler(self, scale)


@pytest.mark.parametrize("method", ["scaled", "scaled_object", "scaled_annotated"])
def test_a_models_context_manager_inside_a_trace_is_refused_at_the_line(method):
    """Entered inside a trace, it would open and close while the block is recorded: the
    forward pass runs when the trace ends, without what it sets. Refused before it runs
    (the model's attribute untouched), naming the line and how to enter it instead."""
    from fxsight import NNsight
    model = _Scaled()
    net = NNsight(model)
    for backend in BACKENDS:
        with pytest.raises(TraceError, match="(?s)inside a trace.*around the trace") as raised:
            with net.trace(torch.ones(1, 3), backend=backend):
                with getattr(net, method)(3.0):  # the line
                    net.output.save()
        assert "# the line" in str(raised.value) and model.scale == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_models_context_manager_around_a_trace_works_as_a_plain_call(backend):
    """Around the trace (and outside any trace) a generator method and an annotated one are
    the model's own context managers: the trace sees what they set, as a plain forward in
    the same with statement does. One fxsight cannot tell gives a context manager without
    calling it is refused before it runs, saying how to enter it (`cm = ...; with cm:`)."""
    from fxsight import NNsight
    model = _Scaled()
    net = NNsight(model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = model.fc(x) * 3.0
        for method in ("scaled", "scaled_annotated"):
            with getattr(net, method)(3.0):
                with net.trace(x, backend=backend):
                    out = net.output.save()
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert model.scale == 1.0
        with pytest.raises(TraceError, match="(?s)cm = .*with cm:") as raised:
            with net.scaled_object(3.0):  # the line
                pass
        assert "# the line" in str(raised.value) and model.scale == 1.0
        cm = net.scaled_object(3.0)
        with cm, net.trace(x, backend=backend):
            out = net.output.save()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- 3. scan, trace and dispatch inside an open trace ---------------------------------------
def _counting(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda *a: calls.append(1))


def test_a_context_call_alone_on_a_line_is_refused(gpt2, tokenizer):
    """``lm.scan(x)``, ``lm.trace(x)``, ``lm.edit()``, ``lm.session()`` alone on a line
    (also inside an open trace) would do nothing, silently: a TraceError naming the line,
    and the enclosing trace does not run."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    calls, handle = _counting(gpt2)
    try:
        with pytest.raises(TraceError, match=r"(?s)model.scan\(...\)` alone.*# the line"):
            lm.scan(SHORT)  # the line
        with pytest.raises(TraceError, match=r"(?s)model.trace\(...\)` alone.*# the line"):
            lm.trace(SHORT)  # the line
        with pytest.raises(TraceError, match=r"(?s)model.edit\(...\)` alone.*# the line"):
            lm.edit()  # the line
        with pytest.raises(TraceError, match=r"(?s)model.session\(\)` alone.*# the line"):
            lm.session()  # the line
        with pytest.raises(TraceError, match=r"(?s)model.scan\(...\)` alone.*# the line"):
            with lm.trace(LONG):
                lm.output.save()
                lm.scan(SHORT)  # the line
        tracer = lm.scan(SHORT)  # (kept: entered later, as a with statement may)
        with tracer:
            shape = lm.transformer.ln_f.output.shape
    finally:
        handle.remove()
    assert calls == [] and shape == (1, len(_ids(tokenizer, SHORT)), 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scan_inside_an_open_trace_is_a_scan_of_its_own(gpt2, tokenizer, backend):
    """``with lm.scan(other):`` inside a trace (nnsight runs a nested context as its own):
    its shapes are its input's, its saved values meta tensors (nothing ran); the
    enclosing trace's values are the plain forward's (a forward hook's, written by hand)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace(LONG, backend=backend) as tracer:
        lm.transformer.h[0].mlp.output[:, -1] = 0
        with lm.scan(SHORT):
            shape = lm.transformer.ln_f.output.shape
            scanned = lm.transformer.ln_f.output.save()
        hidden = lm.transformer.ln_f.output.save()
    assert tracer.backend == backend
    assert shape == (1, len(_ids(tokenizer, SHORT)), 32) and scanned.device.type == "meta"

    def zero(output):
        output[:, -1] = 0

    handle = gpt2.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: zero(o))
    try:
        expected, _ = _alone(gpt2, _ids(tokenizer, LONG), gpt2.transformer.ln_f)
    finally:
        handle.remove()
    torch.testing.assert_close(hidden[0], expected, atol=ATOL, rtol=0)


DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("backend", ["auto", "hooks"])
def test_dispatching_inside_an_open_trace_runs_the_dispatched_model(tokenizer, tmp_path,
                                                                   backend):
    """``accelerate.dispatch_model(model, device_map=..., offload_dir=...)`` inside an open
    trace (a layer offloaded to disk): the trace runs the model as it is when the block
    ends, as nnsight does, on the hooks backend (with the warning that says why): the same
    values as the plain model with the same write made by a forward hook. ``backend="fx"``
    refuses it before running, naming the offloaded module, as for a model dispatched
    before the trace. ``lm.dispatch()`` (nnsight's name) inside an open trace changes
    nothing: the trace loaded the weights already."""
    import warnings

    import accelerate

    from fxsight.errors import CaptureError
    from models import tiny_llama
    plain = tiny_llama(vocab_size=len(tokenizer))
    ids = _ids(tokenizer, LONG)

    def double(output):
        output[:] = output * 2

    _, expected = _alone(plain, ids, plain.model.layers[0], double)
    model = tiny_llama(vocab_size=len(tokenizer))
    model.load_state_dict(plain.state_dict())
    lm = LanguageModel(model, tokenizer=tokenizer)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lm.trace(LONG, backend=backend):
            lm.model.layers[0].output[:] = lm.model.layers[0].output * 2
            lm.dispatch()
            assert lm._module is model
            accelerate.dispatch_model(model, device_map=DEVICE_MAP,
                                      offload_dir=str(tmp_path / "offload"))
            logits = lm.lm_head.output.save()
    assert hasattr(model.model.layers[1], "_hf_hook")
    if backend == "auto":
        assert any("offload" in str(w.message) for w in caught)
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)
    with pytest.raises(CaptureError, match="model.layers.1"):
        with torch.no_grad(), lm.trace(LONG, backend="fx"):
            lm.lm_head.output.save()


# --- 1. nnsight 0.4's spellings: envoy.all(), envoy.next(), saved.value ----------------------
STEPS = 3


def _steered_generate(model, tokenizer, vector, steps):
    """transformers' own ``generate`` with block 0's MLP output set to ``vector`` by a
    forward hook at the decoding ``steps`` (its calls), and lm_head's last position at
    each step."""
    calls, heads = [], []

    def steer(module, args, output):
        if len(calls) in steps:
            output[:] = vector
        calls.append(1)

    handles = [model.transformer.h[0].mlp.register_forward_hook(steer),
               model.lm_head.register_forward_hook(
                   lambda m, a, o: heads.append(o[:, -1].detach().clone()))]
    try:
        encoded = tokenizer([LONG], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**encoded, max_new_tokens=STEPS, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return ids, heads


@pytest.fixture(scope="module")
def vector():
    return torch.randn(32, generator=torch.Generator().manual_seed(0)) * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["tracer", "model", "module"])
def test_all_of_a_module_applies_at_every_step(gpt2, tokenizer, vector, backend, form):
    """nnsight 0.4's ``with lm.all():`` and ``with lm.transformer.h[0].all():`` (lines of
    that module) are ``with tracer.all():``: the write at every decoding step, a value
    saved there one per step; as transformers' ``generate`` with the write made by a
    forward hook at every step."""
    expected_ids, heads = _steered_generate(gpt2, tokenizer, vector, range(STEPS))
    _, unsteered = _steered_generate(gpt2, tokenizer, vector, ())
    assert not torch.allclose(heads[1], unsteered[1])  # (the write shows at step 1)
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.generate(LONG, max_new_tokens=STEPS, do_sample=False,
                                      backend=backend) as tracer:
        scope = {"tracer": tracer.all, "model": lm.all,
                 "module": lm.transformer.h[0].all}[form]
        with scope():
            lm.transformer.h[0].mlp.output[:] = vector
            mlp = lm.transformer.h[0].mlp.output.save()
            if form != "module":
                head = lm.lm_head.output[:, -1].save()
        ids = lm.generator.output.save()
    assert torch.equal(ids, expected_ids)
    assert len(mlp) == STEPS and all(torch.equal(m, torch.zeros_like(m) + vector)
                                     for m in mlp)
    if form != "module":
        assert len(head) == STEPS
        for got, want in zip(head, heads, strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_all_of_a_module_refuses_what_it_would_change_in_meaning(gpt2, tokenizer, vector):
    """Where nnsight 0.4's ``.all()`` does not map onto ``tracer.all()`` a TraceError names
    the line and the spelling to use, before anything runs: another module's line inside
    ``with lm.transformer.h[0].all():`` (0.4: at the first step only), ``.all()`` on a line
    of its own or used as a value (0.4: that module's later lines at every step, which
    here would take every line after it to its block's end, ``lm.generator.output`` too),
    and ``.all()`` in a plain trace (``for i in tracer.all():`` there)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    calls, handle = _counting(gpt2)
    try:
        with pytest.raises(TraceError, match=r"(?s)model.lm_head inside.*tracer.all\(\)"
                                             r".*# the line"):
            with lm.generate(LONG, max_new_tokens=STEPS):
                with lm.transformer.h[0].all():
                    lm.transformer.h[0].mlp.output[:] = vector
                    lm.lm_head.output.save()  # the line
        with pytest.raises(TraceError, match=r"(?s)line of its own.*with tracer.all\(\)"
                                             r".*# the line"):
            with lm.generate(LONG, max_new_tokens=STEPS):
                lm.transformer.h[0].all()  # the line
        with pytest.raises(TraceError, match=r"(?s)line of its own.*with tracer.all\(\)"
                                             r".*# the line"):
            with lm.generate(LONG, max_new_tokens=STEPS):
                lm.all()  # the line
        with pytest.raises(TraceError, match=r"(?s)used as a value.*# the line"):
            with lm.generate(LONG, max_new_tokens=STEPS):
                lm.transformer.h[0].all().output.save()  # the line
        with pytest.raises(TraceError, match=r"(?s)for i in tracer.all\(\).*# the line"):
            with lm.trace(LONG):
                lm.all()  # the line
        with pytest.raises(TraceError, match="only available inside a trace"):
            lm.all()
    finally:
        handle.remove()
    assert calls == []


def test_next_of_a_module_names_the_tracers_spelling(gpt2, tokenizer):
    """nnsight 0.4's ``envoy.next()`` moves that module's later reads to its next step;
    steps are chosen with the tracer here (a module's own step would not carry to the
    lines computed from its value): an AttributeError that names ``tracer.iter`` and the
    line, before anything runs."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with pytest.raises(AttributeError, match=r"(?s)tracer.iter\[1\].*# the line"):
        with lm.generate(LONG, max_new_tokens=STEPS):
            lm.transformer.h[0].next().output.save()  # the line
    with pytest.raises(AttributeError, match=r"(?s)tracer.iter.*# the line"):
        with lm.generate(LONG, max_new_tokens=STEPS) as tracer:
            tracer.next()  # the line


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_of_a_saved_proxy_after_the_block(gpt2, tokenizer, backend):
    """nnsight 0.4's ``h = x.save()`` then ``h.value`` after the block (its reference
    pages: ``print(logits.value)``): a name whose ``.value`` is read after the block stays
    the saved proxy, its ``.value`` the real value (a forward hook's); other names are the
    values themselves (nnsight >= 0.5); in a loop, each trace's own value."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    with torch.no_grad(), lm.trace(LONG, backend=backend):
        hidden = lm.transformer.ln_f.output.save()
        logits = lm.lm_head.output.save()
        plain = lm.lm_head.output.save()
    expected_hidden, expected_logits = _alone(gpt2, _ids(tokenizer, LONG),
                                              gpt2.transformer.ln_f)
    torch.testing.assert_close(hidden.value[0], expected_hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits.value[0], expected_logits, atol=ATOL, rtol=0)
    assert type(plain) is torch.Tensor and torch.equal(plain, logits.value)
    results = []
    prompts = [_ids(tokenizer, LONG), _ids(tokenizer, LONG)[::-1]]  # (one shape: one capture)
    for prompt in prompts:
        with torch.no_grad(), lm.trace(prompt, backend=backend):
            last = lm.lm_head.output[:, -1].save()
        results.append(last.value)
    for prompt, got in zip(prompts, results, strict=True):
        _, expected = _alone(gpt2, prompt, gpt2.transformer.ln_f)
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got[0], expected[-1], atol=ATOL, rtol=0)


def test_value_of_a_saved_proxy_in_a_script(gpt2, tokenizer):
    """The same at a script's top level (its variables are its globals)."""
    lm = LanguageModel(gpt2, tokenizer=tokenizer)
    script = ("with torch.no_grad(), lm.trace(prompt):\n"
              "    logits = lm.lm_head.output.save()\n"
              "    plain = lm.lm_head.output.save()\n"
              "found = logits.value\n")
    namespace = {"torch": torch, "lm": lm, "prompt": LONG}
    exec(compile(script, "<script>", "exec"), namespace)  # noqa: S102 - a script's top level
    _, expected = _alone(gpt2, _ids(tokenizer, LONG), gpt2.transformer.ln_f)
    assert type(namespace["found"]) is torch.Tensor
    torch.testing.assert_close(namespace["found"][0], expected, atol=ATOL, rtol=0)
    assert type(namespace["plain"]) is torch.Tensor
