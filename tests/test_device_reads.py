"""Reads of device values into Python per trace (on a GPU each waits for its queue to
drain): the checks of a trace's invokes read their token ids, and the masks they give,
once for the trace, not once per invoke, and still refuse an id outside the vocabulary
(or a mask that is no padding mask) before anything runs, naming the invoke and its line;
a caller's position ids are not read; generate's steps read no mask whose answer is
known. Values are the plain forward's."""

from __future__ import annotations

import pytest
import torch
from device_reads import CountReads
from models import tiny_gpt2

from fxsight import LanguageModel, TraceError


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_the_token_ids_of_several_invokes_are_read_once_per_trace(backend):
    """Each invoke of token ids read their range from the device as it was added (three
    invokes: three waits); the reads are now made together before the run: one for the
    trace, and on the fx backend the only read fxsight makes."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    rows = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11, 12]]),
            torch.tensor([[13, 14, 15, 16]])]
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend=backend) as tracer:
                saved = []
                for ids in rows:
                    with tracer.invoke(ids):
                        saved.append(lm.output.logits.save())
    # (outside the rewritten graph; the hooks backend's model reads its own mask)
    outside = [names for names in counted.reads if not any(
        n.startswith("<fxsight") or n == "run/executable.py:__call__" for n in names)]
    assert len(outside) == 1, counted.reads
    assert "api/token_rows.py:id_ranges" in outside[0]
    if backend == "fx":
        assert counted.reads == outside
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(saved), model(torch.cat(rows)).logits)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_an_id_outside_the_vocabulary_is_refused_before_the_run(backend):
    """Read with the other invokes' before the run, an id outside the vocabulary is still
    refused before anything runs, naming the first invoke (in order) that has one and its
    line; the ids of a trace's own input too."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    size = model.config.vocab_size
    try:
        with pytest.raises(TraceError, match=rf"(?s)invoke #1: token id {size} is outside "
                                             rf"the model's vocabulary of {size}.*"
                                             rf"tracer\.invoke\(late\)"):
            late = torch.tensor([[5, size]])
            with lm.trace(backend=backend) as tracer:
                with tracer.invoke(torch.tensor([[5, 6]])):
                    lm.output.save()
                with tracer.invoke(late):
                    lm.output.save()
                with tracer.invoke(torch.tensor([[-1, 6]])):
                    lm.output.save()
        with pytest.raises(TraceError, match=r"(?s)invoke #0: token id -1 is outside.*"
                                             r"lm\.trace\(torch\.tensor\(\[\[-1"):
            with lm.trace(torch.tensor([[-1, 6]]), backend=backend):
                lm.output.save()
        with pytest.raises(TraceError, match=r"the input: token id -1 is outside"):
            lm.trace(torch.tensor([[-1, 6]]), trace=False)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_batch_of_prompts_of_different_lengths_reads_nothing(backend):
    """Prompts given as lists of ids (as a tokenizer gives them) are checked and padded on
    the host; the batch still compared each invoke's position ids, which fxsight had made
    from its mask, with those made again (``torch.equal``), and read the batch's mask to
    find it padded (``mask.all()``): two waits per trace on a GPU. fxsight now reads
    nothing, and each row is its prompt's alone (the plain forward's)."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend=backend) as tracer:
                with tracer.invoke([5, 6, 7, 8]):
                    long = lm.output.logits.save()
                with tracer.invoke([[9, 10], [11, 12, 13]]):
                    short = lm.output.logits.save()
    assert counted.reads == []
    with torch.no_grad():
        torch.testing.assert_close(long, model(torch.tensor([[5, 6, 7, 8]])).logits)
        torch.testing.assert_close(short[:1, 2:], model(torch.tensor([[9, 10]])).logits)
        torch.testing.assert_close(short[1:, 1:], model(torch.tensor([[11, 12, 13]])).logits)


def _exact_shape_steps(monkeypatch) -> None:
    """Decoding steps captured for their exact shapes, as where a model's dynamic-shape
    capture fails: each step is then a graph whose attention mask check runs."""
    from fxsight.generate import decoding

    captured = decoding.cached_capture

    def exact(*args, **kwargs):
        return captured(*args, **{**kwargs, "dynamic": "never"})

    monkeypatch.setattr(decoding, "cached_capture", exact)


@pytest.mark.parametrize("exact", [False, True])
def test_generate_reads_no_mask_at_its_steps(exact, monkeypatch):
    """Each step's graph checked whether the mask is all ones by reading it (on a GPU, a
    wait per step: the first step's, and every step's where the steps are exact-shape
    graphs), though the answer is known: a mask of ones fxsight made itself (transformers
    passes none where no row is padded), or the prompts' mask known padded, which every
    step's mask extends. Now nothing is read; each row generates what its prompt
    generates alone, and the fx backend's per-step logits are the hooks backend's."""
    if exact:
        _exact_shape_steps(monkeypatch)
    model = tiny_gpt2()
    lm = LanguageModel(model)
    for prompts in ([[5, 6, 7], [8, 9]], [[5, 6, 7], [8, 9, 10]]):
        results = {}
        for backend in ("fx", "hooks"):
            for _ in range(2):  # (the second: captured, as in a loop)
                with torch.no_grad(), CountReads() as counted:
                    with lm.generate(prompts, max_new_tokens=4, do_sample=False,
                                     backend=backend) as tracer:
                        with tracer.all():
                            logits = lm.lm_head.output.save()
                        ids = lm.generator.output.save()
            assert tracer.backend == backend
            if backend == "fx":
                assert counted.reads == [], counted.reads
            results[backend] = ids, logits
        (ids, logits), (hooks_ids, hooks_logits) = results["fx"], results["hooks"]
        assert torch.equal(ids, hooks_ids)
        assert len(logits) == len(hooks_logits) == 4
        for fx_step, hooks_step in zip(logits, hooks_logits):
            torch.testing.assert_close(fx_step, hooks_step, rtol=1e-5, atol=1e-6)
        width = max(map(len, prompts))
        for row, prompt in enumerate(prompts):
            with torch.no_grad():
                alone = model.generate(torch.tensor([prompt]), max_new_tokens=4,
                                       do_sample=False)
            assert torch.equal(ids[row, width - len(prompt):], alone[0]), (prompts, row)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_callers_position_ids_are_not_compared_with_the_masks(backend):
    """An invoke's own ``position_ids`` were compared with those its mask counts
    (``torch.equal``, one read per invoke) only to drop them where they are the same:
    the model then counted the same positions itself. They now go to the model as given,
    unread; each row is the plain forward's with its positions, a shorter invoke's left
    pads before them."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    counted_from_zero = torch.arange(4).expand(2, 4)
    shifted = torch.arange(3, 7).expand(2, 4)
    short = torch.tensor([[13, 14]])
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend=backend) as tracer:
                with tracer.invoke({"input_ids": ids, "position_ids": counted_from_zero}):
                    first = lm.output.logits.save()
                with tracer.invoke({"input_ids": ids, "position_ids": shifted}):
                    second = lm.output.logits.save()
                with tracer.invoke(short, position_ids=torch.tensor([[0, 1]])):
                    third = lm.output.logits.save()
    outside = [names for names in counted.reads if not any(
        n.startswith("<fxsight") or n == "run/executable.py:__call__" for n in names)]
    assert len(outside) == 1 and "api/token_rows.py:id_ranges" in outside[0], counted.reads
    with torch.no_grad():
        torch.testing.assert_close(first, model(ids).logits)
        torch.testing.assert_close(second, model(ids, position_ids=shifted).logits)
        torch.testing.assert_close(third[:, 2:], model(short).logits)


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_the_masks_of_several_invokes_are_read_once_per_trace(backend):
    """Each invoke of a dict with an attention mask read the mask's facts (0s and 1s, no
    empty row, padded or not) with its ids' range as it was added: one wait per invoke.
    They are now read with the other invokes' before the run: one read for the trace,
    and on the fx backend the only read fxsight makes. Each row is its prompt's alone,
    left- or right-padded as given."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    inputs = [torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.ones(2, 4, dtype=torch.long),
              torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])]
    for _ in range(2):  # (the second: captured, as in a loop)
        with torch.no_grad(), CountReads() as counted:
            with lm.trace(backend=backend) as tracer:
                saved = []
                for mask in inputs:
                    with tracer.invoke({"input_ids": ids, "attention_mask": mask}):
                        saved.append(lm.output.logits.save())
    outside = [names for names in counted.reads if not any(
        n.startswith("<fxsight") or n == "run/executable.py:__call__" for n in names)]
    assert len(outside) == 1 and "api/token_rows.py:id_ranges" in outside[0], counted.reads
    if backend == "fx":
        assert counted.reads == outside
    with torch.no_grad():
        torch.testing.assert_close(saved[0][0, 1:], model(ids[:1, 1:]).logits[0])
        torch.testing.assert_close(saved[1], model(ids).logits)
        torch.testing.assert_close(saved[2][0, :3], model(ids[:1, :3]).logits[0])
        for padded in (0, 2):
            torch.testing.assert_close(saved[padded][1], model(ids[1:]).logits[0])


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_a_mask_read_before_the_run_is_still_refused_before_it(backend):
    """A mask that is no padding mask (a 2, a row of zeros), read with the other invokes'
    before the run, is still refused before anything runs, naming its invoke and line."""
    model = tiny_gpt2()
    lm = LanguageModel(model)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[5, 6], [7, 8]])
    try:
        for mask, error in ((torch.tensor([[1, 2], [1, 1]]), "attention_mask must hold 0s"),
                            (torch.tensor([[1, 1], [0, 0]]), "prompt 1 has no tokens")):
            with pytest.raises(TraceError, match=rf"(?s)invoke #1: {error}.*"
                                                 r"tracer\.invoke\(\{.input_ids"):
                with lm.trace(backend=backend) as tracer:
                    with tracer.invoke(ids):
                        lm.output.save()
                    with tracer.invoke({"input_ids": ids, "attention_mask": mask}):
                        lm.output.save()
    finally:
        handle.remove()
    assert calls == []
