"""Initial schema: users, health_checks, and the batch demo's users_staging, import_rejects.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Written from ``alembic revision --autogenerate`` and checked by hand.  It spells out the
schema as it was at this revision instead of importing ``dbkit.schema``, which keeps
changing; the constraint names are those of the naming convention, wrapped in ``op.f()``
so the convention is not applied a second time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("strpos(email, '@') > 0", name=op.f("ck_users_email_has_at")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "health_checks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("latency_ms", postgresql.DOUBLE_PRECISION(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("pool", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "checked_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('ok', 'degraded', 'down')", name=op.f("ck_health_checks_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_health_checks")),
    )
    op.create_index(
        op.f("ix_health_checks_checked_at"), "health_checks", ["checked_at"], unique=False
    )
    op.create_table(
        "users_staging",
        sa.Column("id", sa.BigInteger(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("line", sa.Integer(), nullable=False),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "import_rejects",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "rejected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_rejects")),
    )


def downgrade() -> None:
    op.drop_table("import_rejects")
    op.drop_table("users_staging")
    op.drop_index(op.f("ix_health_checks_checked_at"), table_name="health_checks")
    op.drop_table("health_checks")
    op.drop_table("users")
