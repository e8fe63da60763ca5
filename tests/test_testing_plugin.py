"""dbkit.testing, used the way users use it: a small user test suite with
``pytest_plugins = ["dbkit.testing"]`` in its conftest, run by pytester in a subprocess.

To stay fast, most runs point ``DBKIT_TEST_DATABASE_URL`` at this suite's own server
(``pg_server``); the plugin then only creates (and drops) a database on it.  One run goes
without it, so the plugin starts its own throwaway server.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import psycopg
import pytest

from dbkit.local import LocalPostgres
from dbkit.testing import ALEMBIC_INI_OPTION

pytest_plugins = ["pytester"]

# A user conftest: the plugin, and a dbkit_migrate override creating the schema with
# metadata.create_all instead of alembic migrations.
USER_CONFTEST = """
    import pytest
    import sqlalchemy as sa

    pytest_plugins = ["dbkit.testing"]

    metadata = sa.MetaData()
    items = sa.Table(
        "items",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
    )


    def count(db):
        return db.scalar(sa.select(sa.func.count()).select_from(items))


    @pytest.fixture(scope="session")
    def dbkit_migrate():
        def create_tables(url):
            engine = sa.create_engine(url)
            metadata.create_all(engine)
            engine.dispose()

        return create_tables
"""

ISOLATION_TESTS = """
    import pytest
    import sqlalchemy as sa
    from sqlalchemy.exc import DBAPIError

    from conftest import count, items
    from dbkit import TransactionBroken, TransactionError


    def committed_count(url):
        # What another connection sees: only committed rows.
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                return conn.scalar(sa.select(sa.func.count()).select_from(items))
        finally:
            engine.dispose()


    def test_a_inserts(dbkit_db):
        dbkit_db.execute(items.insert().values(name="a"))
        with dbkit_db.transaction():
            dbkit_db.execute(items.insert().values(name="b"))
        assert count(dbkit_db) == 2


    def test_b_sees_nothing_of_a(dbkit_db):
        assert count(dbkit_db) == 0
        dbkit_db.execute(items.insert().values(name="a"))  # no unique violation either


    def test_durable_block_runs_as_savepoint(dbkit_db, dbkit_database_url):
        with dbkit_db.transaction(durable=True) as conn:
            conn.execute(items.insert().values(name="durable"))
            with pytest.raises(TransactionError, match="durable"):
                with dbkit_db.transaction(durable=True):
                    pass
        # Left the block "committed" for the code under test, but not for anyone else.
        assert count(dbkit_db) == 1
        assert committed_count(dbkit_database_url) == 0


    def test_rolled_back_savepoint(dbkit_db):
        with pytest.raises(RuntimeError):
            with dbkit_db.transaction(durable=True):
                dbkit_db.execute(items.insert().values(name="gone"))
                raise RuntimeError("boom")
        assert count(dbkit_db) == 0


    def test_fails_after_insert(dbkit_db):
        dbkit_db.execute(items.insert().values(name="failed"))
        assert False, "deliberate failure"


    def test_connection_returned_after_failure(dbkit_db, dbkit_database):
        assert dbkit_database.stats().in_use == 1  # only this test's own connection
        assert count(dbkit_db) == 0


    def test_swallowed_failed_statement(dbkit_db):
        dbkit_db.execute(items.insert().values(name="x"))
        with pytest.raises(DBAPIError):
            dbkit_db.execute("SELECT 1/0")
        with pytest.raises(TransactionBroken):
            dbkit_db.execute("SELECT 1")


    def test_uncaught_failed_statement(dbkit_db):
        dbkit_db.execute(items.insert().values(name="x"))
        dbkit_db.execute(items.insert().values(name="x"))  # unique violation, not caught


    def test_next_test_is_clean(dbkit_db, dbkit_database):
        assert dbkit_db.scalar("SELECT 1") == 1
        assert count(dbkit_db) == 0
        assert dbkit_database.stats().in_use == 1


    def test_kills_its_own_connection(dbkit_db):
        with pytest.raises(DBAPIError):
            dbkit_db.execute("SELECT pg_terminate_backend(pg_backend_pid())")


    def test_after_lost_connection(dbkit_db, dbkit_database):
        assert dbkit_db.scalar("SELECT 1") == 1
        assert dbkit_database.stats().in_use == 1
        dbkit_db.execute("SET statement_timeout = '1ms'")  # session-level, yet rolled back


    def test_session_settings_rolled_back(dbkit_db):
        assert dbkit_db.scalar("SHOW statement_timeout") == "0"


    def test_leaves_block_open(dbkit_db):
        dbkit_db.transaction().__enter__()
        dbkit_db.execute(items.insert().values(name="open"))


    def test_after_open_block(dbkit_db):
        with pytest.raises(TransactionError):  # no block open any more
            dbkit_db.get_rollback()
        assert count(dbkit_db) == 0
        with dbkit_db.transaction():
            dbkit_db.execute(items.insert().values(name="fine"))
        assert count(dbkit_db) == 1
