"""The ``dbkit`` command line.  Exit codes: 0 ok, 1 the operation failed, 2 bad usage or
settings; a failure prints one line on stderr saying why (``--debug``: the traceback too).

Parsing only: each command's work lives in its module (dbkit.migrate, dbkit.local,
dbkit.scaffold, dbkit.demo …)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbkit.database import Database
from dbkit.errors import ConfigError, DbkitError, LockNotAvailable
from dbkit.settings import (
    CONFIG_DIR_VAR,
    PostgresConfig,
    default_settings_files,
    describe_settings,
    load_settings,
)

if TYPE_CHECKING:
    from dbkit.local import LocalPostgres
    from dbkit.scaffold import MetadataSpec

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_RUNNING = 3  # `dbkit local status`, as LSB init scripts say it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``timeout``, ``kill``), raised where Ctrl-C would be:
    psycopg cancels the running query, transactions roll back, a throwaway server stops.
    Python's default for SIGTERM is to die on the spot, leaving all that behind."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


# The advisory lock `dbkit demo` holds while it runs: one demo at a time per database (its
# load TRUNCATEs users_staging, which a second run would pull from under the first).
DEMO_LOCK = "dbkit.demo"


class CommandFailed(DbkitError):
    """A command's own failure: ``main`` prints the message and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbkit",
        description="dbkit: PostgreSQL toolkit command line",
        epilog=(
            "Exit codes: 0 ok, 1 the operation failed, 2 bad usage or settings.  A failure "
            "prints one line on stderr; --debug adds the traceback."
        ),
    )
    parser.add_argument("--env", help="settings environment (development, testing, production)")
    parser.add_argument(
        "--settings",
        action="append",
        metavar="FILE",
        help=(
            "one more settings file, loaded after the default ones (config/settings.toml, "
            "config/.secrets.toml), so its values win; repeatable, the last one wins"
        ),
    )
    parser.add_argument("--debug", action="store_true", help="on failure, print the traceback too")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="connect (with retries), then print health, server version and pool stats"
    )
    check.add_argument("--url", help="database URL (overrides settings and DATABASE_URL)")
    check.add_argument(
        "--local", action="store_true", help="check a throwaway local PostgreSQL (dbkit.local)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--instances",
        type=_count,
        metavar="N",
        help=(
            "also check the connection budget of N processes like this one: N x "
            "max_open_conns against the server's max_connections less its reserved slots "
            "(exit 1 when they would exhaust it)"
        ),
    )
    check.set_defaults(handler=_check)

    config = commands.add_parser(
        "config", help="the effective settings, secrets masked, and where each value came from"
    )
    config.add_argument("--json", action="store_true", help="print the settings as JSON")
    config.set_defaults(handler=_config)

    _add_init(commands)
    _add_migrate(commands)
    _add_local(commands)
    _add_demo(commands)

    recover = commands.add_parser(
        "recover",
        help="finish the distributed transactions crashed coordinators left prepared",
        description=(
            "Two-phase commit recovery (dbkit.recover_prepared): on the databases named, "
            "commit the prepared parts whose commit was decided and roll back the rest, "
            "leaving alone those whose coordinator still runs and those that are not "
            "dbkit's.  The first URL is the database that holds the decision log (the "
            "first of distributed_transaction's databases).  Safe to run at any time, "
            "concurrently, and again."
        ),
    )
    recover.add_argument(
        "--url", action="append", required=True, metavar="URL", help="a participant (repeat)"
    )
    recover.add_argument("--json", action="store_true", help="print the report as JSON")
    recover.set_defaults(handler=_recover)
    return parser


def _recover(args: argparse.Namespace) -> int:
    from dbkit.twophase import recover_prepared

    with contextlib.ExitStack() as stack:
        dbs = [stack.enter_context(Database.from_url(url)) for url in args.url]
        report = recover_prepared(*dbs)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return EXIT_OK
    print(f"committed {len(report.committed)}, rolled back {len(report.rolled_back)}")
    for label, gids in (
        ("committed", report.committed),
        ("rolled back", report.rolled_back),
        ("left to its running coordinator", report.in_progress),
        ("not dbkit's, left alone", report.foreign),
    ):
        for name in gids:
            print(f"  {label:32} {name}")
    if report.pruned:
        print(f"pruned {report.pruned} decision(s) from the log")
    return EXIT_OK


