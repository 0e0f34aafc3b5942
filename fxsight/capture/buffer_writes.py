"""Which of a model's buffers a forward writes in place, seen operator by operator: a scan
notes them (:class:`BufferWrites`), so that a run that must be able to put the buffers back
(the hooks backend's refusal mid-forward, see ``run.checkpointing``) copies those alone,
not every buffer of the model in every trace."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._torch import (after_each_operator, pytree, returns_alias, storage_key,
                      unmarked_writes, writes_unmarked, written_arguments)


class BufferWrites:
    """While active (``with writes:``, entered inside a scan's fake tensor mode, or around
    a forward on real tensors), notes in :attr:`names` the names of ``model``'s buffers
    that an operator writes in place: an argument its schema marks written (through the
    buffer itself, a view of it or ``.data``: any tensor of its memory), or the running
    statistics a batch norm kernel updates in training. Writes that no operator makes (to
    a NumPy array sharing the memory) are not seen."""

    def __init__(self, model: torch.nn.Module):
        self._names: dict[int, list[str]] = {}
        for name, buffer in model.named_buffers(remove_duplicate=False):
            if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
                self._names.setdefault(storage_key(buffer), []).append(name)
        self.names: set[str] = set()
        self._kept: list[torch.Tensor] = []
        self._active: Any = None

    def _after(self, operator: Any, args: tuple, kwargs: dict, result: Any) -> None:
        aliases, written, unmarked = _kind(operator)
        if aliases and args and isinstance(args[0], torch.Tensor):
            names = self._names.get(storage_key(args[0]))
            if names is not None:  # (a view of a buffer: a fake one in a fake mode)
                for leaf in pytree.tree_leaves(result):
                    key = storage_key(leaf) if isinstance(leaf, torch.Tensor) else None
                    if key is not None and key not in self._names:
                        self._names[key] = names
                        self._kept.append(leaf)  # (its key stays its own while it lives)
        if written:
            values = [args[i] if i < len(args) else kwargs.get(name) for i, name in written]
            self._note(values)
        if unmarked:
            self._note(list(unmarked_writes(operator, args)))

    def _note(self, values: list[Any]) -> None:
        for leaf in pytree.tree_leaves(values):
            if isinstance(leaf, torch.Tensor):
                names = self._names.get(storage_key(leaf))
                if names is not None:
                    self.names.update(names)

    def __enter__(self) -> "BufferWrites":
        if self._names:
            self._active = after_each_operator(self._after)
            self._active.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        active, self._active = self._active, None
        self._kept.clear()
        return bool(active.__exit__(*exc)) if active is not None else False



@functools.lru_cache(maxsize=4096)
def _kind(operator: Any) -> tuple[bool, tuple[tuple[int, str], ...], bool]:
    """Whether ``operator`` returns its first argument's memory, the arguments it marks
    written, and whether it writes others unmarked (read from its schema once)."""
    return returns_alias(operator), written_arguments(operator), writes_unmarked(operator)
