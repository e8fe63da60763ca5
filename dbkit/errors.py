"""dbkit's exception hierarchy and the transient/permanent classification of database errors.

Every error dbkit raises is a ``DbkitError``; the original driver error is always kept as
``__cause__`` so nothing of PostgreSQL's diagnosis is lost.  Classification works on the
SQLSTATE where PostgreSQL sends one, and on the *kind* of failure for connection attempts,
which libpq reports without any SQLSTATE (refused, timed out, "too many clients", …).
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
import sqlalchemy.exc as sa_exc

__all__ = [
    "CircuitOpenError",
    "CommitOutcomeUnknown",
    "CommitPending",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "DbkitError",
    "DuplicateKeyError",
    "ForeignKeyError",
    "IntegrityError",
    "LockNotAvailable",
    "MultipleResultsError",
    "NotFoundError",
    "PoolTimeoutError",
    "RetryableError",
    "TransactionBroken",
    "TransactionError",
    "TransactionRolledBack",
    "is_transient",
    "sqlstate_of",
    "translate",
]


class DbkitError(Exception):
    """Base of every error raised by dbkit."""


class ConfigError(DbkitError, ValueError):
    """Settings are invalid; ``problems`` lists every one of them, not just the first."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid dbkit settings ({len(self.problems)} problem(s)):\n{lines}")


class ConnectError(DbkitError):
    """The database could not be reached, or refused us for good (bad password, no database)."""


class PoolTimeoutError(DbkitError):
    """No pooled connection became free within ``timeout``."""


class CircuitOpenError(DbkitError):
    """The circuit breaker is open: the database failed repeatedly, calls fail fast for now."""


class NotFoundError(DbkitError, LookupError):
    """A row looked up (or updated) by key does not exist."""


class MultipleResultsError(DbkitError, LookupError):
    """A lookup that expects at most one row (``get_one_or_none``) matched several."""


class ConflictError(DbkitError):
    """Optimistic-locking conflict: the row exists, but its version is no longer the one the
    caller read (someone else updated it in between).  Distinct from ``NotFoundError``:
    re-read the row and decide again, rather than treat it as gone.

    ``expected`` is the version the caller passed, ``actual`` the one found (None when it
    could not be read back)."""

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        key: object = None,
        expected: object = None,
        actual: object = None,
    ) -> None:
        super().__init__(message)
        self.table = table
        self.key = key
        self.expected = expected
        self.actual = actual


class IntegrityError(DbkitError):
    """A constraint rejected the write.  ``constraint`` names it when PostgreSQL says which."""

    def __init__(
        self,
        message: str,
        *,
        constraint: str | None = None,
        table: str | None = None,
        column: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.constraint = constraint
        self.table = table
        self.column = column
        self.sqlstate = sqlstate


class DuplicateKeyError(IntegrityError):
    """Unique or primary-key violation (SQLSTATE 23505)."""


class ForeignKeyError(IntegrityError):
    """Foreign-key violation (SQLSTATE 23503)."""


class TransactionError(DbkitError):
    """Transaction API misuse, or a transaction that could not end as asked."""


class TransactionBroken(TransactionError):
    """A statement failed earlier in this block; nothing more can run until the block ends."""


class TransactionRolledBack(TransactionError):
    """The block ended normally but its work was rolled back, because an error marked it."""


class CommitOutcomeUnknown(TransactionError):
    """The connection was lost while COMMIT was in flight and dbkit could not find out what
    happened (the server stayed unreachable, or still reported the transaction in progress,
    until ``timeout`` ran out).  Never retried automatically: the work may have committed.
    ``xid`` is the transaction's 64-bit id when it was known, for ``pg_xact_status(xid)``."""

    def __init__(self, message: str, *, xid: int | None = None) -> None:
        super().__init__(message)
        self.xid = xid


class CommitPending(TransactionError):
    """A distributed transaction (``dbkit.distributed_transaction``) was decided and
    recorded as committed, but finishing it on some database failed: the commit *will*
    complete, by ``dbkit.recover_prepared`` / ``dbkit recover``.  ``gids`` are the prepared
    transactions still to finish."""

    def __init__(self, message: str, *, gids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.gids = gids


class LockNotAvailable(DbkitError):
    """An advisory lock (``db.advisory_lock``) is held by another session: it was not
    waited for (``wait=False``) or not granted within ``timeout``.  Never retried
    automatically, not even by ``retries=``: the caller chose how long to wait.

    ``lock`` is the name (or int key) asked for, ``key`` the 64-bit key locked;
    ``holder_pid`` and ``holder_application`` name the session holding it, when it could be
    found (None otherwise)."""

    def __init__(
        self,
        message: str,
        *,
        lock: str | int | None = None,
        key: int | None = None,
        holder_pid: int | None = None,
        holder_application: str | None = None,
    ) -> None:
        super().__init__(message)
        self.lock = lock
        self.key = key
        self.holder_pid = holder_pid
        self.holder_application = holder_application


class RetryableError(DbkitError):
    """The transaction failed in a way that re-running it may fix: a serialization failure
    (40001), deadlock (40P01), lock not available (55P03), a write refused by a server that
    became read-only (25006, e.g. after a failover), a connection lost before COMMIT, or a
    lost COMMIT that the server reports as rolled back."""


# SQLSTATEs after which the same work may succeed if tried again (on a fresh connection or
# a fresh transaction).  Class 08 is matched by prefix.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "55P03",  # lock_not_available (NOWAIT, lock_timeout): the holder will let go
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, recovery)
        "57P05",  # idle_session_timeout
    }
)

