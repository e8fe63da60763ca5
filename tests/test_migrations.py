"""Migrations against real PostgreSQL: dbkit.migrate, env.py, and ``dbkit migrate``.

Dependency-free stand-ins for pytest-alembic's built-in tests (its collector breaks on
pytest 9.2): single head, upgrade/downgrade round trip, every revision up/down/up, and
models-vs-migrations agreement, plus dbkit's own entry points.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

import dbkit
from dbkit import migrate
from dbkit.database import Database
from dbkit.schema import NAMING_CONVENTION
from dbkit.schema import metadata as schema_metadata

PROJECT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = PROJECT / "alembic.ini"
TABLES = {"users", "health_checks", "users_staging", "import_rejects"}
HEAD = migrate.heads()[0]


def tables(db: Database) -> set[str]:
    return set(sa.inspect(db.engine).get_table_names())


def copy_of_metadata() -> sa.MetaData:
    """dbkit.schema's tables in a fresh MetaData, to modify without touching schema.py."""
    copy = sa.MetaData(naming_convention=NAMING_CONVENTION)
    for table in schema_metadata.tables.values():
        table.to_metadata(copy)
    return copy


@pytest.fixture
def private_migrations(tmp_path: Path) -> Path:
    """A copy of alembic.ini + migrations/ to add revisions to; returns the ini path."""
    shutil.copy(ALEMBIC_INI, tmp_path / "alembic.ini")
    shutil.copytree(
        PROJECT / "migrations",
        tmp_path / "migrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path / "alembic.ini"


# ------------------------------------------------------------------------- scripts


def test_one_head_and_a_linear_history() -> None:
    script = ScriptDirectory.from_config(Config(str(ALEMBIC_INI)))
    assert len(script.get_heads()) == 1
    assert migrate.heads() == list(script.get_heads())
    history = migrate.history()
    assert history[0] == "0001" and history[-1] == migrate.heads()[0]
    infos = migrate.revisions()
    assert infos[0].down_revisions == ()
    for older, newer in itertools.pairwise(infos):
        assert newer.down_revisions == (older.revision,)
    assert [info.is_head for info in infos] == [False] * (len(infos) - 1) + [True]


# ------------------------------------------------------------------- round trips


def test_upgrade_downgrade_to_base_upgrade_round_trip(db: Database) -> None:
    assert migrate.current(db) is None
    assert tables(db) == set()

    assert migrate.upgrade(db) == migrate.heads()[0]
    assert tables(db) == TABLES | {"alembic_version"}
    migrate.check(db)

    assert migrate.downgrade(db, "base") is None
    assert tables(db) == {"alembic_version"}  # downgrade leaves no trace
    assert migrate.current(db) is None

    assert migrate.upgrade(db, "head") == migrate.heads()[0]
    assert tables(db) == TABLES | {"alembic_version"}
    migrate.check(db)


def test_every_revision_upgrades_downgrades_and_upgrades_again(db: Database) -> None:
    previous: str | None = None
    for revision in migrate.history():
        assert migrate.upgrade(db, revision) == revision
        assert migrate.downgrade(db, "-1") == previous
        assert migrate.upgrade(db, revision) == revision
        previous = revision
    assert previous == migrate.heads()[0]


def test_current_before_and_after(db: Database) -> None:
    assert migrate.current(db) is None
    migrate.upgrade(db)
    assert migrate.current(db) == HEAD
    migrate.downgrade(db, "base")
    assert migrate.current(db) is None


# ------------------------------------------------------------------ models vs DDL


def test_check_passes_when_models_and_migrations_agree(db: Database) -> None:
    migrate.upgrade(db)
    migrate.check(db)
    migrate.check(db, metadata=copy_of_metadata())


def test_check_fails_for_a_column_missing_from_the_migrations(db: Database) -> None:
    migrate.upgrade(db)
    models = copy_of_metadata()
    models.tables["users"].append_column(sa.Column("nickname", sa.Text, nullable=True))
    with pytest.raises(migrate.SchemaDriftError) as caught:
        migrate.check(db, metadata=models)
    assert "add_column users.nickname" in str(caught.value)
    (diff,) = caught.value.diffs
    assert diff[0] == "add_column" and diff[3].name == "nickname"
    assert isinstance(caught.value, dbkit.DbkitError)


def test_check_sees_a_named_check_constraint_missing_from_the_migrations(db: Database) -> None:
    """The checkconstraint_byname plugin is on: without it Alembic ignores CHECKs."""
    migrate.upgrade(db)
    models = copy_of_metadata()
    models.tables["import_rejects"].append_constraint(
        sa.CheckConstraint("line > 0", name="line_positive")
    )
    with pytest.raises(migrate.SchemaDriftError, match="ck_import_rejects_line_positive"):
        migrate.check(db, metadata=models)


def test_check_fails_for_a_type_change(db: Database) -> None:
    migrate.upgrade(db)
    models = copy_of_metadata()
    latency = models.tables["health_checks"].c.latency_ms
    latency.type = sa.Integer()
    with pytest.raises(migrate.SchemaDriftError, match=r"modify_type health_checks\.latency_ms"):
        migrate.check(db, metadata=models)


def test_check_needs_a_database_at_head(db: Database) -> None:
    with pytest.raises(migrate.MigrationError, match="not at head"):
        migrate.check(db)
    assert tables(db) == set()  # check() keeps nothing, not even alembic_version


# ------------------------------------------------------------------------ targets


def test_targets_engine_connection_and_url(db: Database, db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        assert migrate.upgrade(engine) == HEAD
        assert migrate.current(db_url) == HEAD
        migrate.check(db_url)
        with engine.connect() as conn:
            assert migrate.current(conn) == HEAD
            migrate.check(conn)
            assert migrate.downgrade(conn, "base") is None  # committed: conn was idle
        assert migrate.current(engine) is None
        assert migrate.upgrade(sa.make_url(db_url)) == HEAD
    finally:
        engine.dispose()


def test_a_connection_in_a_transaction_leaves_the_commit_to_its_owner(db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            with conn.begin() as tx:
                migrate.upgrade(conn)
                assert migrate.current(conn) == HEAD
                tx.rollback()
            assert migrate.current(conn) is None
    finally:
        engine.dispose()


def test_inside_db_transaction_it_runs_in_a_savepoint(db: Database) -> None:
    with db.transaction():
        with db.transaction():
            migrate.upgrade(db)
            assert migrate.current(db) == HEAD
            db.set_rollback(True)
        assert migrate.current(db) is None
        migrate.upgrade(db)
    assert migrate.current(db) == HEAD


def test_an_unknown_target_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="target must be"):
        migrate.current(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------- failures


def test_a_failing_revision_rolls_back_the_whole_upgrade(
    db: Database, private_migrations: Path
) -> None:
    versions = private_migrations.parent / "migrations" / "versions"
    (versions / "9999_broken.py").write_text(
        '"""Broken on purpose."""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        'revision = "9999"\ndown_revision = "'
        + HEAD
        + '"\nbranch_labels = None\ndepends_on = None\n\n'
        "def upgrade():\n"
        '    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))\n'
        '    op.execute("SELECT no_such_function()")\n\n'
        "def downgrade():\n"
        '    op.drop_table("half_done")\n'
    )
    assert migrate.heads(config_path=private_migrations) == ["9999"]
    with pytest.raises(migrate.MigrationError, match="no_such_function") as caught:
        migrate.upgrade(db, config_path=private_migrations)
    assert len(str(caught.value).splitlines()) == 1
    # One transaction: the earlier revisions' tables and the version row are gone too.
    assert migrate.current(db) is None
    assert tables(db) == set()


def test_unknown_revision_is_a_migration_error(db: Database) -> None:
    with pytest.raises(migrate.MigrationError, match="zzz"):
        migrate.upgrade(db, "zzz")
    with pytest.raises(migrate.MigrationError):
        migrate.downgrade(db)  # nothing to downgrade
    with pytest.raises(ValueError, match="verb"):
        migrate.run_command(db, "merge", "heads")  # type: ignore[arg-type]
    assert migrate.run_command(db, "stamp", "head") == (None, HEAD)
    assert tables(db) == {"alembic_version"}  # stamp records, runs nothing


def test_connect_errors_never_show_the_password(free_port: int) -> None:
    url = f"postgresql+psycopg://app:pw-never-shown@127.0.0.1:{free_port}/app"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with pytest.raises(dbkit.ConnectError) as caught:
        migrate.upgrade(engine)
    assert "pw-never-shown" not in str(caught.value)
    assert f"127.0.0.1:{free_port}" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


# ----------------------------------------------------------------- alembic.ini lookup


@pytest.fixture
def clean_ini_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(migrate.ALEMBIC_INI_VAR, raising=False)
    yield monkeypatch


def test_ini_lookup_order(
    tmp_path_factory: pytest.TempPathFactory,
    private_migrations: Path,
    clean_ini_env: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no alembic.ini in it or above it
    clean_ini_env.chdir(elsewhere)
    assert migrate.find_alembic_ini() == ALEMBIC_INI  # next to the dbkit package
    clean_ini_env.chdir(private_migrations.parent)
    assert migrate.find_alembic_ini() == private_migrations  # ./alembic.ini
    below = private_migrations.parent / "jobs" / "nightly"
    below.mkdir(parents=True)
    clean_ini_env.chdir(below)
    assert migrate.find_alembic_ini() == private_migrations  # found upward, as git does
    clean_ini_env.chdir(private_migrations.parent)
    clean_ini_env.setenv(migrate.ALEMBIC_INI_VAR, str(ALEMBIC_INI))
    assert migrate.find_alembic_ini() == ALEMBIC_INI  # $DBKIT_ALEMBIC_INI beats cwd
    assert migrate.find_alembic_ini(private_migrations) == private_migrations  # explicit wins


def test_a_named_ini_that_does_not_exist_is_an_error(
    tmp_path: Path, clean_ini_env: pytest.MonkeyPatch
) -> None:
    with pytest.raises(migrate.MigrationError, match="from config_path"):
        migrate.find_alembic_ini(tmp_path / "nope.ini")
    clean_ini_env.setenv(migrate.ALEMBIC_INI_VAR, str(tmp_path / "missing.ini"))
    with pytest.raises(migrate.MigrationError, match=migrate.ALEMBIC_INI_VAR):
        migrate.heads()


# -------------------------------------------------------------- command line (real)


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("DBKIT_") and k != "DATABASE_URL"
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_upgrade_current_history_check_downgrade(db_url: str, tmp_path: Path) -> None:
    def dbkit_migrate(*args: str) -> subprocess.CompletedProcess[str]:
        # From an unrelated directory: alembic.ini is found next to the package.
        result = run("-m", "dbkit", "migrate", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result

    revisions = migrate.history()
    head, previous = revisions[-1], (revisions[-2] if len(revisions) > 1 else "base")
    assert dbkit_migrate("current", "--url", db_url).stdout == "base\n"
    up = dbkit_migrate("upgrade", "--url", db_url).stdout
    assert up.startswith("upgrade postgresql://") and up.endswith(f": base -> {head}\n")
    assert dbkit_migrate("current", "--url", db_url).stdout == f"{head} (head)\n"
    history = dbkit_migrate("history").stdout.splitlines()
    assert history[0].startswith("base -> 0001") and history[-1].startswith(
        f"{previous} -> {head} (head)"
    )
    assert dbkit_migrate("check", "--url", db_url).stdout.startswith("ok: ")
    down = dbkit_migrate("downgrade", "--url", db_url).stdout  # default: one step
    assert down.endswith(f": {head} -> {previous}\n")
    assert dbkit_migrate("current", "--url", db_url).stdout.startswith(previous)


def test_cli_dead_port_exits_1_with_one_line_and_no_password(free_port: int) -> None:
    url = f"postgresql+psycopg://app:pw-never-shown@127.0.0.1:{free_port}/app"
    # --url replaces only the connection fields: the retry count still comes from settings.
    result = run(
        "-m",
        "dbkit",
        "migrate",
        "upgrade",
        "--url",
        url,
        env={"DBKIT_DATABASE__POSTGRES__MAX_RETRIES": "0"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbkit migrate: cannot connect")
    assert "pw-never-shown" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_cli_failures_exit_1_bad_url_exits_2(db_url: str) -> None:
    bad_revision = run("-m", "dbkit", "migrate", "upgrade", "zzz", "--url", db_url)
    assert bad_revision.returncode == 1
    assert bad_revision.stderr.strip().splitlines() == [
        "dbkit migrate: Can't locate revision identified by 'zzz'"
    ]
    not_at_head = run("-m", "dbkit", "migrate", "check", "--url", db_url)
    assert not_at_head.returncode == 1 and "not at head" in not_at_head.stderr
    bad_url = run("-m", "dbkit", "migrate", "current", "--url", "mysql://u:pw-secret@h/db")
    assert bad_url.returncode == 2
    assert "invalid settings" in bad_url.stderr and "pw-secret" not in bad_url.stderr
    no_action = run("-m", "dbkit", "migrate")
    assert no_action.returncode == 2


def test_plain_alembic_command_uses_x_url_and_dbkit_settings(db_url: str) -> None:
    """env.py without dbkit.migrate: ``-x url=`` first, else dbkit's settings."""
    up = run("-m", "alembic", "-x", f"url={db_url}", "upgrade", "head", cwd=PROJECT)
    assert up.returncode == 0, up.stderr
    assert f"Running upgrade 0001 -> {HEAD}" in up.stderr  # alembic.ini's logging, for the CLI only
    current = run("-m", "alembic", "current", cwd=PROJECT, env={"DATABASE_URL": db_url})
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == f"{HEAD} (head)"
    check = run("-m", "alembic", "-x", f"url={db_url}", "check", cwd=PROJECT)
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout


def test_concurrent_upgrades_queue_on_the_advisory_lock(db_url: str) -> None:
    """Several instances deploying at once (processes): one migrates, the others wait on
    the advisory lock and find the database at head."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBKIT_")}
    deploys = [
        subprocess.Popen(
            [sys.executable, "-m", "dbkit", "migrate", "upgrade", "--url", db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outputs = [deploy.communicate(timeout=120) for deploy in deploys]
    assert [deploy.returncode for deploy in deploys] == [0, 0, 0], outputs
    moves = sorted(out.rsplit(": ", 1)[-1].strip() for out, _ in outputs)
    assert moves == [f"{HEAD} -> {HEAD}", f"{HEAD} -> {HEAD}", f"base -> {HEAD}"]


def _migration_state(url: str) -> tuple[list[str], set[str]]:
    """(alembic_version rows, dbkit's tables present) of one database, read on a connection
    of its own."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            present = set(sa.inspect(conn).get_table_names())
            versions = (
                list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
                if "alembic_version" in present
                else []
            )
    finally:
        engine.dispose()
    return versions, present & TABLES


def test_threads_migrating_different_databases_take_turns(db_url: str, db: Database) -> None:
    """Alembic's context is process-global: dbkit.migrate runs one command at a time."""
    url = sa.make_url(db_url)
    side = f"{url.database}_side"
    db.execute(f'CREATE DATABASE "{side}"')
    other = url.set(database=side).render_as_string(hide_password=False)
    errors: list[BaseException] = []
    upgraded: dict[str, tuple[list[str], set[str]]] = {}
    barrier = threading.Barrier(2)

    def run_one(target: str) -> None:
        try:
            barrier.wait(timeout=30)
            migrate.upgrade(target)
            upgraded[target] = _migration_state(target)
            migrate.downgrade(target, "base")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_one, args=(url,)) for url in (db_url, other)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "a migration never finished"
        assert errors == []
        # Each database was at head with every table in between, and is back at base now.
        assert upgraded == {db_url: ([HEAD], TABLES), other: ([HEAD], TABLES)}
        assert _migration_state(db_url) == ([], set())
        assert _migration_state(other) == ([], set())
    finally:
        db.execute(f'DROP DATABASE "{side}" WITH (FORCE)')


# ------------------------------------------------------- revision, stamp, run_env

RUN_ENV = '''\
"""env.py as `dbkit init` writes it: dbkit's runner, the project's models."""
from alembic import context

import dbkit
from dbkit.migrate import run_env
from dbkit.schema import metadata as target_metadata

run_env(target_metadata, settings=dbkit.load_settings)
'''


@pytest.fixture
def run_env_migrations(private_migrations: Path) -> Path:
    """``private_migrations`` whose env.py is the one-call ``dbkit.migrate.run_env``."""
    (private_migrations.parent / "migrations" / "env.py").write_text(RUN_ENV)
    return private_migrations


def test_revision_without_autogenerate_is_an_empty_new_head(run_env_migrations: Path) -> None:
    new = migrate.revision("add orders", config_path=run_env_migrations)
    assert new.path.parent == run_env_migrations.parent / "migrations" / "versions"
    assert new.path.name == f"{new.revision}_add_orders.py" and new.changes == ()
    text = new.path.read_text()
    assert (
        text.startswith('"""add orders')
        and f"down_revision: str | Sequence[str] | None = {HEAD!r}" in text
    )
    assert migrate.heads(config_path=run_env_migrations) == [new.revision]
    with pytest.raises(migrate.MigrationError, match="message"):
        migrate.revision("  ", config_path=run_env_migrations)


def test_revision_autogenerate_writes_what_the_models_add(
    db: Database, run_env_migrations: Path
) -> None:
    models = copy_of_metadata()
    sa.Table("orders", models, sa.Column("id", sa.Integer, primary_key=True))
    models.tables["users"].append_column(sa.Column("note", sa.Text))
    with pytest.raises(migrate.MigrationError, match="not at head"):
        migrate.revision(
            "too early",
            autogenerate=True,
            target=db,
            metadata=models,
            config_path=run_env_migrations,
        )
    migrate.upgrade(db, config_path=run_env_migrations)
    new = migrate.revision(
        "orders", autogenerate=True, target=db, metadata=models, config_path=run_env_migrations
    )
    assert sorted(new.changes) == ["add_column users.note", "add_table orders"]
    assert "op.create_table(" in new.path.read_text() and "'orders'" in new.path.read_text()
    assert "orders" not in tables(db)  # comparing wrote nothing
    migrate.upgrade(db, config_path=run_env_migrations)
    assert "orders" in tables(db)
    migrate.check(db, metadata=models, config_path=run_env_migrations)
    again = migrate.revision(
        "nothing", autogenerate=True, target=db, metadata=models, config_path=run_env_migrations
    )
    assert again.changes == ()


def test_plain_alembic_with_run_env_holds_the_lock_in_one_transaction(
    db: Database, db_url: str, run_env_migrations: Path
) -> None:
    """The plain ``alembic`` command through run_env: it waits for the migration lock, and
    takes its database from dbkit's settings (DATABASE_URL here)."""
    project = run_env_migrations.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBKIT_")}
    env["DATABASE_URL"] = db_url
    holder = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with holder.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY})
            conn.commit()
            waiting = subprocess.Popen(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(timeout=3)
            assert migrate.current(db) is None  # still waiting for the lock
            conn.execute(
                sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate.MIGRATION_LOCK_KEY}
            )
            conn.commit()
        _, stderr = waiting.communicate(timeout=120)
    finally:
        holder.dispose()
    assert waiting.returncode == 0, stderr
    assert migrate.current(db) == HEAD
    # A broken revision: the whole run rolls back, the version row included.
    migrate.downgrade(db, "base", config_path=run_env_migrations)
    broken = migrate.revision("broken", config_path=run_env_migrations)
    broken.path.write_text(
        broken.path.read_text().replace(
            "def upgrade() -> None:\n    pass",
            'def upgrade() -> None:\n    op.execute("SELECT nope()")',
        )
    )
    failed = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0 and "nope()" in failed.stderr
    # (alembic_version stays from the first upgrade: downgrades empty it, never drop it)
    assert migrate.current(db) is None and tables(db) == {"alembic_version"}
