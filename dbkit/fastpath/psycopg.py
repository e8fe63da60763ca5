"""psycopg's connection, able to have a transaction's BEGIN in flight.

Public twin: psycopg's own implicit BEGIN, sent right before the first statement and
waited for (``Connection.autocommit = False``), with ``SET LOCAL`` statements after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import generators

__all__ = ["PgConnection", "begin_command"]

_IDLE = psycopg.pq.TransactionStatus.IDLE
_COMMAND_OK = psycopg.pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = psycopg.pq.ExecStatus.FATAL_ERROR


class PgConnection(psycopg.Connection[Any]):
    """``send_begin()`` sends the BEGIN (and any ``SET LOCAL`` the block needs, in the same
    message) without waiting for the answer; the next operation on the connection --
    normally the transaction's first statement, once SQLAlchemy has done its Python work
    for it -- collects that answer first (every psycopg operation goes through ``wait()``).
    The round trip then overlaps with that work instead of being waited for.  The server
    sees what it saw before: BEGIN, then the statements; an error of the BEGIN (or a
    connection lost meanwhile) is raised by that next operation, where the implicit BEGIN
    would have raised it.
    """

    _dbkit_pending = 0  # answers still to read: the BEGIN's and its companions'

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
        if self._dbkit_pending:
            self._collect_begin()
        return super().wait(gen, *args, **kwargs)

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
