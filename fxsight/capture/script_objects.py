"""Modules holding TorchScript objects that ``torch.export`` cannot capture: the packed
weights of a quantized module (``torch.ao.quantization.quantize_dynamic``'s ``Linear``
keeps them in a ``torch.classes.quantized.LinearPackedParamsBase``). A capture names the
module before anything runs, rather than export's error, which names none."""

from __future__ import annotations

import torch

from .._torch import script_object_class


def script_object_reason(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(path, why)`` of the first module of ``model`` whose attributes hold a
    ``torch.ScriptObject`` that export cannot trace (one without ``__obj_flatten__``, the
    method by which export makes a fake of it), else ``None``."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.ScriptObject) and \
                    not hasattr(value, "__obj_flatten__"):
                kind = script_object_class(value)
                what = ": a quantized module's packed weights" if ".quantized." in kind else ""
                return path, (f"module {path or 'model'!r} ({type(module).__name__}) holds "
                              f"a TorchScript object in {name!r} ({kind}{what}), which "
                              f"torch.export cannot capture")
    return None
