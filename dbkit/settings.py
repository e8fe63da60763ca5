"""Typed, frozen settings: TOML or YAML files (through dynaconf) + environment variables →
dataclasses.

Files, in the order they are loaded (a later file wins, key by key):

1. the config directory's ``settings.toml`` and ``.secrets.toml``, or ``.yaml`` / ``.yml``
   (same sections, keys and rules).  The config directory is ``$DBKIT_CONFIG_DIR`` when
   set, else the nearest ``config/`` directory holding one of those files, searched from
   the working directory upward as git finds ``.git``; else there is none.  One file in two
   formats there (``settings.toml`` and ``settings.yaml``) is refused rather than merged.
2. the files given to :func:`load_settings` (``--settings FILE``), in their order: they add
   to the directory's files and win over them.
3. the ``<name>.local.<ext>`` beside each file above, in the same order (dynaconf's rule).

Precedence, lowest first: dataclass defaults < ``[default]`` of each file < ``[<env>]`` of
each file < ``DBKIT_*`` environment variables < ``DBKIT_DATABASE__URL`` / ``DATABASE_URL``
(connection fields only) < the ``url`` argument.  Environment sections merge into the
defaults key by key.  Outside ``development`` and ``testing``, no settings file, no URL and
no connection variable is an error, never a silent ``localhost``.

``[app]`` (``[default.app]``, ``[production.app]`` …) holds the application's own values,
exposed read-only as :attr:`Settings.app`; any other unknown key is an error.

dynaconf reads and merges the files.  Environment variables are read here instead, as raw
text that each field parses for itself: dynaconf would TOML-parse them, so a password
``0x1F`` would arrive as the int 31 and ``@int hunter2`` would abort loading with the secret
in the error message.  Every problem found (unknown keys, bad values, inconsistent pool
sizes) is collected into one :class:`~dbkit.errors.ConfigError`, and no message ever
contains the password.
"""

import copy
import difflib
import glob
import importlib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self, TypeVar
from urllib.parse import quote

from loguru import logger
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dbkit.durations import format_duration, parse_duration
from dbkit.errors import ConfigError
from dbkit.logging import is_secret_name

__all__ = [
    "DEFAULT_ENV",
    "KNOWN_ENVS",
    "LOG_LEVELS",
    "SSLMODES",
    "DatabaseConfig",
    "LogConfig",
    "PostgresConfig",
    "Settings",
    "default_settings_files",
    "describe_settings",
    "find_config_dir",
    "format_duration",
    "load_settings",
    "parse_duration",
]

ENV_PREFIX = "DBKIT_"
ENV_SWITCHER = "DBKIT_ENV"
CONFIG_DIR_VAR = "DBKIT_CONFIG_DIR"
DEFAULT_ENV = "development"
KNOWN_ENVS = ("development", "testing", "production")
# Where dbkit's defaults (postgres@localhost:5432/postgres) may stand in for a configuration.
DEFAULTS_ALLOWED_ENVS = ("development", "testing")
SETTINGS_STEMS = ("settings", ".secrets")
SETTINGS_SUFFIXES = (".toml", ".yaml", ".yml")
_YAML_SUFFIXES = (".yaml", ".yml")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
RESETS = ("rollback", "discard")
SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
READ_FROM = ("primary", "replica", "prefer-replica")

_DB = "database"
_PG = "database.postgres"
_LOG = "log"
_APP = "app"
# The fields that choose the server and the database.
_CONNECTION_FIELDS = ("host", "port", "name", "username")
# The sections of each file dynaconf applies, in order: [default], [dbkit] (its legacy
# name for the defaults: the env-var prefix), the current environment (None here), and
# [global], which overrides everything.  None of the special ones is an environment name.
_LAYER_SECTIONS = ("default", "dbkit", None, "global")
_SPECIAL_SECTIONS = frozenset(section for section in _LAYER_SECTIONS if section)


