"""dbkit.logging: silent by default, one configured sink, secrets redacted, SQL routed in."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from loguru import logger

import dbkit.local  # importing dbkit disables the "dbkit" loggers
from dbkit.logging import (
    INTERCEPTED_LOGGERS,
    InterceptHandler,
    configure_from_settings,
    configure_logging,
    is_secret_name,
    redact,
)
from dbkit.settings import LogConfig

STD_LOGGERS = (*INTERCEPTED_LOGGERS, "sqlalchemy.engine")


@pytest.fixture(autouse=True)
def restore_logging_state() -> Iterator[None]:
    """configure_logging changes process-wide state (loguru handlers, patcher, activation and
    the std loggers of SQLAlchemy & co.); put all of it back so other tests are unaffected.

    loguru has no public API to snapshot itself, so this reaches into ``logger._core``.
    """
    core: Any = logger._core  # type: ignore[attr-defined]
    with core.lock:
        saved_core = {
            "handlers": dict(core.handlers),
            "patcher": core.patcher,
            "min_level": core.min_level,
            "enabled": dict(core.enabled),
            "activation_list": list(core.activation_list),
            "activation_none": core.activation_none,
        }
    saved_std = {
        name: (std.handlers[:], std.level, std.propagate)
        for name in STD_LOGGERS
        for std in [logging.getLogger(name)]
    }
    yield
    with core.lock:
        for key, value in saved_core.items():
            setattr(core, key, value)
    for name, (handlers, level, propagate) in saved_std.items():
        std = logging.getLogger(name)
        std.handlers[:] = handlers
        std.setLevel(level)
        std.propagate = propagate


def log_from_dbkit(message: str, level: str = "INFO", **extra: Any) -> None:
    """Log as a module inside the dbkit package would (loguru keys activation on __name__)."""
    code = "logger.bind(**extra).log(level, message)"
    exec(
        code,
        {
            "__name__": "dbkit.probe",
            "logger": logger,
            "extra": extra,
            "level": level,
            "message": message,
        },
    )


class Lines:
    """A loguru sink collecting formatted lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: Any) -> None:
        self.lines.append(str(message))

    @property
    def text(self) -> str:
        return "".join(self.lines)


# ---------------------------------------------------------------------------- activation


def test_dbkit_is_silent_until_configured() -> None:
    sink = Lines()
    logger.add(sink, level="TRACE", format="{name}: {message}")
    log_from_dbkit("dbkit speaks", level="WARNING")
    assert sink.lines == []
    logger.info("the application speaks")  # only dbkit is disabled, not the app
    assert "the application speaks" in sink.text

    configure_logging(level="DEBUG", sink=sink)
    log_from_dbkit("dbkit speaks now")
    assert "dbkit speaks now" in sink.text


def test_real_dbkit_module_logs_after_configure() -> None:
    sink = io.StringIO()
    logger.add(sink, level="TRACE")
    dbkit.local.find_bindir()  # logs at DEBUG where it found the binaries
    assert sink.getvalue() == ""
    configure_logging(level="DEBUG", sink=sink, json=True)
    dbkit.local.find_bindir()
    records = [json.loads(line)["record"] for line in sink.getvalue().splitlines()]
    assert [(r["name"], r["level"]["name"]) for r in records] == [("dbkit.local", "DEBUG")]
    assert "PostgreSQL binaries in" in records[0]["message"]


def test_level_filters_and_reconfigure_does_not_duplicate() -> None:
    sink = Lines()
    configure_logging(level="WARNING", sink=sink)
    configure_logging(level="warning", sink=sink)  # second call replaces, case-insensitive
    log_from_dbkit("too quiet", level="INFO")
    log_from_dbkit("loud enough", level="ERROR")
    assert "too quiet" not in sink.text
    assert sink.text.count("loud enough") == 1
    for name in INTERCEPTED_LOGGERS:
        handlers = logging.getLogger(name).handlers
        assert sum(isinstance(h, InterceptHandler) for h in handlers) == 1


