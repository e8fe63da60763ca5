"""``dbkit.Repository`` against real PostgreSQL: every method, composite keys, model mapping,
ordering, keyset pages, streaming, ambient transactions, error translation, input safety.

Hooks (timestamps, soft delete, versions) are in test_repository_hooks.py; bulk paths
(add_many at scale, insert_many, bulk_load, upsert_many, a stream's peak memory) in
test_repository_bulk.py.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

import dbkit
from dbkit import Database
from dbkit.errors import (
    ConflictError,
    DuplicateKeyError,
    ForeignKeyError,
    IntegrityError,
    MultipleResultsError,
    NotFoundError,
    TransactionBroken,
    TransactionRolledBack,
)
from dbkit.repository import Page, Repository


class Tier(enum.Enum):
    free = "free"
    pro = "pro"


metadata = sa.MetaData()
teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False, unique=True),
)
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column("age", sa.Integer, nullable=False, server_default="0"),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id", name="fk_accounts_team")),
    sa.Column("tier", sa.Enum(Tier, name="tier"), nullable=False, server_default="free"),
    sa.Column("balance", sa.Numeric(10, 2), nullable=False, server_default="0"),
    sa.UniqueConstraint("email", name="uq_accounts_email"),
    sa.CheckConstraint("age >= 0", name="ck_accounts_age_non_negative"),
)
memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("team_id", sa.Integer, primary_key=True),
    sa.Column("account_id", sa.Integer, primary_key=True),
    sa.Column("role", sa.Text, nullable=False),
)


@dataclass
class Account:
    email: str
    name: str | None = None
    age: int | None = None
    team_id: int | None = None
    id: int | None = None
    tier: Tier | None = None
    balance: Decimal | None = None


class Accounts(Repository[Account]):
    table = accounts
    model = Account


class AccountDicts(Repository[dict[str, Any]]):
    table = accounts


class Teams(Repository[dict[str, Any]]):
    table = teams


@dataclass
class Membership:
    team_id: int
    account_id: int
    role: str


class Memberships(Repository[Membership]):
    table = memberships
    model = Membership


@pytest.fixture
def schema(db: Database) -> Database:
    metadata.create_all(db.engine)
    return db


@pytest.fixture
def repo(schema: Database) -> Accounts:
    return Accounts(schema)


@pytest.fixture
def dicts(schema: Database) -> AccountDicts:
    return AccountDicts(schema)


@pytest.fixture
def members(schema: Database) -> Memberships:
    return Memberships(schema)


def statements(db: Database) -> int:
    return db.query_stats().statements


@contextlib.contextmanager
def no_sql(db: Database) -> Iterator[None]:
    """Nothing reaches the database inside the block."""
    before = statements(db)
    yield
    assert statements(db) == before, "SQL was sent"


# ---------------------------------------------------------------------------------- CRUD


def test_add_returns_the_stored_row_with_defaults_and_key(repo: Accounts) -> None:
    ann = repo.add(Account(email="ann@example.com", name="Ann"))
    assert isinstance(ann, Account)
    assert ann.id is not None
    assert (ann.email, ann.name, ann.age, ann.tier) == ("ann@example.com", "Ann", 0, Tier.free)
    assert ann.balance == Decimal("0.00")
    assert repo.get(ann.id) == ann


def test_add_accepts_a_mapping_and_returns_the_model(repo: Accounts) -> None:
    bob = repo.add({"email": "bob@example.com", "age": 41, "tier": Tier.pro})
    assert isinstance(bob, Account) and bob.age == 41 and bob.tier is Tier.pro


def test_get_missing_key_is_not_found(repo: Accounts) -> None:
    with pytest.raises(NotFoundError, match="accounts"):
        repo.get(12345)
    with pytest.raises(ValueError, match="None"):
        repo.get(None)


def test_get_inside_and_outside_a_transaction_processes_types_alike(
    schema: Database, repo: Accounts
) -> None:
    """Outside a block get() runs on the driver directly; the enum and numeric results are
    still converted as SQLAlchemy would."""
    stored = repo.add({"email": "e@example.com", "tier": Tier.pro, "balance": Decimal("12.50")})
    assert stored.id is not None
    outside = repo.get(stored.id)
    with schema.transaction():
        inside = repo.get(stored.id)
    assert outside == inside == stored
    assert outside.tier is Tier.pro and outside.balance == Decimal("12.50")


def test_get_outside_a_transaction_is_one_counted_statement(
    schema: Database, repo: Accounts
) -> None:
    stored = repo.add({"email": "count@example.com"})
    before = statements(schema)
    for _ in range(3):
        repo.get(stored.id)
    assert statements(schema) == before + 3
    assert schema.stats().in_use == 0


def test_get_follows_sqlalchemy_when_cursor_events_are_instrumented(
    schema: Database, repo: Accounts
) -> None:
    seen: list[str] = []

    def trace(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(schema.engine, "before_cursor_execute", trace)
    try:
        stored = repo.add({"email": "traced@example.com"})
        assert repo.get(stored.id) == stored
    finally:
        sa.event.remove(schema.engine, "before_cursor_execute", trace)
    assert any(s.startswith("SELECT") for s in seen)


def test_get_with_a_bad_key_type_is_a_wrapped_driver_error(
    schema: Database, repo: Accounts
) -> None:
    with pytest.raises(sa_exc.DBAPIError):
        repo.get("not a number")
    assert schema.stats().in_use == 0
    assert repo.count() == 0  # the pooled connection is still usable


def test_get_survives_a_reconnect_and_killed_pooled_connections(
    schema: Database, repo: Accounts, db_url: str
) -> None:
    stored = repo.add({"email": "r@example.com"})
    assert repo.get(stored.id) == stored
    schema.close()
    schema.connect()  # a new engine and pool
    assert repo.get(stored.id) == stored
    # Fill the pool with three idle connections (held at once, so they are distinct).
    pids: set[int] = set()
    together = threading.Barrier(3)

    def hold() -> None:
        with schema.transaction() as conn:
            pids.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            together.wait(timeout=30)

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    stats = schema.stats()
    assert len(pids) == 3 and stats.idle == stats.open_connections == 3
    # The server ends every pooled session, and each backend has exited before we go on.
    # Like a restart (test_pool.py), this must be invisible: no get may fail, not even the
    # first one on a dead connection.
    with psycopg.connect(db_url.replace("postgresql+psycopg", "postgresql")) as killer:
        killed = killer.execute(
            "SELECT pid, pg_terminate_backend(pid, 5000) FROM unnest(%s::int[]) AS pid",
            (sorted(pids),),
        ).fetchall()
    assert sorted(killed) == [(pid, True) for pid in sorted(pids)]
    for _ in range(3):
        assert repo.get(stored.id) == stored
    # The pool may hand the same (replaced) connection back each time: keep two others
    # checked out so that a get has to take the last of the three dead ones too.
    with contextlib.ExitStack() as held:
        for _ in range(2):
            conn = held.enter_context(schema.engine.connect())
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() not in pids
        assert repo.get(stored.id) == stored
    with schema.transaction() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() not in pids
    stats = schema.stats()
    assert stats.invalidated >= 3  # every dead connection was found and replaced, unseen
    assert stats.in_use == 0


def test_statement_listeners_see_the_driver_level_paths(schema: Database, repo: Accounts) -> None:
    """get (outside a block), stream and bulk_load run on the driver; metrics and statement
    listeners (tracing) still see each of their statements."""
    seen: list[str] = []
    schema.add_statement_listener(lambda seconds, error, sql: seen.append(sql()))
    repo.bulk_load([{"email": "a@example.com"}])
    stored = repo.get_one_or_none(email="a@example.com")
    assert stored is not None
    seen.clear()
    repo.get(stored.id)
    assert len(list(repo.stream())) == 1
    repo.bulk_load([{"email": "b@example.com"}])
    assert seen[0].startswith("SELECT") and "WHERE accounts.id" in seen[0]
    assert seen[1].startswith("SELECT")
    assert seen[2].startswith("COPY") and "accounts" in seen[2]


def test_rows_are_dicts_without_a_model(dicts: AccountDicts) -> None:
    row = dicts.add({"email": "d@example.com", "name": "D"})
    assert isinstance(row, dict)
    assert row["email"] == "d@example.com" and set(row) == set(accounts.c.keys())
    assert dicts.get(row["id"]) == row
    assert dicts.list() == [row]


def test_a_keyword_built_class_and_slotted_objects(schema: Database) -> None:
    class Plain:
        def __init__(self, **columns: Any) -> None:
            self.__dict__.update(columns)

    class Slotted:
        __slots__ = ("email", "name")

        def __init__(self, email: str, name: str) -> None:
            self.email, self.name = email, name

    class PlainAccounts(Repository[Plain]):
        table = accounts
        model = Plain

    repo = PlainAccounts(schema)
    stored = repo.add(Slotted("s@example.com", "Slot"))
    assert isinstance(stored, Plain)
    assert (stored.email, stored.name, stored.age) == ("s@example.com", "Slot", 0)  # type: ignore[attr-defined]
    again = repo.add(Plain(email="p@example.com", unrelated="ignored"))
    assert again.email == "p@example.com"  # type: ignore[attr-defined]


def test_a_model_needing_a_non_column_is_refused_at_class_creation() -> None:
    @dataclass
    class Wrong:
        email: str
        nickname: str

    with pytest.raises(TypeError, match="nickname"):

        class WrongAccounts(Repository[Wrong]):
            table = accounts
            model = Wrong


def test_a_repository_without_a_table_cannot_be_made(db: Database) -> None:
    class NoTable(Repository[dict[str, Any]]):
        pass

    with pytest.raises(TypeError, match="table"):
        NoTable(db)


def test_list_filters_orders_limits_and_offsets(repo: Accounts) -> None:
    for i, name in enumerate(["c", "a", "b", "a"]):
        repo.add({"email": f"{i}@example.com", "name": name, "age": 20 + i})
    assert [a.age for a in repo.list(order_by="age")] == [20, 21, 22, 23]
    assert [a.age for a in repo.list(order_by="-age", limit=2)] == [23, 22]
    assert [a.age for a in repo.list(order_by=["name", "-age"])] == [23, 21, 22, 20]
    assert [a.age for a in repo.list(order_by=accounts.c.age.desc(), offset=3)] == [20]
    assert [a.age for a in repo.list(name="a", order_by="age")] == [21, 23]
    assert [a.age for a in repo.list(repo.c.age > 21, name="a")] == [23]
    assert repo.list(name=None) == []
    with pytest.raises(ValueError, match="limit"):
        repo.list(limit=-1)


def test_count_and_exists(repo: Accounts) -> None:
    assert repo.count() == 0 and not repo.exists()
    repo.add({"email": "x@example.com", "age": 30})
    repo.add({"email": "y@example.com", "age": 40})
    assert repo.count() == 2
    assert repo.count(repo.c.age > 35) == 1
    assert repo.exists(email="x@example.com")
    assert not repo.exists(email="z@example.com")
    assert repo.exists(repo.c.age >= 40)


def test_get_one_or_none(repo: Accounts) -> None:
    assert repo.get_one_or_none(email="nobody@example.com") is None
    one = repo.add({"email": "one@example.com", "name": "same"})
    assert repo.get_one_or_none(email="one@example.com") == one
    repo.add({"email": "two@example.com", "name": "same"})
    with pytest.raises(MultipleResultsError):
        repo.get_one_or_none(name="same")


def test_update_returns_the_new_row_and_missing_is_not_found(repo: Accounts) -> None:
    ann = repo.add({"email": "ann@example.com", "age": 30})
    older = repo.update(ann.id, age=31, name="Ann")
    assert (older.age, older.name, older.email) == (31, "Ann", "ann@example.com")
    assert repo.get(ann.id) == older
    with pytest.raises(NotFoundError):
        repo.update(ann.id + 100, age=1)
    with pytest.raises(ValueError, match="nothing to update"):
        repo.update(ann.id)
    with pytest.raises(ValueError, match="expected_version"):
        repo.update(ann.id, age=2, expected_version=1)  # no version_column here


def test_update_where_delete_and_delete_where(repo: Accounts) -> None:
    for i in range(5):
        repo.add({"email": f"{i}@example.com", "age": i})
    assert repo.update_where(repo.c.age >= 3, name="old") == 2
    assert repo.count(name="old") == 2
    first = repo.get_one_or_none(email="0@example.com")
    assert first is not None
    assert repo.delete(first.id) is True
    assert repo.delete(first.id) is False
    with pytest.raises(ValueError, match="every row"):
        repo.delete_where()
    assert repo.delete_where(name="old") == 2
    assert repo.delete_where(repo.c.age == 1) == 1
    assert repo.delete_where(sa.true()) == 1
    assert repo.count() == 0


def test_composite_primary_keys(members: Memberships) -> None:
    members.add(Membership(team_id=1, account_id=10, role="owner"))
    members.add({"team_id": 1, "account_id": 11, "role": "member"})
    members.add({"team_id": 2, "account_id": 10, "role": "member"})
    assert members.get((1, 10)) == Membership(1, 10, "owner")
    assert members.get({"account_id": 11, "team_id": 1}).role == "member"
    assert members.update((2, 10), role="owner") == Membership(2, 10, "owner")
    with pytest.raises(NotFoundError):
        members.get((3, 10))
    for bad in (1, (1,), (1, 2, 3), {"team_id": 1}):
        with pytest.raises(ValueError, match="team_id, account_id"):
            members.get(bad)
    assert members.upsert({"team_id": 1, "account_id": 10, "role": "admin"}).role == "admin"
    assert members.delete((1, 11)) is True
    pages = members.page(limit=1)
    assert pages.items == [Membership(1, 10, "admin")] and pages.next_after == (1, 10)
    rest = members.page(limit=5, after=pages.next_after)
    assert rest.items == [Membership(2, 10, "owner")] and rest.next_after is None


# ------------------------------------------------------------------------------ ordering


def test_page_walks_every_row_once_in_order_with_ties(repo: Accounts) -> None:
    ages = [30, 20, 30, 10, 20, 30, 40, 10, 20]
    stored = [repo.add({"email": f"{i}@example.com", "age": age}) for i, age in enumerate(ages)]
    expected = sorted(stored, key=lambda a: (a.age, a.id))

    seen: list[Account] = []
    after = None
    while True:
        page = repo.page(order_by="age", after=after, limit=2)
        assert isinstance(page, Page) and len(page.items) <= 2
        seen += page.items
        if page.next_after is None:
            break
        assert page.has_next and page.next_after == (page.items[-1].age, page.items[-1].id)
        after = page.next_after
    assert seen == expected

    newest_first = sorted(stored, key=lambda a: (a.age, a.id), reverse=True)
    assert _walk(repo, "-age", 4) == newest_first
    assert _walk(repo, accounts.c.age.desc(), 3) == newest_first
    # Mixed directions: age ascending, then id descending (OR-of-ANDs).
    mixed = sorted(stored, key=lambda a: (a.age, -(a.id or 0)))
    assert _walk(repo, ["age", "-id"], 2) == mixed


def _walk(repo: Accounts, order_by: Any, limit: int) -> list[Account]:
    items: list[Account] = []
    after = None
    while True:
        page = repo.page(order_by=order_by, after=after, limit=limit)
        items += page.items
        if page.next_after is None:
            return items
        after = page.next_after


def test_page_with_filters_and_bad_arguments(repo: Accounts) -> None:
    for i in range(6):
        repo.add({"email": f"{i}@example.com", "age": i % 2, "name": f"n{i}"})
    page = repo.page(age=1, order_by="email", limit=10)
    assert [a.email for a in page.items] == ["1@example.com", "3@example.com", "5@example.com"]
    assert page.next_after is None
    with pytest.raises(ValueError, match="nullable"):
        repo.page(order_by="name")
    with pytest.raises(ValueError, match="next_after"):
        repo.page(order_by="age", after=(1,))
    with pytest.raises(ValueError, match="own table"):
        repo.page(order_by=sa.func.lower(accounts.c.email))
    with pytest.raises(ValueError, match="limit"):
        repo.page(limit=0)


def test_page_keys_outside_the_model_still_work(schema: Database) -> None:
    @dataclass
    class EmailOnly:
        email: str

    class Emails(Repository[EmailOnly]):
        table = accounts
        model = EmailOnly

    repo = Emails(schema)
    for i in range(3):
        repo.add({"email": f"{i}@example.com", "age": 3 - i})
    first = repo.page(order_by="age", limit=2)
    assert first.items == [EmailOnly("2@example.com"), EmailOnly("1@example.com")]
    assert first.next_after is not None and first.next_after[0] == 2
    assert repo.page(order_by="age", after=first.next_after).items == [EmailOnly("0@example.com")]


def test_stream_yields_every_row_in_order_and_releases_its_connection(
    schema: Database, repo: Accounts
) -> None:
    for i in range(25):
        repo.add({"email": f"{i:02}@example.com", "age": i})
    rows = list(repo.stream(batch_size=4, order_by="-age"))
    assert [a.age for a in rows] == list(range(24, -1, -1))
    assert schema.stats().in_use == 0
    assert [a.age for a in repo.stream(repo.c.age < 3, order_by="age")] == [0, 1, 2]

    # Closed half-way: the cursor, its transaction and its connection are released.
    stream = repo.stream(batch_size=2, order_by="age")
    assert next(stream).age == 0
    assert schema.stats().in_use == 1
    stream.close()
    assert schema.stats().in_use == 0
    with pytest.raises(ValueError, match="batch_size"):
        repo.stream(batch_size=0)


def test_two_streams_interleave_and_writes_while_streaming_commit(
    schema: Database, repo: Accounts
) -> None:
    for i in range(6):
        repo.add({"email": f"{i}@example.com", "age": i})
    pairs = list(
        zip(repo.stream(order_by="age", batch_size=2), repo.stream(order_by="-age"), strict=True)
    )
    assert [(a.age, b.age) for a, b in pairs] == [(i, 5 - i) for i in range(6)]
    # A write made while iterating is not part of the stream's own transaction.
    for account in repo.stream(order_by="age", batch_size=2):
        if account.age == 0:
            repo.update(account.id, name="seen")
            assert not schema.in_transaction()
    assert repo.get_one_or_none(name="seen") is not None


def test_stream_converts_types_and_binds_like_sqlalchemy(schema: Database, repo: Accounts) -> None:
    """stream() reads from a psycopg named cursor; enum/numeric results and enum/IN-list
    parameters still go through SQLAlchemy's processing, with or without cursor events."""
    for i, tier in enumerate([Tier.free, Tier.pro, Tier.pro]):
        repo.add({"email": f"{i}@example.com", "tier": tier, "balance": Decimal(f"{i}.25")})
    expected = repo.list(order_by="id")

    def run() -> list[Account]:
        return list(repo.stream(repo.c.id.in_([a.id for a in expected]), order_by="id"))

    assert run() == expected
    assert [a.email for a in repo.stream(tier=Tier.pro, order_by="id")] == [
        "1@example.com",
        "2@example.com",
    ]
    assert list(repo.stream(repo.c.id.in_([]))) == []

    def trace(*args: Any) -> None:
        pass

    sa.event.listen(schema.engine, "before_cursor_execute", trace)
    try:
        assert run() == expected  # SQLAlchemy's own path
    finally:
        sa.event.remove(schema.engine, "before_cursor_execute", trace)
    assert {type(a.tier) for a in expected} == {Tier} and expected[2].balance == Decimal("2.25")


