"""``Repository.merge_from_staging``: the set-based merge with rejects, on a table with
every kind of rule (NOT NULL, CHECK, types, a length, a foreign key, two unique keys), its
re-runs, interruption and resumption, faults, concurrent runs and the bisection fallback
for what no query predicts."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from dbkit import Database
from dbkit.repository import Repository
from dbkit.repository.merge import MergeChunk, MergeResult

metadata = sa.MetaData()
teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text),
)
players = sa.Table(
    "players",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("handle", sa.String(12), unique=True),
    sa.Column("age", sa.Integer),
    sa.Column("born", sa.Date),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id")),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.CheckConstraint("age >= 0", name="age_not_negative"),
)
# Staging as a COPY of a CSV leaves it: every value text, the input line as key.
staged_players = sa.Table(
    "staged_players",
    metadata,
    sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("email", sa.Text),
    sa.Column("handle", sa.Text),
    sa.Column("age", sa.Text),
    sa.Column("born", sa.Text),
    sa.Column("team_id", sa.Text),
)
player_rejects = sa.Table(
    "player_rejects",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("email", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
)


class Players(Repository[dict[str, Any]]):
    table = players
    timestamps = True


class Staged(Repository[dict[str, Any]]):
    table = staged_players


COLUMNS = ("line", "email", "handle", "age", "born", "team_id")


@pytest.fixture
def schema(db: Database) -> Database:
    metadata.create_all(db.engine)
    db.execute(sa.insert(teams), [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}])
    return db


def stage(db: Database, rows: list[tuple[Any, ...]]) -> None:
    with db.transaction() as conn:
        conn.execute(sa.text("TRUNCATE staged_players"))
        Staged(db).bulk_load(rows, columns=COLUMNS)


def merge(db: Database, **options: Any) -> MergeResult:
    options.setdefault("order_by", "line")
    options.setdefault("conflict", ("email",))
    options.setdefault("rejects", player_rejects)
    return Players(db).merge_from_staging(staged_players, **options)


def table(db: Database) -> dict[str, tuple[Any, ...]]:
    rows = db.execute(sa.text("SELECT email, handle, age, born::text, team_id FROM players"))
    return {row[0]: tuple(row[1:]) for row in rows}


def rejects(db: Database) -> dict[int, str]:
    rows = db.execute(sa.text("SELECT line, reason FROM player_rejects ORDER BY line")).all()
    lines = [line for line, _ in rows]
    assert len(lines) == len(set(lines)), f"a record was refused twice: {lines}"
    return dict(rows)


MIXED = [
    (1, "ada@x.org", "ada", "36", "1815-12-10", "1"),
    (2, None, "nomail", "1", None, None),
    (3, "neg@x.org", None, "-1", None, None),
    (4, "word@x.org", None, "forty", None, None),
    (5, "date@x.org", None, None, "2024-13-01", None),
    (6, "long@x.org", "thirteen_char", None, None, None),
    (7, "orphan@x.org", None, None, None, "99"),
    (8, "team@x.org", None, None, None, "red"),
    (9, "dup@x.org", "first", "1", None, "1"),
    (10, "dup@x.org", "second", "2", None, "2"),
    (11, "grace@x.org", "ada", None, None, None),
    (12, "hopper@x.org", "taken", None, None, None),
    (13, "old@x.org", "oldie", "99", None, None),
    (14, "ok@x.org", None, None, None, None),
]
REASONS = {
    2: "email is missing (not null)",
    3: "violates age_not_negative",
    4: "age is not a valid integer",
    5: "born is not a valid date",
    6: "handle is not a valid character varying(12)",
    7: "violates players_team_id_fkey",
    8: "team_id is not a valid integer",
    11: "violates players_handle_key (repeated in the input)",
    12: "violates players_handle_key",
}


def test_every_kind_of_refusal_is_found_in_sql_with_its_reason(schema: Database) -> None:
    db = schema
    db.execute(
        sa.insert(players),
        [
            {"email": "taker@x.org", "handle": "taken"},
            {"email": "old@x.org", "handle": "oldie", "age": 50},
        ],
    )
    stage(db, MIXED)
    result = merge(db)
    assert rejects(db) == REASONS
    assert result.reasons == {reason: 1 for reason in REASONS.values()}
    assert (result.inserted, result.updated, result.superseded) == (3, 1, 1)
    assert (result.rejected, result.isolated, result.unchanged) == (len(REASONS), 0, 0)
    rows = table(db)
    assert rows["ada@x.org"] == ("ada", 36, "1815-12-10", 1)
    assert rows["dup@x.org"] == ("second", 2, None, 2)  # the last record of a key wins
    assert rows["old@x.org"] == ("oldie", 99, None, None)  # updated
    assert rows["ok@x.org"] == (None, None, None, None)
    assert set(rows) == {"taker@x.org", "old@x.org", "ada@x.org", "dup@x.org", "ok@x.org"}


def test_a_second_run_changes_nothing(schema: Database) -> None:
    db = schema
    stage(db, MIXED)
    merge(db, chunk_size=4)
    query = sa.text("SELECT email, xmin::text, updated_at FROM players ORDER BY email")
    before, refused = db.execute(query).all(), rejects(db)
    again = merge(db, chunk_size=4)
    assert db.execute(query).all() == before  # not even rewritten: same row versions
    assert rejects(db) == refused  # replaced, not repeated
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 5)


def test_the_last_record_of_a_key_wins_across_chunks(schema: Database) -> None:
    db = schema
    stage(db, [(n, "same@x.org", f"h{n}", str(n), None, None) for n in range(1, 11)])
    result = merge(db, chunk_size=3)
    assert table(db) == {"same@x.org": ("h10", 10, None, None)}
    assert (result.inserted, result.superseded, result.chunks) == (1, 9, 4)
    again = merge(db, chunk_size=3)
    assert (again.updated, again.unchanged) == (0, 1)


def test_skip_keeps_the_tables_row_and_reject_refuses_the_record(schema: Database) -> None:
    db = schema
    db.execute(sa.insert(players).values(email="here@x.org", age=1))
    rows = [
        (1, "here@x.org", None, "2", None, None),
        (2, "new@x.org", None, "3", None, None),
        (3, "new@x.org", None, "4", None, None),
    ]
    stage(db, rows)
    skipped = merge(db, on_conflict="skip")
    assert table(db)["here@x.org"][1] == 1
    assert table(db)["new@x.org"][1] == 3  # the first record of a key wins
    assert (skipped.inserted, skipped.unchanged, skipped.superseded) == (1, 1, 1)

    db.execute(sa.text("DELETE FROM players WHERE email = 'new@x.org'"))
    refused = merge(db, on_conflict="reject")
    assert rejects(db) == {
        1: "violates players_email_key (already in the table)",
        3: "violates players_email_key (repeated in the input)",
    }
    assert (refused.inserted, refused.rejected) == (1, 2)


def test_without_a_rejects_table_the_refused_rows_are_returned(schema: Database) -> None:
    db = schema
    stage(db, MIXED)
    result = merge(db, rejects=None)
    assert dict(result.rejected_rows) == {n: r for n, r in REASONS.items() if n != 12}
    assert rejects(db) == {}


def test_a_failure_no_query_predicts_is_bisected_to_its_row(schema: Database) -> None:
    db = schema
    db.execute(
        sa.text(
            "CREATE FUNCTION refuse_vip() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.email LIKE 'vip%' THEN RAISE EXCEPTION 'no VIPs here'; END IF; "
            "RETURN NEW; END $$"
        )
    )
    db.execute(
        sa.text(
            "CREATE TRIGGER refuse_vip BEFORE INSERT ON players FOR EACH ROW "
            "EXECUTE FUNCTION refuse_vip()"
        )
    )
    rows = [
        (n, f"{'vip' if n in (17, 18, 40) else 'u'}{n}@x.org", None, "-1" if n == 3 else None)
        for n in range(1, 51)
    ]
    stage(db, [(*row, None, None) for row in rows])
    result = merge(db, chunk_size=25)
    assert rejects(db) == {
        3: "violates age_not_negative",
        17: "no VIPs here",
        18: "no VIPs here",
        40: "no VIPs here",
    }
    assert (result.inserted, result.isolated, result.rejected) == (46, 3, 4)
    assert len(table(db)) == 46


class Interrupted(Exception):
    pass


def test_an_interrupted_merge_leaves_whole_chunks_and_a_rerun_completes(schema: Database) -> None:
    db = schema
    rows = [(n, f"u{n}@x.org", None, "-5" if n % 7 == 0 else str(n)) for n in range(1, 101)]
    stage(db, [(*row, None, None) for row in rows])
    done: list[MergeChunk] = []

    def stop_after_three(chunk: MergeChunk) -> None:
        done.append(chunk)
        if len(done) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        merge(db, chunk_size=10, on_chunk=stop_after_three)
    assert [(c.first, c.last, c.rows) for c in done] == [(1, 10, 10), (11, 20, 10), (21, 30, 10)]
    lines = {int(email[1:].split("@")[0]) for email in table(db)}
    assert lines == {n for n in range(1, 31) if n % 7}  # whole chunks, nothing after
    assert set(rejects(db)) == {7, 14, 21, 28}

    resumed = merge(db, chunk_size=10, after=done[-1].last)
    assert (resumed.chunks, resumed.inserted, resumed.rejected) == (7, 60, 10)
    again = merge(db, chunk_size=10)  # or simply run it all again: same outcome
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 86)
    assert len(table(db)) == 86 and len(rejects(db)) == 14


def test_a_killed_connection_re_runs_the_chunk(schema: Database, db_url: str) -> None:
    """The backend is terminated while a chunk's statement runs (a trigger sleeps on one
    row): the chunk's transaction is re-run on a new connection, nothing twice."""
    db = schema
    db.execute(
        sa.text(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.email = 'u35@x.org' THEN PERFORM pg_sleep(0.5); END IF; "
            "RETURN NEW; END $$"
        )
    )
    db.execute(
        sa.text("CREATE TRIGGER slow BEFORE INSERT ON players FOR EACH ROW EXECUTE FUNCTION slow()")
    )
    stage(db, [(n, f"u{n}@x.org", None, None, None, None) for n in range(1, 61)])
    killed: list[int] = []
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as admin:
                deadline = time.monotonic() + 30
                while not killed and time.monotonic() < deadline:
                    pid = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    ).fetchone()
                    if pid:
                        admin.execute("SELECT pg_terminate_backend(%s)", pid)
                        killed.append(pid[0])
                    time.sleep(0.01)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        result = merge(db, chunk_size=20)
    finally:
        thread.join()
    assert not errors and killed
    assert (result.inserted, result.chunks) == (60, 3)
    assert len(table(db)) == 60


