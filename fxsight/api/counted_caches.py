"""The caches whose padded rows' tokens were placed counting real tokens.

A cache of left-padded rows holds keys computed at the positions its run gave them: a plain
forward without ``position_ids`` counts columns, a trace of a padded batch (which passes
``position_ids`` counted from the mask) and ``generate`` count each row's real tokens. A
continuation of such a cache without ``position_ids`` must place its tokens as the cache's
were: ``LanguageModel`` remembers the cache objects that came out of (or were filled by) a
run whose positions counted real tokens, weakly (an entry goes with its cache: the registry
keeps no cache alive, and is bounded by the caches alive), by identity (a cache's own
``__eq__`` plays no part). Nothing is set on the cache object itself."""

from __future__ import annotations

import weakref
from typing import Any

from ..capture.caches import is_cache

# id(cache) -> a weak reference to it (its callback drops the entry when the cache dies)
_COUNTED: dict[int, weakref.ref] = {}


def remember(cache: Any) -> None:
    """Remember ``cache`` as one whose padded rows count real tokens (a cache that is not
    weak-referenceable is not remembered: :func:`counted` answers ``None`` for it)."""
    key = id(cache)
    known = _COUNTED.get(key)
    if known is not None and known() is cache:
        return
    try:
        ref = weakref.ref(cache, lambda dead, key=key: _forget(key, dead))
    except TypeError:
        return
    _COUNTED[key] = ref


def remember_in(values: list) -> None:
    """Remember every cache among ``values`` (see :func:`caches_in`)."""
    for value in values:
        for cache in caches_in(value):
            remember(cache)


def _forget(key: int, dead: weakref.ref) -> None:
    if _COUNTED.get(key) is dead:
        del _COUNTED[key]


def counted(cache: Any) -> bool | None:
    """Whether ``cache`` came out of a run whose positions counted real tokens (``None``:
    not known, as it cannot be weakly referenced)."""
    try:
        weakref.ref(cache)
    except TypeError:
        return None
    known = _COUNTED.get(id(cache))
    return known is not None and known() is cache


def caches_in(value: Any, depth: int = 2) -> list[Any]:
    """The transformers cache objects in ``value``: itself, or among the fields of a model
    output, a dict, a tuple or a list, ``depth`` levels down."""
    if is_cache(value):
        return [value]
    if depth <= 0:
        return []
    if hasattr(value, "items") and callable(value.items):  # (a ModelOutput is a dict)
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        return []
    return [cache for item in items for cache in caches_in(item, depth - 1)]
