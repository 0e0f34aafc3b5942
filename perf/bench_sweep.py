"""Activation-patching sweep: fxsight vs the field's strongest baselines.

A gpt2-small shape (12 layers x 768, 12 heads, vocabulary 50257, random weights), a clean
and a corrupted prompt of 32 tokens (one token differs), the residual stream (block output)
patched at every layer x position: 384 cells, each scored by a logit difference at the last
position.

- ``fxsight``: ``activation_patching(..., sites=["resid"])``: the suffix path (each cell
  runs only positions p.. of the blocks after l, over the corrupted run's key-value cache,
  packed two cells a row; the head on each cell's last token and only the two vocabulary
  entries the metric reads; see ``fxsight/experiments/suffix.py``).
- ``fxsight (full-length)``: the same with ``suffix=False`` (prefix reuse by skipped
  modules, full-length rows, ``logits_to_keep=1``).
- ``hand-written prefix reuse``: plain PyTorch: the clean and corrupted runs once keeping
  each block's output, then per layer l the 32 position-patched copies of block l's output
  through blocks l+1.. and the final norm and head at the last position only.
- ``hand-written, changed positions only``: the same, with rows only for the positions
  where the clean block output differs from the corrupted one (before the token where the
  prompts differ, a patch changes nothing and scores the corrupted run's metric): fxsight
  skips those cells too, so this is the like-for-like baseline.
- ``hooks (batched, logits_to_keep=1)``: per layer one forward of 32 corrupted rows with a
  forward hook putting row r's clean position r in place, ``logits_to_keep=1``.
- ``nnsight (tutorial)``: nnsight's batched-invoke pattern, one trace per layer, one invoke
  for the clean prompt and one per position (``logits_to_keep=1``), in its own process
  (``PYTHONPATH`` gets ``NNSIGHT_PATH``, default ``/tmp/nnsight-site``); skipped when it
  cannot be imported there.

Every method's scores are checked against the hand-written prefix reuse's
(``max_abs_diff``). Rounds run every method once in a shuffled order; fxsight's first call
(captures and splices) is a warm-up, reported on its own row. ``fxsight x``: each method's
median time over fxsight's. ``--quick``: 4 layers, 16 positions, one round;
``--rounds N``.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from perf import child
from perf.models import gpt2
from perf.timing import SHUFFLED, synced

ORDER = SHUFFLED

TOKENS = 32
A, B = 11, 22  # the metric: logit of token A minus logit of token B at the last position
NNSIGHT_PATH = os.environ.get("NNSIGHT_PATH") or child.NNSIGHT_PATH or "/tmp/nnsight-site"


def _model(n_layer: int, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    return gpt2(n_layer, 768, 12, 50257).to(device, getattr(torch, dtype))


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def _prompts(vocab: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(4, vocab, (1, tokens), generator=generator)
    corrupt = clean.clone()
    corrupt[0, tokens // 3] = (clean[0, tokens // 3] + 1) % vocab
    return clean, corrupt


def _fxsight(model, clean, corrupt, batch: int, suffix: bool) -> Callable[[], torch.Tensor]:
    from fxsight import NNsight
    from fxsight.patching import activation_patching

    net = NNsight(model)

    def sweep() -> torch.Tensor:
        result = activation_patching(net, clean, corrupt, metric, sites=["resid"],
                                     batch_size=batch, progress=False, suffix=suffix)
        assert result.info["backend"] == "fx", result.info
        assert result.info["suffix"] is True or not suffix, result.info["suffix"]
        return result.values[0] + result.baseline

    return sweep


def _block_outputs(model, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each block's output and the last-position logits of one plain run."""
    saved: dict[int, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(i, o))
               for i, block in enumerate(model.transformer.h)]
    try:
        out = model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return [saved[i] for i in range(len(saved))], out.logits


def _prefix_reuse(model, clean, corrupt, changed_only: bool = False
                  ) -> Callable[[], torch.Tensor]:
    """Hand-written prefix reuse in plain PyTorch (about 20 lines, as one writes it).
    ``changed_only``: rows only for the positions where the clean block output differs
    from the corrupted one (the others score the corrupted run's metric)."""
    blocks = model.transformer.h

    def sweep() -> torch.Tensor:
        tokens = clean.shape[1]
        clean_out, _ = _block_outputs(model, clean)
        corrupt_out, corrupt_logits = _block_outputs(model, corrupt)
        scores = metric(corrupt_logits).expand(len(blocks), tokens).clone()
        for layer in range(len(blocks)):
            rows = torch.arange(tokens, device=clean.device)
            if changed_only:
                rows = rows[(clean_out[layer][0] != corrupt_out[layer][0]).any(-1)]
            h = corrupt_out[layer].expand(len(rows), tokens, -1).clone()
            h[torch.arange(len(rows), device=clean.device), rows] = \
                clean_out[layer][0, rows]  # position patched
            for block in blocks[layer + 1:]:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h
            logits = model.lm_head(model.transformer.ln_f(h[:, -1:]))
            scores[layer, rows] = metric(logits)
        return scores

    return sweep


