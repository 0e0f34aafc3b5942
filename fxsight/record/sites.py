"""Sites: the named points of a forward pass where a module's inputs or outputs flow."""

from __future__ import annotations

from dataclasses import dataclass

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True)
class Site:
    """One boundary event: the inputs or the output of one call of one module.

    ``path`` is the module's dotted path in the model (``""`` for the model itself),
    ``kind`` is ``"input"`` or ``"output"`` and ``call`` counts the module's calls in one
    forward pass (0 for the first).
    """

    path: str
    kind: str
    call: int = 0

    @property
    def label(self) -> str:
        base = f"{self.path}.{self.kind}" if self.path else f"model.{self.kind}"
        return base if self.call == 0 else f"{base}#{self.call}"

    def __str__(self) -> str:
        return self.label


def module_label(path: str) -> str:
    """A module path as users read it (``model`` for the root)."""
    return f"model.{path}" if path else "model"


def is_operation(path: str) -> bool:
    """Whether ``path`` is an operation's (a call inside a forward, ``envoy.source``):
    ``<module>.source.<name>``."""
    return path.startswith("source.") or ".source." in path
