"""Repository hooks: timestamps in every write path, soft delete, optimistic locking."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from dbkit import Database
from dbkit.errors import ConflictError, NotFoundError
from dbkit.repository import Repository, bulk

metadata = sa.MetaData()
items = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("sku", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    sa.Column("version", sa.Integer, nullable=False),
)
# Timestamps without time zone, named differently: the hook follows the column's type.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("inserted", sa.DateTime(timezone=False), nullable=False),
    sa.Column("touched", sa.DateTime(timezone=False), nullable=False),
)


@dataclass
class Item:
    sku: str
    name: str | None = None
    id: int | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None
    version: int | None = None


class Items(Repository[Item]):
    table = items
    model = Item
    timestamps = True
    soft_delete_column = "deleted_at"
    version_column = "version"


class Events(Repository[dict[str, Any]]):
    table = events
    timestamps = True
    created_at_column = "inserted"
    updated_at_column = "touched"


@pytest.fixture
def schema(db: Database) -> Database:
    metadata.create_all(db.engine)
    return db


@pytest.fixture
def repo(schema: Database) -> Items:
    return Items(schema)


@pytest.fixture(params=["unnest", "copy"])
def upsert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """upsert_many's two ways: unnest() arrays (small inputs) or COPY + merge (large)."""
    threshold = 0 if request.param == "copy" else 10**9
    monkeypatch.setattr(bulk, "COPY_UPSERT_ROWS", threshold)
    return str(request.param)


def now(db: Database) -> dt.datetime:
    value: dt.datetime = db.scalar(sa.select(sa.func.now()))
    return value


# ---------------------------------------------------------------------------- timestamps


def _fresh(item: Item, since: dt.datetime) -> bool:
    assert item.created_at is not None and item.updated_at is not None
    return item.created_at >= since and item.updated_at == item.created_at


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda r, rows: [r.add(row) for row in rows], id="add"),
        pytest.param(lambda r, rows: r.add_many(rows), id="add_many"),
        pytest.param(lambda r, rows: r.insert_many(rows), id="insert_many"),
        pytest.param(lambda r, rows: r.bulk_load(rows), id="bulk_load-mappings"),
        pytest.param(lambda r, rows: r.bulk_load(iter(rows)), id="bulk_load-iterator"),
        pytest.param(
            lambda r, rows: r.bulk_load([Item(**row) for row in rows]), id="bulk_load-models"
        ),
        pytest.param(
            lambda r, rows: r.bulk_load([(row["sku"],) for row in rows], columns=["sku"]),
            id="bulk_load-tuples",
        ),
        pytest.param(lambda r, rows: [r.upsert(row, ("sku",)) for row in rows], id="upsert"),
        pytest.param(lambda r, rows: r.upsert_many(rows, ("sku",)), id="upsert_many"),
        pytest.param(
            lambda r, rows: r.upsert_many(rows, ("sku",), chunk_size=1), id="upsert_many-chunks"
        ),
    ],
)
def test_every_insert_path_stamps_created_updated_and_version(
    schema: Database, repo: Items, write: Any, upsert_path: str
) -> None:
    since = now(schema)
    # A caller's value for a hook column is ignored: the repository owns them.
    stale = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    rows = [{"sku": f"s{i}", "created_at": stale} for i in range(3)]
    write(repo, rows)
    stored = repo.list(order_by="sku")
    assert [i.sku for i in stored] == ["s0", "s1", "s2"]
    for item in stored:
        assert _fresh(item, since), item
        assert item.version == 1 and item.deleted_at is None


def test_one_transaction_one_timestamp(schema: Database, repo: Items) -> None:
    with schema.transaction():
        in_tx = now(schema)
        repo.add({"sku": "a"})
        repo.bulk_load([{"sku": "b"}])
        repo.upsert_many([{"sku": "c"}], conflict=["sku"])
    assert {i.created_at for i in repo.list()} == {in_tx}


