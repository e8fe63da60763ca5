"""dbkit.schema: the naming convention, and the migrated schema as PostgreSQL reports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from dbkit import migrate
from dbkit.database import Database
from dbkit.schema import health_checks, import_rejects, metadata, users, users_staging


@pytest.fixture
def migrated(db: Database) -> Iterator[Database]:
    migrate.upgrade(db)
    yield db


def constraint_names(table: sa.Table) -> set[str]:
    # A table without a primary key still carries an empty PrimaryKeyConstraint: skip it.
    names = {
        str(c.name)
        for c in table.constraints
        if c.name is not None and not (isinstance(c, sa.PrimaryKeyConstraint) and not c.columns)
    }
    return names | {str(i.name) for i in table.indexes}


def test_every_constraint_and_index_in_the_models_is_named_by_the_convention() -> None:
    assert constraint_names(users) == {"pk_users", "uq_users_email", "ck_users_email_has_at"}
    assert constraint_names(health_checks) == {
        "pk_health_checks",
        "ck_health_checks_status",
        "ix_health_checks_checked_at",
    }
    assert constraint_names(import_rejects) == {"pk_import_rejects"}
    assert constraint_names(users_staging) == {"pk_users_staging"}
    assert set(metadata.tables) == {"users", "health_checks", "users_staging", "import_rejects"}


def test_migrated_constraint_names_follow_the_convention(migrated: Database) -> None:
    inspector = sa.inspect(migrated.engine)
    assert inspector.get_pk_constraint("users")["name"] == "pk_users"
    assert inspector.get_pk_constraint("health_checks")["name"] == "pk_health_checks"
    assert inspector.get_pk_constraint("import_rejects")["name"] == "pk_import_rejects"
    assert [u["name"] for u in inspector.get_unique_constraints("users")] == ["uq_users_email"]
    assert {c["name"] for c in inspector.get_check_constraints("users")} == {
        "ck_users_email_has_at"
    }
    assert {c["name"] for c in inspector.get_check_constraints("health_checks")} == {
        "ck_health_checks_status"
    }
    assert [(i["name"], i["column_names"]) for i in inspector.get_indexes("health_checks")] == [
        ("ix_health_checks_checked_at", ["checked_at"])
    ]
    staging_pk = inspector.get_pk_constraint("users_staging")
    assert (staging_pk["name"], staging_pk["constrained_columns"]) == ("pk_users_staging", ["line"])


def test_column_types_defaults_and_identity(migrated: Database) -> None:
    rows = migrated.execute(
        "SELECT table_name, column_name, data_type, is_nullable, is_identity,"
        " identity_generation, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " AND table_name <> 'alembic_version'"
    ).all()
    columns = {(r.table_name, r.column_name): r for r in rows}
    for table in ("users", "health_checks", "import_rejects"):
        ident = columns[(table, "id")]
        assert (ident.data_type, ident.is_identity, ident.identity_generation) == (
            "bigint",
            "YES",
            "BY DEFAULT",  # explicit ids still allowed (COPY, fixtures)
        )
    for table, column in [
        ("users", "created_at"),
        ("users", "updated_at"),
        ("health_checks", "checked_at"),
        ("import_rejects", "rejected_at"),
    ]:
        col = columns[(table, column)]
        assert col.data_type == "timestamp with time zone"
        assert col.is_nullable == "NO" and col.column_default == "now()"
    assert columns[("health_checks", "latency_ms")].data_type == "double precision"
    assert columns[("health_checks", "pool")].data_type == "jsonb"
    assert columns[("users", "email")].is_nullable == "NO"
    assert columns[("users", "name")].is_nullable == "YES"
    staging = {c: r for (t, c), r in columns.items() if t == "users_staging"}
    assert {c: r.is_nullable for c, r in staging.items()} == {
        "id": "YES",
        "email": "YES",
        "name": "YES",
        "line": "NO",
    }
    assert staging["id"].is_identity == "NO"


def test_users_staging_is_unlogged_and_the_rest_are_not(migrated: Database) -> None:
    persistence = dict(
        migrated.execute(
            "SELECT relname, relpersistence FROM pg_class WHERE relkind = 'r'"
            " AND relnamespace = 'public'::regnamespace"
        ).all()
    )
    assert persistence["users_staging"] == "u"
    assert {persistence[t] for t in ("users", "health_checks", "import_rejects")} == {"p"}


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("INSERT INTO users (email) VALUES ('no-at-sign')", "ck_users_email_has_at"),
        (
            "INSERT INTO health_checks (status, latency_ms) VALUES ('sideways', 1)",
            "ck_health_checks_status",
        ),
    ],
)
def test_the_check_constraints_hold_in_the_database(
    migrated: Database, statement: str, constraint: str
) -> None:
    with pytest.raises(sa.exc.IntegrityError) as caught:
        migrated.execute(statement)
    assert caught.value.orig is not None
    assert caught.value.orig.diag.constraint_name == constraint  # type: ignore[attr-defined]


def test_health_statuses_accepted(migrated: Database) -> None:
    for status in ("ok", "degraded", "down"):
        migrated.execute(
            sa.insert(health_checks).values(status=status, latency_ms=1.5, pool={"idle": 1})
        )
    assert migrated.scalar(sa.select(sa.func.count()).select_from(health_checks)) == 3
