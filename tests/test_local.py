"""dbkit.local: the throwaway/kept local PostgreSQL launcher and binary discovery."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import dbkit.local
from dbkit.errors import DbkitError
from dbkit.local import LocalPostgres, PostgresBinariesNotFound, find_bindir

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="only meaningful when running as root")


def query(server: LocalPostgres, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
    with psycopg.connect(
        host=server.host, port=server.port, user=server.user, dbname=dbname, autocommit=True
    ) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def expected_server_user() -> str:
    """Whom LocalPostgres runs the server as when we are root."""
    wanted = os.environ.get("DBKIT_PG_RUN_AS")
    if wanted:
        return wanted
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


# ---------------------------------------------------------------------------- lifecycle


def test_temp_server_start_connect_stop() -> None:
    server = LocalPostgres()
    assert not server.is_running()
    with server:
        assert server.is_running()
        assert server.host == "127.0.0.1"
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/postgres"
        assert query(server, "SELECT 1") == [(1,)]
        run_dir = server.run_dir
        assert run_dir.name.startswith("dbkit-pg-")
        assert server.start() is server  # idempotent while running
    assert not server.is_running()
    assert not run_dir.exists()  # temp cluster removed
    server.stop()  # idempotent


def test_temp_server_stop_then_start_is_fresh_on_the_same_port() -> None:
    with LocalPostgres() as server:
        port = server.port
        query(server, "CREATE TABLE gone (x int)")
        server.stop()
        server.start()
        assert server.port == port  # the URL handed out stays valid
        assert query(server, "SELECT to_regclass('gone')") == [(None,)]


def test_server_settings_and_durability_off(make_server: Any) -> None:
    server = make_server(max_connections=7, application_name="it's quoted")
    rows = query(
        server,
        "SELECT current_setting('max_connections'), current_setting('fsync'),"
        " current_setting('listen_addresses'), current_setting('unix_socket_directories')",
    )
    assert rows == [("7", "off", "127.0.0.1", str(server.run_dir))]


def test_url_for_and_database_helpers(make_server: Any) -> None:
    server = make_server()
    assert server.url_for("other") == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/other"
    server.create_database("src")
    query(server, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)", dbname="src")
    server.create_database("copy", template="src")
    assert query(server, "SELECT x FROM t", dbname="copy") == [(42,)]
    session = psycopg.connect(server.url_for("copy").replace("+psycopg", ""))
    server.drop_database("copy")  # disconnects the open session
    session.close()
    server.drop_database("copy")  # IF EXISTS
    names = {r[0] for r in query(server, "SELECT datname FROM pg_database")}
    assert "src" in names and "copy" not in names


def test_password_protected_server(make_server: Any) -> None:
    server = make_server(password="s3cret pw@/:")
    assert server.password == "s3cret pw@/:"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=server.host, port=server.port, user="postgres", password="wrong")
    engine = sa.create_engine(server.url)  # the SQLAlchemy URL carries it, quoted
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        engine.dispose()
    server.create_database("with_pw")  # the helpers authenticate too
    server.drop_database("with_pw")
    assert not list(server.run_dir.glob("dbkit-pw-*"))  # the initdb password file is gone


def test_restart_keeps_port_and_data(make_server: Any) -> None:
    server = make_server()
    port = server.port
    query(server, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    server.restart()
    assert server.port == port
    assert server.is_running()
    assert query(server, "SELECT x FROM kept") == [(1,)]


def test_kill_then_start_recovers(make_server: Any) -> None:
    server = make_server()
    port = server.port
    # synchronous_commit is off server-wide: a crash may lose the latest commits.  Committed
    # synchronously, the WAL reaches the OS before kill, which survives a process crash.
    query(server, "SET synchronous_commit = on; CREATE TABLE survived (x int)")
    server.kill()
    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        query(server, "SELECT 1")
    server.start()  # crash recovery on the same data and port
    assert server.port == port
    assert query(server, "SELECT count(*) FROM survived") == [(0,)]


def test_start_failure_reports_server_log(make_server: Any) -> None:
    server = make_server(start=False, max_connections="lots")
    with pytest.raises(DbkitError) as info:
        server.start()
    message = str(info.value)
    assert "failed to start" in message
    assert "max_connections" in message  # from the server log tail
    assert not server.is_running()
    log_path = Path(message.split("--- server log (", 1)[1].split(")", 1)[0])
    assert not log_path.parent.exists()  # the half-made temp cluster was removed


def test_fixed_port_in_use_fails_clearly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = LocalPostgres(port=port)
        try:
            with pytest.raises(DbkitError, match=r"(?i)address already in use"):
                server.start()
        finally:
            server.stop()


def test_auto_port_race_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real_free_port = dbkit.local._free_port
        picks = iter([taken])
        # First pick loses the race (the port got taken), later picks are real.
        monkeypatch.setattr(
            dbkit.local, "_free_port", lambda host: next(picks, None) or real_free_port(host)
        )
        with LocalPostgres() as server:
            assert server.port != taken
            assert query(server, "SELECT 1") == [(1,)]


def test_atexit_stops_a_forgotten_temp_server() -> None:
    code = textwrap.dedent(
        """
        from dbkit.local import LocalPostgres
        server = LocalPostgres().start()
        print(server.run_dir, server.pid, flush=True)
        # exits without stop()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    run_dir, pid = Path(out[0]), int(out[1])
    assert not run_dir.exists()
    # pg_ctl stop -w returns once postmaster.pid is gone, a moment before the process exits.
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)