def test_a_failing_stream_raises_the_wrapped_error_and_releases_its_connection(
    schema: Database, repo: Accounts
) -> None:
    repo.add({"email": "a@example.com"})
    with pytest.raises(sa_exc.DataError, match="division by zero"):
        list(repo.stream(sa.text("1 / (age - age) = 1")))
    assert schema.stats().in_use == 0
    # Failed at the first FETCH (DECLARE succeeds): one failed statement on either path.
    assert schema.query_stats().errors_by_class == {"22": 1}
    with pytest.raises(sa_exc.ProgrammingError):
        list(repo.stream(sa.text("no_such_column = 1")))
    assert schema.query_stats().errors_by_class == {"22": 1, "42": 1}
    assert repo.count() == 1


def test_stream_inside_a_transaction_sees_its_uncommitted_rows(
    schema: Database, repo: Accounts
) -> None:
    with schema.transaction():
        repo.add({"email": "tx@example.com"})
        assert [a.email for a in repo.stream()] == ["tx@example.com"]
        schema.set_rollback(True)
    assert list(repo.stream()) == []


# --------------------------------------------------------------------- ambient transaction


def test_writes_inside_a_rolled_back_block_leave_nothing(schema: Database, repo: Accounts) -> None:
    with pytest.raises(RuntimeError):
        with schema.transaction():
            ann = repo.add({"email": "ann@example.com"})
            repo.add_many([{"email": "b@example.com"}, {"email": "c@example.com"}])
            repo.upsert_many([{"email": "d@example.com"}], conflict=["email"])
            repo.bulk_load([{"email": "e@example.com"}])
            repo.update(ann.id, name="Ann")
            assert repo.count() == 5
            raise RuntimeError("roll it back")
    assert repo.count() == 0


