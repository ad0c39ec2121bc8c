"""Outgoing webhooks for the sandboxes: a queue of events delivered from a background thread.

A CRM or ledger sandbox sends webhooks as its vendor does once a target is registered
(``POST /_sandbox/webhooks``): each change of a record becomes one or more events, the sender gathers
them for a moment, cuts them into requests of at most ``batch_size`` events, has the vendor sandbox render
and sign each request (``build``), and POSTs it to the target. A request answered with anything but 2xx,
or not answered, is retried (the retry is built again with the attempt number, as the vendors count their
attempts) up to ``max_attempts`` times, ``retry_delay_s`` apart. ``deliveries`` > 1 sends every delivered
request that many times, byte for byte, to test that the receiver processes a duplicate once.

A sandbox either emits events where its records change (HubSpot, Pipedrive) or gives a ``poll`` function that
compares its records with what it last reported (Xero, whose documents change in many places).

Sending is off by default. A registration lives with the running sandbox object only: ``save()`` does not
write it, ``load()`` keeps the one in force. The delivery counters (``stats()``) never show a secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from connectors.sandboxkit import SandboxRequest, SandboxResponse, json_response

__all__ = [
    "Build",
    "WebhookSender",
    "WebhookTarget",
    "basic_authorization",
    "compact_json",
    "epoch_ms",
    "host_of",
    "iso_ms_utc",
    "new_event_id",
    "new_uuid",
    "post_once",
    "random_key",
    "random_letters",
    "sign_hubspot_v1",
    "sign_hubspot_v3",
    "sign_xero",
    "webhook_admin",
]

#: ``build(events, attempt)`` -> (body, headers): one signed request of the vendor; ``attempt`` counts from 0.
Build = Callable[[list[dict[str, Any]], int], tuple[bytes, dict[str, str]]]


@dataclass(frozen=True)
class WebhookTarget:
    """Where and how a sandbox delivers its webhooks (the options of ``POST /_sandbox/webhooks``)."""

    url: str
    deliveries: int = 1
    max_attempts: int = 3
    retry_delay_s: float = 0.5
    batch_size: int = 100
    gather_s: float = 0.05
    timeout_s: float = 5.0

    @classmethod
    def from_body(cls, body: Any, *, batch_size: int = 100) -> WebhookTarget:
        """Read the registration body; raises ValueError naming what is wrong."""
        if not isinstance(body, Mapping):
            raise ValueError("expected a JSON object with at least 'url'")
        url = body.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("'url' must be an http(s) URL")

        def number(name: str, default: float, low: float, high: float, *, integer: bool = False) -> Any:
            value = body.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or (integer and int(value) != value):
                raise ValueError(f"'{name}' must be a {'whole ' if integer else ''}number")
            if not low <= value <= high:
                raise ValueError(f"'{name}' must be between {low:g} and {high:g}")
            return int(value) if integer else float(value)

        return cls(
            url=str(url),
            deliveries=number("deliveries", 1, 1, 100, integer=True),
            max_attempts=number("max_attempts", 3, 1, 10, integer=True),
            retry_delay_s=number("retry_delay_s", 0.5, 0, 60),
            batch_size=number("batch_size", batch_size, 1, batch_size, integer=True),
            gather_s=number("gather_s", 0.05, 0, 10),
            timeout_s=number("timeout_s", 5.0, 0.1, 60),
        )

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "deliveries": self.deliveries, "max_attempts": self.max_attempts,
                "retry_delay_s": self.retry_delay_s, "batch_size": self.batch_size, "gather_s": self.gather_s,
                "timeout_s": self.timeout_s}


class WebhookSender:
    """Delivers the events given to :meth:`emit` to ``target`` from a background thread (see the module)."""

    def __init__(self, target: WebhookTarget, build: Build, *, name: str = "sandbox-webhooks",
                 poll: Callable[[], Sequence[dict[str, Any]]] | None = None, poll_s: float = 0.1) -> None:
        """``poll``, when given, is called every ``poll_s`` seconds on a thread of its own and returns the events
        to send (for a sandbox that finds its changes by comparing its records rather than at each write)."""
        self.target = target
        self._build = build
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._busy = False
        self.requests = 0  # POSTs made, copies and retries included
        self.delivered_events = 0
        self.failed_events = 0
        self.statuses: dict[str, int] = {}
        #: The latest requests: ``{at, events, attempt, copy, status}`` (status None: no answer).
        self.log: deque[dict[str, Any]] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._poller: threading.Thread | None = None
        self._poll_s = poll_s
        if poll is not None:
            self._poller = threading.Thread(target=self._poll, args=(poll, poll_s), name=f"{name}-poll", daemon=True)
            self._poller.start()

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        """Queue events for delivery (nothing when the sender is stopped)."""
        if not events:
            return
        with self._cond:
            if self._stopped:
                return
            self._queue.extend(events)
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending; events still queued are dropped."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()
        for thread in (self._thread, self._poller):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was delivered (or given up); False on timeout. With a poller, changes
        made before the call are found first (one poll interval)."""
        deadline = time.monotonic() + timeout
        if self._poller is not None:
            self._sleep(self._poll_s * 2)
        with self._cond:
            while (self._queue or self._busy) and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self.target.public(), "active": not self._stopped, "queued": len(self._queue),
                    "requests": self.requests, "delivered_events": self.delivered_events,
                    "failed_events": self.failed_events, "statuses": dict(self.statuses)}

    # -- the threads -------------------------------------------------------------------------------
    def _poll(self, poll: Callable[[], Sequence[dict[str, Any]]], every_s: float) -> None:
        while self._sleep(every_s):
            self.emit(poll())

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped meanwhile; True when still running."""
        with self._cond:
            if seconds > 0 and not self._stopped:
                self._cond.wait_for(lambda: self._stopped, seconds)
            return not self._stopped

    def _run(self) -> None:
        with httpx.Client(timeout=self.target.timeout_s) as client:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped or bool(self._queue))
                    if self._stopped:
                        return
                    self._busy = True
                try:
                    # Changes made together (one batch update) go out together, as the vendors batch them.
                    if not self._sleep(self.target.gather_s):
                        return
                    with self._cond:
                        batch = [self._queue.popleft() for _ in range(min(self.target.batch_size, len(self._queue)))]
                    if batch:
                        self._deliver(client, batch)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def _post(self, client: httpx.Client, body: bytes, headers: dict[str, str], n: int, attempt: int,
              copy: int) -> int | None:
        try:
            status: int | None = client.post(self.target.url, content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = None
        with self._cond:
            self.requests += 1
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            self.log.append({"at": time.time(), "events": n, "attempt": attempt, "copy": copy, "status": status})
        return status

    def _deliver(self, client: httpx.Client, events: list[dict[str, Any]]) -> None:
        for attempt in range(self.target.max_attempts):
            body, headers = self._build(events, attempt)
            status = self._post(client, body, headers, len(events), attempt, 0)
            if status is not None and 200 <= status < 300:
                for copy in range(1, self.target.deliveries):
                    self._post(client, body, headers, len(events), attempt, copy)
                with self._cond:
                    self.delivered_events += len(events)
                return
            if attempt + 1 < self.target.max_attempts and not self._sleep(self.target.retry_delay_s):
                return
        with self._cond:
            self.failed_events += len(events)


# --------------------------------------------------------------------------------------------------
# Signing, as each vendor signs (written apart from the receiver's checks, so that each tests the other)
# --------------------------------------------------------------------------------------------------

#: The escapes HubSpot decodes in the URL before hashing it (: / ? @ ! $ ' ( ) * , ;).
_HUBSPOT_UNESCAPED = re.compile("|".join(("%3A", "%2F", "%3F", "%40", "%21", "%24", "%27", "%28", "%29", "%2A",
                                          "%2C", "%3B")), re.IGNORECASE)


def sign_hubspot_v3(secret: str, method: str, url: str, body: bytes, timestamp: str) -> str:
    """``X-HubSpot-Signature-v3``: base64 HMAC-SHA256 with the app's client secret over method, URL (with
    HubSpot's listed escapes decoded), body and ``X-HubSpot-Request-Timestamp``."""
    uri = _HUBSPOT_UNESCAPED.sub(lambda m: unquote(m.group(0)), url)
    mac = hmac.new(secret.encode("utf-8"), f"{method}{uri}".encode() + body + timestamp.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


def sign_hubspot_v1(secret: str, body: bytes) -> str:
    """``X-HubSpot-Signature`` version v1: hex SHA-256 of the client secret followed by the body."""
    return hashlib.sha256(secret.encode("utf-8") + body).hexdigest()


def sign_xero(key: str, body: bytes) -> str:
    """``x-xero-signature``: base64 HMAC-SHA256 of the raw body with the webhook key."""
    return base64.b64encode(hmac.new(key.encode("utf-8"), body, hashlib.sha256).digest()).decode("ascii")


def basic_authorization(user: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic credentials (Pipedrive's ``http_auth_*``)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def new_event_id() -> int:
    """A fresh event id, unique across sandbox restarts (a receiver remembers ids for days)."""
    return secrets.randbelow(2**53 - 10**12) + 10**12


def epoch_ms() -> int:
    """Now in epoch milliseconds on the real clock (webhook timestamps tell when a request is sent)."""
    return int(time.time() * 1000)


def new_uuid() -> str:
    """A fresh random uuid (event and correlation ids)."""
    return str(uuid.uuid4())


def iso_ms_utc(epoch_seconds: float, *, zulu: bool = True) -> str:
    """``2024-01-01T10:20:00.123Z`` (``zulu=False``: without the ``Z``, as Xero writes ``eventDateUtc``)."""
    text = dt.datetime.fromtimestamp(math.floor(epoch_seconds * 1000) / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text[:-3] + ("Z" if zulu else "")


def host_of(url: str) -> str:
    return urlsplit(url).netloc


def random_letters(n: int = 20) -> str:
    """Random upper-case letters (Xero's ``entropy`` field)."""
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(n))


def random_key() -> str:
    """A random webhook key or secret, base64 (Xero's webhook keys look so)."""
    return base64.b64encode(secrets.token_bytes(48)).decode("ascii")


def post_once(url: str, body: bytes, headers: Mapping[str, str], timeout: float = 5.0) -> tuple[int | None, float]:
    """POST once; returns the status (None: no answer) and the seconds it took."""
    started = time.monotonic()
    try:
        status: int | None = httpx.post(url, content=body, headers=dict(headers), timeout=timeout).status_code
    except httpx.HTTPError:
        status = None
    return status, time.monotonic() - started


def compact_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


# --------------------------------------------------------------------------------------------------
# The admin endpoints every sending sandbox shares
# --------------------------------------------------------------------------------------------------

#: ``start(body)`` -> (a started sender, what to add to the answer); raises ValueError on a bad body.
Start = Callable[[Mapping[str, Any]], tuple[WebhookSender, dict[str, Any]]]


def webhook_admin(req: SandboxRequest, current: WebhookSender | None,
                  start: Start) -> tuple[SandboxResponse, WebhookSender | None]:
    """Serve ``/_sandbox/webhooks``; returns the answer and the sender now in force.

    ``POST /_sandbox/webhooks`` registers a target (replacing the one in force; the body's options are
    :class:`WebhookTarget`'s plus the vendor's secret), ``GET`` reports the target and its counters,
    ``DELETE`` turns sending off, ``POST /_sandbox/webhooks/wait`` (``{"timeout": s}``) waits until every
    queued event was delivered (``{"idle": true}``).
    """
    path = req.path.rstrip("/")
    if path == "/_sandbox/webhooks" and req.method == "GET":
        return json_response(200, current.stats() if current is not None else {"active": False}), current
    if path == "/_sandbox/webhooks" and req.method == "DELETE":
        if current is not None:
            current.stop()
        return SandboxResponse(204), None
    if path == "/_sandbox/webhooks" and req.method == "POST":
        try:
            body = req.json()
            sender, extra = start(body if isinstance(body, Mapping) else {})
        except (ValueError, TypeError) as exc:
            return json_response(400, {"message": str(exc)}), current
        if current is not None:
            current.stop()
        return json_response(200, {**sender.stats(), **extra}), sender
    if path == "/_sandbox/webhooks/wait" and req.method == "POST":
        body = req.json() if req.body else {}
        timeout = float((body or {}).get("timeout", 10.0)) if isinstance(body, Mapping) else 10.0
        idle = current.wait_idle(min(max(timeout, 0.0), 120.0)) if current is not None else True
        return json_response(200, {"idle": idle, **(current.stats() if current is not None else {})}), current
    return json_response(404, {"message": f"no route for {req.method} {req.path}"}), current
