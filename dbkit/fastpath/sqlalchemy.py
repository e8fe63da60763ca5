"""Statements run from SQLAlchemy's compiled cache, without the machinery around them.

For a point read, SQLAlchemy's per-statement work (a ``Connection``, its pool proxy, an
execution context, a ``CursorResult``) costs more than the round trip.  The shortcuts here
run the SQL SQLAlchemy compiled -- from its own compiled cache -- and keep what SQLAlchemy
would add: bind and result processors, dbkit's statement metrics and slow-query log, errors
wrapped as ``DBAPIError``, invalidation of a connection found dead (and of the connections
made before it, as SQLAlchemy does on a disconnect).

- ``execute_direct``: ``Connection.execute()`` of one statement inside a transaction block,
  SQLAlchemy's own steps minus the event dispatch nobody listens to.
- ``dbkit.fastpath.driver``: statements outside a transaction (``DriverPath``) and
  ``repo.get``'s primary-key read (``FastGet``), on a pool entry in autocommit.
- ``bound_parameters``: a statement's parameters as the driver gets them (``repo.stream``).

Each raises ``Declined`` before sending anything whenever something could observe the
difference -- a ConnectionEvents or pool checkout/checkin listener (tracing), echo logging,
execution options, ``pool_pre_ping`` -- or the statement needs more than a plain execute
(expanding IN, positional or escaped parameters, DML defaults); the caller then takes
SQLAlchemy's public path.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.cursor import CursorResult
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.sql import compiler as sa_compiler
from sqlalchemy.sql.elements import ClauseElement

if TYPE_CHECKING:
    pass

__all__ = [
    "Declined",
    "Processors",
    "bound_parameters",
    "driver_safe",
    "execute_direct",
    "instrumented",
    "processed",
    "result_processors",
    "wrap_driver_error",
    "wrapped_error",
]


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


# -- shared with the driver path (dbkit.fastpath.driver) ----------------------------------


def driver_safe(compiled: Any) -> bool:
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


def wrap_driver_error(
    conn: sa.Connection, error: psycopg.Error, sql: str, params: Any
) -> sa_exc.DBAPIError:
    """The driver's error, raised on ``conn``'s psycopg connection, as SQLAlchemy would have
    raised it; a dead connection is invalidated so that the pool does not hand it out again."""
    try:
        driver = conn.connection.driver_connection
    except sa_exc.SQLAlchemyError:  # already invalidated
        driver = None
    wrapped, invalidated = wrapped_error(
        error, sql, params, conn.dialect, driver, hide_parameters=True
    )
    if invalidated:
        conn.invalidate(wrapped)
    return wrapped


def bound_parameters(compiled: sa_compiler.SQLCompiler) -> dict[str, Any]:
    """A compiled statement's parameter values as the driver gets them: with the bind
    processors SQLAlchemy's execution context applies."""
    binds: Any = compiled._bind_processors
    return {key: _bind(binds.get(key), value) for key, value in compiled.construct_params().items()}


def wrapped_error(
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
