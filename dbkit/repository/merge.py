"""``Repository.merge_from_staging``: a staging table into the repository's table the way
a PostgreSQL expert writes a batch import, set-based, with the refused rows and reasons
written aside.

One statement per chunk of staging rows (ordered by a unique staging column, e.g. the
input line) does everything in one pass, as a chain of CTEs:

1. ``source``: the chunk's rows; for text columns bound for another type, whether each
   value parses as that type (``pg_input_is_valid`` on PostgreSQL 16+, a small PL/pgSQL
   probe before);
2. ``judged``: the typed values under the target's column names, and the first reason
   the table would refuse the row: a bad value, NOT NULL, a CHECK (its own expression,
   read from the catalog, evaluated on the typed values), a foreign key with no parent, a
   unique key already taken by another row of the table;
3. ``ranked``: duplicates of another unique key within the chunk (the first one wins);
4. the refused rows go into the rejects table (replacing the chunk's earlier rejects, so
   a re-run does not repeat them), the rest into the table with one
   ``INSERT … SELECT … ORDER BY key ON CONFLICT DO UPDATE … WHERE (…) IS DISTINCT FROM
   (…)``: rows already equal are not written again, so a second run changes nothing.

Records of the same conflict key are resolved over the whole staging table before the
first chunk (one query): the last record of a key wins (``on_conflict="update"``), the
others are *superseded*, so chunk boundaries never change the outcome.

What no query predicts (a trigger's error, an exclusion constraint, a unique index on an
expression, a row a concurrent writer inserted meanwhile) makes the chunk's statement
fail: only then is the chunk bisected in savepoints, running the same statement on
halves until each refused row stands alone, and that row goes to the rejects with the
server's reason.

Each chunk is one transaction (with ``retries``), so an interrupted merge leaves whole
chunks only; running it again completes it.  Chunks take a transaction-scoped advisory
lock, so two runs over the same staging take turns chunk by chunk instead of writing
the same rejects twice.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa

from dbkit.errors import sqlstate_of
from dbkit.locks import advisory_key
from dbkit.repository.catalog import TableFacts, read_facts

if TYPE_CHECKING:
    from dbkit.database import Database
    from dbkit.repository.base import Repository
    from dbkit.transaction import DbkitConnection

__all__ = ["DEFAULT_MERGE_CHUNK", "MergeChunk", "MergeResult", "OnConflict", "merge_from_staging"]

OnConflict = Literal["update", "skip", "reject"]

DEFAULT_MERGE_CHUNK = 5000

# SQLSTATE classes of failures caused by a row's data, which bisection can pin on rows:
# cardinality (a key twice in one statement), data exceptions, integrity violations,
# WITH CHECK OPTION, and errors raised by PL/pgSQL (triggers).  Anything else (a lost
# connection, a serialization failure, a bug) is not the data's fault and propagates.
_ROW_FAULTS = ("21", "22", "23", "44", "P0")


@dataclass
class MergeResult:
    """What a merge did, in rows of the staging table."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0  # the table already held these values (or on_conflict="skip")
    superseded: int = 0  # earlier records of a key that a later record replaced
    rejected: int = 0
    chunks: int = 0
    isolated: int = 0  # rejects that only savepoint bisection could find
    reasons: Counter[str] = field(default_factory=Counter)
    # (order value, reason) of each refused row, when no rejects table was given.
    rejected_rows: list[tuple[Any, str]] = field(default_factory=list)

    @property
    def merged(self) -> int:
        """Rows written into the table (inserted or changed)."""
        return self.inserted + self.updated


