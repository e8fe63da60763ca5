"""Settings: files + environment → frozen dataclasses; precedence, env sections, durations,
validation (every problem at once), raw-text secrets, DATABASE_URL, and no password leaks.
Pure unit tests: no database."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dbkit.errors import ConfigError
from dbkit.settings import (
    DatabaseConfig,
    LogConfig,
    PostgresConfig,
    Settings,
    default_settings_files,
    describe_settings,
    format_duration,
    load_settings,
    parse_duration,
)

SECRET = "S3cr3t-pw-xyz"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"
PW_VAR = "DBKIT_DATABASE__POSTGRES__PASSWORD"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DBKIT_* / DATABASE_URL from the machine, and no ./config from the repo."""
    for var in list(os.environ):
        if var.startswith("DBKIT_") or var == "DATABASE_URL":
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """A settings.toml with [default] and all three environments, and a secrets file."""
    settings = write(
        tmp_path / "conf" / "settings.toml",
        """
        [default.database.postgres]
        host = "db.default"
        port = 5432
        name = "dbkit"
        max_open_conns = 20
        max_idle_conns = 4
        conn_max_lifetime = "1h"
        retry_delay = "500ms"

        [default.log]
        level = "info"

        [development.database.postgres]
        name = "dbkit_dev"

        [testing.database.postgres]
        name = "dbkit_test"
        max_retries = 2
        retry_delay = "100ms"

        [production.database.postgres]
        host = "db.prod"
        sslmode = "verify-full"

        [production.log]
        json = true
        """.replace("\n        ", "\n"),
    )
    secrets = write(
        tmp_path / "conf" / ".secrets.toml",
        f'[default.database.postgres]\npassword = "{SECRET}"\n',
    )
    return [settings, secrets]


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return exc.value.problems


# ----------------------------------------------------------------------- defaults, files


def test_defaults_without_any_file() -> None:
    settings = load_settings(settings_files=[])
    assert settings == Settings(
        env="development", database=DatabaseConfig(PostgresConfig()), log=LogConfig()
    )
    pg = settings.database.postgres
    assert (pg.host, pg.port, pg.name, pg.username, pg.password) == (
        "localhost",
        5432,
        "postgres",
        "postgres",
        "",
    )
    assert (pg.max_open_conns, pg.max_idle_conns, pg.timeout, pg.max_retries) == (25, 5, 5.0, 5)
    assert (pg.retry_delay, pg.conn_max_lifetime, pg.sslmode) == (0.5, 3600.0, "prefer")
    assert settings.log == LogConfig(level="INFO", json=False, sql=False, slow_query_threshold=0)


def test_named_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[tmp_path / "nope.toml", "also-missing.yaml"])
    assert problems_of(exc) == [
        f"file:{tmp_path / 'nope.toml'}: not found",
        f"file:{tmp_path / 'also-missing.yaml'}: not found",
    ]


def test_missing_files_of_the_config_dir_are_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(tmp_path))  # an empty directory
    assert load_settings().database.postgres == PostgresConfig()


def test_default_files_come_from_dbkit_config_dir(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(files[0].parent))
    assert default_settings_files() == [files[0].parent / "settings.toml", files[1]]
    pg = load_settings().database.postgres
    assert (pg.host, pg.name, pg.password) == ("db.default", "dbkit_dev", SECRET)


