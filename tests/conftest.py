"""Shared test harness: one private PostgreSQL per run, a fresh database per test.

The suite never touches a system PostgreSQL (e.g. 127.0.0.1:5432).  It starts its own
throwaway server with ``dbkit.local.LocalPostgres`` from the machine's binaries
(``DBKIT_PG_BIN``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` …) on a free port;
as root that server runs as ``postgres`` (or ``$DBKIT_PG_RUN_AS``, else ``nobody``), because
PostgreSQL refuses to run as root and pytest-postgresql cannot start it then.

Fixtures
--------
pg_server    (session)  the started LocalPostgres shared by the whole run
pg_noproc    (session)  pytest-postgresql on top of pg_server: builds the template database
postgresql   (function) psycopg connection to a fresh database cloned from the template
db_url       (function) SQLAlchemy URL (str) of that per-test database
db           (function) a connected dbkit.Database on it; in BOTH_PATHS modules once with
                        the fast paths and once with the public API only (ids fast/public)
make_server  (function) factory for private servers for fault tests; all stopped at teardown
free_port    (function) a 127.0.0.1 port with nothing listening
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import psycopg
import pytest
from pytest_postgresql import factories
from sqlalchemy.engine import URL

from dbkit import fastpath
from dbkit.database import Database
from dbkit.local import LocalPostgres


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres]:
    """The run's PostgreSQL: temp data dir, free port on 127.0.0.1, trust auth, no password.

    It also has the attributes pytest-postgresql reads from a ``depends_on`` fixture.
    """
    # Generous max_connections: pool tests open many connections at once.
    with LocalPostgres(settings={"max_connections": 200}) as server:
        yield server


# pytest-postgresql does the per-test database work on top of pg_server: a template database
# "tests_pg_server_tmpl" built once per run (add load=[...] here to migrate it), and per test
# a "tests_pg_server" database cloned from it and dropped afterwards.  This `postgresql`
# overrides the plugin's own fixture of that name (which would start a server as root: fails).
pg_noproc = factories.postgresql_noproc(depends_on="pg_server")
postgresql = factories.postgresql("pg_noproc")


@pytest.fixture
def db_url(postgresql: psycopg.Connection) -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:<port>/<per-test db>`` for this test's database."""
    info = postgresql.info
    return URL.create(
        "postgresql+psycopg",
        username=info.user,
        password=info.password or None,
        host=info.host,
        port=info.port,
        database=info.dbname,
    ).render_as_string(hide_password=False)


