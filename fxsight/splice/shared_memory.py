"""Order by shared memory: what an in-place change of a read holds back.

A module's tensors are shared with other boundaries: a module's output is the next
module's input, a view taken inside the forward is its base's memory, and a read written
as another site's value (``b.input = a``) is that site's value from then on. So an
in-place change of one read changes the others. An operation recorded after such a change,
on a value whose memory it shares, runs no earlier than the change: it sees it, as in eager
PyTorch and nnsight. A line recorded before the change does not, and nothing is ordered by
memory that is not shared: the rows of two invokes are apart (a change in one invoke's rows
holds back no line on another's; a line on the whole batch shares every invoke's rows).

:class:`SharedMemory` keeps what one walk of a Program has seen of this; the walker asks
it how early an operation may run and tells it of in-place changes and writes. Which sites
share memory the walk's source says (``Captured.alias_keys``, ``ScanResult.alias_keys``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from ..record.program import Kind, Node, is_view, node_args
from ..record.sites import Site


def memory_of(value: Any) -> Any:
    """The node whose memory ``value`` is: back through views and in-place changes."""
    while isinstance(value, Node) and value.kind is Kind.OP and (
            is_view(value) or value.mutation):
        value = value.args[0]
    return value


def read_root(value: Any) -> Node | None:
    """The read whose memory ``value`` is (``None`` where it is not a read's)."""
    value = memory_of(value)
    return value if isinstance(value, Node) and value.kind is Kind.READ else None


class SharedMemory:
    """In-place changes of reads and raw writes seen so far in one walk, in recording
    order; ``site_aliases(site)``: the keys of the memory a site's tensors are in."""

    def __init__(self, site_aliases: Callable[[Site], frozenset]):
        self.site_aliases = site_aliases
        # memory key -> invoke whose rows were changed (None: every row) -> the latest
        # in-place change of them: (its position, its node)
        self.changed: dict[Any, dict[int | None, tuple[int, Node]]] = {}
        # operations held back by such a change -> the change (for error messages)
        self.held_back: dict[Node, Node] = {}
        # memory keys of sites written with a read -> that read's memory, which the value
        # at every site sharing those keys now is too (the next module's input)
        self.written: dict[Any, frozenset] = {}

    def keys(self, site: Site) -> frozenset:
        """The memory keys of ``site``'s value: its own, and those of reads written at a
        site that shares it."""
        own = self.site_aliases(site)
        if not self.written:
            return own
        return own.union(*(self.written.get(key, ()) for key in own))

    def earliest(self, node: Node, position: int) -> int:
        """The position of operation ``node``: ``position`` (what its arguments need), or
        that of a later in-place change, recorded before it, of memory one of its reads
        shares (in rows it reads)."""
        if not self.changed:
            return position
        latest = None
        for arg in node_args((node.args, node.kwargs)):
            root = read_root(arg)
            if root is None:
                continue
            for key in self.keys(root.site):
                for invoke, change in self.changed.get(key, {}).items():
                    if _rows_meet(invoke, root.invoke) and (
                            latest is None or change[0] > latest[0]):
                        latest = change
        if latest is None or latest[0] <= position:
            return position
        self.held_back[node] = latest[1]
        return latest[0]

    def note_change(self, node: Node, position: int) -> None:
        """Mutation ``node``, at ``position``, changes the memory of the read it roots in."""
        root = read_root(node.args[0])
        if root is None:
            return
        for key in self.keys(root.site):
            changes = self.changed.setdefault(key, {})
            if position >= changes.get(root.invoke, (position,))[0]:
                changes[root.invoke] = (position, node)

    def note_write(self, site: Site, recorded: Any) -> None:
        """``site`` is written with ``recorded`` (as the Program has it): the reads it is
        made of raw (or through views) are the site's memory from now on."""
        reads = {root for root in map(read_root, node_args(recorded)) if root is not None}
        if not reads:
            return
        memory = frozenset().union(*(self.keys(root.site) for root in reads))
        for key in self.site_aliases(site):
            self.written[key] = self.written.get(key, frozenset()) | memory

    def why_late(self, value: Any, position: int, positions: dict[Node, int]) -> str:
        """Why ``value`` (as the Program has it) comes at ``position``, where a change of
        shared memory holds back an operation it depends on (else nothing): the end of an
        ``OrderError``'s message."""
        for node in upstream(value):
            change = self.held_back.get(node)
            if change is not None and positions.get(node) == position:
                root = read_root(change.args[0])
                return (f": the value is computed after the in-place change of "
                        f"{root.site.label} ({change.line}), which changes the same tensor "
                        f"as a read it uses, and a line sees the changes recorded before "
                        f"it; compute it before that change")
        return ""


def _rows_meet(invoke: int | None, other: int | None) -> bool:
    """Whether the rows of two invokes (``None``: the whole batch) share any."""
    return invoke is None or other is None or invoke == other


def upstream(value: Any) -> Iterator[Node]:
    """The nodes ``value`` (as the Program has it) is computed from, each once, nearest
    first."""
    pending, seen = node_args(value), set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        pending.extend(node.all_input_nodes)
