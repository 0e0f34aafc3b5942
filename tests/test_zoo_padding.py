"""Padded traces of the zoo's text architectures (``tests/zoo_padding.py``): two invokes of
different lengths give each prompt's output alone (the plain model's), or are refused
before running; never silently wrong. The architectures that ran padded before the check
per attention still run (none is refused anew). A representative set runs by default,
every text architecture under the ``slow`` marker."""

import pytest

import zoo
import zoo_padding

# refused, with the reason: RWKV ignores its mask (a recurrent model); DeepSeek-V3's tiny
# config fails on a padded batch (a shape error in its attention), so the check's own
# forward pass cannot run
REFUSED = {"rwkv": "ignores the attention_mask", "deepseek_v3": "cannot be told"}


def _check(name: str, backend: str) -> None:
    outcome = zoo_padding.check_padding(name, backend)
    if name in REFUSED:
        assert outcome.startswith("refused") and REFUSED[name] in outcome, outcome
    else:
        assert outcome == "ok", outcome


@pytest.mark.parametrize("name", [n for n in zoo.REPRESENTATIVE if n in zoo_padding.TEXT])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_representative_padding(name, backend):
    _check(name, backend)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_padding.TEXT)
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_zoo_padding(name, backend):
    _check(name, backend)
