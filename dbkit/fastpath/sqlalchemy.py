"""Statements run from SQLAlchemy's compiled cache, without the machinery around them.

For a point read, SQLAlchemy's per-statement work (a ``Connection``, its pool proxy, an
execution context, a ``CursorResult``) costs more than the round trip.  The shortcuts here
run the SQL SQLAlchemy compiled -- from its own compiled cache -- and keep what SQLAlchemy
would add: bind and result processors, dbkit's statement metrics and slow-query log, errors
wrapped as ``DBAPIError``, invalidation of a connection found dead (and of the connections
made before it, as SQLAlchemy does on a disconnect).

- ``execute_direct``: ``Connection.execute()`` of one statement inside a transaction block,
  SQLAlchemy's own steps minus the event dispatch nobody listens to.
- ``DriverPath``: statements outside a transaction, on a pool entry in autocommit.
- ``FastGet``: ``repo.get``'s primary-key read on the driver path.
- ``bound_parameters``: a statement's parameters as the driver gets them (``repo.stream``).

Each raises ``Declined`` before sending anything whenever something could observe the
difference -- a ConnectionEvents or pool checkout/checkin listener (tracing), echo logging,
execution options, ``pool_pre_ping`` -- or the statement needs more than a plain execute
(expanding IN, positional or escaped parameters, DML defaults); the caller then takes
SQLAlchemy's public path.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.cursor import _NO_RESULT_METADATA, CursorResult
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import compiler as sa_compiler
from sqlalchemy.sql.elements import ClauseElement

from dbkit.fastpath.pool import FastQueuePool

if TYPE_CHECKING:
    from dbkit.metrics import StatementObserver

__all__ = [
    "Declined",
    "DriverPath",
    "FastGet",
    "bound_parameters",
    "execute_direct",
    "instrumented",
    "wrap_driver_error",
]

_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
# What a compiled statement needs to run on the driver: see _driver_safe().  Kept on the
# Compiled object itself (it lives in the engine's compiled cache).
_SAFE = "_dbkit_driver_safe"
_FROZEN = "_dbkit_frozen_metadata"


class Declined(Exception):
    """The statement must take SQLAlchemy's public path; nothing was sent."""


# -- inside a transaction block ------------------------------------------------------------


def execute_direct(conn: sa.Connection, statement: Any, parameters: Any) -> CursorResult[Any]:
    """``conn.execute(statement, parameters)`` for a statement with at most one parameter
    set, when no event listener, echo logging or execution option is in play: SQLAlchemy's
    own steps (compiled cache, execution context, DBAPI execute, result, error handling)
    without the dispatching around them, and -- for a SELECT whose result metadata
    SQLAlchemy has cached -- without having the driver describe the columns again (psycopg
    builds new objects for that on every call).  Raises ``Declined`` before doing anything
    when SQLAlchemy's full path is needed."""
    connection: Any = conn
    if (
        connection._execution_options
        or connection._has_events
        or connection.engine._has_events
        or connection._echo
        or connection._trans_context_manager
        or not isinstance(statement, ClauseElement)
    ):
        raise Declined
    elem: Any = statement
    if elem._execution_options or not (elem.is_select or elem.is_dml or elem._is_text_clause):
        raise Declined
    dbapi = connection._dbapi_connection
    dialect = connection.dialect
    if (
        dbapi is None
        or dialect.bind_typing is BindTyping.SETINPUTSIZES
        or (
            dialect._has_events
            and (dialect.dispatch.do_execute or dialect.dispatch.do_execute_no_params)
        )
    ):
        raise Declined
    if parameters is None:
        distilled: Any = ()
        keys: list[str] = []
    elif isinstance(parameters, dict):
        distilled = [parameters]
        keys = sorted(parameters)
    else:
        raise Declined
    found = elem._compile_w_cache(
        dialect=dialect,
        compiled_cache=connection.engine._compiled_cache,
        column_keys=keys,
        for_executemany=False,
        schema_translate_map=None,
        linting=dialect.compiler_linting | sa_compiler.WARN_LINTING,
    )
    # SQLAlchemy 2.1 returns the parameters collected from a statement without a cache
    # key too; 2.0 three items.
    extra = {"param_dict": found[2]} if len(found) == 4 else {}
    compiled: Any = found[0]
    extracted, cache_hit = found[1], found[-1]
    try:
        context: Any = dialect.execution_ctx_cls._init_compiled(
            dialect,
            connection,
            dbapi,
            connection._execution_options,
            compiled,
            distilled,
            elem,
            extracted,
            cache_hit=cache_hit,
            **extra,
        )
    except (sa_exc.PendingRollbackError, sa_exc.ResourceClosedError):
        raise
    except BaseException as error:
        connection._handle_dbapi_exception(error, str(compiled), distilled, None, None)
    transaction, nested = connection._transaction, connection._nested_transaction
    if (transaction is not None and not transaction.is_active) or (
        nested is not None and not nested.is_active
    ):
        connection._invalid_transaction()
    if transaction is None:
        connection._autobegin()
    context.pre_exec()
    cursor = context.cursor
    sql = context.statement
    values = context.parameters[0]
    result: Any = None
    try:
        dialect.do_execute(cursor, sql, values, context)
        context.post_exec()
        strategy = context.cursor_fetch_strategy
        if (
            compiled._cached_metadata is not None
            and not context.is_crud
            and not context.is_text
            and not context._is_server_side
            and strategy.alternate_cursor_description is None
            and not compiled.has_out_parameters
        ):
            # What _setup_result_proxy() does for a SELECT, minus cursor.description,
            # which CursorResult does not read when the compiled metadata is cached.
            result = CursorResult(context, strategy, ())
            context._soft_closed = result._soft_closed
        else:
            result = context._setup_result_proxy()
    except BaseException as error:
        connection._handle_dbapi_exception(error, sql, values, cursor, context)
    return cast("CursorResult[Any]", result)


