"""dbkit behind a real PgBouncer in transaction pooling mode (``pgbouncer = true``): the
transaction scenarios, statements repeated past psycopg's prepare threshold, bulk paths,
streams, more client threads than server connections, and clear errors for what cannot
work there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pgbouncer import PgBouncer
from sqlalchemy.engine import make_url

from dbkit import ConfigError, Database, Repository, TransactionError, TransactionRolledBack
from dbkit.settings import PostgresConfig

metadata = sa.MetaData()
items = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("qty", sa.Integer, sa.CheckConstraint("qty >= 0"), nullable=False),
)
staged = sa.Table(
    "staged_items",
    metadata,
    sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("id", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("qty", sa.Text),
)


class Items(Repository[dict[str, Any]]):
    table = items


@pytest.fixture
def db(db_url: str, pgbouncer: PgBouncer) -> Iterator[Database]:
    """A Database through PgBouncer to this test's own database."""
    direct = Database.from_url(db_url)
    metadata.create_all(direct.engine)
    direct.close()
    through = pgbouncer.url_for(make_url(db_url).database or "postgres")
    database = Database.from_url(through, pgbouncer=True, max_open_conns=8).connect()
    try:
        yield database
    finally:
        database.close()


def test_the_transaction_scenarios(db: Database) -> None:
    repo = Items(db)
    done: list[str] = []
    with db.transaction():
        repo.add({"id": 1, "name": "outer", "qty": 1})
        db.on_commit(lambda: done.append("outer"))
        with db.transaction():
            repo.add({"id": 2, "name": "kept", "qty": 1})
            db.on_commit(lambda: done.append("kept"))
        with pytest.raises(RuntimeError), db.transaction():
            repo.add({"id": 3, "name": "rolled back", "qty": 1})
            db.on_commit(lambda: done.append("never"))
            raise RuntimeError
        with db.transaction(readonly=True) as conn:
            assert conn.scalar(sa.text("SHOW transaction_read_only")) == "on"
    assert done == ["outer", "kept"]
    assert sorted(r["id"] for r in repo.list()) == [1, 2]
    with pytest.raises(TransactionRolledBack), db.transaction(timeout=0.05) as conn:
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT pg_sleep(1)"))
    with db.transaction(settings={"work_mem": "7MB"}) as conn:
        assert conn.scalar(sa.text("SHOW work_mem")) == "7MB"
    assert db.scalar(sa.text("SHOW work_mem")) != "7MB"  # nothing leaked to the session


def test_a_statement_repeated_past_the_prepare_threshold(db: Database) -> None:
    """psycopg prepares a statement on its 5th run; through PgBouncer the next run may
    land on another server connection, which never heard of it."""
    repo = Items(db)
    repo.add({"id": 1, "name": "one", "qty": 1})
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(100):
                assert repo.get(1)["name"] == "one"
                assert db.scalar(sa.text("SELECT qty FROM items WHERE id = :id"), {"id": 1}) == 1
                with db.transaction() as conn:
                    conn.execute(sa.text("UPDATE items SET qty = qty WHERE id = 1"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_bulk_paths_and_streams(db: Database) -> None:
    repo = Items(db)
    with db.transaction():
        assert repo.bulk_load([(n, f"item {n}", n) for n in range(1, 3001)]) == 3000
        assert (
            repo.upsert_many([{"id": n, "name": "new", "qty": 0} for n in range(1, 2501)]) == 2500
        )
        assert sum(1 for _ in repo.stream(batch_size=500)) == 3000
    assert sum(1 for row in repo.stream(batch_size=700) if row["name"] == "new") == 2500
    # The merge's PL/pgSQL value probes live in pg_temp for one transaction: fine here.
    db.execute(
        sa.insert(staged),
        [
            {"line": 1, "id": "9001", "name": "merged", "qty": "3"},
            {"line": 2, "id": "9002", "name": "bad qty", "qty": "three"},
            {"line": 3, "id": "9003", "name": "negative", "qty": "-1"},
        ],
    )
    result = repo.merge_from_staging(staged, order_by="line", rejects=None, chunk_size=2)
    assert result.inserted == 1
    assert dict(result.rejected_rows) == {
        2: "qty is not a valid integer",
        3: "violates items_qty_check",
    }


def test_more_client_threads_than_server_connections(db: Database, pgbouncer: PgBouncer) -> None:
    repo = Items(db)
    repo.add({"id": 1, "name": "counter", "qty": 0})
    errors: list[BaseException] = []

    def increment() -> None:
        try:
            for _ in range(25):
                db.run_in_transaction(
                    lambda conn: conn.execute(
                        sa.text("UPDATE items SET qty = qty + 1 WHERE id = 1")
                    ),
                    retries=5,
                )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=increment) for _ in range(8)]  # 8 clients, 2 servers
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert repo.get(1)["qty"] == 200
    assert max(int(p["sv_active"]) + int(p["sv_idle"]) for p in pgbouncer.show("POOLS")) <= 2


def test_what_cannot_work_behind_pgbouncer_is_refused_clearly(db: Database) -> None:
    with pytest.raises(TransactionError, match="PgBouncer"), db.advisory_lock("job"):
        pass
    with db.transaction(), db.advisory_lock("job"):  # transaction-scoped: fine
        pass
    with pytest.raises(ConfigError, match="statement_timeout: PgBouncer"):
        PostgresConfig(pgbouncer=True, statement_timeout=5)
    with pytest.raises(ConfigError, match="'discard' cannot work behind PgBouncer"):
        PostgresConfig(pgbouncer=True, reset_on_return="discard")
