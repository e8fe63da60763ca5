"""LocalPostgres.start_replica()/promote() and `dbkit local start --replicas N`, against real
streaming replicas (pg_basebackup -R) started by the tests."""

from __future__ import annotations

import os
import pwd
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cli_helpers import one_line, run_dbkit
from conftest import MakeReplicaPair, ReplicaPair

from dbkit.errors import DbkitError
from dbkit.local import LocalPostgres

IS_ROOT = os.geteuid() == 0

# A bound for a loaded machine, never an expectation: streaming is usually milliseconds.
WAIT = 60.0


def query(server: LocalPostgres, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with server.admin_connection() as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def scalar(server: LocalPostgres, sql: str, params: Any = None) -> Any:
    rows = query(server, sql, params)
    assert len(rows) == 1, rows
    return rows[0][0]


def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {WAIT:.0f} s")
        time.sleep(0.05)


def table_name() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def has_row(server: LocalPostgres, table: str, value: int) -> bool:
    """Whether ``table`` exists on ``server`` and holds a row with x = value."""
    if scalar(server, "SELECT to_regclass(%s) IS NULL", (table,)):
        return False
    return bool(scalar(server, f"SELECT count(*) FROM {table} WHERE x = %s", (value,)))


def wal_end(primary: LocalPostgres) -> str:
    """The end of the primary's WAL, every commit so far included.  Not
    pg_current_wal_lsn(): that is where WAL has been *written* to, which with
    ``synchronous_commit = off`` (throwaway servers) can lag behind commits just made."""
    return str(scalar(primary, "SELECT pg_current_wal_insert_lsn()"))


def caught_up(primary: LocalPostgres, replica: LocalPostgres) -> None:
    """Wait (bounded) until the replica has replayed everything the primary has written."""
    target = wal_end(primary)
    until(
        lambda: scalar(replica, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)),
        f"replayed up to {target}",
    )


def slots(primary: LocalPostgres) -> dict[str, bool]:
    return dict(query(primary, "SELECT slot_name, active FROM pg_replication_slots"))


# ----------------------------------------------------------------------- streaming


def test_replica_streams_and_refuses_writes(replica_pair: ReplicaPair) -> None:
    primary, replica = replica_pair
    assert replica.is_replica and not primary.is_replica
    assert replica.primary is primary and replica in primary.replicas
    assert replica.port != primary.port and replica.data_dir != primary.data_dir
    assert replica.is_temporary and replica.is_running()
    assert replica.url == f"postgresql+psycopg://postgres@127.0.0.1:{replica.port}/postgres"
    # A standby copies the primary's settings it needs at least as high (max_connections).
    assert scalar(replica, "SHOW max_connections") == scalar(primary, "SHOW max_connections")
    assert scalar(replica, "SELECT pg_is_in_recovery()") is True
    assert scalar(primary, "SELECT pg_is_in_recovery()") is False
    assert scalar(replica, "SELECT status FROM pg_stat_wal_receiver") == "streaming"

    table = table_name()
    query(primary, f"CREATE TABLE {table} (x int)")
    query(primary, f"INSERT INTO {table} VALUES (1)")
    until(lambda: has_row(replica, table, 1), "streamed to the replica")

    with replica.admin_connection() as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
            conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert refused.value.sqlstate == "25006"
    assert scalar(primary, f"SELECT count(*) FROM {table}") == 1


def test_paused_replay_makes_lag_measurable(replica_pair: ReplicaPair) -> None:
    primary, replica = replica_pair
    table = table_name()
    query(primary, f"CREATE TABLE {table} (x int)")
    caught_up(primary, replica)
    query(replica, "SELECT pg_wal_replay_pause()")

    query(primary, f"INSERT INTO {table} VALUES (1)")
    target = wal_end(primary)
    # Received (the WAL receiver still streams), but not replayed: replay is paused.
    until(
        lambda: scalar(replica, "SELECT pg_last_wal_receive_lsn() >= %s::pg_lsn", (target,)),
        "received",
    )
    assert scalar(replica, "SELECT pg_is_wal_replay_paused()") is True
    lag = scalar(replica, "SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())", (target,))
    assert lag > 0
    assert not has_row(replica, table, 1)

    query(replica, "SELECT pg_wal_replay_resume()")
    caught_up(primary, replica)
    assert has_row(replica, table, 1)
    assert (
        scalar(replica, "SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())", (target,))
        <= 0
    )


