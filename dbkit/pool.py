"""The connection pool: SQLAlchemy's ``QueuePool`` plus what Go's ``database/sql`` has and it lacks.

- idle-time eviction (``conn_max_idle_time``) and counted lifetime recycling
  (``conn_max_lifetime``, with a little jitter so connections made together do not all
  expire together), both on checkout and by a background sweep;
- ``sql.DBStats`` counters (waits, closes by reason) kept in a ``PoolCounters`` that
  outlives ``Engine.dispose()``;
- cheap liveness: instead of a ``SELECT 1`` on every checkout (``pool_pre_ping``), a
  connection is pinged only when it sat idle longer than ``ping_after_idle`` or when its
  socket has something to say while idle (the server's goodbye after
  ``pg_terminate_backend`` or a restart; looked at once it has been idle a few
  milliseconds).  A dead connection is swapped for a new one before the caller sees it.

The checks and counters run inside the ``QueuePool`` subclass's own checkout and return
paths (``_do_get``, ``_return_conn``), not as pool event listeners: a single checkout
listener sends every checkout through SQLAlchemy's slower, event-dispatching path.  Only
rare events (connect, close, detach, invalidate) are listeners.  The idle queue hands a
returned connection straight to the thread that waited longest.
"""

from __future__ import annotations

import random
import select
import threading
import time
import traceback
from collections import deque
from typing import Any, cast

import psycopg
from loguru import logger
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, PoolResetState, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

from dbkit.stats import PoolCounters

__all__ = [
    "DbkitQueuePool",
    "HandoffQueue",
    "LeakDetector",
    "PoolPolicy",
    "evict_expired",
    "install_pool_events",
]

# psycopg_pool shortens each connection's lifetime by up to 5% at random; pgx does the same
# with MaxConnLifetimeJitter.  Without it a pool filled in one burst expires in one burst.
_LIFETIME_JITTER = 0.05

# A connection handed back less than this long ago is reused without looking at its
# socket: the poll() is a system call that releases the GIL, which under contention (many
# threads, few connections: every checkout is such a hand-over) costs a thread switch.
# The server's goodbye (a terminated backend, a restart) takes longer than that to come.
_SOCKET_CHECK_AFTER = 0.005
_IDLE = psycopg.pq.TransactionStatus.IDLE
_CONN_OK = psycopg.pq.ConnStatus.OK
_POLLIN = getattr(select, "POLLIN", 1)


class _Waiter:
    """One thread waiting for a connection: a lock it blocks on until one is handed over."""

    __slots__ = ("lock", "record")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.record: ConnectionPoolEntry | None = None


