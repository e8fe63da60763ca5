"""The pool's checkout and return paths, with dbkit's policy inside them.

SQLAlchemy's ``QueuePool`` runs any pool ``checkout`` listener through a slower path (event
dispatch and a retry loop on every checkout), so ``FastQueuePool`` calls dbkit's policy
from its own ``_do_get`` / ``_return_conn`` instead, and its idle queue hands a returned
connection straight to the thread that waited longest.  ``checkout_entry`` gives dbkit's
driver path a pool entry without the ``_ConnectionFairy`` proxy around it.

Public twin (``dbkit.pool``): a plain ``QueuePool`` with the same policy in ``checkout`` /
``checkin`` listeners, and dbkit's own record of idle connections for the sweeper.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

__all__ = [
    "FastQueuePool",
    "HandoffQueue",
    "PoolClosed",
    "PoolHooks",
    "forget_prepared_statements",
    "idle_entries",
    "in_transaction_mode",
    "timed_wait",
]


class PoolHooks(Protocol):
    """What the pool tells dbkit's policy (``dbkit.pool.PolicyHooks``)."""

    def checked_out(self, record: ConnectionPoolEntry) -> None:
        """A connection leaves the pool; invalidating ``record`` makes the pool reconnect."""

    def returned(self, record: ConnectionPoolEntry) -> None:
        """A connection comes back: reset (rolled back if needed, or ``DISCARD ALL`` with
        ``reset_on_return = "discard"``) before it is queued; may be invalidated."""

    def waited(self, seconds: float, timed_out: bool) -> None:
        """A checkout had to wait for a connection to come back."""

    def idle_full(self) -> None:
        """A returned connection is closed: the idle queue holds max_idle_conns already."""


class _Waiter:
    """One thread waiting for a connection: a lock it blocks on until one is handed over."""

    __slots__ = ("lock", "record")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.record: ConnectionPoolEntry | None = None


class PoolClosed(sa_exc.TimeoutError):
    """A checkout from a pool that was shut (its ``Database`` was closed).  A kind of
    ``TimeoutError``: no connection will come, and callers already handle that."""


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
        self.closed = False

    def close(self) -> None:
        """The pool is shut: every waiting thread is woken, with ``PoolClosed``."""
        with self.mutex:
            self.closed = True
            waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.lock.release()  # with no record: told the pool is closed

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
            if self.closed:
                raise PoolClosed("the pool is shut")
            if queue:  # returned meanwhile
                return queue.pop() if self.use_lifo else queue.popleft()
            self._waiters.append(waiter)
        try:
            handed = waiter.lock.acquire(True, -1 if timeout is None else timeout)
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: leave the line, and pass on a connection
            # handed over meanwhile, or it would be lost to the pool for good.
            with self.mutex:
                if waiter.record is None:
                    self._waiters.remove(waiter)
            if waiter.record is not None:
                self.put(waiter.record)
            raise
        if handed:
            if waiter.record is None:
                raise PoolClosed("the pool was shut while waiting for a connection")
            return waiter.record
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
            if waiters and not self.closed:
                waiter = waiters.popleft()
                waiter.record = item
                waiter.lock.release()
                return
            if 0 < self.maxsize <= len(self.queue):
                raise sqla_queue.Full
            self.queue.append(item)


