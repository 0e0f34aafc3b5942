"""Generated source that outlives its graph: fx keeps the source code of every
GraphModule it compiles (for tracebacks) in ``linecache`` and in its own loader, under a
name unique to that compilation, for the life of the process. Every new intervention
structure compiles a new rewritten graph; once the runner caches evict it and it is
collected, its source goes too."""

from __future__ import annotations

import weakref

import torch.fx as fx

from .._torch import forget_generated_source, generated_source_key


def release_source_when_collected(graph_module: fx.GraphModule) -> None:
    """Drop ``graph_module``'s generated source (``linecache``, fx's loader) once it is
    garbage-collected."""
    key = generated_source_key(graph_module)
    if key is not None:
        weakref.finalize(graph_module, forget_generated_source, key)
