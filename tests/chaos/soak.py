"""``run(Options) -> SoakResult``: the whole soak, from ``initdb`` to the verdict."""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psycopg

from dbkit import Database
from dbkit.local import LocalPostgres

from ..faultproxy import FaultProxy
from .bank import COMMITTED, FAILED, UNKNOWN, Bank, Transfer, Workers, create_schema
from .check import Checked, check
from .faults import PROXY_KINDS, RESTART_KINDS, FaultEvent, FaultThread
from .report import percentile, render

__all__ = ["Options", "SoakResult", "run"]

DBNAME = "chaos"
APPLICATION_NAME = "dbkit-chaos"
# Every commit waits for its WAL write: a commit the server acknowledged survives an
# immediate stop (the data directory lives on; only the postmaster dies).
SERVER_SETTINGS: dict[str, str | int] = {"synchronous_commit": "on", "max_connections": 60}


@dataclass(frozen=True)
class Options:
    seconds: float = 40.0  # the whole run, calm phase included
    threads: int = 6
    calm: float = 5.0  # seconds without faults at the start
    accounts: int = 20
    initial: int = 1000
    retries: int = 5  # @db.transaction(retries=...)
    fault_every: float = 1.0  # mean seconds between proxy/terminate faults
    restarts: bool = True
    restart_every: float = 8.0  # mean seconds between server restarts
    downtime: float = 0.5  # seconds the server stays down in a restart
    seed: int | None = None
    max_open_conns: int | None = None  # default: threads
    # PostgresConfig fields for the Database (None: dbkit's default)
    breaker_failure_threshold: int | None = None
    breaker_recovery_timeout: float | None = None
    progress: bool = False  # a line on stderr every 5 s


@dataclass
class SoakResult:
    options: Options
    seed: int
    elapsed: float
    transfers: list[Transfer]
    events: list[FaultEvent]
    checked: Checked
    proxy: dict[str, int]
    retries: int
    crashes: list[str] = field(default_factory=list)

    @property
    def calm_seconds(self) -> float:
        return min(self.options.calm, self.elapsed)

    @property
    def fault_seconds(self) -> float:
        return max(0.0, self.elapsed - self.options.calm)

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.transfers if t.outcome == outcome)

    def throughput(self, start: float, end: float) -> float:
        if end <= start:
            return 0.0
        done = sum(
            1
            for t in self.transfers
            if t.outcome == COMMITTED and t.finished is not None and start <= t.finished < end
        )
        return done / (end - start)

    def latency(self) -> dict[str, float | None]:
        """Seconds from a transfer's start to its end (retries and waits included)."""
        took = [t.finished - t.started for t in self.transfers if t.finished is not None]
        return {
            "p50": percentile(took, 50),
            "p99": percentile(took, 99),
            "max": max(took) if took else None,
        }

    def longest_stall(self) -> float:
        """The longest time under faults without any transfer committing."""
        start, end = self.calm_seconds, self.elapsed
        marks = sorted(
            t.finished
            for t in self.transfers
            if t.outcome == COMMITTED and t.finished is not None and start <= t.finished < end
        )
        edges = [start, *marks, end]
        return max((b - a for a, b in itertools.pairwise(edges)), default=0.0)

    def examples(self) -> dict[str, str]:
        """The first message of each failure class and of unknown outcomes."""
        seen: dict[str, str] = {}
        for t in sorted(self.transfers, key=lambda t: t.started):
            if t.outcome in (FAILED, UNKNOWN) and t.error is not None:
                seen.setdefault(t.error, t.message or "")
        return seen

    def foreign_errors(self) -> dict[str, int]:
        """Exceptions of transfers that are not ``DbkitError``s: dbkit let one escape."""
        return dict(Counter(t.error or "?" for t in self.transfers if t.foreign))

    def recovery(self) -> dict[str, Any]:
        """Per restart: from its start to the first transfer committed after the server
        went down (one that committed before cannot count)."""
        committed = sorted(
            t.finished for t in self.transfers if t.outcome == COMMITTED and t.finished is not None
        )
        per_restart: list[dict[str, Any]] = []
        for event in self.events:
            if event.kind not in RESTART_KINDS or event.down is None:
                continue
            first = next((f for f in committed if f > event.down), None)
            per_restart.append(
                {
                    "kind": event.kind,
                    "at": event.at,
                    "down_for": event.done - event.at,
                    "recovery": None if first is None else first - event.at,
                    "after_end": first is not None and first >= self.elapsed,
                }
            )
        times = [r["recovery"] for r in per_restart if r["recovery"] is not None]
        return {
            "per_restart": per_restart,
            "p50": percentile(times, 50),
            "p99": percentile(times, 99),
            "max": max(times) if times else None,
            "not_recovered": sum(1 for r in per_restart if r["recovery"] is None),
        }

    @property
    def problems(self) -> list[str]:
        """Everything that fails the run: broken invariants, crashed or hung threads, and
        exceptions outside dbkit's hierarchy."""
        foreign = [
            f"{count} transfer(s) raised {name}, not a DbkitError"
            for name, count in self.foreign_errors().items()
        ]
        return [*self.checked.violations, *self.crashes, *foreign]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        opts = asdict(self.options)
        opts["seed"] = self.seed
        outcomes = {name: self.count(name) for name in (COMMITTED, FAILED, UNKNOWN)}
        total = len(self.transfers)
        faults = Counter(e.kind for e in self.events)
        kinds = PROXY_KINDS + (RESTART_KINDS if self.options.restarts else ())
        unknowns = [asdict(u) for u in self.checked.unknowns]
        return {
            "options": opts,
            "ok": self.ok,
            "problems": self.problems,
            "violations": self.checked.violations,
            "crashes": self.crashes,
            "foreign_errors": self.foreign_errors(),
            "elapsed": self.elapsed,
            "calm_seconds": self.calm_seconds,
            "fault_seconds": self.fault_seconds,
            "total": total,
            "outcomes": outcomes,
            "failed_by_class": dict(
                Counter(t.error or "?" for t in self.transfers if t.outcome == FAILED)
            ),
            "failure_pct": 100 * outcomes[FAILED] / total if total else 0.0,
            "unknown_pct": 100 * outcomes[UNKNOWN] / total if total else 0.0,
            "unknowns": unknowns,
            "unknown_committed": sum(1 for u in self.checked.unknowns if u.committed),
            "unknown_rolled_back": sum(1 for u in self.checked.unknowns if not u.committed),
            "throughput_calm": self.throughput(0.0, self.calm_seconds),
            "throughput_faults": self.throughput(self.calm_seconds, self.elapsed),
            "faults_by_kind": {kind: faults.get(kind, 0) for kind in kinds},
            "recovery": self.recovery(),
            "latency": self.latency(),
            "longest_stall": self.longest_stall() if self.fault_seconds > 0 else None,
            "examples": self.examples(),
            "retries": self.retries,
            "proxy": self.proxy,
            "total_money": self.checked.total_money,
            "expected_money": self.checked.expected_money,
            "ledger_rows": self.checked.ledger_rows,
            "committed_found": self.checked.committed_found,
        }

    def report(self) -> str:
        return render(self.as_dict())


