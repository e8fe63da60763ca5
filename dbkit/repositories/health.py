"""``health_checks``: a history of ``Database.health()`` probes, for dashboards and alerts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dbkit.health import Health
from dbkit.repository import Repository
from dbkit.schema import health_checks

__all__ = ["HealthCheck", "HealthRepository"]


@dataclass
class HealthCheck:
    """One recorded probe.  ``status`` is ``ok``, ``degraded`` (answered, but slowly) or
    ``down``; ``pool`` is the pool statistics at probe time, as stored JSON."""

    status: str
    latency_ms: float
    error: str | None = None
    pool: dict[str, Any] | None = None
    id: int | None = None
    checked_at: datetime | None = None


class HealthRepository(Repository[HealthCheck]):
    """Records probes and reads back the most recent ones."""

    table = health_checks
    model = HealthCheck

    def record(self, health: Health, *, degraded_after_ms: float | None = None) -> HealthCheck:
        """Store one probe.  ``degraded_after_ms``: a successful probe slower than this is
        stored as ``degraded`` rather than ``ok``, so slow answers show up in the history."""
        status = "ok" if health.ok else "down"
        if health.ok and degraded_after_ms is not None and health.latency_ms > degraded_after_ms:
            status = "degraded"
        return self.add(
            {
                "status": status,
                "latency_ms": health.latency_ms,
                "error": health.error,
                "pool": health.pool.as_dict(),
            }
        )

    def latest(self, n: int = 10) -> list[HealthCheck]:
        """The ``n`` most recent probes, newest first (id breaks ties within one now())."""
        return self.list(order_by=["-checked_at", "-id"], limit=n)
