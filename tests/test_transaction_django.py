"""``db.transaction()`` against Django's ``atomic`` test suite, plus dbkit's own rules.

Source of the scenarios: Django's ``tests/transactions/tests.py`` (AtomicTests,
AtomicInsideTransactionTests, AtomicMergeTests, AtomicErrorsTests, AtomicMiscTests,
DurableTests), see /work/shared/reference/transactions.md §2, and the acceptance checks of §6.
Expected rows and errors follow DESIGN.md "Transactions (the core)", which differs from Django
on purpose in one place: a block that exits normally after an *error* marked it for rollback
raises ``TransactionRolledBack`` (chained) instead of rolling back silently; only an explicit
``set_rollback(True)`` rolls back silently.

``Reporter`` rows are (first_name, last_name) pairs in a ``reporters`` table; they are
compared as sets, as Django's tests do.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from django_helpers import Names, create, names, run_threads
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

import dbkit
from dbkit import Database, TransactionBroken, TransactionError, TransactionRolledBack
from dbkit.errors import sqlstate_of

TINTIN = ("Tintin", "")
HADDOCK = ("", "Haddock")
ARCHIBALD = ("Archibald", "Haddock")
CALCULUS = ("Calculus", "")


class Oops(Exception):
    """The application error the scenarios raise (Django raises a bare ``Exception``)."""


# -- fixtures and helpers -----------------------------------------------------------------


def count(db: Database) -> int:
    n: int = db.scalar("SELECT count(*) FROM reporters")
    return n


def committed_names(db: Database) -> Names:
    """The committed rows, read on a connection of its own (never the ambient one)."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT first_name, last_name FROM reporters"))
        return {(r.first_name, r.last_name) for r in rows}


def backend_setting(db: Database, name: str) -> str:
    value: str = db.scalar(f"SHOW {name}")
    return value


class _EndOuter(Exception):
    """Ends the enclosing block of the "inside a transaction" mode with a rollback."""


@pytest.fixture(params=["toplevel", "inside_transaction"])
def scope(request: pytest.FixtureRequest, reporters: Database) -> Iterator[str]:
    """AtomicTests run twice: as is, and inside an already open ``db.transaction()``
    (Django's AtomicInsideTransactionTests), where every "outermost" block of the scenario is
    a savepoint and rows are read inside the still-open outer block.

    The outer block is ended by an exception rather than by ``set_rollback(True)``: a few
    scenarios leave it unable to commit, and how dbkit reports *that* is tested on its own
    (test_set_rollback_true_after_a_failed_statement_rolls_back_silently)."""
    db = reporters
    if request.param == "toplevel":
        yield request.param
        assert not db.in_transaction()
        return
    with contextlib.suppress(_EndOuter), db.transaction() as outer:
        yield request.param
        # No scenario may end or replace the enclosing block.
        assert db.in_transaction()
        assert db.connection() is outer
        # Blocks nested in it are savepoints: nothing is committed before it ends.
        assert committed_names(db) == set()
        raise _EndOuter
    assert not db.in_transaction()
    assert names(db) == set()


def inside(scope: str) -> bool:
    return scope == "inside_transaction"


