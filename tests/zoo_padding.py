"""Padded traces of the zoo's text architectures (``tests/zoo.py``): two invokes of
different lengths (6 and 3 tokens; an encoder-decoder's with the same decoder tokens),
each compared with its prompt run alone by the plain model.

A helper module (not a test file): ``tests/test_zoo_padding.py`` runs it;
``python tests/zoo_padding.py [names]`` prints each architecture's outcome per backend.
An outcome is ``ok`` (each invoke's output is its prompt's alone), ``refused: ...`` (a
``TraceError`` before running), ``wrong: ...`` (ran, and a row differs from its prompt
alone: what fxsight must never do) or ``error: ...`` (another exception).
"""

from __future__ import annotations

import sys

import torch

import zoo

# the text architectures: token ids in, a mask taken
TEXT = [arch.name for arch in zoo.ZOO if arch.inputs in ("ids", "seq2seq")]


def _inputs(arch: zoo.Arch, model: torch.nn.Module) -> tuple[list, list, dict]:
    vocab = getattr(model.config, "vocab_size", 128) or 128
    generator = torch.Generator().manual_seed(1)
    long, short = (torch.randint(4, vocab, (n,), generator=generator).tolist() for n in (6, 3))
    extra = {}
    if arch.inputs == "seq2seq":
        extra["decoder_input_ids"] = torch.randint(4, vocab, (1, 4), generator=generator)
    return long, short, extra


def check_padding(name: str, backend: str) -> str:
    """The outcome of a padded trace of zoo architecture ``name`` on ``backend``."""
    from fxsight import LanguageModel, TraceError

    arch = zoo.BY_NAME[name]
    try:
        model = zoo.build(arch)
        long, short, extra = _inputs(arch, model)
        with torch.no_grad():
            alone = [zoo.first_tensor(model(torch.tensor([ids]), **extra)) for ids in
                     (long, short)]
    except Exception as error:  # noqa: BLE001 - the plain model does not run
        return f"error: not run: {type(error).__name__}: {str(error)[:200]}"
    try:
        lm = LanguageModel(model)
        with torch.no_grad(), lm.trace(backend=backend) as tracer:
            saved = []
            for ids in (long, short):
                with tracer.invoke(ids, **extra):
                    saved.append(lm.output.save())
    except TraceError as error:
        return "refused: " + " ".join(str(error).split())[:400]
    except Exception as error:  # noqa: BLE001 - recorded
        return f"error: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    # (a decoder's prompts are left-padded: its tokens are the last; an encoder's, a model
    # that does not generate, right-padded: the first, as its tokenizer pads them)
    generates = not callable(getattr(model, "can_generate", None)) or model.can_generate()
    for value, expected in zip(saved, alone):
        value = zoo.first_tensor(value)
        if not seq2seq:
            value = value[:, -expected.shape[1]:] if generates else \
                value[:, :expected.shape[1]]
        if value.shape != expected.shape or not torch.allclose(
                value.float(), expected.float(), atol=1e-4, rtol=1e-3):
            diff = (value.float() - expected.float()).abs().max().item() \
                if value.shape == expected.shape else float("nan")
            return f"wrong: max difference {diff:.3g} (shape {tuple(value.shape)})"
    return "ok"


if __name__ == "__main__":
    import json

    torch.set_num_threads(1)
    for name in [a for a in sys.argv[1:] if not a.startswith("-")] or TEXT:
        outcome = {backend: check_padding(name, backend) for backend in ("fx", "hooks")}
        print(json.dumps({"name": name, **outcome}), flush=True)
