"""Typed, frozen settings: TOML files (through dynaconf) + environment variables → dataclasses.

Precedence, lowest first: dataclass defaults < ``[default]`` of each file < ``[<env>]`` of
each file < ``DBKIT_*`` environment variables < ``DBKIT_DATABASE__URL`` / ``DATABASE_URL``
(connection fields only).  Environment sections merge into the defaults key by key.

dynaconf reads and merges the files.  Environment variables are read here instead, as raw
text that each field parses for itself: dynaconf would TOML-parse them, so a password
``0x1F`` would arrive as the int 31 and ``@int hunter2`` would abort loading with the secret
in the error message.  Every problem found (unknown keys, bad values, inconsistent pool
sizes) is collected into one :class:`~dbkit.errors.ConfigError`, and no message ever
contains the password.
"""

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import quote

from loguru import logger
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dbkit.durations import format_duration, parse_duration
from dbkit.errors import ConfigError

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
    "format_duration",
    "load_settings",
    "parse_duration",
]

ENV_PREFIX = "DBKIT_"
ENV_SWITCHER = "DBKIT_ENV"
CONFIG_DIR_VAR = "DBKIT_CONFIG_DIR"
DEFAULT_ENV = "development"
KNOWN_ENVS = ("development", "testing", "production")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
RESETS = ("rollback", "discard")

_PG = "database.postgres"
_LOG = "log"
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


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got the boolean {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not an integer")
    raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    # Deliberately without the value: this coercer also handles the password.
    raise ValueError(f"expected a string, got {type(value).__name__} (quote it in TOML)")


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

    host: str = "localhost"
    port: int = 5432
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
        if ok("port") and not 1 <= self.port <= 65535:
            problems.append(f"{_PG}.port: {self.port} is not between 1 and 65535")
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

    def url(self, driver: str = "postgresql+psycopg") -> URL:
        """The SQLAlchemy URL, password included (``str(url)`` masks it; use
        ``url.render_as_string(hide_password=False)`` only where a tool needs the text).

        SSL and application settings ride in the query so the URL alone connects the same
        way; a unix-socket directory goes in the query too, where libpq expects it.
        """
        query: dict[str, str] = {"sslmode": self.sslmode}
        host: str | None = self.host
        if self.host.startswith("/"):
            query["host"], host = self.host, None
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
            port=self.port,
            database=self.name,
            query=query,
        )

    def safe_dsn(self) -> str:
        """``postgresql://user@host:port/name`` for messages and logs: never the password."""
        user, name = quote(self.username, safe=""), quote(self.name, safe="")
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
    postgres: PostgresConfig = field(default_factory=PostgresConfig)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything dbkit reads from configuration.  The generated ``repr`` is safe to log:
    ``PostgresConfig`` leaves its password out."""

    env: str
    database: DatabaseConfig
    log: LogConfig


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
_KNOWN_KEYS = frozenset(
    [f"{_PG}.{name}" for name in _PG_FIELDS] + [f"{_LOG}.{name}" for name in _LOG_FIELDS]
)
_TABLE_KEYS = frozenset({"database", _PG, _LOG})


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
    values: dict[str, Any] = {
        "host": parsed.host or query.get("host") or defaults["host"].default,
        "port": parsed.port if parsed.port is not None else query.get("port", 5432),
        "name": parsed.database or defaults["name"].default,
        "username": parsed.username or defaults["username"].default,
        "password": parsed.password or "",
    }
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name"):
        if key in query:
            values[key] = query[key]
    if "connect_timeout" in query:
        values["timeout"] = query["connect_timeout"]
    return values, []


# --------------------------------------------------------------------------- loading


def default_settings_files() -> list[Path]:
    """``settings.toml`` and ``.secrets.toml`` in ``$DBKIT_CONFIG_DIR``, else ``./config``."""
    config_dir = Path(os.environ.get(CONFIG_DIR_VAR) or Path.cwd() / "config")
    return [config_dir / "settings.toml", config_dir / ".secrets.toml"]


def load_settings(
    env: str | None = None, settings_files: Sequence[str | Path] | None = None
) -> Settings:
    """Load, merge and validate the settings for ``env`` (default: ``$DBKIT_ENV``, else
    ``development``).  Missing files are fine; any problem raises one ``ConfigError``."""
    settings = _load(env, settings_files)[0]
    postgres = settings.database.postgres
    logger.bind(audit="settings_loaded", env=settings.env).info(
        "settings loaded (env {}): database {}, sslmode {}",
        settings.env,
        postgres.safe_dsn(),
        postgres.sslmode,
    )
    return settings


def describe_settings(
    env: str | None = None, settings_files: Sequence[str | Path] | None = None
) -> list[tuple[str, str, str]]:
    """``(dotted key, value, source)`` for every setting, for ``dbkit config``.

    The password shows as ``***``.  Sources: ``default``, ``file:<path> [<section>]``,
    ``env:<VARNAME>`` (``env:DATABASE_URL`` for the fields a URL supplied).
    """
    settings, sources = _load(env, settings_files)
    rows: list[tuple[str, str, str]] = []
    for section, obj in ((_PG, settings.database.postgres), (_LOG, settings.log)):
        for f in fields(obj):
            key = f"{section}.{f.name}"
            rows.append(
                (key, _show(f.name, f.type, getattr(obj, f.name)), sources.get(key, "default"))
            )
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


def _load(
    env: str | None, settings_files: Sequence[str | Path] | None
) -> tuple[Settings, dict[str, str]]:
    """The settings and, for every key that was set anywhere, where its value came from."""
    files = (
        default_settings_files()
        if settings_files is None
        else [Path(p).expanduser().absolute() for p in settings_files]
    )
    documents = _read_documents(files)
    env_name = _resolve_env(env, documents)
    sources = _file_sources(documents, env_name)
    tree = _dynaconf_tree(files, env_name, documents)

    problems: list[str] = []
    postgres = _table(tree, "database", "postgres")
    log = _table(tree, "log")
    url_var = _apply_env_vars(postgres, log, sources)
    if url_var is not None:
        values, url_problems = _url_values(os.environ[url_var], url_var)
        problems += url_problems
        postgres.update(values)
        sources.update({f"{_PG}.{key}": f"env:{url_var}" for key in values})

    problems += _key_problems(sources, postgres, log)
    _fit_idle_to_open(postgres, idle_given=f"{_PG}.max_idle_conns" in sources)
    pg_config = _construct(PostgresConfig, postgres, sources, problems)
    log_config = _construct(LogConfig, log, sources, problems)
    if problems or pg_config is None or log_config is None:
        raise ConfigError(problems)
    settings = Settings(env=env_name, database=DatabaseConfig(pg_config), log=log_config)
    return settings, sources


def _read_documents(files: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Parse the files dynaconf will load, in its order: the given files that exist, then
    the ``<name>.local.toml`` of each.  Read here too so that errors come out clear and
    secret-free, unknown environments can be told from new ones, and sources can be shown."""
    problems = [
        f"file:{path}: only TOML settings files are supported"
        for path in files
        if path.suffix != ".toml"
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
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"file:{path}: cannot be read ({exc.strerror})")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            # tomllib's messages give line and column, never the offending text.
            problems.append(f"file:{path}: invalid TOML: {exc}")
        else:
            data = {str(k).lower(): v for k, v in data.items()}
            # With environments on, dynaconf would take [database] for an environment
            # named "database" and silently ignore it: a classic mistake, so say so.
            problems += [
                f"file:{path}: top-level [{key}] is not read; put it under [default.{key}] "
                f"or an environment such as [production.{key}]"
                for key in ("database", "log")
                if key in data
            ]
            documents.append((path, data))
    if problems:
        raise ConfigError(problems)
    return documents


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


