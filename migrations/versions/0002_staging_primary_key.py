"""users_staging: primary key on line.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The batch demo reads staging rows back by line (in order, and by line range when it
isolates a bad row), and a repository needs a primary key to address rows.  Input line
numbers are unique by construction, so the key costs nothing but the index.
"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_primary_key(op.f("pk_users_staging"), "users_staging", ["line"])


def downgrade() -> None:
    op.drop_constraint(op.f("pk_users_staging"), "users_staging", type_="primary")
