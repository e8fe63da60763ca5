"""Advisory locks: ``with db.advisory_lock("nightly-import"):`` -- one holder at a time.

A batch job that must not run twice against the same database takes a named PostgreSQL
advisory lock.  The name becomes a signed 64-bit key in Python (``advisory_key``: BLAKE2b,
stable everywhere, unlike the server's ``hashtext``), so any program can compute it.

Where the lock lives:

- inside a transaction block (``db.in_transaction()``), on the block's connection and
  for its transaction (``pg_advisory_xact_lock``): released when the outermost transaction
  commits or rolls back, not when the ``with`` ends; nothing to clean up, and work that is
  rolled back never ran without the lock;
- outside one, for the session of a connection checked out of the pool for the ``with``
  (``pg_advisory_lock``), unlocked explicitly when it ends, the body's exception or not.
  A connection that cannot unlock (broken, killed) is discarded, never returned to the
  pool holding a lock; its session's end releases the lock.

``wait=False`` tries once (``pg_try_…``); ``wait=True`` waits, bounded by ``timeout=``
seconds alone (``lock_timeout`` for the wait only, ``statement_timeout`` off during it;
None: no bound).  Inside a block the wait runs in a savepoint, so one that times out
leaves the caller's transaction usable, and the two settings are put back after it.  Not
granted → ``LockNotAvailable``, naming the lock and, when ``pg_locks`` shows it, the
holder's pid and application_name.  The same thread taking a lock it already holds on its
own session (a nested ``with``) gets it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from loguru import logger
from sqlalchemy import exc as sa_exc

from dbkit.errors import LockNotAvailable, TransactionError, sqlstate_of

if TYPE_CHECKING:
    from dbkit.connection import DbkitConnection
    from dbkit.database import Database

__all__ = ["AdvisoryLocks", "HeldLock", "advisory_key"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_LOCK_NOT_AVAILABLE = "55P03"

_TRY_XACT = sa.text("SELECT pg_try_advisory_xact_lock(:key)")
_WAIT_XACT = sa.text("SELECT pg_advisory_xact_lock(:key)")
_TRY_SESSION = sa.text("SELECT pg_try_advisory_lock(:key)")
_WAIT_SESSION = sa.text("SELECT pg_advisory_lock(:key)")
_UNLOCK_SESSION = sa.text("SELECT pg_advisory_unlock(:key)")
_TIMEOUTS = sa.text("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
_SET_TIMEOUTS = sa.text(
    "SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :stmt, true)"
)
# A bigint key is stored as classid = high 32 bits, objid = low 32 bits, objsubid = 1.
_HOLDER = sa.text(
    "SELECT l.pid, a.application_name FROM pg_locks l "
    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid::bigint = :high AND l.objid::bigint = :low "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.pid <> pg_backend_pid() ORDER BY l.pid LIMIT 1"
)


def advisory_key(name: str | int) -> int:
    """The signed 64-bit key of the advisory lock ``name``: an int as it is (it must fit),
    a string as the first 8 bytes, big-endian and signed, of the BLAKE2b digest of its
    UTF-8 bytes -- ``int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(),
    "big", signed=True)`` -- the same in every process, machine and language."""
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise TypeError(f"an advisory lock is named by a str or an int, got {type(name).__name__}")
    if isinstance(name, int):
        if not _INT64_MIN <= name <= _INT64_MAX:
            raise ValueError(f"advisory lock key {name} does not fit in a signed 64-bit integer")
        return name
    if not name.strip():
        raise ValueError("an advisory lock's name must not be empty")
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class HeldLock:
    """What ``with db.advisory_lock(...) as lock`` holds: the name asked for, its key,
    ``scope`` (``"transaction"`` or ``"session"``) and the server pid of the session that
    holds it."""

    name: str | int
    key: int
    scope: Literal["transaction", "session"]
    pid: int


def _wait_bound(wait: bool, timeout: float | None) -> str | None:
    """The ``lock_timeout`` of the wait (``'0'``: none), or None for ``wait=False``."""
    if not isinstance(wait, bool):
        raise TypeError(f"wait must be True or False, got {wait!r}")
    if timeout is None:
        return "0" if wait else None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"timeout must be a positive, finite number of seconds, got {timeout!r} "
            "(wait=False does not wait at all)"
        )
    if not wait:
        raise ValueError("timeout bounds a wait: it needs wait=True (wait=False never waits)")
    return f"{max(1, round(timeout * 1000))}ms"


def _pid(conn: DbkitConnection) -> int:
    """The server pid of ``conn``'s session (libpq knows it: no round trip)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    return int(driver.info.backend_pid)


def _discard(conn: DbkitConnection) -> None:
    """Close ``conn`` for good: its session (and any lock it holds) ends with it."""
    with contextlib.suppress(Exception):
        conn.invalidate()
    with contextlib.suppress(Exception):
        conn.close()