def test_configure_replaces_existing_handlers() -> None:
    before = Lines()
    logger.add(before)
    after = Lines()
    configure_logging(sink=after)
    logger.info("only once")
    assert before.lines == []
    assert "only once" in after.text


def test_json_mode_produces_parseable_records() -> None:
    sink = io.StringIO()
    configure_logging(json=True, sink=sink)
    log_from_dbkit("structured", job="nightly", rows=3)
    [line] = sink.getvalue().splitlines()
    payload = json.loads(line)
    record = payload["record"]
    assert record["message"] == "structured"
    assert record["level"]["name"] == "INFO"
    assert record["extra"] == {"job": "nightly", "rows": 3}
    assert record["name"] == "dbkit.probe"


def test_configure_from_settings_duck_types() -> None:
    class LogConfig:  # stands in for dbkit.settings.LogConfig
        level = "ERROR"
        json = True

    sink = io.StringIO()
    configure_from_settings(LogConfig(), sink=sink)
    log_from_dbkit("dropped", level="INFO")
    log_from_dbkit("kept", level="ERROR")
    [line] = sink.getvalue().splitlines()
    assert json.loads(line)["record"]["message"] == "kept"
    assert logging.getLogger("sqlalchemy.engine").level == logging.NOTSET  # no sql attribute


def test_configure_logging_takes_the_settings_log_config() -> None:
    sink = io.StringIO()
    configure_logging(LogConfig(level="warning", json=True, sql=True), sink=sink)
    log_from_dbkit("dropped", level="INFO")
    log_from_dbkit("kept", level="WARNING")
    [line] = sink.getvalue().splitlines()
    assert json.loads(line)["record"]["message"] == "kept"  # level and json from the config
    assert logging.getLogger("sqlalchemy.engine").level == logging.INFO  # and sql


def test_keywords_win_over_the_log_config() -> None:
    sink = io.StringIO()
    configure_logging(
        LogConfig(level="INFO", json=True, sql=True), json=False, sql=False, sink=sink
    )
    log_from_dbkit("plain text")
    assert "plain text" in sink.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(sink.getvalue().splitlines()[0])
    assert logging.getLogger("sqlalchemy.engine").level == logging.NOTSET


