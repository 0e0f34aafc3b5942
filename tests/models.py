"""Small, offline, random-init models and tokenizers for the fxsight test-suite.

This is a helper module, not a test file.  Everything here is built locally
(no network, no downloaded weights) and takes well under a second.

Usage from tests (``tests/conftest.py`` puts this directory on ``sys.path``)::

    from models import tiny_gpt2, tiny_llama, mlp, train_tokenizer
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

__all__ = [
    "CORPUS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "tiny_gpt2",
    "tiny_llama",
    "mlp",
    "train_tokenizer",
    "saved_language_model",
]

# Special tokens of the test tokenizer.  They always get ids 0..3 (in this
# order), so ids 0..3 are also valid special-token ids for any model whose
# vocab_size >= 4.
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# A small built-in English corpus for training the tokenizer.
CORPUS: list[str] = [
    "The Eiffel Tower is in the city of Paris",
    "The Colosseum is in the city of Rome",
    "The Brandenburg Gate is in the city of Berlin",
    "The Statue of Liberty is in the city of New York",
    "Big Ben is in the city of London",
    "The Sagrada Familia is in the city of Barcelona",
    "The Acropolis is in the city of Athens",
    "The Golden Gate Bridge is in the city of San Francisco",
    "The Space Needle is in the city of Seattle",
    "The Little Mermaid is in the city of Copenhagen",
    "The capital of France is Paris",
    "The capital of Italy is Rome",
    "The capital of Germany is Berlin",
    "The capital of Spain is Madrid",
    "The capital of England is London",
    "The capital of Japan is Tokyo",
    "Paris is a city in France",
    "Rome is a city in Italy",
    "The quick brown fox jumps over the lazy dog",
    "A cat sat on the mat and looked at the dog",
    "The sun rises in the east and sets in the west",
    "Water boils at one hundred degrees",
    "She went to the market to buy some bread and milk",
    "He reads a book every night before he goes to sleep",
    "The children played in the park after school",
    "It was a bright cold day in April",
    "The train to the city leaves at nine in the morning",
    "We walked along the river and talked about the weather",
    "The museum is open from Monday to Friday",
    "My favourite colour is blue, and hers is green.",
    "Two plus two is four; three plus three is six.",
    "Where is the station? It is next to the old bridge!",
    "The teacher asked the students to write a short story",
    "The doctor said that the patient would be fine",
    "Birds fly south for the winter",
    "The old man and the sea is a famous novel",
]

# GPT-2 byte -> unicode table (filled lazily); used to put every printable
# ASCII character into the alphabet so such text never encodes to <|unk|>.
_BYTE_TO_UNICODE: dict[int, str] = {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode-character mapping."""
    if _BYTE_TO_UNICODE:
        return _BYTE_TO_UNICODE
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    _BYTE_TO_UNICODE.update({b: chr(c) for b, c in zip(bs, cs)})
    return _BYTE_TO_UNICODE


def _printable_ascii_alphabet() -> list[str]:
    """Byte-level symbols of printable ASCII plus ``\\n`` and ``\\t`` (97 symbols)."""
    table = _bytes_to_unicode()
    codes = list(range(0x20, 0x7F)) + [ord("\n"), ord("\t")]
    return [table[c] for c in codes]


# Cache: vocab_size -> serialized trained `tokenizers.Tokenizer` (JSON string).
_TOKENIZER_CACHE: dict[int, str] = {}


