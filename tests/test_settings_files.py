"""Settings files as a project uses them: YAML beside TOML, the config directory found from
anywhere in the project, no silent default database outside development and testing,
``--settings`` adding to the project's files, and the application's own ``[app]`` values.
Pure unit tests: no database."""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest

from dbkit.errors import ConfigError
from dbkit.settings import (
    DatabaseConfig,
    LogConfig,
    PostgresConfig,
    Settings,
    default_settings_files,
    describe_settings,
    find_config_dir,
    load_settings,
)

SECRET = "S3cr3t-pw-xyz"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No DBKIT_* / DATABASE_URL from the machine; the working directory is a fresh one."""
    for var in list(os.environ):
        if var.startswith("DBKIT_") or var == "DATABASE_URL":
            monkeypatch.delenv(var)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return exc.value.problems


SETTINGS_TOML = """\
[default.database.postgres]
host = "db.default"
name = "dbkit"
max_open_conns = 20
max_idle_conns = 4
conn_max_lifetime = "1h"
retry_delay = "500ms"
sslrootcert = "/etc/ca.pem"

[default.log]
level = "info"

[development.database.postgres]
name = "dbkit_dev"

[testing.database.postgres]
name = "dbkit_test"
max_retries = 2

[production.database.postgres]
host = "db.prod"
sslmode = "verify-full"
fast_paths = false

[production.log]
json = true
"""

SETTINGS_YAML = """\
default:
  database:
    postgres:
      host: db.default
      name: dbkit
      max_open_conns: 20
      max_idle_conns: 4
      conn_max_lifetime: 1h
      retry_delay: 500ms
      sslrootcert: /etc/ca.pem
  log:
    level: info

development:
  database:
    postgres:
      name: dbkit_dev

testing:
  database:
    postgres:
      name: dbkit_test
      max_retries: 2

production:
  database:
    postgres:
      host: db.prod
      sslmode: verify-full
      fast_paths: false
  log:
    json: true
