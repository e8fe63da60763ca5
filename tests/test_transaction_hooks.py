"""``db.on_commit`` (Django's ``TestConnectionOnCommit``) and whole-transaction retries.

Source: Django's ``tests/transaction_hooks/tests.py`` (reference/transactions.md §1.3, §2.8)
and the retry rules of §5; expectations follow DESIGN.md "Transactions (the core)".
``do(n)`` inserts a row and registers ``on_commit(lambda: notify(n))``; ``assert_done(nums)``
checks the callbacks that ran (in order) and the rows that were committed.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from django_helpers import Names, create, names, run_threads
from loguru import logger
from sqlalchemy import exc as sa_exc

import dbkit
from dbkit import Database, RetryableError, TransactionError, TransactionRolledBack
from dbkit.errors import sqlstate_of


class ForcedError(Exception):
    pass


class Oops(Exception):
    pass


# -- fixtures and helpers -----------------------------------------------------------------


class Hooks:
    """Django's ``do`` / ``notify`` / ``assertDone`` on top of the reporters table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.notified: list[int | str] = []

    def notify(self, id_: int | str) -> None:
        if id_ == "error":
            raise ForcedError()
        self.notified.append(id_)

    def do(self, num: int) -> int:
        """Create a Thing instance and notify about it."""
        create(self.db, str(num), "thing")
        self.db.on_commit(lambda: self.notify(num))
        return num

    def committed_nums(self) -> list[int]:
        return sorted(int(first) for first, _ in names(self.db))

    def assert_done(self, nums: list[int]) -> None:
        assert self.notified == nums
        self.assert_nums_committed(nums)

    def assert_nums_committed(self, nums: list[int]) -> None:
        assert self.committed_nums() == sorted(nums)

    def assert_not_notified(self) -> None:
        assert self.notified == []


@pytest.fixture
def hooks(reporters: Database) -> Hooks:
    return Hooks(reporters)


@pytest.fixture
def dbkit_log() -> Iterator[list[Any]]:
    """loguru records emitted by dbkit (which is silent unless enabled)."""
    records: list[Any] = []
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG")
    logger.enable("dbkit")
    try:
        yield records
    finally:
        logger.remove(sink)
        logger.disable("dbkit")


# -- TestConnectionOnCommit ---------------------------------------------------------------