def test_default_files_are_config_under_the_working_directory(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(files[0].parent.parent)
    files[0].parent.rename(files[0].parent.parent / "config")
    assert load_settings().database.postgres.name == "dbkit_dev"


def test_the_repository_config_loads_in_every_environment(tmp_path: Path) -> None:
    secrets = tmp_path / ".secrets.toml"
    secrets.write_bytes((REPO_CONFIG / ".secrets.toml.example").read_bytes())
    paths = [REPO_CONFIG / "settings.toml", secrets]
    dev = load_settings("development", paths).database.postgres
    assert (dev.name, dev.health_check_interval, dev.password) == ("dbkit_dev", 10.0, "change-me")
    assert (dev.conn_max_lifetime, dev.conn_max_idle_time, dev.retry_delay) == (3600, 300, 0.5)
    test = load_settings("testing", paths).database.postgres
    assert (test.name, test.max_retries, test.retry_delay, test.health_check_interval) == (
        "dbkit_test",
        2,
        0.1,
        0.0,
    )
    prod = load_settings("production", paths)
    assert prod.database.postgres.sslmode == "verify-full"
    assert (prod.database.postgres.max_open_conns, prod.database.postgres.max_idle_conns) == (
        50,
        10,
    )
    assert prod.database.postgres.name == "dbkit"  # [default] kept under the override
    assert prod.log.json is True


def test_local_file_overrides_its_base_file(files: list[Path]) -> None:
    write(files[0].with_name("settings.local.toml"), "[default.database.postgres]\nport = 6000\n")
    assert load_settings(settings_files=files).database.postgres.port == 6000


# ------------------------------------------------------------ precedence and environments


def test_precedence_default_then_env_section_then_env_var(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = load_settings("production", files).database.postgres
    assert pg.host == "db.prod"  # section over [default]
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__HOST", "db.env")
    pg = load_settings("production", files).database.postgres
    assert pg.host == "db.env"  # env var over the section
    assert pg.port == 5432 and pg.sslmode == "verify-full"


def test_fast_paths_setting_from_file_and_environment(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings("production", files).database.postgres.fast_paths is True
    write(
        files[0].with_name("settings.local.toml"),
        "[default.database.postgres]\nfast_paths = false\n",
    )
    assert load_settings("production", files).database.postgres.fast_paths is False
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__FAST_PATHS", "true")
    assert load_settings("production", files).database.postgres.fast_paths is True
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__FAST_PATHS", "sometimes")
    with pytest.raises(ConfigError, match="fast_paths"):
        load_settings("production", files)


def test_env_section_merges_key_by_key(files: list[Path]) -> None:
    pg = load_settings("production", files).database.postgres
    # [production] sets only host and sslmode; everything else is [default]'s or the default.
    assert (pg.host, pg.sslmode) == ("db.prod", "verify-full")
    assert (pg.name, pg.max_open_conns, pg.max_idle_conns) == ("dbkit", 20, 4)
    assert (pg.conn_max_lifetime, pg.retry_delay, pg.password) == (3600.0, 0.5, SECRET)
    assert pg.timeout == 5.0  # dataclass default, set nowhere
    log = load_settings("production", files).log
    assert (log.json, log.level) == (True, "INFO")


def test_dbkit_env_switches_and_env_argument_wins(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(settings_files=files).env == "development"
    monkeypatch.setenv("DBKIT_ENV", "testing")
    settings = load_settings(settings_files=files)
    assert (settings.env, settings.database.postgres.name) == ("testing", "dbkit_test")
    assert settings.database.postgres.max_retries == 2
    settings = load_settings("Production", files)
    assert (settings.env, settings.database.postgres.host) == ("production", "db.prod")


@pytest.mark.parametrize("how", ["argument", "DBKIT_ENV"])
def test_unknown_environment(how: str, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "DBKIT_ENV":
        monkeypatch.setenv("DBKIT_ENV", "prod")
    with pytest.raises(ConfigError) as exc:
        load_settings("prod" if how == "argument" else None, files)
    (problem,) = problems_of(exc)
    assert "unknown environment 'prod'" in problem
    assert "development, testing, production" in problem
    assert ("DBKIT_ENV" in problem) is (how == "DBKIT_ENV")


def test_an_environment_a_file_defines_is_known(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[staging.database.postgres]\nhost = "db.staging"\n')
    assert load_settings("staging", [path]).database.postgres.host == "db.staging"
    with pytest.raises(
        ConfigError, match="known environments: development, testing, production, staging"
    ):
        load_settings("qa", [path])


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1.5h", 5400.0),
        ("2m3.5s", 123.5),
        ("0", 0.0),
        ("100us", 0.0001),
        ("100µs", 0.0001),
        ("100μs", 0.0001),
        ("250ns", 250e-9),
        ("1h0m0s", 3600.0),
        (".5s", 0.5),
        ("-1s", -1.0),
        ("  5m ", 300.0),
        ("1.5", 1.5),
        ("45", 45.0),
        ("1e3", 1000.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("text", ["5 seconds", "1d", "h", "", "1H", "1h 30m", "nan", "inf", "--1s"])
def test_parse_duration_rejects_bad_text_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_duration(text)


@pytest.mark.parametrize("value", [True, None, [1], {"s": 1}])
def test_parse_duration_rejects_other_types(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (3600, "1h0m0s"), (300, "5m0s"), (1.5, "1.5s"), (0.5, "500ms"), (0.0001, "100µs")],
)
def test_format_duration_is_gos_and_parses_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_from_files_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "s.toml",
        """[default.database.postgres]
conn_max_lifetime = "1h30m"
conn_max_idle_time = 90
timeout = 2.5
health_check_interval = "0"
statement_timeout = "250ms"
[default.log]
slow_query_threshold = "200ms"
""",
    )
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__RETRY_DELAY", "1.5s")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PING_AFTER_IDLE", "2")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__IDLE_IN_TRANSACTION_SESSION_TIMEOUT", "1m")
    settings = load_settings(settings_files=[path])
    pg = settings.database.postgres
    assert (pg.conn_max_lifetime, pg.conn_max_idle_time, pg.timeout) == (5400.0, 90.0, 2.5)
    assert (pg.health_check_interval, pg.statement_timeout) == (0.0, 0.25)
    assert (pg.retry_delay, pg.ping_after_idle, pg.idle_in_transaction_session_timeout) == (
        1.5,
        2.0,
        60.0,
    )
    assert all(type(getattr(pg, f)) is float for f in ("conn_max_idle_time", "ping_after_idle"))
    assert settings.log.slow_query_threshold == 0.2


def test_direct_construction_coerces_too() -> None:
    pg = PostgresConfig(port="6543", timeout="1.5s", max_open_conns=" 8 ", sslmode="REQUIRE")  # type: ignore[arg-type]
    assert (pg.port, pg.timeout, pg.max_open_conns, pg.sslmode) == (6543, 1.5, 8, "require")
    assert type(pg.port) is int


# ------------------------------------------------------------------- env var casting


def test_env_vars_are_cast_to_the_field_type(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PORT", "6543")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__MAX_OPEN_CONNS", "40")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__MAX_RETRIES", "0")
    monkeypatch.setenv("DBKIT_LOG__JSON", "true")
    monkeypatch.setenv("DBKIT_LOG__SQL", "0")
    monkeypatch.setenv("DBKIT_LOG__LEVEL", "debug")
    settings = load_settings(settings_files=files)
    pg = settings.database.postgres
    assert (pg.port, pg.max_open_conns, pg.max_retries) == (6543, 40, 0)
    assert type(pg.port) is int
    assert (settings.log.json, settings.log.sql, settings.log.level) == (True, False, "DEBUG")
    assert pg.host == "db.default"  # untouched keys keep the file's values


def test_env_var_names_are_case_insensitive_after_the_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DBKIT_database__postgres__host", "lower.example")
    assert load_settings(settings_files=[]).database.postgres.host == "lower.example"


def test_bad_env_int_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PORT", "54x2")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[])
    assert problems_of(exc) == [
        "database.postgres.port: '54x2' is not an integer (from env:DBKIT_DATABASE__POSTGRES__PORT)"
    ]


@pytest.mark.parametrize(
    "password",
    [
        "0123",
        "true",
        "1e3",
        "0x1F",
        "@int 5",
        '"quoted"',
        "p@ss#word",
        "12_345",
        "2024-01-01",
        "@int hunter2",
        "@format {this.x}",
        "[1,2]",
        " spaced ",
        "null",
    ],
)
def test_string_fields_keep_the_exact_env_text(
    password: str, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PW_VAR, password)
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__NAME", "0123")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__USERNAME", "true")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__APPLICATION_NAME", "1e3")
    pg = load_settings(settings_files=files).database.postgres
    assert pg.password == password
    assert (pg.name, pg.username, pg.application_name) == ("0123", "true", "1e3")


def test_empty_cert_path_env_var_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__SSLROOTCERT", "")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__SSLCERT", "/etc/dbkit/client.crt")
    pg = load_settings(settings_files=[]).database.postgres
    assert (pg.sslrootcert, pg.sslcert, pg.sslkey) == (None, "/etc/dbkit/client.crt", None)


# -------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"port": 0}, "database.postgres.port: 0 is not between 1 and 65535"),
        ({"port": 65536}, "database.postgres.port: 65536 is not between 1 and 65535"),
        ({"port": True}, "database.postgres.port: expected an integer, got the boolean True"),
        ({"port": 5432.5}, "database.postgres.port: expected an integer, got float 5432.5"),
        ({"sslmode": "maybe"}, "database.postgres.sslmode: 'maybe' is not one of disable, allow"),
        (
            {"max_open_conns": 2, "max_idle_conns": 3},
            "database.postgres.max_idle_conns: 3 is greater than max_open_conns (2)",
        ),
        ({"max_open_conns": -1}, "database.postgres.max_open_conns: -1 must not be negative"),
        ({"max_idle_conns": -1}, "database.postgres.max_idle_conns: -1 must not be negative"),
        ({"max_retries": -2}, "database.postgres.max_retries: -2 must not be negative"),
        (
            {"conn_max_lifetime": "-1s"},
            "database.postgres.conn_max_lifetime: -1s must not be negative",
        ),
        ({"retry_delay": -0.5}, "database.postgres.retry_delay: -0.5s must not be negative"),
        ({"timeout": 0}, "database.postgres.timeout: 0s must be greater than 0"),
        ({"timeout": "0s"}, "database.postgres.timeout: 0s must be greater than 0"),
        ({"host": ""}, "database.postgres.host: must not be empty"),
        ({"name": "  "}, "database.postgres.name: must not be empty"),
        (
            {"health_check_interval": "5 sec"},
            "database.postgres.health_check_interval: invalid duration '5 sec'",
        ),
        ({"host": 5}, "database.postgres.host: expected a string, got int"),
        ({"sslrootcert": 1}, "database.postgres.sslrootcert: expected a string, got int"),
    ],
)
def test_each_validation_error(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        PostgresConfig(**changes)  # type: ignore[arg-type]
    (problem,) = problems_of(exc)
    assert problem.startswith(expected)


def test_idle_may_equal_open_and_anything_goes_when_open_is_unlimited() -> None:
    assert PostgresConfig(max_open_conns=3, max_idle_conns=3).max_idle_conns == 3
    assert PostgresConfig(max_open_conns=0, max_idle_conns=100).max_idle_conns == 100
    assert PostgresConfig(conn_max_lifetime=0, health_check_interval="0").conn_max_lifetime == 0  # type: ignore[arg-type]


def test_every_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "s.toml",
        """[default.database.postgres]
port = 0
sslmode = "maybe"
max_open_conns = 2
max_idle_conns = 3
conn_max_lifetime = "-5m"
max_open_con = 7
[default.log]
level = "LOUD"
levle = "INFO"
""",
    )
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__TIMEOUT", "soon")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    problems = problems_of(exc)
    src = f"(from file:{path} [default])"
    assert problems == [
        f"database.postgres.max_open_con: unknown setting (did you mean 'max_open_conns'?) {src}",
        f"log.levle: unknown setting (did you mean 'level'?) {src}",
        f"database.postgres.port: 0 is not between 1 and 65535 {src}",
        "database.postgres.sslmode: 'maybe' is not one of disable, allow, prefer, require, "
        f"verify-ca, verify-full {src}",
        f"database.postgres.max_idle_conns: 3 is greater than max_open_conns (2) {src}",
        f"database.postgres.conn_max_lifetime: -300s must not be negative {src}",
        "database.postgres.timeout: invalid duration 'soon': expected seconds (e.g. 1.5) or a "
        "Go duration such as '1h30m', '500ms', '30s' (from env:DBKIT_DATABASE__POSTGRES__TIMEOUT)",
        "log.level: 'LOUD' is not one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL "
        f"{src}",
    ]
    assert f"{len(problems)} problem(s)" in str(exc.value)
    assert all(p in str(exc.value) for p in problems)