def _train_raw_tokenizer(vocab_size: int) -> str:
    """Train a byte-level BPE on :data:`CORPUS`; return it serialized as JSON."""
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=_printable_ascii_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def train_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """Return a small byte-level BPE tokenizer trained on :data:`CORPUS`.

    The tokenizer always contains the 4 special tokens (``<|pad|>``=0,
    ``<|bos|>``=1, ``<|endoftext|>``=2 used as EOS, ``<|unk|>``=3) and every
    printable ASCII character plus ``\\n``/``\\t``, so the real vocabulary size
    is ``max(vocab_size, 101)``; use ``len(tokenizer)`` for the exact value.
    No BOS/EOS is added automatically when encoding (GPT-2 style), and
    ``padding_side == "left"``.

    Training happens once per ``vocab_size`` (cached in a module-level dict);
    every call returns a fresh, independent ``PreTrainedTokenizerFast`` so
    tests may mutate it freely.
    """
    raw = _TOKENIZER_CACHE.get(vocab_size)
    if raw is None:
        raw = _TOKENIZER_CACHE[vocab_size] = _train_raw_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(raw),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _special_token_ids(vocab_size: int) -> dict[str, int]:
    """Special-token ids that are guaranteed to lie inside ``vocab_size``."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _seeded_model(model_class: type, config_class: type, config_kwargs: dict[str, Any],
                  config_overrides: dict[str, Any], seed: int) -> Any:
    """``model_class`` built from ``config_class(**config_kwargs, **config_overrides)``
    (overrides win) under ``torch.manual_seed(seed)``, in eval mode; the global RNG is left
    as it was."""
    config = config_class(**{**config_kwargs, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def tiny_gpt2(
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    vocab_size: int = 128,
    seed: int = 0,
    **config_overrides: Any,
) -> GPT2LMHeadModel:
    """Build a small randomly initialised ``GPT2LMHeadModel`` in eval mode.

    Special-token ids are the ones of :func:`train_tokenizer` (pad=0, bos=1,
    eos=2), so they are inside the vocabulary.  Extra keyword arguments are
    passed to ``GPT2Config`` (e.g. ``n_positions=64``).  Deterministic for a
    given ``seed``.
    """
    config_kwargs: dict[str, Any] = dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=256,
        **_special_token_ids(vocab_size),
    )
    return _seeded_model(GPT2LMHeadModel, GPT2Config, config_kwargs, config_overrides, seed)


def tiny_llama(
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 128,
    seed: int = 0,
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """Build a small randomly initialised ``LlamaForCausalLM`` in eval mode.

    Uses grouped-query attention by default (4 query heads, 2 KV heads).
    Special-token ids are the ones of :func:`train_tokenizer` (pad=0, bos=1,
    eos=2).  Extra keyword arguments are passed to ``LlamaConfig``.
    Deterministic for a given ``seed``.
    """
    config_kwargs: dict[str, Any] = dict(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        **_special_token_ids(vocab_size),
    )
    return _seeded_model(LlamaForCausalLM, LlamaConfig, config_kwargs, config_overrides,
                         seed)


class ReluNet(torch.nn.Module):
    """A forward of plain calls for ``.source``: ``out(relu(fc(x)) * 2)``, Linear(3, 3) then
    Linear(3, 2) (default initialization: seed it where values matter)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h * 2)


def mlp(seed: int = 0) -> torch.nn.Sequential:
    """Build the 5 -> 10 -> 10 -> 2 toy MLP (named layers) in eval mode.

    Modules: ``layer1`` Linear(5, 10), ``act1`` ReLU, ``layer2`` Linear(10, 10),
    ``act2`` Sigmoid, ``layer3`` Linear(10, 2).  Deterministic for a given
    ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            OrderedDict(
                layer1=torch.nn.Linear(5, 10),
                act1=torch.nn.ReLU(),
                layer2=torch.nn.Linear(10, 10),
                act2=torch.nn.Sigmoid(),
                layer3=torch.nn.Linear(10, 2),
            )
        )
    return model.eval()


def saved_language_model(
    tmp_path: str | os.PathLike[str],
    kind: str = "gpt2",
    seed: int = 0,
) -> str:
    """Save a tiny causal LM plus a matching tokenizer into ``tmp_path``.

    ``kind`` is ``"gpt2"`` or ``"llama"``.  The model's ``vocab_size`` equals
    ``len(train_tokenizer())``.  Both are written with ``save_pretrained`` so
    ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)`` load them back offline.
    Returns the directory as a ``str``.
    """
    tokenizer = train_tokenizer()
    vocab_size = len(tokenizer)
    if kind == "gpt2":
        model: GPT2LMHeadModel | LlamaForCausalLM = tiny_gpt2(
            vocab_size=vocab_size, seed=seed
        )
    elif kind == "llama":
        model = tiny_llama(vocab_size=vocab_size, seed=seed)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected 'gpt2' or 'llama'")
    path = os.fspath(tmp_path)
    os.makedirs(path, exist_ok=True)
    # save_pretrained shows a "Writing model shards" tqdm bar; hide it here only.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    return path
