"""TransformersModel: nnsight 0.8's class for a transformers model of any task, for the text
tasks fxsight handles (causal and encoder-decoder language models, masked language models,
encoders such as BERT, sequence and token classification, question answering).

``TransformersModel(repo_id_or_module, task=None, tokenizer=None, ...)`` takes nnsight
0.8's arguments: a local path loads as :class:`~fxsight.LanguageModel` loads it, with the
task's auto class (``task="fill-mask"``: ``AutoModelForMaskedLM``; without ``task``, the one
the config's ``architectures`` name); a module given is wrapped as it is. Its inputs are a
``LanguageModel``'s (text, token ids, a dict of tensors); a model that does not generate (an
encoder) is padded on the right, as nnsight pads it, so that position 0 is every row's first
token (BERT's pooler reads it). What nnsight reaches through a ``transformers.pipeline``
(``pipe``, ``pipeline``, a ``processor`` of images or audio, a PEFT adapter by hub id) is
refused with :class:`~fxsight.UnsupportedError` naming what to write instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import UnsupportedError, at_line, user_line
from .language_model import LanguageModel
from .nnsight import CLASS_ENVOYS

# task -> the transformers auto class its checkpoint loads with (text tasks)
_TASK_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "summarization": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "sentiment-analysis": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "ner": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
}
# the suffix of an architecture's class name -> its task (as nnsight infers it)
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForImageTextToText", "image-text-to-text"),
)
_PREPROCESSORS = ("processor", "image_processor", "feature_extractor")


class TransformersModel(LanguageModel):
    """A transformers model of a text task wrapped for tracing (nnsight 0.8's
    ``TransformersModel``), with a :class:`~fxsight.LanguageModel`'s inputs and methods
    (``trace``, ``generate``, ``scan``, ``edit``, ``session``, ``dispatch``, ``tokenizer``).

    ``TransformersModel(repo_id, task=None, tokenizer=None, dispatch=False, **kwargs)``:
    ``repo_id`` a local path (``kwargs`` go to ``from_pretrained``: ``dtype``,
    ``device_map``, ``revision``, ...) or a loaded ``torch.nn.Module``; ``task`` a text
    task of transformers' pipelines (inferred from the model when not given).
    ``processor``, ``image_processor``, ``feature_extractor`` and ``peft`` are accepted as
    ``None`` only."""

    def __init__(self, repo_id: Any, *args: Any, task: str | None = None,
                 tokenizer: Any = None, processor: Any = None, image_processor: Any = None,
                 feature_extractor: Any = None, peft: str | None = None,
                 dispatch: bool = False, backend: str = "auto", compile: Any = None,
                 rename: dict | None = None, envoys: Any = CLASS_ENVOYS, **kwargs: Any):
        line = user_line()
        if args:
            raise TypeError(at_line(
                f"TransformersModel(repo_id, ...) takes its other arguments as keywords "
                f"(task=, tokenizer=, dispatch=, ...), got {len(args)} more positional "
                f"argument{'s' if len(args) > 1 else ''}", line))
        given = {name: value for name, value in zip(
            _PREPROCESSORS, (processor, image_processor, feature_extractor))
            if value is not None}
        if given:
            raise UnsupportedError(at_line(
                f"TransformersModel({', '.join(f'{n}=...' for n in given)}): fxsight "
                f"encodes text with a tokenizer only; run the processor yourself and give "
                f"its tensors to the trace (`with model.trace(**processor(...)):` on "
                f"`fxsight.NNsight(module)`)", line))
        if peft is not None:
            raise UnsupportedError(at_line(
                f"TransformersModel(peft={peft!r}): fxsight loads no adapter; apply it "
                f"with peft and wrap the result (`peft.PeftModel.from_pretrained(module, "
                f"adapter).merge_and_unload()`)", line))
        automodel = kwargs.pop("automodel", None)
        if isinstance(repo_id, torch.nn.Module):
            task = _checked_task(task if task is not None else _module_task(repo_id), line)
        elif isinstance(repo_id, (str, os.PathLike)):
            config = _saved_config(os.fspath(repo_id), kwargs)
            task = _checked_task(task if task is not None else _config_task(config, line),
                                 line)
            if automodel is None:
                automodel = _auto_class(task, config)
        if automodel is None:
            from transformers import AutoModelForCausalLM
            automodel = AutoModelForCausalLM
        super().__init__(repo_id, tokenizer, automodel, dispatch, backend=backend,
                         compile=compile, rename=rename, envoys=envoys, **kwargs)
        object.__setattr__(self, "task", task)
        for name in _PREPROCESSORS:
            object.__setattr__(self, name, None)  # (a text task has none, as in nnsight)

    @property
    def attn_implementation(self) -> str | None:
        """The attention implementation the model runs (its config's), as nnsight's."""
        config = getattr(self._module, "config", None)
        return getattr(config, "_attn_implementation", None)

    @property
    def pipeline(self) -> Any:
        """nnsight's ``transformers.pipeline`` of the model: fxsight builds none
        (an :class:`~fxsight.UnsupportedError`)."""
        raise UnsupportedError(at_line(
            "model.pipeline: fxsight builds no transformers pipeline; build one of the "
            "loaded model outside a trace if you need it (`transformers.pipeline(task, "
            "model=model._module, tokenizer=model.tokenizer)`)", user_line()))

    def pipe(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's traced run of the task's pipeline: not supported (an
        :class:`~fxsight.UnsupportedError`): trace the forward or ``generate`` and decode
        the result yourself."""
        raise UnsupportedError(at_line(
            "model.pipe(...): fxsight traces the model's forward (`model.trace(...)`) and "
            "`model.generate(...)`, not a pipeline's pre- and post-processing; trace "
            "`generate` and decode `tracer.result` with `model.tokenizer.batch_decode`, or "
            "read the logits of a trace", user_line()))

    def load_adapter(self, peft_id: str | None) -> None:
        """nnsight's swap of a PEFT adapter: not supported (an
        :class:`~fxsight.UnsupportedError`)."""
        raise UnsupportedError(at_line(
            "model.load_adapter(...): fxsight loads no adapter; apply it with peft and "
            "wrap the result in a new TransformersModel", user_line()))


def _module_task(module: torch.nn.Module) -> str | None:
    """The task of a loaded module, as nnsight infers it (a model that generates: text
    generation; else its class name's suffix), or ``None`` where none is known (fxsight
    needs none to trace a loaded module)."""
    can_generate = getattr(module, "can_generate", None)
    try:
        if callable(can_generate) and can_generate():
            return "text-generation"
    except Exception:  # (a remote-code model's own can_generate: no task then)
        return None
    names = getattr(getattr(module, "config", None), "architectures", None) or \
        [type(module).__name__]
    return _architecture_task(names)


def _architecture_task(names: list[str]) -> str | None:
    for name in names:
        for suffix, task in _ARCHITECTURE_TASKS:
            if name.endswith(suffix):
                return task
    return None


def _saved_config(path: str, kwargs: dict) -> Any:
    from transformers import AutoConfig

    options = {k: kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir",
                                      "local_files_only", "subfolder") if k in kwargs}
    return AutoConfig.from_pretrained(path, **options)


def _config_task(config: Any, line: Any) -> str:
    task = _architecture_task(getattr(config, "architectures", None) or [])
    if task is None:
        raise ValueError(at_line(
            f"TransformersModel: no task could be inferred from the saved config (its "
            f"architectures: {getattr(config, 'architectures', None)}); pass task=... "
            f"(e.g. task='text-generation')", line))
    return task


def _checked_task(task: str | None, line: Any) -> str | None:
    if task is None or task in _TASK_CLASSES:
        return task
    raise UnsupportedError(at_line(
        f"TransformersModel(task={task!r}): fxsight handles the text tasks "
        f"({', '.join(sorted(_TASK_CLASSES))}); for another model, load it with "
        f"transformers and wrap it: `fxsight.NNsight(model)`", line))


def _auto_class(task: str, config: Any) -> Any:
    """The auto class ``task``'s checkpoint loads with (text generation of an
    encoder-decoder: a sequence-to-sequence model)."""
    import transformers

    name = _TASK_CLASSES[task]
    if task == "text-generation" and getattr(config, "is_encoder_decoder", False):
        name = "AutoModelForSeq2SeqLM"
    return getattr(transformers, name)
