"""Inserting a batch of rows (100,000 by default) into an empty ``bench_loads``: dbkit's three
write paths beside raw psycopg, plain SQLAlchemy Core and dataset.

=======================  ==================================================================
contender                what it runs
=======================  ==================================================================
dbkit bulk_load          ``repo.bulk_load(dicts)``: COPY FROM STDIN in one transaction
dbkit bulk_load tuples   ``repo.bulk_load(tuples, columns=...)``
dbkit insert_many        ``repo.insert_many(dicts)``: executemany, nothing read back
dbkit add_many           ``repo.add_many(dicts)``: INSERT … RETURNING, rows read back
sqlalchemy               ``engine.begin()`` + ``conn.execute(insert(t), dicts)``
psycopg copy             ``conn.transaction()`` + ``cursor.copy(...).write_row(tuple)``
psycopg executemany      ``conn.transaction()`` + ``cursor.executemany(sql, tuples)``
dataset insert_many      ``table.insert_many(dicts)`` (commits every 1,000 rows: its way)
=======================  ==================================================================

The table is truncated (untimed) before every run and its row count checked after it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from dbkit.repository import Repository

from .batches import Batch, batch_contender
from .context import Context
from .harness import Contender, Goal, Workload
from .schema import PEOPLE_COLUMNS, copy_people, count, loads, person, recreate

INSERT_SQL = "INSERT INTO bench_loads (email, name, score) VALUES (%s, %s, %s)"


class Loads(Repository[dict[str, Any]]):
    table = loads


def insert(ctx: Context) -> Workload:
    rows = ctx.sizes.insert_rows
    recreate(ctx.url, loads)
    db, engine = ctx.dbkit(), ctx.engine()
    raw, admin = ctx.raw(), ctx.admin()
    repo = Loads(db)
    statement = sa.insert(loads)
    batch = Batch.of([person(i) for i in range(rows)])

    def pg_copy(b: Batch) -> None:
        with raw.transaction():
            copy_people(raw, "bench_loads", b.tuples)

    def pg_executemany(b: Batch) -> None:
        with raw.transaction(), raw.cursor() as cur:
            cur.executemany(INSERT_SQL, b.tuples)

    def sqlalchemy(b: Batch) -> None:
        with engine.begin() as conn:
            conn.execute(statement, b.dicts)

    writers = {
        "dbkit bulk_load": lambda b: repo.bulk_load(b.dicts),
        "dbkit bulk_load tuples": lambda b: repo.bulk_load(b.tuples, columns=PEOPLE_COLUMNS),
        "dbkit insert_many": lambda b: repo.insert_many(b.dicts),
        "dbkit add_many": lambda b: repo.add_many(b.dicts),
        "sqlalchemy": sqlalchemy,
        "psycopg copy": pg_copy,
        "psycopg executemany": pg_executemany,
    }
    contenders: dict[str, Contender] = {
        name: batch_contender(write, batch) for name, write in writers.items()
    }
    ds = ctx.dataset()
    if ds is not None:
        table = ds.load_table("bench_loads")
        contenders["dataset insert_many"] = batch_contender(
            lambda b: table.insert_many(b.dicts), batch
        )

    def reset(_: str) -> None:
        admin.execute("TRUNCATE bench_loads RESTART IDENTITY")

    def verify(name: str) -> list[str]:
        stored = count(admin, "SELECT count(*) FROM bench_loads")
        return [] if stored == rows else [f"{stored:,} rows stored, expected {rows:,}"]

    return Workload(
        "insert",
        f"insert {rows:,} rows into an empty table",
        1,
        contenders,
        unit="row",
        units_per_op=rows,
        rounds=ctx.sizes.batch_rounds,
        baselines={"psycopg": "psycopg copy", "sqlalchemy": "sqlalchemy"},
        goal=Goal("dbkit bulk_load", "psycopg copy", "rate", 0.8),
        reset=reset,
        verify=verify,
    )
