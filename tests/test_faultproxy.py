"""tests/faultproxy.py against a real server: plain psycopg connections through the proxy
to this test's database, and a direct connection to see what the server really has."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from faultproxy import FaultProxy, HeldStatement, _is_commit, _matches, _statement_of
from sqlalchemy.engine import make_url

APP = "faultproxy-test"


def params(url: str, **extra: Any) -> dict[str, Any]:
    """psycopg.connect() keywords for a SQLAlchemy URL."""
    u = make_url(url)
    return {
        "host": u.host,
        "port": u.port,
        "user": u.username,
        "password": u.password,
        "dbname": u.database,
        "connect_timeout": 5,
        **extra,
    }


@pytest.fixture
def proxy(db_url: str) -> Iterator[FaultProxy]:
    u = make_url(db_url)
    assert u.host is not None and u.port is not None
    with FaultProxy(u.host, u.port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def direct(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Straight to the server, autocommit: what is really committed.  Prepared transactions
    left in this database are rolled back afterwards (they would block its DROP)."""
    with psycopg.connect(autocommit=True, **params(db_url)) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, payload text)")
        yield conn
        for (gid,) in prepared(conn):
            conn.execute(f"ROLLBACK PREPARED '{gid}'")


@pytest.fixture
def connect(proxy: FaultProxy, db_url: str) -> Iterator[Callable[..., psycopg.Connection[Any]]]:
    """Plain psycopg connections through the proxy (sslmode=prefer, as dbkit's default:
    the proxy must get through the SSLRequest the server declines)."""
    opened: list[psycopg.Connection[Any]] = []

    def factory(**extra: Any) -> psycopg.Connection[Any]:
        options = {"sslmode": "prefer", "application_name": APP, **extra}
        conn = psycopg.connect(**params(proxy.url_for(db_url), **options))
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def sessions(direct: psycopg.Connection[Any]) -> int:
    row = direct.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def present(direct: psycopg.Connection[Any], row_id: int) -> bool:
    return direct.execute("SELECT 1 FROM t WHERE id = %s", (row_id,)).fetchone() is not None


def q(text: str) -> bytes:
    body = text.encode() + b"\x00"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (q("COMMIT"), True),
        (q("  commit ; "), True),
        (q("END"), True),
        (q("ROLLBACK"), False),
        (q("COMMIT PREPARED 'x'"), False),
        (q("SELECT 'COMMIT'"), False),
        (b"P" + struct.pack("!i", 11) + b"\x00COMMIT\x00", False),  # Parse, not a Query
    ],
)
def test_what_counts_as_a_commit(message: bytes, expected: bool) -> None:
    assert _is_commit(message) is expected


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_queries_pass_through(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
    sslmode: str,
) -> None:
    conn = connect(sslmode=sslmode)
    big = "x" * 300_000  # several recv() chunks in both directions, one message each way
    conn.execute("INSERT INTO t VALUES (1, %s)", (big,))
    conn.commit()
    row = conn.execute("SELECT payload, %s::text FROM t WHERE id = 1", ("ok",)).fetchone()
    assert row == (big, "ok")
    conn.execute("INSERT INTO t VALUES (2, 'two')")
    conn.rollback()
    conn.commit()
    assert present(direct, 1) and not present(direct, 2)
    counters = proxy.counters()
    assert counters["connections"] == 1
    # Both commit() calls with a transaction open sent COMMIT; the empty one sends nothing.
    assert counters["commits_seen"] == 1
    assert proxy.open_connections() == 1


