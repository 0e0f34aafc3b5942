"""A checkpointed sweep in 2 processes (gloo, CPU), started by tests/test_distributed.py
with ``init_method="env://"`` (rank 0 hosts the store, as a user's own launcher would).

``die``: rank 1 dies without raising (``os._exit``) in its third batch; rank 0 must stop
with an error naming it (and how long that took) instead of waiting for the process group's
timeout. ``resume``: the same call again, which loads both ranks' checkpoints. Each rank
writes what it got to ``<out>/<mode>.rank<r>.pt``."""

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from distributed_sweep import metric, pairs  # noqa: E402
from models import tiny_gpt2  # noqa: E402

from fxsight import NNsight, patching  # noqa: E402
from fxsight.experiments import jobs  # noqa: E402


def sweep(model, checkpoint, the_metric=metric):
    cleans, corrupts = zip(*pairs())
    return patching.activation_patching(model, list(cleans), list(corrupts), the_metric,
                                        sites=["resid", "attn"], batch_size=4,
                                        progress=False, checkpoint=checkpoint)


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    jobs.CHECKPOINT_SECONDS = 0.0  # (every finished batch is on disk)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = NNsight(tiny_gpt2(n_layer=2))
    checkpoint = os.path.join(out, "sweep.ckpt")
    batches = []

    def dying(logits):
        if logits.shape[0] > 2:  # a batch of 4 rows (the reference runs have one row,
            # the check that the metric keeps the rows apart two)
            batches.append(1)
            if mode == "die" and rank == 1 and len(batches) == 3:
                os._exit(1)  # no exception, no message: as the OOM killer would
        return metric(logits)

    start = time.monotonic()
    record = {}
    try:
        result = sweep(model, checkpoint, dying)
        record.update(per_pair=result.per_pair, values=result.values,
                      resumed=result.info["resumed_batches"], batches=result.info["batches"],
                      ranks=result.info["ranks"])
    except Exception as failure:  # noqa: BLE001 - reported to the test
        record["error"] = f"{type(failure).__name__}: {failure}"
    record.update(seconds=time.monotonic() - start, ran=len(batches))
    torch.save(record, os.path.join(out, f"{mode}.rank{rank}.pt"))
    if mode == "die":
        os._exit(0)  # (rank 1 is gone: no collective shutdown)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
