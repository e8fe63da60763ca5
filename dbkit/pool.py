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
- session reset on return (``reset_on_return``): a rollback when a transaction is still
  open (the default, ``"rollback"``: free for a connection that is idle), or with
  ``"discard"`` also a ``DISCARD ALL``, so that no session state (``SET``, temporary
  tables, advisory locks, ``LISTEN``, prepared statements …) reaches the next user.

- Go's setters at run time (``set_max_open_conns``, ``set_max_idle_conns``,
  ``set_conn_max_lifetime``, ``set_conn_max_idle_time``; ``Database`` has them as methods),
  with Go's semantics: a lowered open cap closes connections as they come back, a lowered
  idle cap closes idle ones now, new limits apply to connections already open.

The policy lives in ``PolicyHooks``.  With fast paths on, ``dbkit.fastpath.pool``'s
``FastQueuePool`` calls it from its own checkout and return paths; otherwise a
``CountingQueuePool`` runs it from pool event listeners (SQLAlchemy's public API), and
dbkit keeps its own count of checkouts and record of idle connections for the limits and
the sweeper (``CheckoutQueue``).  Same checks, same counters either way.
"""

from __future__ import annotations

import math
import numbers
import operator
import random
import select
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
from loguru import logger
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from dbkit.fastpath.pool import (
    FastQueuePool,
    PoolClosed,
    forget_prepared_statements,
    go_limits,
    idle_entries,
    in_transaction_mode,
    timed_wait,
)
from dbkit.settings import RESETS
from dbkit.stats import PoolCounters

__all__ = [
    "CheckoutQueue",
    "CountingQueuePool",
    "DiscardPolicyHooks",
    "LeakDetector",
    "PolicyHooks",
    "PoolPolicy",
    "discard_all",
    "evict_expired",
    "install_pool_events",
    "policy_hooks",
    "set_conn_max_idle_time",
    "set_conn_max_lifetime",
    "set_max_idle_conns",
    "set_max_open_conns",
    "shut",
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


class PoolPolicy:
    """The Go-style limits the pool enforces; plain numbers, 0 meaning "off".  And how a
    returned connection is reset: ``"rollback"`` (of an open transaction only) or
    ``"discard"`` (that, then ``DISCARD ALL``).

    One object per pool, read at every check: the run-time setters change its numbers in
    place (one attribute each, so a check sees the old value or the new one), and the
    change applies to connections already open (a lifetime counts from each connection's
    creation, an idle time from its last return)."""

    def __init__(
        self,
        *,
        max_lifetime: float,
        max_idle_time: float,
        ping_after_idle: float,
        keep_idle: bool,
        reset_on_return: str = "rollback",
    ) -> None:
        if reset_on_return not in RESETS:
            raise ValueError(f"reset_on_return: {reset_on_return!r} is not one of {RESETS}")
        self.max_lifetime = max_lifetime
        self.max_idle_time = max_idle_time
        self.ping_after_idle = ping_after_idle
        self.keep_idle = keep_idle
        self.reset_on_return = reset_on_return


class PolicyHooks:
    """The policy and the counters, at the pool's checkout and return (``PoolHooks``)."""

    __slots__ = ("closed", "counters", "policy")

    def __init__(self, counters: PoolCounters, policy: PoolPolicy) -> None:
        self.counters = counters
        self.policy = policy
        self.closed = False  # the Database was closed: connections coming back are closed

    def _closing(self, record: ConnectionPoolEntry) -> bool:
        """Close a connection that comes back after its Database was closed."""
        if not self.closed:
            return False
        if record.dbapi_connection is not None:
            record.invalidate()
        return True

    def checked_out(self, record: ConnectionPoolEntry) -> None:
        self.counters.checked_out()
        self.check(record)

    def check(self, record: ConnectionPoolEntry) -> None:
        """Close ``record``'s connection if it expired or died (see ``check_reused``)."""
        if record.dbapi_connection is not None:
            check_reused(record, self.policy, self.counters)

    # Logged when reset() fails; the connection is closed instead of going back.
    reset_failed = "rollback on return failed; discarded"

    def returned(self, record: ConnectionPoolEntry) -> None:
        """Go's ``putConn``: an expired connection is closed (``max_lifetime_closed``), and
        with ``max_idle_conns = 0`` every one (``max_idle_closed``); before the reset, which
        they no longer need."""
        self.counters.checked_in()
        dbapi_conn: Any = record.dbapi_connection
        if dbapi_conn is None or self._closing(record):  # invalidated, or shut down
            return
        policy = self.policy
        if policy.max_lifetime > 0 and _expired(record.info, policy, time.monotonic()):
            self.counters.add("max_lifetime_closed")
            record.invalidate()
            return
        if not policy.keep_idle:
            # max_idle_conns = 0: Go keeps no idle connection at all.
            self.counters.add("max_idle_closed")
            record.invalidate()
            return
        try:
            self.reset(dbapi_conn)
        except BaseException as error:
            _reset_failed(record, error, self.reset_failed)
            return
        record.info["dbkit_returned"] = time.monotonic()

    def reset(self, dbapi_conn: Any) -> None:
        """Replaces QueuePool's unconditional rollback-on-return: libpq already knows
        whether a transaction is open, so an idle connection skips the driver call."""
        if dbapi_conn.pgconn.transaction_status != _IDLE:
            dbapi_conn.rollback()

    def waited(self, seconds: float, timed_out: bool) -> None:
        self.counters.waited(seconds, timed_out=timed_out)

    def idle_full(self) -> None:
        self.counters.add("max_idle_closed")


class DiscardPolicyHooks(PolicyHooks):
    """``reset_on_return = "discard"``: every returned connection is reset with
    ``DISCARD ALL`` (see ``discard_all``), one round trip per return.  A connection whose
    reset fails (a dead one) is closed instead of going back to the pool.

    ``forget`` (a fast path: ``forget_prepared_statements``) empties psycopg's record of
    its prepared statements first; without it the pool's connections must not have
    psycopg prepare any (``install_pool_events`` sees to that)."""

    __slots__ = ("forget",)

    def __init__(
        self,
        counters: PoolCounters,
        policy: PoolPolicy,
        forget: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__(counters, policy)
        self.forget = forget

    reset_failed = "DISCARD ALL on return failed; connection closed"

    def reset(self, dbapi_conn: Any) -> None:
        discard_all(dbapi_conn, self.forget)


def policy_hooks(counters: PoolCounters, policy: PoolPolicy, *, fast: bool) -> PolicyHooks:
    """The hooks for ``policy``: the reset is chosen once here, so the default
    ``"rollback"`` pays nothing for the other.  (While ``max_idle_conns = 0``, a returned
    connection is closed before any reset: nothing is discarded.)"""
    if discards(policy):
        return DiscardPolicyHooks(counters, policy, forget_prepared_statements if fast else None)
    return PolicyHooks(counters, policy)


def discards(policy: PoolPolicy) -> bool:
    """Whether a pool under ``policy`` sends ``DISCARD ALL`` when a connection comes back
    (one it keeps: ``max_idle_conns`` may be raised at run time)."""
    return policy.reset_on_return == "discard"


def discard_all(conn: psycopg.Connection[Any], forget: Callable[[Any], None] | None = None) -> None:
    """Give ``conn`` back the session state of a new connection: roll back an open
    transaction, then ``DISCARD ALL`` (which must run outside one) in autocommit.

    The DISCARD goes through psycopg's ``Connection.execute`` (never prepared itself), so
    that psycopg sees it as any other statement, and its command status.  psycopg 3.3
    forgets its own prepared statements on that status only the first time it runs the
    statement, hence ``forget`` (see ``DiscardPolicyHooks``), called first.
    ``autocommit`` is left as it was, for the pool's next checkout to set as it needs; on
    an error the caller closes the connection.
    """
    if forget is not None:
        forget(conn)  # before the rollback too: no DEALLOCATE ALL after it either
    if conn.pgconn.transaction_status != _IDLE:
        conn.rollback()
    if conn.autocommit:
        conn.execute("DISCARD ALL", prepare=False)
    else:  # outside a transaction, the setter is client-side only: no round trip
        conn.autocommit = True
        conn.execute("DISCARD ALL", prepare=False)
        conn.autocommit = False


def _reset_failed(record: ConnectionPoolEntry, error: BaseException, message: str) -> None:
    """Close the connection of ``record``, whose reset on return raised ``error`` (counted
    as invalidated by the ``invalidate`` listener); re-raise a ``KeyboardInterrupt`` or
    the like once that is done."""
    logger.opt(exception=error).warning(message)
    record.invalidate(error)
    if not isinstance(error, Exception):
        raise error


def check_reused(record: ConnectionPoolEntry, policy: PoolPolicy, counters: PoolCounters) -> None:
    """Checkout checks of a pooled connection: an expired or dead one is closed here, and
    the pool then opens a new one before the caller sees it."""
    info = record.info
    returned = info.get("dbkit_returned")
    if returned is None:  # a fresh connection needs no checks
        return
    dbapi_conn: Any = record.dbapi_connection
    now = time.monotonic()
    idle = now - returned
    if policy.max_lifetime > 0 and _expired(info, policy, now):
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


def _expired(info: dict[str, Any], policy: PoolPolicy, now: float) -> bool:
    """Whether the connection of ``info`` is older than ``policy.max_lifetime`` (> 0), less
    its own jitter: counted from its creation, so a lifetime set later applies to it too."""
    created = info.get("dbkit_created")
    if created is None:
        return False
    life: float = info.get("dbkit_life", 1.0)
    return bool(now - created >= policy.max_lifetime * life)


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


# -- the public-API pool ---------------------------------------------------------------------

# The checkout under way on this thread (``CountingQueuePool.connect``): SQLAlchemy makes
# and checks out a connection on the thread that asked for it, so the pool's events
# (``do_connect``, ``connect``, ``checkout``) find it here.
_checkout = threading.local()


class _Ticket:
    """One checkout's place under ``max_open_conns``: taken before SQLAlchemy's checkout,
    given back when its connection comes back (or the checkout failed)."""

    __slots__ = ("connecting", "gate", "handed", "released")

    def __init__(self, gate: CheckoutQueue, handed: bool = False) -> None:
        self.gate = gate
        self.connecting = 0  # connections this checkout is making (do_connect seen)
        self.handed = handed  # handed over to a waiter, its checkout not done yet
        self.released = False

    def release(self) -> None:
        self.gate.release(self)


class _TicketWaiter:
    """A checkout waiting for a place: its own condition on the queue's lock, so that a
    place given back wakes exactly the longest waiter."""

    __slots__ = ("granted", "wake")

    def __init__(self, lock: threading.RLock) -> None:
        self.wake = threading.Condition(lock)
        self.granted = False

    def was_granted(self) -> bool:
        return self.granted


class CheckoutQueue:
    """Go's ``max_open_conns`` and ``max_idle_conns`` for a ``CountingQueuePool``, changeable
    at run time, on SQLAlchemy's public API.

    ``QueuePool`` fixes its bounds when it is made (``pool_size``, ``max_overflow``) and has
    no public way to change them; its ``_pool.maxsize`` / ``_max_overflow`` are private, and
    a pool recreated with new bounds would drop the connections in use and the idle ones.
    So the ``QueuePool`` underneath has no bounds (``pool_size=0``), and the limits are kept
    here, from what the pool's public events show:

    - open cap: a checkout takes a ticket first (``get``); while ``max_open`` tickets are
      out it waits here, like Go's ``connRequests``.  SQLAlchemy may still hand a ticket
      holder an empty entry and connect it while idle connections wait (its queue keeps the
      entries of closed connections), so before any connection is made (``do_connect``) the
      longest-idle ones are closed while ``open + connecting`` would pass the cap
      (``opening``): the server never sees more than ``max_open`` connections.  A
      connection returned while more than ``max_open`` are open is closed (``keep``).
    - idle cap: the live idle connections are recorded here (returned, not yet taken
      again); one returned while ``max_idle`` are idle closes the longest-idle one
      (``MaxIdleClosed``), whose empty entry then sits at the bottom of the LIFO queue,
      where it is only reached once every live one is in use.

    Every decision is made, and every connection it closes is closed, under one lock, so
    that two threads never both see room for the same connection.  A closed idle connection
    may just have been taken from SQLAlchemy's queue by a checkout: that checkout finds it
    closed and SQLAlchemy connects afresh (see ``_install_counting_events``).

    ``get`` blocks in a method so named because tests find waiting threads by it."""

    def __init__(self, max_open: int, max_idle: int, timeout: float) -> None:
        self.max_open = max_open  # 0 = unlimited
        self.max_idle = max_idle  # 0 = none
        self.timeout = timeout
        self.lock = threading.RLock()  # re-entered: a close under it fires the close event
        self.cond = threading.Condition(self.lock)
        self.out = 0  # tickets taken and not given back
        self.waiters: deque[_TicketWaiter] = deque()  # first come, first served
        self.connecting = 0  # connections being made
        self.handed = 0  # places handed to waiters whose checkout is not done yet
        self.idle: dict[ConnectionPoolEntry, None] = {}  # live idle ones, longest idle first
        self.closed = False
        self.counters: PoolCounters | None = None  # the Database's: its "open" count

    # -- checkout ----------------------------------------------------------------------------

    def get(self, hooks: PolicyHooks) -> _Ticket:
        """A ticket for one checkout; waits (Go's ``WaitCount``) while ``max_open`` are out,
        or others wait already (first come, first served); ``sqlalchemy.exc.TimeoutError``
        after ``timeout``, ``PoolClosed`` once shut."""
        with self.cond:
            if self.closed:
                raise PoolClosed("the pool is shut")
            if not self.waiters and self._room():
                self.out += 1
                return _Ticket(self)
        return timed_wait(hooks, self._wait)

    def _room(self) -> bool:
        return self.max_open <= 0 or self.out < self.max_open

    def _wait(self) -> _Ticket:
        deadline = time.monotonic() + self.timeout
        waiter = _TicketWaiter(self.lock)
        with self.cond:
            if not self.waiters and self._room():  # given back meanwhile
                self.out += 1
                return _Ticket(self)
            self.waiters.append(waiter)
            while not waiter.granted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.waiters.remove(waiter)
                    raise sa_exc.TimeoutError(
                        f"QueuePool limit of {self.max_open} connections (max_open_conns) "
                        f"reached, connection timed out, timeout {self.timeout:.2f}",
                        code="3o7r",
                    )
                try:
                    waiter.wake.wait(remaining)
                except BaseException:
                    # Interrupted (Ctrl-C): leave the line, or pass on a place handed over
                    # meanwhile, or it would be lost for good.
                    if waiter.was_granted():  # by another thread, meanwhile
                        self.handed -= 1
                        self._give_back()
                    else:
                        self.waiters.remove(waiter)
                    raise
            # A place was handed over (counted in ``out`` by whoever handed it).
            if self.closed:  # told now that it woke: pass the place on, so all are told
                self.handed -= 1
                self._give_back()
                raise PoolClosed("the pool was shut while waiting for a connection")
            return _Ticket(self, handed=True)

    def release(self, ticket: _Ticket) -> None:
        with self.cond:
            if ticket.released:
                return
            ticket.released = True
            self._checked_out(ticket)
            self._give_back()

    def _checked_out(self, ticket: _Ticket) -> None:
        if ticket.handed:
            ticket.handed = False
            self.handed -= 1

    def _give_back(self) -> None:
        """One place is free: the longest waiter gets it (as Go's ``putConn`` hands a
        connection to a waiting request), else it is free for the next checkout.  Without
        the hand-over, a thread that returns a connection and checks out again at once
        would take the place every time, before any woken waiter runs."""
        self.out -= 1
        self._grant()

    def _grant(self) -> None:
        while self.waiters and self._room():
            waiter = self.waiters.popleft()
            self.out += 1
            self.handed += 1
            waiter.granted = True
            waiter.wake.notify()

    def opening(self, ticket: _Ticket) -> None:
        """``ticket``'s checkout is about to make a connection: first close the longest-idle
        ones while it would bring more than ``max_open`` onto the server."""
        with self.cond:
            ticket.connecting += 1
            self.connecting += 1
            counters = self.counters
            if self.max_open <= 0 or counters is None:
                return
            while self.idle and counters.open + self.connecting > self.max_open:
                self._close_longest_idle()

    def opened(self, ticket: _Ticket, counters: PoolCounters) -> None:
        """A connection ``ticket``'s checkout made is open: counted in one step."""
        with self.cond:
            if ticket.connecting:
                ticket.connecting -= 1
                self.connecting -= 1
            counters.connected()

    def settle(self, ticket: _Ticket) -> None:
        """The checkout is over: connections it set out to make and did not are forgotten."""
        if ticket.connecting:
            with self.cond:
                self.connecting -= ticket.connecting
                ticket.connecting = 0

    def taken(self, record: ConnectionPoolEntry, ticket: _Ticket | None = None) -> None:
        """``record`` was checked out (by ``ticket``'s checkout), or closed: not idle."""
        with self.cond:
            self.idle.pop(record, None)
            if ticket is not None:
                self._checked_out(ticket)

    def _spare(self) -> int:
        """Idle connections not spoken for: a waiter handed a place takes one when it runs
        (Go hands it the returned connection itself, which never counts as idle)."""
        return max(len(self.idle) - self.handed, 0)

    # -- return ------------------------------------------------------------------------------

    def keep(self, record: ConnectionPoolEntry, hooks: PolicyHooks) -> None:
        """Go's ``putConn`` for a live returned connection: closed while more than
        ``max_open`` are open; else idle, closing the longest-idle one when ``max_idle``
        are idle already (counted as ``max_idle_closed``)."""
        with self.cond:
            counters = self.counters
            if (
                self.max_open > 0
                and counters is not None
                and counters.open + self.connecting > self.max_open
            ):
                record.invalidate()  # beyond the cap, lowered while it was out
                return
            # The release after this hands the place to a waiter: the connection is for it,
            # not for the idle list (Go's putConn hands it over before any idle check).
            handing = bool(self.waiters) and (self.max_open <= 0 or self.out - 1 < self.max_open)
            if not handing and self._spare() >= self.max_idle:
                hooks.idle_full()
                if self._spare() == 0:  # max_idle = 0 (the hooks close those first)
                    record.invalidate()
                    return
                self._close_longest_idle()  # never one spoken for: those are the newest
            self.idle[record] = None

    def _close_longest_idle(self) -> None:
        record = next(iter(self.idle))
        del self.idle[record]
        record.close()  # stays in QueuePool's queue as an empty entry

    # -- limits ------------------------------------------------------------------------------

    def resize(self, max_open: int, max_idle: int) -> int:
        """New limits now (0 = unlimited / none idle): waiting checkouts go ahead at once
        when the open cap went up; idle connections beyond ``max_idle`` are closed, the
        longest idle first.  Returns how many were closed."""
        with self.cond:
            self.max_open, self.max_idle = max_open, max_idle
            closed = 0
            while self._spare() > max_idle:
                self._close_longest_idle()
                closed += 1
            self._grant()  # a raised cap lets waiting checkouts go ahead now
        return closed

    def idle_records(self) -> list[ConnectionPoolEntry]:
        with self.cond:
            return list(self.idle)

    def shut(self) -> None:
        """No more checkouts.  A waiting thread is told when it wakes (a connection came
        back, or its timeout), as ``Database.close()`` documents for the public path."""
        with self.cond:
            self.closed = True


class CountingQueuePool(QueuePool):
    """``QueuePool`` through its public API only: Go's limits kept by dbkit's
    ``CheckoutQueue`` (changeable at run time) over a ``QueuePool`` with no bounds of its
    own, the checkouts that must wait timed for Go's ``WaitCount`` / ``WaitDuration``, and
    connections handed out in transaction mode (``FastQueuePool.connect``'s twin)."""

    hooks: PolicyHooks | None = None

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        use_lifo: bool = False,
        **kw: Any,
    ) -> None:
        # QueuePool's own bounds cannot change after this (see CheckoutQueue): it gets none,
        # and what they say goes to the gate.
        max_open, max_idle = go_limits(pool_size, max_overflow)
        super().__init__(
            creator, pool_size=0, max_overflow=-1, timeout=timeout, use_lifo=use_lifo, **kw
        )
        self.gate = CheckoutQueue(max_open, max_idle, timeout)

    @property
    def max_open(self) -> int:
        """Go's ``max_open_conns``; 0 = unlimited."""
        return self.gate.max_open

    @max_open.setter
    def max_open(self, value: int) -> None:
        self.gate.resize(max(value, 0), self.gate.max_idle)

    def connect(self) -> PoolProxiedConnection:
        hooks = self.hooks
        if hooks is None:  # dbkit's events are not installed: a plain QueuePool
            return in_transaction_mode(super().connect())
        gate = self.gate
        ticket = gate.get(hooks)
        _checkout.ticket = ticket
        try:
            fairy = super().connect()
        except BaseException:
            ticket.release()  # no connection went out (a checked-in one released it already)
            raise
        finally:
            _checkout.ticket = None
            gate.settle(ticket)
        # Left in autocommit by Database.autocommit().
        return in_transaction_mode(fairy)

    def shut(self) -> None:
        self.gate.shut()

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, CountingQueuePool):
            pool.hooks = self.hooks
            pool.gate.counters = self.gate.counters
            pool.gate.resize(self.gate.max_open, self.gate.max_idle)
        return pool