def test_unknown_keys_in_env_vars_and_misplaced_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "s.toml", '[default.database]\npostgress = { host = "x" }\n')
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__MAX_OPEN_CON", "3")
    monkeypatch.setenv("DBKIT_LOG", "debug")
    monkeypatch.setenv("DBKIT_PG_BIN", "/usr/lib/postgresql/15/bin")  # not a setting: ignored
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert problems_of(exc) == [
        "database.postgres.max_open_con: unknown setting (did you mean 'max_open_conns'?) "
        "(from env:DBKIT_DATABASE__POSTGRES__MAX_OPEN_CON)",
        f"database.postgress.host: unknown setting (did you mean 'database.postgres.host'?) "
        f"(from file:{path} [default])",
        "log: expected a table of settings, not a single value (from env:DBKIT_LOG)",
    ]


def test_keys_are_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "s.toml", "[DEFAULT.database.postgres]\nPORT = 6000\nMax_Retries = 1\n")
    pg = load_settings(settings_files=[path]).database.postgres
    assert (pg.port, pg.max_retries) == (6000, 1)


def test_top_level_section_without_environment_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[database.postgres]\nhost = "x"\n')
    with pytest.raises(ConfigError, match=r"top-level \[database\] is not read"):
        load_settings(settings_files=[path])


