"""dbkit: a synchronous SQLAlchemy Core toolkit for PostgreSQL (psycopg 3)."""

from loguru import logger as _logger

from dbkit.errors import (
    CircuitOpenError,
    ConfigError,
    ConnectError,
    DbkitError,
    DuplicateKeyError,
    ForeignKeyError,
    IntegrityError,
    NotFoundError,
    PoolTimeoutError,
    RetryableError,
    TransactionBroken,
    TransactionError,
    TransactionRolledBack,
    is_transient,
)

# A library stays silent until the application asks for its logs (configure_logging).
_logger.disable("dbkit")

__version__ = "0.1.0"

__all__ = [
    "CircuitOpenError",
    "ConfigError",
    "ConnectError",
    "DbkitError",
    "DuplicateKeyError",
    "ForeignKeyError",
    "IntegrityError",
    "NotFoundError",
    "PoolTimeoutError",
    "RetryableError",
    "TransactionBroken",
    "TransactionError",
    "TransactionRolledBack",
    "__version__",
    "is_transient",
]
