"""A TCP proxy in front of PostgreSQL that breaks connections on command (tests only).

``FaultProxy(host, port)`` listens on 127.0.0.1 on a free port and relays every connection
to the target with two daemon threads, one per direction.  It reads just enough of the
PostgreSQL protocol on the client → server stream to find message boundaries, so that it can
act on a COMMIT:

- the startup phase: untyped messages (int32 length incl. itself, int32 code).  An
  SSLRequest or GSSENCRequest (8 bytes) is answered by the server with one byte; after ``N``
  the client sends its next startup message in the clear, after ``S``/``G`` the rest is
  encrypted and relayed blindly (no COMMIT can be seen then).  The StartupMessage ends the
  phase; a CancelRequest is relayed blindly;
- then typed messages: one type byte, int32 length incl. itself.  A COMMIT is a simple
  Query (``Q``) whose text, without the trailing NUL, stripped, without trailing ``;`` and
  uppercased is ``COMMIT`` or ``END`` (psycopg's ``conn.commit()`` sends ``COMMIT``).

Faults, switchable at any time from any thread:

``cut_all()``                 shut every open connection down, both sides, now
``cut_after_commit(n)``       for the next n COMMITs: forward it, then close that connection;
                              the server commits, no byte of its reply reaches the client
``cut_instead_of_commit(n)``  for the next n COMMITs: close the connection without forwarding
                              it; the server sees EOF and rolls back
``refuse()`` / ``accept()``   reset new connections at once (as if nothing listened) / stop
``hold()`` / ``release()``    stop relaying (bytes queue up in the kernel) / go on
``hold_statement(prefix, n)`` for the next n statements starting with ``prefix``: keep that
                              message and everything after it on that connection; the server
                              never sees it, the client waits for an answer that never comes
``wait_held(timeout)``        wait until a statement was held (also ``statement_held``, an Event)

Holding a statement (two-phase-commit crash tests: stop a client right before its
``PREPARE TRANSACTION``, ``COMMIT PREPARED`` or log ``INSERT``, then kill it).  A message
carries a statement when it is

- a simple Query (``Q``: the text + NUL): psycopg sends one for ``execute()`` without
  parameters (``conn.execute("PREPARE TRANSACTION 'x'")``, ``cursor.execute(sql)``) and for
  ``commit()``, ``rollback()`` and the ``tpc_*()`` commands;
- a Parse (``P``: statement name + NUL, text + NUL, parameter types): psycopg sends one
  (unnamed, then Bind/Describe/Execute/Sync) for ``execute(sql, params)``, ``executemany()``,
  in pipeline mode and with ``binary=True``; a named one with ``prepare=True`` or once a
  query passed ``prepare_threshold``;
- a Bind (``B``: portal name + NUL, statement name + NUL, …) of a statement that this
  connection's Parse named earlier: a prepared statement executed again sends no Parse, only
  Bind/Execute, so its text is the one remembered from its Parse.

It matches when its text, without leading whitespace, starts with ``prefix`` compared
ASCII-case-insensitively as bytes (UTF-8): no comment skipping, no whitespace folding, and a
multi-statement Query matches by its start only.  A held message is never forwarded, and
neither is anything the client sends after it on that connection (the bytes before it in the
same read are): the connection stays open, the server sees an idle session (idle in
transaction if one was open) and the client blocks waiting.  When the client goes away (closes,
or its process is killed) the proxy closes the server side too, so the server sees the session
end as after a client crash: an open transaction is rolled back, a prepared one stays.
``release()`` does not forward a held statement (it only ends ``hold()``); ``cut_all()`` and
``close()`` shut held connections down, both sides, like any other; ``disarm()`` forgets
statement holds not used yet.  A held COMMIT is not counted in ``commits_seen`` and uses no
COMMIT fault.

Counters: ``connections``, ``refused``, ``upstream_failures`` (target unreachable),
``commits_seen``, ``commits_cut_after``, ``commits_cut_instead``, ``cut_connections`` (by
``cut_all``), ``statements_held``; ``counters()`` returns them all at once, and
``held_statements()`` what was held (connection number, message type, text).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple, Self

from sqlalchemy.engine import make_url

__all__ = ["FaultProxy", "HeldStatement"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_COMMITS = frozenset({b"COMMIT", b"END"})
_CHUNK = 65536
# How long a connection cut after a forwarded COMMIT may go on draining the server's reply
# (which is thrown away) before it is shut down for good.
_DRAIN_SECONDS = 5.0


def _is_commit(message: bytes) -> bool:
    """Whether one complete typed message is a simple-query COMMIT (or END)."""
    if message[:1] != b"Q":
        return False
    text = message[5:].rstrip(b"\x00").strip().rstrip(b";").strip().upper()
    return text in _COMMITS


def _statement_of(message: bytes, parsed: dict[bytes, bytes]) -> bytes | None:
    """The SQL text one complete typed message carries, if any: a Query's, a Parse's, or
    for a Bind the text of the statement it names, from ``parsed`` (statement name → text of
    this connection's earlier Parse messages; the caller records them)."""
    kind = message[:1]
    if kind == b"Q":
        return message[5:].rstrip(b"\x00")
    if kind == b"P":
        name_end = message.find(b"\x00", 5)
        text_end = message.find(b"\x00", name_end + 1)
        return message[name_end + 1 : text_end] if name_end >= 0 and text_end >= 0 else None
    if kind == b"B":
        portal_end = message.find(b"\x00", 5)
        name_end = message.find(b"\x00", portal_end + 1)
        if portal_end < 0 or name_end < 0:
            return None
        return parsed.get(message[portal_end + 1 : name_end])
    return None


def _parse_name(message: bytes) -> bytes:
    """The statement name of a Parse message."""
    return message[5 : message.find(b"\x00", 5)]


def _matches(text: bytes, prefix: bytes) -> bool:
    """Whether ``text`` without leading whitespace starts with ``prefix`` (already upper)."""
    return text.lstrip()[: len(prefix)].upper() == prefix


class HeldStatement(NamedTuple):
    """One held message: its connection's number (1 for the proxy's first), its type
    (``"Q"``, ``"P"`` or ``"B"``) and its statement text."""

    connection: int
    kind: str
    text: str


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Wake whoever is blocked on ``sock`` and tell the peer; never closes the descriptor
    (the relay threads do that themselves, so no thread ever uses a reused fd)."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)


class _Link:
    """One proxied connection: the two sockets and what both relay threads share."""

    def __init__(self, client: socket.socket, number: int) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.number = number
        # Taken around every send to the client, and to set `muted`: once muted, no byte
        # from the server is relayed any more.
        self.lock = threading.Lock()
        self.muted = False
        self.dead = False  # shut down by a fault or by either side
        # The client → server thread sets it before forwarding an SSL/GSSENC request; the
        # server → client thread reads the one-byte answer and sets `opaque` on S or G.
        self.awaiting_answer = False
        self.opaque = False
        self.upstream: threading.Thread | None = None
        # Statement name → text of every Parse seen, for Binds of prepared statements.
        self.parsed: dict[bytes, bytes] = {}
        # A statement was held: the client → server thread forwards nothing any more and
        # keeps the held message and whatever follows here, until the client goes away.
        self.held = bytearray()

    def kill(self) -> None:
        self.dead = True
        _shutdown(self.client)
        if self.server is not None:
            _shutdown(self.server)


class FaultProxy:
    """A threaded TCP proxy to ``target_host:target_port`` that injects connection faults."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: set[threading.Thread] = set()
        self._flowing = threading.Event()  # cleared by hold()
        self._flowing.set()
        self._closed = threading.Event()
        self._refusing = False
        self._cut_after = 0
        self._cut_instead = 0
        self._holds: dict[bytes, int] = {}  # upper-case prefix → statements left to hold
        self._held: list[HeldStatement] = []
        self._held_changed = threading.Condition(self._lock)
        #: Set whenever a statement is held (never cleared by the proxy; a test may).
        self.statement_held = threading.Event()
        self.connections = 0
        self.refused = 0
        self.upstream_failures = 0
        self.commits_seen = 0
        self.commits_cut_after = 0
        self.commits_cut_instead = 0
        self.cut_connections = 0
        self.statements_held = 0
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)  # accept() polls, so close() is noticed
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    # ------------------------------------------------------------------ public API

    def url_for(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL) with this proxy's host and port instead of its own."""
        return make_url(url).set(host=self.host, port=self.port).render_as_string(False)

    def cut_all(self) -> int:
        """Shut down every open connection, both sides; returns how many.  New connections
        are accepted as before."""
        with self._lock:
            links = [link for link in self._links if not link.dead]
            self.cut_connections += len(links)
        for link in links:
            link.kill()
        return len(links)

    def cut_after_commit(self, n: int = 1) -> None:
        """For the next ``n`` COMMITs: forward it, then cut its connection before any reply.
        Replaces what an earlier call left unused (it does not add to it)."""
        with self._lock:
            self._cut_after = n

    def cut_instead_of_commit(self, n: int = 1) -> None:
        """For the next ``n`` COMMITs: cut the connection instead of forwarding it.
        Replaces what an earlier call left unused; wins over ``cut_after_commit``."""
        with self._lock:
            self._cut_instead = n

    def disarm(self) -> None:
        """Forget COMMIT faults and statement holds not used yet."""
        with self._lock:
            self._cut_after = self._cut_instead = 0
            self._holds.clear()

    def hold_statement(self, prefix: str, n: int = 1) -> None:
        """For the next ``n`` messages carrying a statement that starts with ``prefix``
        (after leading whitespace, ASCII case ignored): keep it and everything after it on
        its connection, forward nothing more from that client (see the module docstring).
        Each prefix is armed on its own; arming the same prefix again replaces what was left
        unused (``n=0`` forgets it).  When several armed prefixes match, the one armed first
        is used."""
        key = prefix.encode().upper()
        if not key.strip():
            raise ValueError("hold_statement needs a non-blank prefix")
        if n < 0:
            raise ValueError(f"hold_statement n must be >= 0, got {n}")
        with self._lock:
            self._holds.pop(key, None)
            if n:
                self._holds[key] = n

    def wait_held(self, timeout: float | None = 5.0, count: int = 1) -> bool:
        """Wait until at least ``count`` statements have been held since this proxy
        started (``statements_held >= count``); False if ``timeout`` passed first."""
        with self._held_changed:
            return self._held_changed.wait_for(lambda: self.statements_held >= count, timeout)

    def held_statements(self) -> list[HeldStatement]:
        """Every statement held so far, oldest first."""
        with self._lock:
            return list(self._held)

    def refuse(self) -> None:
        """Reset every new connection at once, until ``accept()``."""
        with self._lock:
            self._refusing = True

    def accept(self) -> None:
        with self._lock:
            self._refusing = False

    def hold(self) -> None:
        """Stop relaying in both directions (bytes queue up) until ``release()``."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.dead)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "connections": self.connections,
                "refused": self.refused,
                "upstream_failures": self.upstream_failures,
                "commits_seen": self.commits_seen,
                "commits_cut_after": self.commits_cut_after,
                "commits_cut_instead": self.commits_cut_instead,
                "cut_connections": self.cut_connections,
                "statements_held": self.statements_held,
            }

    def close(self) -> None:
        """Stop listening, cut every connection and wait for the threads (briefly)."""
        self._closed.set()
        self._flowing.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            links, threads = list(self._links), list(self._threads)
        for link in links:
            link.kill()
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}>"

    # ------------------------------------------------------------------ machinery

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            link: _Link | None = None
            with self._lock:
                if self._refusing or self._closed.is_set():
                    self.refused += 1
                else:
                    self.connections += 1
                    link = _Link(client, self.connections)
                    self._links.add(link)
            if link is None:
                self._reset(client)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._downstream, link, f"faultproxy-c2s-{link.number}")

    def _spawn(self, target: Callable[[_Link], None], link: _Link, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, args=(link,), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        """Close with an RST (SO_LINGER 0), as a port nobody listens on would answer."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _wait_flowing(self, link: _Link) -> bool:
        """Block while held; False when the link died meanwhile."""
        while not self._flowing.wait(0.05):
            if link.dead or self._closed.is_set():
                return False
        return not link.dead

    def _downstream(self, link: _Link) -> None:
        """Client → server: connect upstream, then relay whole messages, acting on COMMITs.
        This thread owns the link: it closes both sockets once the other thread is done."""
        try:
            try:
                link.server = socket.create_connection(self.target, timeout=5)
                link.server.settimeout(None)
                link.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                with self._lock:
                    self.upstream_failures += 1
                link.dead = True
                self._reset(link.client)
                return
            if link.dead or self._closed.is_set():  # cut while we were connecting
                return
            link.upstream = self._spawn(self._upstream, link, f"faultproxy-s2c-{link.number}")
            self._relay_client(link)
        finally:
            link.kill()
            if link.upstream is not None:
                link.upstream.join(timeout=_DRAIN_SECONDS + 5)
            link.client.close()
            if link.server is not None:
                link.server.close()
            with self._lock:
                self._links.discard(link)
                self._threads.discard(threading.current_thread())

    def _relay_client(self, link: _Link) -> None:
        assert link.server is not None
        buffer = bytearray()
        startup = True
        while not link.dead:
            try:
                data = link.client.recv(_CHUNK)
            except OSError:
                return
            if not data:
                return
            if link.held:  # keep it; wait for the client to go away
                link.held += data
                continue
            if not self._wait_flowing(link):
                return
            if link.opaque:
                if not self._send(link.server, data):
                    return
                continue
            buffer += data
            out = bytearray()
            while True:
                if startup:
                    if len(buffer) < 8:
                        break
                    length, code = struct.unpack_from("!ii", buffer)
                    if length < 8:  # not the protocol we know: relay blindly from here
                        link.opaque = True
                        out += buffer
                        buffer.clear()
                        break
                    if len(buffer) < length:
                        break
                    out += buffer[:length]
                    del buffer[:length]
                    if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                        link.awaiting_answer = True  # before the server can answer
                        # Nothing else comes before the answer; the next data is either
                        # another startup message (after N) or encrypted (after S/G).
                        if not self._send(link.server, out):
                            return
                        out.clear()
                        break
                    if code == _CANCEL_REQUEST:
                        link.opaque = True
                    else:
                        startup = False
                    continue
                if len(buffer) < 5:
                    break
                (length,) = struct.unpack_from("!i", buffer, 1)
                if length < 4:
                    link.opaque = True
                    out += buffer
                    buffer.clear()
                    break
                if len(buffer) < 1 + length:
                    break
                message = bytes(buffer[: 1 + length])
                del buffer[: 1 + length]
                if message[:1] in b"QPB" and self._hold_if_armed(link, message):
                    link.held += message + buffer
                    buffer.clear()
                    break
                if _is_commit(message):
                    fault = self._commit_fault()
                    if fault is not None:
                        if out and not self._send(link.server, out):
                            return
                        self._cut_at_commit(link, message, fault)
                        return
                out += message
            if link.opaque and buffer:
                out += buffer
                buffer.clear()
            if out and not self._send(link.server, out):
                return

    def _hold_if_armed(self, link: _Link, message: bytes) -> bool:
        """Record a Parse's statement; take an armed hold matching this message's statement,
        if any, and count it.  True when the message is to be held."""
        text = _statement_of(message, link.parsed)
        if text is None:
            return False
        if message[:1] == b"P":
            link.parsed[_parse_name(message)] = text
        with self._lock:
            prefix = next((p for p in self._holds if _matches(text, p)), None)
            if prefix is None:
                return False
            if self._holds[prefix] > 1:
                self._holds[prefix] -= 1
            else:
                del self._holds[prefix]
            self.statements_held += 1
            held = HeldStatement(link.number, chr(message[0]), text.decode("utf-8", "replace"))
            self._held.append(held)
            self.statement_held.set()
            self._held_changed.notify_all()
        return True

    def _commit_fault(self) -> str | None:
        """Count a COMMIT and take the fault armed for it, if any."""
        with self._lock:
            self.commits_seen += 1
            if self._cut_instead > 0:
                self._cut_instead -= 1
                self.commits_cut_instead += 1
                return "instead"
            if self._cut_after > 0:
                self._cut_after -= 1
                self.commits_cut_after += 1
                return "after"
        return None

    def _cut_at_commit(self, link: _Link, commit: bytes, fault: str) -> None:
        assert link.server is not None
        with link.lock:  # from here on, nothing from the server reaches the client
            link.muted = True
        _shutdown(link.client)
        if fault == "after":
            # The COMMIT, then EOF (FIN, ordered after the data): the server commits, answers
            # into the void, reads EOF and ends the session.  The other thread drains and
            # discards the answer until the server closes.
            self._send(link.server, commit)
            _shutdown(link.server, socket.SHUT_WR)
            if link.upstream is not None:
                link.upstream.join(timeout=_DRAIN_SECONDS)
        link.kill()

    def _upstream(self, link: _Link) -> None:
        """Server → client: relay everything, unless the link was muted."""
        assert link.server is not None
        try:
            while True:
                try:
                    data = link.server.recv(_CHUNK)
                except OSError:
                    return
                if not data:
                    return
                if link.awaiting_answer:
                    link.awaiting_answer = False
                    if data[:1] in (b"S", b"G"):
                        link.opaque = True  # set before the client can hear the answer
                if not self._wait_flowing(link) and not link.muted:
                    return
                with link.lock:
                    if link.muted:
                        continue  # drained and thrown away
                    if not self._send(link.client, data):
                        return
        finally:
            if not link.muted:
                link.kill()
            with self._lock:
                self._threads.discard(threading.current_thread())

    @staticmethod
    def _send(sock: socket.socket, data: bytes | bytearray) -> bool:
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True