def _hooks(model, clean, corrupt, batch: int) -> Callable[[], torch.Tensor]:
    blocks = model.transformer.h
    kwargs = {"use_cache": False, "logits_to_keep": 1}

    def sweep() -> torch.Tensor:
        tokens = clean.shape[1]
        saved, _ = _block_outputs(model, clean)
        scores = torch.zeros(len(blocks), tokens, device=clean.device)
        for layer, block in enumerate(blocks):
            for start in range(0, tokens, batch):
                positions = torch.arange(start, start + batch,
                                         device=clean.device).clamp(max=tokens - 1)
                rows = torch.arange(batch, device=clean.device)

                def patch(module, args, output, positions=positions, layer=layer):
                    output = output.clone()
                    output[rows, positions] = saved[layer][0, positions]
                    return output

                handle = block.register_forward_hook(patch)
                try:
                    logits = model(corrupt.expand(batch, tokens), **kwargs).logits
                finally:
                    handle.remove()
                count = min(batch, tokens - start)
                scores[layer, start:start + count] = metric(logits)[:count]
        return scores

    return sweep


# --- nnsight, in its own process ---------------------------------------------------------
def _nnsight_child(n_layer: int, tokens: int, device: str = "cpu",
                   dtype: str = "float32") -> None:
    """(Run in a child process with nnsight importable.) One warm-up trace, then one timed
    sweep in nnsight's tutorial pattern; prints JSON: seconds and scores."""
    import warnings

    import nnsight
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    model = _model(n_layer, device, dtype)
    clean, corrupt = (p.to(device) for p in _prompts(model.config.vocab_size, tokens))
    # LanguageModel batches invokes; the prompts are token ids: a stand-in tokenizer pads
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
        pad_token="<pad>", padding_side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(model, tokenizer=tokenizer)

    def layer_scores(layer: int, positions: range) -> torch.Tensor:
        logits = []
        with lm.trace(use_cache=False, logits_to_keep=1) as tracer:
            barrier = tracer.barrier(len(positions) + 1)
            with tracer.invoke(clean):
                h = lm.transformer.h[layer].output
                barrier()
            for position in positions:
                with tracer.invoke(corrupt):
                    barrier()
                    lm.transformer.h[layer].output[:, position] = h[:, position]
                    logits.append(lm.lm_head.output.save())
        return torch.cat([metric(getattr(x, "value", x)) for x in logits])

    layer_scores(0, range(2))  # warm-up
    start = time.perf_counter()
    scores = torch.stack([layer_scores(layer, range(tokens))
                          for layer in range(n_layer)]).float().cpu()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "scores": scores.tolist()}))


