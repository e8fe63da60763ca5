"""``users``: a dataclass model and its repository, with timestamps kept by the base class."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dbkit.repository import Repository
from dbkit.schema import users

__all__ = ["User", "UserRepository"]


@dataclass
class User:
    """One row of ``users``.  ``id`` and the timestamps are None until the database has
    assigned them (identity column, ``now()`` defaults)."""

    email: str
    name: str | None = None
    id: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class UserRepository(Repository[User]):
    """Users by id or email.  ``timestamps``: created_at/updated_at are set on every write
    path (add, bulk, upsert, update), not left to callers who would forget updated_at."""

    table = users
    model = User
    timestamps = True

    def by_email(self, email: str) -> User | None:
        """The user with exactly this email (the unique key), or None."""
        return self.get_one_or_none(email=email)

    def with_domain(self, domain: str) -> list[User]:
        """Users whose email is at ``domain``, oldest first.  ``%`` and ``_`` in the domain
        are matched literally, so input cannot widen the pattern."""
        return self.list(self.like("email", "@" + domain, "endswith"), order_by="id")
