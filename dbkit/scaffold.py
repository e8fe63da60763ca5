"""``dbkit init``: the files a project needs to use dbkit for its own schema.

:func:`init_project` writes, from the templates shipped in ``dbkit/templates/project``:

- ``alembic.ini`` and ``migrations/`` (``env.py`` hands every run to
  :func:`dbkit.migrate.run_env` with the project's ``MetaData``; ``script.py.mako``;
  ``versions/``);
- ``config/settings.toml`` (a commented starting point naming the project's own database)
  and ``config/.secrets.toml.example``, plus a ``.gitignore`` line for
  ``config/.secrets.toml`` (appended to an existing ``.gitignore``, never twice);
- ``conftest.py`` enabling the ``dbkit.testing`` pytest plugin, and a ``pytest.ini`` that
  makes the project's directory pytest's rootdir, unless the project already has a pytest
  configuration file or a ``pyproject.toml`` (which pytest takes for the root anyway).

It never overwrites a file: one that exists is skipped, and the report says so.
"""

from __future__ import annotations

import errno
import os
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = [
    "SECRETS_FILE",
    "InitReport",
    "MetadataSpec",
    "init_project",
    "parse_metadata_spec",
]

SECRETS_FILE = "config/.secrets.toml"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_IDENTIFIER}(?:\.{_IDENTIFIER})*):({_IDENTIFIER}(?:\.{_IDENTIFIER})*)$")
# (template under dbkit/templates/project, file in the project).  Templates ending in
# .tmpl have $names substituted ($$ is a $); the others are copied as they are.
_FILES: tuple[tuple[str, str], ...] = (
    ("alembic.ini.tmpl", "alembic.ini"),
    ("migrations/env.py.tmpl", "migrations/env.py"),
    ("migrations/script.py.mako", "migrations/script.py.mako"),
    ("config/settings.toml.tmpl", "config/settings.toml"),
    ("config/secrets.toml.example", "config/.secrets.toml.example"),
    ("conftest.py.tmpl", "conftest.py"),
)
# Git keeps no empty directory: without this file a fresh clone has no versions/ to
# write the first revision into.
_KEEP_VERSIONS = "migrations/versions/.gitkeep"
_PYTEST_INI = ("pytest.ini.tmpl", "pytest.ini")
# Files pytest reads its configuration from (pyproject.toml marks the rootdir even
# without a [tool.pytest.ini_options] table); with any of them, no pytest.ini is added.
_PYTEST_CONFIGS = (
    "pytest.toml",
    ".pytest.toml",
    "pytest.ini",
    ".pytest.ini",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
)
_IGNORED_ALREADY = {SECRETS_FILE, f"/{SECRETS_FILE}", ".secrets.toml", "**/.secrets.toml"}


@dataclass(frozen=True, slots=True)
class MetadataSpec:
    """``MODULE:ATTR`` naming the project's ``MetaData``, e.g. ``orders.models:metadata``
    or ``orders.models:Base.metadata``."""

    module: str
    attr: str

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}"

    def import_lines(self) -> str:
        """The env.py lines that bind ``target_metadata``."""
        first, _, rest = self.attr.partition(".")
        if not rest:
            return f"from {self.module} import {first} as target_metadata"
        return f"from {self.module} import {first}\n\ntarget_metadata = {self.attr}"


def parse_metadata_spec(text: str) -> MetadataSpec:
    """``MODULE:ATTR`` as a :class:`MetadataSpec`; ``ValueError`` saying what is wrong."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(
            f"expected MODULE:ATTR, e.g. orders.models:metadata or orders.models:Base.metadata,"
            f" not {text!r}"
        )
    return MetadataSpec(match.group(1), match.group(2))


@dataclass
class InitReport:
    """What :func:`init_project` did, paths relative to the project directory."""

    directory: Path
    written: list[str] = field(default_factory=list)
    # (file, why): it existed already and was left as it was, or was not needed.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    gitignore: str = ""  # "added", "created" or "present" (already ignored)


_NO_METADATA = """\
# The MetaData of your tables, for autogenerate and `dbkit migrate check`, e.g.
# from orders.models import metadata as target_metadata
target_metadata = None"""


def init_project(
    directory: str | Path = ".",
    *,
    metadata: MetadataSpec | str | None = None,
    database: str | None = None,
) -> InitReport:
    """Scaffold the project in ``directory`` (created if missing); never overwrites.

    ``metadata`` (``MODULE:ATTR``) is imported by ``migrations/env.py``; without it env.py
    says where to put it.  ``database`` is the database name in ``config/settings.toml``
    (default: the directory's name, made a plain identifier).
    """
    root = Path(directory).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
    spec = parse_metadata_spec(metadata) if isinstance(metadata, str) else metadata
    values = {
        "project": root.name or "app",
        "database": database or database_name(root.name),
        "metadata_import": spec.import_lines() if spec else _NO_METADATA,
    }
    report = InitReport(root)
    templates = resources.files("dbkit") / "templates" / "project"
    for source, target in _FILES:
        _write(report, target, _render(templates.joinpath(source), values))
    _write(report, _KEEP_VERSIONS, "")
    source, target = _PYTEST_INI
    existing = [name for name in _PYTEST_CONFIGS if name != target and (root / name).exists()]
    if existing and not (root / target).exists():
        report.skipped.append((target, f"not needed: {existing[0]} marks pytest's rootdir"))
    else:
        _write(report, target, _render(templates.joinpath(source), values))
    report.gitignore = _ignore_secrets(root / ".gitignore")
    return report


def database_name(text: str) -> str:
    """A database name from a project's name: ``Orders-Importer`` -> ``orders_importer``."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if not name:
        return "app"
    return (f"db_{name}" if name[0].isdigit() else name)[:63]


def _render(template: Traversable, values: dict[str, str]) -> str:
    text = template.read_text(encoding="utf-8")
    if template.name.endswith(".tmpl"):
        text = string.Template(text).substitute(values)
    return text


def _write(report: InitReport, relative: str, text: str) -> None:
    path = report.directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as fh:  # "x": fails rather than overwrite
            fh.write(text)
    except FileExistsError:
        report.skipped.append((relative, "exists, left as it is"))
    else:
        report.written.append(relative)


def _ignore_secrets(gitignore: Path) -> str:
    """Make ``.gitignore`` ignore the secrets file: append a line, or create the file."""
    if not gitignore.exists():
        gitignore.write_text(f"# database secrets (dbkit)\n{SECRETS_FILE}\n", encoding="utf-8")
        return "created"
    text = gitignore.read_text(encoding="utf-8")
    if any(line.strip() in _IGNORED_ALREADY for line in text.splitlines()):
        return "present"
    separator = "" if not text or text.endswith("\n") else "\n"
    with gitignore.open("a", encoding="utf-8") as fh:
        fh.write(f"{separator}# database secrets (dbkit)\n{SECRETS_FILE}\n")
    return "added"
