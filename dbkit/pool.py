"""The connection pool: SQLAlchemy's ``QueuePool`` plus what Go's ``database/sql`` has and it lacks.

- idle-time eviction (``conn_max_idle_time``) and counted lifetime recycling
  (``conn_max_lifetime``, with a little jitter so connections made together do not all
  expire together), both on checkout and by a background sweep;
- ``sql.DBStats`` counters (waits, closes by reason) kept in a ``PoolCounters`` that
  outlives ``Engine.dispose()``;
- cheap liveness: instead of a ``SELECT 1`` on every checkout (``pool_pre_ping``), a
  connection is pinged only when it sat idle longer than ``ping_after_idle`` or when its
  socket has something to say while idle (the server's goodbye after
  ``pg_terminate_backend`` or a restart).  A dead connection is swapped for a new one
  before the caller sees it.

Everything here is driven by pool events, except waits, which no event reports: the
``QueuePool`` subclass times the one branch of ``_do_get`` that blocks.
"""

from __future__ import annotations

import random
import select
import threading
import time
import traceback
from typing import Any

import psycopg
from loguru import logger
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, PoolResetState, QueuePool

from dbkit.stats import PoolCounters

__all__ = [
    "DbkitQueuePool",
    "LeakDetector",
    "PoolPolicy",
    "evict_expired",
    "install_pool_events",
]

# psycopg_pool shortens each connection's lifetime by up to 5% at random; pgx does the same
# with MaxConnLifetimeJitter.  Without it a pool filled in one burst expires in one burst.
_LIFETIME_JITTER = 0.05

_returning = threading.local()
_IDLE = psycopg.pq.TransactionStatus.IDLE


class DbkitQueuePool(QueuePool):
    """``QueuePool`` that reports waits and overflow closes to a ``PoolCounters``."""

    counters: PoolCounters | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        counters = self.counters
        # The only blocking branch of QueuePool._do_get: every slot taken, none idle.
        must_wait = (
            counters is not None
            and self._max_overflow > -1
            and self._overflow >= self._max_overflow
            and self._pool.qsize() == 0
        )
        if not must_wait:
            return super()._do_get()
        assert counters is not None
        started = time.monotonic()
        try:
            record = super()._do_get()
        except sa_exc.TimeoutError:
            counters.waited(time.monotonic() - started, timed_out=True)
            raise
        counters.waited(time.monotonic() - started, timed_out=False)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        # QueuePool closes a returned connection when the idle queue is full; the close
        # event below sees this flag and counts it as Go's MaxIdleClosed.
        _returning.active = True
        try:
            super()._do_return_conn(record)
        finally:
            _returning.active = False

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, DbkitQueuePool):
            pool.counters = self.counters
        return pool


class PoolPolicy:
    """The Go-style limits the pool events enforce; plain numbers, 0 meaning "off"."""

    def __init__(
        self,
        *,
        max_lifetime: float,
        max_idle_time: float,
        ping_after_idle: float,
        keep_idle: bool,
    ) -> None:
        self.max_lifetime = max_lifetime
        self.max_idle_time = max_idle_time
        self.ping_after_idle = ping_after_idle
        self.keep_idle = keep_idle


