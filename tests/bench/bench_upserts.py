"""Upserting a batch of rows (100,000 by default), half of which conflict, on the unique
``email`` of ``bench_people``.

Before every run (untimed) the table is truncated and loaded with the first half of the
batch's keys at old values; the batch then updates those and inserts the second half.
After it, the row count and the number of updated rows are checked.

=======================  ==================================================================
contender                what it runs
=======================  ==================================================================
dbkit                    ``repo.upsert_many(dicts, conflict=("email",))``
sqlalchemy               ``engine.begin()`` + ``conn.execute(insert(t).on_conflict_do_update
                         (...), dicts)`` (insertmanyvalues batches)
psycopg                  ``conn.transaction()`` + ``executemany(INSERT … ON CONFLICT …)``
dataset upsert_many      ``table.upsert_many(dicts, ["email"])``: an UPDATE then, when it
                         matched nothing, an INSERT, one row at a time with a commit each.
                         That costs minutes for 100,000 rows, so dataset upserts only the
                         ``dataset_upsert_rows`` around the middle of the batch (half of them
                         conflicting too), and its rows/s is compared per row.
=======================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.dialects import postgresql

from dbkit.repository import Repository

from .batches import Batch, batch_contender
from .context import Context
from .harness import Contender, Goal, Workload
from .schema import analyze, copy_people, count, people, person, recreate

UPSERT_SQL = (
    "INSERT INTO bench_people (email, name, score) VALUES (%s, %s, %s) "
    "ON CONFLICT (email) DO UPDATE SET name = excluded.name, score = excluded.score"
)
NEW = "new"


@dataclass
class Person:
    email: str
    name: str | None
    score: int
    id: int | None = None


class People(Repository[Person]):
    table = people
    model = Person


def upsert(ctx: Context) -> Workload:
    rows = ctx.sizes.upsert_rows
    recreate(ctx.url, people)
    db, engine = ctx.dbkit(), ctx.engine()
    raw, admin = ctx.raw(), ctx.admin()
    repo = People(db)
    stmt = postgresql.insert(people)
    statement = stmt.on_conflict_do_update(
        index_elements=[people.c.email],
        set_={"name": stmt.excluded.name, "score": stmt.excluded.score},
    )
    existing = [person(i) for i in range(rows // 2)]
    batch = Batch.of([person(i, NEW) for i in range(rows)])

    def pg(b: Batch) -> None:
        with raw.transaction(), raw.cursor() as cur:
            cur.executemany(UPSERT_SQL, b.tuples)

    def sqlalchemy(b: Batch) -> None:
        with engine.begin() as conn:
            conn.execute(statement, b.dicts)

    contenders: dict[str, Contender] = {
        "dbkit": batch_contender(lambda b: repo.upsert_many(b.dicts, conflict=("email",)), batch),
        "sqlalchemy": batch_contender(sqlalchemy, batch),
        "psycopg": batch_contender(pg, batch),
    }
    batches = dict.fromkeys(contenders, batch)
    ds = ctx.dataset()
    if ds is not None:
        table = ds.load_table("bench_people")
        few = min(ctx.sizes.dataset_upsert_rows, rows)
        start = rows // 2 - few // 2  # half below rows // 2: half conflicting
        middle = Batch.of([person(i, NEW) for i in range(start, start + few)])
        name = "dataset upsert_many"
        batches[name] = middle
        contenders[name] = batch_contender(
            lambda b: table.upsert_many(b.dicts, ["email"], ensure=False),
            middle,
            warmup=Batch.of(middle.tuples[:50]),
            note=f"measured on {few:,} rows",
        )

    def reset(_: str) -> None:
        admin.execute("TRUNCATE bench_people RESTART IDENTITY")
        copy_people(admin, "bench_people", existing)
        analyze(ctx.url, "bench_people")

    def verify(name: str) -> list[str]:
        written = batches[name].tuples
        conflicting = sum(1 for _, _, key in written if key < rows // 2)
        expected = rows // 2 + len(written) - conflicting
        stored = count(admin, "SELECT count(*) FROM bench_people")
        updated = count(admin, "SELECT count(*) FROM bench_people WHERE name = %s", (NEW,))
        problems = []
        if stored != expected:
            problems.append(f"{stored:,} rows stored, expected {expected:,}")
        if updated != len(written):
            problems.append(f"{updated:,} rows at the new value, expected {len(written):,}")
        return problems

    return Workload(
        "upsert",
        f"upsert {rows:,} rows, half of them conflicting",
        1,
        contenders,
        unit="row",
        units_per_op=rows,
        rounds=ctx.sizes.batch_rounds,
        goal=Goal("dbkit", "sqlalchemy", "rate", 1.5),
        reset=reset,
        verify=verify,
    )