def _add_init(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dbkit init [DIR] [--metadata MODULE:ATTR]`` (see dbkit.scaffold)."""
    init = commands.add_parser(
        "init",
        help="scaffold a project: alembic.ini, migrations/, config/, conftest.py",
        description=(
            "Write what a project needs to use dbkit for its own schema: alembic.ini and "
            "migrations/ (env.py runs dbkit's migration runner with your MetaData), "
            "config/settings.toml and config/.secrets.toml.example (and a .gitignore line "
            "for config/.secrets.toml), conftest.py enabling the dbkit.testing pytest "
            "plugin, and pytest.ini when the project has no pytest configuration.  A file "
            "that exists is never overwritten: it is skipped, and listed as such."
        ),
    )
    init.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="the project's directory (default: the current one; created if missing)",
    )
    init.add_argument(
        "--metadata",
        type=_metadata_spec,
        metavar="MODULE:ATTR",
        help=(
            "your tables' sqlalchemy MetaData, imported by migrations/env.py for "
            "autogenerate and `dbkit migrate check`, e.g. orders.models:metadata"
        ),
    )
    init.add_argument(
        "--database",
        metavar="NAME",
        help="the database name in config/settings.toml (default: from DIR's name)",
    )
    init.set_defaults(handler=_init)


def _metadata_spec(text: str) -> MetadataSpec:
    from dbkit.scaffold import parse_metadata_spec

    try:
        return parse_metadata_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_local(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dbkit local start|stop|status|url|destroy``: a kept local PostgreSQL (dbkit.local),
    with its streaming replicas (``start --replicas N``) in DIR-replica-1, DIR-replica-2 …"""
    from dbkit.local import default_data_dir

    local = commands.add_parser(
        "local",
        help="a local PostgreSQL from this machine's binaries, data kept between runs",
        description="A kept local PostgreSQL, optionally with streaming replicas (hot "
        "standbys) kept next to its data directory as DIR-replica-1, DIR-replica-2 …: "
        "start starts them with it, stop and destroy handle them too, status lists them.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the cluster's directory (default: $DBKIT_LOCAL_DIR, else {default_data_dir()})",
    )
    actions = local.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start", parents=[common], help="initialise (first time) and start; print the URL"
    )
    start.add_argument("--port", type=int, help="TCP port (default: the last one, else free)")
    start.add_argument(
        "--replicas",
        type=_replica_count,
        default=0,
        metavar="N",
        help="also run N streaming replicas, made on first use (pg_basebackup) as "
        "DIR-replica-1 … and started with the server from then on (never fewer than made: "
        "`destroy` removes them all); stdout stays the primary's URL, the replicas' go to "
        "stderr and `dbkit local url --replica N|all`",
    )
    actions.add_parser(
        "stop", parents=[common], help="stop the server and its replicas; the data stays"
    )
    destroy = actions.add_parser(
        "destroy",
        parents=[common],
        help="stop the server and delete its data directory and its replicas' (asks first; "
        "--yes does not)",
    )
    destroy.add_argument(
        "--yes", action="store_true", help="do not ask: delete the cluster and all its data"
    )
    actions.add_parser(
        "status",
        parents=[common],
        help="print whether it and each replica run, with their URLs (exit 3 when one does not)",
    )
    url = actions.add_parser(
        "url",
        parents=[common],
        help="print its URL, for DATABASE_URL (exit 1 when it does not run)",
    )
    url.add_argument(
        "--replica",
        metavar="N|all",
        help="replica N's URL instead; all: every replica's, comma-separated, for "
        "DBKIT_DATABASE__REPLICA_URLS",
    )
    local.set_defaults(handler=_local)


