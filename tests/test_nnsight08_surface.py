"""nnsight 0.8.1's public surface in fxsight: the names a ported script reaches
(``TransformersModel``, ``Object``, ``NNsightDeprecationWarning``, the envoy's ``parent`` /
``root`` / ``device`` / ``devices``, chained ``cpu()``, the deprecated ``model.iter``), and the
names of what fxsight does not do (NDIF's functions, ``CONFIG``, ``VisionLanguageModel``,
``DiffusionModel``, ``pipe``), which raise ``UnsupportedError`` at the line that uses them.

Values are checked against the plain model run with forward hooks, on both backends."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import fxsight
from models import tiny_gpt2, train_tokenizer

BACKENDS = ["fx", "hooks"]
PROMPTS = ["The cat sat on the mat and looked at the dog", "Paris"]


def _bert(cls, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, pad_token_id=0, **extra)
    return cls(config).eval()


def _right_padded(tokenizer, prompts):
    tokenizer.padding_side = "right"
    return tokenizer(prompts, padding=True, return_tensors="pt")


def _hooked(module, model, inputs):
    """``model(**inputs)`` with a forward hook keeping ``module``'s output."""
    kept = {}
    handle = module.register_forward_hook(lambda m, a, out: kept.setdefault("out", out))
    try:
        with torch.no_grad():
            result = model(**inputs)
    finally:
        handle.remove()
    return result, kept["out"]


# --- the top-level namespace -------------------------------------------------------------
def test_namespace_holds_no_typing_helpers_and_lists_nnsight_names():
    assert not hasattr(fxsight, "Any")
    assert not hasattr(fxsight, "annotations")
    names = dir(fxsight)
    for name in ("TransformersModel", "LanguageModel", "Object", "CONFIG",
                 "NNsightDeprecationWarning", "VisionLanguageModel", "DiffusionModel",
                 "login", "status", "compare", "UnsupportedError"):
        assert name in names, name
        assert name in fxsight.__all__, name
    assert issubclass(fxsight.NNsightDeprecationWarning, FutureWarning)
    assert issubclass(fxsight.UnsupportedError, NotImplementedError)


