"""psycopg's connection, able to have a transaction's BEGIN, or the question for its id,
in flight.

Public twins: psycopg's own implicit BEGIN, sent right before the first statement and
waited for (``Connection.autocommit = False``), with ``SET LOCAL`` statements after it; and
``XactConnection.settle_transaction_id()``, which asks for the id right before COMMIT.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import generators

from dbkit.xact import XactConnection, xact_id_query

__all__ = ["PgConnection", "begin_command"]

_IDLE = psycopg.pq.TransactionStatus.IDLE
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR
_TUPLES_OK = psycopg.pq.ExecStatus.TUPLES_OK
_INTRANS = psycopg.pq.TransactionStatus.INTRANS


class PgConnection(XactConnection):
    """``send_begin()`` sends the BEGIN (and any ``SET LOCAL`` the block needs, in the same
    message) without waiting for the answer; the next operation on the connection --
    normally the transaction's first statement, once SQLAlchemy has done its Python work
    for it -- collects that answer first (every psycopg operation goes through ``wait()``).
    The round trip then overlaps with that work instead of being waited for.  The server
    sees what it saw before: BEGIN, then the statements; an error of the BEGIN (or a
    connection lost meanwhile) is raised by that next operation, where the implicit BEGIN
    would have raised it.

    The question for the transaction's id (``after_write()``) is sent the same way, right
    after the first statement that wrote, and its answer read with the next statement's or
    before COMMIT: the id is known before COMMIT leaves, at no round trip of its own.
    """

    # What was sent ahead and not yet read: ("begin", answers) for the BEGIN and its
    # companions, ("xid", 1) for the question for the transaction's id.
    _dbkit_ahead: tuple[str, int] | None = None
    # A FATAL error the server sent while no query was running (libpq reports it as a
    # notice): (sqlstate, message), for the error of the operation that meets the
    # closed connection.
    _dbkit_fatal: tuple[str, str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_notice_handler(_fatal_listener(weakref.ref(self)))

    def send_begin(
        self, isolation: str | None = None, readonly: bool | None = None, then: Sequence[str] = ()
    ) -> bool:
        """Send ``BEGIN [ISOLATION LEVEL …] [READ ONLY]`` followed by the commands ``then``;
        False when it cannot be sent (not idle, pipeline mode, a broken connection): the
        caller then begins the usual way.  Options not given are psycopg's own
        (``isolation_level``, ``read_only``, ``deferrable``), as in its implicit BEGIN."""
        busy = self._dbkit_ahead is not None or self._pipeline is not None
        if busy or self.pgconn.transaction_status != _IDLE:
            return False
        command = b"; ".join(
            [begin_command(self, isolation, readonly), *(c.encode() for c in then)]
        )
        return self._send_ahead(command, ("begin", 1 + len(then)))

    def _send_ahead(self, command: bytes, ahead: tuple[str, int]) -> bool:
        """Send ``command`` without waiting; the next operation reads its answers."""
        pgconn = self.pgconn
        with self.lock:
            try:
                pgconn.send_query(command)
                pgconn.flush()  # what is not flushed now is by the reading wait()
            except psycopg.Error:
                return False
            self._dbkit_ahead = ahead
        return True

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._dbkit_ahead is not None:
                self._read_ahead()
            return super().wait(gen, *args, **kwargs)
        except psycopg.OperationalError as error:
            fatal = self._dbkit_fatal
            if fatal is None or error.sqlstate is not None:
                raise
            # The server said why it closed the connection while an answer read ahead
            # was waiting (an idle-in-transaction timeout, pg_terminate_backend): raise
            # that, as the operation would have without the read-ahead.
            self._dbkit_fatal = None
            sqlstate, message = fatal
            try:
                cls: type[psycopg.Error] = psycopg.errors.lookup(sqlstate)
            except KeyError:
                raise error from None
            raise cls(message) from error

    def after_write(self) -> None:
        """Ask for the transaction's id now; the answer is read by the next operation."""
        busy = self._dbkit_ahead is not None or self._pipeline is not None
        if busy or self.pgconn.transaction_status != _INTRANS:
            return  # settle_transaction_id() will ask before COMMIT
        query = xact_id_query(self.info.server_version)
        if query is not None:
            # On failure the next operation meets the broken connection.
            self._send_ahead(query, ("xid", 1))

    def settle_transaction_id(self) -> None:
        if self._dbkit_ahead is not None:
            with self.lock:
                self._read_ahead()
        super().settle_transaction_id()

    def _read_ahead(self) -> None:
        """Read the answers of what was sent ahead; raise the server's error if any."""
        assert self._dbkit_ahead is not None
        (what, expected), self._dbkit_ahead = self._dbkit_ahead, None
        pgconn = self.pgconn
        # Read what has arrived without waiting: the answer normally has, and then no
        # poll() (nor a release of the GIL) is needed.
        pgconn.consume_input()
        results = super().wait(generators.execute(pgconn))
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self.info.encoding)
        if len(results) == expected:
            # The BEGIN's companions: SET LOCAL, or SELECT set_config(…) (settings=).
            if what == "begin" and all(r.status in (_COMMAND_OK, _TUPLES_OK) for r in results):
                return
            if what == "xid" and results[0].status == _TUPLES_OK and results[0].ntuples == 1:
                value = results[0].get_value(0, 0)
                self.record_transaction_id(None if value is None else value.decode())
                return
        raise psycopg.InterfaceError(f"unexpected answer to {what} sent ahead: {results!r}")


def _fatal_listener(ref: weakref.ReferenceType[PgConnection]) -> Any:
    def heard(diag: psycopg.errors.Diagnostic) -> None:
        conn = ref()
        if conn is not None and diag.severity_nonlocalized == "FATAL" and diag.sqlstate:
            conn._dbkit_fatal = (diag.sqlstate, diag.message_primary or diag.sqlstate)

    return heard


def begin_command(
    conn: psycopg.Connection[Any], isolation: str | None, readonly: bool | None
) -> bytes:
    """The BEGIN psycopg would send, with a block's own isolation level and access mode."""
    if isolation is None and conn.isolation_level is not None:
        isolation = conn.isolation_level.name.replace("_", " ")
    if readonly is None:
        # Not asked either way: psycopg's own setting, and when that is unset neither mode,
        # so the server's default (default_transaction_read_only, a standby) holds.
        readonly = conn.read_only
    deferrable = conn.deferrable
    parts = ["BEGIN"]
    if isolation is not None:
        parts.append(f"ISOLATION LEVEL {isolation}")
    if readonly is not None:
        parts.append("READ ONLY" if readonly else "READ WRITE")
    if deferrable is not None:
        parts.append("DEFERRABLE" if deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()
