"""Nested transactions with Django ``atomic`` semantics on SQLAlchemy Core.

How a block runs
----------------
One pooled connection per outermost block; nested blocks are SAVEPOINTs on it.  All the
state of a thread's transaction lives in one ``TransactionState`` (per ``Database``, per
thread), as Django keeps it on the connection; a ``Transaction`` holds only the options
it was made with, so one instance can be entered again while it is open.

Entering the outermost block checks a connection out of the pool and begins: with fast
paths on, ``BEGIN [ISOLATION LEVEL …] [READ ONLY]``, the block's ``SET LOCAL
statement_timeout`` and its ``settings=`` (one ``SELECT set_config(…)``) are sent at
once and their answer is read with the first statement's, so beginning costs no round
trip of its own.  The connection becomes the thread's ambient one: ``db.execute``,
repositories and nested blocks use it.

Entering a nested block checks what may not be nested (durable, a different isolation, a
read-write block in a read-only one), then sends ``SAVEPOINT`` with, in the same round
trip, ``SET TRANSACTION READ ONLY``, the local timeout and the settings when the block
asks for them.  If that fails, the half-opened block is rolled back to its savepoint and
forgotten.

Every statement of the application passes the block's guard on the connection.  It
refuses statements once the block can no longer commit, and notices a failed statement:
PostgreSQL then aborts the whole transaction, so the status becomes ``ABORTED`` and only a
rollback to a savepoint taken before the failure can revive it.

Leaving a block depends on how it ends and on the status (``state.Status``):

- normally, status ``ACTIVE``: a nested block RELEASEs its savepoint (and puts back a
  timeout it changed, since ``SET LOCAL`` survives RELEASE); the outermost COMMITs, then
  runs the ``on_commit`` callbacks;
- by an exception, or with a status that forbids committing: a nested block with a
  savepoint sends ``ROLLBACK TO SAVEPOINT`` + ``RELEASE SAVEPOINT`` in one round trip, drops
  the callbacks registered under it, and its enclosing block is ``ACTIVE`` again; one
  without a savepoint (``savepoint=False``) hands the failure to the enclosing block
  (``MARKED``); the outermost rolls back.  An exception propagates unchanged.

A block that exits *normally* yet rolls back raises ``TransactionRolledBack``, chained from
the error that marked it, so nothing is ever silently reported as committed; only an
explicit ``set_rollback(True)`` (status ``ROLLBACK_ONLY``) rolls back silently.  A
serialization failure, deadlock, lock timeout or connection lost before COMMIT leaving the
outermost block becomes a ``RetryableError``; ``retries=`` re-runs the whole block
(``retry``), and waits without spending its re-runs while the database cannot be reached.

COMMIT itself: a read-write transaction's driver connection (``dbkit.xact``) notes which
statements wrote, and the transaction's id is in hand before COMMIT is sent.  When the
connection dies with COMMIT in flight, ``outcome`` asks a fresh connection
``pg_xact_status(id)``: committed → the block ends normally; aborted → ``RetryableError``;
still unknown → ``CommitOutcomeUnknown``, never retried.

Modules: ``options`` (what a block asks for), ``server_settings`` (its ``settings=``,
checked against the server's list), ``state`` (the plans, no I/O), ``manager``
(carrying them out on a connection), ``retry`` (what is worth running again), ``outcome``
(what became of a lost COMMIT).
"""

from dbkit.connection import DbkitConnection
from dbkit.transaction.manager import Transaction, TransactionManager, run_on_commit_callback
from dbkit.transaction.options import TransactionOptions
from dbkit.transaction.state import Status, TransactionState

__all__ = [
    "DbkitConnection",
    "Status",
    "Transaction",
    "TransactionManager",
    "TransactionOptions",
    "TransactionState",
    "run_on_commit_callback",
]
