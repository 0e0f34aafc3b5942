"""The documentation's Python examples run as written.

Every ```` ```python ```` block of the user-facing documents is run, the blocks of one
document in order in one namespace (a later block uses what an earlier one defined, as a
reader running them one after the other would). A block right after a line
``<!-- not-run: why -->`` is a fragment or needs what this machine has not (GPUs, a 70B
checkpoint) and is skipped; nothing else is.

What a test cannot take from the hub or the user is supplied here, in the test only:

- a hub model name (``"gpt2"``, ``"meta-llama/Llama-2-7b-hf"``) or a placeholder path is
  replaced, in the block's text, by the directory of a tiny random-init GPT-2 saved with
  :func:`models.saved_language_model`'s recipe; its tokenizer is :func:`models.train_tokenizer`
  with the examples' words added as tokens, so that they split as GPT-2 splits them (``"The
  Eiffel Tower is in"`` and ``"The Colosseum is in"`` are 7 tokens each, ``" Paris"`` one);
- names an example leaves to the reader (``my_module``, ``x``, ``steer``, ``model``,
  ``tokenizer``, ``load_pairs``, ``metric``) are put in the namespace before the document's
  first block (:data:`_GIVEN`);
- ``compile=True`` in ``lm.generate`` becomes ``compile=False`` (inductor takes minutes on a
  shared CPU; compiled generation is ``tests/test_compile.py``'s), and where pandas is not
  installed ``result.to_dataframe()`` becomes ``result.to_records()``, its stated
  alternative.

Every substitution must match (a document that no longer has the text fails here), and
some of the documents' claims are checked against plain PyTorch after their blocks ran.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from models import mlp, tiny_gpt2, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "docs/porting.md", "docs/sweeps.md", "docs/scaling.md",
             "docs/source.md", "docs/models.md", "docs/architecture.md"]

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not-run\b.*?-->\s*\Z", re.S)

# Words of the examples, added as whole tokens so that they split as GPT-2 splits them.
_GPT2_PIECES = ["The", " E", "iff", "el", " Tower", " is", " in", " Col", "os", "se", "um",
                " Paris", " Rome", "Once", " upon", " a", " time"]


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """The ``python`` blocks of a markdown text, each with whether it is to run."""
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[:match.start()].rstrip()
        blocks.append((match.group(1), not _NOT_RUN.search(before)))
    return blocks


def _tokenizer():
    tokenizer = train_tokenizer()
    tokenizer.add_tokens([p for p in _GPT2_PIECES if p not in tokenizer.get_vocab()])
    return tokenizer


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, str]:
    """Directories of tiny GPT-2s and their tokenizer: 7 layers (the examples read
    ``h[6]``) and 2 layers (sweeps)."""
    from transformers.utils import logging as hf_logging
    tokenizer = _tokenizer()
    paths = {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for name, layers in (("seven", 7), ("two", 2)):
            path = tmp_path_factory.mktemp(f"docs_{name}")
            tiny_gpt2(n_layer=layers, n_embd=16, n_head=4,
                      vocab_size=len(tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
            paths[name] = os.fspath(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return paths


def _readme_given(paths: dict[str, str]) -> dict[str, Any]:
    return {"my_module": mlp(), "x": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
            "steer": torch.full((16,), 0.5)}


def _sweeps_given(paths: dict[str, str]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return {"model": AutoModelForCausalLM.from_pretrained(paths["two"]).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(paths["two"])}


def _scaling_given(paths: dict[str, str]) -> dict[str, Any]:
    tokenizer = _tokenizer()
    paris, rome = tokenizer(" Paris")["input_ids"][0], tokenizer(" Rome")["input_ids"][0]
    return {"load_pairs": lambda: [("The Eiffel Tower is in", "The Colosseum is in")],
            "metric": lambda logits: logits[:, -1, paris] - logits[:, -1, rome]}


# document -> (what the reader brings, {text in the document: its stand-in})
_GIVEN: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "README.md": _readme_given, "docs/sweeps.md": _sweeps_given,
    "docs/scaling.md": _scaling_given}
_SUBSTITUTED: dict[str, dict[str, str]] = {
    "README.md": {'"path/to/local/model"': "{seven}",
                  'max_new_tokens=8, compile=True': "max_new_tokens=8, compile=False"},
    "docs/scaling.md": {'"meta-llama/Llama-2-7b-hf"': "{two}",
                        '"/shared/sweeps/ioi.ckpt"': "'ioi.ckpt'"},
    "docs/source.md": {'"gpt2"': "{two}"},
}


def _substitute(document: str, code: str, paths: dict[str, str], used: set[str]) -> str:
    for old, new in _SUBSTITUTED.get(document, {}).items():
        if old in code:
            used.add(old)
            code = code.replace(old, new.format(**{k: repr(v) for k, v in paths.items()}))
    if importlib.util.find_spec("pandas") is None:
        code = code.replace("result.to_dataframe()", "result.to_records()")
    return code


def run_document(document: str, paths: dict[str, str]) -> dict[str, Any]:
    """Run a document's blocks in one namespace; return it."""
    text = (ROOT / document).read_text()
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    namespace.update(_GIVEN.get(document, lambda _: {})(paths))
    used: set[str] = set()
    for index, (code, runs) in enumerate(python_blocks(text)):
        if not runs:
            continue
        code = _substitute(document, code, paths, used)
        exec(compile(code, f"{document} (python block {index})", "exec"), namespace)
    missing = set(_SUBSTITUTED.get(document, {})) - used
    assert not missing, f"{document} no longer has {sorted(missing)}: update the test"
    return namespace