"""


# ------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("env", ["development", "testing", "production"])
def test_yaml_gives_the_same_settings_and_sources_as_toml(
    tmp_path: Path, env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = write(tmp_path / "t" / "settings.toml", SETTINGS_TOML)
    yaml = write(tmp_path / "y" / "settings.yaml", SETTINGS_YAML)
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PORT", "6543")
    from_toml, from_yaml = load_settings(env, [toml]), load_settings(env, [yaml])
    assert from_yaml == from_toml
    assert from_yaml.database.postgres.port == 6543  # the environment still wins
    assert (
        from_yaml.database.postgres.name
        == {
            "development": "dbkit_dev",
            "testing": "dbkit_test",
            "production": "dbkit",
        }[env]
    )
    rows_toml = describe_settings(env, [toml])
    rows_yaml = describe_settings(env, [yaml])
    assert [(k, v, s.replace(str(yaml), "F")) for k, v, s in rows_yaml] == [
        (k, v, s.replace(str(toml), "F")) for k, v, s in rows_toml
    ]


def test_the_repository_config_reads_the_same_as_yaml(tmp_path: Path) -> None:
    yaml = importlib.import_module("dynaconf.vendor.ruamel.yaml")
    data = tomllib.loads((REPO_CONFIG / "settings.toml").read_text(encoding="utf-8"))
    converted = tmp_path / "settings.yaml"
    with converted.open("w", encoding="utf-8") as out:
        yaml.safe_dump(data, out)
    for env in ("development", "testing", "production"):
        assert load_settings(env, [converted]) == load_settings(
            env, [REPO_CONFIG / "settings.toml"]
        )


def test_config_dir_with_yaml_files_and_its_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "conf"
    write(config / "settings.yaml", SETTINGS_YAML)
    write(
        config / ".secrets.yml", f"default:\n  database:\n    postgres:\n      password: {SECRET}\n"
    )
    write(
        config / "settings.local.yaml", "default:\n  database:\n    postgres:\n      port: 6000\n"
    )
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(config))
    assert default_settings_files() == [config / "settings.yaml", config / ".secrets.yml"]
    pg = load_settings().database.postgres
    assert (pg.host, pg.name, pg.port, pg.password) == ("db.default", "dbkit_dev", 6000, SECRET)


def test_toml_settings_with_yaml_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "conf"
    write(config / "settings.toml", SETTINGS_TOML)
    write(
        config / ".secrets.yaml",
        f"default:\n  database:\n    postgres:\n      password: {SECRET}\n",
    )
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(config))
    pg = load_settings("production").database.postgres
    assert (pg.host, pg.password) == ("db.prod", SECRET)


@pytest.mark.parametrize(("first", "second"), [("toml", "yaml"), ("yaml", "yml"), ("toml", "yml")])
def test_one_file_in_two_formats_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    config = tmp_path / "conf"
    write(config / f"settings.{first}", "")
    write(config / f"settings.{second}", "")
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(config))
    with pytest.raises(ConfigError) as exc:
        load_settings()
    (problem,) = problems_of(exc)
    assert problem.startswith(f"{config}: settings.{first} and settings.{second} both exist")
    assert "keep one" in problem


def test_bad_yaml_values_name_the_field_and_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "settings.yaml",
        "default:\n"
        "  database:\n"
        "    postgres:\n"
        "      port: 0\n"
        "      max_open_con: 7\n"
        "      host:\n"  # YAML's empty value: null
        "      password: 987654321\n"
        "production:\n"
        "  log:\n"
        "    level: LOUD\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_settings("production", [path])
    default, production = f"(from file:{path} [default])", f"(from file:{path} [production])"
    assert problems_of(exc) == [
        f"database.postgres.max_open_con: unknown setting (did you mean 'max_open_conns'?) "
        f"{default}",
        f"database.postgres.host: expected a string, got null (quote it) {default}",
        f"database.postgres.port: 0 is not between 1 and 65535 {default}",
        f"database.postgres.password: expected a string, got int (quote it) {default}",
        "log.level: 'LOUD' is not one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL "
        f"{production}",
    ]
    assert "987654321" not in str(exc.value)


def test_yaml_null_unsets_an_optional_field(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", "default:\n  database:\n    postgres:\n      sslcert: ~\n")
    assert load_settings(settings_files=[path]).database.postgres.sslcert is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f'default:\n  database:\n    postgres:\n      password: "{SECRET}\n',
            "invalid YAML: found unexpected end of stream (line 5, column 1)",
        ),
        (
            f"default:\n  database:\n    postgres:\n      password: x\n      password: {SECRET}\n",
            'invalid YAML: found duplicate key "password" (line 5, column 7)',
        ),
        (
            f"default:\n\tdatabase: {SECRET}\n",
            "invalid YAML: found character '\\t' that cannot start any token (line 2, column 1)",
        ),
    ],
)
def test_invalid_yaml_names_the_file_and_line_without_its_text(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path / ".secrets.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert problems_of(exc) == [f"file:{path}: {expected}"]
    assert SECRET not in str(exc.value)


def test_yaml_tags_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path / "settings.yaml",
        f'default: !!python/object/apply:os.system ["touch {marker}"]\n',
    )
    with pytest.raises(ConfigError, match="invalid YAML: could not determine a constructor"):
        load_settings(settings_files=[path])
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "database:\n  postgres:\n    host: x\n",
            "top-level database: is not read; nest it under default: or an environment "
            "such as production:",
        ),
        ("- default\n- production\n", "expected sections (default:, development:, production: …)"),
        ("port: 5432\n", "top-level 'port' is not read; settings go in sections such as default:"),
    ],
)
def test_misplaced_yaml_settings_are_reported(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "settings.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    (problem,) = problems_of(exc)
    assert problem.startswith(f"file:{path}: {expected}")


def test_misplaced_toml_scalar_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.toml", 'host = "db"\n[default.log]\nlevel = "INFO"\n')
    with pytest.raises(ConfigError, match=r"top-level 'host' is not read.*\[default\]"):
        load_settings(settings_files=[path])


def test_empty_yaml_file_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.yaml", "# nothing yet\n")
    assert load_settings(settings_files=[path]).database.postgres == PostgresConfig()


def test_yaml_defines_new_environments(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yml", "staging:\n  database:\n    postgres:\n      host: db.stg\n")
    assert load_settings("staging", [path]).database.postgres.host == "db.stg"


# -------------------------------------------------------------- finding the config dir


def project(root: Path, fmt: str = "toml") -> Path:
    """A project with config/settings.<fmt> naming its database, and a nested package."""
    text = (
        '[default.database.postgres]\nname = "orders"\n'
        if fmt == "toml"
        else "default:\n  database:\n    postgres:\n      name: orders\n"
    )
    write(root / "config" / f"settings.{fmt}", text)
    (root / "src" / "orders" / "jobs").mkdir(parents=True)
    return root


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_config_dir_is_found_upward_from_a_subdirectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    root = project(tmp_path / "proj", fmt)
    monkeypatch.chdir(root / "src" / "orders" / "jobs")
    assert find_config_dir() == root / "config"
    assert load_settings().database.postgres.name == "orders"


def test_the_nearest_config_dir_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outer = project(tmp_path / "outer")
    inner = project(outer / "src" / "inner")
    write(inner / "config" / "settings.toml", '[default.database.postgres]\nname = "inner"\n')
    monkeypatch.chdir(inner / "src")
    assert load_settings().database.postgres.name == "inner"
    monkeypatch.chdir(outer / "src" / "orders")
    assert load_settings().database.postgres.name == "orders"


def test_a_config_dir_without_settings_files_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "proj")
    write(root / "src" / "config" / "logging.ini", "")  # someone else's config/
    monkeypatch.chdir(root / "src" / "orders")
    assert find_config_dir() == root / "config"
    assert find_config_dir(root / "src") == root / "config"


def test_config_dir_variable_wins_over_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "proj")
    elsewhere = write(
        tmp_path / "etc" / "settings.toml", '[default.database.postgres]\nname = "etc"\n'
    )
    monkeypatch.chdir(root)
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(elsewhere.parent))
    assert load_settings().database.postgres.name == "etc"


def test_config_dir_variable_must_name_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(tmp_path / "typo"))
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert problems_of(exc) == [f"DBKIT_CONFIG_DIR: {tmp_path / 'typo'} is not a directory"]


def test_no_config_dir_anywhere() -> None:
    assert find_config_dir() is None
    # What was looked for, not found: ./config's names.
    config = Path.cwd() / "config"
    assert default_settings_files() == [config / "settings.toml", config / ".secrets.toml"]
    assert load_settings().database.postgres == PostgresConfig()


def test_a_directory_name_with_glob_characters_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "orders[v2]*")
    monkeypatch.chdir(root)
    assert load_settings().database.postgres.name == "orders"


# --------------------------------------------- nothing configured outside development


def test_production_without_any_settings_is_an_error_naming_where_it_looked(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings("production")
    (problem,) = problems_of(exc)
    assert problem.startswith("no database configured for environment 'production': ")
    assert f"no config/ directory with a settings.toml or settings.yaml in {Path.cwd()}" in problem
    assert "DBKIT_CONFIG_DIR is not set" in problem
    assert "DATABASE_URL" in problem and "DBKIT_DATABASE__POSTGRES__HOST" in problem


def test_production_with_an_empty_config_dir_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBKIT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("DBKIT_ENV", "production")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    (problem,) = problems_of(exc)
    assert f"DBKIT_CONFIG_DIR ({tmp_path}) holds no settings.toml, settings.yaml" in problem


@pytest.mark.parametrize("env", ["development", "testing"])
def test_development_and_testing_fall_back_to_the_defaults(env: str) -> None:
    assert load_settings(env) == Settings(
        env=env, database=DatabaseConfig(PostgresConfig()), log=LogConfig()
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("DATABASE_URL", "postgresql://app@db.example/orders"),
        ("DBKIT_DATABASE__URL", "postgresql://app@db.example/orders"),
        ("DBKIT_DATABASE__POSTGRES__HOST", "db.example"),
        ("DBKIT_DATABASE__POSTGRES__NAME", "orders"),
    ],
)
def test_production_configured_by_the_environment_alone(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, value)
    assert load_settings("production").env == "production"


def test_a_password_alone_does_not_name_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PASSWORD", SECRET)
    monkeypatch.setenv("DBKIT_APP__CHUNK_SIZE", "5")
    with pytest.raises(ConfigError, match="no database configured") as exc:
        load_settings("production")
    assert SECRET not in str(exc.value)


def test_production_configured_by_a_file_or_the_url_argument(tmp_path: Path) -> None:
    path = write(tmp_path / "prod.toml", '[production.database.postgres]\nhost = "db.prod"\n')
    assert load_settings("production", [path]).database.postgres.host == "db.prod"
    pg = load_settings("production", url="postgresql://app@db.url/orders").database.postgres
    assert (pg.host, pg.name, pg.username) == ("db.url", "orders", "app")


def test_production_configured_by_the_project_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project(tmp_path / "proj") / "src")
    assert load_settings("production").database.postgres.name == "orders"


# ------------------------------------------------------------- settings_files add, url=


def test_named_files_add_to_the_config_dir_and_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "proj")
    write(root / "config" / "settings.toml", SETTINGS_TOML)
    write(
        root / "config" / ".secrets.toml",
        f'[default.database.postgres]\npassword = "{SECRET}"\nport = 6000\n',
    )
    extra = write(
        tmp_path / "override.yaml",
        "default:\n  database:\n    postgres:\n      host: db.override\n      port: 7000\n",
    )
    monkeypatch.chdir(root / "src")
    pg = load_settings(settings_files=[extra]).database.postgres
    assert (pg.host, pg.port) == ("db.override", 7000)  # over settings.toml and .secrets.toml
    assert (pg.name, pg.password, pg.max_open_conns) == ("dbkit_dev", SECRET, 20)  # kept
    by_key = {key: source for key, _, source in describe_settings(settings_files=[extra])}
    assert by_key["database.postgres.host"] == f"file:{extra} [default]"
    assert (
        by_key["database.postgres.name"]
        == f"file:{root / 'config' / 'settings.toml'} [development]"
    )
    assert (
        by_key["database.postgres.password"]
        == f"file:{root / 'config' / '.secrets.toml'} [default]"
    )


def test_naming_a_default_file_again_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "proj")
    write(root / "config" / ".secrets.toml", '[default.database.postgres]\nname = "secret"\n')
    monkeypatch.chdir(root)
    # settings.toml again would otherwise load after .secrets.toml and win.
    assert load_settings(settings_files=["config/settings.toml"]).database.postgres.name == "secret"


def test_passing_the_config_dirs_files_along_is_harmless(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path / "proj")  # no .secrets.toml
    extra = write(tmp_path / "extra.toml", "[default.database.postgres]\nport = 7000\n")
    monkeypatch.chdir(root)
    defaults = default_settings_files()
    assert defaults == [root / "config" / "settings.toml", root / "config" / ".secrets.toml"]
    pg = load_settings(settings_files=[*defaults, extra]).database.postgres
    assert (pg.name, pg.port) == ("orders", 7000)


def test_url_argument_wins_over_the_url_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_DATABASE__URL", "postgresql://u@from.env/db1")
    rows = describe_settings(url="postgresql://me@from.arg:6000/db2")
    by_key = {key: (value, source) for key, value, source in rows}
    assert by_key["database.postgres.host"] == ("from.arg", "url argument")
    assert by_key["database.postgres.port"] == ("6000", "url argument")
    with pytest.raises(ConfigError) as exc:
        load_settings(url=f"mysql://u:{SECRET}@h/db")
    assert problems_of(exc) == [
        "url argument: scheme 'mysql' is not PostgreSQL (use postgresql:// or postgresql+psycopg://)"
    ]


# ---------------------------------------------------------------------------- [app]

APP_TOML = """\
[default.app]
chunk_size = 500
dry_run = false
ratio = 0.5
label = "orders"
regions = ["eu", "us"]
api_token = "tok-123"

