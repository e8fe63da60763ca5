"""Opt-in loguru configuration for applications using dbkit.

dbkit logs with ``from loguru import logger`` and stays silent (``logger.disable("dbkit")``
in ``dbkit/__init__``) until the application calls :func:`configure_logging`.  That call
installs one sink, redacts secrets from every record (message and ``extra``, whatever the
sink or format), and routes the standard-library loggers of SQLAlchemy, backoff and alembic
into loguru so that everything ends up in one place.

This module is named ``logging`` inside the package; absolute imports keep the standard
library's ``logging`` reachable.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

__all__ = [
    "InterceptHandler",
    "configure_from_settings",
    "configure_logging",
    "is_secret_name",
    "redact",
]

MASK: Final = "***"

# Standard-library loggers routed into loguru.
INTERCEPTED_LOGGERS: Final = ("sqlalchemy", "backoff", "alembic")

# Words that make a key (in "key=value" text or in record["extra"]) name a secret.
_SECRET_WORD = (
    r"(?:password|passwd|passphrase|pwd|secret|token|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key|credentials?|authorization)"
)
_SECRET_KEY_RE: Final = re.compile(_SECRET_WORD, re.IGNORECASE)

# key=value / key: value / "key": "value" / libpq conninfo password='x y'.  The key may be
# quoted (JSON, Python reprs); a quoted value keeps its quotes with the content masked.
_KV_RE: Final = re.compile(
    rf"""
    (?P<key>(?P<q>["']?)\b[\w.-]*?{_SECRET_WORD}[\w.-]*(?P=q))
    (?P<sep>\s*[:=]\s*)
    (?P<value>
        "(?:[^"\\]|\\.)*"
      | '(?:[^'\\]|\\.)*'
      | (?:bearer|basic)\s+[^\s,;'"]+
      | [^\s,;&'"}})\]]+
    )
    """,
    re.IGNORECASE | re.VERBOSE,
)

# scheme://user:password@host → scheme://user:***@host.  The password part runs to the
# *last* "@" before the path, so an unencoded "@" in a password is still covered.
_URL_RE: Final = re.compile(
    r"(?P<prefix>\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*):(?P<pw>[^\s/?#]*)@",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """Whether a key (``api_token``, ``db_password``, ``stripeApiKey`` …) names a secret,
    whose value must not be shown."""
    return _SECRET_KEY_RE.search(name) is not None


def _mask_kv(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """Mask passwords and other secrets in free text (log messages, URLs, conninfo strings)."""
    text = _URL_RE.sub(rf"\g<prefix>:{MASK}@", text)
    return _KV_RE.sub(_mask_kv, text)


def _redact_value(key: str, value: Any) -> Any:
    """Redacted copy of an ``extra`` value (never mutates the caller's objects)."""
    if isinstance(key, str) and _SECRET_KEY_RE.search(key) and value is not None:
        return MASK
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_redact_value("", v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    # Arbitrary objects are rendered with str() by sinks (and by JSON serialisation): mask
    # them only when that text would reveal a secret, otherwise keep the object itself.
    text = str(value)
    cleaned = redact(text)
    return cleaned if cleaned != text else value


def _redact_record(record: Record) -> None:
    """loguru patcher: runs on every record before any sink sees it."""
    record["message"] = redact(record["message"])
    extra = record["extra"]  # a fresh dict per record, safe to update in place
    for key, value in extra.items():
        extra[key] = _redact_value(key, value)


class InterceptHandler(logging.Handler):
    """Standard ``logging`` handler forwarding records to loguru (loguru's documented recipe)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Find the caller outside the logging module so loguru reports the real origin.
        frame: FrameType | None = inspect.currentframe()
        depth = 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.bind(logger_name=record.name).opt(depth=depth, exception=record.exc_info).log(
            level, record.getMessage()
        )


def _install_intercepts(level_no: int, sql: bool) -> None:
    for name in INTERCEPTED_LOGGERS:
        std = logging.getLogger(name)
        if not any(isinstance(h, InterceptHandler) for h in std.handlers):
            std.addHandler(InterceptHandler())
        # Records end in loguru; propagating them too would print them twice when the
        # application has its own root handlers.
        std.propagate = False
        if name == "sqlalchemy":
            # Pinned at WARNING: with a DEBUG root, sqlalchemy.engine would log result rows,
            # which hide_parameters does not hide.
            std.setLevel(logging.WARNING)
        else:
            std.setLevel(level_no)
    # Statements at INFO; dbkit engines use hide_parameters=True, so no values appear.
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO if sql else logging.NOTSET)


class _LogConfigLike(Protocol):
    @property
    def level(self) -> str: ...

    @property
    def json(self) -> bool: ...


def configure_logging(
    level: str | int | _LogConfigLike = "INFO",
    json: bool | None = None,
    *,
    sql: bool | None = None,
    sink: Any = sys.stderr,
) -> None:
    """Send dbkit's (and the application's) logs to one loguru sink, secrets redacted.

    ``level`` is a level name or number, or the settings' :class:`~dbkit.settings.LogConfig`
    (anything with ``level`` and ``json``, and optionally ``sql``, attributes)::

        dbkit.configure_logging(settings.log)
        dbkit.configure_logging("DEBUG", json=True)

    With a ``LogConfig``, its ``json`` and ``sql`` apply unless the ``json=``/``sql=``
    keywords are given, which win.  Otherwise both default to off.

    Replaces loguru's handlers (so calling it twice does not duplicate output), enables the
    ``dbkit`` loggers, and routes SQLAlchemy/backoff/alembic standard-library logs in.
    ``json=True`` writes one JSON object per line (loguru ``serialize``); ``sql=True`` logs
    SQL statements.  ``sink`` is anything ``logger.add`` accepts; a file path is created
    with mode 0600.
    """
    if not isinstance(level, (str, int)):
        config = level
        level = config.level
        json = bool(config.json) if json is None else json
        sql = bool(getattr(config, "sql", False)) if sql is None else sql
    if isinstance(level, str):
        level = level.upper()
    level_no = logger.level(level).no if isinstance(level, str) else level

    # A file sink gets a private file; other sinks know nothing of "opener".
    file_options: dict[str, Any] = (
        {"opener": _private_opener} if isinstance(sink, (str, os.PathLike)) else {}
    )
    logger.remove()  # every handler, ours from an earlier call included: no duplicates
    logger.configure(patcher=_redact_record)
    logger.add(
        sink,
        level=level,
        serialize=bool(json),
        # diagnose would print local variable values (credentials included) in tracebacks.
        diagnose=False,
        backtrace=False,
        **file_options,
    )
    logger.enable("dbkit")
    _install_intercepts(level_no, bool(sql))


def configure_from_settings(log_config: _LogConfigLike, *, sink: Any = sys.stderr) -> None:
    """``configure_logging(log_config, sink=sink)``, kept for existing callers."""
    configure_logging(log_config, sink=sink)


def _private_opener(path: str, flags: int) -> int:
    """Log files are created readable by their owner only."""
    return os.open(path, flags, 0o600)
