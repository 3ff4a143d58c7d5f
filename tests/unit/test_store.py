"""The authenticated rendezvous store (runtime/store.py): its operations and bounds, and what a rogue peer
without the token can (not) do to it. Real sockets on 127.0.0.1 and real processes throughout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import weightsync.runtime.store
from weightsync.runtime.store import StoreAuthError, StoreClient, StoreServer, StoreUnreachable

TOKEN = "test-" + secrets.token_hex(16)
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------ helpers
def until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "the condition") -> None:
    """Poll `condition` until true; fail after `timeout` seconds (generous: loaded 2-core machines)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def connect(port: int, token: str = TOKEN, timeout: float = 20.0, **kwargs: float) -> StoreClient:
    return StoreClient.connect(HOST, port, token, timeout, **kwargs)


@pytest.fixture
def server() -> Iterator[StoreServer]:
    srv = StoreServer(0, TOKEN, host=HOST)
    yield srv
    srv.close()


@pytest.fixture
def client(server: StoreServer) -> Iterator[StoreClient]:
    c = connect(server.port)
    yield c
    c.close()


# Children load store.py by its path: it needs nothing else of the package, and skipping the package's
# imports (torch among them) starts them in a fraction of the time on a loaded machine.
PRELUDE = """
import importlib.util, os
_spec = importlib.util.spec_from_file_location("store", os.environ["STORE_MODULE"])
store = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(store)
"""


class Children:
    """Child processes of a test, killed at its end whatever happened."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        stderr = open(self.tmp / f"child-{len(self.procs)}.stderr", "w")  # noqa: SIM115  (closed by the child's end)
        proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "STORE_TOKEN": TOKEN, "TORCH_CPP_LOG_LEVEL": "ERROR",
                                     "STORE_MODULE": str(weightsync.runtime.store.__file__), **(env or {})})
        stderr.close()
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[str]) -> str:
        return (self.tmp / f"child-{self.procs.index(proc)}.stderr").read_text()

    def line(self, proc: subprocess.Popen[str], timeout: float = 90.0) -> str:
        """The child's next line of output, or a failure naming its stderr."""
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"no output from the child within {timeout}s: {self.stderr(proc)[-2000:]}")
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            raise AssertionError(f"the child exited ({proc.returncode}): {self.stderr(proc)[-2000:]}")
        return line

    def result(self, proc: subprocess.Popen[str], timeout: float = 90.0) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.line(proc, timeout))
        return out

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate(timeout=30)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    c = Children(tmp_path)
    yield c
    c.close()


SERVER = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
srv = store.StoreServer(0, os.environ["STORE_TOKEN"], host="127.0.0.1", handshake_timeout=float(sys.argv[1]),
                  max_unauthenticated=int(sys.argv[2]))
print(srv.port, flush=True)
sys.stdin.read()  # serve until the test closes our stdin (or kills us)
srv.close()
"""


def stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (state T in /proc)."""
    states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()]
    return all(state in "Tt" for state in states)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------------------- operations
def test_set_get_multi_check_add(client: StoreClient) -> None:
    client.set("a", b"1")
    assert client.get("a") == b"1"
    assert client.get("missing") is None
    client.multi_set([("b", b"\x00\xff"), ("c", b""), ("a", b"one")])
    assert client.multi_get(["a", "b", "c", "missing"]) == [b"one", b"\x00\xff", b"", None]
    assert client.check(["a", "b", "c"])
    assert not client.check(["a", "missing"])
    assert client.add("n", 5) == 5
    assert client.add("n", -7) == -2
    assert client.get("n") == b"-2"
    client.set("text", b"abc")
    with pytest.raises(ValueError, match="not an integer"):
        client.add("text", 1)
    assert client.get("a") == b"one"  # a refused request leaves the connection usable


