"""Figures of a soak and the table printed for a person."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["percentile", "render"]

_MAX_UNKNOWNS_SHOWN = 20


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile (None for no values): p99 of a few values is their max."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def render(result: dict[str, Any]) -> str:
    """The report of ``SoakResult.as_dict()`` as aligned text."""
    opts = result["options"]
    out: list[str] = []

    def line(label: str, value: object = "", extra: object = "") -> None:
        out.append(f"  {label:<38}{value!s:>10}  {extra!s}".rstrip())

    restarts = (
        f"a restart every ~{opts['restart_every']:g}s (down {opts['downtime']:g}s)"
        if opts["restarts"]
        else "no restarts"
    )
    breaker = [
        f"{name}={opts[name]:g}"
        for name in ("breaker_failure_threshold", "breaker_recovery_timeout")
        if opts[name] is not None
    ]
    out.append(
        f"dbkit chaos soak: {result['elapsed']:.1f}s (calm {result['calm_seconds']:.1f}s, "
        f"faults {result['fault_seconds']:.1f}s), {opts['threads']} threads, "
        f"{opts['accounts']} accounts, retries={opts['retries']}, seed {opts['seed']}"
    )
    out.append(
        f"faults: one every ~{opts['fault_every']:g}s, {restarts}; breaker: "
        + (", ".join(breaker) or "dbkit's defaults")
    )
    out.append("")
    total = result["total"]

    def pct(n: int) -> str:
        return f"{100 * n / total:.2f}%" if total else "-"

    outcomes = result["outcomes"]
    out.append("outcomes")
    line("committed", outcomes["committed"], pct(outcomes["committed"]))
    line("failed", outcomes["failed"], pct(outcomes["failed"]))
    for name, count in sorted(result["failed_by_class"].items(), key=lambda kv: -kv[1]):
        line(f"  {name}", count, pct(count))
    line("unknown", outcomes["unknown"], pct(outcomes["unknown"]))
    line("  committed after all", result["unknown_committed"])
    line("  rolled back", result["unknown_rolled_back"])
    line("total", total)
    line("transaction retries (dbkit)", result["retries"])
    out.append("")
    out.append("throughput (committed transfers/s)")
    line("calm", f"{result['throughput_calm']:.1f}")
    line("under faults", f"{result['throughput_faults']:.1f}")
    line("longest time without a commit", _seconds(result["longest_stall"]), "(under faults)")
    latency = result["latency"]
    line("transfer time p50 / p99", _seconds(latency["p50"]), _seconds(latency["p99"]))
    line("transfer time max", _seconds(latency["max"]), "(retries and waits included)")
    out.append("")
    out.append("faults")
    for kind, count in result["faults_by_kind"].items():
        line(kind, count)
    proxy = result["proxy"]
    line("proxy: connections accepted", proxy["connections"])
    line("proxy: connections reset (no server)", proxy["upstream_failures"])
    line("proxy: COMMITs seen", proxy["commits_seen"])
    line("proxy: COMMITs cut after", proxy["commits_cut_after"])
    line("proxy: COMMITs cut instead", proxy["commits_cut_instead"])
    out.append("")
    recovery = result["recovery"]
    out.append("recovery after a restart (restart began -> first committed transfer)")
    line("restarts", len(recovery["per_restart"]))
    line("p50", _seconds(recovery["p50"]))
    line("p99", _seconds(recovery["p99"]))
    line("max", _seconds(recovery["max"]))
    line("not recovered before the end", recovery["not_recovered"])
    for item in recovery["per_restart"]:
        line(
            f"  {item['kind']} at {item['at']:.1f}s",
            _seconds(item["recovery"]),
            f"(server down {item['down_for']:.2f}s)"
            + (", first commit after the run's end" if item["after_end"] else ""),
        )
    out.append("")
    out.append("unknown outcomes")
    if not result["unknowns"]:
        line("none")
    shown = result["unknowns"][:_MAX_UNKNOWNS_SHOWN]
    for item in shown:
        went = "committed" if item["committed"] else "rolled back"
        xid = "xid ?" if item["xid"] is None else f"xid {item['xid']}"
        status = f" pg_xact_status={item['xact_status']}" if item["xact_status"] else ""
        out.append(f"  {item['id']}  {xid:<14} {went}{status}")
    if len(result["unknowns"]) > len(shown):
        out.append(f"  ... and {len(result['unknowns']) - len(shown)} more")
    if result["examples"]:
        out.append("")
        out.append("first message of each error")
        for name, message in result["examples"].items():
            out.append(f"  {name}: {message}")
    out.append("")
    out.append("invariants")
    line("money", result["total_money"], f"expected {result['expected_money']}")
    found = f"{result['committed_found']}/{outcomes['committed']}"
    line("committed transfers in the ledger", found)
    line("ledger rows", result["ledger_rows"])
    if result["foreign_errors"]:
        out.append("  errors outside dbkit's hierarchy (DbkitError):")
        out.extend(f"    {name}: {count}" for name, count in result["foreign_errors"].items())
    for crash in result["crashes"]:
        out.append("  CRASH " + crash.rstrip().replace("\n", "\n        "))
    for violation in result["violations"]:
        out.append(f"  VIOLATION {violation}")
    out.append("")
    verdict = "PASS" if result["ok"] else f"FAIL ({len(result['problems'])} problem(s))"
    out.append(f"result: {verdict}")
    return "\n".join(out)
