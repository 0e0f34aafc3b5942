"""Core engine, property test: random intervention programs (module choice, reads, writes,
arithmetic, slices, integer indices, in-place edits, steering tensors) over the MLP, a tiny GPT-2 and a
tiny Llama give
identical tensors on the fx backend, the hooks backend and hand-written forward hooks.

A program is a list of steps, each at one *site* (a module's input, output, or the first
element of a tuple output), in the order the sites run. The same step interpreter runs
on proxies (inside a trace) and on real tensors (inside the reference hooks)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsight import NNsight, Proxy
from models import mlp, tiny_gpt2, tiny_llama

# --- the models, built once --------------------------------------------------------------
MLP = mlp()
MLP_NET = NNsight(MLP)
MLP_X = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
MLP_SITES = [  # (module path, accessor, last-dim width), in the order they run
    ("layer1", "input", 5), ("layer1", "output", 10), ("act1", "input", 10),
    ("act1", "output", 10), ("layer2", "input", 10), ("layer2", "output", 10),
    ("act2", "input", 10), ("act2", "output", 10), ("layer3", "input", 10),
    ("layer3", "output", 2),
]

GPT2 = tiny_gpt2()
GPT2_NET = NNsight(GPT2)
GPT2_IDS = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(4))
GPT2_SITES = [
    ("transformer.wte", "output", 64), ("transformer.drop", "input", 64),
    ("transformer.drop", "output", 64), ("transformer.h.0.attn", "output0", 64), ("transformer.h.0.mlp", "output", 64),
    ("transformer.h.0", "output", 64), ("transformer.h.1", "input", 64),
    ("transformer.h.1.ln_1", "output", 64), ("transformer.h.1.attn", "output0", 64),
    ("transformer.h.1.mlp", "input", 64), ("transformer.h.1", "output", 64),
    ("transformer.ln_f", "output", 64), ("lm_head", "output", 128),
]

LLAMA = tiny_llama()
LLAMA_NET = NNsight(LLAMA)
LLAMA_SITES = [
    ("model.embed_tokens", "output", 64), ("model.layers.0.input_layernorm", "output", 64),
    ("model.layers.0.self_attn", "output0", 64), ("model.layers.0.mlp", "input", 64),
    ("model.layers.0.mlp.act_fn", "output", 128), ("model.layers.0.mlp", "output", 64),
    ("model.layers.0", "output", 64), ("model.layers.1", "input", 64),
    ("model.layers.1.self_attn.o_proj", "input", 64), ("model.layers.1", "output", 64),
    ("model.norm", "output", 64), ("lm_head", "output", 128),
]

CONSTANTS = [-2.0, -0.5, 0.0, 0.25, 1.5, 3.0]


@dataclass(frozen=True)
class Step:
    kind: str
    site: int
    a: int = 0
    b: int = 0
    c: float = 1.0


def steps_strategy(n_sites: int):
    site = st.integers(0, n_sites - 1)
    const = st.sampled_from(CONSTANTS)
    idx = st.integers(0, 64)
    step = st.one_of(
        st.builds(Step, st.sampled_from(["save_raw", "save_sum", "relu", "where"]), site),
        st.builds(Step, st.sampled_from(["save_scaled", "scale", "add", "iadd",
                                         "add_usable_mean", "steer"]), site, c=const,
                  a=idx),
        st.builds(Step, st.sampled_from(["setslice", "imulslice", "save_row", "setcol",
                                         "imulcol", "iaddindex", "setlast",
                                         "iaddslice_usable", "copyrow"]),
                  site, idx, idx, const),
    )
    # sites in the order they run (stable: steps at one site keep their order)
    return st.lists(step, min_size=1, max_size=7).map(
        lambda steps: sorted(steps, key=lambda s: s.site))


def steer_tensor(seed: int, width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def apply_step(step: Step, width: int, get, set_, saved: list, usable: list,
               steers: dict) -> None:
    """Run one step; ``get``/``set_`` read and write the step's site. Works on proxies and
    on real tensors alike."""
    kind, c = step.kind, step.c
    lo, hi = sorted((step.a % (width + 1), step.b % (width + 1)))
    if kind == "save_raw":
        saved.append(get())
    elif kind == "save_sum":
        value = get().sum(-1)
        saved.append(value)
        usable.append(value)
    elif kind == "save_scaled":
        value = get() * c
        saved.append(value)
        usable.append(value)
    elif kind == "scale":
        set_(get() * c)
    elif kind == "add":
        set_(get() + c)
    elif kind == "iadd":
        value = get()
        value += c
        set_(value)
    elif kind == "add_usable_mean":
        if usable:
            set_(get() + usable[step.a % len(usable)].mean())
    elif kind == "steer":
        set_(get() + steers[(step.a, width)])
    elif kind == "relu":
        set_(torch.relu(get()))
    elif kind == "where":
        set_(torch.where(get() > 0, get(), get() * 0.1))
    elif kind == "setslice":
        get()[..., lo:hi] = c
    elif kind == "imulslice":
        get()[..., lo:hi] *= c
    # integer indices (inputs of the spliced graph: fxsight.splice.indices); every site
    # has at least two rows and two entries along dimension 1
    elif kind == "save_row":
        saved.append(get()[step.a % 2] * 1)
    elif kind == "setcol":
        get()[:, step.a % 2] = c
    elif kind == "imulcol":
        get()[:, -1 - step.b % 2] *= c
    # the forms researchers write: ``out[..., idx] += v``, ``out[:, -1, :] = ...`` from
    # another position, a slice raised by an earlier read, a row copied from another
    elif kind == "iaddindex":
        get()[..., step.a % width] += c
    elif kind == "setlast":
        get()[:, -1, ...] = get()[:, 0, ...] * c
    elif kind == "iaddslice_usable":
        if usable:
            get()[..., lo:hi] += usable[step.a % len(usable)].mean()
    elif kind == "copyrow":
        get()[-1] = get()[0]
    elif kind == "setcol_abs":  # (for references written by hand: ``a`` is the index)
        get()[:, step.a] = c
    else:  # pragma: no cover
        raise AssertionError(kind)


def make_steers(steps, sites) -> dict:
    return {(s.a, sites[s.site][2]): steer_tensor(s.a, sites[s.site][2])
            for s in steps if s.kind == "steer"}


# --- the three runs ------------------------------------------------------------------------
def run_fxsight(net, sites, steps, args, kwargs, backend, output_of):
    steers = make_steers(steps, sites)

    def accessors(path, accessor):
        envoy = net
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        if accessor == "output0":
            def get():
                return envoy.output[0]

            def set_(value):
                envoy.output = (value, *envoy.output[1:])
        else:
            def get():
                return getattr(envoy, accessor)

            def set_(value):
                setattr(envoy, accessor, value)
        return get, set_

    with net.trace(*args, backend=backend, **kwargs) as tracer:
        saved, usable = [], []
        for step in steps:
            path, accessor, width = sites[step.site]
            get, set_ = accessors(path, accessor)
            apply_step(step, width, get, set_, saved, usable, steers)
        for value in saved:
            value.save()
        out = output_of(net.output).save()
    assert tracer.backend == backend
    assert not any(isinstance(v, Proxy) for v in saved)
    return saved, out


def run_reference(model, sites, steps, args, kwargs, output_of):
    """Hand-written PyTorch: forward (pre-)hooks that run each site's steps."""
    steers = make_steers(steps, sites)
    saved, usable = [], []
    by_site = defaultdict(list)
    for step in steps:
        by_site[step.site].append(step)
    handles = []

    def run_site(index, box, first):
        width = sites[index][2]

        def get():
            return box["v"][0] if first else box["v"]

        def set_(value):
            box["v"] = (value, *box["v"][1:]) if first else value

        for step in by_site[index]:
            apply_step(step, width, get, set_, saved, usable, steers)
        return box["v"]

    try:
        for index in by_site:
            path, accessor, _ = sites[index]
            module = model.get_submodule(path)
            if accessor == "input":
                def pre(m, a, k, index=index):
                    new = run_site(index, {"v": a[0]}, first=False)
                    return (new, *a[1:]), k
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(m, a, o, index=index, first=accessor == "output0"):
                    return run_site(index, {"v": o}, first=first)
                handles.append(module.register_forward_hook(post))
        out = output_of(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return saved, out


def assert_identical(actual, expected, what, *, output: bool = True):
    """``(saved values, output)`` of a run equal to the bit to the reference's (the output
    too unless ``output`` is false: a stopped run has none)."""
    assert len(actual[0]) == len(expected[0]), what
    for i, (a, e) in enumerate(zip(actual[0], expected[0])):
        assert type(a) is torch.Tensor, (what, i, type(a))
        assert a.shape == e.shape, (what, i, a.shape, e.shape)
        assert torch.equal(a, e), (what, i, (a - e).abs().max())
    if output:
        assert torch.equal(actual[1], expected[1]), (what, "output")


def check_program(model, net, sites, steps, make_inputs, output_of):
    runs = {}
    for name in ("reference", "fx", "hooks"):
        args, kwargs = make_inputs()  # fresh inputs: steps may edit them in place
        if name == "reference":
            runs[name] = run_reference(model, sites, steps, args, kwargs, output_of)
        else:
            runs[name] = run_fxsight(net, sites, steps, args, kwargs, name, output_of)
    assert_identical(runs["fx"], runs["reference"], "fx vs reference")
    assert_identical(runs["hooks"], runs["reference"], "hooks vs reference")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# At least 500 programs per ``make test`` (the MLP's are cheapest): 300 + 160 + 45.
def _examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@_examples(300)
@given(steps_strategy(len(MLP_SITES)))
def test_random_programs_mlp(steps):
    check_program(MLP, MLP_NET, MLP_SITES, steps,
                  lambda: ((MLP_X.clone(),), {}), lambda out: out)


@_examples(160)
@given(steps_strategy(len(GPT2_SITES)))
def test_random_programs_gpt2(steps):
    check_program(GPT2, GPT2_NET, GPT2_SITES, steps,
                  lambda: ((GPT2_IDS,), {"use_cache": False}), lambda out: out.logits)


@_examples(45)
@given(steps_strategy(len(LLAMA_SITES)))
def test_random_programs_llama(steps):
    check_program(LLAMA, LLAMA_NET, LLAMA_SITES, steps,
                  lambda: ((GPT2_IDS,), {"use_cache": False}), lambda out: out.logits)


def test_interpreter_covers_every_step_kind():
    """The reference interpreter itself: every step kind changes or saves something."""
    kinds = ["save_raw", "save_sum", "save_scaled", "scale", "add", "iadd",
             "add_usable_mean", "steer", "relu", "where", "setslice", "imulslice",
             "iaddindex", "setlast", "iaddslice_usable", "copyrow"]
    plain = MLP(MLP_X)
    for kind in kinds:
        steps = [Step("save_sum", 1), Step(kind, 5, a=1, b=7, c=3.0)]
        saved, out = run_reference(MLP, MLP_SITES, steps, (MLP_X.clone(),), {}, lambda o: o)
        assert len(saved) >= 1
        changed = not torch.equal(out, plain) or len(saved) == 2
        assert changed, kind
