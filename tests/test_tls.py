"""TLS for real: the tests make a CA, a server certificate and a client certificate with the
``openssl`` command line, start a private PostgreSQL that accepts TLS connections only
(``hostssl`` rules), and check what libpq's ``sslmode``/``sslrootcert``/``sslcert``/``sslkey``
do through dbkit: ``verify-full`` with the right CA connects; a wrong CA, a host name the
certificate does not name, a missing client certificate or ``sslmode=disable`` fail at once
(permanent, not retried) with a clear ``ConnectError`` that carries no secret.

The server listens on 127.0.0.1 *and* 127.0.0.2 (on Linux all of 127.0.0.0/8 is loopback):
its certificate names ``localhost`` and ``127.0.0.1`` only, so connecting to 127.0.0.2 is the
host-name mismatch case.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from loguru import logger
from sqlalchemy.engine import URL

import dbkit
from dbkit import ConnectError, Database
from dbkit.local import LocalPostgres

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

CERT_USER = "certuser"
# Sent nowhere (trust/cert authentication never asks for it), but present in every URL so
# that any message echoing the URL or the connect arguments would be caught.
SECRET = "Tls-S3cret-pw"


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_client_cert: Path  # signed by the unrelated CA
    other_client_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(cwd: Path, name: str, cn: str) -> None:
    _openssl(
        cwd,
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _make_leaf(cwd: Path, name: str, cn: str, ca: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        cwd,
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
    )  # fmt: skip
    _openssl(
        cwd,
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-set_serial", str(abs(hash(name)) % 10**12 + 1), "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.crt",
    )  # fmt: skip
    (cwd / f"{name}.key").chmod(0o600)  # libpq refuses a client key others can read


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca", "dbkit test CA")
    _make_ca(d, "other_ca", "unrelated CA")
    _make_leaf(
        d,
        "server",
        "localhost",
        "ca",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    _make_leaf(d, "client", CERT_USER, "ca", client_ext)
    _make_leaf(d, "other_client", CERT_USER, "other_ca", client_ext)
    return Pki(
        ca=d / "ca.crt",
        other_ca=d / "other_ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_client_cert=d / "other_client.crt",
        other_client_key=d / "other_client.key",
    )


# TLS only: no plain `host` rule, so a non-TLS TCP connection has no pg_hba entry.  The
# local (unix socket) rule is for pg_ctl's readiness check.
HBA = f"""\
local   all  all                 trust
hostssl all  {CERT_USER}  127.0.0.0/8  cert
hostssl all  all         127.0.0.0/8  trust
"""


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    server = LocalPostgres()
    try:
        hba = tmp_path_factory.mktemp("hba") / "pg_hba.conf"
        hba.write_text(HBA)
        # LocalPostgres has no pg_hba API: copy_in() puts the file, owned by the server user,
        # next to the data directory, and the hba_file setting points the server at it.
        server.settings.update(
            ssl="on",
            ssl_cert_file=str(server.copy_in(pki.server_cert)),
            ssl_key_file=str(server.copy_in(pki.server_key)),  # 0600, owned by the server
            ssl_ca_file=str(server.copy_in(pki.ca)),  # to verify client certificates
            hba_file=str(server.copy_in(hba, "pg_hba.conf")),
            listen_addresses="127.0.0.1,127.0.0.2",
        )
        server.start()
        with server.admin_connection() as conn:  # goes over TLS (sslmode=prefer)
            conn.execute(f"CREATE ROLE {CERT_USER} LOGIN")
        yield server
    finally:
        server.stop(mode="immediate")


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """Everything dbkit logs during the test (to check that no secret is in it)."""
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    logger.enable("dbkit")
    yield lines
    logger.remove(handler)
    logger.disable("dbkit")


def url(server: LocalPostgres, *, user: str = "postgres", host: str = "127.0.0.1") -> str:
    return URL.create(
        "postgresql+psycopg",
        username=user,
        password=SECRET,
        host=host,
        port=server.port,
        database="postgres",
    ).render_as_string(hide_password=False)


def database(target: str, **overrides: Any) -> Database:
    # Retries that would be seen (attempts > 1) if a permanent failure were retried, without
    # making such a bug slow.
    options: dict[str, Any] = {"max_retries": 3, "retry_delay": 0.05, "timeout": 5}
    options.update(overrides)
    return Database.from_url(target, **options)


def ssl_in_use(db: Database) -> bool:
    return bool(db.scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


def assert_permanent_failure(
    db: Database, info: pytest.ExceptionInfo[ConnectError], secrets: list[str], *words: str
) -> None:
    """Failed at the first attempt, says so, names the reason, leaks nothing."""
    text = str(info.value)
    assert db.connect_attempts == 1, text
    assert "permanent" in text
    for word in words:
        assert word in text, text
    assert not dbkit.is_transient(info.value)
    assert db.breaker.state == "closed"  # a permanent error says nothing about server health
    for message in [text, repr(info.value), repr(db), *secrets]:
        assert SECRET not in message


def private_key_body(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))[:40]


# ------------------------------------------------------------------------------ tests


def test_verify_full_with_the_right_ca_connects_over_tls(
    tls_server: LocalPostgres, pki: Pki
) -> None:
    with database(url(tls_server), sslmode="verify-full", sslrootcert=str(pki.ca)) as db:
        assert db.connect_attempts == 1
        assert ssl_in_use(db)
        with db.transaction() as conn:  # pooled connections are TLS too
            assert conn.scalar(sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


def test_sslmode_in_the_url_query_works_too(tls_server: LocalPostgres, pki: Pki) -> None:
    target = f"{url(tls_server)}?sslmode=verify-full&sslrootcert={pki.ca}"
    with database(target) as db:
        assert db.config.sslmode == "verify-full"
        assert ssl_in_use(db)


def test_verify_ca_accepts_any_host_name_the_ca_signed(tls_server: LocalPostgres, pki: Pki) -> None:
    # verify-ca checks the chain but not the name: 127.0.0.2 is not in the certificate.
    target = url(tls_server, host="127.0.0.2")
    with database(target, sslmode="verify-ca", sslrootcert=str(pki.ca)) as db:
        assert ssl_in_use(db)


def test_wrong_ca_fails_at_once_naming_the_certificate(
    tls_server: LocalPostgres, pki: Pki, messages: list[str]
) -> None:
    db = database(url(tls_server), sslmode="verify-full", sslrootcert=str(pki.other_ca))
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "certificate verify failed")
    assert "127.0.0.1" in str(info.value)
    db.close()


def test_host_name_not_in_the_certificate_fails_at_once(
    tls_server: LocalPostgres, pki: Pki, messages: list[str]
) -> None:
    db = database(url(tls_server, host="127.0.0.2"), sslmode="verify-full", sslrootcert=str(pki.ca))
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "does not match host name", "127.0.0.2")
    db.close()


def test_missing_root_certificate_file_is_a_clear_permanent_error(
    tls_server: LocalPostgres, tmp_path: Path, messages: list[str]
) -> None:
    missing = tmp_path / "no-such-ca.crt"
    db = database(url(tls_server), sslmode="verify-full", sslrootcert=str(missing))
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "certificate", str(missing))
    db.close()


def test_client_certificate_authenticates(tls_server: LocalPostgres, pki: Pki) -> None:
    db = database(
        url(tls_server, user=CERT_USER),
        sslmode="verify-full",
        sslrootcert=str(pki.ca),
        sslcert=str(pki.client_cert),
        sslkey=str(pki.client_key),
    )
    with db:
        assert db.scalar("SELECT current_user") == CERT_USER
        row = db.execute(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).one()
        assert row.ssl and f"CN={CERT_USER}" in row.client_dn


def test_cert_auth_without_a_client_certificate_fails_at_once(
    tls_server: LocalPostgres,
    pki: Pki,
    tmp_path: Path,
    messages: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libpq would pick up ~/.postgresql/postgresql.crt by default: make sure there is none.
    monkeypatch.setenv("HOME", str(tmp_path))
    db = database(url(tls_server, user=CERT_USER), sslmode="verify-full", sslrootcert=str(pki.ca))
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "certificate")
    db.close()


def test_client_certificate_from_an_unknown_ca_is_refused(
    tls_server: LocalPostgres, pki: Pki, messages: list[str]
) -> None:
    db = database(
        url(tls_server, user=CERT_USER),
        sslmode="verify-full",
        sslrootcert=str(pki.ca),
        sslcert=str(pki.other_client_cert),
        sslkey=str(pki.other_client_key),
    )
    with pytest.raises(ConnectError) as info:
        db.connect()
    text = str(info.value)
    assert db.connect_attempts == 1, text
    assert "unknown ca" in text.lower() or "certificate" in text.lower(), text
    assert not dbkit.is_transient(info.value)
    key_body = private_key_body(pki.other_client_key)
    for message in [text, repr(info.value), *messages]:
        assert SECRET not in message and key_body not in message
    db.close()


def test_client_key_readable_by_others_is_refused_by_libpq(
    tls_server: LocalPostgres, pki: Pki, tmp_path: Path, messages: list[str]
) -> None:
    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes(pki.client_key.read_bytes())
    loose_key.chmod(0o644)
    db = database(
        url(tls_server, user=CERT_USER),
        sslmode="verify-full",
        sslrootcert=str(pki.ca),
        sslcert=str(pki.client_cert),
        sslkey=str(loose_key),
    )
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "private key file", "group or world access")
    key_body = private_key_body(pki.client_key)
    assert all(key_body not in m for m in [str(info.value), *messages])
    db.close()


def test_sslmode_disable_against_a_tls_only_server_fails_at_once(
    tls_server: LocalPostgres, messages: list[str]
) -> None:
    db = database(url(tls_server), sslmode="disable")
    with pytest.raises(ConnectError) as info:
        db.connect()
    assert_permanent_failure(db, info, messages, "no pg_hba.conf entry", "no encryption")
    db.close()


def test_sslmode_require_encrypts_without_verifying(tls_server: LocalPostgres) -> None:
    with database(url(tls_server, host="127.0.0.2"), sslmode="require") as db:
        assert ssl_in_use(db)