def test_delete_and_delete_prefix(client: StoreClient) -> None:
    client.multi_set([("g/1/a", b"x"), ("g/1/b", b"y"), ("g/2/a", b"z"), ("other", b"w")])
    assert client.delete(["g/2/a", "nothing"]) == 1
    assert client.delete_prefix("g/1/") == 2
    assert client.delete_prefix("g/") == 0
    assert client.multi_get(["g/1/a", "g/1/b", "g/2/a", "other"]) == [None, None, None, b"w"]


def test_stats(server: StoreServer, client: StoreClient) -> None:
    client.multi_set([("k1", b"abc"), ("k2", b"de")])
    other = connect(server.port)
    assert client.stats() == server.stats() == {"keys": 2, "bytes": 5, "connections": 2, "waiters": 0}
    client.set("k1", b"")
    assert server.stats()["bytes"] == 2
    other.close()
    until(lambda: server.stats()["connections"] == 1, what="the closed connection to be counted out")


def test_large_value_round_trip(client: StoreClient) -> None:
    value = os.urandom(5 << 20)
    client.set("big", value)
    assert client.get("big") == value
    assert client.stats()["bytes"] == len(value)


def test_wait_is_woken_by_another_client(server: StoreServer, client: StoreClient) -> None:
    writer = connect(server.port)
    result: list[bool] = []
    start = time.monotonic()
    waiting = threading.Thread(target=lambda: result.append(client.wait(["w1", "w2"], 60.0)))
    waiting.start()
    until(lambda: server.stats()["waiters"] == 1, what="the wait to reach the server")
    writer.set("w1", b"x")
    assert not result
    writer.set("w2", b"y")
    waiting.join(timeout=30)
    assert result == [True]
    assert time.monotonic() - start < 30
    assert server.stats()["waiters"] == 0
    assert client.wait(["w1", "w2"], 0.0)  # already there: no blocking
    writer.close()


def test_wait_times_out(server: StoreServer, client: StoreClient) -> None:
    start = time.monotonic()
    assert client.wait(["never"], 0.3) is False
    elapsed = time.monotonic() - start
    assert 0.29 <= elapsed < 10
    assert client.wait(["never"], 0.0) is False
    assert server.stats()["waiters"] == 0
    client.set("never", b"now")  # the connection is still in step
    assert client.get("never") == b"now"


def test_requests_sent_ahead_of_their_replies_are_answered_in_order(server: StoreServer, client: StoreClient) -> None:
    writer = connect(server.port)
    stored = client.multi_set_later([("announced", b"manifest")])
    verdicts = client.wait_get_later(["verdict/1", "verdict/2"], 30.0)
    until(lambda: writer.get("announced") == b"manifest", what="the first request to be served before its "
          "reply was read")
    until(lambda: server.stats()["waiters"] == 1, what="the wait sent behind it to reach the server")
    writer.multi_set([("verdict/1", b"ok"), ("verdict/2", b"")])
    stored()
    assert verdicts() == [b"ok", b""]
    assert client.get("announced") == b"manifest"  # the connection is in step
    # A reply not read yet is read by the next call first, whichever it is; its own result stays readable.
    late = client.wait_get_later(["never"], 0.2)
    assert client.get("verdict/1") == b"ok"
    assert late() is None
    writer.close()