"""

ON_COMMIT_TESTS = """
    import pytest

    from dbkit import TransactionError
    from dbkit.testing import capture_on_commit_callbacks


    def test_captured_not_run(dbkit_db, dbkit_on_commit):
        ran = []
        kept = lambda: ran.append("kept")
        with dbkit_on_commit() as callbacks:
            with dbkit_db.transaction():
                dbkit_db.on_commit(kept)
                with pytest.raises(RuntimeError):
                    with dbkit_db.transaction():
                        dbkit_db.on_commit(lambda: ran.append("rolled back"))
                        raise RuntimeError
        assert callbacks == [kept]
        assert ran == []


    def test_rolled_back_outer_block_drops_all(dbkit_db, dbkit_on_commit):
        with dbkit_on_commit(execute=True) as callbacks:
            with pytest.raises(RuntimeError):
                with dbkit_db.transaction(durable=True):
                    dbkit_db.on_commit(lambda: pytest.fail("must not run"))
                    raise RuntimeError
        assert callbacks == []


    def test_executed_in_order_with_chained(dbkit_db, dbkit_on_commit):
        ran = []

        def first():
            ran.append("first")
            with dbkit_db.transaction():  # queued under the test transaction again
                dbkit_db.on_commit(lambda: ran.append("queued by first"))
            dbkit_db.on_commit(lambda: ran.append("immediate"))  # no block: runs at once

        with dbkit_on_commit(execute=True) as callbacks:
            with dbkit_db.transaction(durable=True):
                dbkit_db.on_commit(first)
                with dbkit_db.transaction():
                    dbkit_db.on_commit(lambda: ran.append("second"))
            assert ran == []
        assert ran == ["first", "immediate", "second", "queued by first"]
        assert len(callbacks) == 3


    def test_not_executed_when_block_raises(dbkit_db):
        ran = []
        with pytest.raises(KeyError):
            with capture_on_commit_callbacks(dbkit_db, execute=True) as callbacks:
                with dbkit_db.transaction():
                    dbkit_db.on_commit(lambda: ran.append(1))
                raise KeyError
        assert len(callbacks) == 1
        assert ran == []


    def test_only_callbacks_of_the_block(dbkit_db):
        with dbkit_db.transaction():
            dbkit_db.on_commit(lambda: None)
            with capture_on_commit_callbacks(dbkit_db) as callbacks:
                dbkit_db.on_commit(print)
        assert callbacks == [print]


    def test_failing_callback_propagates(dbkit_db, dbkit_on_commit):
        with pytest.raises(ZeroDivisionError):
            with dbkit_on_commit(execute=True):
                with dbkit_db.transaction():
                    dbkit_db.on_commit(lambda: 1 / 0)


    def test_robust_callback_does_not_stop_others(dbkit_db, dbkit_on_commit):
        ran = []
        with dbkit_on_commit(execute=True):
            with dbkit_db.transaction():
                dbkit_db.on_commit(lambda: 1 / 0, robust=True)
                dbkit_db.on_commit(lambda: ran.append("after"))
        assert ran == ["after"]


    def test_needs_dbkit_db(dbkit_database):
        with pytest.raises(TransactionError, match="dbkit_db"):
            with capture_on_commit_callbacks(dbkit_database):
                pass
"""


@pytest.fixture
def user_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(USER_CONFTEST)
    return pytester


@pytest.fixture
def on_server(monkeypatch: pytest.MonkeyPatch, pg_server: LocalPostgres) -> LocalPostgres:
    """Runs of the user suite create their database on this suite's server."""
    monkeypatch.setenv("DBKIT_TEST_DATABASE_URL", pg_server.url)
    return pg_server


