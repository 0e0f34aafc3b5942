"""A digest of a model's weights: what tells a checkpoint of a sweep which model wrote it.

:func:`weights_digest` hashes (SHA-256) every parameter and buffer of a module: its name,
dtype, shape and the bytes of its values, in the module's order. It is the same on any
machine for the same weights: the values are read in their logical (row-major) order
whatever their strides and device, as little-endian bytes; a tensor shared under several
names (tied weights) is hashed once and its other names noted as aliases. A parameter that
accelerate offloads (on the meta device, its values in the hook's ``weights_map``, in CPU
memory or on disk) is hashed from those values, as its forward would load them; a meta
tensor with no values anywhere cannot be told apart from another and is refused by name.

Cost: every byte of the model is read once (a tensor at a time, in chunks of
``CHUNK_BYTES`` when it is not in CPU memory): about 1.7 GB/s on one CPU core for SHA-256,
plus the copy from an accelerator (docs/sweeps.md, "Checkpoints").
"""

from __future__ import annotations

import hashlib
import sys
from typing import Iterator

import torch

from ..capture.dispatch import offloaded_value

CHUNK_BYTES = 64 * 2 ** 20

# the unsigned integer type of each element size: a tensor's bytes are read through it
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_digest(module: torch.nn.Module) -> str:
    """The SHA-256 of ``module``'s parameters and buffers (names, dtypes, shapes and
    values), hex; the same on every machine and device for equal weights."""
    digest = hashlib.sha256()
    first_name: dict[int, str] = {}
    for kind, name, tensor in _named_tensors(module):
        if id(tensor) in first_name:  # tied: the same tensor under another name
            digest.update(f"{kind} {name} = {first_name[id(tensor)]}\n".encode())
            continue
        first_name[id(tensor)] = name
        values = _values(module, kind, name, tensor)
        digest.update(f"{kind} {name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        for chunk in _little_endian_chunks(values, name):
            digest.update(chunk)
    return digest.hexdigest()


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for name, parameter in module.named_parameters(remove_duplicate=False):
        yield "parameter", name, parameter
    for name, buffer in module.named_buffers(remove_duplicate=False):
        if buffer is not None:
            yield "buffer", name, buffer


def _values(module: torch.nn.Module, kind: str, name: str, tensor: torch.Tensor
            ) -> torch.Tensor:
    """The tensor's values; for a meta tensor, the values accelerate loads into it."""
    if not tensor.is_meta:
        return tensor.detach()
    value = offloaded_value(module, name)
    if value is None:
        raise ValueError(
            f"the {kind} {name!r} of the model is on the meta device and no accelerate hook "
            f"holds its values: a checkpoint cannot tell whether it was written by this "
            f"model; load the weights (or dispatch the model with accelerate) first, or run "
            f"the sweep without checkpoint=")
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(f"the offloaded values of {name!r} have shape "
                         f"{tuple(value.shape)}, the model's {kind} {tuple(tensor.shape)}")
    return value.detach().to(tensor.dtype)  # (accelerate casts them so when it loads them)


def _little_endian_chunks(values: torch.Tensor, name: str) -> Iterator[memoryview]:
    """The values' bytes in row-major order, little-endian, in chunks of at most
    ``CHUNK_BYTES`` (copied from another device one chunk at a time)."""
    try:
        flat = values.reshape(-1)
        if flat.element_size() not in _WORDS and flat.element_size() % 8 == 0:
            flat = flat.contiguous().view(torch.int64)  # (complex128: two float64 words)
        word = _WORDS[flat.element_size()]
        step = max(1, CHUNK_BYTES // flat.element_size())
        for start in range(0, flat.numel(), step):
            chunk = flat[start:start + step].to("cpu").contiguous().view(word).numpy()
            if sys.byteorder != "little" and chunk.itemsize > 1:
                chunk = chunk.byteswap()
            yield memoryview(chunk).cast("B")
    except (RuntimeError, TypeError, KeyError) as failure:
        raise ValueError(f"cannot read the values of {name!r} ({type(values).__name__} of "
                         f"{values.dtype} on {values.device}) to tell a checkpoint which "
                         f"model wrote it: {failure}") from failure
