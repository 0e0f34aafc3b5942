"""Property test: random programs that *combine* features on a LanguageModel: several invokes
of different lengths (left padding), reads, writes and in-place edits at random sites and
token positions (``.t[i]``, ``.t[a:b]``, negative indices), ``.inputs`` writes, ``.skip()``,
``fxsight.apply`` of a deterministic function, saves of intermediate arithmetic, values of
one invoke used in a later one, ``tracer.iter[...]`` on a module called twice (a Llama whose
two layers are one module), ``tracer.cache(...)`` with random options, ``.grad`` reads with a
``backward()``, and ``tracer.stop()``.

The reference is plain PyTorch: each invoke's prompt run alone (left padding must be
invisible) with forward (pre-)hooks doing the same steps on real tensors, the invokes in
order (a value one invoke hands to a later one is that prompt's own), tensor hooks for
gradients of one joint loss. The fx and hooks backends must agree bit for bit.

``FXSIGHT_PROPERTY_EXAMPLES=n`` runs ``n`` examples per test (a bug hunt) instead of the few
of a test run.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxsight
from fxsight import LanguageModel
from models import tiny_gpt2, tiny_llama, train_tokenizer

ATOL = 1e-5
CONSTANTS = [-2.0, -0.5, 0.0, 0.25, 1.5, 3.0]
TOKENIZER = train_tokenizer()
VOCAB = len(TOKENIZER)


def _tied_llama():
    """A tiny Llama whose two layers are one module: ``model.layers.0`` runs twice."""
    model = tiny_llama(vocab_size=VOCAB)
    model.model.layers[1] = model.model.layers[0]
    return model


MODELS = {"gpt2": tiny_gpt2(vocab_size=VOCAB), "tied": _tied_llama()}
# the same models in float64: exact arithmetic, for the tolerance of a padded row (_close)
DOUBLES = {kind: copy.deepcopy(model).double() for kind, model in MODELS.items()}
LMS = {kind: LanguageModel(model, tokenizer=TOKENIZER) for kind, model in MODELS.items()}


@dataclass(frozen=True)
class Site:
    path: str
    accessor: str  # "input", "output", "output0" (first item of a tuple output)
    width: int
    call: int | None = None  # tracer.iter[call] of a module called several times


def _llama_layer(call: int) -> list[Site]:
    layer = "model.layers.0"
    return [Site(layer, "input", 64, call), Site(f"{layer}.self_attn", "output0", 64, call),
            Site(f"{layer}.mlp", "input", 64, call),
            Site(f"{layer}.mlp.act_fn", "output", 128, call),
            Site(f"{layer}.mlp", "output", 64, call), Site(layer, "output", 64, call)]


SITES = {  # in the order they run
    "gpt2": [
        Site("transformer.wte", "output", 64), Site("transformer.drop", "input", 64),
        Site("transformer.drop", "output", 64), Site("transformer.h.0.attn", "output0", 64),
        Site("transformer.h.0.mlp", "input", 64), Site("transformer.h.0.mlp", "output", 64),
        Site("transformer.h.0", "output", 64), Site("transformer.h.1", "input", 64),
        Site("transformer.h.1.ln_1", "output", 64),
        Site("transformer.h.1.attn.c_proj", "input", 64),
        Site("transformer.h.1.attn", "output0", 64), Site("transformer.h.1.mlp", "output", 64),
        Site("transformer.h.1", "output", 64), Site("transformer.ln_f", "output", 64),
        Site("lm_head", "output", VOCAB),
    ],
    "tied": [Site("model.embed_tokens", "output", 64), *_llama_layer(0), *_llama_layer(1),
             Site("model.norm", "output", 64), Site("lm_head", "output", VOCAB)],
}
CACHE_MODULES = {
    "gpt2": ["transformer.wte", "transformer.drop", "transformer.h.0", "transformer.h.0.mlp",
             "transformer.h.1.attn", "transformer.h.1.ln_1", "transformer.ln_f", "lm_head"],
    "tied": ["model.embed_tokens", "model.layers.0", "model.layers.0.mlp",
             "model.layers.0.mlp.act_fn", "model.norm", "lm_head"],
}


def twist(h: torch.Tensor) -> torch.Tensor:
    """A deterministic function for ``fxsight.apply`` (position-wise)."""
    return torch.tanh(h) * 1.5 - h * 0.25


@dataclass(frozen=True)
class Step:
    kind: str
    site: int
    a: int = 0
    b: int = 0
    c: float = 1.0


PLAIN = ["save_raw", "save_sum", "relu", "where", "save_apply", "apply", "grad", "combo"]
CONST = ["save_scaled", "scale", "add", "iadd", "steer", "inputs", "skip"]
INDEXED = ["settok", "tokcopy", "tokslice", "save_tok", "iaddindex", "setslice", "export",
           "import"]
# a step's place among its site's steps: a skip first (it replaces the module's output), a
# gradient read last (the gradient of the value the steps leave)
ORDER = {"skip": 0, "grad": 2}


def _steps(kind: str):
    sites = SITES[kind]
    anywhere = list(range(len(sites)))
    where = {"skip": [i for i, s in enumerate(sites)
                      if s.path.endswith(".mlp") and s.accessor == "output"],
             "inputs": [i for i, s in enumerate(sites) if s.accessor == "input"]}
    idx = st.integers(0, 64)
    step = st.sampled_from(PLAIN + CONST + INDEXED).flatmap(
        lambda k: st.builds(Step, st.just(k), st.sampled_from(where.get(k, anywhere)), idx,
                            idx, st.sampled_from(CONSTANTS)))
    return st.lists(step, min_size=0, max_size=6)


PROMPT = st.sampled_from([3, 5]).flatmap(
    lambda n: st.lists(st.integers(4, 100), min_size=n, max_size=n))


@dataclass(frozen=True)
class Options:
    cache: tuple | None  # (modules, include_inputs, include_output, dtype, where)
    grad: bool
    stop: bool


def programs(kind: str):
    invokes = st.lists(st.tuples(PROMPT, _steps(kind)), min_size=1, max_size=3)
    cache = st.none() | st.tuples(
        st.lists(st.sampled_from(CACHE_MODULES[kind]), min_size=1, max_size=4, unique=True),
        st.booleans(), st.booleans(), st.sampled_from([None, torch.float64]),
        st.integers(-1, 2))
    return st.tuples(invokes, cache, st.booleans(), st.booleans()).map(
        lambda t: _normalise(kind, t[0], Options(t[1], t[2], t[3] and not t[2])))


def _inside(path: str, module: str) -> bool:
    return path.startswith(module + ".")


def _normalise(kind: str, invokes, options: Options):
    """Drop the steps a program cannot honour by construction (steps inside a skipped call,
    ``.grad`` without a backward, an import with no earlier invoke's export); put an import at
    its export's site or a later one as wide; sort each invoke's steps in the order their
    sites run."""
    sites = SITES[kind]
    out = []
    exports: list[tuple[int, int]] = []  # (site, width) of earlier invokes' exports
    for ids, steps in invokes:
        kept = []
        for s in steps:
            if s.kind == "grad" and not options.grad:
                continue
            if s.kind == "import":
                if not exports:
                    continue
                e = s.a % len(exports)  # at the export's site, or a later one as wide
                site, width = exports[e]
                if s.site > site and sites[s.site].width == width:
                    site = s.site
                s = Step("import", site, e, s.b, s.c)
            kept.append(s)
        skipped = {(sites[s.site].path, sites[s.site].call) for s in kept if s.kind == "skip"}
        kept = [s for s in kept if not any(
            _inside(sites[s.site].path, path) and sites[s.site].call == call
            for path, call in skipped)]
        kept.sort(key=lambda s: (s.site, ORDER.get(s.kind, 1)))
        exports += [(s.site, sites[s.site].width) for s in kept if s.kind == "export"]
        out.append((tuple(ids), tuple(kept)))
    return tuple(out), options


def steer(seed: int, width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


# --- one interpreter for proxies and real tensors --------------------------------------------
class Access:
    """A site's value: ``get``/``set_``, ``tok(h)`` (``h.t`` or ``h[:, ...]``), ``.inputs``,
    ``skip``, ``grad``."""

    def get(self): ...

    def set_(self, value): ...

    def tok(self, value): ...

    def get_inputs(self): ...

    def set_inputs(self, value): ...

    def skip(self, value): ...

    def grad(self, value): ...


def apply_step(step: Step, width: int, n: int, at: Access, state: dict) -> None:
    """One step at its site; ``n`` the prompt's length; ``state``: ``saved``, ``usable``
    (values of this invoke), ``exports`` (of every invoke so far), ``grads``."""
    kind, c = step.kind, step.c
    saved, usable = state["saved"], state["usable"]
    i = step.a % (2 * n) - n  # a token position, negative or not
    j = step.b % (2 * n) - n
    lo, hi = sorted((step.a % (width + 1), step.b % (width + 1)))
    if kind == "save_raw":
        saved.append(at.get())
    elif kind == "save_sum":
        value = at.get().sum(-1)
        saved.append(value)
        usable.append(value)
    elif kind == "save_scaled":
        value = at.get() * c
        saved.append(value)
        usable.append(value.sum(-1))
    elif kind == "combo":  # arithmetic of two sites' values
        if usable:
            saved.append(usable[-1] * 2 + at.get().mean(-1))
    elif kind == "scale":
        at.set_(at.get() * c)
    elif kind == "add":
        at.set_(at.get() + c)
    elif kind == "iadd":
        value = at.get()
        value += c
        at.set_(value)
    elif kind == "steer":
        at.set_(at.get() + steer(step.a, width))
    elif kind == "relu":
        at.set_(torch.relu(at.get()))
    elif kind == "where":
        at.set_(torch.where(at.get() > 0, at.get(), at.get() * 0.1))
    elif kind == "apply":
        at.set_(fxsight.apply(twist, at.get()) if state["traced"] else twist(at.get()))
    elif kind == "save_apply":
        value = fxsight.apply(twist, at.get()) if state["traced"] else twist(at.get())
        saved.append(value.sum(-1))
    elif kind == "inputs":
        args, kwargs = at.get_inputs()
        at.set_inputs(((args[0] * c, *args[1:]), kwargs))
    elif kind == "skip":
        at.skip(c)
    elif kind == "grad":
        state["grads"].append(at.grad(at.get()))
    elif kind == "settok":
        at.tok(at.get())[i] = c
    elif kind == "tokcopy":
        at.tok(at.get())[i] = at.tok(at.get())[j] * c
    elif kind == "tokslice":
        at.tok(at.get())[i:j] *= c
    elif kind == "save_tok":
        saved.append(at.tok(at.get())[i] * c + 1)
    elif kind == "iaddindex":
        at.get()[..., step.a % width] += c
    elif kind == "setslice":
        at.get()[..., lo:hi] = c
    elif kind == "export":
        state["exports"].append(at.tok(at.get())[i] * 1)
    elif kind == "import":
        at.tok(at.get())[j] += state["exports"][step.a] * c
    else:  # pragma: no cover
        raise AssertionError(kind)


# --- fxsight -------------------------------------------------------------------------------
def _envoy(lm, path):
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


class TracedAccess(Access):
    def __init__(self, lm, site: Site):
        self.envoy = _envoy(lm, site.path)
        self.site = site

    def get(self):
        if self.site.accessor == "output0":
            return self.envoy.output[0]
        return getattr(self.envoy, self.site.accessor)

    def set_(self, value):
        if self.site.accessor == "output0":
            self.envoy.output = (value, *self.envoy.output[1:])
        else:
            setattr(self.envoy, self.site.accessor, value)

    def tok(self, value):
        return value.t

    def get_inputs(self):
        return self.envoy.inputs

    def set_inputs(self, value):
        self.envoy.inputs = value

    def skip(self, c):
        self.envoy.skip(self.envoy.input * c)

    def grad(self, value):
        return value.grad.save()


class _Call:
    def __init__(self, tracer, call):
        self.inner = tracer.iter[call] if call is not None else None

    def __enter__(self):
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc) if self.inner is not None else False


def _cache_args(cache):
    modules, inputs, output, dtype, _ = cache
    return dict(modules=list(modules), include_inputs=inputs,
                include_output=output or not inputs, dtype=dtype)


def run_fxsight(kind, invokes, options: Options, backend):
    lm, sites = LMS[kind], SITES[kind]
    results, exports, caches, losses = [], [], [], []
    grad = torch.enable_grad() if options.grad else torch.no_grad()
    with grad, lm.trace(backend=backend, use_cache=False) as tracer:
        where = None if options.cache is None else options.cache[4] % (len(invokes) + 1) - 1
        if where == -1:
            caches.append(tracer.cache(**_cache_args(options.cache)))
        for k, (ids, steps) in enumerate(invokes):
            with tracer.invoke([list(ids)]):
                if where == k:
                    caches.append(tracer.cache(**_cache_args(options.cache)))
                state = {"saved": [], "usable": [], "exports": exports, "grads": [],
                         "traced": True}
                for step in steps:
                    site = sites[step.site]
                    with _Call(tracer, site.call):
                        apply_step(step, site.width, len(ids), TracedAccess(lm, site), state)
                for value in state["saved"]:
                    value.save()
                logits = None if options.stop else lm.lm_head.output.save()
                if options.grad:
                    losses.append(lm.lm_head.output.t[-1][:, 7].sum())
                results.append((state["saved"], logits, state["grads"]))
        if options.grad:
            sum(losses[1:], losses[0]).backward()
        if options.stop:
            tracer.stop()
    assert tracer.backend == backend
    return results, caches[0] if caches else None


# --- the reference: plain PyTorch hooks, each prompt alone -----------------------------------
class _Counting:
    """Forward (pre-)hooks on every module: each call's number; the sites' steps; the values
    of the cached modules as a hook of the cache's own would see them (after the steps)."""

    def __init__(self, model, sites, steps, n, state, cache, grad_values):
        self.model, self.sites, self.n, self.state = model, sites, n, state
        self.by_site = defaultdict(list)
        for step in steps:
            self.by_site[step.site].append(step)
        self.calls = defaultdict(int)
        self.pre_calls = defaultdict(int)
        self.cache = cache  # (modules, args) or None
        self.cached = defaultdict(list)
        self.handles = []
        self.grad_values = grad_values

    def _run(self, path, accessor_kinds, call, box):
        for index, site in enumerate(self.sites):
            if site.path != path or site.accessor not in accessor_kinds:
                continue
            if site.call is not None and site.call != call:
                continue
            for step in self.by_site[index]:
                apply_step(step, site.width, self.n, RealAccess(box, site, self), self.state)

    def install(self):
        for path, module in self.model.named_modules():
            if not path:
                continue
            self.handles.append(module.register_forward_pre_hook(
                lambda m, a, k, path=path: self.pre(path, a, k), with_kwargs=True))
            self.handles.append(module.register_forward_hook(
                lambda m, a, k, o, path=path: self.post(path, a, k, o), with_kwargs=True))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def pre(self, path, args, kwargs):
        call = self.pre_calls[path]
        self.pre_calls[path] += 1
        box = {"inputs": (args, kwargs), "input": args[0] if args else None}
        self._run(path, ("input",), call, box)
        return box["inputs"]

    def post(self, path, args, kwargs, output):
        call = self.calls[path]
        self.calls[path] += 1
        box = {"output": output, "input": args[0] if args else None}
        self._run(path, ("output", "output0"), call, box)
        if self.cache is not None and path in self.cache[0]:
            self.cached[path].append((self._convert(args[0] if args else None),
                                      self._convert(box["output"])))
        return box["output"]

    def _convert(self, value):
        def one(t):
            t = t.detach()
            return t.to(self.cache[1]) if self.cache[1] is not None else t
        if isinstance(value, torch.Tensor):
            return one(value)
        if isinstance(value, tuple):
            return tuple(one(v) if isinstance(v, torch.Tensor) else v for v in value)
        return value


class RealAccess(Access):
    def __init__(self, box, site: Site, counting: _Counting):
        self.box, self.site, self.counting = box, site, counting

    def get(self):
        if self.site.accessor == "input":
            return self.box["inputs"][0][0]
        if self.site.accessor == "output0":
            return self.box["output"][0]
        return self.box["output"]

    def set_(self, value):
        if self.site.accessor == "input":
            args, kwargs = self.box["inputs"]
            self.box["inputs"] = ((value, *args[1:]), kwargs)
        elif self.site.accessor == "output0":
            self.box["output"] = (value, *self.box["output"][1:])
        else:
            self.box["output"] = value

    def tok(self, value):
        return _Tok(value)

    def get_inputs(self):
        return self.box["inputs"]

    def set_inputs(self, value):
        self.box["inputs"] = value

    def skip(self, c):
        self.box["output"] = self.box["input"] * c

    def grad(self, value):
        got = {}
        if value.requires_grad:
            value.register_hook(lambda g: got.__setitem__("g", g))
        self.counting.grad_values.append(got)
        return got


class _Tok:
    def __init__(self, value):
        self.value = value

    def __getitem__(self, key):
        return self.value[:, key]

    def __setitem__(self, key, item):
        self.value[:, key] = item


def run_reference(kind, invokes, options: Options, models=MODELS):
    model, sites = models[kind], SITES[kind]
    results, exports, losses, caches = [], [], [], []
    where = None if options.cache is None else options.cache[4] % (len(invokes) + 1) - 1
    grad = torch.enable_grad() if options.grad else torch.no_grad()
    with grad:
        for k, (ids, steps) in enumerate(invokes):
            state = {"saved": [], "usable": [], "exports": exports, "grads": [],
                     "traced": False}
            cache = None
            if where in (-1, k):
                cache = (options.cache[0], options.cache[3])
            grad_values = []
            counting = _Counting(model, sites, steps, len(ids), state, cache, grad_values)
            counting.install()
            try:
                out = model(torch.tensor([list(ids)]), use_cache=False).logits
            finally:
                counting.remove()
            caches.append(counting.cached)
            results.append((state["saved"], None if options.stop else out, grad_values))
            if options.grad:
                losses.append(out[:, -1, 7].sum())
        if options.grad:
            sum(losses[1:], losses[0]).backward()
    results = [(saved, out, [g.get("g") for g in grads]) for saved, out, grads in results]
    return results, caches


# --- the checks ------------------------------------------------------------------------------
def _equal(a, b, what):
    assert type(a) is type(b), (what, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape)
        assert torch.equal(a, b), (what, (a - b).abs().max())
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, (what, i))
    else:
        assert a == b, what


