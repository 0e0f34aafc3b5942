"""Property test: ``patching.activation_patching`` with random options (site kinds, layers,
positions counted from either end (one past the prompt, or two that are one token: a
ValueError), batch sizes that do not divide
the cells, the suffix path or not, the hooks backend, a metric of the last position or of
every position) against a hand-written loop of forward hooks, one cell at a time, in float64
(``patching_loops.py``): equal up to float64 rounding.

``FXSIGHT_PROPERTY_EXAMPLES=n`` runs ``n`` examples per test (a bug hunt).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxsight import NNsight, patching
from models import tiny_gpt2, tiny_llama
from patching_loops import metric, metric_all_positions, pair, patching_loop

MODELS = {"gpt2": tiny_gpt2(n_layer=2).double(),
          "llama": tiny_llama(num_hidden_layers=2).double()}
NETS = {kind: NNsight(model) for kind, model in MODELS.items()}
KINDS = ["resid", "attn", "mlp", "resid_pre"]
METRICS = {"last": metric, "every": metric_all_positions}


def _examples(n: int) -> settings:
    n = int(os.environ.get("FXSIGHT_PROPERTY_EXAMPLES", n))
    hunting = "FXSIGHT_PROPERTY_EXAMPLES" in os.environ
    return settings(max_examples=n, deadline=None, derandomize=not hunting, database=None,
                    suppress_health_check=list(HealthCheck))


@_examples(6)
@given(kind=st.sampled_from(sorted(MODELS)), length=st.integers(3, 6),
       changed=st.integers(0, 5), seed=st.integers(0, 50),
       kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True),
       layers=st.none() | st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
       positions=st.just("all") | st.lists(st.integers(-7, 6), min_size=1, max_size=4,
                                           unique=True),
       batch_size=st.sampled_from([None, 1, 2, 3, 5]), suffix=st.sampled_from([None, False]),
       backend=st.sampled_from([None, "hooks"]), which=st.sampled_from(sorted(METRICS)))
def test_random_activation_patching_equals_a_hooks_loop(kind, length, changed, seed, kinds,
                                                         layers, positions, batch_size,
                                                         suffix, backend, which):
    model, net = MODELS[kind], NETS[kind]
    clean, corrupted = pair(length, seed=seed, position=changed % length)
    chosen = [0, 1] if layers is None else layers
    where = list(range(length)) if positions == "all" else positions
    options = {} if layers is None else {"layers": layers}
    if any(not -length <= p < length for p in where):
        with pytest.raises(ValueError, match="out of range"):
            patching.activation_patching(net, clean, corrupted, METRICS[which], sites=kinds,
                                         positions=positions, progress=False, **options)
        return
    if len({p % length for p in where}) < len(where):  # (1 and -4 of 5 tokens: one token)
        with pytest.raises(ValueError, match="the same position"):
            patching.activation_patching(net, clean, corrupted, METRICS[which], sites=kinds,
                                         positions=positions, progress=False, **options)
        return
    expected = patching_loop(model, clean, corrupted, METRICS[which], kinds, chosen, where)
    result = patching.activation_patching(
        net, clean, corrupted, METRICS[which], sites=kinds, positions=positions,
        batch_size=batch_size, suffix=suffix, backend=backend, progress=False, **options)
    assert result.values.shape == expected.shape, (result.values.shape, expected.shape)
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-10, equal_nan=True)