def process_alive(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


# ---------------------------------------------------------------------------- kept data dir


def test_kept_data_dir_is_reused_and_attachable(kept_parent: Path) -> None:
    data_dir = kept_parent / "cluster"
    assert LocalPostgres.attach(data_dir) is None  # nothing there yet

    with LocalPostgres(data_dir) as first:
        query(first, "CREATE TABLE notes (body text); INSERT INTO notes VALUES ('hello')")
        attached = LocalPostgres.attach(data_dir)
        assert attached is not None
        assert attached.port == first.port
        assert attached.is_running()
        # A second handle on a running kept cluster adopts it instead of starting another.
        second = LocalPostgres(data_dir).start()
        assert second.port == first.port
    assert (data_dir / "PG_VERSION").exists()  # kept after stop
    assert LocalPostgres.attach(data_dir) is None

    with LocalPostgres(data_dir) as again:
        assert query(again, "SELECT body FROM notes") == [("hello",)]
        attached = LocalPostgres.attach(data_dir)
        assert attached is not None
        attached.stop()  # `dbkit local stop` path: stopping via attach works
        assert not again.is_running()
    assert (data_dir / "PG_VERSION").exists()


DURABILITY = (
    "SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
    " current_setting('full_page_writes')"
)


def test_kept_cluster_is_durable_temp_cluster_is_not(kept_parent: Path, make_server: Any) -> None:
    with LocalPostgres(kept_parent / "durable") as kept:
        assert query(kept, DURABILITY) == [("on", "on", "on")]
    assert query(make_server(), DURABILITY) == [("off", "off", "off")]
    # An explicit setting still wins on either kind.
    with LocalPostgres(kept_parent / "fast", settings={"synchronous_commit": False}) as fast:
        assert query(fast, DURABILITY) == [("on", "off", "on")]


def test_every_new_cluster_can_be_a_primary(make_server: Any) -> None:
    """initdb here readies a cluster for start_replica(): replication settings written into
    postgresql.conf (a replica copies them) and a replication line for 127.0.0.1."""
    server = make_server()
    rows = query(
        server,
        "SELECT name, setting, source FROM pg_settings WHERE name IN"
        " ('wal_level', 'max_wal_senders', 'max_replication_slots', 'hot_standby')"
        " ORDER BY name",
    )
    assert rows == [
        ("hot_standby", "on", "configuration file"),
        ("max_replication_slots", "10", "configuration file"),
        ("max_wal_senders", "10", "configuration file"),
        ("wal_level", "replica", "configuration file"),
    ]
    hba = query(
        server,
        "SELECT type, address, auth_method FROM pg_hba_file_rules"
        " WHERE database = '{replication}' AND type = 'host' AND address = '127.0.0.1'",
    )
    assert hba == [("host", "127.0.0.1", "trust")]


def test_destroy_stops_and_deletes_a_kept_cluster(kept_parent: Path) -> None:
    data_dir = kept_parent / "doomed"
    server = LocalPostgres(data_dir).start()
    port = server.port
    LocalPostgres(data_dir).destroy()  # a fresh handle, as `dbkit local destroy` has
    assert not data_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", connect_timeout=3)
    LocalPostgres(data_dir).destroy()  # nothing left: a no-op
    # A stopped cluster goes too, and a new one can take its place.
    with LocalPostgres(data_dir) as again:
        query(again, "SELECT 1")
    assert (data_dir / "PG_VERSION").exists()
    LocalPostgres(data_dir).destroy()
    assert not data_dir.exists()


def test_destroy_refuses_a_directory_that_is_not_a_cluster(kept_parent: Path) -> None:
    precious = kept_parent / "home"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(DbkitError, match="not a PostgreSQL data directory"):
        LocalPostgres(precious).destroy()
    assert (precious / "thesis.txt").read_text() == "years of work"
    link = kept_parent / "link"
    cluster = kept_parent / "real"
    LocalPostgres(cluster).start().stop()
    link.symlink_to(cluster)
    with pytest.raises(DbkitError, match="symbolic link"):
        LocalPostgres(link).destroy()
    assert (cluster / "PG_VERSION").exists()


def test_destroy_a_temporary_cluster_is_stop(make_server: Any) -> None:
    server = make_server()
    run_dir = server.run_dir
    server.destroy()
    assert not run_dir.exists() and not server.is_running()


def test_long_data_dir_path_disables_unix_socket(kept_parent: Path) -> None:
    data_dir = kept_parent / ("x" * 60) / ("y" * 40)
    with LocalPostgres(data_dir) as server:
        assert query(server, "SELECT current_setting('unix_socket_directories')") == [("",)]


@root_only
def test_kept_data_dir_under_unreachable_parent_is_refused(tmp_path: Path) -> None:
    # tmp_path is 0700 root: the server user cannot reach it, and we do not chmod parents.
    mode_before = stat.S_IMODE(tmp_path.stat().st_mode)
    with pytest.raises(DbkitError, match="cannot reach"):
        LocalPostgres(tmp_path / "data").start()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == mode_before


# ---------------------------------------------------------------------------- root


@root_only
def test_server_runs_as_unprivileged_user_when_root(pg_server: LocalPostgres) -> None:
    uid = pwd.getpwnam(expected_server_user()).pw_uid
    [(data_directory,)] = query(pg_server, "SELECT current_setting('data_directory')")
    assert os.stat(data_directory).st_uid == uid
    status = Path(f"/proc/{pg_server.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert {int(u) for u in uids} == {uid}
    # Only our own mkdtemp was handed over: its parent (the system temp dir) is untouched.
    assert pg_server.run_dir.stat().st_uid == uid
    assert stat.S_IMODE(pg_server.run_dir.stat().st_mode) == 0o700
    assert pg_server.run_dir.parent.stat().st_uid == 0


@root_only
def test_run_as_other_user() -> None:
    with LocalPostgres(run_as="nobody") as server:
        assert server.run_dir.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert query(server, "SELECT 1") == [(1,)]


@root_only
def test_run_as_resolution_order(monkeypatch: pytest.MonkeyPatch, kept_parent: Path) -> None:
    monkeypatch.setenv("DBKIT_PG_RUN_AS", "nobody")
    assert LocalPostgres()._server_user().pw_name == "nobody"  # type: ignore[union-attr]
    assert LocalPostgres(run_as="postgres")._server_user().pw_name == "postgres"  # type: ignore[union-attr]
    # An existing cluster is run by its owner whatever the environment says.
    cluster = kept_parent / "owned"
    cluster.mkdir()
    (cluster / "PG_VERSION").write_text("15\n")
    os.chown(cluster, pwd.getpwnam("postgres").pw_uid, -1)
    assert LocalPostgres(cluster)._server_user().pw_name == "postgres"  # type: ignore[union-attr]
    monkeypatch.delenv("DBKIT_PG_RUN_AS")
    assert LocalPostgres()._server_user().pw_name == expected_server_user()  # type: ignore[union-attr]


@root_only
def test_run_as_unknown_user_fails() -> None:
    with pytest.raises(DbkitError, match="no such user"):
        LocalPostgres(run_as="no-such-user-dbkit").start()


def test_copy_in_hands_file_to_server_user(make_server: Any, tmp_path: Path) -> None:
    server = make_server(start=False)
    src = tmp_path / "server.key"
    src.write_text("not really a key\n")
    dest = server.copy_in(src)
    assert dest.parent == server.run_dir
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    expected_uid = pwd.getpwnam(expected_server_user()).pw_uid if IS_ROOT else os.geteuid()
    assert dest.stat().st_uid == expected_uid
    server.start()  # a prepared (initdb'd) cluster still starts
    assert server.is_running()


# ---------------------------------------------------------------------------- harness


def test_pytest_postgresql_gets_a_fresh_database(
    pg_server: LocalPostgres, postgresql: psycopg.Connection, db_url: str
) -> None:
    info = postgresql.info
    assert (info.host, info.port) == ("127.0.0.1", pg_server.port)
    assert info.port != 5432
    assert info.dbname not in ("postgres", "template1")
    assert db_url == pg_server.url_for(info.dbname)
    postgresql.execute("CREATE TABLE only_here (x int)")
    postgresql.commit()


def test_free_port_has_no_listener(free_port: int) -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", free_port))


# ---------------------------------------------------------------------------- binaries


def fake_bindir(path: Path, names: tuple[str, ...] = ("initdb", "pg_ctl", "postgres")) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        exe = path / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return path


@pytest.fixture
def no_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A world with no PostgreSQL anywhere; tests add fake ones back step by step."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.delenv("DBKIT_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(dbkit.local, "DEBIAN_PG_ROOT", tmp_path / "no-debian")
    monkeypatch.setattr(dbkit.local, "EXTRA_PG_GLOBS", ())
    return empty


def test_dbkit_pg_bin_empty_dir_raises_with_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBKIT_PG_BIN", str(tmp_path))
    with pytest.raises(PostgresBinariesNotFound) as info:
        find_bindir()
    message = str(info.value)
    for hint in (
        "DBKIT_PG_BIN",
        "sudo apt-get install postgresql",
        "/usr/lib/postgresql/",
        "brew install postgresql@16",
        "DATABASE_URL",
    ):
        assert hint in message
    assert isinstance(info.value, DbkitError)

    def no_mkdtemp(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("start() created a directory before finding binaries")

    monkeypatch.setattr(dbkit.local.tempfile, "mkdtemp", no_mkdtemp)
    with pytest.raises(PostgresBinariesNotFound):
        LocalPostgres().start()


def test_nothing_found_raises(no_binaries: Path) -> None:
    with pytest.raises(PostgresBinariesNotFound, match="apt-get install postgresql"):
        find_bindir()


def test_find_bindir_order(
    no_binaries: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Lowest priority first; each step adds a higher-priority source and checks it wins.
    on_path = fake_bindir(tmp_path / "on-path")
    monkeypatch.setenv("PATH", f"{no_binaries}:{on_path}")
    assert find_bindir() == on_path

    debian = tmp_path / "debian"
    for version in ("9.6", "10", "16", "17"):
        fake_bindir(debian / version / "bin")
    (debian / "17" / "bin" / "postgres").unlink()  # incomplete: does not count
    monkeypatch.setattr(dbkit.local, "DEBIAN_PG_ROOT", debian)
    assert find_bindir() == debian / "16" / "bin"  # newest complete, numeric sort

    from_pg_config = fake_bindir(tmp_path / "from-pg-config")
    pg_config = no_binaries / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {from_pg_config}\n")
    pg_config.chmod(0o755)
    assert find_bindir() == from_pg_config

    from_env = fake_bindir(tmp_path / "from-env")
    monkeypatch.setenv("DBKIT_PG_BIN", str(from_env))
    assert find_bindir() == from_env

    explicit = fake_bindir(tmp_path / "explicit")
    assert find_bindir(explicit) == explicit
    assert find_bindir(str(explicit)) == explicit


def test_explicit_invalid_bindir_does_not_fall_through(no_binaries: Path, tmp_path: Path) -> None:
    fake_bindir(tmp_path / "valid")
    partial = fake_bindir(tmp_path / "partial", names=("initdb", "pg_ctl"))
    with pytest.raises(PostgresBinariesNotFound, match="partial"):
        find_bindir(partial)


def test_path_symlinks_resolve_to_real_bindir(no_binaries: Path, tmp_path: Path) -> None:
    real = fake_bindir(tmp_path / "real" / "bin")
    (no_binaries / "initdb").symlink_to(real / "initdb")  # only initdb linked onto PATH
    assert find_bindir() == real


def test_non_executable_binaries_do_not_count(no_binaries: Path, tmp_path: Path) -> None:
    bindir = fake_bindir(tmp_path / "noexec")
    (bindir / "pg_ctl").chmod(0o644)  # no x bit at all: not executable, even for root
    with pytest.raises(PostgresBinariesNotFound):
        find_bindir(bindir)
