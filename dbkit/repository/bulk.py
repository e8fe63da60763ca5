"""Many rows at once: ``COPY … FROM STDIN`` (``bulk_load``, large upserts) and the
steps ``upsert_many`` runs, kept apart because their cost model is about rows, not
statements."""

from __future__ import annotations

import builtins
import contextlib
import itertools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import psycopg
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy.engine import Dialect

from dbkit.fastpath.sqlalchemy import wrap_driver_error

if TYPE_CHECKING:
    from dbkit.repository.base import Repository
    from dbkit.repository.plan import Plan
    from dbkit.transaction import DbkitConnection

# Rows per unnest() statement in upsert_many: large enough that per-statement costs vanish,
# small enough that one statement's arrays stay a few MB.
DEFAULT_UPSERT_CHUNK = 5000


# Above this many rows (per group of rows with the same columns), upsert_many goes through
# COPY and a temporary table: PostgreSQL parses COPY text far cheaper than psycopg dumps
# large text arrays (a regex per element), and the temporary table's DDL is paid once.
COPY_UPSERT_ROWS = 2000

_temp_names = itertools.count(1)


_first = operator.itemgetter(0)


def _none_first(item: tuple[tuple[Any, ...], Any]) -> tuple[tuple[bool, Any], ...]:
    return tuple((v is not None, v) for v in item[0])


def sort_by_key(items: builtins.list[tuple[tuple[Any, ...], Any]]) -> None:
    """Sort (key, row) pairs by key, the order in which upserts take their row locks.
    A None in a key (which never conflicts) sorts first; keys that do not compare at all
    (mixed types) keep their input order."""
    try:
        items.sort(key=_first)
    except TypeError:
        with contextlib.suppress(TypeError):
            items.sort(key=_none_first)


class UpsertStep:
    single = False  # one statement, atomic on its own (no transaction needed)

    def run(self, conn: DbkitConnection) -> None:
        raise NotImplementedError


class UpsertStatement(UpsertStep):
    single = True

    def __init__(self, stmt: sa.Executable, params: Mapping[str, Any]) -> None:
        self.stmt = stmt
        self.params = params

    def run(self, conn: DbkitConnection) -> None:
        conn.execute(self.stmt, self.params)


class CopyUpsert(UpsertStep):
    """COPY the rows into a temporary table shaped like the target's columns, merge them
    with one ``INSERT … SELECT … ON CONFLICT``, drop the table."""

    def __init__(
        self,
        repo: Repository[Any],
        columns: tuple[str, ...],
        rows: Sequence[Mapping[str, Any]],
        keys: Sequence[str],
        update: Sequence[str] | None,
    ) -> None:
        self.repo = repo
        self.columns = columns
        self.rows = rows
        self.keys = keys
        self.update = update

    def run(self, conn: DbkitConnection) -> None:
        repo, table = self.repo, self.repo.table
        quote = conn.dialect.identifier_preparer.quote
        temp = f"dbkit_upsert_{next(_temp_names)}"
        names = [table.c[c].name for c in self.columns]
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {quote(temp)} ON COMMIT DROP AS SELECT "
            f"{', '.join(map(quote, names))} FROM "
            f"{conn.dialect.identifier_preparer.format_table(table)} WITH NO DATA"
        )
        copy = CopyPlan(repo.table_plan, self.rows[0], self.columns, stamp=False)
        copy.run(conn, self.rows, into=temp)
        source = sa.table(
            temp, *(sa.column(table.c[c].name, table.c[c].type) for c in self.columns)
        )
        conn.execute(repo.merge_statement(source, self.columns, self.keys, self.update, order=True))
        conn.exec_driver_sql(f"DROP TABLE {quote(temp)}")


END: Any = object()


