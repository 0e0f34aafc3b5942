"""Sweeps over datasets of pairs, and checkpoints (fxsight.experiments.jobs).

The reference of a dataset sweep is the one-pair sweeps: each pair's scores equal the
one-pair sweep of that pair, and the result's values are their mean (with the standard
error of the mean). Pairs of different lengths are grouped by length; positions count from
the end. A checkpointed sweep interrupted after some batches resumes without redoing them
and gives the uninterrupted result.
"""

from __future__ import annotations

import pytest
import torch

from fxsight import NNsight, patching
from models import tiny_gpt2

ATOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def model():
    return NNsight(tiny_gpt2(n_layer=2))


def _pair(seed: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(4, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    corrupted = clean.clone()
    corrupted[0, 1] = (clean[0, 1] + 7) % 128
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


def other_metric(logits):
    return logits[:, -1, 9] - logits[:, -2, 3]  # reads two positions: all logits kept


def test_activation_patching_dataset_equals_one_pair_sweeps(model):
    pairs = [_pair(seed) for seed in range(3)]
    metrics = [metric, other_metric, metric]
    result = patching.activation_patching(
        model, [c for c, _ in pairs], [k for _, k in pairs], metrics, sites=["resid", "attn"],
        batch_size=12, progress=False)
    singles = [patching.activation_patching(model, c, k, m, sites=["resid", "attn"],
                                            progress=False)
               for (c, k), m in zip(pairs, metrics)]
    assert result.n_pairs == 3 and result.per_pair.shape == (3, 2, 2, 6)
    for i, single in enumerate(singles):
        torch.testing.assert_close(result.per_pair[i], single.values, **ATOL)
        torch.testing.assert_close(result.pair(i).values, single.values, **ATOL)
        assert result.baselines[i].item() == pytest.approx(single.baseline, abs=1e-5)
        assert result.references[i].item() == pytest.approx(single.reference, abs=1e-5)
    stack = torch.stack([s.values for s in singles])
    torch.testing.assert_close(result.values, stack.mean(0), **ATOL)
    torch.testing.assert_close(result.stderr, stack.std(0) / 3 ** 0.5, **ATOL)
    assert result.counts.eq(3).all()
    assert result.baseline == pytest.approx(sum(s.baseline for s in singles) / 3, abs=1e-5)
    # rows of several pairs share batches: fewer forwards than the one-pair sweeps
    assert result.info["batches"] < sum(s.info["traces"] - 2 for s in singles)
    # selection keeps the pairs' scores along
    part = result.sel(site="attn", layer=[1])
    assert part.per_pair.shape == (3, 1, 6)
    torch.testing.assert_close(part.per_pair[:, 0], stack[:, 1, 1], **ATOL)
    normalized = result.normalized()
    torch.testing.assert_close(normalized.per_pair.mean(0), normalized.values, **ATOL)


def test_dataset_of_dicts_of_different_lengths(model):
    rows = [dict(zip(("clean", "corrupted"), _pair(seed, length)))
            for seed, length in [(0, 6), (1, 4), (2, 6)]]
    rows[1]["metric"] = other_metric
    result = patching.activation_patching(model, rows, metric=metric, sites=["mlp"],
                                          progress=False)
    assert result.positions == list(range(-6, 0))
    assert result.info["lengths"] == {4: 1, 6: 2}
    assert "grouped by length" in result.info["different_lengths"]
    short = patching.activation_patching(model, rows[1]["clean"], rows[1]["corrupted"],
                                         other_metric, sites=["mlp"], progress=False)
    torch.testing.assert_close(result.per_pair[1, ..., 2:], short.values, **ATOL)
    assert result.per_pair[1, ..., :2].isnan().all()
    assert result.counts[..., :2].eq(2).all() and result.counts[..., 2:].eq(3).all()
    longs = [patching.activation_patching(model, r["clean"], r["corrupted"], metric,
                                          sites=["mlp"], progress=False).values
             for r in (rows[0], rows[2])]
    torch.testing.assert_close(result.values[..., :2], (longs[0] + longs[1])[..., :2] / 2,
                               **ATOL)
    torch.testing.assert_close(result.values[..., 2:],
                               ((longs[0] + longs[1])[..., 2:] + short.values) / 3, **ATOL)


def test_head_patching_and_steering_datasets(model):
    pairs = [_pair(seed, 5) for seed in range(2)]
    heads = patching.head_patching(model, [c for c, _ in pairs], [k for _, k in pairs],
                                   metric, layers=[1], batch_size=16, progress=False)
    for i, (c, k) in enumerate(pairs):
        single = patching.head_patching(model, c, k, metric, layers=[1], progress=False)
        torch.testing.assert_close(heads.per_pair[i], single.values, **ATOL)
    prompts = [pairs[0][0], pairs[1][0][:, :3]]
    vectors = {"a": torch.randn(64, generator=torch.Generator().manual_seed(3))}
    steered = patching.steering_sweep(model, prompts, vectors, scales=[0.0, 2.0],
                                      progress=False)  # default metric: per prompt
    for i, prompt in enumerate(prompts):
        single = patching.steering_sweep(model, prompt, vectors, scales=[0.0, 2.0],
                                         progress=False)
        torch.testing.assert_close(steered.per_pair[i], single.values, **ATOL)
    assert steered.references is None and steered.n_pairs == 2
    # a position the shorter prompt lacks: its scores are NaN and out of the mean, as when
    # patching (was: left unsteered, scored 0 and averaged in)
    at_4 = patching.steering_sweep(model, prompts, vectors, scales=[2.0], positions=[4],
                                   progress=False)
    alone = patching.steering_sweep(model, prompts[0], vectors, scales=[2.0], positions=[4],
                                    progress=False)
    assert at_4.per_pair[1].isnan().all()
    torch.testing.assert_close(at_4.per_pair[0], alone.values, **ATOL)
    torch.testing.assert_close(at_4.values, alone.values, **ATOL)


def test_bad_datasets_are_named(model):
    clean, corrupted = _pair(0)
    with pytest.raises(ValueError, match="both be one prompt or both"):
        patching.activation_patching(model, [clean], corrupted, metric, progress=False)
    with pytest.raises(ValueError, match="2 clean prompts but 1"):
        patching.activation_patching(model, [clean, clean], [corrupted], metric,
                                     progress=False)
    with pytest.raises(ValueError, match="pair 1 must have the same number"):
        patching.activation_patching(model, [clean, clean], [corrupted, corrupted[:, :3]],
                                     metric, progress=False)
    with pytest.raises(ValueError, match="item 0 .* 'clean' and 'corrupted'"):
        patching.activation_patching(model, [{"clean": clean}], metric=metric, progress=False)
    with pytest.raises(ValueError, match="one callable per pair"):
        patching.activation_patching(model, [clean], [corrupted], [metric, metric],
                                     progress=False)


def test_checkpoint_resumes_without_redoing_batches(model, tmp_path):
    pairs = [_pair(seed) for seed in range(2)]
    cleans, corrupts = [c for c, _ in pairs], [k for _, k in pairs]
    arguments = dict(sites=["resid", "mlp"], batch_size=4, progress=False)
    full = patching.activation_patching(model, cleans, corrupts, metric, **arguments)
    calls = {"n": 0}

    def failing(logits):  # 6 calls for a pair's reference runs, then one call a batch
        calls["n"] += 1
        if calls["n"] > 6 + 3:  # the first pair's reference runs, 3 batches, then it fails
            raise RuntimeError("interrupted")
        return metric(logits)

    path = tmp_path / "sweep.ckpt"
    with pytest.raises(RuntimeError, match="interrupted"):
        patching.activation_patching(model, cleans, corrupts, failing, checkpoint=path,
                                     **arguments)
    assert path.exists()
    calls["n"] = -10 ** 9
    resumed = patching.activation_patching(model, cleans, corrupts, failing, checkpoint=path,
                                           **arguments)
    total = resumed.info["batches"]
    assert resumed.info["resumed_batches"] >= 2 and total == full.info["batches"]
    batch_calls = calls["n"] + 10 ** 9 - 2 * 6  # minus the reference runs' calls
    assert resumed.info["resumed_batches"] == 3
    assert batch_calls == total - 3  # the 3 finished batches are not run again
    torch.testing.assert_close(resumed.per_pair, full.per_pair, **ATOL)
    torch.testing.assert_close(resumed.values, full.values, **ATOL)
    # another sweep refuses this checkpoint by name
    with pytest.raises(ValueError, match="written by another sweep"):
        patching.activation_patching(model, cleans, corrupts, metric, checkpoint=path,
                                     sites=["resid"], batch_size=4, progress=False)



def test_a_checkpoint_of_another_metric_is_refused(model, tmp_path):
    # the fingerprint holds prompts, cells and batch size, not the metric: resuming with a
    # corrected metric read the old metric's scores and subtracted the new baseline
    clean, corrupted = _pair(0)
    path = tmp_path / "sweep.ckpt"
    arguments = dict(sites=["resid"], progress=False, checkpoint=path)
    patching.activation_patching(model, clean, corrupted, metric, **arguments)

    def corrected(logits):
        return logits[:, -1, 7] - logits[:, -1, 6]
    with pytest.raises(ValueError, match="another metric or model"):
        patching.activation_patching(model, clean, corrupted, corrected, **arguments)
    again = patching.activation_patching(model, clean, corrupted, metric, **arguments)
    assert again.info["resumed_batches"] == again.info["batches"]
    path.unlink()  # without the checkpoint: the corrected metric's one-cell scores
    fresh = patching.activation_patching(model, clean, corrupted, corrected, **arguments)
    net = model._module
    block = net.transformer.h[1]
    saved = {}
    handle = block.register_forward_hook(lambda m, a, o: saved.__setitem__("h", o))
    with torch.no_grad():
        net(clean)
        handle.remove()

        def patch(module, args, output):
            output = output.clone()
            output[:, 3] = saved["h"][:, 3]
            return output
        base = corrected(net(corrupted).logits)[0]
        handle = block.register_forward_hook(patch)
        expected = corrected(net(corrupted).logits)[0] - base
        handle.remove()
    torch.testing.assert_close(fresh.sel(site="resid", layer=1, position=3).values,
                               expected, **ATOL)

def test_attribution_dataset_is_the_mean_of_one_pair_attributions(model):
    pairs = [_pair(seed) for seed in range(2)]
    result = patching.attribution(model, [c for c, _ in pairs], [k for _, k in pairs],
                                  lambda logits: logits[:, -1, 5] - logits[:, -1, 6],
                                  sites=["resid"])
    singles = [patching.attribution(model, c, k,
                                    lambda logits: logits[:, -1, 5] - logits[:, -1, 6],
                                    sites=["resid"]) for c, k in pairs]
    for i, single in enumerate(singles):
        torch.testing.assert_close(result.per_pair[i], single.values)
    torch.testing.assert_close(result.values, (singles[0].values + singles[1].values) / 2)
    assert result.n_pairs == 2 and result.stderr.shape == result.values.shape
