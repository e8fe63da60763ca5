"""The batch demo's pieces in-process on a migrated database: bad records isolated one by
one, CSV input checked with the line named, a failed load leaving staging as it was; the
demo's own schema and migrations used whatever the working directory holds."""

from __future__ import annotations

import io
import re
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from users_project import make_users_project, users_migrations_ran

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

    result = demo.merge_staged(migrated, chunk_size=16)

    assert result.rejected == 3
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
    # Every good record written once; line 21 repeats line 1's email, so line 1's record
    # is superseded by it (the last record of a key counts).
    assert (result.inserted, result.superseded, result.updated) == (36, 1, 0)
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
    assert [p.name for p in again.phases] == ["load", "merge", "report"]
    assert (again.merge.inserted, again.merge.updated) == (0, 0)  # nothing rewritten
    assert again.merge.unchanged == len(users)
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


# ------------------------------------------------- the demo's own schema, in anyone's project


def tables(db: Database) -> set[str]:
    return set(column(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))


@pytest.fixture
def in_users_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory is a user's project whose alembic.ini (also named by
    $DBKIT_ALEMBIC_INI) is what a plain `dbkit migrate` would take."""
    project = make_users_project(tmp_path / "orders")
    monkeypatch.chdir(project)
    monkeypatch.setenv(migrate.ALEMBIC_INI_VAR, str(project / "alembic.ini"))
    assert migrate.find_alembic_ini() == project / "alembic.ini"
    return project


def test_the_demo_migrates_with_its_own_migrations(in_users_project: Path, db: Database) -> None:
    ini = demo.alembic_ini()
    assert ini == migrate.packaged_alembic_ini() != in_users_project / "alembic.ini"
    assert (ini.parent / "env.py").is_file() and (ini.parent / "versions").is_dir()

    # The control: a plain migration in this directory takes the user's migrations (here
    # in a transaction rolled back, which leaves the database empty again).
    with db.engine.connect() as conn, conn.begin() as transaction:
        migrate.upgrade(conn)
        assert migrate.current(conn) == "a1_orders"
        transaction.rollback()
    assert users_migrations_ran(in_users_project) and not tables(db)
    (in_users_project / "migrations" / "ENV_RAN").unlink()

    assert demo.migrate_schema(db) == migrate.heads(config_path=ini)[0] == "0002"
    assert {"users", "users_staging", "import_rejects", "health_checks"} <= tables(db)
    assert "orders" not in tables(db)
    assert not users_migrations_ran(in_users_project)


def test_check_schema_compares_with_the_demos_own_head(
    in_users_project: Path, db: Database
) -> None:
    with pytest.raises(demo.DemoSchemaError) as caught:
        demo.check_schema(db)
    message = str(caught.value)
    assert "at revision base, not at the demo's 0002" in message
    assert "run `dbkit migrate upgrade` first" in message
    assert f"(--ini {demo.alembic_ini()})" in message
    demo.migrate_schema(db)
    demo.check_schema(db)  # at the demo's head, though not at the project's a1_orders


@pytest.mark.slow
def test_the_throwaway_database_takes_nothing_from_the_working_directory(
    in_users_project: Path, monkeypatch: pytest.MonkeyPatch, free_port: int
) -> None:
    # Settings that name another server: the throwaway one is used all the same.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port}/orders")
    out = io.StringIO()
    with demo.throwaway_database(out) as db:
        printed = re.search(
            r"throwaway local PostgreSQL (\S+)\n +in (\S+), stopped", out.getvalue()
        )
        assert printed, out.getvalue()
        assert db.config.port != free_port and db.config.application_name != "orders-importer"
        assert {"users", "users_staging", "import_rejects"} <= tables(db)
        assert "orders" not in tables(db)
        result = demo.run(db, demo.generate(300), total=300, out=out)
        assert (result.loaded, result.rejected) == (300, 0)
    assert not users_migrations_ran(in_users_project)
    url, data_dir = printed.group(1).replace("+psycopg", ""), Path(printed.group(2))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3)
    assert not data_dir.exists()