@contextlib.contextmanager
def sql_log(db: Database) -> Iterator[list[str]]:
    """Every statement sent on the engine while the block runs (SQLAlchemy's public event)."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


# -- AtomicTests (21), top level and inside an open transaction ---------------------------


class TestAtomic:
    def test_decorator_syntax_commit(self, db: Database, scope: str) -> None:
        @db.transaction
        def make_reporter() -> int:
            assert db.in_transaction()
            return create(db, *TINTIN)

        new_id = make_reporter()
        assert isinstance(new_id, int)
        assert names(db) == {TINTIN}

    def test_decorator_syntax_rollback(self, db: Database, scope: str) -> None:
        @db.transaction
        def make_reporter() -> None:
            create(db, *HADDOCK)
            raise Oops("Oops, that's his last name")

        with pytest.raises(Oops, match="Oops"):
            make_reporter()
        assert names(db) == set()

    def test_alternate_decorator_syntax_commit(self, db: Database, scope: str) -> None:
        @db.transaction()
        def make_reporter() -> int:
            assert db.in_transaction()
            return create(db, *TINTIN)

        assert isinstance(make_reporter(), int)
        assert names(db) == {TINTIN}

    def test_alternate_decorator_syntax_rollback(self, db: Database, scope: str) -> None:
        @db.transaction()
        def make_reporter() -> None:
            create(db, *HADDOCK)
            raise Oops("Oops, that's his last name")

        with pytest.raises(Oops, match="Oops"):
            make_reporter()
        assert names(db) == set()

    def test_commit(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
        assert names(db) == {TINTIN}

    def test_rollback(self, db: Database, scope: str) -> None:
        with pytest.raises(Oops, match="Oops"), db.transaction():
            create(db, *HADDOCK)
            raise Oops("Oops, that's his last name")
        assert names(db) == set()

    def test_nested_commit_commit(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction():
                create(db, *ARCHIBALD)
        assert names(db) == {ARCHIBALD, TINTIN}

    def test_nested_commit_rollback(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(Oops), db.transaction():
                create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
        assert names(db) == {TINTIN}

    def test_nested_rollback_commit(self, db: Database, scope: str) -> None:
        with pytest.raises(Oops), db.transaction():
            create(db, *TINTIN)
            with db.transaction():
                create(db, *HADDOCK)
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_nested_rollback_rollback(self, db: Database, scope: str) -> None:
        with pytest.raises(Oops, match="first name"), db.transaction():
            create(db, *TINTIN)
            with pytest.raises(Oops, match="last name"):
                with db.transaction():
                    create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_merged_commit_commit(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction(savepoint=False):
                create(db, *ARCHIBALD)
        assert names(db) == {ARCHIBALD, TINTIN}

    def test_merged_commit_rollback(self, db: Database, scope: str) -> None:
        # Django: the outer block exits normally and silently rolls back everything.
        # DESIGN.md: the rollback is not silent, TransactionRolledBack chained from the error.
        with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
            create(db, *TINTIN)
            with pytest.raises(Oops) as oops, db.transaction(savepoint=False):
                create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
        assert rolled_back.value.__cause__ is oops.value
        # Writes in the outer block are rolled back too.
        assert names(db) == set()

    def test_merged_rollback_commit(self, db: Database, scope: str) -> None:
        with pytest.raises(Oops), db.transaction():
            create(db, *TINTIN)
            with db.transaction(savepoint=False):
                create(db, *HADDOCK)
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_merged_rollback_rollback(self, db: Database, scope: str) -> None:
        with pytest.raises(Oops, match="first name"), db.transaction():
            create(db, *TINTIN)
            with pytest.raises(Oops, match="last name"):
                with db.transaction(savepoint=False):
                    create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_reuse_commit_commit(self, db: Database, scope: str) -> None:
        atomic = db.transaction()
        with atomic:
            create(db, *TINTIN)
            with atomic:
                create(db, *ARCHIBALD)
        assert names(db) == {ARCHIBALD, TINTIN}

    def test_reuse_commit_rollback(self, db: Database, scope: str) -> None:
        atomic = db.transaction()
        with atomic:
            create(db, *TINTIN)
            with pytest.raises(Oops), atomic:
                create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
        assert names(db) == {TINTIN}

    def test_reuse_rollback_commit(self, db: Database, scope: str) -> None:
        atomic = db.transaction()
        with pytest.raises(Oops), atomic:
            create(db, *TINTIN)
            with atomic:
                create(db, *HADDOCK)
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_reuse_rollback_rollback(self, db: Database, scope: str) -> None:
        atomic = db.transaction()
        with pytest.raises(Oops, match="first name"), atomic:
            create(db, *TINTIN)
            with pytest.raises(Oops, match="last name"):
                with atomic:
                    create(db, *HADDOCK)
                raise Oops("Oops, that's his last name")
            raise Oops("Oops, that's his first name")
        assert names(db) == set()

    def test_force_rollback(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            # atomic block shouldn't roll back by default
            assert db.get_rollback() is False
            db.set_rollback(True)
            assert db.get_rollback() is True
        # Explicit set_rollback(True): a silent rollback (no exception above).
        assert names(db) == set()
        if inside(scope):
            # The savepoint took the flag with it: the enclosing block is clean.
            assert db.get_rollback() is False
            assert count(db) == 0

    def test_prevent_rollback(self, db: Database, scope: str) -> None:
        # Django takes a savepoint with transaction.savepoint(), makes a statement fail in
        # a savepoint=False block, calls set_rollback(False) and savepoint_rollback(sid).
        # dbkit has no public savepoint ids; the nearest public equivalent of the "prevent"
        # step is set_rollback(False) alone, which (DESIGN.md) cannot revive a transaction
        # in which a statement failed: the normal exit ends in TransactionRolledBack.
        # The savepoint-based recovery is test_prevent_rollback_with_a_savepoint_block.
        with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.ProgrammingError) as failure:
                with db.transaction(savepoint=False):
                    db.execute("SELECT no_such_col FROM reporters")
            assert isinstance(failure.value.orig, psycopg.errors.UndefinedColumn)
            # the savepoint=False block has marked the transaction for rollback
            assert db.get_rollback() is True
            db.set_rollback(False)
            assert db.get_rollback() is False
        assert rolled_back.value.__cause__ is failure.value
        assert names(db) == set()

    def test_prevent_rollback_with_a_savepoint_block(self, db: Database, scope: str) -> None:
        # The public equivalent of savepoint() + savepoint_rollback(sid): a nested block.
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.ProgrammingError), db.transaction():
                with db.transaction(savepoint=False):
                    db.execute("SELECT no_such_col FROM reporters")
            # rolling back to the savepoint cleared the flag and revived the transaction
            assert db.get_rollback() is False
            assert count(db) == 1
        assert names(db) == {TINTIN}

    def test_failure_on_exit_transaction(self, db: Database, scope: str) -> None:
        # Django appends a bogus id to connection.savepoint_ids so that RELEASE (and the
        # ROLLBACK TO fallback) fail when the inner block exits.  dbkit's savepoint ids are
        # not public; the nearest public-API equivalent is code in the block ending the
        # server transaction behind dbkit's back (raw ROLLBACK on the yielded connection),
        # so that the RELEASE at the block's exit fails ("savepoint does not exist").
        # Expected as in Django: the exit error propagates, the enclosing transaction can
        # no longer run statements, and nothing is committed; dbkit reports the enclosing
        # block's rollback with TransactionRolledBack instead of rolling back silently.
        with pytest.raises(TransactionRolledBack), db.transaction():
            with pytest.raises(sa_exc.DBAPIError) as exit_failure, db.transaction() as conn:
                create(db, *TINTIN)
                assert count(db) == 1
                conn.exec_driver_sql("ROLLBACK")
            assert sqlstate_of(exit_failure.value) == "3B001"  # invalid_savepoint_specification
            with pytest.raises(TransactionBroken):
                count(db)
        assert committed_names(db) == set()
        if not inside(scope):
            assert names(db) == set()


# -- AtomicMergeTests ----------------------------------------------------------------------


class TestAtomicMerge:
    def test_merged_outer_rollback(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction(savepoint=False):
                create(db, *ARCHIBALD)
                with pytest.raises(Oops), db.transaction(savepoint=False):
                    create(db, *CALCULUS)
                    raise Oops("Oops, that's his last name")
                # The third insert couldn't be roll back. Temporarily mark the
                # connection as not needing rollback to check it.
                assert db.get_rollback() is True
                db.set_rollback(False)
                assert count(db) == 3
                db.set_rollback(True)
            # The second insert couldn't be roll back. Temporarily mark the
            # connection as not needing rollback to check it.
            assert db.get_rollback() is True
            db.set_rollback(False)
            assert count(db) == 3
            db.set_rollback(True)
        # The first block has a savepoint and must roll back: silently (explicit flag).
        assert names(db) == set()

    def test_merged_inner_savepoint_rollback(self, db: Database, scope: str) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction():
                create(db, *ARCHIBALD)
                with pytest.raises(Oops), db.transaction(savepoint=False):
                    create(db, *CALCULUS)
                    raise Oops("Oops, that's his last name")
                # The third insert couldn't be roll back. Temporarily mark the
                # connection as not needing rollback to check it.
                assert db.get_rollback() is True
                db.set_rollback(False)
                assert count(db) == 3
                db.set_rollback(True)
            # The second block has a savepoint and must roll back.
            assert db.get_rollback() is False
            assert count(db) == 1
        assert names(db) == {TINTIN}


# -- AtomicErrorsTests ---------------------------------------------------------------------


class TestAtomicErrors:
    def test_atomic_prevents_calling_transaction_methods(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction() as conn:
            create(db, *TINTIN)
            with pytest.raises(TransactionError):
                conn.commit()
            with pytest.raises(TransactionError):
                conn.rollback()
            with pytest.raises(TransactionError):
                conn.begin()
            # The refused calls changed nothing: the block goes on and commits.
            assert conn.in_transaction()
            create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_atomic_prevents_calling_transaction_methods_in_nested_block(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction() as conn:
                for method in (conn.commit, conn.rollback, conn.begin):
                    with pytest.raises(TransactionError):
                        method()
                create(db, *CALCULUS)
            create(db, *HADDOCK)
        assert names(db) == {TINTIN, CALCULUS, HADDOCK}

    def test_atomic_prevents_setting_autocommit(self, db: Database, reporters: Any) -> None:
        # Django's set_autocommit(); here: switching the yielded connection to autocommit (or
        # any isolation level) while the block is open.  SQLAlchemy refuses it itself with
        # InvalidRequestError; DESIGN.md does not name the type, a TransactionError would do.
        with db.transaction() as conn:
            create(db, *TINTIN)
            with pytest.raises((TransactionError, sa_exc.InvalidRequestError)):
                conn.execution_options(isolation_level="AUTOCOMMIT")
            assert backend_setting(db, "transaction_isolation") == "read committed"
            create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_atomic_prevents_queries_in_broken_transaction(
        self, db: Database, reporters: Any
    ) -> None:
        r1 = create(db, *HADDOCK)
        with pytest.raises(TransactionBroken) as broken, db.transaction():
            with pytest.raises(sa_exc.IntegrityError) as duplicate:
                db.execute(
                    "INSERT INTO reporters (id, first_name, last_name) VALUES (:id, '', 'Haddock')",
                    {"id": r1},
                )
            # The transaction is marked as needing rollback.
            db.execute("UPDATE reporters SET last_name = 'Calculus' WHERE id = :id", {"id": r1})
        assert sqlstate_of(duplicate.value) == "23505"
        assert isinstance(broken.value.__cause__, sa_exc.IntegrityError)
        assert broken.value.__cause__ is duplicate.value
        # Not PostgreSQL's own 25P02 "current transaction is aborted".
        assert sqlstate_of(broken.value) != "25P02"
        assert db.execute("SELECT last_name FROM reporters WHERE id = :id", {"id": r1}).one() == (
            "Haddock",
        )

    def test_atomic_allows_queries_after_fixing_transaction(
        self, db: Database, reporters: Any
    ) -> None:
        # Django skips this test on PostgreSQL (atomic_transactions): set_rollback(False)
        # cannot revive an aborted transaction.  dbkit keeps refusing statements, chained
        # from the original error, and the block ends in TransactionRolledBack.
        r1 = create(db, *HADDOCK)
        with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
            with pytest.raises(sa_exc.IntegrityError) as duplicate:
                db.execute(
                    "INSERT INTO reporters (id, first_name, last_name) VALUES (:id, '', 'X')",
                    {"id": r1},
                )
            # Mark the transaction as no longer needing rollback.
            db.set_rollback(False)
            with pytest.raises(TransactionBroken) as broken:
                db.execute("UPDATE reporters SET last_name = 'Calculus' WHERE id = :id", {"id": r1})
            assert broken.value.__cause__ is duplicate.value
        assert rolled_back.value.__cause__ is duplicate.value
        assert names(db) == {HADDOCK}

    def test_broken_transaction_then_normal_exit_rolls_back_loudly(
        self, db: Database, reporters: Any
    ) -> None:
        # Acceptance §6: a swallowed DB error followed by a normal exit is never reported as
        # committed (PostgreSQL would turn the COMMIT into a ROLLBACK without an error).
        with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.ProgrammingError) as failure:
                db.execute("SELECT no_such_col FROM reporters")
            assert db.get_rollback() is True
            with pytest.raises(TransactionBroken) as broken:
                create(db, *CALCULUS)
            assert broken.value.__cause__ is failure.value
        assert rolled_back.value.__cause__ is failure.value
        assert names(db) == set()
        assert db.stats().in_use == 0

    def test_failure_outside_dbkits_view_is_never_reported_as_committed(
        self, db: Database, reporters: Any
    ) -> None:
        # A statement failed on the raw driver connection (no SQLAlchemy, no dbkit event)
        # and the error was swallowed: PostgreSQL would answer COMMIT with ROLLBACK and no
        # error.  The block must not end as if it had committed.
        with pytest.raises(TransactionRolledBack), db.transaction() as conn:
            create(db, *TINTIN)
            cursor = conn.connection.dbapi_connection.cursor()
            with pytest.raises(psycopg.errors.UndefinedColumn):
                cursor.execute("SELECT no_such_col FROM reporters")
        assert names(db) == set()
        assert db.stats().in_use == 0

    def test_broken_savepoint_then_normal_exit_rolls_back_only_the_savepoint(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
                create(db, *HADDOCK)
                with pytest.raises(sa_exc.ProgrammingError) as failure:
                    db.execute("SELECT no_such_col FROM reporters")
            assert isinstance(rolled_back.value.__cause__, sa_exc.ProgrammingError)
            assert rolled_back.value.__cause__ is failure.value
            # Back to the savepoint: the outer block is healthy again.
            assert db.get_rollback() is False
            create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_nested_block_in_broken_transaction_refuses_statements(
        self, db: Database, reporters: Any
    ) -> None:
        with pytest.raises(TransactionBroken) as broken, db.transaction():
            with pytest.raises(sa_exc.ProgrammingError) as failure:
                db.execute("SELECT no_such_col FROM reporters")
            with db.transaction():
                create(db, *TINTIN)
        assert broken.value.__cause__ is failure.value
        assert names(db) == set()

    @pytest.mark.parametrize(
        "options", [{"timeout": 1.0}, {"readonly": True}], ids=["timeout", "readonly"]
    )
    def test_entering_a_nested_block_in_broken_transaction(
        self, db: Database, reporters: Any, options: dict[str, Any]
    ) -> None:
        # A nested block whose options need a statement at entry (SET LOCAL statement_timeout,
        # SET TRANSACTION READ ONLY) in a transaction where a statement failed: refused like
        # any other statement, with TransactionBroken chained from the failure, and the
        # enclosing block still ends cleanly (rolled back, connection returned).
        # The block is refused at its entry, so no half-opened block is left behind.
        with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.ProgrammingError) as failure:
                db.execute("SELECT no_such_col FROM reporters")
            with pytest.raises(TransactionBroken) as broken, db.transaction(**options):
                create(db, *CALCULUS)
            assert broken.value.__cause__ is failure.value
        assert rolled_back.value.__cause__ is failure.value
        assert not db.in_transaction()
        assert db.stats().in_use == 0
        assert names(db) == set()

    def test_set_rollback_true_after_a_failed_statement_rolls_back_silently(
        self, db: Database, reporters: Any
    ) -> None:
        # DESIGN.md: "Only an explicit set_rollback(True) (the last word on the flag) rolls
        # back silently."  Here the explicit set_rollback(True) comes after the failure.
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.ProgrammingError):
                db.execute("SELECT no_such_col FROM reporters")
            db.set_rollback(True)
        assert names(db) == set()

    def test_set_rollback_true_after_a_failed_statement_in_savepoint_block(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with db.transaction():
                create(db, *HADDOCK)
                with pytest.raises(sa_exc.ProgrammingError):
                    db.execute("SELECT no_such_col FROM reporters")
                db.set_rollback(True)
            # silently back to the savepoint, and healthy again
            assert db.get_rollback() is False
            create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_atomic_prevents_queries_in_broken_transaction_after_client_close(
        self, db: Database, reporters: Any
    ) -> None:
        # Django: connection.close() inside atomic, the next query fails, nothing is saved,
        # the connection is usable afterwards.  dbkit refuses close() on the yielded
        # connection (the block owns it); an error leaving the block rolls it back.
        with pytest.raises(TransactionError), db.transaction() as conn:
            create(db, *HADDOCK)
            conn.close()
        assert count(db) == 0
        # The Database is still usable.
        with db.transaction():
            create(db, *CALCULUS)
        assert names(db) == {CALCULUS}
        assert db.stats().in_use == 0

    def test_refused_close_leaves_the_block_usable(self, db: Database, reporters: Any) -> None:
        with db.transaction() as conn:
            create(db, *HADDOCK)
            with pytest.raises(TransactionError):
                conn.close()
            assert not conn.closed
            create(db, *CALCULUS)
        assert names(db) == {HADDOCK, CALCULUS}


# -- AtomicMiscTests -----------------------------------------------------------------------


class TestAtomicMisc:
    def test_wrap_callable_instance(self, db: Database, reporters: Any) -> None:
        """#20028 -- Atomic must support wrapping callable instances."""
        seen: list[bool] = []

        class CallableObj:
            def __call__(self) -> str:
                seen.append(db.in_transaction())
                create(db, *TINTIN)
                return "done"

        # Must not raise an exception
        wrapped = db.transaction(CallableObj())
        assert wrapped() == "done"
        assert seen == [True]
        assert names(db) == {TINTIN}

    def test_atomic_does_not_leak_savepoints_on_failure(self, db: Database, reporters: Any) -> None:
        """#23074 -- Savepoints must be released after rollback."""
        # Django reads the savepoint id from connection.savepoint_ids; here it is read
        # from the SQL sent (SQLAlchemy's before_cursor_execute event).  Rolling back to
        # the savepoint again must fail: the block released it after ROLLBACK TO.
        with sql_log(db) as statements:
            with pytest.raises(sa_exc.DBAPIError) as reuse, db.transaction() as conn:
                with pytest.raises(Oops), db.transaction():
                    raise Oops("Oops")
                savepoints = [s.split()[-1] for s in statements if s.startswith("SAVEPOINT")]
                assert len(savepoints) == 1
                sid = savepoints[0]
                # Both in one round trip.
                assert statements[-1] == f"ROLLBACK TO SAVEPOINT {sid}; RELEASE SAVEPOINT {sid}"
                # This is expected to fail because the savepoint no longer exists.
                conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {sid}")
        assert sqlstate_of(reuse.value) == "3B001"

    def test_outer_block_works_after_inner_failures(self, db: Database, reporters: Any) -> None:
        with sql_log(db) as statements, db.transaction():
            create(db, *TINTIN)
            for _ in range(3):
                with pytest.raises(Oops), db.transaction():
                    create(db, *HADDOCK)
                    raise Oops("Oops")
            with pytest.raises(sa_exc.ProgrammingError), db.transaction():
                db.execute("SELECT no_such_col FROM reporters")
            create(db, *CALCULUS)
            assert count(db) == 2
        assert names(db) == {TINTIN, CALCULUS}
        # Every savepoint taken was released.
        taken = [s.split()[-1] for s in statements if s.startswith("SAVEPOINT")]
        commands = [c.strip() for s in statements for c in s.split(";")]  # several per trip
        released = [c.split()[-1] for c in commands if c.startswith("RELEASE SAVEPOINT")]
        assert len(taken) == 4
        assert released == taken

    def test_mark_for_rollback_on_error_in_transaction(self, db: Database, reporters: Any) -> None:
        # Django's internal mark_for_rollback_on_error() has no public counterpart; an
        # exception leaving a savepoint=False block is the public way to mark the
        # transaction.  Statements are then refused (chained from the exception) and the
        # block rolls back; afterwards, work outside any block succeeds.
        with pytest.raises(TransactionBroken) as broken:
            with db.transaction(savepoint=False):
                with pytest.raises(Oops) as oops, db.transaction(savepoint=False):
                    assert db.get_rollback() is False
                    raise Oops("Oops")
                # mark_for_rollback_on_error marked the transaction as broken …
                assert db.get_rollback() is True
                # … and further queries fail.
                create(db, *TINTIN)
        assert broken.value.__cause__ is oops.value
        # Transaction errors are reset at the end of an transaction, so this should just work.
        create(db, *CALCULUS)
        assert names(db) == {CALCULUS}

    def test_mark_for_rollback_on_error_in_autocommit(self, db: Database, reporters: Any) -> None:
        # Outside any block an exception marks nothing, and the flag is not even readable.
        with pytest.raises(Oops):
            raise Oops("Oops")
        with pytest.raises(TransactionError):
            db.get_rollback()
        # Transaction errors are reset at the end of an transaction, so this should just work.
        create(db, *TINTIN)
        assert names(db) == {TINTIN}


