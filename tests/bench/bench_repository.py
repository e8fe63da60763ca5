"""Repository fast paths beside raw psycopg and plain SQLAlchemy Core, same table, same data.

=============  ===================================  ==========================================
workload       psycopg                              SQLAlchemy Core
=============  ===================================  ==========================================
bulk_load      COPY FROM STDIN, write_row(tuple)    engine.begin() + the driver's COPY (the
                                                    FAQ's recipe: SQLAlchemy has no COPY)
insert_many    executemany (pipelined)              conn.execute(insert(t), dicts)
upsert_many    executemany INSERT … ON CONFLICT     conn.execute(insert(t).on_conflict_do_
                                                    update(…), dicts)
stream         named cursor, itersize 1000          execution_options(yield_per=1000)
get            autocommit SELECT by id              engine.connect() + SELECT by id
=============  ===================================  ==========================================

dbkit takes what a caller has: dicts for the writes (``bulk_load`` also tuples), a dataclass
per streamed row, a dataclass from ``get``.  For the bulk workloads one op is one batch of
``N`` rows (in the workload's name), so the µs/op ratios are inverse rows/s ratios.  Goals
(issue 4): bulk_load ≥ 0.8x raw COPY rows/s (x psycopg ≤ 1.25); upsert_many ≥ 1.5x plain
SQLAlchemy (x SQLAlchemy ≤ 0.67); stream ≥ 0.7x the named cursor (x psycopg ≤ 1.43); get ≤
1.5x the raw autocommit select (x psycopg ≤ 1.5).

The harness warms every contender up with ``run(50)``; a batch workload counts its first
call as the warm-up and runs one batch then.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from dbkit import Database
from dbkit.repository import Repository

from .harness import Runner, Workload

LOAD_ROWS = 20_000
INSERT_ROWS = 5_000
UPSERT_ROWS = 10_000
STREAM_ROWS = 100_000
GET_ROWS = 1_000

metadata = sa.MetaData()
# Bulk writes land here (no unique key: batches repeat the same data).
loads = sa.Table(
    "bench_loads",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("name", sa.Text),
    sa.Column("score", sa.Integer, nullable=False),
)
# Upserts, streams and gets: a unique email, like a users table.
people = sa.Table(
    "bench_people",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text),
    sa.Column("score", sa.Integer, nullable=False),
)


@dataclass
class Person:
    email: str
    name: str | None
    score: int
    id: int | None = None


class Loads(Repository[dict[str, Any]]):
    table = loads


class People(Repository[Person]):
    table = people
    model = Person


def _rows(n: int, prefix: str = "user") -> list[tuple[str, str, int]]:
    return [(f"{prefix}{i}@example.com", f"Name {i}", i) for i in range(n)]


def _dicts(rows: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"email": e, "name": n, "score": s} for e, n, s in rows]


def _batches(run: Callable[[], None]) -> Runner:
    """A runner doing one batch per op, whose first call (the harness's warm-up) runs one."""
    warmed = False

    def runner(n: int) -> None:
        nonlocal warmed
        for _ in range(n if warmed else 1):
            run()
        warmed = True

    return runner


def setup(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        driver = conn.connection.driver_connection
        assert driver is not None
        with (
            driver.cursor() as cur,
            cur.copy("COPY bench_people (email, name, score) FROM STDIN") as copy,
        ):
            for row in _rows(STREAM_ROWS, "stream"):
                copy.write_row(row)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM ANALYZE bench_people"
        )
    engine.dispose()


def workloads(url: str, stack: ExitStack) -> list[Workload]:
    setup(url)
    db = stack.enter_context(Database.from_url(url, max_open_conns=4, max_idle_conns=4))
    engine = sa.create_engine(url, pool_size=4)
    stack.callback(engine.dispose)
    raw = stack.enter_context(psycopg.connect(url.replace("postgresql+psycopg", "postgresql")))
    raw_autocommit = stack.enter_context(
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    )
    return [
        _bulk_load(db, engine, raw),
        _insert_many(db, engine, raw),
        _upsert_many(db, engine, raw),
        _stream(db, engine, raw),
        _get(db, engine, raw_autocommit),
    ]


def _bulk_load(db: Database, engine: sa.Engine, raw: psycopg.Connection[Any]) -> Workload:
    tuples = _rows(LOAD_ROWS)
    dicts = _dicts(tuples)
    repo = Loads(db)
    copy_sql = "COPY bench_loads (email, name, score) FROM STDIN"

    def pg() -> None:
        with raw.transaction(), raw.cursor() as cur, cur.copy(copy_sql) as copy:
            for row in tuples:
                copy.write_row(row)

    def sqlalchemy() -> None:
        with engine.begin() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            with driver.cursor() as cur, cur.copy(copy_sql) as copy:
                for row in tuples:
                    copy.write_row(row)

    return Workload(
        f"bulk_load, 1 op = {LOAD_ROWS:,} rows",
        3,
        {
            "dbkit": _batches(lambda: repo.bulk_load(dicts)),
            "dbkit-tuple": _batches(
                lambda: repo.bulk_load(tuples, columns=("email", "name", "score"))
            ),
            "sqlalchemy": _batches(sqlalchemy),
            "psycopg": _batches(pg),
        },
    )


def _insert_many(db: Database, engine: sa.Engine, raw: psycopg.Connection[Any]) -> Workload:
    tuples = _rows(INSERT_ROWS)
    dicts = _dicts(tuples)
    repo = Loads(db)
    insert = sa.insert(loads)
    raw_sql = "INSERT INTO bench_loads (email, name, score) VALUES (%s, %s, %s)"

    def pg() -> None:
        with raw.transaction(), raw.cursor() as cur:
            cur.executemany(raw_sql, tuples)

    def sqlalchemy() -> None:
        with engine.begin() as conn:
            conn.execute(insert, dicts)

    return Workload(
        f"insert_many, 1 op = {INSERT_ROWS:,} rows",
        3,
        {
            "dbkit": _batches(lambda: repo.insert_many(dicts)),
            "sqlalchemy": _batches(sqlalchemy),
            "psycopg": _batches(pg),
        },
    )


def _upsert_many(db: Database, engine: sa.Engine, raw: psycopg.Connection[Any]) -> Workload:
    """Each batch re-sends the newer half of the previous batch's keys with new values,
    plus as many new keys: half the rows conflict, half insert, in every op."""
    repo = People(db)
    stmt = postgresql.insert(people)
    upsert = stmt.on_conflict_do_update(
        index_elements=[people.c.email],
        set_={"name": stmt.excluded.name, "score": stmt.excluded.score},
    )
    raw_sql = (
        "INSERT INTO bench_people (email, name, score) VALUES (%s, %s, %s) "
        "ON CONFLICT (email) DO UPDATE SET name = excluded.name, score = excluded.score"
    )
    half = UPSERT_ROWS // 2

    def batch(prefix: str, counter: itertools.count[int]) -> list[tuple[str, str, int]]:
        start = next(counter) * half
        return [
            (f"{prefix}{i}@example.com", f"v{start}", i) for i in range(start, start + UPSERT_ROWS)
        ]

    dbkit_ops, sa_ops, pg_ops = itertools.count(), itertools.count(), itertools.count()

    def dbkit() -> None:
        repo.upsert_many(_dicts(batch("dbkit", dbkit_ops)), conflict=("email",))

    def sqlalchemy() -> None:
        rows = _dicts(batch("sa", sa_ops))
        with engine.begin() as conn:
            conn.execute(upsert, rows)

    def pg() -> None:
        rows = batch("pg", pg_ops)
        with raw.transaction(), raw.cursor() as cur:
            cur.executemany(raw_sql, rows)

    return Workload(
        f"upsert_many, half conflicting, 1 op = {UPSERT_ROWS:,} rows",
        2,
        {
            "dbkit": _batches(dbkit),
            "sqlalchemy": _batches(sqlalchemy),
            "psycopg": _batches(pg),
        },
    )


def _stream(db: Database, engine: sa.Engine, raw: psycopg.Connection[Any]) -> Workload:
    repo = People(db)
    where = people.c.email.like("stream%")
    select = sa.select(people).where(where)
    raw_sql = "SELECT id, email, name, score FROM bench_people WHERE email LIKE 'stream%%'"

    def dbkit() -> None:
        for _person in repo.stream(where, batch_size=1000):
            pass

    def sqlalchemy() -> None:
        with engine.connect() as conn:
            for _row in conn.execution_options(yield_per=1000).execute(select):
                pass

    def pg() -> None:
        with raw.transaction(), raw.cursor(name="bench_stream") as cur:
            cur.itersize = 1000
            cur.execute(raw_sql)
            for _row in cur:
                pass

    return Workload(
        f"stream, 1 op = {STREAM_ROWS:,} rows",
        1,
        {"dbkit": _batches(dbkit), "sqlalchemy": _batches(sqlalchemy), "psycopg": _batches(pg)},
    )


def _get(db: Database, engine: sa.Engine, raw: psycopg.Connection[Any]) -> Workload:
    repo = People(db)
    ids = [
        row[0]
        for row in raw.execute("SELECT id FROM bench_people ORDER BY id LIMIT %s", (GET_ROWS,))
    ]
    by_id = sa.select(people).where(people.c.id == sa.bindparam("id"))
    raw_sql = "SELECT id, email, name, score FROM bench_people WHERE id = %s"

    def dbkit(n: int) -> None:
        for i in range(n):
            repo.get(ids[i % GET_ROWS])

    def sqlalchemy(n: int) -> None:
        for i in range(n):
            with engine.connect() as conn:
                conn.execute(by_id, {"id": ids[i % GET_ROWS]}).one()

    def pg(n: int) -> None:
        for i in range(n):
            raw.execute(raw_sql, (ids[i % GET_ROWS],)).fetchone()

    return Workload(
        "get by primary key, outside a transaction",
        2000,
        {"dbkit": dbkit, "sqlalchemy": sqlalchemy, "psycopg": pg},
    )
