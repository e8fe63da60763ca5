"""The `dbkit` command through its real entry point (a subprocess), as scripts use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cli_helpers import one_line, run_dbkit


def test_check_prints_health_version_and_pool_stats(db_url: str) -> None:
    result = run_dbkit("check", "--url", db_url)
    assert result.returncode == 0, result.stderr
    assert "health          ok" in result.stdout
    assert "server version" in result.stdout
    assert "max_open_connections" in result.stdout and "wait_count" in result.stdout


def test_check_json_against_the_local_launcher() -> None:
    result = run_dbkit("check", "--local", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["health"]["ok"] is True
    assert report["pool"]["open_connections"] >= 1
    assert report["server_version"]


def test_check_against_a_dead_port_fails_with_one_line(free_port: int) -> None:
    url = f"postgresql+psycopg://postgres:pw-never-shown@127.0.0.1:{free_port}/postgres"
    result = run_dbkit(
        "check",
        "--url",
        url,
        env={"DBKIT_DATABASE__POSTGRES__MAX_RETRIES": "1"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbkit check: cannot connect")
    assert "pw-never-shown" not in result.stderr + result.stdout


@pytest.mark.parametrize("value", ["0", "70000", "abc"])
def test_check_with_bad_settings_exits_2(tmp_path: Path, value: str) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text(f"[default.database.postgres]\nport = {value!r}\n")
    result = run_dbkit("--settings", str(settings), "check")
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_without_binaries_says_how_to_install(tmp_path: Path) -> None:
    result = run_dbkit("check", "--local", env={"DBKIT_PG_BIN": str(tmp_path)})
    assert result.returncode == 1
    assert "apt-get install postgresql" in result.stderr


def test_check_warns_about_superuser_and_weak_sslmode_in_production(
    db_url: str, tmp_path: Path
) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text('[production.database.postgres]\nsslmode = "prefer"\n')
    result = run_dbkit(
        "--env", "production", "--settings", str(settings), "check", "--url", db_url, "--json"
    )
    assert result.returncode == 0, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert any("superuser 'postgres'" in w for w in warnings)
    assert any("sslmode is 'prefer' in production" in w for w in warnings)


def test_check_does_not_warn_about_sslmode_outside_production(make_server: Any) -> None:
    server = make_server()
    with psycopg.connect(server.url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute("CREATE ROLE app LOGIN")
    url = f"postgresql+psycopg://app@127.0.0.1:{server.port}/postgres"
    result = run_dbkit("check", "--url", url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == []


# ------------------------------------------------------------ check --instances (budget)


def server_slots(db_url: str) -> tuple[int, int]:
    """(max_connections, the slots left to applications) of the test server, read from it."""
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int, "
            "current_setting('superuser_reserved_connections')::int, "
            "coalesce(current_setting('reserved_connections', true)::int, 0)"
        ).fetchone()
    assert row is not None
    return row[0], row[0] - row[1] - row[2]


def pool_env(max_open: int) -> dict[str, str]:
    return {
        "DBKIT_DATABASE__POSTGRES__MAX_OPEN_CONNS": str(max_open),
        "DBKIT_DATABASE__POSTGRES__MAX_IDLE_CONNS": str(min(max_open, 1)),
    }


def test_check_instances_that_fit_the_server(db_url: str) -> None:
    max_connections, available = server_slots(db_url)
    assert available < max_connections  # the reserved slots are taken off
    result = run_dbkit("check", "--url", db_url, "--instances", "3", env=pool_env(10))
    assert result.returncode == 0, result.stderr
    assert "connections     3 instances x 10 (max_open_conns: primary 10) = 30" in result.stdout
    assert f"server slots    max_connections {max_connections} - " in result.stdout
    assert f"= {available}" in result.stdout
    assert f"budget          ok: 30 of {available} slots, {available - 30} to spare" in (
        result.stdout
    )
    # Without --instances, no budget.
    plain_check = run_dbkit("check", "--url", db_url, env=pool_env(10))
    assert plain_check.returncode == 0 and "budget" not in plain_check.stdout


def test_check_instances_that_would_exhaust_the_server(db_url: str) -> None:
    _, available = server_slots(db_url)
    # One slot each: exactly the server's slots fit, one more instance does not.
    exact = run_dbkit("check", "--url", db_url, "--instances", str(available), env=pool_env(1))
    assert exact.returncode == 0, exact.stderr
    assert f"ok: {available} of {available} slots, 0 to spare" in exact.stdout

    over = run_dbkit("check", "--url", db_url, "--instances", str(available + 1), env=pool_env(1))
    assert over.returncode == 1
    assert f"EXCEEDED: {available + 1} > {available} slots, 1 short" in over.stdout
    reason = one_line(over.stderr)
    assert reason.startswith(f"dbkit check: {available + 1} instances x 1 ")
    assert f"would exhaust the server's {available} slots" in reason
    assert f"run at most {available} instance(s)" in reason

    per = available // 4 + 1  # 4 instances of it are just too many
    many = run_dbkit("check", "--url", db_url, "--instances", "4", "--json", env=pool_env(per))
    assert many.returncode == 1
    report = json.loads(many.stdout)["connections"]
    assert report == {
        "instances": 4,
        "pools": {"primary": per},
        "per_instance": per,
        "needed": 4 * per,
        "max_connections": server_slots(db_url)[0],
        "superuser_reserved_connections": report["superuser_reserved_connections"],
        "reserved_connections": report["reserved_connections"],
        "available": available,
        "fits": False,
    }
    assert f"set max_open_conns to at most {available // 4} for 4" in one_line(many.stderr)


def test_check_instances_with_unlimited_pools_fails(db_url: str) -> None:
    env = {"DBKIT_DATABASE__POSTGRES__MAX_OPEN_CONNS": "0"}
    result = run_dbkit("check", "--url", db_url, "--instances", "2", env=env)
    assert result.returncode == 1
    assert "2 instances x unlimited" in result.stdout
    assert "max_open_conns = 0 (unlimited)" in one_line(result.stderr)


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_check_instances_must_be_a_positive_count(value: str) -> None:
    result = run_dbkit("check", "--instances", value)
    assert result.returncode == 2
    assert "--instances" in result.stderr


# ------------------------------------------------------------------------------ config


def test_config_shows_values_sources_and_masks_the_password(tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text('[development.database.postgres]\nhost = "db.internal"\n')
    env = {
        "DBKIT_DATABASE__POSTGRES__PASSWORD": "pw-never-shown",
        "DBKIT_DATABASE__POSTGRES__PORT": "6543",
    }
    # From a directory without config/: the --settings file is the only one found.
    result = run_dbkit("--settings", str(settings), "config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["environment"] == ["environment", "development"]
    assert rows["database.postgres.host"][1:] == [
        "db.internal",
        f"file:{settings}",
        "[development]",
    ]
    assert rows["database.postgres.port"][1:] == ["6543", "env:DBKIT_DATABASE__POSTGRES__PORT"]
    assert rows["database.postgres.password"][1:] == [
        "***",
        "env:DBKIT_DATABASE__POSTGRES__PASSWORD",
    ]
    assert rows["database.postgres.max_open_conns"][1:] == ["25", "default"]
    assert "pw-never-shown" not in result.stdout + result.stderr


def test_settings_option_adds_to_the_default_files(tmp_path: Path) -> None:
    """``--settings FILE`` is loaded after config/settings.toml and config/.secrets.toml:
    its values win, the others stay."""
    (tmp_path / "config").mkdir()
    project = tmp_path / "config" / "settings.toml"
    project.write_text(
        '[default.database.postgres]\nhost = "db.internal"\nport = 6000\nname = "orders"\n'
    )
    extra = tmp_path / "extra.toml"
    extra.write_text('[default.database.postgres]\nhost = "replica.internal"\n')
    last = tmp_path / "last.toml"
    last.write_text('[default.database.postgres]\nhost = "last.internal"\n')

    def config(*files: Path) -> dict[str, Any]:
        options = [arg for file in files for arg in ("--settings", str(file))]
        result = run_dbkit(*options, "config", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        settings: dict[str, Any] = json.loads(result.stdout)["settings"]
        return settings

    alone = config()
    assert alone["database.postgres.host"]["value"] == "db.internal"
    added = config(extra)
    assert added["database.postgres.host"] == {
        "value": "replica.internal",
        "source": f"file:{extra} [default]",
    }
    assert added["database.postgres.port"]["value"] == "6000"  # from config/settings.toml
    assert added["database.postgres.name"]["value"] == "orders"
    assert config(extra, last)["database.postgres.host"]["value"] == "last.internal"
    text = run_dbkit("--settings", str(extra), "config", cwd=tmp_path).stdout
    files = [line.split()[1] for line in text.splitlines() if line.startswith("file ")]
    assert files[0] == "config/settings.toml" or files[0].endswith("/config/settings.toml")
    assert files[-1] == str(extra)
    assert "loaded after the default ones" in " ".join(run_dbkit("--help").stdout.split())


def test_config_json_with_database_url(tmp_path: Path) -> None:
    url = "postgresql://app:pw-never-shown@db.example.com:6000/orders"
    result = run_dbkit("config", "--json", env={"DATABASE_URL": url}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    settings = report["settings"]
    assert settings["database.postgres.host"] == {
        "value": "db.example.com",
        "source": "env:DATABASE_URL",
    }
    assert settings["database.postgres.password"]["value"] == "***"
    assert settings["log.level"] == {"value": "INFO", "source": "default"}  # no config dir
    assert "pw-never-shown" not in result.stdout


def test_config_with_bad_settings_exits_2() -> None:
    result = run_dbkit("config", env={"DBKIT_DATABASE__POSTGRES__MAX_OPEN_CONNS": "-3"})
    assert result.returncode == 2
    assert "max_open_conns" in one_line(result.stderr)


# ------------------------------------------------------------------------------- local


def test_local_start_status_url_stop(kept_parent: Path) -> None:
    data = kept_parent / "pg"
    env = {"DBKIT_LOCAL_DIR": str(data)}  # the default data dir, as users set it
    started = run_dbkit("local", "start", env=env)
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    assert run_dbkit("local", "url", "--data-dir", str(data)).stdout.strip() == url
    status = run_dbkit("local", "status", env=env)
    assert status.returncode == 0 and status.stdout.startswith(f"running at {url} (pid ")
    again = run_dbkit("local", "start", env=env)
    assert again.returncode == 0 and again.stdout.strip() == f"already running: {url}"

    stopped = run_dbkit("local", "stop", env=env)
    assert stopped.returncode == 0 and stopped.stdout.startswith("stopped (data kept in")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3)
    status = run_dbkit("local", "status", env=env)
    assert status.returncode == 3 and "not running" in one_line(status.stderr)
    no_url = run_dbkit("local", "url", env=env)
    assert no_url.returncode == 1 and "dbkit local start" in one_line(no_url.stderr)
    assert run_dbkit("local", "stop", env=env).stdout.startswith("not running")

    restarted = run_dbkit("local", "start", env=env)  # same data, same port: same URL
    assert restarted.returncode == 0 and restarted.stdout.strip() == url
    assert run_dbkit("local", "stop", env=env).returncode == 0


def test_local_destroy(kept_parent: Path) -> None:
    data = kept_parent / "pg"
    env = {"DBKIT_LOCAL_DIR": str(data)}
    started = run_dbkit("local", "start", env=env)
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    # Without a terminal to ask in, it wants --yes and deletes nothing.
    unconfirmed = run_dbkit("local", "destroy", env=env)
    assert unconfirmed.returncode == 2 and "--yes" in one_line(unconfirmed.stderr)
    assert (data / "PG_VERSION").exists()
    destroyed = run_dbkit("local", "destroy", "--yes", env=env)
    assert destroyed.returncode == 0, destroyed.stderr
    assert destroyed.stdout == f"deleted {data}\n" and not data.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3)
    again = run_dbkit("local", "destroy", "--yes", env=env)
    assert again.returncode == 0 and again.stdout.startswith("nothing to delete")
    # Not a cluster: refused, left alone.
    other = kept_parent / "documents"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run_dbkit("local", "destroy", "--yes", "--data-dir", str(other))
    assert refused.returncode == 1
    assert "not a PostgreSQL data directory" in one_line(refused.stderr)
    assert (other / "keep.txt").exists()


def test_local_start_keeps_a_durable_cluster(kept_parent: Path) -> None:
    data = kept_parent / "pg"
    started = run_dbkit("local", "start", "--data-dir", str(data))
    assert started.returncode == 0, started.stderr
    try:
        with psycopg.connect(started.stdout.strip().replace("+psycopg", "")) as conn:
            row = conn.execute(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
                " current_setting('full_page_writes')"
            ).fetchone()
        assert row == ("on", "on", "on")
    finally:
        run_dbkit("local", "stop", "--data-dir", str(data))


def test_local_start_without_binaries_says_how_to_install(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    result = run_dbkit(
        "local", "start", "--data-dir", str(data), env={"DBKIT_PG_BIN": str(tmp_path)}
    )
    assert result.returncode == 1
    assert "apt-get install postgresql" in one_line(result.stderr)
    assert not data.exists()  # nothing made before the binaries were found


def test_migrate_against_a_server_that_is_down(free_port: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres"
    env = {"DBKIT_DATABASE__POSTGRES__MAX_RETRIES": "0"}
    result = run_dbkit("migrate", "current", "--url", url, env=env)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("dbkit migrate: ")


def test_failures_are_one_line_and_debug_adds_the_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    # An operating-system error: its message and the path, no traceback.
    result = run_dbkit("init", str(blocker / "project"))
    assert result.returncode == 1
    assert one_line(result.stderr) == f"dbkit init: Not a directory: {blocker / 'project'}"
    debug = run_dbkit("--debug", "init", str(blocker / "project"))
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "NotADirectoryError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == one_line(result.stderr)
    # Settings errors: exit 2, one line, and the traceback only with --debug.
    bad = {"DBKIT_DATABASE__POSTGRES__PORT": "0"}
    assert run_dbkit("check", env=bad).returncode == 2
    debug_bad = run_dbkit("--debug", "check", env=bad)
    assert debug_bad.returncode == 2 and "ConfigError" in debug_bad.stderr
    assert debug_bad.stderr.strip().splitlines()[-1].startswith("dbkit check: invalid settings")


def test_every_command_has_help() -> None:
    for command in (
        [],
        ["check"],
        ["config"],
        ["migrate"],
        ["migrate", "upgrade"],
        ["migrate", "revision"],
        ["migrate", "stamp"],
        ["local"],
        ["local", "start"],
        ["local", "destroy"],
        ["init"],
        ["demo"],
    ):
        result = run_dbkit(*command, "--help")
        assert result.returncode == 0 and result.stdout.startswith("usage: dbkit"), command
