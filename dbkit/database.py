"""``Database``: one PostgreSQL database, its pool, and the transactions run on it.

The Go design's ``PostgresDB``: ``connect()`` (with retries), ``health()``, ``stats()``,
``close()``; plus the ambient-transaction API (``transaction()``, ``on_commit()`` …) whose
machinery lives in ``dbkit.transaction``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, overload

import backoff
import psycopg
import sqlalchemy as sa
from loguru import logger
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, Result

from dbkit.connection import DbkitConnection, connection_class
from dbkit.engine import create_engine, fast_paths, pool_policy
from dbkit.errors import (
    CircuitOpenError,
    ConnectError,
    DbkitError,
    PoolTimeoutError,
    is_transient,
)
from dbkit.fastpath.driver import DriverPath
from dbkit.fastpath.pool import PoolClosed
from dbkit.fastpath.sqlalchemy import Declined
from dbkit.health import Health, HealthMonitor, ReplicaHealth
from dbkit.locks import AdvisoryLocks, HeldLock
from dbkit.metrics import StatementListener, StatementObserver
from dbkit.pool import LeakDetector, evict_expired, shut
from dbkit.replicas import PRIMARY_POSITION, ReplicaSet, parse_lsn
from dbkit.resilience import CircuitBreaker
from dbkit.retrying import Attempts, Failure, RetryPolicy, is_read, run_retrying
from dbkit.stats import PoolCounters, PoolStats, QueryCounters, QueryStats
from dbkit.transaction import Transaction, TransactionManager, TransactionOptions
from dbkit.transaction.outcome import Outcome, resolve_commit
from dbkit.transaction.server_settings import KnownSettings, SettingValue

if TYPE_CHECKING:
    from typing import Self

    from sqlalchemy.sql.selectable import TypedReturnsRows

    from dbkit.settings import PostgresConfig, Settings

__all__ = ["Database"]

R = TypeVar("R")
T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")
Statement = str | sa.Executable
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]

# Cap on one backoff sleep between connect attempts.
_MAX_CONNECT_DELAY = 10.0


def _coerce(statement: Statement) -> sa.Executable:
    return sa.text(statement) if isinstance(statement, str) else statement


def _min_delay_jitter(value: float) -> float:
    """Between half and all of the backoff step: spreads reconnect storms without the
    near-zero first waits of full jitter (litl/backoff#113)."""
    return value / 2 + random.uniform(0, value / 2)


def _replica_config(primary: PostgresConfig, url: str | sa.URL) -> PostgresConfig:
    """A replica's config: the connection fields its URL gives, the rest the primary's
    (its password too when the URL has none)."""
    from dbkit.settings import PostgresConfig

    given = PostgresConfig.from_url(url)
    changes = {
        name: getattr(given, name)
        for name in ("host", "port", "name", "username", "password", "sslmode")
        if name != "password" or given.password
    }
    return primary.replace(**changes)


def _reason(error: BaseException) -> str:
    """The driver's message on one line, for error text a person reads."""
    orig = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(orig).__name__


class Database:
    """A PostgreSQL database reached through a tuned, instrumented SQLAlchemy pool."""

    def __init__(
        self,
        config: PostgresConfig,
        *,
        replicas: Sequence[PostgresConfig] = (),
        read_from: str | None = None,
        max_replica_lag: float | str = 10.0,
        slow_query_threshold: float = 0.0,
        log_slow_query_parameters: bool = False,
        **engine_options: Any,
    ) -> None:
        """``replicas``: read replicas of this primary, each with a pool of its own; reads
        go to them per ``read_from`` ("primary", "replica", "prefer-replica"; default
        "prefer-replica" when there are replicas) and ``max_replica_lag`` (seconds), never
        before they have replayed this Database's latest commit (``dbkit.replicas``).
        ``slow_query_threshold`` (seconds, 0 = off) logs slower statements, without their
        parameter values unless ``log_slow_query_parameters``; ``engine_options`` go to
        ``sqlalchemy.create_engine`` (an escape hatch)."""
        from dbkit.settings import DatabaseConfig

        setup = DatabaseConfig(config, tuple(replicas), read_from, max_replica_lag)  # type: ignore[arg-type]  # parsed there
        self._config = config
        self._queries = QueryCounters()
        self._observer = StatementObserver(
            self._queries, slow_query_threshold, log_slow_query_parameters
        )
        self._engine_options = engine_options
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._driver: DriverPath | None = None
        self._connection_cls: type[DbkitConnection] = DbkitConnection
        self._counters = PoolCounters(config.max_open_conns)
        self._known_settings = KnownSettings(self._server_settings)
        self._locks = AdvisoryLocks(self)
        self.breaker = CircuitBreaker(
            config.breaker_failure_threshold,
            config.breaker_recovery_timeout,
            name=config.safe_dsn(),
        )
        self._replicas = (
            ReplicaSet(
                [
                    type(self)(
                        replica,
                        slow_query_threshold=slow_query_threshold,
                        log_slow_query_parameters=log_slow_query_parameters,
                        **engine_options,
                    )
                    for replica in setup.replicas
                ],
                read_from=setup.routing,
                max_lag=setup.max_replica_lag,
                primary_position=self._primary_position,
            )
            if setup.replicas
            else None
        )
        self._transactions = TransactionManager(
            self._checkout_for,
            self._queries,
            policy=self._retry_policy(),
            resolve=self._resolve_commit if config.resolve_commit_outcome else None,
            check_settings=self._known_settings.check,
            committed=self._committed if self._replicas is not None else None,
        )
        self._leaks = (
            LeakDetector(config.leak_detection_threshold)
            if config.leak_detection_threshold > 0
            else None
        )
        self._sweeper: _Sweeper | None = None
        self._monitor: HealthMonitor | None = None
        self._closed = False
        self._connected = False  # connect() succeeded since the last close()
        self._connect_hooks: list[Callable[[], Any]] = []
        self.connect_attempts = 0  # attempts made by the last connect(), for operators/tests

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings, **engine_options: Any) -> Self:
        database = settings.database
        return cls(
            database.postgres,
            replicas=database.replicas,
            read_from=database.read_from,
            max_replica_lag=database.max_replica_lag,
            slow_query_threshold=settings.log.slow_query_threshold,
            **engine_options,
        )

    @classmethod
    def from_url(
        cls,
        url: str | sa.URL,
        *,
        replicas: Sequence[str | sa.URL] = (),
        read_from: str | None = None,
        max_replica_lag: float | str = 10.0,
        **overrides: Any,
    ) -> Self:
        """``overrides`` are PostgresConfig fields (``max_open_conns=5``); the rest are the
        production defaults.  ``replicas``: their URLs, every other field the primary's."""
        from dbkit.settings import PostgresConfig

        config = PostgresConfig.from_url(url, **overrides)
        return cls(
            config,
            replicas=[_replica_config(config, replica) for replica in replicas],
            read_from=read_from,
            max_replica_lag=max_replica_lag,
        )

    @property
    def config(self) -> PostgresConfig:
        return self._config

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._engine else "not connected"
        return f"<Database {self._config.safe_dsn()} ({state})>"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (Go's ``Driver()``), created on first use."""
        engine = self._engine
        if engine is None:
            with self._engine_lock:
                if self._closed:
                    raise ConnectError(f"{self!r} is closed")
                if self._engine is None:
                    engine = create_engine(
                        self._config, self._counters, self.breaker, **self._engine_options
                    )
                    fast = fast_paths(engine)
                    self._connection_cls = connection_class(self._observer, fast)
                    self._driver = (
                        DriverPath(engine, self._observer, self._checkout_error) if fast else None
                    )
                    if self._leaks is not None:
                        self._leaks.install(engine)
                    self._engine = engine
                engine = self._engine
        return engine

    def connect(self) -> Self:
        """Make sure the database answers, retrying transient failures with exponential
        backoff and jitter; fail at once on permanent ones (bad password, no database).
        Idempotent: once connected, it returns at once (``close()`` then ``connect()``
        connects again).  Its retries are the waiting, so they neither open the circuit
        breaker nor are refused by it."""
        if self._connected and not self._closed:
            return self
        config = self._config
        self.connect_attempts = 0
        if self._closed:
            self._closed = False

        def attempt() -> None:
            self.connect_attempts += 1
            engine = self.engine
            with self._connection_cls(engine) as conn:  # observed, as every statement
                conn.exec_driver_sql("SELECT 1")

        def log_retry(details: Any) -> None:
            logger.warning(
                "connect to {} failed (attempt {}): {}; retrying in {:.2f}s",
                config.safe_dsn(),
                details["tries"],
                _reason(details["exception"]),
                details["wait"],
            )

        retrying = backoff.on_exception(
            backoff.expo,
            Exception,
            max_tries=config.max_retries + 1,
            # An open breaker is worth waiting out: its probe may find the server back.
            giveup=lambda error: not (is_transient(error) or isinstance(error, CircuitOpenError)),
            factor=config.retry_delay,
            max_value=max(_MAX_CONNECT_DELAY, config.retry_delay),
            jitter=_min_delay_jitter,
            on_backoff=log_retry,
            logger=None,
        )(attempt)
        started = time.monotonic()
        try:
            with self.breaker.bypassed():
                retrying()
        except Exception as error:
            transient = is_transient(error) or isinstance(error, CircuitOpenError)
            kind = "transient, retries exhausted" if transient else "permanent"
            reason = _reason(error)
            logger.bind(audit="connect_failed", permanent=not transient).error(
                "cannot connect to {} as {}: {}", config.safe_dsn(), config.username, reason
            )
            # The cause first: it is what the operator has to fix.
            raise ConnectError(
                f"cannot connect to {config.safe_dsn()}: {reason} (after "
                f"{self.connect_attempts} attempt(s) in {time.monotonic() - started:.1f}s; "
                f"{kind})"
            ) from error
        self._connected = True
        logger.bind(audit="connected").info("connected to {}", config.safe_dsn())
        self._start_sweeper()
        self._start_monitor()
        if self._replicas is not None:
            self._replicas.start()  # a replica that is down is skipped, not an error
        for callback in list(self._connect_hooks):
            callback()
        return self

    def on_connect(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after every successful ``connect()`` (e.g. two-phase
        recovery: ``dbkit.twophase.recover_at_connect``)."""
        if not callable(callback):
            raise TypeError(f"on_connect() needs a callable, got {callback!r}")
        self._connect_hooks.append(callback)

    @property
    def is_connected(self) -> bool:
        """Whether ``connect()`` succeeded and ``close()`` has not been called since."""
        return self._connected and not self._closed

    def _start_monitor(self) -> None:
        interval = self._config.health_check_interval
        if self._monitor is None and interval > 0:
            self._monitor = HealthMonitor(self.health, interval, self._config.safe_dsn())
            self._monitor.start()

    @property
    def last_health(self) -> Health | None:
        """The background monitor's latest probe (None when it is off or has not run)."""
        return None if self._monitor is None else self._monitor.last

    def _start_sweeper(self) -> None:
        config = self._config
        periods = [p for p in (config.conn_max_idle_time, config.conn_max_lifetime) if p > 0]
        if self._leaks is not None:
            periods.append(self._leaks.threshold / 2)
        if self._sweeper is None and periods:
            # Go's connectionCleaner runs every min(idle time, lifetime), at least 1 s apart;
            # leak checks run twice per threshold.
            floor = 0.05 if self._leaks is not None else 1.0
            self._sweeper = _Sweeper(self, self._leaks, max(floor, min(periods)))
            self._sweeper.start()

    def close(self) -> None:
        """Close every pooled connection; idempotent; returns at once.  Connections still
        checked out are closed when they come back (a transaction under way may still
        commit); a thread waiting for a connection, and any later call, gets
        ``ConnectError`` (with fast paths off, a waiting thread learns it when a connection
        comes back or its timeout ends)."""
        self._closed = True
        self._connected = False
        for worker in (self._sweeper, self._monitor):
            if worker is not None:
                worker.stop()
        self._sweeper = self._monitor = None
        if self._replicas is not None:
            self._replicas.close()
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            shut(engine)
            engine.dispose()
            logger.info("closed pool for {}", self._config.safe_dsn())

    disconnect = close

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------------

    def _checkout_error(self, error: sa_exc.TimeoutError | sa_exc.DBAPIError) -> DbkitError:
        """A checkout's failure in dbkit's terms: the pool exhausted, or no connection."""
        if isinstance(error, PoolClosed) or (
            self._closed and isinstance(error, sa_exc.TimeoutError)
        ):
            return ConnectError(f"{self!r} is closed")
        if isinstance(error, sa_exc.TimeoutError):
            stats = self.stats()
            config = self._config
            limit = config.max_open_conns or "unlimited"
            return PoolTimeoutError(
                f"no connection became free within {config.timeout:g}s: {stats.in_use} in "
                f"use, max_open_conns={limit}, max_idle_conns={config.max_idle_conns}; "
                "raise max_open_conns or look for connections held too long"
            )
        return ConnectError(f"cannot connect to {self._config.safe_dsn()}: {_reason(error)}")

    def driver_path(self) -> DriverPath | None:
        """The fast runner of statements outside a transaction for the current engine
        (``dbkit.fastpath.sqlalchemy``), or None when fast paths are off."""
        engine = self.engine  # made on first use, together with its driver path
        path = self._driver
        return path if path is not None and path.engine is engine else None

    def _checkout_for(self, options: TransactionOptions) -> DbkitConnection:
        """The connection of an outermost block: a caught-up replica's for a read-only one
        when ``read_from`` allows (``dbkit.replicas``), else the primary's."""
        if self._replicas is None or not options.may_use_replica:
            return self.checkout()
        return self.run_read(lambda target: target.checkout())

    def run_read(self, read: Callable[[Database], R]) -> R:
        """``read(db)`` on the database a read outside any block goes to: a replica that
        has replayed this Database's latest commit, per ``read_from``, else this primary.
        A replica that cannot be reached is skipped until it answers a poll again, and the
        read goes to the primary (``ConnectError`` under ``read_from="replica"``)."""
        replicas = self._replicas
        if replicas is None or self._transactions.connection() is not None:
            return read(self)
        replica = replicas.choose()
        if replica is None:
            if replicas.read_from == "replica":
                raise ConnectError(self._no_replica())
            return read(self)
        try:
            return read(replica.db)
        except (ConnectError, CircuitOpenError, sa_exc.DBAPIError) as error:
            if isinstance(error, sa_exc.DBAPIError) and not is_transient(error):
                raise  # the read itself failed: the same on any server
            replica.mark_down(error)
            if replicas.read_from == "replica":
                raise ConnectError(self._no_replica()) from error
            return read(self)

    def _no_replica(self) -> str:
        assert self._replicas is not None
        states = "; ".join(
            f"{h.name}: {h.error or 'behind this process' + chr(39) + 's latest commit'}"
            for h in self._replicas.health()
        )
        return f"no replica of {self._config.safe_dsn()} can serve this read ({states})"

    def note_write(self) -> None:
        """A write may have committed outside a transaction block (``execute`` and the
        repositories call this): reads sent to replicas wait until it is replayed.
        Costs nothing; without replicas it does nothing."""
        if self._replicas is not None:
            self._replicas.wrote()

    def _committed(self, wrote: bool) -> None:
        """A read-write transaction committed (``wrote``: it may have written)."""
        if wrote:
            self.note_write()

    def _primary_position(self) -> int | None:
        """The primary's WAL position now (at or past every commit made so far)."""
        try:
            return parse_lsn(self.scalar(PRIMARY_POSITION))
        except Exception as error:
            logger.warning("cannot read the WAL position of {}: {}", self, _reason(error))
            return None

    def checkout(self) -> DbkitConnection:
        """A pooled SQLAlchemy ``Connection`` outside any block, checkout failures raised
        as dbkit's ``PoolTimeoutError`` / ``ConnectError``; ``close()`` returns it."""
        engine = self.engine
        try:
            conn = self._connection_cls(engine)  # what engine.connect() does
        except (sa_exc.TimeoutError, sa_exc.DBAPIError) as error:
            raise self._checkout_error(error) from error
        if self._closed:  # closed while this thread waited for the connection
            conn.invalidate()
            conn.close()
            raise ConnectError(f"{self!r} is closed")
        return conn

    def _retry_policy(self, reruns: int = 0) -> RetryPolicy:
        """The connect policy as a ``RetryPolicy``: how long to wait for the database."""
        config = self._config
        return RetryPolicy(
            reruns=reruns,
            outage_tries=config.max_retries,
            outage_delay=config.retry_delay,
            max_outage_delay=max(_MAX_CONNECT_DELAY, config.retry_delay),
        )

    def _resolve_commit(self, xid: int) -> Outcome | None:
        """What became of transaction ``xid`` whose COMMIT was lost (see
        ``dbkit.transaction.outcome``): asked on a fresh connection, the server waited
        for with the connect policy, "in progress" for up to ``timeout``."""
        return resolve_commit(
            xid, self._xact_status, patience=self._config.timeout, outage=self._retry_policy()
        )

    def _xact_status(self, xid: int) -> str | None:
        """``pg_xact_status(xid)`` on a fresh connection of its own: not a pooled one (they
        may all be dead after a restart) and not through the circuit breaker (a restart
        opens it, and this one question must not wait for it to close)."""
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        with psycopg.connect(*cargs, **{**cparams, "autocommit": True}) as conn:
            query = (
                "SELECT pg_xact_status(%s::text::xid8)"
                if conn.info.server_version >= 130000
                else "SELECT txid_status(%s::bigint)"
            )
            try:
                row = conn.execute(query, (str(xid),)).fetchone()
            except psycopg.errors.InvalidParameterValue as error:
                if "in the future" in str(error):
                    # The server never recorded that id (a crash before it reached the
                    # WAL): that transaction cannot have committed.
                    return "aborted"
                raise
        return None if row is None else row[0]

    def run_alone(self, operation: Callable[[], R], *, retry: bool) -> R:
        """Run ``operation`` (one statement outside any block, on a connection it checks
        out itself); with ``retry``, once more on a fresh connection when the pooled one
        turned out dead, then waiting (connect policy) while the database cannot be
        reached.  A first checkout that fails is raised at once."""
        if not retry:
            return operation()

        def classify(error: Exception, attempts: Attempts) -> Failure:
            if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
                return Failure.RERUN
            away = isinstance(error, CircuitOpenError) or (
                isinstance(error, (sa_exc.DBAPIError, ConnectError)) and is_transient(error)
            )
            # Waited for only once a dead connection was met: the server went away with it.
            return Failure.OUTAGE if away and attempts.reruns else Failure.FINAL

        return run_retrying(operation, self._retry_policy(reruns=1), classify, what="a statement")

    def run_autocommit(self, func: Callable[[DbkitConnection], R], *, retry: bool) -> R:
        """``func(conn)`` on a pooled connection in autocommit, as ``run_alone``."""

        def operation() -> R:
            with self.autocommit() as conn:
                return func(conn)

        return self.run_alone(operation, retry=retry)

    @overload
    def execute(
        self,
        statement: TypedReturnsRows[*_Ts],
        params: Params | None = None,
        *,
        idempotent: bool | None = None,
    ) -> Result[*_Ts]: ...

    @overload
    def execute(
        self, statement: Statement, params: Params | None = None, *, idempotent: bool | None = None
    ) -> Result[*tuple[Any, ...]]: ...

    def execute(
        self, statement: Statement, params: Params | None = None, *, idempotent: bool | None = None
    ) -> Result[*tuple[Any, ...]]:
        """Run one statement: on this thread's open transaction if there is one, else on its
        own in autocommit (one round trip, no BEGIN/COMMIT), or, given several parameter
        sets, in one short transaction (all or nothing).  Rows are fetched before the
        connection goes back to the pool, so the result stays readable.

        Outside a block, a statement that meets a dead pooled connection runs again on a
        fresh one when it only reads (``dbkit.retrying.is_read``), or when
        ``idempotent=True`` says a second run is harmless; ``idempotent=False`` never.
        Inside a block nothing is retried alone: the whole transaction is (``retries=``)."""
        stmt = _coerce(statement)
        ambient = self._transactions.connection()
        if ambient is not None:
            return ambient.execute(stmt, params)
        if params is not None and not isinstance(params, Mapping):
            # Several parameter sets are several statements: all or nothing.
            with self.transaction() as conn:
                result = conn.execute(stmt, params)
                return result.freeze()() if result.returns_rows else result
        retry = is_read(stmt) if idempotent is None else idempotent
        alone = self.run_alone(lambda: self._execute_alone(stmt, params), retry=retry)
        if self._replicas is not None and not is_read(stmt):
            self._replicas.wrote()
        return alone

    def _execute_alone(self, stmt: sa.Executable, params: Mapping[str, Any] | None) -> Result[Any]:
        driver = self.driver_path()
        if driver is not None:
            try:
                return driver.rows(stmt, params)
            except Declined:  # nothing was sent: SQLAlchemy's own path
                pass
        with self.autocommit() as conn:
            result = conn.execute(stmt, params)
            return result.freeze()() if result.returns_rows else result

    @overload
    def scalar(
        self,
        statement: TypedReturnsRows[T],
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool | None = None,
    ) -> T | None: ...

    @overload
    def scalar(
        self,
        statement: Statement,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool | None = None,
    ) -> Any: ...

    def scalar(
        self,
        statement: Statement,
        params: Mapping[str, Any] | None = None,
        *,
        idempotent: bool | None = None,
    ) -> Any:
        """The first column of the first row (None without rows); retried as ``execute``."""
        stmt = _coerce(statement)
        ambient = self._transactions.connection()
        if ambient is not None:
            return ambient.scalar(stmt, params)
        retry = is_read(stmt) if idempotent is None else idempotent
        return self.run_alone(lambda: self._scalar_alone(stmt, params), retry=retry)

    def _scalar_alone(self, stmt: sa.Executable, params: Mapping[str, Any] | None) -> Any:
        driver = self.driver_path()
        if driver is not None:
            try:
                return driver.scalar(stmt, params)
            except Declined:  # nothing was sent: SQLAlchemy's own path
                pass
        with self.autocommit() as conn:
            return conn.scalar(stmt, params)

    @contextlib.contextmanager
    def autocommit(self) -> Iterator[DbkitConnection]:
        """A pooled connection in autocommit for one statement.  The driver flag is set
        directly: SQLAlchemy's isolation_level option would also reset the isolation level
        and read-only mode on return, several driver calls per statement for nothing.  It
        is left set: the pool turns it off when SQLAlchemy checks the connection out."""
        conn = self.checkout()
        try:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            if not dbapi.autocommit:
                dbapi.autocommit = True
            yield conn
        finally:
            conn.close()

    # -- transactions ----------------------------------------------------------------------

    @overload
    def transaction(self, func: Callable[..., R], /) -> Callable[..., R]: ...

    @overload
    def transaction(
        self,
        func: None = None,
        /,
        *,
        savepoint: bool = True,
        durable: bool = False,
        readonly: bool | None = None,
        isolation: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_timeout: float | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        replica: bool | None = None,
    ) -> Transaction: ...

    def transaction(
        self,
        func: Callable[..., R] | None = None,
        /,
        *,
        savepoint: bool = True,
        durable: bool = False,
        readonly: bool | None = None,
        isolation: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_timeout: float | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        replica: bool | None = None,
    ) -> Transaction | Callable[..., R]:
        """A transaction block: ``with db.transaction() as conn``, ``@db.transaction`` or
        ``@db.transaction(...)``.  Outermost → BEGIN/COMMIT; nested → SAVEPOINT.
        ``retries=N`` (decorator only) re-runs the whole function up to N times on a
        failure that running it again may cure; ``retry_timeout`` caps the whole run
        (alone, it allows re-runs until then).

        ``settings={"work_mem": "256MB"}``: server settings local to the transaction
        (``set_config(name, value, true)``, sent with the BEGIN or SAVEPOINT, no round
        trip of its own).  Names are checked before any SQL of the block: an invalid or
        unknown one (not in ``pg_settings``, nor a custom ``prefix.name``), or one a
        session cannot change, is a ``ValueError`` (the server's list is read once per
        Database, the first time).  In a nested block they follow ``SET LOCAL``: they last
        until the outermost transaction ends, and are undone only when the block's
        savepoint is rolled back.  ``statement_timeout`` is ``timeout=``'s, isolation and
        read-only mode their options'.

        With replicas, an outermost ``readonly=True`` block runs on one that has replayed
        this Database's latest commit (per ``read_from``; not for serializable ones);
        ``replica=False`` keeps it on the primary."""
        options = TransactionOptions(
            savepoint, durable, readonly, isolation, timeout, settings, replica
        )
        tx = Transaction(self._transactions, options, retries, retry_timeout)
        return tx if func is None else tx(func)

    def run_in_transaction(
        self,
        func: Callable[[DbkitConnection], R],
        retries: int = 3,
        *,
        retry_timeout: float | None = None,
        **options: Any,
    ) -> R:
        """``func(conn)`` in an outermost transaction, re-run whole on serialization failure
        (40001), deadlock (40P01), lock timeout (55P03), an aborted or lost COMMIT, or a
        connection lost before COMMIT; waiting out an unreachable database with the
        connect policy, without spending ``retries``.  ``options``: those of
        ``transaction()`` (``readonly``, ``isolation``, ``timeout``, ``settings`` …)."""
        return self._transactions.run(
            func,
            retries=retries,
            options=TransactionOptions(**options),
            retry_timeout=retry_timeout,
        )

    def _server_settings(self) -> list[tuple[str, str]]:
        """``pg_settings``' names and contexts, for ``KnownSettings``: on this thread's
        block's connection inside one, else on a pooled connection of its own."""
        rows = self.execute(sa.text("SELECT name, context FROM pg_settings"))
        return [(name, context) for name, context in rows]

    def advisory_lock(
        self, name: str | int, *, wait: bool = True, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[HeldLock]:
        """``with db.advisory_lock("nightly-import", wait=False):`` -- one holder at a
        time across every process using this database (``dbkit.locks``).  Not granted →
        ``LockNotAvailable``: at once with ``wait=False``, after ``timeout`` seconds with
        ``wait=True`` (None: no bound).  Inside a transaction block the lock is the
        transaction's (released when the outermost one ends); outside, it is held on a
        pooled connection of its own until the ``with`` ends."""
        return self._locks.hold(name, wait=wait, timeout=timeout)

    def on_commit(self, func: Callable[[], Any], robust: bool = False) -> None:
        self._transactions.on_commit(func, robust)

    def set_rollback(self, rollback: bool) -> None:
        self._transactions.set_rollback(rollback)

    def get_rollback(self) -> bool:
        return self._transactions.get_rollback()

    def in_transaction(self) -> bool:
        return self._transactions.in_transaction()

    @property
    def transactions(self) -> TransactionManager:
        """This Database's per-thread transaction state: for integrations such as
        ``dbkit.testing``, which adopts a connection as a test's outer transaction."""
        return self._transactions

    def connection(self) -> DbkitConnection | None:
        """This thread's ambient connection (inside a block), else None."""
        return self._transactions.connection()

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """The pool, as Go's ``sql.DBStats``."""
        return self._counters.snapshot()

    # Go's setters at run time (``dbkit.pool``): this Database's own pool (a replica's is
    # its own), thread-safe, kept across close() and connect(); ``ConnectError`` once closed.

    def set_max_open_conns(self, n: int) -> None:
        """Go's ``SetMaxOpenConns``: at most ``n`` connections open (in use + idle), ``n <= 0``
        unlimited.  Lowering it interrupts no connection in use (those beyond it are closed
        as they come back) and lowers max_idle_conns with it; raising it lets waiting
        checkouts go ahead at once.  ``stats().max_open_connections`` follows."""
        from dbkit.pool import set_max_open_conns

        set_max_open_conns(self.engine, n)

    def set_max_idle_conns(self, n: int) -> None:
        """Go's ``SetMaxIdleConns``: keep at most ``n`` idle (never more than max_open_conns),
        ``n <= 0`` none; idle ones beyond it are closed now (``max_idle_closed``)."""
        from dbkit.pool import set_max_idle_conns

        set_max_idle_conns(self.engine, n)

    def set_conn_max_lifetime(self, seconds: float) -> None:
        """Go's ``SetConnMaxLifetime``: close connections older than ``seconds`` (0 = never),
        those already open included (``max_lifetime_closed``)."""
        from dbkit.pool import set_conn_max_lifetime

        set_conn_max_lifetime(self.engine, seconds)

    def set_conn_max_idle_time(self, seconds: float) -> None:
        """Go's ``SetConnMaxIdleTime``: close connections idle longer than ``seconds``
        (0 = never), those idle now included (``max_idle_time_closed``)."""
        from dbkit.pool import set_conn_max_idle_time

        set_conn_max_idle_time(self.engine, seconds)

    def add_statement_listener(self, listener: StatementListener) -> None:
        """Call ``listener(seconds, error, sql_text)`` after every statement (tracing,
        custom metrics).  ``sql_text()`` renders the statement without parameter values."""
        self._observer.listeners.append(listener)

    def query_stats(self) -> QueryStats:
        """Statements (count, errors by class, latency histogram, slow ones) and
        transactions (committed, rolled back, retried) since this Database was made."""
        return self._queries.snapshot()

    def health(self) -> Health:
        """Probe the database with one round trip; never raises."""
        started = time.perf_counter()
        error: str | None = None
        try:
            with self.checkout() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            error = f"{type(exc).__name__}: {_reason(exc)}"
        latency_ms = (time.perf_counter() - started) * 1000
        replicas = self._replicas
        if replicas is not None:
            replicas.poll_all()
        return Health(
            ok=error is None,
            latency_ms=latency_ms,
            error=error,
            pool=self.stats(),
            breaker=self.breaker.state,
            replicas=() if replicas is None else replicas.health(),
        )

    @property
    def read_from(self) -> str:
        """Where reads go: "primary", "replica" or "prefer-replica"."""
        return "primary" if self._replicas is None else self._replicas.read_from

    def replica_databases(self) -> dict[str, Database]:
        """Each replica's own ``Database`` by pool name (``"replica:<host>:<port>"``)."""
        if self._replicas is None:
            return {}
        return {replica.name: replica.db for replica in self._replicas.replicas}

    def replica_states(self) -> tuple[ReplicaHealth, ...]:
        """Each replica as the background poll last saw it (no round trip; ``health()``
        polls first)."""
        return () if self._replicas is None else self._replicas.health()

    def wait_for_replicas(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every usable replica has replayed this
        Database's latest commit (e.g. before a report that should read from them); True
        when they have.  Without replicas: True at once."""
        if self._replicas is None:
            return True
        return self._replicas.wait_caught_up(timeout)

    def pool_stats(self) -> dict[str, PoolStats]:
        """Every pool's stats: ``"primary"`` (``stats()``) and ``"replica:<host>:<port>"``."""
        pools = {"primary": self.stats()}
        for replica in self._replicas.replicas if self._replicas is not None else ():
            pools[replica.name] = replica.db.stats()
        return pools

    def evict_expired(self) -> int:
        """Close idle connections past conn_max_idle_time / conn_max_lifetime now."""
        engine = self._engine
        if engine is None:
            return 0
        return evict_expired(engine, self._counters, pool_policy(self._config))


class _Sweeper(threading.Thread):
    """Closes expired idle connections in the background (Go's connectionCleaner).  A
    daemon: it never keeps the process alive, and an error in it is logged, not raised."""

    def __init__(self, db: Database, leaks: LeakDetector | None, period: float) -> None:
        super().__init__(name="dbkit-pool-sweeper", daemon=True)
        self._db = db
        self._leaks = leaks
        self._period = period
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._period):
            try:
                self._db.evict_expired()
                if self._leaks is not None:
                    self._leaks.report()
            except Exception as error:
                logger.opt(exception=error).warning("pool sweep failed")

    def stop(self) -> None:
        self._stop_event.set()
