"""What a transaction wrote, and its id: what a lost COMMIT is resolved with.

When the connection dies while COMMIT is in flight, only the transaction's id lets a fresh
connection ask the server what happened (``pg_xact_status``).  The id must be known
*before* COMMIT is sent: an answer in flight is lost with the link.  Asking for it costs a
statement, so dbkit asks only for transactions that wrote: every cursor of an
``XactConnection`` notes the command tag of what it ran, and a tag other than a read's
(``SELECT``, ``FETCH``, ``SHOW``, ``SET`` …) marks the transaction as written.  Before
COMMIT, ``settle_transaction_id()`` then asks ``pg_current_xact_id_if_assigned()`` (64-bit,
so wraparound cannot confuse two transactions) unless the answer is already in hand; the
fast path (``dbkit.fastpath.psycopg``) sends that question right after the first write and
reads the answer with the next statement's, so it costs no round trip of its own.

Not seen as writes: a function that writes called from a ``SELECT``, and a writable CTE
under a ``SELECT`` (their tag is ``SELECT``).  A transaction whose only writes are of that
kind is treated as read-only when its COMMIT is lost.

The same cursor also heals a stale prepared statement.  psycopg prepares a statement run
often enough on a connection; after an ``ALTER TABLE`` elsewhere changes what it returns,
PostgreSQL refuses the prepared one ("cached plan must not change result type", 0A000),
and psycopg, which forgets it only on a ROLLBACK or a DDL of its own, would send it again
every time.  Outside a transaction the statement did nothing, so the cursor sends
``DEALLOCATE ALL`` (psycopg notices and empties its cache) and runs it once more.  Inside
one the transaction is aborted: its rollback empties the cache and a re-run works
(``retries=``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

__all__ = ["READ_TAGS", "TrackingCursor", "XactConnection", "stale_plan", "xact_id_query"]

_IDLE = psycopg.pq.TransactionStatus.IDLE

# Command tags of statements that never assign a transaction id (their first word).
READ_TAGS = frozenset(
    {
        b"SELECT",
        b"FETCH",
        b"SHOW",
        b"SET",
        b"RESET",
        b"BEGIN",
        b"START",
        b"SAVEPOINT",
        b"RELEASE",
        b"ROLLBACK",
        b"DECLARE",
        b"CLOSE",
        b"MOVE",
        b"EXPLAIN",
        b"LISTEN",
        b"UNLISTEN",
        b"PREPARE",
        b"DEALLOCATE",
        b"LOCK",
        b"DISCARD",
    }
)


def stale_plan(error: BaseException) -> bool:
    """PostgreSQL refused a prepared statement whose result columns changed since."""
    return isinstance(
        error, psycopg.errors.FeatureNotSupported
    ) and "cached plan must not change result type" in str(error)


def xact_id_query(server_version: int) -> bytes | None:
    """The question for the current transaction's 64-bit id (NULL when it has none), for a
    server of this version; None before PostgreSQL 10, which has no way to ask."""
    if server_version >= 130000:
        return b"SELECT pg_current_xact_id_if_assigned()::text"
    if server_version >= 100000:
        # The bigint carries the epoch: 64 bits as well.
        return b"SELECT txid_current_if_assigned()::text"
    return None


class XactConnection(psycopg.Connection[Any]):
    """A psycopg connection that knows whether its transaction wrote, and its id.

    State of the current transaction, reset by ``begin_tracking()``:

    - ``xact_wrote``: a statement may have written since the id was last asked;
    - ``xact_id``: the id, once known (None: not asked, or none assigned).
    """

    tracking = False
    xact_wrote = False
    xact_id: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = TrackingCursor

    def begin_tracking(self) -> None:
        """A read-write transaction begins: note its writes until its id is known."""
        self.tracking = True
        self.xact_wrote = False
        self.xact_id = None

    def stop_tracking(self) -> None:
        self.tracking = False

    def note(self, status: bytes | None) -> None:
        """A statement ran with this command tag (None: unknown, counted as a write)."""
        if status is not None and status.split(b" ", 1)[0] in READ_TAGS:
            return
        self.xact_wrote = True
        self.after_write()

    def after_write(self) -> None:
        """Hook for the fast path, which asks for the id right away."""

    def settle_transaction_id(self) -> None:
        """Right before COMMIT: make sure the id of a transaction that wrote is known.

        Afterwards ``xact_wrote`` is False when nothing was written (no id assigned), and
        ``xact_id`` is set when something was; both set means an old server that cannot
        tell.  A psycopg error here means the connection failed before COMMIT was sent."""
        if not self.xact_wrote or self.xact_id is not None:
            return
        query = xact_id_query(self.info.server_version)
        if query is None:
            return
        # A plain cursor: its SELECT must not be noted.
        with psycopg.Cursor(self) as cursor:
            cursor.execute(query)
            row = cursor.fetchone()
        self.record_transaction_id(None if row is None else row[0])

    def record_transaction_id(self, value: str | None) -> None:
        """The server's answer to ``xact_id_query``."""
        if value is None:
            self.xact_wrote = False  # no id: nothing was written after all
        else:
            self.xact_id = int(value)
            self.tracking = False  # the id is final: nothing more to note


class TrackingCursor(psycopg.Cursor[Any]):
    """Tells its ``XactConnection`` the command tag of each statement it runs."""

    __slots__ = ()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> TrackingCursor:
        try:
            super().execute(query, params, **kwargs)
        except psycopg.errors.FeatureNotSupported as error:
            if not stale_plan(error) or self.connection.info.transaction_status != _IDLE:
                raise
            with psycopg.Cursor(self.connection) as cursor:
                cursor.execute("DEALLOCATE ALL")
            super().execute(query, params, **kwargs)
        self._noted()
        return self

    def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> None:
        super().executemany(query, params_seq, **kwargs)
        conn = self.connection
        if conn.tracking:  # type: ignore[attr-defined]
            conn.note(None)  # type: ignore[attr-defined]

    @contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        with super().copy(statement, params, **kwargs) as copy:
            yield copy
        self._noted()

    def _noted(self) -> None:
        """Tell the connection the command tag of what just ran, when it is tracking."""
        conn = self.connection
        if conn.tracking:  # type: ignore[attr-defined]
            result = self.pgresult
            conn.note(None if result is None else result.command_status)  # type: ignore[attr-defined]
