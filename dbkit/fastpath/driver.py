"""Statements outside a transaction on a pool entry in autocommit: ``DriverPath`` (for
``db.execute`` / ``db.scalar``) and ``FastGet`` (``repo.get``).  One round trip, without
SQLAlchemy's ``Connection``, pool proxy, execution context or ``CursorResult``; see
``dbkit.fastpath.sqlalchemy`` for what is kept and when they decline.

Public twin: ``Database.autocommit()`` and SQLAlchemy's ``Connection.execute``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.cursor import _NO_RESULT_METADATA
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import compiler as sa_compiler

from dbkit.fastpath.pool import FastQueuePool
from dbkit.fastpath.sqlalchemy import (
    Declined,
    Processors,
    driver_safe,
    processed,
    result_processors,
    wrapped_error,
)

if TYPE_CHECKING:
    from dbkit.metrics import StatementObserver

__all__ = ["DriverPath", "FastGet"]

_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
# What a compiled statement needs to run on the driver (driver_safe) and its frozen result
# metadata, kept on the Compiled object itself (it lives in the engine's compiled cache).
_SAFE = "_dbkit_driver_safe"
_FROZEN = "_dbkit_frozen_metadata"


class DriverPath:
    """One engine's runner of statements outside a transaction: a pool entry taken without
    SQLAlchemy's ``Connection`` or pool proxy, the statement run in autocommit (one round
    trip), the entry handed back."""

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

    def pool(self) -> FastQueuePool:
        """The pool to check out from; ``Declined`` when anything rules the driver path
        out.  Checked on every call: listeners and logging can be switched on at any time."""
        engine: Any = self.engine
        if (
            engine._has_events
            or engine._connection_cls._has_events
            or engine._execution_options
            or engine._should_log_info()
        ):
            raise Declined
        dialect_events = self.dialect.dispatch
        if (
            dialect_events.do_execute
            or dialect_events.do_execute_no_params
            or dialect_events.handle_error
        ):
            raise Declined
        pool = engine.pool
        if not isinstance(pool, FastQueuePool) or pool.hooks is None or pool._pre_ping:
            raise Declined
        pool_events = pool.dispatch
        if pool_events.checkout or pool_events.checkin or pool_events.reset:
            raise Declined
        return pool

    # -- connections -----------------------------------------------------------------------

    def checkout(self, pool: FastQueuePool) -> ConnectionPoolEntry:
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
        self, record: ConnectionPoolEntry, error: psycopg.Error, sql: str, params: Any
    ) -> sa_exc.DBAPIError:
        """The driver's error as SQLAlchemy would have raised it; a dead connection is
        invalidated, and so (as SQLAlchemy does) is every connection made before it."""
        wrapped, disconnect = wrapped_error(
            error, sql, params, self.dialect, record.driver_connection, self.engine.hide_parameters
        )
        if disconnect:
            pool: Any = self.engine.pool
            if pool._invalidate_time < cast(Any, record).starttime:
                pool._invalidate_time = time.time()
            record.invalidate(error)
        return wrapped

    # -- statements ------------------------------------------------------------------------

    def _compile(self, statement: Any, params: Mapping[str, Any] | None) -> tuple[Any, Any]:
        """SQLAlchemy's cached compilation, as ``Connection.execute`` looks it up, and the
        DBAPI parameters.  Declines anything the driver path does not cover (SQLAlchemy
        then raises its own errors, e.g. for a missing parameter)."""
        if statement._execution_options or not (statement.is_select or statement._is_text_clause):
            raise Declined
        found = statement._compile_w_cache(
            dialect=self.dialect,
            compiled_cache=cast(Any, self.engine)._compiled_cache,
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
            safe = driver_safe(compiled)
            setattr(compiled, _SAFE, safe)
        if not safe:
            raise Declined
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
            raise Declined from None
        processors = compiled._bind_processors
        if processors:
            values = {k: processors[k](v) if k in processors else v for k, v in values.items()}
        return compiled, values

    def run(self, pool: FastQueuePool, statement: Any, params: Any, sql: str, values: Any) -> Any:
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
        compiled, values = self._compile(statement, params)
        processor = None
        if compiled._result_columns:  # typed columns: SQLAlchemy's result processor
            metadata = compiled._cached_metadata
            if metadata is None or metadata._tuplefilter is not None:
                raise Declined  # SQLAlchemy's first run of it builds the metadata
            processors = metadata._effective_processors
            processor = processors[0] if processors else None
        cursor = self.run(pool, statement, params, compiled.string, values)
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
        """What ``Connection.execute(stmt).freeze()()`` returns for a SELECT (every row
        fetched, the same keys and column lookups), and for a textual statement that
        returns no rows a result with its ``rowcount``."""
        pool = self.pool()
        if statement.is_select:
            compiled, values = self._compile(statement, params)
            frozen = compiled.__dict__.get(_FROZEN)
            if frozen is None:
                metadata = compiled._cached_metadata
                if metadata is None or metadata._tuplefilter is not None:
                    raise Declined  # SQLAlchemy's first run of it builds the metadata
                frozen = (metadata._for_freeze(), metadata._effective_processors)
                setattr(compiled, _FROZEN, frozen)
            frozen_metadata, processors = frozen
            cursor = self.run(pool, statement, params, compiled.string, values)
            rows = cursor.fetchall()
            if processors:
                rows = processed(rows, processors)
            return IteratorResult(frozen_metadata, iter(rows))
        if not statement._is_text_clause:
            raise Declined
        # text(): no typed columns, so no result processors; the keys are the names the
        # server sent, as SQLAlchemy takes them from the cursor's description.
        compiled, values = self._compile(statement, params)
        cursor = self.run(pool, statement, params, compiled.string, values)
        if cursor.pgresult is None or cursor.pgresult.status != _TUPLES_OK:
            return _NoRows(cursor.rowcount)
        keys = [column.name for column in cursor.description or ()]
        return IteratorResult(SimpleResultMetaData(keys), iter(cursor.fetchall()))


class _NoRows(IteratorResult[Any]):
    """The result of a statement that returns no rows: its ``rowcount``, and SQLAlchemy's
    ``ResourceClosedError`` for any attempt to read rows."""

    returns_rows = False

    def __init__(self, rowcount: int) -> None:
        super().__init__(_NO_RESULT_METADATA, iter(()))
        self.rowcount = rowcount


class FastGet:
    """``repo.get`` outside a transaction on the driver path: the statement compiled once,
    run in autocommit on the pooled psycopg connection, one round trip.  Metrics, bind and
    result processing and error wrapping as on SQLAlchemy's path."""

    def __init__(
        self,
        path: DriverPath,
        stmt: sa.Select[Any],
        columns: Sequence[sa.Column[Any]],
        keys: Sequence[tuple[str, sa.Column[Any]]],
    ) -> None:
        """``keys``: the statement's primary-key parameter names and their columns."""
        self.path = path
        self.engine = path.engine
        self.dialect = dialect = path.dialect
        self.sql = stmt.compile(dialect=dialect).string
        self.columns = columns
        self.bind_processors = [
            (name, proc)
            for name, col in keys
            if (proc := col.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self.result_processors: Processors | None = None  # known after the first row

    def fetch(self, params: dict[str, Any]) -> Sequence[Any] | None:
        """The row, or None; ``Declined`` (nothing sent, ``params`` untouched) when the
        driver path is ruled out (listeners, logging: see ``DriverPath.pool``)."""
        path = self.path
        pool = path.pool()
        for name, proc in self.bind_processors:
            params[name] = proc(params[name])
        cursor = path.run(pool, self.sql, params, self.sql, params)
        row = cursor.fetchone()
        if row is None:
            return None
        processors = self.result_processors
        if processors is None:  # cursor.description builds new objects on every access
            processors = result_processors(self.columns, cursor.description or (), self.dialect)
            self.result_processors = processors
        return processed((row,), processors)[0] if processors else row
