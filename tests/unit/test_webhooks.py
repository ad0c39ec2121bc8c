"""Webhook receiver: signatures and credentials, intent to receive, dedupe, debouncing, routing, logging."""

from __future__ import annotations

import ast
import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr, ValidationError
from sqlalchemy.exc import OperationalError

import sync.webhooks as webhooks_module
from config.loader import LoadedConfig, loads
from connectors.pipedrive.settings import PipedriveSettings
from connectors.sandboxwebhooks import basic_authorization, sign_hubspot_v1, sign_hubspot_v3, sign_xero
from sync.state import WEBHOOK_EVENTS, StateStore
from sync.webhooks import (
    Debouncer,
    WebhookReceiver,
    hubspot_v3_signature,
    pipedrive_event_id,
    verify_basic_auth,
    verify_hubspot_v3,
    verify_xero,
    xero_event_id,
)
from tests.harness import SHARED

HS_SECRET = "hs-app-secret-2f6c1d"
XERO_KEY = "xero-webhook-key-9Qz0"
PD_USER, PD_PASSWORD = "lb-hook", "p4ss:with:colons"
HOST = "hooks.example.test"

CONFIG = f"""\
state:
  url: sqlite:///unused.db
pipelines:
  main:
    crm:
      type: hubspot
      access_token: tok
      client_secret: {HS_SECRET}
    ledger:
      type: xero
      tenant_id: t
      client_id: c
      client_secret: s
      webhook_key: {XERO_KEY}
  pd:
    crm:
      type: pipedrive
      api_token: tok
      webhook_user: {PD_USER}
      webhook_password: "{PD_PASSWORD}"
    ledger:
      type: xero
      tenant_id: t
      client_id: c
      client_secret: s
  nosecret:
    crm:
      type: hubspot
      access_token: tok
    ledger:
      type: xero
      tenant_id: t
      client_id: c
      client_secret: s
  off:
    enabled: false
    crm:
      type: hubspot
      access_token: tok
      client_secret: {HS_SECRET}
    ledger:
      type: xero
      tenant_id: t
      client_id: c
      client_secret: s
      webhook_key: {XERO_KEY}
"""


# --------------------------------------------------------------------------------------------------
# Independent reference computations (the documented algorithms, written out here)
# --------------------------------------------------------------------------------------------------


def ref_hubspot_v3(secret: str, method: str, uri: str, body: bytes, ts: str) -> str:
    message = (method + uri).encode() + body + ts.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def ref_xero(key: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


# --------------------------------------------------------------------------------------------------
# HubSpot v3
# --------------------------------------------------------------------------------------------------


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SHARED / "fixtures" / "hubspot" / "hubspot-webhook-signature-vectors.json")
                                      .read_text())
    return data


def test_hubspot_v3_matches_the_vector_and_an_independent_computation() -> None:
    data = _vectors()
    v3 = next(v for v in data["vectors"] if v["version"] == "v3")
    body = v3["body"].encode()
    expected = ref_hubspot_v3(data["client_secret"], v3["method"], v3["uri"], body, v3["timestamp"])
    assert expected == v3["expected"]
    assert hubspot_v3_signature(data["client_secret"], v3["method"], v3["uri"], body, v3["timestamp"]) == expected
    assert sign_hubspot_v3(data["client_secret"], v3["method"], v3["uri"], body, v3["timestamp"]) == expected
    now = int(v3["timestamp"]) / 1000 + 10
    assert verify_hubspot_v3(data["client_secret"], method="POST", uris=[v3["uri"]], body=body,
                             timestamp=v3["timestamp"], signature=expected, now=now) is None


def test_sandbox_v1_signature_matches_hubspots_published_vector() -> None:
    data = _vectors()
    v1 = next(v for v in data["vectors"] if v["version"] == "v1")
    assert sign_hubspot_v1(data["client_secret"], v1["body"].encode()) == v1["expected"]


