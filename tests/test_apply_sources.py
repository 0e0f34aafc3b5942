"""``fxsight.apply`` of a lambda whose source cannot be read (typed in a plain Python REPL,
or run by ``exec``): the fx backend's graph calls it as the hooks backend does. Before,
torch.fx's code generation raised "Unable to represent lambda" (it names a lambda by its
source text)."""

import pytest
import torch

import fxsight

BACKENDS = ["fx", "hooks"]

CODE = """
with net.trace(x, backend=backend):
    doubled = fxsight.apply(lambda h: h * FACTOR + 1, net.output).save()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exec_lambda_applies_as_written(backend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    net = fxsight.NNsight(linear)
    with torch.no_grad():
        plain = linear(x)
    for factor in (2, 5, 2):  # (each a new lambda; another body, then the first again)
        namespace = {"fxsight": fxsight, "net": net, "x": x, "backend": backend}
        exec(compile(CODE.replace("FACTOR", str(factor)), "<stdin>", "exec"), namespace)
        torch.testing.assert_close(namespace["doubled"], plain * factor + 1, rtol=0,
                                   atol=0)