def _replica_count(text: str) -> int:
    """A ``--replicas`` value: a whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {text!r}")
    return int(text)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from dbkit import demo

    parser = commands.add_parser(
        "demo",
        help="the batch demo: COPY, a set-based merge with rejects, streaming report",
        description=(
            "Load N user records (some invalid) into users_staging by COPY, merge them into "
            "users one chunk per transaction (the records users would refuse are found in "
            "SQL and written to import_rejects with the reason), stream a report, record a "
            "health check.  With no database "
            "configured (DATABASE_URL, DBKIT_DATABASE__POSTGRES__*, a settings file of "
            "yours, --url), it runs on a throwaway local PostgreSQL, migrated first and "
            "stopped at the end.  A configured database must be migrated already."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--rows",
        type=_count,
        default=demo.DEFAULT_ROWS,
        metavar="N",
        help=f"records to generate (default {demo.DEFAULT_ROWS})",
    )
    source.add_argument("--csv", type=Path, metavar="PATH", help="read records from a CSV")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="database URL (must be migrated: dbkit migrate upgrade)")
    target.add_argument(
        "--local", action="store_true", help="use a throwaway local PostgreSQL in any case"
    )
    parser.add_argument(
        "--chunk-size",
        type=_count,
        default=demo.CHUNK_SIZE,
        metavar="N",
        help=f"records per transaction (default {demo.CHUNK_SIZE})",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="plain progress lines even in a terminal",
    )
    parser.add_argument(
        "--replicas",
        type=_replica_count,
        default=0,
        metavar="N",
        help="with a throwaway server: N streaming replicas too, and the report phase reads "
        "from one (a configured database's replicas come from its settings)",
    )
    parser.set_defaults(handler=_demo)


def _count(text: str) -> int:
    """A positive int for argparse, with its own error message."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_migrate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dbkit migrate upgrade|downgrade|stamp|current|history|heads|check|revision``
    (see dbkit.migrate)."""
    migrate = commands.add_parser(
        "migrate", help="schema migrations (Alembic, alembic.ini + migrations/)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="database URL: replaces the connection fields of the settings"
    )
    common.add_argument(
        "--ini",
        metavar="ALEMBIC_INI",
        help="alembic.ini to use (default: $DBKIT_ALEMBIC_INI, ./alembic.ini, the project's)",
    )
    actions = migrate.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser(
        "upgrade", parents=[common], help="upgrade to REVISION (default head), one transaction"
    )
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = actions.add_parser(
        "downgrade",
        parents=[common],
        help="downgrade to REVISION (default -1: one step; base: everything)",
    )
    downgrade.add_argument("revision", nargs="?", default="-1")
    stamp = actions.add_parser(
        "stamp",
        parents=[common],
        help="record REVISION as the database's current one, running no migration",
    )
    stamp.add_argument("revision", metavar="REVISION", help="a revision id, head, or base")
    revision = actions.add_parser(
        "revision",
        parents=[common],
        help="write a new revision script (--autogenerate: from the models' differences)",
        description=(
            "Write a new revision script into the migrations' versions directory.  With "
            "--autogenerate it holds what the models (the MetaData in migrations/env.py) "
            "have and the database (which must be at head) lacks; the database is only "
            "read.  Check the script before running it: autogenerate misses renames and "
            "some changes."
        ),
    )
    revision.add_argument("-m", "--message", required=True, help="what the revision does")
    revision.add_argument(
        "--autogenerate", action="store_true", help="compare the models with the database"
    )
    revision.add_argument("--rev-id", help="the revision id (default: a random one)")
    actions.add_parser("current", parents=[common], help="print the database's revision")
    actions.add_parser("history", parents=[common], help="list the revisions, oldest first")
    actions.add_parser("heads", parents=[common], help="print the head revision(s)")
    actions.add_parser(
        "check", parents=[common], help="fail (exit 1) when models and migrations disagree"
    )
    migrate.set_defaults(handler=_migrate)


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[tuple[PostgresConfig, str]]:
    """The database a command works on (--local, --url, or the settings) and the settings
    environment it belongs to."""
    if getattr(args, "local", False):
        from dbkit.local import LocalPostgres

        with LocalPostgres() as server:
            yield PostgresConfig.from_url(server.url), "local"
        return
    settings = load_settings(env=args.env, settings_files=_settings_files(args), url=_url(args))
    yield settings.database.postgres, settings.env


def _settings_files(args: argparse.Namespace) -> list[str] | None:
    """The ``--settings`` files: ``load_settings`` reads them after the config directory's
    own files (they add to them, and win)."""
    return list(args.settings) if args.settings else None


def _configured(args: argparse.Namespace) -> PostgresConfig:
    """The settings' database, with ``--url`` applied."""
    settings = load_settings(env=args.env, settings_files=_settings_files(args), url=_url(args))
    return settings.database.postgres


