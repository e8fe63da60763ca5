"""What a workload builder gets: the server URL, the sizes of this run, and an ExitStack
that closes the workload's connections once it is measured; plus one constructor per
contender's entry point, so every workload connects each library the same way."""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psycopg
import sqlalchemy as sa

from dbkit import Database


def _dataset_module() -> ModuleType | None:
    """dataset, which the bench extra installs; without it its contenders are left out."""
    try:
        return importlib.import_module("dataset")
    except ImportError:
        return None


@dataclass(frozen=True)
class Sizes:
    """How much work a run does.  The full sizes are the issue's (100k-row writes, a
    1M-row stream, 32 threads); ``--quick`` divides them by ten for a smoke run."""

    rounds: int  # for the single-query and threaded workloads
    batch_rounds: int  # for the 100k-row writes and the 1M-row stream: seconds per round
    point_ops: int  # queries per round for the single-query workloads
    insert_rows: int
    upsert_rows: int
    dataset_upsert_rows: int  # dataset upserts row by row: measured on fewer rows
    merge_rows: int  # staged records merged into a users table (0.15% of them refused)
    stream_rows: int
    dataset_stream_rows: int  # dataset streams at a fifth of the others' rate
    threads: int
    tx_per_thread: int
    replica_rows: int  # the replicas workload's table, streamed to both replicas
    replica_threads: int  # its client threads, each doing this many reads per round
    replica_reads_per_thread: int


FULL = Sizes(
    rounds=5,
    batch_rounds=3,
    point_ops=1000,
    insert_rows=100_000,
    upsert_rows=100_000,
    dataset_upsert_rows=2_000,
    merge_rows=100_000,
    stream_rows=1_000_000,
    dataset_stream_rows=200_000,
    threads=32,
    tx_per_thread=50,
    replica_rows=10_000,
    replica_threads=8,
    replica_reads_per_thread=500,
)
QUICK = Sizes(
    rounds=3,
    batch_rounds=3,
    point_ops=500,
    insert_rows=10_000,
    upsert_rows=10_000,
    dataset_upsert_rows=500,
    merge_rows=10_000,
    stream_rows=100_000,
    dataset_stream_rows=20_000,
    threads=32,
    tx_per_thread=10,
    replica_rows=1_000,
    replica_threads=8,
    replica_reads_per_thread=50,
)


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as psycopg takes it (no ``+psycopg`` driver suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class Context:
    url: str
    sizes: Sizes
    stack: ExitStack  # closed when the workload has been measured

    def dbkit(self, pool: int = 4) -> Database:
        db = Database.from_url(self.url, max_open_conns=pool, max_idle_conns=pool)
        return self.stack.enter_context(db)

    def engine(self, pool: int = 4, **options: Any) -> sa.Engine:
        engine = sa.create_engine(self.url, pool_size=pool, **options)
        self.stack.callback(engine.dispose)
        return engine

    def raw(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        conn = psycopg.connect(libpq_url(self.url), autocommit=autocommit)
        return self.stack.enter_context(conn)

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection for the untimed resets and checks; a lock wait longer
        than 10 s (a contender left a transaction open on the table) fails instead of
        hanging the run."""
        conn = self.raw(autocommit=True)
        conn.execute("SET lock_timeout = '10s'")
        return conn

    def dataset(self, **engine_kwargs: Any) -> Any | None:
        """A ``dataset.Database`` that never alters the schema (``ensure_schema=False``:
        the table is the same one the others use), or None when dataset is missing."""
        dataset = _dataset_module()
        if dataset is None:
            return None
        db = dataset.connect(self.url, ensure_schema=False, engine_kwargs=engine_kwargs)
        self.stack.callback(db.close)
        return db