@dataclass(frozen=True)
class MergeChunk:
    """One committed chunk, for progress reports and checkpoints: its staging rows ran
    from ``first`` to ``last`` (in ``order_by``); resuming with ``after=last`` skips it."""

    first: Any
    last: Any
    rows: int
    result: MergeResult


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """A string literal whatever ``standard_conforming_strings`` says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pct(sql: str) -> str:
    """SQL text from the catalog or a name, safe in a statement with %(name)s parameters."""
    return sql.replace("%", "%%")


def _tuple(names: Sequence[str], prefix: str = "") -> str:
    return "(" + ", ".join(prefix + _ident(n) for n in names) + ")"


class MergePlan:
    """The statements of one merge, built once from the catalog's facts (pure: no I/O)."""

    def __init__(
        self,
        repo: Repository[Any],
        target: TableFacts,
        staging: TableFacts,
        rejects: TableFacts | None,
        *,
        order_by: str,
        columns: Sequence[str] | None,
        conflict: Sequence[str] | None,
        update: Sequence[str] | None,
        on_conflict: OnConflict,
        reason_column: str,
        server_version: int,
    ) -> None:
        plan = repo.table_plan
        self.target, self.staging, self.rejects = target, staging, rejects
        self.on_conflict = on_conflict
        if order_by not in staging.columns:
            raise ValueError(f"order_by: staging table {staging.name} has no column {order_by!r}")
        if staging.unique_on((order_by,)) is None:
            raise ValueError(
                f"order_by={order_by!r} must be unique in {staging.name} (a primary key or "
                "unique index): it tells records apart and orders them"
            )
        self.order = order_by
        self.order_type = staging.columns[order_by].type
        self.columns = self._merged_columns(plan, columns)
        self.keys = self._conflict_keys(plan, conflict)
        self.conflict_index = target.unique_on(tuple(self.keys))
        if self.conflict_index is None:
            raise ValueError(
                f"conflict=({', '.join(self.keys)}): {target.name} has no unique index on "
                "exactly these columns, which ON CONFLICT needs"
            )
        missing = [k for k in self.keys if k not in self.columns]
        if missing:
            raise ValueError(
                f"the conflict key column(s) {', '.join(missing)} must be merged from staging"
            )
        if update is not None:
            plan.check_names(update)
            unknown = [u for u in update if u not in self.columns]
            if unknown:
                raise ValueError(f"update names column(s) not merged: {', '.join(unknown)}")
            self.update = [u for u in update if u not in plan.managed]
        else:
            self.update = [c for c in self.columns if c not in self.keys]
        self.hooks = plan
        self.native_check = server_version >= 160000
        self.probes: dict[str, str] = {}  # target type → name of its PL/pgSQL probe
        self.reason_column = reason_column
        self.reject_fill = self._reject_fill(rejects, reason_column) if rejects else {}
        self.deferrable = any(c.deferrable for c in target.constraints)

    # -- validation --------------------------------------------------------------------

    def _merged_columns(self, plan: Any, columns: Sequence[str] | None) -> list[str]:
        target, staging = self.target, self.staging
        if columns is None:  # what staging has, but what the database or the hooks set
            chosen = [
                name
                for name, fact in target.columns.items()
                if name in staging.columns
                and not (fact.generated or fact.identity or name in plan.managed)
            ]
        else:
            chosen = [columns] if isinstance(columns, str) else list(columns)
            plan.check_names(chosen)
            for name in chosen:
                if name not in staging.columns:
                    raise ValueError(f"staging table {staging.name} has no column {name!r}")
                if target.columns[name].generated:
                    raise ValueError(f"{name!r} is generated by {target.name}; it cannot be set")
        if not chosen:
            raise ValueError(f"no column of {target.name} to merge from {staging.name}")
        filled = set(chosen) | plan.managed
        unfillable = [
            name
            for name, fact in target.columns.items()
            if fact.not_null and not fact.defaulted and not fact.generated and name not in filled
        ]
        if unfillable:
            raise ValueError(
                f"{target.name} requires {', '.join(unfillable)} (NOT NULL, no default), "
                "which the merge does not fill: name it in columns= or give it a default"
            )
        return chosen

    def _conflict_keys(self, plan: Any, conflict: Sequence[str] | None) -> list[str]:
        if conflict is None:
            return list(plan.pk_keys)
        keys = [conflict] if isinstance(conflict, str) else list(conflict)
        if not keys:
            raise ValueError("conflict needs at least one column")
        plan.check_names(keys)
        return keys

    def _reject_fill(self, rejects: TableFacts, reason_column: str) -> dict[str, str]:
        """Rejects column → the expression on the staging row that fills it."""
        if reason_column not in rejects.columns or not rejects.columns[reason_column].textual:
            raise ValueError(
                f"rejects table {rejects.name} needs a text column {reason_column!r} for the "
                "reason (reason_column=)"
            )
        if self.order not in rejects.columns:
            raise ValueError(
                f"rejects table {rejects.name} needs the column {self.order!r} (order_by) to "
                "tell which records were refused"
            )
        fill: dict[str, str] = {}
        for name, fact in rejects.columns.items():
            if name == reason_column or fact.generated or fact.identity:
                continue
            source = self.staging.columns.get(name)
            if source is None:
                if fact.not_null and not fact.defaulted:
                    raise ValueError(
                        f"rejects table {rejects.name} requires {name!r} (NOT NULL, no "
                        "default), which staging does not have"
                    )
                continue
            if source.type != fact.type and not fact.textual:
                raise ValueError(
                    f"rejects column {name!r} is {fact.type} but staging's is {source.type}: "
                    "make it text or the same type"
                )
            fill[name] = f"CAST(s.{_ident(name)} AS {_pct(fact.type)})"
        return fill

    # -- statements --------------------------------------------------------------------

    def probe_functions(self) -> list[str]:
        """``CREATE FUNCTION pg_temp…`` for the value probes a pre-16 server needs: each
        assigns the text to a variable of the type, which applies the type's input
        function and modifier (length, precision) and a domain's CHECKs."""
        statements = []
        for type_name, function in self.probes.items():
            statements.append(
                f"CREATE OR REPLACE FUNCTION pg_temp.{function}(value text) RETURNS boolean "
                f"LANGUAGE plpgsql AS $dbkit$ DECLARE probe {type_name}; BEGIN probe := value; "
                "RETURN true; EXCEPTION WHEN data_exception OR integrity_constraint_violation "
                "THEN RETURN false; END $dbkit$"
            )
        return statements

    def _valid(self, raw: str, type_name: str) -> str:
        if self.native_check:
            return f"pg_input_is_valid({raw}::text, {_literal(type_name)})"
        function = self.probes.setdefault(type_name, f"dbkit_valid_{len(self.probes)}")
        return f"pg_temp.{function}({raw}::text)"

    def chunk_statement(self) -> str:
        """The one statement that merges the chunk of staging rows whose order value is
        between ``%(lo)s`` and ``%(hi)s``, leaving out ``%(dups)s`` (superseded records;
        refused instead when on_conflict="reject")."""
        target, staging = self.target, self.staging
        order, otype = _ident(self.order), _pct(self.order_type)
        used = list(dict.fromkeys([*self.columns, *self.reject_fill]))
        source_cols = [f"s.{order} AS _dbkit_o"]
        source_cols += [f"s.{_ident(c)} AS _dbkit_s{i}" for i, c in enumerate(used)]
        typed_cols: list[str] = []
        type_checks: list[str] = []
        for name in self.columns:
            fact, given = target.columns[name], staging.columns[name]
            raw = f"_dbkit_s{used.index(name)}"
            if given.type == fact.type or fact.plain_text:
                value = raw if given.type == fact.type else f"CAST({raw} AS {_pct(fact.type)})"
            elif given.textual:
                flag = f"_dbkit_ok{len(type_checks)}"
                source_cols.append(
                    f"(s.{_ident(name)} IS NULL OR {self._valid('s.' + _ident(name), fact.type)})"
                    f" AS {flag}"
                )
                value = f"CASE WHEN {flag} THEN CAST({raw} AS {_pct(fact.type)}) END"
                why = _literal(f"{name} is not a valid {fact.type}")
                type_checks.append(f"WHEN NOT {flag} THEN {_pct(why)}")
            else:  # not text: a plain cast, whose failures only bisection can pin
                value = f"CAST({raw} AS {_pct(fact.type)})"
            typed_cols.append(f"{value} AS {_ident(name)}")
        reject_dups = self.on_conflict == "reject"
        first_reason = "NULL::text"
        if reject_dups:
            assert self.conflict_index is not None
            dup = _literal(f"violates {self.conflict_index.name} (repeated in the input)")
            type_checks.insert(0, f"WHEN _dbkit_dup THEN {_pct(dup)}")
            source_cols.append(f"s.{order} = ANY(%(dups)s::{otype}[]) AS _dbkit_dup")
        if type_checks:
            first_reason = "CASE " + " ".join(type_checks) + " END"
        where = f"s.{order} BETWEEN %(lo)s::{otype} AND %(hi)s::{otype}"
        if not reject_dups:
            where += f" AND NOT s.{order} = ANY(%(dups)s::{otype}[])"
        ctes = [
            f"source AS MATERIALIZED (SELECT {', '.join(source_cols)} "
            f"FROM {_pct(staging.name)} AS s WHERE {where})",
            "typed AS (SELECT _dbkit_o, "
            + ", ".join([*(f"_dbkit_s{i}" for i in range(len(used))), *typed_cols])
            + f", {first_reason} AS _dbkit_why FROM source)",
            "judged AS (SELECT typed.*, COALESCE(_dbkit_why, "
            + self._row_rules()
            + ") AS _dbkit_reason FROM typed)",
        ]
        last = "judged"
        duplicates = self._within_input_rules()
        if duplicates:
            ctes.append(
                f"ranked AS (SELECT judged.*, COALESCE(_dbkit_reason, {duplicates}) AS "
                "_dbkit_final FROM judged)"
            )
            last, reason = "ranked", "_dbkit_final"
        else:
            reason = "_dbkit_reason"
        ctes += self._writes(last, reason, used)
        return "WITH " + ",\n".join(ctes) + "\n" + self._tally()

    def _row_rules(self) -> str:
        """``CASE WHEN <rule broken> THEN <reason> … END`` over the typed row: the rules of
        the table that one row can break on its own or against the table's rows."""
        target, merged = self.target, set(self.columns)
        rules = []
        for name in self.columns:
            if target.columns[name].not_null:
                why = _literal(f"{name} is missing (not null)")
                rules.append(f"WHEN {_ident(name)} IS NULL THEN {_pct(why)}")
        for c in target.constraints:
            why = _pct(_literal(f"violates {c.name}"))
            cols = c.columns
            if not cols or not set(cols) <= merged:
                continue  # it reads columns the merge does not set: left to the server
            present = " AND ".join(f"typed.{_ident(n)} IS NOT NULL" for n in cols)
            if c.kind == "c" and c.expression:
                rules.append(f"WHEN ({_pct(c.expression)}) IS FALSE THEN {why}")
            elif c.kind == "f" and c.references and c.references != target.name:
                # (A reference to the table itself may be met by a row of the same
                # statement, which only the server can see: left to it.)
                match = " AND ".join(
                    f"p.{_ident(r)} = typed.{_ident(n)}"
                    for n, r in zip(cols, c.referenced_columns, strict=True)
                )
                rules.append(
                    f"WHEN {present} AND NOT EXISTS (SELECT 1 FROM {_pct(c.references)} AS p "
                    f"WHERE {match}) THEN {why}"
                )
            elif c.kind == "u" and not c.complex:
                same = " AND ".join(f"t.{_ident(n)} = typed.{_ident(n)}" for n in cols)
                if c is self.conflict_index or set(cols) == set(self.keys):
                    if self.on_conflict != "reject":
                        continue  # a match is the row this one updates (or skips)
                    why = _pct(_literal(f"violates {c.name} (already in the table)"))
                else:  # taken by another row than the one with this row's key
                    keys = " AND ".join(f"t.{_ident(k)} = typed.{_ident(k)}" for k in self.keys)
                    same += f" AND NOT ({keys})"
                rules.append(
                    f"WHEN {present} AND EXISTS (SELECT 1 FROM {_pct(target.name)} AS t "
                    f"WHERE {same}) THEN {why}"
                )
        if not rules:
            return "NULL::text"
        return "CASE " + " ".join(rules) + " END"

    def _within_input_rules(self) -> str | None:
        """Second and later rows of the chunk with the same value of a unique key other
        than the conflict key: refused, as the server would refuse them one by one."""
        rules = []
        for c in self.target.uniques():
            if c.complex or not set(c.columns) <= set(self.columns):
                continue
            if set(c.columns) == set(self.keys):
                continue  # resolved over the whole input before the first chunk
            present = " AND ".join(f"{_ident(n)} IS NOT NULL" for n in c.columns)
            why = _pct(_literal(f"violates {c.name} (repeated in the input)"))
            rules.append(
                f"WHEN _dbkit_reason IS NULL AND {present} AND row_number() OVER (PARTITION BY "
                f"_dbkit_reason IS NULL, {', '.join(map(_ident, c.columns))} ORDER BY "
                f"_dbkit_o) > 1 THEN {why}"
            )
        return "CASE " + " ".join(rules) + " END" if rules else None

    def _writes(self, source: str, reason: str, used: list[str]) -> list[str]:
        target, hooks = self.target, self.hooks
        ctes = []
        rejects = self.rejects
        if rejects is not None:
            fill = self.reject_fill
            names = [*fill, self.reason_column]
            values = [f"_dbkit_s{used.index(n)}" for n in fill]
            values = [
                f"CAST({v} AS {_pct(rejects.columns[n].type)})"
                for v, n in zip(values, fill, strict=True)
            ]
            order = _ident(self.order)
            otype = _pct(self.order_type)
            ctes.append(
                f"cleared AS (DELETE FROM {_pct(rejects.name)} AS r WHERE r.{order} "
                f"BETWEEN %(lo)s::{otype} AND %(hi)s::{otype})"
            )
            ctes.append(
                f"refused AS (INSERT INTO {_pct(rejects.name)} {_tuple(names)} SELECT "
                f"{', '.join([*values, reason])} FROM {source} WHERE {reason} IS NOT NULL "
                f"RETURNING {_ident(self.reason_column)} AS reason, NULL::{otype} AS o)"
            )
        else:
            ctes.append(
                f"refused AS (SELECT {reason} AS reason, _dbkit_o AS o FROM {source} "
                f"WHERE {reason} IS NOT NULL)"
            )
        columns = [*self.columns]
        values = [_ident(c) for c in self.columns]
        stamps = [c for c in (hooks.created, hooks.updated) if c is not None]
        for column in stamps:
            columns.append(column.name)
            values.append("now()")
        if hooks.version is not None:
            columns.append(hooks.version.name)
            values.append("1")
        insert = (
            f"INSERT INTO {_pct(target.name)} AS t {_tuple(columns)} SELECT "
            f"{', '.join(values)} FROM {source} WHERE {reason} IS NULL "
            f"ORDER BY {', '.join(map(_ident, self.keys))}"
        )
        if self.on_conflict == "skip" or (self.on_conflict == "update" and not self.update):
            insert += f" ON CONFLICT {_tuple(self.keys)} DO NOTHING"
        elif self.on_conflict == "update":
            sets = [f"{_ident(c)} = excluded.{_ident(c)}" for c in self.update]
            old, new = _tuple(self.update, "t."), _tuple(self.update, "excluded.")
            changed = f"{old} IS DISTINCT FROM {new}"
            if hooks.updated is not None:
                sets.append(f"{_ident(hooks.updated.name)} = now()")
            if hooks.version is not None:
                name = _ident(hooks.version.name)
                sets.append(f"{name} = t.{name} + 1")
            if hooks.deleted is not None and hooks.deleted.name not in self.columns:
                name = _ident(hooks.deleted.name)
                sets.append(f"{name} = NULL")  # a merge brings a deleted row back
                changed += f" OR t.{name} IS NOT NULL"
            insert += (
                f" ON CONFLICT {_tuple(self.keys)} DO UPDATE SET {', '.join(sets)} WHERE {changed}"
            )
        ctes.append(f"written AS ({insert} RETURNING t.xmax = 0 AS inserted)")
        return ctes

    def _tally(self) -> str:
        otype = _pct(self.order_type)
        return (
            "SELECT NULL::text, count(*) FILTER (WHERE inserted), count(*), "
            f"NULL::{otype} FROM written UNION ALL "
            + (
                "SELECT reason, count(*), 0, NULL FROM refused GROUP BY reason"
                if self.rejects is not None
                else "SELECT reason, 1, 0, o FROM refused"
            )
        )

    def bounds_query(self, after: bool) -> str:
        order = _ident(self.order)
        where = f" WHERE {order} > %(after)s::{_pct(self.order_type)}" if after else ""
        return (
            f"SELECT min(o), max(o), count(*) FROM (SELECT {order} AS o, (row_number() OVER "
            f"(ORDER BY {order}) - 1) / %(size)s AS c FROM {_pct(self.staging.name)}{where}) "
            "AS numbered GROUP BY c ORDER BY c"
        )

    def duplicates_query(self, after: bool) -> str:
        """Order values of the records that lose to another record of the same key: all
        but the last (update) or the first (skip, reject)."""
        order = _ident(self.order)
        keys = [_ident(k) for k in self.keys]
        keep = "max" if self.on_conflict == "update" else "min"
        later = f" AND {order} > %(after)s::{_pct(self.order_type)}" if after else ""
        present = " AND ".join(f"{k} IS NOT NULL" for k in keys)
        join = " AND ".join(f"s.{k} = d.{k}" for k in keys)
        return (
            f"SELECT s.{order} FROM {_pct(self.staging.name)} AS s JOIN (SELECT "
            f"{', '.join(keys)}, {keep}({order}) AS keep FROM {_pct(self.staging.name)} "
            f"WHERE {present}{later} GROUP BY {', '.join(keys)} HAVING count(*) > 1) AS d "
            f"ON {join} AND s.{order} <> d.keep ORDER BY s.{order}"
        )

    def reject_one(self) -> str:
        """Record the one row at ``%(o)s`` as refused for ``%(reason)s``."""
        assert self.rejects is not None
        fill = self.reject_fill
        order = _ident(self.order)
        otype = _pct(self.order_type)
        names = [*fill, self.reason_column]
        return (
            f"WITH cleared AS (DELETE FROM {_pct(self.rejects.name)} WHERE {order} = "
            f"%(o)s::{otype}) INSERT INTO {_pct(self.rejects.name)} {_tuple(names)} SELECT "
            f"{', '.join([*(_pct(v) for v in fill.values()), '%(reason)s'])} FROM "
            f"{_pct(self.staging.name)} AS s WHERE s.{order} = %(o)s::{otype}"
        )

    def chunk_orders(self) -> str:
        order = _ident(self.order)
        otype = _pct(self.order_type)
        return (
            f"SELECT {order} FROM {_pct(self.staging.name)} WHERE {order} BETWEEN "
            f"%(lo)s::{otype} AND %(hi)s::{otype} AND NOT {order} = ANY(%(dups)s::{otype}[]) "
            f"ORDER BY {order}"
        )