# --- TransformersModel ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_model_wraps_a_causal_lm_like_language_model(backend):
    tokenizer = train_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer)).eval()
    wrapped = fxsight.TransformersModel(model, tokenizer=tokenizer)
    assert wrapped.task == "text-generation"
    assert wrapped.tokenizer is tokenizer
    assert wrapped.processor is None and wrapped.image_processor is None
    assert wrapped.attn_implementation == model.config._attn_implementation
    with wrapped.trace(PROMPTS, backend=backend):
        hidden = wrapped.transformer.h[0].output[:, -1].save()
        logits = wrapped.output.logits[:, -1].save()
    for row, prompt in enumerate(PROMPTS):
        alone, expected = _hooked(model.transformer.h[0], model,
                                  dict(tokenizer(prompt, return_tensors="pt")))
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(hidden[row], expected[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row], alone.logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_model_sequence_classification_pads_right(backend):
    """An encoder's prompts are padded on the right (as nnsight and the tokenizer pad them):
    BERT's pooler reads position 0, every row's [CLS]-like first token."""
    tokenizer = train_tokenizer()
    model = _bert(BertForSequenceClassification, num_labels=3)
    wrapped = fxsight.TransformersModel(model, tokenizer=tokenizer)
    assert wrapped.task == "text-classification"
    with wrapped.trace(PROMPTS, backend=backend):
        layer = wrapped.bert.encoder.layer[0].output.save()
        first = wrapped.bert.encoder.layer[1].output.token[0].save()
        logits = wrapped.output.logits.save()
    batch = _right_padded(train_tokenizer(), PROMPTS)
    plain, expected = _hooked(model.bert.encoder.layer[0], model, dict(batch))
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(logits, plain.logits, atol=1e-5, rtol=1e-5)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(layer[mask], expected[mask], atol=1e-5, rtol=1e-5)
    _, last = _hooked(model.bert.encoder.layer[1], model, dict(batch))
    last = last[0] if isinstance(last, tuple) else last
    torch.testing.assert_close(first, last[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_of_an_encoder_classifies_each_prompt_as_alone(backend):
    """LanguageModel of a BERT classifier: a batch of prompts of different lengths gives
    each prompt's logits alone (was: left padding put a pad where the pooler reads)."""
    tokenizer = train_tokenizer()
    model = _bert(BertForSequenceClassification, seed=1, num_labels=2)
    lm = fxsight.LanguageModel(model, tokenizer=tokenizer)
    with lm.trace(PROMPTS, backend=backend):
        logits = lm.output.logits.save()
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer(p, return_tensors="pt")).logits
                           for p in PROMPTS])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_transformers_model_loads_a_saved_masked_lm_with_its_task(tmp_path):
    tokenizer = train_tokenizer()
    model = _bert(BertForMaskedLM, seed=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    wrapped = fxsight.TransformersModel(str(tmp_path))
    assert wrapped.task == "fill-mask"
    with wrapped.trace("The cat sat"):
        logits = wrapped.output.logits.save()
    assert type(wrapped._module) is BertForMaskedLM
    with torch.no_grad():
        expected = model(**tokenizer("The cat sat", return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_transformers_model_task_chooses_the_auto_class(tmp_path):
    tokenizer = train_tokenizer()
    _bert(BertForMaskedLM, seed=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    wrapped = fxsight.TransformersModel(str(tmp_path), task="text-classification",
                                        num_labels=4)
    with wrapped.trace("Paris"):
        logits = wrapped.output.logits.save()
    assert type(wrapped._module) is BertForSequenceClassification
    assert logits.shape == (1, 4)


@pytest.mark.parametrize("given", [{"processor": object()}, {"image_processor": object()},
                                   {"feature_extractor": object()}, {"peft": "org/adapter"},
                                   {"task": "image-classification"}])
def test_transformers_model_refuses_what_it_cannot_do(given):
    tokenizer = train_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    with pytest.raises(fxsight.UnsupportedError, match=next(iter(given))):
        fxsight.TransformersModel(model, tokenizer=tokenizer, **given)


def test_pipe_pipeline_and_adapters_are_refused_naming_what_to_use():
    tokenizer = train_tokenizer()
    wrapped = fxsight.TransformersModel(tiny_gpt2(vocab_size=len(tokenizer)),
                                        tokenizer=tokenizer)
    with pytest.raises(fxsight.UnsupportedError, match="generate"):
        wrapped.pipe("Paris", max_new_tokens=2)
    with pytest.raises(fxsight.UnsupportedError, match="pipeline"):
        wrapped.pipeline
    with pytest.raises(fxsight.UnsupportedError, match="adapter"):
        wrapped.load_adapter("org/adapter")


# --- what fxsight does not do: refused at the line -----------------------------------------
@pytest.mark.parametrize("name", ["login", "whoami", "register", "status", "ndif_status",
                                  "is_model_running", "compare"])
def test_ndif_functions_raise_at_the_line(name):
    with pytest.raises(fxsight.UnsupportedError, match="locally") as info:
        getattr(fxsight, name)("key")
    assert "test_nnsight08_surface.py" in str(info.value)


def test_config_is_refused_when_read_or_set():
    with pytest.raises(fxsight.UnsupportedError, match="CONFIG.set_default_api_key"):
        fxsight.CONFIG.set_default_api_key("key")
    with pytest.raises(fxsight.UnsupportedError, match="CONFIG.APP"):
        fxsight.CONFIG.APP.REMOTE_LOGGING = False
    with pytest.raises(fxsight.UnsupportedError, match="CONFIG.API"):
        fxsight.CONFIG.API = None


@pytest.mark.parametrize("name", ["VisionLanguageModel", "DiffusionModel"])
def test_other_modalities_are_refused_on_construction(name):
    cls = getattr(fxsight, name)
    with pytest.raises(fxsight.UnsupportedError, match="fxsight.NNsight"):
        cls("org/model", dispatch=True)


# --- the envoy -------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
        self.shared = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(self.shared(self.inner(x)))


def test_object_is_the_type_of_a_traced_value():
    net = fxsight.NNsight(_Net())
    with net.trace(torch.ones(1, 3)):
        assert isinstance(net.inner.output, fxsight.Object)


def test_envoy_parent_root_device_devices():
    module = _Net()
    net = fxsight.NNsight(module)
    linear = net.inner[0]
    assert linear.parent is net.inner
    assert net.inner.parent is net
    assert net.parent is None
    assert linear.root is net
    assert linear.device == torch.device("cpu")
    assert net.devices == {torch.device("cpu")}
    assert net.inner[1].device is None  # (no parameters)
    assert net.inner[1].devices == set()
    # (they never hide the model's own names: a submodule or attribute comes first)
    module = torch.nn.Module()
    module.parent = torch.nn.Linear(2, 2)
    module.device = "mine"
    module.forward = lambda x: module.parent(x)
    net = fxsight.NNsight(module)
    assert net.parent._module is module.parent
    assert net.device == "mine"


def test_module_methods_that_chain_return_the_envoy():
    module = _Net()
    net = fxsight.NNsight(module)
    assert net.inner.cpu() is net.inner
    assert net.inner[0].train(False) is net.inner[0]
    assert net.cpu() is net
    with net.trace(torch.ones(2, 3)):
        out = net.inner.output.save()
    torch.testing.assert_close(out, module.inner(torch.ones(2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_iter_is_tracer_iter_with_a_deprecation_warning(backend):
    module = _Net()
    net = fxsight.NNsight(module)
    x = torch.randn(2, 3)
    with net.trace(x, backend=backend):
        with pytest.warns(fxsight.NNsightDeprecationWarning, match="tracer.iter"):
            steps = net.iter[1]
        with steps:
            second = net.shared.output.save()
    calls = []
    handle = module.shared.register_forward_hook(lambda m, a, out: calls.append(out))
    try:
        module(x)
    finally:
        handle.remove()
    torch.testing.assert_close(second, calls[1])


@pytest.mark.parametrize("name", ["trace", "session", "edit", "scan"])
def test_a_submodule_trace_names_how_to_trace_it_alone(name):
    net = fxsight.NNsight(_Net())
    with pytest.raises(AttributeError, match=r"fxsight\.NNsight\(envoy\._module\)"):
        getattr(net.inner, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(getattr(net, name))


# --- the tracer ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_barrier_takes_nnsight_keyword_n(backend):
    """``tracer.barrier(n=2)`` (nnsight 0.8's parameter name): a patch from one invoke into
    another, as a forward hook writing the clean rows' value does."""
    module = _Net()
    net = fxsight.NNsight(module)
    clean_x, corrupt_x = torch.randn(1, 3), torch.randn(1, 3)
    with net.trace(backend=backend) as tracer:
        barrier = tracer.barrier(n=2)
        with tracer.invoke(clean_x):
            clean = net.inner.output[:, 1]
            barrier()
        with tracer.invoke(corrupt_x):
            barrier()
            net.inner.output[:, 1] = clean
            patched = net.output.save()
    clean_inner = module.inner(clean_x)

    def patch(m, args, out):
        out = out.clone()
        out[:, 1] = clean_inner[:, 1]
        return out

    handle = module.inner.register_forward_hook(patch)
    try:
        expected = module(corrupt_x)
    finally:
        handle.remove()
    torch.testing.assert_close(patched, expected)
