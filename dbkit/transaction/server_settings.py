"""Server settings local to a transaction: ``db.transaction(settings={"work_mem": "256MB"})``.

Each setting becomes ``set_config(name, value, true)``, all of a block's in one ``SELECT``
sent with the block's other commands (after BEGIN, or after SAVEPOINT), so they cost no
round trip of their own where those commands are sent in one go.  ``set_config`` rather
than ``SET LOCAL name = 'value'``: a list setting such as ``search_path`` then reads
``"a, b"`` as two entries, as ``postgresql.conf`` and ``SET name = a, b`` would, not as one
quoted name.

Everything is checked before any SQL of the transaction: the types and the syntax of the
names here (``normalize_settings``, no I/O), then the names against the server's own list
(``KnownSettings``, fetched once per Database): a name the server does not know, unless it
is a custom ``prefix.name`` placeholder, or one that cannot be changed inside a session
(``pg_settings.context`` other than ``user`` / ``superuser``) is a ``ValueError``.  Values
are the server's to judge (``work_mem = 'lots'`` fails at BEGIN like a bad statement);
they are sent as escaped string literals, never as SQL.
"""

from __future__ import annotations

import math
import re
import threading
import types
from collections.abc import Callable, Iterable, Mapping

__all__ = ["KnownSettings", "SettingValue", "normalize_settings", "set_config_command"]

SettingValue = str | int | float | bool

# PostgreSQL's own rule for a setting's name (guc.c): identifiers, dot-separated.
_NAME = re.compile(r"[a-z_][a-z0-9_$]*(?:\.[a-z_][a-z0-9_$]*)*\Z")

# Settings a block has an option of its own for, which dbkit must keep track of (or which
# must be set before the transaction's first query).
_OWN_OPTION = {
    "statement_timeout": "use the block's timeout= (seconds) instead",
    "transaction_isolation": "use isolation= instead",
    "transaction_read_only": "use readonly= instead",
    "transaction_deferrable": "it must be set before the transaction's first query",
}

# pg_settings.context values of the settings a session may change.
_SESSION_CONTEXTS = frozenset({"user", "superuser"})


def normalize_settings(settings: Mapping[str, SettingValue]) -> Mapping[str, str]:
    """``{name: text}`` (names lower-cased, values as the server reads them: ``True`` →
    ``'on'``, ``64`` → ``'64'``), read-only; ``TypeError`` / ``ValueError`` naming the
    offending entry.  No I/O: the names are checked against the server by
    ``KnownSettings``."""
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"settings must be a mapping of setting names to values, got {type(settings).__name__}"
        )
    normalized: dict[str, str] = {}
    for name, value in settings.items():
        if not isinstance(name, str):
            raise TypeError(f"setting names must be strings, got {name!r}")
        key = name.strip().lower()
        if not _NAME.match(key):
            raise ValueError(
                f"invalid setting name {name!r}: a server setting is a name such as "
                "'work_mem', or 'prefix.name' for a custom one"
            )
        if key in _OWN_OPTION:
            raise ValueError(f"setting {key!r} cannot be set by settings=: {_OWN_OPTION[key]}")
        if key in normalized:
            raise ValueError(f"setting {key!r} is given twice")
        normalized[key] = _text(key, value)
    return types.MappingProxyType(normalized)


def _text(name: str, value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"setting {name!r}: {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"setting {name!r}: a value cannot contain a NUL character")
        return value
    raise TypeError(
        f"setting {name!r}: values must be str, int, float or bool, got {type(value).__name__}"
    )


def _literal(text: str) -> str:
    """``text`` as an escape string literal: no character of it can end the literal."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def set_config_command(settings: Mapping[str, str]) -> str:
    """One ``SELECT set_config(name, value, true), …`` for normalized settings."""
    calls = ", ".join(
        f"set_config({_literal(name)}, {_literal(value)}, true)" for name, value in settings.items()
    )
    return f"SELECT {calls}"


class KnownSettings:
    """The server's settings and where they may be changed (``pg_settings``), fetched the
    first time a block with settings is entered, then kept: the list is the server's, the
    same for every connection of a Database."""

    def __init__(self, fetch: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """``fetch()``: the ``(name, context)`` rows of ``pg_settings``."""
        self._fetch = fetch
        self._contexts: dict[str, str] | None = None
        self._lock = threading.Lock()

    def contexts(self) -> dict[str, str]:
        contexts = self._contexts
        if contexts is None:
            with self._lock:
                if self._contexts is None:
                    self._contexts = {name.lower(): context for name, context in self._fetch()}
                contexts = self._contexts
        return contexts

    def check(self, settings: Mapping[str, str]) -> None:
        """``ValueError`` for a name the server does not know (a dotted name is a custom
        placeholder, unless its prefix belongs to a loaded extension) or one a session
        cannot change."""
        contexts = self.contexts()
        for name in settings:
            context = contexts.get(name)
            if context is None:
                prefix = name.partition(".")[0]
                if "." not in name or any(known.startswith(prefix + ".") for known in contexts):
                    raise ValueError(f"unknown server setting {name!r} (not in pg_settings)")
            elif context not in _SESSION_CONTEXTS:
                raise ValueError(
                    f"server setting {name!r} cannot be changed in a session (its context "
                    f"is {context!r}: it is set in postgresql.conf or at server start)"
                )
