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
    return parser


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[PostgresConfig]:
    """The database a command works on: --local, --url, or the settings."""
    if getattr(args, "local", False):
        from dbkit.local import LocalPostgres

        with LocalPostgres() as server:
            yield PostgresConfig.from_url(server.url)
        return
    settings = load_settings(env=args.env, settings_files=args.settings)
    config = settings.database.postgres
    if getattr(args, "url", None):
        config = PostgresConfig.from_url(args.url)
    yield config


def _check(args: argparse.Namespace) -> int:
    with _target(args) as config, Database(config) as db:
        health = db.health()
        version = db.scalar("SHOW server_version")
        report: dict[str, Any] = {
            "database": config.safe_dsn(),
            "server_version": version,
            "health": {"ok": health.ok, "latency_ms": round(health.latency_ms, 3)},
            "pool": db.stats().as_dict(),
        }
        if health.error:
            report["health"]["error"] = health.error
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"database        {report['database']}")
        print(f"server version  {version}")
        status = "ok" if health.ok else f"FAILING: {health.error}"
        print(f"health          {status} ({health.latency_ms:.2f} ms)")
        print("pool")
        for key, value in report["pool"].items():
            print(f"  {key:22} {value}")
    return EXIT_OK if health.ok else EXIT_FAILED


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
