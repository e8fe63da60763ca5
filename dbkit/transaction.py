"""Nested transactions with Django ``atomic`` semantics on SQLAlchemy Core.

One pooled connection per outermost block; nested blocks are SAVEPOINTs on it.  All state
of a thread's transaction lives in one ``_State`` (per ``Database``, per thread), the way
Django keeps it on the connection: the ``Transaction`` objects themselves hold only the
options they were made with, so one instance can be entered again while already open.

What dbkit adds to Django's rules (see DESIGN.md):

- a block that exits normally but was marked for rollback by an *error* raises
  ``TransactionRolledBack``; only an explicit ``set_rollback(True)`` rolls back silently;
- a failed statement is detected from the server's own transaction status, so a swallowed
  error can never be followed by a COMMIT that PostgreSQL would quietly turn into ROLLBACK;
- read-only, isolation and timeout per block, and whole-transaction retries.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import psycopg
import sqlalchemy as sa
from loguru import logger
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, RootTransaction
from sqlalchemy.engine.cursor import CursorResult
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.sql.compiler import WARN_LINTING
from sqlalchemy.sql.elements import ClauseElement

from dbkit.engine import DbkitPgConnection
from dbkit.errors import (
    CircuitOpenError,
    ConnectError,
    DbkitError,
    RetryableError,
    TransactionBroken,
    TransactionError,
    TransactionRolledBack,
    is_transient,
    sqlstate_of,
)
from dbkit.metrics import StatementObserver

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["DbkitConnection", "Transaction", "TransactionManager", "run_on_commit_callback"]

P = ParamSpec("P")
R = TypeVar("R")

_ISOLATION_LEVELS = {
    "serializable": "SERIALIZABLE",
    "repeatable read": "REPEATABLE READ",
    "repeatable_read": "REPEATABLE READ",
    "read committed": "READ COMMITTED",
    "read_committed": "READ COMMITTED",
    "read uncommitted": "READ UNCOMMITTED",
    "read_uncommitted": "READ UNCOMMITTED",
}

# SQLSTATEs after which re-running the whole transaction is the documented remedy.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
_RETRY_BASE_DELAY = 0.01
_ABORTED = frozenset(
    {int(psycopg.pq.TransactionStatus.INERROR), int(psycopg.pq.TransactionStatus.UNKNOWN)}
)
_RETRY_MAX_DELAY = 1.0


def _normalize_isolation(value: str | None) -> str | None:
    if value is None:
        return None
    level = _ISOLATION_LEVELS.get(value.strip().lower())
    if level is None:
        raise TransactionError(
            f"unknown isolation level {value!r}; use one of: serializable, repeatable read, "
            "read committed, read uncommitted"
        )
    return level


class _NotDirect(Exception):
    """The statement needs SQLAlchemy's full execution path; nothing was done."""