[default.app.orders]
source = "s3://bucket/orders"
retries = 3

[production.app]
chunk_size = 5000
regions = ["eu"]

[production.app.orders]
retries = 10
"""


def test_app_section_merges_like_dbkits_own_and_replaces_lists(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.toml", APP_TOML)
    app = load_settings("production", [path]).app
    assert app["chunk_size"] == 5000
    assert app["regions"] == ("eu",)  # replaced, not appended to ["eu", "us"]
    assert app["orders"] == {"source": "s3://bucket/orders", "retries": 10}
    assert (app["dry_run"], app["ratio"], app["label"]) == (False, 0.5, "orders")
    assert load_settings("development", [path]).app["regions"] == ("eu", "us")


def test_app_is_read_only_at_every_depth(tmp_path: Path) -> None:
    app = load_settings(settings_files=[write(tmp_path / "s.toml", APP_TOML)]).app
    assert isinstance(app, MappingProxyType) and isinstance(app["orders"], MappingProxyType)
    with pytest.raises(TypeError):
        app["chunk_size"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        app["orders"]["retries"] = 1
    settings = Settings(
        "development", DatabaseConfig(), LogConfig(), app={"a": {"b": [1, {"c": 2}]}}
    )
    assert settings.app == {"a": {"b": (1, {"c": 2})}}
    assert isinstance(settings.app["a"]["b"][1], MappingProxyType)


def test_app_in_yaml_equals_app_in_toml(tmp_path: Path) -> None:
    yaml = importlib.import_module("dynaconf.vendor.ruamel.yaml")
    toml = write(tmp_path / "s.toml", APP_TOML)
    converted = tmp_path / "s.yaml"
    with converted.open("w", encoding="utf-8") as out:
        yaml.safe_dump(tomllib.loads(APP_TOML), out)
    assert load_settings("production", [converted]).app == load_settings("production", [toml]).app


def test_app_keys_are_lower_case_and_an_empty_app_table_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", "[default.app]\nChunkSize = 1\n[production.app]\n")
    assert load_settings("production", [path]).app == {"chunksize": 1}
    assert load_settings(settings_files=[]).app == {}


def test_env_vars_override_app_values_typed_like_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "s.toml", APP_TOML)
    monkeypatch.setenv("DBKIT_APP__CHUNK_SIZE", "2000")
    monkeypatch.setenv("DBKIT_APP__DRY_RUN", "yes")
    monkeypatch.setenv("DBKIT_APP__RATIO", "0.25")
    monkeypatch.setenv("DBKIT_APP__LABEL", "0123")  # text in the files: stays text
    monkeypatch.setenv("DBKIT_APP__ORDERS__RETRIES", "4")
    monkeypatch.setenv("DBKIT_APP__NEW__DEEP__KEY", "42")  # nowhere in the files: text
    app = load_settings("production", [path]).app
    assert (app["chunk_size"], app["dry_run"], app["ratio"], app["label"]) == (
        2000,
        True,
        0.25,
        "0123",
    )
    assert app["orders"] == {"source": "s3://bucket/orders", "retries": 4}
    assert app["new"] == {"deep": {"key": "42"}}


def test_bad_app_env_vars_are_reported_without_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "s.toml", APP_TOML)
    monkeypatch.setenv("DBKIT_APP__CHUNK_SIZE", "lots-x1")
    monkeypatch.setenv("DBKIT_APP__DRY_RUN", "perhaps-x2")
    monkeypatch.setenv("DBKIT_APP__RATIO", "half-x3")
    monkeypatch.setenv("DBKIT_APP__REGIONS", "eu,us-x4")
    monkeypatch.setenv("DBKIT_APP__ORDERS", "x5")
    monkeypatch.setenv("DBKIT_APP__LABEL__SUB", "x6")
    monkeypatch.setenv("DBKIT_APP", "x7")
    with pytest.raises(ConfigError) as exc:
        load_settings("production", [path])
    assert problems_of(exc) == [
        "app.chunk_size: expected an integer, as in the settings files "
        "(from env:DBKIT_APP__CHUNK_SIZE)",
        "app.dry_run: expected true or false, as in the settings files "
        "(from env:DBKIT_APP__DRY_RUN)",
        "app.label.sub: app.label is a single value in the settings files, not a table "
        "(from env:DBKIT_APP__LABEL__SUB)",
        "app.orders: is a table in the settings files: set its keys one by one "
        "(from env:DBKIT_APP__ORDERS)",
        "app.ratio: expected a number, as in the settings files (from env:DBKIT_APP__RATIO)",
        "app.regions: is a list in the settings files: it cannot be set from the environment "
        "(from env:DBKIT_APP__REGIONS)",
        "app: expected a table of settings, not a single value (from env:DBKIT_APP)",
    ]
    assert not any(f"x{i}" in str(exc.value) for i in range(1, 8))


@pytest.mark.parametrize(
    ("text", "var", "expected"),
    [
        (
            "[default.orders]\nchunk_size = 500\n",
            None,
            "orders.chunk_size: unknown setting (the application's own values go under [app], "
            "e.g. app.orders.chunk_size) (from file:{path} [default])",
        ),
        (
            "",
            "DBKIT_ORDERS__CHUNK_SIZE",
            "orders.chunk_size: unknown setting (the application's own values go under [app], "
            "e.g. app.orders.chunk_size) (from env:DBKIT_ORDERS__CHUNK_SIZE)",
        ),
        (
            "[default]\napp = 5\n",
            None,
            "app: expected a table of settings, not a single value (from file:{path} [default])",
        ),
        (
            "[default.database]\nchunk_size = 5\n",
            None,
            "database.chunk_size: unknown setting (from file:{path} [default])",
        ),
    ],
)
def test_other_unknown_sections_are_still_errors_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, var: str | None, expected: str
) -> None:
    path = write(tmp_path / "settings.toml", text)
    if var:
        monkeypatch.setenv(var, "500")
    with pytest.raises(ConfigError) as exc:
        load_settings(settings_files=[path])
    assert problems_of(exc) == [expected.format(path=path)]


def test_top_level_app_table_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.toml", "[app]\nchunk_size = 5\n")
    with pytest.raises(
        ConfigError, match=r"top-level \[app\] is not read; put it under \[default.app\]"
    ):
        load_settings(settings_files=[path])


def test_describe_settings_lists_app_values_with_sources_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "s.toml", APP_TOML)
    monkeypatch.setenv("DBKIT_APP__ORDERS__RETRIES", "4")
    rows = describe_settings("production", [path])
    app_rows = [row for row in rows if row[0].startswith("app.")]
    assert (
        len(rows) - len(app_rows)
        == len(dataclasses.fields(PostgresConfig)) + len(dataclasses.fields(LogConfig)) + 2
    )  # and [database]'s read_from and max_replica_lag
    assert app_rows == [
        ("app.chunk_size", "5000", f"file:{path} [production]"),
        ("app.dry_run", "false", f"file:{path} [default]"),
        ("app.ratio", "0.5", f"file:{path} [default]"),
        ("app.label", "orders", f"file:{path} [default]"),
        ("app.regions", '["eu"]', f"file:{path} [production]"),
        ("app.api_token", "***", f"file:{path} [default]"),
        ("app.orders.source", "s3://bucket/orders", f"file:{path} [default]"),
        ("app.orders.retries", "4", "env:DBKIT_APP__ORDERS__RETRIES"),
    ]


def test_app_values_stay_out_of_repr_and_loading_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", APP_TOML)
    settings = load_settings(settings_files=[path])
    assert "tok-123" not in repr(settings) and "tok-123" not in str(settings)
    assert hash(settings) == hash(dataclasses.replace(settings))  # still hashable
    bad = write(tmp_path / "bad.toml", f'[default.app]\napi_token = "@int {SECRET}"\n')
    with pytest.raises(ConfigError, match="settings files could not be loaded") as exc:
        load_settings(settings_files=[bad])
    assert SECRET not in str(exc.value)


def test_replicas_inherit_the_primarys_fields_and_env_urls_replace_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "s.toml",
        """\
