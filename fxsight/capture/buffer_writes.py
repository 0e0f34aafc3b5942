"""Which of a model's buffers a forward writes in place, seen operator by operator: a scan
notes them (:class:`BufferWrites`), so that a run that must be able to put the buffers back
(the hooks backend's refusal mid-forward, see ``run.checkpointing``) copies those alone,
not every buffer of the model in every trace."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._torch import (pytree, returns_alias, storage_key, unmarked_writes, writes_unmarked,
                      written_arguments)


class BufferWrites:
    """Notes in :attr:`names` the names of ``model``'s buffers that an operator writes in
    place, given each operator run (:meth:`observe`, called after it by a dispatch mode:
    inside a scan's fake tensor mode, or in a forward on real tensors): an argument its
    schema marks written (through the buffer itself, a view of it or ``.data``: any
    tensor of its memory, fake views of it included), or the running statistics a batch
    norm kernel updates in training. Writes that no operator makes (to a NumPy array
    sharing the memory) are not seen. :meth:`forget_views` ends a forward."""

    def __init__(self, model: torch.nn.Module):
        self._buffer_keys: dict[int, list[str]] = {}  # storage key -> names
        self._buffer_ids: dict[int, list[str]] = {}  # id -> names
        for name, buffer in model.named_buffers(remove_duplicate=False):
            if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
                self._buffer_keys.setdefault(storage_key(buffer), []).append(name)
                self._buffer_ids.setdefault(id(buffer), []).append(name)
        self.names: set[str] = set()
        self._keys = dict(self._buffer_keys)  # (with the views' of this forward)
        self._ids = dict(self._buffer_ids)
        self._kept: list[torch.Tensor] = []  # (their ids and keys stay theirs meanwhile)

    @property
    def watched(self) -> bool:
        """Whether the model has buffers to watch (else nothing need observe)."""
        return bool(self._buffer_keys)

    def observe(self, operator: Any, args: tuple, kwargs: dict, result: Any) -> None:
        """Note what ``operator`` (run on ``args``, giving ``result``) writes."""
        aliases, written, unmarked = _kind(operator)
        if aliases and args and isinstance(args[0], torch.Tensor):
            names = self._ids.get(id(args[0]))
            if names is None and type(args[0]) is torch.Tensor:  # (a real tensor)
                names = self._keys.get(storage_key(args[0]))
            if names is not None:  # (a view of a buffer: a fake one in a fake mode)
                self._viewed(result, names)
        if written:
            self._note([args[i] if i < len(args) else kwargs.get(name)
                        for i, name in written])
        if unmarked:
            self._note(list(unmarked_writes(operator, args)))

    def forget_views(self) -> None:
        """Drop the views of buffers this forward made (their keys are not theirs once
        they are freed)."""
        self._keys = dict(self._buffer_keys)
        self._ids = dict(self._buffer_ids)
        self._kept.clear()

    def _viewed(self, result: Any, names: list[str]) -> None:
        for leaf in pytree.tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and id(leaf) not in self._ids:
                self._ids[id(leaf)] = names
                self._keys.setdefault(storage_key(leaf), names)
                self._kept.append(leaf)

    def _note(self, values: list[Any]) -> None:
        for leaf in pytree.tree_leaves(values):
            if isinstance(leaf, torch.Tensor):
                names = self._keys.get(storage_key(leaf))
                if names is not None:
                    self.names.update(names)


@functools.lru_cache(maxsize=4096)
def _kind(operator: Any) -> tuple[bool, tuple[tuple[int, str], ...], bool]:
    """Whether ``operator`` returns its first argument's memory, the arguments it marks
    written, and whether it writes others unmarked (read from its schema once)."""
    return returns_alias(operator), written_arguments(operator), writes_unmarked(operator)
