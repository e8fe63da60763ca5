"""pytest plugin for applications built on dbkit: a migrated test database and a
rollback-per-test fixture.

Enable it in your top-level ``conftest.py`` (it is never registered automatically, and
importing it starts nothing)::

    pytest_plugins = ["dbkit.testing"]

Fixtures
--------
``dbkit_database_url`` (session, ``str``)
    A fresh, migrated database for the run.  With ``DBKIT_TEST_DATABASE_URL`` set, a new
    database ``dbkit_test_<random>`` is created on that server and dropped at the end (the
    URL's user needs CREATEDB; the URL's own database is only used to run CREATE/DROP
    DATABASE).  Without it, a throwaway ``dbkit.local.LocalPostgres`` is started from the
    machine's PostgreSQL binaries for the session (works as root too) and stopped at the end.
``dbkit_migrate`` (session, ``Callable[[str], object] | None``)
    What brings the fresh database to the schema the tests need; called once with its URL.
    Default: ``dbkit.migrate.upgrade(url)``, the project's alembic migrations to ``head``:
    the ``alembic.ini`` named by the ini option ``dbkit_alembic_ini`` (relative to the
    pytest configuration file), else ``$DBKIT_ALEMBIC_INI``, else ``alembic.ini`` in
    pytest's rootdir (the directory of ``pytest.ini`` / ``pyproject.toml``), whichever
    directory pytest runs from; else ``./alembic.ini``.  Override it in your conftest,
    **session-scoped**, e.g. to use ``metadata.create_all``::

        @pytest.fixture(scope="session")
        def dbkit_migrate():
            def create_tables(url: str) -> None:
                engine = sqlalchemy.create_engine(url)
                metadata.create_all(engine)
                engine.dispose()
            return create_tables

    Return ``None`` to leave the database empty.
``dbkit_database`` (session, ``dbkit.Database``)
    Connected to ``dbkit_database_url``, closed at the end.  Work done through it directly
    (without ``dbkit_db``) is really committed and stays for the rest of the run.
``dbkit_db`` (function, ``dbkit.Database``)
    The same ``Database``, with the test wrapped in an outer transaction that is rolled back
    at the end: everything the code under test writes through ``db.execute``, repositories
    and ``db.transaction()`` blocks (which run as savepoints, ``durable=True`` ones
    included) disappears after the test, so tests are isolated and fast.  ``on_commit``
    callbacks registered inside those blocks never run (nothing commits): capture them with
    ``dbkit_on_commit``.  Callbacks registered outside any block run at once, as they would
    in production.
``dbkit_on_commit`` (function)
    ``capture_on_commit_callbacks`` bound to ``dbkit_db``:
    ``with dbkit_on_commit(execute=True) as callbacks: ...``.

Limits of the rollback-per-test approach (the same as Django's ``TestCase``):

- it covers this thread only: code under test that uses other threads gets other
  connections, whose work commits for real;
- sequences are not transactional: ids keep growing across tests;
- ``db.in_transaction()`` is True during a test, where production code might see False;
- the application's outermost block is a savepoint, so its ``isolation=`` cannot be applied:
  tests run at the server's default isolation (``readonly=True`` does apply).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

try:
    import pytest
except ImportError as error:  # pragma: no cover - only without the test extra
    raise ImportError(
        "dbkit.testing is a pytest plugin: install pytest (pip install 'dbkit[test]')"
    ) from error

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from dbkit.admin import create_database, drop_database
from dbkit.connection import rollback_quietly
from dbkit.database import Database
from dbkit.errors import TransactionError
from dbkit.transaction import run_on_commit_callback

if TYPE_CHECKING:
    from dbkit.local import LocalPostgres

__all__ = [
    "ALEMBIC_INI_OPTION",
    "ENV_DATABASE_URL",
    "CaptureOnCommit",
    "MigrateFn",
    "alembic_ini",
    "capture_on_commit_callbacks",
    "dbkit_database",
    "dbkit_database_url",
    "dbkit_db",
    "dbkit_migrate",
    "dbkit_on_commit",
]

ENV_DATABASE_URL = "DBKIT_TEST_DATABASE_URL"
ALEMBIC_INI_OPTION = "dbkit_alembic_ini"
_DB_PREFIX = "dbkit_test_"

MigrateFn = Callable[[str], object]
OnCommitCallback = Callable[[], Any]
_Entry = tuple[tuple[str, ...], OnCommitCallback, bool]


class CaptureOnCommit(Protocol):
    """The ``dbkit_on_commit`` fixture: ``capture_on_commit_callbacks`` on ``dbkit_db``."""

    def __call__(
        self, *, execute: bool = False
    ) -> AbstractContextManager[list[OnCommitCallback]]: ...


# ----------------------------------------------------------------------------------------
# The session database
# ----------------------------------------------------------------------------------------


def _psycopg_url(raw: str) -> URL:
    """``raw`` as a SQLAlchemy URL on psycopg 3, the only driver dbkit uses (a bare
    ``postgresql://`` would make SQLAlchemy look for psycopg2)."""
    problem = None
    try:
        url = make_url(raw)
    except sa_exc.ArgumentError as error:
        problem = f"is not a database URL ({error})"
    else:
        if url.get_backend_name() not in ("postgresql", "postgres"):
            problem = f"must point at PostgreSQL, not {url.render_as_string(hide_password=True)!r}"
    if problem is not None:
        pytest.fail(f"dbkit.testing: ${ENV_DATABASE_URL} {problem}", pytrace=False)
    return url.set(drivername="postgresql+psycopg")


@contextlib.contextmanager
def _scratch_database(admin_url: URL, origin: str) -> Iterator[str]:
    """A new empty database on ``admin_url``'s server, dropped (sessions and all) at exit.

    A random name lets parallel runs (pytest-xdist workers, CI jobs) share one server.
    """
    name = f"{_DB_PREFIX}{secrets.token_hex(6)}"
    where = admin_url.render_as_string(hide_password=True)
    problem = None
    try:
        create_database(admin_url, name)
    except psycopg.Error as error:
        problem = str(error).strip()
    if problem is not None:  # failed outside the except: no chained driver traceback
        pytest.fail(
            f"dbkit.testing: cannot create a test database on {where} ({origin}): "
            f"{problem}\nThe URL's user must be able to connect and have CREATEDB.",
            pytrace=False,
        )
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            # Ends sessions still connected (e.g. a leaked pool) first.
            drop_database(admin_url, name)
        except psycopg.Error as error:
            warnings.warn(
                f"dbkit.testing: could not drop the test database {name!r} on {where}: "
                f"{error}; drop it by hand",
                stacklevel=1,
            )


@contextlib.contextmanager
def _local_server() -> Iterator[LocalPostgres]:
    from dbkit.local import LocalPostgres

    server = LocalPostgres()
    problem = None
    try:
        server.start()
    except Exception as error:
        server.stop(mode="immediate")
        problem = str(error)
    if problem is not None:
        pytest.fail(
            f"dbkit.testing: ${ENV_DATABASE_URL} is not set, so a throwaway PostgreSQL was to "
            f"be started for the tests, and that failed:\n{problem}\n"
            f"Set ${ENV_DATABASE_URL} to a server to use instead (its user needs CREATEDB).",
            pytrace=False,
        )
    try:
        yield server
    finally:
        server.stop(mode="fast")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        ALEMBIC_INI_OPTION,
        "alembic.ini whose migrations dbkit.testing runs on the test database (relative to "
        "this configuration file; default: alembic.ini in pytest's rootdir)",
        default="",
    )


