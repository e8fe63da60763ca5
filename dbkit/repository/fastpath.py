"""Straight on the driver: statements outside a transaction, ``get()``, and ``stream()``.

For these, SQLAlchemy's per-statement machinery (a ``Connection``, its pool proxy, an
execution context, a ``CursorResult``) costs more than the work itself (one primary-key
round trip), so they run the SQL SQLAlchemy compiled (from its own compiled cache) on the
pooled psycopg connection.  What SQLAlchemy would add is kept: bind and result processors,
dbkit's statement metrics and slow-query log, errors wrapped as DBAPIError, invalidation of
a connection found dead (and of the pool, as SQLAlchemy does on a disconnect).  Whenever
anything could observe the difference -- a ConnectionEvents or pool checkout/checkin
listener (tracing), echo logging, execution options, ``pool_pre_ping`` -- or a statement
needs more than a plain execute (expanding IN, positional or escaped parameters, DML
defaults), the statement takes SQLAlchemy's own path instead.
"""

from __future__ import annotations

import builtins
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import IteratorResult, Result
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.sql import compiler as sa_compiler

from dbkit.pool import DbkitQueuePool

if TYPE_CHECKING:
    from dbkit.database import Database
    from dbkit.metrics import StatementObserver
    from dbkit.repository.plan import _Plan
    from dbkit.transaction import DbkitConnection

_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
# What a compiled statement needs to run on the driver: see _driver_safe().  Kept on the
# Compiled object itself (it lives in the engine's compiled cache).
_SAFE = "_dbkit_driver_safe"
_FROZEN = "_dbkit_frozen_metadata"


class NotHandled(Exception):
    """The statement must take SQLAlchemy's path; nothing was sent."""


def _driver_safe(compiled: Any) -> bool:
    """A plain single execute: no expanding/literal-execute or positional parameters, no
    escaped parameter names, no schema translation, no INSERT/UPDATE/DELETE (defaults,
    RETURNING bookkeeping).  Anything else is left to SQLAlchemy."""
    return not (
        compiled.positional
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or compiled.schema_translate_map
        or compiled.isinsert
        or compiled.isupdate
        or compiled.isdelete
        or compiled.for_executemany
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.has_out_parameters
    )


