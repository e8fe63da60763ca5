"""Transactions under failures dbkit cannot see coming: errors on the raw driver connection,
serialization failures in a plain block, a COMMIT that fails."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

import dbkit
from dbkit import Database, RetryableError, TransactionRolledBack
from dbkit.errors import sqlstate_of


@pytest.fixture
def items(db: Database) -> None:
    db.execute("CREATE TABLE items (id int primary key, qty int not null)")
    db.execute("INSERT INTO items VALUES (1, 10), (2, 20)")


def rows(db: Database) -> list[tuple[int, int]]:
    return [tuple(r) for r in db.execute("SELECT id, qty FROM items ORDER BY id")]


def test_error_swallowed_on_the_raw_driver_connection_in_a_nested_block(
    db: Database, items: None
) -> None:
    with db.transaction() as conn:
        conn.execute(sa.text("UPDATE items SET qty = 11 WHERE id = 1"))
        with pytest.raises(TransactionRolledBack), db.transaction() as inner:
            raw = inner.connection.dbapi_connection
            assert raw is not None
            cursor = raw.cursor()
            with pytest.raises(Exception):  # noqa: B017 - any driver error will do
                cursor.execute("SELECT no_such_column FROM items")
        # Rolled back to the savepoint: the outer block goes on and commits.
        conn.execute(sa.text("UPDATE items SET qty = 21 WHERE id = 2"))
    assert rows(db) == [(1, 11), (2, 21)]


def test_serialization_failure_in_a_plain_block_is_a_retryable_error(
    db: Database, items: None
) -> None:
    both_read = threading.Barrier(2)
    outcomes: dict[str, BaseException | None] = {}

    def move_total(name: str, target: int) -> None:
        try:
            with db.transaction(isolation="serializable") as conn:
                total = conn.execute(sa.text("SELECT sum(qty) FROM items")).scalar_one()
                both_read.wait(timeout=10)
                conn.execute(
                    sa.text("UPDATE items SET qty = :t WHERE id = :id"), {"t": total, "id": target}
                )
            outcomes[name] = None
        except BaseException as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(target=move_total, args=("a", 2)),
        threading.Thread(target=move_total, args=("b", 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = [exc for exc in outcomes.values() if exc is not None]
    assert len(failures) == 1, outcomes
    failure = failures[0]
    assert isinstance(failure, RetryableError)
    assert sqlstate_of(failure) == "40001"
    assert isinstance(failure.__cause__, sa.exc.OperationalError)
    assert db.stats().in_use == 0


def test_failed_commit_rolls_back_and_returns_a_clean_connection(db: Database) -> None:
    db.execute("CREATE TABLE parent (id int primary key)")
    db.execute(
        "CREATE TABLE child (id int primary key, parent_id int "
        "REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    with pytest.raises(dbkit.ForeignKeyError) as info, db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO child VALUES (1, 999)"))  # checked at COMMIT
    assert info.value.constraint == "child_parent_id_fkey"
    assert isinstance(info.value.__cause__, sa.exc.IntegrityError)
    assert db.stats().in_use == 0
    assert db.scalar("SELECT count(*) FROM child") == 0
    with db.transaction() as conn:  # the pooled connection is usable and clean
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