def dbkit_test_databases(server: LocalPostgres) -> set[str]:
    with psycopg.connect(
        host=server.host, port=server.port, user=server.user, dbname="postgres", autocommit=True
    ) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'dbkit_test_%'")
        return {name for (name,) in rows}


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


def test_isolation_durable_blocks_and_failures(
    user_suite: pytest.Pytester, on_server: LocalPostgres
) -> None:
    user_suite.makepyfile(test_isolation=ISOLATION_TESTS)
    before = dbkit_test_databases(on_server)
    result = run(user_suite, "-v")
    # test_leaves_block_open passes, then errors at teardown.
    result.assert_outcomes(passed=12, failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_fails_after_insert FAILED*",
            "*test_uncaught_failed_statement FAILED*",
            "*test_leaves_block_open ERROR*",
            "*test_after_open_block PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(["*left 1 db.transaction() block(s) open*"])
    # The session's database is gone afterwards.
    assert dbkit_test_databases(on_server) == before


def test_on_commit_capture(user_suite: pytest.Pytester, on_server: LocalPostgres) -> None:
    user_suite.makepyfile(test_on_commit=ON_COMMIT_TESTS)
    result = run(user_suite)
    result.assert_outcomes(passed=8)


def test_migrate_override_none_and_errors(
    pytester: pytest.Pytester, on_server: LocalPostgres
) -> None:
    """``dbkit_migrate`` returning None leaves the database empty; a failing one errors
    every test with a note naming the fixture."""
    pytester.makeconftest(
        """
        import pytest
        pytest_plugins = ["dbkit.testing"]

        @pytest.fixture(scope="session")
        def dbkit_migrate():
            return None
        """
    )
    pytester.makepyfile(
        test_empty="""
        def test_empty(dbkit_db):
            assert dbkit_db.scalar(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ) == 0
            assert dbkit_db.scalar("SELECT current_database()").startswith("dbkit_test_")
        """
    )
    run(pytester).assert_outcomes(passed=1)

    pytester.makeconftest(
        """
        import pytest
        pytest_plugins = ["dbkit.testing"]

        @pytest.fixture(scope="session")
        def dbkit_migrate():
            def broken(url):
                raise RuntimeError("migration exploded")
            return broken
        """
    )
    pytester.makepyfile(
        test_two="""
        def test_one(dbkit_db):
            pass

        def test_two(dbkit_db):
            pass
        """
    )
    before = dbkit_test_databases(on_server)
    result = run(pytester, "test_two.py")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*RuntimeError: migration exploded*", "*raised by dbkit_migrate*"])
    assert dbkit_test_databases(on_server) == before


def test_unreachable_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, free_port: int
) -> None:
    """A DBKIT_TEST_DATABASE_URL nobody answers on fails every test with one clear line."""
    pytester.makeconftest('pytest_plugins = ["dbkit.testing"]')
    pytester.makepyfile("def test_x(dbkit_db):\n    pass\n\ndef test_y(dbkit_db):\n    pass\n")
    monkeypatch.setenv(
        "DBKIT_TEST_DATABASE_URL", f"postgresql://postgres:secret@127.0.0.1:{free_port}/postgres"
    )
    result = run(pytester)
    result.assert_outcomes(errors=2)
    where = f"postgresql+psycopg://postgres:***@127.0.0.1:{free_port}/postgres"
    result.stdout.fnmatch_lines(
        [f"*cannot create a test database on {where} (from $DBKIT_TEST_DATABASE_URL)*"]
    )
    result.stdout.no_fnmatch_line("*secret*")
    result.stdout.no_fnmatch_line("*direct cause*")  # one message, no driver traceback


