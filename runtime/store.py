"""The rendezvous store: a small authenticated, encrypted key-value server that the trainer process hosts.

Why not torch's TCPStore: anyone who reaches its port can list the keys, read the values (the NCCL unique
id among them), write fake ones and grow the host's memory without bound. This store only talks to peers
that prove they know the group's secret token, and it bounds what any peer can make it hold or compute.

Protocol (version 1), one TCP connection per client:

    server -> client  "WSYNC-S1" ns                                       ns, nc: 32 random bytes each
    client -> server  "WSYNC-C1" nc HMAC(ka, "...client" ns nc)
    server -> client  0x00 HMAC(ka, "...server" ns nc limits) limits       (or 0x01 and close: wrong token)
    then frames, both ways:  len:u32  AES-256-GCM(key of the direction, nonce = 0:u32 counter:u64,
                                                  plaintext, associated data = len)

    ka = HKDF-SHA256(token, salt, "auth");  c2s, s2c = HKDF-SHA256(ka, salt = ns nc, "session")
    limits = max_value_bytes:u64 max_request_bytes:u64

Both sides prove knowledge of the token over fresh nonces of both (the two proofs use different labels, so
neither can be reflected as the other), and the session keys depend on both nonces, so a recorded session
replayed in a new connection fails at its first frame. The frame counters are implicit and per direction:
a frame that was altered, replayed, reordered, dropped or sent back to its sender fails authentication,
and the connection is closed. A request's plaintext is `op:u8` and a few struct fields and length-prefixed
byte strings; a reply's is `status:u8` (0 ok, 1 refused: the client raises ValueError) and the same.
Nothing is unpickled and nothing is parsed as JSON.

Threat model: an attacker with network access to the port, without the token. It may connect, send
garbage, speak torch's TCPStore protocol, open many idle connections, replay or tamper with recorded
traffic. Before the handshake a connection is read for at most the 72 bytes of the client's hello, must
finish within `handshake_timeout`, and at most `max_unauthenticated` such connections exist at once; a
new one beyond that evicts the oldest pending connection of the peer address holding the most, so one
flooding address cannot lock out the others. Failed handshakes are logged (rate-limited) with the peer
address. The token is assumed to be a high-entropy secret (the operator generates it): a weak one could
be guessed offline from a recorded handshake. Authenticated peers are members of the group and trusted
not to be malicious, but their mistakes are still bounded: a value over `max_value_bytes` or a store over
`max_total_bytes` is refused (ValueError in the client), a frame over the request limit closes the
connection, and one connection has at most one request in progress (pipelined requests wait unread).
A member that vanishes without closing its connection is found by TCP keep-alive within about 25s.

The server is one selector thread with non-blocking sockets, so that it costs the busy trainer process
one thread, not one per member; a client is a blocking socket with a per-call bound (`op_timeout`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import hmac
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from datetime import timedelta

    import torch.distributed as dist

__all__ = ["StoreAuthError", "StoreClient", "StoreServer", "StoreUnreachable"]

log = logging.getLogger("weightsync.runtime")

_SERVER_MAGIC = b"WSYNC-S1"
_CLIENT_MAGIC = b"WSYNC-C1"
_NONCE_BYTES = 32
_PROOF_BYTES = 32
_SERVER_HELLO = len(_SERVER_MAGIC) + _NONCE_BYTES
_CLIENT_HELLO = len(_CLIENT_MAGIC) + _NONCE_BYTES + _PROOF_BYTES
_ACCEPTED, _REJECTED = b"\x00", b"\x01"
_SALT = b"weightsync-store/v1"
_CLIENT_LABEL = b"weightsync-store/v1 client proof"
_SERVER_LABEL = b"weightsync-store/v1 server proof"

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_LIMITS = struct.Struct(">QQ")
_NONCE = struct.Struct(">IQ")
_WAIT = struct.Struct(">dB")
_STATS = struct.Struct(">QQQQ")
_TAG = 16  # AES-GCM's authentication tag
_ABSENT = 0xFFFFFFFF  # a length that marks a missing value in a reply

_MAX_KEY_BYTES = 8192
_REQUEST_SLACK = 1 << 20  # room for keys and headers beside the largest value
_MAX_WAIT_SECONDS = 10 * 365 * 86400.0
_CHUNK = 1 << 16  # small reads; a large frame is received straight into a buffer of its own
_BIG = 1 << 16
_BACKLOG = 4096
_READS_PER_EVENT = 16  # fairness: one busy connection does not starve the others

(_OP_SET, _OP_MULTI_SET, _OP_GET, _OP_CHECK, _OP_WAIT, _OP_ADD, _OP_DELETE, _OP_DELETE_PREFIX,
 _OP_SET_EPHEMERAL, _OP_STATS, _OP_COMPARE_SET) = range(1, 12)
_OK, _REFUSED = 0, 1
_OK_BYTE = b"\x00"


class StoreUnreachable(OSError):
    """The store did not answer: connection refused, closed or reset, or no reply within the bound."""


class StoreAuthError(StoreUnreachable):
    """The peer failed the authentication handshake: a wrong token, or not a weightsync store."""


class _ProtocolError(Exception):
    """An authenticated peer sent something the protocol does not allow."""


class _Refused(Exception):
    """A request the server refuses (over a limit); the client raises ValueError with the message."""


# ------------------------------------------------------------------------------------------ crypto
def _auth_key(token: str) -> bytes:
    if not token:
        raise ValueError("the store's token must not be empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"auth").derive(token.encode())


def _proof(auth_key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.digest(auth_key, b"".join((label, *parts)), "sha256")


def _session_keys(auth_key: bytes, server_nonce: bytes, client_nonce: bytes) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) keys: separate, so a frame cannot be reflected to its sender."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=server_nonce + client_nonce,
               info=b"session").derive(auth_key)
    return okm[:32], okm[32:]


class _Cipher:
    """One direction of a session: AES-GCM with an implicit counter nonce, so any replayed, reordered or
    dropped frame fails authentication."""

    __slots__ = ("_aead", "_count")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def _nonce(self) -> bytes:
        nonce = _NONCE.pack(0, self._count)
        self._count += 1
        return nonce

    def seal(self, plaintext: bytes) -> tuple[bytes, bytes]:
        header = _U32.pack(len(plaintext) + _TAG)
        return header, self._aead.encrypt(self._nonce(), plaintext, header)

    def open(self, frame: bytes | bytearray) -> bytes:
        with memoryview(frame) as view:
            return self._aead.decrypt(self._nonce(), view[4:], view[:4])


class _Reader:
    """Splits a byte stream into frames (header included), refusing any frame over `limit` bytes."""

    __slots__ = ("_big", "_buf", "_got", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None
        self._got = 0
        self._limit = limit

    def _size(self) -> int:
        n: int = _U32.unpack_from(self._buf)[0]
        if n <= _TAG or n > self._limit:
            raise _ProtocolError(f"a frame of {n} bytes (the limit is {self._limit})")
        return 4 + n

    def fill(self, sock: socket.socket) -> bool:
        """Receive once; False when the peer has closed the connection."""
        big = self._big
        if big is not None:
            with memoryview(big) as view:
                n = sock.recv_into(view[self._got:])
            self._got += n
            return n > 0
        data = sock.recv(_CHUNK)
        if not data:
            return False
        buf = self._buf
        buf += data
        if len(buf) >= 4:
            size = self._size()
            if size > _BIG and len(buf) < size:  # receive the rest in place: no copies of a large value
                self._big = bytearray(size)
                self._big[:len(buf)] = buf
                self._got = len(buf)
                buf.clear()
        return True

    def ready(self) -> bool:
        if self._big is not None:
            return self._got == len(self._big)
        return len(self._buf) >= 4 and len(self._buf) >= self._size()

    def frame(self) -> bytes | bytearray | None:
        big = self._big
        if big is not None:
            if self._got < len(big):
                return None
            self._big = None
            return big
        buf = self._buf
        if len(buf) < 4:
            return None
        size = self._size()
        if len(buf) < size:
            return None
        frame = bytes(buf[:size])
        del buf[:size]
        return frame


# ----------------------------------------------------------------------------------------- encoding
def _blob_parts(parts: list[bytes], items: Sequence[bytes | None]) -> list[bytes]:
    for item in items:
        if item is None:
            parts.append(_U32.pack(_ABSENT))
        else:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
    return parts


def _blobs(data: bytes, pos: int) -> list[bytes | None]:
    out: list[bytes | None] = []
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise _ProtocolError("a truncated length")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n == _ABSENT:
            out.append(None)
            continue
        if n > end - pos:
            raise _ProtocolError("a length past the end of the frame")
        out.append(data[pos:pos + n])
        pos += n
    return out


def _present(data: bytes, pos: int) -> list[bytes]:
    out = _blobs(data, pos)
    if None in out:
        raise _ProtocolError("an absent value in a request")
    return out  # type: ignore[return-value]


def _name(key: bytes) -> str:
    return repr(key.decode(errors="replace"))


def _peer(addr: Any) -> tuple[str, str]:
    """(host, "host:port") of a peer, an IPv4 client of a dual-stack socket shown as IPv4."""
    host = str(addr[0]).removeprefix("::ffff:") if isinstance(addr, tuple) else str(addr)
    port = addr[1] if isinstance(addr, tuple) and len(addr) > 1 else "?"
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RateLimited:
    """At most one warning of each kind per `interval`; the next one says how many were suppressed."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self._interval) < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (and %d more like it since the last such message)"
            args = (*args, suppressed)
        log.warning(message, *args)