def _nnsight(n_layer: int, tokens: int, device: str = "cpu", dtype: str = "float32"
             ) -> Callable[[], tuple[float, torch.Tensor]] | str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [NNSIGHT_PATH, *filter(None, [os.environ.get("PYTHONPATH")])])}
    check = subprocess.run([sys.executable, "-c", "import nnsight"], env=env,
                           capture_output=True, text=True)
    if check.returncode:
        return f"nnsight is not importable ({check.stderr.strip().splitlines()[-1:]})"

    def sweep() -> tuple[float, torch.Tensor]:
        done = subprocess.run([sys.executable, "-m", "perf.bench_sweep", "--nnsight-child",
                               str(n_layer), str(tokens), device, dtype], env=env,
                              capture_output=True, text=True, cwd=os.path.dirname(
                                  os.path.dirname(os.path.abspath(__file__))))
        if done.returncode:
            raise RuntimeError(f"the nnsight process failed: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["seconds"], torch.tensor(result["scores"])

    return sweep


def run(quick: bool = False, rounds: int = 2, nnsight: bool = True, device: str = "cpu",
        dtype: str = "float32", size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """One dict per method: ``seconds`` (median over rounds), ``cells_per_s``, ``speedup``
    (the method's time over fxsight's) and ``max_abs_diff`` from the hand-written prefix
    reuse's scores. ``device`` and ``dtype``: where the model runs, in what (the nnsight
    process too); ``size``: (layers, tokens) instead of the defaults."""
    torch.set_grad_enabled(False)
    n_layer, tokens = size or ((4, 16) if quick else (12, TOKENS))
    rounds = 1 if quick else rounds
    model = _model(n_layer, device, dtype)
    clean, corrupt = (p.to(device) for p in _prompts(model.config.vocab_size, tokens))
    batch = tokens
    methods: dict[str, Any] = {
        "fxsight": _fxsight(model, clean, corrupt, batch, suffix=True),
        "fxsight (full-length)": _fxsight(model, clean, corrupt, batch, suffix=False),
        "hand-written prefix reuse": _prefix_reuse(model, clean, corrupt),
        "hand-written, changed positions only": _prefix_reuse(model, clean, corrupt, True),
        "hooks (batched, logits_to_keep=1)": _hooks(model, clean, corrupt, batch),
        "nnsight (tutorial)": _nnsight(n_layer, tokens, device, dtype) if nnsight
        else "not requested",
    }
    shape = f"gpt2 {n_layer}x768"
    cells = n_layer * tokens
    results: list[dict[str, Any]] = []
    live = {name: synced(fn, device) for name, fn in methods.items() if callable(fn)}
    for name, why in methods.items():
        if not callable(why):
            results.append(dict(model=shape, method=name, skipped=why))
    cold: dict[str, tuple[float, torch.Tensor]] = {}
    for name in ("fxsight", "fxsight (full-length)"):  # captures and splices: warm-ups
        start = time.perf_counter()
        value = live[name]()
        cold[name] = (time.perf_counter() - start, value.float().cpu())
    times: dict[str, list[float]] = {name: [] for name in live}
    scores: dict[str, torch.Tensor] = {}
    order = list(live)
    for r in range(rounds):
        random.Random(17 + r).shuffle(order)
        for name in order:
            start = time.perf_counter()
            value = live[name]()
            if isinstance(value, tuple):  # the child process timed itself
                seconds, value = value
            else:
                seconds = time.perf_counter() - start
            times[name].append(seconds)
            scores[name] = value.float().cpu()
    reference = scores["hand-written prefix reuse"]
    fx_time = statistics.median(times["fxsight"])
    for name in live:
        seconds = statistics.median(times[name])
        results.append(dict(model=shape, method=name, cells=cells, batch=batch,
                            repeats=len(times[name]), seconds=seconds,
                            cells_per_s=cells / seconds, speedup=seconds / fx_time,
                            max_abs_diff=float((scores[name] - reference).abs().max())))
    seconds, value = cold["fxsight"]
    results.append(dict(model=shape, method="fxsight (first call)", cells=cells, batch=batch,
                        repeats=1, seconds=seconds, cells_per_s=cells / seconds,
                        speedup=seconds / fx_time,
                        max_abs_diff=float((value - reference).abs().max())))
    names = ["fxsight", "fxsight (first call)", *list(methods)[1:]]
    results.sort(key=lambda r: names.index(r["method"]))
    return results


TARGETS = {"hand-written prefix reuse": 2.0, "hand-written, changed positions only": 2.0,
           "nnsight (tutorial)": 4.0}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<14}{'method':<36}{'cells':>6}{'seconds':>9}{'cells/s':>9}"
             f"{'fxsight x':>11}{'max |diff|':>12}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['model']:<14}{r['method']:<36}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['model']:<14}{r['method']:<36}{r['cells']:>6}{r['seconds']:>9.2f}"
                     f"{r['cells_per_s']:>9.1f}{r['speedup']:>10.2f}x{r['max_abs_diff']:>12.1e}")
    notes = []
    for r in results:
        if r.get("method") in TARGETS and "speedup" in r:
            target = TARGETS[r["method"]]
            verdict = "met" if r["speedup"] >= target else "NOT met"
            notes.append(f"target fxsight >= {target:.0f}x {r['method']}: "
                         f"{r['speedup']:.2f}x ({verdict})")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--nnsight-child"]:
        _nnsight_child(int(argv[1]), int(argv[2]), *argv[3:5])
        return
    torch.set_num_threads(2)
    quick = "--quick" in argv
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 2
    print(f"activation-patching sweep, residual stream, every layer x position; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(table(run(quick=quick, rounds=rounds, nnsight="--no-nnsight" not in argv)))


if __name__ == "__main__":
    main()