def _hs(body: bytes = b'[{"eventId":1}]', *, ts_ms: int = 1_700_000_000_000, secret: str = HS_SECRET,
        uri: str = "https://hooks.example.test/webhooks/main/hubspot") -> dict[str, Any]:
    ts = str(ts_ms)
    return {"method": "POST", "uris": [uri], "body": body, "timestamp": ts,
            "signature": ref_hubspot_v3(secret, "POST", uri, body, ts)}


@pytest.mark.parametrize(("age_s", "reason"), [
    (0, None), (299, None), (301, "stale timestamp"), (3600, "stale timestamp"), (-301, "timestamp in the future"),
])
def test_hubspot_timestamp_window(age_s: float, reason: str | None) -> None:
    req = _hs(ts_ms=1_700_000_000_000)
    assert verify_hubspot_v3(HS_SECRET, now=1_700_000_000 + age_s, **req) == reason


def test_hubspot_rejects_wrong_secret_tampered_body_and_missing_headers() -> None:
    now = 1_700_000_000.5
    good = _hs()
    assert verify_hubspot_v3(HS_SECRET, now=now, **good) is None
    assert verify_hubspot_v3("another-secret", now=now, **good) == "bad signature"
    assert verify_hubspot_v3(HS_SECRET, now=now, **{**good, "body": b'[{"eventId":2}]'}) == "bad signature"
    assert verify_hubspot_v3(HS_SECRET, now=now, **{**good, "method": "PUT"}) == "bad signature"
    assert verify_hubspot_v3(HS_SECRET, now=now, **{**good, "signature": None}) == "missing X-HubSpot-Signature-v3"
    assert verify_hubspot_v3(HS_SECRET, now=now, **{**good, "timestamp": None}) == "missing X-HubSpot-Request-Timestamp"
    assert verify_hubspot_v3(HS_SECRET, now=now, **{**good, "timestamp": "soon"}) == "malformed timestamp"
    # The timestamp is signed: moving it forward to pass the window breaks the signature.
    moved = {**good, "timestamp": str(int(good["timestamp"]) + 600_000)}
    assert verify_hubspot_v3(HS_SECRET, now=now + 600, **moved) == "bad signature"


def test_hubspot_uri_decodes_the_listed_escapes_only() -> None:
    body, ts = b"[]", "1700000000000"
    signed_uri = "https://h.test/webhooks/main/hubspot?src=hs:app/v3&x=(a)&y=a%20b"
    sig = ref_hubspot_v3(HS_SECRET, "POST", signed_uri, body, ts)
    received = "https://h.test/webhooks/main/hubspot?src=hs%3Aapp%2fv3&x=%28a%29&y=a%20b"
    assert verify_hubspot_v3(HS_SECRET, method="POST", uris=[received], body=body, timestamp=ts, signature=sig,
                             now=1_700_000_000) is None
    # %20 is not in HubSpot's list: it stays encoded, so a signature over the decoded space does not match.
    sig_space = ref_hubspot_v3(HS_SECRET, "POST", signed_uri.replace("%20", " "), body, ts)
    assert verify_hubspot_v3(HS_SECRET, method="POST", uris=[received], body=body, timestamp=ts,
                             signature=sig_space, now=1_700_000_000) == "bad signature"


# --------------------------------------------------------------------------------------------------
# Pipedrive (HTTP Basic) and Xero
# --------------------------------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth() -> None:
    assert basic_authorization(PD_USER, PD_PASSWORD) == _basic(PD_USER, PD_PASSWORD)
    assert verify_basic_auth(_basic(PD_USER, PD_PASSWORD), PD_USER, PD_PASSWORD) is None
    assert verify_basic_auth(_basic(PD_USER, "wrong"), PD_USER, PD_PASSWORD) == "bad credentials"
    assert verify_basic_auth(_basic("someone", PD_PASSWORD), PD_USER, PD_PASSWORD) == "bad credentials"
    assert verify_basic_auth(None, PD_USER, PD_PASSWORD) == "missing credentials"
    assert verify_basic_auth("Bearer abc", PD_USER, PD_PASSWORD) == "not HTTP Basic credentials"
    assert verify_basic_auth("Basic ***", PD_USER, PD_PASSWORD) == "malformed credentials"
    no_colon = "Basic " + base64.b64encode(b"justuser").decode()
    assert verify_basic_auth(no_colon, PD_USER, PD_PASSWORD) == "malformed credentials"


