"""The connection budget of a fleet: can N processes, each with its pools full, connect?

Every process running dbkit may open up to ``max_open_conns`` connections per pool.  N of
them against one server need N x (the sum over the pools that reach it) connection
slots, and the server has ``max_connections`` minus the slots it keeps for superusers
(``superuser_reserved_connections``) and, from PostgreSQL 16, for roles with
``pg_use_reserved_connections`` (``reserved_connections``).  A fleet that needs more
exhausts the server under load: new connections fail with "too many clients" (or
"remaining connection slots are reserved"), in every process at once.

``dbkit check --instances N`` prints this arithmetic and fails when the fleet does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from dbkit.database import Database

__all__ = ["ConnectionBudget", "connection_budget", "connection_budgets"]

# reserved_connections exists from PostgreSQL 16 on: NULL (missing_ok) before.
_LIMITS = sa.text(
    "SELECT current_setting('max_connections')::int, "
    "current_setting('superuser_reserved_connections')::int, "
    "current_setting('reserved_connections', true)::int"
)


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """``instances`` processes, each with ``pools`` (name → max_open_conns, 0 =
    unlimited), against one server's connection limits."""

    instances: int
    pools: Mapping[str, int]
    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int | None = None  # None: the server has no such setting

    @property
    def per_instance(self) -> int | None:
        """Connections one process may open (None: a pool is unlimited)."""
        if any(size <= 0 for size in self.pools.values()):
            return None
        return sum(self.pools.values())

    @property
    def needed(self) -> int | None:
        per = self.per_instance
        return None if per is None else self.instances * per

    @property
    def available(self) -> int:
        """The slots an application role may use."""
        reserved = self.superuser_reserved_connections + (self.reserved_connections or 0)
        return self.max_connections - reserved

    @property
    def fits(self) -> bool:
        needed = self.needed
        return needed is not None and needed <= self.available

    def server_arithmetic(self) -> str:
        """``max_connections 100 - superuser_reserved_connections 3 = 97``."""
        text = (
            f"max_connections {self.max_connections} - superuser_reserved_connections "
            f"{self.superuser_reserved_connections}"
        )
        if self.reserved_connections is not None:
            text += f" - reserved_connections {self.reserved_connections}"
        return f"{text} = {self.available}"

    def fleet_arithmetic(self) -> str:
        """``3 instances x 25 (max_open_conns: primary 25) = 75``."""
        pools = " + ".join(f"{name} {size or 'unlimited'}" for name, size in self.pools.items())
        per = self.per_instance
        instances = f"{self.instances} instance{'s' if self.instances != 1 else ''}"
        if per is None:
            return f"{instances} x unlimited (max_open_conns: {pools}) = unlimited"
        return f"{instances} x {per} (max_open_conns: {pools}) = {self.needed}"

    def verdict(self) -> str:
        needed = self.needed
        if needed is None:
            return f"EXCEEDED: unlimited pools against {self.available} slots"
        if needed > self.available:
            return f"EXCEEDED: {needed} > {self.available} slots, {needed - self.available} short"
        return f"ok: {needed} of {self.available} slots, {self.available - needed} to spare"

    def problem(self) -> str | None:
        """Why the fleet does not fit, and what to change; None when it does."""
        if self.fits:
            return None
        most = max(0, self.available // self.instances)
        advice = f"set max_open_conns to at most {most} for {self.instances} instance(s)"
        per = self.per_instance
        if per is None:
            return (
                f"max_open_conns = 0 (unlimited): {self.instances} instance(s) could open "
                f"more connections than the server's {self.available} slots "
                f"({self.server_arithmetic()}); {advice}"
            )
        fleet = max(0, self.available // per)
        return (
            f"{self.fleet_arithmetic()} connections would exhaust the server's "
            f"{self.available} slots ({self.server_arithmetic()}); {advice}, or run at most "
            f"{fleet} instance(s), or raise max_connections"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "pools": dict(self.pools),
            "per_instance": self.per_instance,
            "needed": self.needed,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved_connections,
            "reserved_connections": self.reserved_connections,
            "available": self.available,
            "fits": self.fits,
        }


def connection_budget(db: Database, instances: int) -> ConnectionBudget:
    """The budget of ``instances`` processes configured as ``db``, against its server
    (the primary's pool only: ``connection_budgets`` adds each replica's)."""
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be a whole number >= 1, got {instances!r}")
    row = db.execute(_LIMITS).one()
    return ConnectionBudget(
        instances=instances,
        pools={"primary": db.config.max_open_conns},
        max_connections=row[0],
        superuser_reserved_connections=row[1],
        reserved_connections=row[2],
    )


def connection_budgets(db: Database, instances: int) -> dict[str, ConnectionBudget]:
    """Every server's budget, keyed by pool name: the primary's, and each replica's pool
    against that replica's own server (a replica that does not answer is left out: the
    caller reports it as down)."""
    budgets = {"primary": connection_budget(db, instances)}
    for name, replica in db.replica_databases().items():
        try:
            budget = connection_budget(replica, instances)
        except Exception:  # a replica that is down has no budget to show
            continue
        budgets[name] = ConnectionBudget(
            instances=instances,
            pools={name: replica.config.max_open_conns},
            max_connections=budget.max_connections,
            superuser_reserved_connections=budget.superuser_reserved_connections,
            reserved_connections=budget.reserved_connections,
        )
    return budgets