def test_another_thread_does_not_see_uncommitted_rows(schema: Database, repo: Accounts) -> None:
    seen: dict[str, Any] = {}
    with schema.transaction():
        ann = repo.add({"email": "ann@example.com"})

        def other_thread() -> None:
            seen["count"] = repo.count()
            seen["exists"] = repo.exists(email="ann@example.com")
            try:
                repo.get(ann.id)
            except NotFoundError:
                seen["get"] = "not found"

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert repo.count() == 1
    assert seen == {"count": 0, "exists": False, "get": "not found"}
    assert repo.get(ann.id) == ann


def test_a_failed_write_breaks_the_block_like_any_statement(
    schema: Database, repo: Accounts
) -> None:
    repo.add({"email": "dup@example.com"})
    with pytest.raises(TransactionRolledBack) as caught:
        with schema.transaction():
            repo.add({"email": "ok@example.com"})
            with pytest.raises(DuplicateKeyError):
                repo.add({"email": "dup@example.com"})
            with pytest.raises(TransactionBroken):
                repo.count()
            with pytest.raises(TransactionBroken):
                repo.bulk_load([{"email": "late@example.com"}])
    assert isinstance(caught.value.__cause__, DuplicateKeyError | sa_exc.IntegrityError)
    assert repo.count() == 1
    # A nested block (savepoint) keeps the outer one alive.
    with schema.transaction():
        repo.add({"email": "kept@example.com"})
        with pytest.raises(DuplicateKeyError):
            with schema.transaction():
                repo.bulk_load([{"email": "new@example.com"}, {"email": "dup@example.com"}])
    assert sorted(a.email for a in repo.list()) == ["dup@example.com", "kept@example.com"]


