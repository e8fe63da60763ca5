"""Database: connect with retries, fail-fast on permanent errors, execute/scalar, stats,
close, fork safety, and secrets kept out of every text."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from loguru import logger

import dbkit
from dbkit import ConnectError, Database
from dbkit.local import LocalPostgres
from dbkit.settings import PostgresConfig

SECRET = "S3cr3t-pw-xyz"


def test_execute_and_scalar_outside_a_transaction(db: Database) -> None:
    db.execute("CREATE TABLE kv (k text primary key, v int)")
    result = db.execute("INSERT INTO kv VALUES ('a', 1), ('b', 2)")
    assert result.rowcount == 2
    rows = db.execute("SELECT k, v FROM kv WHERE v > :min ORDER BY k", {"min": 0})
    assert [tuple(r) for r in rows] == [("a", 1), ("b", 2)]
    assert db.scalar(sa.select(sa.func.count()).select_from(sa.table("kv"))) == 2
    # Autocommit: the write is visible to another connection at once.
    assert db.stats().in_use == 0
    assert db.execute("SELECT v FROM kv WHERE k = 'b'").scalar_one() == 2


def test_rows_stay_readable_after_the_connection_went_back(db: Database) -> None:
    result = db.execute("SELECT generate_series(1, 5) AS n")
    assert db.stats().in_use == 0
    assert [r.n for r in result] == [1, 2, 3, 4, 5]


def test_stats_fields_follow_go_dbstats(db: Database) -> None:
    db.scalar("SELECT 1")
    stats = db.stats().as_dict()
    for field in (
        "max_open_connections",
        "open_connections",
        "in_use",
        "idle",
        "wait_count",
        "wait_duration",
        "max_idle_closed",
        "max_idle_time_closed",
        "max_lifetime_closed",
    ):
        assert field in stats
    assert stats["open_connections"] == stats["in_use"] + stats["idle"] == 1


def test_context_manager_and_idempotent_close(db_url: str) -> None:
    with Database.from_url(db_url) as db:
        assert db.scalar("SELECT 1") == 1
        assert db.stats().open_connections == 1
    assert db.stats().open_connections == 0
    db.close()
    db.disconnect()
    assert "closed" in repr(db)


def test_connect_retries_until_the_server_comes_up(free_port: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres"
    db = Database.from_url(url, max_retries=30, retry_delay=0.1, timeout=2)
    server = LocalPostgres(port=free_port)
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        db.connect()
        assert db.connect_attempts > 1
        assert db.scalar("SELECT 1") == 1
    finally:
        starter.join()
        db.close()
        server.stop()


def test_connect_gives_up_after_max_retries(free_port: int) -> None:
    url = f"postgresql+psycopg://app:{SECRET}@127.0.0.1:{free_port}/postgres"
    db = Database.from_url(url, max_retries=2, retry_delay=0.01)
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert db.connect_attempts == 3
    text = str(info.value)
    assert f"127.0.0.1:{free_port}" in text and "retries exhausted" in text
    assert SECRET not in text and SECRET not in repr(db)
    assert dbkit.is_transient(info.value)


def test_unknown_database_fails_at_once(db_url: str) -> None:
    url = db_url.rsplit("/", 1)[0] + "/no_such_database"
    db = Database.from_url(url, max_retries=5, retry_delay=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert db.connect_attempts == 1
    assert time.monotonic() - started < 5  # no backoff sleeps happened
    assert "permanent" in str(info.value) and "no_such_database" in str(info.value)
    assert not dbkit.is_transient(info.value)


def test_wrong_password_fails_at_once_without_leaking_it(make_server: Any) -> None:
    server = make_server(password="right-password")
    url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{server.port}/postgres"
    db = Database.from_url(url, max_retries=5)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="DEBUG")
    logger.enable("dbkit")
    try:
        with pytest.raises(ConnectError) as info:
            db.connect()
    finally:
        logger.remove(sink)
        logger.disable("dbkit")
    assert db.connect_attempts == 1
    assert "password authentication failed" in str(info.value)
    for text in [str(info.value), repr(info.value), repr(db), str(info.value.__cause__), *messages]:
        assert SECRET not in text
    good = Database.from_url(server.url.replace("postgres@", "postgres:right-password@"))
    with good:
        assert good.scalar("SELECT 1") == 1


def test_config_repr_hides_password() -> None:
    config = PostgresConfig(password=SECRET)
    assert SECRET not in repr(config)
    assert SECRET not in repr(Database(config))
    assert SECRET not in str(config.url())


def _child_uses_inherited(db: Database, queue: Any) -> None:
    try:
        queue.put(db.scalar("SELECT pg_backend_pid()"))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_forked_child_never_reuses_the_parents_connection(db: Database) -> None:
    parent_pid = db.scalar("SELECT pg_backend_pid()")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_inherited, args=(db, queue))
    child.start()
    child_pid = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert isinstance(child_pid, int) and child_pid != parent_pid
    # The parent's pooled connection survived the child's exit untouched.
    assert db.scalar("SELECT pg_backend_pid()") == parent_pid
    assert db.stats().invalidated == 0


def test_textual_statements_outside_a_transaction(db: Database) -> None:
    """``text()`` is what batch scripts write: the same rows, keys and rowcounts on either
    path (with fast paths on, it runs on the driver, one round trip)."""
    db.execute("CREATE TABLE kv (k text primary key, v int)")
    inserted = db.execute(sa.text("INSERT INTO kv VALUES (:k, 1), ('b', 2)"), {"k": "a"})
    assert inserted.rowcount == 2 and inserted.returns_rows is False
    with pytest.raises(sa.exc.ResourceClosedError):
        inserted.all()
    result = db.execute(
        sa.text("SELECT k, v AS value, v FROM kv WHERE v >= :v ORDER BY k"), {"v": 1}
    )
    assert list(result.keys()) == ["k", "value", "v"]
    rows = result.all()
    assert [tuple(r) for r in rows] == [("a", 1, 1), ("b", 2, 2)]
    assert rows[1].value == 2 and rows[0]._mapping["k"] == "a"
    updated = db.execute(sa.text("UPDATE kv SET v = v + 10 WHERE k = :k"), {"k": "b"})
    assert updated.rowcount == 1
    assert db.scalar(sa.text("SELECT v FROM kv WHERE k = :k"), {"k": "b"}) == 12
    assert db.scalar(sa.text("SELECT v FROM kv WHERE k = 'none'")) is None
    with pytest.raises(sa.exc.ResourceClosedError):
        db.scalar(sa.text("DELETE FROM kv WHERE k = 'a'"))
    assert db.execute(sa.text("SELECT count(*) AS n FROM kv")).one().n == 1
    with pytest.raises(sa.exc.ProgrammingError):
        db.execute(sa.text("SELECT no_such_column FROM kv"))
    assert db.stats().in_use == 0
    stats = db.query_stats()
    assert stats.errors == 1


def test_connect_is_idempotent(db_url: str) -> None:
    """``with Database.from_url(url).connect() as db`` connects once: a second connect()
    of a connected Database returns at once; after close() it connects again."""
    with Database.from_url(db_url).connect() as db:
        assert db.connect_attempts == 1
        engine = db.engine
        assert db.connect() is db
        assert db.engine is engine
        assert db.query_stats().statements == 1  # the one SELECT 1 of the first connect()
    db.connect()
    try:
        assert db.engine is not engine
        assert db.scalar("SELECT 1") == 1
    finally:
        db.close()
