"""Health of a ``Database``: the answer to "can I reach PostgreSQL right now, and how fast?"."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from loguru import logger

from dbkit.stats import PoolStats

__all__ = ["Health", "HealthMonitor", "ReplicaHealth"]


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """One read replica as last seen: ``ok`` when it answers as a standby whose replay is
    within ``max_replica_lag`` (``lag_s``: seconds of replay behind, None when down)."""

    name: str
    ok: bool
    lag_s: float | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Result of one probe; ``error`` says why when ``ok`` is false (never with secrets).
    ``ok`` is the primary's; ``replicas`` reports each read replica."""

    ok: bool
    latency_ms: float
    error: str | None
    pool: PoolStats
    breaker: str = "closed"  # the connect circuit breaker: closed, open or half_open
    replicas: tuple[ReplicaHealth, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class HealthMonitor(threading.Thread):
    """Probes the database every ``interval`` seconds in the background (the Go design's
    HealthCheckInterval).  Each probe also exercises the pool and the circuit breaker, so a
    server that comes back is noticed before the next real request.

    A daemon thread: it never keeps the process alive, and a failing probe is logged, never
    raised.  ``last`` holds the latest result.
    """

    def __init__(self, probe: Callable[[], Health], interval: float, name: str) -> None:
        super().__init__(name=f"dbkit-health-{name}", daemon=True)
        self._probe = probe
        self._interval = interval
        self._stop_event = threading.Event()
        self._target = name
        self.last: Health | None = None
        self.probes = 0

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                health = self._probe()
            except Exception as error:  # the probe itself never raises; be safe anyway
                logger.opt(exception=error).warning("health probe of {} crashed", self._target)
                continue
            previous, self.last = self.last, health
            self.probes += 1
            logger.bind(pool=health.pool.as_dict()).debug(
                "health of {}: ok={} latency={:.2f}ms breaker={}",
                self._target,
                health.ok,
                health.latency_ms,
                health.breaker,
            )
            if previous is not None and previous.ok != health.ok:
                if health.ok:
                    logger.info("{} is reachable again", self._target)
                else:
                    logger.warning("{} is unreachable: {}", self._target, health.error)

    def stop(self) -> None:
        self._stop_event.set()
