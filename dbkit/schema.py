"""The example schema: one ``MetaData`` with a naming convention, and its Core tables.

Every constraint and index gets a deterministic name from the convention, so the initial
migration can spell the same names (``op.f("uq_users_email")``), ``dbkit migrate check``
can compare them, and error translation can report ``.constraint`` names that mean
something.  CHECK constraints are table-level and named: Alembic's autogenerate only sees
those (column-level ones are not in ``Table.constraints``), and only by name.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "NAMING_CONVENTION",
    "health_checks",
    "import_rejects",
    "metadata",
    "users",
    "users_staging",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

HEALTH_STATUSES = ("ok", "degraded", "down")


def _now() -> sa.TextClause:
    # A plain text default reflects back as ``now()``, so compare_server_default stays quiet.
    return sa.text("now()")


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
    sa.CheckConstraint("strpos(email, '@') > 0", name="email_has_at"),
)

health_checks = sa.Table(
    "health_checks",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("latency_ms", postgresql.DOUBLE_PRECISION, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("pool", postgresql.JSONB, nullable=True),
    sa.Column(
        "checked_at",
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=_now(),
        index=True,
    ),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in HEALTH_STATUSES) + ")", name="status"
    ),
)

# Raw rows of the batch demo, loaded by COPY: no constraints but the input line number as
# key, so every input line lands and the database's constraints on ``users`` judge them
# afterwards; UNLOGGED because it is scratch space (no WAL).
users_staging = sa.Table(
    "users_staging",
    metadata,
    sa.Column("id", sa.BigInteger, nullable=True),
    sa.Column("email", sa.Text, nullable=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
    prefixes=["UNLOGGED"],
)

import_rejects = sa.Table(
    "import_rejects",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("email", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False, server_default=_now()),
)
