"""Property test: random intervention programs across the decoding steps of ``lm.generate``:
several invokes of one or two prompts each (of different lengths, left padding), reads,
saves and writes at random sites, each inside ``tracer.iter[int | slice | list]`` (a
``with`` block or a ``for`` loop whose body uses the step's number), ``tracer.all()``, or
outside any (the first step), a value read at the first step used in the chosen steps.

The reference is plain transformers: ``model.generate`` on the same left-padded batch (its
attention mask), greedy, with forward hooks that count the model's calls (one per decoding
step) and run each invoke's steps on its own row. The generated ids and every saved value
must be equal bit for bit on the fx and hooks backends and in the reference (but for a
padded Llama batch's later cached steps on fx: see ``check``).

``FXSIGHT_PROPERTY_EXAMPLES=n`` runs ``n`` examples per test (a bug hunt).
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsight import LanguageModel
from models import PAD_ID, tiny_gpt2, tiny_llama, train_tokenizer

TOKENIZER = train_tokenizer()
VOCAB = len(TOKENIZER)
NEW = 4  # new tokens: every generation runs NEW steps (min_new_tokens=NEW)
CONSTANTS = [-2.0, -0.5, 0.0, 0.25, 1.5, 3.0]

MODELS = {"gpt2": tiny_gpt2(vocab_size=VOCAB), "llama": tiny_llama(vocab_size=VOCAB)}
LMS = {kind: LanguageModel(model, tokenizer=TOKENIZER) for kind, model in MODELS.items()}
SITES = {  # (path, width), in the order they run; every output a tensor
    "gpt2": [("transformer.wte", 64), ("transformer.h.0", 64), ("transformer.h.1.mlp", 64),
             ("transformer.h.1", 64), ("transformer.ln_f", 64), ("lm_head", VOCAB)],
    "llama": [("model.embed_tokens", 64), ("model.layers.0", 64),
              ("model.layers.1.mlp", 64), ("model.norm", 64), ("lm_head", VOCAB)],
}


@dataclass(frozen=True)
class Action:
    """One line of a program: ``kind`` at ``site``'s output, at the steps of ``choice``
    (``None``: outside any, the first step; ``"all"``; an int, a slice or a list) written
    as ``with tracer.iter[...]`` or, ``loop``, ``for step in tracer.iter[...]``."""
    kind: str
    site: int
    choice: object
    loop: bool
    a: int
    b: int
    c: float


KINDS = ["save_last", "save_sum", "add_last", "steer_last", "scale", "setslice",
         "step_add", "import"]


def _choice():
    index = st.integers(-NEW, NEW - 1)
    bound = st.none() | st.integers(-NEW, NEW)
    return st.one_of(
        st.none(), st.just("all"), index,
        st.tuples(bound, bound).filter(lambda t: len(range(NEW)[slice(*t)]) > 0)
        .map(lambda t: slice(*t)),
        st.lists(st.integers(0, NEW - 1), min_size=1, max_size=NEW, unique=True).map(sorted))


def _actions(kind: str):
    action = st.builds(Action, st.sampled_from(KINDS), st.integers(0, len(SITES[kind]) - 1),
                       _choice(), st.booleans(), st.integers(0, 64), st.integers(0, 64),
                       st.sampled_from(CONSTANTS))
    # sites in the order they run (stable); an import (of a width-64 value) at a width-64 site
    return st.lists(action, min_size=0, max_size=5).map(
        lambda actions: tuple(sorted(
            (a if a.kind != "import" or SITES[kind][a.site][1] == 64 else
             Action("add_last", *astuple(a)[1:]) for a in actions),
            key=lambda a: a.site)))


PROMPT = st.integers(2, 5).flatmap(
    lambda n: st.lists(st.integers(4, VOCAB - 1), min_size=n, max_size=n).map(tuple))


def programs(kind: str):
    prompts = st.lists(PROMPT, min_size=1, max_size=2).map(tuple)  # an invoke's prompts
    return st.tuples(st.lists(st.tuples(prompts, _actions(kind)), min_size=1, max_size=3),
                     st.booleans())


def steps_of(choice) -> list[int]:
    """The decoding steps a choice names."""
    if choice is None:
        return [0]
    if choice == "all":
        return list(range(NEW))
    if isinstance(choice, int):
        return [range(NEW)[choice]]
    if isinstance(choice, slice):
        return list(range(NEW)[choice])
    return list(choice)


def steer(seed: int, width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def act(action: Action, width: int, h, step, first, saved: list) -> object:
    """One action on ``h`` (a proxy or a real tensor of one invoke's rows) at ``step`` (an
    int, or ``None`` inside a ``with`` block: the steps are not known); returns the value
    to go on with. ``first``: the value read at the first step for ``import``."""
    lo, hi = sorted((action.a % (width + 1), action.b % (width + 1)))
    kind, c = action.kind, action.c
    if kind == "save_last":
        saved.append(h[:, -1])
    elif kind == "save_sum":
        saved.append(h.sum(-1))
    elif kind == "add_last":
        h[:, -1] += c
    elif kind == "steer_last":
        h[:, -1] += steer(action.a, width)
    elif kind == "scale":
        h = h * c
    elif kind == "setslice":
        h[..., lo:hi] = c
    elif kind == "step_add":  # a constant that depends on the step (in a for loop)
        h[:, -1, action.a % width] += c * (1 + (step or 0))
    elif kind == "import":
        h[:, -1] += first * c
    return h


# --- fxsight ---------------------------------------------------------------------------------
def _envoy(lm, path: str):
    envoy = lm
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _scope(tracer, action: Action):
    if action.choice is None:
        return None
    if action.choice == "all":
        return tracer.all()
    return tracer.iter[action.choice]


def run_fxsight(kind: str, invokes, use_cache: bool, backend: str):
    lm, sites = LMS[kind], SITES[kind]
    results, every = [], []  # (every saved value in one flat list: bound after the block)
    with torch.no_grad(), lm.generate(max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, use_cache=use_cache,
                                      backend=backend) as tracer:
        for prompts, actions in invokes:
            with tracer.invoke([list(ids) for ids in prompts]):
                # the first step's value of the last position at the first site an import
                # reads from (read before any line of the program)
                imports = [a for a in actions if a.kind == "import"]
                first = None
                if imports:
                    first = _envoy(lm, sites[imports[0].site][0]).output[:, -1].clone()
                saves = []
                for action in actions:
                    path, width = sites[action.site]
                    envoy = _envoy(lm, path)
                    saved: list = []

                    def body(step):
                        h = envoy.output
                        out = act(action, width, h, step, first, saved)
                        if out is not h:
                            envoy.output = out

                    scope = _scope(tracer, action)
                    if scope is None:
                        body(None)
                    elif action.loop:
                        for step in scope:
                            body(step)
                    else:
                        with scope:
                            body(None)
                    for value in saved:
                        every.append(value.save())
                    saves.append((action, len(saved)))
                ids_out = tracer.result.save()
                results.append((saves, ids_out))
        tokens = tracer.result.save()
    assert tracer.backend == backend
    return results, every, tokens


def _flatten(results, every):
    """Every saved value, one tensor per step, in the program's order."""
    out, every = [], iter(every)
    for saves, _ in results:
        for action, count in saves:
            for _ in range(count):
                value = next(every)
                if action.choice is not None and not action.loop:
                    assert isinstance(value, list), (action, type(value))
                    out.extend(value)
                else:
                    assert isinstance(value, torch.Tensor), (action, type(value))
                    out.append(value)
    return out


