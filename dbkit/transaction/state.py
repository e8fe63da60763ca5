"""A thread's transaction on one Database, as data: the open blocks and one status.

Nothing here talks to a server.  Entering and leaving a block *plan* the SQL commands to
send (as psycopg's ``Transaction._get_*_commands`` do) and move the status; the manager
sends the commands in one round trip and reports back.  Every scenario of the enter/exit
algorithm can therefore be unit-tested without a database.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbkit.errors import TransactionBroken, TransactionError, sqlstate_of
from dbkit.transaction.options import TransactionOptions

__all__ = ["Block", "Callback", "Exit", "Status", "TransactionState"]

# An on_commit entry: (savepoints open when it was registered, function, robust).
Callback = tuple[tuple[str, ...], Callable[[], Any], bool]


class Status(enum.Enum):
    """Whether the innermost open block can still commit, and if not, why."""

    ACTIVE = "can commit"
    ROLLBACK_ONLY = "set_rollback(True): rolls back silently"
    MARKED = "an exception marked it for rollback"
    ABORTED = "a statement failed and PostgreSQL aborted the transaction"
    # set_rollback(False) clears the flag, but PostgreSQL still refuses to commit.
    ABORTED_UNMARKED = "aborted by a failed statement; the rollback flag was cleared"


_FLAGGED = frozenset({Status.ROLLBACK_ONLY, Status.MARKED, Status.ABORTED})
_ABORTED = frozenset({Status.ABORTED, Status.ABORTED_UNMARKED})


@dataclass(slots=True)
class Block:
    """One entered ``with db.transaction()``: what its exit must undo."""

    owner: object  # the Transaction that entered it (exits must come in order)
    options: TransactionOptions
    savepoint: str | None = None
    # The statement_timeout to put back on a clean exit (SET LOCAL inside a savepoint
    # survives RELEASE); None when the block did not change it.
    restore_timeout: str | None = None
    # The access mode to go back to when the block made the transaction read-only.
    was_readonly: bool | None = None


@dataclass(slots=True)
class Exit:
    """What leaving a block takes: commands to send, then what to tell the caller."""

    commands: list[str] = field(default_factory=list)
    # The rollback of a savepoint that the commands perform (when they succeed).
    rolls_back: str | None = None
    # Raise TransactionRolledBack (chained from `cause`) once the commands are sent.
    rolled_back: bool = False
    cause: BaseException | None = None


class TransactionState:
    """The ambient transaction of one thread on one Database."""

    def __init__(self) -> None:
        self.testing = False  # a test fixture's outer transaction stands in for BEGIN
        # The server's default isolation level (the dialect's), for blocks that ask for one.
        self.server_isolation = "READ COMMITTED"
        self.reset()

    def reset(self) -> None:
        self.blocks: list[Block] = []
        self.status = Status.ACTIVE
        self.cause: BaseException | None = None  # why the status is not ACTIVE
        self.callbacks: list[Callback] = []
        self.savepoint_counter = 0
        self.isolation: str | None = None
        self.readonly = False
        self.timeout: str | None = None  # statement_timeout set by a block, as SQL text
        self.refused_as_read_only: BaseException | None = None  # 25006 in a read-only block

    # -- the status ------------------------------------------------------------------------

    @property
    def can_commit(self) -> bool:
        return self.status is Status.ACTIVE

    @property
    def needs_rollback(self) -> bool:
        """The rollback flag as ``get_rollback()`` reports it."""
        return self.status in _FLAGGED

    @property
    def savepoints(self) -> tuple[str, ...]:
        return tuple(b.savepoint for b in self.blocks if b.savepoint is not None)

    def check_can_run(self) -> None:
        """Refuse a statement in a block that can no longer commit (Django's rule), chained
        from the error that broke it rather than PostgreSQL's bare 25P02."""
        if self.status is Status.ACTIVE:
            return
        if self.status is Status.ROLLBACK_ONLY:
            raise TransactionBroken(
                "this transaction is marked for rollback (set_rollback(True)); no statement "
                "can run until the block ends"
            )
        raise TransactionBroken(
            "an error occurred earlier in this transaction block; no statement can run "
            "until the block ends (catch errors outside a nested db.transaction() to "
            "recover inside a transaction)"
        ) from self.cause

    def set_rollback(self, rollback: bool, *, aborted: bool) -> None:
        """The application's last word on the flag; ``aborted``: whether PostgreSQL reports
        the transaction as aborted (then clearing the flag cannot make it committable)."""
        if rollback:
            self.status = Status.ROLLBACK_ONLY
        elif aborted or self.status in _ABORTED:
            self.status = Status.ABORTED_UNMARKED
            if self.cause is None:
                self.cause = TransactionError("PostgreSQL reports the transaction as aborted")
        else:
            self.status, self.cause = Status.ACTIVE, None

    def aborted_by(self, error: BaseException) -> None:
        """A statement failed and PostgreSQL aborted the transaction (or the connection is
        gone): nothing more can run until a savepoint before it is rolled back to."""
        if self.status in (Status.ACTIVE, Status.ROLLBACK_ONLY, Status.ABORTED_UNMARKED):
            self.status, self.cause = Status.ABORTED, error

    def mark(self, exc: BaseException) -> None:
        """An exception left a block that has no savepoint of its own."""
        if self.status in (Status.ACTIVE, Status.ROLLBACK_ONLY, Status.ABORTED_UNMARKED):
            self.status, self.cause = Status.MARKED, exc

    # -- entering --------------------------------------------------------------------------

    def begin(self, owner: object, options: TransactionOptions) -> list[str]:
        """The outermost block: the commands to send right after BEGIN."""
        self.isolation = options.isolation
        self.readonly = bool(options.readonly)
        block = Block(owner, options)
        self.blocks.append(block)
        return self._set_timeout(block) + _settings(options)

    def enter_nested(self, owner: object, options: TransactionOptions) -> list[str]:
        """A block inside an open transaction: checks, then SAVEPOINT and the block's
        settings.  Raises before anything changes when the block is not allowed."""
        app_outermost = self.testing and not self.blocks
        if app_outermost:
            # The fixture's outer transaction stands in for the server; this block is the
            # application's outermost one, so it takes the outermost options.
            self.isolation = options.isolation
            self.readonly = False
        elif options.durable:
            raise TransactionError(
                "a durable transaction block cannot be nested within another transaction block"
            )
        current = self.isolation or self.server_isolation.replace("_", " ").upper()
        if options.isolation is not None and options.isolation != current:
            raise TransactionError(
                f"isolation {options.isolation!r} differs from the enclosing transaction's "
                f"({current!r}); isolation can only be set on the outermost block"
            )
        if options.readonly is False and self.readonly:
            raise TransactionError("a read-write block cannot be nested in a read-only block")
        make_readonly = bool(options.readonly) and not self.readonly
        needs_statement = make_readonly or options.timeout is not None or options.settings
        if self.status is not Status.ACTIVE and needs_statement:
            # Each needs a statement, and none can run until the broken block ends.
            raise TransactionBroken(
                "cannot open a read-only or timed block, or one with settings: an error "
                "occurred earlier in this transaction block and no statement can run until "
                "it ends"
            ) from self.cause
        if make_readonly and not options.savepoint:
            raise TransactionError(
                "readonly=True in a nested block needs a savepoint (savepoint=True)"
            )
        block = Block(owner, options)
        commands = []
        if options.savepoint and self.status is Status.ACTIVE:
            self.savepoint_counter += 1
            block.savepoint = f"dbkit_sp_{self.savepoint_counter}"
            commands.append(f"SAVEPOINT {block.savepoint}")
        if make_readonly:
            # Reverted by PostgreSQL itself when the savepoint is released or rolled back.
            commands.append("SET TRANSACTION READ ONLY")
            block.was_readonly = self.readonly
            self.readonly = True
        # Settings stay as SET LOCAL does: until the transaction ends, unless the
        # savepoint is rolled back (PostgreSQL undoes them with it).
        commands += self._set_timeout(block) + _settings(options)
        self.blocks.append(block)
        return commands

    def _set_timeout(self, block: Block) -> list[str]:
        if block.options.timeout is None:
            return []
        value = block.options.timeout_sql
        assert value is not None
        block.restore_timeout = self.timeout or "DEFAULT"
        self.timeout = value
        return [f"SET LOCAL statement_timeout = {value}"]

    def undo_enter(self, block: Block) -> Exit:
        """The commands of a nested block's enter failed: forget the block."""
        self.blocks.remove(block)
        if block.was_readonly is not None:
            self.readonly = block.was_readonly
        if block.restore_timeout is not None:
            self.timeout = None if block.restore_timeout == "DEFAULT" else block.restore_timeout
        if block.savepoint is None:
            return Exit()
        return Exit(_rollback_to(block.savepoint), rolls_back=block.savepoint)

    # -- leaving ---------------------------------------------------------------------------

    def pop(self, owner: object, exc: BaseException | None = None) -> Block:
        if not self.blocks or self.blocks[-1].owner is not owner:
            raise TransactionError("transaction blocks exited out of order")
        block = self.blocks.pop()
        if exc is not None and self.readonly and sqlstate_of(exc) == "25006":
            # Refused because the application made the block read-only: a programming
            # error, not a server that became a standby (dbkit.transaction.retry).
            self.refused_as_read_only = exc
        if block.was_readonly is not None:
            self.readonly = block.was_readonly
        return block

    def exit_nested(self, block: Block, exc: BaseException | None) -> Exit:
        """Leaving a nested block: RELEASE, or ROLLBACK TO + RELEASE, or (no savepoint)
        passing the failure on to the enclosing block."""
        if exc is None and self.status is Status.ACTIVE:
            commands = [f"RELEASE SAVEPOINT {block.savepoint}"] if block.savepoint else []
            if block.restore_timeout is not None:
                commands.append(f"SET LOCAL statement_timeout = {block.restore_timeout}")
                self.timeout = None if block.restore_timeout == "DEFAULT" else block.restore_timeout
            return Exit(commands)
        if block.savepoint is None:
            # No savepoint of its own: the failure belongs to the enclosing block.
            if exc is not None:
                self.mark(exc)
            elif self.status is Status.ABORTED_UNMARKED:
                self.status = Status.ABORTED
            return Exit()
        silent = exc is None and self.status is Status.ROLLBACK_ONLY
        # SET LOCAL made inside the savepoint is undone with it.
        if block.restore_timeout is not None:
            self.timeout = None if block.restore_timeout == "DEFAULT" else block.restore_timeout
        return Exit(
            _rollback_to(block.savepoint),
            rolls_back=block.savepoint,
            rolled_back=exc is None and not silent,
            cause=self.cause,
        )

    def rolled_back_to(self, savepoint: str) -> None:
        """ROLLBACK TO + RELEASE of ``savepoint`` succeeded: the transaction is healthy
        again, and the callbacks registered under it go with it."""
        self.status, self.cause = Status.ACTIVE, None
        self.callbacks = [c for c in self.callbacks if savepoint not in c[0]]

    def rollback_to_failed(
        self, savepoint: str, cause: BaseException | None, error: BaseException
    ) -> None:
        """Even ROLLBACK TO failed: the enclosing transaction is beyond repair."""
        self.callbacks = [c for c in self.callbacks if savepoint not in c[0]]
        if self.status in (Status.ACTIVE, Status.ROLLBACK_ONLY, Status.ABORTED_UNMARKED):
            self.status, self.cause = Status.MARKED, cause or error

    def exit_outermost(self, exc: BaseException | None) -> Exit:
        """Leaving the outermost block: COMMIT (no commands: the root transaction commits)
        or ROLLBACK, and whether to report the rollback."""
        if exc is None and self.status is Status.ACTIVE:
            return Exit(["COMMIT"])
        silent = exc is None and self.status is Status.ROLLBACK_ONLY
        return Exit(["ROLLBACK"], rolled_back=exc is None and not silent, cause=self.cause)

    def register(self, func: Callable[[], Any], robust: bool) -> None:
        self.callbacks.append((self.savepoints, func, robust))


def _settings(options: TransactionOptions) -> list[str]:
    command = options.settings_sql
    return [] if command is None else [command]


def _rollback_to(savepoint: str) -> list[str]:
    # A rolled-back savepoint must not linger (Django #23074): one round trip for both.
    return [f"ROLLBACK TO SAVEPOINT {savepoint}", f"RELEASE SAVEPOINT {savepoint}"]