# ------------------------------------------------------------------ field coercion
# Values arrive as TOML types from files, as raw text from the environment, or as whatever
# a caller passed to the constructor.  Each field type has one coercer; a failure is a
# ValueError whose text is safe to show (the string coercers never echo the value, so a
# password cannot leak through them).

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _kind(value: object) -> str:
    """A value's type as a settings file would name it (YAML's empty value is null)."""
    return "null" if value is None else type(value).__name__


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got the boolean {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not an integer")
    raise ValueError(f"expected an integer, got {_kind(value)} {value!r}")


def _to_port(value: object) -> int | str:
    """A port (``5432``) or, for several hosts, a comma-separated list (``"5432,5433"``)."""
    if isinstance(value, str) and "," in value:
        ports = [part.strip() for part in value.split(",")]
        return ",".join(str(_to_int(port)) for port in ports)
    return _to_int(value)


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    # Deliberately without the value: this coercer also handles the password.
    raise ValueError(f"expected a string, got {_kind(value)} (quote it)")


def _to_optional_str(value: object) -> str | None:
    if value is None or value == "":
        return None  # TOML has no null: an empty string (or an empty env var) means unset
    return _to_str(value)


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


# Keyed by the annotation objects of the dataclass fields below (this module does not use
# ``from __future__ import annotations``, so ``Field.type`` is the real type).
_COERCERS: dict[object, Callable[[object], object]] = {
    int: _to_int,
    int | str: _to_port,
    float: parse_duration,  # every float setting is a duration in seconds
    str: _to_str,
    str | None: _to_optional_str,
    bool: _to_bool,
}


def _coerce_fields(obj: Any, section: str) -> tuple[list[str], set[str]]:
    """Coerce every field of a frozen dataclass in place; (problems, names that failed)."""
    problems: list[str] = []
    failed: set[str] = set()
    for f in fields(obj):
        try:
            object.__setattr__(obj, f.name, _COERCERS[f.type](getattr(obj, f.name)))
        except ValueError as exc:
            problems.append(f"{section}.{f.name}: {exc}")
            failed.add(f.name)
    return problems, failed


def _unknown_names(names: Iterable[str], known: Sequence[str], section: str) -> list[str]:
    return [f"{section}.{name}: unknown setting{_did_you_mean(name, known)}" for name in names]


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """How to reach PostgreSQL and how to pool connections; field names follow the Go config.

    Construction coerces (``port="5432"``, ``timeout="5s"``) and validates; every problem
    is reported at once in a ``ConfigError``.  The password is left out of ``repr``.
    """

    host: str = "localhost"  # or several, "a,b" (libpq multi-host: failover)
    port: int | str = 5432  # or one per host, "5432,5433"
    name: str = "postgres"
    username: str = "postgres"
    password: str = field(default="", repr=False)
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    max_open_conns: int = 25  # 0 = unlimited
    max_idle_conns: int = 5  # <= max_open_conns; 0 = keep none idle
    conn_max_lifetime: float = 3600.0  # 0 = never recycle
    conn_max_idle_time: float = 300.0  # 0 = never close for idleness
    timeout: float = 5.0  # connect + pool checkout wait
    max_retries: int = 5  # connect retries after the first attempt
    retry_delay: float = 0.5  # base of the exponential backoff
    health_check_interval: float = 30.0  # 0 = no background probe
    statement_timeout: float = 0.0  # 0 = server default
    idle_in_transaction_session_timeout: float = 0.0  # 0 = server default
    application_name: str = "dbkit"
    ping_after_idle: float = 1.0  # ping at checkout only after this much idleness
    breaker_failure_threshold: int = 5  # consecutive connect failures that open it; 0 = off
    breaker_recovery_timeout: float = 30.0  # longest wait before a probe (starts at 1s, doubles)
    leak_detection_threshold: float = 0.0  # warn about connections held longer; 0 = off
    fast_paths: bool = True  # false: SQLAlchemy's and psycopg's public API only (dbkit.fastpath)
    resolve_commit_outcome: bool = True  # a COMMIT lost in flight is resolved by pg_xact_status
    reset_on_return: str = "rollback"  # "rollback" | "discard" (DISCARD ALL on return)
    target_session_attrs: str | None = None  # libpq's: "read-write" finds the primary
    pgbouncer: bool = False  # behind PgBouncer in transaction pooling mode

    def __post_init__(self) -> None:
        problems, failed = _coerce_fields(self, _PG)
        problems += self._check(failed)
        if problems:
            raise ConfigError(_in_field_order(problems, _PG_ORDER))

    def _check(self, failed: set[str]) -> list[str]:
        """Range and consistency checks on the fields that coerced cleanly."""
        problems: list[str] = []

        def ok(*names: str) -> bool:
            return not failed.intersection(names)

        for name in ("host", "name", "username"):
            if ok(name) and not getattr(self, name).strip():
                problems.append(f"{_PG}.{name}: must not be empty")
        for f in fields(self):
            value = getattr(self, f.name)
            if ok(f.name) and isinstance(value, str) and "\x00" in value:
                # libpq reads its connection string as a C string: everything after a NUL
                # would be dropped silently (host, port, sslmode…), connecting elsewhere.
                problems.append(f"{_PG}.{f.name}: must not contain a NUL character")
        if ok("reset_on_return"):
            reset = self.reset_on_return.strip().lower()
            if reset in RESETS:
                object.__setattr__(self, "reset_on_return", reset)
            else:
                problems.append(
                    f"{_PG}.reset_on_return: {self.reset_on_return!r} is not one of "
                    f"{', '.join(RESETS)}"
                )
        if ok("port"):
            for port in self.ports():
                if not 1 <= port <= 65535:
                    problems.append(f"{_PG}.port: {port} is not between 1 and 65535")
        if ok("host", "port"):
            hosts, ports = self.host.split(","), self.ports()
            if len(ports) > 1 and len(ports) != len(hosts):
                problems.append(
                    f"{_PG}.port: {len(ports)} ports for {len(hosts)} hosts (give one port "
                    "for all, or one per host)"
                )
            if len(hosts) > 1 and any(not h.strip() for h in hosts):
                problems.append(f"{_PG}.host: an empty name in the list {self.host!r}")
        if ok("target_session_attrs") and self.target_session_attrs is not None:
            attrs = self.target_session_attrs.strip().lower()
            if attrs in SESSION_ATTRS:
                object.__setattr__(self, "target_session_attrs", attrs)
            else:
                problems.append(
                    f"{_PG}.target_session_attrs: {self.target_session_attrs!r} is not one of "
                    f"{', '.join(SESSION_ATTRS)}"
                )
        for name in ("statement_timeout", "idle_in_transaction_session_timeout"):
            if ok("pgbouncer", name) and self.pgbouncer and getattr(self, name) > 0:
                problems.append(
                    f"{_PG}.{name}: PgBouncer does not pass it to the server (dbkit sends it "
                    "in the startup packet); set it for the role (ALTER ROLE … SET "
                    f"{name} = …) or per transaction (timeout=, settings=)"
                )
        if (
            ok("pgbouncer", "reset_on_return")
            and self.pgbouncer
            and self.reset_on_return == "discard"
        ):
            problems.append(
                f"{_PG}.reset_on_return: 'discard' cannot work behind PgBouncer in "
                "transaction mode (the next transaction may run on another server "
                "connection); use 'rollback'"
            )
        if ok("sslmode"):
            mode = self.sslmode.strip().lower()
            if mode in SSLMODES:
                object.__setattr__(self, "sslmode", mode)
            else:
                problems.append(
                    f"{_PG}.sslmode: {self.sslmode!r} is not one of {', '.join(SSLMODES)}"
                )
        for name in (
            "max_open_conns",
            "max_idle_conns",
            "max_retries",
            "breaker_failure_threshold",
        ):
            if ok(name) and getattr(self, name) < 0:
                problems.append(f"{_PG}.{name}: {getattr(self, name)} must not be negative")
        if (
            ok("max_open_conns", "max_idle_conns")
            and self.max_open_conns > 0
            and self.max_idle_conns > self.max_open_conns
        ):
            problems.append(
                f"{_PG}.max_idle_conns: {self.max_idle_conns} is greater than "
                f"max_open_conns ({self.max_open_conns})"
            )
        for f in fields(self):
            if f.type is float and ok(f.name):
                seconds = getattr(self, f.name)
                if f.name == "timeout" and seconds <= 0:
                    problems.append(f"{_PG}.timeout: {seconds:g}s must be greater than 0")
                elif seconds < 0:
                    problems.append(f"{_PG}.{f.name}: {seconds:g}s must not be negative")
        return problems

    def ports(self) -> list[int]:
        """The port of each host (one for all when a single port is given)."""
        if isinstance(self.port, int):
            return [self.port]
        return [int(port) for port in str(self.port).split(",")]

    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every server the config names, in libpq's order."""
        hosts = [h.strip() for h in self.host.split(",")]
        ports = self.ports()
        if len(ports) == 1:
            ports = ports * len(hosts)
        return list(zip(hosts, ports, strict=False))

    @property
    def multi_host(self) -> bool:
        return "," in self.host

    def url(self, driver: str = "postgresql+psycopg") -> URL:
        """The SQLAlchemy URL, password included (``str(url)`` masks it; use
        ``url.render_as_string(hide_password=False)`` only where a tool needs the text).

        SSL and application settings ride in the query so the URL alone connects the same
        way; a unix-socket directory goes in the query too, where libpq expects it.
        """
        query: dict[str, str | tuple[str, ...]] = {"sslmode": self.sslmode}
        host: str | None = self.host
        port: int | None = self.ports()[0]
        if self.multi_host:  # SQLAlchemy's form for libpq's host=a,b port=1,2
            query["host"] = tuple(f"{h}:{p}" for h, p in self.addresses())
            host = port = None
        elif self.host.startswith("/"):
            query["host"], host = self.host, None
        if self.target_session_attrs:
            query["target_session_attrs"] = self.target_session_attrs
        for key in ("sslrootcert", "sslcert", "sslkey"):
            value = getattr(self, key)
            if value:
                query[key] = value
        if self.application_name:
            query["application_name"] = self.application_name
        # libpq takes whole seconds here (and waits at least 2 whatever is asked).
        query["connect_timeout"] = str(max(1, math.ceil(self.timeout)))
        return URL.create(
            driver,
            username=self.username,
            password=self.password or None,
            host=host,
            port=port,
            database=self.name,
            query=query,
        )

    def safe_dsn(self) -> str:
        """``postgresql://user@host:port/name`` for messages and logs: never the password."""
        user, name = quote(self.username, safe=""), quote(self.name, safe="")
        if self.multi_host:
            hosts = ",".join(f"{f'[{h}]' if ':' in h else h}:{p}" for h, p in self.addresses())
            return f"postgresql://{user}@{hosts}/{name}"
        if self.host.startswith("/"):
            return f"postgresql://{user}@/{name}?host={quote(self.host)}&port={self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{user}@{host}:{self.port}/{name}"

    @classmethod
    def from_url(cls, url: str | URL, **overrides: Any) -> Self:
        """A config from a ``postgres[ql][+driver]://`` URL; every field the URL does not
        give keeps its default, and ``overrides`` (field values) win over both."""
        values, problems = _url_values(url, "url")
        values.update(overrides)
        _fit_idle_to_open(values, idle_given="max_idle_conns" in overrides)
        return cls._build(values, problems)

    def with_url(self, url: str | URL) -> Self:
        """This config with the connection fields a URL gives (as ``DATABASE_URL`` does):
        pool sizes, retries, timeouts and SSL files stay as they are."""
        values, problems = _url_values(url, "url")
        if problems:
            raise ConfigError(problems)
        return self.replace(**values)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated again.  Lowering
        ``max_open_conns`` alone lowers ``max_idle_conns`` with it, as Go's
        ``SetMaxOpenConns`` does."""
        values = {**_field_values(self), **changes}
        _fit_idle_to_open(values, idle_given="max_idle_conns" in changes)
        return self._build(values, [])

    @classmethod
    def _build(cls, values: Mapping[str, Any], problems: list[str]) -> Self:
        """``cls(**values)`` reporting unknown names together with every invalid value."""
        known = [f.name for f in fields(cls)]
        problems = problems + _unknown_names([k for k in values if k not in known], known, _PG)
        config = _construct(cls, {k: v for k, v in values.items() if k in known}, {}, problems)
        if problems or config is None:
            raise ConfigError(problems)
        return config


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging switches; ``sql`` routes SQLAlchemy's engine log into loguru."""

    level: str = "INFO"
    json: bool = False
    sql: bool = False
    slow_query_threshold: float = 0.0  # seconds; 0 = off

    def __post_init__(self) -> None:
        problems, failed = _coerce_fields(self, _LOG)
        if "level" not in failed:
            level = self.level.strip().upper()
            if level in LOG_LEVELS:
                object.__setattr__(self, "level", level)
            else:
                problems.append(
                    f"{_LOG}.level: {self.level!r} is not one of {', '.join(LOG_LEVELS)}"
                )
        if "slow_query_threshold" not in failed and self.slow_query_threshold < 0:
            problems.append(
                f"{_LOG}.slow_query_threshold: {self.slow_query_threshold:g}s must not be negative"
            )
        if problems:
            raise ConfigError(_in_field_order(problems, _LOG_ORDER))


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """The primary (``postgres``) and its read replicas.  A replica's fields not given
    are the primary's (pool sizes, timeouts, credentials …).  ``read_from`` None means
    "prefer-replica" once replicas are configured, else "primary"."""

    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    replicas: tuple[PostgresConfig, ...] = ()
    read_from: str | None = None  # "primary" | "replica" | "prefer-replica"
    max_replica_lag: float = 10.0  # seconds of replay behind: a replica further back is skipped

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "replicas", tuple(self.replicas))
        for i, replica in enumerate(self.replicas):
            if not isinstance(replica, PostgresConfig):
                problems.append(  # type: ignore[unreachable]  # callers may pass anything
                    f"{_DB}.replicas[{i}]: expected a PostgresConfig"
                )
        if self.read_from is not None:
            mode = str(self.read_from).strip().lower()
            if mode not in READ_FROM:
                problems.append(
                    f"{_DB}.read_from: {self.read_from!r} is not one of {', '.join(READ_FROM)}"
                )
            elif mode == "replica" and not self.replicas:
                problems.append(f"{_DB}.read_from: 'replica' but no replica is configured")
            object.__setattr__(self, "read_from", mode)
        try:
            lag = parse_duration(self.max_replica_lag)
        except ValueError as exc:
            problems.append(f"{_DB}.max_replica_lag: {exc}")
        else:
            if lag < 0:
                problems.append(f"{_DB}.max_replica_lag: {lag:g}s must not be negative")
            object.__setattr__(self, "max_replica_lag", lag)
        if problems:
            raise ConfigError(problems)

    @property
    def routing(self) -> str:
        """Where reads go: ``read_from`` as given, or its default."""
        if self.read_from is not None:
            return self.read_from
        return "prefer-replica" if self.replicas else "primary"