def instrumented(engine: sa.Engine) -> bool:
    """Whether cursor-level events listen on ``engine`` (they must see every statement)."""
    dispatch = engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


# -- outside a transaction -----------------------------------------------------------------


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
        wrapped, disconnect = _wrapped(
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
            safe = _driver_safe(compiled)
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


def wrap_driver_error(
    conn: sa.Connection, error: psycopg.Error, sql: str, params: Any
) -> sa_exc.DBAPIError:
    """The driver's error, raised on ``conn``'s psycopg connection, as SQLAlchemy would have
    raised it; a dead connection is invalidated so that the pool does not hand it out again."""
    try:
        driver = conn.connection.driver_connection
    except sa_exc.SQLAlchemyError:  # already invalidated
        driver = None
    wrapped, invalidated = _wrapped(error, sql, params, conn.dialect, driver, hide_parameters=True)
    if invalidated:
        conn.invalidate(wrapped)
    return wrapped


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


def bound_parameters(compiled: sa_compiler.SQLCompiler) -> dict[str, Any]:
    """A compiled statement's parameter values as the driver gets them: with the bind
    processors SQLAlchemy's execution context applies."""
    binds: Any = compiled._bind_processors
    return {key: _bind(binds.get(key), value) for key, value in compiled.construct_params().items()}


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


def result_processors(
    columns: Sequence[sa.Column[Any]], description: Sequence[Any], dialect: Dialect
) -> Processors:
    """SQLAlchemy's result processors for these columns given the types the server sent;
    empty when no column needs one (the usual case with psycopg)."""
    found: Processors = [
        col.type.dialect_impl(dialect).result_processor(dialect, d.type_code)
        for col, d in zip(columns, description, strict=True)
    ]
    return found if any(found) else []


def processed(rows: Sequence[Any], processors: Processors) -> builtins.list[tuple[Any, ...]]:
    return [tuple(p(v) if p else v for p, v in zip(processors, row, strict=True)) for row in rows]


def _bind(processor: Any, value: Any) -> Any:
    if processor is None:
        return value
    if callable(processor):
        return processor(value)
    # A tuple-valued parameter (e.g. tuple_(...).in_(...)): one processor per element.
    return tuple(p(v) if p else v for p, v in zip(processor, value, strict=True))
