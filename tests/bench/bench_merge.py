"""Merging staged records (100,000 by default) into a users table, the way ``dbkit demo``
does it, with the COPY that staged them as the reference rate.

The records are the demo's (``dbkit.demo.generate``): every 997th has no ``@`` (the CHECK
on ``email`` refuses it), every 1999th no email (NOT NULL refuses it), every 101st repeats
an earlier email with a new name (an update): 0.15% of them refused.  The tables are the
demo's under bench names (``schema.users``, ``users_staging``, ``import_rejects``).

==================  =======================================================================
contender           what it runs
==================  =======================================================================
dbkit               ``repo.merge_from_staging(staging, order_by="line", conflict=("email",),
                    rejects=rejects)`` on a repository with ``timestamps`` like
                    ``UserRepository``: one ``INSERT … SELECT … ON CONFLICT DO UPDATE``
                    statement per 5,000 staging rows that also writes the refused rows and
                    their reasons to the rejects table
sqlalchemy          what the demo did before, on plain SQLAlchemy Core: staging read in
                    chunks of 5,000 through a server-side cursor, one ``engine.begin()``
                    per chunk, batches of 250 (emails de-duplicated, the last one wins)
                    upserted with ``insert(...).on_conflict_do_update(...)`` inside
                    ``conn.begin_nested()``; a refused batch is halved in savepoints until
                    the bad record stands alone, and it goes to the rejects with the
                    reason from the server's diagnostics
load (reference)    the demo's load phase, the issue's "COPY phase": the records generated
                    (``dbkit.demo.generate``) and COPYed into the empty staging table with
                    ``bulk_load``, one transaction, as ``dbkit demo`` does it
copy                the bare COPY alone: ``conn.transaction()`` + ``cursor.copy(COPY
                    staging FROM STDIN).write_row(tuple)`` of the records generated
                    beforehand: the floor of what loading costs, shown for scale
==================  =======================================================================

Before every run (untimed) the users and rejects tables are truncated; for the merges
staging is truncated, loaded by COPY and vacuumed and analyzed, for the COPY truncated
only.  After every run the merges must have left the same users table (every email with
the name of its last record) and the same rejected lines with the same emails and reasons,
computed in Python from the records, and the COPY must have staged exactly the records.
The merge rates count staged records per second, so ``x psycopg`` (here: time per record ÷ the
load phase's) and the goal's rate ratio are the merge's rate as a fraction of the load
phase's, taken in the same run; the goal (the issue's: "the upsert phase should run at
≥ 25% of the COPY phase's rate") is dbkit's merge at ≥ 25% of the load phase's rate.
Against the bare COPY (compare the rates) no upsert gets there on this machine: one single
``INSERT … SELECT … ON CONFLICT DO UPDATE`` of all the rows, with no checks at all, runs at
about 0.18x of it.
The warm-ups merge (and copy) 1,000 records from a staging table of their own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dbkit.demo import generate
from dbkit.repository import Repository
from dbkit.repository.merge import MergeResult

from .context import Context
from .harness import Contender, Goal, Workload
from .schema import (
    EMAIL_HAS_AT,
    STAGING_COLUMNS,
    analyze,
    copy_rows,
    import_rejects,
    recreate,
    users,
    users_staging,
    users_staging_warmup,
)

CHUNK = 5_000  # staging rows per transaction: the demo's CHUNK_SIZE
BATCH = 250  # rows per savepoint in the hand-written upsert: the old demo's BATCH_SIZE
WARMUP_RECORDS = 1_000
COPY = "copy"
LOAD = "load (reference)"

# One staged record as COPY writes it: (line, email, name).
Record = tuple[int, str | None, str | None]


class Staging(Repository[dict[str, Any]]):
    table = users_staging


class Users(Repository[dict[str, Any]]):
    table = users
    timestamps = True  # as UserRepository: created_at/updated_at set by every write


@dataclass(frozen=True)
class Expected:
    """What every merge must leave, worked out from the records in Python."""

    users: dict[str, str | None]  # email -> name of its last record
    rejects: dict[int, tuple[str | None, str]]  # line -> (email, reason)
    staged_digest: str  # md5 of the staged records, as ``STAGED_DIGEST`` computes it


STAGED_DIGEST = (
    "SELECT md5(string_agg(format('%s|%s|%s', line, email, name), ';' ORDER BY line)) "
    "FROM bench_users_staging"
)


def expected(records: Sequence[Record]) -> Expected:
    latest: dict[str, str | None] = {}
    refused: dict[int, tuple[str | None, str]] = {}
    for line, email, name in records:
        if email is None:
            refused[line] = (email, "email is missing (not null)")
        elif "@" not in email:
            refused[line] = (email, f"violates {EMAIL_HAS_AT}")
        else:
            latest[email] = name
    staged = ";".join(f"{line}|{email or ''}|{name or ''}" for line, email, name in records)
    return Expected(latest, refused, hashlib.md5(staged.encode()).hexdigest())


def _reason(error: sa.exc.IntegrityError) -> str:
    """The rule that refused the record, from the server's diagnostics: the old demo's
    ``_reason``, and the wording ``merge_from_staging`` uses."""
    orig = error.orig
    if isinstance(orig, psycopg.Error):
        diag = orig.diag
        if orig.sqlstate == "23502" and diag.column_name:
            return f"{diag.column_name} is missing (not null)"
        if diag.constraint_name:
            return f"violates {diag.constraint_name}"
    return str(orig).splitlines()[0]


class _QuietAbortedPipelines(logging.Filter):
    """psycopg's executemany runs in a pipeline and logs a warning each time a refused
    batch aborts one; the hand-written merge expects that and handles the error, so the
    warnings (hundreds a run) are noise in the benchmark's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error ignored terminating <psycopg.Pipeline")


