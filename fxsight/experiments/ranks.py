"""The processes of a sweep under ``torch.distributed``: exchanging results, and noticing a
rank that died without raising.

A rank that raises sends its error to the others (they stop with an error naming it). A
rank that dies without raising (``os._exit``, the OOM killer, a lost node) sends nothing:
a collective would wait for it until the process group's timeout (30 minutes by default).
So while a job runs every rank beats a *heartbeat* (a counter in the process group's
key-value store, advanced by a background thread every ``timeout / 4`` seconds), and
before each exchange a rank announces its arrival in the store and waits for the others'
arrivals: a rank whose heartbeat has not moved for ``timeout`` seconds (seen on the
waiting rank's own clock) is dead, and the waiting rank raises an error naming it. Only
when every rank has arrived does the collective run.

``timeout`` is :data:`RANK_TIMEOUT` seconds (60), or the environment variable
``FXSIGHT_RANK_TIMEOUT`` of each rank. A rank is only declared dead when its heartbeat
thread stops, not when it is slow: a long batch does not stop the thread (torch releases
the GIL while it computes). A rank that has not begun the sweep yet (still loading its
model) has no heartbeat and is waited for: one that dies before it begins is left to the
process group's own timeout.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

from .._torch import default_store

RANK_TIMEOUT = 60.0
_JOBS = itertools.count()  # (every rank makes the same calls: the same job numbers)


def rank_timeout() -> float:
    """Seconds without a heartbeat after which a rank is taken for dead."""
    value = os.environ.get("FXSIGHT_RANK_TIMEOUT")
    if value:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"FXSIGHT_RANK_TIMEOUT must be a number of seconds, not "
                             f"{value!r}") from None
    return RANK_TIMEOUT


class RankDied(RuntimeError):
    """Another rank of the sweep stopped without sending an error (named in the message)."""


class Ranks:
    """This process's place among the processes of an initialized ``torch.distributed``
    group (the whole job in one process otherwise, or with ``distributed=False``).

    Use as a context manager: the heartbeat runs while it is entered."""

    def __init__(self, distributed: bool | None):
        import torch.distributed as dist

        self.dist = dist
        self.on = distributed is not False and dist.is_available() and dist.is_initialized()
        if distributed and not self.on:
            raise RuntimeError("distributed=True but no torch.distributed process group is "
                               "initialized (torch.distributed.init_process_group)")
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.store = default_store() if self.on and self.world > 1 else None
        self.timeout = rank_timeout()
        self.prefix = f"fxsight/sweep{next(_JOBS)}" if self.store is not None else ""
        self.exchanges = 0  # (exchanges begun, and those whose collective completed)
        self._gathered = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- heartbeat ----------------------------------------------------------------------
    def __enter__(self) -> "Ranks":
        if self.store is not None:
            self._beat_once(0)  # (before the first exchange: never waited on without one)
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"fxsight-heartbeat-rank{self.rank}")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.store is not None and self._gathered == self.exchanges:
            # every rank is past every wait (each collective ran): this rank's keys go
            keys = [f"{self.prefix}/beat/{self.rank}",
                    *(f"{self.prefix}/arrived{i}/{self.rank}" for i in range(self.exchanges))]
            for key in keys:
                try:
                    self.store.delete_key(key)
                except Exception:  # noqa: BLE001 - a store without deletion: left there
                    break

    def _beat_once(self, count: int) -> None:
        self.store.set(f"{self.prefix}/beat/{self.rank}", str(count))

    def _beat(self) -> None:
        count = 1
        while not self._stop.wait(max(self.timeout / 4, 0.05)):
            try:
                self._beat_once(count)
            except Exception:  # noqa: BLE001 - the store is gone: the waits say so
                return
            count += 1

    def _wait_for_all(self, what: str) -> None:
        """Announce this rank's arrival at exchange ``what`` and wait for every other rank's,
        raising if one stops beating for ``timeout`` seconds."""
        store = self.store
        key = f"{self.prefix}/arrived{self.exchanges}/"
        try:
            store.set(key + str(self.rank), "1")
            pending = [r for r in range(self.world) if r != self.rank]
            # (last heartbeat value, when it last moved, whether the rank ever beat: one
            # that has not started the sweep yet, loading its model, is waited for)
            seen = {r: (None, time.monotonic(), False) for r in pending}
            pause = 0.01
            while pending:
                now = time.monotonic()
                for r in list(pending):
                    if store.check([key + str(r)]):
                        pending.remove(r)
                        continue
                    beat_key = f"{self.prefix}/beat/{r}"
                    beat = store.get(beat_key) if store.check([beat_key]) else None
                    if beat != seen[r][0]:
                        seen[r] = (beat, now, seen[r][2] or beat is not None)
                    elif seen[r][2] and now - seen[r][1] > self.timeout:
                        raise RankDied(
                            f"rank {r} of {self.world} stopped without an error while "
                            f"{what} (no heartbeat for {self.timeout:g} s: the process died, "
                            f"was killed or its node was lost); this rank (rank {self.rank}) "
                            f"stops too. With checkpoint=..., start the job again: finished "
                            f"batches are not redone")
                if pending:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.25)
        except RankDied:
            raise
        except Exception as error:  # noqa: BLE001 - the store's connection errors
            raise RankDied(f"this rank (rank {self.rank}) lost the process group's "
                               f"store while {what} ({error}); the process that hosts it "
                               f"(rank 0 unless torchrun's agent does) may have died") \
                from error

    # --- exchange -----------------------------------------------------------------------
    def exchange(self, what: str, payload: Any, error: BaseException | None) -> list:
        """Every rank's ``payload``; raises on every rank if one failed (its own error on
        that rank, an error naming the failed ranks elsewhere) or died (named, after
        ``timeout`` seconds without its heartbeat)."""
        if not self.on:
            if error is not None:
                raise error
            return [payload]
        entry = {"ok": error is None, "payload": None if error is not None else payload,
                 "error": None if error is None else f"{type(error).__name__}: {error}"}
        if self.store is not None:
            try:
                self._wait_for_all(what)
            except RankDied:
                if error is not None:  # (this rank's own error comes first)
                    raise error from None
                raise
        self.exchanges += 1
        gathered: list = [None] * self.world
        self.dist.all_gather_object(gathered, entry)
        self._gathered += 1
        if error is not None:
            raise error
        failed = [(r, g["error"]) for r, g in enumerate(gathered) if not g["ok"]]
        if failed:
            names = "; ".join(f"rank {r}: {message}" for r, message in failed)
            raise RuntimeError(f"the sweep failed on {len(failed)} of {self.world} ranks "
                               f"while {what} ({names}); this rank (rank {self.rank}) stops "
                               f"too")
        return [g["payload"] for g in gathered]
