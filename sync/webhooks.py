"""Webhook-driven syncs: verify what HubSpot, Pipedrive and Xero push, remember it once, trigger a run.

A webhook is a hint, never the data: a verified, new event only asks for the pipeline's normal incremental
job to run soon, and that job re-reads the vendor. Scheduled runs still happen, so a lost webhook costs
latency, never correctness.

Integration contract (for the HTTP server that hosts the receiver)
------------------------------------------------------------------

Build one receiver per daemon::

    receiver = WebhookReceiver(config, store, trigger, debounce_s=2.0, public_url=None)

- ``config``: the :class:`~config.loader.LoadedConfig`; ``store``: the open :class:`~sync.state.StateStore`;
- ``trigger(pipeline, job)``: called at most once per ``(pipeline, job)`` per debounce window, on the
  receiver's :class:`Debouncer` thread (one thread per firing, never two at once for the same key), with
  ``job`` ``"sync"`` (a CRM event) or ``"ledger"`` (a ledger event). It should hand the job to the
  scheduler and return; an exception it raises is logged and does not stop later triggers;
- ``public_url``: the scheme, host and path prefix the vendors call (``https://hooks.example.com``), when a
  proxy stands in front of the daemon. HubSpot signs the full URL it called; without ``public_url`` the
  receiver rebuilds it from the ``Host`` header (``X-Forwarded-Proto``/``X-Forwarded-Host`` when present)
  and tries https, then http.

For every request whose path starts with ``/webhooks/``, the server calls::

    status, body = receiver.handle(method, path, headers, body, now=None)

- ``method``: the HTTP method; ``path``: the request target as received (path and query string, not
  decoded: ``BaseHTTPRequestHandler.path``); ``headers``: a mapping of the request headers (any case);
  ``body``: the raw body bytes, not parsed; ``now``: epoch seconds (default ``time.time()``).
- It answers ``(status, body_bytes)``: 200 (accepted, duplicates included; an empty body for Xero, which
  wants none, else a small JSON object), 400 (malformed after a valid signature), 401 (authentication
  failed, empty body), 404 (no such pipeline, vendor, or no webhook secret configured), 405 (not POST), 413
  (body over :data:`MAX_BODY_BYTES`), 503 (the state store failed) or 500 (a bug; both make the vendor
  retry). Send a non-empty body as ``application/json``. ``handle`` never raises and is thread-safe.
- The server should answer 413 itself, without reading the body, when ``Content-Length`` exceeds
  ``receiver.max_body``; and it must not log request bodies or headers (the receiver logs what matters:
  ``webhook rejected`` with pipeline, vendor and reason; ``webhook received`` with counts).

Endpoints are ``/webhooks/<pipeline>/<vendor>``, one per pipeline and vendor with a configured secret
(``receiver.endpoints()`` lists them): ``hubspot`` (crm ``client_secret``), ``pipedrive`` (crm
``webhook_user`` and ``webhook_password``), ``xero`` (ledger ``webhook_key``). Call ``receiver.close()`` at
shutdown: triggers still waiting for their window are dropped (the schedule catches up).

What is checked
---------------

- HubSpot: ``X-HubSpot-Signature-v3`` = base64(HMAC-SHA256(client secret, method + URI + body +
  timestamp)), the timestamp from ``X-HubSpot-Request-Timestamp`` (epoch ms) refused when more than 5 minutes
  old (or ahead); the URI with the characters HubSpot's documentation lists (``%3A %2F %3F %40 %21 %24 %27
  %28 %29 %2A %2C %3B``) decoded. Event id: ``eventId``.
- Pipedrive: HTTP Basic credentials set on the webhook (``http_auth_user``/``http_auth_password``). Event
  id: ``meta.id`` in webhooks v2 (one id per event); in v1, the webhook id, object, object id, action and
  timestamp; else a hash of the body.
- Xero: ``x-xero-signature`` = base64(HMAC-SHA256(webhook key, raw body)). The intent-to-receive check (a
  payload with no events, correctly signed or not) gets 200 or 401 and nothing else. Xero events carry no
  id: tenant, category, resource id, event type and event date make one.

Every comparison of a signature or credential uses :func:`hmac.compare_digest`. Verified event ids go to the
state store's ``webhook_events`` table (INSERT ... ON CONFLICT DO NOTHING), so the same event delivered ten
times triggers once; ids are kept 7 days. An event is remembered when it is received, not when the run it
triggered succeeds: a failed run is retried by the schedule, not by the vendor's redelivery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import structlog
from pydantic import SecretStr
from sqlalchemy.exc import SQLAlchemyError

from config.loader import LoadedConfig
from config.schema import ConnectorSettings
from connectors.errors import ConfigError
from sync.state import StateError, StateStore

__all__ = [
    "DEFAULT_DEBOUNCE_S",
    "HUBSPOT_MAX_AGE_S",
    "MAX_BODY_BYTES",
    "WEBHOOK_VENDORS",
    "Debouncer",
    "WebhookReceiver",
    "hubspot_canonical_uri",
    "hubspot_v3_signature",
    "pipedrive_event_id",
    "verify_basic_auth",
    "verify_hubspot_v3",
    "verify_xero",
    "xero_event_id",
    "xero_signature",
]

log = structlog.get_logger("ledgerbridge.webhooks")

MAX_BODY_BYTES = 1024 * 1024
"""Largest webhook body accepted (HubSpot sends at most 100 events a request; Xero and Pipedrive less)."""

HUBSPOT_MAX_AGE_S = 300.0
"""HubSpot: "Reject the request if the timestamp is older than 5 minutes"."""

DEFAULT_DEBOUNCE_S = 2.0

_PRUNE_EVERY_S = 3600.0

Trigger = Callable[[str, str], None]


# --------------------------------------------------------------------------------------------------
# Signatures and credentials
# --------------------------------------------------------------------------------------------------

#: The percent-escapes HubSpot's v3 validation decodes in the request URI before hashing.
_HUBSPOT_DECODED = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def _same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality of two strings or byte strings."""
    return hmac.compare_digest(a.encode() if isinstance(a, str) else a, b.encode() if isinstance(b, str) else b)


