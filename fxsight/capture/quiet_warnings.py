"""Python's warnings left as a plain forward leaves them, around work fxsight does that a
plain forward does not (a capture, an export of an edited model, a compilation).

Two things torch does there reach the user otherwise:

- it warns about what its own tracing does (``torch.export`` about the ``_flat_weights``
  an ``nn.LSTM`` assigns while it is traced), warnings a plain forward never shows;
- it enters ``warnings.catch_warnings()`` (``ExportedProgram.module()`` once per lifted
  parameter, aot autograd and inductor while compiling), and each entry and exit moves the
  warnings filters' version on: Python then forgets, for every module, which warnings it
  has already shown, so a warning the user saw once (the default filter) shows again.

While :func:`held_warnings` is active (a capture, an export), the warnings this thread
issues are held back, those of other threads shown as they come; after it, every module's
record of the warnings it has shown is as it was, marked current for the filters (the same
list with the same entries: the version alone moved), and the held warnings that a plain
forward issues too (``replayed``: the model's own) are issued again, through the user's
filters and ``warnings.showwarning``. :func:`shown_warnings_kept` (a compilation, whose
warnings are the user's: they asked for it) only keeps the records current.

The filters themselves are never changed (a ``catch_warnings`` block would replace the list
for every thread, and a filter another thread adds meanwhile would be lost): only
``warnings.showwarning``, the documented hook, is swapped during a :func:`held_warnings`
block and put back. Those blocks hold :func:`fxsight.locks.exclusive_export`, as fxsight's
exports do: torch's own ``catch_warnings`` blocks save and restore ``showwarning`` too, and
must not interleave with them.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
import warnings
from types import FrameType
from typing import Any, Callable, Iterator

from ..locks import exclusive_export

Replayed = Callable[[FrameType], bool]

# whether a held_warnings block is open in this thread (an inner one does nothing)
_BLOCK = threading.local()


def _never(frame: FrameType) -> bool:
    return False


class _VersionProbe:
    """Stands in for a warning category to read the filters' version: ``warn_explicit``
    stores the version in the registry it is given before it matches the filters, and
    matching then fails on this object, which is no class (nothing is shown)."""

    def __call__(self, text: str) -> str:
        return text


def _filters_version() -> int | None:
    """The current version of ``warnings.filters``, or ``None`` where it cannot be read
    (no filter at all: the default action would apply to the probe)."""
    if not warnings.filters:
        return None
    registry: dict = {}
    try:
        warnings.warn_explicit("", _VersionProbe(), "", 0, registry=registry)  # type: ignore
    except Exception:  # noqa: BLE001 - the expected way out (see _VersionProbe)
        pass
    version = registry.get("version")
    return version if type(version) is int else None


def _registries() -> list[dict]:
    """Every registry of shown warnings Python keeps: each module's
    ``__warningregistry__`` and the registry of ``once`` warnings."""
    found = [warnings.onceregistry]
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)  # (never a lazy module's __getattr__)
        except TypeError:
            continue
        registry = namespace.get("__warningregistry__")
        if isinstance(registry, dict):
            found.append(registry)
    return found


class _Filters:
    """The filters as a block found them: the list and its entries."""

    def __init__(self) -> None:
        self.list = warnings.filters
        self.entries = list(self.list)

    def unchanged(self) -> bool:
        filters = warnings.filters
        return filters is self.list and len(filters) == len(self.entries) and \
            all(map(operator.is_, filters, self.entries))


def _mark_current(registries: list[dict], version: int, now: int) -> None:
    """Each registry current at ``version`` made current at ``now`` (what it holds stays
    true: the filters are the same)."""
    for registry in registries:
        if registry.get("version") == version:
            registry["version"] = now


class _Held:
    """A warning this thread issued inside the block, with what re-issuing it needs."""

    def __init__(self, message: Warning, category: type, filename: str, lineno: int,
                 frame: FrameType | None, replayed: bool):
        self.message = message
        self.category = category
        self.filename = filename
        self.lineno = lineno
        self.replayed = replayed
        namespace = frame.f_globals if frame is not None else None
        self.module = namespace.get("__name__") if namespace is not None else None
        self.namespace = namespace

    def keys(self) -> tuple[tuple, ...]:
        """The keys Python stored for it in a registry (``default``, ``module``, ``once``)."""
        text = str(self.message)
        return ((text, self.category, self.lineno), (text, self.category, 0),
                (text, self.category))

    def registry(self) -> dict | None:
        """The registry of the module it is attributed to (``None`` where unknown)."""
        registry = self.namespace.get("__warningregistry__") \
            if self.namespace is not None else None
        return registry if isinstance(registry, dict) else None

    def issue(self) -> None:
        registry = self.namespace.setdefault("__warningregistry__", {}) \
            if self.namespace is not None else None
        warnings.warn_explicit(self.message, self.category, self.filename, self.lineno,
                               module=self.module if isinstance(self.module, str) else None,
                               registry=registry, module_globals=self.namespace,
                               source=getattr(self.message, "source", None))


def _issuing_frame() -> FrameType | None:
    """The frame that issued the warning being shown (the first one outside ``warnings``,
    above the ``showwarning`` hook)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == "warnings":
        frame = frame.f_back
    return frame


