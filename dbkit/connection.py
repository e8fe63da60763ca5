"""``DbkitConnection``: the SQLAlchemy connection a ``db.transaction()`` block hands out.

Two things ride on it: the block's ``guard`` (refuse statements in a block that can no
longer commit, notice a statement that broke it) and the Database's statement
``observer`` (metrics, slow-query log).  Both are checked inside ``execute`` itself, not
from events: a ``before_execute`` listener makes SQLAlchemy take its slower event path on
every statement, and a ``handle_error`` one would keep statements off the driver path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg
import sqlalchemy as sa
from loguru import logger
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import RootTransaction

from dbkit.errors import TransactionError
from dbkit.fastpath.sqlalchemy import Declined, execute_direct
from dbkit.metrics import StatementObserver

__all__ = [
    "BlockGuard",
    "DbkitConnection",
    "connection_class",
    "rollback_quietly",
    "server_aborted",
]

R = TypeVar("R")


class BlockGuard(Protocol):
    """What a transaction block needs to hear from its connection."""

    def check_can_run(self) -> None:
        """Raise ``TransactionBroken`` when the block can no longer run statements."""

    def statement_failed(self, conn: sa.Connection, error: BaseException) -> None:
        """A statement failed: the block may be broken now."""


class DbkitConnection(sa.Connection):
    """While a dbkit block owns it (``guard`` is set), ending the transaction behind the
    block's back is refused: the block decides between COMMIT and ROLLBACK, and a stray
    ``commit()`` would leave it managing a transaction that no longer exists."""

    __slots__ = ("guard",)

    # Set per engine by connection_class().
    observer: StatementObserver | None = None
    fast = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.guard: BlockGuard | None = None
        super().__init__(*args, **kwargs)

    def _refuse(self, what: str) -> None:
        raise TransactionError(
            f"{what} is forbidden inside db.transaction(): the block commits or rolls "
            "back when it exits (raise an exception or call db.set_rollback(True) to "
            "roll back)"
        )

    def commit(self) -> None:
        if self.guard is not None:
            self._refuse("Connection.commit()")
        super().commit()

    def rollback(self) -> None:
        if self.guard is not None:
            self._refuse("Connection.rollback()")
        super().rollback()

    def begin(self) -> RootTransaction:
        if self.guard is not None:
            self._refuse("Connection.begin()")
        return super().begin()

    def close(self) -> None:
        if self.guard is not None:
            self._refuse("Connection.close()")
        super().close()

    def send_commands(self, commands: Sequence[str]) -> None:
        """dbkit's own transaction control (SAVEPOINT, RELEASE, SET LOCAL …) in one round
        trip, past the block's guard; observed like any statement."""
        sql = "; ".join(commands)
        self._observed(super().exec_driver_sql, sql)

    def _observed(self, method: Callable[..., R], statement: Any, *args: Any) -> R:
        observer = self.observer
        if observer is None:
            return method(statement, *args)
        return observer.run(method, statement, args[:1], self.dialect, statement, *args)

    def _guarded(self, method: Callable[..., R], statement: Any, *args: Any) -> R:
        """Every statement of the application passes here (the hot path: kept flat)."""
        guard = self.guard
        if guard is not None:
            guard.check_can_run()
        observer = self.observer
        try:
            if observer is None:
                return method(statement, *args)
            return observer.run(method, statement, args[:1], self.dialect, statement, *args)
        except Exception as error:
            if guard is not None:
                guard.statement_failed(self, error)
            raise

    if not TYPE_CHECKING:  # same signatures as sqlalchemy.Connection for type checkers

        def execute(self, statement, parameters=None, *, execution_options=None):
            if execution_options is None:
                if self.fast:
                    return self._guarded(self._execute_fast, statement, parameters)
                return self._guarded(super().execute, statement, parameters)
            return self._guarded(
                lambda s, p: sa.Connection.execute(self, s, p, execution_options=execution_options),
                statement,
                parameters,
            )

        def _execute_fast(self, statement, parameters):
            try:
                return execute_direct(self, statement, parameters)
            except Declined:
                return sa.Connection.execute(self, statement, parameters)

        def exec_driver_sql(self, statement, *args, **kwargs):
            return self._guarded(
                lambda s, *a: sa.Connection.exec_driver_sql(self, s, *a, **kwargs), statement, *args
            )

        def scalar(self, statement, parameters=None, *, execution_options=None):
            # Observed as the statement it runs: reading a scalar of a result without rows
            # (ResourceClosedError) is the caller's mistake, not a failed statement.
            return self.execute(statement, parameters, execution_options=execution_options).scalar()


def connection_class(observer: StatementObserver | None, fast: bool) -> type[DbkitConnection]:
    """A ``DbkitConnection`` class for one engine: its observer, and whether statements may
    take the fast path (``dbkit.fastpath.sqlalchemy.execute_direct``).  Made with
    ``cls(engine)``, as ``Engine.connect()`` makes its connections."""
    return type(
        "DbkitConnection", (DbkitConnection,), {"__slots__": (), "observer": observer, "fast": fast}
    )


_ABORTED = frozenset(
    {int(psycopg.pq.TransactionStatus.INERROR), int(psycopg.pq.TransactionStatus.UNKNOWN)}
)


def server_aborted(conn: sa.Connection | None) -> bool:
    """What libpq knows about the server's transaction: INERROR after any failed statement,
    even one whose error was swallowed outside dbkit's view; True for a lost connection."""
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


def rollback_quietly(transaction: sa.engine.Transaction | None, conn: sa.Connection) -> None:
    """Roll back without letting a second failure (a dead connection) hide the first: a
    connection that cannot even roll back is discarded instead of going back to the pool."""
    try:
        if transaction is not None and transaction.is_active:
            transaction.rollback()
    except Exception as error:
        logger.opt(exception=error).warning("rollback failed; discarding the connection")
        with contextlib.suppress(Exception):
            conn.invalidate()