def test_a_stream_failing_inside_a_block_never_lets_it_commit(
    schema: Database, repo: Accounts
) -> None:
    with pytest.raises(TransactionRolledBack):
        with schema.transaction():
            repo.add({"email": "lost@example.com"})
            with pytest.raises(sa_exc.ProgrammingError):
                list(repo.stream(sa.text("no_such_column = 1")))
    assert repo.count() == 0


# ------------------------------------------------------------------------------- errors


def test_unique_violation_is_a_duplicate_key_error(schema: Database, repo: Accounts) -> None:
    repo.add({"email": "dup@example.com"})
    with pytest.raises(DuplicateKeyError) as caught:
        repo.add({"email": "dup@example.com"})
    error = caught.value
    assert error.constraint == "uq_accounts_email"
    assert error.table == "accounts" and error.sqlstate == "23505"
    assert "Key (email)=(dup@example.com) already exists" in str(error)
    assert isinstance(error.__cause__, sa_exc.IntegrityError)
    assert isinstance(error, IntegrityError) and isinstance(error, dbkit.DbkitError)


def test_foreign_key_violation_is_a_foreign_key_error(repo: Accounts) -> None:
    with pytest.raises(ForeignKeyError) as caught:
        repo.add({"email": "fk@example.com", "team_id": 99})
    assert caught.value.constraint == "fk_accounts_team"
    assert "is not present in table" in str(caught.value)


