"""The eager runner calls ATen entry points directly (fxsight.eager): same values as the
rewritten graph's own generated forward, with every torch.ops call rebound."""

from __future__ import annotations

import torch

from fxsight import NNsight
from fxsight.run.eager import fast_forward
from models import tiny_gpt2


def test_fast_forward_rebinds_every_aten_call_and_gives_the_same_values():
    model = tiny_gpt2()
    ids = torch.randint(0, model.config.vocab_size, (2, 7),
                        generator=torch.Generator().manual_seed(0))
    wrapper = NNsight(model)
    steer = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with wrapper.trace(ids, use_cache=False) as tracer:
        wrapper.transformer.h[0].output[:, -1] += steer
        hidden = wrapper.transformer.h[1].output.save()
    graph_module = tracer.graph_module
    assert "torch.ops.aten." in graph_module.code
    fast = fast_forward(graph_module)
    code = fast.__func__.__code__
    assert code.co_filename.startswith("<fxsight rewritten forward")
    # no call in the rewritten code goes through torch.ops any more
    assert "ops" not in code.co_names and "ops" in graph_module.forward.__code__.co_names
    inputs = [ids, False, steer, -1, -1]  # (the model's, the Program's, `-1` twice)
    expected = graph_module.forward(*inputs)
    got = fast(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    torch.testing.assert_close(got[0], hidden)