def test_a_killed_replica_catches_up_after_start(replica_pair: ReplicaPair) -> None:
    """Its slot keeps the WAL it missed; start() waits until it streams again."""
    primary = replica_pair.primary
    extra = primary.start_replica()
    try:
        table = table_name()
        query(primary, f"CREATE TABLE {table} (x int)")
        extra.kill()
        assert not extra.is_running() and extra.data_dir.exists()
        query(primary, f"INSERT INTO {table} VALUES (7)")
        query(primary, "SELECT pg_switch_wal()")  # its WAL now in an older segment
        port = extra.port
        extra.start()
        assert extra.port == port and extra.is_replica
        assert scalar(extra, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
        until(lambda: has_row(extra, table, 7), "caught up")
    finally:
        extra.stop()


def test_stop_of_a_temporary_replica_deletes_it_and_its_slot(replica_pair: ReplicaPair) -> None:
    primary = replica_pair.primary
    before = set(slots(primary))
    extra = primary.start_replica()
    try:
        (slot,) = set(slots(primary)) - before
        assert slots(primary)[slot] is True
        run_dir, port = extra.run_dir, extra.port
        assert run_dir.name.startswith("dbkit-pg-")
        extra.stop()
        assert not extra.is_running() and not run_dir.exists()
        assert slot not in slots(primary)
        # Started again: a fresh replica on the same port, streaming.
        extra.start()
        assert extra.port == port and extra.is_replica
        assert scalar(extra, "SELECT pg_is_in_recovery()") is True
    finally:
        extra.stop()
    assert set(slots(primary)) == before


def test_primary_stop_leaves_replicas_running_and_with_stops_them_all() -> None:
    with LocalPostgres() as primary:
        replica = primary.start_replica()
        second = primary.start_replica()
        query(second, "SELECT pg_wal_replay_pause()")
        assert primary.replicas == [replica, second]
        primary.stop()  # with connected replicas, one of them paused: returns
        assert not primary.is_running()
        assert replica.is_running() and second.is_running()
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True
        primary.start()  # (a fresh temporary cluster: the replicas cannot follow it)
        dirs = [replica.run_dir, second.run_dir]
    assert not primary.is_running()
    assert not replica.is_running() and not second.is_running()
    assert not any(d.exists() for d in dirs)


def test_start_replica_needs_a_running_primary() -> None:
    with pytest.raises(DbkitError, match="running"):
        LocalPostgres().start_replica()


def test_start_replica_refuses_a_primary_without_wal_for_replicas(make_server: Any) -> None:
    server = make_server(wal_level="minimal", max_wal_senders=0)
    with pytest.raises(DbkitError, match="wal_level = minimal"):
        server.start_replica()
    assert server.replicas == []


def test_start_replica_adds_a_missing_replication_line(make_server: Any) -> None:
    server = make_server(password="pw")
    hba = server.data_dir / "pg_hba.conf"
    hba.write_text("".join(x for x in hba.read_text().splitlines(True) if "replication" not in x))
    query(server, "SELECT pg_reload_conf()")
    replica = server.start_replica()
    try:
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True
        rules = query(
            server,
            "SELECT address, auth_method FROM pg_hba_file_rules"
            " WHERE database = '{replication}' AND type = 'host'",
        )
        assert rules == [("127.0.0.1", "scram-sha-256")]
    finally:
        replica.stop()


def test_replica_of_a_password_protected_primary(make_server: Any) -> None:
    primary = make_server(password="s3cr'et pw")
    replica = primary.start_replica()
    try:
        assert replica.password == primary.password
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host=replica.host, port=replica.port, user="postgres", dbname="postgres"
            ).close()
        assert scalar(replica, "SELECT pg_is_in_recovery()") is True
    finally:
        replica.stop()