# -- Durable blocks ------------------------------------------------------------------------


class TestDurable:
    def test_commit(self, db: Database, reporters: Any) -> None:
        with db.transaction(durable=True):
            create(db, *TINTIN)
            assert committed_names(db) == set()
        assert names(db) == {TINTIN}

    def test_nested_outer_durable(self, db: Database, reporters: Any) -> None:
        with db.transaction(durable=True):
            create(db, *TINTIN)
            with db.transaction():
                create(db, *ARCHIBALD)
        assert names(db) == {TINTIN, ARCHIBALD}

    def test_nested_both_durable(self, db: Database, reporters: Any) -> None:
        ran: list[str] = []
        with db.transaction(durable=True):
            create(db, *TINTIN)
            with pytest.raises(TransactionError, match="durable"), db.transaction(durable=True):
                ran.append("inner")
            create(db, *CALCULUS)
        assert ran == []
        assert names(db) == {TINTIN, CALCULUS}

    def test_nested_inner_durable(self, db: Database, reporters: Any) -> None:
        ran: list[str] = []
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(TransactionError, match="durable"), db.transaction(durable=True):
                ran.append("inner")
            # The outer block is still usable and not marked for rollback.
            assert db.get_rollback() is False
            create(db, *CALCULUS)
        assert ran == []
        assert names(db) == {TINTIN, CALCULUS}

    def test_nested_inner_durable_decorator(self, db: Database, reporters: Any) -> None:
        @db.transaction(durable=True)
        def durable_work() -> None:
            create(db, *HADDOCK)

        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(TransactionError):
                durable_work()
        assert names(db) == {TINTIN}
        durable_work()  # outermost: fine
        assert names(db) == {TINTIN, HADDOCK}

    def test_sequence_of_durables(self, db: Database, reporters: Any) -> None:
        with db.transaction(durable=True):
            create(db, "Tintin 1", "")
        assert names(db) == {("Tintin 1", "")}
        with db.transaction(durable=True):
            create(db, "Tintin 2", "")
        assert names(db) == {("Tintin 1", ""), ("Tintin 2", "")}