class AdvisoryLocks:
    """One Database's advisory locks (``Database.advisory_lock`` delegates here)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # .session: {key: pid} of the session locks this thread holds.
        self._local = threading.local()

    def _session_held(self) -> dict[int, int]:
        held: dict[int, int] | None = getattr(self._local, "session", None)
        if held is None:
            held = self._local.session = {}
        return held

    @contextlib.contextmanager
    def hold(
        self, name: str | int, *, wait: bool = True, timeout: float | None = None
    ) -> Iterator[HeldLock]:
        key = advisory_key(name)
        bound = _wait_bound(wait, timeout)
        held = self._session_held()
        if key in held:
            # This thread holds it already on a session of its own, until the outer `with`
            # ends: taking it again from another connection would wait for itself.
            yield HeldLock(name, key, "session", held[key])
            return
        conn = self._db.connection()
        if conn is not None:
            self._lock_transaction(conn, name, key, bound, timeout)
            yield HeldLock(name, key, "transaction", _pid(conn))
            return
        conn = self._lock_session(name, key, bound, timeout)
        held[key] = pid = _pid(conn)
        try:
            yield HeldLock(name, key, "session", pid)
        finally:
            del held[key]
            self._unlock_session(conn, name, key)

    # -- inside a transaction block --------------------------------------------------------

    def _lock_transaction(
        self,
        conn: DbkitConnection,
        name: str | int,
        key: int,
        bound: str | None,
        timeout: float | None,
    ) -> None:
        if bound is None:
            if not conn.scalar(_TRY_XACT, {"key": key}):
                raise self._not_available(
                    name, key, bound, timeout, self._holder_in_block(conn, key)
                )
            return
        lock_timeout, statement_timeout = conn.execute(_TIMEOUTS).one()
        try:
            # A savepoint: a wait that fails must not abort the caller's transaction.
            with self._db.transaction():
                conn.execute(_SET_TIMEOUTS, {"lock": bound, "stmt": "0"})
                conn.execute(_WAIT_XACT, {"key": key})
        except sa_exc.DBAPIError as error:
            if sqlstate_of(error) != _LOCK_NOT_AVAILABLE:
                raise
            # The rollback to the savepoint has undone the two settings already.
            holder = self._holder_in_block(conn, key)
            raise self._not_available(name, key, bound, timeout, holder) from error
        # RELEASE keeps what SET LOCAL did inside the savepoint: put both back.
        conn.execute(_SET_TIMEOUTS, {"lock": lock_timeout, "stmt": statement_timeout})

    def _holder_in_block(self, conn: DbkitConnection, key: int) -> tuple[int, str] | None:
        """The holder, asked in a savepoint: a failure to find it must not break the
        caller's transaction (nor hide the LockNotAvailable being raised)."""
        if self._db.get_rollback():
            return None
        try:
            with self._db.transaction():
                return _holder(conn, key)
        except Exception as error:
            logger.debug("could not find the holder of advisory lock {}: {}", key, error)
            return None

    # -- outside: a session lock on a connection of its own --------------------------------

    def _lock_session(
        self, name: str | int, key: int, bound: str | None, timeout: float | None
    ) -> DbkitConnection:
        if self._db.config.pgbouncer:
            raise TransactionError(
                f"advisory lock {name!r}: a session lock cannot work behind PgBouncer in "
                "transaction mode (the session it would belong to is PgBouncer's, shared); "
                "take it inside a db.transaction() block, where it is transaction-scoped"
            )
        conn = self._db.checkout()
        try:
            if bound is None:
                with conn.begin():
                    granted = bool(conn.scalar(_TRY_SESSION, {"key": key}))
            else:
                try:
                    # SET LOCAL needs a transaction; the session lock outlives its COMMIT.
                    with conn.begin():
                        conn.execute(_SET_TIMEOUTS, {"lock": bound, "stmt": "0"})
                        conn.execute(_WAIT_SESSION, {"key": key})
                except sa_exc.DBAPIError as error:
                    if sqlstate_of(error) != _LOCK_NOT_AVAILABLE or error.connection_invalidated:
                        raise
                    holder = _holder_quietly(conn, key)
                    conn.close()
                    raise self._not_available(name, key, bound, timeout, holder) from error
                granted = True
        except LockNotAvailable:
            raise
        except BaseException:
            # Interrupted, or the connection failed: whether the lock was granted is not
            # known, so this connection must not go back to the pool.
            _discard(conn)
            raise
        if not granted:
            holder = _holder_quietly(conn, key)
            conn.close()
            raise self._not_available(name, key, bound, timeout, holder)
        return conn

    def _unlock_session(self, conn: DbkitConnection, name: str | int, key: int) -> None:
        try:
            with conn.begin():
                released = conn.scalar(_UNLOCK_SESSION, {"key": key})
        except BaseException as error:
            logger.warning(
                "could not unlock advisory lock {!r} ({}); discarding its connection, whose "
                "session's end releases it",
                name,
                error,
            )
            _discard(conn)
            if not isinstance(error, Exception):
                raise
            return
        if not released:
            logger.warning(
                "advisory lock {!r} was no longer held by its session; discarding the connection",
                name,
            )
            _discard(conn)
            return
        conn.close()

    # -- the error -------------------------------------------------------------------------

    def _not_available(
        self,
        name: str | int,
        key: int,
        bound: str | None,
        timeout: float | None,
        holder: tuple[int, str] | None,
    ) -> LockNotAvailable:
        what = f"advisory lock {name!r}" if isinstance(name, str) else f"advisory lock {name}"
        if holder is None:
            by = "another session"
        else:
            by = f"another session (pid {holder[0]}, application_name {holder[1]!r})"
        if bound is None:
            message = f"{what} is held by {by}; not waiting (wait=False)"
        elif timeout is not None:
            message = f"{what} was not granted within {timeout:g}s: it is held by {by}"
        else:
            message = f"{what} was not granted: it is held by {by}"
        return LockNotAvailable(
            f"{message} on {self._db.config.safe_dsn()}",
            lock=name,
            key=key,
            holder_pid=None if holder is None else holder[0],
            holder_application=None if holder is None else holder[1],
        )


def _holder(conn: DbkitConnection, key: int) -> tuple[int, str] | None:
    """(pid, application_name) of a session holding ``key`` (not this one), if any."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(_HOLDER, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}).first()
    return None if row is None else (int(row[0]), row[1] or "")


def _holder_quietly(conn: DbkitConnection, key: int) -> tuple[int, str] | None:
    try:
        with conn.begin():
            return _holder(conn, key)
    except Exception as error:
        logger.debug("could not find the holder of advisory lock {}: {}", key, error)
        return None