@pytest.mark.skipif(not IS_ROOT, reason="only meaningful when running as root")
def test_replica_runs_as_the_primarys_unprivileged_user(replica_pair: ReplicaPair) -> None:
    primary, replica = replica_pair
    owner = replica.data_dir.stat().st_uid
    assert owner != 0 and owner == primary.data_dir.stat().st_uid
    status = Path(f"/proc/{replica.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid_line.split()[1]) == owner == pwd.getpwuid(owner).pw_uid


# ----------------------------------------------------------------------- promote


def test_promote_after_the_primary_fails(make_replica_pair: MakeReplicaPair) -> None:
    primary, replica = make_replica_pair()
    table = table_name()
    query(primary, f"CREATE TABLE {table} (x int)")
    query(primary, f"INSERT INTO {table} VALUES (1)")
    caught_up(primary, replica)
    primary.kill()  # as a crash would

    assert replica.promote() is replica
    assert not replica.is_replica and replica.primary is None
    assert scalar(replica, "SELECT pg_is_in_recovery()") is False
    query(replica, f"INSERT INTO {table} VALUES (2)")
    assert scalar(replica, f"SELECT array_agg(x ORDER BY x) FROM {table}") == [1, 2]
    with pytest.raises(DbkitError, match="not a standby"):
        replica.promote()


def test_promote_while_the_primary_runs_drops_its_slot(
    make_replica_pair: MakeReplicaPair,
) -> None:
    primary, replica = make_replica_pair()
    assert list(slots(primary).values()) == [True]
    replica.promote()
    assert slots(primary) == {}
    query(replica, "CREATE TABLE after_promotion (x int)")  # writable
    assert scalar(primary, "SELECT to_regclass('after_promotion')") is None  # split: its own


def test_promote_refuses_a_primary_and_a_stopped_replica(
    make_replica_pair: MakeReplicaPair,
) -> None:
    primary, replica = make_replica_pair()
    with pytest.raises(DbkitError, match="not a standby"):
        primary.promote()
    replica.kill()
    with pytest.raises(DbkitError, match="not running"):
        replica.promote()


# ----------------------------------------------------------------------- kept


def test_kept_replicas_live_next_to_the_primary_and_follow_its_port(
    kept_parent: Path, free_port: int
) -> None:
    primary = LocalPostgres(kept_parent / "pg").start()
    try:
        replica = primary.start_replica()
        assert replica.data_dir == kept_parent / "pg-replica-1"
        assert not replica.is_temporary and replica.log_file.parent == replica.data_dir
        # The primary's own files in its data dir are not copied over as the replica's.
        assert (replica.data_dir / "dbkit-port").read_text().strip() == str(replica.port)
        assert f"port {primary.port}" not in (replica.data_dir / "dbkit-postgres.log").read_text()
        table = table_name()
        query(primary, f"CREATE TABLE {table} (x int)")
        replica.stop()
        assert replica.data_dir.exists()  # kept

        found = LocalPostgres(kept_parent / "pg").kept_replicas()
        assert list(found) == [1] and found[1].data_dir == replica.data_dir
        assert not found[1].is_running() and found[1].is_replica
        # Another directory with the same name pattern, not made for this primary: ignored.
        (kept_parent / "pg-replica-7").mkdir()
        assert list(LocalPostgres(kept_parent / "pg").kept_replicas()) == [1]

        # The primary moves to another port: its replica follows it.
        assert free_port != primary.port
        primary.stop()
        primary = LocalPostgres(kept_parent / "pg", port=free_port).start()
        query(primary, f"INSERT INTO {table} VALUES (3)")
        again = primary.kept_replicas()[1]
        again.start()
        assert again.port == replica.port  # its own remembered port
        until(lambda: has_row(again, table, 3), "streamed from the moved primary")
        second = primary.start_replica()
        assert second.data_dir == kept_parent / "pg-replica-2"
        assert list(primary.kept_replicas()) == [1, 2]
        assert sorted(slots(primary)) == ["dbkit_replica_1", "dbkit_replica_2"]
        second.destroy()
        assert not second.data_dir.exists()
        assert sorted(slots(primary)) == ["dbkit_replica_1"]
        again.stop()
    finally:
        for server in primary.kept_replicas().values():
            server.stop(mode="immediate")
        primary.stop(mode="immediate")


# ----------------------------------------------------------------------- the command


def test_local_start_replicas_status_url_stop_destroy(kept_parent: Path) -> None:
    data = kept_parent / "pg"
    env = {"DBKIT_LOCAL_DIR": str(data)}
    started = run_dbkit("local", "start", "--replicas", "1", env=env)
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()  # stdout: the primary's URL alone, as without replicas
        assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        replica_dir = kept_parent / "pg-replica-1"
        (line,) = [x for x in started.stderr.splitlines() if x.startswith("replica 1: ")]
        replica_url = line.split()[2]
        assert line == f"replica 1: {replica_url} (data in {replica_dir})"
        assert replica_url != url
        with psycopg.connect(replica_url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

        got = run_dbkit("local", "url", "--replica", "1", env=env)
        assert got.returncode == 0 and got.stdout.strip() == replica_url
        got = run_dbkit("local", "url", "--replica", "all", env=env)
        assert got.returncode == 0 and got.stdout.strip() == replica_url
        assert run_dbkit("local", "url", env=env).stdout.strip() == url
        missing = run_dbkit("local", "url", "--replica", "2", env=env)
        assert missing.returncode == 2 and "no replica '2'" in one_line(missing.stderr)

        status = run_dbkit("local", "status", env=env)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith(f"running at {url} (pid ")
        assert lines[1].startswith(f"replica 1 running at {replica_url} (pid ")
        assert lines[1].endswith(f"data in {replica_dir})") and len(lines) == 2

        # Starting again: nothing new (one replica was asked for and is there).
        again = run_dbkit("local", "start", "--replicas", "1", env=env)
        assert again.returncode == 0 and again.stdout.strip() == f"already running: {url}"
        assert not (kept_parent / "pg-replica-2").exists()

        # A replica down: status says which, exit 3; start brings it back.
        LocalPostgres(data).kept_replicas()[1].stop()
        status = run_dbkit("local", "status", env=env)
        assert status.returncode == 3 and "replica 1 not running" in one_line(status.stderr)
        assert f"replica 1 not running (data in {replica_dir})" in status.stdout
        assert run_dbkit("local", "url", "--replica", "1", env=env).returncode == 1

        stopped = run_dbkit("local", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.startswith("stopped (data kept in")
        status = run_dbkit("local", "status", env=env)
        assert status.returncode == 3

        # Started again without --replicas: the replica made earlier comes back, same URL.
        restarted = run_dbkit("local", "start", env=env)
        assert restarted.returncode == 0 and restarted.stdout.strip() == url
        assert f"replica 1: {replica_url} " in restarted.stderr
        stopped = run_dbkit("local", "stop", env=env)
        assert stopped.stdout.splitlines() == [
            f"stopped (data kept in {data})",
            f"stopped replica 1 (data kept in {replica_dir})",
        ]
        # Two replicas now: one more is made.
        more = run_dbkit("local", "start", "--replicas", "2", env=env)
        assert more.returncode == 0, more.stderr
        assert (kept_parent / "pg-replica-2" / "standby.signal").exists()

        unconfirmed = run_dbkit("local", "destroy", env=env)
        assert unconfirmed.returncode == 2 and str(replica_dir) in one_line(unconfirmed.stderr)
        destroyed = run_dbkit("local", "destroy", "--yes", env=env)
        assert destroyed.returncode == 0, destroyed.stderr
        assert destroyed.stdout.splitlines() == [
            f"deleted {data}",
            f"deleted {replica_dir}",
            f"deleted {kept_parent / 'pg-replica-2'}",
        ]
        assert sorted(p.name for p in kept_parent.iterdir()) == []
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(replica_url.replace("+psycopg", ""), connect_timeout=3)
    finally:
        run_dbkit("local", "stop", env=env)


def test_local_start_replicas_must_be_a_count(kept_parent: Path) -> None:
    result = run_dbkit("local", "start", "--replicas", "-1", "--data-dir", str(kept_parent / "x"))
    assert result.returncode == 2 and "--replicas" in result.stderr
    assert not (kept_parent / "x").exists()