def _close(actual, expected, n, what, truth=None):
    """``actual``: a batch row of length >= n (padded on the left); ``expected``: alone.

    A padded row is its prompt alone up to float32 rounding: attention sums over more
    (masked) positions, and a LayerNorm after a constant offset (``h + 3``, a row set to
    constants) turns that rounding into a difference up to ~1e-4 at ``ln_f``, as plain
    transformers' own padded batch does (measured: a GPT-2 whose last block's output gets
    ``+9``: padded vs alone 2.9e-5 in float32, 5e-14 in float64; fxsight's padded rows equal
    transformers' padded rows bit for bit). So the tolerance is ``ATOL`` plus 4 times the
    prompt alone's own float32 error against ``truth`` (the same reference in float64),
    where one is given."""
    if expected is None:
        assert actual is None or not actual.any(), what
        return
    if actual.dim() >= 2 and expected.dim() >= 2 and expected.shape[1] == n:
        actual = actual[:, -n:]
    atol = ATOL
    if truth is not None:
        error = (expected.double() - truth.double()).abs().max().item()
        atol += 4 * error
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=0,
                               msg=lambda m: f"{what}: {m}")


def _tensor(value):
    return value[0] if isinstance(value, tuple) else value


def check(kind, program):
    invokes, options = program
    try:
        expected, expected_caches = run_reference(kind, invokes, options)
    except RuntimeError as error:  # an in-place edit of a value autograd saved
        assert "modified by an inplace operation" in str(error)
        for backend in ("fx", "hooks"):
            if len(invokes) == 1:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    run_fxsight(kind, invokes, options, backend)
                continue
            # several invokes: an invoke's rows may be a copy of the batch's (an edit after
            # ``relu`` then edits the copy, not the value autograd saved): the program's
            # own gradient, or the error
            try:
                run_fxsight(kind, invokes, options, backend)
            except RuntimeError as again:
                assert "modified by an inplace operation" in str(again)
            finally:
                MODELS[kind].zero_grad(set_to_none=True)
        return
    finally:
        MODELS[kind].zero_grad(set_to_none=True)
    runs = {}
    for backend in ("fx", "hooks"):
        try:
            runs[backend] = run_fxsight(kind, invokes, options, backend)
        finally:
            MODELS[kind].zero_grad(set_to_none=True)
    fx, hooks = runs["fx"][0], runs["hooks"][0]
    _equal([r[:2] for r in fx], [r[:2] for r in hooks], "fx vs hooks")
    try:
        _compare(kind, invokes, options, runs, expected, expected_caches, None)
    except AssertionError:  # (within float32 rounding of the prompt alone? see _close)
        truth = run_reference(kind, invokes, options, DOUBLES)
        DOUBLES[kind].zero_grad(set_to_none=True)
        _compare(kind, invokes, options, runs, expected, expected_caches, truth)