# --- the reference: transformers' generate with forward hooks --------------------------------
def run_reference(kind: str, invokes, use_cache: bool):
    model, sites = MODELS[kind], SITES[kind]
    prompts = [p for ps, _ in invokes for p in ps]
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (length - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    bounds = [0]
    for ps, _ in invokes:
        bounds.append(bounds[-1] + len(ps))
    state = {"step": -1}
    firsts: dict[int, torch.Tensor] = {}
    saves: list[list] = [[[] for _ in actions] for _, actions in invokes]

    def on_site(index: int, output: torch.Tensor) -> torch.Tensor | None:
        # each invoke's rows, a view of the output: in-place steps edit it (and the views
        # saved of it before, as in PyTorch); a step that replaces it leaves those alone
        step, rows, replaced = state["step"], [], False
        for row, (_, actions) in enumerate(invokes):  # (row: an invoke, its rows)
            h = view = output[bounds[row]:bounds[row + 1]]
            imports = [a for a in actions if a.kind == "import"]
            if step == 0 and imports and imports[0].site == index:
                firsts[row] = h[:, -1].clone()
            for number, action in enumerate(actions):
                if action.site != index or step not in steps_of(action.choice):
                    continue
                known = step if action.loop and action.choice is not None else None
                h = act(action, sites[index][1], h, known, firsts.get(row),
                        saves[row][number])
            replaced |= h is not view
            rows.append(h)
        return torch.cat(rows) if replaced else None

    handles = [model.register_forward_pre_hook(
        lambda m, a: state.__setitem__("step", state["step"] + 1))]
    for index, (path, _) in enumerate(sites):
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda m, a, o, index=index: on_site(index, o)))
    try:
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                    min_new_tokens=NEW, do_sample=False, use_cache=use_cache,
                                    pad_token_id=PAD_ID)
    finally:
        for handle in handles:
            handle.remove()
    assert state["step"] == NEW - 1
    return [v.clone() for per_invoke in saves for per_action in per_invoke
            for v in per_action], tokens


def check(kind: str, program) -> None:
    invokes, use_cache = program
    expected_saves, expected_tokens = run_reference(kind, invokes, use_cache)
    runs = {backend: run_fxsight(kind, invokes, use_cache, backend)
            for backend in ("fx", "hooks")}
    for backend, (results, every, tokens) in runs.items():
        assert torch.equal(tokens, expected_tokens), (backend, tokens, expected_tokens)
        start = 0
        for row, ((prompts, _), (_, ids_out)) in enumerate(zip(invokes, results)):
            rows = expected_tokens[start:start + len(prompts)]
            assert torch.equal(ids_out, rows), (backend, row)
            start += len(prompts)
        saves = _flatten(results, every)
        assert len(saves) == len(expected_saves), (backend, len(saves), len(expected_saves))
        for i, (got, want) in enumerate(zip(saves, expected_saves)):
            assert got.shape == want.shape, (backend, i, got.shape, want.shape)
            if kind == "llama" and backend == "fx":
                # (known: a padded Llama batch's cached decoding steps on fx differ from
                # transformers' in the last bits, ~1e-9 at the first layer: for one query
                # token eager transformers packs the query heads (pack_gqa), which it skips
                # when captured (is_torchdynamo_compiling), repeating the keys instead; the
                # tokens are equal)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got, want), (backend, i, (got - want).abs().max())


def _examples(n: int) -> settings:
    n = int(os.environ.get("FXSIGHT_PROPERTY_EXAMPLES", n))
    hunting = "FXSIGHT_PROPERTY_EXAMPLES" in os.environ
    return settings(max_examples=n, deadline=None, derandomize=not hunting, database=None,
                    suppress_health_check=list(HealthCheck))


@_examples(3)
@given(programs("gpt2"))
def test_random_programs_across_decoding_steps_gpt2(program):
    check("gpt2", program)


@_examples(2)
@given(programs("llama"))
def test_random_programs_across_decoding_steps_llama(program):
    check("llama", program)