def test_not_null_violation_names_the_column(repo: Accounts) -> None:
    with pytest.raises(IntegrityError) as caught:
        repo.add({"name": "no email"})
    error = caught.value
    assert type(error) is IntegrityError
    assert (error.column, error.table, error.sqlstate) == ("email", "accounts", "23502")


def test_check_violation_names_the_constraint(repo: Accounts) -> None:
    with pytest.raises(IntegrityError) as caught:
        repo.add({"email": "neg@example.com", "age": -1})
    assert caught.value.constraint == "ck_accounts_age_non_negative"
    assert caught.value.sqlstate == "23514"
    ann = repo.add({"email": "ann@example.com"})
    with pytest.raises(IntegrityError, match="ck_accounts_age_non_negative"):
        repo.update(ann.id, age=-5)


def test_constraint_errors_map_to_the_repositorys_own_classes(schema: Database) -> None:
    class EmailTaken(DuplicateKeyError):
        pass

    class TeamMissing(Exception):
        pass

    class StrictAccounts(Repository[Account]):
        table = accounts
        model = Account
        constraint_errors = {"uq_accounts_email": EmailTaken, "fk_accounts_team": TeamMissing}

    repo = StrictAccounts(schema)
    repo.add({"email": "a@example.com"})
    with pytest.raises(EmailTaken) as caught:
        repo.add({"email": "a@example.com"})
    assert caught.value.constraint == "uq_accounts_email"
    with pytest.raises(TeamMissing, match="fk_accounts_team"):
        repo.add({"email": "b@example.com", "team_id": 7})
    with pytest.raises(EmailTaken):
        repo.bulk_load([{"email": "a@example.com"}])


