"""Work a trace does per run, counted: what it walks or copies of the model must not grow
with the model's size where the model gives it no reason to (no CUDA in the process, no
buffer the forward writes)."""

from __future__ import annotations

import torch

from fxsight import NNsight


class _Counted(torch.nn.Sequential):
    """A stack of linear layers whose ``parameters()`` counts the parameters it yields."""

    def __init__(self, layers: int = 12):
        super().__init__(*(torch.nn.Linear(4, 4) for _ in range(layers)))
        self.visited = 0

    def parameters(self, recurse: bool = True):
        for parameter in super().parameters(recurse):
            self.visited += 1
            yield parameter


def test_a_trace_without_cuda_walks_no_parameters_for_random_generators():
    """Without CUDA initialised in the process no tensor can be on a CUDA device: the
    trace does not walk every parameter to find the CUDA generators to save (was: all
    24 parameters per hooks trace that writes with gradients on)."""
    assert not torch.cuda.is_initialized()
    model = _Counted()
    x = torch.randn(2, 4)
    reference = model(x).detach()
    net = NNsight(model)
    for backend in ("hooks", "fx"):
        with net.trace(x, backend=backend):  # (first: captures and scans)
            net[3].output = net[3].output * 2
            out = net.output.save()
        model.visited = 0
        with net.trace(x, backend=backend):
            net[3].output = net[3].output * 2
            out = net.output.save()
        assert model.visited <= 1, (backend, model.visited)  # (the first one's dtype)
        handle = model[3].register_forward_hook(lambda m, a, o: o * 2)
        try:
            torch.testing.assert_close(out, model(x))
        finally:
            handle.remove()
    torch.testing.assert_close(model(x), reference)
