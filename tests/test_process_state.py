"""A trace changes the process and the user's objects exactly as its plain equivalent does
(a forward, ``generate``, a forward hook): each feature's snapshot difference (see
``process_state``: torch's flags, configs, mode stacks and RNG, dynamo's caches, global hooks,
logging, warnings, tracing functions, gc, environment, modules, signals, threads, and the
model's, tokenizer's and inputs' state) is the plain run's, on both backends. And the leaks
this audit found: each against what the plain call leaves."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch

from fxsight import patching
from fxsight import LanguageModel, NNsight, ShapeError
from models import mlp, tiny_gpt2, train_tokenizer
from process_state import changes, describe, snapshot


@pytest.fixture(scope="module")
def setup():
    """A tiny GPT-2 wrapped as a LanguageModel, an MLP, their inputs and a padded batch."""
    tokenizer = train_tokenizer()
    gpt = tiny_gpt2(vocab_size=len(tokenizer))
    net_module = mlp()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    batch = dict(tokenizer(["hello world there", "a b"], return_tensors="pt", padding=True))
    return {"tokenizer": tokenizer, "gpt": gpt, "lm": LanguageModel(gpt, tokenizer=tokenizer),
            "mlp": net_module, "net": NNsight(net_module), "x": x, "batch": batch}


# --- the plain equivalents ----------------------------------------------------------------

def _plain_forward(s):
    with torch.no_grad():
        handle = s["gpt"].transformer.h[0].register_forward_hook(lambda m, a, o: o)
        try:
            s["gpt"](**s["batch"])
        finally:
            handle.remove()
        s["mlp"](s["x"])


def _plain_backward(s):
    s["gpt"](**s["batch"]).logits.sum().backward()


def _plain_generate(s):
    s["gpt"].generate(**s["batch"], max_new_tokens=2, do_sample=False, pad_token_id=0)


# --- the features -------------------------------------------------------------------------

def _trace(s, backend):
    lm, net = s["lm"], s["net"]
    with lm.trace(s["batch"], backend=backend):
        lm.transformer.h[0].output[:, -1] = 0
        lm.lm_head.output.save()
    with net.trace(s["x"], backend=backend):
        net.layer1.output[:, 0] += 1
        net.output.save()


def _invokes_and_cache(s, backend):
    lm = s["lm"]
    with lm.trace(backend=backend) as tracer:
        with tracer.invoke(s["batch"]["input_ids"][:1]):
            h = lm.transformer.h[0].output.save()
        with tracer.invoke(s["batch"]["input_ids"][1:]):
            lm.transformer.h[0].output[:, -1] = h[:, -1]
            tracer.cache(modules=[lm.transformer.h[1]], include_inputs=True)


def _source_skip_stop(s, backend):
    lm = s["lm"]
    with lm.trace(s["batch"], backend=backend):
        lm.transformer.h[0].attn.source
        lm.transformer.h[1].skip(lm.transformer.h[0].output)
        lm.output.save()
    with lm.trace(s["batch"], backend=backend) as tracer:
        lm.transformer.h[0].output.save()
        tracer.stop()


def _backward(s, backend):
    lm = s["lm"]
    with lm.trace(s["batch"], backend=backend):
        lm.transformer.h[0].output.grad.save()
        lm.output.logits.sum().backward()


def _session_edit_scan(s, backend):
    lm, net = s["lm"], s["net"]
    with lm.session():
        with lm.trace(s["batch"], backend=backend):
            h = lm.transformer.h[0].output.save()
        with lm.trace(s["batch"], backend=backend):
            lm.transformer.h[0].output[:] = h
            lm.output.save()
    with net.edit() as edited:
        net.layer1.output[:, 0] = 0
    with edited.trace(s["x"], backend=backend):
        edited.output.save()
    with net.scan(s["x"]):
        net.layer2.output.shape


def _generate(s, backend):
    lm = s["lm"]
    with lm.generate(s["batch"], max_new_tokens=2, do_sample=False, backend=backend) as tracer:
        with tracer.all():
            lm.transformer.h[0].output[:, -1] += 1
        lm.generator.output.save()


def _errors_and_modes(s, backend):
    lm, net = s["lm"], s["net"]
    bodies = (lambda: lm.transformer.h[7].output.save(),
              lambda: lm.transformer.h[0].output[:, 100].save(),
              lambda: (_ for _ in ()).throw(KeyError("the user's")))
    for body in bodies:
        with pytest.raises(Exception):
            with lm.trace(s["batch"], backend=backend):
                body()
                lm.output.save()
    with pytest.raises(ShapeError):
        with net.trace(s["x"], backend=backend):
            net.layer2.output = torch.zeros(4, 3)
    for mode in (torch.no_grad(), torch.inference_mode(),
                 torch.autocast("cpu", dtype=torch.bfloat16)):
        with mode, net.trace(s["x"], backend=backend):
            net.output.save()


def _threads(s, backend):
    failures = []

    def work():
        try:
            _trace(s, backend)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


FEATURES = {
    "trace": (_trace, _plain_forward),
    "invokes_and_cache": (_invokes_and_cache, _plain_forward),
    "source_skip_stop": (_source_skip_stop, _plain_forward),
    "backward": (_backward, _plain_backward),
    "session_edit_scan": (_session_edit_scan, _plain_forward),
    "generate": (_generate, _plain_generate),
    "errors_and_modes": (_errors_and_modes, _plain_forward),
    "threads": (_threads, _plain_forward),
}


def _changed(s, run) -> tuple[dict, dict, dict]:
    objects = (s["gpt"], s["mlp"], s["tokenizer"], s["x"], s["batch"])
    s["gpt"].zero_grad(set_to_none=True)
    before = snapshot(*objects)
    run()
    after = snapshot(*objects)
    return before, after, changes(before, after)


@pytest.mark.parametrize("backend", ("fx", "hooks"))
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_a_feature_changes_what_its_plain_equivalent_changes(setup, feature, backend):
    """Once both have run (first-use imports, torch's lazy set-up and the capture done),
    a feature changes the same snapshot keys as its plain equivalent."""
    run, plain = FEATURES[feature]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the same for both; entered once, outside)
        run(setup, backend)
        plain(setup)
        _, _, plain_changes = _changed(setup, lambda: plain(setup))
        before, after, feature_changes = _changed(setup, lambda: run(setup, backend))
    extra = set(feature_changes) - set(plain_changes)
    missing = set(plain_changes) - set(feature_changes)
    assert not extra and not missing, "\n".join(
        [f"{feature} on {backend} changed what a plain run does not:",
         *describe(extra, before, after), "and left unchanged what a plain run changes:",
         *map(repr, sorted(missing, key=repr))])


# --- leaks found ----------------------------------------------------------------------------

def _stop_tqdm_monitors():
    """Stop the monitor thread an earlier bar in this process started (tqdm keeps it on the
    bar's class for good), so that a new one is seen."""
    import tqdm.auto
    import tqdm.std
    for kind in {tqdm.std.tqdm, tqdm.auto.tqdm, *tqdm.std.tqdm.__subclasses__()}:
        monitor = kind.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            kind.monitor = None


def _new_threads(run) -> list[str]:
    _stop_tqdm_monitors()
    before = set(threading.enumerate())
    run()
    return [thread.name for thread in threading.enumerate() if thread not in before]


@pytest.mark.parametrize("progress", (True, False))
def test_a_sweep_leaves_no_thread_running(setup, progress):
    """A sweep's progress bar was a ``tqdm`` bar, whose first instance starts a monitor
    thread that tqdm never stops: every sweep (``progress=False`` too) left a thread running
    in the caller's process, where a loop of traces leaves none."""
    lm, tokenizer = setup["lm"], setup["tokenizer"]
    ids = tokenizer("a b c d", return_tensors="pt")["input_ids"]
    corrupted = tokenizer("a b c e", return_tensors="pt")["input_ids"]

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    def loop():
        for layer in range(2):
            with lm.trace(ids):
                lm.transformer.h[layer].output.save()

    def sweep():
        patching.activation_patching(lm, clean=ids, corrupted=corrupted,
                                             metric=metric, sites=["resid"],
                                             progress=progress)
        patching.steering_sweep(lm, ids, torch.ones(64), scales=(1.0,),
                                        progress=progress)

    assert _new_threads(loop) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _new_threads(sweep) == []


def test_loading_the_demo_model_leaves_transformers_logging_as_it_was():
    """``demo.load()`` (the model of the docs' examples) set transformers' verbosity to
    errors for the rest of the process, silencing the caller's transformers warnings; a
    plain ``from_pretrained`` of the same folder leaves the level as it was."""
    from transformers import GPT2LMHeadModel

    from fxsight.experiments import demo

    root = logging.getLogger("transformers")
    GPT2LMHeadModel.from_pretrained(demo.DATA)  # (transformers' own first-use set-up)
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = demo.load()
        assert root.level == level
        demo.build_model()
    assert root.level == level
    assert isinstance(lm, LanguageModel)


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_traces_of_new_shapes_leave_the_fake_operator_cache_as_it_was(backend):
    """``FakeTensorMode.cache``, one dict for every fake mode of the process and never
    trimmed, kept the operators of every fake-tensor walk (a trace's scan and checks,
    ``torch.export``'s capture) for each new input shape: 300 new shapes of a 3-layer MLP
    kept 13 MB. A plain forward adds nothing to it; neither does a trace now."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    net = NNsight(mlp())

    def trace(rows):
        with net.trace(torch.randn(rows, 5), backend=backend):
            net.layer1.output[:, 0] = 0
            net.output.save()

    trace(1)  # (first-use set-up)
    before = len(FakeTensorMode.cache)
    for rows in range(2, 8):
        trace(rows)
        net._module(torch.randn(rows, 5))
    with net.scan(torch.randn(9, 5)):
        net.layer2.output.shape
    grown = len(FakeTensorMode.cache) - before
    assert grown == 0, f"{grown} fake operator cache entries kept by seven new shapes"


# --- warnings -------------------------------------------------------------------------------

class _Recurrent(torch.nn.Module):
    """Linear, LSTM, Linear. The LSTM assigns ``_flat_weights`` in its forward: torch.export
    warns about it while it is traced, a warning a plain forward never shows."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.rnn = torch.nn.LSTM(8, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


class _Deprecating(torch.nn.Module):
    """A model whose forward warns (as transformers' models warn of deprecated arguments):
    a warning a plain forward shows, so a trace shows it too."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x):
        warnings.warn("the model's deprecation warning", FutureWarning)
        return self.layer(x)


def _fresh_models():
    """New models (each trace captures them anew) and their inputs: the LSTM model, a tiny
    GPT-2 and the warning model."""
    ids = torch.tensor([[5, 6, 7, 8]])
    return [(_Recurrent().eval(), torch.randn(2, 3, 4), "rnn"),
            (tiny_gpt2(n_layer=1, n_embd=16, n_head=2), ids, "transformer.h.0"),
            (_Deprecating(), torch.randn(2, 4), "layer")]


def _traced(model, inputs, path, backend):
    wrapped = NNsight(model)
    envoy = wrapped
    for name in path.split("."):
        envoy = envoy[int(name)] if name.isdigit() else getattr(envoy, name)
    with torch.no_grad(), wrapped.trace(inputs, backend=backend):
        envoy.output.save()
        wrapped.output.save()


def _messages(shown) -> list[tuple[type, str]]:
    return [(w.category, str(w.message).split(",")[0]) for w in shown]


def _users_warning():
    warnings.warn("the user's warning", UserWarning)


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_a_trace_shows_only_the_warnings_a_plain_forward_shows(backend):
    """torch.export warned the user about the ``_flat_weights`` an ``nn.LSTM`` assigns
    while traced ("The tensor attributes self.model.rnn._flat_weights[0], ... were assigned
    during export"), beside fxsight's own warning that the LSTM runs as an opaque call; a
    plain forward shows no such warning. Now a trace shows what a plain forward shows
    (the model's own warning too) plus fxsight's own warnings, for every model."""
    for model, inputs, path in _fresh_models():
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(inputs)
        plain = set(_messages(shown))
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            _traced(model, inputs, path, backend)
        traced = {m for m in _messages(shown) if not m[1].startswith("fxsight:")}
        assert traced == plain, f"{type(model).__name__} on {backend}: a trace showed " \
                                f"{sorted(traced - plain, key=repr)}, not " \
                                f"{sorted(plain - traced, key=repr)}, unlike a plain forward"


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_a_warning_shown_once_is_not_shown_again_after_a_trace(backend):
    """Each ``catch_warnings`` block torch enters while it captures a model
    (``ExportedProgram.module()``) moves the filters' version on, and Python then forgot,
    for every module, which warnings it had shown: a warning the user saw once (the default
    filter) showed again after a trace. A plain forward forgets nothing; a trace neither,
    and the model's own warning, shown by a plain forward before, is not shown again."""
    for model, inputs, path in _fresh_models():
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")
            _users_warning()
            with torch.no_grad():
                model(inputs)
            before = _messages(shown)
            _traced(model, inputs, path, backend)
            del shown[:]
            _users_warning()
            with torch.no_grad():
                model(inputs)
            assert _messages(shown) == [], \
                f"after a trace of {type(model).__name__} on {backend}, warnings seen " \
                f"before ({before}) showed again: {_messages(shown)}"


def _not_fxsights(shown):
    """A registry's shown warnings (see ``process_state.shown_warnings``) but fxsight's
    own (its deliberate warnings, which a plain forward has no reason to show)."""
    if not (isinstance(shown, tuple) and shown and shown[0] == "dict"):
        return shown
    return ("dict", tuple((key, value) for key, value in shown[1]
                          if not str(key[1][0]).startswith("fxsight:")))


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_a_trace_changes_the_warnings_state_as_a_plain_forward(backend):
    """The snapshot's warnings part (filters, ``showwarning``, what each module has
    shown): a trace that captures new models changes it as their plain forwards do (on
    the code before, the capture made this module forget the user's warning it had
    shown, and contextlib keep torch's ``_flat_weights`` warning)."""
    def warnings_changes(run):
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _users_warning()  # (this module's registry: current, one warning shown)
            before = snapshot()
            run()
            after = snapshot()
        found = {key: tuple(map(_not_fxsights, value))
                 for key, value in changes(before, after).items()
                 if key[0] in ("warnings", "warningregistry")}
        return {key: value for key, value in found.items() if value[0] != value[1]}

    def plain():
        for model, inputs, _ in _fresh_models():
            with torch.no_grad():
                model(inputs)

    def traces():
        for model, inputs, path in _fresh_models():
            _traced(model, inputs, path, backend)

    traces()  # (first-use set-up and imports)
    plain_changes = warnings_changes(plain)
    trace_changes = warnings_changes(traces)
    assert trace_changes == plain_changes, "\n".join(
        [f"a trace changed the warnings state (before -> after) as its plain forwards "
         f"do not: (plain: {plain_changes})"] +
        [f"{key}: {value}" for key, value in trace_changes.items()
         if plain_changes.get(key) != value] +
        [f"{key}: unchanged" for key in plain_changes if key not in trace_changes])


class _ThreadedWarning(torch.nn.Module):
    """A forward that waits for a worker thread, which warns: the warning is another
    thread's, issued while the model is captured."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x):
        worker = threading.Thread(
            target=lambda: warnings.warn("a worker thread's warning", UserWarning))
        worker.start()
        worker.join()
        return self.layer(x)


@pytest.mark.parametrize("backend", ("fx", "hooks"))
def test_other_threads_warnings_show_while_a_model_is_captured(backend):
    """While a capture holds back its own thread's warnings, another thread's warnings
    show as they come (as in a plain forward), and the filters and ``showwarning`` are
    left as they were."""
    filters, showwarning = warnings.filters, warnings.showwarning
    entries = list(filters)
    model, x = _ThreadedWarning(), torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)
        plain = _messages(shown)
        del shown[:]
        _traced(model, x, "layer", backend)
        assert set(_messages(shown)) == set(plain)
    assert warnings.filters is filters and warnings.filters == entries
    assert warnings.showwarning is showwarning


def test_exporting_an_edited_model_keeps_which_warnings_were_shown():
    """``edited.export(x)`` re-exports the edited graph with ``torch.export``, whose
    ``catch_warnings`` blocks made Python forget which warnings it had shown; it forgets
    nothing now, and shows no warning of torch's about its export."""
    net = NNsight(mlp())
    x = torch.randn(3, 5)
    with net.edit() as edited:
        net.layer1.output[:, 0] = 0
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        _users_warning()
        exported = edited.export(x)
        _users_warning()
        assert _messages(shown) == [(UserWarning, "the user's warning")]
    with torch.no_grad(), edited.trace(x):
        expected = edited.output.save()
    torch.testing.assert_close(exported(x), expected)


@pytest.mark.parametrize("grad", (False, True))
def test_a_compiled_trace_keeps_which_warnings_were_shown(grad):
    """Compiling the spliced graph (inductor directly without gradients, through dynamo
    with them) entered torch's ``catch_warnings`` blocks too, and Python forgot which
    warnings it had shown; the compiled trace forgets nothing now."""
    net = NNsight(mlp(seed=3))
    x = torch.randn(3, 5)

    def trace(compile):
        with torch.set_grad_enabled(grad), net.trace(x, compile=compile):
            net.layer1.output[:, 0] = 0
            out = net.output.save()
        return out

    eager = trace(False)  # (the capture: the compilation alone is looked at below)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        _users_warning()
        compiled = trace(True)
        del shown[:]
        _users_warning()
        assert [m for m in _messages(shown) if not m[1].startswith("fxsight:")] == []
    torch.testing.assert_close(compiled, eager)


def test_the_hooks_backend_shows_a_models_warning_once_per_trace():
    """Under the ``always`` filter a plain forward shows the model's own warning once;
    the hooks backend showed it twice in a trace that scans new shapes (once from the
    scan on fake tensors, once from the real forward). Now once per trace, like the plain
    forward, for a new shape and a known one; an fx trace shows it once, at its capture."""
    model, inputs = _Deprecating(), torch.randn(2, 4)

    def shown_by(run):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            run()
        return [m for m in _messages(shown) if not m[1].startswith("fxsight:")]

    def plain():
        with torch.no_grad():
            model(inputs)

    once = shown_by(plain)
    assert len(once) == 1
    for _ in range(2):
        assert shown_by(lambda: _traced(model, inputs, "layer", "hooks")) == once
    assert shown_by(lambda: _traced(_Deprecating(), torch.randn(3, 4), "layer", "fx")) == once