def test_keyword_form_defaults_json_and_sql_off() -> None:
    sink = io.StringIO()
    configure_logging("INFO", sink=sink)
    log_from_dbkit("plain")
    assert sink.getvalue().rstrip().endswith("plain")
    assert logging.getLogger("sqlalchemy.engine").level == logging.NOTSET


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("api_token", True),
        ("stripeApiKey", True),
        ("client_secret", True),
        ("chunk_size", False),
        ("host", False),
        ("keyspace", False),
    ],
)
def test_is_secret_name(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_file_sink_is_private(tmp_path: Any) -> None:
    path = tmp_path / "app.log"
    configure_logging(sink=str(path))
    log_from_dbkit("to a file")
    logger.complete()
    assert "to a file" in path.read_text()
    assert path.stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("login failed, password=hunter2 user=bob", "hunter2"),
        ("password: hunter2", "hunter2"),
        ('{"user": "bob", "password": "hunter2"}', "hunter2"),
        ("{'db_password': 'hunter2'}", "hunter2"),
        ("connect postgresql+psycopg://bob:hunter2@db.internal:5432/app", "hunter2"),
        ("url=postgresql://bob:p@ss:w0rd@db/app", "p@ss:w0rd"),
        ("host=db port=5432 user=bob password=hunter2 dbname=app", "hunter2"),
        ("host=db user=bob password='hunt er2' dbname=app", "hunt er2"),
        ("PGPASSWORD=hunter2 psql", "hunter2"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        ("api_key=AKIA123&region=eu", "AKIA123"),
    ],
)
def test_redact(text: str, secret: str) -> None:
    cleaned = redact(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_redact_keeps_the_rest() -> None:
    assert (
        redact("postgresql+psycopg://bob:hunter2@db.internal:5432/app")
        == "postgresql+psycopg://bob:***@db.internal:5432/app"
    )
    assert redact("host=db password='x y' dbname=app") == "host=db password='***' dbname=app"
    assert redact('{"password": "a\\"b", "user": "bob"}') == '{"password": "***", "user": "bob"}'
    harmless = 'password authentication failed for user "bob"; 3 rows; http://example.com/x'
    assert redact(harmless) == harmless
    assert redact("postgresql://bob@db/app") == "postgresql://bob@db/app"  # no password


@pytest.mark.parametrize("json_mode", [False, True])
def test_records_are_redacted_in_every_sink(json_mode: bool) -> None:
    sink = io.StringIO()
    configure_logging(json=json_mode, sink=sink)
    settings = {"host": "db", "password": "in-a-dict"}
    log_from_dbkit(
        "connecting to postgresql://bob:in-the-url@db/app with password=in-the-message",
        password="in-extra",
        api_token="token-in-extra",
        dsn="host=db password=in-a-dsn",
        settings=settings,
        user="bob",
    )
    output = sink.getvalue()
    for secret in (
        "in-the-url",
        "in-the-message",
        "in-extra",
        "token-in-extra",
        "in-a-dsn",
        "in-a-dict",
    ):
        assert secret not in output
    assert settings["password"] == "in-a-dict"  # the caller's object is not mutated
    if json_mode:
        extra = json.loads(output)["record"]["extra"]
        assert extra["password"] == "***"
        assert extra["api_token"] == "***"
        assert extra["user"] == "bob"
        assert extra["settings"] == {"host": "db", "password": "***"}


def test_application_logs_are_redacted_too() -> None:
    sink = Lines()
    configure_logging(sink=sink)
    logger.info("app connects with {}", "postgresql://app:s3cr3t@db/app")
    assert "s3cr3t" not in sink.text and "app:***@db" in sink.text


# ---------------------------------------------------------------------------- std logging


def test_sqlalchemy_statements_routed_in_without_values(db_url: str) -> None:
    sink = Lines()
    configure_logging(level="DEBUG", sink=sink, sql=True)
    engine = sa.create_engine(db_url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(
                sa.text("SELECT :marker AS probe"), {"marker": "v4lue-s3cret"}
            ).scalar()
    finally:
        engine.dispose()
    assert "SELECT %(marker)s AS probe" in sink.text
    assert "v4lue-s3cret" not in sink.text
    assert "sqlalchemy" in sink.text  # the record keeps SQLAlchemy as its origin


def test_sql_off_keeps_statements_out(db_url: str) -> None:
    sink = Lines()
    configure_logging(level="DEBUG", sink=sink, sql=True)
    configure_logging(level="DEBUG", sink=sink)  # sql switched off again
    engine = sa.create_engine(db_url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1 AS quiet_probe"))
    finally:
        engine.dispose()
    assert "quiet_probe" not in sink.text


def test_std_warnings_from_intercepted_loggers_arrive() -> None:
    sink = Lines()
    configure_logging(sink=sink)
    logging.getLogger("backoff").info("Backing off connect(...) for 0.5s (password=hunter2)")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade -> 0001")
    logging.getLogger("sqlalchemy.pool").warning("pool warning")
    logging.getLogger("sqlalchemy.pool").info("pool chatter")  # sqlalchemy is pinned at WARNING
    assert "Backing off" in sink.text and "hunter2" not in sink.text
    assert "Running upgrade" in sink.text
    assert "pool warning" in sink.text
    assert "pool chatter" not in sink.text


def test_intercepted_loggers_do_not_propagate_to_the_app_root(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_logging(sink=Lines())
    with caplog.at_level(logging.INFO):
        logging.getLogger("alembic").warning("only in loguru")
    assert "only in loguru" not in caplog.text
    # The application's own std logging is left alone (no root-wide takeover).
    assert not any(isinstance(h, InterceptHandler) for h in logging.getLogger().handlers)
