"""Property test: invokes of different lengths on a LanguageModel (left padding), each with
its own random program of reads and writes at a tiny GPT-2's and Llama's sites. fx and hooks
agree bit for bit on every saved value and on each invoke's logits; each invoke's real
positions agree with that prompt run alone through plain PyTorch forward hooks (up to the
last bits that a padding mask changes in attention)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsight import LanguageModel, OrderError
from models import tiny_gpt2, tiny_llama, train_tokenizer
from test_core_property import (CONSTANTS, GPT2_SITES, LLAMA_SITES, Step, apply_step,
                                make_steers, run_reference)

ATOL = 1e-5
TOKENIZER = train_tokenizer()
MODELS = {kind: build(vocab_size=len(TOKENIZER)) for kind, build in
          (("gpt2", tiny_gpt2), ("llama", tiny_llama))}
LMS = {kind: LanguageModel(module, tokenizer=TOKENIZER) for kind, module in MODELS.items()}
SITES = {"gpt2": [s if s[0] != "lm_head" else ("lm_head", "output", len(TOKENIZER))
                  for s in GPT2_SITES],
         "llama": [s if s[0] != "lm_head" else ("lm_head", "output", len(TOKENIZER))
                   for s in LLAMA_SITES]}

# steps that act on each position alone, so that a padded row's real positions are its
# prompt's alone (a mean over positions or an index along them would see the padding);
# "settok": ``h.t[i] = c``, a position counted from the first real token (left-padding aware)
def positionwise(kind: str):
    site = st.integers(0, len(SITES[kind]) - 1)
    return st.one_of(
        st.builds(Step, st.sampled_from(["save_raw", "save_sum", "relu", "where"]), site),
        st.builds(Step, st.sampled_from(["save_scaled", "scale", "add", "iadd", "steer"]),
                  site, c=st.sampled_from(CONSTANTS), a=st.integers(0, 64)),
        st.builds(Step, st.sampled_from(["setslice", "imulslice", "iaddindex", "settok"]),
                  site, st.integers(0, 64), st.integers(0, 64), st.sampled_from(CONSTANTS)),
    )


# two lengths only: each new padded shape is a capture on fx (seconds), the padding pattern
# within a shape is what varies
PROMPT = st.sampled_from([3, 5]).flatmap(
    lambda n: st.lists(st.integers(4, 100), min_size=n, max_size=n))


def invoke_programs(kind: str):
    program = st.lists(positionwise(kind), min_size=0, max_size=4).map(
        lambda steps: sorted(steps, key=lambda s: s.site))
    return st.lists(st.tuples(PROMPT, program), min_size=1, max_size=3)


def apply(step, width, get, set_, saved, usable, steers, *, length):
    """One step on proxies; ``settok``: ``h.t[i] = c`` (counted from the first real token)."""
    if step.kind == "settok":
        get().t[step.a % length] = step.c
    else:
        apply_step(step, width, get, set_, saved, usable, steers)


def _accessors(lm, path, accessor):
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    if accessor == "output0":
        return (lambda: envoy.output[0],
                lambda value: setattr(envoy, "output", (value, *envoy.output[1:])))
    return (lambda: getattr(envoy, accessor),
            lambda value: setattr(envoy, accessor, value))


def run_invokes(kind, invokes, backend):
    lm, sites = LMS[kind], SITES[kind]
    results = []
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        for ids, steps in invokes:
            steers = make_steers(steps, sites)
            with tracer.invoke([ids]):
                saved, usable = [], []
                for step in steps:
                    path, accessor, width = sites[step.site]
                    get, set_ = _accessors(lm, path, accessor)
                    apply(step, width, get, set_, saved, usable, steers, length=len(ids))
                for value in saved:
                    value.save()
                results.append((saved, lm.lm_head.output.save()))
    assert tracer.backend == backend
    return results


def alone(kind, ids, steps):
    """The prompt alone, the steps in plain PyTorch forward hooks (``settok`` as a write
    at that position, where its site's steps run)."""
    plain = [step if step.kind != "settok" else
             Step("setcol_abs", step.site, step.a % len(ids), 0, step.c) for step in steps]
    with torch.no_grad():
        return run_reference(MODELS[kind], SITES[kind], plain, (torch.tensor([ids]),),
                             {"use_cache": False}, lambda out: out.logits)


def check(kind, invokes):
    runs = {backend: run_invokes(kind, invokes, backend) for backend in ("fx", "hooks")}
    for k, (ids, steps) in enumerate(invokes):
        (fx_saved, fx_out), (hk_saved, hk_out) = runs["fx"][k], runs["hooks"][k]
        assert torch.equal(fx_out, hk_out), (k, "logits", (fx_out - hk_out).abs().max())
        assert len(fx_saved) == len(hk_saved)
        for i, (a, b) in enumerate(zip(fx_saved, hk_saved)):
            assert torch.equal(a, b), (k, i, (a - b).abs().max())
        saved, logits = alone(kind, ids, steps)
        n = len(ids)
        torch.testing.assert_close(fx_out[:, -n:], logits, atol=ATOL, rtol=0)
        for i, (a, e) in enumerate(zip(fx_saved, saved)):
            torch.testing.assert_close(a[:, -n:], e, atol=ATOL, rtol=0,
                                       msg=lambda m, k=k, i=i: f"invoke {k}, save {i}: {m}")


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(invoke_programs("gpt2"))
def test_invokes_of_different_lengths_gpt2(invokes):
    check("gpt2", invokes)


@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(invoke_programs("llama"))
def test_invokes_of_different_lengths_llama(invokes):
    check("llama", invokes)


# --- activation patching across invokes: a read in one invoke written in another ------------
def _hook_site(model, site, edit):
    """A plain forward (pre-)hook that runs ``edit`` on the site's tensor."""
    path, accessor, _ = site
    module = model.get_submodule(path)
    if accessor == "input":
        return module.register_forward_pre_hook(lambda m, a: (edit(a[0]), *a[1:]))
    if accessor == "output0":
        return module.register_forward_hook(lambda m, a, o: (edit(o[0]), *o[1:]))
    return module.register_forward_hook(lambda m, a, o: edit(o))


def _patch_reference(kind, source_ids, target_ids, read, write, position):
    """Plain PyTorch: the source prompt alone gives the read's value at ``position``; the
    target prompt alone runs with it written there."""
    model, sites = MODELS[kind], SITES[kind]
    got = []
    handle = _hook_site(model, sites[read],
                        lambda v: got.append(v[:, position].clone()) or v)
    try:
        with torch.no_grad():
            model(torch.tensor([source_ids]), use_cache=False)
    finally:
        handle.remove()

    def patch(value):
        value[:, position] = got[0]
        return value

    handle = _hook_site(model, sites[write], patch)
    try:
        with torch.no_grad():
            return model(torch.tensor([target_ids]), use_cache=False).logits
    finally:
        handle.remove()


def _patched(kind, source_ids, target_ids, read, write, position, backend):
    lm, sites = LMS[kind], SITES[kind]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke([source_ids]):
            value = _accessors(lm, *sites[read][:2])[0]()[:, position]
        with tracer.invoke([target_ids]):
            _accessors(lm, *sites[write][:2])[0]()[:, position] = value
            logits = lm.lm_head.output.save()
    assert tracer.backend == backend
    return logits


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["gpt2", "llama"]), read=st.integers(0, 11),
       write=st.integers(0, 11), position=st.integers(-4, 3),
       prompts=st.lists(st.lists(st.integers(4, 100), min_size=4, max_size=4), min_size=2,
                        max_size=2))
def test_patching_across_invokes(kind, read, write, position, prompts):
    """``h = site_r[:, p]`` in one invoke, ``site_w[:, p] = h`` in the next (prompts of one
    length): the prompts alone patched by hand where site r runs no later than site w, an
    OrderError on both backends where it runs later."""
    sites = SITES[kind]
    if sites[read][2] != sites[write][2]:
        return
    source, target = prompts
    if read > write:
        for backend in ("fx", "hooks"):
            with pytest.raises(OrderError, match="only computed after"):
                _patched(kind, source, target, read, write, position, backend)
        return
    fx = _patched(kind, source, target, read, write, position, "fx")
    hooks = _patched(kind, source, target, read, write, position, "hooks")
    assert torch.equal(fx, hooks), (fx - hooks).abs().max()
    expected = _patch_reference(kind, source, target, read, write, position)
    torch.testing.assert_close(fx[0], expected[0], atol=ATOL, rtol=0)
