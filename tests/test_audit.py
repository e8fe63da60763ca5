"""Audit events: structured log records for settings loaded, connect, authentication failure
and the circuit breaker; never with a secret."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

import dbkit
from dbkit import ConnectError, Database

SECRET = "Audit-S3cret-pw"


@pytest.fixture
def audit() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []

    def sink(message: Any) -> None:
        record = message.record
        if "audit" in record["extra"]:
            records.append({"event": record["extra"]["audit"], "text": str(message)})

    handler = logger.add(sink, level="DEBUG", serialize=True)
    logger.enable("dbkit")
    yield records
    logger.remove(handler)
    logger.disable("dbkit")


def test_settings_loaded_is_audited_without_the_password(
    tmp_path: Path, audit: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PASSWORD", SECRET)
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text('[default.database.postgres]\nhost = "db.internal"\n')
    dbkit.load_settings(settings_files=[settings_file])
    [event] = [r for r in audit if r["event"] == "settings_loaded"]
    assert "db.internal" in event["text"] and SECRET not in event["text"]


def test_connect_and_authentication_failure_are_audited(
    make_server: Any, audit: list[dict[str, Any]]
) -> None:
    server = make_server(password="right-password")
    bad = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{server.port}/postgres"
    with pytest.raises(ConnectError):
        Database.from_url(bad).connect()
    good = server.url
    with Database.from_url(good):
        pass
    events = [r["event"] for r in audit]
    assert events == ["connect_failed", "connected"]
    assert "password authentication failed" in audit[0]["text"]
    assert all(SECRET not in r["text"] and "right-password" not in r["text"] for r in audit)


def test_breaker_open_and_close_are_audited(free_port: int, audit: list[dict[str, Any]]) -> None:
    db = Database.from_url(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres",
        breaker_failure_threshold=1,
        max_retries=0,
    )
    with pytest.raises(ConnectError):
        db.connect()  # its own retries are not counted by the breaker
    assert db.health().ok is False  # a failed checkout is: it opens the breaker
    db.breaker.record_success()
    assert [r["event"] for r in audit] == ["connect_failed", "breaker_opened", "breaker_closed"]