def _url(args: argparse.Namespace) -> str | None:
    """``--url``: it replaces the connection fields the way ``DATABASE_URL`` does (so
    retries, timeouts and SSL files still come from the settings), and counts as
    configuration where no settings file is found."""
    url: str | None = getattr(args, "url", None)
    return url


def _security_warnings(db: Database, env: str) -> list[str]:
    """What the seed design's security section asks an operator to fix."""
    warnings = []
    if db.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        warnings.append(
            f"connected as superuser {db.config.username!r}: give the application a role "
            "with only the privileges it needs"
        )
    if env == "production" and db.config.sslmode != "verify-full":
        warnings.append(
            f"sslmode is {db.config.sslmode!r} in production: use verify-full (with "
            "sslrootcert) so the server's certificate and host name are checked"
        )
    return warnings


@contextlib.contextmanager
def _target_database(args: argparse.Namespace) -> Iterator[tuple[Database, str]]:
    """``_target``'s database as a connected ``Database``, with the settings' replicas."""
    if getattr(args, "local", False):
        with _target(args) as (config, env), Database(config) as db:
            yield db, env
        return
    settings = load_settings(env=args.env, settings_files=_settings_files(args), url=_url(args))
    with Database.from_settings(settings) as db:
        yield db, settings.env


def _check(args: argparse.Namespace) -> int:
    from dbkit.budget import ConnectionBudget, connection_budgets

    budgets: dict[str, ConnectionBudget] = {}
    with _target_database(args) as (db, env):
        config = db.config
        health = db.health()
        version = db.scalar("SHOW server_version")
        warnings = _security_warnings(db, env)
        if args.instances is not None:
            budgets = connection_budgets(db, args.instances)
        report: dict[str, Any] = {
            "database": config.safe_dsn(),
            "environment": env,
            "server_version": version,
            "health": {"ok": health.ok, "latency_ms": round(health.latency_ms, 3)},
            "breaker": health.breaker,
            "pool": db.stats().as_dict(),
            "warnings": warnings,
        }
        if health.error:
            report["health"]["error"] = health.error
        if health.replicas:
            report["read_from"] = db.read_from
            report["replicas"] = [
                {**asdict(replica), "pool": db.pool_stats()[replica.name].as_dict()}
                for replica in health.replicas
            ]
        if budgets:
            report["connections"] = budgets["primary"].as_dict()
            if len(budgets) > 1:
                report["connections_by_server"] = {k: b.as_dict() for k, b in budgets.items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"database        {report['database']} ({env})")
        print(f"server version  {version}")
        status = "ok" if health.ok else f"FAILING: {health.error}"
        print(f"health          {status} ({health.latency_ms:.2f} ms), breaker {health.breaker}")
        print("pool")
        for key, value in report["pool"].items():
            print(f"  {key:22} {value}")
        for replica in health.replicas:
            lag = "down" if replica.lag_s is None else f"replay {replica.lag_s:.1f}s behind"
            state = "ok" if replica.ok else f"SKIPPED: {replica.error}"
            print(f"{replica.name:<15} {state} ({lag}), reads {db.read_from}")
        for name, budget in budgets.items():
            where = "" if name == "primary" else f" [{name}]"
            print(f"connections     {budget.fleet_arithmetic()}{where}")
            print(f"server slots    {budget.server_arithmetic()}{where}")
            print(f"budget          {budget.verdict()}{where}")
        for warning in warnings:
            print(f"WARNING: {warning}")
    problems = [p for p in (b.problem() for b in budgets.values()) if p is not None]
    if problems:
        sys.stdout.flush()
        raise CommandFailed("; ".join(problems))
    return EXIT_OK if health.ok else EXIT_FAILED


