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

    _dbkit_pending = 0  # answers still to read: the BEGIN's and its companions'
    _dbkit_asking = False  # the question for the transaction id is in flight
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
        pgconn = self.pgconn
        if self._dbkit_pending or self._pipeline is not None or pgconn.transaction_status != _IDLE:
            return False
        command = b"; ".join(
            [begin_command(self, isolation, readonly), *(c.encode() for c in then)]
        )
        with self.lock:
            try:
                pgconn.send_query(command)
                pgconn.flush()  # what is not flushed now is by the collecting wait()
            except psycopg.Error:
                return False
            self._dbkit_pending = 1 + len(then)
        return True

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._dbkit_pending:
                self._collect_begin()
            elif self._dbkit_asking:
                self._collect_transaction_id()
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
        pgconn = self.pgconn
        busy = self._dbkit_asking or self._pipeline is not None
        if busy or pgconn.transaction_status != _INTRANS:
            return  # settle_transaction_id() will ask before COMMIT
        query = xact_id_query(self.info.server_version)
        if query is None:
            return
        with self.lock:
            try:
                pgconn.send_query(query)
                pgconn.flush()
            except psycopg.Error:
                return  # the next operation meets the broken connection
            self._dbkit_asking = True

    def settle_transaction_id(self) -> None:
        if self._dbkit_asking:
            with self.lock:
                self._collect_transaction_id()
        super().settle_transaction_id()

    def _collect_transaction_id(self) -> None:
        self._dbkit_asking = False
        pgconn = self.pgconn
        pgconn.consume_input()
        results = super().wait(generators.execute(pgconn))
        if len(results) == 1 and results[0].status == _TUPLES_OK and results[0].ntuples == 1:
            value = results[0].get_value(0, 0)
            self.record_transaction_id(None if value is None else value.decode())
            return
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self.info.encoding)
        raise psycopg.InterfaceError(f"unexpected answer to the transaction id: {results!r}")

    def _collect_begin(self) -> None:
        expected, self._dbkit_pending = self._dbkit_pending, 0
        pgconn = self.pgconn
        # Read what has arrived without waiting: the answer normally has, and then no
        # poll() (nor a release of the GIL) is needed.
        pgconn.consume_input()
        results = super().wait(generators.execute(pgconn))
        if len(results) == expected and all(r.status == _COMMAND_OK for r in results):
            return
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self.info.encoding)
        raise psycopg.InterfaceError(f"unexpected answer to BEGIN: {results!r}")


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
