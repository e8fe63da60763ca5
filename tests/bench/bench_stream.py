"""Streaming every row of ``bench_stream`` (1,000,000 by default) through a server-side
cursor, 1,000 rows per fetch, and what that costs in memory.

=====================  ====================================================================
contender              what it runs
=====================  ====================================================================
dbkit                  ``repo.stream(batch_size=1000)``, a dataclass per row
dbkit dicts            the same on a repository without a model: a dict per row
sqlalchemy             ``engine.connect()`` + ``execution_options(yield_per=1000)``: Rows
psycopg                named cursor in ``conn.transaction()``, ``itersize = 1000``: tuples
dataset                ``table.find(_streamed=True, _step=1000)``: an OrderedDict per row,
                       on the first fifth of the rows (its pace would make it a minute and
                       a half a run); rows/s and memory are compared per row
=====================  ====================================================================

Memory is measured in a separate, untimed pass: for each contender a fresh child process
(``python -m tests.bench.memory_probe``) warms up on 1,000 rows, then streams a tenth of the
rows and then all of them, each time from a freshly reset kernel peak-RSS mark, and reports
how far the peak resident set grew over the size before each stream.  Peak RSS, not
tracemalloc: it also counts what libpq holds in C (a client-side cursor's whole result
shows up there and nowhere in tracemalloc), and a fresh child is not inflated by what the
parent did before.  The stream is "flat" when all the rows grew the peak by at most 4 MiB
or 25% more than a tenth of them did: a stream that kept its rows grows ten times as much
(a client-side cursor over 200,000 of these rows: +24 MiB).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dbkit.repository import Repository

from .context import Context
from .harness import Contender, Goal, Workload
from .schema import seed_stream, stream

BATCH = 1000
WARMUP_ROWS = 1000
ROOT = Path(__file__).resolve().parents[2]

# A source streams the rows with id <= limit (ids are 1..N).
Source = Callable[[int], Iterator[Any]]


@dataclass(slots=True)
class StreamedPerson:  # the table's column order: built positionally, dbkit's fast path
    id: int
    email: str
    name: str | None
    score: int


class Streamed(Repository[StreamedPerson]):
    table = stream
    model = StreamedPerson


class StreamedDicts(Repository[dict[str, Any]]):
    table = stream


def sources(ctx: Context) -> dict[str, Source]:
    """The contenders' streams, each opening what it needs from ``ctx``: the timed run and
    the memory probe's child process build them the same way."""
    db, engine, raw = ctx.dbkit(), ctx.engine(), ctx.raw()
    repo, dicts = Streamed(db), StreamedDicts(db)
    select = sa.select(stream).where(stream.c.id <= sa.bindparam("limit"))
    raw_sql = "SELECT id, email, name, score FROM bench_stream WHERE id <= %s"

    def dbkit(limit: int) -> Iterator[Any]:
        return repo.stream(stream.c.id <= limit, batch_size=BATCH)

    def dbkit_dicts(limit: int) -> Iterator[Any]:
        return dicts.stream(stream.c.id <= limit, batch_size=BATCH)

    def sqlalchemy(limit: int) -> Iterator[Any]:
        with engine.connect() as conn:
            yield from conn.execution_options(yield_per=BATCH).execute(select, {"limit": limit})

    def pg(limit: int) -> Iterator[Any]:
        with raw.transaction(), raw.cursor(name="bench_stream") as cur:
            cur.itersize = BATCH
            cur.execute(raw_sql, (limit,))
            yield from cur

    found: dict[str, Source] = {
        "dbkit": dbkit,
        "dbkit dicts": dbkit_dicts,
        "sqlalchemy": sqlalchemy,
        "psycopg": pg,
    }
    ds = ctx.dataset()
    if ds is not None:
        table = ds.load_table("bench_stream")

        def dataset_find(limit: int) -> Iterator[Any]:
            return iter(table.find(table.table.c.id <= limit, _streamed=True, _step=BATCH))

        found["dataset"] = dataset_find
    return found


def _drain(source: Source, limit: int, note: str = "") -> Contender:
    def run(n: int) -> None:
        for _ in range(n):
            for _row in source(limit):
                pass

    def warmup() -> None:
        for _row in source(WARMUP_ROWS):
            pass

    return Contender(run, warmup=warmup, units_per_op=limit, note=note)


def probe_memory(url: str, name: str, rows: int) -> dict[str, Any]:
    """Run the memory pass for one contender in a child process (see the module doc)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.memory_probe", url, name, str(rows)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"errors": [f"memory probe failed: {tail}"], "flat": False}
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rows"] != rows:
        report["errors"] = [f"streamed {report['rows']:,} rows, expected {rows:,}"]
    return report


def streaming(ctx: Context) -> Workload:
    rows = ctx.sizes.stream_rows
    seed_stream(ctx.url, rows)
    found = sources(ctx)
    limits = dict.fromkeys(found, rows)
    if "dataset" in limits:  # at its pace 1M rows would cost a minute and a half a run
        limits["dataset"] = min(rows, ctx.sizes.dataset_stream_rows)
    contenders = {
        name: _drain(source, limits[name], "" if limits[name] == rows else f"{limits[name]:,} rows")
        for name, source in found.items()
    }
    return Workload(
        "stream",
        f"stream {rows:,} rows through a server-side cursor",
        1,
        contenders,
        unit="row",
        units_per_op=rows,
        rounds=ctx.sizes.batch_rounds,
        goal=Goal("dbkit", "psycopg", "rate", 0.7, flat_memory=True),
        probe=lambda name: probe_memory(ctx.url, name, limits[name]),
    )
