"""Child process of the streaming memory pass: ``python -m tests.bench.memory_probe URL NAME
ROWS`` streams with contender NAME and prints one JSON line: rows seen, and how far the
peak resident set grew over the size before the stream, for a tenth of the rows and for
all of them.  Run by ``bench_stream.probe_memory``; see that module for why."""

from __future__ import annotations

import gc
import json
import sys
from contextlib import ExitStack
from pathlib import Path

from .bench_stream import WARMUP_ROWS, Source, sources
from .context import FULL, Context

STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in {STATUS}")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_growth_kib(source: Source, rows: int) -> tuple[int, int]:
    """(rows seen, growth of the peak RSS over the RSS before) for one stream of ``rows``."""
    gc.collect()
    if not _reset_peak():  # without the reset, earlier peaks would hide this one
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs)")
    base = _status_kib("VmRSS")
    seen = 0
    for _row in source(rows):
        seen += 1
    return seen, _status_kib("VmHWM") - base


def main(url: str, name: str, rows: int) -> dict[str, object]:
    """Stream a tenth of the rows, then all of them, each from a fresh peak mark: a stream
    whose memory does not depend on the row count grows about as much both times (a
    client-side cursor or a list of rows grows ten times as much; comparing points within
    one stream would miss the cursor, whose whole result arrives before the first row)."""
    with ExitStack() as stack:
        source = sources(Context(url, FULL, stack))[name]
        for _row in source(WARMUP_ROWS):
            pass
        _, tenth = _peak_growth_kib(source, max(1, rows // 10))
        seen, full = _peak_growth_kib(source, rows)
    return {
        "rows": seen,
        "peak_growth_mib": full / 1024,
        "peak_growth_tenth_mib": tenth / 1024,
        "flat": full <= max(tenth * 1.25, tenth + 4 * 1024),
    }


if __name__ == "__main__":
    url, name, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(main(url, name, rows)))
