"""The pool's checkout and return paths, with dbkit's policy inside them.

SQLAlchemy's ``QueuePool`` runs any pool ``checkout`` listener through a slower path (event
dispatch and a retry loop on every checkout), so ``FastQueuePool`` calls dbkit's policy
from its own ``_do_get`` / ``_return_conn`` instead, and its idle queue hands a returned
connection straight to the thread that waited longest.  ``checkout_entry`` gives dbkit's
driver path a pool entry without the ``_ConnectionFairy`` proxy around it.  Its limits
(Go's ``max_open_conns`` / ``max_idle_conns``) change at run time (``FastQueuePool.resize``).

Public twin (``dbkit.pool``): a ``QueuePool`` with no bounds of its own, the same policy in
``checkout`` / ``checkin`` listeners, and dbkit's own count of checkouts and record of idle
connections for the limits and the sweeper (``CheckoutQueue``).
"""

from __future__ import annotations

import sys
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
    "UNBOUNDED",
    "FastQueuePool",
    "HandoffQueue",
    "PoolClosed",
    "PoolHooks",
    "SlotGranted",
    "SlotKeeper",
    "forget_prepared_statements",
    "go_limits",
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


class SlotKeeper(Protocol):
    """The pool's count of connection slots under ``max_open_conns``, for ``HandoffQueue.get``;
    ``reserve`` and ``release`` are called with the queue's mutex held."""

    def reserve(self) -> bool:
        """Take a slot for a new connection if ``max_open_conns`` allows one now."""

    def release(self) -> None:
        """Give back a slot taken by ``reserve`` or handed over, no connection made in it."""

    def give_back(self, record: ConnectionPoolEntry) -> None:
        """Take back a connection handed to a waiter that left (mutex not held)."""


class SlotGranted(Exception):
    """``HandoffQueue.get``: no idle connection, but a slot was reserved for the caller
    (``SlotKeeper.reserve``, or handed over when one freed up): connect one in it."""


# Handed to a waiter instead of a connection: a slot freed up (or max_open_conns was
# raised), the waiter connects in it.
_SLOT: Any = object()


class _Waiter:
    """One thread waiting for a connection: a lock it blocks on until one is handed over."""

    __slots__ = ("handed", "lock", "record")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.record: ConnectionPoolEntry | None = None  # None once handed: the pool is shut
        self.handed = False


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
                waiter.handed = True
        for waiter in waiters:
            waiter.lock.release()  # with no record: told the pool is closed

    def hand_locked(self, item: ConnectionPoolEntry) -> bool:
        """Give ``item`` (a connection, or ``_SLOT``) to the thread that has waited longest;
        False when none waits.  Mutex held."""
        if not self._waiters or self.closed:
            return False
        waiter = self._waiters.popleft()
        waiter.record = item
        waiter.handed = True
        waiter.lock.release()
        return True

    def waiting(self) -> int:
        return len(self._waiters)

    def get(
        self,
        block: bool = True,
        timeout: float | None = None,
        *,
        slots: SlotKeeper | None = None,
    ) -> ConnectionPoolEntry:
        """An idle connection; else, with ``slots``, ``SlotGranted`` when a new one may be
        made; else (``block``) wait up to ``timeout`` for one of the two to be handed over
        (``Empty`` when none came)."""
        with self.mutex:
            queue = self.queue
            if queue:
                return queue.pop() if self.use_lifo else queue.popleft()
            if slots is not None and slots.reserve():
                raise SlotGranted
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
            if slots is not None and slots.reserve():  # freed meanwhile
                raise SlotGranted
            self._waiters.append(waiter)
        try:
            handed = waiter.lock.acquire(True, -1 if timeout is None else timeout)
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: leave the line, and pass on a connection
            # (or slot) handed over meanwhile, or it would be lost to the pool for good.
            with self.mutex:
                if not waiter.handed:
                    self._waiters.remove(waiter)
                elif waiter.record is _SLOT and slots is not None:
                    slots.release()
            record = waiter.record
            if record is not None and record is not _SLOT:
                if slots is not None:
                    slots.give_back(record)
                else:
                    self.put(record)
            raise
        if not handed:
            with self.mutex:
                if not waiter.handed:  # nothing was handed over before the timeout
                    self._waiters.remove(waiter)
                    raise sqla_queue.Empty
        record = waiter.record
        if record is None:
            raise PoolClosed("the pool was shut while waiting for a connection")
        if record is _SLOT:
            raise SlotGranted
        return record

    def put(
        self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None
    ) -> None:
        with self.mutex:
            if self.hand_locked(item):
                return
            if 0 < self.maxsize <= len(self.queue):
                raise sqla_queue.Full
            self.queue.append(item)


