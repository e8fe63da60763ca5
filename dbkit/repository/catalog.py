"""What the server says about a table: its columns (types with their modifiers, NOT NULL,
defaults) and the constraints that judge a row (CHECK, foreign keys, unique indexes).

``merge_from_staging`` reads these from the catalog rather than from the
``sqlalchemy.Table``: the server's definitions are the ones that will refuse a row, and a
``Table`` declared in Python may lack a CHECK's expression or a constraint's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ColumnFact", "ConstraintFact", "TableFacts", "read_facts"]


@dataclass(frozen=True, slots=True)
class ColumnFact:
    name: str
    type: str  # format_type(): the type with its modifier, e.g. "character varying(5)"
    not_null: bool
    defaulted: bool  # a default or an identity: an INSERT may leave it out
    generated: bool  # GENERATED ALWAYS (identity or stored): an INSERT may not name it
    identity: bool  # an identity column: the database numbers the rows
    textual: bool  # a string type (typcategory S): input arrives in it as text
    plain_text: bool  # text or varchar without a length: any string fits as it is


@dataclass(frozen=True, slots=True)
class ConstraintFact:
    name: str
    kind: str  # "c" check, "f" foreign key, "u" unique index
    columns: tuple[str, ...]
    expression: str | None = None  # CHECK: pg_get_expr of the constraint, column names bare
    references: str | None = None  # foreign key: the referenced table, quoted
    referenced_columns: tuple[str, ...] = ()
    complex: bool = False  # unique index on expressions or with a predicate
    deferrable: bool = False


@dataclass(frozen=True, slots=True)
class TableFacts:
    name: str  # quoted and qualified as needed (regclass::text)
    columns: dict[str, ColumnFact]
    constraints: tuple[ConstraintFact, ...]

    def uniques(self) -> list[ConstraintFact]:
        return [c for c in self.constraints if c.kind == "u"]

    def unique_on(self, columns: tuple[str, ...]) -> ConstraintFact | None:
        """The simple unique index on exactly these columns (in any order), if any."""
        wanted = set(columns)
        for constraint in self.uniques():
            if not constraint.complex and set(constraint.columns) == wanted:
                return constraint
        return None


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.atthasdef OR a.attidentity <> '', a.attidentity = 'a' OR a.attgenerated <> '',
       a.attidentity <> '',
       t.typcategory = 'S', a.atttypid IN ('text'::regtype, 'varchar'::regtype)
         AND a.atttypmod < 0
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(rel)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# CHECK and FOREIGN KEY constraints, then unique indexes (which include the indexes of
# UNIQUE and PRIMARY KEY constraints, under the constraint's name).
_CONSTRAINTS = """
SELECT c.conname, c.contype, pg_get_expr(c.conbin, c.conrelid),
       ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
             ORDER BY k.i)::text[],
       CASE WHEN c.contype = 'f' THEN c.confrelid::regclass::text END,
       ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
             ORDER BY k.i)::text[],
       false, c.condeferrable
FROM pg_constraint c
WHERE c.conrelid = %(rel)s::regclass AND c.contype IN ('c', 'f')
UNION ALL
SELECT ic.relname, 'u', NULL,
       ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
             WHERE k.i <= i.indnkeyatts ORDER BY k.i)::text[],
       NULL, NULL,
       i.indexprs IS NOT NULL OR i.indpred IS NOT NULL,
       COALESCE(con.condeferrable, false)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE i.indrelid = %(rel)s::regclass AND i.indisunique AND i.indisvalid
"""


def read_facts(conn: Any, name: str, *, what: str) -> TableFacts:
    """The facts of the table ``name`` (quoted and qualified as SQL would spell it), on a
    SQLAlchemy connection; ``what`` says which table it is in the error when it is missing."""
    found = conn.exec_driver_sql("SELECT to_regclass(%(name)s)::text", {"name": name}).scalar()
    if found is None:
        raise ValueError(f"{what} {name} does not exist (or is not visible to this role)")
    params = {"rel": found}
    columns = {row[0]: ColumnFact(*row) for row in conn.exec_driver_sql(_COLUMNS, params).all()}
    constraints = tuple(
        ConstraintFact(
            name=row[0],
            kind=row[1],
            expression=row[2],
            columns=tuple(row[3]),
            references=row[4],
            referenced_columns=tuple(row[5] or ()),
            complex=row[6] or len(row[3]) == 0,
            deferrable=row[7],
        )
        for row in conn.exec_driver_sql(_CONSTRAINTS, params).all()
    )
    return TableFacts(found, columns, constraints)
