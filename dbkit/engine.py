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
pgbouncer              no server-side prepared statements (``prepare_threshold=None``)
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
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dbkit import fastpath
from dbkit.fastpath.pool import FastQueuePool
from dbkit.fastpath.psycopg import PgConnection
from dbkit.pool import CountingQueuePool, PoolPolicy, install_pool_events
from dbkit.resilience import CircuitBreaker
from dbkit.settings import PostgresConfig
from dbkit.stats import PoolCounters
from dbkit.xact import XactConnection

__all__ = ["connect_args", "create_engine", "fast_paths", "pool_policy"]


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
    if config.pgbouncer:
        # PgBouncer in transaction mode hands each transaction to any server connection:
        # a statement prepared on one is unknown to the next (and the startup packet's
        # options never reach the server, which settings refuse: see PostgresConfig).
        args["prepare_threshold"] = None
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
        reset_on_return=config.reset_on_return,
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
    fast = fastpath.enabled(config.fast_paths)
    pool_size, max_overflow = _pool_sizes(config)
    options: dict[str, Any] = {
        "poolclass": FastQueuePool if fast else CountingQueuePool,
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
    if isinstance(engine.pool, CountingQueuePool):
        engine.pool.max_open = config.max_open_conns
    install_pool_events(engine, counters, pool_policy(config))
    _install_connect(engine, breaker if breaker is not None and breaker.enabled else None, fast)
    _fast_engines[engine] = fast
    _forget_connections_after_fork(engine, counters)
    return engine


def fast_paths(engine: Engine) -> bool:
    """Whether ``engine`` was built with dbkit's fast paths (``dbkit.fastpath``) on."""
    return _fast_engines.get(engine, False)


_fast_engines: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def _install_connect(engine: Engine, breaker: CircuitBreaker | None, fast: bool) -> None:
    """New physical connections are made through the breaker when it is on (reused pooled
    connections are not: they need no server handshake).  They are ``XactConnection``s,
    which know whether their transaction wrote; with fast paths on, ``PgConnection``s,
    which can also have a BEGIN in flight."""

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        dbapi = dialect.loaded_dbapi
        if dbapi is psycopg:
            make = (PgConnection if fast else XactConnection).connect
        else:
            make = dbapi.connect
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
