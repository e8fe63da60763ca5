"""``distributed_transaction(db1, db2, ...)``: one transaction per database, committed all or
none by two-phase commit, with the decision made durable before any part commits.

At the end of the block, in this order:

1. every part is prepared (``PREPARE TRANSACTION 'dbkit:<id>:<n>'``): its work is on disk
   and it can no longer fail on its own; a deferred constraint fails here, and the parts
   prepared so far are rolled back (``ROLLBACK PREPARED``);
2. the decision ``(id, 'commit')`` is written to the log on the first database, in a
   transaction of its own with ``synchronous_commit = on``: from here on, the transaction
   *is* committed, whatever happens to this process;
3. each part is committed (``COMMIT PREPARED``), the log row is removed, and the
   ``on_commit`` callbacks of every part run, in the order they were registered per
   database.

A failure before 2 rolls everything back and raises the original error.  A failure after
2 raises ``CommitPending``: the commit will complete, by ``recover_prepared``.  If this
process dies, recovery finishes what was decided and rolls back what was not.  The
coordinator holds a session advisory lock on the first database for the whole block, so
recovery never touches a transaction whose coordinator still runs.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from loguru import logger

from dbkit.errors import (
    CommitOutcomeUnknown,
    CommitPending,
    RetryableError,
    TransactionError,
    TransactionRolledBack,
    is_transient,
    translate,
)
from dbkit.retrying import Attempts, Failure, RetryPolicy, run_retrying
from dbkit.transaction import run_on_commit_callback
from dbkit.twophase.log import (
    LOG_TABLE,
    coordinator_key,
    ensure_log,
    gid,
    require_prepared_transactions,
)

if TYPE_CHECKING:
    from dbkit.connection import DbkitConnection
    from dbkit.database import Database

__all__ = ["distributed_transaction", "run_distributed"]

R = TypeVar("R")

_DECIDE = sa.text(
    f"INSERT INTO {LOG_TABLE} (id, outcome, parts) VALUES (:id, 'commit', :parts) "
    "ON CONFLICT (id) DO NOTHING RETURNING outcome"
)
_FORGET = sa.text(f"DELETE FROM {LOG_TABLE} WHERE id = :id")


@contextlib.contextmanager
def distributed_transaction(*dbs: Database) -> Iterator[tuple[DbkitConnection, ...]]:
    """``with distributed_transaction(orders_db, billing_db) as (orders, billing):`` one
    transaction on each database, committed all or none (two-phase commit, see the module
    docstring).  Inside, repositories and ``db.execute`` on each database join its part,
    nested ``db.transaction()`` blocks are savepoints of it, and ``on_commit`` callbacks
    run after the whole commit.  The first database holds the decision log."""
    _check_participants(dbs)
    for db in dbs:
        require_prepared_transactions(db)
    ensure_log(dbs[0])
    transaction_id = uuid.uuid4().hex
    prepared: list[int] = []
    with _coordinator_lock(dbs[0], transaction_id):
        try:
            with contextlib.ExitStack() as blocks:
                conns = tuple(blocks.enter_context(db.transaction()) for db in dbs)
                yield conns  # an exception here unwinds the blocks: each part rolls back
                for number, conn in enumerate(conns):
                    _prepare(conn, gid(transaction_id, number))
                    prepared.append(number)
                callbacks = [entry for db in dbs for entry in db.transactions.take_on_commit()]
            # The blocks are closed: their COMMIT found no transaction (each was prepared).
        except BaseException:
            _rollback_prepared(dbs, transaction_id, prepared)
            raise
        _decide(dbs, transaction_id, prepared)
        _commit_all(dbs, transaction_id, prepared)
    for _, func, robust in callbacks:
        run_on_commit_callback(func, robust)


def run_distributed(
    func: Callable[..., R], *dbs: Database, retries: int = 3, retry_timeout: float | None = None
) -> R:
    """``func(conn1, conn2, …)`` in a ``distributed_transaction(*dbs)``, run again whole
    (up to ``retries`` times) when any part fails with a serialization failure, a deadlock
    or a lost connection before the decision (a ``RetryableError``)."""

    def once() -> R:
        with distributed_transaction(*dbs) as conns:
            return func(*conns)

    def classify(error: Exception, attempts: Attempts) -> Failure:
        return Failure.RERUN if isinstance(error, RetryableError) else Failure.FINAL

    policy = RetryPolicy(reruns=retries, deadline=retry_timeout)
    return run_retrying(once, policy, classify, what="a distributed transaction")


def _check_participants(dbs: Sequence[Database]) -> None:
    if len(dbs) < 1:
        raise TypeError("distributed_transaction() needs at least one Database")
    if len({id(db) for db in dbs}) != len(dbs):
        raise TransactionError("a database is named twice in distributed_transaction()")
    for db in dbs:
        if db.in_transaction():
            raise TransactionError(
                f"{db.config.safe_dsn()} already has a transaction open in this thread: a "
                "distributed transaction must be outermost on every database"
            )
        if db.config.pgbouncer:
            raise TransactionError(
                f"{db.config.safe_dsn()} is behind PgBouncer in transaction mode, where the "
                "coordinator's session lock cannot work: connect to the server directly"
            )


@contextlib.contextmanager
def _coordinator_lock(db: Database, transaction_id: str) -> Iterator[None]:
    """Hold the session lock that tells recovery this coordinator is alive, on a pooled
    connection of its own (not the part's: its transaction is prepared away)."""
    conn = db.checkout()
    try:
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.autocommit = True
        driver.execute("SELECT pg_advisory_lock(%s)", (coordinator_key(transaction_id),))
        try:
            yield
        finally:
            driver.execute("SELECT pg_advisory_unlock(%s)", (coordinator_key(transaction_id),))
    except BaseException:
        conn.invalidate()  # a lock that might still be held never goes back to the pool
        raise
    finally:
        conn.close()


def _prepare(conn: DbkitConnection, name: str) -> None:
    """PREPARE TRANSACTION; a deferred constraint that fails there comes out as dbkit's
    ``IntegrityError`` family, as it would at COMMIT."""
    try:
        conn.exec_driver_sql(f"PREPARE TRANSACTION '{name}'")
    except sa.exc.DBAPIError as error:
        translated = translate(error)
        if translated is error:
            raise
        raise translated from error


def _decide(dbs: Sequence[Database], transaction_id: str, prepared: list[int]) -> None:
    """Record the decision durably; roll everything back when it could not be recorded."""
    try:
        with dbs[0].transaction(settings={"synchronous_commit": "on"}) as conn:
            decided = conn.execute(_DECIDE, {"id": transaction_id, "parts": len(dbs)}).first()
    except CommitOutcomeUnknown as error:
        raise CommitPending(
            f"distributed transaction {transaction_id}: its decision's COMMIT was lost and "
            "its outcome is unknown; dbkit.recover_prepared (dbkit recover) will finish it "
            "either way, all parts alike",
            gids=tuple(gid(transaction_id, n) for n in prepared),
        ) from error
    except BaseException:
        _rollback_prepared(dbs, transaction_id, prepared)
        raise
    if decided is None:  # recovery wrote 'rollback' first (this process looked dead)
        _rollback_prepared(dbs, transaction_id, prepared)
        raise TransactionRolledBack(
            f"distributed transaction {transaction_id} was rolled back by recovery before "
            "its commit was decided: nothing of it was committed"
        )


def _commit_all(dbs: Sequence[Database], transaction_id: str, prepared: list[int]) -> None:
    pending: list[str] = []
    first_error: BaseException | None = None
    for number in prepared:
        name = gid(transaction_id, number)
        try:
            dbs[number].execute(sa.text(f"COMMIT PREPARED '{name}'"), idempotent=False)
        except Exception as error:
            logger.warning("COMMIT PREPARED {} failed: {}; recovery will finish it", name, error)
            pending.append(name)
            first_error = first_error or error
    if pending:
        raise CommitPending(
            f"distributed transaction {transaction_id} is committed (the decision is "
            f"recorded) but {', '.join(pending)} could not be finished now; "
            "dbkit.recover_prepared (dbkit recover) will complete the commit",
            gids=tuple(pending),
        ) from first_error
    with contextlib.suppress(Exception):  # recovery prunes it otherwise
        dbs[0].execute(_FORGET, {"id": transaction_id}, idempotent=True)


def _rollback_prepared(dbs: Sequence[Database], transaction_id: str, prepared: list[int]) -> None:
    """ROLLBACK PREPARED the parts prepared so far (best effort: what fails here is left
    to recovery, which finds no decision and rolls it back)."""
    for number in prepared:
        name = gid(transaction_id, number)
        try:
            dbs[number].execute(sa.text(f"ROLLBACK PREPARED '{name}'"), idempotent=False)
        except Exception as error:  # logged; recovery finds no decision and rolls it back
            level = "WARNING" if is_transient(error) else "INFO"
            logger.log(level, "ROLLBACK PREPARED {} failed: {}", name, error)