class HandoffQueue(sqla_queue.Queue[ConnectionPoolEntry]):
    """The pool's idle queue: SQLAlchemy's, with a fast uncontended path and hand-off under
    contention.

    A returned connection goes straight to the thread that has waited longest (as
    psycopg_pool does) instead of into the queue with a ``notify()``: a woken thread never
    finds that another thread took the connection first and goes back to sleep, which with
    many threads and few connections was most of the time spent waiting.  ``put`` never
    blocks (the pool only ever asks for a non-blocking put).  The mutex stays SQLAlchemy's
    ``RLock``: a garbage-collected connection may be returned from inside a critical section.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._waiters: deque[_Waiter] = deque()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        with self.mutex:
            queue = self.queue
            if queue:
                return queue.pop() if self.use_lifo else queue.popleft()
            if not block:
                raise sqla_queue.Empty
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a positive number")
        waiter = _Waiter()  # allocated outside the mutex (see the class docstring)
        with self.mutex:
            if queue:  # returned meanwhile
                return queue.pop() if self.use_lifo else queue.popleft()
            self._waiters.append(waiter)
        try:
            if waiter.lock.acquire(True, -1 if timeout is None else timeout):
                assert waiter.record is not None
                return waiter.record
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: leave the line, and pass on a connection
            # handed over meanwhile, or it would be lost to the pool for good.
            with self.mutex:
                if waiter.record is None:
                    self._waiters.remove(waiter)
            if waiter.record is not None:
                self.put(waiter.record)
            raise
        with self.mutex:
            if waiter.record is None:  # not handed one while the timeout expired
                self._waiters.remove(waiter)
                raise sqla_queue.Empty
        return waiter.record

    def put(
        self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None
    ) -> None:
        with self.mutex:
            waiters = self._waiters
            if waiters:
                waiter = waiters.popleft()
                waiter.record = item
                waiter.lock.release()
                return
            if 0 < self.maxsize <= len(self.queue):
                raise sqla_queue.Full
            self.queue.append(item)


class DbkitQueuePool(QueuePool):
    """``QueuePool`` that applies dbkit's ``PoolPolicy`` and feeds a ``PoolCounters``.

    The policy's checks run in the pool's own checkout and return paths rather than as pool
    event listeners: any listener makes SQLAlchemy take its slower checkout path (event
    dispatch, a retry loop) for every checkout.  ``install_pool_events`` sets ``counters``
    and ``policy``; an unconfigured pool behaves as a plain ``QueuePool``.
    """

    _queue_class = HandoffQueue
    counters: PoolCounters | None = None
    policy: PoolPolicy | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        counters = self.counters
        if counters is None:
            return super()._do_get()
        try:
            record = self._pool.get(False)  # an idle connection: the usual case
        except sqla_queue.Empty:
            record = self._get_slow(counters)
        counters.checked_out()
        policy = self.policy
        if policy is not None and record.dbapi_connection is not None:
            try:
                _check_reused(record, policy, counters)
            except BaseException:
                self._return_conn(record)
                raise
        return record

    def connect(self) -> PoolProxiedConnection:
        fairy = super().connect()
        dbapi_conn = fairy.dbapi_connection
        if dbapi_conn is not None and dbapi_conn.autocommit:
            # Left in autocommit by dbkit's driver path (checkout_entry); SQLAlchemy's
            # transactions rely on the driver's implicit BEGIN.
            try:
                dbapi_conn.autocommit = False
            except BaseException:
                fairy.invalidate()
                fairy.close()
                raise
        return fairy

    def checkout_entry(self) -> _ConnectionRecord:
        """A pool entry with a live connection, without the ``_ConnectionFairy`` proxy that
        ``connect()`` wraps around it (a weakref finalizer, a reset protocol: as much work
        as a primary-key query).  Only for dbkit's driver path, which runs when no pool
        event listener is installed; hand it back with ``checkin_entry``."""
        record = cast(_ConnectionRecord, self._do_get())
        try:
            record.get_connection()  # (re)connects an empty or recycled slot
        except BaseException as error:
            record._checkin_failed(error, _fairy_was_created=False)
            raise
        return record

    def checkin_entry(self, record: _ConnectionRecord) -> None:
        record.checkin(_fairy_was_created=False)

    def _get_slow(self, counters: PoolCounters) -> ConnectionPoolEntry:
        # The only blocking branch of QueuePool._do_get: every slot taken, none idle.
        if not (self._max_overflow > -1 and self._overflow >= self._max_overflow):
            return super()._do_get()
        started = time.monotonic()
        try:
            record = super()._do_get()
        except sa_exc.TimeoutError:
            counters.waited(time.monotonic() - started, timed_out=True)
            raise
        counters.waited(time.monotonic() - started, timed_out=False)
        return record

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # Called for every connection checked in (not for a detached one).
        counters = self.counters
        try:
            if counters is not None:
                counters.checked_in()
                dbapi_conn = record.dbapi_connection
                if dbapi_conn is not None:  # None: invalidated while checked out
                    self._reset(record, dbapi_conn, counters)
        finally:
            self._do_return_conn(record)

    def _reset(self, record: ConnectionPoolEntry, dbapi_conn: Any, counters: PoolCounters) -> None:
        # Replaces QueuePool's unconditional rollback-on-return (the engine is built with
        # pool_reset_on_return=None): libpq already knows whether a transaction is open, so
        # an idle connection skips the driver call.
        if dbapi_conn.pgconn.transaction_status != _IDLE:
            try:
                dbapi_conn.rollback()
            except BaseException as error:
                self.logger.error("Exception during reset or similar", exc_info=True)
                record.invalidate(error)
                if not isinstance(error, Exception):
                    raise
                return
        policy = self.policy
        if policy is None:
            return
        if not policy.keep_idle:
            # max_idle_conns = 0: Go keeps no idle connection at all.
            counters.add("max_idle_closed")
            record.invalidate()
            return
        record.info["dbkit_returned"] = time.monotonic()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        try:
            self._pool.put(record, False)
        except sqla_queue.Full:
            # The idle queue is full (max_idle_conns reached): Go's MaxIdleClosed.
            if self.counters is not None and record.dbapi_connection is not None:
                self.counters.add("max_idle_closed")
            try:
                record.close()
            finally:
                self._dec_overflow()

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, DbkitQueuePool):
            pool.counters = self.counters
            pool.policy = self.policy
        return pool


class PoolPolicy:
    """The Go-style limits the pool enforces; plain numbers, 0 meaning "off"."""

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


def _check_reused(record: ConnectionPoolEntry, policy: PoolPolicy, counters: PoolCounters) -> None:
    """Checkout checks of a pooled connection: an expired or dead one is closed here, and
    SQLAlchemy's ``get_connection()`` then opens a new one before the caller sees it."""
    info = record.info
    returned = info.get("dbkit_returned")
    if returned is None:  # a fresh connection needs no checks
        return
    dbapi_conn: Any = record.dbapi_connection
    now = time.monotonic()
    expires = info.get("dbkit_expires")
    idle = now - returned
    if expires is not None and now >= expires:
        counters.add("max_lifetime_closed")
        reason = "connection exceeded conn_max_lifetime"
    elif policy.max_idle_time > 0 and idle > policy.max_idle_time:
        counters.add("max_idle_time_closed")
        reason = "connection exceeded conn_max_idle_time"
    elif dbapi_conn.pgconn.status != _CONN_OK or (
        (
            idle > policy.ping_after_idle
            or (idle > _SOCKET_CHECK_AFTER and _socket_has_data(info, dbapi_conn))
        )
        and not _ping(dbapi_conn)
    ):
        counters.add("invalidated")
        reason = "pooled connection is no longer alive"
    else:
        return
    record.invalidate(sa_exc.DisconnectionError(reason))


