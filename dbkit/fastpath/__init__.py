"""The seam: every use of SQLAlchemy's and psycopg's private API, behind one switch.

dbkit is fast where SQLAlchemy's per-statement machinery would cost more than the round
trip itself: a point read, a transaction's BEGIN, a pool checkout.  Those shortcuts need
names the two libraries do not promise to keep (``_compile_w_cache``, ``_do_get``,
``Connection._pipeline`` …), so they all live in this package and nowhere else:

=====================  =================================================================
``psycopg``            a transaction's BEGIN sent ahead, its answer read with the first
                       statement's (``PgConnection``)
``pool``               the pool's checkout and return paths with dbkit's policy inside
                       them, a hand-off idle queue, pool entries without the proxy
``sqlalchemy``         a statement inside a block run from SQLAlchemy's compiled cache
                       without the event dispatch nobody listens to (``execute_direct``);
                       bind parameters for ``repo.stream``'s server-side cursor
``driver``             statements outside a transaction (``DriverPath``) and ``repo.get``
                       (``FastGet``) on a pooled psycopg connection, one round trip
=====================  =================================================================

Every shortcut has a public-API twin outside this package that gives the same results,
errors, events and statistics, only slower.  The shortcuts are on when:

- the environment does not say ``DBKIT_FAST_PATHS=0`` (or ``false``, ``off``, ``no``),
- the settings do not say ``database.postgres.fast_paths = false``,
- and the installed SQLAlchemy and psycopg are versions this seam was tested on
  (``TESTED``); outside them dbkit warns once and takes the public paths.

The decision is made per engine, when a ``Database`` builds it.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

# Bound as names now: the submodules `psycopg` and `sqlalchemy` of this package shadow
# the libraries' names once imported.
from psycopg import __version__ as _psycopg_version
from sqlalchemy import __version__ as _sqlalchemy_version

__all__ = ["ENV_SWITCH", "TESTED", "FastPathWarning", "enabled", "version_problem"]

ENV_SWITCH = "DBKIT_FAST_PATHS"

# Versions the private names used here were read from and tested on: (lowest, first not).
TESTED: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "sqlalchemy": ((2, 0, 30), (2, 2)),
    "psycopg": ((3, 2), (3, 4)),
}

_OFF = frozenset({"0", "false", "off", "no"})


class FastPathWarning(UserWarning):
    """The fast paths were switched off because a library is outside the tested versions."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def version_problem(versions: dict[str, str] | None = None) -> str | None:
    """Why the installed libraries rule the fast paths out, or None when they are fine."""
    if versions is None:
        versions = {"sqlalchemy": _sqlalchemy_version, "psycopg": _psycopg_version}
    for name, installed in versions.items():
        low, high = TESTED[name]
        if not low <= _version(installed) < high:
            tested = f"{'.'.join(map(str, low))} to below {'.'.join(map(str, high))}"
            return (
                f"{name} {installed} is outside the versions dbkit's fast paths were "
                f"tested on ({tested})"
            )
    return None


@functools.cache
def _libraries_supported() -> bool:
    problem = version_problem()
    if problem is None:
        return True
    warnings.warn(
        f"dbkit: {problem}; using SQLAlchemy's and psycopg's public API only (slower)",
        FastPathWarning,
        stacklevel=2,
    )
    return False


def enabled(setting: bool = True) -> bool:
    """Whether fast paths may be used by an engine built now; ``setting`` is the
    ``fast_paths`` field of the settings."""
    if not setting:
        return False
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return False
    return _libraries_supported()
