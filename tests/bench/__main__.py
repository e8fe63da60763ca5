"""Run the benchmarks against a throwaway local PostgreSQL and print ratio tables.

python -m tests.bench [--rounds N] [--json PATH] [--url URL]
"""

from __future__ import annotations

import argparse
import platform
from contextlib import ExitStack
from pathlib import Path

from dbkit.local import LocalPostgres

from . import bench_repository, bench_transactions
from .harness import measure, print_table, write_json

SUITES = [bench_transactions, bench_repository]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench-results/latest.json"))
    parser.add_argument("--url", help="use this server instead of a throwaway local one")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url
        if url is None:
            server = stack.enter_context(LocalPostgres())
            url = server.url
        print(
            f"dbkit benchmarks on {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}, {args.rounds} rounds"
        )
        results = []
        for suite in SUITES:
            for workload in suite.workloads(url, stack):
                results += measure(workload, rounds=args.rounds)
        print_table(results)
        write_json(results, args.json)
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
