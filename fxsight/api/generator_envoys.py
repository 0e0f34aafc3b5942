"""``lm.generator`` and ``lm.generator.streamer``: the generated token ids, and what
transformers' ``generate`` puts into its streamer at a decoding step, read inside
``with lm.generate(...)`` (:class:`~fxsight.api.generation.Generator`)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError, at_line, user_line
from ..generate.interleave import GENERATOR
from ..record.active import current_tracer
from ..record.proxy import Proxy
from .generation import Generator


class GeneratorEnvoy:
    """``lm.generator``: ``.output`` is the generated token ids (inside ``generate``);
    ``.streamer.output`` the token ids chosen at a step."""

    def __init__(self, model):
        self._model = model

    @property
    def streamer(self) -> "StreamerEnvoy":
        return StreamerEnvoy(self._model)

    @property
    def output(self) -> Proxy:
        tracer = current_tracer(self._model)
        if not isinstance(tracer, Generator):
            raise TraceError(at_line("lm.generator.output is only available inside "
                                     "`with lm.generate(...)`", user_line()))
        return tracer.recorder.create_read(GENERATOR, "output")


class StreamerEnvoy:
    """``lm.generator.streamer.output``: what transformers' ``generate`` puts into its
    streamer at the decoding step, as nnsight's streamer module sees its calls (a CPU
    tensor, as ``streamer.put`` receives it): at step 0 the prompt's ids (shape ``(batch,
    prompt length)``; an encoder-decoder's decoder start ids), at step ``s`` the token ids
    chosen at step ``s - 1`` (shape ``(batch,)``); at step 0 outside a step loop, at
    ``step`` in ``for step in tracer.iter[...]``. It is read from the generated ids, so it
    is known once generation has ended (save it; it cannot steer a later step)."""

    def __init__(self, model):
        self._model = model

    @property
    def output(self) -> Proxy:
        tracer = current_tracer(self._model)
        line = user_line()
        if not isinstance(tracer, Generator):
            raise TraceError(at_line("lm.generator.streamer.output is only available inside "
                                     "`with lm.generate(...)`", line))
        steps = tracer.recorder.scope.steps
        if steps is not None and not steps.single:
            raise TraceError(at_line(
                "lm.generator.streamer.output is one step's tokens: read it in a step loop "
                "(`for step in tracer.all():`), not in `with tracer.all():`", line))
        step = 0 if steps is None else steps.choice
        prompt = _prompt_length(tracer, line)
        generated = tracer.recorder.create_read(GENERATOR, "output")
        return tracer.recorder.create_op("call_function", _streamed_at, (generated, prompt, step),
                                         {}, lenient=True)


def _prompt_length(tracer: Generator, line: Any) -> int:
    """How many tokens precede the first generated one in what ``generate`` returns: the
    prompt's, or for an encoder-decoder model the decoder's start token (the prompt goes
    to the encoder)."""
    _, kwargs, _ = tracer._batched()
    config = getattr(tracer.model._module, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return kwargs["input_ids"].shape[1]
    if "decoder_input_ids" in kwargs or "decoder_input_ids" in tracer._generate_kwargs:
        raise TraceError(at_line(
            "lm.generator.streamer.output with decoder_input_ids is not supported: read "
            "the step's token from lm.generator.output", line))
    return 1


def _streamed_at(generated: Any, prompt: int, step: int) -> torch.Tensor:
    """What ``generate`` put into its streamer at decoding step ``step`` (``streamer.put``
    call #step), from what it returned (its ids, or the ``sequences`` of its output
    object with ``return_dict_in_generate=True``): the ``prompt`` ids before the first
    step, then the token chosen at each step; on the CPU, as transformers puts them."""
    ids = getattr(generated, "sequences", generated)
    if step == 0:
        return ids[:, :prompt].cpu()
    return ids[:, prompt + step - 1].cpu()
