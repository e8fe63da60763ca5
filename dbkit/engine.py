"""Engine factory: a ``PostgresConfig`` (Go's field names) → a tuned SQLAlchemy ``Engine``.

The mapping, after Go's ``database/sql``:

=====================  =================================================================
max_open_conns         pool_size + max_overflow (0 → unlimited overflow)
max_idle_conns         pool_size; 0 → every returned connection is closed (Go: no idle)
timeout                pool_timeout, and libpq connect_timeout (which has a 2 s floor)
conn_max_lifetime      checked at checkout and by the sweeper, counted (see dbkit.pool)
conn_max_idle_time     likewise
statement_timeout,     server settings sent in the startup packet (``options``), so they
idle_in_transaction_…  cost no extra round trip
=====================  =================================================================

LIFO reuse keeps the hot connections hot and lets the cold ones age out; ``hide_parameters``
keeps bound values (which may be personal data or secrets) out of logs and error text.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import generators
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dbkit.pool import DbkitQueuePool, PoolPolicy, install_pool_events
from dbkit.resilience import CircuitBreaker
from dbkit.settings import PostgresConfig
from dbkit.stats import PoolCounters

__all__ = ["DbkitPgConnection", "connect_args", "create_engine", "pool_policy"]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def connect_args(config: PostgresConfig) -> dict[str, Any]:
    """libpq/psycopg keyword arguments for one connection attempt."""
    args: dict[str, Any] = {
        # libpq waits at least 2 s whatever is asked, and takes whole seconds.
        "connect_timeout": max(2, math.ceil(config.timeout)),
        "sslmode": config.sslmode,
        "application_name": config.application_name,
    }
    for key in ("sslrootcert", "sslcert", "sslkey"):
        value = getattr(config, key)
        if value:
            args[key] = value
    options = []
    if config.statement_timeout > 0:
        options.append(f"-c statement_timeout={_ms(config.statement_timeout)}")
    if config.idle_in_transaction_session_timeout > 0:
        ms = _ms(config.idle_in_transaction_session_timeout)
        options.append(f"-c idle_in_transaction_session_timeout={ms}")
    if options:
        args["options"] = " ".join(options)
    return args


def pool_policy(config: PostgresConfig) -> PoolPolicy:
    return PoolPolicy(
        max_lifetime=config.conn_max_lifetime,
        max_idle_time=config.conn_max_idle_time,
        ping_after_idle=config.ping_after_idle,
        keep_idle=config.max_idle_conns > 0,
    )


def _pool_sizes(config: PostgresConfig) -> tuple[int, int]:
    """(pool_size, max_overflow) for QueuePool; its pool_size=0 means "unbounded"."""
    max_open, max_idle = config.max_open_conns, config.max_idle_conns
    if max_open <= 0:
        # Unlimited open connections: overflow -1; the idle queue holds max_idle (or,
        # when 0, is unbounded but emptied on every return by the checkin listener).
        return max_idle, -1
    if max_idle <= 0:
        return max_open, 0
    idle = min(max_idle, max_open)
    return idle, max_open - idle


def create_engine(
    config: PostgresConfig,
    counters: PoolCounters | None = None,
    breaker: CircuitBreaker | None = None,
    **engine_options: Any,
) -> Engine:
    """Build the engine for ``config``; ``counters`` receive the pool statistics.

    ``engine_options`` go straight to ``sqlalchemy.create_engine`` and win over dbkit's
    choices (an escape hatch, e.g. ``echo=True`` while debugging).
    """
    if counters is None:
        counters = PoolCounters(config.max_open_conns)
    pool_size, max_overflow = _pool_sizes(config)
    options: dict[str, Any] = {
        "poolclass": DbkitQueuePool,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": config.timeout,
        "pool_use_lifo": True,
        "pool_reset_on_return": None,  # dbkit.pool's reset listener rolls back when needed
        "pool_pre_ping": False,  # replaced by the idle-aware check in dbkit.pool
        "hide_parameters": True,
        "connect_args": connect_args(config),
    }
    options.update(engine_options)
    engine = sa.create_engine(config.url(), **options)
    if isinstance(engine.pool, DbkitQueuePool):
        engine.pool.counters = counters
    install_pool_events(engine, counters, pool_policy(config))
    _install_connect(engine, breaker if breaker is not None and breaker.enabled else None)
    _forget_connections_after_fork(engine, counters)
    return engine


class DbkitPgConnection(psycopg.Connection[Any]):
    """psycopg's connection, able to have a transaction's ``BEGIN`` in flight.

    ``send_begin()`` sends the BEGIN without waiting for its answer; the next operation on
    the connection -- normally the transaction's first statement, once SQLAlchemy has done
    its Python work for it -- collects that answer first (every psycopg operation goes
    through ``wait()``).  The BEGIN's round trip then overlaps with that work instead of
    being waited for, as psycopg's implicit BEGIN is, right before the statement.  The
    server sees exactly what it saw before: BEGIN, then the statements; an error of the
    BEGIN (or a connection lost meanwhile) is raised by that next operation, where the
    implicit BEGIN would have raised it.
    """

    _dbkit_begin_sent = False

    def send_begin(self, isolation: str | None = None, readonly: bool | None = None) -> bool:
        """Send ``BEGIN [ISOLATION LEVEL …] [READ ONLY]``; False when it cannot be sent
        (not idle, pipeline mode, a broken connection): psycopg then begins the usual way.
        Options not given are psycopg's own (``isolation_level``, ``read_only``,
        ``deferrable``), as in its implicit BEGIN."""
        pgconn = self.pgconn
        if (
            self._dbkit_begin_sent
            or self._pipeline is not None
            or pgconn.transaction_status != _IDLE
        ):
            return False
        command = _begin_command(self, isolation, readonly)
        with self.lock:
            try:
                pgconn.send_query(command)
                pgconn.flush()  # what is not flushed now is by the collecting wait()
            except psycopg.Error:
                return False
            self._dbkit_begin_sent = True
        return True

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._dbkit_begin_sent:
            self._dbkit_begin_sent = False
            self._collect_begin()
        return super().wait(gen, *args, **kwargs)

    def _collect_begin(self) -> None:
        pgconn = self.pgconn
        # Read what has arrived without waiting: the answer normally has, and then no
        # poll() (nor a release of the GIL) is needed.
        pgconn.consume_input()
        results = super().wait(generators.execute(pgconn))
        if len(results) == 1 and results[0].status == _COMMAND_OK:
            return
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self.info.encoding)
        raise psycopg.InterfaceError(f"unexpected answer to BEGIN: {results!r}")


_IDLE = psycopg.pq.TransactionStatus.IDLE
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR


def _begin_command(
    conn: psycopg.Connection[Any], isolation: str | None, readonly: bool | None
) -> bytes:
    """The BEGIN psycopg would send, with a block's own isolation level and access mode."""
    if isolation is None and conn.isolation_level is not None:
        isolation = conn.isolation_level.name.replace("_", " ")
    if readonly is None:
        # Not asked either way: psycopg's own setting, and when that is unset neither mode,
        # so the server's default (default_transaction_read_only, a standby) holds.
        readonly = conn.read_only
    deferrable = conn.deferrable
    if isolation is None and readonly is None and deferrable is None:
        return b"BEGIN"
    parts = ["BEGIN"]
    if isolation is not None:
        parts.append(f"ISOLATION LEVEL {isolation}")
    if readonly is not None:
        parts.append("READ ONLY" if readonly else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()


def _install_connect(engine: Engine, breaker: CircuitBreaker | None) -> None:
    """New physical connections are ``DbkitPgConnection``s, made through the breaker when it
    is on (reused pooled connections are not: they need no server handshake)."""

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        dbapi = dialect.loaded_dbapi
        make = DbkitPgConnection.connect if dbapi is psycopg else dbapi.connect
        if breaker is None:
            return make(*cargs, **cparams)
        with breaker.guard():
            return make(*cargs, **cparams)


# Engines made here, with their counters, so a forked child can forget their connections.
# Weak keys: registering at-fork hooks per engine would keep every engine alive forever.
_engines: weakref.WeakKeyDictionary[Engine, PoolCounters] = weakref.WeakKeyDictionary()


def _forget_connections_after_fork(engine: Engine, counters: PoolCounters) -> None:
    _engines[engine] = counters


def _after_fork_in_child() -> None:
    """A forked child must never talk on its parent's sockets (protocol messages would
    interleave, or the child would close the parent's sessions).  ``dispose(close=False)``
    drops the inherited pool without touching the sockets, as SQLAlchemy's docs advise."""
    for engine, counters in list(_engines.items()):
        engine.dispose(close=False)
        counters.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