class FastQueuePool(QueuePool):
    """``QueuePool`` that runs ``hooks`` in its own checkout and return paths; without
    hooks it behaves as a plain ``QueuePool``."""

    _queue_class = HandoffQueue
    hooks: PoolHooks | None = None

    def shut(self) -> None:
        """No more checkouts: waiting threads and later callers get ``PoolClosed``; the
        hooks close connections that come back (``PoolHooks.returned``)."""
        queue = self._pool
        if isinstance(queue, HandoffQueue):
            queue.close()

    def _do_get(self) -> ConnectionPoolEntry:
        hooks = self.hooks
        if isinstance(self._pool, HandoffQueue) and self._pool.closed:
            raise PoolClosed("the pool is shut")
        if hooks is None:
            return super()._do_get()
        try:
            record = self._pool.get(False)  # an idle connection: the usual case
        except sqla_queue.Empty:
            record = self._get_slow(hooks)
        try:
            hooks.checked_out(record)
        except BaseException:
            self._return_conn(record)
            raise
        return record

    def _get_slow(self, hooks: PoolHooks) -> ConnectionPoolEntry:
        # The only blocking branch of QueuePool._do_get: every slot taken, none idle.
        if not (self._max_overflow > -1 and self._overflow >= self._max_overflow):
            return super()._do_get()
        return timed_wait(hooks, super()._do_get)

    def connect(self) -> PoolProxiedConnection:
        # Left in autocommit by the driver path (checkout_entry).
        return in_transaction_mode(super().connect())

    def checkout_entry(self) -> ConnectionPoolEntry:
        """A pool entry with a live connection, without the ``_ConnectionFairy`` proxy that
        ``connect()`` wraps around it (a weakref finalizer, a reset protocol: as much work
        as a primary-key query).  Hand it back with ``checkin_entry``."""
        record = cast(_ConnectionRecord, self._do_get())
        try:
            record.get_connection()  # (re)connects an empty or recycled slot
        except BaseException as error:
            record._checkin_failed(error, _fairy_was_created=False)
            raise
        return record

    def checkin_entry(self, record: ConnectionPoolEntry) -> None:
        cast(_ConnectionRecord, record).checkin(_fairy_was_created=False)

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # Called for every connection checked in (not for a detached one).
        hooks = self.hooks
        try:
            if hooks is not None:
                hooks.returned(record)
        finally:
            self._do_return_conn(record)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        try:
            self._pool.put(record, False)
        except sqla_queue.Full:
            if self.hooks is not None and record.dbapi_connection is not None:
                self.hooks.idle_full()
            try:
                record.close()
            finally:
                self._dec_overflow()

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, FastQueuePool):
            pool.hooks = self.hooks
        return pool

    def invalidate_older_connections(self) -> None:
        """What SQLAlchemy does on a disconnect: every connection made before now is
        recycled at its next checkout (the server may have restarted)."""
        self._invalidate_time = time.time()


T = TypeVar("T")


def timed_wait(hooks: PoolHooks, take: Callable[[], T]) -> T:
    """``take()`` a connection that has to be waited for, telling ``hooks`` how long it took
    and whether it timed out (Go's ``WaitCount`` / ``WaitDuration``).  Public API only."""
    started = time.monotonic()
    try:
        taken = take()
    except sa_exc.TimeoutError:
        hooks.waited(time.monotonic() - started, timed_out=True)
        raise
    hooks.waited(time.monotonic() - started, timed_out=False)
    return taken


def in_transaction_mode(fairy: PoolProxiedConnection) -> PoolProxiedConnection:
    """``fairy`` with its driver connection out of autocommit, as SQLAlchemy's transactions
    need (they rely on the driver's implicit BEGIN); a connection that cannot be switched
    is discarded.  Public API only: dbkit leaves connections in autocommit after a
    statement outside a transaction, and every pool hands them out through here."""
    dbapi_conn = fairy.dbapi_connection
    if dbapi_conn is not None and dbapi_conn.autocommit:
        try:
            dbapi_conn.autocommit = False
        except BaseException:
            fairy.invalidate()
            fairy.close()
            raise
    return fairy


@contextmanager
def idle_entries(pool: Pool) -> Iterator[list[ConnectionPoolEntry] | None]:
    """The idle connections of a ``FastQueuePool``, with its queue locked so that no
    checkout takes one meanwhile; None for any other pool."""
    if not isinstance(pool, FastQueuePool):
        yield None
        return
    queue: Any = pool._pool
    with queue.mutex:
        yield list(queue.queue)


def forget_prepared_statements(conn: Any) -> None:
    """Empty psycopg's record of the statements it prepared on ``conn``'s server session,
    without telling the server: for right before a ``DISCARD ALL``, which drops them there.

    psycopg reads the command status of a ``DISCARD ALL`` and forgets its prepared
    statements then, but only the first time it runs that statement text:
    for a statement it has seen before it skips the check (psycopg 3.3.9), and would go on
    running ``_pg3_0`` after the server dropped it.  Emptied here first, nothing is left
    to go wrong, and no ``DEALLOCATE ALL`` follows the DISCARD (one round trip saved).

    Public twin (``dbkit.pool``): a connection of a discarding pool never has psycopg
    prepare statements (``prepare_threshold = None``).
    """
    prepared = conn._prepared
    prepared.clear()
    prepared._to_flush.clear()  # the DEALLOCATE ALL clear() queued when it had names