def test_xero_signature() -> None:
    body = b'{"events":[],"firstEventSequence":0,"lastEventSequence":0,"entropy":"ABCDEFGHIJKLMNOPQRST"}'
    expected = ref_xero(XERO_KEY, body)
    assert sign_xero(XERO_KEY, body) == expected
    assert verify_xero(XERO_KEY, body, expected) is None
    assert verify_xero("other-key", body, expected) == "bad signature"
    assert verify_xero(XERO_KEY, body + b" ", expected) == "bad signature"
    assert verify_xero(XERO_KEY, body, None) == "missing x-xero-signature"


def test_secrets_are_compared_in_constant_time_only() -> None:
    """Static check: no == or != touches a signature, secret, password or credential in the module, and the
    one comparison helper is hmac.compare_digest."""
    tree = ast.parse(Path(webhooks_module.__file__).read_text())
    sensitive = ("signature", "secret", "password", "user", "credential", "key")

    def names(node: ast.AST) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id.lower())
            elif isinstance(n, ast.Attribute):
                out.add(n.attr.lower())
        return out

    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            touched = [n for n in names(node) if any(s in n for s in sensitive)]
            if touched:
                offenders.append((node.lineno, touched))
    assert offenders == []
    same = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_same")
    assert "compare_digest" in ast.unparse(same)
    for name in ("verify_hubspot_v3", "verify_xero", "verify_basic_auth"):
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
        assert "_same(" in ast.unparse(fn), name


def test_event_ids() -> None:
    v2 = {"meta": {"id": "0b3c-uuid", "version": "2.0", "entity": "deal", "attempt": 1, "webhook_id": "7"}}
    assert pipedrive_event_id(v2, b"x") == "0b3c-uuid"
    retried = {"meta": {**v2["meta"], "attempt": 2}}
    assert pipedrive_event_id(retried, b"y") == "0b3c-uuid"
    meta: dict[str, Any] = {"id": 42, "object": "deal", "action": "updated", "webhook_id": "9",
                            "timestamp": 1700000000, "retry": 0}
    v1 = {"v": 1, "meta": meta}
    v1_retry = {"v": 1, "meta": {**meta, "retry": 1}}
    assert pipedrive_event_id(v1, b"a") == pipedrive_event_id(v1_retry, b"b") == "v1:9:deal:42:updated:1700000000"
    assert pipedrive_event_id({"data": {}}, b"body").startswith("sha256:")
    event = {"resourceId": "r1", "eventDateUtc": "2025-12-02T00:44:09.923", "eventType": "UPDATE",
             "eventCategory": "INVOICE", "tenantId": "t1", "resourceUrl": "https://x"}
    assert xero_event_id(event) == "t1|INVOICE|r1|UPDATE|2025-12-02T00:44:09.923"
    assert xero_event_id({**event, "eventType": "CREATE"}) != xero_event_id(event)


# --------------------------------------------------------------------------------------------------
# The receiver
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def config() -> LoadedConfig:
    return loads(CONFIG, env={})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    yield s
    s.close()


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, pipeline: str, job: str) -> None:
        with self.lock:
            self.calls.append((pipeline, job))


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def receiver(config: LoadedConfig, store: StateStore, calls: Calls) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(config, store, calls, debounce_s=0.05)
    yield r
    r.close()


NOW = 1_700_000_000.0


def hubspot_request(events: list[dict[str, Any]], *, secret: str = HS_SECRET, ts_ms: int | None = None,
                    path: str = "/webhooks/main/hubspot", host: str = HOST) -> tuple[str, dict[str, str], bytes]:
    body = json.dumps(events).encode()
    ts = str(int(NOW * 1000) if ts_ms is None else ts_ms)
    sig = ref_hubspot_v3(secret, "POST", f"https://{host}{path}", body, ts)
    return path, {"Host": host, "X-HubSpot-Signature-v3": sig, "X-HubSpot-Request-Timestamp": ts,
                  "Content-Type": "application/json"}, body