def test_invalid_toml_names_the_file_without_its_text(tmp_path: Path) -> None:
    path = write(tmp_path / ".secrets.toml", f'[default.database.postgres]\npassword = "{SECRET}\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    (problem,) = problems_of(exc)
    assert problem.startswith(f"file:{path}: invalid TOML") and "line 2" in problem
    assert SECRET not in str(exc.value)


@pytest.mark.parametrize("name", ["settings.json", "settings.ini", "settings.tml", "settings"])
def test_only_toml_and_yaml_files(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "{}")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert problems_of(exc) == [
        f"file:{path}: only TOML (.toml) and YAML (.yaml, .yml) settings files are supported"
    ]


def test_dynaconf_value_syntax_failure_does_not_leak(tmp_path: Path) -> None:
    path = write(
        tmp_path / ".secrets.toml", f'[default.database.postgres]\npassword = "@int {SECRET}"\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert "settings files could not be loaded" in str(exc.value)
    assert SECRET not in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_url_in_a_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[default.database]\nurl = "postgresql://h/db"\n')
    with pytest.raises(ConfigError, match=r"database\.url: set the URL with the DATABASE_URL"):
        load_settings(settings_files=[path])


def test_log_config() -> None:
    assert LogConfig(level="warning").level == "WARNING"
    assert LogConfig(json="yes", sql="off").json is True  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as exc:
        LogConfig(level="LOUD", json="maybe", slow_query_threshold=-1)  # type: ignore[arg-type]
    assert [p.split(":")[0] for p in problems_of(exc)] == [
        "log.level",
        "log.json",
        "log.slow_query_threshold",
    ]


# ------------------------------------------------------------------------ DATABASE_URL


def test_database_url_overrides_connection_fields_only(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__HOST", "db.env")  # loses to the URL
    monkeypatch.setenv(
        "DATABASE_URL", "postgres://app%40corp:p%40ss%2Fw%3Ard%25@db.url:6543/appdb?sslmode=require"
    )
    pg = load_settings("production", files).database.postgres
    assert (pg.host, pg.port, pg.name, pg.username) == ("db.url", 6543, "appdb", "app@corp")
    assert pg.password == "p@ss/w:rd%"
    assert pg.sslmode == "require"
    # Pool fields stay from the settings.
    assert (pg.max_open_conns, pg.max_idle_conns, pg.conn_max_lifetime) == (20, 4, 3600.0)


def test_database_url_without_sslmode_keeps_the_settings_sslmode(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db.url/appdb")
    pg = load_settings("production", files).database.postgres
    assert pg.sslmode == "verify-full"
    # The URL has no password: the file's (meant for another server) is not sent to it.
    assert (pg.password, pg.port, pg.username) == ("", 5432, "u")


def test_dbkit_database_url_wins_over_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@plain/db1")
    monkeypatch.setenv("DBKIT_DATABASE__URL", "postgresql+psycopg://u@dbkit/db2?connect_timeout=9")
    pg = load_settings(settings_files=[]).database.postgres
    assert (pg.host, pg.name, pg.timeout) == ("dbkit", "db2", 9.0)


def test_bad_database_url_does_not_echo_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"mysql://u:{SECRET}@h/db")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[])
    assert problems_of(exc) == [
        "DATABASE_URL: scheme 'mysql' is not PostgreSQL (use postgresql:// or postgresql+psycopg://)"
    ]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@h:notaport/db")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[])
    assert "DATABASE_URL: not a valid URL" in str(exc.value)
    assert SECRET not in str(exc.value)


# ----------------------------------------------------------------------- from_url, url()


def test_from_url_with_overrides() -> None:
    pg = PostgresConfig.from_url(
        "postgresql+psycopg://me:p%23w@db.example:5433/app"
        "?sslmode=verify-ca&sslrootcert=/ca.pem&application_name=batch&connect_timeout=3",
        max_open_conns=5,
        timeout="750ms",
    )
    assert (pg.host, pg.port, pg.name, pg.username, pg.password) == (
        "db.example",
        5433,
        "app",
        "me",
        "p#w",
    )
    assert (pg.sslmode, pg.sslrootcert, pg.application_name) == ("verify-ca", "/ca.pem", "batch")
    assert pg.timeout == 0.75  # the override wins over connect_timeout
    assert pg.max_open_conns == 5
    assert pg.max_idle_conns == 5 and pg.max_retries == 5  # defaults, as everywhere


def test_from_url_defaults_and_socket_host() -> None:
    pg = PostgresConfig.from_url("postgres:///appdb?host=/var/run/postgresql")
    assert (pg.host, pg.port, pg.name, pg.username, pg.password) == (
        "/var/run/postgresql",
        5432,
        "appdb",
        "postgres",
        "",
    )
    assert PostgresConfig.from_url("postgresql://h").name == "postgres"


def test_from_url_lowering_open_conns_lowers_default_idle_like_go() -> None:
    assert PostgresConfig.from_url("postgresql://h/db", max_open_conns=2).max_idle_conns == 2
    with pytest.raises(ConfigError, match="3 is greater than max_open_conns"):
        PostgresConfig.from_url("postgresql://h/db", max_open_conns=2, max_idle_conns=3)


def test_from_url_bad_overrides_are_all_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        PostgresConfig.from_url("postgresql://h/db", max_open_con=5, port=0)
    assert problems_of(exc) == [
        "database.postgres.max_open_con: unknown setting (did you mean 'max_open_conns'?)",
        "database.postgres.port: 0 is not between 1 and 65535",
    ]


def test_from_url_rejects_other_schemes() -> None:
    with pytest.raises(ConfigError, match="scheme 'sqlite' is not PostgreSQL"):
        PostgresConfig.from_url("sqlite:///x.db")


def test_url_round_trips_the_password_and_str_masks_it() -> None:
    pg = PostgresConfig(
        host="db.example", port=6543, name="app", username="me@corp", password=f"{SECRET}/@:#%"
    )
    url = pg.url()
    assert url.drivername == "postgresql+psycopg"
    assert url.password == f"{SECRET}/@:#%"
    assert SECRET not in str(url) and SECRET not in repr(url)
    assert "***" in str(url)
    text = url.render_as_string(hide_password=False)
    assert make_url(text).password == f"{SECRET}/@:#%"
    assert url.query["sslmode"] == "prefer" and url.query["connect_timeout"] == "5"
    assert PostgresConfig.from_url(text) == pg
    assert pg.url("postgresql").drivername == "postgresql"


def test_url_without_password_and_with_socket_dir() -> None:
    url = PostgresConfig(host="/var/run/postgresql").url()
    assert url.password is None and url.host is None
    assert url.query["host"] == "/var/run/postgresql"
    assert PostgresConfig.from_url(url).host == "/var/run/postgresql"


def test_safe_dsn() -> None:
    pg = PostgresConfig(host="db", port=6543, name="app", username="me", password=SECRET)
    assert pg.safe_dsn() == "postgresql://me@db:6543/app"
    assert PostgresConfig(host="::1").safe_dsn() == "postgresql://postgres@[::1]:5432/postgres"


# ---------------------------------------------------------------- secrets, frozen, replace


def test_password_never_in_repr_str_or_errors(files: list[Path]) -> None:
    settings = load_settings(settings_files=files)
    pg = settings.database.postgres
    assert pg.password == SECRET
    for text in (repr(settings), str(settings), repr(pg), str(pg), pg.safe_dsn(), str(pg.url())):
        assert SECRET not in text
    with pytest.raises(ConfigError) as exc:
        PostgresConfig(password=SECRET, port=0, host="")
    assert SECRET not in str(exc.value) and SECRET not in repr(exc.value)
    with pytest.raises(ConfigError) as exc:
        PostgresConfig(password=12345)  # type: ignore[arg-type]
    assert "12345" not in str(exc.value)
    assert problems_of(exc) == ["database.postgres.password: expected a string, got int (quote it)"]


def test_password_wrong_type_from_a_file_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path / ".secrets.toml", "[default.database.postgres]\npassword = 987654321\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert "987654321" not in str(exc.value)
    assert "database.postgres.password: expected a string, got int" in str(exc.value)


def test_configs_are_frozen(files: list[Path]) -> None:
    settings = load_settings(settings_files=files)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.database.postgres.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log.level = "DEBUG"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.env = "production"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        settings.database.postgres.extra = 1  # type: ignore[attr-defined]  # slots


def test_replace_validates_and_keeps_the_rest() -> None:
    pg = PostgresConfig(password=SECRET, max_open_conns=10, max_idle_conns=8)
    changed = pg.replace(host="other", timeout="2s")
    assert (changed.host, changed.timeout, changed.password, changed.max_idle_conns) == (
        "other",
        2.0,
        SECRET,
        8,
    )
    assert pg.host == "localhost"
    assert pg.replace(max_open_conns=4).max_idle_conns == 4  # Go's SetMaxOpenConns
    with pytest.raises(ConfigError) as exc:
        pg.replace(prot=1, sslmode="nope")
    assert problems_of(exc) == [
        "database.postgres.prot: unknown setting (did you mean 'port'?)",
        "database.postgres.sslmode: 'nope' is not one of disable, allow, prefer, require, "
        "verify-ca, verify-full",
    ]


def test_default_idle_follows_a_lower_open_limit_in_files(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "[default.database.postgres]\nmax_open_conns = 2\n")
    pg = load_settings(settings_files=[path]).database.postgres
    assert (pg.max_open_conns, pg.max_idle_conns) == (2, 2)


# ---------------------------------------------------------------------- describe_settings


def test_describe_settings_sources(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__MAX_RETRIES", "9")
    monkeypatch.setenv("DBKIT_LOG__SQL", "true")
    rows = describe_settings("production", files)
    by_key = {key: (value, source) for key, value, source in rows}
    settings_file, secrets_file = files
    assert [key for key, _, _ in rows][:3] == [
        "database.postgres.host",
        "database.postgres.port",
        "database.postgres.name",
    ]
    # Every field, then [database]'s read_from and max_replica_lag (no replicas here).
    assert (
        len(rows)
        == len(dataclasses.fields(PostgresConfig)) + len(dataclasses.fields(LogConfig)) + 2
    )
    assert by_key["database.read_from"] == ("primary", "default")
    assert by_key["database.max_replica_lag"] == ("10s", "default")
    assert by_key["database.postgres.host"] == ("db.prod", f"file:{settings_file} [production]")
    assert by_key["database.postgres.name"] == ("dbkit", f"file:{settings_file} [default]")
    assert by_key["database.postgres.password"] == ("***", f"file:{secrets_file} [default]")
    assert by_key["database.postgres.max_retries"] == (
        "9",
        "env:DBKIT_DATABASE__POSTGRES__MAX_RETRIES",
    )
    assert by_key["database.postgres.timeout"] == ("5s", "default")
    assert by_key["database.postgres.conn_max_lifetime"] == (
        "1h0m0s",
        f"file:{settings_file} [default]",
    )
    assert by_key["database.postgres.sslrootcert"] == ("", "default")
    assert by_key["log.json"] == ("true", f"file:{settings_file} [production]")
    assert by_key["log.sql"] == ("true", "env:DBKIT_LOG__SQL")
    assert all(SECRET not in value for _, value, _ in rows)


def test_describe_settings_database_url_source(
    files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@db.url/app?sslmode=disable")
    by_key = {key: (value, source) for key, value, source in describe_settings(None, files)}
    assert by_key["database.postgres.host"] == ("db.url", "env:DATABASE_URL")
    assert by_key["database.postgres.password"] == ("***", "env:DATABASE_URL")
    assert by_key["database.postgres.sslmode"] == ("disable", "env:DATABASE_URL")
    assert by_key["database.postgres.max_open_conns"] == ("20", f"file:{files[0]} [default]")
