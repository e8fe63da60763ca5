"""Reporting: one table per workload on stdout, and the same figures as JSON, with what was
measured on (machine, versions, commit) so results can be compared between commits."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .harness import Measurement, Verdict, Workload

PACKAGES = ("dbkit-postgres", "sqlalchemy", "psycopg", "psycopg-pool", "dataset")


@dataclass
class Outcome:
    workload: Workload
    results: list[Measurement]
    verdict: Verdict | None


def _time(us: float, unit_of: float | None = None) -> tuple[str, str]:
    """``us`` as a number and a unit, chosen from ``unit_of`` (default: ``us`` itself)."""
    ref = us if unit_of is None else unit_of
    if ref >= 1e6:
        return f"{us / 1e6:.2f}", "s"
    if ref >= 1e4:
        return f"{us / 1e3:.0f}", "ms"
    if ref >= 1e3:
        return f"{us / 1e3:.1f}", "ms"
    return f"{us:.1f}", "µs"


def _memory(m: Measurement) -> str:
    mem = m.memory
    if not mem:
        return ""
    flat = "flat" if mem.get("flat") else "GROWS"
    return (
        f"peak RSS +{mem['peak_growth_mib']:.1f} MiB "
        f"(+{mem['peak_growth_tenth_mib']:.1f} for 10% of rows) {flat}"
    )


def print_outcome(outcome: Outcome, rounds: int) -> None:
    workload, rows = outcome.workload, outcome.results
    unit = workload.unit
    bases = ", ".join(
        f"{label} = {name!r}" for label, name in workload.baselines.items() if label != name
    )
    print(f"\n== {workload.name}  [{workload.key}]")
    per = f"1 op = {workload.units_per_op:,} {unit}s" if workload.units_per_op > 1 else ""
    print(
        f"   {workload.ops:,} op{'s' if workload.ops != 1 else ''}/round, "
        f"median of {rounds} rounds"
        + (f"; {per}" if per else "")
        + "; x = time per "
        + unit
        + " / baseline's (lower is faster)"
        + (f"; {bases}" if bases else "")
    )
    header = (
        f"   {'contender':<24} {'time/op':>10} {'min-max':>16} {unit + '/s':>12} "
        f"{'x psycopg':>9} {'x SQLAlchemy':>12}  notes"
    )
    print(header)
    for m in rows:
        median, tu = _time(m.per_op_us)
        low, _ = _time(m.min_us, m.per_op_us)
        high, _ = _time(m.max_us, m.per_op_us)
        vs_pg = f"{m.ratios['psycopg']:.2f}" if "psycopg" in m.ratios else "-"
        vs_sa = f"{m.ratios['sqlalchemy']:.2f}" if "sqlalchemy" in m.ratios else "-"
        notes = [n for n in (m.note, _memory(m)) if n]
        if m.errors:
            notes.append(f"{len(m.errors)} ERRORS")
        span = f"{low}-{high} {tu}"
        print(
            f"   {m.contender:<24} {median + ' ' + tu:>10} {span:>16} {m.rate_per_s:>12,.0f} "
            f"{vs_pg:>9} {vs_sa:>12}  {'; '.join(notes)}"
        )
    for m in rows:
        for error in m.errors[:5]:
            print(f"   error ({m.contender}): {error}")
        if len(m.errors) > 5:
            print(f"   ... and {len(m.errors) - 5} more errors ({m.contender})")
    if outcome.verdict is not None:
        print(f"   {outcome.verdict.line()}")
    else:
        print("   goal: none set")


def _git_commit() -> str | None:
    """HEAD of the checkout (read-only: ``rev-parse`` touches neither index nor tree)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(server_version: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "postgres": server_version,
        "packages": {p: _version(p) for p in PACKAGES},
        "commit": _git_commit(),
    }


def write_json(
    outcomes: list[Outcome], path: Path, machine: dict[str, Any], run: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for outcome in outcomes:
        for m in outcome.results:
            row = asdict(m)
            row["per_unit_us"] = m.per_unit_us
            results.append(row)
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "run": run,
        "results": results,
        "goals": [
            {
                "workload": o.workload.key,
                "goal": o.verdict.goal.describe(),
                "value": o.verdict.value,
                "met": o.verdict.met,
                "reasons": o.verdict.reasons,
            }
            for o in outcomes
            if o.verdict is not None
        ],
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