def hand_written(engine: sa.Engine) -> Callable[[sa.Table], None]:
    """The old demo's ``upsert_staged`` on plain SQLAlchemy Core (no dbkit)."""
    insert = postgresql.insert(users)
    upsert = insert.on_conflict_do_update(
        index_elements=[users.c.email],
        set_={"name": insert.excluded.name, "updated_at": sa.func.now()},
    )
    record_rejects = sa.insert(import_rejects)

    def latest(batch: Sequence[Any]) -> list[dict[str, Any]]:
        """One row per email, the last one; ON CONFLICT DO UPDATE cannot touch a row twice
        in one statement.  A NULL email matches nothing: each is kept (and refused)."""
        rows: dict[Any, dict[str, Any]] = {}
        for record in batch:
            key = record.email if record.email is not None else ("null", record.line)
            rows[key] = {"email": record.email, "name": record.name}
        return list(rows.values())

    def isolating_rejects(
        conn: sa.Connection,
        batch: Sequence[Any],
        refused: list[dict[str, Any]],
        *,
        known_bad: bool = False,
    ) -> None:
        """Upsert ``batch`` in a savepoint; when it is refused, halve it until the refused
        records stand alone.  When the first half of a refused batch goes in, the second
        holds the culprit: it is split without being tried whole."""
        if not known_bad:
            try:
                with conn.begin_nested():  # a failure undoes this batch only
                    conn.execute(upsert, latest(batch))
                return
            except sa.exc.IntegrityError as error:
                if len(batch) == 1:
                    record = batch[0]
                    refused.append(
                        {"line": record.line, "email": record.email, "reason": _reason(error)}
                    )
                    return
        half = len(batch) // 2
        refused_before = len(refused)
        isolating_rejects(conn, batch[:half], refused)
        first_half_went_in = len(refused) == refused_before
        isolating_rejects(
            conn, batch[half:], refused, known_bad=first_half_went_in and len(batch) - half > 1
        )

    def merge(staging: sa.Table) -> None:
        read = sa.select(staging.c.line, staging.c.email, staging.c.name).order_by(staging.c.line)
        # A server-side cursor on a connection of its own; each chunk commits on another.
        with engine.connect() as reader:
            staged = reader.execution_options(yield_per=CHUNK).execute(read)
            for chunk in staged.partitions():
                with engine.begin() as conn:
                    refused: list[dict[str, Any]] = []
                    for start in range(0, len(chunk), BATCH):
                        isolating_rejects(conn, chunk[start : start + BATCH], refused)
                    if refused:
                        conn.execute(record_rejects, refused)

    return merge