def _file_sources(documents: Sequence[tuple[Path, dict[str, Any]]], env: str) -> dict[str, str]:
    """dotted key → ``file:<path> [<section>]`` of the layer that set it last, mirroring
    dynaconf's order (per file: default, dbkit, the env, global)."""
    sources: dict[str, str] = {}
    for path, data in documents:
        for section in _LAYER_SECTIONS:
            section = section or env
            table = data.get(section)
            if isinstance(table, dict):
                for key in _flatten(table):
                    sources[key] = f"file:{path} [{section}]"
    return sources


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in table.items():
        dotted = f"{prefix}{str(key).lower()}"
        keys += _flatten(value, f"{dotted}.") if isinstance(value, dict) and value else [dotted]
    return keys


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
            settings_files=[str(path) for path in files],
            force_env=env,
            load_dotenv=False,
            # Environment variables are applied by _apply_env_vars, as raw text.
            loaders=[],
            # Keep the *_FOR_DYNACONF variables of the process from adding files.
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
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if str(key).lower() == "password" and isinstance(value, str) and value:
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
        if "__" in rest or rest.lower() in ("database", "log"):
            found[".".join(part.lower() for part in rest.split("__"))] = var
    return found


def _apply_env_vars(
    postgres: dict[str, Any], log: dict[str, Any], sources: dict[str, str]
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
    if url_var is None and os.environ.get("DATABASE_URL"):
        url_var = "DATABASE_URL"
    return url_var


def _key_problems(
    sources: Mapping[str, str], postgres: dict[str, Any], log: dict[str, Any]
) -> list[str]:
    """Unknown keys (typos) and values where a table belongs.  Unknown keys are dropped
    from the sections so the remaining fields can still be checked."""
    problems: list[str] = []
    unknown = {key for key in sources if key not in _KNOWN_KEYS and key != "database.url"}
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