# max_idle_conns of a pool whose idle queue has no bound (QueuePool's pool_size=0).
UNBOUNDED = sys.maxsize


def go_limits(pool_size: int, max_overflow: int) -> tuple[int, int]:
    """QueuePool's (pool_size, max_overflow) as Go's (max_open_conns, max_idle_conns):
    ``max_open`` 0 = unlimited; ``max_idle`` ``UNBOUNDED`` for pool_size=0 (QueuePool's
    "no limit"; dbkit's hooks make it "none" with ``max_idle_conns = 0``)."""
    if pool_size <= 0:
        return 0, UNBOUNDED
    return (pool_size + max_overflow if max_overflow >= 0 else 0), pool_size


class FastQueuePool(QueuePool):
    """``QueuePool`` that runs ``hooks`` in its own checkout and return paths, and whose
    limits change at run time (``resize``), with Go's semantics.

    Go's ``numOpen`` is QueuePool's count of slots (``_overflow + size()``: connections in
    use, being made, or idle); ``max_open`` caps it, ``max_idle`` caps the idle queue
    (``size()``).  Every change to them happens under the idle queue's mutex.  An empty slot
    (a connection closed while out) is not queued: the next checkout that needs one makes a
    new slot, so the idle queue holds live connections and the slot count is exact."""

    _queue_class = HandoffQueue
    _pool: HandoffQueue
    hooks: PoolHooks | None = None

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        use_lifo: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(
            creator,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeout=timeout,
            use_lifo=use_lifo,
            **kw,
        )
        self.max_open, self.max_idle = go_limits(pool_size, self._max_overflow)

    # -- limits ----------------------------------------------------------------------------

    def resize(self, max_open: int, max_idle: int) -> int:
        """Go's ``SetMaxOpenConns`` / ``SetMaxIdleConns`` now: ``max_open`` 0 = unlimited,
        ``max_idle`` 0 = none idle (at most ``max_open``, the caller's business).  Threads
        waiting for a connection get a slot at once when the cap went up; connections in
        use are never touched (beyond the cap, they are closed as they come back).  Idle
        connections beyond ``max_idle`` are closed now, the longest idle first; returns
        how many."""
        queue = self._pool
        surplus: list[ConnectionPoolEntry] = []
        with queue.mutex:
            slots = self._overflow + queue.maxsize
            size = max_idle if 0 < max_idle < UNBOUNDED else 0
            queue.maxsize = size
            self._overflow = slots - size
            self._max_overflow = max(max_open - size, 0) if max_open > 0 else -1
            self.max_open, self.max_idle = max_open, max_idle
            idle = queue.queue
            while len(idle) > max_idle:
                # The left end is the longest idle one: LIFO takes from the right, FIFO
                # puts on the right.
                surplus.append(idle.popleft())
            self._grant_locked()
        closed = 0
        for record in surplus:  # closed before their slots are free (QueuePool's order)
            if record.dbapi_connection is not None:
                record.close()
                closed += 1
        if surplus:
            with queue.mutex:
                self._overflow -= len(surplus)
                self._grant_locked()
        return closed

    def reserve(self) -> bool:  # SlotKeeper, mutex held
        if self.max_open > 0 and self._overflow + self._pool.maxsize >= self.max_open:
            return False
        self._overflow += 1
        return True

    def release(self) -> None:  # SlotKeeper, mutex held
        self._overflow -= 1
        self._grant_locked()

    def give_back(self, record: ConnectionPoolEntry) -> None:  # SlotKeeper
        self._do_return_conn(record)

    def _grant_locked(self) -> None:
        """Free slots go to waiting threads, which connect in them."""
        queue = self._pool
        while queue.waiting() and not queue.closed and self.reserve():
            queue.hand_locked(_SLOT)

    def shut(self) -> None:
        """No more checkouts: waiting threads and later callers get ``PoolClosed``; the
        hooks close connections that come back (``PoolHooks.returned``)."""
        self._pool.close()

    # -- checkout --------------------------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        queue = self._pool
        try:
            if queue.closed:
                raise PoolClosed("the pool is shut")
            record = queue.get(False, slots=self)  # an idle connection: the usual case
        except SlotGranted:
            record = self._connect_in_slot()
        except sqla_queue.Empty:  # every slot taken: wait for a connection or a slot
            record = self._wait()
        hooks = self.hooks
        if hooks is not None:
            try:
                hooks.checked_out(record)
            except BaseException:
                self._return_conn(record)
                raise
        return record

    def _connect_in_slot(self) -> ConnectionPoolEntry:
        try:
            return self._create_connection()
        except BaseException:
            with self._pool.mutex:
                self.release()
            raise

    def _wait(self) -> ConnectionPoolEntry:
        def take() -> ConnectionPoolEntry:
            try:
                return self._pool.get(True, self._timeout, slots=self)
            except SlotGranted:
                return self._connect_in_slot()
            except sqla_queue.Empty:
                pass  # raised outside the except: the cause is no Empty
            raise sa_exc.TimeoutError(
                f"QueuePool limit of {self.max_open} connections (max_open_conns) "
                f"reached, connection timed out, timeout {self._timeout:.2f}",
                code="3o7r",
            )

        hooks = self.hooks
        return take() if hooks is None else timed_wait(hooks, take)

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

    # -- return ----------------------------------------------------------------------------

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # Called for every connection checked in (not for a detached one).
        hooks = self.hooks
        try:
            if hooks is not None:
                hooks.returned(record)
        finally:
            self._do_return_conn(record)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        """Go's ``putConn``: beyond ``max_open`` (lowered meanwhile) the connection is closed;
        else it goes to the longest waiter, or to the idle queue while it holds fewer than
        ``max_idle``, else it is closed (``idle_full``: Go's ``MaxIdleClosed``)."""
        queue = self._pool
        idle_full = False
        with queue.mutex:
            live = record.dbapi_connection is not None
            if self.max_open > 0 and self._overflow + queue.maxsize > self.max_open:
                pass  # beyond the cap (lowered while it was out): closed, not handed on
            elif queue.hand_locked(record):  # an empty slot is reconnected by the waiter
                return
            elif not live:
                self._overflow -= 1  # an empty slot is not kept
                return
            elif len(queue.queue) >= self.max_idle:
                idle_full = True
            else:
                queue.queue.append(record)
                return
        if idle_full and self.hooks is not None:
            self.hooks.idle_full()
        try:
            record.close()
        finally:
            # Only now is the slot free: the server never sees more than max_open.
            with queue.mutex:
                self._overflow -= 1
                self._grant_locked()

    def _drop_empty_locked(self) -> None:
        """Take the idle entries whose connection was closed in place (by the sweeper) out of
        the queue, freeing their slots.  Mutex held."""
        queue = self._pool
        empty = [record for record in queue.queue if record.dbapi_connection is None]
        for record in empty:
            queue.queue.remove(record)
            self._overflow -= 1
        if empty:
            self._grant_locked()

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, FastQueuePool):
            pool.hooks = self.hooks
            pool.resize(self.max_open, self.max_idle)
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
    queue = pool._pool
    with queue.mutex:
        yield list(queue.queue)
        pool._drop_empty_locked()  # those the caller closed


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
