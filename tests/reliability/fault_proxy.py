"""A fault-injecting HTTP proxy for tests, between boto3 and the S3 test server (loopback only).

    with FaultProxy(s3_server.endpoint_url, Faults(reset=0.1, slowdown=0.05, seed=3)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url     # or the faulty_s3_env fixture (conftest.py)
        ...
        assert proxy.injected["reset"] > 0             # the faults really happened

One request per connection: `Connection: close` is forced both ways (no keep-alive to parse),
and `Expect: 100-continue` is answered here (the whole request is read before any decision, so
an injected error never races the client's upload). Per request at most one fault, drawn from
a seeded RNG with the per-kind rates (their sum <= 1), until `max_faults` were injected:

    reset      the server acted, then the response is cut by a TCP RST: after a random part of
               its body when it has one (GET), else before anything is sent (PUT, HEAD, ...)
    slowdown   503 SlowDown (S3 XML error body); the request never reaches the server
    internal   500 InternalError (S3 XML error body); the request never reaches the server
    delay      the request is held `delay_s` seconds, then served normally
    truncate   a random prefix of the body, then a clean close: Content-Length says more than
               was sent (responses without a body are served normally and nothing is counted)
    hang       a frozen server: the request is read, never answered, and the connection held
               until the client gives up (or `hang_s` seconds); it never reaches the server

Bounded: every socket times out after 30 s, delays are at most 5 s, hangs at most 30 s, faults stop after
`max_faults` or `window_s` seconds, and the listener only binds 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("reset", "slowdown", "internal", "delay", "truncate", "hang")
TIMEOUT = 30.0
ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
          "internal": (500, "Internal Server Error", "InternalError",
                       "We encountered an internal error. Please try again.")}


@dataclass
class Faults:
    reset: float = 0.0
    slowdown: float = 0.0
    internal: float = 0.0
    delay: float = 0.0
    truncate: float = 0.0
    hang: float = 0.0
    delay_s: float = 0.2
    hang_s: float = TIMEOUT
    seed: int = 0
    max_faults: int = 50
    window_s: float | None = None  # no faults after this many seconds from the proxy's start
    only: Callable[[Request], bool] | None = None  # which requests may be faulted (None: all)

    def __post_init__(self):
        rates = [getattr(self, k) for k in KINDS]
        if min(rates) < 0 or sum(rates) > 1 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1: {dict(zip(KINDS, rates))}")
        if not 0 <= self.delay_s <= 5:
            raise ValueError("delay_s must be within [0, 5] s")
        if not 0 <= self.hang_s <= TIMEOUT:
            raise ValueError(f"hang_s must be within [0, {TIMEOUT:g}] s")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names


@dataclass(frozen=True)
class Event:
    method: str
    path: str
    fault: str | None  # the fault injected into this request, None if served normally
    range: str | None = None  # the request's Range header (a ranged GET), None if it had none


@dataclass
class _Message:
    head: bytes  # start line + headers, without the blank line
    headers: dict[str, str]  # lower-case names

    @classmethod
    def parse(cls, head: bytes) -> _Message:
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return cls(head, headers)

    @property
    def start(self) -> list[str]:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)

    def rewritten(self, drop: tuple[str, ...]) -> bytes:
        """The head without the `drop` headers, with `Connection: close`, and the blank line."""
        lines = self.head.split(b"\r\n")
        kept = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower().decode("latin-1") not in drop]
        return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


class _Reader:
    """Buffered reads from a socket: heads, exact lengths, chunked bodies (kept verbatim)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _more(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("peer closed")
        return data

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                return None  # closed before a (complete) head: nothing to serve
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def chunked(self) -> bytes:
        out = b""
        while True:
            size_line = self.line()
            out += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := self.line()) != b"\r\n":
                    out += trailer
                return out + b"\r\n"
            out += self.exact(size + 2)

    def body(self, msg: _Message) -> bytes:
        if "chunked" in msg.headers.get("transfer-encoding", "").lower():
            return self.chunked()
        return self.exact(int(msg.headers.get("content-length") or 0))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN: the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """The proxy; `url` is its endpoint. Counters: `injected` (by kind), `requests` (by method),
    `events` (every request, in arrival order)."""

    def __init__(self, upstream_url: str, faults: Faults | None = None):
        up = urllib.parse.urlparse(upstream_url)
        if up.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FaultProxy only proxies a loopback server, not {upstream_url}")
        self.upstream = (up.hostname, up.port)
        self.faults = faults or Faults()
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.events: list[Event] = []
        self._rng = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()  # open connections end by themselves within TIMEOUT

    @property
    def total_faults(self) -> int:
        return sum(self.injected.values())

    def attempts(self, method: str, path_suffix: str) -> int:
        """How many requests `method` on a path ending with `path_suffix` (query ignored) arrived."""
        return sum(e.method == method and e.path.split("?")[0].endswith(path_suffix) for e in self.events)

    def _draw(self, req: Request) -> str | None:
        f = self.faults
        with self._lock:
            self.requests[req.method] += 1
            if self.total_faults >= f.max_faults or (f.window_s is not None and time.monotonic() - self._t0 > f.window_s):
                return None
            if f.only is not None and not f.only(req):
                return None
            r, acc = self._rng.random(), 0.0
            for kind in KINDS:
                acc += getattr(f, kind)
                if r < acc:
                    return kind
            return None

    def _record(self, method: str, path: str, fault: str | None, range_: str | None = None) -> None:
        with self._lock:
            if fault:
                self.injected[fault] += 1
            self.events.append(Event(method, path, fault, range_))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(TIMEOUT)
        upstream = None
        try:
            reader = _Reader(client)
            head = reader.head()
            if head is None:
                return client.close()
            req = _Message.parse(head)
            method, path = req.start[0], req.start[1]
            if req.headers.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = reader.body(req)
            fault = self._draw(Request(method, path, req.headers))
            if fault in ERRORS:
                self._record(method, path, fault)
                return self._send_error(client, method, path, *ERRORS[fault])
            if fault == "hang":
                self._record(method, path, fault)
                client.settimeout(self.faults.hang_s)
                with contextlib.suppress(OSError):  # b"" when the client closes, timeout after hang_s
                    client.recv(1)
                return client.close()
            if fault == "delay":
                time.sleep(self.faults.delay_s)
            upstream = socket.create_connection(self.upstream, timeout=TIMEOUT)
            upstream.sendall(req.rewritten(drop=("connection", "keep-alive", "expect")) + body)
            self._relay(_Reader(upstream), client, method, path, fault, req.headers.get("range"))
        except OSError:  # the client or the server went away: nothing more to do for this connection
            client.close()
        finally:
            if upstream is not None:
                upstream.close()

    def _send_error(self, client: socket.socket, method: str, path: str, status: int, reason: str, code: str,
                    message: str) -> None:
        resource = urllib.parse.unquote(path.split("?")[0])
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f'<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>').encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                f"Content-Length: {0 if method == 'HEAD' else len(body)}\r\n\r\n").encode()
        client.sendall(head + (b"" if method == "HEAD" else body))
        client.close()

    def _relay(self, upstream: _Reader, client: socket.socket, method: str, path: str, fault: str | None,
               range_: str | None = None) -> None:
        resp = _Message.parse(upstream.head() or b"HTTP/1.1 502 Bad Gateway")
        status = int(resp.start[1])
        length = resp.headers.get("content-length")
        has_body = method != "HEAD" and status not in (204, 304) and length is not None and int(length) >= 2
        if fault == "truncate" and not has_body:
            fault = None  # nothing to truncate: served normally, not counted
        self._record(method, path, fault, range_)
        if fault == "reset" and not has_body:
            return _reset(client)  # the server acted; its answer is lost
        if method == "HEAD" or status in (204, 304):
            body = b""  # a HEAD answer's Content-Length describes a body that is never sent
        elif length is not None or "chunked" in resp.headers.get("transfer-encoding", ""):
            body = upstream.body(resp)
        else:  # no framing: the body ends when the server closes
            body = upstream.buf + b"".join(iter(lambda: upstream.sock.recv(1 << 16), b""))
        out = resp.rewritten(drop=("connection", "keep-alive"))
        if fault in ("reset", "truncate"):
            with self._lock:
                cut = self._rng.randrange(1, len(body))  # at least one byte sent, at least one missing
            client.sendall(out + body[:cut])
            return _reset(client) if fault == "reset" else client.close()
        client.sendall(out + body)
        client.close()
