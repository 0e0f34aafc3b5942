"""A sweep under torchrun: 2 processes (gloo, CPU) give the 1-process result on every rank,
and a rank that fails makes the other stop with an error naming it (no hang)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
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


def _launch(mode: str, out, timeout: float = 240) -> list[int]:
    """Two ranks of ``distributed_checkpoint.py`` started as plain processes (rank 0
    hosts the store): their exit codes."""
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "FXSIGHT_RANK_TIMEOUT": "3"}
        processes.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "distributed_checkpoint.py"), mode, str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    codes = []
    try:
        for process in processes:
            process.wait(timeout=timeout)
            codes.append(process.returncode)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return codes


def test_a_rank_that_dies_is_named_and_the_checkpointed_sweep_resumes(tmp_path):
    """Rank 1 dies without raising in its third batch: rank 0 stops within a few seconds
    with an error naming it (not the process group's 30-minute timeout). Started again,
    the sweep loads both ranks' checkpoints, runs only the missing batches and gives the
    uninterrupted one-process result on both ranks."""
    codes = _launch("die", tmp_path)
    assert codes == [0, 1]
    died = torch.load(tmp_path / "die.rank0.pt", weights_only=True)
    assert "rank 1 of 2 stopped without an error" in died["error"], died
    assert "no heartbeat for 3 s" in died["error"]
    assert died["seconds"] < 60  # bounded: the heartbeat timeout, not the group's
    assert died["ran"] == 10  # rank 0 finished its share before it waited

    assert _launch("resume", tmp_path) == [0, 0]
    sys.path.insert(0, HERE)
    import distributed_checkpoint
    from models import tiny_gpt2

    expected = distributed_checkpoint.sweep(NNsight(tiny_gpt2(n_layer=2)), checkpoint=None)
    for rank in range(2):
        got = torch.load(tmp_path / f"resume.rank{rank}.pt", weights_only=True)
        assert "error" not in got, got.get("error")
        assert got["ranks"] == 2 and got["batches"] == 20
        assert got["resumed"] == 12  # rank 0's 10 and rank 1's 2 finished batches
        assert got["ran"] == [0, 8][rank]  # only the batches no checkpoint held
        torch.testing.assert_close(got["per_pair"], expected.per_pair, atol=2e-5, rtol=1e-4,
                                   equal_nan=True)
        torch.testing.assert_close(got["values"], expected.values, atol=2e-5, rtol=1e-4)


def _ranks_on(store, rank: int, timeout: float):
    """A ``Ranks`` of a 2-rank job on ``store``, without a process group (the waits only)."""
    from fxsight.experiments.ranks import Ranks

    ranks = Ranks(distributed=False)
    ranks.store, ranks.rank, ranks.world, ranks.timeout = store, rank, 2, timeout
    ranks.prefix = "test"
    return ranks


def test_waiting_for_a_rank_whose_heartbeat_stops_names_it():
    """In one process, on a plain store: rank 1 beats while it works and then arrives (rank
    0 waits for it, however long), or stops beating (rank 0 raises within the timeout); a
    rank that has not begun (no heartbeat yet) is waited for."""
    import threading
    import time

    from fxsight.experiments.ranks import RankDied

    store = torch.distributed.HashStore()
    zero, one = _ranks_on(store, 0, 0.5), _ranks_on(store, 1, 0.5)
    # rank 1 begins the sweep 1 s late (longer than the timeout) and arrives at once
    late = threading.Timer(1.0, lambda: (store.set("test/beat/1", "0"),
                                         store.set("test/arrived0/1", "1")))
    late.start()
    zero._wait_for_all("planning")
    late.join()
    for key in ("test/beat/1", "test/arrived0/1", "test/arrived0/0"):
        store.delete_key(key)
    with one:  # a slow rank 1: beats for 1.2 s (longer than the timeout), then arrives
        threading.Timer(1.2, lambda: store.set("test/arrived0/1", "1")).start()
        start = time.monotonic()
        zero._wait_for_all("running its batches")
        assert time.monotonic() - start >= 1.0
    zero.exchanges = 1  # the next exchange: rank 1 beats, then dies (its thread stops)
    one._stop.clear()
    one.__enter__()
    time.sleep(0.3)
    one._stop.set()
    one._thread.join()
    start = time.monotonic()
    with pytest.raises(RankDied, match=r"rank 1 of 2 stopped without an error while "
                                       r"running its batches \(no heartbeat for 0.5 s"):
        zero._wait_for_all("running its batches")
    assert time.monotonic() - start < 5
