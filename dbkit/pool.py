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

The policy lives in ``PolicyHooks``.  With fast paths on, ``dbkit.fastpath.pool``'s
``FastQueuePool`` calls it from its own checkout and return paths; otherwise a
``CountingQueuePool`` runs it from pool event listeners (SQLAlchemy's public API), and
dbkit keeps its own record of idle connections for the sweeper.  Same checks, same
counters either way.
"""

from __future__ import annotations

import random
import select
import threading
import time
import traceback
import weakref
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
    forget_prepared_statements,
    idle_entries,
    in_transaction_mode,
    timed_wait,
)
from dbkit.settings import RESETS
from dbkit.stats import PoolCounters

__all__ = [
    "CountingQueuePool",
    "DiscardPolicyHooks",
    "LeakDetector",
    "PolicyHooks",
    "PoolPolicy",
    "discard_all",
    "evict_expired",
    "install_pool_events",
    "policy_hooks",
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
    ``"discard"`` (that, then ``DISCARD ALL``)."""

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
        self.counters.checked_in()
        dbapi_conn: Any = record.dbapi_connection
        if dbapi_conn is None or self._closing(record):  # invalidated, or shut down
            return
        try:
            self.reset(dbapi_conn)
        except BaseException as error:
            _reset_failed(record, error, self.reset_failed)
            return
        self._mark_idle(record)

    def reset(self, dbapi_conn: Any) -> None:
        """Replaces QueuePool's unconditional rollback-on-return: libpq already knows
        whether a transaction is open, so an idle connection skips the driver call."""
        if dbapi_conn.pgconn.transaction_status != _IDLE:
            dbapi_conn.rollback()

    def _mark_idle(self, record: ConnectionPoolEntry) -> None:
        if not self.policy.keep_idle:
            # max_idle_conns = 0: Go keeps no idle connection at all.
            self.counters.add("max_idle_closed")
            record.invalidate()
            return
        record.info["dbkit_returned"] = time.monotonic()

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
    ``"rollback"`` pays nothing for the other.  With ``max_idle_conns = 0`` every returned
    connection is closed anyway: nothing to discard."""
    if discards(policy):
        return DiscardPolicyHooks(counters, policy, forget_prepared_statements if fast else None)
    return PolicyHooks(counters, policy)


def discards(policy: PoolPolicy) -> bool:
    """Whether a pool under ``policy`` sends ``DISCARD ALL`` when a connection comes back."""
    return policy.reset_on_return == "discard" and policy.keep_idle


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


class CountingQueuePool(QueuePool):
    """``QueuePool`` through its public API only: times the checkouts that must wait for a
    connection (every slot taken) for Go's ``WaitCount`` / ``WaitDuration``, and hands
    connections out in transaction mode (``FastQueuePool.connect``'s twin)."""

    hooks: PolicyHooks | None = None
    max_open = 0  # pool_size + max_overflow; 0 = unlimited

    def connect(self) -> PoolProxiedConnection:
        hooks = self.hooks
        if hooks is None or not self.max_open or self.checkedout() < self.max_open:
            fairy = super().connect()
        else:  # every slot taken: this checkout waits for a connection to come back
            fairy = timed_wait(hooks, super().connect)
        # Left in autocommit by Database.autocommit().
        return in_transaction_mode(fairy)

    def recreate(self) -> QueuePool:
        pool = super().recreate()
        if isinstance(pool, CountingQueuePool):
            pool.hooks, pool.max_open = self.hooks, self.max_open
        return pool


class _IdleRecords:
    """The idle connections of a pool seen through events (the public API has no view of
    the pool's queue), for the sweeper.  A record the sweeper closed may already have been
    taken from the queue by a checkout: that checkout finds its connection closed and
    raises ``DisconnectionError``, on which SQLAlchemy connects afresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()


_idle_by_engine: weakref.WeakKeyDictionary[Engine, _IdleRecords] = weakref.WeakKeyDictionary()


def shut(engine: Engine) -> None:
    """``engine``'s Database is closing: connections still checked out are closed when they
    come back, and no thread is handed one any more (with fast paths, threads already
    waiting are told at once; otherwise when a connection comes back or their timeout
    ends).  Call before ``engine.dispose()``."""
    pool = engine.pool
    hooks = getattr(pool, "hooks", None)
    if isinstance(hooks, PolicyHooks):
        hooks.closed = True
    if isinstance(pool, FastQueuePool):
        pool.shut()


def install_pool_events(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> None:
    """Attach dbkit's pool behaviour to ``engine``; it survives ``engine.dispose()``.

    A ``FastQueuePool`` runs the policy itself; any other pool (dbkit's
    ``CountingQueuePool`` with fast paths off, or a ``poolclass=`` given as an engine
    option) gets the same behaviour from event listeners.
    """
    pool = engine.pool
    fast = isinstance(pool, FastQueuePool)
    hooks = policy_hooks(counters, policy, fast=fast)
    no_prepare = discards(policy) and not fast
    if isinstance(pool, FastQueuePool):
        pool.hooks = hooks
    else:
        if isinstance(pool, CountingQueuePool):
            pool.hooks = hooks
        _install_checkout_events(engine, hooks)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        now = time.monotonic()
        info = record.info
        info["dbkit_created"] = now
        if policy.max_lifetime > 0:
            jitter = random.uniform(0, _LIFETIME_JITTER * policy.max_lifetime)
            info["dbkit_expires"] = now + policy.max_lifetime - jitter
        counters.connected()
        if no_prepare and isinstance(dbapi_conn, psycopg.Connection):
            # Public twin of forget_prepared_statements: psycopg would not always notice
            # that DISCARD ALL dropped the statements it prepared (see discard_all).
            dbapi_conn.prepare_threshold = None

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


def _install_checkout_events(engine: Engine, hooks: PolicyHooks) -> None:
    """``PolicyHooks`` as event listeners, for pools other than ``FastQueuePool``."""
    idle = _idle_by_engine[engine] = _IdleRecords()

    @event.listens_for(engine, "checkout")
    def on_checkout(
        dbapi_conn: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        with idle.lock:
            idle.records.discard(record)
        if dbapi_conn.closed:
            # Closed by the sweeper after the pool handed it out: connect afresh.
            raise sa_exc.DisconnectionError("pooled connection was closed by the sweeper")
        before = record.dbapi_connection
        hooks.check(record)
        if record.dbapi_connection is not before:
            # Closed by the checks: SQLAlchemy opens a new connection on this error and
            # checks out again, so this attempt is not counted.
            raise sa_exc.DisconnectionError("pooled connection was closed at checkout")
        hooks.counters.checked_out()

    @event.listens_for(engine, "checkin")
    def on_checkin(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        hooks.returned(record)
        if record.dbapi_connection is None:
            return
        pool = engine.pool
        if isinstance(pool, QueuePool) and pool.checkedin() >= pool.size():
            # The idle queue is full: QueuePool closes this one (Go's MaxIdleClosed).
            hooks.idle_full()
            return
        with idle.lock:
            idle.records.add(record)


def evict_expired(engine: Engine, counters: PoolCounters, policy: PoolPolicy) -> int:
    """Close idle connections past their idle time or lifetime, as Go's connectionCleaner
    does, so that a quiet pool shrinks without waiting for the next checkout.  Returns how
    many were closed.

    No checkout can take a record while it is looked at: ``FastQueuePool``'s queue is
    locked meanwhile (a closed record stays in the queue as an empty slot that reconnects
    on its next checkout, QueuePool's own behaviour for invalidated records); with other
    pools see ``_IdleRecords``.
    """
    if policy.max_idle_time <= 0 and policy.max_lifetime <= 0:
        return 0
    with idle_entries(engine.pool) as entries:
        if entries is not None:
            return _close_expired(entries, counters, policy)
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
