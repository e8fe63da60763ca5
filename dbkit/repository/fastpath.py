"""Straight on the driver: ``get()`` outside a transaction, and ``stream()``.

For these two, SQLAlchemy's per-statement and per-row machinery costs more than the work
itself (a primary-key round trip; building a Row per streamed row), so they run the SQL
SQLAlchemy compiled on the pooled psycopg connection.  What SQLAlchemy would add is kept:
bind and result processors, dbkit's statement metrics, errors wrapped as DBAPIError,
invalidation of a connection found dead.  When someone instruments SQLAlchemy's cursor
events (tracing), both stay on SQLAlchemy's path so those events still see everything.
"""

from __future__ import annotations

import builtins
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.pool import PoolProxiedConnection

if TYPE_CHECKING:
    from dbkit.database import Database
    from dbkit.repository.plan import _Plan
    from dbkit.transaction import DbkitConnection


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
    invalidated = driver is not None and dialect.is_disconnect(cast(Any, error), driver, None)
    wrapped = sa_exc.DBAPIError.instance(
        sql,
        params,
        error,
        psycopg.Error,
        hide_parameters=True,
        connection_invalidated=invalidated,
        dialect=dialect,
    )
    if invalidated:
        conn.invalidate(wrapped)
    return cast(sa_exc.DBAPIError, wrapped)


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
    """``get`` outside a transaction: the statement compiled once, run in autocommit on the
    pool's DBAPI connection itself (no SQLAlchemy ``Connection`` around it), one round
    trip.  Metrics, bind/result processing and error wrapping as on the usual path."""

    def __init__(self, stmt: sa.Select[Any], plan: _Plan, db: Database) -> None:
        engine = db.engine
        self.db = db
        self.engine = engine
        self.dialect = dialect = engine.dialect
        self.observer = getattr(db, "_observer", None)  # dbkit's statement metrics
        self.sql = stmt.compile(dialect=dialect).string
        self.columns = plan.columns
        self.bind_processors = [
            (param.key, proc)
            for param, col in zip(plan.pk_params, plan.pk, strict=True)
            if (proc := col.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self.result_processors: Processors | None = None  # known after the first row

    def fetch(self, params: dict[str, Any]) -> Sequence[Any] | None:
        for name, proc in self.bind_processors:
            params[name] = proc(params[name])
        pooled = self.db._checkout_driver(self.engine)
        try:
            driver = pooled.driver_connection
            assert driver is not None
            driver.autocommit = True
            try:
                row, cursor = self._run(pooled, driver, params)
            finally:
                try:
                    driver.autocommit = False
                except psycopg.Error:  # never pool a half-configured connection
                    if pooled.dbapi_connection is not None:  # not invalidated already
                        pooled.invalidate()
        finally:
            pooled.close()
        if row is None:
            return None
        processors = self.result_processors
        if processors is None:  # cursor.description builds new objects on every access
            processors = _result_processors(self.columns, cursor.description or (), self.dialect)
            self.result_processors = processors
        return _processed((row,), processors)[0] if processors else row

    def _run(
        self, pooled: PoolProxiedConnection, driver: Any, params: dict[str, Any]
    ) -> tuple[Sequence[Any] | None, Any]:
        observer = self.observer
        started = time.perf_counter()
        try:
            cursor = driver.execute(self.sql, params)
            row = cursor.fetchone()
        except psycopg.Error as error:
            wrapped = _driver_error(pooled, self.dialect, error, self.sql, params)
            if observer is not None:
                observer.observe(
                    time.perf_counter() - started, wrapped, self.sql, (params,), self.dialect
                )
            raise wrapped from error
        if observer is not None:
            observer.observe(time.perf_counter() - started, None, self.sql, (params,), self.dialect)
        return row, cursor


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
