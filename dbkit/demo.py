"""The batch demo: a small ETL job, written the way we suggest you write yours.

1. extract: generate N user records (or read a CSV with an ``email`` and a ``name``
   column), some of them deliberately bad;
2. load: ``COPY`` them into ``users_staging``, one transaction, all or nothing;
3. merge: move them into ``users`` with ``Repository.merge_from_staging``, set-based, one
   transaction per chunk: one statement per chunk finds the records ``users`` would refuse
   (NOT NULL, the CHECK on ``email``) in SQL and writes them to ``import_rejects`` with
   the reason, and upserts the rest with ``INSERT … SELECT … ON CONFLICT``.  The
   database's constraints are the validation, read from its catalog: nothing is checked
   twice, nothing bad gets in.  Savepoint bisection is left for what no query predicts;
4. report: stream ``users`` through a server-side cursor into a small report;
5. record a ``health_checks`` row.

Only one copy runs at a time against a database: the job holds an advisory lock, and a
second copy exits at once (see ``dbkit.cli``).  Re-running is idempotent: the load
replaces staging, the merge rewrites no row that already holds the same values and
replaces each chunk's rejects.  An interrupted run leaves whole chunks only (each is one
transaction); running again completes the job.  Copy this module and change the parts that
are about users.

The demo's tables are dbkit's own schema (``dbkit.schema``), and it always migrates them with
the migrations the package ships (:func:`alembic_ini`), never with an ``alembic.ini`` or
settings found in the working directory: inside a project of yours, ``dbkit demo`` still
runs on its own throwaway server (:func:`throwaway_database`) with its own tables.
"""

from __future__ import annotations

import contextlib
import csv
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from dbkit import migrate
from dbkit.database import Database
from dbkit.errors import DbkitError
from dbkit.progress import Progress
from dbkit.repositories import HealthRepository, UserRepository
from dbkit.repository import Repository
from dbkit.repository.merge import MergeChunk, MergeResult
from dbkit.schema import import_rejects, users_staging
from dbkit.settings import PostgresConfig

__all__ = [
    "DemoInputError",
    "DemoResult",
    "DemoSchemaError",
    "Phase",
    "Reject",
    "StagedUser",
    "alembic_ini",
    "check_schema",
    "generate",
    "merge_staged",
    "migrate_schema",
    "print_summary",
    "read_csv",
    "run",
    "throwaway_database",
]

DEFAULT_ROWS = 100_000
CHUNK_SIZE = 5_000  # rows per transaction: what an interruption can cost, at most


# ------------------------------------------------------------------------ the tables


@dataclass
class StagedUser:
    """One input record as loaded: ``line`` is its line in the input, for the rejects."""

    line: int
    email: str | None
    name: str | None = None
    id: int | None = None


@dataclass
class Reject:
    """An input record the database refused, and why."""

    line: int
    email: str | None
    reason: str
    id: int | None = None
    rejected_at: Any = None


class StagingRepository(Repository[StagedUser]):
    table = users_staging
    model = StagedUser


class RejectRepository(Repository[Reject]):
    table = import_rejects
    model = Reject


# ------------------------------------------------------------------------ the schema


class DemoSchemaError(DbkitError):
    """The database the demo was given does not have the demo's tables (at their head)."""


def alembic_ini() -> Path:
    """The alembic.ini of the demo's schema as the package ships it (whatever the working
    directory holds): :func:`dbkit.migrate.packaged_alembic_ini`."""
    return migrate.packaged_alembic_ini()


def migrate_schema(target: migrate.Target) -> str | None:
    """Create (or bring up to date) the demo's tables in ``target`` with the demo's own
    migrations; the revision it is at now."""
    return migrate.upgrade(target, config_path=alembic_ini())


def check_schema(db: Database) -> None:
    """Raise :class:`DemoSchemaError` unless ``db`` is at the head of the demo's own
    migrations.  A database you name for the demo is never migrated by it: the message
    says how to do it, or to use a throwaway server."""
    ini = alembic_ini()
    current, heads = migrate.current(db), migrate.heads(config_path=ini)
    if current not in heads:
        raise DemoSchemaError(
            f"{db.config.safe_dsn()} is at revision {current or 'base'}, not at the demo's "
            f"{', '.join(heads)}: run `dbkit migrate upgrade` first, with the demo's "
            f"migrations (--ini {ini}), or use --local"
        )


