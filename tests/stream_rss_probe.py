"""Child process of test_repository_bulk's memory test (not a test module).

``python tests/stream_rss_probe.py URL MODE`` reads every row of the ``payloads`` table and
prints one JSON line: the rows seen and how far the peak resident set (VmHWM) grew over the
resident set before the read, in KiB.  MODE is

- ``stream``: ``Repository.stream(batch_size=1000)``, a server-side cursor;
- ``client``: a plain ``Database.execute`` of the same SELECT, i.e. a client-side cursor
  whose whole result libpq receives before the first row (the rows are counted, not kept).

Peak RSS, not tracemalloc: libpq's result buffers are C memory that tracemalloc never sees,
and a fresh process is not inflated by what the test process did before.  Both modes warm
up on a few rows first so that imports and first-use caches are not counted.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dbkit import Database
from dbkit.repository import Repository

STATUS = Path("/proc/self/status")
BATCH = 1000
WARMUP_ROWS = 2000

payloads = sa.Table(
    "payloads",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("body", sa.Text, nullable=False),
)


class Payloads(Repository[dict[str, Any]]):
    table = payloads


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {STATUS}")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def main(url: str, mode: str) -> dict[str, int]:
    with Database.from_url(url, max_open_conns=2) as db:
        repo = Payloads(db)

        def read(limit: int | None) -> int:
            where = [payloads.c.id <= limit] if limit is not None else []
            seen = 0
            if mode == "stream":
                for _row in repo.stream(*where, batch_size=BATCH, order_by="id"):
                    seen += 1
            elif mode == "client":
                stmt = sa.select(payloads).where(*where).order_by(payloads.c.id)
                for _row in db.execute(stmt):
                    seen += 1
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            return seen

        read(WARMUP_ROWS)
        gc.collect()
        _reset_peak()
        base = _status_kib("VmRSS")
        rows = read(None)
        growth = _status_kib("VmHWM") - base
        in_use = db.stats().in_use
    return {"rows": rows, "peak_growth_kib": growth, "in_use_after": in_use}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