def test_cut_after_commit_commits_but_the_client_never_hears(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    conn = connect()
    conn.execute("INSERT INTO t VALUES (1, 'sent')")
    proxy.cut_after_commit()
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    assert conn.closed
    assert wait_for(lambda: present(direct, 1)), "the forwarded COMMIT did not commit"
    assert wait_for(lambda: sessions(direct) == 0), "the server session did not end"
    counters = proxy.counters()
    assert counters["commits_seen"] == 1
    assert counters["commits_cut_after"] == 1
    # Armed once: the next connection's COMMIT goes through and is answered.
    other = connect()
    other.execute("INSERT INTO t VALUES (2, 'next')")
    other.commit()
    assert present(direct, 2)


def test_cut_after_commit_relays_no_byte_of_the_reply(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    """Read at the libpq level: after the COMMIT there is EOF and nothing else, not even
    the CommandComplete the server sends before it notices the disconnection."""
    conn = connect()
    pgconn = conn.pgconn
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    proxy.cut_after_commit()
    # Send the COMMIT and read raw: there must be nothing but EOF (no CommandComplete).
    pgconn.send_query(b"COMMIT")
    pgconn.flush()
    deadline = time.monotonic() + 5
    while pgconn.is_busy() and time.monotonic() < deadline:
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            break
        time.sleep(0.01)
    result = pgconn.get_result()
    assert result is None or result.status == psycopg.pq.ExecStatus.FATAL_ERROR
    assert wait_for(lambda: present(direct, 1))


def test_arming_again_replaces_instead_of_adding(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    proxy.cut_instead_of_commit()
    proxy.cut_instead_of_commit()  # still "the next one"
    first, second = connect(), connect()
    first.execute("INSERT INTO t VALUES (1, 'cut')")
    with pytest.raises(psycopg.OperationalError):
        first.commit()
    second.execute("INSERT INTO t VALUES (2, 'kept')")
    second.commit()
    assert present(direct, 2)
    assert proxy.counters()["commits_cut_instead"] == 1


def test_cut_instead_of_commit_rolls_back(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    conn = connect()
    conn.execute("INSERT INTO t VALUES (1, 'never')")
    proxy.cut_instead_of_commit()
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    # Once the server session is gone its transaction is over for good: rolled back.
    assert wait_for(lambda: sessions(direct) == 0), "the server session did not end"
    assert not present(direct, 1)
    counters = proxy.counters()
    assert counters["commits_seen"] == 1
    assert counters["commits_cut_instead"] == 1
    assert counters["commits_cut_after"] == 0


def test_a_query_mentioning_commit_is_not_cut(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    conn = connect()
    proxy.cut_instead_of_commit()
    assert conn.execute("SELECT 'COMMIT'").fetchone() == ("COMMIT",)
    conn.rollback()
    assert proxy.counters()["commits_seen"] == 0
    proxy.disarm()
    conn.execute("INSERT INTO t VALUES (1, 'kept')")
    conn.commit()
    assert present(direct, 1)


def test_cut_all_breaks_open_connections_and_accepts_new_ones(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    first, second = connect(), connect(autocommit=True)
    first.execute("INSERT INTO t VALUES (1, 'in flight')")
    second.execute("SELECT 1")
    assert proxy.cut_all() == 2
    for conn in (first, second):
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert wait_for(lambda: sessions(direct) == 0)
    assert not present(direct, 1)
    assert proxy.counters()["cut_connections"] == 2
    third = connect()
    assert third.execute("SELECT 42").fetchone() == (42,)
    assert proxy.counters()["connections"] == 3


def test_refuse_then_accept(
    proxy: FaultProxy, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    proxy.refuse()
    with pytest.raises(psycopg.OperationalError):
        connect()
    assert proxy.counters()["refused"] >= 1  # libpq may try again without SSL
    assert proxy.counters()["connections"] == 0
    proxy.accept()
    assert connect().execute("SELECT 1").fetchone() == (1,)
    assert proxy.counters()["connections"] == 1


def test_upstream_down_resets_the_client(db_url: str) -> None:
    with FaultProxy("127.0.0.1", 1) as unreachable:  # nothing listens on port 1
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**params(unreachable.url_for(db_url)))
        assert unreachable.counters()["upstream_failures"] >= 1


def test_hold_queues_until_release(
    proxy: FaultProxy, connect: Callable[..., psycopg.Connection[Any]]
) -> None:
    conn = connect(autocommit=True)
    proxy.hold()
    answer: list[Any] = []
    worker = threading.Thread(target=lambda: answer.append(conn.execute("SELECT 7").fetchone()))
    worker.start()
    worker.join(timeout=0.5)
    assert worker.is_alive() and not answer, "the query got through a held proxy"
    proxy.release()
    worker.join(timeout=5)
    assert answer == [(7,)]


def test_close_stops_every_thread(db_url: str) -> None:
    u = make_url(db_url)
    assert u.host is not None and u.port is not None
    before = {t.ident for t in threading.enumerate()}
    fault_proxy = FaultProxy(u.host, u.port)
    conn = psycopg.connect(**params(fault_proxy.url_for(db_url)))
    conn.execute("SELECT 1")
    fault_proxy.close()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, left


# ---------------------------------------------------------------------------- hold_statement


def prepared(direct: psycopg.Connection[Any]) -> list[tuple[str]]:
    """The gids of this database's prepared transactions."""
    return direct.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid"
    ).fetchall()


def session_states(direct: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(state, last query) of every test session through the proxy."""
    return direct.execute(
        "SELECT state, query FROM pg_stat_activity WHERE application_name = %s", (APP,)
    ).fetchall()


def p(name: str, text: str) -> bytes:
    body = name.encode() + b"\x00" + text.encode() + b"\x00" + struct.pack("!h", 0)
    return b"P" + struct.pack("!i", len(body) + 4) + body


def b(portal: str, name: str) -> bytes:
    body = portal.encode() + b"\x00" + name.encode() + b"\x00" + struct.pack("!hhh", 0, 0, 0)
    return b"B" + struct.pack("!i", len(body) + 4) + body


class Worker:
    """``fn()`` in a daemon thread; its result or exception is kept for the test to check."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.checked = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # kept, raised by outcome()
            self.error = exc

    def blocked(self) -> bool:
        return self.thread.is_alive()

    def outcome(self, timeout: float = 10.0) -> Any:
        """Wait for the end: the result, or the thread's exception raised here."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker is still blocked"
        self.checked = True
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def spawn() -> Iterator[Callable[[Callable[[], Any]], Worker]]:
    """Start workers; at teardown every worker must have ended, and an exception nobody
    checked with ``outcome()`` fails the test."""
    workers: list[Worker] = []

    def factory(fn: Callable[[], Any]) -> Worker:
        workers.append(Worker(fn))
        return workers[-1]

    yield factory
    for worker in workers:
        worker.thread.join(10)
        assert not worker.thread.is_alive(), "a worker is still blocked at teardown"
        if not worker.checked and worker.error is not None:
            raise worker.error


def drop_client_side(conn: psycopg.Connection[Any]) -> None:
    """What the proxy sees when the client goes away: FIN on the client's socket (the
    psycopg connection, blocked in another thread, then reads EOF and fails)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def test_what_carries_a_statement() -> None:
    parsed = {b"_pg3_0": b"INSERT INTO t VALUES ($1)"}
    assert _statement_of(q("  commit ;"), parsed) == b"  commit ;"
    assert _statement_of(p("", "SELECT $1"), parsed) == b"SELECT $1"
    assert _statement_of(p("_pg3_1", "PREPARE TRANSACTION 'g'"), parsed) == (
        b"PREPARE TRANSACTION 'g'"
    )
    assert _statement_of(b("", "_pg3_0"), parsed) == b"INSERT INTO t VALUES ($1)"
    assert _statement_of(b("c1", "unknown"), parsed) is None
    for other in (b"S\x00\x00\x00\x04", b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"):
        assert _statement_of(other, parsed) is None
    prefix = b"PREPARE TRANSACTION"
    assert _matches(b"\n\t prepare transaction 'g'", prefix)
    assert not _matches(b"PREPARE  TRANSACTION 'g'", prefix)  # no whitespace folding
    assert not _matches(b"SELECT 1; PREPARE TRANSACTION 'g'", prefix)
    assert not _matches(b"PREPARE", prefix)


def test_hold_statement_arguments(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="non-blank"):
        proxy.hold_statement("  ")
    with pytest.raises(ValueError, match=">= 0"):
        proxy.hold_statement("INSERT", -1)
    assert proxy.wait_held(timeout=0) is False
    assert not proxy.statement_held.is_set()


def run_insert(conn: psycopg.Connection[Any], protocol: str, row_id: int) -> None:
    """INSERT INTO t one row and commit, sent the way ``protocol`` names."""
    payload = f"row {row_id}"
    if protocol == "simple":  # no parameters: a Query message
        conn.execute(f"insert into t VALUES ({row_id}, '{payload}')")
    elif protocol == "extended":  # parameters: unnamed Parse, Bind, Describe, Execute, Sync
        conn.execute("  INSERT INTO t VALUES (%s, %s)", (row_id, payload))
    elif protocol == "binary":  # no parameters, binary results: a Parse all the same
        conn.cursor().execute(f"INSERT INTO t VALUES ({row_id}, '{payload}')", binary=True)
    elif protocol == "pipeline":  # executemany(): pipeline mode, Parse
        conn.cursor().executemany("INSERT INTO t VALUES (%s, %s)", [(row_id, payload)])
    else:  # prepared: a named Parse the first time, then only Bind/Execute
        conn.execute("INSERT INTO t VALUES (%s, %s)", (row_id, payload), prepare=True)
    conn.commit()


@pytest.mark.parametrize(
    ("protocol", "kind"),
    [
        ("simple", "Q"),
        ("extended", "P"),
        ("binary", "P"),
        ("pipeline", "P"),
        ("prepared", "P"),
        ("prepared-again", "B"),
    ],
)
def test_a_held_statement_never_reaches_the_server(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
    spawn: Callable[[Callable[[], Any]], Worker],
    protocol: str,
    kind: str,
) -> None:
    conn = connect()
    if protocol == "prepared-again":
        run_insert(conn, "prepared", 0)  # Parse "_pg3_0" goes through, the next is a Bind
        protocol = "prepared"
    proxy.hold_statement("insert INTO T")
    worker = spawn(lambda: run_insert(conn, protocol, 1))
    assert proxy.wait_held(timeout=10), "nothing was held"
    assert proxy.statement_held.is_set()
    [held] = proxy.held_statements()
    assert held.connection == 1 and held.kind == kind
    assert held.text.lstrip().upper().startswith("INSERT INTO T VALUES (")
    # The server never saw it: its session waits, idle in the transaction psycopg began.
    assert session_states(direct) == [("idle in transaction", "BEGIN")]
    assert not present(direct, 1)
    assert worker.blocked()
    assert proxy.counters()["statements_held"] == 1
    # The client goes away: the proxy ends the server session, the transaction rolls back.
    drop_client_side(conn)
    with pytest.raises(psycopg.OperationalError):
        worker.outcome()
    assert wait_for(lambda: sessions(direct) == 0), "the server session did not end"
    assert not present(direct, 1)
    assert proxy.open_connections() == 0
    if kind == "B":
        assert present(direct, 0)


def test_other_statements_pass_and_disarm_forgets(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
) -> None:
    direct.execute("CREATE TABLE other (id int)")
    conn = connect()
    proxy.hold_statement("INSERT INTO t")
    assert conn.execute("SELECT 'INSERT INTO t'").fetchone() == ("INSERT INTO t",)
    assert conn.execute("SELECT %s::text", ("INSERT INTO t",)).fetchone() == ("INSERT INTO t",)
    conn.execute("INSERT INTO other VALUES (1)")
    conn.execute("INSERT INTO other VALUES (%s)", (2,))
    conn.execute("/* INSERT INTO t */ INSERT INTO other VALUES (3)")  # comments not skipped
    conn.commit()
    assert direct.execute("SELECT count(*) FROM other").fetchone() == (3,)
    assert proxy.counters()["statements_held"] == 0
    proxy.disarm()
    run_insert(conn, "simple", 1)
    run_insert(conn, "extended", 2)
    assert present(direct, 1) and present(direct, 2)
    assert proxy.counters()["statements_held"] == 0
    assert proxy.held_statements() == []


def test_n_counts_and_arming_again_replaces(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
    spawn: Callable[[Callable[[], Any]], Worker],
) -> None:
    proxy.hold_statement("INSERT INTO t", n=5)
    proxy.hold_statement("insert into t", n=2)  # the same prefix: replaces, 2 in all
    first, second, third = connect(), connect(), connect()
    one = spawn(lambda: run_insert(first, "simple", 1))
    assert proxy.wait_held(timeout=10, count=1)
    two = spawn(lambda: run_insert(second, "extended", 2))
    assert proxy.wait_held(timeout=10, count=2)
    run_insert(third, "extended", 3)  # the third one passes
    assert present(direct, 3)
    assert not present(direct, 1) and not present(direct, 2)
    assert [h.connection for h in proxy.held_statements()] == [1, 2]
    assert one.blocked() and two.blocked()
    # release() ends hold() only: the held statements stay held.
    proxy.hold()
    proxy.release()
    assert one.blocked() and two.blocked()
    # cut_all() shuts held connections down like any other.
    assert proxy.cut_all() == 3
    for worker in (one, two):
        with pytest.raises(psycopg.OperationalError):
            worker.outcome()
    assert wait_for(lambda: sessions(direct) == 0)
    assert not present(direct, 1) and not present(direct, 2)
    counters = proxy.counters()
    assert counters["statements_held"] == 2 and counters["cut_connections"] == 3


def test_several_prefixes_and_a_held_commit_is_no_commit_fault(
    proxy: FaultProxy,
    direct: psycopg.Connection[Any],
    connect: Callable[..., psycopg.Connection[Any]],
    spawn: Callable[[Callable[[], Any]], Worker],
) -> None:
    proxy.hold_statement("UPDATE t")
    proxy.hold_statement("COMMIT")
    proxy.cut_instead_of_commit()
    conn = connect()
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    worker = spawn(conn.commit)
    assert proxy.wait_held(timeout=10)
    assert proxy.held_statements() == [HeldStatement(1, "Q", "COMMIT")]
    counters = proxy.counters()
    assert counters["commits_seen"] == 0 and counters["commits_cut_instead"] == 0
    assert session_states(direct) == [("idle in transaction", "INSERT INTO t VALUES (1, 'x')")]
    drop_client_side(conn)
    with pytest.raises(psycopg.OperationalError):
        worker.outcome()
    assert wait_for(lambda: sessions(direct) == 0)
    assert not present(direct, 1)
    # "UPDATE t" is still armed, the COMMIT fault too.
    other = connect()
    other.execute("INSERT INTO t VALUES (2, 'y')")
    with pytest.raises(psycopg.OperationalError):
        other.commit()
    assert proxy.counters()["commits_cut_instead"] == 1
    third = connect()
    third.execute("INSERT INTO t VALUES (3, 'z')")
    third.commit()
    worker = spawn(lambda: third.execute("UPDATE t SET payload = 'held' WHERE id = 3"))
    assert proxy.wait_held(timeout=10, count=2)
    assert proxy.held_statements()[-1].text.startswith("UPDATE t SET")
    proxy.cut_all()
    with pytest.raises(psycopg.OperationalError):
        worker.outcome()
    assert direct.execute("SELECT payload FROM t WHERE id = 3").fetchone() == ("z",)


# A client process that crashes: it runs its statements through the proxy and is killed
# with SIGKILL while held.  argv[1]: JSON [connect keywords, [[sql, binary], ...]].
CRASH_CLIENT = """
import json, sys
import psycopg
keywords, statements = json.loads(sys.argv[1])
conn = psycopg.connect(autocommit=True, **keywords)
for sql, binary in statements:
    conn.cursor().execute(sql, binary=binary)
print("nothing was held", flush=True)
"""


def crash_client(
    proxy: FaultProxy, db_url: str, statements: list[tuple[str, bool]]
) -> subprocess.Popen[str]:
    keywords = params(proxy.url_for(db_url), application_name=APP, sslmode="prefer")
    return subprocess.Popen(
        [sys.executable, "-c", CRASH_CLIENT, json.dumps([keywords, statements])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    assert process.returncode == -signal.SIGKILL


def held_or_fail(proxy: FaultProxy, process: subprocess.Popen[str]) -> None:
    """Wait until the process's statement is held; else its output fails the test."""
    if proxy.wait_held(timeout=30):
        return
    process.kill()
    out, err = process.communicate(timeout=10)
    pytest.fail(f"nothing was held; client exit {process.returncode}: {out}{err}")


def two_phase(direct: psycopg.Connection[Any]) -> None:
    # dbkit.local enables prepared transactions on every cluster it makes: never skipped.
    setting = direct.execute("SHOW max_prepared_transactions").fetchone()
    assert setting is not None and int(setting[0]) > 0, "the test server refuses PREPARE"


@pytest.mark.parametrize("binary", [False, True], ids=["simple", "extended"])
def test_prepare_transaction_held_then_the_client_is_killed(
    proxy: FaultProxy, direct: psycopg.Connection[Any], db_url: str, binary: bool
) -> None:
    """The crash before PREPARE TRANSACTION: the server rolls the transaction back."""
    two_phase(direct)
    proxy.hold_statement("PREPARE TRANSACTION")
    client = crash_client(
        proxy,
        db_url,
        [
            ("BEGIN", False),
            ("INSERT INTO t VALUES (1, 'in doubt')", binary),
            ("PREPARE TRANSACTION 'faultproxy-1'", binary),
        ],
    )
    try:
        held_or_fail(proxy, client)
        [held] = proxy.held_statements()
        assert (held.kind, held.text) == (
            "P" if binary else "Q",
            "PREPARE TRANSACTION 'faultproxy-1'",
        )
        assert prepared(direct) == []
        [(state, _)] = session_states(direct)
        assert state == "idle in transaction"
        assert client.poll() is None  # blocked, waiting for the answer
    finally:
        kill(client)
    assert wait_for(lambda: sessions(direct) == 0), "the server session did not end"
    assert prepared(direct) == []
    assert not present(direct, 1)


@pytest.mark.parametrize("binary", [False, True], ids=["simple", "extended"])
def test_commit_prepared_held_then_the_client_is_killed(
    proxy: FaultProxy, direct: psycopg.Connection[Any], db_url: str, binary: bool
) -> None:
    """The crash between PREPARE TRANSACTION and COMMIT PREPARED: the prepared transaction
    outlives the session, and can still be committed from elsewhere."""
    two_phase(direct)
    proxy.hold_statement("COMMIT PREPARED")
    client = crash_client(
        proxy,
        db_url,
        [
            ("BEGIN", False),
            ("INSERT INTO t VALUES (1, 'prepared')", binary),
            ("PREPARE TRANSACTION 'faultproxy-2'", binary),
            ("COMMIT PREPARED 'faultproxy-2'", binary),
        ],
    )
    try:
        held_or_fail(proxy, client)
        assert [h.kind for h in proxy.held_statements()] == ["P" if binary else "Q"]
        assert prepared(direct) == [("faultproxy-2",)]
        assert not present(direct, 1)
        assert client.poll() is None
    finally:
        kill(client)
    assert wait_for(lambda: sessions(direct) == 0), "the server session did not end"
    assert prepared(direct) == [("faultproxy-2",)]  # survives its session
    assert not present(direct, 1)
    direct.execute("COMMIT PREPARED 'faultproxy-2'")
    assert present(direct, 1)