def deal_event(event_id: int) -> dict[str, Any]:
    return {"eventId": event_id, "subscriptionId": 3, "portalId": 62515, "appId": 54321, "occurredAt": 1,
            "subscriptionType": "deal.propertyChange", "attemptNumber": 0, "objectId": 123,
            "propertyName": "dealstage", "propertyValue": "closedwon", "changeSource": "CRM"}


def test_same_event_twice_triggers_once(receiver: WebhookReceiver, calls: Calls, store: StateStore) -> None:
    path, headers, body = hubspot_request([deal_event(101)])
    first = receiver.handle("POST", path, headers, body, now=NOW)
    assert first == (200, b'{"received":1,"new":1}')
    assert receiver.debouncer.wait_idle(5)
    for _ in range(9):
        assert receiver.handle("POST", path, headers, body, now=NOW) == (200, b'{"received":1,"new":0}')
    assert receiver.debouncer.wait_idle(5)
    assert calls.calls == [("main", "sync")]
    assert store.webhook_event_count("hubspot:main") == 1


def test_redelivery_with_another_attempt_number_is_still_a_duplicate(config: LoadedConfig, store: StateStore,
                                                                      calls: Calls) -> None:
    receiver = WebhookReceiver(config, store, calls, debounce_s=60)  # nothing fires during the test
    try:
        path, headers, body = hubspot_request([deal_event(7), deal_event(8)])
        assert receiver.handle("POST", path, headers, body, now=NOW) == (200, b'{"received":2,"new":2}')
        retry = [{**deal_event(8), "attemptNumber": 1}, {**deal_event(9), "attemptNumber": 1}]
        path, headers, body = hubspot_request(retry)
        assert receiver.handle("POST", path, headers, body, now=NOW) == (200, b'{"received":2,"new":1}')
        assert receiver.handle("POST", path, headers, body, now=NOW) == (200, b'{"received":2,"new":0}')
        # Two requests brought news: the first scheduled the run, the second joined it; the third brought none.
        assert receiver.debouncer.pending() == [("main", "sync")]
        assert receiver.debouncer.coalesced == {("main", "sync"): 1}
    finally:
        receiver.close()
    assert calls.calls == []


def test_bad_requests_are_refused_and_logged_without_body_or_secret(receiver: WebhookReceiver, calls: Calls,
                                                                    store: StateStore) -> None:
    path, headers, body = hubspot_request([deal_event(5)], secret="not-the-secret")
    stale_path, stale_headers, stale_body = hubspot_request([deal_event(6)], ts_ms=int((NOW - 301) * 1000))
    with structlog.testing.capture_logs() as logs:
        assert receiver.handle("POST", path, headers, body, now=NOW) == (401, b"")
        assert receiver.handle("POST", stale_path, stale_headers, stale_body, now=NOW) == (401, b"")
        tampered = body.replace(b"closedwon", b"closedlost")
        assert receiver.handle("POST", path, hubspot_request([deal_event(5)])[1], tampered, now=NOW) == (401, b"")
    rejected = [e for e in logs if e["event"] == "webhook rejected"]
    assert [e["reason"] for e in rejected] == ["bad signature", "stale timestamp", "bad signature"]
    assert all(e["pipeline"] == "main" and e["vendor"] == "hubspot" for e in rejected)
    text = repr(logs)
    assert "closedwon" not in text
    assert "closedlost" not in text
    assert HS_SECRET not in text
    assert headers["X-HubSpot-Signature-v3"] not in text
    assert store.webhook_event_count() == 0
    assert receiver.debouncer.wait_idle(5)
    assert calls.calls == []