def _attributed_frame(frame: FrameType | None, filename: str, lineno: int) -> FrameType | None:
    """The frame a warning is attributed to (its ``stacklevel``): the first one, from the
    issuing frame up, at ``filename:lineno``."""
    while frame is not None:
        if frame.f_code.co_filename == filename and frame.f_lineno == lineno:
            return frame
        frame = frame.f_back
    return None


class _Recorder:
    """The ``showwarning`` of a block: holds the block thread's warnings, shows the others'
    with the hook it replaced (and every warning once the block is over)."""

    def __init__(self, shown: Callable[..., Any], replayed: Replayed):
        self.shown = shown
        self.replayed = replayed
        self.thread = threading.get_ident()
        self.held: list[_Held] = []
        self.active = True

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        if not self.active or threading.get_ident() != self.thread:
            return self.shown(message, category, filename, lineno, file, line)
        issuing = _issuing_frame()
        self.held.append(_Held(message, category, filename, lineno,
                               _attributed_frame(issuing, filename, lineno),
                               issuing is not None and self.replayed(issuing)))


class _ShownRecords:
    """The registries that were current when the block started, and what they held."""

    def __init__(self) -> None:
        self.filters = _Filters()
        self.version = _filters_version()
        self.kept = [] if self.version is None else \
            [(registry, dict(registry)) for registry in _registries()
             if registry.get("version") == self.version]

    def restore(self, held: list[_Held]) -> None:
        """No registry left saying that a held warning was shown; each kept registry as it
        was, plus what other threads' warnings added meanwhile, current for the filters'
        version now (where the filters are still the same list, with the same entries)."""
        for warning in held:
            registry = warning.registry()
            if registry is not None:
                for key in warning.keys():
                    registry.pop(key, None)
        if self.version is None or not self.filters.unchanged():
            return
        now = _filters_version()
        if now is None or now == self.version:
            return
        for registry, before in self.kept:
            if registry.get("version") != self.version:  # (cleared meanwhile)
                meanwhile = {key: value for key, value in registry.items() if key != "version"}
                registry.clear()
                registry.update(meanwhile)
                registry.update(before)
                registry["version"] = self.version
        _mark_current([registry for registry, _ in self.kept], self.version, now)


class shown_warnings_kept:
    """While active, warnings show as they come; after it, the modules' records of shown
    warnings that nothing touched meanwhile are marked current again, where the block moved
    the filters' version on but left the filters as they were (torch.compile's
    ``catch_warnings`` blocks): cheap (two reads of the version) where it did not.
    (A class, not a generator: it is entered at each compiled call.)"""

    def __enter__(self) -> None:
        self.filters = _Filters()
        self.version = _filters_version()

    def __exit__(self, *exc_info: Any) -> None:
        if self.version is not None and self.filters.unchanged():
            now = _filters_version()
            if now is not None and now != self.version:
                _mark_current(_registries(), self.version, now)


@contextlib.contextmanager
def held_warnings(replayed: Replayed = _never) -> Iterator[None]:
    """While active, this thread's warnings are held back; after it, Python's records of
    shown warnings are as they were, and where the block ends without an exception, the
    held warnings whose issuing frame ``replayed`` accepts are issued again (the others,
    torch's about its own tracing, are dropped; so are all where the block raises: the
    caller runs the model otherwise, which issues them itself)."""
    if getattr(_BLOCK, "open", False):  # (inside another block of this thread: its own)
        yield
        return
    with exclusive_export():
        records = _ShownRecords()
        replaced = warnings.showwarning
        recorder = _Recorder(replaced, replayed)
        completed = False
        try:
            _BLOCK.open = True
            warnings.showwarning = recorder
            yield
            completed = True
        finally:
            _BLOCK.open = False
            recorder.active = False
            if warnings.showwarning is recorder:  # (else someone replaced it meanwhile)
                warnings.showwarning = replaced
            records.restore(recorder.held)
    if completed:
        for warning in recorder.held:
            if warning.replayed:
                warning.issue()
