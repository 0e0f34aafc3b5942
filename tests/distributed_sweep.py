"""A user's sweep script, run unchanged by ``torchrun`` (see tests/test_distributed.py).

Every rank makes the same calls; each writes what it got to ``<out>/rank<r>.pt``."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from models import tiny_gpt2  # noqa: E402

from fxsight import NNsight, patching  # noqa: E402


def pairs():
    out = []
    for seed, length in [(0, 6), (1, 6), (2, 4)]:
        clean = torch.randint(4, 128, (1, length), generator=torch.Generator().manual_seed(seed))
        corrupted = clean.clone()
        corrupted[0, 1] = (clean[0, 1] + 7) % 128
        out.append((clean, corrupted))
    return out


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


def sweeps(model, **options):
    cleans, corrupts = zip(*pairs())
    patched = patching.activation_patching(model, list(cleans), list(corrupts), metric,
                                           sites=["resid", "attn"], batch_size=8,
                                           progress=False, **options)
    heads = patching.head_patching(model, list(cleans[:2]), list(corrupts[:2]), metric,
                                   layers=[1], batch_size=8, progress=False, **options)
    return patched, heads


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = NNsight(tiny_gpt2(n_layer=2))
    patched, heads = sweeps(model)

    def failing(logits):
        if rank == 1 and logits.shape[0] > 1:  # rank 1 fails in its first batch
            raise RuntimeError("metric failed on purpose")
        return metric(logits)

    try:
        cleans, corrupts = zip(*pairs())
        patching.activation_patching(model, list(cleans), list(corrupts), failing,
                                     sites=["resid"], layers=[0], batch_size=8,
                                     progress=False, backend="hooks")
        error = None
    except Exception as failure:  # noqa: BLE001 - reported to the test
        error = f"{type(failure).__name__}: {failure}"
    torch.save({"patched": patched.per_pair, "patched_mean": patched.values,
                "heads": heads.per_pair, "ranks": patched.info["ranks"], "error": error,
                "group_alive": dist.is_initialized()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
