"""Example repositories over ``dbkit.schema``: the pattern to copy for your own tables."""

from dbkit.repositories.health import HealthCheck, HealthRepository
from dbkit.repositories.users import User, UserRepository

__all__ = ["HealthCheck", "HealthRepository", "User", "UserRepository"]
