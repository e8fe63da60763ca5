"""``db.transaction(settings=...)``: server settings local to a transaction, on a real
PostgreSQL: visible inside, gone after COMMIT and ROLLBACK on the pooled connection, SET
LOCAL semantics in nested blocks, names checked before any SQL, values sent literally."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from dbkit import Database, TransactionBroken, TransactionOptions
from dbkit.transaction.server_settings import normalize_settings, set_config_command
from dbkit.transaction.state import TransactionState


def show(conn: Any, name: str) -> str | None:
    value: str | None = conn.scalar(sa.text("SELECT current_setting(:n, true)"), {"n": name})
    return value


def pid(conn: Any) -> int:
    value: int = conn.scalar(sa.text("SELECT pg_backend_pid()"))
    return value


class Checkouts:
    """Counts the pool's checkouts and dbkit's statements: what a refused block must not
    cause."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.checkouts = 0
        event.listen(db.engine, "checkout", self._checked_out)

    def _checked_out(self, *args: Any) -> None:
        self.checkouts += 1

    def snapshot(self) -> tuple[int, int]:
        return self.checkouts, self.db.query_stats().statements


@pytest.fixture
def checkouts(db: Database) -> Iterator[Checkouts]:
    counter = Checkouts(db)
    yield counter
    event.remove(db.engine, "checkout", counter._checked_out)


# ------------------------------------------------------------------------------ no server


def test_values_are_rendered_as_literals() -> None:
    settings = normalize_settings(
        {"Work_Mem": 65536, "enable_seqscan": False, "random_page_cost": 1.5, "x.y": "a'b\\c"}
    )
    assert dict(settings) == {
        "work_mem": "65536",
        "enable_seqscan": "off",
        "random_page_cost": "1.5",
        "x.y": "a'b\\c",
    }
    assert set_config_command({"x.y": "a'b\\c"}) == (
        "SELECT set_config(E'x.y', E'a''b\\\\c', true)"
    )


def test_the_settings_go_out_with_begin_and_savepoint() -> None:
    state = TransactionState()
    options = TransactionOptions(timeout=1.5, settings={"work_mem": "64MB"})
    assert state.begin(object(), options) == [
        "SET LOCAL statement_timeout = '1500ms'",
        "SELECT set_config(E'work_mem', E'64MB', true)",
    ]
    nested = state.enter_nested(object(), TransactionOptions(settings={"x.y": "1"}))
    assert nested == ["SAVEPOINT dbkit_sp_1", "SELECT set_config(E'x.y', E'1', true)"]
    assert TransactionOptions(settings={}).settings is None


