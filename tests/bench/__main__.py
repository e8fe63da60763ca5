"""Run the benchmarks against a throwaway local PostgreSQL and print one table per workload.

python -m tests.bench [--quick] [--rounds N] [--only NAME ...] [--json PATH] [--url URL]

Each workload is built (tables created and filled), measured, printed and closed before the
next one starts, so its connections and data never weigh on the others.  ``--quick``
divides the sizes by ten and runs 3 rounds: a smoke test, not numbers to compare.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import psycopg

from dbkit.local import LocalPostgres

from . import (
    bench_inserts,
    bench_merge,
    bench_replicas,
    bench_stream,
    bench_threads,
    bench_transactions,
    bench_upserts,
)
from .context import FULL, QUICK, Context, libpq_url
from .harness import Workload, judge, measure
from .report import Outcome, machine_info, print_outcome, write_json

WORKLOADS: dict[str, Callable[[Context], Workload]] = {
    "point": bench_transactions.point_read,
    "get": bench_transactions.get,
    "tx-read": bench_transactions.read_in_transaction,
    "tx-write": bench_transactions.write_in_transaction,
    "savepoint": bench_transactions.savepoint,
    "insert": bench_inserts.insert,
    "upsert": bench_upserts.upsert,
    "merge": bench_merge.merge,
    "stream": bench_stream.streaming,
    "threads": bench_threads.threaded,
    "replicas": bench_replicas.replicas,
}
# The whole data set stays in the server's cache: the runs measure clients, not disks.
SERVER_SETTINGS = {"shared_buffers": "256MB"}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, 3 rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds for every workload (default: 5, and 3 for the batch workloads; --quick: 3)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(WORKLOADS),
        metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results/latest.json"))
    parser.add_argument("--url", help="use this server instead of a throwaway local one")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = replace(sizes, rounds=args.rounds, batch_rounds=args.rounds)
    selected = args.only or list(WORKLOADS)
    started = time.perf_counter()
    with ExitStack() as server_stack:
        url = args.url
        if url is None:
            url = server_stack.enter_context(LocalPostgres(settings=SERVER_SETTINGS)).url
        with psycopg.connect(libpq_url(url)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        machine = machine_info(str(row[0]) if row else "?")
        print(
            f"dbkit benchmarks: {machine['processor']}, {machine['cpus']} CPUs, Python "
            f"{machine['python']}, PostgreSQL {machine['postgres']}, {sizes.rounds} rounds "
            f"({sizes.batch_rounds} for batches)" + (" (quick)" if args.quick else "")
        )
        outcomes: list[Outcome] = []
        for key in selected:
            began = time.perf_counter()
            with ExitStack() as stack:
                workload = WORKLOADS[key](Context(url, sizes, stack))
                rounds = workload.rounds or sizes.rounds
                results = measure(workload, rounds)
            verdict = judge(workload.goal, results) if workload.goal else None
            outcome = Outcome(workload, results, verdict)
            outcomes.append(outcome)
            print_outcome(outcome, rounds)
            print(f"   ({time.perf_counter() - began:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started
    print("\nGoals:")
    for outcome in outcomes:
        if outcome.verdict is not None:
            print(f"  [{outcome.workload.key}] {outcome.verdict.line()}")
    run = {
        "quick": args.quick,
        "sizes": asdict(sizes),
        "workloads": selected,
        "seconds": round(elapsed, 1),
    }
    write_json(outcomes, args.json, machine, run)
    print(f"\n{elapsed:.0f} s in all; JSON written to {args.json}")


if __name__ == "__main__":
    main()
