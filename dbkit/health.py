"""Health of a ``Database``: the answer to "can I reach PostgreSQL right now, and how fast?"."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dbkit.stats import PoolStats

__all__ = ["Health"]


@dataclass(frozen=True, slots=True)
class Health:
    """Result of one probe; ``error`` says why when ``ok`` is false (never with secrets)."""

    ok: bool
    latency_ms: float
    error: str | None
    pool: PoolStats
    breaker: str = "closed"  # the connect circuit breaker: closed, open or half_open

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