class _IdleRecords:
    """The idle connections of a pool seen through events (the public API has no view of
    the pool's queue), for the sweeper; for pools other than dbkit's two (a ``poolclass=``
    engine option).  A record the sweeper closed may already have been taken from the
    queue by a checkout: that checkout finds its connection closed and raises
    ``DisconnectionError``, on which SQLAlchemy connects afresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()


_idle_by_engine: weakref.WeakKeyDictionary[Engine, _IdleRecords] = weakref.WeakKeyDictionary()


def _record_info(record: ConnectionPoolEntry) -> dict[Any, Any]:
    info = record.record_info
    assert info is not None  # None only for a detached PoolProxiedConnection
    return info


# -- what the setters change, per engine -------------------------------------------------------


class _PoolState:
    """An engine's pool as the run-time setters see it: its hooks (and so its policy and
    counters), a lock that makes each setter one step, and Go's connectionCleaner."""

    def __init__(self, engine: Engine, hooks: PolicyHooks) -> None:
        self.engine = weakref.ref(engine)
        self.hooks = hooks
        self.counters = hooks.counters
        self.policy = hooks.policy
        self.lock = threading.Lock()
        self.cleaner: _Cleaner | None = None
        self.stopped = False  # the engine was shut

    def remember(self, **limits: float) -> None:
        """Keep what a setter set for the Database's next engine (after ``close()`` and
        ``connect()``): the limits are the Database's, like its counters."""
        _set_at_run_time.setdefault(self.counters, {}).update(limits)

    def cleaner_period(self) -> float | None:
        """Go's: min(idle time, lifetime), at least 1 s; None when nothing expires."""
        policy = self.policy
        limits = [p for p in (policy.max_idle_time, policy.max_lifetime) if p > 0]
        if self.stopped or not limits:
            return None
        return max(1.0, min(limits))

    def start_cleaner(self) -> None:
        """Start the cleaner, or wake it to read its period again (lock held)."""
        if self.cleaner_period() is None:
            return
        cleaner = self.cleaner
        if cleaner is not None and cleaner.is_alive():
            cleaner.wake.set()
            return
        self.cleaner = _Cleaner(self)
        self.cleaner.start()


