"""The benchmark tables and their data.  Every contender of a workload reads and writes the
same table; writes are reset (untimed) before each timed run, so each contender starts
from the same rows."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg
import sqlalchemy as sa

from .context import libpq_url

ACCOUNTS = 1000

metadata = sa.MetaData()
# Point reads, transactions, savepoints, the threaded workload's reads.
accounts = sa.Table(
    "bench_accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("balance", sa.Integer, nullable=False),
)
# One row per thread of the threaded workload, bumped by that thread only.
counters = sa.Table(
    "bench_counters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)


def _people(name: str, *, unique_email: bool) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("email", sa.Text, nullable=False, unique=unique_email),
        sa.Column("name", sa.Text),
        sa.Column("score", sa.Integer, nullable=False),
    )


# Inserts (truncated before each run: no unique key needed).
loads = _people("bench_loads", unique_email=False)
# Upserts: the conflict target is the unique email, like a users table.
people = _people("bench_people", unique_email=True)
# The streamed rows.
stream = _people("bench_stream", unique_email=False)

PEOPLE_COLUMNS = ("email", "name", "score")

# The merge: the demo's users / users_staging / import_rejects (``dbkit.schema``), same
# columns and rules under bench names.  Staging is what a COPY of the input leaves: all
# text, the input line as key, UNLOGGED scratch space.
EMAIL_HAS_AT = "ck_bench_users_email_has_at"
users = sa.Table(
    "bench_users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.UniqueConstraint("email", name="uq_bench_users_email"),
    sa.CheckConstraint("strpos(email, '@') > 0", name=EMAIL_HAS_AT),
)


def _staging(name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.BigInteger),
        sa.Column("email", sa.Text),
        sa.Column("name", sa.Text),
        sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
        prefixes=["UNLOGGED"],
    )


users_staging = _staging("bench_users_staging")
# A small staging table for the contenders' warm-up merges.
users_staging_warmup = _staging("bench_users_staging_warmup")
import_rejects = sa.Table(
    "bench_import_rejects",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("email", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column(
        "rejected_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
STAGING_COLUMNS = ("line", "email", "name")


def person(i: int, name: str = "old") -> tuple[str, str, int]:
    return (f"user{i}@example.com", name, i)


def as_dicts(rows: Iterable[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"email": e, "name": n, "score": s} for e, n, s in rows]


def recreate(url: str, *tables: sa.Table) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for table in tables:
                table.drop(conn, checkfirst=True)
                table.create(conn)
    finally:
        engine.dispose()


def seed_accounts(url: str, threads: int = 0) -> None:
    """``ACCOUNTS`` accounts, and ``threads`` counters at zero."""
    recreate(url, accounts, counters)
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute(
            "INSERT INTO bench_accounts (id, balance) SELECT i, 100 FROM generate_series(0, %s) i",
            (ACCOUNTS - 1,),
        )
        conn.execute(
            "INSERT INTO bench_counters (id, n) SELECT i, 0 FROM generate_series(0, %s) i",
            (threads - 1,),
        )
    analyze(url, "bench_accounts", "bench_counters")


def seed_stream(url: str, rows: int) -> None:
    """``rows`` people, made by the server (generate_series): seconds, not a minute."""
    recreate(url, stream)
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute(
            "INSERT INTO bench_stream (email, name, score) "
            "SELECT 'user' || i || '@example.com', 'Name ' || i, i "
            "FROM generate_series(1, %s) i",
            (rows,),
        )
    analyze(url, "bench_stream")


def copy_people(conn: psycopg.Connection[Any], table: str, rows: Iterable[Any]) -> None:
    copy_rows(conn, table, PEOPLE_COLUMNS, rows)


def copy_rows(
    conn: psycopg.Connection[Any], table: str, columns: Iterable[str], rows: Iterable[Any]
) -> None:
    names = ", ".join(columns)
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)


def analyze(url: str, *tables: str) -> None:
    """VACUUM ANALYZE: fresh statistics and visibility map, so plans and index-only reads
    do not change in the middle of a workload."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table}")


def count(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])
