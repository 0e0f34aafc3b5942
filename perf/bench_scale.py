"""A dataset sweep in one process, in two processes (torchrun, gloo) and as an nnsight loop.

``python -m perf --only scale [--quick]``, or ``python -m perf.bench_scale [--quick]``.

What is measured: ``fxsight.patching.activation_patching(model, rows, metric,
sites=["resid"], positions=POSITIONS)`` over ``PAIRS`` clean/corrupted pairs of ``TOKENS``
tokens (random ids; the corrupted prompt differs at position ``CORRUPTED``) on the
gpt2-small shape (12 layers x 768, 12 heads, vocabulary 50257, fixed random weights),
scored by a logit difference at the last position: ``PAIRS x 12 x len(POSITIONS)`` cells.

- ``fxsight, 1 process``: one process, 2 torch threads.
- ``fxsight, 2 processes``: ``torchrun --nproc_per_node 2`` (gloo), 1 thread each: the
  ranks share the batches and gather the scores (every rank returns the full result).
- ``nnsight loop``: nnsight's tutorial pattern per pair, in its own interpreter
  (as in ``perf/child.py``; ``PYTHONPATH`` gets ``FXSIGHT_BENCH_NNSIGHT_PATH``,
  default ``/tmp/nnsight-site``): a
  clean trace that saves every block's output, a corrupted trace for the baseline, then
  one trace per layer with one invoke per position (each invoke patches its position and
  saves the logits); on the first ``NNSIGHT_PAIRS`` pairs only (it is slow), reported
  as pairs/s over those.

Each fxsight run first sweeps one pair (captures and splices every layer's graph: the
warm-up, reported apart as ``first pair``), then times the whole dataset; the times are
wall clock of the sweep call on rank 0, after a barrier. Scores are compared across
variants (``max |diff|`` from the 1-process scores, over the pairs each variant ran).
``--quick``: 8 pairs, 2 for nnsight; ``--pairs=N``: N pairs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

PAIRS, NNSIGHT_PAIRS = 64, 4
TOKENS, CORRUPTED = 10, 3
POSITIONS = [CORRUPTED, TOKENS - 1]
A, B = 11, 22
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def model() -> torch.nn.Module:
    from perf.models import gpt2

    return gpt2(12, 768, 12, 50257)


def pairs(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        clean = torch.randint(4, 50257, (1, TOKENS), generator=generator)
        corrupted = clean.clone()
        corrupted[0, CORRUPTED] = (clean[0, CORRUPTED] + 1) % 50257
        out.append((clean, corrupted))
    return out


# --- workers (each in its own process) ------------------------------------------------------
def fxsight_worker(out: str, n: int) -> None:
    """One fxsight run (one rank under torchrun): writes scores and times to ``out``."""
    import torch.distributed as dist

    from fxsight import NNsight, patching

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.set_grad_enabled(False)
    net = NNsight(model())
    data = [{"clean": c, "corrupted": k} for c, k in pairs(n)]

    def sweep(rows):
        return patching.activation_patching(net, rows, metric=metric, sites=["resid"],
                                            positions=POSITIONS, progress=False)

    start = time.perf_counter()
    first = sweep(data[:1])
    warm_up = time.perf_counter() - start
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    result = sweep(data)
    seconds = time.perf_counter() - start
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        torch.save({"per_pair": result.per_pair, "seconds": seconds, "warm_up": warm_up,
                    "first": first.per_pair, "backend": result.info["backend"],
                    "batch_size": result.info["batch_size"], "ranks": result.info["ranks"],
                    "threads": torch.get_num_threads()}, out)
    if distributed:
        dist.destroy_process_group()


NNSIGHT_CODE = """
import json, time, warnings, torch
from perf import bench_scale as b
torch.set_num_threads(2); torch.set_grad_enabled(False)
import nnsight
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast


def main():
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>", padding_side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(b.model(), tokenizer=tokenizer)
    n_layers = len(lm.transformer.h)
    scores = []
    start = time.perf_counter()
    for clean, corrupted in b.pairs(N):
        hidden = []
        with lm.trace(clean):
            for l in range(n_layers):
                hidden.append(lm.transformer.h[l].output.save())
        with lm.trace(corrupted):
            base = lm.lm_head.output.save()
        base = b.metric(getattr(base, "value", base))[0]
        pair = torch.zeros(n_layers, len(b.POSITIONS))
        for l in range(n_layers):
            clean_l = getattr(hidden[l], "value", hidden[l])
            saved = []
            with lm.trace() as tracer:
                for position in b.POSITIONS:
                    with tracer.invoke(corrupted):
                        lm.transformer.h[l].output[:, position] = clean_l[:, position]
                        saved.append(lm.lm_head.output.save())
            for p, logits in enumerate(saved):
                pair[l, p] = b.metric(getattr(logits, "value", logits))[0] - base
        scores.append(pair)
    seconds = time.perf_counter() - start
    torch.save(torch.stack(scores), OUT)
    print(json.dumps({"seconds": seconds, "version": nnsight.__version__}))