def _compare(kind, invokes, options, runs, expected, expected_caches, truth):
    """Each invoke's saves, logits, gradients and cache entries against its prompt alone
    (``truth``: the float64 reference, for the tolerance of ``_close``)."""
    (fx, fx_cache), (hooks, hooks_cache) = runs["fx"], runs["hooks"]
    true, true_caches = truth if truth is not None else (None, None)
    for k, ((ids, _), got, want) in enumerate(zip(invokes, fx, expected)):
        n = len(ids)
        exact = true[k] if true is not None else ([None] * len(want[0]), None,
                                                  [None] * len(want[2]))
        assert len(got[0]) == len(want[0]), (k, "saves")
        for i, (a, e, t) in enumerate(zip(got[0], want[0], exact[0])):
            _close(a, e, n, f"invoke {k}, save {i}", t)
        if want[1] is not None:
            _close(got[1], want[1], n, f"invoke {k}, logits", exact[1])
        assert len(got[2]) == len(want[2]) == len(hooks[k][2])
        for i, (a, h, e, t) in enumerate(zip(got[2], hooks[k][2], want[2], exact[2])):
            _equal(a, h, ("grad fx vs hooks", k, i))
            _close(a, e, n, f"invoke {k}, grad {i}", t)
    if options.cache is not None:
        _check_cache(kind, invokes, options, fx_cache, hooks_cache, expected_caches,
                     true_caches)