def alembic_ini(config: pytest.Config) -> Path | None:
    """The alembic.ini the default ``dbkit_migrate`` uses for this pytest run.

    The ini option ``dbkit_alembic_ini`` (relative to the configuration file's directory)
    > ``$DBKIT_ALEMBIC_INI`` > ``alembic.ini`` in pytest's rootdir.  None: neither is
    there, and ``dbkit.migrate.find_alembic_ini`` decides (``./alembic.ini``, a checkout's).
    """
    option = str(config.getini(ALEMBIC_INI_OPTION) or "").strip()
    if option:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        path = (base / Path(option).expanduser()).absolute()
        if not path.is_file():
            where = config.inipath or config.rootpath
            pytest.fail(
                f"dbkit.testing: {ALEMBIC_INI_OPTION} = {option} ({where}): no such file {path}",
                pytrace=False,
            )
        return path
    if os.environ.get("DBKIT_ALEMBIC_INI"):  # dbkit.migrate.ALEMBIC_INI_VAR
        return None
    in_rootdir = config.rootpath / "alembic.ini"
    return in_rootdir if in_rootdir.is_file() else None


def _default_migrate(url: str, config_path: Path | None = None) -> None:
    # Imported here: Alembic loads only for runs that use the default.
    from dbkit.migrate import upgrade

    upgrade(url, config_path=config_path)


@pytest.fixture(scope="session")
def dbkit_migrate(pytestconfig: pytest.Config) -> MigrateFn | None:
    """How the fresh test database gets its schema: called once per run with its URL.

    Default: ``dbkit.migrate.upgrade(url)``, i.e. the project's alembic migrations to
    ``head``, with the alembic.ini that :func:`alembic_ini` finds (the ini option
    ``dbkit_alembic_ini``, ``$DBKIT_ALEMBIC_INI``, or ``alembic.ini`` in pytest's rootdir),
    wherever pytest was started.  Override it (session scope) to run your own migrations or
    ``metadata.create_all``; return ``None`` for an empty database.
    """
    return functools.partial(_default_migrate, config_path=alembic_ini(pytestconfig))