def merge(ctx: Context) -> Workload:
    rows = ctx.sizes.merge_rows
    recreate(ctx.url, users, users_staging, users_staging_warmup, import_rejects)
    db, engine = ctx.dbkit(), ctx.engine()
    raw, admin = ctx.raw(), ctx.admin()
    repo = Users(db)
    quiet, psycopg_log = _QuietAbortedPipelines(), logging.getLogger("psycopg")
    psycopg_log.addFilter(quiet)
    ctx.stack.callback(psycopg_log.removeFilter, quiet)
    records: list[Record] = [(r.line, r.email, r.name) for r in generate(rows)]
    want = expected(records)
    warm = records[:WARMUP_RECORDS]
    copy_rows(admin, users_staging_warmup.name, STAGING_COLUMNS, warm)
    analyze(ctx.url, users_staging_warmup.name)
    results: dict[str, MergeResult] = {}

    def dbkit(staging: sa.Table) -> None:
        results["dbkit"] = repo.merge_from_staging(
            staging, order_by="line", conflict=("email",), rejects=import_rejects
        )

    staging_repo = Staging(db)

    def load(n: int) -> None:
        with db.transaction():
            generated = ((r.line, r.email, r.name) for r in generate(n))
            staging_repo.bulk_load(generated, columns=STAGING_COLUMNS)

    def copy(batch: Sequence[Record]) -> None:
        with raw.transaction():
            copy_rows(raw, users_staging.name, STAGING_COLUMNS, batch)

    def merge_contender(run: Callable[[sa.Table], None]) -> Contender:
        def timed(n: int) -> None:
            for _ in range(n):
                run(users_staging)

        return Contender(timed, warmup=lambda: run(users_staging_warmup), units_per_op=rows)

    def copy_contender() -> Contender:
        def timed(n: int) -> None:
            for _ in range(n):
                copy(records)

        return Contender(timed, warmup=lambda: copy(warm), units_per_op=rows)

    def load_contender() -> Contender:
        def timed(n: int) -> None:
            for _ in range(n):
                load(rows)

        return Contender(timed, warmup=lambda: load(WARMUP_RECORDS), units_per_op=rows)

    contenders = {
        "dbkit": merge_contender(dbkit),
        "sqlalchemy": merge_contender(hand_written(engine)),
        LOAD: load_contender(),
        COPY: copy_contender(),
    }

    def reset(name: str) -> None:
        admin.execute(
            "TRUNCATE bench_users, bench_import_rejects, bench_users_staging RESTART IDENTITY"
        )
        if name not in (COPY, LOAD):
            copy_rows(admin, users_staging.name, STAGING_COLUMNS, records)
            analyze(ctx.url, users_staging.name)
        results.clear()

    def verify(name: str) -> list[str]:
        if name in (COPY, LOAD):
            row = admin.execute(STAGED_DIGEST).fetchone()
            return [] if row and row[0] == want.staged_digest else ["staging ≠ the records"]
        return _check_merge(admin, want) + _check_counts(results.get(name), want)

    refused = len(want.rejects)
    return Workload(
        "merge",
        f"merge {rows:,} staged records into users, {refused:,} of them refused "
        f"({refused / rows:.2%}), beside their COPY",
        1,
        contenders,
        unit="row",
        units_per_op=rows,
        rounds=ctx.sizes.batch_rounds,
        baselines={"psycopg": LOAD, "sqlalchemy": "sqlalchemy"},
        goal=Goal("dbkit", LOAD, "rate", 0.25, no_errors=True),
        reset=reset,
        verify=verify,
    )


def _check_merge(admin: psycopg.Connection[Any], want: Expected) -> list[str]:
    problems = []
    stored = admin.execute("SELECT email, name FROM bench_users").fetchall()
    table = dict(stored)
    missing = want.users.keys() - table.keys()
    extra = table.keys() - want.users.keys()
    wrong = sum(1 for e, n in table.items() if e in want.users and want.users[e] != n)
    if len(stored) != len(want.users) or missing or extra or wrong:
        problems.append(
            f"users: {len(stored):,} rows, expected {len(want.users):,} ({len(missing):,} "
            f"missing, {len(extra):,} unexpected, {wrong:,} with another name)"
        )
    refused = admin.execute("SELECT line, email, reason FROM bench_import_rejects").fetchall()
    got = {line: (email, reason) for line, email, reason in refused}
    if len(refused) != len(got):
        problems.append(f"rejects: {len(refused) - len(got):,} lines refused more than once")
    if got != want.rejects:
        differ = sorted(set(got.items()) ^ set(want.rejects.items()))
        problems.append(
            f"rejects: {len(got):,} lines, expected {len(want.rejects):,}; first difference: "
            f"{differ[0] if differ else '-'}"
        )
    return problems


def _check_counts(result: MergeResult | None, want: Expected) -> list[str]:
    """dbkit's MergeResult must report what the tables hold (the hand-written merge
    returns nothing)."""
    if result is None:
        return []
    if (result.inserted, result.updated, result.rejected) == (
        len(want.users),
        0,
        len(want.rejects),
    ):
        return []
    return [
        f"MergeResult says {result.inserted:,} inserted, {result.updated:,} updated, "
        f"{result.rejected:,} rejected; expected {len(want.users):,}, 0, {len(want.rejects):,}"
    ]
