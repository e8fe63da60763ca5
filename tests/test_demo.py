"""The batch demo's pieces in-process on a migrated database: bad records isolated one by
one, CSV input checked with the line named, a failed load leaving staging as it was."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa

from dbkit import Database, demo, migrate


@pytest.fixture
def migrated(db: Database) -> Database:
    migrate.upgrade(db)
    return db


def is_valid(record: demo.StagedUser) -> bool:
    return record.email is not None and "@" in record.email


def column(db: Database, sql: str) -> list[object]:
    return list(db.execute(sa.text(sql)).scalars())


def test_generated_records_are_the_same_for_the_same_seed() -> None:
    first, again = list(demo.generate(3000)), list(demo.generate(3000))
    assert first == again
    assert [r.line for r in first] == list(range(1, 3001))
    bad = [r.line for r in first if not is_valid(r)]
    assert bad == sorted([997, 1994, 2991, 1999])  # no '@' every 997th, no email every 1999th


def test_each_bad_record_is_rejected_alone_with_its_reason(migrated: Database) -> None:
    records = [demo.StagedUser(line, f"u{line}@example.com", "ok") for line in range(1, 41)]
    records[4].email = "no-at-sign"  # CHECK
    records[5].email = None  # NOT NULL, next to the first
    records[39].email = None  # the last one
    records[20].email = "u1@example.com"  # repeats line 1: an update, not an error
    assert demo.load_staging(migrated, records) == 40

    upserted, rejected = demo.upsert_staged(migrated, chunk_size=16, batch_size=8)

    assert rejected == 3
    rejects = migrated.execute(
        sa.text("SELECT line, email, reason FROM import_rejects ORDER BY line")
    )
    assert [tuple(r) for r in rejects] == [
        (5, "no-at-sign", "violates ck_users_email_has_at"),
        (6, None, "email is missing (not null)"),
        (40, None, "email is missing (not null)"),
    ]
    emails = {r.email for r in records if is_valid(r)}
    assert set(column(migrated, "SELECT email FROM users")) == emails
    assert upserted == 37  # every good record written once (line 21 updates line 1's user)
    assert column(migrated, "SELECT name FROM users WHERE email = 'u1@example.com'") == ["ok"]


def test_rerunning_changes_nothing_but_the_health_history(migrated: Database) -> None:
    out = io.StringIO()
    first = demo.run(migrated, demo.generate(2500), total=2500, out=out, chunk_size=1000)
    users = sorted(column(migrated, "SELECT email FROM users"))
    rejects = column(migrated, "SELECT line FROM import_rejects ORDER BY line")
    again = demo.run(migrated, demo.generate(2500), total=2500, out=out, chunk_size=1000)
    assert sorted(column(migrated, "SELECT email FROM users")) == users
    assert column(migrated, "SELECT line FROM import_rejects ORDER BY line") == rejects
    assert (first.users, first.rejected) == (again.users, again.rejected) == (len(users), 3)
    assert column(migrated, "SELECT count(*) FROM health_checks") == [2]
    assert [p.name for p in again.phases] == ["load", "upsert", "report"]
    assert "load: 2500 rows in" in out.getvalue()  # plain lines: StringIO is no terminal


def test_a_csv_is_read_with_its_line_numbers(tmp_path: Path, migrated: Database) -> None:
    path = tmp_path / "people.csv"
    path.write_text('email,name\na@example.com,Ann\n"b@example.com","Bob\nJr"\n,Nobody\n')
    records = list(demo.read_csv(path))
    assert records == [
        demo.StagedUser(2, "a@example.com", "Ann"),
        demo.StagedUser(4, "b@example.com", "Bob\nJr"),  # a quoted newline: line of its end
        demo.StagedUser(5, None, "Nobody"),
    ]
    result = demo.run(migrated, demo.read_csv(path), source=str(path), out=io.StringIO())
    assert (result.loaded, result.rejected, result.users) == (3, 1, 2)
    assert column(migrated, "SELECT line FROM import_rejects") == [5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"mail,name\nx@y.z,X\n", "header naming an 'email' column"),
        (b"email,name\na@b.c,A\nb@\x00c,B\n", "people.csv:3: a NUL character"),
        (b"email,name\na@b.c,A\n\xff\xfe,B\n", "not a UTF-8 CSV file"),
    ],
)
def test_bad_csv_input_is_named_and_nothing_is_loaded(
    tmp_path: Path, migrated: Database, content: bytes, message: str
) -> None:
    demo.load_staging(migrated, [demo.StagedUser(1, "kept@example.com")])
    path = tmp_path / "people.csv"
    path.write_bytes(content)
    with pytest.raises(demo.DemoInputError, match=message):
        demo.load_staging(migrated, demo.read_csv(path))
    # One transaction: the previous staging is still there, not half of the new one.
    assert column(migrated, "SELECT email FROM users_staging") == ["kept@example.com"]


def test_a_missing_csv_is_named(tmp_path: Path) -> None:
    with pytest.raises(demo.DemoInputError, match=r"cannot read .*nowhere\.csv"):
        list(demo.read_csv(tmp_path / "nowhere.csv"))
