"""A bank-transfer soak under connection and server faults: does dbkit ever lie about a
commit?

``python -m tests.chaos [--seconds 40] [--threads 6] [--no-restarts] ...`` starts its own
PostgreSQL, puts ``tests/faultproxy.py`` in front of it and lets worker threads move money
between accounts through a ``dbkit.Database`` (``@db.transaction(retries=N)``: two UPDATEs
and one INSERT into a ledger, keyed by a client-made uuid).  After a calm phase a fault
thread cuts connections (all of them, right after a COMMIT, instead of a COMMIT),
terminates the workers' backends and restarts the server (fast and immediate).  Then it
checks, with a direct connection, that no money appeared or vanished, that every balance
is what the ledger says, that every transfer reported committed is in the ledger exactly
once and every one reported failed is not; transfers whose outcome dbkit could not know
are counted and looked up.  It prints a report and exits non-zero when an invariant fails.

From Python: ``tests.chaos.soak.run(Options(seconds=20)) -> SoakResult`` (``.ok``,
``.problems``, ``.as_dict()``, ``.report()``).

Modules: ``bank`` (schema, transfer, workers, outcomes), ``faults`` (the fault thread),
``check`` (the invariants), ``report`` (figures and the printed table), ``soak`` (``run``).
Only ``faults`` and ``soak`` need ``tests/faultproxy.py``: the suite imports ``bank`` and
``check`` as ``chaos.*`` (pytest puts ``tests/`` on ``sys.path``, not the repository), so
this package imports none of its modules by itself.
"""