def test_a_call_interrupted_before_its_reply_leaves_the_next_call_its_own_reply(
        client: StoreClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client.multi_set([("a", b"value of a"), ("b", b"value of b")])
    read_reply = StoreClient._read_reply
    interrupted: list[bool] = []

    def interrupt_once(self: StoreClient, due: tuple[float, float]) -> bytes:
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # a pod's SIGTERM or Ctrl-C, the request sent, its reply not read yet
        return read_reply(self, due)

    monkeypatch.setattr(StoreClient, "_read_reply", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        client.get("a")
    assert client.get("b") == b"value of b"  # not a's reply, which is read first and set aside
    assert client.multi_get(["a", "b"]) == [b"value of a", b"value of b"]


def test_a_request_sent_ahead_fails_named_when_the_store_goes(server: StoreServer) -> None:
    client = connect(server.port)
    waiting = client.wait_get_later(["never"], 30.0)
    until(lambda: server.stats()["waiters"] == 1, what="the wait to reach the server")
    server.close()
    with pytest.raises(StoreUnreachable, match=r"127\.0\.0\.1"):
        waiting()
    with pytest.raises(StoreUnreachable):
        client.get("anything")
    client.close()


def test_a_blocking_wait_does_not_hold_up_other_clients(server: StoreServer, client: StoreClient) -> None:
    other = connect(server.port)
    waiting = threading.Thread(target=client.wait, args=(["late"], 60.0))
    waiting.start()
    until(lambda: server.stats()["waiters"] == 1, what="the wait to reach the server")
    for i in range(50):
        other.set(f"k{i}", b"v")
    assert other.get("k49") == b"v"
    other.set("late", b"1")
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    other.close()


def test_ephemeral_key_vanishes_when_its_client_closes(server: StoreServer, client: StoreClient) -> None:
    member = connect(server.port)
    member.set_ephemeral("alive/1", b"pid")
    member.set_ephemeral("alive/2", b"pid")
    client.set("alive/2", b"taken over")  # a plain set makes the key an ordinary one
    assert client.get("alive/1") == b"pid"
    member.close()
    until(lambda: client.get("alive/1") is None, what="the ephemeral key to vanish")
    assert client.get("alive/2") == b"taken over"


EPHEMERAL_MEMBER = """
import sys
c = store.StoreClient.connect("127.0.0.1", int(sys.argv[1]), os.environ["STORE_TOKEN"], 60)
c.set_ephemeral("alive/7", str(os.getpid()).encode())
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(180)
def test_ephemeral_key_vanishes_when_its_process_is_killed(server: StoreServer, client: StoreClient,
                                                          children: Children) -> None:
    member = children.start(EPHEMERAL_MEMBER, str(server.port))
    assert children.line(member).strip() == "ready"
    assert client.get("alive/7") == str(member.pid).encode()
    os.kill(member.pid, signal.SIGKILL)
    member.wait(timeout=30)
    until(lambda: client.get("alive/7") is None, what="the killed member's key to vanish")


# ------------------------------------------------------------------------------------ failure bounds
@pytest.mark.timeout(180)
def test_calls_to_a_stopped_server_fail_within_their_bound(children: Children) -> None:
    proc = children.start(SERVER, "5", "64")
    port = int(children.line(proc))
    getter = connect(port, timeout=60, op_timeout=1.0)
    waiter = connect(port, timeout=60, op_timeout=1.0)
    getter.set("k", b"v")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        until(lambda: stopped(proc.pid), what="the server process to stop")  # delivery is asynchronous
        start = time.monotonic()
        with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{port}"):
            getter.get("k")
        assert 0.9 < time.monotonic() - start < 6
        start = time.monotonic()
        with pytest.raises(StoreUnreachable):
            waiter.wait(["never"], 0.5)  # its bound is its own timeout plus op_timeout
        assert 1.4 < time.monotonic() - start < 7
        with pytest.raises(StoreUnreachable, match="earlier failure"):
            getter.get("k")  # a client whose call failed stays failed: the stream is out of step
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_connect_gives_up_naming_the_address() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]  # nothing listens on it once closed
    start = time.monotonic()
    with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{port}") as err:
        connect(port, timeout=0.5)
    assert not isinstance(err.value, StoreAuthError)
    assert 0.45 < time.monotonic() - start < 10


def test_connect_retries_while_the_name_does_not_resolve(server: StoreServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.create_connection
    unresolved: list[str] = []
    resolves_after = 3  # a pod's DNS name appears some time after the pod

    def resolving_late(address: tuple[str, int], timeout: float) -> socket.socket:
        if len(unresolved) < resolves_after:
            unresolved.append(address[0])
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real((HOST, address[1]), timeout=timeout)

    monkeypatch.setattr(socket, "create_connection", resolving_late)
    with StoreClient.connect("trainer-0.ws.ns.svc", server.port, TOKEN, 30) as c:
        c.set("k", b"v")
    assert unresolved == ["trainer-0.ws.ns.svc"] * 3
    resolves_after = 10**9
    with pytest.raises(StoreUnreachable, match=r"trainer-0\.ws\.ns\.svc:\d+.*Name or service not known"):
        StoreClient.connect("trainer-0.ws.ns.svc", server.port, TOKEN, 0.3)


def test_connect_retries_until_the_server_listens() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    clients: list[StoreClient] = []
    errors: list[BaseException] = []

    def join() -> None:
        try:
            clients.append(connect(port, timeout=60))
        except BaseException as err:
            errors.append(err)

    joining = threading.Thread(target=join)
    joining.start()
    with StoreServer(port, TOKEN, host=HOST) as srv:
        joining.join(timeout=60)
        assert not errors and len(clients) == 1
        clients[0].set("k", b"v")
        assert srv.stats()["keys"] == 1
        clients[0].close()


def test_binding_a_port_in_use_names_the_port(server: StoreServer) -> None:
    with pytest.raises(OSError, match=str(server.port)):
        StoreServer(server.port, TOKEN, host=HOST)


def blocked_wait(client: StoreClient, srv: StoreServer) -> tuple[threading.Thread, list[BaseException]]:
    """`client` waiting in the server, on a thread, for a key nobody writes; the errors the wait ends with."""
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.wait(["never"], 60.0)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    until(lambda: srv.stats()["waiters"] == 1, what="the wait to reach the server")
    return thread, errors


def test_server_close_ends_every_connection_and_is_idempotent() -> None:
    srv = StoreServer(0, TOKEN, host=HOST)
    idle, waiting = connect(srv.port), connect(srv.port)
    thread, errors = blocked_wait(waiting, srv)
    srv.close()
    srv.close()
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], StoreUnreachable)
    with pytest.raises(StoreUnreachable):
        idle.get("k")
    with pytest.raises(StoreUnreachable):
        connect(srv.port, timeout=0.3)


def test_client_close_interrupts_its_own_wait(server: StoreServer) -> None:
    waiting = connect(server.port)
    thread, errors = blocked_wait(waiting, server)
    waiting.close()
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], StoreUnreachable)
    until(lambda: server.stats() == {"keys": 0, "bytes": 0, "connections": 0, "waiters": 0},
          what="the server to forget the connection")


def test_one_client_serves_several_threads(server: StoreServer, client: StoreClient) -> None:
    def work(i: int) -> None:
        for j in range(100):
            client.set(f"t{i}/{j}", str(j).encode())
            assert client.get(f"t{i}/{j}") == str(j).encode()
            client.add("total", 1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert client.get("total") == b"400"


# ---------------------------------------------------------------------------------------- limits
def test_values_over_the_limit_are_refused_and_the_server_stays_up() -> None:
    with StoreServer(0, TOKEN, host=HOST, max_value_bytes=1000, max_total_bytes=4000) as srv:
        c = connect(srv.port)
        with pytest.raises(ValueError, match=r"'too/big'.*1000 bytes"):
            c.set("too/big", b"x" * 1001)
        with pytest.raises(ValueError, match=r"'too/big'.*1000 bytes"):
            c.multi_set([("ok", b"x"), ("too/big", b"x" * 1001)])
        c._max_value = 1 << 30  # a client that does not check first: the server refuses all the same
        with pytest.raises(ValueError, match=r"'too/big'.*1000 bytes"):
            c.multi_set([("ok", b"x"), ("too/big", b"x" * 1001)])
        assert c.get("ok") is None  # all of a multi_set or nothing
        for i in range(3):
            c.set(f"fill/{i}", b"x" * 1000)
        with pytest.raises(ValueError, match=r"'fill/3'.*4000 bytes"):
            c.set("fill/3", b"x" * 1000)
        c.set("fill/0", b"y" * 1000)  # replacing a value takes no extra room
        assert c.delete(["fill/0"]) == 1
        c.set("fill/3", b"x" * 1000)
        assert srv.stats()["bytes"] == 3000
        c.close()


def test_an_oversized_frame_from_an_authenticated_client_closes_only_its_connection(server: StoreServer,
                                                                                   client: StoreClient) -> None:
    rogue = connect(server.port)
    assert rogue._sock is not None
    rogue._sock.sendall(struct.pack(">I", 0xFFFFFFFF))  # "4 GiB follow"
    with pytest.raises(StoreUnreachable):
        rogue.get("k")
    client.set("k", b"v")
    assert client.get("k") == b"v"
    until(lambda: server.stats()["connections"] == 1, what="the rogue connection to be closed")


# ------------------------------------------------------------------------------- authentication
def test_wrong_token_is_refused_at_once_and_logged_without_secrets(server: StoreServer, client: StoreClient,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="weightsync.runtime"), \
            pytest.raises(StoreAuthError, match=f"127.0.0.1:{server.port}"):
        connect(server.port, token=wrong, timeout=30)
    assert time.monotonic() - start < 5  # no retries
    until(lambda: any("wrong token" in r.getMessage() for r in caplog.records), what="the warning")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1:" in messages
    assert TOKEN not in messages and wrong not in messages
    client.set("still", b"serving")
    assert client.get("still") == b"serving"


class _FakeServer:
    """A listener that answers the handshake with `answer(server_nonce, client_hello)`."""

    def __init__(self, greeting: bytes, answer: Callable[[bytes], bytes]) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.greeting, self.answer = greeting, answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.sendall(self.greeting)
                hello = b""
                while len(hello) < 72:
                    chunk = conn.recv(72 - len(hello))
                    if not chunk:
                        return
                    hello += chunk
                conn.sendall(self.answer(hello))
                conn.recv(1)

    def close(self) -> None:
        self.listener.close()


def test_a_server_that_does_not_know_the_token_is_refused() -> None:
    impostor = _FakeServer(b"WSYNC-S1" + os.urandom(32), lambda hello: b"\x00" + os.urandom(32) + bytes(16))
    with pytest.raises(StoreAuthError, match="does not know"):
        connect(impostor.port, timeout=10)
    impostor.close()
    other = _FakeServer(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(20), lambda hello: b"")
    with pytest.raises(StoreAuthError, match="not a weightsync store"):
        connect(other.port, timeout=10)
    other.close()


def test_a_silent_connection_is_closed_after_the_handshake_timeout() -> None:
    with StoreServer(0, TOKEN, host=HOST, handshake_timeout=0.3) as srv, \
            socket.create_connection((HOST, srv.port)) as silent:
        silent.settimeout(20)
        greeting = silent.recv(40)
        assert greeting.startswith(b"WSYNC-S1")
        start = time.monotonic()
        assert silent.recv(1) == b""
        assert 0.2 < time.monotonic() - start < 15


def test_pending_handshakes_are_bounded_oldest_first() -> None:
    with StoreServer(0, TOKEN, host=HOST, handshake_timeout=60, max_unauthenticated=4) as srv:
        silent = [socket.create_connection((HOST, srv.port)) for _ in range(10)]
        # Evicts the oldest pending one; no wait for the time-out. One attempt only: a retry would evict another.
        c = connect(srv.port, timeout=30, attempt_timeout=30)
        c.set("k", b"v")
        closed: list[bool] = []
        for s in silent:
            s.settimeout(20)
            data = s.recv(40)
            s.settimeout(0.05 if len(closed) >= 7 else 20)
            try:
                closed.append(s.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
        assert closed == [True] * 7 + [False] * 3, closed  # at most 4 pending: 3 silent ones and the client's
        assert data.startswith(b"WSYNC-S1")
        for s in silent:
            s.close()
        c.close()


# ---------------------------------------------------------------------------------- rogue process
ROGUE = r"""
import json, os, socket, struct, sys, time
mode, port = sys.argv[1], int(sys.argv[2])

def drain(sock, timeout=20.0):
    "Read until the server closes: (bytes read, whether it closed within the timeout)."
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got, True
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return got, True
    except TimeoutError:
        return got, False

def attack(payload):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            pass
        got, closed = drain(s)
        return {"closed": closed, "answer": got[40:].hex()}

if mode == "wrong-token":
    try:
        store.StoreClient.connect("127.0.0.1", port, "not-" + os.environ["STORE_TOKEN"], 30)
        print(json.dumps({"result": "connected"}))
    except store.StoreAuthError as err:
        print(json.dumps({"result": "auth-error", "message": str(err)}))
elif mode == "tcpstore":
    import datetime
    import torch.distributed as dist
    start = time.monotonic()
    try:
        tcp = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=3))
    except Exception as err:
        print(json.dumps({"result": "failed", "error": type(err).__name__, "seconds": time.monotonic() - start}))
    else:
        found = {}
        for name, call in (("list_keys", lambda: tcp.list_keys()), ("get", lambda: tcp.get("k"))):
            try:
                found[name] = repr(call())
            except Exception as err:
                found[name] = "error"
        print(json.dumps({"result": "connected", **found}))