def test_default_migrate_is_dbkit_migrate(
    pytester: pytest.Pytester, on_server: LocalPostgres
) -> None:
    pytest.importorskip("dbkit.migrate", reason="dbkit.migrate is not written yet")
    pytester.makeconftest('pytest_plugins = ["dbkit.testing"]')
    pytester.makepyfile(
        test_default="""
        def test_schema(dbkit_db):
            tables = {
                name
                for (name,) in dbkit_db.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
            assert {"users", "health_checks"} <= tables
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_retried_transactions(user_suite: pytest.Pytester, on_server: LocalPostgres) -> None:
    """``db.run_in_transaction`` and ``@db.transaction(retries=N)`` in code under test: the
    application's outermost block is a savepoint, and a retry re-runs it from there."""
    user_suite.makepyfile(
        test_retry="""
        from conftest import count, items

        RAISE_40001 = "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"


        def test_run_in_transaction(dbkit_db):
            attempts = []

            def body(conn):
                attempts.append(1)
                conn.execute(items.insert().values(name="once"))
                if len(attempts) == 1:
                    conn.exec_driver_sql(RAISE_40001)  # serialization failure: retried

            dbkit_db.run_in_transaction(body, retries=2)
            assert len(attempts) == 2
            assert count(dbkit_db) == 1  # the first attempt's row went with its savepoint


        def test_decorator(dbkit_db):
            @dbkit_db.transaction(retries=2)
            def add():
                dbkit_db.execute(items.insert().values(name="x"))

            add()
            assert count(dbkit_db) == 1
        """
    )
    run(user_suite).assert_outcomes(passed=2)


def test_own_local_server_without_url(
    user_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DBKIT_TEST_DATABASE_URL: the plugin starts (and afterwards stops) its own
    throwaway PostgreSQL, as root too."""
    monkeypatch.delenv("DBKIT_TEST_DATABASE_URL", raising=False)
    url_file = user_suite.path / "url.txt"
    user_suite.makepyfile(
        test_local=textwrap.dedent(
            f"""
            from conftest import count, items


            def test_a(dbkit_db, dbkit_database_url):
                open({str(url_file)!r}, "w").write(dbkit_database_url)
                dbkit_db.execute(items.insert().values(name="a"))
                assert count(dbkit_db) == 1


            def test_b(dbkit_db):
                assert count(dbkit_db) == 0
            """
        )
    )
    result = run(user_suite)
    result.assert_outcomes(passed=2)
    url = Path(url_file).read_text()
    assert "/dbkit_test_" in url
    # The server is gone with the session.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=3)


# A project's own migrations: one revision making a table the checkout's migrations lack.
OWN_REVISION = '''\
"""widgets"""
import sqlalchemy as sa
from alembic import op

revision = "w1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("widgets")
'''

OWN_SCHEMA_TEST = """
def test_own_schema(dbkit_db):
    tables = {
        name
        for (name,) in dbkit_db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert "widgets" in tables and "users" not in tables
"""


def own_migrations(directory: Path) -> Path:
    """alembic.ini + migrations/ in ``directory`` (dbkit.migrate.run_env as env.py)."""
    (directory / "migrations" / "versions").mkdir(parents=True)
    (directory / "migrations" / "env.py").write_text(
        "from dbkit.migrate import run_env\n\nrun_env(None)\n"
    )
    (directory / "migrations" / "versions" / "w1_widgets.py").write_text(OWN_REVISION)
    ini = directory / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    return ini


def test_alembic_ini_from_the_rootdir_when_run_from_a_subdirectory(
    pytester: pytest.Pytester, on_server: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's alembic.ini is found from pytest's rootdir, not the working directory:
    pytest run from tests/ migrates with the project's migrations."""
    monkeypatch.delenv("DBKIT_ALEMBIC_INI", raising=False)
    own_migrations(pytester.path)
    pytester.makeini("[pytest]\n")
    pytester.makeconftest('pytest_plugins = ["dbkit.testing"]')
    tests = pytester.mkdir("tests")
    (tests / "test_own.py").write_text(OWN_SCHEMA_TEST)
    run(pytester).assert_outcomes(passed=1)  # from the root
    monkeypatch.chdir(tests)
    run(pytester).assert_outcomes(passed=1)  # from tests/


def test_alembic_ini_from_the_ini_option(
    pytester: pytest.Pytester, on_server: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DBKIT_ALEMBIC_INI", raising=False)
    db_dir = pytester.mkdir("db")
    own_migrations(db_dir)
    pytester.makeini(f"[pytest]\n{ALEMBIC_INI_OPTION} = db/alembic.ini\n")
    pytester.makeconftest('pytest_plugins = ["dbkit.testing"]')
    pytester.makepyfile(test_own=OWN_SCHEMA_TEST)
    run(pytester).assert_outcomes(passed=1)

    pytester.makeini(f"[pytest]\n{ALEMBIC_INI_OPTION} = nowhere/alembic.ini\n")
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{ALEMBIC_INI_OPTION} = nowhere/alembic.ini*no such file*"])
