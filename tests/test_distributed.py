"""A sweep under torchrun: 2 processes (gloo, CPU) give the 1-process result on every rank,
and a rank that fails makes the other stop with an error naming it (no hang)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from fxsight import NNsight

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               os.path.join(HERE, "distributed_sweep.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]

    sys.path.insert(0, HERE)
    import distributed_sweep
    from models import tiny_gpt2

    patched, heads = distributed_sweep.sweeps(NNsight(tiny_gpt2(n_layer=2)))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["ranks"] == 2
        torch.testing.assert_close(got["patched"], patched.per_pair, atol=2e-5, rtol=1e-4,
                                   equal_nan=True)
        torch.testing.assert_close(got["patched_mean"], patched.values, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["heads"], heads.per_pair, atol=2e-5, rtol=1e-4)
        assert got["group_alive"]  # the user's process group is left to the user
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["error"]
              for r in range(2)]
    assert "metric failed on purpose" in errors[1]
    assert "failed on 1 of 2 ranks" in errors[0] and "rank 1" in errors[0]