@contextlib.contextmanager
def throwaway_database(out: IO[str] | None = None, *, replicas: int = 0) -> Iterator[Database]:
    """A throwaway local PostgreSQL from the machine's binaries (:class:`dbkit.local.
    LocalPostgres`), with ``replicas`` streaming replicas of it, migrated with the demo's
    own migrations and connected; stopped and deleted on the way out, Ctrl-C included.
    Nothing of the working directory's settings or alembic.ini is used: the servers' URLs
    are the whole configuration.  Where they run is printed to ``out`` (default stdout)."""
    from dbkit.local import LocalPostgres

    out = sys.stdout if out is None else out
    with LocalPostgres() as server, contextlib.ExitStack() as stack:
        print(f"database    throwaway local PostgreSQL {server.url}", file=out)
        print(
            f"            in {server.data_dir}, stopped and removed at exit", file=out, flush=True
        )
        standbys = []
        for _ in range(replicas):
            standby = server.start_replica()
            stack.callback(standby.stop)
            standbys.append(PostgresConfig.from_url(standby.url))
            print(f"replica     streaming replica {standby.url}", file=out, flush=True)
        with Database(PostgresConfig.from_url(server.url), replicas=standbys) as db:
            migrate_schema(db)
            yield db


# -------------------------------------------------------------------------- extract


class DemoInputError(DbkitError, ValueError):
    """The input cannot be loaded; the message names the file and line."""


DOMAINS = ("example.com", "example.org", "mail.test", "corp.test", "dbkit.dev")
FIRST_NAMES = ("Ada", "Alan", "Barbara", "Donald", "Edsger", "Frances", "Grace", "Ken")
LAST_NAMES = ("Hopper", "Knuth", "Liskov", "Lovelace", "Ritchie", "Thompson", "Turing")