def test_concurrent_runs_take_turns_and_agree(schema: Database) -> None:
    db = schema
    rows = [
        (n, f"u{n % 400}@x.org", f"h{n}", "-1" if n % 50 == 0 else str(n), None, None)
        for n in range(1, 1001)
    ]
    stage(db, rows)
    results: list[MergeResult] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(merge(db, chunk_size=100))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 2
    # Of each key's records the last counts: lines 601-1000; 8 of them are refused, and
    # their keys keep nothing (their earlier records were superseded, not merged).
    final = table(db)
    assert len(final) == 392
    assert set(rejects(db)) == set(range(650, 1001, 50))  # each refused once
    assert sum(r.inserted for r in results) == 392
    assert sum(r.updated for r in results) == 0
    for result in results:
        assert (result.rejected, result.superseded) == (8, 600)
    for n in range(601, 1001):
        if n % 50:
            assert final[f"u{n % 400}@x.org"][0] == f"h{n}"


def test_inside_a_transaction_chunks_are_savepoints_of_it(schema: Database) -> None:
    db = schema
    stage(db, MIXED)
    with db.transaction():
        result = merge(db, chunk_size=5)
        assert result.chunks == 3
        assert len(table(db)) == 5
        db.set_rollback(True)
    assert table(db) == {} and rejects(db) == {}