[default.database]
read_from = "Replica"
max_replica_lag = "2s"
[default.database.postgres]
host = "primary.internal"
password = "s3cret"
max_open_conns = 9
[[default.database.replicas]]
host = "r1.internal"
[[default.database.replicas]]
host = "r2.internal"
port = 5433
max_open_conns = 3
""",
    )
    database = load_settings("production", [path]).database
    assert (database.routing, database.max_replica_lag) == ("replica", 2.0)
    assert [(r.host, r.port, r.max_open_conns, r.password) for r in database.replicas] == [
        ("r1.internal", 5432, 9, "s3cret"),
        ("r2.internal", 5433, 3, "s3cret"),
    ]
    assert "s3cret" not in repr(database)
    monkeypatch.setenv("DBKIT_DATABASE__REPLICA_URLS", "postgresql://app@r9:6000/db")
    monkeypatch.setenv("DBKIT_DATABASE__READ_FROM", "prefer-replica")
    database = load_settings("production", [path]).database
    assert [(r.host, r.port, r.username, r.password) for r in database.replicas] == [
        ("r9", 6000, "app", "s3cret")
    ]
    assert database.routing == "prefer-replica"


def test_bad_replica_settings_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "s.toml",
        """\
[default.database]
read_from = "replica"
max_replica_lag = "-1s"
[[default.database.replicas]]
hots = "typo"
port = 70000
""",
    )
    with pytest.raises(ConfigError) as refused:
        load_settings("production", [path])
    text = "\n".join(problems_of(refused))
    assert "database.replicas[0].hots: unknown setting (did you mean 'host'?)" in text
    assert "database.replicas[0].port: 70000 is not between 1 and 65535" in text
    monkeypatch.setenv("DBKIT_DATABASE__READ_FROM", "replica")
    with pytest.raises(ConfigError, match="'replica' but no replica is configured"):
        load_settings("development")
    with pytest.raises(ConfigError, match="max_replica_lag"):
        load_settings(
            "development",
            [write(tmp_path / "t.toml", '[default.database]\nmax_replica_lag = "-1s"\n')],
        )
