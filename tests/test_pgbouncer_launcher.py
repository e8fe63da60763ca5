"""tests/pgbouncer.py: the test-only PgBouncer launcher, against a real pgbouncer in front
of the test server (transaction pooling)."""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pgbouncer as launcher
import psycopg
import pytest
from pgbouncer import PgBouncer, PgBouncerError

from dbkit.local import LocalPostgres

IS_ROOT = os.geteuid() == 0


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg through PgBouncer: no server-side prepared statements (PgBouncer 1.18)."""
    return psycopg.connect(
        url.replace("+psycopg", ""), prepare_threshold=None, autocommit=True, **kwargs
    )


def test_a_query_goes_through_to_the_server(pgbouncer: PgBouncer, pg_server: LocalPostgres) -> None:
    assert pgbouncer.port != pg_server.port
    assert pgbouncer.url == f"postgresql+psycopg://postgres@127.0.0.1:{pgbouncer.port}/postgres"
    with connect(pgbouncer.url) as conn:
        row = conn.execute("SELECT inet_server_port(), current_database(), 1 + 1").fetchone()
    assert row == (pg_server.port, "postgres", 2)


def test_any_database_is_forwarded(pgbouncer: PgBouncer, postgresql: psycopg.Connection) -> None:
    dbname = postgresql.info.dbname
    with connect(pgbouncer.url_for(dbname)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (dbname,)


def test_admin_console_shows_the_transaction_pool(pgbouncer: PgBouncer) -> None:
    with connect(pgbouncer.url) as conn:
        conn.execute("SELECT 1")
        pools = {(p["database"], p["user"]): p for p in pgbouncer.show("POOLS")}
    pool = pools["postgres", "postgres"]
    assert pool["pool_mode"] == "transaction"
    assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] <= 2
    config = {c["key"]: c["value"] for c in pgbouncer.show("CONFIG")}
    assert config["default_pool_size"] == "2"
    assert config["pool_mode"] == "transaction"
    assert config["ignore_startup_parameters"] == "extra_float_digits,options"
    assert config["server_reset_query"] == "DISCARD ALL"  # PgBouncer's default
    with pytest.raises(ValueError):
        pgbouncer.show("POOLS; SHUTDOWN")


def test_more_clients_than_server_connections(pgbouncer: PgBouncer) -> None:
    """Eight clients, all connected at once, share the pool's two server connections: each
    transaction gets one of them, and every client gets its turn."""
    clients = 8
    together = threading.Barrier(clients)

    def client(number: int) -> set[int]:
        pids = set()
        with connect(pgbouncer.url) as conn:
            together.wait(timeout=60)  # all connected before any transaction
            for _ in range(5):
                with conn.transaction():
                    pid = conn.execute("SELECT pg_backend_pid()").fetchone()
                    conn.execute("SELECT pg_sleep(0.01)")
                    assert conn.execute("SELECT %s::int", (number,)).fetchone() == (number,)
                assert pid is not None
                pids.add(pid[0])
        return pids

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, n) for n in range(clients)]
        results = [f.result(timeout=120) for f in futures]  # re-raises a thread's error
    used = set().union(*results)
    assert 1 <= len(used) <= 2


def test_transaction_pooling_shares_one_server_connection(pg_server: LocalPostgres) -> None:
    """With a pool of one, two clients connected at the same time are served by the same
    server backend, one transaction after the other (session pooling would need two)."""
    with PgBouncer(pg_server, default_pool_size=1) as bouncer:
        with connect(bouncer.url) as first, connect(bouncer.url) as second:
            one = first.execute("SELECT pg_backend_pid()").fetchone()
            two = second.execute("SELECT pg_backend_pid()").fetchone()
            assert one == two
            # Session state does not belong to a client: what one SETs, the other sees.
            first.execute("SET work_mem = '1234kB'")
            assert second.execute("SHOW work_mem").fetchone() == ("1234kB",)


def test_startup_options_are_accepted_and_dropped(pgbouncer: PgBouncer) -> None:
    with connect(pgbouncer.url, options="-c statement_timeout=1234") as conn:
        # ignore_startup_parameters lets the client in, but the option never reaches the
        # server: use SET LOCAL inside the transaction behind PgBouncer.
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_in_front_of_a_password_protected_server(make_server: Any) -> None:
    server = make_server(password="pw 'with' quotes\"")
    with PgBouncer(server) as bouncer:
        assert "pw" not in bouncer.url  # clients are trusted; the server login uses auth_file
        with connect(bouncer.url) as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (server.port,)


def test_in_front_of_host_and_port(pg_server: LocalPostgres) -> None:
    with PgBouncer(f"127.0.0.1:{pg_server.port}", dbname="template1") as bouncer:
        assert bouncer.url.endswith("/template1")
        with connect(bouncer.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("template1",)
    with pytest.raises(ValueError, match="host:port"):
        PgBouncer("nowhere")


def test_stop_ends_it_and_removes_its_directory(pg_server: LocalPostgres) -> None:
    bouncer = PgBouncer(pg_server).start()
    directory, port, pid = bouncer.log_file.parent, bouncer.port, bouncer.pid
    assert pid is not None and bouncer.is_running()
    assert (directory / "pgbouncer.ini").is_file()
    if IS_ROOT:  # PgBouncer refuses root: it runs as the unprivileged server user
        uid = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert uid != 0 and uid == pg_server.data_dir.stat().st_uid
    bouncer.stop()
    assert not bouncer.is_running() and not directory.exists()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
    bouncer.stop()  # idempotent


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launcher, "_KNOWN_PLACES", (str(tmp_path / "pgbouncer"),))
    with pytest.raises(PgBouncerError, match="apt-get install pgbouncer"):
        PgBouncer(pg_server).start()
