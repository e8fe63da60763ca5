"""``Transaction`` (what ``db.transaction()`` returns) and ``TransactionManager``, which
carries out the plans of ``TransactionState`` on a pooled connection.  See the package
docstring for the algorithm."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import psycopg
import sqlalchemy as sa
from loguru import logger
from sqlalchemy import exc as sa_exc

from dbkit.connection import DbkitConnection, rollback_quietly, server_aborted
from dbkit.errors import (
    TransactionError,
    TransactionRolledBack,
    translate,
)
from dbkit.fastpath.psycopg import PgConnection
from dbkit.retrying import RetryPolicy
from dbkit.stats import QueryCounters
from dbkit.transaction.integration import IntegrationHooks
from dbkit.transaction.options import TransactionOptions
from dbkit.transaction.outcome import Outcome, settle_lost_commit
from dbkit.transaction.retry import as_retryable, run_with_retries, server_became_read_only
from dbkit.transaction.state import Block, Callback, TransactionState
from dbkit.xact import XactConnection

__all__ = ["Transaction", "TransactionManager", "run_on_commit_callback"]

P = ParamSpec("P")
R = TypeVar("R")


class Transaction:
    """``db.transaction(...)``: a context manager and decorator, re-enterable (all state
    lives in the thread's ``TransactionState``, none here)."""

    __slots__ = ("_manager", "options", "retries", "retry_timeout")

    def __init__(
        self,
        manager: TransactionManager,
        options: TransactionOptions | None = None,
        retries: int | None = None,
        retry_timeout: float | None = None,
    ) -> None:
        check_retries(retries, retry_timeout)
        self._manager = manager
        self.options = options or TransactionOptions()
        self.retries = retries
        self.retry_timeout = retry_timeout

    @property
    def retried(self) -> bool:
        return bool(self.retries) or self.retry_timeout is not None

    # The options as attributes, as before TransactionOptions held them.
    savepoint = property(lambda self: self.options.savepoint)
    durable = property(lambda self: self.options.durable)
    readonly = property(lambda self: self.options.readonly)
    isolation = property(lambda self: self.options.isolation)
    timeout = property(lambda self: self.options.timeout)

    def __enter__(self) -> DbkitConnection:
        if self.retried:
            raise TransactionError(
                "retries need a body that can run again: use @db.transaction(retries=N) on "
                "a function, or db.run_in_transaction(fn, retries=N), not a `with` block"
            )
        return self._manager.enter(self)

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._manager.exit(self, exc)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        outer = self

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if outer.retried:
                return outer._manager.run(
                    lambda _conn: func(*args, **kwargs),
                    retries=outer.retries,
                    options=outer.options,
                    retry_timeout=outer.retry_timeout,
                )
            with outer:
                return func(*args, **kwargs)

        return wrapper


def check_retries(retries: int | None, retry_timeout: float | None) -> None:
    if retries is not None and retries < 0:
        raise TransactionError(f"retries must be >= 0, got {retries}")
    if retry_timeout is not None and not (math.isfinite(retry_timeout) and retry_timeout > 0):
        raise TransactionError(
            f"retry_timeout must be a positive number of seconds, got {retry_timeout}"
        )


class _Thread(TransactionState):
    """A thread's state plus the connection and root transaction it runs on; also the
    guard of that connection (``BlockGuard``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: DbkitConnection | None = None
        self.root: sa.RootTransaction | None = None
        # The driver connection noting the transaction's writes (commit outcome), if any.
        self.xact: XactConnection | None = None
        # The connection must not go back to the pool (its server became read-only).
        self.discard = False

    def statement_failed(self, conn: sa.Connection, error: BaseException) -> None:
        """A statement on ``conn`` failed: when it broke the transaction (PostgreSQL
        aborted it, or the connection is gone), no further statement may run."""
        if isinstance(error, TransactionError):
            return
        disconnect = isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
        if disconnect or server_aborted(conn):
            self.aborted_by(error)


class TransactionManager(IntegrationHooks):
    """Owns the per-thread transaction state of one ``Database``."""

    def __init__(
        self,
        checkout: Callable[[TransactionOptions], DbkitConnection],
        queries: QueryCounters,
        *,
        policy: RetryPolicy | None = None,
        resolve: Callable[[int], Outcome | None] | None = None,
        check_settings: Callable[[Mapping[str, Any]], None] | None = None,
        committed: Callable[[bool], None] | None = None,
    ) -> None:
        """``checkout(options)``: a connection for an outermost block.  ``policy``: outage
        waits of ``retries=`` runs.  ``resolve(xid)``: what became of a lost COMMIT (None:
        off).  ``check_settings``: raises for ``settings=`` the server would refuse.
        ``committed(wrote)``: told after each read-write transaction commits."""
        self._check_settings = check_settings
        self._committed = committed
        self._checkout = checkout
        self._queries = queries
        self._policy = policy or RetryPolicy()
        self._resolve = resolve
        self._local = threading.local()
        _managers.add(self)

    def forget_inherited(self) -> None:
        """In a forked child: the parent's open transactions are not this process's.  Their
        state (and connections, whose sockets are the parent's) is kept referenced but
        unused: collecting a connection would roll back on the parent's socket."""
        _inherited.append(self._local)
        self._local = threading.local()

    def _state(self) -> _Thread:
        try:
            state: _Thread = self._local.state
        except AttributeError:
            state = self._local.state = _Thread()
        return state

    # -- questions and flags ---------------------------------------------------------------

    def connection(self) -> DbkitConnection | None:
        """This thread's ambient connection, or None outside any block."""
        state = getattr(self._local, "state", None)
        return None if state is None else state.conn

    def in_transaction(self) -> bool:
        return self.connection() is not None

    def _require_block(self, what: str) -> _Thread:
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
        state.set_rollback(bool(rollback), aborted=not rollback and server_aborted(state.conn))

    def on_commit(self, func: Callable[[], Any], robust: bool = False) -> None:
        if not callable(func):
            raise TypeError("on_commit()'s callback must be a callable")
        state = self._state()
        if state.conn is None or (state.testing and not state.blocks):
            run_on_commit_callback(func, robust)
        else:
            state.register(func, robust)

    # -- enter -----------------------------------------------------------------------------

    def enter(self, tx: Transaction) -> DbkitConnection:
        if tx.options.settings and self._check_settings is not None:
            self._check_settings(tx.options.settings)  # before any SQL of the block
        state = self._state()
        conn = state.conn
        if conn is None:
            return self._begin(state, tx)
        commands = state.enter_nested(tx, tx.options)
        if commands:
            try:
                conn.send_commands(commands)
            except BaseException:
                # Never leave a half-opened block behind: its `with` will not exit it.
                self._undo(state, state.undo_enter(state.blocks[-1]), None)
                raise
        return conn

    def _begin(self, state: _Thread, tx: Transaction) -> DbkitConnection:
        options = tx.options
        conn = self._checkout(options)
        commands = state.begin(tx, options)
        try:
            driver = conn.connection.driver_connection
            # A read-only transaction has nothing to resolve if its COMMIT is lost.
            if self._resolve and isinstance(driver, XactConnection) and not options.readonly:
                driver.begin_tracking()
                state.xact = driver
            # The BEGIN (and the block's SET LOCAL) go out now, their answer is read with
            # the first statement's: the round trip overlaps with the Python work between.
            sent = isinstance(driver, PgConnection) and driver.send_begin(
                options.isolation, options.readonly, commands
            )
            if not sent:
                settings: dict[str, Any] = {}
                if options.isolation is not None:
                    settings["isolation_level"] = options.isolation
                if options.readonly is not None:
                    # psycopg sends BEGIN READ ONLY / BEGIN ISOLATION LEVEL …: no extra trip.
                    settings["postgresql_readonly"] = options.readonly
                if settings:
                    conn.execution_options(**settings)
            root = conn.begin()
            state.conn, state.root = conn, root
            state.server_isolation = conn.dialect.default_isolation_level or "READ COMMITTED"
            conn.guard = state
            if commands and not sent:
                conn.send_commands(commands)
        except BaseException:
            if state.root is not None:
                rollback_quietly(state.root, conn)
            self._release(state, conn)
            raise
        return conn

    # -- exit ------------------------------------------------------------------------------

    def exit(self, tx: Transaction, exc: BaseException | None) -> None:
        state = self._state()
        block = state.pop(tx, exc)
        if exc is None and state.can_commit and server_aborted(state.conn):
            # A statement failed where dbkit could not see it (e.g. on the raw driver
            # connection) and PostgreSQL aborted the transaction: never try to commit it.
            state.aborted_by(
                TransactionError(
                    "a statement failed outside dbkit's view; PostgreSQL reports the "
                    "transaction as aborted"
                )
            )
        if state.blocks or state.testing:
            self._exit_nested(state, block, exc)
            return
        read_only = server_became_read_only(exc, block.options, state.refused_as_read_only)
        if read_only:
            # A write refused by a server that is now read-only (a standby after a
            # failover): this connection must not be reused, and the work may run again.
            state.discard = True
        try:
            self._exit_outermost(state, exc)
        except Exception as error:
            retryable = as_retryable(error)
            if retryable is None:
                raise
            raise retryable from error
        if isinstance(exc, Exception):
            retryable = as_retryable(exc, read_only_server=read_only)
            if retryable is not None:
                raise retryable from exc

    def _exit_nested(self, state: _Thread, block: Block, exc: BaseException | None) -> None:
        plan = state.exit_nested(block, exc)
        if plan.rolls_back is not None:
            self._undo(state, plan, exc)
        elif plan.commands:
            assert state.conn is not None
            try:
                state.conn.send_commands(plan.commands)
            except sa_exc.DBAPIError as error:
                # Django's rule: a failed RELEASE falls back to ROLLBACK TO + RELEASE; if
                # even that fails, the enclosing transaction is beyond repair.
                if block.savepoint is not None:
                    self._undo(state, state.exit_nested(block, error), error)
                raise
        if plan.rolled_back:
            raise TransactionRolledBack(
                "the transaction block was rolled back to its savepoint because an error "
                "marked it for rollback; its work was not saved"
            ) from plan.cause

    def _undo(self, state: _Thread, plan: Any, cause: BaseException | None) -> None:
        """Send a plan's ROLLBACK TO + RELEASE and record how it went."""
        savepoint = plan.rolls_back
        if savepoint is None:
            return
        assert state.conn is not None
        try:
            state.conn.send_commands(plan.commands)
        except (sa_exc.DBAPIError, sa_exc.PendingRollbackError) as error:
            # PendingRollbackError: the connection was lost (and invalidated) under the
            # block, so the error that left the block is the one to report.
            state.rollback_to_failed(savepoint, plan.cause or cause, error)
        else:
            state.rolled_back_to(savepoint)

    def _exit_outermost(self, state: _Thread, exc: BaseException | None) -> None:
        conn, root = state.conn, state.root
        assert conn is not None and root is not None
        plan = state.exit_outermost(exc)
        callbacks: list[Callback] = []
        try:
            if plan.commands == ["COMMIT"]:
                self._commit(state, conn, root)
                self._queries.transaction("committed")
                if self._committed is not None and not state.readonly:
                    self._committed(state.xact is None or state.xact.xact_wrote)
                callbacks = state.callbacks
            else:
                self._queries.transaction("rolled_back")
                rollback_quietly(root, conn)
                if plan.rolled_back:
                    raise TransactionRolledBack(
                        "the transaction was rolled back because an error marked it for "
                        "rollback; nothing was committed"
                    ) from plan.cause
        finally:
            self._release(state, conn)
        for _, func, robust in callbacks:
            run_on_commit_callback(func, robust)

    def _commit(self, state: _Thread, conn: DbkitConnection, root: sa.RootTransaction) -> None:
        xact = state.xact
        if xact is not None:
            try:
                # The transaction's id must be in hand before COMMIT leaves.
                xact.settle_transaction_id()
            except psycopg.Error as error:
                rollback_quietly(root, conn)
                if not xact.broken and not xact.closed:
                    raise
                conn.invalidate(error)
                # As SQLAlchemy reports a connection lost under a statement.
                lost = sa_exc.DBAPIError.instance(
                    None, None, error, psycopg.Error, connection_invalidated=True
                )
                lost.__cause__ = error
                retryable = as_retryable(lost)
                if retryable is None:  # (a lost connection always is)
                    raise lost from error
                raise retryable from lost
        try:
            root.commit()
        except sa_exc.DBAPIError as error:
            rollback_quietly(root, conn)
            if error.connection_invalidated:
                # Returns when it committed.
                settle_lost_commit(self._resolve, xact, error, readonly=state.readonly)
                return
            # A deferred constraint checked at COMMIT: dbkit's IntegrityError, as for the
            # statement that would have failed without the deferral.
            translated = translate(error)
            if translated is error:
                raise
            raise translated from error

    def _release(self, state: _Thread, conn: DbkitConnection) -> None:
        xact, discard = state.xact, state.discard
        state.conn = state.root = state.xact = None
        state.discard = False
        state.reset()
        conn.guard = None
        if xact is not None:
            xact.stop_tracking()
        if discard:
            conn.invalidate()
        conn.close()

    # -- retries ---------------------------------------------------------------------------

    def run(
        self,
        func: Callable[[DbkitConnection], R],
        *,
        retries: int | None,
        options: TransactionOptions,
        retry_timeout: float | None = None,
    ) -> R:
        """Run ``func(conn)`` in an outermost transaction, re-running the whole transaction
        (up to ``retries`` times) on serialization failure, deadlock, an aborted or lost
        COMMIT, or a connection lost before COMMIT; waiting, without spending ``retries``,
        while the database cannot be reached; all within ``retry_timeout`` when given."""
        check_retries(retries, retry_timeout)
        state = self._state()
        # Under dbkit.testing's outer transaction the application's outermost block is a
        # savepoint: a retry rolls back to it and runs the whole block again.
        if state.conn is not None and not (state.testing and not state.blocks):
            raise TransactionError(
                "a retried transaction must be the outermost one: re-running it inside an "
                "open transaction would repeat only part of the work"
            )
        reruns = retries if retries is not None else sys.maxsize
        policy = dataclasses.replace(self._policy, reruns=reruns, deadline=retry_timeout)

        def once() -> R:
            with Transaction(self, options) as conn:
                return func(conn)

        return run_with_retries(once, policy, lambda: self._queries.transaction("retried"))


# Every manager, so that a forked child can make them forget the parent's transactions.
_managers: weakref.WeakSet[TransactionManager] = weakref.WeakSet()
_inherited: list[threading.local] = []


def _forget_inherited_transactions() -> None:
    for manager in list(_managers):
        manager.forget_inherited()


os.register_at_fork(after_in_child=_forget_inherited_transactions)


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
