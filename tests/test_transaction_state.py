"""The transaction state machine without a server: each scenario of entering and leaving
blocks, as the SQL commands it plans and the status it ends in.  (The same scenarios run
against PostgreSQL in test_transaction_django.py and test_transaction_hooks.py.)"""

from __future__ import annotations

import pytest

from dbkit.errors import TransactionBroken, TransactionError
from dbkit.transaction import Status, TransactionOptions, TransactionState


class Owner:
    """Stands for the Transaction that enters a block."""


def opened(**options: object) -> tuple[TransactionState, list[str]]:
    state = TransactionState()
    commands = state.begin(Owner(), TransactionOptions(**options))  # type: ignore[arg-type]
    return state, commands


def nested(state: TransactionState, **options: object) -> tuple[object, list[str]]:
    owner = Owner()
    commands = state.enter_nested(owner, TransactionOptions(**options))  # type: ignore[arg-type]
    return owner, commands


def test_outermost_block_begins_with_its_timeout_and_commits() -> None:
    state, commands = opened(timeout=1.5)
    assert commands == ["SET LOCAL statement_timeout = '1500ms'"]
    plan = state.exit_outermost(None)
    assert plan.commands == ["COMMIT"] and not plan.rolled_back


def test_nested_block_takes_savepoint_readonly_and_timeout_in_one_trip() -> None:
    state, _ = opened()
    owner, commands = nested(state, readonly=True, timeout=0.25)
    assert commands == [
        "SAVEPOINT dbkit_sp_1",
        "SET TRANSACTION READ ONLY",
        "SET LOCAL statement_timeout = '250ms'",
    ]
    block = state.pop(owner)
    plan = state.exit_nested(block, None)
    # SET LOCAL survives RELEASE: the enclosing block's timeout is put back.
    assert plan.commands == [
        "RELEASE SAVEPOINT dbkit_sp_1",
        "SET LOCAL statement_timeout = DEFAULT",
    ]
    assert state.readonly is False and state.timeout is None


def test_exception_rolls_back_to_the_savepoint_and_releases_it_in_one_trip() -> None:
    state, _ = opened()
    owner, _ = nested(state)
    state.register(print, False)
    error = ValueError("boom")
    plan = state.exit_nested(state.pop(owner), error)
    assert plan.commands == [
        "ROLLBACK TO SAVEPOINT dbkit_sp_1",
        "RELEASE SAVEPOINT dbkit_sp_1",
    ]
    assert plan.rolls_back == "dbkit_sp_1" and not plan.rolled_back  # the exception propagates
    state.rolled_back_to("dbkit_sp_1")
    assert state.status is Status.ACTIVE and state.callbacks == []


def test_failed_statement_aborts_until_a_savepoint_revives_the_transaction() -> None:
    state, _ = opened()
    owner, _ = nested(state)
    failure = RuntimeError("duplicate key")
    state.aborted_by(failure)
    assert state.status is Status.ABORTED and state.needs_rollback
    with pytest.raises(TransactionBroken) as broken:
        state.check_can_run()
    assert broken.value.__cause__ is failure
    # The block exits normally although it failed: rolled back, and it says so.
    plan = state.exit_nested(state.pop(owner), None)
    assert plan.rolls_back == "dbkit_sp_1" and plan.rolled_back and plan.cause is failure
    state.rolled_back_to("dbkit_sp_1")
    state.check_can_run()
    assert state.exit_outermost(None).commands == ["COMMIT"]


def test_set_rollback_true_is_silent_and_false_cannot_revive_an_aborted_transaction() -> None:
    state, _ = opened()
    state.set_rollback(True, aborted=False)
    plan = state.exit_outermost(None)
    assert plan.commands == ["ROLLBACK"] and not plan.rolled_back

    state, _ = opened()
    failure = RuntimeError("syntax error")
    state.aborted_by(failure)
    state.set_rollback(False, aborted=True)
    assert state.needs_rollback is False and state.status is Status.ABORTED_UNMARKED
    plan = state.exit_outermost(None)
    assert plan.commands == ["ROLLBACK"] and plan.rolled_back and plan.cause is failure


def test_exception_leaving_a_block_without_savepoint_marks_the_enclosing_one() -> None:
    state, _ = opened()
    owner, commands = nested(state, savepoint=False)
    assert commands == []
    error = KeyError("x")
    plan = state.exit_nested(state.pop(owner), error)
    assert plan.commands == [] and state.status is Status.MARKED and state.cause is error
    plan = state.exit_outermost(None)
    assert plan.rolled_back and plan.cause is error


def test_no_savepoint_is_taken_once_the_transaction_cannot_commit() -> None:
    state, _ = opened()
    state.aborted_by(RuntimeError("x"))
    _, commands = nested(state)
    assert commands == []
    with pytest.raises(TransactionBroken):
        nested(state, readonly=True)


@pytest.mark.parametrize(
    ("outer", "inner", "message"),
    [
        ({}, {"durable": True}, "durable"),
        ({"isolation": "serializable"}, {"isolation": "read committed"}, "isolation"),
        ({"readonly": True}, {"readonly": False}, "read-write"),
        ({}, {"readonly": True, "savepoint": False}, "needs a savepoint"),
    ],
)
def test_misuse_is_refused_before_anything_is_sent(
    outer: dict[str, object], inner: dict[str, object], message: str
) -> None:
    state, _ = opened(**outer)
    with pytest.raises(TransactionError, match=message):
        nested(state, **inner)
    assert len(state.blocks) == 1 and state.savepoint_counter == 0


def test_blocks_exit_in_order() -> None:
    state, _ = opened()
    nested(state)
    with pytest.raises(TransactionError, match="out of order"):
        state.pop(Owner())


def test_on_commit_callbacks_remember_their_savepoints() -> None:
    state, _ = opened()
    state.register(print, False)
    owner, _ = nested(state)
    state.register(repr, True)
    assert [c[0] for c in state.callbacks] == [(), ("dbkit_sp_1",)]
    state.exit_nested(state.pop(owner), ValueError())
    state.rolled_back_to("dbkit_sp_1")
    assert [c[1] for c in state.callbacks] == [print]


def test_timeout_must_be_positive() -> None:
    with pytest.raises(TransactionError, match="positive"):
        TransactionOptions(timeout=0)
    with pytest.raises(TransactionError, match="unknown isolation"):
        TransactionOptions(isolation="chaos")
    assert TransactionOptions(isolation="repeatable_read").isolation == "REPEATABLE READ"