def generate(n: int, *, seed: int = 2026) -> Iterator[StagedUser]:
    """``n`` records, the same ones for the same seed (so a re-run upserts, not adds).

    Every 997th has no ``@`` (the CHECK on ``users.email`` refuses it), every 1999th no
    email at all (NOT NULL refuses it), and every 101st repeats an earlier user's email
    with a new name (an update)."""
    if n < 0:
        raise ValueError(f"the number of records must not be negative, got {n}")
    rng = random.Random(seed)
    for line in range(1, n + 1):
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        email: str | None = _email(line)
        if line % 997 == 0:
            email = f"user{line}.{DOMAINS[line % len(DOMAINS)]}"
        elif line % 1999 == 0:
            email = None
        elif line % 101 == 0:
            email = _email(line // 2)
        yield StagedUser(line=line, email=email, name=name)


def _email(number: int) -> str:
    return f"user{number}@{DOMAINS[number % len(DOMAINS)]}"


def read_csv(path: str | Path) -> Iterator[StagedUser]:
    """The records of a CSV file with a header line naming an ``email`` column (and
    optionally ``name``); ``line`` is the record's line in the file.  Empty fields are
    NULL.  Unreadable input raises ``DemoInputError`` naming the line; since the load is
    one COPY in one transaction, nothing of the file is loaded then."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if "email" not in header:
                raise DemoInputError(
                    f"{path}: the first line must be a header naming an 'email' column "
                    f"(and optionally 'name'), got {header}"
                )
            for record in reader:
                fields = (record.get("email"), record.get("name"))
                if any(value and "\x00" in value for value in fields):
                    raise DemoInputError(
                        f"{path}:{reader.line_num}: a NUL character, which PostgreSQL text "
                        "cannot hold"
                    )
                email, name = (value.strip() or None if value else None for value in fields)
                yield StagedUser(line=reader.line_num, email=email, name=name)
    except OSError as error:
        raise DemoInputError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DemoInputError(f"{path}: not a UTF-8 CSV file: {error}") from None


# ----------------------------------------------------------------------------- load


def load_staging(db: Database, records: Iterable[StagedUser]) -> int:
    """Replace staging (and the previous run's rejects) with ``records``, by COPY.  One
    transaction: a failure half-way leaves the previous staging as it was."""
    with db.transaction() as conn:
        conn.execute(sa.text("TRUNCATE users_staging, import_rejects"))
        rows = ((r.line, r.email, r.name) for r in records)
        return StagingRepository(db).bulk_load(rows, columns=("line", "email", "name"))


# ---------------------------------------------------------------------------- merge


def merge_staged(
    db: Database,
    *,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[int], None] | None = None,
) -> MergeResult:
    """Staging into ``users``, one transaction per chunk of input lines; the refused
    records into ``import_rejects`` with the reason.  Of several records with one email,
    the last one counts (the others are *superseded*)."""

    def progress(chunk: MergeChunk) -> None:
        if on_chunk is not None:
            on_chunk(chunk.rows)

    return UserRepository(db).merge_from_staging(
        users_staging,
        order_by="line",
        conflict=("email",),
        rejects=import_rejects,
        chunk_size=chunk_size,
        on_chunk=progress,
    )


# --------------------------------------------------------------------------- report


@dataclass
class Phase:
    name: str
    seconds: float
    rows: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DemoResult:
    source: str
    loaded: int = 0
    merge: MergeResult = field(default_factory=MergeResult)
    users: int = 0
    domains: list[tuple[str, int]] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    health: str = ""
    pool: dict[str, Any] = field(default_factory=dict)
    report_from: str = ""  # which server the report read from

    @property
    def rejected(self) -> int:
        return self.merge.rejected

    def merge_to_load_rate(self) -> float | None:
        """The merge phase's rows/s as a fraction of the COPY phase's (the goal: ≥ 0.25)."""
        rates = {p.name: p.rows_per_second for p in self.phases}
        if not rates.get("load") or "merge" not in rates:
            return None
        return rates["merge"] / rates["load"]


def report(db: Database, progress: Progress) -> tuple[int, list[tuple[str, int]], str]:
    """Users per email domain, the five largest, by streaming every user once, in one
    read-only transaction: one snapshot, on a replica when there are replicas (that have
    replayed the merge).  Also says which server answered."""
    domains: Counter[str] = Counter()
    with db.transaction(readonly=True) as conn:
        on_replica, port = conn.execute(
            sa.text("SELECT pg_is_in_recovery(), inet_server_port()")
        ).one()
        with contextlib.closing(UserRepository(db).stream(batch_size=5_000)) as users:
            for user in progress.wrap(users):
                domains[user.email.rpartition("@")[2]] += 1
    where = f"{'a replica' if on_replica else 'the primary'} (port {port})"
    return sum(domains.values()), domains.most_common(5), where


def _reject_reasons(db: Database) -> dict[str, int]:
    reason = import_rejects.c.reason
    stmt = sa.select(reason, sa.func.count().label("n")).group_by(reason).order_by(reason)
    return {row.reason: row.n for row in db.execute(stmt)}


# ------------------------------------------------------------------------------ run


def run(
    db: Database,
    records: Iterable[StagedUser],
    *,
    total: int | None = None,
    source: str = "generated",
    chunk_size: int = CHUNK_SIZE,
    out: IO[str] | None = None,
    bar: bool | None = None,
) -> DemoResult:
    """The whole job on a migrated database; progress goes to ``out`` (a bar when it is a
    terminal and ``bar`` is not False).  ``total``: the number of records, if known."""
    if chunk_size < 1:
        raise ValueError(f"the chunk size must be positive, got {chunk_size}")
    result = DemoResult(source=source)

    @contextlib.contextmanager
    def phase(name: str, total: int | None) -> Iterator[Progress]:
        started = time.perf_counter()
        with Progress(name, total, out=out, bar=bar) as progress:
            yield progress
        result.phases.append(Phase(name, time.perf_counter() - started, progress.count))

    with phase("load", total) as progress:
        result.loaded = load_staging(db, progress.wrap(records))
    with phase("merge", result.loaded) as progress:
        result.merge = merge_staged(db, chunk_size=chunk_size, on_chunk=progress.update)
    if db.replica_databases():
        db.wait_for_replicas(timeout=30)  # so that the report can read from one
    with phase("report", UserRepository(db).count()) as progress:
        result.users, result.domains, result.report_from = report(db, progress)
    result.reject_reasons = _reject_reasons(db)
    health = db.health()
    HealthRepository(db).record(health)
    result.health = "ok" if health.ok else f"down: {health.error}"
    result.pool = db.stats().as_dict()
    return result


def print_summary(result: DemoResult, out: IO[str]) -> None:
    def line(text: str = "") -> None:
        print(text, file=out)

    line()
    line(f"loaded      {result.loaded:>9} rows into users_staging (COPY)")
    merge = result.merge
    new, changed = merge.inserted, merge.updated
    line(f"merged      {merge.merged:>9} rows into users: {new} new, {changed} changed")
    line(f"unchanged   {merge.unchanged:>9} rows already up to date")
    line(f"superseded  {merge.superseded:>9} records by a later one with the same email")
    line(f"rejected    {result.rejected:>9} rows into import_rejects")
    for reason, count in result.reject_reasons.items():
        line(f"  {count:>7}  {reason}")
    line(f"users       {result.users:>9} in the table now (report read from {result.report_from})")
    line("top domains " + ", ".join(f"{d} {n}" for d, n in result.domains))
    line()
    line(f"{'phase':<8} {'rows':>9} {'seconds':>9} {'rows/s':>10}")
    for p in result.phases:
        line(f"{p.name:<8} {p.rows:>9} {p.seconds:>9.2f} {p.rows_per_second:>10.0f}")
    ratio = result.merge_to_load_rate()
    if ratio is not None:
        line(f"the merge ran at {ratio:.0%} of the COPY load's rate")
    line()
    line(f"health      {result.health} (recorded in health_checks)")
    pool = result.pool
    line(
        "pool        "
        + ", ".join(
            f"{key} {pool[key]}"
            for key in (
                "max_open_connections",
                "open_connections",
                "in_use",
                "idle",
                "wait_count",
                "wait_duration",
            )
            if key in pool
        )
    )
