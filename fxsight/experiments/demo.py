"""``python -m fxsight.experiments.demo``: where does a small transformer keep the answer?
An activation patching sweep on fxsight's built-in demo model finds it.

The built-in model (``fxsight/data/demo_model``: a 2-layer GPT-2, 64 wide, ~0.3 MB) was
trained on key-value recall: a prompt lists pairs written as one token each (``a3`` is key
``a`` with value ``3``) and ends with a key; the model answers that key's value::

    a3 f8 c1 h6 e2 b5 c   ->  1

So the answer lives in a known place: the position of the matching pair (``c1``), and it
must be moved from there to the last position, where the prediction is read. The demo patches
a clean prompt into a corrupted one that differs only in that pair's value (``c1`` -> ``c7``)
at every site (residual stream, attention, MLP) × layer × position, prints where patching
restores the clean answer, saves the heatmap as a PNG, and times the sweep against a
one-cell-at-a-time loop (checking that both give the same numbers).

Options: ``--retrain`` trains the model again (well under a minute on 2 CPU cores) and saves
it; ``--out PATH`` (default ``demo_patching.png``); ``--no-loop`` skips the timed loop.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from typing import Any, Iterator

import torch

from ..api.language_model import LanguageModel
from .patching import activation_patching
from .sweeps import find_layout

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                    "demo_model")
KEYS = "abcdefgh"
VALUES = "0123456789"
PAIRS = 6
CLEAN = "a3 f8 c1 h6 e2 b5 c"
CORRUPTED = "a3 f8 c7 h6 e2 b5 c"
# the residual stream entering each block (layer 0: the embeddings), what attention and the
# MLP add, and the residual stream leaving each block
SITES = ["resid_pre", "attn", "mlp", "resid"]


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers logs errors only inside the block; its logger's level is the caller's
    again after (``set_verbosity_error()`` alone would silence the caller's warnings for
    the rest of the process)."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger(hf_logging.__name__.split(".")[0])
    level = root.level
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        root.setLevel(level)


# --- the task ---------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """``<pad>``, the query keys, the pair tokens, the answers (values)."""
    return ["<pad>", *KEYS, *(k + v for k in KEYS for v in VALUES), *VALUES]


def build_tokenizer():
    """A word-level tokenizer over :func:`vocabulary` (tokens are separated by spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                   padding_side="left")