def _check_cache(kind, invokes, options, fx_cache, hooks_cache, expected, truth=None):
    assert sorted(fx_cache.keys()) == sorted(hooks_cache.keys())
    _, inputs, output, _, _ = options.cache
    output = output or not inputs
    where = options.cache[4] % (len(invokes) + 1) - 1
    rows = list(range(len(invokes))) if where == -1 else [where]
    for key in fx_cache:
        path = key[len("model."):]
        fx_entries, hk_entries = fx_cache[key], hooks_cache[key]
        if not isinstance(fx_entries, list):
            fx_entries, hk_entries = [fx_entries], [hk_entries]
        assert len(fx_entries) == len(hk_entries), key
        for call, (f, h) in enumerate(zip(fx_entries, hk_entries)):
            if output:
                _equal(f.output, h.output, (key, call, "output"))
            if inputs:
                _equal(f.input, h.input, (key, call, "input"))
            for r, k in enumerate(rows):
                want = expected[k][path]
                true = truth[k][path] if truth is not None else [(None, None)] * len(want)
                if options.stop and call >= len(want):
                    continue
                n = len(invokes[k][0])
                if output and not (options.stop and f.output is None):  # (not returned)
                    _close(_tensor(f.output)[r:r + 1], _tensor(want[call][1]), n,
                           f"cache {key} call {call} invoke {k} output",
                           _tensor(true[call][1]))
                if inputs and isinstance(want[call][0], torch.Tensor):
                    _close(f.input[r:r + 1], want[call][0], n,
                           f"cache {key} call {call} invoke {k} input", true[call][0])
    if not options.stop:
        modules = options.cache[0]
        assert sorted(fx_cache.keys()) == sorted(f"model.{m}" for m in modules)


def _examples(n: int) -> settings:
    n = int(os.environ.get("FXSIGHT_PROPERTY_EXAMPLES", n))
    hunting = "FXSIGHT_PROPERTY_EXAMPLES" in os.environ
    return settings(max_examples=n, deadline=None, derandomize=not hunting, database=None,
                    suppress_health_check=list(HealthCheck))


@_examples(10)
@given(programs("gpt2"))
def test_combined_features_gpt2(program):
    check("gpt2", program)


@_examples(6)
@given(programs("tied"))
def test_combined_features_llama_with_a_layer_called_twice(program):
    check("tied", program)