def test_xero_intent_to_receive(receiver: WebhookReceiver, calls: Calls, store: StateStore) -> None:
    body = b'{"events":[],"firstEventSequence":0,"lastEventSequence":0,"entropy":"XOKZPQMDGTNEHSBWYRLA"}'
    good = {"x-xero-signature": ref_xero(XERO_KEY, body), "Content-Type": "application/json"}
    bad = {"x-xero-signature": ref_xero("not-the-key", body)}
    assert receiver.handle("POST", "/webhooks/main/xero", good, body, now=NOW) == (200, b"")
    assert receiver.handle("POST", "/webhooks/main/xero", bad, body, now=NOW) == (401, b"")
    assert receiver.handle("POST", "/webhooks/main/xero", {}, body, now=NOW) == (401, b"")
    assert store.webhook_event_count() == 0
    assert receiver.debouncer.wait_idle(5)
    assert calls.calls == []


def test_xero_events_trigger_the_ledger_job_once(receiver: WebhookReceiver, calls: Calls) -> None:
    events = [{"resourceUrl": "https://api.xero.com/api.xro/2.0/Invoices/i1", "resourceId": "i1",
               "tenantId": "t", "tenantType": "ORGANISATION", "eventCategory": "INVOICE", "eventType": "CREATE",
               "eventDateUtc": "2025-12-02T00:44:09.923"}]
    body = json.dumps({"events": events, "firstEventSequence": 1, "lastEventSequence": 1,
                       "entropy": "ABCDEFGHIJKLMNOPQRST"}).encode()
    headers = {"X-Xero-Signature": ref_xero(XERO_KEY, body)}
    for _ in range(3):
        assert receiver.handle("POST", "/webhooks/main/xero", headers, body, now=NOW) == (200, b"")
    assert receiver.debouncer.wait_idle(5)
    assert calls.calls == [("main", "ledger")]


def test_pipedrive_basic_auth_and_v2_dedupe(receiver: WebhookReceiver, calls: Calls) -> None:
    meta: dict[str, Any] = {"action": "change", "entity": "deal", "entity_id": "5", "id": "6f1c-aa",
                            "version": "2.0", "webhook_id": "77", "attempt": 1}
    payload = {"meta": meta, "data": {"id": 5, "status": "won"}, "previous": {"status": "open"}}
    body = json.dumps(payload).encode()
    retry = json.dumps({**payload, "meta": {**meta, "attempt": 2}}).encode()
    ok = {"Authorization": _basic(PD_USER, PD_PASSWORD)}
    assert receiver.handle("POST", "/webhooks/pd/pipedrive", {"Authorization": _basic(PD_USER, "nope")}, body,
                           now=NOW) == (401, b"")
    assert receiver.handle("POST", "/webhooks/pd/pipedrive", {}, body, now=NOW) == (401, b"")
    assert receiver.handle("POST", "/webhooks/pd/pipedrive", ok, body, now=NOW) == (200, b'{"received":1,"new":1}')
    assert receiver.handle("POST", "/webhooks/pd/pipedrive", ok, retry, now=NOW) == (200, b'{"received":1,"new":0}')
    assert receiver.debouncer.wait_idle(5)
    assert calls.calls == [("pd", "sync")]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/webhooks/nope/hubspot", 404),        # no such pipeline
    ("POST", "/webhooks/main/pipedrive", 404),      # not this pipeline's CRM
    ("POST", "/webhooks/pd/xero", 404),             # ledger without a webhook key
    ("POST", "/webhooks/nosecret/hubspot", 404),    # CRM without a client secret
    ("POST", "/webhooks/off/hubspot", 404),         # disabled pipeline
    ("POST", "/webhooks/main/salesforce", 404),     # vendor not received
    ("POST", "/webhooks/main", 404),
    ("POST", "/elsewhere", 404),
    ("GET", "/webhooks/main/hubspot", 405),
])
def test_routing(receiver: WebhookReceiver, method: str, path: str, status: int) -> None:
    assert receiver.handle(method, path, {}, b"", now=NOW)[0] == status


