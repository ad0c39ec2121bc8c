"""Shared machinery for the vendor sandboxes (stateful simulators of each vendor's API).

A sandbox is a :class:`SandboxApp`: a router of handlers over :class:`SandboxRequest` that returns
:class:`SandboxResponse`. The same app is used two ways:

- in-process, as an ``httpx.MockTransport`` (``app.transport()``), for fast unit tests;
- over a real socket on 127.0.0.1 (``serve(app, port)``), for the vendors' own SDKs, the CLI's
  ``sandbox serve`` command, the demo and the crash tests.

Every sandbox shares:

- a :class:`Clock` that may run compressed (``scale`` virtual seconds per real second) so that rate
  windows of a minute or a day can be exercised quickly. Rate-limit headers and ``Retry-After`` are
  reported in *real* seconds, so a client needs no knowledge of the compression;
- a :class:`FaultPlan`, seeded and reproducible, that injects 429s, 5xx, latency, timeouts and the
  ambiguous write: the request is applied and committed, then the connection is dropped before the
  response is sent;
- :class:`WindowLimit` rate limits and a :class:`ConcurrencyGate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

__all__ = [
    "Clock",
    "ConcurrencyGate",
    "DropConnection",
    "Fault",
    "FaultPlan",
    "Route",
    "SandboxApp",
    "SandboxRequest",
    "SandboxResponse",
    "SandboxServer",
    "WindowLimit",
    "json_response",
    "serve",
]


class Clock:
    """Virtual time. ``scale`` virtual seconds elapse per real second (1.0 = real time)."""

    def __init__(self, scale: float = 1.0, start: float | None = None) -> None:
        if scale <= 0:
            raise ValueError("clock scale must be positive")
        self.scale = scale
        self._real0 = time.monotonic()
        self._virt0 = time.time() if start is None else start

    def now(self) -> float:
        """Virtual epoch seconds."""
        return self._virt0 + (time.monotonic() - self._real0) * self.scale

    def to_real(self, virtual_seconds: float) -> float:
        """Convert a virtual duration to the real duration a client must wait."""
        return virtual_seconds / self.scale


@dataclass(frozen=True)
class Fault:
    kind: str  # "429" | "500" | "502" | "503" | "504" | "latency" | "timeout" | "drop_after_commit"
    delay: float = 0.0


_FAULT_KINDS = {"429", "500", "502", "503", "504", "latency", "timeout", "drop_after_commit", "drop"}


class FaultPlan:
    """Seeded, reproducible fault injection.

    Spec syntax (the ``--faults`` option): comma-separated ``kind=probability[:delay]`` items, e.g.
    ``"429=0.05,503=0.05,latency=0.1:0.2,timeout=0.01,drop_after_commit=0.2"``. ``drop_after_commit``
    applies only to writes: the write is committed, then the connection is dropped with no response.
    ``drop`` drops the connection before anything is applied. ``timeout`` sleeps ``delay`` seconds
    (default 30) before answering, so the client times out. Kinds may be limited to writes with a
    ``w:`` prefix (``w:503=0.1``).
    """

    def __init__(self, spec: str | dict[str, float] | None = None, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rules: list[tuple[str, float, float, bool]] = []  # kind, p, delay, writes_only
        self.injected: dict[str, int] = {}
        if isinstance(spec, dict):
            spec = ",".join(f"{k}={v}" for k, v in spec.items())
        if spec:
            for item in spec.split(","):
                item = item.strip()
                if not item:
                    continue
                writes_only = item.startswith("w:")
                item = item.removeprefix("w:")
                if "=" not in item:
                    raise ValueError(f"fault spec item {item!r}: expected kind=probability[:delay]")
                kind, rest = item.split("=", 1)
                kind = kind.strip()
                if kind not in _FAULT_KINDS:
                    raise ValueError(f"fault spec: unknown kind {kind!r} (known: {sorted(_FAULT_KINDS)})")
                prob_s, _, delay_s = rest.partition(":")
                try:
                    prob = float(prob_s)
                    delay = float(delay_s) if delay_s else (30.0 if kind == "timeout" else 0.0)
                except ValueError as exc:
                    raise ValueError(f"fault spec item {item!r}: {exc}") from None
                if not 0 <= prob <= 1:
                    raise ValueError(f"fault spec item {item!r}: probability must be in [0, 1]")
                self.rules.append((kind, prob, delay, writes_only or kind == "drop_after_commit"))

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def decide(self, is_write: bool) -> Fault | None:
        """Draw the fault (if any) for one request."""
        with self._lock:
            for kind, prob, delay, writes_only in self.rules:
                if writes_only and not is_write:
                    continue
                if self._rng.random() < prob:
                    self.injected[kind] = self.injected.get(kind, 0) + 1
                    return Fault(kind, delay)
        return None


class WindowLimit:
    """A sliding-window request limit (``limit`` requests per ``window`` virtual seconds)."""

    def __init__(self, clock: Clock, limit: int, window: float, name: str) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.name = name
        self._hits: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        while self._hits and self._hits[0] <= now - self.window:
            self._hits.popleft()

    def try_acquire(self) -> tuple[bool, int, float]:
        """Count one request. Returns (allowed, remaining, real seconds until a slot frees)."""
        with self._lock:
            now = self.clock.now()
            self._trim(now)
            if len(self._hits) >= self.limit:
                wait = self._hits[0] + self.window - now
                return False, 0, max(self.clock.to_real(wait), 0.001)
            self._hits.append(now)
            return True, self.limit - len(self._hits), 0.0

    def remaining(self) -> int:
        with self._lock:
            self._trim(self.clock.now())
            return self.limit - len(self._hits)

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()


class ConcurrencyGate:
    """Counts requests in flight; ``enter`` fails when ``limit`` are already running."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._n = 0
        self.peak = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self._n >= self.limit:
                return False
            self._n += 1
            self.peak = max(self.peak, self._n)
            return True

    def leave(self) -> None:
        with self._lock:
            self._n -= 1