elif mode == "garbage":
    results = []
    for i in range(40):
        results.append(attack(os.urandom(1 << 16)))
    results.append(attack(struct.pack(">I", 0xFFFFFFFF) + os.urandom(4096)))  # a 4 GiB length prefix
    results.append(attack(struct.pack(">Q", 4 << 30) + os.urandom(4096)))
    results.append(attack(b"WSYNC-C1" + struct.pack(">I", 0xFFFFFFFF) + os.urandom(1 << 20)))
    results.append(attack(b"WSYNC-C1" + os.urandom(64)))  # the right length, a made-up proof
    print(json.dumps(results))
elif mode == "silent":
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(500)]
    print(json.dumps({"opened": len(socks)}), flush=True)
    sys.stdin.read()
elif mode == "replay":
    recorded = open(sys.argv[3], "rb").read()
    print(json.dumps(attack(recorded)))
"""


@pytest.fixture
def remote(children: Children) -> tuple[subprocess.Popen[str], int]:
    """A server in a process of its own ("the trainer"): handshakes time out only after a minute."""
    proc = children.start(SERVER, "60", "64")
    return proc, int(children.line(proc))


def serves(port: int) -> bool:
    with connect(port, timeout=30) as c:
        key = f"probe/{secrets.token_hex(4)}"
        c.set(key, b"ok")
        return bool(c.get(key) == b"ok" and c.delete([key]) == 1)


@pytest.mark.timeout(240)
def test_rogue_with_a_wrong_token(remote: tuple[subprocess.Popen[str], int], children: Children) -> None:
    proc, port = remote
    result = children.result(children.start(ROGUE, "wrong-token", str(port)))
    assert result["result"] == "auth-error", result
    assert serves(port)
    assert proc.poll() is None


@pytest.mark.timeout(240)
def test_rogue_speaking_torch_tcpstore(remote: tuple[subprocess.Popen[str], int], children: Children) -> None:
    port = remote[1]
    with connect(port) as c:
        c.set("secret/nccl-id", b"\x01" * 128)
        result = children.result(children.start(ROGUE, "tcpstore", str(port)))
        assert result["result"] == "failed", result  # so neither list_keys nor get could run
        assert c.get("secret/nccl-id") == b"\x01" * 128
    assert serves(port)


@pytest.mark.timeout(240)
def test_rogue_sending_garbage_costs_no_memory(remote: tuple[subprocess.Popen[str], int], children: Children) -> None:
    proc, port = remote
    children.result(children.start(ROGUE, "wrong-token", str(port)))  # warm up every code path once
    assert serves(port)
    before = rss_kib(proc.pid)
    results = children.result(children.start(ROGUE, "garbage", str(port)), timeout=180)
    assert isinstance(results, list)
    assert all(r["closed"] for r in results), results
    # Garbage gets no answer; anything starting like our hello is read for its 72 bytes only and refused.
    assert [r["answer"] for r in results] == [""] * (len(results) - 2) + ["01", "01"]
    assert serves(port)
    grown = rss_kib(proc.pid) - before
    assert grown < 8 * 1024, f"the server's RSS grew by {grown} KiB"
    assert "does not speak the weightsync store protocol" in children.stderr(proc)


@pytest.mark.timeout(240)
def test_rogue_holding_500_silent_connections(remote: tuple[subprocess.Popen[str], int], children: Children) -> None:
    proc, port = remote
    assert proc.poll() is None
    rogue = children.start(ROGUE, "silent", str(port))
    assert children.result(rogue) == {"opened": 500}
    start = time.monotonic()
    with connect(port, timeout=30) as c:  # handshakes time out only after 60s: this needs no waiting
        c.set("k", b"v")
        assert c.get("k") == b"v"
        assert c.stats()["connections"] == 1
    assert time.monotonic() - start < 30
    assert rogue.poll() is None


class _Proxy:
    """A TCP proxy for one connection that records the client's bytes and may rewrite its frames."""

    CLIENT_HANDSHAKE, SERVER_HANDSHAKE = 72, 40 + 1 + 32 + 16

    def __init__(self, upstream: int, rewrite: Callable[[int, bytes], list[bytes]] | None = None) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.upstream, self.rewrite = upstream, rewrite
        self.from_client = bytearray()
        self.server_frames: list[bytes] = []
        self.threads: list[threading.Thread] = []
        accepting = threading.Thread(target=self._accept, daemon=True)
        accepting.start()
        self.threads.append(accepting)

    def _accept(self) -> None:
        down, _ = self.listener.accept()
        up = socket.create_connection((HOST, self.upstream))
        for args in ((down, up, True), (up, down, False)):
            t = threading.Thread(target=self._pump, args=args, daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        handshake = self.CLIENT_HANDSHAKE if from_client else self.SERVER_HANDSHAKE
        buf, frames = bytearray(), 0
        try:
            while chunk := src.recv(65536):
                if from_client:
                    self.from_client += chunk
                buf += chunk
                out = bytearray()
                if handshake:
                    n = min(handshake, len(buf))
                    out += buf[:n]
                    del buf[:n]
                    handshake -= n
                while not handshake and len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                    size = 4 + int.from_bytes(buf[:4], "big")
                    frame = bytes(buf[:size])
                    del buf[:size]
                    if from_client and self.rewrite is not None:
                        out += b"".join(self.rewrite(frames, frame))
                    else:
                        out += frame
                    if not from_client:
                        self.server_frames.append(frame)
                    frames += 1
                dst.sendall(out)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for t in self.threads:
            t.join(timeout=30)
        self.listener.close()


@pytest.mark.timeout(240)
def test_rogue_replaying_a_recorded_session(remote: tuple[subprocess.Popen[str], int], children: Children,
                                            tmp_path: Path) -> None:
    port = remote[1]
    proxy = _Proxy(port)
    with connect(proxy.port) as c:
        c.set("replay/value", b"genuine")
        assert c.add("replay/count", 1) == 1
    proxy.close()
    assert len(proxy.from_client) > 72
    recording = tmp_path / "session.bin"
    recording.write_bytes(bytes(proxy.from_client))
    result = children.result(children.start(ROGUE, "replay", str(port), str(recording)))
    assert result == {"closed": True, "answer": "01"}, result  # refused at the hello: its nonce is stale
    with connect(port) as c:
        assert c.get("replay/count") == b"1"
        assert c.get("replay/value") == b"genuine"


def test_a_frame_replayed_within_its_session_closes_the_connection(server: StoreServer, client: StoreClient) -> None:
    proxy = _Proxy(server.port, lambda i, frame: [frame, frame] if i == 1 else [frame])
    c = connect(proxy.port)
    c.set("k", b"v")
    with contextlib.suppress(StoreUnreachable):  # the first copy may be answered before the server hangs up
        c.add("n", 1)
    with pytest.raises(StoreUnreachable):
        c.get("k")
    assert client.get("n") == b"1"
    c.close()
    proxy.close()


def test_a_tampered_frame_closes_the_connection(server: StoreServer, client: StoreClient) -> None:
    def flip(i: int, frame: bytes) -> list[bytes]:
        return [frame[:-1] + bytes([frame[-1] ^ 1])] if i == 1 else [frame]

    proxy = _Proxy(server.port, flip)
    c = connect(proxy.port)
    c.set("a", b"1")
    with pytest.raises(StoreUnreachable):
        c.set("b", b"2")
    assert client.multi_get(["a", "b"]) == [b"1", None]
    c.close()
    proxy.close()


def test_a_reflected_frame_closes_the_connection(server: StoreServer, client: StoreClient) -> None:
    proxy: _Proxy

    def reflect(i: int, frame: bytes) -> list[bytes]:
        return [proxy.server_frames[0]] if i == 1 else [frame]  # the server's own first reply, sent back

    proxy = _Proxy(server.port, reflect)
    c = connect(proxy.port)
    c.set("a", b"1")
    with pytest.raises(StoreUnreachable):
        c.set("b", b"2")
    assert client.get("b") is None
    c.close()
    proxy.close()


# --------------------------------------------------------------------------------------------- c10d
def test_c10d_store_semantics(server: StoreServer, client: StoreClient) -> None:
    store = client.c10d()
    assert client.c10d() is store
    assert isinstance(store, dist.Store)
    store.set("s", "text")
    assert store.get("s") == b"text"
    assert store.add("n", 3) == 3 and store.add("n", 2) == 5
    assert store.check(["s", "n"]) and not store.check(["nothing"])
    assert store.compare_set("cas", "", "first") == b"first"
    assert store.compare_set("cas", "wrong", "second") == b"first"
    assert store.compare_set("cas", "first", "second") == b"second"
    assert store.compare_set("absent", "expected", "x") == b"expected"
    assert store.num_keys() == 3  # s, n, cas
    assert store.delete_key("s") and not store.delete_key("s")
    prefixed = dist.PrefixStore("pre", store)
    prefixed.set("k", "v")
    assert client.get("pre/k") == b"v"
    assert prefixed.get("k") == b"v"
    store.wait(["n"])
    store.wait(["n"], timedelta(seconds=1))


def test_c10d_get_blocks_until_the_key_exists_or_the_timeout(server: StoreServer, client: StoreClient) -> None:
    store = client.c10d()
    writer = connect(server.port)
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(store.get("later")))
    thread.start()
    until(lambda: server.stats()["waiters"] == 1, what="the get to wait in the server")
    writer.set("later", b"here")
    thread.join(timeout=30)
    assert got == [b"here"]
    store.set_timeout(timedelta(seconds=0.2))
    with pytest.raises(dist.DistStoreError, match="never"):
        store.get("never")
    with pytest.raises(dist.DistStoreError):
        store.wait(["never"], timedelta(seconds=0.1))
    writer.close()


GLOO_MEMBER = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
port, rank = int(sys.argv[1]), int(sys.argv[2])
client = store.StoreClient.connect("127.0.0.1", port, os.environ["STORE_TOKEN"], 60)
pg = dist.ProcessGroupGloo(dist.PrefixStore("gloo/test", client.c10d()), rank, 3, timedelta(seconds=120))
tensor = torch.arange(1000, dtype=torch.float32) * 3 if rank == 0 else torch.zeros(1000)
pg.broadcast([tensor]).wait()
pg.barrier().wait() if hasattr(pg, "barrier") else None
print(json.dumps({"rank": rank, "sum": float(tensor.sum()), "last": float(tensor[-1])}), flush=True)
"""


@pytest.mark.timeout(300)
def test_gloo_group_of_three_processes_over_the_store(server: StoreServer, children: Children) -> None:
    members = [children.start(GLOO_MEMBER, str(server.port), str(r), env={"GLOO_SOCKET_IFNAME": "lo"})
               for r in range(3)]
    results = sorted((children.result(m, timeout=240) for m in members), key=lambda r: int(str(r["rank"])))
    expected = 3 * 999 * 1000 / 2
    assert results == [{"rank": r, "sum": expected, "last": 2997.0} for r in range(3)]
