"""A throwaway PgBouncer for tests: ``with PgBouncer(server) as bouncer: bouncer.url``.

Starts the machine's ``pgbouncer`` (Debian package ``pgbouncer``, ``/usr/sbin/pgbouncer``) in
the foreground in front of a server (a ``LocalPostgres`` or ``"host:port"``), listening on
127.0.0.1 on a free port with its own config in a private temp directory, so it never
depends on or collides with a system PgBouncer (the package's service uses port 6432).

Defaults are the issue's test setup: ``pool_mode = transaction``, ``default_pool_size = 2``,
``auth_type = trust`` (the user still has to be in ``auth_file``, which also holds the
server password when there is one), ``ignore_startup_parameters =
extra_float_digits,options`` and PgBouncer's own ``server_reset_query``.  Every database
name is forwarded to the server (``* =``); ``pgbouncer`` is the admin console, where the
server's user is an admin (``bouncer.show("POOLS")``).

PgBouncer refuses to run as root: then it runs as ``postgres`` (``$DBKIT_PG_RUN_AS``, else
``nobody``), like the test servers.  Through PgBouncer 1.18 in transaction mode psycopg must
not prepare statements: connect with ``prepare_threshold=None``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import psycopg
from psycopg.rows import TupleRow
from sqlalchemy.engine import URL

from dbkit.local import LocalPostgres

__all__ = ["PgBouncer", "PgBouncerError", "find_pgbouncer"]

_KNOWN_PLACES: Final = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
_PORT_RETRIES: Final = 5
# Bounds for a loaded machine, not estimates: a healthy PgBouncer listens within milliseconds.
_READY_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 10.0

_LIVE: set[PgBouncer] = set()


class PgBouncerError(RuntimeError):
    """PgBouncer is missing, would not start, or would not stop; the message says why."""


def find_pgbouncer() -> str:
    """The pgbouncer binary: on PATH, else where distributions put it (/usr/sbin is not on
    every user's PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for place in _KNOWN_PLACES:
        if os.access(place, os.X_OK):
            return place
    raise PgBouncerError(
        "pgbouncer not found: install it (Debian/Ubuntu: apt-get install pgbouncer; "
        ".ci/run does) to run the PgBouncer tests"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as(name: str | None) -> pwd.struct_passwd | None:
    """Whom to run pgbouncer as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    for candidate in (name, os.environ.get("DBKIT_PG_RUN_AS"), "postgres", "nobody"):
        if candidate:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(candidate)
    raise PgBouncerError("running as root and no unprivileged user (postgres, nobody) to run as")


def _quote(value: str) -> str:
    """A value in auth_file: double quotes, doubled inside."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """PgBouncer in front of ``target`` (a ``LocalPostgres``, or ``"host:port"`` with
    ``user``/``password``), started by ``start()`` or ``with``.

    ``settings`` adds or overrides ``[pgbouncer]`` keys (e.g. ``server_login_retry=1``,
    ``query_wait_timeout=5``).  ``url``/``url_for(dbname)`` are SQLAlchemy URLs through it
    (no password: clients are trusted); ``admin_connection()`` and ``show("POOLS")`` use
    the admin console.  ``stop()`` ends it (immediate shutdown) and deletes its directory.
    """

    host: Final = "127.0.0.1"

    def __init__(
        self,
        target: LocalPostgres | str,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        pool_mode: str = "transaction",
        default_pool_size: int = 2,
        max_client_conn: int = 100,
        settings: Mapping[str, str | int] | None = None,
        run_as: str | None = None,
    ) -> None:
        if isinstance(target, LocalPostgres):
            self.server_host, self.server_port = target.host, target.port
            user = user or target.user
            password = password if password is not None else target.password
            dbname = dbname or target.dbname
        else:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"target must be a LocalPostgres or 'host:port', not {target!r}")
            self.server_host, self.server_port = host, int(port)
        self.user = user or "postgres"
        self.password = password
        self.dbname = dbname or "postgres"
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.settings = {k: str(v) for k, v in (settings or {}).items()}
        self._run_as = run_as
        self._port: int | None = None
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise PgBouncerError("PgBouncer has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """``postgresql+psycopg://user@127.0.0.1:<port>/<dbname>`` through PgBouncer."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """The SQLAlchemy URL of another database, through PgBouncer."""
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            host=self.host,
            port=self.port,
            database=dbname,
        ).render_as_string(hide_password=False)

    @property
    def log_file(self) -> Path:
        """What pgbouncer writes to stderr (its log), in its directory."""
        return self._directory / "pgbouncer.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ console

    def admin_connection(self) -> psycopg.Connection[TupleRow]:
        """An autocommit connection to the admin console (database ``pgbouncer``)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname="pgbouncer",
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=10,
        )

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (``POOLS``, ``SERVERS``, ``CLIENTS`` …), as
        dicts by column name."""
        if not what.replace("_", "").isalnum():
            raise ValueError(f"not a SHOW subject: {what!r}")
        with self.admin_connection() as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [column.name for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # ------------------------------------------------------------------ lifecycle

    def _config(self, port: int) -> str:
        options = {
            "listen_addr": self.host,
            "listen_port": str(port),
            "unix_socket_dir": "",  # TCP only: nothing in /tmp to collide with
            "auth_type": "trust",
            "auth_file": str(self._directory / "userlist.txt"),
            "admin_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": "extra_float_digits,options",
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.server_host} port={self.server_port}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in options.items()),
        ]
        return "\n".join(lines) + "\n"

    @property
    def _directory(self) -> Path:
        if self._dir is None:
            raise PgBouncerError("PgBouncer has no directory before start()")
        return self._dir

    def start(self) -> Self:
        """Start PgBouncer on a free port; returns once it answers on the admin console."""
        if self.is_running():
            return self
        binary = find_pgbouncer()
        user = _run_as(self._run_as)
        # The system temp dir is traversable by the unprivileged user; mkdtemp is 0700.
        self._dir = Path(tempfile.mkdtemp(prefix="dbkit-pgbouncer-", dir="/tmp"))
        if user is not None:
            os.chown(self._dir, user.pw_uid, user.pw_gid)
        userlist = self._dir / "userlist.txt"
        userlist.write_text(f"{_quote(self.user)} {_quote(self.password or '')}\n")
        userlist.chmod(0o600)
        if user is not None:
            os.chown(userlist, user.pw_uid, user.pw_gid)
        _LIVE.add(self)
        try:
            for _ in range(_PORT_RETRIES):  # another process may take the free port first
                if self._launch(binary, _free_port(), user):
                    return self
            raise PgBouncerError(f"PgBouncer found no free port after {_PORT_RETRIES} attempts")
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str, port: int, user: pwd.struct_passwd | None) -> bool:
        """Start on ``port``: True once it answers, False when the port was taken."""
        config = self._directory / "pgbouncer.ini"
        config.write_text(self._config(port))
        if user is not None:
            os.chown(config, user.pw_uid, user.pw_gid)
        with self.log_file.open("ab") as log:
            offset = log.tell()
            self._process = subprocess.Popen(
                [binary, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
                start_new_session=True,  # a Ctrl-C to the test run is not sent to it too
            )
        self._port = port
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            if self._process.poll() is not None:
                text = self.log_file.read_bytes()[offset:].decode("utf-8", "replace")
                if "address already in use" in text.lower():
                    return False
                raise PgBouncerError(
                    f"pgbouncer exited with {self._process.returncode} on port {port}:\n{text}"
                )
            try:
                with self.admin_connection() as conn:
                    conn.execute("SHOW VERSION")
                return True
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise PgBouncerError(
                        f"pgbouncer did not answer on port {port} within "
                        f"{_READY_TIMEOUT:.0f} s: {error}\n{self.log_file.read_text()}"
                    ) from error
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut PgBouncer down at once (SIGTERM; SIGKILL if it lingers) and delete its
        directory.  Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"PgBouncer(port={self._port}, server={self.server_host}:{self.server_port}, "
            f"pool_mode={self.pool_mode!r}, default_pool_size={self.default_pool_size})"
        )


@atexit.register
def _stop_forgotten() -> None:
    for bouncer in list(_LIVE):
        with contextlib.suppress(Exception):
            bouncer.stop()
