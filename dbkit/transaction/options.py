"""``TransactionOptions``: what one ``db.transaction(...)`` asks for, validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from dbkit.errors import TransactionError
from dbkit.transaction.server_settings import (
    SettingValue,
    normalize_settings,
    set_config_command,
)

__all__ = ["TransactionOptions", "normalize_isolation"]

_ISOLATION_LEVELS = {
    "serializable": "SERIALIZABLE",
    "repeatable read": "REPEATABLE READ",
    "repeatable_read": "REPEATABLE READ",
    "read committed": "READ COMMITTED",
    "read_committed": "READ COMMITTED",
    "read uncommitted": "READ UNCOMMITTED",
    "read_uncommitted": "READ UNCOMMITTED",
}


def normalize_isolation(value: str | None) -> str | None:
    """``"repeatable_read"`` → ``"REPEATABLE READ"``; an unknown level is an error."""
    if value is None:
        return None
    level = _ISOLATION_LEVELS.get(value.strip().lower())
    if level is None:
        raise TransactionError(
            f"unknown isolation level {value!r}; use one of: serializable, repeatable read, "
            "read committed, read uncommitted"
        )
    return level


@dataclass(frozen=True, slots=True)
class TransactionOptions:
    """The options of a block.  ``readonly`` and ``isolation`` None mean "inherit" (the
    enclosing block's, or the server's default for the outermost one).  ``settings``:
    server settings local to the transaction (``dbkit.transaction.server_settings``),
    kept normalized (lower-case names, values as text); an empty mapping is None.
    ``replica``: False pins an outermost read-only block to the primary; None lets
    ``read_from`` route it (see ``dbkit.replicas``)."""

    savepoint: bool = True
    durable: bool = False
    readonly: bool | None = None
    isolation: str | None = None
    timeout: float | None = None
    settings: Mapping[str, SettingValue] | None = None
    replica: bool | None = None

    def __post_init__(self) -> None:
        timeout = self.timeout
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise TransactionError(f"timeout must be a positive number of seconds, got {timeout}")
        if self.isolation is not None:
            object.__setattr__(self, "isolation", normalize_isolation(self.isolation))
        if self.settings is not None:
            settings = normalize_settings(self.settings)
            object.__setattr__(self, "settings", settings or None)
        if self.replica is not None and not isinstance(self.replica, bool):
            raise TransactionError(f"replica must be True, False or None, got {self.replica!r}")

    @property
    def may_use_replica(self) -> bool:
        """Read-only and not serializable (a hot standby refuses SERIALIZABLE), unpinned."""
        return (
            bool(self.readonly) and self.isolation != "SERIALIZABLE" and self.replica is not False
        )

    @property
    def timeout_sql(self) -> str | None:
        """The timeout as a ``statement_timeout`` value, e.g. ``'1500ms'``."""
        if self.timeout is None:
            return None
        return f"'{max(1, round(self.timeout * 1000))}ms'"

    @property
    def settings_sql(self) -> str | None:
        """The command that applies ``settings`` (``SELECT set_config(…)``), or None."""
        if not self.settings:
            return None
        return set_config_command({name: str(value) for name, value in self.settings.items()})