class DbkitConnection(sa.Connection):
    """The connection handed out by ``db.transaction()``.

    While a dbkit block owns it, ending the transaction behind the block's back is refused:
    the block decides between COMMIT and ROLLBACK, and a stray ``commit()`` would leave it
    managing a transaction that no longer exists.
    """

    __slots__ = ("_dbkit_state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._dbkit_state: _State | None = None
        super().__init__(*args, **kwargs)

    def _refuse(self, what: str) -> None:
        if self._dbkit_state is not None:
            raise TransactionError(
                f"{what} is forbidden inside db.transaction(): the block commits or rolls "
                "back when it exits (raise an exception or call db.set_rollback(True) to "
                "roll back)"
            )

    def commit(self) -> None:
        if self._dbkit_state is not None:
            self._refuse("Connection.commit()")
        super().commit()

    def rollback(self) -> None:
        if self._dbkit_state is not None:
            self._refuse("Connection.rollback()")
        super().rollback()

    def begin(self) -> RootTransaction:
        if self._dbkit_state is not None:
            self._refuse("Connection.begin()")
        return super().begin()

    def close(self) -> None:
        if self._dbkit_state is not None:
            self._refuse("Connection.close()")
        super().close()

    # Set per engine (install_transaction_events makes a subclass): told about every
    # statement for metrics and the slow-query log.
    _dbkit_observer: StatementObserver | None = None

    def _run(self, method: Callable[..., R], statement: Any, *args: Any, **kwargs: Any) -> R:
        """Every statement passes here: the broken-transaction guard, timing, and noticing
        a statement that broke the block's transaction.  (Not events: a `before_execute`
        listener makes SQLAlchemy take its slower event path on every statement, and a
        `handle_error` one would keep statements off dbkit's driver path.)"""
        state = self._dbkit_state
        if (
            state is not None
            and (state.needs_rollback or state.failed_exc is not None)
            and not state.internal
        ):
            state.check_can_run()
        observer = self._dbkit_observer
        started = time.perf_counter()
        try:
            result = method(statement, *args, **kwargs)
        except Exception as error:
            if observer is not None:
                observer.observe(
                    time.perf_counter() - started, error, statement, args[:1], self.dialect
                )
            if state is not None:
                _notice_failure(state, self, error)
            raise
        if observer is not None:
            observer.observe(time.perf_counter() - started, None, statement, args[:1], self.dialect)
        return result

    def _execute_direct(self, statement: Any, parameters: Any) -> CursorResult[Any]:
        """``Connection.execute()`` of a statement with at most one parameter set, when no
        event listener, echo logging or execution option is in play: SQLAlchemy's own steps
        (compiled cache, execution context, DBAPI execute, result, error handling) without
        the dispatching around them that nothing listens to, and -- for a SELECT whose
        result metadata SQLAlchemy has cached -- without having the driver describe the
        columns again (psycopg builds new objects for that on every call).  Raises
        ``_NotDirect`` before doing anything when SQLAlchemy's full path is needed."""
        if (
            self._execution_options
            or self._has_events
            or self.engine._has_events
            or self._echo
            or self._trans_context_manager
            or not isinstance(statement, ClauseElement)
        ):
            raise _NotDirect
        elem: Any = statement
        if elem._execution_options or not (elem.is_select or elem.is_dml or elem._is_text_clause):
            raise _NotDirect
        conn = self._dbapi_connection
        dialect = self.dialect
        if (
            conn is None
            or dialect.bind_typing is BindTyping.SETINPUTSIZES
            or (
                dialect._has_events
                and (dialect.dispatch.do_execute or dialect.dispatch.do_execute_no_params)
            )
        ):
            raise _NotDirect
        if parameters is None:
            distilled: Any = ()
            keys: list[str] = []
        elif isinstance(parameters, dict):
            distilled = [parameters]
            keys = sorted(parameters)
        else:
            raise _NotDirect
        found = elem._compile_w_cache(
            dialect=dialect,
            compiled_cache=self.engine._compiled_cache,
            column_keys=keys,
            for_executemany=False,
            schema_translate_map=None,
            linting=dialect.compiler_linting | WARN_LINTING,
        )
        # SQLAlchemy 2.1 returns the parameters collected from a statement without a cache
        # key too; 2.0 three items.
        extra = {"param_dict": found[2]} if len(found) == 4 else {}
        compiled: Any = found[0]
        extracted, cache_hit = found[1], found[-1]
        try:
            context: Any = dialect.execution_ctx_cls._init_compiled(
                dialect,
                self,
                conn,
                self._execution_options,
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
            self._handle_dbapi_exception(error, str(compiled), distilled, None, None)
        transaction, nested = self._transaction, self._nested_transaction
        if (transaction is not None and not transaction.is_active) or (
            nested is not None and not nested.is_active
        ):
            self._invalid_transaction()
        if transaction is None:
            self._autobegin()
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
            self._handle_dbapi_exception(error, sql, values, cursor, context)
        return cast("CursorResult[Any]", result)

    if not TYPE_CHECKING:  # same signatures as sqlalchemy.Connection for type checkers

        def execute(self, statement, parameters=None, *, execution_options=None):
            if execution_options is None:
                return self._run(self._execute_or_fall_back, statement, parameters)
            return self._run(
                super().execute, statement, parameters, execution_options=execution_options
            )

        def _execute_or_fall_back(self, statement, parameters):
            try:
                return self._execute_direct(statement, parameters)
            except _NotDirect:
                return sa.Connection.execute(self, statement, parameters)

        def exec_driver_sql(self, statement, *args, **kwargs):
            return self._run(super().exec_driver_sql, statement, *args, **kwargs)

        def scalar(self, statement, parameters=None, *, execution_options=None):
            if execution_options is None:
                return self._run(self._scalar_or_fall_back, statement, parameters)
            return self._run(
                super().scalar, statement, parameters, execution_options=execution_options
            )

        def _scalar_or_fall_back(self, statement, parameters):
            try:
                result = self._execute_direct(statement, parameters)
            except _NotDirect:
                return sa.Connection.scalar(self, statement, parameters)
            return result.scalar()

        def scalars(self, statement, *args, **kwargs):
            # Connection.scalars() runs through self.execute: observed there.
            return super().scalars(statement, *args, **kwargs)


class _Block:
    """One entered ``with db.transaction()``: what its exit must undo."""

    __slots__ = ("owner", "restore_timeout", "savepoint", "was_readonly")

    def __init__(self, owner: Transaction, savepoint: str | None) -> None:
        self.owner = owner
        self.savepoint = savepoint
        # Set when the block changed statement_timeout: the value to put back on exit
        # (SET LOCAL inside a savepoint survives RELEASE).
        self.restore_timeout: str | None = None
        # Set when the block made the transaction read-only: the mode to go back to.
        self.was_readonly: bool | None = None


class _State:
    """A thread's ambient transaction on one Database."""

    __slots__ = (
        "blocks",
        "callbacks",
        "conn",
        "failed_exc",
        "internal",
        "isolation",
        "needs_rollback",
        "readonly",
        "rollback_exc",
        "root",
        "savepoint_counter",
        "savepoint_ids",
        "testing",
        "timeout",
    )

    def __init__(self) -> None:
        self.conn: DbkitConnection | None = None
        self.root: RootTransaction | None = None
        self.testing = False  # an outer fixture transaction (dbkit.testing) owns `conn`
        self.reset()

    def reset(self) -> None:
        self.blocks: list[_Block] = []
        self.savepoint_ids: list[str] = []
        self.savepoint_counter = 0
        # Marked for rollback; `rollback_exc` says why (None: explicit set_rollback(True)).
        self.needs_rollback = False
        self.rollback_exc: BaseException | None = None
        # A statement failed and the server aborted the transaction (or savepoint); only a
        # rollback to a savepoint taken before the failure can revive it.
        self.failed_exc: BaseException | None = None
        self.callbacks: list[tuple[tuple[str, ...], Callable[[], Any], bool]] = []
        self.internal = False  # dbkit's own SAVEPOINT/RELEASE/SET pass the broken guard
        self.isolation: str | None = None
        self.readonly = False
        self.timeout: str | None = None  # statement_timeout set by a block, as SQL text

    @property
    def cannot_commit(self) -> bool:
        return self.needs_rollback or self.failed_exc is not None

    @property
    def rollback_reason(self) -> BaseException | None:
        return self.rollback_exc or self.failed_exc

    def check_can_run(self) -> None:
        """Refuse a statement in a block that can no longer commit (Django's rule), chained
        from the error that broke it rather than PostgreSQL's bare 25P02."""
        if self.internal or not self.cannot_commit:
            return
        if self.rollback_reason is not None:
            raise TransactionBroken(
                "an error occurred earlier in this transaction block; no statement can run "
                "until the block ends (catch errors outside a nested db.transaction() to "
                "recover inside a transaction)"
            ) from self.rollback_reason
        raise TransactionBroken(
            "this transaction is marked for rollback (set_rollback(True)); no statement can "
            "run until the block ends"
        )

    @property
    def silent_rollback(self) -> bool:
        """The last word on the flag was an explicit set_rollback(True)."""
        return self.needs_rollback and self.rollback_exc is None


class Transaction:
    """``db.transaction(...)``: a context manager and decorator, re-enterable."""

    __slots__ = ("_manager", "durable", "isolation", "readonly", "retries", "savepoint", "timeout")

    def __init__(
        self,
        manager: TransactionManager,
        *,
        savepoint: bool = True,
        durable: bool = False,
        readonly: bool | None = None,
        isolation: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> None:
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise TransactionError(f"timeout must be a positive number of seconds, got {timeout}")
        if retries is not None and retries < 0:
            raise TransactionError(f"retries must be >= 0, got {retries}")
        self._manager = manager
        self.savepoint = savepoint
        self.durable = durable
        self.readonly = readonly
        self.isolation = _normalize_isolation(isolation)
        self.timeout = timeout
        self.retries = retries

    def __enter__(self) -> DbkitConnection:
        if self.retries:
            raise TransactionError(
                "retries need a body that can run again: use @db.transaction(retries=N) on "
                "a function, or db.run_in_transaction(fn, retries=N), not a `with` block"
            )
        return self._manager.enter(self)

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._manager.exit(self, exc)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        manager = self

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if manager.retries:
                return manager._manager.run(
                    lambda _conn: func(*args, **kwargs),
                    retries=manager.retries,
                    options=manager._options(),
                )
            with manager:
                return func(*args, **kwargs)

        return wrapper

    def _options(self) -> dict[str, Any]:
        return {
            "savepoint": self.savepoint,
            "durable": self.durable,
            "readonly": self.readonly,
            "isolation": self.isolation,
            "timeout": self.timeout,
        }


class TransactionManager:
    """Owns the per-thread transaction state of one ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._local = threading.local()

    # -- state ---------------------------------------------------------------------------

    def _state(self) -> _State:
        try:
            state: _State = self._local.state
        except AttributeError:
            state = self._local.state = _State()
        return state

    def connection(self) -> DbkitConnection | None:
        """This thread's ambient connection, or None outside any block."""
        state = getattr(self._local, "state", None)
        return None if state is None else state.conn

    def in_transaction(self) -> bool:
        return self.connection() is not None

    def _require_block(self, what: str) -> _State:
        state = self._state()
        if not state.blocks:
            raise TransactionError(f"{what} only works inside a db.transaction() block")
        return state

    def get_rollback(self) -> bool:
        return self._require_block("get_rollback()").needs_rollback

    def set_rollback(self, rollback: bool) -> None:
        """Mark (or unmark) the innermost transaction for rollback.  This is the last word on
        the flag, so a later normal exit rolls back silently; it cannot, however, revive a
        transaction in which a statement failed."""
        state = self._require_block("set_rollback()")
        state.needs_rollback = bool(rollback)
        state.rollback_exc = None

    def on_commit(self, func: Callable[[], Any], robust: bool = False) -> None:
        if not callable(func):
            raise TypeError("on_commit()'s callback must be a callable")
        state = self._state()
        if state.conn is None or (state.testing and not state.blocks):
            run_on_commit_callback(func, robust)
        else:
            state.callbacks.append((tuple(state.savepoint_ids), func, robust))

    # -- enter -----------------------------------------------------------------------------

    def enter(self, tx: Transaction) -> DbkitConnection:
        state = self._state()
        conn = state.conn
        if conn is not None:
            self._begin_nested(state, tx)
            return conn
        conn, root = self._begin(state, tx)
        block = _Block(tx, None)
        state.blocks.append(block)
        try:
            if tx.timeout is not None:
                self._set_timeout(state, block, tx.timeout)
        except BaseException:
            _quiet_rollback(root, conn)
            self._release(state)
            raise
        return conn

    def _begin(self, state: _State, tx: Transaction) -> tuple[DbkitConnection, RootTransaction]:
        conn = self._db.checkout()
        assert isinstance(conn, DbkitConnection)
        try:
            driver = conn.connection.driver_connection
            # BEGIN goes out now, its answer is read with the first statement's: the round
            # trip overlaps with the Python work in between (see DbkitPgConnection).
            if not (
                isinstance(driver, DbkitPgConnection)
                and driver.send_begin(tx.isolation, tx.readonly)
            ):
                options: dict[str, Any] = {}
                if tx.isolation is not None:
                    options["isolation_level"] = tx.isolation
                if tx.readonly is not None:
                    # psycopg sends BEGIN READ ONLY / BEGIN ISOLATION LEVEL …: no extra trip.
                    options["postgresql_readonly"] = tx.readonly
                if options:
                    conn.execution_options(**options)
            root = conn.begin()
        except BaseException:
            conn.close()
            raise
        state.conn = conn
        state.root = root
        state.isolation = tx.isolation
        state.readonly = bool(tx.readonly)
        conn._dbkit_state = state
        return conn, root

    def _begin_nested(self, state: _State, tx: Transaction) -> _Block:
        app_outermost = state.testing and not state.blocks
        if app_outermost:
            # The fixture's outer transaction stands in for the server; this block is the
            # application's outermost one, so it takes the outermost options.
            state.isolation = tx.isolation
            state.readonly = False
        elif tx.durable:
            raise TransactionError(
                "a durable transaction block cannot be nested within another transaction block"
            )
        if tx.isolation is not None and tx.isolation != self._isolation_of(state):
            raise TransactionError(
                f"isolation {tx.isolation!r} differs from the enclosing transaction's "
                f"({self._isolation_of(state)!r}); isolation can only be set on the "
                "outermost block"
            )
        if tx.readonly is False and state.readonly:
            raise TransactionError("a read-write block cannot be nested in a read-only block")
        make_readonly = bool(tx.readonly) and not state.readonly
        if state.cannot_commit and (make_readonly or tx.timeout is not None):
            # Both need a statement, and none can run until the broken block ends.
            raise TransactionBroken(
                "cannot open a read-only or timed block: an error occurred earlier in this "
                "transaction block and no statement can run until it ends"
            ) from state.rollback_reason
        if make_readonly and not tx.savepoint:
            raise TransactionError(
                "readonly=True in a nested block needs a savepoint (savepoint=True)"
            )
        savepoint = None
        if tx.savepoint and not state.cannot_commit:
            state.savepoint_counter += 1
            savepoint = f"dbkit_sp_{state.savepoint_counter}"
            self._internal(state, f"SAVEPOINT {savepoint}")
            state.savepoint_ids.append(savepoint)
        block = _Block(tx, savepoint)
        state.blocks.append(block)
        try:
            if make_readonly:
                # Reverted by PostgreSQL itself when the savepoint is released or rolled back.
                self._internal(state, "SET TRANSACTION READ ONLY")
                block.was_readonly = state.readonly
                state.readonly = True
            if tx.timeout is not None:
                self._set_timeout(state, block, tx.timeout)
        except BaseException as error:
            # Never leave a half-opened block behind: its `with` will not exit it.
            state.blocks.pop()
            if block.was_readonly is not None:
                state.readonly = block.was_readonly
            if savepoint is not None:
                self._rollback_savepoint(state, savepoint, error)
            raise
        return block

    def _isolation_of(self, state: _State) -> str:
        if state.isolation is not None:
            return state.isolation
        assert state.conn is not None
        default = state.conn.dialect.default_isolation_level or "READ COMMITTED"
        return default.replace("_", " ").upper()

    def _set_timeout(self, state: _State, block: _Block, timeout: float) -> None:
        block.restore_timeout = state.timeout or "DEFAULT"
        value = f"'{max(1, round(timeout * 1000))}ms'"
        self._internal(state, f"SET LOCAL statement_timeout = {value}")
        state.timeout = value

    def _internal(self, state: _State, sql: str) -> None:
        """Run dbkit's own transaction-control statement past the broken-transaction guard."""
        assert state.conn is not None
        state.internal = True
        try:
            state.conn.exec_driver_sql(sql)
        finally:
            state.internal = False

    # -- exit ------------------------------------------------------------------------------

    def exit(self, tx: Transaction, exc: BaseException | None) -> None:
        state = self._state()
        if not state.blocks or state.blocks[-1].owner is not tx:
            raise TransactionError("transaction blocks exited out of order")
        block = state.blocks.pop()
        if block.was_readonly is not None:
            state.readonly = block.was_readonly
        if exc is None and not state.cannot_commit and _server_aborted(state.conn):
            # A statement failed where dbkit could not see it (e.g. on the raw driver
            # connection) and PostgreSQL aborted the transaction: never try to commit it.
            state.failed_exc = TransactionError(
                "a statement failed outside dbkit's view; PostgreSQL reports the transaction "
                "as aborted"
            )
            state.needs_rollback = True
            state.rollback_exc = state.failed_exc
        if state.blocks or state.testing:
            self._exit_nested(state, block, exc)
            return
        try:
            self._exit_outermost(state, exc)
        except Exception as error:
            retryable = _as_retryable(error)
            if retryable is None:
                raise
            raise retryable from error
        if isinstance(exc, Exception):
            retryable = _as_retryable(exc)
            if retryable is not None:
                raise retryable from exc

    def _exit_nested(self, state: _State, block: _Block, exc: BaseException | None) -> None:
        if exc is None and not state.cannot_commit:
            if block.savepoint is not None:
                try:
                    self._internal(state, f"RELEASE SAVEPOINT {block.savepoint}")
                except sa_exc.DBAPIError as error:
                    # Django's rule: fall back to ROLLBACK TO + RELEASE; if even that
                    # fails, the enclosing transaction is beyond repair.
                    self._rollback_savepoint(state, block.savepoint, error)
                    raise
                state.savepoint_ids.pop()
            self._restore_timeout(state, block)
            return

        if block.savepoint is None:
            # No savepoint of its own: the failure belongs to the enclosing block.
            state.needs_rollback = True
            if exc is not None and state.rollback_exc is None:
                state.rollback_exc = exc
            return

        silent = exc is None and state.silent_rollback
        reason = state.rollback_reason
        if self._rollback_savepoint(state, block.savepoint, exc):
            self._restore_timeout(state, block)
        if not silent and exc is None:
            raise TransactionRolledBack(
                "the transaction block was rolled back to its savepoint because an error "
                "marked it for rollback; its work was not saved"
            ) from reason

    def _rollback_savepoint(
        self, state: _State, savepoint: str, cause: BaseException | None
    ) -> bool:
        """ROLLBACK TO + RELEASE (a rolled-back savepoint must not linger, Django #23074).
        Returns whether the transaction is healthy again."""
        try:
            self._internal(state, f"ROLLBACK TO SAVEPOINT {savepoint}")
            self._internal(state, f"RELEASE SAVEPOINT {savepoint}")
        except sa_exc.DBAPIError as error:
            state.needs_rollback = True
            if state.rollback_exc is None:
                state.rollback_exc = cause or error
            healthy = False
        else:
            state.needs_rollback = False
            state.rollback_exc = None
            state.failed_exc = None
            healthy = True
        # Callbacks registered under this savepoint (or deeper, released ones) go with it.
        state.callbacks = [c for c in state.callbacks if savepoint not in c[0]]
        if savepoint in state.savepoint_ids:
            del state.savepoint_ids[state.savepoint_ids.index(savepoint) :]
        return healthy

    def _restore_timeout(self, state: _State, block: _Block) -> None:
        if block.restore_timeout is not None and not state.cannot_commit:
            self._internal(state, f"SET LOCAL statement_timeout = {block.restore_timeout}")
            state.timeout = None if block.restore_timeout == "DEFAULT" else block.restore_timeout

    def _exit_outermost(self, state: _State, exc: BaseException | None) -> None:
        conn, root = state.conn, state.root
        assert conn is not None and root is not None
        callbacks: list[tuple[tuple[str, ...], Callable[[], Any], bool]] = []
        try:
            if exc is None and not state.cannot_commit:
                self._commit(state, root)
                self._db._queries.transaction("committed")
                callbacks = state.callbacks
            else:
                self._db._queries.transaction("rolled_back")
                silent = state.silent_rollback
                reason = state.rollback_reason
                _quiet_rollback(root, conn)
                if exc is None and not silent:
                    raise TransactionRolledBack(
                        "the transaction was rolled back because an error marked it for "
                        "rollback; nothing was committed"
                    ) from reason
        finally:
            self._release(state)
        for _, func, robust in callbacks:
            run_on_commit_callback(func, robust)

    def _commit(self, state: _State, root: RootTransaction) -> None:
        assert state.conn is not None
        conn = state.conn
        state.internal = True
        try:
            root.commit()
        except sa_exc.DBAPIError as error:
            _quiet_rollback(root, conn)
            if error.connection_invalidated:
                # COMMIT may or may not have reached the server: never guess, never retry.
                raise TransactionError(
                    "the connection was lost during COMMIT; whether the transaction "
                    "committed is unknown"
                ) from error
            raise
        finally:
            state.internal = False

    def _release(self, state: _State) -> None:
        conn = state.conn
        state.conn = None
        state.root = None
        state.reset()
        if conn is not None:
            conn._dbkit_state = None
            conn.close()

    # -- retries ---------------------------------------------------------------------------

    def run(
        self,
        func: Callable[[DbkitConnection], R],
        *,
        retries: int,
        options: dict[str, Any],
    ) -> R:
        """Run ``func(conn)`` in an outermost transaction, re-running the whole transaction
        on serialization failure, deadlock, or a connection lost before COMMIT."""
        state = self._state()
        # Under dbkit.testing's outer transaction the application's outermost block is a
        # savepoint: a retry rolls back to it and runs the whole block again.
        if state.conn is not None and not (state.testing and not state.blocks):
            raise TransactionError(
                "a retried transaction must be the outermost one: re-running it inside an "
                "open transaction would repeat only part of the work"
            )
        attempt = 0
        while True:
            try:
                with Transaction(self, **options) as conn:
                    result = func(conn)
                return result
            except Exception as error:
                if not _worth_retrying(error):
                    raise
                if attempt >= retries:
                    cause = error.__cause__ if isinstance(error, RetryableError) else error
                    raise RetryableError(
                        f"transaction failed {attempt + 1} time(s) with a retryable error "
                        f"({sqlstate_of(error) or type(cause).__name__}); giving up"
                    ) from cause
                attempt += 1
                self._db._queries.transaction("retried")
                delay = min(_RETRY_MAX_DELAY, _RETRY_BASE_DELAY * 2**attempt)
                delay = random.uniform(delay / 2, delay)
                logger.bind(attempt=attempt, sqlstate=sqlstate_of(error)).info(
                    "retrying transaction (attempt {}) in {:.3f}s after {}",
                    attempt,
                    delay,
                    type(error).__name__,
                )
                time.sleep(delay)

    # -- testing support -------------------------------------------------------------------

    def in_test_transaction(self) -> bool:
        """Whether this thread runs inside a test fixture's adopted transaction."""
        state = getattr(self._local, "state", None)
        return state is not None and state.testing

    def open_blocks(self) -> int:
        """How many ``db.transaction()`` blocks this thread has entered and not exited."""
        state = getattr(self._local, "state", None)
        return 0 if state is None else len(state.blocks)

    def queued_on_commit(self) -> list[tuple[tuple[str, ...], Callable[[], Any], bool]]:
        """This thread's queued on_commit entries ``(savepoint ids, func, robust)``, oldest
        first: a copy of the list, whose entries are stable objects (compare with ``is``)."""
        state = getattr(self._local, "state", None)
        return [] if state is None else list(state.callbacks)

    @contextmanager
    def adopt(self, conn: DbkitConnection) -> Iterator[None]:
        """Make ``conn`` (with a transaction already begun by a test fixture) this thread's
        ambient connection: every block inside runs as a savepoint, durable ones included,
        and the fixture rolls everything back at the end."""
        state = self._state()
        if state.conn is not None:
            raise TransactionError("a transaction is already open in this thread")
        state.conn = conn
        state.testing = True
        conn._dbkit_state = state
        try:
            yield
        finally:
            conn._dbkit_state = None
            state.conn = None
            state.testing = False
            state.reset()


def _notice_failure(state: _State, conn: sa.Connection, error: BaseException) -> None:
    """A statement failed inside a block: when it broke the transaction (PostgreSQL aborted
    it, or the connection is gone), no further statement of the block may run."""
    if isinstance(error, TransactionError):
        return
    disconnect = isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
    if disconnect or _server_aborted(conn):
        if state.failed_exc is None:
            state.failed_exc = error
        state.needs_rollback = True
        if state.rollback_exc is None:
            state.rollback_exc = error


def _server_aborted(conn: sa.Connection | None) -> bool:
    """What libpq knows about the server's transaction: INERROR after any failed statement,
    even one whose error was swallowed outside dbkit's view."""
    if conn is None:
        return True
    try:
        dbapi = conn.connection.dbapi_connection
    except sa_exc.SQLAlchemyError:
        return True
    if dbapi is None:
        return True
    # pgconn's plain int, not `info.transaction_status`, which builds two objects per call.
    return dbapi.pgconn.transaction_status in _ABORTED


def _quiet_rollback(root: RootTransaction, conn: sa.Connection) -> None:
    """Roll back without letting a second failure (dead connection) hide the first."""
    try:
        if root.is_active:
            root.rollback()
    except Exception as error:  # the connection is unusable: drop it rather than reuse it
        logger.opt(exception=error).warning("rollback failed; discarding the connection")
        with contextlib.suppress(Exception):
            conn.invalidate()


def run_on_commit_callback(func: Callable[[], Any], robust: bool) -> None:
    """Run one on_commit callback as after a real commit (robust: log a failure)."""
    if not robust:
        func()
        return
    try:
        func()
    except Exception as error:
        name = getattr(func, "__qualname__", repr(func))
        logger.opt(exception=error).error("on_commit callback {} failed", name)


def _as_retryable(error: Exception) -> RetryableError | None:
    """The whole transaction was rolled back for a reason that running it again may cure:
    say so in dbkit's terms (the driver's error stays attached as ``__cause__``)."""
    if isinstance(error, DbkitError) or not _worth_retrying(error):
        return None
    state = sqlstate_of(error)
    what = {"40001": "serialization failure", "40P01": "deadlock"}.get(
        state or "", "connection lost before COMMIT"
    )
    return RetryableError(
        f"{what}{f' ({state})' if state else ''}: the transaction was rolled back and can be "
        "run again (db.run_in_transaction(fn, retries=N) or @db.transaction(retries=N))"
    )


def _worth_retrying(error: BaseException) -> bool:
    if sqlstate_of(error) in _RETRY_SQLSTATES:
        return True
    if isinstance(error, CircuitOpenError) or (
        isinstance(error, ConnectError) and is_transient(error)
    ):
        # No connection was had, so nothing was sent: the server is restarting or busy.
        return True
    # A connection lost before COMMIT was sent: the server rolled the work back.
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, sa_exc.DBAPIError):
            return bool(cause.connection_invalidated)
        if isinstance(cause, TransactionError) and not isinstance(cause, TransactionRolledBack):
            return False
        cause = cause.__cause__
    return False


def install_transaction_events(engine: Engine, observer: StatementObserver | None = None) -> None:
    """Hand out DbkitConnections (whose statements notice failures inside a block)."""
    engine._connection_cls = type(
        "DbkitConnection", (DbkitConnection,), {"__slots__": (), "_dbkit_observer": observer}
    )