class _Cleaner(threading.Thread):
    """Go's connectionCleaner for limits set at run time: closes idle connections past
    their idle time or lifetime every ``cleaner_period``, so that a quiet pool shrinks
    without waiting for a checkout.  A daemon; it ends when the engine is shut or gone, or
    when no limit is left (a setter starts it again)."""

    def __init__(self, state: _PoolState) -> None:
        super().__init__(name="dbkit-pool-cleaner", daemon=True)
        self.state = state
        self.wake = threading.Event()

    def run(self) -> None:
        state = self.state
        while True:
            with state.lock:
                period = state.cleaner_period()
                if period is None:
                    state.cleaner = None
                    return
            self.wake.wait(period)
            self.wake.clear()
            engine = state.engine()
            if engine is None:
                return
            try:
                evict_expired(engine, state.counters, state.policy)
            except Exception as error:
                logger.opt(exception=error).warning("pool clean-up failed")


_states: weakref.WeakKeyDictionary[Engine, _PoolState] = weakref.WeakKeyDictionary()
# Limits set at run time, by Database (its PoolCounters), for the engines it makes later.
_set_at_run_time: weakref.WeakKeyDictionary[PoolCounters, dict[str, float]] = (
    weakref.WeakKeyDictionary()
)


def shut(engine: Engine) -> None:
    """``engine``'s Database is closing: connections still checked out are closed when they
    come back, and no thread is handed one any more (with fast paths, threads already
    waiting are told at once; otherwise when a connection comes back or their timeout
    ends).  Call before ``engine.dispose()``."""
    pool = engine.pool
    hooks = getattr(pool, "hooks", None)
    if isinstance(hooks, PolicyHooks):
        hooks.closed = True
    if isinstance(pool, FastQueuePool | CountingQueuePool):
        pool.shut()
    state = _states.get(engine)
    if state is not None:
        with state.lock:
            state.stopped = True
            if state.cleaner is not None:
                state.cleaner.wake.set()


