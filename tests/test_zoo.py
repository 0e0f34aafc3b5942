"""The architecture zoo (``tests/zoo.py``): tiny random-init transformers models traced with
default arguments; save, patch and replace on a layer equal hand-written forward hooks.

A representative set (one or two per family) runs by default; every architecture runs
under the ``slow`` marker (``pytest -m slow tests/test_zoo.py``). ``python -m tests.zoo
--write`` regenerates ``docs/models.md``.
"""

import pytest

import zoo

# where they run today with default arguments (use_cache=True: a cache object in the
# output sends decoders to hooks until capture passes cache objects through)
CAPTURED = {"bert", "vit", "resnet", "wav2vec2"}


def _check(name, **kw):
    result = zoo.check(zoo.BY_NAME[name], **kw)
    if not result.checks:
        pytest.skip(result.reason)
    assert result.ok, (result.backend, result.reason, result.checks)
    return result


@pytest.mark.parametrize("name", zoo.REPRESENTATIVE)
def test_representative(name):
    result = _check(name, invokes=True)
    if name in CAPTURED:
        assert result.backend == "fx", result.reason
    assert result.backend in ("fx", "partly fx", "hooks")
    if result.backend == "hooks":
        assert result.reason  # the fallback is said, with its reason


@pytest.mark.parametrize("name", ["mixtral-eager", "qwen3_moe-eager"])
def test_moe_with_eager_experts_runs_partly_on_fx(name):
    # (use_cache=False: the rest of the model is captured whatever the cache support)
    result = _check(name, extra={"use_cache": False}, invokes=True)
    assert result.backend == "partly fx", result.reason
    assert result.opaque == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [a.name for a in zoo.ZOO])
def test_zoo(name):
    _check(name)


def test_switch_transformers_runs_partly_on_fx():
    # its sparse layers route by data (experts) and move their own submodule while
    # tracing (router: ``self.classifier = self.classifier.to(...)``); its encoder cannot be
    # traced without an attention mask (transformers builds the mask only when not
    # compiling): each runs as an opaque call, the rest is captured
    result = _check("switch_transformers", extra={"use_cache": False})
    assert result.backend == "partly fx", result.reason
    assert "encoder" in result.opaque
    assert any(path.endswith("mlp.experts") for path in result.opaque), result.opaque