def _reason(error: BaseException) -> str:
    """Which rule refused a row, from the server's diagnostics (not its message text,
    which is translated and carries the failing row): short, and the same for every row
    refused for the same reason, so rejects can be counted by it."""
    orig = getattr(error, "orig", error)
    diag = getattr(orig, "diag", None)
    if diag is not None:
        if sqlstate_of(error) == "23502" and diag.column_name:
            return f"{diag.column_name} is missing (not null)"
        if diag.constraint_name:
            return f"violates {diag.constraint_name}"
        if diag.message_primary:
            return str(diag.message_primary)
    return str(orig).splitlines()[0]


def _row_fault(error: BaseException) -> bool:
    state = sqlstate_of(error)
    return state is not None and state[:2] in _ROW_FAULTS


class _Merge:
    """One run of ``merge_from_staging``: the plan, the chunks, the counts."""

    def __init__(self, db: Database, plan: MergePlan, retries: int) -> None:
        self.db = db
        self.plan = plan
        self.retries = retries
        self.statement = plan.chunk_statement()  # also decides which probes are needed
        self.setup = plan.probe_functions()
        if plan.deferrable:
            self.setup.append("SET CONSTRAINTS ALL IMMEDIATE")  # fail in the statement
        self.result = MergeResult()

    def run_chunk(self, lo: Any, hi: Any, rows: int, dups: list[Any]) -> None:
        """The chunk in one transaction of its own (re-run whole on a serialization
        failure, deadlock or lost connection), or in a savepoint inside the caller's."""
        if self.db.in_transaction():
            with self.db.transaction() as conn:
                counts = self._chunk(conn, lo, hi, dups)
        else:
            counts = self.db.run_in_transaction(
                lambda conn: self._chunk(conn, lo, hi, dups), retries=self.retries
            )
        result = self.result
        inserted, written, reasons, rows_refused, isolated = counts
        result.inserted += inserted
        result.updated += written - inserted
        refused = sum(reasons.values())
        result.rejected += refused
        result.reasons.update(reasons)
        result.rejected_rows.extend(rows_refused)
        result.isolated += isolated
        if self.plan.on_conflict == "reject":
            result.unchanged += rows - written - refused
        else:
            result.superseded += len(dups)
            result.unchanged += rows - len(dups) - written - refused
        result.chunks += 1

    def _chunk(
        self, conn: DbkitConnection, lo: Any, hi: Any, dups: list[Any]
    ) -> tuple[int, int, Counter[str], list[tuple[Any, str]], int]:
        key = advisory_key(f"dbkit.merge {self.plan.target.name} {lo!r}")
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(key)s)", {"key": key})
        for statement in self.setup:
            conn.exec_driver_sql(statement)
        tally = _Tally()
        try:
            with self.db.transaction():  # a savepoint: a failure undoes this attempt only
                tally.add(conn.exec_driver_sql(self.statement, self._params(lo, hi, dups)))
        except sa.exc.DBAPIError as error:
            if not _row_fault(error):
                raise
            tally = _Tally()
            orders = (
                conn.exec_driver_sql(
                    self.plan.chunk_orders(), {"lo": lo, "hi": hi, "dups": self._dropped(dups)}
                )
                .scalars()
                .all()
            )
            self._bisect(conn, list(orders), dups, tally)
        return tally.inserted, tally.written, tally.reasons, tally.rows, tally.isolated

    def _dropped(self, dups: list[Any]) -> list[Any]:
        """The records the chunk statement leaves out: superseded ones (refused ones stay
        in under on_conflict="reject")."""
        return [] if self.plan.on_conflict == "reject" else dups

    def _params(self, lo: Any, hi: Any, dups: list[Any]) -> dict[str, Any]:
        return {"lo": lo, "hi": hi, "dups": dups}

    def _bisect(
        self,
        conn: DbkitConnection,
        orders: list[Any],
        dups: list[Any],
        tally: _Tally,
        *,
        known_bad: bool = False,
    ) -> None:
        """Run the statement on ``orders`` (a run of the chunk's order values) in a
        savepoint; when a row's data makes it fail, halve the run until the row stands
        alone, and refuse it with the server's reason.  When the first half of a failed
        run goes in, the second must hold the culprit, so it is split without being tried
        whole (``known_bad``)."""
        if not orders:
            return
        lo, hi = orders[0], orders[-1]
        if not known_bad:
            try:
                with self.db.transaction():
                    inside = dups[bisect.bisect_left(dups, lo) : bisect.bisect_right(dups, hi)]
                    tally.add(conn.exec_driver_sql(self.statement, self._params(lo, hi, inside)))
                return
            except sa.exc.DBAPIError as error:
                if not _row_fault(error):
                    raise
                if len(orders) == 1:
                    self._refuse(conn, lo, _reason(error), tally)
                    return
        half = len(orders) // 2
        refused_before = tally.isolated
        self._bisect(conn, orders[:half], dups, tally)
        first_half_went_in = tally.isolated == refused_before
        known_bad = first_half_went_in and len(orders) > half + 1
        self._bisect(conn, orders[half:], dups, tally, known_bad=known_bad)

    def _refuse(self, conn: DbkitConnection, order: Any, reason: str, tally: _Tally) -> None:
        tally.isolated += 1
        tally.reasons[reason] += 1
        if self.plan.rejects is None:
            tally.rows.append((order, reason))
        else:
            conn.exec_driver_sql(self.plan.reject_one(), {"o": order, "reason": reason})