# ------------------------------------------------------------------------------------------- server
class _Conn:
    __slots__ = ("addr", "closed", "ephemeral", "hello", "host", "mask", "nonce", "out", "reader", "rx", "sock",
                 "tx", "waiter")

    def __init__(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.host, self.addr = _peer(addr)
        self.nonce = os.urandom(_NONCE_BYTES)
        self.hello = bytearray()
        self.reader: _Reader | None = None  # set once authenticated
        self.rx: _Cipher | None = None
        self.tx: _Cipher | None = None
        self.out: collections.deque[memoryview] = collections.deque()
        self.waiter: _Waiter | None = None
        self.ephemeral: set[bytes] = set()
        self.mask = 0
        self.closed = False


class _Waiter:
    __slots__ = ("conn", "done", "keys", "missing", "want_values")

    def __init__(self, conn: _Conn, keys: list[bytes], missing: set[bytes], want_values: bool) -> None:
        self.conn = conn
        self.keys = keys
        self.missing = missing
        self.want_values = want_values
        self.done = False


_LISTENER = object()
_WAKE = object()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket: dual-stack on all interfaces for host "", else the host's own family."""
    try:
        if not host:
            if socket.has_dualstack_ipv6():
                try:
                    return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                                backlog=_BACKLOG)
                except OSError as err:  # a host without IPv6 addresses: IPv4 only
                    if err.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        raise
            return socket.create_server(("", port), backlog=_BACKLOG)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=_BACKLOG)
    except OSError as err:
        raise OSError(err.errno, f"cannot listen on port {port} (host {host or '*'}): {err.strerror or err}") \
            from err