def test_body_limit_and_malformed_json(config: LoadedConfig, store: StateStore, calls: Calls) -> None:
    receiver = WebhookReceiver(config, store, calls, max_body=64)
    try:
        path, headers, body = hubspot_request([deal_event(1), deal_event(2)])
        assert len(body) > 64
        assert receiver.handle("POST", path, headers, body, now=NOW)[0] == 413
        path, headers, body = hubspot_request([])
        broken = b"{not json"
        headers["X-HubSpot-Signature-v3"] = ref_hubspot_v3(HS_SECRET, "POST", f"https://{HOST}{path}", broken,
                                                           headers["X-HubSpot-Request-Timestamp"])
        assert receiver.handle("POST", path, headers, broken, now=NOW)[0] == 400
        assert receiver.handle("POST", *hubspot_request([]), now=NOW) == (200, b'{"received":0,"new":0}')
    finally:
        receiver.close()
    assert calls.calls == []


def test_signed_url_comes_from_public_url_or_host(config: LoadedConfig, store: StateStore, calls: Calls) -> None:
    public = WebhookReceiver(config, store, calls, public_url="https://hooks.example.test/lb/")
    try:
        body = json.dumps([deal_event(1)]).encode()
        ts = str(int(NOW * 1000))
        sig = ref_hubspot_v3(HS_SECRET, "POST", "https://hooks.example.test/lb/webhooks/main/hubspot?a=1", body, ts)
        headers = {"Host": "127.0.0.1:8080", "X-HubSpot-Signature-v3": sig, "X-HubSpot-Request-Timestamp": ts}
        assert public.handle("POST", "/webhooks/main/hubspot?a=1", headers, body, now=NOW)[0] == 200
    finally:
        public.close()
    by_host = WebhookReceiver(config, store, calls)
    try:
        path, headers, body = hubspot_request([deal_event(2)], host="127.0.0.1:8080")
        assert by_host.handle("POST", path, headers, body, now=NOW)[0] == 200
        headers["Host"] = "elsewhere.test"
        assert by_host.handle("POST", path, headers, body, now=NOW)[0] == 401
    finally:
        by_host.close()


def test_endpoints(receiver: WebhookReceiver) -> None:
    assert receiver.endpoints() == ["/webhooks/main/hubspot", "/webhooks/main/xero", "/webhooks/pd/pipedrive"]


class _BrokenStore:
    def record_webhook_events(self, *_: Any) -> list[str]:
        raise OperationalError("INSERT", {}, Exception("database is locked"))


def test_state_store_failure_answers_503_so_the_vendor_retries(config: LoadedConfig, calls: Calls) -> None:
    receiver = WebhookReceiver(config, _BrokenStore(), calls)  # type: ignore[arg-type]
    try:
        assert receiver.handle("POST", *hubspot_request([deal_event(1)]), now=NOW)[0] == 503
    finally:
        receiver.close()
    assert calls.calls == []


def test_old_events_are_pruned_on_receipt(config: LoadedConfig, store: StateStore, calls: Calls) -> None:
    store.record_webhook_events("hubspot:main", "main", ["old", "recent"])
    eight_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
    with store.engine.begin() as conn:
        conn.execute(WEBHOOK_EVENTS.update().where(WEBHOOK_EVENTS.c.event_id == "old")
                     .values(received_at=eight_days_ago))
    receiver = WebhookReceiver(config, store, calls)
    try:
        assert receiver.handle("POST", *hubspot_request([deal_event(1)]), now=NOW)[0] == 200
    finally:
        receiver.close()
    assert store.webhook_event_count() == 2  # "recent" and the new one
    assert store.record_webhook_events("hubspot:main", "main", ["old", "recent"]) == ["old"]


# --------------------------------------------------------------------------------------------------
# The state store's dedupe table
# --------------------------------------------------------------------------------------------------


def test_record_webhook_events(store: StateStore) -> None:
    assert store.record_webhook_events("hubspot:main", "main", ["1", "2", "1"]) == ["1", "2"]
    assert store.record_webhook_events("hubspot:main", "main", ["2", "3"]) == ["3"]
    assert store.record_webhook_events("hubspot:other", "other", ["2"]) == ["2"]  # another endpoint
    assert store.record_webhook_events("hubspot:main", "main", []) == []
    assert store.webhook_event_count() == 4
    assert store.prune_webhook_events(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=6)) == 0
    assert store.prune_webhook_events(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=7, seconds=1)) == 4
    assert store.webhook_event_count() == 0


