"""The ``dbkit`` command line.  Exit codes: 0 ok, 1 the operation failed, 2 bad usage or
settings; a failure prints one line on stderr saying why."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from dbkit.database import Database
from dbkit.errors import ConfigError, DbkitError
from dbkit.settings import PostgresConfig, load_settings

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbkit", description="dbkit: PostgreSQL toolkit command line"
    )
    parser.add_argument("--env", help="settings environment (development, testing, production)")
    parser.add_argument(
        "--settings", action="append", metavar="FILE", help="settings file (repeatable)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="connect (with retries), then print health, server version and pool stats"
    )
    check.add_argument("--url", help="database URL (overrides settings and DATABASE_URL)")
    check.add_argument(
        "--local", action="store_true", help="check a throwaway local PostgreSQL (dbkit.local)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_check)
    _add_migrate(commands)
    return parser


def _add_migrate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dbkit migrate upgrade|downgrade|current|history|heads|check`` (see dbkit.migrate)."""
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
    settings = load_settings(env=args.env, settings_files=args.settings)
    yield _with_url(settings.database.postgres, args), settings.env


def _configured(args: argparse.Namespace) -> PostgresConfig:
    """The settings' database, with ``--url`` applied."""
    settings = load_settings(env=args.env, settings_files=args.settings)
    return _with_url(settings.database.postgres, args)


def _with_url(config: PostgresConfig, args: argparse.Namespace) -> PostgresConfig:
    """``--url`` replaces the connection fields the way ``DATABASE_URL`` does, so retries,
    timeouts and SSL files still come from the settings."""
    url = getattr(args, "url", None)
    return config.with_url(url) if url else config


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


def _check(args: argparse.Namespace) -> int:
    with _target(args) as (config, env), Database(config) as db:
        health = db.health()
        version = db.scalar("SHOW server_version")
        warnings = _security_warnings(db, env)
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
        for warning in warnings:
            print(f"WARNING: {warning}")
    return EXIT_OK if health.ok else EXIT_FAILED


def _migrate(args: argparse.Namespace) -> int:
    from dbkit import migrate

    ini = args.ini
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        problems = "; ".join(error.problems)
        print(f"dbkit {args.command}: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except DbkitError as error:
        reason = " ".join(str(error).split())
        print(f"dbkit {args.command}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"dbkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