def hubspot_canonical_uri(uri: str) -> str:
    """The URI as HubSpot hashes it: the escapes of ``: / ? @ ! $ ' ( ) * , ;`` decoded, nothing else."""
    return _HUBSPOT_DECODED.sub(lambda m: unquote(m.group(0)), uri)


def hubspot_v3_signature(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """base64(HMAC-SHA256(secret, method + URI + body + timestamp)), the URI taken as HubSpot hashes it."""
    message = method.upper().encode() + hubspot_canonical_uri(uri).encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def verify_hubspot_v3(secret: str, *, method: str, uris: list[str] | tuple[str, ...] | str, body: bytes,
                      timestamp: str | None, signature: str | None, now: float,
                      max_age_s: float = HUBSPOT_MAX_AGE_S) -> str | None:
    """Check a HubSpot v3 signature; returns why it fails, or None when it holds.

    ``uris`` are the URLs the request may have been sent to (the signature must match one);
    ``timestamp`` is ``X-HubSpot-Request-Timestamp`` in epoch milliseconds, refused when it is more than
    ``max_age_s`` away from ``now`` (epoch seconds), before or after.
    """
    if not signature:
        return "missing X-HubSpot-Signature-v3"
    if not timestamp:
        return "missing X-HubSpot-Request-Timestamp"
    try:
        sent_ms = int(timestamp.strip())
    except ValueError:
        return "malformed timestamp"
    age_s = now - sent_ms / 1000
    if age_s > max_age_s:
        return "stale timestamp"
    if -age_s > max_age_s:
        return "timestamp in the future"
    candidates = [uris] if isinstance(uris, str) else list(uris)
    # Every candidate is hashed and compared, so the time taken says nothing about which one matched.
    matched = False
    for uri in candidates:
        matched |= _same(hubspot_v3_signature(secret, method, uri, body, timestamp.strip()), signature.strip())
    return None if matched else "bad signature"


def xero_signature(key: str, body: bytes) -> str:
    """base64(HMAC-SHA256(webhook key, raw body)), as in ``x-xero-signature``."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def verify_xero(key: str, body: bytes, signature: str | None) -> str | None:
    """Check ``x-xero-signature``; returns why it fails, or None when it holds."""
    if not signature:
        return "missing x-xero-signature"
    return None if _same(xero_signature(key, body), signature.strip()) else "bad signature"


def verify_basic_auth(authorization: str | None, user: str, password: str) -> str | None:
    """Check an ``Authorization: Basic`` header against the expected credentials (Pipedrive webhooks)."""
    if not authorization:
        return "missing credentials"
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return "not HTTP Basic credentials"
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "malformed credentials"
    given_user, sep, given_password = decoded.partition(b":")
    if not sep:
        return "malformed credentials"
    # Both parts are always compared: no early exit tells a wrong user from a wrong password.
    user_ok = _same(given_user, user.encode())
    password_ok = _same(given_password, password.encode())
    return None if user_ok and password_ok else "bad credentials"


# --------------------------------------------------------------------------------------------------
# Event ids
# --------------------------------------------------------------------------------------------------


def _body_hash(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def pipedrive_event_id(payload: Any, body: bytes) -> str:
    """The dedupe id of one Pipedrive webhook: ``meta.id`` (v2, one id per event), else the v1 meta block's
    webhook id, object, object id, action and timestamp (the retry counter left out), else a body hash."""
    meta = payload.get("meta") if isinstance(payload, dict) else None
    if not isinstance(meta, dict):
        return _body_hash(body)
    if meta.get("id") and (meta.get("version") == "2.0" or "entity" in meta or "entity_id" in meta):
        return _text(meta["id"])
    parts = [meta.get("webhook_id"), meta.get("object"), meta.get("id"), meta.get("action"),
             meta.get("timestamp_micro") or meta.get("timestamp")]
    if meta.get("webhook_id") and meta.get("id") and parts[4]:
        return "v1:" + ":".join(_text(p) for p in parts)
    return _body_hash(body)


def xero_event_id(event: Mapping[str, Any]) -> str:
    """Xero events carry no id: tenant, category, resource, event type and event date make one."""
    return "|".join(_text(event.get(k)) for k in ("tenantId", "eventCategory", "resourceId", "eventType",
                                                  "eventDateUtc"))


class _Malformed(Exception):
    pass


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _Malformed("body is not JSON") from None


def _hubspot_ids(body: bytes) -> list[str]:
    events = _json(body)
    if not isinstance(events, list):
        raise _Malformed("expected a JSON array of events")
    ids = []
    for event in events:
        if not isinstance(event, dict):
            raise _Malformed("expected event objects")
        event_id = event.get("eventId")
        if event_id is None or event_id == "":
            rest = {k: v for k, v in event.items() if k != "attemptNumber"}
            ids.append(_body_hash(json.dumps(rest, sort_keys=True, default=str).encode()))
        else:
            ids.append(_text(event_id))
    return ids


def _pipedrive_ids(body: bytes) -> list[str]:
    payload = _json(body)
    if not isinstance(payload, dict):
        raise _Malformed("expected a JSON object")
    return [pipedrive_event_id(payload, body)]


def _xero_ids(body: bytes) -> list[str]:
    payload = _json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("events", []), list):
        raise _Malformed("expected a JSON object with an events array")
    events = payload.get("events") or []
    if not all(isinstance(e, dict) for e in events):
        raise _Malformed("expected event objects")
    return [xero_event_id(e) for e in events]


# --------------------------------------------------------------------------------------------------
# The vendors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    now: float
    uris: tuple[str, ...]
    max_age_s: float = HUBSPOT_MAX_AGE_S


@dataclass(frozen=True)
class _Vendor:
    name: str
    kind: str  # "crm" | "ledger": the pipeline block holding the secret
    job: str
    #: The secrets the check needs, from the settings; None when webhooks are not configured.
    secrets: Callable[[ConnectorSettings], tuple[str, ...] | None]
    check: Callable[[tuple[str, ...], _Request], str | None]
    event_ids: Callable[[bytes], list[str]]
    ok_body: bool = True  # Xero wants an empty 200


def _secret(settings: ConnectorSettings, name: str) -> str | None:
    value = getattr(settings, name, None)
    if isinstance(value, SecretStr):
        text = value.get_secret_value()
        return text or None
    return None


def _secrets_of(*names: str) -> Callable[[ConnectorSettings], tuple[str, ...] | None]:
    def get(settings: ConnectorSettings) -> tuple[str, ...] | None:
        values = [_secret(settings, n) for n in names]
        if any(v is None for v in values):
            return None
        return tuple(v for v in values if v is not None)

    return get


def _check_hubspot(secrets: tuple[str, ...], req: _Request) -> str | None:
    return verify_hubspot_v3(secrets[0], method=req.method, uris=req.uris, body=req.body,
                             timestamp=req.headers.get("x-hubspot-request-timestamp"),
                             signature=req.headers.get("x-hubspot-signature-v3"), now=req.now,
                             max_age_s=req.max_age_s)


def _check_pipedrive(secrets: tuple[str, ...], req: _Request) -> str | None:
    return verify_basic_auth(req.headers.get("authorization"), secrets[0], secrets[1])


def _check_xero(secrets: tuple[str, ...], req: _Request) -> str | None:
    return verify_xero(secrets[0], req.body, req.headers.get("x-xero-signature"))


WEBHOOK_VENDORS: dict[str, _Vendor] = {
    "hubspot": _Vendor("hubspot", "crm", "sync", _secrets_of("client_secret"), _check_hubspot, _hubspot_ids),
    "pipedrive": _Vendor("pipedrive", "crm", "sync", _secrets_of("webhook_user", "webhook_password"),
                         _check_pipedrive, _pipedrive_ids),
    "xero": _Vendor("xero", "ledger", "ledger", _secrets_of("webhook_key"), _check_xero, _xero_ids, ok_body=False),
}
"""The vendors whose webhooks are received, by the name in the endpoint path (the connector type)."""


# --------------------------------------------------------------------------------------------------
# Debouncer
# --------------------------------------------------------------------------------------------------


class Debouncer:
    """Coalesces triggers per ``(pipeline, job)``: the first one schedules ``callback(pipeline, job)`` after
    ``window_s``; those arriving before it fires join it.

    The wait is counted from the first trigger, so a steady stream of events still fires once per window
    rather than never. Each firing runs on its own thread; two firings of the same key never overlap (a
    key due while its previous firing runs fires when that one ends), different keys run side by side. A
    trigger arriving while its key's callback runs schedules one more firing, so no change is missed.
    Thread-safe. :meth:`stop` drops the triggers still waiting.
    """

    def __init__(self, callback: Trigger, window_s: float = DEFAULT_DEBOUNCE_S, *,
                 clock: Callable[[], float] = time.monotonic, name: str = "webhook-debouncer") -> None:
        if window_s < 0:
            raise ValueError("the debounce window must not be negative")
        self.callback = callback
        self.window_s = window_s
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._due: dict[tuple[str, str], float] = {}
        self._running: set[tuple[str, str]] = set()
        self._workers: set[threading.Thread] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: Per key: how many times the callback was called, and how many triggers joined a waiting one.
        self.fired: dict[tuple[str, str], int] = {}
        self.coalesced: dict[tuple[str, str], int] = {}

    def trigger(self, pipeline: str, job: str) -> bool:
        """Ask for ``callback(pipeline, job)``; True when this scheduled a firing, False when it joined one
        already waiting (or the debouncer is stopped)."""
        key = (pipeline, job)
        with self._cond:
            if self._stopped:
                return False
            if key in self._due:
                self.coalesced[key] = self.coalesced.get(key, 0) + 1
                return False
            self._due[key] = self._clock() + self.window_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def pending(self) -> list[tuple[str, str]]:
        """The keys waiting for their window to end."""
        with self._cond:
            return sorted(self._due)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits and nothing runs; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._due or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float = 10.0) -> None:
        """Drop waiting triggers, stop the timer thread, and wait up to ``timeout`` for running callbacks."""
        with self._cond:
            self._stopped = True
            dropped = sorted(self._due)
            self._due.clear()
            self._cond.notify_all()
            thread, workers = self._thread, list(self._workers)
        if dropped:
            log.info("webhook triggers dropped at shutdown", keys=[f"{p}/{j}" for p, j in dropped])
        end = time.monotonic() + timeout
        for t in ([thread] if thread is not None else []) + workers:
            if t is not threading.current_thread():
                t.join(max(end - time.monotonic(), 0.0))

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = self._clock()
                ready = [k for k, at in self._due.items() if at <= now and k not in self._running]
                for key in ready:
                    del self._due[key]
                    self._running.add(key)
                    worker = threading.Thread(target=self._fire, args=(key,), name=f"{self._name}-{key[0]}-{key[1]}",
                                              daemon=True)
                    self._workers.add(worker)
                    worker.start()
                # Keys whose previous firing still runs wait for its end (which notifies), not for a clock.
                waiting = [at for k, at in self._due.items() if k not in self._running]
                self._cond.wait(max(min(waiting) - now, 0.0) if waiting else None)

    def _fire(self, key: tuple[str, str]) -> None:
        try:
            self.callback(*key)
        except Exception:  # a failing trigger must not stop the next ones; it is logged with its traceback
            log.exception("webhook trigger failed", pipeline=key[0], job=key[1])
        finally:
            with self._cond:
                self._running.discard(key)
                self._workers.discard(threading.current_thread())
                self.fired[key] = self.fired.get(key, 0) + 1
                self._cond.notify_all()


# --------------------------------------------------------------------------------------------------
# Receiver
# --------------------------------------------------------------------------------------------------


def _reply(status: int, payload: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
    return status, (b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode())


class WebhookReceiver:
    """Receives vendor webhooks for the pipelines of ``config`` (see the module docstring for the contract)."""

    PREFIX = "/webhooks/"

    def __init__(
        self,
        config: LoadedConfig,
        store: StateStore,
        trigger: Trigger,
        *,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        public_url: str | None = None,
        max_body: int = MAX_BODY_BYTES,
        max_age_s: float = HUBSPOT_MAX_AGE_S,
        debouncer: Debouncer | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.max_body = max_body
        self.max_age_s = max_age_s
        self.public_url = public_url.rstrip("/") if public_url else None
        self.debouncer = debouncer if debouncer is not None else Debouncer(trigger, debounce_s)
        self._last_prune: float | None = None
        self._prune_lock = threading.Lock()

    # -- what is served ----------------------------------------------------------------------------
    def _settings(self, pipeline: str, vendor: _Vendor) -> ConnectorSettings | None:
        p = self.config.app.pipelines.get(pipeline)
        if p is None or not p.enabled:
            return None
        block = p.crm if vendor.kind == "crm" else p.ledger
        if block.type != vendor.name:
            return None
        return self.config.crm(pipeline) if vendor.kind == "crm" else self.config.ledger(pipeline)

    def endpoints(self) -> list[str]:
        """The paths served: one per enabled pipeline and vendor whose webhook secret is configured."""
        out = []
        for pipeline in self.config.app.pipelines:
            for vendor in WEBHOOK_VENDORS.values():
                settings = self._settings(pipeline, vendor)
                if settings is not None and vendor.secrets(settings) is not None:
                    out.append(f"{self.PREFIX}{pipeline}/{vendor.name}")
        return out

    def close(self) -> None:
        """Stop the debouncer (triggers still waiting for their window are dropped)."""
        self.debouncer.stop()

    # -- requests ----------------------------------------------------------------------------------
    def _uris(self, target: str, headers: Mapping[str, str]) -> tuple[str, ...]:
        if self.public_url:
            return (self.public_url + target,)
        host = headers.get("x-forwarded-host") or headers.get("host") or ""
        host = host.split(",")[0].strip()
        proto = (headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
        schemes = [proto] if proto in ("http", "https") else []
        schemes += [s for s in ("https", "http") if s not in schemes]
        return tuple(f"{s}://{host}{target}" for s in schemes)

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               now: float | None = None) -> tuple[int, bytes]:
        """Answer one webhook request: ``(status, body)``. Never raises.

        ``path`` is the request target as received, query string included (HubSpot signs the full URL).
        """
        target = path
        route = target.split("?", 1)[0]
        parts = route[len(self.PREFIX):].strip("/").split("/") if route.startswith(self.PREFIX) else []
        if len(parts) != 2:
            return _reply(404, {"error": "not found"})
        pipeline, vendor_name = parts
        vendor = WEBHOOK_VENDORS.get(vendor_name)
        try:
            settings = self._settings(pipeline, vendor) if vendor is not None else None
            secrets = vendor.secrets(settings) if vendor is not None and settings is not None else None
        except ConfigError:  # a config without this pipeline's blocks: not served
            secrets = None
        if vendor is None or secrets is None:
            return _reply(404, {"error": "not found"})
        if method.upper() != "POST":
            return _reply(405, {"error": "method not allowed"})
        if len(body) > self.max_body:
            self._rejected(pipeline, vendor.name, "body too large")
            return _reply(413, {"error": "body too large"})
        lowered = {k.lower(): v for k, v in headers.items()}
        req = _Request("POST", target, lowered, body, time.time() if now is None else now,
                       self._uris(target, lowered), self.max_age_s)
        try:
            return self._verified(pipeline, vendor, secrets, req)
        except Exception as exc:  # the vendor retries on 5xx; the body is never logged
            log.error("webhook failed", pipeline=pipeline, vendor=vendor.name, error=type(exc).__name__)
            return _reply(500, {"error": "internal error"})

    def _verified(self, pipeline: str, vendor: _Vendor, secrets: tuple[str, ...], req: _Request) -> tuple[int, bytes]:
        reason = vendor.check(secrets, req)
        if reason is not None:
            self._rejected(pipeline, vendor.name, reason)
            return _reply(401)
        try:
            ids = vendor.event_ids(req.body)
        except _Malformed as exc:
            self._rejected(pipeline, vendor.name, str(exc), status=400)
            return _reply(400, {"error": str(exc)})
        if not ids:
            # Xero's intent-to-receive (or an empty batch): the signature was right, nothing to do.
            log.info("webhook received", pipeline=pipeline, vendor=vendor.name, events=0, new=0)
            return _reply(200, {"received": 0, "new": 0} if vendor.ok_body else None)
        try:
            new = self.store.record_webhook_events(f"{vendor.name}:{pipeline}", pipeline, ids)
            self._maybe_prune()
        except (SQLAlchemyError, StateError, OSError) as exc:
            log.error("webhook not recorded: state store failed", pipeline=pipeline, vendor=vendor.name,
                      error=type(exc).__name__)
            return _reply(503, {"error": "state store unavailable"})
        scheduled = self.debouncer.trigger(pipeline, vendor.job) if new else False
        log.info("webhook received", pipeline=pipeline, vendor=vendor.name, events=len(ids), new=len(new),
                 job=vendor.job if new else None, scheduled=scheduled)
        return _reply(200, {"received": len(ids), "new": len(new)} if vendor.ok_body else None)

    def _rejected(self, pipeline: str, vendor: str, reason: str, status: int = 401) -> None:
        log.warning("webhook rejected", pipeline=pipeline, vendor=vendor, reason=reason, status=status)

    def _maybe_prune(self) -> None:
        """Forget events past their retention, at most once an hour (the store's clock decides their age)."""
        with self._prune_lock:
            now = time.monotonic()
            if self._last_prune is not None and now - self._last_prune < _PRUNE_EVERY_S:
                return
            self._last_prune = now
        removed = self.store.prune_webhook_events()
        if removed:
            log.info("webhook events pruned", removed=removed)
