"""The example repositories (dbkit.repositories) on the migrated example schema."""

from __future__ import annotations

import dataclasses

import pytest

import dbkit
from dbkit import migrate
from dbkit.database import Database
from dbkit.health import Health
from dbkit.repositories import HealthCheck, HealthRepository, User, UserRepository


@pytest.fixture
def migrated(db: Database) -> Database:
    migrate.upgrade(db)
    return db


@pytest.fixture
def users(migrated: Database) -> UserRepository:
    return UserRepository(migrated)


@pytest.fixture
def health(migrated: Database) -> HealthRepository:
    return HealthRepository(migrated)


# --------------------------------------------------------------------------- users


def test_add_get_and_by_email(users: UserRepository) -> None:
    ann = users.add(User(email="ann@example.com", name="Ann"))
    assert isinstance(ann, User)
    assert ann.id is not None and ann.email == "ann@example.com" and ann.name == "Ann"
    assert ann.created_at is not None and ann.updated_at is not None
    assert ann.created_at.tzinfo is not None  # timestamptz comes back aware
    assert users.get(ann.id) == ann
    assert users.by_email("ann@example.com") == ann
    assert users.by_email("ANN@example.com") is None  # exact match on the unique key
    assert users.by_email("nobody@example.com") is None
    with pytest.raises(dbkit.NotFoundError):
        users.get(ann.id + 1000)


def test_add_from_a_mapping_without_a_name(users: UserRepository) -> None:
    bob = users.add({"email": "bob@example.com"})
    assert isinstance(bob, User) and bob.name is None and bob.id is not None


def test_upsert_inserts_then_updates_keeping_created_at(users: UserRepository) -> None:
    first = users.upsert({"email": "cy@example.com", "name": "Cy"}, conflict=("email",))
    assert first.id is not None and first.created_at is not None
    assert first.updated_at is not None
    second = users.upsert({"email": "cy@example.com", "name": "Cyrus"}, conflict=("email",))
    assert second.id == first.id and second.name == "Cyrus"
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at  # type: ignore[operator]
    assert users.count() == 1


def test_update_bumps_updated_at(users: UserRepository) -> None:
    dee = users.add(User(email="dee@example.com"))
    assert dee.id is not None
    renamed = users.update(dee.id, name="Dee")
    assert renamed.name == "Dee" and renamed.created_at == dee.created_at
    assert renamed.updated_at > dee.updated_at  # type: ignore[operator]


def test_duplicate_email_is_a_duplicate_key_error_naming_the_constraint(
    users: UserRepository,
) -> None:
    users.add(User(email="eve@example.com"))
    with pytest.raises(dbkit.DuplicateKeyError) as caught:
        users.add(User(email="eve@example.com", name="Eve again"))
    assert caught.value.constraint == "uq_users_email"
    assert users.count() == 1


def test_email_without_at_sign_violates_the_named_check(users: UserRepository) -> None:
    with pytest.raises(dbkit.IntegrityError) as caught:
        users.add(User(email="not-an-email"))
    assert not isinstance(caught.value, dbkit.DuplicateKeyError)
    assert caught.value.constraint == "ck_users_email_has_at"


def test_with_domain_matches_literally(users: UserRepository) -> None:
    for email in ("a@ex_ample.com", "b@exAample.com", "c@ex_ample.com", "d@other.org"):
        users.add(User(email=email))
    assert [u.email for u in users.with_domain("ex_ample.com")] == [
        "a@ex_ample.com",
        "c@ex_ample.com",
    ]
    assert users.with_domain("%") == []


def test_repository_calls_join_the_ambient_transaction(
    migrated: Database, users: UserRepository
) -> None:
    with migrated.transaction():
        users.add(User(email="fay@example.com"))
        assert users.by_email("fay@example.com") is not None
        migrated.set_rollback(True)
    assert users.by_email("fay@example.com") is None


# -------------------------------------------------------------------------- health


def test_record_a_real_probe_then_read_it_back(
    migrated: Database, health: HealthRepository
) -> None:
    probe = migrated.health()
    assert probe.ok
    stored = health.record(probe)
    assert isinstance(stored, HealthCheck)
    assert stored.id is not None and stored.checked_at is not None
    assert stored.status == "ok" and stored.error is None
    assert stored.latency_ms == pytest.approx(probe.latency_ms)
    assert stored.pool == probe.pool.as_dict()  # round-trips through jsonb
    assert health.latest() == [stored]


def test_failed_and_slow_probes_are_down_and_degraded(
    migrated: Database, health: HealthRepository
) -> None:
    ok = migrated.health()
    failed = Health(ok=False, latency_ms=5000.0, error="ConnectError: boom", pool=migrated.stats())
    slow = dataclasses.replace(ok, latency_ms=900.0)
    first = health.record(ok)
    second = health.record(failed)
    third = health.record(slow, degraded_after_ms=500.0)
    assert (first.status, second.status, third.status) == ("ok", "down", "degraded")
    assert second.error == "ConnectError: boom"
    assert health.latest() == [third, second, first]  # newest first
    assert health.latest(2) == [third, second]
