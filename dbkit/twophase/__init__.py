"""Transactions across databases: two-phase commit with a durable decision and crash
recovery (``distributed_transaction``, ``run_distributed``, ``recover_prepared``)."""

from dbkit.twophase.coordinator import distributed_transaction, run_distributed
from dbkit.twophase.log import LOG_DDL, LOG_TABLE
from dbkit.twophase.recovery import RecoveryReport, recover_at_connect, recover_prepared

__all__ = [
    "LOG_DDL",
    "LOG_TABLE",
    "RecoveryReport",
    "distributed_transaction",
    "recover_at_connect",
    "recover_prepared",
    "run_distributed",
]
