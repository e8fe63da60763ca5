"""Statements outside a transaction run on the pooled psycopg connection itself (dbkit's
driver path, ``dbkit.fastpath.driver.DriverPath``) once SQLAlchemy has compiled them
and described their result: the same rows, keys, type processing, errors and metrics as
SQLAlchemy's path, and SQLAlchemy's path whenever someone listens to its events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from dbkit import Database
from dbkit.fastpath.driver import DriverPath, FastGet
from dbkit.fastpath.sqlalchemy import Declined
from dbkit.repository import Repository

# What this module checks is the fast path itself; the rest of the suite covers
# SQLAlchemy's path (see tests/conftest.py).
pytestmark = pytest.mark.fast_path


class Shouting(sa.TypeDecorator[str]):
    """Bind and result processing that SQLAlchemy applies and the driver path must too."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else value.upper()

    def process_result_value(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else value.lower() + "!"


metadata = sa.MetaData()
heroes = sa.Table(
    "driver_path_heroes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", Shouting, nullable=False),
    sa.Column("score", sa.Numeric(10, 2, asdecimal=False)),  # a float result processor
)


@pytest.fixture
def heroes_db(db: Database) -> Iterator[Database]:
    metadata.create_all(db.engine)
    db.execute(
        sa.insert(heroes),
        [{"id": 1, "name": "tintin", "score": 1.5}, {"id": 2, "name": "haddock", "score": 2}],
    )
    yield db
    metadata.drop_all(db.engine)


@pytest.fixture
def driver_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many statements the driver path ran, failed ones included (a spy around the
    real methods)."""
    calls = {"rows": 0, "scalar": 0}
    for name in calls:
        real = getattr(DriverPath, name)

        def spy(self: DriverPath, *args: Any, _real: Any = real, _name: str = name) -> Any:
            try:
                result = _real(self, *args)
            except Declined:  # left to SQLAlchemy: nothing was sent
                raise
            except BaseException:
                calls[_name] += 1
                raise
            calls[_name] += 1
            return result

        monkeypatch.setattr(DriverPath, name, spy)
    return calls


def test_rows_match_sqlalchemys_path(heroes_db: Database, driver_calls: dict[str, int]) -> None:
    by_name = sa.select(heroes).where(heroes.c.name == sa.bindparam("name", type_=Shouting))
    seen = []
    for _ in range(3):  # the first run is SQLAlchemy's (it describes the result)
        result = heroes_db.execute(by_name, {"name": "Tintin"})
        assert list(result.keys()) == ["id", "name", "score"]
        row = result.one()
        seen.append((tuple(row), row.name, row._mapping["score"]))
    assert seen == [((1, "tintin!", 1.5), "tintin!", 1.5)] * 3
    assert isinstance(seen[-1][2], float)
    scores = [heroes_db.scalar(sa.select(heroes.c.score).where(heroes.c.id == 2)) for _ in "abc"]
    assert scores == [2.0, 2.0, 2.0]
    assert driver_calls == {"rows": 2, "scalar": 2}


def test_no_stale_rows(heroes_db: Database, driver_calls: dict[str, int]) -> None:
    by_id = sa.select(heroes.c.name).where(heroes.c.id == sa.bindparam("id"))
    assert heroes_db.scalar(by_id, {"id": 1}) == "tintin!"
    for name in ("calculus", "castafiore"):
        heroes_db.execute(sa.update(heroes).where(heroes.c.id == 1).values(name=name))
        assert heroes_db.scalar(by_id, {"id": 1}) == name + "!"
        assert heroes_db.execute(by_id, {"id": 1}).scalar_one() == name + "!"
    assert driver_calls["scalar"] >= 2 and driver_calls["rows"] >= 1


def test_errors_and_metrics_as_on_sqlalchemys_path(
    heroes_db: Database, driver_calls: dict[str, int]
) -> None:
    by_id = sa.select(heroes.c.id).where(heroes.c.id == sa.cast(sa.bindparam("id"), sa.Integer))
    assert heroes_db.scalar(by_id, {"id": "1"}) == 1
    before = heroes_db.query_stats()
    with pytest.raises(sa_exc.DataError) as bad:
        heroes_db.scalar(by_id, {"id": "not a number"})
    assert isinstance(bad.value.orig, psycopg.errors.InvalidTextRepresentation)
    assert driver_calls["scalar"] == 1  # the failing run was on the driver path too
    after = heroes_db.query_stats()
    assert after.statements - before.statements == 1
    assert after.errors - before.errors == 1
    assert heroes_db.stats().in_use == 0
    assert heroes_db.scalar(by_id, {"id": "2"}) == 2  # the connection is fine afterwards


def test_listeners_see_every_statement(heroes_db: Database, driver_calls: dict[str, int]) -> None:
    by_id = sa.select(heroes.c.name).where(heroes.c.id == 1)
    heroes_db.scalar(by_id)
    seen: list[str] = []

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(heroes_db.engine, "before_cursor_execute", spy)
    try:
        assert heroes_db.scalar(by_id) == "tintin!"
        assert heroes_db.execute(by_id).scalar_one() == "tintin!"
    finally:
        event.remove(heroes_db.engine, "before_cursor_execute", spy)
    assert len(seen) == 2 and all("driver_path_heroes" in s for s in seen)
    assert driver_calls == {"rows": 0, "scalar": 0}


def test_repository_get_takes_the_same_turns(heroes_db: Database) -> None:
    """``repo.get`` outside a transaction: on the driver path normally, on SQLAlchemy's when
    a pool listener (leak detection, tracing) is installed; the same row either way."""

    class Heroes(Repository[dict[str, Any]]):
        table = heroes

    repo = Heroes(heroes_db)
    calls = 0
    real = FastGet.fetch

    def spy(self: FastGet, params: dict[str, Any]) -> Any:
        nonlocal calls
        row = real(self, params)  # Declined propagates uncounted
        calls += 1
        return row

    checkouts: list[object] = []

    def on_checkout(*args: Any) -> None:
        checkouts.append(args[1])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FastGet, "fetch", spy)
        plain = repo.get(1)
        event.listen(heroes_db.engine, "checkout", on_checkout)
        try:
            watched = repo.get(1)
        finally:
            event.remove(heroes_db.engine, "checkout", on_checkout)
    assert plain == watched == {"id": 1, "name": "tintin!", "score": 1.5}
    assert calls == 1 and len(checkouts) == 1


def test_text_runs_on_the_driver(db: Database, driver_calls: dict[str, int]) -> None:
    """A textual SELECT with bound parameters, and a textual write with its rowcount."""
    db.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, name text)"))
    assert db.execute(sa.text("INSERT INTO t VALUES (:id, 'x')"), {"id": 1}).rowcount == 1
    row = db.execute(sa.text("SELECT id, name FROM t WHERE id = :id"), {"id": 1}).one()
    assert row.name == "x" and row.id == 1
    assert db.scalar(sa.text("SELECT name FROM t WHERE id = :id"), {"id": 1}) == "x"
    assert driver_calls == {"rows": 3, "scalar": 1}