def test_concurrent_copies_are_new_exactly_once(store: StateStore) -> None:
    results: list[list[str]] = []
    lock = threading.Lock()

    def record() -> None:
        got = store.record_webhook_events("xero:main", "main", ["e1", "e2"])
        with lock:
            results.append(got)

    threads = [threading.Thread(target=record) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for r in results for i in r) == ["e1", "e2"]


# --------------------------------------------------------------------------------------------------
# Debouncer
# --------------------------------------------------------------------------------------------------


def test_debouncer_coalesces_per_key_within_the_window() -> None:
    calls = Calls()
    d = Debouncer(calls, window_s=0.5)
    try:
        assert d.trigger("a", "sync") is True
        for _ in range(5):
            assert d.trigger("a", "sync") is False
        assert d.trigger("a", "ledger") is True
        assert d.trigger("b", "sync") is True
        assert calls.calls == []  # nothing before the window ends
        assert d.wait_idle(5)
        assert sorted(calls.calls) == [("a", "ledger"), ("a", "sync"), ("b", "sync")]
        assert d.coalesced == {("a", "sync"): 5}
        assert d.trigger("a", "sync") is True  # a later window fires again
        assert d.wait_idle(5)
        assert calls.calls.count(("a", "sync")) == 2
    finally:
        d.stop()


def test_debouncer_never_overlaps_one_key_and_misses_no_trigger() -> None:
    running = threading.Event()
    release = threading.Event()
    active = 0
    peak = 0
    n = 0
    lock = threading.Lock()

    def slow(_p: str, _j: str) -> None:
        nonlocal active, peak, n
        with lock:
            active += 1
            peak = max(peak, active)
            n += 1
        running.set()
        release.wait(5)
        with lock:
            active -= 1

    d = Debouncer(slow, window_s=0.01)
    try:
        d.trigger("a", "sync")
        assert running.wait(5)
        assert d.trigger("a", "sync") is True  # arrives during the run: one more run after it
        time.sleep(0.1)
        assert n == 1  # the second waits for the first to end
        release.set()
        assert d.wait_idle(5)
        assert n == 2
        assert peak == 1
    finally:
        release.set()
        d.stop()


def test_debouncer_survives_a_failing_callback_and_stop_drops_waiting_triggers() -> None:
    seen: list[str] = []

    def flaky(pipeline: str, _job: str) -> None:
        seen.append(pipeline)
        if pipeline == "boom":
            raise RuntimeError("run failed")

    d = Debouncer(flaky, window_s=0.01)
    with structlog.testing.capture_logs() as logs:
        d.trigger("boom", "sync")
        assert d.wait_idle(5)
    assert any(e["event"] == "webhook trigger failed" for e in logs)
    d.trigger("fine", "sync")
    assert d.wait_idle(5)
    assert seen == ["boom", "fine"]
    d.window_s = 30
    d.trigger("late", "sync")
    d.stop()
    assert d.trigger("later", "sync") is False
    assert seen == ["boom", "fine"]
    assert d.pending() == []


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def test_webhook_secrets_are_secret_settings(config: LoadedConfig) -> None:
    hs = config.crm("main")
    secret = hs.client_secret  # type: ignore[attr-defined]
    assert isinstance(secret, SecretStr)
    assert secret.get_secret_value() == HS_SECRET
    assert HS_SECRET not in repr(hs)
    assert XERO_KEY not in repr(config.ledger("main"))
    pd = config.crm("pd")
    assert PD_PASSWORD not in repr(pd)
    assert PD_USER not in repr(pd)
    with pytest.raises(ValidationError, match="webhook_user and webhook_password"):
        PipedriveSettings(type="pipedrive", api_token=SecretStr("t"), webhook_user=SecretStr("u"))