# libpq reports connection failures as text without a SQLSTATE.  These fragments mark the
# ones worth retrying; anything else at connect time (authentication, unknown database or
# role, pg_hba rejection, SSL verification) is permanent.
_TRANSIENT_CONNECT_TEXT = (
    "connection refused",
    "could not connect",
    "timeout expired",
    "timed out",
    "too many clients",
    "too many connections",
    "remaining connection slots are reserved",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "server closed the connection unexpectedly",
    "connection reset",
    "no such file or directory",  # unix socket not there yet
    "network is unreachable",
    "no route to host",
    "temporary failure in name resolution",
)

_PERMANENT_CONNECT_TEXT = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf entry",
    "certificate",
    "ssl error",
    "server does not support ssl",
    "sslmode value",
    "invalid sslmode",
    "invalid connection option",
    "permission denied",
)


def _driver_error(exc: BaseException) -> BaseException:
    """The psycopg error behind a SQLAlchemy wrapper (or behind our own chained errors)."""
    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
            return exc.orig
        if isinstance(exc, psycopg.Error):
            return exc
        if exc.__cause__ is None:
            return exc
        exc = exc.__cause__
    return exc


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, looking through SQLAlchemy's and dbkit's wrappers."""
    orig = _driver_error(exc)
    if isinstance(orig, psycopg.Error):
        return orig.sqlstate
    return None


def is_transient(exc: BaseException) -> bool:
    """True when the same operation may succeed if retried: the failure is not about *what*
    was asked but about the server or network being momentarily unable to answer."""
    if isinstance(exc, (RetryableError, CircuitOpenError)):
        return isinstance(exc, RetryableError)
    if isinstance(
        exc, (ConfigError, NotFoundError, IntegrityError, TransactionError, LockNotAvailable)
    ):
        return False
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    orig = _driver_error(exc)
    if isinstance(orig, psycopg.Error):
        state = orig.sqlstate
        if state is not None:
            return state in _TRANSIENT_SQLSTATES or state.startswith("08")
        if isinstance(orig, psycopg.errors.ConnectionTimeout):
            return True
        if isinstance(orig, psycopg.OperationalError):
            text = str(orig).lower()
            if any(frag in text for frag in _PERMANENT_CONNECT_TEXT):
                return False
            return any(frag in text for frag in _TRANSIENT_CONNECT_TEXT)
        return False
    return isinstance(orig, (ConnectionError, TimeoutError))


# Integrity-constraint SQLSTATEs (class 23) with a dbkit class of their own; the rest of the
# class (23502 not-null, 23514 check, 23P01 exclusion, 23001 restrict) is IntegrityError.
_INTEGRITY_CLASSES: dict[str, type[IntegrityError]] = {
    "23505": DuplicateKeyError,
    "23503": ForeignKeyError,
}


def translate(
    exc: BaseException,
    constraint_errors: Mapping[str, type[Exception]] | None = None,
) -> BaseException:
    """dbkit's error for an integrity-constraint violation, else ``exc`` itself.

    Decided by SQLSTATE and psycopg's ``diag`` fields, never by message text (which is
    translated with ``lc_messages``): 23505 → ``DuplicateKeyError``, 23503 →
    ``ForeignKeyError``, any other class-23 state (23502 not-null with ``.column``, 23514
    check, 23P01 exclusion) → ``IntegrityError``.  ``.constraint``, ``.table``, ``.column``
    and ``.sqlstate`` come from the server's diagnostics; the message is PostgreSQL's own,
    with its DETAIL line (e.g. ``Key (email)=(a@b.c) already exists.``).

    ``constraint_errors`` maps constraint names to the caller's own exception classes (a
    repository's ``{"uq_users_email": EmailTaken}``); such a class is called with the
    message, plus the ``IntegrityError`` keywords when it subclasses ``IntegrityError``.

    The returned error has ``exc`` as its ``__cause__``; raise it with ``from exc``.
    """
    if isinstance(exc, DbkitError):
        return exc
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if not isinstance(orig, psycopg.Error):
        return exc
    state = orig.sqlstate
    if state is None or not state.startswith("23"):
        return exc
    diag = orig.diag
    fields: dict[str, str | None] = {
        "constraint": diag.constraint_name,
        "table": diag.table_name,
        "column": diag.column_name,
        "sqlstate": state,
    }
    message = diag.message_primary or type(orig).__name__
    if diag.message_detail:
        message = f"{message} ({diag.message_detail})"
    custom = constraint_errors.get(fields["constraint"] or "") if constraint_errors else None
    error: Exception
    if custom is None:
        error = _INTEGRITY_CLASSES.get(state, IntegrityError)(message, **fields)
    elif issubclass(custom, IntegrityError):
        error = custom(message, **fields)
    else:
        error = custom(message)
    error.__cause__ = exc
    return error
