"""Timing harness: contenders run the same workload in interleaved rounds; the table shows
the median time per operation, the min-max over rounds, and ratios to the baselines."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# A contender: prepares once, then `run(n)` does the workload's operation n times.
Runner = Callable[[int], None]


@dataclass
class Measurement:
    workload: str
    contender: str
    ops: int
    per_op_us: float  # median over rounds
    min_us: float
    max_us: float
    ratios: dict[str, float] = field(default_factory=dict)  # this / baseline (lower = faster)


@dataclass
class Workload:
    name: str
    ops: int
    contenders: dict[str, Runner]
    baselines: tuple[str, ...] = ("psycopg", "sqlalchemy")


def measure(workload: Workload, rounds: int = 7, warmup_ops: int = 50) -> list[Measurement]:
    samples: dict[str, list[float]] = {name: [] for name in workload.contenders}
    for run in workload.contenders.values():
        run(warmup_ops)
    for _ in range(rounds):
        for name, run in workload.contenders.items():  # interleaved: drift hits all alike
            started = time.perf_counter()
            run(workload.ops)
            samples[name].append((time.perf_counter() - started) / workload.ops * 1e6)
    results = [
        Measurement(workload.name, name, workload.ops, statistics.median(s), min(s), max(s))
        for name, s in samples.items()
    ]
    medians = {m.contender: m.per_op_us for m in results}
    for m in results:
        for base in workload.baselines:
            if base in medians and base != m.contender:
                m.ratios[base] = m.per_op_us / medians[base]
    return results


def print_table(results: list[Measurement]) -> None:
    by_workload: dict[str, list[Measurement]] = {}
    for m in results:
        by_workload.setdefault(m.workload, []).append(m)
    for name, rows in by_workload.items():
        print(f"\n{name}  ({rows[0].ops} ops/round, median of rounds)")
        header = f"{'contender':<12} {'us/op':>9} {'min-max':>17} {'x psycopg':>10}"
        print(f"  {header} {'x SQLAlchemy':>13}")
        for m in rows:
            vs_pg = f"{m.ratios['psycopg']:.2f}" if "psycopg" in m.ratios else "-"
            vs_sa = f"{m.ratios['sqlalchemy']:.2f}" if "sqlalchemy" in m.ratios else "-"
            span = f"{m.min_us:.1f}-{m.max_us:.1f}"
            print(f"  {m.contender:<12} {m.per_op_us:>9.1f} {span:>17} {vs_pg:>10} {vs_sa:>13}")


def write_json(results: list[Measurement], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "results": [asdict(m) for m in results],
    }
    path.write_text(json.dumps(payload, indent=2))
