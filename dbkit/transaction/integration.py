"""What integrations ask of a thread's transaction: ``dbkit.testing`` adopts a test's outer
transaction, ``dbkit.twophase`` takes the on_commit callbacks of a part it prepares.  A base
of ``TransactionManager``, kept apart so the manager stays about entering and leaving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dbkit.errors import TransactionError
from dbkit.transaction.state import Callback

if TYPE_CHECKING:
    from dbkit.connection import DbkitConnection

__all__ = ["IntegrationHooks"]


class IntegrationHooks:
    """Questions and hooks on this thread's transaction state (``TransactionManager``'s)."""

    _local: threading.local

    def _state(self) -> Any:  # the manager's per-thread state
        raise NotImplementedError

    def in_test_transaction(self) -> bool:
        """Whether this thread runs inside a test fixture's adopted transaction."""
        state = getattr(self._local, "state", None)
        return state is not None and state.testing

    def open_blocks(self) -> int:
        """How many ``db.transaction()`` blocks this thread has entered and not exited."""
        state = getattr(self._local, "state", None)
        return 0 if state is None else len(state.blocks)

    def queued_on_commit(self) -> list[Callback]:
        """This thread's queued on_commit entries ``(savepoint ids, func, robust)``, oldest
        first: a copy of the list, whose entries are stable objects (compare with ``is``)."""
        state = getattr(self._local, "state", None)
        return [] if state is None else list(state.callbacks)

    def take_on_commit(self) -> list[Callback]:
        """Remove and return this thread's queued on_commit entries: for a coordinator that
        commits the transaction itself (two-phase commit) and runs them after the whole."""
        state = getattr(self._local, "state", None)
        if state is None:
            return []
        taken, state.callbacks = state.callbacks, []
        return list(taken)

    @contextmanager
    def adopt(self, conn: DbkitConnection) -> Iterator[None]:
        """Make ``conn`` (with a transaction already begun by a test fixture) this thread's
        ambient connection: every block inside runs as a savepoint, durable ones included,
        and the fixture rolls everything back at the end."""
        state = self._state()
        if state.conn is not None:
            raise TransactionError("a transaction is already open in this thread")
        state.conn = conn
        state.testing = True
        state.server_isolation = conn.dialect.default_isolation_level or "READ COMMITTED"
        conn.guard = state
        try:
            yield
        finally:
            conn.guard = None
            state.conn = None
            state.testing = False
            state.reset()
