"""dbkit: a synchronous SQLAlchemy Core toolkit for PostgreSQL (psycopg 3)."""

from loguru import logger as _logger

from dbkit.database import Database
from dbkit.errors import (
    CircuitOpenError,
    CommitOutcomeUnknown,
    CommitPending,
    ConfigError,
    ConflictError,
    ConnectError,
    DbkitError,
    DuplicateKeyError,
    ForeignKeyError,
    IntegrityError,
    LockNotAvailable,
    MultipleResultsError,
    NotFoundError,
    PoolTimeoutError,
    RetryableError,
    TransactionBroken,
    TransactionError,
    TransactionRolledBack,
    is_transient,
)
from dbkit.health import Health
from dbkit.locks import HeldLock, advisory_key
from dbkit.logging import configure_logging
from dbkit.repository import Page, Repository
from dbkit.resilience import CircuitBreaker
from dbkit.settings import (
    DatabaseConfig,
    LogConfig,
    PostgresConfig,
    Settings,
    describe_settings,
    load_settings,
    parse_duration,
)
from dbkit.stats import PoolStats
from dbkit.transaction import DbkitConnection, Transaction, TransactionOptions
from dbkit.twophase import (
    RecoveryReport,
    distributed_transaction,
    recover_at_connect,
    recover_prepared,
    run_distributed,
)

# A library stays silent until the application asks for its logs (configure_logging).
_logger.disable("dbkit")

__version__ = "0.1.0"

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "CommitOutcomeUnknown",
    "CommitPending",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "Database",
    "DatabaseConfig",
    "DbkitConnection",
    "DbkitError",
    "DuplicateKeyError",
    "ForeignKeyError",
    "Health",
    "HeldLock",
    "IntegrityError",
    "LockNotAvailable",
    "LogConfig",
    "MultipleResultsError",
    "NotFoundError",
    "Page",
    "PoolStats",
    "PoolTimeoutError",
    "PostgresConfig",
    "RecoveryReport",
    "Repository",
    "RetryableError",
    "Settings",
    "Transaction",
    "TransactionBroken",
    "TransactionError",
    "TransactionOptions",
    "TransactionRolledBack",
    "__version__",
    "advisory_key",
    "configure_logging",
    "describe_settings",
    "distributed_transaction",
    "is_transient",
    "load_settings",
    "parse_duration",
    "recover_at_connect",
    "recover_prepared",
    "run_distributed",
]
