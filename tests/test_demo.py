"""The demo (``python -m fxsight.experiments.demo``) and its built-in model (``fxsight/data``).

The shipped model was trained on key-value recall (``a3 f8 c1 h6 e2 b5 c -> 1``): the
answer lives in the queried pair's token and must reach the last position. The demo's sweep
on it must find exactly that: the top cells are the pair's position in the embeddings and
the last position after the move, moved by attention.
"""

from __future__ import annotations

import os

import pytest
import torch

from fxsight.experiments import demo


@pytest.fixture(scope="module")
def lm():
    return demo.load()


def test_the_demo_model_is_shipped_and_small():
    files = os.listdir(demo.DATA)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    size = sum(os.path.getsize(os.path.join(demo.DATA, f)) for f in files)
    assert size < 2_000_000


def test_the_demo_model_solves_its_task(lm):
    ids, answers = demo.sample(256, torch.Generator().manual_seed(123))
    assert demo.evaluate(lm._module, ids, answers) > 0.99
    task = demo.prompts()
    assert demo._answer(lm, task["clean"]) == task["clean_answer"]
    assert demo._answer(lm, task["corrupted"]) == task["corrupted_answer"]


def test_the_sweep_finds_the_planted_structure(lm):
    task = demo.prompts()
    result = demo.sweep(lm)
    pair, last = task["pair_position"], task["last_position"]
    assert result.sites == demo.SITES
    restored = result.normalized()
    # the single most important cell is one of the two places the answer lives ...
    top = result.top()
    assert top.position in (pair, last)
    assert top.value == pytest.approx(result.reference - result.baseline, rel=1e-3)
    # ... entering the model it is the queried pair's token, ...
    cell = restored.top(site="resid_pre", layer=0)
    assert (cell.position, cell.value) == (pair, pytest.approx(1.0, abs=1e-3))
    # ... leaving the last layer it is at the last position, ...
    cell = restored.top(site="resid", layer=result.layers[-1])
    assert (cell.position, cell.value) == (last, pytest.approx(1.0, abs=1e-3))
    # ... and an attention layer moves it there: patching its output at the last position
    # restores the clean answer, at no other position does anything matter
    mover = restored.top(site="attn")
    assert mover.position == last and mover.value > 0.9
    others = [p for p in result.positions if p not in (pair, last)]
    assert restored.sel(position=others).values.abs().max() < 0.05


def test_the_sweep_equals_the_one_cell_loop(lm):
    result = demo.sweep(lm)
    values, _ = demo.loop(lm, result)
    torch.testing.assert_close(values, result.values, rtol=1e-4, atol=1e-4)


def test_sampled_prompts_answer_the_queried_key():
    ids, answers = demo.sample(64, torch.Generator().manual_seed(0))
    words = demo.vocabulary()
    for row, answer in zip(ids.tolist(), answers.tolist()):
        pairs, query = [words[i] for i in row[:-1]], words[row[-1]]
        assert len({p[0] for p in pairs}) == demo.PAIRS  # distinct keys
        assert [p[1] for p in pairs if p[0] == query] == [words[answer]]


def test_main_prints_the_flow_and_saves_the_heatmap(tmp_path, capsys):
    out = tmp_path / "patching.png"
    demo.main(["--out", str(out), "--no-loop"])
    printed = capsys.readouterr().out
    assert "where the information flows" in printed
    assert "entering layer 0 (embeddings): position 2 ('c1')" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