def _keepalive(sock: socket.socket) -> None:
    """Find a member whose host vanished without closing its connection (its ephemeral keys then go)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class StoreServer:
    """The store, serving on a daemon thread from construction until `close()`."""

    def __init__(self, port: int, token: str, *, host: str = "", max_value_bytes: int = 64 << 20,
                 max_total_bytes: int = 4 << 30, handshake_timeout: float = 5.0,
                 max_unauthenticated: int = 64) -> None:
        if not 0 < max_value_bytes <= 0xFFFFFFFF - _REQUEST_SLACK - _TAG - 1:
            raise ValueError(f"max_value_bytes must be between 1 and about 4 GiB, not {max_value_bytes}")
        if max_total_bytes < 0 or handshake_timeout <= 0 or max_unauthenticated < 1:
            raise ValueError("max_total_bytes must be >= 0, handshake_timeout > 0 and max_unauthenticated >= 1")
        self._auth_key = _auth_key(token)
        self._max_value = max_value_bytes
        self._max_request = max_value_bytes + _REQUEST_SLACK
        self._max_total = max_total_bytes
        self._limits = _LIMITS.pack(self._max_value, self._max_request)
        self._handshake_timeout = handshake_timeout
        self._max_pending = max_unauthenticated

        self._data: dict[bytes, bytes] = {}
        self._value_bytes = 0
        self._key_bytes = 0
        self._owners: dict[bytes, _Conn] = {}  # ephemeral key -> the connection whose closing deletes it
        self._waiting: dict[bytes, set[_Waiter]] = {}
        self._n_waiters = 0
        self._timers: list[tuple[float, int, _Conn | _Waiter]] = []
        self._live_timers = 0
        self._seq = 0
        self._pending: dict[str, dict[_Conn, None]] = {}  # peer host -> its handshakes, oldest first
        self._n_pending = 0
        self._n_authed = 0
        self._ready: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._refusals = _RateLimited(5.0)
        self._ops: dict[int, Callable[[_Conn, bytes], bytes | None]] = {
            _OP_SET: self._op_set, _OP_MULTI_SET: self._op_multi_set, _OP_GET: self._op_get,
            _OP_CHECK: self._op_check, _OP_WAIT: self._op_wait, _OP_ADD: self._op_add,
            _OP_DELETE: self._op_delete, _OP_DELETE_PREFIX: self._op_delete_prefix,
            _OP_SET_EPHEMERAL: self._op_set_ephemeral, _OP_STATS: self._op_stats,
            _OP_COMPARE_SET: self._op_compare_set,
        }

        self._listener = _listen(host, port)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._accept_paused_until = 0.0
        self._closing = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"weightsync-store-{self.port}", daemon=True)
        self._thread.start()

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """Keys, total value bytes, authenticated connections, and pending waits."""
        return {"keys": len(self._data), "bytes": self._value_bytes, "connections": self._n_authed,
                "waiters": self._n_waiters}

    def close(self) -> None:
        """Stop serving and close every connection; idempotent."""
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)

    # ------------------------------------------------------------------------------------- the loop
    def _serve(self) -> None:
        try:
            while not self._closing:
                try:
                    self._turn()
                except Exception:  # a bug of ours must not end serving for every member
                    log.exception("weightsync store: unexpected error in the server loop")
        finally:
            self._shutdown()

    def _turn(self) -> None:
        wake_at = min(self._timers[0][0] if self._timers else float("inf"), self._accept_paused_until or float("inf"))
        timeout = max(wake_at - time.monotonic(), 0.0) if wake_at != float("inf") else None
        for key, mask in self._sel.select(timeout):
            item = key.data
            if item is _LISTENER:
                self._accept()
            elif item is _WAKE:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            elif isinstance(item, _Conn) and not item.closed:
                self._guard(item, self._on_event, mask)
        self._fire_timers()
        while self._ready:
            conn = self._ready.pop()
            if not conn.closed:
                self._guard(conn, self._drain)
        if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)

    def _guard(self, conn: _Conn, fn: Callable[..., None], *args: int) -> None:
        """Run one connection's handler: whatever its peer sent, only that connection can fail."""
        try:
            fn(conn, *args)
        except (InvalidTag, _ProtocolError) as err:
            detail = "a frame failed authentication (tampered, replayed or reordered)" \
                if isinstance(err, InvalidTag) else str(err)
            self._refusals.warning("frame", "weightsync store: closed the connection of %s: %s", conn.addr,
                                   detail)
            self._drop(conn)
        except OSError:  # reset, broken pipe: the peer is gone
            self._drop(conn)
        except Exception:
            log.exception("weightsync store: closed the connection of %s after an unexpected error", conn.addr)
            self._drop(conn)

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # ------------------------------------------------------------------------------------ accepting
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:  # out of file descriptors: stop accepting for a moment instead of spinning
                self._refusals.warning("accept", "weightsync store: cannot accept connections: %s", err)
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            conn = _Conn(sock, addr)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.send(_SERVER_MAGIC + conn.nonce)  # fits any fresh socket's send buffer
            except OSError:
                sock.close()
                continue
            if self._n_pending >= self._max_pending:
                busiest = max(self._pending.values(), key=len)
                victim = next(iter(busiest))
                self._refusals.warning("evict", "weightsync store: %d connections are pending authentication; "
                                       "closed the oldest of %s", self._n_pending, victim.addr)
                self._drop(victim)
            self._conns.add(conn)
            self._pending.setdefault(conn.host, {})[conn] = None
            self._n_pending += 1
            self._push_timer(time.monotonic() + self._handshake_timeout, conn)
            self._set_mask(conn, selectors.EVENT_READ)

    def _handshake(self, conn: _Conn) -> None:
        data = conn.sock.recv(_CLIENT_HELLO - len(conn.hello))  # never more than the hello before auth
        if not data:
            if conn.hello:
                self._refusals.warning("closed", "weightsync store: %s closed its connection during the handshake",
                                       conn.addr)
            self._drop(conn)
            return
        hello = conn.hello
        hello += data
        magic = len(_CLIENT_MAGIC)
        if hello[:magic] != _CLIENT_MAGIC[:len(hello)]:
            self._refusals.warning("protocol", "weightsync store: rejected %s: it does not speak the weightsync "
                                   "store protocol", conn.addr)
            self._drop(conn)
            return
        if len(hello) < _CLIENT_HELLO:
            return
        client_nonce = bytes(hello[magic:magic + _NONCE_BYTES])
        expected = _proof(self._auth_key, _CLIENT_LABEL, conn.nonce, client_nonce)
        if not hmac.compare_digest(expected, bytes(hello[magic + _NONCE_BYTES:])):
            self._refusals.warning("token", "weightsync store: rejected %s: failed authentication (wrong token)",
                                   conn.addr)
            with contextlib.suppress(OSError):
                conn.sock.send(_REJECTED)
            self._drop(conn)
            return
        c2s, s2c = _session_keys(self._auth_key, conn.nonce, client_nonce)
        conn.sock.send(_ACCEPTED + _proof(self._auth_key, _SERVER_LABEL, conn.nonce, client_nonce, self._limits)
                       + self._limits)
        self._unpend(conn)
        conn.rx, conn.tx = _Cipher(c2s), _Cipher(s2c)
        conn.reader = _Reader(self._max_request + _TAG)
        conn.hello = bytearray()
        self._n_authed += 1
        _keepalive(conn.sock)

    def _unpend(self, conn: _Conn) -> None:
        conns = self._pending.get(conn.host)
        if conns is not None and conn in conns:
            del conns[conn]
            self._n_pending -= 1
            self._live_timers -= 1
            if not conns:
                del self._pending[conn.host]

    # -------------------------------------------------------------------------------- connections
    def _on_event(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
            if not conn.out and not conn.closed:
                self._drain(conn)
        if not mask & selectors.EVENT_READ or conn.closed:
            return
        reader = conn.reader
        if reader is None:
            self._handshake(conn)
            return
        for _ in range(_READS_PER_EVENT):
            try:
                if not reader.fill(conn.sock):
                    self._drop(conn)
                    return
            except (BlockingIOError, InterruptedError):
                break
            if reader.ready():
                break
        self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        """Answer the buffered requests, one at a time: the next waits until the last reply is sent."""
        reader, rx = conn.reader, conn.rx
        if reader is None or rx is None:
            return
        while conn.waiter is None and not conn.out and not conn.closed:
            frame = reader.frame()
            if frame is None:
                break
            plaintext = rx.open(frame)
            op = self._ops.get(plaintext[0]) if plaintext else None
            if op is None:
                raise _ProtocolError("an unknown request")
            try:
                reply = op(conn, plaintext)
            except _Refused as err:
                reply = bytes((_REFUSED,)) + str(err).encode()
            if reply is not None:
                self._send(conn, reply)
        self._update_mask(conn)

    def _send(self, conn: _Conn, plaintext: bytes) -> None:
        assert conn.tx is not None
        header, body = conn.tx.seal(plaintext)
        if len(body) <= _BIG:
            conn.out.append(memoryview(header + body))
        else:
            conn.out.extend((memoryview(header), memoryview(body)))
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        while out:
            try:
                n = conn.sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                break
            if n < len(out[0]):
                out[0] = out[0][n:]
                break
            out.popleft()
        self._update_mask(conn)

    def _update_mask(self, conn: _Conn) -> None:
        if conn.closed or conn.reader is None:
            return
        busy = conn.waiter is not None or bool(conn.out)
        # A client with a request in progress and another one already read is not read further, which
        # bounds what it can make the server buffer; it is read again once its reply is out.
        mask = 0 if busy and conn.reader.ready() else selectors.EVENT_READ
        if conn.out:
            mask |= selectors.EVENT_WRITE
        self._set_mask(conn, mask)

    def _set_mask(self, conn: _Conn, mask: int) -> None:
        if mask == conn.mask:
            return
        if conn.mask == 0:
            self._sel.register(conn.sock, mask, conn)
        elif mask == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, mask, conn)
        conn.mask = mask

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if conn.mask:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        conn.out.clear()
        if conn.reader is None:
            self._unpend(conn)
        else:
            self._n_authed -= 1
        if conn.waiter is not None:
            self._end_wait(conn.waiter)
        gone = [k for k in conn.ephemeral if self._owners.get(k) is conn]
        conn.ephemeral.clear()
        self._delete(gone)

    # ----------------------------------------------------------------------------------------- timers
    def _push_timer(self, deadline: float, item: _Conn | _Waiter) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, item))
        self._live_timers += 1

    def _fire_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            item = heapq.heappop(timers)[2]
            if isinstance(item, _Waiter):
                if not item.done:
                    self._finish_wait(item, False)
            elif not item.closed and item.reader is None:
                self._refusals.warning("timeout", "weightsync store: closed %s: no authentication within %.1fs",
                                       item.addr, self._handshake_timeout)
                self._drop(item)
        # Waits that ended early leave their entries behind; drop them once they are most of the heap.
        if len(timers) > 1024 and len(timers) > 2 * self._live_timers:
            self._timers = [t for t in timers if self._timer_live(t[2])]
            heapq.heapify(self._timers)

    @staticmethod
    def _timer_live(item: _Conn | _Waiter) -> bool:
        if isinstance(item, _Waiter):
            return not item.done
        return not item.closed and item.reader is None

    # --------------------------------------------------------------------------------------- the data
    def _check_room(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        grow = 0
        for key, value in items:
            if len(key) > _MAX_KEY_BYTES:
                raise _Refused(f"key {_name(key[:64])}... is {len(key)} bytes, over the store's limit of "
                               f"{_MAX_KEY_BYTES} bytes")
            if len(value) > self._max_value:
                raise _Refused(f"value for key {_name(key)} is {len(value)} bytes, over the store's limit "
                               f"of {self._max_value} bytes per value (max_value_bytes)")
            old = self._data.get(key)
            grow += len(value) - len(old) if old is not None else len(key) + len(value)
        total = self._value_bytes + self._key_bytes + grow
        if grow > 0 and total > self._max_total:
            raise _Refused(f"storing key {_name(items[-1][0])} would bring the store to {total} bytes, over its "
                           f"limit of {self._max_total} bytes (max_total_bytes)")

    def _put(self, items: Sequence[tuple[bytes, bytes]], owner: _Conn | None) -> None:
        self._check_room(items)
        data, owners = self._data, self._owners
        for key, value in items:
            old = data.get(key)
            if old is None:
                self._key_bytes += len(key)
            else:
                self._value_bytes -= len(old)
            data[key] = value
            self._value_bytes += len(value)
            previous = owners.pop(key, None) if owners else None
            if previous is not None and previous is not owner:
                previous.ephemeral.discard(key)
            if owner is not None:
                owners[key] = owner
                owner.ephemeral.add(key)
            if key in self._waiting:
                self._wake(key)

    def _delete(self, keys: Sequence[bytes]) -> int:
        count = 0
        for key in keys:
            value = self._data.pop(key, None)
            if value is None:
                continue
            count += 1
            self._value_bytes -= len(value)
            self._key_bytes -= len(key)
            owner = self._owners.pop(key, None)
            if owner is not None:
                owner.ephemeral.discard(key)
        return count

    def _wake(self, key: bytes) -> None:
        for waiter in self._waiting.pop(key, ()):
            waiter.missing.discard(key)
            if not waiter.missing:
                # A key seen earlier may have been deleted since: the wait ends only when all exist at once.
                waiter.missing = {k for k in waiter.keys if k not in self._data}
                if waiter.missing:
                    for k in waiter.missing:
                        self._waiting.setdefault(k, set()).add(waiter)
                else:
                    self._finish_wait(waiter, True)

    def _end_wait(self, waiter: _Waiter) -> None:
        waiter.done = True
        waiter.conn.waiter = None
        self._n_waiters -= 1
        self._live_timers -= 1
        for key in waiter.missing:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiting[key]

    def _finish_wait(self, waiter: _Waiter, found: bool) -> None:
        self._end_wait(waiter)
        conn = waiter.conn
        if conn.closed:
            return
        if not found:
            reply = b"\x00\x00"
        elif waiter.want_values:
            reply = self._values_reply(waiter.keys, b"\x00\x01")
        else:
            reply = b"\x00\x01"
        try:
            self._send(conn, reply)
        except OSError:
            self._drop(conn)
            return
        self._ready.append(conn)  # its next request, if already read

    def _values_reply(self, keys: Sequence[bytes], head: bytes) -> bytes:
        values = [self._data.get(k) for k in keys]
        size = sum(len(v) for v in values if v is not None) + 4 * len(values)
        if size > self._max_request:
            return bytes((_REFUSED,)) + (f"the values of {len(keys)} keys add up to {size} bytes, over the "
                                         f"store's limit of {self._max_request} bytes per reply").encode()
        return b"".join(_blob_parts([head], values))

    # ---------------------------------------------------------------------------------- the requests
    @staticmethod
    def _pairs(plaintext: bytes) -> list[tuple[bytes, bytes]]:
        blobs = _present(plaintext, 1)
        if len(blobs) % 2:
            raise _ProtocolError("a key without a value")
        return list(zip(blobs[0::2], blobs[1::2], strict=True))

    def _op_set(self, conn: _Conn, plaintext: bytes) -> bytes:
        self._put(self._pairs(plaintext), None)
        return _OK_BYTE

    _op_multi_set = _op_set

    def _op_set_ephemeral(self, conn: _Conn, plaintext: bytes) -> bytes:
        self._put(self._pairs(plaintext), conn)
        return _OK_BYTE

    def _op_get(self, conn: _Conn, plaintext: bytes) -> bytes:
        return self._values_reply(_present(plaintext, 1), _OK_BYTE)

    def _op_check(self, conn: _Conn, plaintext: bytes) -> bytes:
        data = self._data
        return b"\x00\x01" if all(k in data for k in _present(plaintext, 1)) else b"\x00\x00"

    def _op_wait(self, conn: _Conn, plaintext: bytes) -> bytes | None:
        if len(plaintext) < 1 + _WAIT.size:
            raise _ProtocolError("a truncated wait")
        timeout, want_values = _WAIT.unpack_from(plaintext, 1)
        keys = _present(plaintext, 1 + _WAIT.size)
        missing = {k for k in keys if k not in self._data}
        if not missing:
            return self._values_reply(keys, b"\x00\x01") if want_values else b"\x00\x01"
        if not timeout > 0:  # NaN too
            return b"\x00\x00"
        waiter = _Waiter(conn, keys, missing, bool(want_values))
        conn.waiter = waiter
        self._n_waiters += 1
        for key in missing:
            self._waiting.setdefault(key, set()).add(waiter)
        self._push_timer(time.monotonic() + min(timeout, _MAX_WAIT_SECONDS), waiter)
        return None

    def _op_add(self, conn: _Conn, plaintext: bytes) -> bytes:
        if len(plaintext) < 1 + _I64.size:
            raise _ProtocolError("a truncated add")
        (amount,) = _I64.unpack_from(plaintext, 1)
        keys = _present(plaintext, 1 + _I64.size)
        if len(keys) != 1:
            raise _ProtocolError("an add of several keys")
        key = keys[0]
        current = self._data.get(key)
        try:
            value = int(current) if current is not None else 0
        except ValueError:
            raise _Refused(f"key {_name(key)} holds a value that is not an integer") from None
        value += amount
        if not -(1 << 63) <= value < 1 << 63:
            raise _Refused(f"adding {amount} to key {_name(key)} overflows a 64-bit integer")
        self._put([(key, str(value).encode())], None)
        return _OK_BYTE + _I64.pack(value)

    def _op_delete(self, conn: _Conn, plaintext: bytes) -> bytes:
        return _OK_BYTE + _U64.pack(self._delete(_present(plaintext, 1)))

    def _op_delete_prefix(self, conn: _Conn, plaintext: bytes) -> bytes:
        prefixes = _present(plaintext, 1)
        if len(prefixes) != 1:
            raise _ProtocolError("a delete of several prefixes")
        prefix = prefixes[0]
        return _OK_BYTE + _U64.pack(self._delete([k for k in self._data if k.startswith(prefix)]))

    def _op_stats(self, conn: _Conn, plaintext: bytes) -> bytes:
        return _OK_BYTE + _STATS.pack(len(self._data), self._value_bytes, self._n_authed, self._n_waiters)

    def _op_compare_set(self, conn: _Conn, plaintext: bytes) -> bytes:
        blobs = _present(plaintext, 1)
        if len(blobs) != 3:
            raise _ProtocolError("a compare-and-set without key, expected and desired values")
        key, expected, desired = blobs
        current = self._data.get(key)
        # c10d's semantics: a missing key counts as the empty value; the reply is the value now stored.
        if (current if current is not None else b"") == expected:
            self._put([(key, desired)], None)
            return b"".join(_blob_parts([_OK_BYTE], [desired]))
        return b"".join(_blob_parts([_OK_BYTE], [current if current is not None else expected]))


# ------------------------------------------------------------------------------------------- client
def _wait_seconds(timeout: float) -> float:
    """A wait's length as the server treats it: NaN and negatives are 0, and forever is ten years."""
    return min(timeout, _MAX_WAIT_SECONDS) if timeout > 0 else 0.0


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed during the handshake")
        data += chunk
    return bytes(data)


class _Owed:
    """A request sent before the replies of earlier ones were read: its reply, once read, or its failure.
    (A plain class: this module is also loaded by path, outside the package, where dataclasses cannot
    resolve it.)"""

    __slots__ = ("due", "error", "reply")

    def __init__(self, due: tuple[float, float]) -> None:
        self.due = due  # the reply's deadline, and its bound for the message
        self.reply: bytes | None = None
        self.error: StoreUnreachable | None = None


class StoreClient:
    """One authenticated connection to the store. Thread-safe: requests are serialized, so a blocking
    `wait()` holds this client until it ends; use a client of its own for waits that may last."""

    def __init__(self, sock: socket.socket, address: str, rx: _Cipher, tx: _Cipher, limits: tuple[int, int],
                 op_timeout: float, reconnect: Callable[[], StoreClient]) -> None:
        """Use `connect()`."""
        self.address = address
        self._sock: socket.socket | None = sock
        self._rx, self._tx = rx, tx
        self._max_value, self._max_request = limits
        self._reader = _Reader(self._max_request + _TAG)
        self._op_timeout = op_timeout
        self._reconnect = reconnect
        self._lock = threading.Lock()
        self._closed = False
        self._c10d: Any = None
        self._clones: list[StoreClient] = []
        self._owed: collections.deque[_Owed] = collections.deque()

    @classmethod
    def connect(cls, host: str, port: int, token: str, timeout: float, *, attempt_timeout: float = 2.0,
                op_timeout: float = 30.0) -> StoreClient:
        """Connect and authenticate, retrying refused, unresolvable or unanswered attempts until `timeout`
        (a DNS name may resolve before its port listens). A failed authentication raises at once."""
        auth_key = _auth_key(token)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        deadline = time.monotonic() + timeout
        delay = 0.01
        last: OSError | None = None

        def reconnect() -> StoreClient:
            return cls.connect(host, port, token, timeout, attempt_timeout=attempt_timeout, op_timeout=op_timeout)

        while True:
            attempt = max(min(attempt_timeout, deadline - time.monotonic()), 0.05)
            try:
                return cls._attempt(host, port, address, auth_key, attempt, op_timeout, reconnect)
            except StoreAuthError:
                raise
            except OSError as err:  # refused, unresolvable, timed out, closed before the handshake ended
                last = err
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnreachable(f"no weightsync store answered at {address} within {timeout:.1f}s "
                                       f"(last attempt: {last or type(last).__name__})")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)

    @classmethod
    def _attempt(cls, host: str, port: int, address: str, auth_key: bytes, attempt: float, op_timeout: float,
                 reconnect: Callable[[], StoreClient]) -> StoreClient:
        deadline = time.monotonic() + attempt
        sock = socket.create_connection((host, port), timeout=attempt)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _recv_exact(sock, _SERVER_HELLO, deadline)
            if hello[:len(_SERVER_MAGIC)] != _SERVER_MAGIC:
                raise StoreAuthError(f"{address} is not a weightsync store (it greeted with another protocol)")
            server_nonce = hello[len(_SERVER_MAGIC):]
            client_nonce = os.urandom(_NONCE_BYTES)
            sock.sendall(_CLIENT_MAGIC + client_nonce + _proof(auth_key, _CLIENT_LABEL, server_nonce, client_nonce))
            status = _recv_exact(sock, 1, deadline)
            if status == _REJECTED:
                raise StoreAuthError(f"the weightsync store at {address} rejected this client's token")
            if status != _ACCEPTED:
                raise StoreAuthError(f"{address} is not a weightsync store (it answered the handshake oddly)")
            answer = _recv_exact(sock, _PROOF_BYTES + _LIMITS.size, deadline)
            limits = answer[_PROOF_BYTES:]
            expected = _proof(auth_key, _SERVER_LABEL, server_nonce, client_nonce, limits)
            if not hmac.compare_digest(expected, answer[:_PROOF_BYTES]):
                raise StoreAuthError(f"the server at {address} does not know the group's token: not our store")
            c2s, s2c = _session_keys(auth_key, server_nonce, client_nonce)
            max_value, max_request = _LIMITS.unpack(limits)
        except BaseException:
            sock.close()
            raise
        return cls(sock, address, _Cipher(s2c), _Cipher(c2s), (max_value, max_request), op_timeout, reconnect)

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def usable(self) -> bool:
        """False once closed, or abandoned after a failed request: every call would raise StoreUnreachable."""
        return self._sock is not None

    def close(self) -> None:
        """Close the connection (its ephemeral keys go); a call in progress on another thread raises
        StoreUnreachable."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in a wait on this client
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        for clone in self._clones:
            clone.close()

    # ---------------------------------------------------------------------------------- the requests
    # The server answers one connection's requests in order, so a request may be sent before the replies of
    # earlier ones are read (`_later`): those replies are read first, in order, by whichever call comes next.
    def _call(self, parts: list[bytes], extra: float = 0.0) -> bytes:
        with self._lock:
            owed = self._send_owed(parts, extra)
            self._settle(owed)
        return self._result(owed)

    def _later(self, parts: list[bytes], extra: float = 0.0) -> _Owed:
        """Send a request now; its reply is read by `_owed_reply(owed)` (or by any later call first)."""
        with self._lock:
            return self._send_owed(parts, extra)

    def _send_owed(self, parts: list[bytes], extra: float) -> _Owed:
        """Send one request, its reply owed in the queue from before its first byte is sent (the lock held):
        a call interrupted (KeyboardInterrupt, a pod's SIGTERM) after sending leaves its reply to be read and
        set aside by the next call, never taken by it as its own."""
        owed = _Owed((0.0, 0.0))  # a reply due at once: one still unsent when interrupted ends the link
        self._owed.append(owed)
        try:
            owed.due = self._send_request(parts, extra)
        except BaseException as err:
            if self._owed and self._owed[-1] is owed:
                self._owed.pop()
            if isinstance(err, ValueError):
                raise  # refused before anything was sent (over a limit): nothing is owed
            if not isinstance(err, StoreUnreachable):
                self._abandon()  # interrupted while sending: the stream's position is unknown
            self._fail_owed(StoreUnreachable(f"the connection to the store at {self.address} broke in the "
                                             f"middle of a request ({type(err).__name__})"))
            raise
        return owed

    def _fail_owed(self, err: StoreUnreachable) -> None:
        for left in self._owed:
            left.error = err
        self._owed.clear()

    def _owed_reply(self, owed: _Owed) -> bytes:
        with self._lock:
            self._settle(owed)
        return self._result(owed)

    def _result(self, owed: _Owed) -> bytes:
        """A settled request's reply, checked; or its failure."""
        if owed.error is not None:
            raise owed.error
        assert owed.reply is not None
        return self._checked(owed.reply)

    def _settle(self, until: _Owed | None) -> None:
        """Read the replies still owed to earlier `_later` requests, in order: all of them, or up to `until`.
        A failure ends the connection, and every reply still owed fails with it. Holds the lock."""
        while self._owed and (until is None or (until.reply is None and until.error is None)):
            owed = self._owed[0]
            try:
                owed.reply = self._read_reply(owed.due)
            except StoreUnreachable as err:
                self._fail_owed(err)
                if until is None:
                    raise
                return
            self._owed.popleft()

    def _send_request(self, parts: list[bytes], extra: float) -> tuple[float, float]:
        """Seal and send one request (the lock held); (its reply's deadline, the bound) for `_read_reply`."""
        plaintext = b"".join(parts)
        if len(plaintext) > self._max_request:
            raise ValueError(f"a request of {len(plaintext)} bytes is over the store's limit of "
                             f"{self._max_request} bytes")
        bound = self._op_timeout + extra
        sock = self._sock
        if sock is None:
            raise StoreUnreachable(f"the connection to the store at {self.address} is closed"
                                   + ("" if self._closed else " after an earlier failure"))
        try:
            sock.settimeout(bound)
            header, body = self._tx.seal(plaintext)
            if len(body) <= _BIG:
                sock.sendall(header + body)
            else:
                sock.sendall(header)
                sock.sendall(body)
        except TimeoutError as err:
            self._abandon()
            raise StoreUnreachable(f"the store at {self.address} did not take a request within {bound:.1f}s") \
                from err
        except OSError as err:
            self._abandon()
            raise StoreUnreachable(f"the store at {self.address} stopped answering: {err or repr(err)}") from err
        return time.monotonic() + bound, bound

    def _read_reply(self, due: tuple[float, float]) -> bytes:
        """The next reply on the connection, authenticated (the lock held)."""
        deadline, bound = due
        sock = self._sock
        if sock is None:
            raise StoreUnreachable(f"the connection to the store at {self.address} is closed"
                                   + ("" if self._closed else " after an earlier failure"))
        try:
            reader = self._reader
            while (frame := reader.frame()) is None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                if not reader.fill(sock):
                    raise ConnectionError("it closed the connection")
            return self._rx.open(frame)
        except TimeoutError as err:
            self._abandon()
            raise StoreUnreachable(f"the store at {self.address} did not answer within {bound:.1f}s") from err
        except (OSError, InvalidTag, _ProtocolError) as err:
            self._abandon()
            what = "a reply failed authentication" if isinstance(err, InvalidTag) else str(err) or repr(err)
            raise StoreUnreachable(f"the store at {self.address} stopped answering: {what}") from err

    def _checked(self, reply: bytes) -> bytes:
        if reply[:1] == _OK_BYTE:
            return reply
        if reply[:1] == bytes((_REFUSED,)):
            raise ValueError(reply[1:].decode(errors="replace"))
        raise self._malformed()

    def _malformed(self) -> StoreUnreachable:
        """A reply of the wrong shape means the two ends are out of step: this connection is done."""
        with self._lock:
            self._abandon()
            self._fail_owed(StoreUnreachable(f"the connection to the store at {self.address} is closed after a "
                                             "malformed reply"))
        return StoreUnreachable(f"the store at {self.address} sent a malformed reply")

    def _abandon(self) -> None:
        """After a failed call the stream's position is unknown: this client is done."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _item_parts(self, op: int, items: Sequence[tuple[str, bytes]]) -> list[bytes]:
        parts = [bytes((op,))]
        for key, value in items:
            if len(value) > self._max_value:
                raise ValueError(f"value for key {key!r} is {len(value)} bytes, over the store's limit of "
                                 f"{self._max_value} bytes per value")
            _blob_parts(parts, (key.encode(), bytes(value)))
        return parts

    @staticmethod
    def _key_parts(op: int, keys: Sequence[str], head: bytes = b"") -> list[bytes]:
        return _blob_parts([bytes((op,)) + head], [k.encode() for k in keys])

    def set(self, key: str, value: bytes) -> None:
        self._call(self._item_parts(_OP_SET, [(key, value)]))

    def multi_set(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Every item in one round trip; all are stored or (over a limit) none."""
        self._call(self._item_parts(_OP_MULTI_SET, items))

    def multi_set_later(self, items: Sequence[tuple[str, bytes]]) -> Callable[[], None]:
        """`multi_set`, with its reply read when the returned function is called: the caller does other work
        meanwhile. Until then, any other call on this client reads that reply first."""
        owed = self._later(self._item_parts(_OP_MULTI_SET, items))

        def done() -> None:
            self._owed_reply(owed)
        return done

    def set_ephemeral(self, key: str, value: bytes) -> None:
        """Like `set`, but the server deletes the key when this connection closes (or its process dies)."""
        self._call(self._item_parts(_OP_SET_EPHEMERAL, [(key, value)]))

    def get(self, key: str) -> bytes | None:
        """The value, or None when the key is absent; never blocks."""
        return self.multi_get([key])[0]

    def multi_get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._values(self._call(self._key_parts(_OP_GET, keys)), 1, len(keys))

    def _values(self, reply: bytes, pos: int, n: int) -> list[bytes | None]:
        try:
            values = _blobs(reply, pos)
        except _ProtocolError as err:
            raise self._malformed() from err
        if len(values) != n:
            raise self._malformed()
        return values

    def check(self, keys: Sequence[str]) -> bool:
        """Whether every key exists."""
        return self._call(self._key_parts(_OP_CHECK, keys))[1:2] == b"\x01"

    def wait(self, keys: Sequence[str], timeout: float) -> bool:
        """Block in the server until every key exists (True) or `timeout` seconds pass (False)."""
        seconds = _wait_seconds(timeout)
        reply = self._call(self._key_parts(_OP_WAIT, keys, _WAIT.pack(seconds, 0)), seconds)
        return reply[1:2] == b"\x01"

    def wait_get(self, keys: Sequence[str], timeout: float) -> list[bytes] | None:
        """Like `wait`, then the values, in one round trip; None on time-out."""
        seconds = _wait_seconds(timeout)
        reply = self._call(self._key_parts(_OP_WAIT, keys, _WAIT.pack(seconds, 1)), seconds)
        return self._waited(reply, len(keys))

    def wait_get_later(self, keys: Sequence[str], timeout: float) -> Callable[[], list[bytes] | None]:
        """`wait_get`, its result read when the returned function is called (`multi_set_later`). The wait
        runs in the server meanwhile; any other call on this client first waits for it to end."""
        seconds = _wait_seconds(timeout)
        owed = self._later(self._key_parts(_OP_WAIT, keys, _WAIT.pack(seconds, 1)), seconds)
        return lambda: self._waited(self._owed_reply(owed), len(keys))

    def _waited(self, reply: bytes, n: int) -> list[bytes] | None:
        if reply[1:2] != b"\x01":
            return None
        values = self._values(reply, 2, n)
        return [v if v is not None else b"" for v in values]

    def add(self, key: str, amount: int) -> int:
        """Add to an integer counter (stored as decimal ASCII; a missing key counts as 0); the new value."""
        if not -(1 << 63) <= amount < 1 << 63:
            raise ValueError(f"add of {amount} to key {key!r}: not a 64-bit integer")
        reply = self._call(self._key_parts(_OP_ADD, [key], _I64.pack(amount)))
        return int(_I64.unpack_from(reply, 1)[0])

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Store `desired` if the value is `expected` (a missing key counts as b""); the value now stored
        (c10d's semantics: `expected` itself when the key is missing and `expected` is not empty)."""
        for value in (expected, desired):
            if len(value) > self._max_value:
                raise ValueError(f"value for key {key!r} is {len(value)} bytes, over the store's limit of "
                                 f"{self._max_value} bytes per value")
        reply = self._call(_blob_parts([bytes((_OP_COMPARE_SET,))], [key.encode(), bytes(expected),
                                                                      bytes(desired)]))
        stored = self._values(reply, 1, 1)[0]
        return stored if stored is not None else b""

    def delete(self, keys: Sequence[str]) -> int:
        """Delete keys; how many existed."""
        return int(_U64.unpack_from(self._call(self._key_parts(_OP_DELETE, keys)), 1)[0])

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with `prefix`; how many."""
        return int(_U64.unpack_from(self._call(self._key_parts(_OP_DELETE_PREFIX, [prefix])), 1)[0])

    def stats(self) -> dict[str, int]:
        """The server's `stats()`."""
        keys, nbytes, conns, waiters = _STATS.unpack_from(self._call([bytes((_OP_STATS,))]), 1)
        return {"keys": keys, "bytes": nbytes, "connections": conns, "waiters": waiters}

    # ---------------------------------------------------------------------------------------- c10d
    def c10d(self) -> dist.Store:
        """A torch.distributed.Store over this client, for dist.PrefixStore and dist.ProcessGroupGloo. Its
        get() blocks until the key exists or the store's timeout passes (torch's default: 5 minutes; see
        `set_timeout`), then raises DistStoreError; calls share this client's lock and its `op_timeout`
        bound. list_keys and the queue calls are not supported. It lives as long as this client, which must
        be kept while torch uses it."""
        if self._c10d is None:
            self._c10d = _c10d_class()(self)
        store: dist.Store = self._c10d
        return store

    def _clone(self) -> StoreClient:
        """A second connection of the same kind (torch's Store.clone())."""
        clone = self._reconnect()
        self._clones.append(clone)
        return clone


_C10D_CLASS: type | None = None


def _c10d_class() -> type:
    """The torch.distributed.Store subclass, defined on first use so the store itself needs no torch."""
    global _C10D_CLASS
    if _C10D_CLASS is not None:
        return _C10D_CLASS
    import torch.distributed as dist

    def _bytes(value: str | bytes) -> bytes:
        return value.encode() if isinstance(value, str) else bytes(value)

    class C10dStore(dist.Store):
        """c10d's Store interface over a StoreClient (torch calls these from C++, by these names)."""

        def __init__(self, client: StoreClient) -> None:
            super().__init__()
            self._client = client

        def _timed_out(self, keys: Sequence[str], seconds: float) -> Exception:
            return dist.DistStoreError(f"timed out after {seconds:.1f}s waiting for key(s) {', '.join(keys)} in "
                                       f"the weightsync store at {self._client.address}")

        def _seconds(self) -> float:
            timeout: timedelta = self.timeout  # type: ignore[attr-defined]  # a property the stubs omit
            return timeout.total_seconds()

        def _wait_get(self, keys: Sequence[str]) -> list[bytes]:
            seconds = self._seconds()
            values = self._client.wait_get(keys, seconds)
            if values is None:
                raise self._timed_out(keys, seconds)
            return values

        def set(self, key: str, value: str | bytes) -> None:
            self._client.set(key, _bytes(value))

        def get(self, key: str) -> bytes:
            return self._wait_get([key])[0]

        def multi_get(self, keys: list[str]) -> list[bytes]:
            return self._wait_get(keys)

        def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
            self._client.multi_set([(k, _bytes(v)) for k, v in zip(keys, values, strict=True)])

        def add(self, key: str, value: int) -> int:
            return self._client.add(key, value)

        def check(self, keys: list[str]) -> bool:
            return self._client.check(keys)

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
            seconds = timeout.total_seconds() if timeout is not None else self._seconds()
            if not self._client.wait(keys, seconds):
                raise self._timed_out(keys, seconds)

        def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
            return self._client.compare_set(key, _bytes(expected_value), _bytes(desired_value))

        def deleteKey(self, key: str) -> bool:  # the C++ name: torch's binding calls it
            return self._client.delete([key]) > 0

        def getNumKeys(self) -> int:
            return self._client.stats()["keys"]

        def clone(self) -> dist.Store:
            store = self._client._clone().c10d()
            store.set_timeout(self.timeout)  # type: ignore[attr-defined]
            return store

    _C10D_CLASS = C10dStore
    return C10dStore


def serve_main() -> None:
    """Serve as a process of its own (`python store.py`), started by `store_process.StoreProcess`.

    The token and settings arrive as one JSON line on stdin (never argv, which /proc shows to every user of
    the machine); the bound port, or the error, goes to stdout as one JSON line. The server ends when stdin
    closes or the parent changes (the process that started it is gone, whatever killed it)."""
    import json
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the trainer, which closes us
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parent = os.getppid()
    config = json.loads(sys.stdin.readline())
    try:
        server = StoreServer(int(config["port"]), str(config["token"]), host=str(config.get("host", "")))
    except (OSError, ValueError) as err:
        print(json.dumps({"error": str(err)}), flush=True)
        sys.exit(1)
    print(json.dumps({"port": server.port}), flush=True)
    eof = threading.Event()

    def read_until_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.read(4096):
                pass
        eof.set()

    threading.Thread(target=read_until_eof, name="weightsync-store-parent", daemon=True).start()
    while not eof.wait(1.0) and os.getppid() == parent:
        pass
    server.close()


if __name__ == "__main__":
    serve_main()