def test_update_paths_advance_updated_at_and_keep_created_at(schema: Database, repo: Items) -> None:
    a = repo.add({"sku": "a"})
    b = repo.add({"sku": "b"})
    assert a.id is not None and b.id is not None

    renamed = repo.update(a.id, name="A", created_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert renamed.created_at == a.created_at
    assert renamed.updated_at > a.updated_at  # type: ignore[operator]

    assert repo.update_where(repo.c.sku == "b", name="B") == 1
    after = repo.get(b.id)
    assert after.created_at == b.created_at and after.updated_at > b.updated_at  # type: ignore[operator]


def test_upserts_keep_created_at_and_advance_updated_at_on_conflict(
    schema: Database, repo: Items, upsert_path: str
) -> None:
    first = repo.upsert({"sku": "a", "name": "one"}, conflict=["sku"])
    repo.upsert_many([{"sku": f"m{i}", "name": "one"} for i in range(3)], conflict=["sku"])
    before = {i.sku: i for i in repo.list()}

    second = repo.upsert({"sku": "a", "name": "two"}, conflict=["sku"])
    assert second.id == first.id and second.name == "two"
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at  # type: ignore[operator]
    assert second.version == 2

    assert (
        repo.upsert_many(
            [{"sku": f"m{i}", "name": "two"} for i in range(3)] + [{"sku": "new"}], conflict=["sku"]
        )
        == 4
    )
    after = {i.sku: i for i in repo.list()}
    for sku in ("m0", "m1", "m2"):
        assert after[sku].name == "two" and after[sku].id == before[sku].id
        assert after[sku].created_at == before[sku].created_at
        assert after[sku].updated_at > before[sku].updated_at  # type: ignore[operator]
        assert after[sku].version == 2
    assert after["new"].version == 1 and after["new"].created_at == after["new"].updated_at


def test_timestamps_without_time_zone_get_the_sessions_wall_time(
    schema: Database, upsert_path: str
) -> None:
    repo = Events(schema)
    with schema.transaction():
        schema.execute("SET LOCAL TIME ZONE 'America/New_York'")
        local_now = schema.scalar(sa.select(sa.cast(sa.func.now(), sa.DateTime())))
        utc_now = now(schema).astimezone(dt.UTC).replace(tzinfo=None)
        assert local_now != utc_now
        repo.add({"id": 1, "kind": "add"})
        repo.bulk_load([(2, "copy")], columns=["id", "kind"])
        repo.upsert_many([{"id": 3, "kind": "upsert"}])
    rows = repo.list(order_by="id")
    assert [r["kind"] for r in rows] == ["add", "copy", "upsert"]
    assert {r["inserted"] for r in rows} == {r["touched"] for r in rows} == {local_now}


# --------------------------------------------------------------------------- soft delete


def test_soft_delete_hides_rows_from_every_read(schema: Database, repo: Items) -> None:
    keep = repo.add({"sku": "keep"})
    gone = repo.add({"sku": "gone"})
    assert gone.id is not None
    assert repo.delete(gone.id) is True
    assert repo.delete(gone.id) is False  # already deleted: not visible any more

    with pytest.raises(NotFoundError):
        repo.get(gone.id)
    assert repo.get_one_or_none(sku="gone") is None
    assert repo.list() == [keep]
    assert repo.count() == 1 and not repo.exists(sku="gone")
    assert list(repo.stream()) == [keep]
    assert repo.page().items == [keep]
    with pytest.raises(NotFoundError):
        repo.update(gone.id, name="x")
    assert repo.update_where(sa.true(), name="all") == 1

    deleted = repo.get(gone.id, include_deleted=True)
    assert deleted.deleted_at is not None and deleted.name is None
    assert repo.count(include_deleted=True) == 2
    assert repo.exists(sku="gone", include_deleted=True)
    assert len(repo.list(include_deleted=True)) == 2
    assert len(list(repo.stream(include_deleted=True))) == 2
    assert len(repo.page(include_deleted=True).items) == 2
    assert repo.update(gone.id, name="still", include_deleted=True).name == "still"
    # The row is really there: only a hard delete removes it.
    assert schema.scalar(sa.select(sa.func.count()).select_from(items)) == 2


def test_restore_hard_delete_and_delete_where(schema: Database, repo: Items) -> None:
    a, b, c = (repo.add({"sku": sku}) for sku in "abc")
    assert a.id is not None and b.id is not None and c.id is not None
    repo.delete(a.id)
    restored = repo.restore(a.id)
    assert restored.deleted_at is None and repo.get(a.id) == restored
    assert restored.version == 3  # add, delete, restore

    assert repo.delete_where(repo.c.sku.in_(["b", "c"])) == 2
    assert repo.count() == 1 and repo.count(include_deleted=True) == 3
    assert repo.hard_delete(b.id) is True
    assert repo.count(include_deleted=True) == 2
    with pytest.raises(NotFoundError):
        repo.restore(b.id)


def test_an_upsert_brings_a_deleted_row_back(repo: Items, upsert_path: str) -> None:
    a = repo.add({"sku": "a", "name": "old"})
    b = repo.add({"sku": "b"})
    repo.delete_where(sa.true())
    assert repo.upsert({"sku": "a", "name": "new"}, conflict=["sku"]).id == a.id
    repo.upsert_many([{"sku": "b"}], conflict=["sku"])
    assert {i.sku: i.name for i in repo.list()} == {"a": "new", "b": None}
    assert repo.get(b.id).deleted_at is None  # type: ignore[arg-type]


# --------------------------------------------------------------------- optimistic locking


def test_versions_count_updates_and_stale_writes_conflict(repo: Items) -> None:
    item = repo.add(Item(sku="a"))
    assert item.id is not None and item.version == 1
    v2 = repo.update(item.id, name="first", expected_version=1)
    assert v2.version == 2
    v3 = repo.update(item.id, name="unchecked")  # no expectation: still counted
    assert v3.version == 3

    with pytest.raises(ConflictError) as caught:
        repo.update(item.id, name="stale", expected_version=2)
    conflict = caught.value
    assert (conflict.expected, conflict.actual, conflict.key) == (2, 3, item.id)
    assert not isinstance(conflict, NotFoundError)
    assert repo.get(item.id).name == "unchecked"

    with pytest.raises(NotFoundError):
        repo.update(item.id + 100, name="x", expected_version=1)
    assert repo.update_where(repo.c.id == item.id, name="bulk") == 1
    assert repo.get(item.id).version == 4


def test_a_stale_write_loses_to_a_concurrent_one(schema: Database, repo: Items) -> None:
    item = repo.add(Item(sku="race"))
    assert item.id is not None
    seen_by_a = repo.get(item.id)
    seen_by_b = repo.get(item.id)
    repo.update(item.id, name="b wins", expected_version=seen_by_b.version)
    with pytest.raises(ConflictError):
        repo.update(item.id, name="a loses", expected_version=seen_by_a.version)
    assert repo.get(item.id).name == "b wins"


def test_a_version_column_alone_is_set_by_every_insert_path(
    schema: Database, upsert_path: str
) -> None:
    class Versioned(Repository[dict[str, Any]]):
        table = items
        version_column = "version"

    repo = Versioned(schema)
    stamp = {"created_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}
    stamp["updated_at"] = stamp["created_at"]
    repo.add({"sku": "a", **stamp})
    repo.bulk_load([{"sku": "b", **stamp}])
    repo.bulk_load(
        [("c", stamp["created_at"], stamp["created_at"])],
        columns=["sku", "created_at", "updated_at"],
    )
    repo.upsert_many([{"sku": "d", **stamp}], conflict=["sku"])
    assert {r["sku"]: r["version"] for r in repo.list()} == {"a": 1, "b": 1, "c": 1, "d": 1}
    repo.upsert_many([{"sku": "d", "name": "again", **stamp}], conflict=["sku"])
    assert repo.get_one_or_none(sku="d")["version"] == 2  # type: ignore[index]
    # Without timestamps the repository leaves those columns to the caller.
    assert {r["created_at"] for r in repo.list()} == {stamp["created_at"]}


# ------------------------------------------------------------------------- configuration


def test_hook_columns_must_exist() -> None:
    with pytest.raises(TypeError, match="updated_at_column"):

        class Broken(Repository[dict[str, Any]]):
            table = events
            timestamps = True
            created_at_column = "inserted"

    with pytest.raises(TypeError, match="soft_delete_column"):

        class NoDeleted(Repository[dict[str, Any]]):
            table = events
            soft_delete_column = "deleted_at"


def test_restore_without_soft_delete_is_refused(schema: Database) -> None:
    with pytest.raises(TypeError, match="soft_delete_column"):
        Events(schema).restore(1)