def _config(args: argparse.Namespace) -> int:
    files = _settings_files(args)
    settings = load_settings(env=args.env, settings_files=files)
    rows = describe_settings(env=settings.env, settings_files=files)
    if args.json:
        payload = {
            "environment": settings.env,
            "settings": {key: {"value": value, "source": src} for key, value, src in rows},
        }
        print(json.dumps(payload, indent=2))
        return EXIT_OK
    print(f"environment  {settings.env}")
    for path in [*default_settings_files(), *(Path(name) for name in files or ())]:
        print(f"file         {path}{'' if Path(path).exists() else ' (not found)'}")
    width = max(len(key) for key, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 40)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value:<{value_width}}  {source}")
    return EXIT_OK


def _local(args: argparse.Namespace) -> int:
    from dbkit.local import LocalPostgres, default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if args.action == "destroy":
        return _local_destroy(LocalPostgres(data_dir), args.yes)
    if args.action == "start":
        server = LocalPostgres(data_dir, port=args.port)
        if server.is_running():
            server.start()  # adopts the running server's port
            print(f"already running: {server.url}")
        else:
            server.start()
            print(server.url)
        print(f"data in {server.data_dir}, log {server.log_file}", file=sys.stderr)
        for replica in server.kept_replicas().values():
            replica.start()  # the ones made earlier come back with their primary
        while len(server.kept_replicas()) < args.replicas:
            server.start_replica()
        for number, replica in server.kept_replicas().items():
            print(f"replica {number}: {replica.url} (data in {replica.data_dir})", file=sys.stderr)
        return EXIT_OK
    running = LocalPostgres.attach(data_dir)
    replicas = (running or LocalPostgres(data_dir)).kept_replicas()
    if args.action == "stop":
        stopped = [(number, r) for number, r in replicas.items() if r.is_running()]
        for _, replica in reversed(stopped):  # replicas first: none waits for a gone primary
            replica.stop()
        if running is None:
            print(f"not running (data in {data_dir})")
        else:
            running.stop()
            print(f"stopped (data kept in {data_dir})")
        for number, replica in stopped:
            print(f"stopped replica {number} (data kept in {replica.data_dir})")
        return EXIT_OK
    if running is None:
        if args.action == "status":
            raise CommandFailed(f"not running (data in {data_dir})", EXIT_NOT_RUNNING)
        raise CommandFailed(
            f"no local server running in {data_dir}: start one with `dbkit local start`"
        )
    if args.action == "status":
        print(f"running at {running.url} (pid {running.pid}, data in {data_dir})")
        down = []
        for number, replica in replicas.items():
            if replica.is_running():
                role = "" if replica.is_replica else " (promoted: not a standby)"
                print(
                    f"replica {number} running at {replica.url}{role} "
                    f"(pid {replica.pid}, data in {replica.data_dir})"
                )
            else:
                print(f"replica {number} not running (data in {replica.data_dir})")
                down.append(str(number))
        if down:
            raise CommandFailed(
                f"replica {', '.join(down)} not running: `dbkit local start` starts it",
                EXIT_NOT_RUNNING,
            )
    elif args.replica is None:
        print(running.url)
    else:
        print(_replica_urls(replicas, args.replica))
    return EXIT_OK


def _replica_urls(replicas: dict[int, LocalPostgres], which: str) -> str:
    """``dbkit local url --replica N|all``: replica N's URL, or all of them comma-separated."""
    if not replicas:
        raise CommandFailed("no replicas: make some with `dbkit local start --replicas N`")
    if which == "all":
        chosen = list(replicas.items())
    elif which.isdigit() and int(which) in replicas:
        chosen = [(int(which), replicas[int(which)])]
    else:
        raise CommandFailed(
            f"no replica {which!r}: there are {', '.join(map(str, replicas))} (or all)",
            EXIT_USAGE,
        )
    for number, replica in chosen:
        if not replica.is_running():
            raise CommandFailed(f"replica {number} is not running: `dbkit local start` starts it")
    return ",".join(replica.url for _, replica in chosen)