def test_conflict_error_is_not_a_not_found_error() -> None:
    assert not issubclass(ConflictError, NotFoundError)
    assert issubclass(ConflictError, dbkit.DbkitError)


# ------------------------------------------------------------------------- input safety


HOSTILE = ["email; DROP TABLE accounts", 'x" OR 1=1 --', "email\x00", "", "EMAIL", 3]


@pytest.mark.parametrize("name", HOSTILE)
def test_unknown_filter_keys_are_refused_before_any_sql(
    schema: Database, repo: Accounts, name: Any
) -> None:
    filters = {str(name): "x"}
    with no_sql(schema):
        for call in (repo.list, repo.count, repo.exists, repo.get_one_or_none, repo.delete_where):
            with pytest.raises(ValueError, match="unknown column") as caught:
                call(**filters)
            assert "accounts" in str(caught.value)
        with pytest.raises(ValueError, match="unknown column"):
            repo.stream(**filters)
        with pytest.raises(ValueError, match="unknown column"):
            repo.page(**filters)


@pytest.mark.parametrize(
    "order_by",
    ["email; DROP TABLE accounts", "-email desc", 'x" OR 1=1 --', "--email", ["age", "1"]],
)
def test_order_by_strings_must_name_columns(
    schema: Database, repo: Accounts, order_by: Any
) -> None:
    with no_sql(schema):
        with pytest.raises(ValueError, match="unknown column"):
            repo.list(order_by=order_by)
        with pytest.raises(ValueError, match="unknown column"):
            repo.page(order_by=order_by)
        with pytest.raises(ValueError, match="unknown column"):
            repo.stream(order_by=order_by)


