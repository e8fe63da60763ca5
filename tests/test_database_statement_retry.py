"""Statements outside a transaction block that meet a dead pooled connection, and
prepared statements made stale by an ALTER TABLE elsewhere (real servers, real faults)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from faultproxy import FaultProxy
from sqlalchemy import exc as sa_exc

import dbkit
from dbkit import Database, RetryableError
from dbkit.retrying import is_read

APP = "stmt-retry"


@pytest.fixture
def proxy(pg_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(pg_server.host, pg_server.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def one_conn(db_url: str, fast_paths: bool, proxy: FaultProxy) -> Iterator[Database]:
    """One pooled connection, through the fault proxy."""
    db = Database.from_url(
        proxy.url_for(db_url),
        max_open_conns=1,
        max_idle_conns=1,
        application_name=APP,
        fast_paths=fast_paths,
        health_check_interval=0,
    ).connect()
    db.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text)")
    yield db
    db.close()


def admin(db_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


def cut_in_flight(db: Database, proxy: FaultProxy, run: Callable[[], Any]) -> Any:
    """Run ``run()`` in a thread while the proxy holds its traffic, cut the connection it
    checked out, then let traffic flow again: the statement meets a dead connection.
    Returns what ``run`` returned, or raises what it raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = run()
        except BaseException as error:
            outcome["error"] = error

    before = proxy.connections
    proxy.hold()
    worker = threading.Thread(target=target)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while db.stats().in_use == 0 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert db.stats().in_use == 1, "the statement never checked a connection out"
    finally:
        proxy.cut_all()
        proxy.release()
        worker.join(timeout=60)
    assert not worker.is_alive()
    outcome["new_connections"] = proxy.connections - before
    if "error" in outcome:
        raise outcome["error"]
    return outcome


@pytest.mark.parametrize(
    "run",
    [
        lambda db: db.execute("SELECT count(*) FROM notes").scalar(),
        lambda db: db.scalar(sa.select(sa.func.count()).select_from(sa.table("notes"))),
        lambda db: db.execute(sa.text("  select count(*) from notes")).scalar(),
    ],
    ids=["execute-text", "scalar-select", "lowercase-text"],
)
def test_a_read_on_a_dead_pooled_connection_runs_again_on_a_fresh_one(
    one_conn: Database, proxy: FaultProxy, run: Any
) -> None:
    outcome = cut_in_flight(one_conn, proxy, lambda: run(one_conn))
    assert outcome["value"] == 0
    assert outcome["new_connections"] == 1
    assert one_conn.stats().in_use == 0


def test_repository_reads_run_again_on_a_fresh_connection(
    one_conn: Database, proxy: FaultProxy
) -> None:
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text),
    )

    class Notes(dbkit.Repository[dict[str, Any]]):
        table = notes

    repo = Notes(one_conn)
    added = repo.add({"body": "kept"})
    for read in (
        lambda: repo.get(added["id"]),
        lambda: repo.list(),
        lambda: repo.count(),
        lambda: repo.exists(id=added["id"]),
    ):
        assert cut_in_flight(one_conn, proxy, read)["value"]
    assert repo.count() == 1


def test_a_write_is_not_run_again_unless_idempotent(one_conn: Database, proxy: FaultProxy) -> None:
    insert = "INSERT INTO notes (body) VALUES ('once')"
    with pytest.raises(sa_exc.OperationalError) as info:
        cut_in_flight(one_conn, proxy, lambda: one_conn.execute(insert))
    assert info.value.connection_invalidated and dbkit.is_transient(info.value)
    assert one_conn.scalar("SELECT count(*) FROM notes") == 0

    outcome = cut_in_flight(one_conn, proxy, lambda: one_conn.execute(insert, idempotent=True))
    assert outcome["new_connections"] == 1
    assert one_conn.scalar("SELECT count(*) FROM notes") == 1


def test_a_read_marked_not_idempotent_is_not_run_again(
    one_conn: Database, proxy: FaultProxy
) -> None:
    with pytest.raises(sa_exc.OperationalError):
        cut_in_flight(one_conn, proxy, lambda: one_conn.execute("SELECT 1", idempotent=False))


def test_nothing_is_run_again_alone_inside_a_block(one_conn: Database, proxy: FaultProxy) -> None:
    with pytest.raises(RetryableError), one_conn.transaction():
        one_conn.execute("SELECT 1")
        proxy.cut_all()
        one_conn.execute("SELECT 1")  # the block's connection is gone: not retried alone


def test_a_read_waits_for_a_server_that_went_away_with_its_connection(
    one_conn: Database, proxy: FaultProxy
) -> None:
    """The fresh connection is refused for a while (the database is restarting): the
    read waits with the connect policy instead of failing."""
    refusing = threading.Timer(0.5, proxy.accept)

    def run() -> Any:
        return one_conn.execute("SELECT count(*) FROM notes").scalar()

    proxy.refuse()
    refusing.start()
    try:
        outcome = cut_in_flight(one_conn, proxy, run)
    finally:
        refusing.join()
    assert outcome["value"] == 0
    assert proxy.refused >= 1


def test_statements_are_classified_as_reads() -> None:
    table = sa.table("t", sa.column("a"))
    assert is_read(sa.select(table))
    assert is_read(sa.select(table).union(sa.select(table)))
    assert is_read(sa.text("SELECT 1")) and is_read(sa.text("\n values (1)"))
    assert not is_read(sa.text("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"))
    assert not is_read(table.insert().values(a=1))
    assert not is_read(sa.update(table).values(a=1))
    assert not is_read(sa.text("INSERT INTO t VALUES (1)"))


# -- prepared statements made stale by an ALTER TABLE on another connection ---------------


def test_a_stale_prepared_statement_never_surfaces_outside_a_block(
    db: Database, db_url: str
) -> None:
    db.execute("CREATE TABLE altered (a int, b int)")
    db.execute("INSERT INTO altered VALUES (1, 2)")
    query = sa.text("SELECT * FROM altered WHERE a = :a")
    for _ in range(8):  # past psycopg's prepare_threshold (5): prepared on the server
        assert db.execute(query, {"a": 1}).all() == [(1, 2)]
    with admin(db_url) as conn:
        conn.execute("ALTER TABLE altered ADD COLUMN c int DEFAULT 3")
    for _ in range(8):  # prepared again
        assert db.execute(query, {"a": 1}).all() == [(1, 2, 3)]
    with admin(db_url) as conn:  # and made stale again, on the same connections
        conn.execute("ALTER TABLE altered ADD COLUMN d int DEFAULT 4")
    for _ in range(3):
        assert db.execute(query, {"a": 1}).all() == [(1, 2, 3, 4)]


def test_a_stale_prepared_statement_in_a_block_is_cured_by_running_it_again(
    db: Database, db_url: str
) -> None:
    db.execute("CREATE TABLE altered (a int, b int)")
    db.execute("INSERT INTO altered VALUES (1, 2)")
    query = sa.text("SELECT * FROM altered WHERE a = :a")
    for _ in range(8):
        with db.transaction() as conn:
            conn.execute(query, {"a": 1}).all()
    with admin(db_url) as conn:
        conn.execute("ALTER TABLE altered ADD COLUMN c int DEFAULT 3")
    runs: list[int] = []

    @db.transaction(retries=2)
    def read() -> list[Any]:
        runs.append(1)
        return list(db.execute(query, {"a": 1}).all())

    assert read() == [(1, 2, 3)]
    assert len(runs) <= 2
    with db.transaction() as conn:  # and from then on, at once
        assert conn.execute(query, {"a": 1}).all() == [(1, 2, 3)]