# -- readonly / isolation / timeout ----------------------------------------------------------


class TestModes:
    def test_outermost_isolation_and_back_to_default(self, db: Database, reporters: Any) -> None:
        with db.transaction(isolation="serializable"):
            assert backend_setting(db, "transaction_isolation") == "serializable"
            with db.transaction(isolation="serializable"):
                # the same isolation as the enclosing block is allowed
                assert backend_setting(db, "transaction_isolation") == "serializable"
            create(db, *TINTIN)
        assert names(db) == {TINTIN}
        # the pooled connection does not keep the level for the next block
        with db.transaction():
            assert backend_setting(db, "transaction_isolation") == "read committed"

    def test_nested_isolation_differing_is_refused(self, db: Database, reporters: Any) -> None:
        ran: list[str] = []
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(TransactionError), db.transaction(isolation="serializable"):
                ran.append("inner")
            with db.transaction(isolation="read committed"):  # the server default: same
                create(db, *CALCULUS)
            assert backend_setting(db, "transaction_isolation") == "read committed"
        assert ran == []
        assert names(db) == {TINTIN, CALCULUS}

    def test_nested_isolation_differing_from_explicit_outer_is_refused(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction(isolation="repeatable read"):
            with pytest.raises(TransactionError), db.transaction(isolation="serializable"):
                pass
            with pytest.raises(TransactionError), db.transaction(isolation="read committed"):
                pass
            create(db, *TINTIN)
        assert names(db) == {TINTIN}

    def test_unknown_isolation_is_refused(self, db: Database) -> None:
        with pytest.raises(TransactionError):
            db.transaction(isolation="chaos")

    def test_readonly_outermost(self, db: Database, reporters: Any) -> None:
        with pytest.raises(sa_exc.DBAPIError) as denied, db.transaction(readonly=True):
            assert backend_setting(db, "transaction_read_only") == "on"
            assert count(db) == 0
            create(db, *TINTIN)
        assert isinstance(denied.value.orig, psycopg.errors.ReadOnlySqlTransaction)
        assert names(db) == set()
        # The next block (same pooled connection) is read-write again.
        with db.transaction():
            assert backend_setting(db, "transaction_read_only") == "off"
            create(db, *CALCULUS)
        assert names(db) == {CALCULUS}

    def test_read_write_inside_read_only_is_refused(self, db: Database, reporters: Any) -> None:
        ran: list[str] = []
        with db.transaction(readonly=True):
            with pytest.raises(TransactionError), db.transaction(readonly=False):
                ran.append("inner")
            # readonly=None inherits: still read-only
            with pytest.raises(sa_exc.DBAPIError) as denied, db.transaction():
                assert backend_setting(db, "transaction_read_only") == "on"
                create(db, *TINTIN)
            assert isinstance(denied.value.orig, psycopg.errors.ReadOnlySqlTransaction)
            assert count(db) == 0
        assert ran == []
        assert names(db) == set()

    def test_readonly_nested_in_read_write(self, db: Database, reporters: Any) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(sa_exc.DBAPIError) as denied, db.transaction(readonly=True):
                assert backend_setting(db, "transaction_read_only") == "on"
                assert count(db) == 1  # reads are fine, and see the outer block's rows
                create(db, *HADDOCK)
            assert isinstance(denied.value.orig, psycopg.errors.ReadOnlySqlTransaction)
            # after it the outer block can write again
            assert backend_setting(db, "transaction_read_only") == "off"
            create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_readonly_nested_block_exiting_normally_restores_read_write(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction():
            with db.transaction(readonly=True):
                assert count(db) == 0
                assert backend_setting(db, "transaction_read_only") == "on"
            assert backend_setting(db, "transaction_read_only") == "off"
            create(db, *TINTIN)
            with db.transaction():  # inherits read-write
                create(db, *CALCULUS)
        assert names(db) == {TINTIN, CALCULUS}

    def test_timeout_cancels_a_long_statement(self, db: Database, reporters: Any) -> None:
        with pytest.raises(sa_exc.OperationalError) as canceled, db.transaction(timeout=0.2):
            create(db, *TINTIN)
            db.execute("SELECT pg_sleep(2)")
        assert isinstance(canceled.value.orig, psycopg.errors.QueryCanceled)
        assert sqlstate_of(canceled.value) == "57014"
        assert names(db) == set()

    def test_timeout_of_outermost_block_ends_with_it(self, db: Database) -> None:
        before = backend_setting(db, "statement_timeout")
        with db.transaction(timeout=0.25):
            assert backend_setting(db, "statement_timeout") == "250ms"
        assert backend_setting(db, "statement_timeout") == before
        with db.transaction():
            assert backend_setting(db, "statement_timeout") == before

    def test_nested_timeout_does_not_leak(self, db: Database, reporters: Any) -> None:
        with db.transaction():
            before = backend_setting(db, "statement_timeout")
            assert before != "250ms"
            with db.transaction(timeout=0.25):
                assert backend_setting(db, "statement_timeout") == "250ms"
            assert backend_setting(db, "statement_timeout") == before
            with pytest.raises(Oops), db.transaction(timeout=0.25):
                raise Oops("Oops")
            assert backend_setting(db, "statement_timeout") == before
            with db.transaction(savepoint=False, timeout=0.25):
                assert backend_setting(db, "statement_timeout") == "250ms"
            assert backend_setting(db, "statement_timeout") == before
            with pytest.raises(sa_exc.OperationalError) as canceled, db.transaction(timeout=0.2):
                db.execute("SELECT pg_sleep(2)")
            assert sqlstate_of(canceled.value) == "57014"
            assert backend_setting(db, "statement_timeout") == before
            # a statement longer than the nested timeout is fine in the enclosing block
            db.execute("SELECT pg_sleep(0.3)")
            create(db, *TINTIN)
        assert names(db) == {TINTIN}

    def test_nested_timeout_restores_the_enclosing_blocks_timeout(self, db: Database) -> None:
        with db.transaction(timeout=5):
            assert backend_setting(db, "statement_timeout") == "5s"
            with db.transaction(timeout=0.25):
                assert backend_setting(db, "statement_timeout") == "250ms"
                with db.transaction(timeout=0.5):
                    assert backend_setting(db, "statement_timeout") == "500ms"
                assert backend_setting(db, "statement_timeout") == "250ms"
            assert backend_setting(db, "statement_timeout") == "5s"


# -- misuse -----------------------------------------------------------------------------------


class TestMisuse:
    def test_retries_on_plain_with_is_refused(self, db: Database, reporters: Any) -> None:
        ran: list[str] = []
        with pytest.raises(TransactionError), db.transaction(retries=3):
            ran.append("body")
        assert ran == []
        assert not db.in_transaction()
        assert db.stats().in_use == 0

    def test_retries_on_nested_block_is_refused(self, db: Database, reporters: Any) -> None:
        calls: list[int] = []

        @db.transaction(retries=3)
        def work() -> None:
            calls.append(1)
            create(db, *HADDOCK)

        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(TransactionError):
                work()
            with pytest.raises(TransactionError), db.transaction(retries=2):
                calls.append(2)
            create(db, *CALCULUS)
        assert calls == []
        assert names(db) == {TINTIN, CALCULUS}

    def test_out_of_order_exit(self, db: Database, reporters: Any) -> None:
        outer, inner = db.transaction(), db.transaction()
        outer.__enter__()
        create(db, *TINTIN)
        inner.__enter__()
        create(db, *CALCULUS)
        with pytest.raises(TransactionError):
            outer.__exit__(None, None, None)
        # Nothing was ended: both blocks are still open, in order.
        assert db.in_transaction()
        assert count(db) == 2
        inner.__exit__(None, None, None)
        assert db.in_transaction()
        outer.__exit__(None, None, None)
        assert not db.in_transaction()
        assert names(db) == {TINTIN, CALCULUS}
        # Exiting a block that is not open at all is refused too.
        with pytest.raises(TransactionError):
            outer.__exit__(None, None, None)

    def test_keyboard_interrupt_rolls_back_and_returns_the_connection(
        self, db: Database, reporters: Any
    ) -> None:
        with pytest.raises(KeyboardInterrupt), db.transaction():
            create(db, *TINTIN)
            with db.transaction():
                create(db, *HADDOCK)
                raise KeyboardInterrupt
        assert not db.in_transaction()
        assert db.stats().in_use == 0
        assert names(db) == set()
        with pytest.raises(KeyboardInterrupt), db.transaction():
            create(db, *TINTIN)
            raise KeyboardInterrupt
        assert db.stats().in_use == 0
        assert names(db) == set()

    def test_keyboard_interrupt_during_a_statement(self, db: Database, reporters: Any) -> None:
        # Ctrl-C while a statement waits in the server (here: for a row lock held by another
        # connection).  The interrupt is sent once the server reports the block's session
        # waiting for the lock; the wait for that happens in SQL, on a third connection.
        create(db, *TINTIN)
        main_thread = threading.main_thread().ident
        assert main_thread == threading.get_ident()

        def interrupt_when_waiting(pid: int) -> None:
            with db.engine.connect() as watcher:
                watcher.exec_driver_sql(
                    "DO $$ BEGIN FOR i IN 1..3000 LOOP"
                    f" IF EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = {pid}"
                    " AND wait_event_type = 'Lock') THEN RETURN; END IF;"
                    " PERFORM pg_sleep(0.01); END LOOP;"
                    " RAISE EXCEPTION 'the block never waited for the lock'; END $$"
                )
            signal.pthread_kill(main_thread, signal.SIGINT)

        with db.engine.connect() as locker:
            locker.exec_driver_sql("SELECT id FROM reporters FOR UPDATE")
            with pytest.raises(KeyboardInterrupt), db.transaction() as conn:
                create(db, *CALCULUS)
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                watcher = threading.Thread(target=interrupt_when_waiting, args=(pid,))
                watcher.start()
                try:
                    db.execute("UPDATE reporters SET last_name = 'Interrupted'")
                finally:
                    watcher.join(timeout=60)
            assert not db.in_transaction()
            locker.rollback()
        assert db.stats().in_use == 0
        assert names(db) == {TINTIN}
        # Nothing of the interrupted block is left running on the server.
        assert (
            db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'UPDATE reporters%'"
                " AND state <> 'idle'"
            )
            == 0
        )
        with db.transaction():
            create(db, *HADDOCK)
        assert names(db) == {TINTIN, HADDOCK}

    def test_keyboard_interrupt_in_nested_block_rolls_back_its_savepoint(
        self, db: Database, reporters: Any
    ) -> None:
        with db.transaction():
            create(db, *TINTIN)
            with pytest.raises(KeyboardInterrupt), db.transaction():
                create(db, *HADDOCK)
                raise KeyboardInterrupt
            assert count(db) == 1
        assert names(db) == {TINTIN}
        assert db.stats().in_use == 0

    def test_get_and_set_rollback_outside_a_block(self, db: Database) -> None:
        with pytest.raises(TransactionError):
            db.get_rollback()
        with pytest.raises(TransactionError):
            db.set_rollback(True)
        with pytest.raises(TransactionError):
            db.set_rollback(False)
        with db.transaction():
            pass
        with pytest.raises(TransactionError):
            db.get_rollback()

    def test_in_transaction(self, db: Database, reporters: Any) -> None:
        assert db.in_transaction() is False
        assert db.connection() is None
        with db.transaction() as conn:
            assert db.in_transaction() is True
            assert isinstance(conn, sa.Connection)
            assert db.connection() is conn
            with db.transaction(savepoint=False) as same, db.transaction() as again:
                assert same is conn
                assert again is conn
                assert db.in_transaction() is True
            assert db.in_transaction() is True
        assert db.in_transaction() is False
        with pytest.raises(Oops), db.transaction():
            raise Oops("Oops")
        assert db.in_transaction() is False
        assert db.connection() is None

    def test_errors_are_exported(self) -> None:
        assert issubclass(dbkit.TransactionBroken, dbkit.TransactionError)
        assert issubclass(dbkit.TransactionRolledBack, dbkit.TransactionError)
        assert issubclass(dbkit.TransactionError, dbkit.DbkitError)


# -- deep nesting ------------------------------------------------------------------------------


class TestDeepNesting:
    def test_100_nested_savepoints_all_commit(self, db: Database, reporters: Any) -> None:
        with sql_log(db) as statements, contextlib.ExitStack() as stack:
            stack.enter_context(db.transaction())
            create(db, "level", "0")
            for level in range(1, 101):
                stack.enter_context(db.transaction())
                create(db, "level", str(level))
            assert count(db) == 101
        assert names(db) == {("level", str(n)) for n in range(101)}
        assert sum(s.startswith("SAVEPOINT") for s in statements) == 100
        assert sum(s.startswith("RELEASE SAVEPOINT") for s in statements) == 100

    def test_100_nested_savepoints_the_innermost_fails(self, db: Database, reporters: Any) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(db.transaction())
            create(db, "level", "0")
            for level in range(1, 100):
                stack.enter_context(db.transaction())
                create(db, "level", str(level))
            with pytest.raises(Oops), db.transaction():
                create(db, "level", "100")
                raise Oops("the 100th")
            assert count(db) == 100
        assert names(db) == {("level", str(n)) for n in range(100)}


# -- threads -----------------------------------------------------------------------------------


class TestThreads:
    def test_threads_have_their_own_ambient_transaction(self, db: Database, reporters: Any) -> None:
        both_wrote = threading.Barrier(2, timeout=30)
        both_read = threading.Barrier(2, timeout=30)
        seen: dict[str, Names] = {}
        connections: dict[str, Any] = {}

        def worker(name: str) -> Callable[[], None]:
            def run() -> None:
                with db.transaction() as conn:
                    connections[name] = conn
                    create(db, name, "")
                    both_wrote.wait()
                    seen[name] = names(db)
                    both_read.wait()

            return run

        run_threads(worker("A"), worker("B"), barriers=(both_wrote, both_read))
        assert seen == {"A": {("A", "")}, "B": {("B", "")}}
        assert connections["A"] is not connections["B"]
        assert names(db) == {("A", ""), ("B", "")}
        assert db.stats().in_use == 0

    def test_thread_without_a_block_does_not_join_another_threads_block(
        self, db: Database, reporters: Any
    ) -> None:
        other: dict[str, Any] = {}

        def outsider() -> None:
            other["in_transaction"] = db.in_transaction()
            other["connection"] = db.connection()
            other["seen"] = names(db)
            create(db, "Outsider", "")  # autocommit, on a connection of its own
            with pytest.raises(TransactionError):
                db.get_rollback()

        with db.transaction():
            create(db, *TINTIN)
            run_threads(outsider)
            # The outsider's autocommitted row is visible here (read committed) …
            assert names(db) == {TINTIN, ("Outsider", "")}
            db.set_rollback(True)
        assert other == {"in_transaction": False, "connection": None, "seen": set()}
        # … and survives this block's rollback: it never was part of it.
        assert names(db) == {("Outsider", "")}
        assert db.stats().in_use == 0