def test_value_and_column_names_are_checked_before_any_sql(
    schema: Database, repo: Accounts
) -> None:
    bad = "email; DROP TABLE accounts"
    ann = repo.add({"email": "ann@example.com"})
    with no_sql(schema):
        for call in (
            lambda: repo.add({bad: "x"}),
            lambda: repo.add_many([{"email": "ok@example.com"}, {bad: "x"}]),
            lambda: repo.insert_many([{"email": "ok@example.com"}, {bad: "x"}]),
            lambda: repo.upsert({"email": "x", bad: "x"}, conflict=["email"]),
            lambda: repo.upsert({"email": "x"}, conflict=[bad]),
            lambda: repo.upsert_many([{"email": "x"}], conflict=["email"], update=[bad]),
            lambda: repo.update(ann.id, **{bad: "x"}),
            lambda: repo.update_where(sa.true(), **{bad: "x"}),
            lambda: repo.bulk_load([("x",)], columns=[bad]),
            lambda: repo.bulk_load([{bad: "x"}]),
            lambda: repo.like(bad, "x"),
        ):
            with pytest.raises(ValueError, match="unknown column"):
                call()
        with pytest.raises(ValueError, match="SQLAlchemy expressions"):
            repo.list("1=1; DROP TABLE accounts")  # type: ignore[arg-type]
    assert repo.count() == 1


