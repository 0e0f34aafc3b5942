"""nnsight's names for what fxsight does not do: NDIF's remote service (``login``,
``status``, ``compare``, ...), nnsight's settings object (``CONFIG``) and the model classes
of other modalities (``VisionLanguageModel``, ``DiffusionModel``). Each exists so that a
ported script fails at its first line that uses one, with an :class:`UnsupportedError`
saying what to write instead, never later and never silently."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import UnsupportedError, at_line, user_line

_LOCAL = ("fxsight runs every trace locally, on the model in this process (there is no "
          "NDIF client, account or API key)")


def _refuse(what: str, instead: str) -> UnsupportedError:
    return UnsupportedError(at_line(f"{what} is not supported: {_LOCAL}; {instead}",
                                    user_line()))


def _ndif_function(name: str, instead: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise _refuse(f"nnsight.{name}() (NDIF's remote service)", instead)

    refused.__name__ = refused.__qualname__ = name
    refused.__doc__ = (f"nnsight's ``{name}()`` of NDIF's remote service: not supported, "
                       f"raises :class:`~fxsight.UnsupportedError` ({instead}).")
    return refused


_DROP_IT = "remove the line"
login = _ndif_function("login", _DROP_IT)
whoami = _ndif_function("whoami", _DROP_IT)
register = _ndif_function("register", "remove the line (a local module needs no "
                                      "registering)")
status = _ndif_function("status", "load the model locally and trace it")
ndif_status = _ndif_function("ndif_status", "load the model locally and trace it")
is_model_running = _ndif_function("is_model_running", "load the model locally and trace it")
compare = _ndif_function("compare", "there is no remote environment to compare with")


class _Config:
    """nnsight's ``CONFIG`` (its NDIF host and API key, remote logging, its mount of
    ``.save()`` on every object, its debug tracebacks): none maps to anything of fxsight's,
    so reading or setting any of it raises :class:`~fxsight.UnsupportedError` at that line
    (``CONFIG.set_default_api_key(key)``, ``CONFIG.APP.REMOTE_LOGGING = False``)."""

    _INSTEAD = ("remove the line (fxsight's `.save()` works on traced values and "
                "`fxsight.save(value)` on any, its errors name your line without a debug "
                "setting)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise _refuse(f"nnsight.CONFIG.{name}", self._INSTEAD)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _refuse(f"nnsight.CONFIG.{name} = ...", self._INSTEAD)

    def __repr__(self) -> str:
        return "<fxsight.CONFIG: nnsight's settings, none supported (fxsight runs locally)>"


CONFIG = _Config()


class _RefusedModel:
    """Base of nnsight's model classes that fxsight does not provide: constructing one
    raises :class:`~fxsight.UnsupportedError` naming what to use instead."""

    _what = ""
    _instead = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedError(at_line(
            f"{type(self).__name__} ({self._what}) is not supported by fxsight: "
            f"{self._instead}", user_line()))


class VisionLanguageModel(_RefusedModel):
    """nnsight's vision-language model class (a processor's images and text): not supported;
    raises :class:`~fxsight.UnsupportedError` on construction."""

    _what = "images and text through a processor"
    _instead = ("load the model with transformers and wrap it, `fxsight.NNsight(model)`, "
                "then trace it on the processor's output: `with "
                "model.trace(**processor(images=..., text=..., return_tensors='pt')):`")


class DiffusionModel(_RefusedModel):
    """nnsight's diffusers pipeline class: not supported; raises
    :class:`~fxsight.UnsupportedError` on construction."""

    _what = "a diffusers pipeline"
    _instead = ("wrap the pipeline's denoiser, `fxsight.NNsight(pipe.unet)` (or "
                "`pipe.transformer`), and trace one call of it on its inputs")
