"""A throwaway (or kept) local PostgreSQL server started from the machine's own binaries.

Used by the test suite, by ``dbkit demo`` and by ``dbkit local start|stop|status|url|destroy``.
It is the "embedded default" without embedding anything: PostgreSQL's own ``initdb``/``pg_ctl``
in a private directory, listening on 127.0.0.1 on a free port, never touching a system cluster.
A throwaway cluster runs without fsync (its data dies with it); a kept one is durable.

PostgreSQL refuses to run as root, and CI often runs as root, so as root the server runs as
an unprivileged user (``postgres``, else ``nobody``).  Only the directories created here are
handed to that user; permissions of parent directories are never loosened.

Every cluster made here can be the primary of streaming replicas: ``start_replica()`` makes a
hot standby with ``pg_basebackup -R`` (its own port and directory), ``promote()`` turns a
standby into a primary.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import psycopg
from loguru import logger
from psycopg.rows import TupleRow
from sqlalchemy.engine import URL

from dbkit.admin import admin_connection, create_database, drop_database
from dbkit.errors import DbkitError

__all__ = [
    "LocalPostgres",
    "PostgresBinariesNotFound",
    "default_data_dir",
    "find_bindir",
]

# Where Debian/Ubuntu's postgresql-NN packages put the server binaries.  Module-level so
# tests can point it at a fake tree.
DEBIAN_PG_ROOT: Path = Path("/usr/lib/postgresql")
# Other well-known places (PGDG RPMs, Homebrew keg-only formulae), tried last.
EXTRA_PG_GLOBS: tuple[str, ...] = (
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)

_REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres")
_STOP_MODES: Final = frozenset({"smart", "fast", "immediate"})
_PORT_RETRIES: Final = 5
# sun_path is 108 bytes on Linux (104 on macOS); "/.s.PGSQL.65535" takes 15 of them.
_MAX_SOCKET_DIR_LEN: Final = 85
_LOG_NAME: Final = "dbkit-postgres.log"
# A kept cluster's last port, tried first on the next start so its URL stays the same.
_PORT_NAME: Final = "dbkit-port"
# Turned off on throwaway (temporary) clusters only; settings= may still override them.
_THROWAWAY_SETTINGS: Final = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# Appended to postgresql.conf by initdb here, so that every cluster can be the primary of
# start_replica() (PostgreSQL's defaults since 10, spelled out; a replica copies the file)
# and a participant of two-phase commit (dbkit.twophase; the default, 0, refuses PREPARE).
_REPLICATION_CONF: Final = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "max_prepared_transactions": "20",
}
# A kept cluster's replicas live next to its data dir: "<data dir>-replica-<n>", each with
# this file naming the primary's data dir (so that only our own replicas are ever touched).
_REPLICA_INFIX: Final = "-replica-"
_PRIMARY_NAME: Final = "dbkit-primary"
# Seconds a new replica may take to accept connections and stream, a promoted one to accept
# writes, a stopped replica's slot to be released: bounds for a loaded machine, not estimates.
_READY_TIMEOUT: Final = 60.0
_SLOT_RELEASE_TIMEOUT: Final = 10.0

_INSTALL_HINT: Final = (
    "dbkit needs the PostgreSQL server binaries (initdb, pg_ctl, postgres) to start a local "
    "server. Install them:\n"
    "  - Debian/Ubuntu: sudo apt-get install postgresql   "
    "(binaries land in /usr/lib/postgresql/<version>/bin)\n"
    "  - macOS: brew install postgresql@16\n"
    "or set DBKIT_PG_BIN to a directory containing them, "
    "or point dbkit at an existing server with DATABASE_URL."
)


class PostgresBinariesNotFound(DbkitError):
    """No usable PostgreSQL server binaries; the message says how to get some."""

    def __init__(self, detail: str = "PostgreSQL server binaries not found.") -> None:
        self.detail = detail
        super().__init__(f"{detail}\n{_INSTALL_HINT}")


# --------------------------------------------------------------------------------------
# Binary discovery
# --------------------------------------------------------------------------------------


def _is_bindir(path: Path) -> bool:
    """A directory counts only if it holds all three server programs, executable."""
    return all(
        (path / name).is_file() and os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES
    )


def _version_key(path: Path) -> tuple[int, ...]:
    """Numeric sort key from the version in a bin dir's parent ("9.6" < "15", "postgresql@16")."""
    match = re.search(r"(\d+(?:\.\d+)*)", path.parent.name)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def _pg_config_bindir() -> Path | None:
    exe = shutil.which("pg_config")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _newest(paths: Sequence[Path]) -> Path | None:
    valid = [p for p in paths if _is_bindir(p)]
    return max(valid, key=_version_key) if valid else None


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate the PostgreSQL server binaries.

    Order: ``explicit`` > ``$DBKIT_PG_BIN`` > ``pg_config --bindir`` > newest
    ``/usr/lib/postgresql/*/bin`` > the directory of ``initdb`` on ``PATH`` > other well-known
    install locations.  An explicit choice (argument or ``DBKIT_PG_BIN``) that is not a valid
    bin directory raises instead of silently falling through to some other PostgreSQL.
    """
    path, source = _locate_bindir(explicit)
    logger.debug("PostgreSQL binaries in {} (from {})", path, source)
    return path


def _locate_bindir(explicit: str | os.PathLike[str] | None) -> tuple[Path, str]:
    for label, chosen in (
        ("bindir argument", os.fspath(explicit) if explicit is not None else None),
        ("DBKIT_PG_BIN", os.environ.get("DBKIT_PG_BIN") or None),
    ):
        if chosen is None:
            continue
        path = Path(chosen).expanduser()
        if _is_bindir(path):
            return path, label
        raise PostgresBinariesNotFound(
            f"{label} {str(path)!r} does not contain executable {', '.join(_REQUIRED_BINARIES)}."
        )

    candidate = _pg_config_bindir()
    if candidate is not None and _is_bindir(candidate):
        return candidate, "pg_config --bindir"

    candidate = _newest(sorted(DEBIAN_PG_ROOT.glob("*/bin")))
    if candidate is not None:
        return candidate, str(DEBIAN_PG_ROOT)

    initdb = shutil.which("initdb")
    if initdb is not None:
        # The PATH entry may hold only a symlink to initdb; the real directory then counts.
        for path in (Path(initdb).parent, Path(initdb).resolve().parent):
            if _is_bindir(path):
                return path, "initdb on PATH"

    globbed = [Path(p) for pattern in EXTRA_PG_GLOBS for p in glob.glob(pattern)]
    candidate = _newest(globbed)
    if candidate is not None:
        return candidate, "well-known install location"

    raise PostgresBinariesNotFound()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where ``dbkit local`` keeps its cluster: ``$DBKIT_LOCAL_DIR``, else
    ``$XDG_DATA_HOME/dbkit/postgres`` (``~/.local/share/…``).  As root, whose home the
    unprivileged server user cannot enter, ``/var/lib/dbkit/postgres``."""
    if explicit := os.environ.get("DBKIT_LOCAL_DIR"):
        return Path(explicit).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/dbkit/postgres")
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "dbkit" / "postgres"


def _free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick); racy by nature, see start()."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _can_traverse(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` can reach ``path`` (x permission on it and every ancestor).

    Root can reach everything; the unprivileged server user cannot reach e.g. a dir under
    root's 0700 home, and we refuse to chmod our way in.
    """
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    current = path.resolve()
    for part in (current, *current.parents):
        try:
            st = part.stat()
        except FileNotFoundError:
            continue  # will be created by us
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _child_env() -> dict[str, str]:
    """Environment for initdb/pg_ctl: no PG* variables (PGDATA, PGPORT … would interfere),
    and C messages so that failure texts we look for ("Address already in use") are English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset`` ('' if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _pid_alive(pid: int, data_dir: Path) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    with contextlib.suppress(OSError, IndexError):
        # An exited postmaster may linger as a zombie until its (re)parent reaps it.
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    # A stale postmaster.pid may name a recycled pid; the postmaster's cwd is its data dir.
    # Reading /proc/<pid>/cwd of another user's process may be denied (no CAP_SYS_PTRACE in
    # containers): then the pid check above is all we have.
    try:
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return True
    return os.path.realpath(cwd) == os.path.realpath(data_dir)


# Temp clusters, each with the pid of the process that made it, stopped and deleted at
# interpreter exit if the user forgot.
_LIVE: dict[LocalPostgres, int] = {}


@atexit.register
def _stop_live_servers() -> None:
    for server, owner in list(_LIVE.items()):
        # A forked child inherits _LIVE but must not stop its parent's servers.
        if owner == os.getpid():
            with contextlib.suppress(Exception):
                server.stop(mode="immediate")


# --------------------------------------------------------------------------------------
# LocalPostgres
# --------------------------------------------------------------------------------------


class LocalPostgres:
    """A local PostgreSQL cluster on 127.0.0.1: trust authentication, or a superuser
    password (``password=``) required over TCP.

    ``data_dir=None`` makes a throwaway cluster in a fresh temp directory, removed by
    ``stop()``.  A given ``data_dir`` is kept: initialised on first use, reused after, so a
    developer can keep a server (and its data) between runs.

    The instance also carries the attributes pytest-postgresql's
    ``postgresql_noproc(depends_on=...)`` reads (``host, port, user, password, options,
    maintenance_dbname, template_dbname``), so it can be the ``depends_on`` fixture value.
    """

    host: str = "127.0.0.1"
    # pytest-postgresql reads these from its depends_on fixture.
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str | None = None

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        bindir: str | os.PathLike[str] | None = None,
        dbname: str = "postgres",
        user: str = "postgres",
        settings: Mapping[str, str | int | float | bool] | None = None,
        run_as: str | None = None,
        password: str | None = None,
    ) -> None:
        self._given_data_dir = Path(data_dir).expanduser().absolute() if data_dir else None
        self._port = port
        self._port_fixed = port is not None
        self._bindir_arg = bindir
        self._bindir: Path | None = None
        self.dbname = dbname
        self.user = user
        # None: trust authentication.  Set: the superuser's password, required over TCP
        # (scram-sha-256).  Only applied by initdb, i.e. when the cluster is created.
        self.password: str | None = password
        # Public and mutable until start(): extra server settings passed as ``-c key=value``.
        self.settings: dict[str, str] = {k: _setting(v) for k, v in (settings or {}).items()}
        self._run_as_arg = run_as
        self._srv_user: pwd.struct_passwd | None = None
        self._temp_dir: Path | None = None  # the mkdtemp we own (temp clusters only)
        # The server this one was made from by start_replica() (None: made by initdb, or
        # promoted since), its replication slot there, and the replicas made from this one.
        self.primary: LocalPostgres | None = None
        self._slot: str | None = None
        self._replicas: list[LocalPostgres] = []

    # ---------------------------------------------------------------- properties

    @property
    def is_temporary(self) -> bool:
        """True when the cluster lives in a temp dir that ``stop()`` removes."""
        return self._given_data_dir is None

    @property
    def is_replica(self) -> bool:
        """True for a standby (its data dir holds ``standby.signal``), or, before its cluster
        exists, for a server made by ``start_replica()``; false again once promoted."""
        if self._has_cluster() and (self.data_dir / "PG_VERSION").exists():
            return (self.data_dir / "standby.signal").exists()
        return self.primary is not None

    @property
    def replicas(self) -> list[LocalPostgres]:
        """The replicas ``start_replica()`` made from this server in this process (a kept
        cluster's replicas from earlier runs: ``kept_replicas()``)."""
        return list(self._replicas)

    @property
    def port(self) -> int:
        """The TCP port; chosen at ``start()`` unless given."""
        if self._port is None:
            raise DbkitError("LocalPostgres has no port yet: call start() or pass port=")
        return self._port

    @property
    def data_dir(self) -> Path:
        """The cluster directory (PGDATA)."""
        if self._given_data_dir is not None:
            return self._given_data_dir
        if self._temp_dir is None:
            raise DbkitError("temporary LocalPostgres has no data directory before start()")
        return self._temp_dir / "data"

    @property
    def run_dir(self) -> Path:
        """Where the server log, the unix socket and files given via ``copy_in`` live."""
        if self._given_data_dir is not None:
            return self._given_data_dir
        return self.data_dir.parent

    @property
    def log_file(self) -> Path:
        return self.run_dir / _LOG_NAME

    @property
    def bindir(self) -> Path:
        """The directory of initdb/pg_ctl/postgres (see ``find_bindir``)."""
        if self._bindir is None:
            self._bindir = find_bindir(self._bindir_arg)
        return self._bindir

    @property
    def url(self) -> str:
        """SQLAlchemy URL of ``dbname``, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5433/postgres``."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL of another database on this server."""
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            database=dbname,
        ).render_as_string(hide_password=False)

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` (None when there is no such file)."""
        fields = self._pidfile_fields()
        try:
            return int(fields[0]) if fields else None
        except ValueError:
            return None

    def __repr__(self) -> str:
        where = self._given_data_dir or self._temp_dir or "<temp, not created>"
        return f"LocalPostgres(data_dir={str(where)!r}, port={self._port}, user={self.user!r})"

    # ---------------------------------------------------------------- running as root

    def _server_user(self) -> pwd.struct_passwd | None:
        """The user to drop to when we are root (None when we are not), resolved once.

        ``run_as`` > owner of an existing kept cluster (postgres only runs a cluster as its
        owner) > ``$DBKIT_PG_RUN_AS`` > ``postgres`` > ``nobody``.
        """
        if os.geteuid() != 0:
            return None
        if self._srv_user is None:
            self._srv_user = self._resolve_server_user()
        return self._srv_user

    def _resolve_server_user(self) -> pwd.struct_passwd:
        if self._run_as_arg:
            return _getpwnam(self._run_as_arg)
        if self._given_data_dir is not None and (self._given_data_dir / "PG_VERSION").exists():
            owner = self._given_data_dir.stat().st_uid
            if owner != 0:
                return pwd.getpwuid(owner)
        if name := os.environ.get("DBKIT_PG_RUN_AS"):
            return _getpwnam(name)
        for candidate in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(candidate)
        raise DbkitError(
            "PostgreSQL cannot run as root and neither a 'postgres' nor a 'nobody' user exists; "
            "set DBKIT_PG_RUN_AS to an unprivileged user"
        )

    def _run(
        self,
        args: Sequence[str],
        *,
        timeout: float,
        user: pwd.struct_passwd | None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program, as ``user`` when given (we are root then); ``env`` adds
        variables (e.g. PGPASSWORD) to the cleaned environment."""
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",  # the server user may not be able to reach our cwd
            env={**_child_env(), **(env or {})},
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            # the user's own supplementary groups (e.g. ssl-cert), none of root's
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid) if user else None,
        )

    def _chown(self, path: Path, user: pwd.struct_passwd | None) -> None:
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    # ---------------------------------------------------------------- lifecycle

    def _prepare(self, user: pwd.struct_passwd | None) -> None:
        """Create our directories and the cluster (initdb) unless it already exists."""
        if self._given_data_dir is None:
            if self._temp_dir is None or not self._temp_dir.exists():
                self._temp_dir = Path(tempfile.mkdtemp(prefix="dbkit-pg-", dir=_temp_base(user)))
                _LIVE[self] = os.getpid()  # from now on, interpreter exit cleans up
                self._chown(self._temp_dir, user)  # mkdtemp is 0700: hand it to the server user
        else:
            data = self._given_data_dir
            if user is not None and not _can_traverse(data.parent, user):
                raise DbkitError(
                    f"user {user.pw_name!r} cannot reach {str(data.parent)!r}; choose a data "
                    "directory it can access (dbkit does not loosen permissions of parents)"
                )
            if not data.exists():
                data.mkdir(parents=True, mode=0o700)
                self._chown(data, user)
            elif not (data / "PG_VERSION").exists():
                self._chown(data, user)  # an empty dir the user made for us
        if not (self.data_dir / "PG_VERSION").exists():
            if self.primary is not None:
                self._basebackup(self.primary, user)
            else:
                self._initdb(user)

    def _initdb(self, user: pwd.struct_passwd | None) -> None:
        base = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "-E",
            "UTF8",
        ]
        if self.is_temporary:
            base.append("--no-sync")  # a throwaway cluster: no fsync of the fresh files
        logger.debug("initdb {} as {}", self.data_dir, user.pw_name if user else "current user")
        with self._password_file(user) as pwfile:
            if pwfile is None:
                base.append("--auth=trust")
            else:
                # TCP clients must authenticate; the private unix socket stays trust.
                base += ["--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}"]
            result = self._run([*base, "--locale=C.UTF-8"], timeout=300, user=user)
            if result.returncode != 0 and "locale" in (result.stderr + result.stdout).lower():
                # Systems without the C.UTF-8 locale (older glibc, some macOS setups).
                result = self._run([*base, "--locale=C"], timeout=300, user=user)
        if result.returncode != 0:
            raise DbkitError(
                f"initdb failed for {str(self.data_dir)!r} (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout).strip()}"
            )
        # Ready to be a primary: replication settings and a replication line for 127.0.0.1.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# dbkit: every local cluster can be the primary of streaming replicas, "
                "and prepare transactions\n"
            )
            conf.writelines(f"{key} = {value}\n" for key, value in _REPLICATION_CONF.items())
        self._ensure_replication_hba()

    @contextlib.contextmanager
    def _password_file(self, user: pwd.struct_passwd | None) -> Iterator[Path | None]:
        """initdb reads the superuser password from a file: a private one, readable by the
        server user, removed right after."""
        if self.password is None:
            yield None
            return
        parent = self._temp_dir if self._temp_dir is not None else _temp_base(user)
        fd, name = tempfile.mkstemp(prefix="dbkit-pw-", dir=parent)  # 0600
        path = Path(name)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.password + "\n")
            self._chown(path, user)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _server_options(self, port: int) -> str:
        """The ``pg_ctl -o`` string; pg_ctl hands it to a shell, hence the quoting."""
        socket_dir = str(self.run_dir)
        opts: dict[str, str] = {
            "listen_addresses": self.host,
            # A too-long socket path would stop the server; TCP is all we need then.
            "unix_socket_directories": socket_dir if len(socket_dir) <= _MAX_SOCKET_DIR_LEN else "",
        }
        if self.is_temporary:
            # A throwaway server: durability buys nothing, its data dies with it.  A kept
            # cluster keeps PostgreSQL's defaults (on): an OS crash must not corrupt it.
            opts.update(_THROWAWAY_SETTINGS)
        opts.update(self.settings)
        parts = ["-p", str(port)]
        for key, value in opts.items():
            parts += ["-c", f"{key}={value}"]
        return " ".join(shlex.quote(p) for p in parts)

    def start(self) -> Self:
        """Initialise (if needed) and start the server; a no-op when it already runs.

        A replica (``start_replica()``) is made by ``pg_basebackup`` instead of initdb (a
        temporary one again after ``stop()``), and start returns once it accepts
        connections as a standby that streams from its primary (when that one runs).
        """
        user = self._server_user()
        if self._given_data_dir is not None and self.is_running():
            # Kept cluster already up (started by an earlier process): adopt its port.
            self._adopt_running()
            return self
        if self._temp_dir is not None and self.is_running():
            return self
        _ = self.bindir  # no binaries: fail before creating anything
        fresh_temp = self.is_temporary and self._temp_dir is None
        try:
            self._prepare(user)
            self._start_server(user)
            if self.primary is not None and self.is_replica and self.primary.is_running():
                self._wait_until_streaming()  # (with its primary down: pg_ctl -w's wait)
            return self
        except BaseException:
            # Do not leave a half-made throwaway cluster behind (the error carries the log).
            if fresh_temp and not self.is_running():
                self.stop()
            raise

    def _start_server(self, user: pwd.struct_passwd | None) -> Self:
        attempts = 1 if self._port is not None else _PORT_RETRIES
        preferred = self._remembered_port()
        if self.primary is not None and self.primary.is_running() and self.is_replica:
            with contextlib.suppress(DbkitError):  # its port unknown: leave the conninfo
                self._point_at_primary(self.primary.port)
        for attempt in range(1, attempts + 1):
            if self._port is not None:
                port = self._port
            elif attempt == 1 and preferred is not None:
                port = preferred
            else:
                port = _free_port(self.host)
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            logger.debug("starting PostgreSQL in {} on port {}", self.data_dir, port)
            result = self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    "30",
                    "-o",
                    self._server_options(port),
                ],
                timeout=90,
                user=user,
            )
            if result.returncode == 0:
                self._port = port
                if not self.is_temporary:
                    with contextlib.suppress(OSError):
                        (self.run_dir / _PORT_NAME).write_text(f"{port}\n")
                logger.info("local PostgreSQL running at {}", self.url)
                return self
            log = _tail(self.log_file, offset)
            if self.is_running():  # e.g. pg_ctl timed out while the server was still starting
                self._pg_ctl_stop("immediate", user)
            if "address already in use" in log.lower() and not self._port_fixed:
                logger.debug(
                    "port {} taken (attempt {}/{}), picking another", port, attempt, attempts
                )
                continue
            raise DbkitError(
                f"PostgreSQL failed to start in {str(self.data_dir)!r} on port {port} "
                f"(pg_ctl exit {result.returncode}): {(result.stderr or result.stdout).strip()}\n"
                f"--- server log ({self.log_file}) ---\n{log}"
            )
        raise DbkitError(f"PostgreSQL could not find a free port after {attempts} attempts")

    def _remembered_port(self) -> int | None:
        """The port a kept cluster last ran on, if it is free now (a later attempt picks
        another when it is not, or when the free-port check loses a race)."""
        if self.is_temporary:
            return None
        try:
            port = int((self.run_dir / _PORT_NAME).read_text())
        except (OSError, ValueError):
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the server binds: SO_REUSEADDR, so the TIME_WAIT connections our last
            # server left on this port do not count as taken (a listener still does).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError:
                return None
        return port

    def _pg_ctl_stop(self, mode: str, user: pwd.struct_passwd | None) -> None:
        pg_ctl = str(self.bindir / "pg_ctl")
        result = self._run(
            [pg_ctl, "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60"],
            timeout=90,
            user=user,
        )
        if result.returncode != 0 and self.is_running():
            if mode != "immediate":
                self._pg_ctl_stop("immediate", user)
                return
            raise DbkitError(
                f"could not stop PostgreSQL in {str(self.data_dir)!r}: {result.stderr.strip()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); a temp cluster is deleted.

        Idempotent.  A kept data directory stays on disk for the next ``start()``; after a
        temp cluster, ``start()`` makes a fresh one on the same port.

        Only this server stops: replicas made from it keep running (a failover test stops
        the primary, then promotes a replica).  Leaving a ``with`` block stops the replicas
        made in it first, then the primary.  A stopped temporary replica's replication slot
        is dropped on its primary.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_MODES)}, not {mode!r}")
        if self._has_cluster() and self.is_running():
            logger.debug("stopping PostgreSQL in {} ({})", self.data_dir, mode)
            self._pg_ctl_stop(mode, self._server_user())
        _LIVE.pop(self, None)
        if self._temp_dir is not None:
            if self.primary is not None and self._slot is not None:
                # A fresh replica is made at the next start(): its WAL need not be kept.
                _drop_slot(self.primary, self._slot, wait=_SLOT_RELEASE_TIMEOUT)
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
            # The port is kept: a later start() makes a fresh cluster at the same URL.

    def destroy(self) -> None:
        """Stop the server and delete its cluster, data and all; idempotent.

        A temporary cluster goes as with ``stop()``.  A kept data directory is deleted only
        when it is a PostgreSQL data directory (it holds ``PG_VERSION``): any other
        directory is refused with ``DbkitError`` and left untouched, so a wrong
        ``--data-dir`` cannot wipe someone's files.  A missing directory is a no-op.
        """
        if self._given_data_dir is None:
            self.stop(mode="fast")
            return
        data = self._given_data_dir
        if not data.exists() and not data.is_symlink():
            return
        if data.is_symlink():
            raise DbkitError(f"refusing to delete {str(data)!r}: it is a symbolic link")
        if not data.is_dir() or not (data / "PG_VERSION").is_file():
            raise DbkitError(
                f"refusing to delete {str(data)!r}: not a PostgreSQL data directory "
                "(no PG_VERSION in it)"
            )
        self.stop(mode="fast")
        if self.is_running():
            raise DbkitError(f"PostgreSQL in {str(data)!r} is still running; not deleted")
        try:
            shutil.rmtree(data)
        except OSError as error:
            raise DbkitError(f"could not delete {str(data)!r}: {error}") from error
        logger.info("deleted the local PostgreSQL cluster in {}", data)
        if self.primary is not None and self._slot is not None:
            _drop_slot(self.primary, self._slot, wait=_SLOT_RELEASE_TIMEOUT)

    def kill(self) -> None:
        """Stop at once, as a crash would (no checkpoint); data stays for a ``start()``."""
        if self._has_cluster() and self.is_running():
            self._pg_ctl_stop("immediate", self._server_user())

    def restart(self) -> Self:
        """Stop and start again on the same port with the same data."""
        if self._has_cluster() and self.is_running():
            if self._port is None:
                self._adopt_running()
            self._pg_ctl_stop("fast", self._server_user())
        return self.start()

    def is_running(self) -> bool:
        """Whether a postmaster is alive for this data directory (via ``postmaster.pid``)."""
        if not self._has_cluster():
            return False
        pid = self.pid
        return pid is not None and _pid_alive(pid, self.data_dir)

    def _has_cluster(self) -> bool:
        return self._given_data_dir is not None or self._temp_dir is not None

    def _pidfile_fields(self) -> list[str]:
        if not self._has_cluster():
            return []
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def _adopt_running(self) -> None:
        fields = self._pidfile_fields()
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen addr, shmem, status
        if len(fields) >= 4 and fields[3].strip().isdigit():
            self._port = int(fields[3])

    @classmethod
    def attach(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
    ) -> LocalPostgres | None:
        """The running server of a kept data directory, or None if it is not running."""
        server = cls(data_dir, user=user, dbname=dbname, password=password)
        if not server.is_running():
            return None
        server._adopt_running()
        return server if server._port is not None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Replicas first (the last made first), then the primary; each is stopped even when
        # another's stop fails.
        with contextlib.ExitStack() as stack:
            stack.callback(self.stop)
            for replica in self._replicas:
                stack.callback(replica.stop)

    # ---------------------------------------------------------------- replicas

    def start_replica(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> LocalPostgres:
        """Make and start a streaming hot standby of this running server; return it.

        ``pg_basebackup -R -X stream`` (as the server user when we are root) copies the
        cluster over a replication connection to 127.0.0.1 and a physical replication slot
        keeps the WAL the replica has not received yet.  The replica listens on its own
        free port (or ``port``) with this server's ``settings`` plus ``hot_standby = on``
        and ``settings``; it returns once it accepts connections, ``pg_is_in_recovery()``
        and its WAL receiver streams.

        Its directory: for a temporary server a sibling temp directory, deleted by the
        replica's ``stop()`` (a later ``start()`` makes a fresh replica); for a kept one,
        ``<data dir>-replica-<n>`` next to it, kept like the primary's (``kept_replicas()``
        finds them again).  ``stop()`` of the primary leaves its replicas running; leaving
        the primary's ``with`` block stops them first.
        """
        if not self.is_running():
            raise DbkitError("start_replica() needs a running server: call start() first")
        if self._port is None:
            self._adopt_running()
        self._check_can_stream()
        data_dir: Path | None = None
        slot = f"dbkit_replica_{uuid.uuid4().hex[:12]}"
        if not self.is_temporary:
            number = 1
            while self._replica_dir(number).exists() or self._replica_dir(number).is_symlink():
                number += 1
            data_dir, slot = self._replica_dir(number), f"dbkit_replica_{number}"
        replica = self._replica_at(data_dir, slot, port=port, settings=settings)
        logger.debug("making a replica of {} in {}", self.data_dir, data_dir or "a temp dir")
        try:
            replica.start()
        except BaseException:
            if data_dir is not None and not replica.is_running():
                # Ours and half made (pg_basebackup empties it on failure): not a replica.
                if not (data_dir / "PG_VERSION").exists():
                    shutil.rmtree(data_dir, ignore_errors=True)
                _drop_slot(self, slot)
            raise
        self._replicas.append(replica)
        return replica

    def kept_replicas(self) -> dict[int, LocalPostgres]:
        """A kept cluster's replicas made by ``start_replica()`` (in this or an earlier
        run), by number: ``<data dir>-replica-<n>`` holding a ``dbkit-primary`` file that
        names this data dir.  Running ones know their port; ``start()`` starts the others
        (as standbys of this server, pointed at its current port).  Empty for a temporary
        server (see ``replicas``)."""
        if self._given_data_dir is None:
            return {}
        base = self._given_data_dir
        if self._port is None and self.is_running():
            self._adopt_running()  # the replicas follow its current port
        pattern = re.compile(re.escape(base.name + _REPLICA_INFIX) + r"([1-9]\d*)")
        found: dict[int, LocalPostgres] = {}
        for path in base.parent.glob(glob.escape(base.name + _REPLICA_INFIX) + "*"):
            match = pattern.fullmatch(path.name)
            if match is None or path.is_symlink() or not path.is_dir():
                continue
            try:
                if (path / _PRIMARY_NAME).read_text().strip() != str(base):
                    continue
            except OSError:
                continue
            number = int(match.group(1))
            found[number] = self._replica_at(path, f"dbkit_replica_{number}")
        return dict(sorted(found.items()))

    def promote(self) -> Self:
        """Make this standby a primary (``pg_ctl promote -w``); returns once it accepts
        writes.  Its slot on the old primary is dropped when that one still runs."""
        if not self.is_running():
            raise DbkitError(f"cannot promote {self!r}: it is not running")
        if not self.is_replica:
            raise DbkitError(f"cannot promote {self!r}: it is not a standby")
        result = self._run(
            [str(self.bindir / "pg_ctl"), "promote", "-D", str(self.data_dir), "-w", "-t", "60"],
            timeout=90,
            user=self._server_user(),
        )
        if result.returncode != 0:
            raise DbkitError(
                f"pg_ctl promote failed for {str(self.data_dir)!r} (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}\n"
                f"--- server log ({self.log_file}) ---\n{_tail(self.log_file)}"
            )
        self._wait_for(lambda in_recovery, _: not in_recovery, "accept writes")
        old, self.primary = self.primary, None
        if old is not None and self._slot is not None:
            _drop_slot(old, self._slot, wait=_SLOT_RELEASE_TIMEOUT)
        self._slot = None
        logger.info("promoted {} to primary", self.url)
        return self

    def _replica_dir(self, number: int) -> Path:
        base = self.data_dir
        return base.with_name(f"{base.name}{_REPLICA_INFIX}{number}")

    def _replica_at(
        self,
        data_dir: Path | None,
        slot: str,
        *,
        port: int | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> LocalPostgres:
        """A LocalPostgres for a replica of this server in ``data_dir`` (None: temporary)
        with replication slot ``slot``; its port known when it runs."""
        user = self._server_user()
        existing = data_dir is not None and (data_dir / "PG_VERSION").exists()
        # A hot standby needs max_connections etc. at least as high as its primary's: it
        # inherits the primary's command-line settings (postgresql.conf comes with the copy).
        replica = LocalPostgres(
            data_dir,
            port=port,
            bindir=self.bindir,
            dbname=self.dbname,
            user=self.user,
            settings={**self.settings, "hot_standby": "on", **(settings or {})},
            # A new replica runs as this server's user, an existing kept one as its owner.
            run_as=user.pw_name if user is not None and not existing else None,
            password=self.password,
        )
        replica.primary = self
        replica._slot = slot
        if replica.is_running():
            replica._adopt_running()
        return replica

    def _check_can_stream(self) -> None:
        """Refuse clearly when this server cannot feed a replica; add the pg_hba.conf line
        for replication from 127.0.0.1 when missing (and reload)."""
        with self.admin_connection() as conn:
            row = conn.execute(
                "SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int,"
                " current_setting('max_replication_slots')::int"
            ).fetchone()
            assert row is not None
            wal_level, senders, slots = row
            problems = []
            if wal_level not in ("replica", "logical"):
                problems.append(f"wal_level = {wal_level} (needs replica)")
            if senders < 1:
                problems.append("max_wal_senders = 0")
            if slots < 1:
                problems.append("max_replication_slots = 0")
            if problems:
                raise DbkitError(
                    f"{self.url} cannot feed a streaming replica: {', '.join(problems)}; "
                    "change it (settings=) and restart"
                )
            if not self._ensure_replication_hba():
                return
            conn.execute("SELECT pg_reload_conf()")
        # The server reloads pg_hba.conf on its own time: until a replication connection is
        # let in (one that pg_basebackup's would be), bounded.
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            try:
                psycopg.connect(
                    host=self.host,
                    port=self.port,
                    user=self.user,
                    password=self.password,
                    dbname=self.maintenance_dbname,
                    replication="true",
                    autocommit=True,
                    connect_timeout=5,
                ).close()
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise DbkitError(
                        f"{self.url} does not accept replication connections: {error}"
                    ) from error
            time.sleep(0.05)

    def _ensure_replication_hba(self) -> bool:
        """Append a ``host replication`` line for 127.0.0.1 to pg_hba.conf unless one is
        there (initdb writes one); True when it was added."""
        hba = self.data_dir / "pg_hba.conf"
        text = hba.read_text()
        line = re.compile(r"^\s*host\s+replication\s+\S+\s+127\.0\.0\.1(?:/32)?\s", re.MULTILINE)
        if line.search(text):
            return False
        method = "trust" if self.password is None else "scram-sha-256"
        with hba.open("a") as fh:
            fh.write(
                f"{'' if text.endswith(chr(10)) else chr(10)}"
                f"# dbkit: streaming replicas (start_replica)\n"
                f"host    replication     all             127.0.0.1/32            {method}\n"
            )
        return True

    def _basebackup(self, primary: LocalPostgres, user: pwd.struct_passwd | None) -> None:
        """Make this replica's cluster: ``pg_basebackup -R`` from the running ``primary``."""
        if not primary.is_running():
            raise DbkitError(f"cannot make a replica: its primary {primary!r} is not running")
        basebackup = self.bindir / "pg_basebackup"
        if not basebackup.is_file():
            raise PostgresBinariesNotFound(f"no pg_basebackup in {str(self.bindir)!r}.")
        if self._slot is None:
            self._slot = f"dbkit_replica_{uuid.uuid4().hex[:12]}"
        # A slot of that name is a gone replica's (its directory is not there any more).
        _drop_slot(primary, self._slot)
        args = [
            str(basebackup),
            "-D",
            str(self.data_dir),
            "-R",  # standby.signal + primary_conninfo (and the slot) in postgresql.auto.conf
            "-X",
            "stream",
            "--checkpoint=fast",
            "-C",
            "-S",
            self._slot,
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.user,
            "-w",
        ]
        if self.is_temporary:
            args.append("--no-sync")
        env = {"PGPASSWORD": primary.password} if primary.password is not None else None
        logger.debug("pg_basebackup of {} into {}", primary.url, self.data_dir)
        result = self._run(args, timeout=600, user=user, env=env)
        if result.returncode != 0:
            raise DbkitError(
                f"pg_basebackup from {primary.host}:{primary.port} into {str(self.data_dir)!r} "
                f"failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
            )
        # A kept primary keeps its log, port and socket lock in its data dir: not ours.
        for name in (_LOG_NAME, _PORT_NAME, _PRIMARY_NAME):
            (self.data_dir / name).unlink(missing_ok=True)
        for lock in self.data_dir.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)
        if not self.is_temporary:
            marker = self.data_dir / _PRIMARY_NAME
            marker.write_text(f"{primary.data_dir}\n")
            self._chown(marker, user)

    def _point_at_primary(self, port: int) -> None:
        """Rewrite the port in primary_conninfo (a kept primary may have had to move)."""
        auto = self.data_dir / "postgresql.auto.conf"
        try:
            text = auto.read_text()
        except OSError:
            return
        fixed = re.sub(
            r"^(primary_conninfo\s*=\s*'.*?\bport=)\d+",
            lambda m: f"{m.group(1)}{port}",
            text,
            flags=re.MULTILINE,
        )
        if fixed != text:
            logger.debug("replica {} now follows port {}", self.data_dir, port)
            auto.write_text(fixed)  # the file keeps its owner and mode

    def _wait_for(self, ready: Callable[[bool, str | None], bool], what: str) -> None:
        """Poll ``pg_is_in_recovery()`` and the WAL receiver's status until ``ready(...)``."""
        deadline = time.monotonic() + _READY_TIMEOUT
        last: object = None
        while True:
            if not self.is_running():
                raise DbkitError(
                    f"PostgreSQL in {str(self.data_dir)!r} stopped while waiting for it to "
                    f"{what}\n--- server log ({self.log_file}) ---\n{_tail(self.log_file)}"
                )
            try:
                with admin_connection(
                    self.url_for(self.maintenance_dbname), connect_timeout=5
                ) as c:
                    row = c.execute(
                        "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)"
                    ).fetchone()
                assert row is not None
                last = row
                if ready(row[0], row[1]):
                    return
            except psycopg.OperationalError as error:
                last = error
            if time.monotonic() > deadline:
                raise DbkitError(
                    f"PostgreSQL in {str(self.data_dir)!r} did not {what} within "
                    f"{_READY_TIMEOUT:.0f} s (last: {last})\n"
                    f"--- server log ({self.log_file}) ---\n{_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def _wait_until_streaming(self) -> None:
        self._wait_for(
            lambda in_recovery, receiver: in_recovery and receiver == "streaming",
            "stream as a standby",
        )

    # ---------------------------------------------------------------- conveniences

    def copy_in(
        self, src: str | os.PathLike[str], name: str | None = None, mode: int = 0o600
    ) -> Path:
        """Copy a file (e.g. an SSL key) into the run dir, owned by the server user.

        PostgreSQL insists that its key file belongs to the server user with mode 0600, which
        a root-owned file in a test's tmp dir can never satisfy.  Creates the cluster if needed.
        """
        user = self._server_user()
        self._prepare(user)
        dest = self.run_dir / (name or Path(src).name)
        shutil.copyfile(src, dest)
        os.chmod(dest, mode)
        self._chown(dest, user)
        return dest

    def admin_connection(self) -> psycopg.Connection[TupleRow]:
        """An autocommit psycopg connection to the maintenance database (``postgres``), as
        the server's superuser: ``with server.admin_connection() as conn: ...``."""
        return admin_connection(self.url_for(self.maintenance_dbname))

    # The name tests/test_tls.py used before admin_connection() was public.
    _admin = admin_connection

    def create_database(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE, optionally from a template (whose sessions are ended first)."""
        create_database(self.url_for(self.maintenance_dbname), name, template=template)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting its sessions."""
        drop_database(self.url_for(self.maintenance_dbname), name)


def _getpwnam(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise DbkitError(f"cannot run PostgreSQL as {name!r}: no such user") from None


def _setting(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _temp_base(user: pwd.struct_passwd | None) -> str | None:
    """Parent for mkdtemp: the default temp dir, unless the server user cannot reach it
    (e.g. TMPDIR under root's 0700 home); then the world-traversable system /tmp."""
    default = tempfile.gettempdir()
    if user is None or _can_traverse(Path(default), user):
        return None
    for fallback in ("/tmp", "/var/tmp"):
        if Path(fallback).is_dir() and _can_traverse(Path(fallback), user):
            return fallback
    raise DbkitError(
        f"user {user.pw_name!r} cannot reach the temp directory {default!r}; set TMPDIR to a "
        "directory it can traverse"
    )


def _drop_slot(server: LocalPostgres, name: str, wait: float = 0.0) -> bool:
    """Drop ``server``'s replication slot ``name`` if it exists, waiting up to ``wait``
    seconds for its replica to let go of it; best effort (False when not dropped)."""
    if not server.is_running():
        return False
    deadline = time.monotonic() + wait
    try:
        with server.admin_connection() as conn:
            while True:
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)
                ).fetchone()
                if row is None:
                    return False
                if not row[0]:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                    logger.debug("dropped replication slot {} on {}", name, server.url)
                    return True
                if time.monotonic() > deadline:
                    logger.debug("replication slot {} on {} is still in use", name, server.url)
                    return False
                time.sleep(0.05)
    except (psycopg.Error, DbkitError) as error:
        logger.debug("could not drop replication slot {}: {}", name, error)
        return False
