"""Which failures re-running a whole transaction can cure (``classify``), in dbkit's terms.

How long to wait, and when to stop, is ``dbkit.retrying``'s (pure) policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

from sqlalchemy import exc as sa_exc

from dbkit.errors import (
    CircuitOpenError,
    CommitOutcomeUnknown,
    ConnectError,
    DbkitError,
    LockNotAvailable,
    RetryableError,
    TransactionError,
    TransactionRolledBack,
    is_transient,
    sqlstate_of,
)
from dbkit.retrying import Attempts, Failure, RetryPolicy, run_retrying
from dbkit.transaction.options import TransactionOptions
from dbkit.xact import stale_plan

__all__ = [
    "as_retryable",
    "classify",
    "giving_up",
    "run_with_retries",
    "server_became_read_only",
    "worth_retrying",
]

R = TypeVar("R")

# SQLSTATEs after which re-running the whole transaction is the documented remedy:
# serialization failure, deadlock, and a lock not granted in time (NOWAIT, lock_timeout).
_RETRY_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
_READ_ONLY_SQL_TRANSACTION = "25006"

_WHAT = {
    "40001": "serialization failure",
    "40P01": "deadlock",
    "55P03": "lock not available",
    _READ_ONLY_SQL_TRANSACTION: "the server became read-only",
    "0A000": "a prepared statement's result type changed",
}


def classify(error: BaseException) -> Failure:
    """What a failed transaction run tells about running it again."""
    if isinstance(error, CommitOutcomeUnknown):
        return Failure.FINAL  # it may have committed: running it again could repeat it
    if isinstance(error, CircuitOpenError) or (
        isinstance(error, ConnectError) and is_transient(error)
    ):
        # No connection was had, so nothing was sent: the server is restarting or away.
        return Failure.OUTAGE
    return Failure.RERUN if worth_retrying(error) else Failure.FINAL


def worth_retrying(error: BaseException) -> bool:
    """A serialization failure, deadlock or lock timeout, an aborted COMMIT, or a
    connection lost before COMMIT was sent (the server rolled the work back); not an
    advisory lock that ``db.advisory_lock`` did not get."""
    if isinstance(error, RetryableError):
        return True
    if isinstance(error, LockNotAvailable):
        return False  # the caller chose how long to wait for it (its cause may be 55P03)
    if sqlstate_of(error) in _RETRY_SQLSTATES:
        return True
    if any(stale_plan(e) for e in _chain(error)):
        return True  # the rollback emptied psycopg's cache of prepared statements
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, sa_exc.DBAPIError):
            return bool(cause.connection_invalidated)
        if isinstance(cause, TransactionError) and not isinstance(cause, TransactionRolledBack):
            return False
        cause = cause.__cause__
    return False


def _chain(error: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(found) < 10:
        found.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return found


def server_became_read_only(
    error: BaseException | None, options: TransactionOptions, declared: BaseException | None
) -> bool:
    """25006 in a transaction the application did not declare read-only: the server
    refused a write because it is read-only now (a standby after a failover).
    ``declared``: the error a nested read-only block of the transaction raised, which the
    application asked for."""
    return (
        isinstance(error, Exception)
        and error is not declared
        and options.readonly is not True
        and sqlstate_of(error) == _READ_ONLY_SQL_TRANSACTION
    )


def as_retryable(error: Exception, *, read_only_server: bool = False) -> RetryableError | None:
    """The whole transaction was rolled back for a reason that running it again may cure:
    say so in dbkit's terms (the driver's error stays attached as ``__cause__``)."""
    if isinstance(error, DbkitError) or not (read_only_server or worth_retrying(error)):
        return None
    state = sqlstate_of(error)
    what = _WHAT.get(state or "", "connection lost before COMMIT")
    return RetryableError(
        f"{what}{f' ({state})' if state else ''}: the transaction was rolled back and can be "
        "run again (db.run_in_transaction(fn, retries=N) or @db.transaction(retries=N))"
    )


def giving_up(
    error: Exception, attempts: int, elapsed: float, policy: RetryPolicy
) -> RetryableError:
    """The error to raise when no run is left: the budget or the deadline is spent."""
    cause = error.__cause__ if isinstance(error, RetryableError) else error
    why = (
        f"retry_timeout of {policy.deadline:g}s reached"
        if policy.deadline is not None and elapsed >= policy.deadline
        else f"{attempts} run(s), retries={policy.reruns}"
    )
    return RetryableError(
        f"transaction failed with a retryable error "
        f"({sqlstate_of(error) or type(cause).__name__}); giving up after {why}"
    )


def run_with_retries(once: Callable[[], R], policy: RetryPolicy, rerun: Callable[[], None]) -> R:
    """``once()`` (one whole transaction) until it succeeds or ``policy`` says to stop;
    ``rerun()`` is told of each re-run that spends the budget (not of outage waits)."""

    def give_up(error: Exception, attempts: Attempts, elapsed: float) -> NoReturn:
        cause = error.__cause__ if isinstance(error, RetryableError) else error
        raise giving_up(error, attempts.reruns + 1, elapsed, policy) from cause

    return run_retrying(
        once,
        policy,
        lambda error, _attempts: classify(error),
        what="the transaction",
        rerun=rerun,
        give_up=give_up,
    )
