"""A model whose forward calls a ``torch.compile``d function: fxsight's passes on fake
tensors (a scan, a capture) run it as plain Python and leave dynamo's code for it as it
was. Before, on the hooks backend, the scan's dispatch mode made dynamo mark the function's
code to be skipped for good: the trace failed ("torch.compile with fullgraph=True found no
compiled frames") and so did every later plain call of the model. Against a plain forward
with forward hooks."""

import threading

import pytest
import torch

import fxsight

BACKENDS = ["fx", "hooks", "auto"]


class _Counted:
    """A dynamo backend that counts its compiles."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return graph_module.forward


def _model(backend):
    @torch.compile(backend=backend, fullgraph=True)
    def activation(x):
        return torch.nn.functional.gelu(x) * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.b(activation(self.a(x)))

    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_function_in_the_forward_is_left_as_it_was(backend):
    counted = _Counted()
    net = _model(counted)
    x = torch.randn(3, 4)
    with torch.no_grad():
        plain = net(x)
    assert counted.compiles == 1
    # the reference: block a's output zeroed by a forward hook
    handle = net.a.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    with torch.no_grad():
        want = net(x)
    handle.remove()
    model = fxsight.NNsight(net)
    with torch.no_grad(), model.trace(x, backend=backend):
        hidden = model.a.output.clone().save()
        model.a.output[:] = 0
        out = model.output.save()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(hidden, net.a(x).detach(), rtol=0, atol=0)
    with torch.no_grad():
        again = net(x)  # (failed on hooks: its code was marked to be skipped)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert counted.compiles == 1  # (fxsight's passes compiled nothing of the user's)
    assert torch._dynamo.eval_frame._stance.stance == "default"


def test_a_users_stance_is_kept_and_threads_share_the_eager_setting():
    """The stance is put back as the user set it, also when traces of two threads overlap."""
    counted = _Counted()
    nets = [fxsight.NNsight(_model(counted)) for _ in range(2)]
    x = torch.randn(3, 4)
    errors = []

    def run(model):
        try:
            for _ in range(5):
                with torch.no_grad(), model.trace(x, backend="hooks"):
                    model.output.save()
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    with torch.compiler.set_stance("eager_on_recompile"):
        threads = [threading.Thread(target=run, args=(net,)) for net in nets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
    assert errors == []
    assert torch._dynamo.eval_frame._stance.stance == "default"
