"""tests/faultproxy.py against a real server: plain psycopg connections through the proxy
to this test's database, and a direct connection to see what the server really has."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from faultproxy import FaultProxy, _is_commit
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
    """Straight to the server, autocommit: what is really committed."""
    with psycopg.connect(autocommit=True, **params(db_url)) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, payload text)")
        yield conn


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
