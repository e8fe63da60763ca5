"""The `dbkit` command through its real entry point (a subprocess), as scripts use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest


def run_dbkit(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):  # type: ignore[no-untyped-def]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DBKIT_")}
    full_env.pop("DATABASE_URL", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dbkit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


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