def test_blocks_are_found_and_marked():
    """The parser finds each document's blocks, and a not-run marker skips only the next."""
    text = ("a\n\n```python\nx = 1\n```\n\n<!-- not-run: fragment -->\n```python\ny\n```\n"
            "\n```python\nz = 2\n```\n```sh\nls\n```\n")
    assert python_blocks(text) == [("x = 1\n", True), ("y\n", False), ("z = 2\n", True)]
    counts = {d: len(python_blocks((ROOT / d).read_text())) for d in DOCUMENTS}
    assert counts["README.md"] == 2 and counts["docs/source.md"] == 7, counts


def test_readme(saved_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_document("README.md", saved_models)
    # the first example against the same edits by hand
    m, x = mlp(), ns["x"]
    with torch.no_grad():
        h = m.layer1(x)
        edited = m.layer2(m.act1(h))
        edited[:, 0] = 0
        y = m.layer3(m.act2(edited)) * 2 + h.mean()
    assert ns["tracer"] is not None and torch.equal(ns["h"], h)
    assert torch.equal(ns["a"], m.act1(h)) and torch.allclose(ns["y"], y)
    assert (tmp_path / "heatmap.png").exists()


def test_sweeps(saved_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_document("docs/sweeps.md", saved_models)
    assert ns["result"].n_pairs == 2 and (tmp_path / "patching.png").exists()


def test_scaling(saved_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_document("docs/scaling.md", saved_models)
    saved = torch.load(tmp_path / "ioi.pt")
    assert torch.equal(saved["mean"], ns["result"].values)
    assert next(ns["lm"]._model.parameters()).dtype == torch.bfloat16


def test_source(saved_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_document("docs/source.md", saved_models)
    hf = ns["hf"]
    ids = ns["tokenizer"]("The Eiffel Tower is in", return_tensors="pt").input_ids
    assert len(ns["patterns"]) == 3  # the generate example's, one per step
    # the grouped-query example: step 0's repeated key heads, a later step's grouped queries
    assert tuple(ns["keys"].shape) == (2, 8, 4, 8)
    assert tuple(ns["queries"].shape) == (2, 2, 4, 8)
    with torch.no_grad():
        attentions = hf(ids, output_attentions=True, use_cache=False).attentions
    assert torch.equal(ns["probabilities"], attentions[0])
    assert torch.equal(ns["returned"], attentions[0])
    # zeroing head 3's probabilities in layer 1 = zeroing its columns of c_proj's input
    width = hf.config.n_embd // hf.config.n_head

    def zero_head(module, args):
        value = args[0].clone()
        value[..., 3 * width:4 * width] = 0
        return (value,)

    handle = hf.transformer.h[1].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = hf(ids, use_cache=False).logits
    finally:
        handle.remove()
    assert torch.allclose(ns["logits"], expected, atol=1e-6)
    assert (tmp_path / "attention.png").exists()


@pytest.mark.parametrize("document", ["docs/porting.md", "docs/models.md",
                                      "docs/architecture.md"])
def test_documents_without_runnable_examples(document, saved_models):
    run_document(document, saved_models)


def test_nnsight_wrapper_generate_in_a_with_raises_before_generating(saved_models):
    """nnsight traces ``with NNsight(model).generate(...)`` (any method of the model in a
    with); fxsight traces generation with a LanguageModel. The wrapper's ``generate`` in a
    with statement is refused before anything is generated, saying what to write; called
    without a with, it is the model's own ``generate``, as before."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from fxsight import NNsight, TraceError

    class Counting(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1

        def end(self):
            pass

    hf = AutoModelForCausalLM.from_pretrained(saved_models["two"]).eval()
    net = NNsight(hf)
    ids = torch.tensor([[5, 6, 7]])
    streamer = Counting()
    with pytest.raises(TraceError, match=r"LanguageModel\(model, tokenizer="):
        with net.generate(ids, max_new_tokens=2, do_sample=False, streamer=streamer):
            pass
    assert streamer.calls == 0  # nothing generated
    plain = net.generate(ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(plain, hf.generate(ids, max_new_tokens=2, do_sample=False))

    def helper():
        return net.generate(ids, max_new_tokens=2, do_sample=False)

    assert torch.equal(helper(), plain)  # returned by a helper: the plain call
    assert not hasattr(NNsight(mlp()), "generate")