class DriverPath:
    """One engine's driver-level runner for statements outside a transaction: a pooled
    connection taken without SQLAlchemy's ``Connection`` or pool proxy, the statement run
    in autocommit (one round trip), the connection handed back."""

    def __init__(
        self,
        engine: sa.Engine,
        observer: StatementObserver | None,
        checkout_error: Callable[[Any], Exception] | None = None,
    ) -> None:
        """``checkout_error`` turns a pool timeout or connect failure (SQLAlchemy's
        ``TimeoutError`` / ``DBAPIError``) into the error to raise instead."""
        self.engine = engine
        self.dialect = dialect = engine.dialect
        self.observer = observer
        self.checkout_error = checkout_error
        self.linting = dialect.compiler_linting | sa_compiler.WARN_LINTING

    # -- when ---------------------------------------------------------------------------

    def pool(self) -> DbkitQueuePool | None:
        """The pool to check out from when nothing rules the driver path out, else None.
        Checked on every call: listeners and logging can be switched on at any time."""
        engine = self.engine
        if (
            engine._has_events
            or engine._connection_cls._has_events
            or engine._execution_options
            or engine._should_log_info()
        ):
            return None
        dialect_events = self.dialect.dispatch
        if (
            dialect_events.do_execute
            or dialect_events.do_execute_no_params
            or dialect_events.handle_error
        ):
            return None
        pool = engine.pool
        if not isinstance(pool, DbkitQueuePool) or pool.counters is None or pool._pre_ping:
            return None
        pool_events = pool.dispatch
        if pool_events.checkout or pool_events.checkin or pool_events.reset:
            return None
        return pool

    # -- connections -----------------------------------------------------------------------

    def checkout(self, pool: DbkitQueuePool) -> _ConnectionRecord:
        """A pool entry whose live connection is in autocommit.  Connect errors come out as
        SQLAlchemy's ``engine.connect()`` raises them."""
        try:
            try:
                record = pool.checkout_entry()
            except psycopg.Error as error:  # as Connection() wraps it
                sa.Connection._handle_dbapi_exception_noconnection(error, self.dialect, self.engine)
                raise  # not reached: the above raises the wrapped error
        except (sa_exc.TimeoutError, sa_exc.DBAPIError) as error:
            if self.checkout_error is None:
                raise
            raise self.checkout_error(error) from error
        driver: Any = record.dbapi_connection
        if not driver.autocommit:  # left so by SQLAlchemy's path (which sets it back)
            try:
                driver.autocommit = True
            except BaseException:
                record.invalidate()
                pool.checkin_entry(record)
                raise
        return record

    def error(
        self, record: _ConnectionRecord, error: psycopg.Error, sql: str, params: Any
    ) -> sa_exc.DBAPIError:
        """The driver's error as SQLAlchemy would have raised it; a dead connection is
        invalidated, and so (as SQLAlchemy does) is every connection made before it."""
        wrapped, disconnect = _wrapped(
            error, sql, params, self.dialect, record.driver_connection, self.engine.hide_parameters
        )
        if disconnect:
            pool = self.engine.pool
            if pool._invalidate_time < record.starttime:
                pool._invalidate_time = time.time()
            record.invalidate(error)
        return wrapped

    # -- statements ------------------------------------------------------------------------

    def _compile(self, statement: Any, params: Mapping[str, Any] | None) -> tuple[Any, Any]:
        """SQLAlchemy's cached compilation, as ``Connection.execute`` looks it up, and the
        DBAPI parameters.  Raises NotHandled for anything the driver path does not cover
        (SQLAlchemy then raises its own errors, e.g. for a missing parameter)."""
        if statement._execution_options or not (statement.is_select or statement._is_text_clause):
            raise NotHandled
        found = statement._compile_w_cache(
            dialect=self.dialect,
            compiled_cache=self.engine._compiled_cache,
            column_keys=sorted(params) if params else [],
            for_executemany=False,
            schema_translate_map=None,
            linting=self.linting,
        )
        compiled, extracted = found[0], found[1]
        # SQLAlchemy 2.1 also returns the values of parameters it collected while
        # compiling a statement that has no cache key (2.0: three items, none of those).
        collected = found[2] if len(found) == 4 else None
        safe = compiled.__dict__.get(_SAFE)
        if safe is None:
            safe = _driver_safe(compiled)
            setattr(compiled, _SAFE, safe)
        if not safe:
            raise NotHandled
        try:
            if collected is None:
                values = compiled.construct_params(
                    params, escape_names=False, extracted_parameters=extracted
                )
            else:
                values = compiled.construct_params(
                    params,
                    escape_names=False,
                    extracted_parameters=extracted,
                    _collected_params=collected,
                )
        except Exception:
            raise NotHandled from None
        processors = compiled._bind_processors
        if processors:
            values = {k: processors[k](v) if k in processors else v for k, v in values.items()}
        return compiled, values

    def _run(self, pool: DbkitQueuePool, statement: Any, params: Any, sql: str, values: Any) -> Any:
        """Execute on a pooled connection; the psycopg cursor, results fetched."""
        observer = self.observer
        record = self.checkout(pool)
        try:
            driver: Any = record.dbapi_connection
            started = time.perf_counter()
            try:
                cursor = driver.execute(sql, values)
            except psycopg.Error as error:
                wrapped = self.error(record, error, sql, values)
                if observer is not None:
                    observer.observe(
                        time.perf_counter() - started, wrapped, statement, (params,), self.dialect
                    )
                raise wrapped from error
            except BaseException:
                record.invalidate()  # interrupted mid-protocol: never reuse it
                raise
            if observer is not None:
                observer.observe(
                    time.perf_counter() - started, None, statement, (params,), self.dialect
                )
        finally:
            pool.checkin_entry(record)
        return cursor

    def scalar(self, statement: Any, params: Mapping[str, Any] | None) -> Any:
        """``Connection.scalar()``'s value: the first column of the first row, or None."""
        pool = self.pool()
        if pool is None:
            raise NotHandled
        compiled, values = self._compile(statement, params)
        processor = None
        if compiled._result_columns:  # typed columns: SQLAlchemy's result processor
            metadata = compiled._cached_metadata
            if metadata is None or metadata._tuplefilter is not None:
                raise NotHandled  # SQLAlchemy's first run of it builds the metadata
            processors = metadata._effective_processors
            processor = processors[0] if processors else None
        cursor = self._run(pool, statement, params, compiled.string, values)
        result = cursor.pgresult
        if result is None or result.status != _TUPLES_OK:
            raise sa_exc.ResourceClosedError(
                "This result object does not return rows. It has been closed automatically."
            )
        row = cursor.fetchone()
        if row is None:
            return None
        return processor(row[0]) if processor is not None else row[0]

    def rows(self, statement: Any, params: Mapping[str, Any] | None) -> Result[Any]:
        """What ``Connection.execute(select).freeze()()`` returns: every row fetched, the
        same keys and column lookups."""
        pool = self.pool()
        if pool is None or not statement.is_select:
            raise NotHandled
        compiled, values = self._compile(statement, params)
        frozen = compiled.__dict__.get(_FROZEN)
        if frozen is None:
            metadata = compiled._cached_metadata
            if metadata is None or metadata._tuplefilter is not None:
                raise NotHandled  # SQLAlchemy's first run of it builds the metadata
            frozen = (metadata._for_freeze(), metadata._effective_processors)
            setattr(compiled, _FROZEN, frozen)
        frozen_metadata, processors = frozen
        cursor = self._run(pool, statement, params, compiled.string, values)
        rows = cursor.fetchall()
        if processors:
            rows = _processed(rows, processors)
        return IteratorResult(frozen_metadata, iter(rows))