def tuple_getter(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """``itemgetter`` that always returns a tuple, even for one name."""
    if len(names) == 1:
        (name,) = names
        return lambda row: (row[name],)
    return cast(Callable[[Any], tuple[Any, ...]], operator.itemgetter(*names))


def require_keys(values: Mapping[str, Any], keys: Sequence[str], table: str) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(
            f"every row upserted into {table!r} needs its conflict key "
            f"({', '.join(keys)}); a row lacks {', '.join(missing)}"
        )


class CopyPlan:
    """How rows become COPY tuples: which columns, and the cheapest conversion that gets
    there (tuples that already fit pass through untouched)."""

    def __init__(
        self, plan: Plan, first: Any, columns: Sequence[str] | None, *, stamp: bool = True
    ) -> None:
        self.plan = plan
        if isinstance(columns, str):
            columns = (columns,)
        if columns is not None:
            plan.check_names(columns)
            if len(set(columns)) != len(columns):
                raise ValueError(f"columns lists a column twice: {builtins.list(columns)}")
        if isinstance(first, Mapping):
            self.kind = "mapping"
            given = builtins.list(columns if columns is not None else first.keys())
            plan.check_names(given)
        elif isinstance(first, (tuple, builtins.list)) and not plan.is_model_type(first):
            self.kind = "sequence"
            given = builtins.list(columns if columns is not None else plan.table.c.keys())
        else:
            self.kind = "object"
            if columns is not None:
                given = builtins.list(columns)
            else:
                given = builtins.list(plan.values_of(first))  # None + default: left out
        self.given = given
        self.data = [c for c in given if c not in plan.managed]
        # Hook columns (timestamps, version) go last, their values added to every row.
        hooks = (plan.created, plan.updated, plan.version) if stamp else ()
        self.stamped = [c for c in hooks if c is not None]
        self.columns = [*self.data, *(c.key for c in self.stamped)]

    def run(self, conn: DbkitConnection, rows: Iterable[Any], into: str | None = None) -> int:
        """COPY the rows into the table (or the table named ``into``, with the same column
        names); returns how many were written."""
        plan = self.plan
        driver = conn.connection.driver_connection
        assert driver is not None
        stamps = self._stamps(conn)
        convert = self._converter(stamps, conn.dialect)
        table = plan.table
        target = pgsql.Identifier(*((into,) if into else filter(None, (table.schema, table.name))))
        names = pgsql.SQL(", ").join(pgsql.Identifier(table.c[c].name) for c in self.columns)
        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(target, names)
        text = statement.as_string(driver)
        observer = conn.observer
        try:
            if observer is None:
                return _copy_rows(driver, statement, rows, convert)
            return observer.run(
                _copy_rows, text, (), conn.dialect, driver, statement, rows, convert
            )
        except psycopg.Error as error:
            if not (driver.broken or driver.closed):
                raise  # the COPY failed, the connection is fine: psycopg's error, as always
            # The connection died under the COPY (terminated backend, lost network): raised
            # as SQLAlchemy raises a lost connection (DBAPIError, connection_invalidated),
            # so that blocks make it a RetryableError like for any other statement, and the
            # connection is invalidated, never handed out again.
            raise wrap_driver_error(conn, error, text, None) from error

    def _stamps(self, conn: DbkitConnection) -> tuple[Any, ...]:
        """The hook values for every row: the transaction's now() as each timestamp
        column's own type (so ``timestamp`` columns get the session's wall time, as an
        INSERT's now() would), and version 1."""
        version = self.plan.version
        times = [c for c in self.stamped if c is not version]
        found: dict[str, Any] = {}
        if times:
            query = sa.select(*(sa.cast(sa.func.now(), c.type) for c in times))
            found = dict(zip((c.key for c in times), conn.execute(query).one(), strict=True))
        return tuple(1 if c is version else found[c.key] for c in self.stamped)

    def _converter(
        self, stamps: tuple[Any, ...], dialect: Dialect
    ) -> Callable[[Any], Sequence[Any]]:
        plan = self.plan
        given, data = self.given, self.data
        kind = self.kind
        if kind == "mapping":
            pick: Callable[[Any], Sequence[Any]] = tuple_getter(data)
            width = len(given)

            def from_mapping(row: Any) -> Sequence[Any]:
                if len(row) != width:
                    self._check_mapping(row)
                try:
                    return pick(row)
                except KeyError as missing:
                    raise ValueError(
                        f"a row for {plan.name!r} has no value for column {missing}; the "
                        "columns come from the first row (or columns=)"
                    ) from None
                except TypeError:
                    raise ValueError(_mixed_rows(row, "mappings")) from None

            convert: Callable[[Any], Sequence[Any]] = from_mapping
        elif kind == "sequence":
            width = len(given)
            keep = None if data == given else [given.index(c) for c in data]

            def from_sequence(row: Any) -> Sequence[Any]:
                if not isinstance(row, (tuple, builtins.list)) or len(row) != width:
                    raise ValueError(
                        f"a row for {plan.name!r} has {len(row)} values for {width} columns "
                        f"({', '.join(given)})"
                        if isinstance(row, (tuple, builtins.list))
                        else _mixed_rows(row, "tuples")
                    )
                return row if keep is None else tuple(row[i] for i in keep)

            convert = from_sequence
        else:
            attrs = cast(Callable[[Any], Any], operator.attrgetter(*data)) if data else None

            def from_object(row: Any) -> Sequence[Any]:
                if attrs is None:
                    return ()
                try:
                    found = attrs(row)
                except AttributeError as error:
                    raise ValueError(
                        f"a {type(row).__name__} row for {plan.name!r} lacks an attribute: {error}"
                    ) from None
                return found if len(data) > 1 else (found,)

            convert = from_object

        processors = [
            (i, proc)
            for i, name in enumerate(self.columns[: len(data)])
            if (proc := plan.table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
        ]
        base = convert
        if processors:

            def processed(row: Any) -> Sequence[Any]:
                values = builtins.list(base(row))
                for i, proc in processors:
                    values[i] = proc(values[i])
                return values

            convert = processed
        if stamps:
            inner = convert

            def stamped(row: Any) -> Sequence[Any]:
                return (*inner(row), *stamps)

            convert = stamped
        return convert

    def _check_mapping(self, row: Any) -> None:
        if not isinstance(row, Mapping):
            raise ValueError(_mixed_rows(row, "mappings"))
        self.plan.check_names(row.keys())
        extra = set(row) - set(self.given) - self.plan.managed
        if extra:
            raise ValueError(
                f"a row for {self.plan.name!r} has column(s) {', '.join(sorted(extra))} the "
                "first row did not have; the columns come from the first row (or columns=)"
            )


def _copy_rows(
    driver: psycopg.Connection[Any],
    statement: pgsql.Composed,
    rows: Iterable[Any],
    convert: Callable[[Any], Sequence[Any]],
) -> int:
    """Run the COPY, each row converted; how many rows it wrote."""
    with driver.cursor() as cursor:
        with cursor.copy(statement) as copy:
            write = copy.write_row
            for row in rows:
                write(convert(row))
        return int(cursor.rowcount)


def _mixed_rows(row: Any, expected: str) -> str:
    return f"bulk_load rows must all be {expected}, got a {type(row).__name__}"
