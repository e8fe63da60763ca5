"""Session state between users of a pooled connection (``reset_on_return``).

With ``"discard"`` the pool sends ``DISCARD ALL`` when a connection comes back, so nothing
one user of the connection did to its session reaches the next; with the default
``"rollback"`` it does, and the tests of the default show it.  Each database here has one
connection (``max_open_conns=1``), so the next user surely gets the same server backend;
the tests check that by its pid.  Run with the fast paths and with the public API only
(``FastQueuePool`` and ``CountingQueuePool``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from dbkit import Database
from dbkit.engine import fast_paths
from dbkit.pool import DiscardPolicyHooks, PolicyHooks

MakeDb = Callable[..., Database]


@pytest.fixture
def make_db(db_url: str, fast_paths: bool) -> Iterator[MakeDb]:
    """``make_db(reset_on_return, **config)``: a connected one-connection Database on this
    test's database; every one is checked for a leaked checkout and closed afterwards."""
    made: list[Database] = []

    def factory(reset_on_return: str, **config: Any) -> Database:
        config = {"max_open_conns": 1, "max_idle_conns": 1, **config}
        db = Database.from_url(
            db_url, reset_on_return=reset_on_return, fast_paths=fast_paths, **config
        )
        made.append(db.connect())
        return db

    yield factory
    for db in made:
        assert db.stats().in_use == 0, "a connection was left checked out"
        db.close()