def _instrumented(engine: sa.Engine) -> bool:
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


def _observe(
    conn: DbkitConnection, started: float, error: BaseException | None, sql: str, params: Any
) -> None:
    observer = getattr(conn, "_dbkit_observer", None)
    if observer is not None:
        observer.observe(time.perf_counter() - started, error, sql, (params,), conn.dialect)


def _driver_error(
    conn: DbkitConnection | PoolProxiedConnection,
    dialect: Dialect,
    error: psycopg.Error,
    sql: str,
    params: Any,
) -> sa_exc.DBAPIError:
    """The driver's error as SQLAlchemy would have raised it; a dead connection is
    invalidated so that the pool does not hand it out again."""
    try:
        pooled = conn if isinstance(conn, PoolProxiedConnection) else conn.connection
        driver = pooled.driver_connection
    except sa_exc.SQLAlchemyError:  # already invalidated
        driver = None
    wrapped, invalidated = _wrapped(error, sql, params, dialect, driver, hide_parameters=True)
    if invalidated:
        conn.invalidate(wrapped)
    return wrapped


def _wrapped(
    error: psycopg.Error,
    sql: str,
    params: Any,
    dialect: Dialect,
    driver: Any,
    hide_parameters: bool,
) -> tuple[sa_exc.DBAPIError, bool]:
    """``error`` wrapped as SQLAlchemy wraps driver errors, and whether it means the
    connection is gone."""
    disconnect = driver is not None and dialect.is_disconnect(cast(Any, error), driver, None)
    wrapped = sa_exc.DBAPIError.instance(
        sql,
        params,
        error,
        psycopg.Error,
        hide_parameters=hide_parameters,
        connection_invalidated=disconnect,
        dialect=dialect,
    )
    return cast(sa_exc.DBAPIError, wrapped), disconnect