def sample(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random prompts (token ids) and the id of each one's answer."""
    words = vocabulary()
    first_pair = words.index(KEYS[0] + VALUES[0])
    first_value = words.index(VALUES[0])
    keys = torch.rand(count, len(KEYS), generator=generator).argsort(dim=1)[:, :PAIRS]
    values = torch.randint(0, len(VALUES), (count, PAIRS), generator=generator)
    query = torch.randint(0, PAIRS, (count,), generator=generator)
    rows = torch.arange(count)
    pairs = first_pair + keys * len(VALUES) + values
    ids = torch.cat([pairs, (1 + keys[rows, query])[:, None]], dim=1)
    return ids, first_value + values[rows, query]


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128,
                        vocab_size=len(vocabulary()), n_positions=PAIRS + 1,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with _transformers_errors_only(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def train(max_steps: int = 2000, batch: int = 128, seed: int = 0, log=print) -> torch.nn.Module:
    """Train the demo model until it answers 99.5% of held-out prompts (a few hundred steps)."""
    model = build_model(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    held_out = sample(1024, torch.Generator().manual_seed(seed + 1))
    start = time.perf_counter()
    accuracy = 0.0
    for step in range(1, max_steps + 1):
        ids, answers = sample(batch, generator)
        logits = model(ids, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            accuracy = evaluate(model, *held_out)
            log(f"  step {step:4d}  loss {loss.item():.3f}  held-out accuracy {accuracy:.3f}  "
                f"({time.perf_counter() - start:.1f} s)")
            model.train()
            if accuracy >= 0.995:
                break
    model.eval()
    if accuracy < 0.99:
        raise RuntimeError(f"the demo model did not learn the task ({accuracy:.3f})")
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor, answers: torch.Tensor) -> float:
    model.eval()
    logits = model(ids, use_cache=False).logits[:, -1]
    return float((logits.argmax(-1) == answers).float().mean())


def save(model: torch.nn.Module, path: str = DATA) -> None:
    os.makedirs(path, exist_ok=True)
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(path, extra)):
            os.remove(os.path.join(path, extra))


def load(path: str = DATA):
    """The built-in demo model as a ``LanguageModel`` (its module and tokenizer from
    ``path``)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    with _transformers_errors_only():
        module = GPT2LMHeadModel.from_pretrained(path).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return LanguageModel(module, tokenizer=tokenizer)


def prompts() -> dict[str, Any]:
    """The demo's clean and corrupted prompts and what the planted structure says about
    them: where the queried pair is, and the two answers."""
    clean, corrupted = CLEAN.split(), CORRUPTED.split()
    differ = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
    return dict(clean=CLEAN, corrupted=CORRUPTED, pair_position=differ[0],
                last_position=len(clean) - 1, clean_answer=clean[differ[0]][1:],
                corrupted_answer=corrupted[differ[0]][1:])


def sweep(lm, progress: bool = False, **options: Any):
    """The demo's activation-patching sweep on ``lm`` (a :class:`PatchingResult`)."""

    task = prompts()
    vocab = lm.tokenizer.get_vocab()
    good, bad = vocab[task["clean_answer"]], vocab[task["corrupted_answer"]]

    def metric(logits):
        return logits[:, -1, good] - logits[:, -1, bad]

    return activation_patching(lm, task["clean"], task["corrupted"], metric,
                               sites=SITES, progress=progress, **options)


def loop(lm, result) -> tuple[torch.Tensor, float]:
    """The same cells one at a time: one two-invoke trace per cell (clean invoke reads the
    site, corrupted invoke writes it and reads the logits), as one writes it by hand."""

    task = prompts()
    layout = find_layout(lm)
    clean = lm.tokenizer(task["clean"], return_tensors="pt")["input_ids"]
    corrupted = lm.tokenizer(task["corrupted"], return_tensors="pt")["input_ids"]
    vocab = lm.tokenizer.get_vocab()
    good, bad = vocab[task["clean_answer"]], vocab[task["corrupted_answer"]]
    values = torch.zeros(result.values.shape)
    start = time.perf_counter()
    with torch.no_grad():
        for k, kind in enumerate(result.sites):
            for l, layer in enumerate(result.layers):
                site = layout.site(kind, layer)
                for p, position in enumerate(result.positions):
                    with lm.trace() as tracer:
                        with tracer.invoke(clean):
                            h = _value(site, kind)[:, position]
                        with tracer.invoke(corrupted):
                            _value(site, kind)[:, position] = h
                            logits = lm.lm_head.output.save()
                    values[k, l, p] = logits[0, -1, good] - logits[0, -1, bad]
    return values - result.baseline, time.perf_counter() - start


def _value(site, kind: str):
    """The hidden state at a site, inside a trace: a block's input (``resid_pre``), the
    attention's output (item 0 of its tuple), a module's output."""
    if kind == "resid_pre":
        return site.input
    return site.output[0] if kind == "attn" else site.output


def describe(result) -> list[str]:
    """Where the sweep finds the answer, following the residual stream, in words."""
    restored = result.normalized()
    tokens = result.tokens or [str(p) for p in result.positions]
    lines = []

    def where(cell, label: str) -> str:
        return (f"  {label:<30} position {cell.position} ({tokens[cell.position]!r}): "
                f"patching there restores {cell.value:.0%}")

    if "resid_pre" in result.sites:
        lines.append(where(restored.top(site="resid_pre", layer=result.layers[0]),
                           f"entering layer {result.layers[0]} (embeddings):"))
    for layer in result.layers:
        lines.append(where(restored.top(site="resid", layer=layer),
                           f"leaving layer {layer}:"))
    mover = restored.top(site="attn")
    lines.append(f"  moved by the attention of layer {mover.layer} into position "
                 f"{mover.position} ({tokens[mover.position]!r}): patching that attention "
                 f"output restores {mover.value:.0%}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fxsight.experiments.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true",
                        help="train the demo model again and save it")
    parser.add_argument("--out", default="demo_patching.png", help="the heatmap's path")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the one-cell-at-a-time loop")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    begin = time.perf_counter()

    if args.retrain or not os.path.exists(os.path.join(DATA, "config.json")):
        print("training the demo model (2-layer GPT-2, 64 wide) on key-value recall ...")
        start = time.perf_counter()
        model = train()
        print(f"trained in {time.perf_counter() - start:.1f} s")
        try:
            save(model)
            print(f"saved to {DATA}")
        except OSError as error:
            print(f"(could not save it: {error})")
    lm = load()
    task = prompts()
    print(f"\nbuilt-in demo model: {DATA}")
    print(f"clean prompt:     {task['clean']!r:24} -> the model answers "
          f"{_answer(lm, task['clean'])!r}")
    print(f"corrupted prompt: {task['corrupted']!r:24} -> the model answers "
          f"{_answer(lm, task['corrupted'])!r}")
    print(f"metric: logit({task['clean_answer']!r}) - logit({task['corrupted_answer']!r}) at "
          f"the last position\n")

    start = time.perf_counter()
    result = sweep(lm, progress=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = sweep(lm, progress=False)
    again = time.perf_counter() - start

    print("fraction of the clean answer restored by patching each cell "
          "(1 = fully restored):\n")
    print(result.normalized().table(digits=2))
    print("\nwhere the information flows:")
    for line in describe(result):
        print(line)
    print(f"  (planted: the answer is the value of pair {task['pair_position']} and is read at "
          f"position {task['last_position']})")

    result.plot(args.out, title=f"activation patching: {task['clean']!r} vs "
                                f"{task['corrupted']!r}", normalized=True)
    print(f"\nheatmap saved to {args.out}")

    cells = result.values.numel()
    print(f"\nsweep: {cells} cells in {first:.2f} s the first time (capturing and splicing "
          f"{result.info['traces'] - 2} batches of {result.info['batch_size']}), "
          f"{again:.3f} s again ({cells / again:.0f} cells/s, {result.info['backend']} "
          f"backend)")
    if not args.no_loop:
        values, seconds = loop(lm, result)
        difference = float((values - result.values).abs().max())
        print(f"one-cell-at-a-time loop (one two-invoke trace per cell): {cells} traces in "
              f"{seconds:.2f} s ({cells / seconds:.0f} cells/s): the sweep is "
              f"{seconds / again:.0f}x faster warm, {seconds / first:.1f}x the first time; "
              f"largest difference {difference:.1e}")
    print(f"\n(demo total {time.perf_counter() - begin:.1f} s)")


def _answer(lm, prompt: str) -> str:
    with torch.no_grad(), lm.trace(prompt):
        logits = lm.output.logits[0, -1].save()
    return lm.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


if __name__ == "__main__":
    main()