class _Tally:
    """The counts the chunk statement (or its bisected runs) returned."""

    def __init__(self) -> None:
        self.inserted = 0
        self.written = 0
        self.reasons: Counter[str] = Counter()
        self.rows: list[tuple[Any, str]] = []
        self.isolated = 0

    def add(self, result: Any) -> None:
        for reason, first, second, order in result.all():
            if reason is None:
                self.inserted += first
                self.written += second
            else:
                self.reasons[reason] += first
                if order is not None:
                    self.rows.append((order, reason))


def merge_from_staging(
    repo: Repository[Any],
    staging: sa.Table | str,
    *,
    order_by: str,
    conflict: Sequence[str] | None,
    columns: Sequence[str] | None,
    update: Sequence[str] | None,
    on_conflict: OnConflict,
    rejects: sa.Table | str | None,
    reason_column: str,
    chunk_size: int,
    after: Any,
    retries: int,
    on_chunk: Callable[[MergeChunk], None] | None,
) -> MergeResult:
    """See ``Repository.merge_from_staging``."""
    if on_conflict not in ("update", "skip", "reject"):
        raise ValueError(f"on_conflict must be 'update', 'skip' or 'reject', got {on_conflict!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    db = repo.db
    with db.transaction(savepoint=False) as conn:
        quote = conn.dialect.identifier_preparer
        target = read_facts(conn, quote.format_table(repo.table), what="table")
        source = read_facts(conn, _table_name(staging, quote), what="staging table")
        refused = (
            read_facts(conn, _table_name(rejects, quote), what="rejects table")
            if rejects is not None
            else None
        )
        driver = conn.connection.driver_connection
        version = getattr(getattr(driver, "info", None), "server_version", 0)
        plan = MergePlan(
            repo,
            target,
            source,
            refused,
            order_by=order_by,
            columns=columns,
            conflict=conflict,
            update=update,
            on_conflict=on_conflict,
            reason_column=reason_column,
            server_version=version,
        )
        has_after = after is not None
        params = {"size": chunk_size, "after": after}
        bounds = conn.exec_driver_sql(plan.bounds_query(has_after), params).all()
        dups = conn.exec_driver_sql(plan.duplicates_query(has_after), params).scalars().all()
    merge = _Merge(db, plan, retries)
    for lo, hi, rows in bounds:
        inside = list(dups[bisect.bisect_left(dups, lo) : bisect.bisect_right(dups, hi)])
        merge.run_chunk(lo, hi, rows, inside)
        if on_chunk is not None:
            on_chunk(MergeChunk(lo, hi, rows, merge.result))
    return merge.result


def _table_name(table: sa.Table | str, quote: Any) -> str:
    if isinstance(table, sa.Table):
        return str(quote.format_table(table))
    if isinstance(table, str) and table:
        return ".".join(_ident(part) for part in table.split("."))
    raise TypeError(f"expected a sqlalchemy.Table or a table name, got {table!r}")