def _socket_has_data(info: dict[str, Any], conn: psycopg.Connection[Any]) -> bool:
    """An idle connection has nothing to read unless the server spoke first: a NOTICE, a
    NOTIFY, or the error and EOF it sends when it terminates the backend.  The connection's
    ``poll`` object is kept in its record: half the cost of a ``select()`` per checkout."""
    try:
        poller = info.get("dbkit_poll")
        if poller is None:
            if not hasattr(select, "poll"):  # Windows
                readable, _, _ = select.select([conn.fileno()], [], [], 0)
                return bool(readable)
            poller = info["dbkit_poll"] = select.poll()
            poller.register(conn.fileno(), _POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _ping(conn: psycopg.Connection[Any]) -> bool:
    """One round trip with an empty query: no BEGIN is injected (unlike ``conn.execute``),
    so the pooled connection stays outside any transaction."""
    try:
        result = conn.pgconn.exec_(b"")
    except psycopg.Error:
        return False
    return result.status == psycopg.pq.ExecStatus.EMPTY_QUERY


def install_pool_events(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> None:
    """Attach dbkit's pool behaviour to ``engine``; it survives ``engine.dispose()``.

    A ``DbkitQueuePool`` (dbkit's default) checks connections itself; any other pool class
    (``poolclass=`` given as an engine option) gets the same behaviour from event listeners.
    """
    pool = engine.pool
    if isinstance(pool, DbkitQueuePool):
        pool.counters = counters
        pool.policy = policy
    else:
        _install_checkout_events(engine, counters, policy)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        now = time.monotonic()
        info = record.info
        info["dbkit_created"] = now
        if policy.max_lifetime > 0:
            jitter = random.uniform(0, _LIFETIME_JITTER * policy.max_lifetime)
            info["dbkit_expires"] = now + policy.max_lifetime - jitter
        counters.connected()

    @event.listens_for(engine, "close")
    def on_close(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        counters.add("open", -1)

    @event.listens_for(engine, "detach")
    def on_detach(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # A detached connection leaves the pool's accounting for good.
        counters.detached()

    @event.listens_for(engine, "invalidate")
    def on_invalidate(
        dbapi_conn: Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        if exception is not None and not isinstance(exception, sa_exc.DisconnectionError):
            counters.add("invalidated")


def _install_checkout_events(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> None:
    """DbkitQueuePool's checkout and return paths, as event listeners for other pools."""

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        before = record.dbapi_connection
        _check_reused(record, policy, counters)
        if record.dbapi_connection is not before:
            # Closed by the checks: SQLAlchemy opens a new connection on this error.
            raise sa_exc.DisconnectionError("pooled connection was closed at checkout")
        counters.checked_out()

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        counters.checked_in()
        if dbapi_conn is None:  # invalidated while checked out
            return
        record.info["dbkit_returned"] = time.monotonic()
        if not policy.keep_idle:
            counters.add("max_idle_closed")
            record.invalidate()

    @event.listens_for(engine, "reset")
    def on_reset(dbapi_conn: Any, record: ConnectionPoolEntry, state: PoolResetState) -> None:
        if state.terminate_only:
            return
        if dbapi_conn.pgconn.transaction_status != _IDLE:
            dbapi_conn.rollback()


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
