"""Padded layouts a caller gives a decoder-only ``LanguageModel``'s trace: a right-padded
input continuing a cache, right-padded labels (with -100 or the pad id at the pads), and
left-padded inputs (a tokenizer's ``padding_side='left'``) in several invokes, with and
without a cache. Each row is checked against its prompt run alone through plain
transformers, and where the layout is the caller's, against the plain forward on the same
batch: a trace that re-packed or moved the padding reads other columns and fails."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fxsight import LanguageModel
from fxsight.errors import TraceError
from fxsight.generate.steps import CACHE
from models import tiny_gpt2, tiny_llama

BACKENDS = ["fx", "hooks"]
ATOL = 1e-5
_BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module")
def wrapped():
    """kind -> (LanguageModel, the plain module it wraps)."""
    built = {}
    for kind, build in _BUILD.items():
        module = build()
        built[kind] = (LanguageModel(module), module)
    return built


def _block(model):
    return model.transformer.h[0] if hasattr(model, "transformer") else model.model.layers[0]


def _rows(*lengths: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=generator).tolist() for n in lengths]


def _right_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _alone(model, ids: list[int], skip: int = 0, zero_last: bool = False) -> torch.Tensor:
    """Plain transformers, one sequence alone: the logits after its first ``skip`` tokens
    (a cache's), the output of the first block's last position zeroed where ``zero_last``."""
    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, -1] = 0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    handle = _block(model).register_forward_hook(hook) if zero_last else None
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0, skip:]
    finally:
        if handle is not None:
            handle.remove()


def _cache(model, ids: torch.Tensor, mask: torch.Tensor | None = None, counted: bool = True):
    """The cache of a plain forward of ``ids`` (positions counting real tokens, as
    ``generate`` counts them, where ``mask`` pads a row; the model's own, its columns, where
    not ``counted``)."""
    extra = {} if mask is None else {"attention_mask": mask}
    if mask is not None and counted:
        extra["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        return getattr(model(ids, use_cache=True, **extra), CACHE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_right_padded_input_continues_a_cache(wrapped, kind, backend):
    """A right-padded input with a mask over the cache's tokens and its own keeps its
    layout: logits, ``.token`` reads and a ``.token[-1]`` write are each row's sequence
    alone, and the logits the plain forward's on the same batch; beside a longer invoke
    (left pads between the cache's tokens and its own) and after a left-padded cache."""
    lm, model = wrapped[kind]
    past, (long, short), (other,) = _rows(5, 5, 5), _rows(4, 2, seed=1), _rows(6, seed=2)
    ids, own = _right_padded([long, short])
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), own], 1)
    alone = [_alone(model, p + r, 5) for p, r in zip(past, (long, short))]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask,
                      **{CACHE: _cache(model, torch.tensor(past[:2]))}).logits
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, backend=backend,
                                   **{CACHE: _cache(model, torch.tensor(past[:2]))}):
        logits = lm.output.logits.save()
        last, first = lm.output.logits.token[-1].save(), lm.output.logits.token[0].save()
    torch.testing.assert_close(logits[0], plain[0], atol=ATOL, rtol=0)
    for row, n in enumerate((4, 2)):
        torch.testing.assert_close(logits[row, :n], alone[row], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[row, :n], plain[row, :n], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[row], alone[row][-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(first[row], alone[row][0], atol=ATOL, rtol=0)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask}, backend=backend,
                                   **{CACHE: _cache(model, torch.tensor(past[:2]))}):
        lm_block = lm.transformer.h[0] if kind == "gpt2" else lm.model.layers[0]
        lm_block.output.token[-1] = 0
        written = lm.output.logits.save()
    for row, (p, r) in enumerate(zip(past, (long, short))):
        torch.testing.assert_close(written[row, :len(r)], _alone(model, p + r, 5, True),
                                   atol=ATOL, rtol=0)
    # beside a longer invoke: left pads go between the cache's tokens and the input's
    with torch.no_grad(), lm.trace(backend=backend,
                                   **{CACHE: _cache(model, torch.tensor(past))}) as tracer:
        with tracer.invoke(input_ids=ids, attention_mask=mask):
            padded, lasts = lm.output.logits.save(), lm.output.logits.token[-1].save()
        with tracer.invoke([other]):
            longer = lm.output.logits.save()
    torch.testing.assert_close(longer[0], _alone(model, past[2] + other, 5), atol=ATOL, rtol=0)
    for row, n in enumerate((4, 2)):
        torch.testing.assert_close(padded[row, 2:2 + n], alone[row], atol=ATOL, rtol=0)
        torch.testing.assert_close(lasts[row], alone[row][-1], atol=ATOL, rtol=0)
    # after a left-padded cache (its row 1 of 3 real tokens) made with positions counting
    # real tokens, given those positions (without them: the plain call's, its columns)
    past_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    mask = torch.cat([past_mask, own], 1)
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, backend=backend,
                                   position_ids=_counted(mask, 4),
                                   **{CACHE: _cache(model, torch.tensor(past[:2]), past_mask)}):
        logits, last = lm.output.logits.save(), lm.output.logits.token[-1].save()
    expected = [alone[0], _alone(model, past[1][2:] + short, 3)]
    for row, n in enumerate((4, 2)):
        torch.testing.assert_close(logits[row, :n], expected[row], atol=ATOL, rtol=0)
        torch.testing.assert_close(last[row], expected[row][-1], atol=ATOL, rtol=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask,
                      **{CACHE: _cache(model, torch.tensor(past[:2]), past_mask)}).logits
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, backend=backend,
                                   **{CACHE: _cache(model, torch.tensor(past[:2]), past_mask)}):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_right_padded_labels_give_the_plain_forwards_loss(wrapped, kind, backend):
    """Right-padded ``labels`` give the loss transformers gives on the same batch, with
    -100 at the pads and with the pad id there (was, with the pad id: the pads' positions
    were all 1, not their columns', so the pads' logits and the loss differed: by 0.013 on
    GPT-2, 4e-4 on Llama); and the logits at every column are the plain forward's. An
    invoke of right-padded rows beside a longer one gets left pads labelled -100: the loss
    is that of each prompt's own pairs."""
    lm, model = wrapped[kind]
    rows = _rows(6, 3, 5)
    ids, mask = _right_padded(rows)
    for labels in (ids.masked_fill(mask == 0, -100), ids):
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, labels=labels,
                                       backend=backend):
            loss, logits = lm.output.loss.save(), lm.output.logits.save()
        torch.testing.assert_close(loss, plain.loss, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, plain.logits, atol=ATOL, rtol=0)
    longer = rows[0] + [7, 8]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke(input_ids=ids[1:], attention_mask=mask[1:],
                           labels=ids[1:].masked_fill(mask[1:] == 0, -100)):
            pass
        with tracer.invoke([longer], labels=[longer]):
            pass
    pairs = [(_alone(model, r)[:-1], torch.tensor(r[1:])) for r in (rows[1], rows[2], longer)]
    expected = torch.nn.functional.cross_entropy(torch.cat([p[0] for p in pairs]),
                                                 torch.cat([p[1] for p in pairs]))
    torch.testing.assert_close(tracer.result.loss, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_invokes_with_and_without_a_cache(wrapped, kind, backend):
    """Left-padded inputs (``padding_side='left'``) in two invokes of other widths: each
    row's logits (at its own columns, from the end) and ``.token[0]``/``[-1]`` are its
    prompt alone; continuing a left-padded cache with left-padded new tokens, each row's
    are its whole sequence alone."""
    lm, model = wrapped[kind]
    rows = _rows(7, 2, 5, 3)
    first, second = _left_padded(rows[:2]), _left_padded(rows[2:])
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        saved = []
        for ids, mask in (first, second):
            with tracer.invoke(input_ids=ids, attention_mask=mask):
                logits = lm.output.logits
                saved.append((logits.save(), logits.token[0].save(), logits.token[-1].save()))
    for i, ids in enumerate(rows):
        logits, head, tail = saved[i // 2]
        alone = _alone(model, ids)
        torch.testing.assert_close(logits[i % 2, -len(ids):], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(head[i % 2], alone[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(tail[i % 2], alone[-1], atol=ATOL, rtol=0)
    # (a cache made with positions counting real tokens, continued with them given: the
    # positions of its padded rows are not known to the trace)
    past_ids, past_mask = _left_padded(rows)
    new = _rows(2, 1, 1, 3, seed=3)
    with torch.no_grad(), lm.trace(backend=backend,
                                   **{CACHE: _cache(model, past_ids, past_mask)}) as tracer:
        saved = []
        for part in (slice(0, 2), slice(2, 4)):
            ids, mask = _left_padded(new[part])
            mask = torch.cat([past_mask[part], mask], 1)
            with tracer.invoke(input_ids=ids, attention_mask=mask,
                               position_ids=_counted(mask, ids.shape[1])):
                saved.append((lm.output.logits.save(), lm.output.logits.token[-1].save()))
    for i, (ids, more) in enumerate(zip(rows, new)):
        logits, tail = saved[i // 2]
        alone = _alone(model, ids + more, len(ids))
        torch.testing.assert_close(logits[i % 2, -len(more):], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(tail[i % 2], alone[-1], atol=ATOL, rtol=0)


def _left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _counted(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of a mask's last ``n`` columns counting real tokens, as ``generate``
    counts them (pads at 1)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -n:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_padded_cache_continued_without_positions_is_the_plain_forward(wrapped, kind,
                                                                         backend):
    """A left-padded cache from a plain forward (no ``position_ids``: its tokens at their
    columns) continued with a mask over its tokens and the input's and no ``position_ids``:
    the trace is the plain forward of the same call (was: positions counted from the mask,
    unlike the cache's, GPT-2 0.48 off, Llama 0.0026), in each spelling of the input; on
    Llama (rotary: only distances count) each row is also its prompt alone. With
    ``position_ids`` counted from the mask and a cache made with them, each row is its
    prompt alone."""
    lm, model = wrapped[kind]
    past, new = _rows(5, 3), _rows(2, 2, seed=4)
    past_ids, past_mask = _left_padded(past)
    ids = torch.tensor(new)
    mask = torch.cat([past_mask, torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask,
                      **{CACHE: _cache(model, past_ids, past_mask, False)}).logits
    spellings = [((ids,), {"attention_mask": mask}),
                 (({"input_ids": ids, "attention_mask": mask},), {}),
                 ((), {"input_ids": ids, "attention_mask": mask})]
    for args, kwargs in spellings:
        kwargs = {**kwargs, CACHE: _cache(model, past_ids, past_mask, False)}
        with torch.no_grad(), lm.trace(*args, backend=backend, **kwargs):
            logits, last = lm.output.logits.save(), lm.output.logits.token[-1].save()
        torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)
        torch.testing.assert_close(last, plain[:, -1], atol=ATOL, rtol=0)
    if kind == "llama":
        for row, (p, r) in enumerate(zip(past, new)):
            torch.testing.assert_close(plain[row], _alone(model, p + r, len(p)), atol=ATOL,
                                       rtol=0)
    with torch.no_grad(), lm.trace(ids, attention_mask=mask, position_ids=_counted(mask, 2),
                                   backend=backend,
                                   **{CACHE: _cache(model, past_ids, past_mask)}):
        logits = lm.output.logits.save()
    for row, (p, r) in enumerate(zip(past, new)):
        torch.testing.assert_close(logits[row], _alone(model, p + r, len(p)), atol=ATOL,
                                   rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_padded_cache_without_positions_is_not_padded_again(wrapped, backend):
    """Invokes of other lengths continuing a cache whose rows are padded, without
    ``position_ids``: the shorter one's tokens would be placed after left pads the plain
    call does not have (positions by column moved, as the trace cannot know the cache's
    positions): a ``TraceError`` before the model runs, naming the line; given
    ``position_ids``, each row is its prompt alone."""
    lm, model = wrapped["gpt2"]
    past_ids, past_mask = _left_padded(_rows(3, 5))  # (row 0 padded)
    cache = _cache(model, past_ids, past_mask, False)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(TraceError) as info, torch.no_grad():
            with lm.trace(backend=backend, **{CACHE: cache}) as tracer:
                with tracer.invoke(input_ids=torch.tensor([[5, 6]]),  # the line
                                   attention_mask=torch.cat([past_mask[:1],
                                                             torch.ones(1, 2, dtype=int)], 1)):
                    pass
                with tracer.invoke(input_ids=torch.tensor([[7]]),
                                   attention_mask=torch.cat([past_mask[1:],
                                                             torch.ones(1, 1, dtype=int)], 1)):
                    pass
    finally:
        handle.remove()
    assert not calls
    message = str(info.value)
    assert "invoke #0 continues a cache whose rows are padded" in message
    assert "invoke #1 is shorter" in message and "# the line" in message


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=32, pad_token_id=1, dropout=0.0)
    return OPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def opt():
    module = _tiny_opt()
    return LanguageModel(module), module


@pytest.mark.parametrize("backend", BACKENDS)
def test_opt_padded_rows_are_their_prompts_alone_and_pads_the_plain_forwards(opt, backend):
    """OPT places tokens by the mask's count (offset 2; pads at -1): prompts of different
    lengths (invokes, a list) are each prompt alone; a padded batch given (left and right)
    has each row's real tokens its prompt alone and every column, pads included, and a
    loss over labels the plain forward's on the same batch (was: pads at 1, or counting
    on after a right-padded row: pad logits 0.53 / 0.60 off, a left-padded loss 0.011);
    a left-padded cache continued without position_ids is the plain call, and alone. An
    input longer than its positions (the embedding holds 2 more rows, its offset) is a
    ``TraceError`` before running (was an IndexError in the run)."""
    lm, model = opt
    with pytest.raises(TraceError, match="65 tokens long, longer than the model's 64"):
        with lm.trace(torch.randint(4, 100, (1, 65)), backend=backend):
            pass
    rows = _rows(6, 3)
    alone = [_alone(model, r) for r in rows]
    with torch.no_grad(), lm.trace(backend=backend) as tracer:
        with tracer.invoke([rows[0]]):
            first = lm.output.logits.save()
        with tracer.invoke([rows[1]]):
            second, last = lm.output.logits.save(), lm.output.logits.token[-1].save()
    torch.testing.assert_close(first[0], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0, -3:], alone[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(last[0], alone[1][-1], atol=ATOL, rtol=0)
    for layout in (_left_padded, _right_padded):
        ids, mask = layout(rows, pad=1)
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, labels=labels,
                                       backend=backend):
            logits, loss = lm.output.logits.save(), lm.output.loss.save()
        torch.testing.assert_close(logits, plain.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(loss, plain.loss, atol=ATOL, rtol=0)
        real = slice(3, None) if layout is _left_padded else slice(0, 3)
        torch.testing.assert_close(logits[1, real], alone[1], atol=ATOL, rtol=0)
    past_ids, past_mask = _left_padded(rows, pad=1)
    new = torch.tensor(_rows(2, 2, seed=5))
    mask = torch.cat([past_mask, torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        plain = model(new, attention_mask=mask,
                      **{CACHE: _cache(model, past_ids, past_mask, False)}).logits
    with torch.no_grad(), lm.trace(new, attention_mask=mask, backend=backend,
                                   **{CACHE: _cache(model, past_ids, past_mask, False)}):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)
    for row, past in enumerate(rows):
        torch.testing.assert_close(logits[row], _alone(model, past + new[row].tolist(),
                                                       len(past)), atol=ATOL, rtol=0)
    # invokes of other lengths on that cache: left pads between its tokens and the shorter
    # invoke's, which OPT's count of the mask skips (no refusal, unlike a model counting
    # columns): each row its whole sequence alone
    with torch.no_grad(), lm.trace(backend=backend, **{
            CACHE: _cache(model, past_ids, past_mask, False)}) as tracer:
        saved = []
        for row, more in enumerate(([7, 8, 9], [10])):
            with tracer.invoke(input_ids=torch.tensor([more]), attention_mask=torch.cat(
                    [past_mask[row:row + 1], torch.ones(1, len(more), dtype=int)], 1)):
                saved.append(lm.output.logits.token[:].save())
    for row, (past, more) in enumerate(zip(rows, ([7, 8, 9], [10]))):
        torch.testing.assert_close(saved[row][0], _alone(model, past + more, len(past)),
                                   atol=ATOL, rtol=0)


def _padded_cache(lm, past: list[list[int]], how: str, backend: str):
    """The cache of fxsight's run of the left-padded prompts ``past`` (positions counted
    from the mask), as it comes back ``how``: saved, in the saved output, in the trace's
    result (nothing saved), from a run without a trace, from invokes of other lengths."""
    ids, mask = _left_padded(past)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": True, "backend": backend}
    with torch.no_grad():
        if how == "trace=False":
            return getattr(lm.trace(**inputs, trace=False), CACHE)
        if how == "invokes":
            with lm.trace(use_cache=True, backend=backend) as tracer:
                for row in past:
                    with tracer.invoke([row]):
                        pass
                out = lm.output.save()
            return getattr(out, CACHE)
        with lm.trace(**inputs) as tracer:
            if how == "saved cache":
                cache = getattr(lm.output, CACHE).save()
            elif how == "saved output":
                out = lm.output.save()
        return cache if how == "saved cache" else \
            getattr(out if how == "saved output" else tracer.result, CACHE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cache_of_a_padded_trace_goes_on_without_positions(wrapped, kind, backend):
    """The cache of a trace of left-padded prompts (fxsight passed positions counting each
    row's real tokens), continued with a mask over its tokens and no ``position_ids``:
    each row is its prompt and the new tokens run alone, however the cache came back
    (saved, in the output, the result, ``trace=False``, invokes of other lengths), and
    again continuing the cache it filled (was: columns' positions, as for a plain
    forward's cache: GPT-2 0.445 off, Llama 0.0026). A plain forward's cache of the same
    prompts, continued alike, is still the plain call."""
    lm, model = wrapped[kind]
    past, (first, second) = _rows(5, 3), _rows(1, 1, seed=5)
    _, past_mask = _left_padded(past)
    for how in ("saved cache", "saved output", "result", "trace=False", "invokes"):
        cache = _padded_cache(lm, past, how, backend)
        mask = torch.cat([past_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with torch.no_grad(), lm.trace({"input_ids": torch.tensor([first, first]),
                                        "attention_mask": mask},
                                       backend=backend, **{CACHE: cache}):
            logits = lm.output.logits.save()
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with torch.no_grad(), lm.trace(torch.tensor([second, second]), attention_mask=mask,
                                       backend=backend, **{CACHE: cache}):
            more = lm.output.logits.save()
        for row, p in enumerate(past):
            alone = _alone(model, p + first + second, len(p))
            torch.testing.assert_close(logits[row, 0], alone[0], atol=ATOL, rtol=0, msg=how)
            torch.testing.assert_close(more[row, 0], alone[1], atol=ATOL, rtol=0, msg=how)
    ids = torch.tensor([first, first])
    mask = torch.cat([past_mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask,
                      **{CACHE: _cache(model, *_left_padded(past), False)}).logits
    with torch.no_grad(), lm.trace(ids, attention_mask=mask, backend=backend,
                                   **{CACHE: _cache(model, *_left_padded(past), False)}):
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cache_of_generate_goes_on_without_positions(wrapped, kind, backend):
    """``lm.generate`` of prompts of different lengths (transformers' ``generate`` counts
    positions from the mask): the cache passed to it and filled, or the one in its output
    (``return_dict_in_generate``), continued with the token it chose and no
    ``position_ids``, is each prompt and that token run alone (was: GPT-2 0.39 off, Llama
    0.0038)."""
    from transformers import DynamicCache

    lm, model = wrapped[kind]
    past = _rows(5, 3, seed=6)
    for way in ("passed", "output"):
        given = DynamicCache(config=model.config) if way == "passed" else None
        extra = {CACHE: given} if way == "passed" else {"return_dict_in_generate": True}
        with torch.no_grad(), lm.generate(past, max_new_tokens=1, do_sample=False,
                                          backend=backend, **extra) as tracer:
            chosen = lm.generator.output.save()
        cache = given if way == "passed" else getattr(tracer.result, CACHE)
        chosen = chosen if way == "passed" else chosen.sequences
        width = cache.get_seq_length()
        mask = torch.cat([_left_padded(past)[1], torch.ones(2, 1, dtype=torch.long)], 1)
        assert mask.shape[1] == width + 1
        with torch.no_grad(), lm.trace(chosen[:, -1:], attention_mask=mask, backend=backend,
                                       **{CACHE: cache}):
            logits = lm.output.logits.save()
        for row, p in enumerate(past):
            alone = _alone(model, p + [int(chosen[row, -1])], len(p))
            torch.testing.assert_close(logits[row], alone, atol=ATOL, rtol=0, msg=way)


@pytest.mark.parametrize("backend", BACKENDS)
def test_remembered_caches_are_not_kept_alive(wrapped, backend):
    """fxsight remembers the caches of its runs that counted real tokens weakly: once the
    caller lets go of one (and of the trace), it is freed, and so is its entry."""
    from fxsight.api import counted_caches

    lm, _ = wrapped["gpt2"]
    cache = _padded_cache(lm, _rows(5, 3), "saved cache", backend)
    assert counted_caches.counted(cache)
    entry, ref = counted_caches._COUNTED[id(cache)], weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None and entry() is None
    assert all(value is not entry for value in counted_caches._COUNTED.values())


def test_a_padded_cache_that_cannot_be_weakly_referenced_is_refused(wrapped):
    """A cache whose padded rows are continued without ``position_ids``, that fxsight
    cannot remember (not weakly referenceable): whether its tokens were placed by columns
    or counting real tokens is not known, so a ``TraceError`` before the model runs, naming
    the line and the ``position_ids`` to pass."""
    class Unreferenced:  # (a cache by its get_seq_length, with no __weakref__ slot)
        __slots__ = ("length",)

        def __init__(self, length: int):
            self.length = length

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.length

    lm, model = wrapped["gpt2"]
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        ids, mask = torch.tensor([[5], [6]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
        for trace in (True, False):
            with pytest.raises(TraceError) as info, torch.no_grad():
                if trace:
                    with lm.trace(ids, attention_mask=mask, **{CACHE: Unreferenced(2)}):  # here
                        lm.output.save()
                else:
                    lm.trace(ids, attention_mask=mask, trace=False, **{  # here
                        CACHE: Unreferenced(2)})
            message = str(info.value)
            assert "cannot be weakly referenced" in message and "position_ids=" in message
            assert "# here" in message
    finally:
        handle.remove()
    assert not calls