@pytest.mark.parametrize(
    ("settings", "error", "text"),
    [
        ({"work mem": "1MB"}, ValueError, "invalid setting name 'work mem'"),
        ({"1abc": "1"}, ValueError, "invalid setting name"),
        ({"work_mem; DROP TABLE t": "1"}, ValueError, "invalid setting name"),
        ({"": "1"}, ValueError, "invalid setting name"),
        ({"x.": "1"}, ValueError, "invalid setting name"),
        ({"statement_timeout": "1s"}, ValueError, "timeout="),
        ({"transaction_isolation": "serializable"}, ValueError, "isolation="),
        ({"work_mem": "1MB", "WORK_MEM": "2MB"}, ValueError, "given twice"),
        ({"work_mem": None}, TypeError, "values must be str, int, float or bool"),
        ({"work_mem": b"1MB"}, TypeError, "values must be"),
        ({"random_page_cost": float("nan")}, ValueError, "finite"),
        ({"x.y": "a\x00b"}, ValueError, "NUL"),
        ({1: "x"}, TypeError, "names must be strings"),
        ([("work_mem", "1MB")], TypeError, "must be a mapping"),
    ],
)
def test_malformed_settings_are_refused_when_the_block_is_made(
    settings: Any, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        TransactionOptions(settings=settings)


# ------------------------------------------------------------------------------ server


@pytest.mark.parametrize("ending", ["commit", "exception", "set_rollback"])
def test_a_setting_lasts_until_the_transaction_ends(db: Database, ending: str) -> None:
    default = db.scalar("SHOW work_mem")
    assert default != "256MB"
    settings = {"work_mem": "256MB", "myapp.tenant": "acme"}
    with pytest.raises(RuntimeError) if ending == "exception" else contextlib.nullcontext():
        with db.transaction(settings=settings) as conn:
            assert show(conn, "work_mem") == "256MB"
            assert show(conn, "myapp.tenant") == "acme"
            used = pid(conn)
            if ending == "exception":
                raise RuntimeError("job failed")
            if ending == "set_rollback":
                db.set_rollback(True)
    # The same pooled connection (the pool is LIFO) has its own values again.
    with db.transaction() as conn:
        assert pid(conn) == used
        assert show(conn, "work_mem") == default
        assert show(conn, "myapp.tenant") in (None, "")
    assert db.scalar("SHOW work_mem") == default  # and outside any block


def test_settings_through_the_decorator_and_run_in_transaction(db: Database) -> None:
    @db.transaction(settings={"work_mem": "3MB"})
    def inside() -> str | None:
        return show(db.connection(), "work_mem")

    @db.transaction(settings={"work_mem": "5MB"}, retries=2)
    def retried() -> str | None:
        return show(db.connection(), "work_mem")

    assert inside() == "3MB"
    assert retried() == "5MB"
    assert db.run_in_transaction(lambda conn: show(conn, "work_mem"), settings={"work_mem": 7000})
    assert db.run_in_transaction(
        lambda conn: show(conn, "enable_seqscan"), settings={"enable_seqscan": False}
    ) == ("off")
    assert db.run_in_transaction(
        lambda conn: show(conn, "work_mem"), settings={"work_mem": 7168}
    ) == ("7MB")


def test_settings_in_a_readonly_serializable_block(db: Database) -> None:
    with db.transaction(
        readonly=True, isolation="serializable", timeout=2, settings={"work_mem": "9MB"}
    ) as conn:
        assert show(conn, "work_mem") == "9MB"
        assert show(conn, "transaction_read_only") == "on"
        assert show(conn, "transaction_isolation") == "serializable"
        assert show(conn, "statement_timeout") == "2s"


def test_nested_settings_follow_set_local(db: Database) -> None:
    default = db.scalar("SHOW work_mem")
    with db.transaction(settings={"work_mem": "11MB"}) as conn:
        with db.transaction(settings={"work_mem": "12MB", "myapp.step": "nested"}):
            assert show(conn, "work_mem") == "12MB"
        # Released savepoint: SET LOCAL semantics, the values stay.
        assert show(conn, "work_mem") == "12MB" and show(conn, "myapp.step") == "nested"
        with pytest.raises(RuntimeError):
            with db.transaction(settings={"work_mem": "13MB"}):
                assert show(conn, "work_mem") == "13MB"
                raise RuntimeError("undo")
        # Rolled-back savepoint: undone with it.
        assert show(conn, "work_mem") == "12MB"
        with db.transaction(savepoint=False, settings={"myapp.step": "joined"}):
            assert show(conn, "myapp.step") == "joined"
        assert show(conn, "myapp.step") == "joined"
    assert db.scalar("SHOW work_mem") == default


def test_a_value_with_quotes_and_backslashes_is_set_literally(db: Database) -> None:
    db.execute("CREATE TABLE victims (n int)")
    value = "it's a \\ back'slash\\'); DROP TABLE victims; --"
    with db.transaction(settings={"myapp.note": value, "search_path": "public, pg_temp"}) as conn:
        assert show(conn, "myapp.note") == value
        # set_config's list parsing: two schemas, not one named "public, pg_temp".
        assert show(conn, "search_path") == "public, pg_temp"
    assert db.scalar("SELECT count(*) FROM victims") == 0


def test_unknown_names_are_refused_before_any_sql(db: Database, checkouts: Checkouts) -> None:
    # A positive control: a valid block is seen by the counters (and fills the cache of
    # the server's setting names).
    before = checkouts.snapshot()
    with db.transaction(settings={"work_mem": "4MB"}) as conn:
        conn.execute(sa.text("SELECT 1"))
    after = checkouts.snapshot()
    assert after[0] > before[0] and after[1] > before[1]

    for name, text in [
        ("work_memory", "unknown server setting 'work_memory'"),
        ("shared_buffers", "'shared_buffers' cannot be changed in a session"),
        ("archive_command", "cannot be changed in a session"),
    ]:
        tx = db.transaction(settings={name: "1"})
        with pytest.raises(ValueError, match=text), tx:
            pytest.fail("the body ran")
        assert checkouts.snapshot() == after, f"{name}: SQL was sent"
        assert not db.in_transaction()
    with pytest.raises(ValueError, match="unknown server setting 'enable_seqscam'"):
        db.run_in_transaction(lambda conn: None, settings={"enable_seqscam": "off"})
    assert checkouts.snapshot() == after
    assert db.stats().in_use == 0


def test_an_unknown_name_in_a_nested_block_leaves_the_transaction_usable(db: Database) -> None:
    db.execute("CREATE TABLE items (n int)")
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (1)"))
        with pytest.raises(ValueError, match="unknown server setting"):
            with db.transaction(settings={"no_such_setting": "1"}):
                pytest.fail("the body ran")
        conn.execute(sa.text("INSERT INTO items VALUES (2)"))
    assert db.scalar("SELECT count(*) FROM items") == 2


def test_the_server_refuses_a_bad_value_and_nothing_is_left_open(db: Database) -> None:
    with pytest.raises(sa.exc.DBAPIError, match="work_mem"):
        with db.transaction(settings={"work_mem": "lots"}) as conn:
            conn.execute(sa.text("SELECT 1"))
    assert not db.in_transaction() and db.stats().in_use == 0
    assert db.scalar("SELECT 1") == 1


def test_settings_in_a_broken_transaction_are_refused(db: Database) -> None:
    with db.transaction() as conn:
        with pytest.raises(sa.exc.DBAPIError):
            conn.execute(sa.text("SELECT 1/0"))
        with pytest.raises(TransactionBroken), db.transaction(settings={"work_mem": "1MB"}):
            pytest.fail("the body ran")
        db.set_rollback(True)
