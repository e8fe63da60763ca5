"""Timing harness: every contender of a workload runs the same operation in interleaved
rounds, and each gets the median over rounds, the min-max, a rate (ops, rows or
transactions per second) and its time ratio to the workload's baselines.

Interleaving (and rotating who goes first each round) spreads machine drift and noise from
other processes over all contenders alike.  Untimed hooks around each timed run reset the
data (so every contender starts from the same table) and verify the result (so a fast
contender that did less work shows up as an error instead of a win).  Nothing here asserts
a time: benchmarks report, they do not fail.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A contender's operation, done `n` times: n queries, n batches of rows, n transactions.
Runner = Callable[[int], None]


@dataclass
class Contender:
    run: Runner
    # Untimed, once before the rounds (plan caches, prepared statements, pools); default:
    # `run(warmup_ops)`.  Batch workloads pass a small batch here.
    warmup: Callable[[], None] | None = None
    # Units (rows, transactions) one op handles, when it differs from the workload's:
    # e.g. a contender too slow for the full batch measured on fewer rows.
    units_per_op: int | None = None
    note: str = ""
    # Problems the runner met (the threaded workload's failed transactions); reported.
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Goal:
    """What dbkit should reach against one baseline.  ``kind="time"``: contender time per
    unit ≤ factor x the baseline's; ``kind="rate"``: contender rate ≥ factor x the
    baseline's.  ``flat_memory`` and ``no_errors`` add conditions."""

    contender: str
    baseline: str
    kind: str  # "time" | "rate"
    factor: float
    flat_memory: bool = False
    no_errors: bool = False

    def describe(self) -> str:
        what = "time" if self.kind == "time" else "rate"
        sign = "≤" if self.kind == "time" else "≥"
        extra = (" with flat memory" if self.flat_memory else "") + (
            ", no errors" if self.no_errors else ""
        )
        return f"{self.contender} {what} {sign} {self.factor:g}x {self.baseline}{extra}"


@dataclass
class Workload:
    key: str  # for --only
    name: str
    ops: int  # per contender per round
    contenders: dict[str, Contender]
    unit: str = "op"  # what the rate counts: op, row, tx
    units_per_op: int = 1
    # Column label -> contender whose time the ratio divides by.
    baselines: dict[str, str] = field(
        default_factory=lambda: {"psycopg": "psycopg", "sqlalchemy": "sqlalchemy"}
    )
    goal: Goal | None = None
    warmup_ops: int = 50
    rounds: int | None = None  # default: the run's
    reset: Callable[[str], None] | None = None  # untimed, before each run of a contender
    verify: Callable[[str], list[str]] | None = None  # untimed, after: problems found
    # Untimed, once per contender after the rounds: memory figures (see bench_stream).
    probe: Callable[[str], dict[str, Any]] | None = None


@dataclass
class Measurement:
    workload: str
    key: str
    contender: str
    ops: int
    unit: str
    units_per_op: int
    per_op_us: float  # median over rounds
    min_us: float
    max_us: float
    rate_per_s: float  # units per second at the median
    rate_min_per_s: float
    rate_max_per_s: float
    ratios: dict[str, float] = field(default_factory=dict)  # time per unit / baseline's
    errors: list[str] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    note: str = ""

    @property
    def per_unit_us(self) -> float:
        return self.per_op_us / self.units_per_op


def _timed(workload: Workload, name: str, contender: Contender) -> float:
    """One round of one contender: µs per op, with the untimed hooks around it."""
    if workload.reset is not None:
        workload.reset(name)
    gc.collect()  # the previous contender's garbage is not this one's cost
    started = time.perf_counter()
    contender.run(workload.ops)
    elapsed = time.perf_counter() - started
    if workload.verify is not None:
        contender.errors.extend(workload.verify(name))
    return elapsed / workload.ops * 1e6


def measure(workload: Workload, rounds: int) -> list[Measurement]:
    names = list(workload.contenders)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name, contender in workload.contenders.items():
        if workload.reset is not None:
            workload.reset(name)
        if contender.warmup is not None:
            contender.warmup()
        else:
            contender.run(workload.warmup_ops)
    for round_no in range(rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_timed(workload, name, workload.contenders[name]))
    results = [_summary(workload, name, samples[name]) for name in names]
    per_unit = {m.contender: m.per_unit_us for m in results}
    for m in results:
        for label, base in workload.baselines.items():
            if base in per_unit and base != m.contender:
                m.ratios[label] = m.per_unit_us / per_unit[base]
    if workload.probe is not None:
        for m in results:
            m.memory = workload.probe(m.contender)
            m.errors.extend(m.memory.pop("errors", []))
    return results


def _summary(workload: Workload, name: str, us: list[float]) -> Measurement:
    contender = workload.contenders[name]
    units = contender.units_per_op or workload.units_per_op
    median, low, high = statistics.median(us), min(us), max(us)
    return Measurement(
        workload=workload.name,
        key=workload.key,
        contender=name,
        ops=workload.ops,
        unit=workload.unit,
        units_per_op=units,
        per_op_us=median,
        min_us=low,
        max_us=high,
        rate_per_s=units / median * 1e6,
        rate_min_per_s=units / high * 1e6,
        rate_max_per_s=units / low * 1e6,
        errors=contender.errors,
        note=contender.note,
    )


@dataclass
class Verdict:
    goal: Goal
    met: bool
    value: float | None  # the time ratio (kind=time) or rate ratio (kind=rate)
    reasons: list[str]

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.2f}x"
        status = "MET" if self.met else "NOT MET"
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"goal: {self.goal.describe()}: {shown} -> {status}{why}"


def judge(goal: Goal, results: list[Measurement]) -> Verdict:
    by_name = {m.contender: m for m in results}
    mine, base = by_name.get(goal.contender), by_name.get(goal.baseline)
    if mine is None or base is None:
        return Verdict(goal, False, None, ["contender or baseline missing"])
    time_ratio = mine.per_unit_us / base.per_unit_us
    value = time_ratio if goal.kind == "time" else 1 / time_ratio
    met = value <= goal.factor if goal.kind == "time" else value >= goal.factor
    reasons = []
    if goal.flat_memory and not (mine.memory or {}).get("flat", False):
        met = False
        reasons.append("memory not flat")
    if goal.no_errors and mine.errors:
        met = False
        reasons.append(f"{len(mine.errors)} errors")
    return Verdict(goal, met, value, reasons)