def _local_destroy(server: LocalPostgres, yes: bool) -> int:
    data_dir = server.data_dir
    replicas = server.kept_replicas()
    exists = data_dir.exists() or data_dir.is_symlink()
    if not exists and not replicas:
        print(f"nothing to delete: no {data_dir}")
        return EXIT_OK
    what = str(data_dir)
    if replicas:
        what += f" and its replicas {', '.join(str(r.data_dir) for r in replicas.values())}"
    if not yes:
        if not sys.stdin.isatty():
            raise CommandFailed(
                f"would delete {what} and all its data: pass --yes to confirm", EXIT_USAGE
            )
        answer = input(f"stop the server and delete {what} with all its data? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return EXIT_OK
    for replica in reversed(replicas.values()):
        replica.destroy()
    server.destroy()
    if exists:
        print(f"deleted {data_dir}")
    for replica in replicas.values():
        print(f"deleted {replica.data_dir}")
    return EXIT_OK


def _database_configured(args: argparse.Namespace) -> bool:
    """Whether the user named a database, rather than leaving the project's defaults:
    ``--url``, a URL or connection variable in the environment, or a connection field in
    a settings file of their own (``--settings``, ``$DBKIT_CONFIG_DIR``, .secrets.toml)."""
    if args.url:
        return True
    defaults = default_settings_files()
    shipped = defaults[0] if defaults and not os.environ.get(CONFIG_DIR_VAR) else None
    connection = {"host", "port", "name", "username", "password"}
    for key, _, source in describe_settings(env=args.env, settings_files=_settings_files(args)):
        section, _, name = key.rpartition(".")
        if section != "database.postgres" or name not in connection or source == "default":
            continue
        if shipped is None or not source.startswith(f"file:{shipped} "):
            return True
    return False


@contextlib.contextmanager
def _demo_database(args: argparse.Namespace) -> Iterator[Database]:
    """The configured database, required to be at the head of the demo's own migrations;
    else a throwaway local server, migrated with them here and stopped (and deleted) on the
    way out, Ctrl-C included.  Never the working directory's alembic.ini (a user's project
    has its own migrations, not the demo's tables)."""
    from dbkit import demo

    if not args.local and _database_configured(args):
        if args.replicas:
            raise CommandFailed(
                "--replicas starts replicas of a throwaway server; a configured database's "
                "replicas come from its settings (DBKIT_DATABASE__REPLICA_URLS, "
                "[[database.replicas]])",
                EXIT_USAGE,
            )
        settings = load_settings(env=args.env, settings_files=_settings_files(args), url=_url(args))
        with Database.from_settings(settings) as db:
            try:
                demo.check_schema(db)
            except demo.DemoSchemaError as error:
                raise CommandFailed(str(error)) from error
            print(f"database    {db.config.safe_dsn()}")
            yield db
        return
    with demo.throwaway_database(replicas=args.replicas) as db:
        yield db


def _demo(args: argparse.Namespace) -> int:
    from dbkit import demo

    records: Iterable[demo.StagedUser]
    if args.csv is not None:
        if not args.csv.is_file():
            raise CommandFailed(f"no such file: {args.csv}", EXIT_USAGE)
        records, total, source = demo.read_csv(args.csv), None, str(args.csv)
    else:
        records, total = demo.generate(args.rows), args.rows
        source = f"{args.rows} generated records"
    with _demo_database(args) as db, contextlib.ExitStack() as held:
        try:  # before anything is written
            held.enter_context(db.advisory_lock(DEMO_LOCK, wait=False))
        except LockNotAvailable as error:
            holder = "pid unknown" if error.holder_pid is None else f"pid {error.holder_pid}"
            raise CommandFailed(
                f"another dbkit demo is running against {db.config.safe_dsn()} ({holder}); "
                "not starting"
            ) from error
        print(f"source      {source}", flush=True)
        result = demo.run(
            db,
            records,
            total=total,
            source=source,
            chunk_size=args.chunk_size,
            bar=False if args.no_progress else None,
        )
        demo.print_summary(result, sys.stdout)
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from dbkit import migrate

    ini = args.ini
    if args.action == "revision":
        return _revision(args)
    if args.action in ("history", "heads"):
        if args.action == "heads":
            for head in migrate.heads(config_path=ini):
                print(head)
            return EXIT_OK
        for info in migrate.revisions(config_path=ini):
            down = ", ".join(info.down_revisions) or "base"
            head = " (head)" if info.is_head else ""
            print(f"{down} -> {info.revision}{head}  {info.message}")
        return EXIT_OK

    config = _configured(args)
    with Database(config) as db:
        if args.action == "current":
            heads = migrate.heads(config_path=ini)
            revision = migrate.current(db)
            mark = " (head)" if revision in heads else ""
            print(f"{revision or 'base'}{mark}")
        elif args.action == "check":
            migrate.check(db, config_path=ini)
            print(f"ok: {config.safe_dsn()} is at head and matches the models")
        else:
            before, after = migrate.run_command(db, args.action, args.revision, config_path=ini)
            print(f"{args.action} {config.safe_dsn()}: {before or 'base'} -> {after or 'base'}")
    return EXIT_OK


def _revision(args: argparse.Namespace) -> int:
    from dbkit import migrate

    options: dict[str, Any] = {"rev_id": args.rev_id, "config_path": args.ini}
    if args.autogenerate:
        with Database(_configured(args)) as db:
            new = migrate.revision(args.message, autogenerate=True, target=db, **options)
    else:
        new = migrate.revision(args.message, **options)
    print(f"created revision {new.revision} in {_shown(new.path)}")
    for change in new.changes:
        print(f"  {change}")
    if args.autogenerate and not new.changes:
        print("  no differences between the models and the database: the revision is empty")
    return EXIT_OK


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _init(args: argparse.Namespace) -> int:
    from dbkit.scaffold import SECRETS_FILE, init_project

    report = init_project(args.directory, metadata=args.metadata, database=args.database)
    print(f"project     {report.directory}")
    for name in report.written:
        print(f"wrote       {name}")
    for name, why in report.skipped:
        print(f"skipped     {name} ({why})")
    gitignore = {
        "created": f"wrote       .gitignore ({SECRETS_FILE})",
        "added": f"added       {SECRETS_FILE} to .gitignore",
        "present": f"skipped     .gitignore (ignores {SECRETS_FILE} already)",
    }
    print(gitignore[report.gitignore])
    if not report.written:
        print("nothing written: every file exists already")
        return EXIT_OK
    print()
    print("next:")
    if args.metadata is None:
        print("  name your MetaData in migrations/env.py (target_metadata)")
    print("  point dbkit at a database: config/settings.toml, config/.secrets.toml or DATABASE_URL")
    print('  dbkit migrate revision --autogenerate -m "initial schema"')
    print("  dbkit migrate upgrade")
    print("  pytest            (dbkit.testing: a throwaway database, migrated, per run)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _sigterm_interrupts():
        return _run(args)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` while a command runs (main thread only: Python
    delivers signals there), and the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command, its failures turned into one line on stderr and an exit code (with
    ``--debug``, the traceback first)."""
    try:
        code: int = args.handler(args)
    except (Exception, KeyboardInterrupt) as error:
        if args.debug:
            traceback.print_exc()
        code, reason = _failure(error)
        print(f"dbkit {args.command}: {' '.join(reason.split())}", file=sys.stderr)
    return code


def _failure(error: BaseException) -> tuple[int, str]:
    """The exit code and the one-line reason for a command's failure."""
    if isinstance(error, Terminated):
        return EXIT_TERMINATED, "terminated"
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(error, CommandFailed):
        return error.code, str(error)
    if isinstance(error, ConfigError):
        return EXIT_USAGE, f"invalid settings: {'; '.join(error.problems)}"
    if isinstance(error, DbkitError):
        return EXIT_FAILED, str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return EXIT_FAILED, f"{error.strerror}{where}"
    # A bug, or a failure dbkit does not know: say what it is, and how to see more.
    return EXIT_FAILED, f"{type(error).__name__}: {error} (--debug shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