main()
"""


# --- the benchmark --------------------------------------------------------------------------
def _run(command: list[str], env: dict, timeout: float = 3600) -> None:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {done.stderr[-2000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool = False, pairs_: int | None = None) -> list[dict[str, Any]]:
    """One dict per variant: pairs, cells, seconds, pairs/s, cells/s, max |diff|
    (``pairs_``: another number of pairs than ``PAIRS``, 8 with ``quick``)."""
    n, n_nnsight = (8, 2) if quick else (PAIRS, NNSIGHT_PAIRS)
    n = pairs_ or n
    cells_per_pair = 12 * len(POSITIONS)
    folder = tempfile.mkdtemp(prefix="fxsight-bench-scale-")
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = os.path.abspath(__file__)
    one, two = os.path.join(folder, "one.pt"), os.path.join(folder, "two.pt")
    _run([sys.executable, script, "--worker", one, str(n)],
         {**env, "OMP_NUM_THREADS": "2"})
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script,
          "--worker", two, str(n)], {**env, "OMP_NUM_THREADS": "1"})
    print(f"(fxsight runs done, load average {os.getloadavg()[0]:.1f})", file=sys.stderr,
          flush=True)
    results = []
    reference = torch.load(one, weights_only=True)
    for name, path in (("fxsight, 1 process (2 threads)", one),
                       ("fxsight, 2 processes (gloo, 1 thread each)", two)):
        got = torch.load(path, weights_only=True)
        results.append(dict(method=name, pairs=n, cells=n * cells_per_pair,
                            seconds=got["seconds"], pairs_per_s=n / got["seconds"],
                            cells_per_s=n * cells_per_pair / got["seconds"],
                            first_pair_s=got["warm_up"], backend=got["backend"],
                            batch_size=got["batch_size"],
                            max_abs_diff=float((got["per_pair"] - reference["per_pair"])
                                               .abs().max())))
    results.append(nnsight_row(n_nnsight, folder, reference["per_pair"], cells_per_pair))
    base = results[0]["pairs_per_s"]
    for r in results:
        if "pairs_per_s" in r:
            r["vs_1_process"] = r["pairs_per_s"] / base
    return results


def nnsight_row(n: int, folder: str, reference: torch.Tensor, cells_per_pair: int) -> dict:
    """The nnsight loop over the first ``n`` pairs, in its own interpreter."""
    nnsight_path = os.environ.get("FXSIGHT_BENCH_NNSIGHT_PATH", "/tmp/nnsight-site")
    out = os.path.join(folder, "nnsight.pt")
    code = f"N = {n}\nOUT = {out!r}\n" + NNSIGHT_CODE
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [ROOT, nnsight_path])))
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    if done.returncode != 0:
        return dict(method="nnsight loop",
                    skipped=lines[-1][:160] if lines else f"exit status {done.returncode}")
    got = json.loads(lines[-1])
    scores = torch.load(out, weights_only=True)
    return dict(method=f"nnsight {got['version']} loop (trace per layer, invoke per "
                       f"position)", pairs=n, cells=n * cells_per_pair,
                seconds=got["seconds"], pairs_per_s=n / got["seconds"],
                cells_per_s=n * cells_per_pair / got["seconds"],
                max_abs_diff=float((scores - reference[:n].reshape(scores.shape))
                                   .abs().max()))


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<52}{'pairs':>6}{'cells':>7}{'seconds':>9}{'pairs/s':>9}"
             f"{'cells/s':>9}{'x 1 proc':>9}{'max |diff|':>12}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['method']:<52}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['method']:<52}{r['pairs']:>6}{r['cells']:>7}{r['seconds']:>9.1f}"
                     f"{r['pairs_per_s']:>9.3f}{r['cells_per_s']:>9.1f}"
                     f"{r['vs_1_process']:>8.2f}x{r['max_abs_diff']:>12.1e}")
    firsts = [f"{r['method']}: first pair (captures, splices) {r['first_pair_s']:.1f} s, "
              f"backend {r['backend']}, batch {r['batch_size']}"
              for r in results if "first_pair_s" in r]
    return "\n".join(lines + [""] + firsts)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        fxsight_worker(sys.argv[2], int(sys.argv[3]))
    else:
        torch.set_num_threads(2)
        print(f"load average {os.getloadavg()[0]:.1f}")
        given = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--pairs=")]
        print(table(run(quick="--quick" in sys.argv,
                        pairs_=int(given[0]) if given else None)))
        print(f"load average {os.getloadavg()[0]:.1f}")