class TestOnCommit:
    def test_executes_immediately_if_no_transaction(self, hooks: Hooks) -> None:
        hooks.do(1)
        hooks.assert_done([1])

    def test_robust_if_no_transaction(
        self, db: Database, hooks: Hooks, dbkit_log: list[Any]
    ) -> None:
        error = ForcedError("robust callback")

        def robust_callback() -> None:
            raise error

        db.on_commit(robust_callback, robust=True)
        hooks.do(1)
        hooks.assert_done([1])
        failures = [r for r in dbkit_log if r["level"].name == "ERROR"]
        assert len(failures) == 1
        assert failures[0]["exception"].value is error
        assert "robust_callback" in failures[0]["message"]

    def test_robust_if_no_transaction_with_callback_as_partial(
        self, db: Database, hooks: Hooks, dbkit_log: list[Any]
    ) -> None:
        error = ForcedError("robust callback")

        def robust_callback() -> None:
            raise error

        db.on_commit(functools.partial(robust_callback), robust=True)
        hooks.do(1)
        hooks.assert_done([1])
        failures = [r for r in dbkit_log if r["level"].name == "ERROR"]
        assert len(failures) == 1
        assert failures[0]["exception"].value is error
        assert "robust_callback" in failures[0]["message"]

    def test_robust_transaction(self, db: Database, hooks: Hooks, dbkit_log: list[Any]) -> None:
        error = ForcedError("robust callback")

        def robust_callback() -> None:
            raise error

        with db.transaction():
            db.on_commit(robust_callback, robust=True)
            hooks.do(1)
            assert dbkit_log == []

        # the failing robust callback was logged and the next callback still ran
        hooks.assert_done([1])
        failures = [r for r in dbkit_log if r["level"].name == "ERROR"]
        assert len(failures) == 1
        assert failures[0]["exception"].value is error
        assert "robust_callback" in failures[0]["message"]

    def test_robust_transaction_with_callback_as_partial(
        self, db: Database, hooks: Hooks, dbkit_log: list[Any]
    ) -> None:
        error = ForcedError("robust callback")

        def robust_callback() -> None:
            raise error

        with db.transaction():
            db.on_commit(functools.partial(robust_callback), robust=True)
            hooks.do(1)

        hooks.assert_done([1])
        failures = [r for r in dbkit_log if r["level"].name == "ERROR"]
        assert len(failures) == 1
        assert failures[0]["exception"].value is error
        assert "robust_callback" in failures[0]["message"]

    def test_delays_execution_until_after_transaction_commit(
        self, db: Database, hooks: Hooks
    ) -> None:
        with db.transaction():
            hooks.do(1)
            hooks.assert_not_notified()
        hooks.assert_done([1])

    def test_does_not_execute_if_transaction_rolled_back(self, db: Database, hooks: Hooks) -> None:
        with pytest.raises(ForcedError), db.transaction():
            hooks.do(1)
            raise ForcedError()

        hooks.assert_done([])

    def test_executes_only_after_final_transaction_committed(
        self, db: Database, hooks: Hooks
    ) -> None:
        with db.transaction():
            with db.transaction():
                hooks.do(1)
                hooks.assert_not_notified()
            hooks.assert_not_notified()
        hooks.assert_done([1])

    def test_discards_hooks_from_rolled_back_savepoint(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            # one successful savepoint
            with db.transaction():
                hooks.do(1)
            # one failed savepoint
            with pytest.raises(ForcedError), db.transaction():
                hooks.do(2)
                raise ForcedError()
            # another successful savepoint
            with db.transaction():
                hooks.do(3)

        # only hooks registered during successful savepoints execute
        hooks.assert_done([1, 3])

    def test_no_hooks_run_from_failed_transaction(self, db: Database, hooks: Hooks) -> None:
        """If outer transaction fails, no hooks from within it run."""
        with pytest.raises(ForcedError), db.transaction():
            with db.transaction():
                hooks.do(1)
            raise ForcedError()

        hooks.assert_done([])

    def test_inner_savepoint_rolled_back_with_outer(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            with pytest.raises(ForcedError), db.transaction():
                with db.transaction():
                    hooks.do(1)
                raise ForcedError()
            hooks.do(2)

        # 1 was registered in a released inner savepoint, dropped with its parent
        hooks.assert_done([2])

    def test_no_savepoints_atomic_merged_with_outer(self, db: Database, hooks: Hooks) -> None:
        # Django: the middle block rolls back silently.  DESIGN.md: an exception that left
        # a savepoint=False block marked it, so its normal exit raises TransactionRolledBack
        # (chained); its callbacks are dropped, the outermost block still commits.
        with db.transaction():
            hooks.do(0)
            with pytest.raises(TransactionRolledBack) as rolled_back, db.transaction():
                hooks.do(1)
                with pytest.raises(ForcedError) as forced, db.transaction(savepoint=False):
                    raise ForcedError()
            assert rolled_back.value.__cause__ is forced.value

        hooks.assert_done([0])

    def test_inner_savepoint_does_not_affect_outer(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            with db.transaction():
                hooks.do(1)
                with pytest.raises(ForcedError), db.transaction():
                    raise ForcedError()

        hooks.assert_done([1])

    def test_runs_hooks_in_order_registered(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            hooks.do(1)
            with db.transaction():
                hooks.do(2)
            hooks.do(3)

        hooks.assert_done([1, 2, 3])

    def test_hooks_cleared_after_successful_commit(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            hooks.do(1)
        with db.transaction():
            hooks.do(2)

        hooks.assert_done([1, 2])  # not [1, 1, 2]

    def test_hooks_cleared_after_rollback(self, db: Database, hooks: Hooks) -> None:
        with pytest.raises(ForcedError), db.transaction():
            hooks.do(1)
            raise ForcedError()

        with db.transaction():
            hooks.do(2)

        hooks.assert_done([2])

    def test_hooks_cleared_on_connection_loss(self, db: Database, hooks: Hooks) -> None:
        # Django closes the connection in the block (close_pool) and reconnects.  Here the
        # block's server session is terminated from another connection; its COMMIT cannot
        # happen (pg_xact_status says aborted, or the link fails before COMMIT is sent: the
        # block may run again), its callbacks never run, and the next block starts clean.
        with pytest.raises(RetryableError) as lost, db.transaction() as conn:
            hooks.do(1)
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with db.engine.connect() as other:
                # waits (up to 10 s) until the session is gone
                stopped = other.execute(
                    sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
                ).scalar_one()
            assert stopped is True
        assert isinstance(lost.value.__cause__, sa_exc.DBAPIError)

        with db.transaction():
            hooks.do(2)

        hooks.assert_done([2])
        assert db.stats().in_use == 0

    def test_error_in_hook_doesnt_prevent_clearing_hooks(self, db: Database, hooks: Hooks) -> None:
        with pytest.raises(ForcedError), db.transaction():
            create(db, "100", "thing")
            db.on_commit(lambda: hooks.notify("error"))
            db.on_commit(lambda: hooks.notify(100))  # lost with the failing one before it

        # The error left the block after the COMMIT: the data is saved.
        hooks.assert_nums_committed([100])
        assert not db.in_transaction()

        with db.transaction():
            hooks.do(1)

        assert hooks.notified == [1]
        hooks.assert_nums_committed([1, 100])

    def test_db_query_in_hook(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            create(db, "1", "thing")
            db.on_commit(lambda: [hooks.notify(n) for n in hooks.committed_nums()])

        hooks.assert_done([1])

    def test_hook_sees_committed_data_from_another_connection(
        self, db: Database, hooks: Hooks
    ) -> None:
        seen: list[Names] = []

        def read_elsewhere() -> None:
            with db.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT first_name, last_name FROM reporters"))
                seen.append({(r.first_name, r.last_name) for r in rows})
            seen.append({("in_transaction", str(db.in_transaction()))})

        with db.transaction():
            create(db, "1", "thing")
            db.on_commit(read_elsewhere)

        assert seen == [{("1", "thing")}, {("in_transaction", "False")}]

    def test_transaction_in_hook(self, db: Database, hooks: Hooks) -> None:
        def on_commit() -> None:
            with db.transaction():
                create(db, "1", "thing")
                hooks.notify(1)

        with db.transaction():
            db.on_commit(on_commit)

        hooks.assert_done([1])

    def test_hook_in_hook(self, db: Database, hooks: Hooks) -> None:
        def on_commit(i: int, add_hook: bool) -> None:
            with db.transaction():
                if add_hook:
                    db.on_commit(lambda: on_commit(i + 10, False))
                create(db, str(i), "thing")
                hooks.notify(i)

        with db.transaction():
            db.on_commit(lambda: on_commit(1, True))
            db.on_commit(lambda: on_commit(2, True))

        hooks.assert_done([1, 11, 2, 12])

    def test_hook_from_a_thread_without_a_block_runs_at_once(
        self, db: Database, hooks: Hooks
    ) -> None:
        # Django's test_raises_exception_non_autocommit_mode has no dbkit counterpart (no
        # manual transaction mode).  The thread-local analogue: another thread's open block
        # does not capture this thread's callbacks.
        ran: list[str] = []
        with db.transaction():
            hooks.do(1)
            run_threads(lambda: db.on_commit(lambda: ran.append("outsider")))
            assert ran == ["outsider"]
            hooks.assert_not_notified()
        hooks.assert_done([1])

    def test_raises_exception_non_callable(self, db: Database, hooks: Hooks) -> None:
        msg = "on_commit\\(\\)'s callback must be a callable"
        with pytest.raises(TypeError, match=msg):
            db.on_commit(None)  # type: ignore[arg-type]
        with db.transaction():
            with pytest.raises(TypeError, match=msg):
                db.on_commit("not callable")  # type: ignore[arg-type]
            hooks.do(1)
        hooks.assert_done([1])


# -- on_commit and dbkit's rollback rules ---------------------------------------------------


class TestOnCommitRollbacks:
    def test_hooks_dropped_on_transaction_rolled_back(self, db: Database, hooks: Hooks) -> None:
        with pytest.raises(TransactionRolledBack), db.transaction():
            hooks.do(1)
            with pytest.raises(sa_exc.ProgrammingError):
                db.execute("SELECT no_such_col FROM reporters")
        hooks.assert_done([])

    def test_hooks_dropped_when_a_merged_block_failed(self, db: Database, hooks: Hooks) -> None:
        with pytest.raises(TransactionRolledBack), db.transaction():
            hooks.do(1)
            with pytest.raises(ForcedError), db.transaction(savepoint=False):
                hooks.do(2)
                raise ForcedError()
        hooks.assert_done([])

    def test_set_rollback_true_drops_hooks(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            hooks.do(1)
            db.set_rollback(True)
        hooks.assert_done([])

    def test_set_rollback_true_in_savepoint_drops_its_hooks(
        self, db: Database, hooks: Hooks
    ) -> None:
        with db.transaction():
            hooks.do(1)
            with db.transaction():
                hooks.do(2)
                with db.transaction():
                    hooks.do(3)
                db.set_rollback(True)
            hooks.do(4)
        hooks.assert_done([1, 4])

    def test_hooks_dropped_when_commit_fails(self, db: Database, hooks: Hooks) -> None:
        # A deferred foreign key is checked at COMMIT: the block's exit fails after every
        # statement succeeded; nothing is saved and no callback runs.
        db.execute(
            "CREATE TABLE badges (reporter_id int REFERENCES reporters (id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        with pytest.raises(dbkit.ForeignKeyError) as failed, db.transaction():
            hooks.do(1)
            db.execute("INSERT INTO badges VALUES (424242)")
        assert sqlstate_of(failed.value) == "23503"
        assert failed.value.constraint == "badges_reporter_id_fkey"
        hooks.assert_done([])
        assert not db.in_transaction()
        assert db.stats().in_use == 0

    def test_hooks_from_released_savepoints_kept(self, db: Database, hooks: Hooks) -> None:
        with db.transaction():
            with db.transaction():
                with db.transaction():
                    hooks.do(1)
                hooks.do(2)
            with db.transaction(savepoint=False):
                hooks.do(3)
        hooks.assert_done([1, 2, 3])

    def test_robust_false_error_outside_a_block_propagates(
        self, db: Database, hooks: Hooks
    ) -> None:
        with pytest.raises(ForcedError):
            db.on_commit(lambda: hooks.notify("error"))
        hooks.do(1)
        hooks.assert_done([1])


# -- retries -------------------------------------------------------------------------------


@pytest.fixture
def counters(db: Database) -> Database:
    db.execute("CREATE TABLE counters (id int PRIMARY KEY, value int NOT NULL)")
    db.execute("INSERT INTO counters VALUES (1, 0), (2, 0)")
    return db


def counter_values(db: Database) -> dict[int, int]:
    return {r.id: r.value for r in db.execute("SELECT id, value FROM counters")}


FORMS = ["run_in_transaction", "decorator"]


def retried(
    db: Database, form: str, body: Callable[[], None], retries: int, **options: Any
) -> Callable[[], None]:
    """``body`` as a retried transaction, in one of the two public forms."""
    if form == "run_in_transaction":

        def run() -> None:
            def fn(conn: sa.Connection) -> None:
                assert conn is db.connection()
                body()

            db.run_in_transaction(fn, retries=retries, **options)

        return run

    return db.transaction(retries=retries, **options)(body)


class TestRetries:
    @pytest.mark.parametrize("form", FORMS)
    def test_serialization_failure_is_retried(self, db: Database, counters: Any, form: str) -> None:
        # Both transactions read the counter, then both write it (a lost update that
        # SERIALIZABLE refuses with 40001): the loser is re-run whole and sees the winner's
        # value.  Callbacks of the failed attempt are dropped.
        both_read = threading.Barrier(2, timeout=30)
        runs = {"a": 0, "b": 0}
        notified: list[tuple[str, int]] = []

        def increment(name: str) -> Callable[[], None]:
            def body() -> None:
                runs[name] += 1
                attempt = runs[name]
                value = db.scalar("SELECT value FROM counters WHERE id = 1")
                if attempt == 1:
                    both_read.wait()
                db.execute("UPDATE counters SET value = :v WHERE id = 1", {"v": value + 1})
                db.on_commit(lambda: notified.append((name, attempt)))

            return retried(db, form, body, retries=5, isolation="serializable")

        run_threads(increment("a"), increment("b"), barriers=(both_read,))
        assert counter_values(db)[1] == 2  # no lost update
        assert sum(runs.values()) > 2
        assert sorted(name for name, _ in notified) == ["a", "b"]  # one callback each
        assert sorted(notified) == sorted((name, runs[name]) for name in runs)  # last attempt
        assert db.stats().in_use == 0

    @pytest.mark.parametrize("form", FORMS)
    def test_write_skew_failing_at_commit_is_retried(
        self, db: Database, counters: Any, form: str
    ) -> None:
        # Two doctors on call (value 1); each may leave only while the other stays.  Both
        # read, then each writes only its own row: no row lock conflict, SERIALIZABLE detects
        # the skew (typically at COMMIT) and the retried loser sees it must stay.
        db.execute("UPDATE counters SET value = 1")
        both_read = threading.Barrier(2, timeout=30)
        runs = {1: 0, 2: 0}
        notified: list[tuple[int, int]] = []

        def go_off_call(me: int) -> Callable[[], None]:
            def body() -> None:
                runs[me] += 1
                attempt = runs[me]
                on_call = db.scalar("SELECT sum(value) FROM counters")
                if attempt == 1:
                    both_read.wait()
                if on_call >= 2:
                    db.execute("UPDATE counters SET value = 0 WHERE id = :id", {"id": me})
                    db.on_commit(lambda: notified.append((me, attempt)))

            return retried(db, form, body, retries=5, isolation="serializable")

        run_threads(go_off_call(1), go_off_call(2), barriers=(both_read,))
        assert sum(counter_values(db).values()) == 1  # exactly one left
        assert sum(runs.values()) > 2
        assert len(notified) == 1
        assert notified[0][1] == 1  # the winner's first attempt; the loser's never ran
        assert db.stats().in_use == 0

    @pytest.mark.parametrize("form", FORMS)
    def test_lost_connection_before_commit_is_retried(
        self, db: Database, hooks: Hooks, form: str
    ) -> None:
        runs: list[int] = []

        def body() -> None:
            runs.append(1)
            hooks.do(len(runs))
            if len(runs) == 1:
                # the session ends under the transaction (a failover, a killed backend)
                db.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        retried(db, form, body, retries=2)()
        assert runs == [1, 1]
        hooks.assert_done([2])
        assert db.stats().in_use == 0

    def test_lost_connection_during_commit_is_not_retried_without_resolution(
        self, db: Database, hooks: Hooks
    ) -> None:
        # With resolve_commit_outcome off, whether a COMMIT that never answered took
        # effect is unknown: never re-run.
        runs: list[int] = []
        blind = Database(db.config.replace(resolve_commit_outcome=False)).connect()
        blind_hooks = Hooks(blind)

        def fn(conn: sa.Connection) -> None:
            runs.append(1)
            blind_hooks.do(1)
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with db.engine.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})

        try:
            with pytest.raises(dbkit.CommitOutcomeUnknown) as unknown:
                blind.run_in_transaction(fn, retries=5)
            assert unknown.value.xid is None
            assert isinstance(unknown.value.__cause__, sa_exc.DBAPIError)
            assert runs == [1]
            blind_hooks.assert_done([])
            assert blind.stats().in_use == 0
        finally:
            blind.close()

    def test_connection_lost_before_commit_took_effect_is_run_again_once(
        self, db: Database, hooks: Hooks
    ) -> None:
        # The session dies before its COMMIT could take effect: pg_xact_status reports the
        # transaction aborted (or the link fails before COMMIT leaves), so it runs again,
        # and its work and callbacks happen exactly once.
        runs: list[int] = []

        def fn(conn: sa.Connection) -> None:
            runs.append(1)
            hooks.do(1)
            if len(runs) == 1:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                with db.engine.connect() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})

        db.run_in_transaction(fn, retries=5)
        assert runs == [1, 1]
        hooks.assert_done([1])
        assert db.stats().in_use == 0

    @pytest.mark.parametrize("form", FORMS)
    def test_deadlock_is_retried_and_both_commit(
        self, db: Database, counters: Any, form: str
    ) -> None:
        both_locked_one = threading.Barrier(2, timeout=30)
        runs = {"a": 0, "b": 0}
        notified: list[tuple[str, int]] = []

        def lock_in_order(name: str, first: int, second: int) -> Callable[[], None]:
            def body() -> None:
                runs[name] += 1
                attempt = runs[name]
                db.execute("UPDATE counters SET value = value + 1 WHERE id = :id", {"id": first})
                if attempt == 1:
                    both_locked_one.wait()
                db.execute("UPDATE counters SET value = value + 1 WHERE id = :id", {"id": second})
                db.on_commit(lambda: notified.append((name, attempt)))

            return retried(db, form, body, retries=5)

        run_threads(lock_in_order("a", 1, 2), lock_in_order("b", 2, 1), barriers=(both_locked_one,))
        assert counter_values(db) == {1: 2, 2: 2}
        assert sum(runs.values()) > 2
        assert sorted(notified) == sorted((name, runs[name]) for name in runs)
        assert db.stats().in_use == 0

    @pytest.mark.parametrize("form", FORMS)
    def test_retries_exhausted(self, db: Database, hooks: Hooks, form: str) -> None:
        runs: list[int] = []

        def body() -> None:
            runs.append(1)
            hooks.do(len(runs))
            db.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'serialization_failure';"
                " END $$"
            )

        with pytest.raises(dbkit.RetryableError) as exhausted:
            retried(db, form, body, retries=2)()
        assert len(runs) == 3
        cause = exhausted.value.__cause__
        assert isinstance(cause, sa_exc.OperationalError)
        assert sqlstate_of(cause) == "40001"
        hooks.assert_done([])
        assert not db.in_transaction()
        assert db.stats().in_use == 0

    def test_retries_zero_runs_once(self, db: Database, hooks: Hooks) -> None:
        runs: list[int] = []

        def fn(conn: sa.Connection) -> None:
            runs.append(1)
            conn.exec_driver_sql(
                "DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'deadlock_detected'; END $$"
            )

        with pytest.raises(dbkit.RetryableError) as exhausted:
            db.run_in_transaction(fn, retries=0)
        assert runs == [1]
        assert sqlstate_of(exhausted.value.__cause__) == "40P01"  # type: ignore[arg-type]

    def test_run_in_transaction_returns_and_commits(self, db: Database, hooks: Hooks) -> None:
        def fn(conn: sa.Connection) -> str:
            assert db.connection() is conn
            hooks.do(7)
            hooks.assert_not_notified()
            return "result"

        assert db.run_in_transaction(fn, retries=3) == "result"
        hooks.assert_done([7])

    def test_run_in_transaction_inside_an_open_transaction(
        self, db: Database, hooks: Hooks
    ) -> None:
        runs: list[int] = []

        def fn(conn: sa.Connection) -> None:
            runs.append(1)

        with db.transaction():
            hooks.do(1)
            with pytest.raises(TransactionError):
                db.run_in_transaction(fn, retries=3)
            with pytest.raises(TransactionError):
                db.transaction(retries=3)(lambda: runs.append(2))()
            hooks.do(2)
        assert runs == []
        hooks.assert_done([1, 2])

    @pytest.mark.parametrize("form", FORMS)
    def test_non_retryable_error_is_not_retried(
        self, db: Database, hooks: Hooks, form: str
    ) -> None:
        existing = create(db, "1", "thing")
        runs: list[int] = []

        def body() -> None:
            runs.append(1)
            hooks.do(2)
            db.execute(
                "INSERT INTO reporters (id, first_name, last_name) VALUES (:id, '3', 'thing')",
                {"id": existing},
            )

        with pytest.raises(sa_exc.IntegrityError) as failed:
            retried(db, form, body, retries=5)()
        assert sqlstate_of(failed.value) == "23505"
        assert runs == [1]
        hooks.assert_not_notified()
        hooks.assert_nums_committed([1])

    def test_retry_after_an_application_error_is_not_attempted(
        self, db: Database, hooks: Hooks
    ) -> None:
        runs: list[int] = []

        def fn(conn: sa.Connection) -> None:
            runs.append(1)
            hooks.do(1)
            raise Oops("not a database error")

        with pytest.raises(Oops):
            db.run_in_transaction(fn, retries=5)
        assert runs == [1]
        hooks.assert_done([])
