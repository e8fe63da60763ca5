"""A user's own project, as `dbkit demo` met it inside one: a config/settings.toml and an
alembic.ini of their own, whose migrations create other tables (``orders``) and leave a
mark (``migrations/ENV_RAN``) whenever Alembic runs their env.py.

The demo must not take either for its own: run there, it migrates its throwaway server with
the migrations dbkit ships, so the mark never appears.
"""

from __future__ import annotations

from pathlib import Path

SETTINGS = """\
# The user's settings: their own database, which the demo must leave alone.
[default.database.postgres]
name = "orders"
application_name = "orders-importer"
"""

ALEMBIC_INI = """\
[alembic]
script_location = %(here)s/migrations
path_separator = os
"""

ENV_PY = """\
from pathlib import Path

import sqlalchemy as sa
from alembic import context

Path(__file__).with_name("ENV_RAN").touch()

given = context.config.attributes.get("connection")
if given is None:
    engine = sa.create_engine(context.get_x_argument(as_dictionary=True)["url"])
    given = engine.connect()
context.configure(connection=given, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
"""

REVISION = '''\
"""orders"""

import sqlalchemy as sa
from alembic import op

revision = "a1_orders"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("orders")
'''


def make_users_project(root: Path) -> Path:
    """Write the project into ``root`` (created if missing); returns ``root``."""
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "config").mkdir()
    (root / "config" / "settings.toml").write_text(SETTINGS)
    (root / "alembic.ini").write_text(ALEMBIC_INI)
    (root / "migrations" / "env.py").write_text(ENV_PY)
    (root / "migrations" / "script.py.mako").write_text("")
    (versions / "a1_orders.py").write_text(REVISION)
    return root


def users_migrations_ran(root: Path) -> bool:
    """Whether Alembic ever ran the project's own env.py."""
    return (root / "migrations" / "ENV_RAN").exists()