@pytest.fixture
def admin(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Another connection to the test database, in autocommit, to look from outside."""
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.autocommit = True
        yield conn


def backend_pid(db: Database) -> int:
    pid = db.scalar("SELECT pg_backend_pid()")
    assert isinstance(pid, int)
    return pid


# -- the kinds of session state ----------------------------------------------------------


@dataclass(frozen=True)
class State:
    """One kind of session state: the statement that makes it, and a probe that tells
    whether it is still there.  ``probe(db, admin, pid)`` returns (the backend pid the
    probe looked at, the value seen); ``leaked(value)`` says whether that is the state."""

    name: str
    make: str
    probe: Callable[[Database, psycopg.Connection[Any], int], tuple[int, Any]]
    leaked: Callable[[Any], bool]


def _next_user(sql: str) -> Callable[[Database, psycopg.Connection[Any], int], tuple[int, Any]]:
    """A probe run by the next user of the pooled connection: ``sql`` selects one value."""

    def probe(db: Database, admin: psycopg.Connection[Any], pid: int) -> tuple[int, Any]:
        row = db.execute(f"SELECT pg_backend_pid(), ({sql})").one()
        return row[0], row[1]

    return probe


def _advisory_locks(db: Database, admin: psycopg.Connection[Any], pid: int) -> tuple[int, Any]:
    """Looked at from another connection while the pooled one sits idle in the pool."""
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s AND objid = 4242",
        (pid,),
    ).fetchone()
    assert row is not None
    # The lock could be taken by anyone else now (try it, and give it back at once).
    free = admin.execute("SELECT pg_try_advisory_lock(4242)").fetchone()
    assert free is not None
    if free[0]:
        admin.execute("SELECT pg_advisory_unlock(4242)")
    return pid, (row[0], free[0])


STATES = [
    State(
        "set",
        "SET work_mem = '7MB'",
        _next_user("current_setting('work_mem')"),
        lambda value: value == "7MB",
    ),
    State(
        "set_config",
        "SELECT set_config('dbkit.tenant', '42', false)",
        _next_user("current_setting('dbkit.tenant', true)"),
        lambda value: value == "42",
    ),
    State(
        "temporary_table",
        "CREATE TEMPORARY TABLE scratch (x int)",
        _next_user("to_regclass('pg_temp.scratch')"),
        lambda value: value is not None,
    ),
    State(
        "advisory_lock",
        "SELECT pg_advisory_lock(4242)",
        _advisory_locks,
        lambda value: value == (1, False),
    ),
    State(
        "listen",
        "LISTEN dbkit_channel",
        _next_user("SELECT array_agg(c) FROM pg_listening_channels() AS c"),
        lambda value: value == ["dbkit_channel"],
    ),
    State(
        "prepared_statement",
        "PREPARE dbkit_statement AS SELECT 1",
        _next_user("SELECT array_agg(name) FROM pg_prepared_statements"),
        lambda value: value is not None and "dbkit_statement" in value,
    ),
    State(
        "with_hold_cursor",
        "DECLARE dbkit_cursor CURSOR WITH HOLD FOR SELECT 1",
        _next_user("SELECT array_agg(name) FROM pg_cursors"),
        lambda value: value is not None and "dbkit_cursor" in value,
    ),
]


def make_state(db: Database, sql: str, where: str) -> None:
    """Run ``sql`` outside a transaction block (``db.execute``, autocommit) or inside one
    (committed); either way the connection then goes back to the pool."""
    if where == "autocommit":
        db.execute(sql)
    else:
        with db.transaction() as conn:
            conn.execute(sa.text(sql))


def made_state_then_probe(
    db: Database, admin: psycopg.Connection[Any], state: State, where: str
) -> Any:
    """Make ``state`` on the pool's one connection, let it go back, and probe the next
    use of the same backend."""
    pid = backend_pid(db)
    _, before = state.probe(db, admin, pid)
    assert not state.leaked(before)
    make_state(db, state.make, where)
    probed_pid, value = state.probe(db, admin, pid)
    assert probed_pid == pid
    assert backend_pid(db) == pid, "the next user got another connection: nothing tested"
    return value


@pytest.mark.parametrize("where", ["autocommit", "transaction"])
@pytest.mark.parametrize("state", STATES, ids=[s.name for s in STATES])
def test_discard_leaves_no_session_state_to_the_next_user(
    make_db: MakeDb, admin: psycopg.Connection[Any], state: State, where: str
) -> None:
    db = make_db("discard")
    value = made_state_then_probe(db, admin, state, where)
    assert not state.leaked(value), f"{state.name} leaked to the next user: {value!r}"
    assert db.stats().invalidated == 0 and db.stats().connects == 1


@pytest.mark.parametrize("where", ["autocommit", "transaction"])
@pytest.mark.parametrize("state", STATES, ids=[s.name for s in STATES])
def test_rollback_the_default_lets_session_state_reach_the_next_user(
    make_db: MakeDb, admin: psycopg.Connection[Any], state: State, where: str
) -> None:
    db = make_db("rollback")
    value = made_state_then_probe(db, admin, state, where)
    assert state.leaked(value), f"{state.name} did not leak: {value!r}"


def test_rollback_is_the_default_and_costs_nothing_extra(make_db: MakeDb) -> None:
    assert Database.from_url("postgresql://h/d").config.reset_on_return == "rollback"
    # The reset is chosen when the pool is made: the default's return path is the one it
    # always was, with no test of the setting per return.
    pool: Any = make_db("rollback").engine.pool
    assert type(pool.hooks) is PolicyHooks
    pool = make_db("discard").engine.pool
    assert type(pool.hooks) is DiscardPolicyHooks


def test_discard_keeps_the_settings_the_connection_was_opened_with(
    make_db: MakeDb,
) -> None:
    """RESET ALL goes back to the session's start, which includes what dbkit sent in the
    startup packet (``application_name``, ``statement_timeout`` …), not to the server's
    defaults."""
    db = make_db("discard", application_name="reset-test", statement_timeout=7)
    pid = backend_pid(db)
    db.execute("SET statement_timeout = '1s'")
    db.execute("SET application_name = 'someone-else'")
    with db.transaction() as conn:
        conn.execute(sa.text("SET application_name = 'someone-else'"))
    row = db.execute(
        "SELECT pg_backend_pid(), current_setting('application_name'), "
        "current_setting('statement_timeout')"
    ).one()
    assert tuple(row) == (pid, "reset-test", "7s")


# -- psycopg's own prepared statements ---------------------------------------------------


def _run_often(conn: sa.Connection, times: int = 8) -> list[int]:
    """More runs than psycopg's prepare_threshold (5): psycopg prepares the statement on
    the server (``_pg3_0``) and from then on executes it by that name."""
    statement = sa.text("SELECT CAST(:x AS int) + 1")
    return [conn.execute(statement, {"x": i}).scalar_one() for i in range(times)]


def _psycopg_prepared(conn: sa.Connection) -> list[str]:
    names = conn.execute(
        sa.text("SELECT name FROM pg_prepared_statements WHERE name LIKE '\\_pg3\\_%'")
    )
    return list(names.scalars())


@pytest.mark.parametrize("where", ["autocommit", "transaction"])
def test_statements_psycopg_prepared_still_run_after_discard(make_db: MakeDb, where: str) -> None:
    """DISCARD ALL drops psycopg's prepared statements on the server; psycopg must forget
    them too, or the next run of such a statement fails with 'prepared statement
    "_pg3_0" does not exist'.  psycopg notices a DISCARD ALL only the first time it runs
    one, so the returns are repeated.  With the public API only, psycopg prepares
    nothing on a discarding pool's connections: the same statements work all the same."""
    db = make_db("discard")
    fast = fast_paths(db.engine)
    pid = backend_pid(db)  # this return already ran a DISCARD ALL that psycopg saw

    def use() -> None:
        if where == "autocommit":
            with db.autocommit() as conn:  # left in autocommit when it goes back
                assert _run_often(conn) == list(range(1, 9))
                # Prepared with the fast paths: the test tests something.
                assert bool(_psycopg_prepared(conn)) is fast
        else:
            with db.transaction() as conn:
                assert _run_often(conn) == list(range(1, 9))
                assert bool(_psycopg_prepared(conn)) is fast

    for _ in range(3):
        use()
        assert db.execute("SELECT count(*) FROM pg_prepared_statements").scalar_one() == 0
    assert backend_pid(db) == pid
    assert db.stats().invalidated == 0


# -- the driver connection as the pool leaves it ------------------------------------------


def _flags(raw: Any) -> tuple[Any, ...]:
    return (
        raw.closed,
        raw.autocommit,
        raw.isolation_level,
        raw.read_only,
        raw.deferrable,
        raw.pgconn.transaction_status,
    )


@pytest.mark.parametrize("where", ["autocommit", "transaction", "readonly_serializable"])
def test_discard_leaves_the_driver_connection_as_rollback_does(make_db: MakeDb, where: str) -> None:
    """The psycopg connection's flags after a return are what they are with the default
    reset: only the server session differs."""
    seen, threshold = {}, {}
    for reset in ("rollback", "discard"):
        db = make_db(reset)
        if where == "autocommit":
            with db.autocommit() as conn:
                raw = conn.connection.dbapi_connection
                conn.execute(sa.text("SELECT 1"))
        else:
            options = {"readonly": True, "isolation": "serializable"}
            with db.transaction(**(options if where != "transaction" else {})) as conn:
                raw = conn.connection.dbapi_connection
                conn.execute(sa.text("SELECT 1"))
        seen[reset] = _flags(raw)
        threshold[reset] = raw.prepare_threshold
        fast = fast_paths(db.engine)
        db.close()
    assert seen["discard"] == seen["rollback"]
    assert seen["discard"][0] is False  # still open: went back to the pool
    # psycopg prepares repeated statements with the fast paths; with the public API only,
    # not on a discarding pool's connections (see dbkit.pool.discard_all).
    assert threshold["rollback"] == 5
    assert threshold["discard"] == (5 if fast else None)


# -- a connection whose DISCARD fails ------------------------------------------------------


@pytest.mark.parametrize("reset", ["rollback", "discard"])
def test_a_connection_killed_while_checked_out_is_not_reused(
    make_db: MakeDb, admin: psycopg.Connection[Any], reset: str
) -> None:
    """With "discard" the DISCARD of a connection whose backend was terminated fails:
    the connection is closed on its return, and counted; with "rollback" an idle one goes
    back to the pool and is found dead at its next checkout.  Either way the next user
    gets a new connection and the statistics add up."""
    db = make_db(reset)
    default_work_mem = db.scalar("SELECT current_setting('work_mem')")
    with db.autocommit() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        stats = db.stats()
        assert (stats.open_connections, stats.in_use, stats.idle) == (1, 1, 0)
    stats = db.stats()
    if reset == "discard":  # closed on return, not queued
        assert (stats.open_connections, stats.in_use, stats.idle) == (0, 0, 0)
        assert stats.invalidated == 1
    else:  # queued, dead
        assert (stats.open_connections, stats.in_use, stats.idle) == (1, 0, 1)
        assert stats.invalidated == 0
    time.sleep(0.02)  # past the age at which the checkout looks at an idle socket
    assert backend_pid(db) != pid
    stats = db.stats()
    assert (stats.open_connections, stats.in_use, stats.idle) == (1, 0, 1)
    assert stats.invalidated == 1
    assert stats.connects == 2
    # And the new connection is reset as usual.
    make_state(db, "SET work_mem = '7MB'", "autocommit")
    expected = "7MB" if reset == "rollback" else default_work_mem
    assert db.scalar("SELECT current_setting('work_mem')") == expected
