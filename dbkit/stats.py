"""Pool statistics in the shape of Go's ``sql.DBStats``, and statement/transaction metrics.

SQLAlchemy's pool only knows its own size and how many connections are checked out, and
``Engine.dispose()`` replaces the pool object wholesale.  So the counters live here, in one
object owned by the ``Database``, and are fed by pool events (see ``dbkit.pool``); they
survive ``dispose()`` and reconnects.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LATENCY_BUCKETS", "PoolCounters", "PoolStats", "QueryCounters", "QueryStats"]


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

    def connected(self) -> None:
        with self._lock:
            self.open += 1
            self.connects += 1

    def detached(self) -> None:
        with self._lock:
            self.open -= 1
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


# Latency bucket upper bounds in seconds (Prometheus' defaults, finer at the low end where
# a local PostgreSQL answers).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class QueryStats:
    """What the statements and transactions of one Database did since it was made."""

    statements: int
    errors: int
    errors_by_class: dict[str, int]  # SQLSTATE class ("23", "40", "57" …) or exception type
    total_seconds: float
    latency_buckets: dict[str, int]  # cumulative counts by upper bound ("0.001" … "+Inf")
    slow_statements: int
    transactions_committed: int
    transactions_rolled_back: int
    transactions_retried: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueryCounters:
    """Statement and transaction counters, fed by DbkitConnection and the transaction
    manager.  One lock, held for a few increments: cheap next to a round trip."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statements = 0
        self.errors = 0
        self.errors_by_class: dict[str, int] = {}
        self.total_seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.slow_statements = 0
        self.transactions_committed = 0
        self.transactions_rolled_back = 0
        self.transactions_retried = 0

    def statement(self, seconds: float, error_class: str | None, slow: bool) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self.statements += 1
            self.total_seconds += seconds
            self.buckets[index] += 1
            if slow:
                self.slow_statements += 1
            if error_class is not None:
                self.errors += 1
                self.errors_by_class[error_class] = self.errors_by_class.get(error_class, 0) + 1

    def transaction(self, outcome: str) -> None:
        """``outcome``: committed, rolled_back or retried."""
        with self._lock:
            if outcome == "committed":
                self.transactions_committed += 1
            else:
                name = f"transactions_{outcome}"
                setattr(self, name, getattr(self, name) + 1)

    def snapshot(self) -> QueryStats:
        with self._lock:
            cumulative, running = {}, 0
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), self.buckets, strict=True):
                running += count
                cumulative["+Inf" if bound == math.inf else f"{bound:g}"] = running
            return QueryStats(
                statements=self.statements,
                errors=self.errors,
                errors_by_class=dict(self.errors_by_class),
                total_seconds=self.total_seconds,
                latency_buckets=cumulative,
                slow_statements=self.slow_statements,
                transactions_committed=self.transactions_committed,
                transactions_rolled_back=self.transactions_rolled_back,
                transactions_retried=self.transactions_retried,
            )