Processors = builtins.list[Callable[[Any], Any] | None]


def _result_processors(
    columns: Sequence[sa.Column[Any]], description: Sequence[Any], dialect: Dialect
) -> Processors:
    """SQLAlchemy's result processors for these columns given the types the server sent;
    empty when no column needs one (the usual case with psycopg)."""
    found: Processors = [
        col.type.dialect_impl(dialect).result_processor(dialect, d.type_code)
        for col, d in zip(columns, description, strict=True)
    ]
    return found if any(found) else []


def _processed(rows: Sequence[Any], processors: Processors) -> builtins.list[tuple[Any, ...]]:
    return [tuple(p(v) if p else v for p, v in zip(processors, row, strict=True)) for row in rows]


class _FastGet:
    """``get`` outside a transaction on the driver path: the statement compiled once, run
    in autocommit on the pooled psycopg connection, one round trip.  Metrics, bind/result
    processing and error wrapping as on the usual path."""

    def __init__(self, stmt: sa.Select[Any], plan: _Plan, db: Database) -> None:
        engine = db.engine
        self.engine = engine
        self.dialect = dialect = engine.dialect
        self.path = db._driver_path()
        self.sql = stmt.compile(dialect=dialect).string
        self.columns = plan.columns
        self.bind_processors = [
            (param.key, proc)
            for param, col in zip(plan.pk_params, plan.pk, strict=True)
            if (proc := col.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self.result_processors: Processors | None = None  # known after the first row

    def fetch(self, params: dict[str, Any]) -> Sequence[Any] | None:
        """The row, or None; ``NotHandled`` (nothing sent, ``params`` untouched) when the
        driver path is ruled out (listeners, logging: see ``DriverPath.pool``)."""
        path = self.path
        pool = path.pool()
        if pool is None:
            raise NotHandled
        for name, proc in self.bind_processors:
            params[name] = proc(params[name])
        cursor = path._run(pool, self.sql, params, self.sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        processors = self.result_processors
        if processors is None:  # cursor.description builds new objects on every access
            processors = _result_processors(self.columns, cursor.description or (), self.dialect)
            self.result_processors = processors
        return _processed((row,), processors)[0] if processors else row


_cursor_names = itertools.count(1)


def _bind(processor: Any, value: Any) -> Any:
    if processor is None:
        return value
    if callable(processor):
        return processor(value)
    # A tuple-valued parameter (e.g. tuple_(...).in_(...)): one processor per element.
    return tuple(p(v) if p else v for p, v in zip(processor, value, strict=True))


def _driver_stream(
    conn: DbkitConnection,
    stmt: sa.Select[Any],
    columns: Sequence[sa.Column[Any]],
    batch_size: int,
) -> Iterator[Sequence[Sequence[Any]]]:
    """Batches of plain tuples from a psycopg server-side cursor (``DECLARE … CURSOR`` then
    ``FETCH FORWARD batch_size``), closed when the generator is."""
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    binds = compiled._bind_processors  # what SQLAlchemy's execution context applies
    params = {
        key: _bind(binds.get(key), value) for key, value in compiled.construct_params().items()
    }
    sql = compiled.string
    driver = conn.connection.driver_connection
    assert driver is not None
    started = time.perf_counter()
    declared = False
    try:
        with driver.cursor(name=f"dbkit_stream_{next(_cursor_names)}") as cursor:
            cursor.execute(sql, params)
            declared = True
            _observe(conn, started, None, sql, params)
            processors = _result_processors(columns, cursor.description or (), dialect)
            while rows := cursor.fetchmany(batch_size):
                yield _processed(rows, processors) if processors else rows
    except psycopg.Error as error:
        wrapped = _driver_error(conn, dialect, error, sql, params)
        if not declared:  # metrics count statements, as DbkitConnection does
            _observe(conn, started, wrapped, sql, params)
        raise wrapped from error
