"""What a sweep's rewritten graph computes, for the suffix-path tests (a helper module, not
a test file)."""

from __future__ import annotations

import torch

from fxsight.record.program import ModuleCall


def module_call_shapes(monkeypatch) -> list[tuple[torch.nn.Module, tuple]]:
    """A list that fills, while ``monkeypatch`` lasts, with ``(module, shape of its first
    argument)`` for every module call a trace makes (``envoy(value)``)."""
    shapes: list[tuple[torch.nn.Module, tuple]] = []
    call = ModuleCall.__call__
    monkeypatch.setattr(ModuleCall, "__call__", lambda self, *args: (
        shapes.append((self.module, tuple(args[0].shape))), call(self, *args))[1])
    return shapes


def graph_parameters(graph: torch.fx.GraphModule, model: torch.nn.Module) -> set[str]:
    """The names (in ``model``) of the parameters ``graph`` reads."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(getattr(graph, n.target))] for n in graph.graph.nodes
            if n.op == "get_attr" and id(getattr(graph, n.target)) in names}