def install_pool_events(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> None:
    """Attach dbkit's pool behaviour to ``engine``; it survives ``engine.dispose()``.

    A ``FastQueuePool`` runs the policy itself; any other pool (dbkit's
    ``CountingQueuePool`` with fast paths off, or a ``poolclass=`` given as an engine
    option) gets the same behaviour from event listeners.  Limits set at run time on the
    Database's earlier engine (see ``set_max_open_conns`` …) apply to this one too.
    """
    pool = engine.pool
    fast = isinstance(pool, FastQueuePool)
    earlier = _set_at_run_time.get(counters, {})
    if "max_lifetime" in earlier:
        policy.max_lifetime = earlier["max_lifetime"]
    if "max_idle_time" in earlier:
        policy.max_idle_time = earlier["max_idle_time"]
    hooks = policy_hooks(counters, policy, fast=fast)
    no_prepare = discards(policy) and not fast
    if isinstance(pool, FastQueuePool | CountingQueuePool):
        max_open, max_idle = _limits(pool)
        if not policy.keep_idle:
            max_idle = 0
        max_open = int(earlier.get("max_open", max_open))
        max_idle = int(earlier.get("max_idle", max_idle))
        if "max_open" in earlier:
            counters.max_open_connections = max_open
        policy.keep_idle = max_idle > 0
        pool.hooks = hooks
        if isinstance(pool, CountingQueuePool):
            pool.gate.counters = counters
            _install_counting_events(engine, hooks)
        _resize(pool, counters, max_open, max_idle)
    else:
        _install_checkout_events(engine, hooks)
    _states[engine] = _PoolState(engine, hooks)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        info = record.info
        info["dbkit_created"] = time.monotonic()
        # The share of conn_max_lifetime this connection lives, whatever the lifetime is
        # (it may be set later).
        info["dbkit_life"] = 1.0 - random.uniform(0, _LIFETIME_JITTER)
        ticket: _Ticket | None = getattr(_checkout, "ticket", None)
        if ticket is not None:
            ticket.gate.opened(ticket, counters)
        else:
            counters.connected()
        if no_prepare and isinstance(dbapi_conn, psycopg.Connection):
            # Public twin of forget_prepared_statements: psycopg would not always notice
            # that DISCARD ALL dropped the statements it prepared (see discard_all).
            dbapi_conn.prepare_threshold = None

    @event.listens_for(engine, "close")
    def on_close(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        counters.add("open", -1)
        gate = _record_info(record).get("dbkit_gate")
        if gate is not None:
            gate.taken(record)

    @event.listens_for(engine, "detach")
    def on_detach(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # A detached connection leaves the pool's accounting for good.
        counters.detached()
        out = _record_info(record).pop("dbkit_out", None)
        if isinstance(out, _Ticket):
            out.release()

    @event.listens_for(engine, "invalidate")
    def on_invalidate(
        dbapi_conn: Any, record: ConnectionPoolEntry, exception: BaseException | None
    ) -> None:
        if exception is not None and not isinstance(exception, sa_exc.DisconnectionError):
            counters.add("invalidated")


def _limits(pool: FastQueuePool | CountingQueuePool) -> tuple[int, int]:
    """The pool's (max_open, max_idle) now."""
    if isinstance(pool, FastQueuePool):
        return pool.max_open, pool.max_idle
    return pool.gate.max_open, pool.gate.max_idle


def _resize(
    pool: FastQueuePool | CountingQueuePool, counters: PoolCounters, max_open: int, max_idle: int
) -> None:
    if isinstance(pool, FastQueuePool):
        closed = pool.resize(max_open, max_idle)
    else:
        closed = pool.gate.resize(max_open, max_idle)
    if closed:
        counters.add("max_idle_closed", closed)


def _checked_out(record: ConnectionPoolEntry, hooks: PolicyHooks) -> None:
    """The checkout checks, from a ``checkout`` listener: a connection the sweeper (or the
    gate) closed, or that the checks close, makes SQLAlchemy connect afresh and check out
    again (``DisconnectionError``), so that attempt is not counted."""
    dbapi_conn: Any = record.dbapi_connection
    if dbapi_conn is None or dbapi_conn.closed:
        raise sa_exc.DisconnectionError("pooled connection was closed while idle")
    hooks.check(record)
    if record.dbapi_connection is not dbapi_conn:
        raise sa_exc.DisconnectionError("pooled connection was closed at checkout")
    hooks.counters.checked_out()


def _install_counting_events(engine: Engine, hooks: PolicyHooks) -> None:
    """``PolicyHooks`` and the ``CheckoutQueue`` as event listeners, for ``CountingQueuePool``.

    A checkout that fails before it is counted (a failed connect, the checks giving up)
    is still checked in by SQLAlchemy: the ``dbkit_out`` mark on the entry tells the two
    apart, so that ``in_use`` and the tickets stay exact."""

    @event.listens_for(engine, "do_connect", insert=True)  # before dbkit's own connect
    def make_room(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        ticket: _Ticket | None = getattr(_checkout, "ticket", None)
        if ticket is not None:
            ticket.gate.opening(ticket)

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        ticket: _Ticket | None = getattr(_checkout, "ticket", None)
        info = _record_info(record)
        if ticket is not None:
            ticket.gate.taken(record, ticket)  # first: from now on the gate never closes it
            info["dbkit_gate"] = ticket.gate
        _checked_out(record, hooks)
        info["dbkit_out"] = ticket if ticket is not None else True

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        out = _record_info(record).pop("dbkit_out", None)
        if out is None:  # a checkout that failed before it was counted
            return
        try:
            hooks.returned(record)
            if isinstance(out, _Ticket) and record.dbapi_connection is not None:
                out.gate.keep(record, hooks)
        finally:
            if isinstance(out, _Ticket):
                out.release()


def _install_checkout_events(engine: Engine, hooks: PolicyHooks) -> None:
    """``PolicyHooks`` as event listeners, for pools other than dbkit's two."""
    idle = _idle_by_engine[engine] = _IdleRecords()

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        with idle.lock:
            idle.records.discard(record)
        _checked_out(record, hooks)
        _record_info(record)["dbkit_out"] = True

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        if _record_info(record).pop("dbkit_out", None) is None:
            return  # a checkout that failed before it was counted
        hooks.returned(record)
        if record.dbapi_connection is None:
            return
        pool = engine.pool
        if isinstance(pool, QueuePool) and pool.checkedin() >= pool.size() > 0:
            # The idle queue is full: QueuePool closes this one (Go's MaxIdleClosed).
            hooks.idle_full()
            return
        with idle.lock:
            idle.records.add(record)


def evict_expired(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> int:
    """Close idle connections past their idle time or lifetime, as Go's connectionCleaner
    does, so that a quiet pool shrinks without waiting for the next checkout.  Returns how
    many were closed.  The limits are the engine's own as the setters left them; ``policy``
    only serves an engine dbkit did not set up.

    No checkout can take a record while it is looked at: ``FastQueuePool``'s queue is
    locked meanwhile (a closed record is then taken out of the queue), and so is a
    ``CountingQueuePool``'s ``CheckoutQueue``; with other pools see ``_IdleRecords``.
    """
    state = _states.get(engine)
    if state is not None:
        policy = state.policy
    if policy.max_idle_time <= 0 and policy.max_lifetime <= 0:
        return 0
    pool = engine.pool
    with idle_entries(pool) as entries:
        if entries is not None:
            return _close_expired(entries, counters, policy)
    if isinstance(pool, CountingQueuePool):
        with pool.gate.cond:  # the close events take them out of the gate's record
            return _close_expired(pool.gate.idle_records(), counters, policy)
    idle = _idle_by_engine.get(engine)
    if idle is None:
        return 0
    with idle.lock:
        records = list(idle.records)
        closed = _close_expired(records, counters, policy)
        for record in records:
            if record.dbapi_connection is None:
                idle.records.discard(record)
    return closed


def _close_expired(
    records: list[ConnectionPoolEntry], counters: PoolCounters, policy: PoolPolicy
) -> int:
    closed = 0
    now = time.monotonic()
    for record in records:
        if record.dbapi_connection is None:
            continue
        info = record.info
        returned = info.get("dbkit_returned")
        if policy.max_lifetime > 0 and _expired(info, policy, now):
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


# -- Go's setters ------------------------------------------------------------------------------


def _connections(value: object, name: str) -> int:
    """A number of connections: an int (not a bool); <= 0 is Go's "no limit" / "none"."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a number of connections (int), got {value!r}")
    try:
        count = operator.index(value)  # type: ignore[arg-type]  # checked right here
    except TypeError:
        kind = type(value).__name__
        raise TypeError(
            f"{name}: expected a number of connections (int), got {kind} {value!r}"
        ) from None
    return max(count, 0)


def _seconds(value: object, name: str) -> float:
    """A duration in seconds: a finite number >= 0 (not a bool); 0 = never."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}: expected a number of seconds (int or float; 0 = never), got "
            f"{type(value).__name__} {value!r}"
        )
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name}: {value!r} is not a finite number of seconds (0 = never)")
    if seconds < 0:
        raise ValueError(f"{name}: {value!r} is negative; give seconds >= 0 (0 = never)")
    return seconds


def _state(engine: Engine) -> _PoolState:
    state = _states.get(engine)
    if state is None:
        raise TypeError(f"{engine!r} was not made by dbkit: its pool has no run-time limits")
    return state


def _sized_pool(engine: Engine, setter: str) -> FastQueuePool | CountingQueuePool:
    pool = engine.pool
    if not isinstance(pool, FastQueuePool | CountingQueuePool):
        raise TypeError(
            f"{setter}() needs dbkit's own pool; this engine's is a {type(pool).__name__} "
            "(a poolclass= engine option)"
        )
    return pool


def set_max_open_conns(engine: Engine, n: int) -> None:
    """Go's ``SetMaxOpenConns``: at most ``n`` connections open (in use + idle); ``n <= 0``
    = unlimited.  Lowering it interrupts no connection in use: beyond the cap they are
    closed as they come back, and checkouts wait while the cap is reached with none idle;
    raising it lets waiting checkouts go ahead at once.  Lowering it below max_idle_conns
    lowers that too (closing idle ones beyond it now, counted in ``max_idle_closed``)."""
    n = _connections(n, "max_open_conns")
    state = _state(engine)
    with state.lock:
        pool = _sized_pool(engine, "set_max_open_conns")
        max_idle = _limits(pool)[1]
        if n > 0 and max_idle > n:
            max_idle = n
        state.remember(max_open=n, max_idle=max_idle)
        state.counters.max_open_connections = n
        state.policy.keep_idle = max_idle > 0
        _resize(pool, state.counters, n, max_idle)


def set_max_idle_conns(engine: Engine, n: int) -> None:
    """Go's ``SetMaxIdleConns``: keep at most ``n`` connections idle, never more than
    max_open_conns; ``n <= 0`` = none.  Idle connections beyond it are closed now, the
    longest idle first (counted in ``max_idle_closed``)."""
    n = _connections(n, "max_idle_conns")
    state = _state(engine)
    with state.lock:
        pool = _sized_pool(engine, "set_max_idle_conns")
        max_open = _limits(pool)[0]
        if max_open > 0:
            n = min(n, max_open)
        state.remember(max_idle=n)
        state.policy.keep_idle = n > 0
        _resize(pool, state.counters, max_open, n)


def set_conn_max_lifetime(engine: Engine, seconds: float) -> None:
    """Go's ``SetConnMaxLifetime``: close connections ``seconds`` after they were made
    (less a jitter of up to 5% each); 0 = never.  Applies to the connections already open:
    checked when one is taken or returned and by a background cleaner; expired idle ones
    are closed now (counted in ``max_lifetime_closed``)."""
    _set_duration(engine, "max_lifetime", _seconds(seconds, "conn_max_lifetime"))


def set_conn_max_idle_time(engine: Engine, seconds: float) -> None:
    """Go's ``SetConnMaxIdleTime``: close connections idle for longer than ``seconds``;
    0 = never.  Applies to the connections already idle: checked when one is taken and by
    a background cleaner; those idle too long are closed now (counted in
    ``max_idle_time_closed``)."""
    _set_duration(engine, "max_idle_time", _seconds(seconds, "conn_max_idle_time"))


def _set_duration(engine: Engine, name: str, seconds: float) -> None:
    """``PoolPolicy.<name> = seconds``, then Go's cleaner: started (or woken to read its
    period again), and one pass now."""
    state = _state(engine)
    with state.lock:
        setattr(state.policy, name, seconds)
        state.remember(**{name: seconds})
        state.start_cleaner()
    evict_expired(engine, state.counters, state.policy)


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
