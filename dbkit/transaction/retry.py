"""Which failures re-running a whole transaction can cure, and how long to wait between runs."""

from __future__ import annotations

import random

from sqlalchemy import exc as sa_exc

from dbkit.errors import (
    CircuitOpenError,
    ConnectError,
    DbkitError,
    RetryableError,
    TransactionError,
    TransactionRolledBack,
    is_transient,
    sqlstate_of,
)

__all__ = ["as_retryable", "backoff_delay", "giving_up", "worth_retrying"]

# SQLSTATEs after which re-running the whole transaction is the documented remedy.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
_BASE_DELAY = 0.01
_MAX_DELAY = 1.0


def worth_retrying(error: BaseException) -> bool:
    """A serialization failure or deadlock, no connection to be had yet, or a connection
    lost before COMMIT was sent (the server rolled the work back)."""
    if sqlstate_of(error) in _RETRY_SQLSTATES:
        return True
    if isinstance(error, CircuitOpenError) or (
        isinstance(error, ConnectError) and is_transient(error)
    ):
        # No connection was had, so nothing was sent: the server is restarting or busy.
        return True
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, sa_exc.DBAPIError):
            return bool(cause.connection_invalidated)
        if isinstance(cause, TransactionError) and not isinstance(cause, TransactionRolledBack):
            return False
        cause = cause.__cause__
    return False


def as_retryable(error: Exception) -> RetryableError | None:
    """The whole transaction was rolled back for a reason that running it again may cure:
    say so in dbkit's terms (the driver's error stays attached as ``__cause__``)."""
    if isinstance(error, DbkitError) or not worth_retrying(error):
        return None
    state = sqlstate_of(error)
    what = {"40001": "serialization failure", "40P01": "deadlock"}.get(
        state or "", "connection lost before COMMIT"
    )
    return RetryableError(
        f"{what}{f' ({state})' if state else ''}: the transaction was rolled back and can be "
        "run again (db.run_in_transaction(fn, retries=N) or @db.transaction(retries=N))"
    )


def giving_up(error: Exception, attempts: int) -> RetryableError:
    """The error to raise when the last allowed run failed too."""
    cause = error.__cause__ if isinstance(error, RetryableError) else error
    return RetryableError(
        f"transaction failed {attempts} time(s) with a retryable error "
        f"({sqlstate_of(error) or type(cause).__name__}); giving up"
    )


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter (half to all of the step), capped at one second."""
    delay = min(_MAX_DELAY, _BASE_DELAY * 2**attempt)
    return random.uniform(delay / 2, delay)