def _direct(server: LocalPostgres) -> psycopg.Connection[Any]:
    """Autocommit, straight to the server: setup and the final check, never via the proxy."""
    return psycopg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        dbname=DBNAME,
        autocommit=True,
        connect_timeout=10,
    )


def run(options: Options, *, out: TextIO | None = None) -> SoakResult:
    """Start a private server (a kept data directory in a temp dir, so that a stop in any
    mode leaves the data for the next start), run the soak, check, and clean up.  The
    report is printed on ``out`` when given."""
    seed = options.seed if options.seed is not None else random.randrange(1, 2**31)
    parent = Path(tempfile.mkdtemp(prefix="dbkit-chaos-"))
    parent.chmod(0o755)  # our own fresh directory: the server user must reach data/ in it
    server = LocalPostgres(parent / "data", settings=SERVER_SETTINGS)
    try:
        with server:
            result = _soak(server, options, seed)
    finally:
        with contextlib.suppress(Exception):
            server.stop(mode="immediate")
        shutil.rmtree(parent, ignore_errors=True)
    if out is not None:
        print(result.report(), file=out, flush=True)
    return result


def _soak(server: LocalPostgres, options: Options, seed: int) -> SoakResult:
    server.create_database(DBNAME)
    with _direct(server) as conn:
        create_schema(conn, options.accounts, options.initial)
    overrides: dict[str, Any] = {
        "max_open_conns": options.max_open_conns or options.threads,
        "max_idle_conns": options.max_open_conns or options.threads,
        "application_name": APPLICATION_NAME,
    }
    for name in ("breaker_failure_threshold", "breaker_recovery_timeout"):
        if getattr(options, name) is not None:
            overrides[name] = getattr(options, name)

    with FaultProxy(server.host, server.port) as proxy:
        db = Database.from_url(proxy.url_for(server.url_for(DBNAME)), **overrides).connect()
        try:
            t0 = time.monotonic()

            def clock() -> float:
                return time.monotonic() - t0

            bank = Bank(db, options.accounts, options.retries, clock)
            workers = Workers(bank, options.threads, seed)
            faults = FaultThread(
                server,
                proxy,
                clock=clock,
                calm=options.calm,
                fault_every=options.fault_every,
                restart_every=options.restart_every if options.restarts else None,
                downtime=options.downtime,
                application_name=APPLICATION_NAME,
                dbname=DBNAME,
                seed=seed,
            )
            workers.start()
            faults.start()
            _wait(options, bank, db, clock)
            elapsed = clock()
            workers.request_stop()
            faults.stop()
            # From here on no fault: whatever is still running may finish normally.
            proxy.disarm()
            proxy.accept()
            proxy.release()
            if not server.is_running():
                server.start()
            crashes = list(bank.crashes)
            crashes += workers.join(timeout=120)
            if faults.error is not None:
                crashes.append(f"fault thread: {faults.error}")
            crashes += [c for c in bank.crashes if c not in crashes]
            retries = db.query_stats().transactions_retried
        finally:
            db.close()
        counters = proxy.counters()
    transfers = bank.snapshot()
    with _direct(server) as conn:
        checked = check(conn, transfers, options.accounts, options.initial)
    return SoakResult(
        options=options,
        seed=seed,
        elapsed=elapsed,
        transfers=transfers,
        events=list(faults.events),
        checked=checked,
        proxy=counters,
        retries=retries,
        crashes=crashes,
    )


def _wait(options: Options, bank: Bank, db: Database, clock: Callable[[], float]) -> None:
    """Sleep through the run, with a progress line every 5 s when asked."""
    while (left := options.seconds - clock()) > 0:
        time.sleep(min(5.0, left))
        if options.progress:
            done = Counter(t.outcome for t in bank.snapshot())
            print(
                f"[{clock():5.1f}s] committed {done[COMMITTED]}, failed {done[FAILED]}, "
                f"unknown {done[UNKNOWN]}, running {done[None]}; breaker {db.breaker.state}",
                file=sys.stderr,
                flush=True,
            )