def _empty_app() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything dbkit reads from configuration.  The generated ``repr`` is safe to log:
    ``PostgresConfig`` leaves its password out, and ``app`` is left out whole (the
    application's values may hold its secrets).

    ``app`` is the ``[app]`` section, the application's own values, read-only: tables are
    read-only mappings (``types.MappingProxyType``) and lists are tuples, at every depth.
    Its keys are lower-case, as every settings key is.  See :func:`load_settings`.
    """

    env: str
    database: DatabaseConfig
    log: LogConfig
    app: Mapping[str, Any] = field(default_factory=_empty_app, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "app", _frozen(self.app))


def _frozen(value: Any) -> Any:
    """A read-only deep copy: mappings → ``MappingProxyType``, lists → tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _fit_idle_to_open(values: dict[str, Any], *, idle_given: bool) -> None:
    """Go's ``SetMaxOpenConns``: a lower open limit lowers the idle limit with it.

    Only when the idle limit was not asked for explicitly (an explicit idle > open is
    still an error), so ``from_url(url, max_open_conns=2)`` works with the default 5 idle.
    """
    if idle_given or "max_open_conns" not in values:
        return
    try:
        max_open = _to_int(values["max_open_conns"])
        max_idle = _to_int(values.get("max_idle_conns", _PG_DEFAULT_IDLE))
    except ValueError:
        return  # validation reports it
    if 0 < max_open < max_idle:
        values["max_idle_conns"] = max_open


def _in_field_order(problems: list[str], order: Mapping[str, int]) -> list[str]:
    return sorted(problems, key=lambda problem: order.get(problem.split(":", 1)[0], len(order)))


def _field_values(obj: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: that would deep-copy, and we only want this level.
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


_PG_FIELDS = tuple(f.name for f in fields(PostgresConfig))
_PG_ORDER = {f"{_PG}.{name}": i for i, name in enumerate(_PG_FIELDS)}
_PG_DEFAULT_IDLE = PostgresConfig.__dataclass_fields__["max_idle_conns"].default
_LOG_FIELDS = tuple(f.name for f in fields(LogConfig))
_LOG_ORDER = {f"{_LOG}.{name}": i for i, name in enumerate(_LOG_FIELDS)}
# Keys of [database] itself; a [[database.replicas]] table takes the postgres fields.
_DB_FIELDS = ("read_from", "max_replica_lag", "replicas", "replica_urls")
_KNOWN_KEYS = frozenset(
    [f"{_PG}.{name}" for name in _PG_FIELDS]
    + [f"{_LOG}.{name}" for name in _LOG_FIELDS]
    + [f"{_DB}.{name}" for name in _DB_FIELDS]
)
_TABLE_KEYS = frozenset({"database", _PG, _LOG, _APP})


def _url_values(url: str | URL, label: str) -> tuple[dict[str, Any], list[str]]:
    """PostgresConfig field values from a URL.  Host, port, name, username and password
    always come from it (defaults where it is silent); SSL settings, application_name and
    connect_timeout (→ timeout) only when its query has them.  Messages never quote the
    URL, which may hold a password."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return {}, [
            f"{label}: not a valid URL (expected postgresql://user:password@host:5432/name)"
        ]
    if parsed.get_backend_name() not in ("postgres", "postgresql"):
        return {}, [
            f"{label}: scheme {parsed.drivername!r} is not PostgreSQL "
            "(use postgresql:// or postgresql+psycopg://)"
        ]
    query = {k: (v[-1] if isinstance(v, tuple) else v) for k, v in parsed.query.items()}
    defaults = PostgresConfig.__dataclass_fields__
    hosts = parsed.query.get("host")
    values: dict[str, Any] = {
        "host": parsed.host or query.get("host") or defaults["host"].default,
        "port": parsed.port if parsed.port is not None else query.get("port", 5432),
        "name": parsed.database or defaults["name"].default,
        "username": parsed.username or defaults["username"].default,
        "password": parsed.password or "",
    }
    if isinstance(hosts, tuple) and len(hosts) > 1:  # ?host=a:5432&host=b:5433
        pairs = [h.rpartition(":") if ":" in h else (h, "", "") for h in hosts]
        values["host"] = ",".join(h for h, _, _ in pairs)
        values["port"] = ",".join(p or str(values["port"]) for _, _, p in pairs)
    for key in (
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "application_name",
        "target_session_attrs",
    ):
        if key in query:
            values[key] = query[key]
    if "connect_timeout" in query:
        values["timeout"] = query["connect_timeout"]
    return values, []


# --------------------------------------------------------------------------- loading

_DEFAULT_NAMES = tuple(f"{stem}{suffix}" for stem in SETTINGS_STEMS for suffix in SETTINGS_SUFFIXES)


def find_config_dir(start: str | Path | None = None) -> Path | None:
    """The config directory: ``$DBKIT_CONFIG_DIR`` when set (existing or not), else the
    nearest ``config/`` directory holding a settings file (``settings.toml``,
    ``settings.yaml``, ``.secrets.toml`` …) in ``start`` (default: the working directory)
    or a directory above it, the way git finds ``.git``; else ``None``."""
    configured = os.environ.get(CONFIG_DIR_VAR)
    if configured:
        return Path(configured).expanduser().absolute()
    here = Path(start).expanduser().absolute() if start is not None else Path.cwd()
    for directory in (here, *here.parents):
        candidate = directory / "config"
        if any(_is_file(candidate / name) for name in _DEFAULT_NAMES):
            return candidate
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a directory on the way up that we may not search
        return False


def default_settings_files() -> list[Path]:
    """The config directory's files (see :func:`find_config_dir`): its ``settings`` file,
    then its ``.secrets`` file, each in the format found there, else under its ``.toml``
    name; with no config directory, the names in ``./config``.  So there are always two,
    and a caller can show where dbkit looked for what it did not find.  ``ConfigError``
    when ``$DBKIT_CONFIG_DIR`` is not a directory, or when one of the files exists in two
    formats (``settings.toml`` and ``settings.yaml``)."""
    config_dir = find_config_dir() or Path.cwd() / "config"
    if os.environ.get(CONFIG_DIR_VAR) and not config_dir.is_dir():
        raise ConfigError([f"{CONFIG_DIR_VAR}: {config_dir} is not a directory"])
    files: list[Path] = []
    problems: list[str] = []
    for stem in SETTINGS_STEMS:
        present = [
            config_dir / f"{stem}{suffix}"
            for suffix in SETTINGS_SUFFIXES
            if _is_file(config_dir / f"{stem}{suffix}")
        ]
        if len(present) > 1:
            problems.append(
                f"{config_dir}: {' and '.join(path.name for path in present)} both exist; "
                "keep one (dbkit reads each settings file in one format, and would not "
                "guess which of them wins)"
            )
        files.append(present[0] if present else config_dir / f"{stem}.toml")
    if problems:
        raise ConfigError(problems)
    return files


def load_settings(
    env: str | None = None,
    settings_files: Sequence[str | Path] | None = None,
    *,
    url: str | URL | None = None,
) -> Settings:
    """Load, merge and validate the settings for ``env`` (default: ``$DBKIT_ENV``, else
    ``development``).  Any problem raises one ``ConfigError`` that lists them all.

    Files: the config directory's ``settings`` and ``.secrets`` files, TOML or YAML (see
    :func:`find_config_dir`), then ``settings_files``: these *add* to the directory's
    files and win over them, key by key (``--settings FILE``).  A file named in
    ``settings_files`` must exist; the directory's may be missing.  To read only files of
    your own, point ``DBKIT_CONFIG_DIR`` at their directory.

    ``url`` (the command line's ``--url``) replaces the connection fields as
    ``DATABASE_URL`` does, and wins over it.

    Outside ``development`` and ``testing``, finding no settings file, no URL and none of
    ``DBKIT_DATABASE__POSTGRES__HOST``/``PORT``/``NAME``/``USERNAME`` is a ``ConfigError``
    that says where it looked: there dbkit never connects to its built-in defaults
    (``postgres@localhost:5432/postgres``) for want of a configuration.

    The application's own values go under ``[app]`` and come back, read-only, as
    :attr:`Settings.app`::

        [default.app]
        chunk_size = 500
        [default.app.orders]
        source = "s3://bucket/orders"
        [production.app]
        chunk_size = 5000

    gives ``settings.app["chunk_size"]`` and ``settings.app["orders"]["source"]``.  Tables
    merge key by key like dbkit's own sections; any other value, a list included, is
    replaced by the later one.  ``DBKIT_APP__CHUNK_SIZE=2000`` overrides a value: the
    variable takes the type the files give it (integer, number, boolean), else stays text.
    Any other unknown section is an error.  For typed access, build a frozen dataclass of
    your own from the mapping, e.g. ``OrdersConfig(**settings.app["orders"])``.
    """
    settings = _load(env, settings_files, url)[0]
    postgres = settings.database.postgres
    logger.bind(audit="settings_loaded", env=settings.env).info(
        "settings loaded (env {}): database {}, sslmode {}",
        settings.env,
        postgres.safe_dsn(),
        postgres.sslmode,
    )
    return settings


def describe_settings(
    env: str | None = None,
    settings_files: Sequence[str | Path] | None = None,
    *,
    url: str | URL | None = None,
) -> list[tuple[str, str, str]]:
    """``(dotted key, value, source)`` for every setting, for ``dbkit config``: dbkit's own,
    then every ``app.*`` value.

    The password, and ``app`` values whose key names a secret (``api_token`` …), show as
    ``***``.  Sources: ``default``, ``file:<path> [<section>]``, ``env:<VARNAME>``
    (``env:DATABASE_URL`` for the fields a URL supplied), ``url argument``.
    """
    settings, sources = _load(env, settings_files, url)
    rows: list[tuple[str, str, str]] = []
    for section, obj in ((_PG, settings.database.postgres), (_LOG, settings.log)):
        for f in fields(obj):
            key = f"{section}.{f.name}"
            rows.append(
                (key, _show(f.name, f.type, getattr(obj, f.name)), sources.get(key, "default"))
            )
    database = settings.database
    rows.append((f"{_DB}.read_from", database.routing, sources.get(f"{_DB}.read_from", "default")))
    rows.append(
        (
            f"{_DB}.max_replica_lag",
            _show("max_replica_lag", float, database.max_replica_lag),
            sources.get(f"{_DB}.max_replica_lag", "default"),
        )
    )
    source = sources.get(f"{_DB}.replica_urls") or sources.get(f"{_DB}.replicas", "default")
    for i, replica in enumerate(database.replicas):
        # The connection and pool of each: what differs between replicas.
        rows.append((f"{_DB}.replicas[{i}]", replica.safe_dsn(), source))
        rows.append((f"{_DB}.replicas[{i}].max_open_conns", str(replica.max_open_conns), source))
    for key, value in _app_items(settings.app, _APP):
        rows.append((key, _show_app(key, value), sources.get(key, "default")))
    return rows


def _show(name: str, kind: object, value: object) -> str:
    if name == "password":
        return "***" if value else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is float and isinstance(value, float):
        return format_duration(value)
    return str(value)


def _app_items(table: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        items += _app_items(value, dotted) if isinstance(value, Mapping) else [(dotted, value)]
    return items


def _show_app(key: str, value: object) -> str:
    if any(is_secret_name(part) for part in key.split(".")[1:]):
        return "***" if value not in (None, "") else ""
    if isinstance(value, tuple):
        return json.dumps(list(value), default=str)
    return _show("", None, value)


def _load(
    env: str | None, settings_files: Sequence[str | Path] | None, url: str | URL | None
) -> tuple[Settings, dict[str, str]]:
    """The settings and, for every key that was set anywhere, where its value came from."""
    defaults = default_settings_files()
    explicit = [Path(p).expanduser().absolute() for p in settings_files or ()]
    files = _unique([*defaults, *explicit])
    # A named file must exist, unless it is one of the config directory's own (a caller
    # passing default_settings_files() along): those may be missing.
    default_paths = {os.path.realpath(path) for path in defaults}
    required = [path for path in explicit if os.path.realpath(path) not in default_paths]
    documents = _read_documents(files, required)
    env_name = _resolve_env(env, documents)
    sources = _file_sources(documents, env_name)
    tree = _dynaconf_tree([path for path in files if path.exists()], env_name, documents)
    app = _app_tree(documents, env_name)

    problems: list[str] = []
    postgres = _table(tree, "database", "postgres")
    log = _table(tree, "log")
    url_var = _apply_env_vars(postgres, log, app, sources, problems)
    if url:
        url_label, url_text, url_source = "url argument", url, "url argument"
    elif url_var is not None:
        url_label, url_text, url_source = url_var, os.environ[url_var], f"env:{url_var}"
    else:
        url_label = None
    if (
        env_name not in DEFAULTS_ALLOWED_ENVS
        and not documents
        and url_label is None
        and not any(f"{_PG}.{name}" in sources for name in _CONNECTION_FIELDS)
    ):
        problems.append(_nothing_configured(env_name))
    if url_label is not None:
        values, url_problems = _url_values(url_text, url_label)
        problems += url_problems
        postgres.update(values)
        sources.update({f"{_PG}.{key}": url_source for key in values})

    problems += _key_problems(sources, postgres, log)
    _fit_idle_to_open(postgres, idle_given=f"{_PG}.max_idle_conns" in sources)
    pg_config = _construct(PostgresConfig, postgres, sources, problems)
    log_config = _construct(LogConfig, log, sources, problems)
    db_config = (
        _database_config(pg_config, _table(tree, "database"), sources, problems)
        if pg_config is not None
        else None
    )
    if problems or db_config is None or log_config is None:
        raise ConfigError(problems)
    settings = Settings(env=env_name, database=db_config, log=log_config, app=app)
    return settings, sources


def _database_config(
    primary: PostgresConfig,
    table: Mapping[str, Any],
    sources: Mapping[str, str],
    problems: list[str],
) -> DatabaseConfig | None:
    """``[database]``: the replicas (each ``[[database.replicas]]`` table over the primary's
    fields, or ``DBKIT_DATABASE__REPLICA_URLS``, comma-separated URLs over them),
    ``read_from`` and ``max_replica_lag``; environment variables win over files."""
    values: dict[str, Any] = {}
    for name in ("read_from", "max_replica_lag"):
        var = sources.get(f"{_DB}.{name}", "")
        if var.startswith("env:"):
            values[name] = os.environ[var[4:]]
        elif name in table:
            values[name] = table[name]
    replicas: list[PostgresConfig] = []
    urls_source = sources.get(f"{_DB}.replica_urls", "")
    if urls_source.startswith("env:"):
        urls = [u.strip() for u in os.environ[urls_source[4:]].split(",") if u.strip()]
        for i, url in enumerate(urls):
            found, url_problems = _url_values(url, f"{_DB}.replica_urls[{i}]")
            problems += url_problems
            if not found.get("password"):
                found.pop("password", None)  # inherited, like every field the URL lacks
            if not url_problems:
                try:
                    replicas.append(primary.replace(**found))
                except ConfigError as exc:
                    problems += [f"{_DB}.replica_urls[{i}]: {p}" for p in exc.problems]
    else:
        tables = table.get("replicas", ())
        if not isinstance(tables, (list, tuple)):
            problems.append(f"{_DB}.replicas: expected a list of tables ([[database.replicas]])")
            tables = ()
        for i, entry in enumerate(tables):
            if not isinstance(entry, Mapping):
                problems.append(f"{_DB}.replicas[{i}]: expected a table of postgres settings")
                continue
            unknown = [k for k in entry if k not in _PG_FIELDS]
            problems += _unknown_names(unknown, _PG_FIELDS, f"{_DB}.replicas[{i}]")
            try:
                replicas.append(
                    primary.replace(**{k: v for k, v in entry.items() if k in _PG_FIELDS})
                )
            except ConfigError as exc:
                problems += [p.replace(_PG, f"{_DB}.replicas[{i}]", 1) for p in exc.problems]
    try:
        return DatabaseConfig(primary, tuple(replicas), **values)
    except ConfigError as exc:
        problems += [
            f"{p} (from {sources[p.split(':', 1)[0]]})" if p.split(":", 1)[0] in sources else p
            for p in exc.problems
        ]
        return None


def _unique(paths: Iterable[Path]) -> list[Path]:
    """The paths without repeats (a ``--settings`` naming a default file), first kept."""
    seen: set[str] = set()
    unique: list[Path] = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _nothing_configured(env: str) -> str:
    if os.environ.get(CONFIG_DIR_VAR):
        where = (
            f"{CONFIG_DIR_VAR} ({find_config_dir()}) holds no settings.toml, settings.yaml "
            "or .secrets file"
        )
    else:
        where = (
            "no config/ directory with a settings.toml or settings.yaml in "
            f"{Path.cwd()} or any directory above it, and {CONFIG_DIR_VAR} is not set"
        )
    return (
        f"no database configured for environment {env!r}: {where}; nor is DATABASE_URL, "
        "DBKIT_DATABASE__URL or DBKIT_DATABASE__POSTGRES__HOST (PORT, NAME, USERNAME) set. "
        f"Outside {' and '.join(DEFAULTS_ALLOWED_ENVS)}, dbkit does not fall back to "
        "postgres@localhost:5432/postgres"
    )


def _read_documents(
    files: Sequence[Path], required: Sequence[Path]
) -> list[tuple[Path, dict[str, Any]]]:
    """Parse the files dynaconf will load, in its order: the given files that exist, then
    the ``<name>.local.<ext>`` of each.  Read here too so that errors come out clear and
    secret-free, unknown environments can be told from new ones, and sources can be shown.
    Keys come back lower-case (dynaconf's keys are case-insensitive)."""
    problems = [
        f"file:{path}: only TOML (.toml) and YAML (.yaml, .yml) settings files are supported"
        for path in files
        if path.suffix not in SETTINGS_SUFFIXES
    ]
    problems += [
        f"file:{path}: not found"
        for path in required
        if path.suffix in SETTINGS_SUFFIXES and not path.exists()
    ]
    if problems:
        raise ConfigError(problems)
    found = [path for path in files if path.exists()]
    found += [
        local
        for path in found
        if ".local." not in path.name
        and (local := path.with_name(f"{path.stem}.local{path.suffix}")).exists()
    ]
    documents: list[tuple[Path, dict[str, Any]]] = []
    for path in found:
        try:
            data, problem = _parse(path, path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"file:{path}: cannot be read ({exc.strerror})")
            continue
        except UnicodeDecodeError as exc:
            problems.append(f"file:{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        if data is None:
            problems.append(f"file:{path}: {problem}")
            continue
        data = _lower_keys(data)
        problems += _misplaced(path, data)
        documents.append((path, data))
    if problems:
        raise ConfigError(problems)
    return documents


def _parse(path: Path, text: str) -> tuple[dict[str, Any] | None, str]:
    """(the document, "") or (None, what is wrong) -- never quoting the file's text."""
    if path.suffix in _YAML_SUFFIXES:
        return _parse_yaml(text)
    try:
        return tomllib.loads(text), ""
    except tomllib.TOMLDecodeError as exc:
        # tomllib's messages give line and column, never the offending text.
        return None, f"invalid TOML: {exc}"


def _parse_yaml(text: str) -> tuple[dict[str, Any] | None, str]:
    # The parser dynaconf reads YAML with (its vendored ruamel.yaml), so both see the same
    # values; safe_load, as dynaconf is told to use below: no Python objects from tags.
    # Imported by name: the vendored copy ships py.typed, but mypy cannot parse it.
    yaml = importlib.import_module("dynaconf.vendor.ruamel.yaml")
    try:
        data = yaml.safe_load(text)
    except Exception as exc:  # YAMLError, and DuplicateKeyError (a warning class)
        return None, f"invalid YAML: {_yaml_problem(exc)}"
    if data is None:
        return {}, ""
    if not isinstance(data, dict):
        return None, (
            "expected sections (default:, development:, production: …) at the top level, "
            f"found a {'list' if isinstance(data, list) else 'single value'}"
        )
    return data, ""


def _yaml_problem(exc: Exception) -> str:
    """What the YAML parser found and where; its full message would quote the line."""
    problem = getattr(exc, "problem", None)
    if not isinstance(problem, str):
        return type(exc).__name__
    # A duplicate key's message quotes both values (a password's too): keep the key only.
    problem = problem.split(" with value ", 1)[0]
    mark = getattr(exc, "problem_mark", None)
    line, column = getattr(mark, "line", None), getattr(mark, "column", None)
    if isinstance(line, int) and isinstance(column, int):
        return f"{problem} (line {line + 1}, column {column + 1})"
    return problem


def _lower_keys(table: Mapping[Any, Any]) -> dict[str, Any]:
    """Keys of this table and of the tables inside it, lower-case (not inside lists)."""
    return {
        str(key).lower(): _lower_keys(value) if isinstance(value, Mapping) else value
        for key, value in table.items()
    }


def _misplaced(path: Path, data: Mapping[str, Any]) -> list[str]:
    """Top-level settings outside any environment section.  With environments on, dynaconf
    would take ``[database]`` for an environment named "database" and silently ignore it, and
    a top-level ``port = 5432`` too: a classic mistake, so say so."""
    yaml = path.suffix in _YAML_SUFFIXES
    problems: list[str] = []
    for key, value in data.items():
        if key in ("database", _LOG, _APP):
            hint = (
                "nest it under default: or an environment such as production:"
                if yaml
                else f"put it under [default.{key}] or an environment such as [production.{key}]"
            )
            problems.append(
                f"file:{path}: top-level {_section_name(key, yaml)} is not read; {hint}"
            )
        elif not isinstance(value, Mapping):
            sections = "default: or production:" if yaml else "[default] or [production]"
            problems.append(
                f"file:{path}: top-level {key!r} is not read; settings go in sections "
                f"such as {sections}"
            )
    return problems


def _section_name(key: str, yaml: bool) -> str:
    return f"{key}:" if yaml else f"[{key}]"


def _resolve_env(env: str | None, documents: Sequence[tuple[Path, dict[str, Any]]]) -> str:
    """The environment name, lower-case.  Known: the built-in three plus any section a
    settings file defines, so a project can add e.g. ``[staging]``."""
    origin = "env argument" if env else ENV_SWITCHER
    raw = env if env else os.environ.get(ENV_SWITCHER, "")
    name = raw.strip().lower() or DEFAULT_ENV
    extra = {
        key
        for _, data in documents
        for key, value in data.items()
        if isinstance(value, dict) and key not in _SPECIAL_SECTIONS and key not in KNOWN_ENVS
    }
    known = [*KNOWN_ENVS, *sorted(extra)]
    if name not in known:
        raise ConfigError(
            [f"unknown environment {raw!r} (from {origin}); known environments: {', '.join(known)}"]
        )
    return name


def _layers(
    documents: Sequence[tuple[Path, dict[str, Any]]], env: str
) -> Iterable[tuple[Path, str, dict[str, Any]]]:
    """(file, section, table) in dynaconf's order: per file, default, dbkit, the env, global."""
    for path, data in documents:
        for section in _LAYER_SECTIONS:
            section = section or env
            table = data.get(section)
            if isinstance(table, dict):
                yield path, section, table


def _file_sources(documents: Sequence[tuple[Path, dict[str, Any]]], env: str) -> dict[str, str]:
    """dotted key → ``file:<path> [<section>]`` of the layer that set it last."""
    sources: dict[str, str] = {}
    for path, section, table in _layers(documents, env):
        for key in _flatten(table):
            sources[key] = f"file:{path} [{section}]"
    return sources


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a table's values; an empty table sets nothing."""
    keys: list[str] = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        keys += _flatten(value, f"{dotted}.") if isinstance(value, dict) else [dotted]
    return keys


def _app_tree(documents: Sequence[tuple[Path, dict[str, Any]]], env: str) -> dict[str, Any]:
    """The merged ``[app]`` sections.  Merged here rather than by dynaconf, whose merge
    would append a later list to an earlier one; a later list replaces, as any value does."""
    app: dict[str, Any] = {}
    for _, _, table in _layers(documents, env):
        if isinstance(table.get(_APP), dict):
            _merge_into(app, table[_APP])
    return app


def _merge_into(target: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _dynaconf_tree(
    files: Sequence[Path], env: str, documents: Sequence[tuple[Path, dict[str, Any]]]
) -> dict[str, Any]:
    """The merged file settings for ``env``, as plain dicts with lower-case keys."""
    from dynaconf import Dynaconf  # only needed here; keeps ``import dbkit`` light

    try:
        dyn = Dynaconf(
            envvar_prefix=ENV_PREFIX.rstrip("_"),
            env_switcher=ENV_SWITCHER,
            environments=True,
            merge_enabled=True,
            # dynaconf globs every name: escaped, a directory such as "proj[1]" still loads.
            settings_files=[glob.escape(str(path)) for path in files],
            force_env=env,
            load_dotenv=False,
            # Environment variables are applied by _apply_env_vars, as raw text.
            loaders=[],
            # Pinned so that *_FOR_DYNACONF variables of the process cannot add files,
            # turn a format off, or load YAML with Python object tags.
            core_loaders=["TOML", "YAML"],
            yaml_loader="safe_load",
            includes=[],
            preload=[],
            secrets=None,
        )
        return {key: _plain(dyn.get(key, {})) for key in ("database", "log")}
    except Exception as exc:  # dynaconf's own value syntax (@int, @format…) can fail
        detail = _redact(f"{type(exc).__name__}: {exc}", _secrets_in(documents))
        # ``from None``: the chained original could print a secret in a traceback.
        raise ConfigError([f"settings files could not be loaded: {detail}"]) from None


def _plain(value: Any) -> Any:
    """dynaconf's DataDict/BoxList → dict/list; ``dict()``, not the deprecated to_dict()."""
    if isinstance(value, Mapping):
        return {str(k).lower(): _plain(v) for k, v in dict(value).items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _secrets_in(documents: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """The values of every key that names a secret (``password``, an ``[app]`` token …)."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_secret_name(str(key)) and isinstance(value, str) and value:
                    found.append(value)
                    # dynaconf reports "@int xyz" trouble quoting just "xyz"
                    found.extend(value.split(None, 1)[1:])
                walk(value)

    for _, data in documents:
        walk(data)
    return found


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _table(tree: Mapping[str, Any], *path: str) -> dict[str, Any]:
    node: Any = tree
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return dict(node) if isinstance(node, dict) else {}


def _env_vars() -> dict[str, str]:
    """dotted key → variable name for every ``DBKIT_`` variable that names a setting.

    A variable counts when it has the ``__`` separator or names a settings table itself;
    that leaves DBKIT_ENV, DBKIT_CONFIG_DIR and other tools' variables alone.  Matching
    after the prefix is case-insensitive, like dynaconf's.
    """
    found: dict[str, str] = {}
    for var in sorted(os.environ):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :]
        if "__" in rest or rest.lower() in ("database", _LOG, _APP):
            found[".".join(part.lower() for part in rest.split("__"))] = var
    return found


def _apply_env_vars(
    postgres: dict[str, Any],
    log: dict[str, Any],
    app: dict[str, Any],
    sources: dict[str, str],
    problems: list[str],
) -> str | None:
    """Overlay ``DBKIT_*`` variables (raw text) onto the sections and record their sources.
    Returns the name of the URL variable to apply, if one is set and non-empty."""
    url_var: str | None = None
    for key, var in _env_vars().items():
        raw = os.environ[var]
        if key == "database.url":
            url_var = var if raw else None
            continue
        sources[key] = f"env:{var}"
        section, _, name = key.rpartition(".")
        if section == _PG:
            postgres[name] = raw
        elif section == _LOG:
            log[name] = raw
        elif key.startswith(f"{_APP}."):
            problem = _set_app_value(app, key, raw)
            if problem:
                problems.append(f"{problem} (from env:{var})")
    if url_var is None and os.environ.get("DATABASE_URL"):
        url_var = "DATABASE_URL"
    return url_var


def _set_app_value(app: dict[str, Any], key: str, raw: str) -> str | None:
    """Put an environment variable's text at ``key`` (``app.a.b``) in the ``[app]`` tree,
    typed like the value the files give there.  A problem, never quoting the value (an
    application's secret may be in it), or None."""
    *parents, name = key.split(".")[1:]
    node = app
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            table = ".".join([_APP, *parents[: depth + 1]])
            return f"{key}: {table} is a single value in the settings files, not a table"
        node = child
    current = node.get(name)
    try:
        node[name] = _typed_like(current, raw)
    except ValueError as exc:
        return f"{key}: {exc}"
    return None


def _typed_like(current: object, raw: str) -> object:
    """``raw`` as the type of ``current`` (from the files) where that is a scalar type."""
    if isinstance(current, dict):
        raise ValueError("is a table in the settings files: set its keys one by one")
    if isinstance(current, (list, tuple)):
        raise ValueError("is a list in the settings files: it cannot be set from the environment")
    if isinstance(current, bool):
        try:
            return _to_bool(raw)
        except ValueError:
            raise ValueError("expected true or false, as in the settings files") from None
    if isinstance(current, int):
        try:
            return _to_int(raw)
        except ValueError:
            raise ValueError("expected an integer, as in the settings files") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number, as in the settings files") from None
    return raw


def _key_problems(
    sources: Mapping[str, str], postgres: dict[str, Any], log: dict[str, Any]
) -> list[str]:
    """Unknown keys (typos) and values where a table belongs.  Unknown keys are dropped
    from the sections so the remaining fields can still be checked."""
    problems: list[str] = []
    unknown = {
        key
        for key in sources
        if key not in _KNOWN_KEYS and key != "database.url" and not key.startswith(f"{_APP}.")
    }
    unknown |= {f"{_PG}.{k}" for k in postgres if k not in _PG_FIELDS}
    unknown |= {f"{_LOG}.{k}" for k in log if k not in _LOG_FIELDS}
    for key in sorted(unknown):
        origin = f" (from {sources[key]})" if key in sources else ""
        if key in _TABLE_KEYS:
            problems.append(f"{key}: expected a table of settings, not a single value{origin}")
            continue
        section, _, name = key.rpartition(".")
        if section == _PG:
            hint = _did_you_mean(name, _PG_FIELDS)
        elif section == _LOG:
            hint = _did_you_mean(name, _LOG_FIELDS)
        else:
            hint = _did_you_mean(key, sorted(_KNOWN_KEYS))
            if not hint and key.split(".", 1)[0] != "database":
                hint = f" (the application's own values go under [app], e.g. {_APP}.{key})"
        problems.append(f"{key}: unknown setting{hint}{origin}")
    if "database.url" in sources:  # only files get here: the URL variables are not recorded
        problems.append(
            "database.url: set the URL with the DATABASE_URL or DBKIT_DATABASE__URL "
            f"environment variable; in files use {_PG}.* fields (from {sources['database.url']})"
        )
    for table, names in ((postgres, _PG_FIELDS), (log, _LOG_FIELDS)):
        for name in [k for k in table if k not in names]:
            del table[name]
    return problems


_T = TypeVar("_T")


def _construct(
    cls: Callable[..., _T],
    values: Mapping[str, Any],
    sources: Mapping[str, str],
    problems: list[str],
) -> _T | None:
    """``cls(**values)``, adding its problems (each tagged with its source) to ``problems``."""
    try:
        return cls(**values)
    except ConfigError as exc:
        for problem in exc.problems:
            key = problem.split(":", 1)[0]
            problems.append(f"{problem} (from {sources[key]})" if key in sources else problem)
        return None