versioned = sa.Table(
    "versioned",
    metadata,
    sa.Column("region", sa.Text, primary_key=True),
    sa.Column("code", sa.Integer, primary_key=True),
    sa.Column("label", sa.Text),
    sa.Column("parent_code", sa.Integer),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    sa.ForeignKeyConstraint(["region", "parent_code"], ["versioned.region", "versioned.code"]),
)
staged_versioned = sa.Table(
    "staged_versioned",
    metadata,
    sa.Column("n", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("region", sa.Text),
    sa.Column("code", sa.Integer),  # already typed: no cast, no probe
    sa.Column("label", sa.Text),
    sa.Column("parent_code", sa.Integer),
)


class Versioned(Repository[dict[str, Any]]):
    table = versioned
    version_column = "version"
    soft_delete_column = "deleted_at"


def test_hooks_composite_keys_and_references_to_the_table_itself(schema: Database) -> None:
    """A composite primary key as conflict key, the version hook (1 on insert, +1 only
    when a row really changes), a soft-deleted row brought back, and a foreign key to the
    table itself met by a parent in the same chunk."""
    db = schema
    repo = Versioned(db)
    db.execute(
        sa.insert(staged_versioned),
        [
            {"n": 1, "region": "eu", "code": 1, "label": "root", "parent_code": None},
            {"n": 2, "region": "eu", "code": 2, "label": "child", "parent_code": 1},
            {"n": 3, "region": "us", "code": 1, "label": "other", "parent_code": None},
            {"n": 4, "region": "us", "code": 2, "label": "orphan", "parent_code": 9},
        ],
    )
    first = repo.merge_from_staging(staged_versioned, order_by="n", rejects=None)
    assert (first.inserted, first.rejected_rows) == (
        3,
        [(4, "violates versioned_region_parent_code_fkey")],
    )
    assert first.isolated == 1  # the self-reference is left to the server: bisected

    db.execute(sa.text("UPDATE staged_versioned SET label = 'renamed' WHERE n = 3"))
    repo.delete(("eu", 2))  # soft delete
    second = repo.merge_from_staging(staged_versioned, order_by="n", rejects=None)
    assert (second.inserted, second.updated, second.unchanged) == (0, 2, 1)
    rows = db.execute(
        sa.text(
            "SELECT region, code, label, version, deleted_at IS NULL FROM versioned ORDER BY 1, 2"
        )
    ).all()
    assert [tuple(r) for r in rows] == [
        ("eu", 1, "root", 1, True),
        ("eu", 2, "child", 3, True),  # brought back (the soft delete was version 2)
        ("us", 1, "renamed", 2, True),
    ]


def test_an_empty_staging_table_merges_nothing(schema: Database) -> None:
    result = merge(schema)
    assert (result.chunks, result.merged, result.rejected) == (0, 0, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order_by": "nope"}, "has no column 'nope'"),
        ({"order_by": "email"}, "must be unique"),
        ({"conflict": ("handle", "age")}, "no unique index on exactly these columns"),
        ({"columns": ("handle",)}, r"requires email \(NOT NULL, no default\)"),
        ({"columns": ("email", "ghost")}, "unknown column 'ghost'"),
        ({"on_conflict": "merge"}, "on_conflict must be"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"rejects": teams}, "needs a text column 'reason'"),
        ({"rejects": "no_such_table"}, "does not exist"),
        ({"update": ("email", "born", "nope")}, "unknown column 'nope'"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_written(
    schema: Database, options: dict[str, Any], message: str
) -> None:
    db = schema
    stage(db, MIXED)
    with pytest.raises(ValueError, match=message):
        merge(db, **options)
    assert table(db) == {} and rejects(db) == {}