@dataclass
class SandboxRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    base_url: str
    params: dict[str, str] = field(default_factory=dict)  # path parameters from the route

    def arg(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def args(self, name: str) -> list[str]:
        """All values of a repeated or comma-separated query parameter."""
        out: list[str] = []
        for v in self.query.get(name, []):
            out.extend(p for p in v.split(",") if p)
        return out

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        if not self.body:
            return None
        return json.loads(self.body)

    @property
    def is_write(self) -> bool:
        return self.method in {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class SandboxResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Set by the app when the fault plan asks to drop the connection after committing.
    drop: bool = False


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> SandboxResponse:
    h = {"Content-Type": "application/json; charset=utf-8"}
    if headers:
        h.update(headers)
    return SandboxResponse(status, json.dumps(payload, default=str).encode(), h)


class DropConnection(Exception):
    """Raised inside the transport when the sandbox drops the connection without a response."""


Handler = Callable[[SandboxRequest], SandboxResponse]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    is_write: bool


class SandboxApp:
    """Base of every vendor sandbox: routing, fault injection, request log and counters.

    Subclasses register routes with :meth:`route` and implement :meth:`authorize` (return a response to
    reject the request) and :meth:`pre_request` (rate limits; return a response to reject).
    """

    vendor = "sandbox"

    def __init__(self, *, seed: int = 0, faults: str | FaultPlan | None = None, clock: Clock | None = None):
        self.seed = seed
        self.clock = clock or Clock()
        self.faults = faults if isinstance(faults, FaultPlan) else FaultPlan(faults, seed=seed)
        self.routes: list[Route] = []
        self.lock = threading.RLock()  # guards the vendor's data
        self.request_log: list[dict[str, Any]] = []
        self.calls = 0
        self.base_url = "http://127.0.0.1"

    # -- routing ---------------------------------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Handler, *, is_write: bool | None = None) -> None:
        """Register ``handler`` for ``method`` and a path pattern with ``{name}`` placeholders."""
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern.rstrip("/")) + "/?$"
        write = method in {"POST", "PUT", "PATCH", "DELETE"} if is_write is None else is_write
        self.routes.append(Route(method, re.compile(regex), handler, write))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for r in self.routes:
            if r.method != method:
                continue
            m = r.pattern.match(path)
            if m:
                return r, m.groupdict()
        return None

    # -- hooks -----------------------------------------------------------------------------------
    def authorize(self, req: SandboxRequest) -> SandboxResponse | None:
        return None

    def pre_request(self, req: SandboxRequest, route: Route) -> SandboxResponse | None:
        return None

    def post_request(self, req: SandboxRequest, resp: SandboxResponse) -> None:
        """Hook to add headers (remaining limits...) to every answered response."""

    def not_found(self, req: SandboxRequest) -> SandboxResponse:
        return json_response(404, {"message": f"no route for {req.method} {req.path}"})

    def fault_response(self, req: SandboxRequest, kind: str) -> SandboxResponse:
        """The vendor-shaped body for an injected 429/5xx."""
        return json_response(int(kind), {"message": f"injected fault {kind}"})

    def is_exempt(self, req: SandboxRequest) -> bool:
        """Requests never subject to faults (token endpoint, sandbox admin)."""
        return req.path.startswith("/_sandbox")

    # -- dispatch --------------------------------------------------------------------------------
    def handle(self, req: SandboxRequest) -> SandboxResponse:
        self.calls += 1
        self.base_url = req.base_url
        if req.path.startswith("/_sandbox/"):
            return self.admin(req)
        found = self.match(req.method, req.path)
        if found is None:
            return self.not_found(req)
        route, params = found
        req.params = params
        denied = self.authorize(req)
        if denied is not None:
            return denied
        fault = None if self.is_exempt(req) else self.faults.decide(route.is_write)
        if fault is not None:
            if fault.kind == "latency" or fault.kind == "timeout":
                time.sleep(fault.delay)
            elif fault.kind == "drop":
                raise DropConnection()
            elif fault.kind != "drop_after_commit":
                resp = self.fault_response(req, fault.kind)
                if fault.kind == "429":
                    resp.headers.setdefault("Retry-After", "1")
                self.post_request(req, resp)
                return resp
        limited = self.pre_request(req, route)
        if limited is not None:
            self.post_request(req, limited)
            return limited
        self.request_log.append(
            {"method": req.method, "path": req.path, "at": time.time(), "write": route.is_write}
        )
        resp = route.handler(req)
        self.post_request(req, resp)
        if fault is not None and fault.kind == "drop_after_commit":
            raise DropConnection()
        return resp

    def admin(self, req: SandboxRequest) -> SandboxResponse:
        """``GET /_sandbox/stats``: counters, for tests and benchmarks; ``PUT /_sandbox/faults`` with
        ``{"spec": "..."}`` replaces the fault plan (an empty spec turns faults off)."""
        path = req.path.rstrip("/")
        if path == "/_sandbox/stats":
            return json_response(200, self.stats())
        if path == "/_sandbox/faults" and req.method == "PUT":
            body = req.json() or {}
            try:
                plan = FaultPlan(str(body.get("spec") or ""), seed=self.seed)
            except ValueError as exc:
                return json_response(400, {"message": str(exc)})
            injected = self.faults.injected
            self.faults = plan
            self.faults.injected.update(injected)  # counters keep what was injected so far
            return json_response(200, {"spec": body.get("spec") or ""})
        return self.not_found(req)

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "faults_injected": dict(self.faults.injected)}

    # -- persistence (the demo keeps its simulated vendors between runs) ---------------------------
    #: Names of the attributes that hold the vendor's data; subclasses list theirs.
    state_attrs: tuple[str, ...] = ()

    def save(self, path: Path) -> None:
        """Write the vendor data to ``path`` atomically (a private file the sandbox itself reads back)."""
        with self.lock:
            data = {name: getattr(self, name) for name in self.state_attrs}
            blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)

    def load(self, path: Path) -> bool:
        """Restore vendor data saved by :meth:`save`; returns False when there is none."""
        if not path.exists():
            return False
        # The file is one this program wrote into the user's own work directory, never downloaded.
        data = pickle.loads(path.read_bytes())  # noqa: S301
        with self.lock:
            for name in self.state_attrs:
                if name in data:
                    setattr(self, name, data[name])
        return True

    # -- httpx integration -----------------------------------------------------------------------
    def handle_httpx(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        req = SandboxRequest(
            method=request.method,
            path=url.path,
            query=parse_qs(url.query.decode(), keep_blank_values=True),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=request.read(),
            base_url=f"{url.scheme}://{url.netloc.decode()}",
        )
        try:
            resp = self.handle(req)
        except DropConnection:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            ) from None
        return httpx.Response(resp.status, headers=resp.headers, content=resp.body, request=request)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle_httpx)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go in two writes; without this, keep-alive clients stall ~40 ms per request.
    disable_nagle_algorithm = True
    server: SandboxServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        req = SandboxRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            base_url=f"http://{host}",
        )
        try:
            resp = self.server.app.handle(req)
        except DropConnection:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        except Exception as exc:  # a sandbox bug must answer 500, not hang the client
            resp = json_response(500, {"message": f"sandbox error: {type(exc).__name__}: {exc}"})
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if resp.status != 204 and resp.status != 304:
            self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body and resp.status not in (204, 304):
            self.wfile.write(resp.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: SandboxApp, host: str, port: int) -> None:
        self.app = app
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> SandboxServer:
        self._thread = threading.Thread(target=self.serve_forever, name=f"sandbox-{self.app.vendor}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def serve(app: SandboxApp, port: int = 0, host: str = "127.0.0.1") -> SandboxServer:
    """Serve ``app`` on ``host:port`` (0 = any free port) in a background thread."""
    if host not in {"127.0.0.1", "localhost", "::1"}:
        raise ValueError("sandboxes listen on the loopback interface only")
    return SandboxServer(app, host, port).start()


def paginate(items: list[Any], start: int, size: int) -> tuple[list[Any], int | None]:
    """Slice ``items`` from ``start``; returns the page and the next start (None at the end)."""
    page = items[start : start + size]
    nxt = start + size if start + size < len(items) else None
    return page, nxt


def chunks(seq: Iterable[Any], n: int) -> Iterable[list[Any]]:
    buf: list[Any] = []
    for x in seq:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