class MakeServer(Protocol):
    """``make_server(**settings)``: a started private server with those server settings.

    ``password=`` gives the superuser a password required over TCP (default: trust).
    ``start=False`` returns it unstarted, to prepare first, e.g. for SSL:
    ``server.copy_in(key_file)`` then ``server.settings.update(ssl="on", ...)``.
    """

    def __call__(
        self,
        *,
        start: bool = True,
        password: str | None = None,
        **settings: str | int | float | bool,
    ) -> LocalPostgres: ...


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Factory of private servers for tests that restart, kill or constrain a server
    (e.g. ``make_server(max_connections=5)``); every server made is stopped at teardown."""
    made: list[LocalPostgres] = []

    def factory(
        *, start: bool = True, password: str | None = None, **settings: str | int | float | bool
    ) -> LocalPostgres:
        server = LocalPostgres(settings=settings, password=password)
        made.append(server)
        return server.start() if start else server

    yield factory
    errors: list[BaseException] = []
    for server in reversed(made):
        try:
            server.stop(mode="immediate")
        except Exception as exc:  # stop the others anyway
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def kept_parent() -> Iterator[Path]:
    """A parent for kept data dirs that the server user can reach even when we are root
    (pytest's tmp_path is 0700 under root, and dbkit refuses to loosen parents)."""
    parent = Path(tempfile.mkdtemp(prefix="dbkit-test-"))
    parent.chmod(0o755)  # our own fresh directory, not a system one
    yield parent
    for pidfile in parent.glob("*/postmaster.pid"):  # a failed test may leave one running
        server = LocalPostgres(pidfile.parent)
        if server.is_running():
            server.stop(mode="immediate")
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (for "connection refused" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ----------------------------------------------------------------------------------------
# Lead: the `db` fixture (dbkit.Database on db_url) goes here.
# ----------------------------------------------------------------------------------------


# Test modules whose `db` runs both ways: with dbkit's fast paths (SQLAlchemy's and psycopg's
# private API, dbkit.fastpath) and with the public API only, which must behave the same.
BOTH_PATHS = ("test_transaction", "test_repository", "test_pool", "test_database")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    only_fast = metafunc.definition.get_closest_marker("fast_path") is not None
    if "fast_paths" in metafunc.fixturenames and module.startswith(BOTH_PATHS) and not only_fast:
        metafunc.parametrize("fast_paths", [True, False], ids=["fast", "public"], indirect=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``fast_path`` test checks a fast path itself: nothing to check when they are off."""
    if item.get_closest_marker("fast_path") is not None and not fastpath.enabled():
        pytest.skip(f"fast paths are switched off ({fastpath.ENV_SWITCH}=0)")


@pytest.fixture
def fast_paths(request: pytest.FixtureRequest) -> bool:
    """Whether ``db`` may use the fast paths (``DBKIT_FAST_PATHS=0`` still wins)."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def db(db_url: str, fast_paths: bool) -> Iterator[Database]:
    """A connected ``dbkit.Database`` on this test's fresh database, closed afterwards."""
    database = Database.from_url(
        db_url, max_open_conns=10, max_idle_conns=5, fast_paths=fast_paths
    ).connect()
    try:
        yield database
    finally:
        database.close()


@pytest.fixture(autouse=True)
def no_leaked_transaction(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test using ``db``: no block left open in this thread, no connection left
    checked out."""
    if "db" not in request.fixturenames:
        yield
        return
    database: Database = request.getfixturevalue("db")  # set up first, torn down after this
    yield
    assert not database.in_transaction(), "a transaction block was left open"
    assert database.stats().in_use == 0, "a connection was left checked out"


@pytest.fixture
def reporters(db: Database) -> Database:
    """Django's ``transactions_reporter`` table, for the ported transaction tests."""
    db.execute(
        "CREATE TABLE reporters ("
        " id serial PRIMARY KEY,"
        " first_name text NOT NULL DEFAULT '',"
        " last_name text NOT NULL DEFAULT '')"
    )
    return db


# ----------------------------------------------------------------------------------------
# More than one server: a primary with a streaming replica, and PgBouncer.
#
# replica_pair       (function, on a module-scoped pair)  a primary LocalPostgres and a
#                    streaming hot standby of it, shared by the tests of a module
# make_replica_pair  (function) factory of private pairs, to stop, kill or promote
# pgbouncer          (session)  tests/pgbouncer.PgBouncer in front of pg_server: transaction
#                    pooling, default_pool_size 2
# ----------------------------------------------------------------------------------------

from pgbouncer import PgBouncer  # noqa: E402  (the fixtures below use it)


class ReplicaPair:
    """A started primary ``LocalPostgres`` and a streaming replica of it (its
    ``start_replica()``); unpacks as ``primary, replica = pair``."""

    def __init__(self, primary: LocalPostgres, replica: LocalPostgres) -> None:
        self.primary = primary
        self.replica = replica

    def __iter__(self) -> Iterator[LocalPostgres]:
        return iter((self.primary, self.replica))

    def servers(self) -> list[LocalPostgres]:
        """Every replica made from the primary (the last first), then the primary."""
        return [*reversed(self.primary.replicas), self.primary]

    def stop(self) -> None:
        _stop_each(self.servers())


def _stop_each(servers: list[LocalPostgres]) -> None:
    """Stop them all in this order, even when one fails (the first error is raised)."""
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop(mode="immediate")
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def _new_replica_pair(**settings: str | int | float | bool) -> ReplicaPair:
    primary = LocalPostgres(settings=settings).start()
    try:
        return ReplicaPair(primary, primary.start_replica())
    except BaseException:
        primary.stop(mode="immediate")
        raise


class _ModulePair:
    """The module's pair: made on first use, made again after a test broke it."""

    def __init__(self) -> None:
        self.pair: ReplicaPair | None = None

    def get(self) -> ReplicaPair:
        if self.pair is None:
            # Pool tests open many connections; the replica inherits the setting.
            self.pair = _new_replica_pair(max_connections=100)
        return self.pair

    def tidy(self) -> None:
        """After a test: replay resumed when it was paused; a pair that a test stopped,
        killed or promoted is dropped (the next test gets a fresh one)."""
        pair = self.pair
        if pair is None:
            return
        healthy = pair.primary.is_running() and pair.replica.is_running()
        if healthy and pair.replica.is_replica:
            try:
                with pair.replica.admin_connection() as conn:
                    conn.execute("SELECT pg_wal_replay_resume()")
            except psycopg.Error:
                healthy = False
        if not healthy or not pair.replica.is_replica:
            self.close()

    def close(self) -> None:
        pair, self.pair = self.pair, None
        if pair is not None:
            pair.stop()


@pytest.fixture(scope="module")
def _replica_pair_of_module() -> Iterator[_ModulePair]:
    keeper = _ModulePair()
    try:
        yield keeper
    finally:
        keeper.close()


@pytest.fixture
def replica_pair(_replica_pair_of_module: _ModulePair) -> Iterator[ReplicaPair]:
    """``primary, replica``: throwaway servers, the replica streaming from the primary
    (``LocalPostgres.start_replica()``, hot standby, own port and temp dir), shared by the
    tests of a module (a replica costs a second or two to make).

    Tests share the primary's databases: use table names of their own.  After each test,
    WAL replay is resumed if the test paused it (``pg_wal_replay_pause()``); a pair the test
    stopped, killed or promoted is replaced for the next test, but tests that do that should
    rather use ``make_replica_pair``.  More replicas: ``primary.start_replica()`` (stopped
    with the pair).
    """
    yield _replica_pair_of_module.get()
    _replica_pair_of_module.tidy()


class MakeReplicaPair(Protocol):
    """``make_replica_pair(**settings)``: a fresh primary (with those server settings,
    which the replica inherits) and a streaming replica of it."""

    def __call__(self, **settings: str | int | float | bool) -> ReplicaPair: ...


@pytest.fixture
def make_replica_pair() -> Iterator[MakeReplicaPair]:
    """Factory of private ``ReplicaPair``s for tests that stop, kill or promote a server
    (failover); each pair, with any further replica of its primary, is stopped at
    teardown."""
    made: list[ReplicaPair] = []

    def factory(**settings: str | int | float | bool) -> ReplicaPair:
        pair = _new_replica_pair(**settings)
        made.append(pair)
        return pair

    yield factory
    _stop_each([server for pair in reversed(made) for server in pair.servers()])


@pytest.fixture(scope="session")
def pgbouncer(pg_server: LocalPostgres) -> Iterator[PgBouncer]:
    """PgBouncer (``tests/pgbouncer.py``) in front of ``pg_server`` for the whole run:
    ``pool_mode = transaction``, ``default_pool_size = 2``, trust authentication, on a free
    port (never the system's 6432).  ``pgbouncer.url`` reaches pg_server's ``postgres``
    database, ``pgbouncer.url_for(name)`` any other (e.g. this test's
    ``postgresql.info.dbname``); ``pgbouncer.show("POOLS")`` asks the admin console.
    Connect psycopg with ``prepare_threshold=None`` (PgBouncer 1.18 cannot keep prepared
    statements in transaction mode).  Needs the ``pgbouncer`` binary (``.ci/run`` installs
    it); without it the tests using this fixture error out saying so."""
    with PgBouncer(pg_server, pool_mode="transaction", default_pool_size=2) as bouncer:
        yield bouncer