def test_hostile_values_are_stored_verbatim(repo: Accounts) -> None:
    values = ["email; DROP TABLE accounts", 'x" OR 1=1 --', "'); DELETE FROM accounts; --"]
    for value in values:
        stored = repo.add({"email": value, "name": value})
        assert repo.get(stored.id).name == value
        assert repo.get_one_or_none(email=value) == stored
    assert repo.count() == 3
    assert repo.count(name=values[1]) == 1


def test_like_matches_percent_and_underscore_literally(repo: Accounts) -> None:
    for email in ("50%_off@example.com", "50xyoff@example.com", "a_b@x.org", "axb@x.org"):
        repo.add({"email": email})

    def emails(*where: Any) -> list[str]:
        return sorted(a.email for a in repo.list(*where))

    assert emails(repo.like("email", "50%_off")) == ["50%_off@example.com"]
    assert emails(repo.like("email", "a_b", "startswith")) == ["a_b@x.org"]
    assert emails(repo.like("email", "_b@X.ORG", "endswith", case_sensitive=False)) == ["a_b@x.org"]
    assert emails(repo.like("email", "%")) == ["50%_off@example.com"]
    with pytest.raises(ValueError, match="mode"):
        repo.like("email", "x", "regex")  # type: ignore[arg-type]


def test_unicode_round_trips(repo: Accounts) -> None:
    name = "Zoë Ñandú 漢字 🐘 \u200b'\"\\"
    stored = repo.add({"email": "zoë@exämple.com", "name": name})
    assert repo.get(stored.id).name == name
    assert repo.get_one_or_none(email="zoë@exämple.com") == stored
    assert [a.name for a in repo.stream()] == [name]


def test_nul_bytes_are_refused_and_nothing_is_half_written(repo: Accounts) -> None:
    with pytest.raises(sa_exc.DataError, match="NUL"):
        repo.add({"email": "nul\x00@example.com"})
    with pytest.raises(sa_exc.DataError, match="NUL"):
        repo.add_many(
            [{"email": f"{i}@example.com", "name": "a\x00b" if i == 3 else "ok"} for i in range(5)]
        )
    with pytest.raises(psycopg.DataError, match="NUL"):
        repo.bulk_load(
            [{"email": f"{i}@example.com", "name": "a\x00" if i == 3 else "ok"} for i in range(5)]
        )
    assert repo.count() == 0