@pytest.fixture(scope="session")
def dbkit_database_url(dbkit_migrate: MigrateFn | None) -> Iterator[str]:
    """URL of a fresh database for this run, migrated once by ``dbkit_migrate``.

    On ``$DBKIT_TEST_DATABASE_URL``'s server when set, else on a throwaway local server;
    either way a new ``dbkit_test_<random>`` database, dropped at the end.
    """
    with contextlib.ExitStack() as stack:
        raw = os.environ.get(ENV_DATABASE_URL)
        if raw:
            admin_url, origin = _psycopg_url(raw), f"from ${ENV_DATABASE_URL}"
        else:
            server = stack.enter_context(_local_server())
            admin_url, origin = make_url(server.url), "throwaway local server"
        url = stack.enter_context(_scratch_database(admin_url, origin))
        if dbkit_migrate is not None:
            try:
                dbkit_migrate(url)
            except Exception as error:
                error.add_note(
                    "dbkit.testing: raised by dbkit_migrate while preparing the test database "
                    f"{make_url(url).render_as_string(hide_password=True)}"
                )
                raise
        yield url


@pytest.fixture(scope="session")
def dbkit_database(dbkit_database_url: str) -> Iterator[Database]:
    """A connected ``Database`` on the test database for the whole run, closed at the end.

    Used directly, its transactions really commit; ask for ``dbkit_db`` to have each test
    rolled back.
    """
    db = Database.from_url(dbkit_database_url).connect()
    try:
        yield db
    finally:
        db.close()


# ----------------------------------------------------------------------------------------
# The per-test outer transaction
# ----------------------------------------------------------------------------------------


@pytest.fixture
def dbkit_db(dbkit_database: Database) -> Iterator[Database]:
    """``dbkit_database`` with the test inside an outer transaction rolled back afterwards.

    SQLAlchemy's "join into an external transaction" recipe, dbkit-style: the test's
    connection is made this thread's ambient one, so ``db.execute``, repositories and every
    ``db.transaction()`` block of the code under test run on it, the blocks as savepoints.
    The rollback at the end undoes all of it, whatever the test did, and clears a
    transaction left aborted by a failed statement, so the next test starts clean.
    """
    db = dbkit_database
    manager = db.transactions
    if manager.in_transaction():
        pytest.fail(
            "dbkit_db: a transaction is already open on this Database in this thread (a "
            "db.transaction() block entered by another fixture?); dbkit_db must be the "
            "outermost transaction",
            pytrace=False,
        )
    conn = db.checkout()
    left_open = 0
    try:
        root = conn.begin()
        try:
            with manager.adopt(conn):
                yield db
                left_open = manager.open_blocks()
        finally:
            rollback_quietly(root, conn)
    finally:
        conn.close()  # back to the pool (or closed, if invalidated above)
    if left_open:
        pytest.fail(
            f"dbkit_db: the test left {left_open} db.transaction() block(s) open (entered "
            "without being exited); they were rolled back with the test",
            pytrace=False,
        )


# ----------------------------------------------------------------------------------------
# on_commit callbacks
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_on_commit_callbacks(
    db: Database, *, execute: bool = False
) -> Iterator[list[OnCommitCallback]]:
    """Collect the ``on_commit`` callbacks registered during the block, Django's
    ``captureOnCommitCallbacks`` for dbkit.

    Under ``dbkit_db`` nothing ever commits, so callbacks registered inside the code under
    test's ``db.transaction()`` blocks never run.  This yields a list that, at the end of
    the block, holds those that *would* run if the test's transaction committed, in
    registration order: callbacks of savepoints rolled back during the block are not in it.
    Callbacks registered outside any block run at once (as in production) and are not in it.

    ``execute=True`` also runs them at the end of the block (only if it raised nothing), in
    order, then those that the callbacks themselves queued, until none is left.  A failing
    callback propagates (``robust=True`` ones are logged, as after a real commit).
    """
    manager = db.transactions
    if not manager.in_test_transaction():
        raise TransactionError(
            "capture_on_commit_callbacks() works inside the test transaction of the dbkit_db "
            "fixture (or dbkit_on_commit); elsewhere callbacks run for real when a "
            "transaction commits"
        )
    # Identity, not position: a savepoint rollback during the block may remove entries
    # registered before it.  `seen` keeps the entries alive so their ids stay unique.
    seen: list[_Entry] = manager.queued_on_commit()
    seen_ids = {id(entry) for entry in seen}
    callbacks: list[OnCommitCallback] = []

    def collect() -> list[_Entry]:
        new = [entry for entry in manager.queued_on_commit() if id(entry) not in seen_ids]
        seen.extend(new)
        seen_ids.update(id(entry) for entry in new)
        callbacks.extend(func for _, func, _ in new)
        return new

    try:
        yield callbacks
    except BaseException:
        collect()
        raise
    new = collect()
    while execute and new:
        for _, func, robust in new:
            run_on_commit_callback(func, robust)
        new = collect()


@pytest.fixture
def dbkit_on_commit(dbkit_db: Database) -> CaptureOnCommit:
    """``capture_on_commit_callbacks`` bound to ``dbkit_db``::

    with dbkit_on_commit(execute=True) as callbacks:
        service.place_order(...)
    assert len(callbacks) == 1
    """

    def capture(*, execute: bool = False) -> AbstractContextManager[list[OnCommitCallback]]:
        return capture_on_commit_callbacks(dbkit_db, execute=execute)

    return capture
