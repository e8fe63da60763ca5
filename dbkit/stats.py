"""Pool statistics in the shape of Go's ``sql.DBStats``.

SQLAlchemy's pool only knows its own size and how many connections are checked out, and
``Engine.dispose()`` replaces the pool object wholesale.  So the counters live here, in one
object owned by the ``Database``, and are fed by pool events (see ``dbkit.pool``); they
survive ``dispose()`` and reconnects.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PoolCounters", "PoolStats"]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool, field for field Go's ``sql.DBStats`` plus a few extras."""

    max_open_connections: int  # 0 = unlimited
    open_connections: int  # in use + idle
    in_use: int
    idle: int
    wait_count: int  # checkouts that had to wait for a free connection
    wait_duration: float  # seconds spent waiting, summed
    max_idle_closed: int  # closed on return because max_idle_conns was reached
    max_idle_time_closed: int  # closed for sitting idle longer than conn_max_idle_time
    max_lifetime_closed: int  # closed for being older than conn_max_lifetime
    # Beyond DBStats: what an operator asks next when the numbers above look wrong.
    connects: int = 0  # physical connections made
    wait_timeouts: int = 0  # checkouts that gave up after `timeout`
    invalidated: int = 0  # connections found dead (killed backend, restart) and replaced

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PoolCounters:
    """Thread-safe, monotonic counters plus the open/in-use gauges.

    Increments happen on hot paths (every checkout), so one plain lock guards them all;
    contention is negligible next to a network round trip.
    """

    def __init__(self, max_open_connections: int) -> None:
        self.max_open_connections = max_open_connections
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every connection (used in a forked child, which owns none of them)."""
        with self._lock:
            self.open = 0
            self.in_use = 0
            self.wait_count = 0
            self.wait_duration = 0.0
            self.max_idle_closed = 0
            self.max_idle_time_closed = 0
            self.max_lifetime_closed = 0
            self.connects = 0
            self.wait_timeouts = 0
            self.invalidated = 0

    def add(self, name: str, amount: int | float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    # The two calls made on every checkout and return, kept free of getattr/setattr.
    def checked_out(self) -> None:
        with self._lock:
            self.in_use += 1

    def checked_in(self) -> None:
        with self._lock:
            self.in_use -= 1

    def waited(self, seconds: float, timed_out: bool) -> None:
        with self._lock:
            self.wait_count += 1
            self.wait_duration += seconds
            if timed_out:
                self.wait_timeouts += 1

    def snapshot(self) -> PoolStats:
        with self._lock:
            open_ = max(self.open, 0)
            in_use = min(max(self.in_use, 0), open_)
            return PoolStats(
                max_open_connections=self.max_open_connections,
                open_connections=open_,
                in_use=in_use,
                idle=open_ - in_use,
                wait_count=self.wait_count,
                wait_duration=self.wait_duration,
                max_idle_closed=self.max_idle_closed,
                max_idle_time_closed=self.max_idle_time_closed,
                max_lifetime_closed=self.max_lifetime_closed,
                connects=self.connects,
                wait_timeouts=self.wait_timeouts,
                invalidated=self.invalidated,
            )