def _socket_has_data(conn: psycopg.Connection[Any]) -> bool:
    """An idle connection has nothing to read unless the server spoke first: a NOTICE, a
    NOTIFY, or the error and EOF it sends when it terminates the backend."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _ping(conn: psycopg.Connection[Any]) -> bool:
    """One round trip with an empty query: no BEGIN is injected (unlike ``conn.execute``),
    so the pooled connection stays outside any transaction."""
    try:
        result = conn.pgconn.exec_(b"")
    except psycopg.Error:
        return False
    return result.status == psycopg.pq.ExecStatus.EMPTY_QUERY


def install_pool_events(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> None:
    """Attach dbkit's pool behaviour to ``engine``; listeners survive ``engine.dispose()``."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        now = time.monotonic()
        info = record.info
        info["dbkit_created"] = now
        if policy.max_lifetime > 0:
            jitter = random.uniform(0, _LIFETIME_JITTER * policy.max_lifetime)
            info["dbkit_expires"] = now + policy.max_lifetime - jitter
        counters.add("open")
        counters.add("connects")

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        info = record.info
        returned = info.get("dbkit_returned")
        if returned is not None:  # a reused connection; a fresh one needs no checks
            now = time.monotonic()
            expires = info.get("dbkit_expires")
            if expires is not None and now >= expires:
                counters.add("max_lifetime_closed")
                raise sa_exc.DisconnectionError("connection exceeded conn_max_lifetime")
            idle = now - returned
            if policy.max_idle_time > 0 and idle > policy.max_idle_time:
                counters.add("max_idle_time_closed")
                raise sa_exc.DisconnectionError("connection exceeded conn_max_idle_time")
            if (
                dbapi_conn.closed
                or dbapi_conn.broken
                or (
                    (idle > policy.ping_after_idle or _socket_has_data(dbapi_conn))
                    and not _ping(dbapi_conn)
                )
            ):
                counters.add("invalidated")
                raise sa_exc.DisconnectionError("pooled connection is no longer alive")
        counters.checked_out()

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        counters.checked_in()
        if dbapi_conn is None:  # invalidated while checked out
            return
        record.info["dbkit_returned"] = time.monotonic()
        if not policy.keep_idle:
            # max_idle_conns = 0: Go keeps no idle connection at all.
            counters.add("max_idle_closed")
            record.invalidate()

    @event.listens_for(engine, "reset")
    def on_reset(dbapi_conn: Any, record: ConnectionPoolEntry, state: PoolResetState) -> None:
        # Replaces QueuePool's unconditional rollback-on-return (the engine is built with
        # pool_reset_on_return=None): libpq already knows whether a transaction is open, so
        # an idle connection skips the driver call.
        if state.terminate_only:
            return
        if dbapi_conn.pgconn.transaction_status != _IDLE:
            dbapi_conn.rollback()

    @event.listens_for(engine, "close")
    def on_close(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        counters.add("open", -1)
        if getattr(_returning, "active", False):
            counters.add("max_idle_closed")

    @event.listens_for(engine, "detach")
    def on_detach(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # A detached connection leaves the pool's accounting for good.
        counters.add("open", -1)
        counters.add("in_use", -1)

    @event.listens_for(engine, "invalidate")
    def on_invalidate(
        dbapi_conn: Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        if exception is not None and not isinstance(exception, sa_exc.DisconnectionError):
            counters.add("invalidated")


def evict_expired(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> int:
    """Close idle connections past their idle time or lifetime, as Go's connectionCleaner
    does, so that a quiet pool shrinks without waiting for the next checkout.  Returns how
    many were closed.

    The idle queue's own mutex is held while scanning, so no checkout can take a record
    we are closing; a closed record stays in the queue as an empty slot that reconnects
    on its next checkout (QueuePool's own behaviour for invalidated records).
    """
    pool = engine.pool
    queue = getattr(pool, "_pool", None)
    if queue is None or (policy.max_idle_time <= 0 and policy.max_lifetime <= 0):
        return 0
    closed = 0
    now = time.monotonic()
    with queue.mutex:
        for record in list(queue.queue):
            if record.dbapi_connection is None:
                continue
            info = record.info
            returned = info.get("dbkit_returned")
            expires = info.get("dbkit_expires")
            if expires is not None and now >= expires:
                counters.add("max_lifetime_closed")
            elif (
                policy.max_idle_time > 0
                and returned is not None
                and now - returned > policy.max_idle_time
            ):
                counters.add("max_idle_time_closed")
            else:
                continue
            record.close()
            closed += 1
    return closed


class LeakDetector:
    """Remembers where each connection was checked out, so that one held longer than
    ``threshold`` can be reported with the code that took it (a leaked connection is the
    usual cause of "QueuePool limit reached").  Capturing a stack costs tens of
    microseconds per checkout, hence opt-in."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._lock = threading.Lock()
        self._holders: dict[int, tuple[float, str, list[str]]] = {}
        self._reported: set[int] = set()

    def install(self, engine: Engine) -> None:
        @event.listens_for(engine, "checkout")
        def remember(dbapi_conn: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
            frames = traceback.extract_stack(limit=16)[:-1]
            where = [
                f"{f.filename}:{f.lineno} in {f.name}"
                for f in frames
                if "/sqlalchemy/" not in f.filename and not f.filename.endswith("dbkit/pool.py")
            ]
            with self._lock:
                self._holders[id(record)] = (
                    time.monotonic(),
                    threading.current_thread().name,
                    where[-8:],
                )

        @event.listens_for(engine, "checkin")
        def forget(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
            with self._lock:
                self._holders.pop(id(record), None)
                self._reported.discard(id(record))

    def report(self) -> int:
        """Warn once about each connection held past the threshold; returns how many."""
        now = time.monotonic()
        with self._lock:
            overdue = [
                (key, now - since, thread, where)
                for key, (since, thread, where) in self._holders.items()
                if now - since > self.threshold and key not in self._reported
            ]
            self._reported.update(key for key, *_ in overdue)
        for _, held, thread, where in overdue:
            logger.bind(leak=True, held_seconds=round(held, 3), thread=thread).warning(
                "connection checked out for {:.1f}s (leak_detection_threshold {:g}s) by "
                "thread {}, taken at:\n  {}",
                held,
                self.threshold,
                thread,
                "\n  ".join(where),
            )
        return len(overdue)
