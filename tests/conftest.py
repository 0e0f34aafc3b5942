# Make helper modules in tests/ (e.g. ``models.py``) importable as top-level
# modules from test files: ``from models import tiny_gpt2``.
# Fixtures may be appended below.
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


# --- fixtures of the core-engine tests (tests/test_core_*.py) -------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: intra-op threads only contend (a tiny GPT-2 forward takes
# ~50 ms with 2 threads on 2 busy cores, ~6 ms with one), above all under pytest-xdist.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def core_gpt2():
    """A tiny random GPT-2 (2 layers, 64 wide, vocab 128), shared read-only by tests."""
    from models import tiny_gpt2
    return tiny_gpt2()


@pytest.fixture(scope="session")
def core_llama():
    """A tiny random Llama (2 layers, 64 wide, vocab 128), shared read-only by tests."""
    from models import tiny_llama
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    """The test tokenizer (:func:`models.train_tokenizer`, 128 tokens), one per test module
    (a module's tests may change its settings)."""
    from models import train_tokenizer
    return train_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    """A tiny random GPT-2 (2 layers, 64 wide) with the test tokenizer's vocabulary, one per
    test module; a module that needs another model defines its own ``gpt2``."""
    from models import tiny_gpt2
    return tiny_gpt2(vocab_size=len(tokenizer))


@pytest.fixture
def core_ids():
    """Token ids of shape (2, 7) for the tiny language models."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, 128, (2, 7), generator=generator)


@pytest.fixture
def reference_hooks():
    """``with reference_hooks(model, hooks={path: fn}, pre_hooks={path: fn}):`` installs
    plain PyTorch forward (pre-)hooks for a hand-written reference, removed afterwards.
    Pre-hooks get ``(module, args, kwargs)`` and may return ``(args, kwargs)``."""
    from hook_references import reference_hooks as installed
    return installed
