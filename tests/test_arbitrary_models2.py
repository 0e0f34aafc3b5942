"""Arbitrary PyTorch models wrapped with ``NNsight``, second round: dataclass outputs in
invokes, channels_last inputs, LSTM state edits, skips, packed sequences, torch's capture
warnings, and models not tried before; each checked against a plain forward (hooks)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from fxsight import NNsight, TraceError

BACKENDS = ["fx", "hooks", "auto"]


def _hooked(model: nn.Module, path: str, *args, **kwargs):
    """A plain forward with one forward hook: (the module's output, the model's)."""
    seen = []
    module = model.get_submodule(path) if path else model
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0], out


# ----------------------------------------------------------------------------------------
# 1. a dataclass output read inside one of several invokes

@dataclasses.dataclass
class _Out:
    hidden: torch.Tensor


class _DataclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> _Out:
        self.calls += 1
        return _Out(self.proj(x))


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_dataclass_output_in_invokes_is_refused_before_running(backend):
    torch.manual_seed(0)
    model = _DataclassNet()
    net = NNsight(model)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TraceError, match="_Out.*whole batch of 4 rows"):
            with net.trace(backend=backend) as tracer:
                with tracer.invoke(x1):
                    net.output.save()
                with tracer.invoke(x2):
                    net.output.save()
    assert model.calls == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with net.trace(x1, backend=backend):
            whole = net.output.save()
    assert torch.equal(whole.hidden, model.proj(x1))
