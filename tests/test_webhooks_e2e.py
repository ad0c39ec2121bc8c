"""Webhook-driven syncs end to end: the sandboxes send signed webhooks as the vendors do, a receiver served
over HTTP verifies and dedupes them and runs the pipeline's incremental sync once per debounce window."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.loader import load_config
from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.pipedrive.sandbox import PipedriveSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.sandboxwebhooks import sign_hubspot_v3
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from sync.runtime import open_runtime
from sync.state import StateStore
from sync.webhooks import WebhookReceiver
from tests.harness import hubspot_block, wait_until, write_config

HS_SECRET = "e2e-hubspot-client-secret"
XERO_KEY = "e2e-xero-webhook-key"
WINDOW_S = 1.0


class _Handler(BaseHTTPRequestHandler):
    """The part of an HTTP server the receiver needs: raw body in, (status, body) out."""

    protocol_version = "HTTP/1.1"
    server: ReceiverServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        srv = self.server
        if length > srv.receiver.max_body:
            status, body = 413, b""
            self.close_connection = True
        else:
            raw = self.rfile.read(length)
            with srv.lock:
                srv.requests.append((self.path, raw))
                refuse = srv.refuse_next > 0
                srv.refuse_next -= 1 if refuse else 0
            status, body = (503, b"") if refuse else srv.receiver.handle(self.command, self.path,
                                                                          dict(self.headers.items()), raw)
            with srv.lock:
                srv.answers.append(status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST


class ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self.lock = threading.Lock()
        self.requests: list[tuple[str, bytes]] = []
        self.answers: list[int] = []
        self.refuse_next = 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@dataclass
class Fired:
    lock: threading.Lock = field(default_factory=threading.Lock)
    at: list[tuple[str, str, float]] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def of(self, job: str) -> list[float]:
        with self.lock:
            return [t for _p, j, t in self.at if j == job]


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Servers to stop after the test; a sandbox server's webhook sender is stopped with it."""
    started: list[Any] = []
    yield started
    for s in started:
        s.stop()
        sender = getattr(s.app, "webhook_sender", lambda: None)() if isinstance(s, SandboxServer) else None
        if sender is not None:
            sender.stop()


def drained(sandbox_url: str) -> bool:
    """The sandbox delivered every webhook it had to send."""
    return bool(httpx.post(sandbox_url + "/_sandbox/webhooks/wait", json={"timeout": 10}, timeout=15).json()["idle"])


def _open_default_deals(hs: HubSpotSandbox, n: int) -> list[str]:
    deals = [d for d in hs.deals_snapshot() if d.get("hs_is_closed") != "true" and d.get("pipeline") == "default"]
    assert len(deals) >= n
    return [d["id"] for d in deals[:n]]


def test_hubspot_webhooks_invoice_a_won_deal_once(tmp_path: Path, servers: list[Any]) -> None:
    hs = HubSpotSandbox(seed=21)
    hs.load_book(generate_book(21, companies=10, deals=24, won_share=0.4))
    xero = XeroSandbox(seed=21)
    hs_server: SandboxServer = serve(hs)
    xero_server: SandboxServer = serve(xero)
    servers += [hs_server, xero_server]

    cfg = write_config(tmp_path / "lb.yaml", refresh_token=xero.issue_tokens()["refresh_token"],
                       state_url=f"sqlite:///{tmp_path / 'state.db'}", xero_url=xero_server.url,
                       crm_block=hubspot_block(hs_server.url) + f"      client_secret: {HS_SECRET}\n")
    cfg.write_text(cfg.read_text().replace("    ledger:\n", f"    ledger:\n      webhook_key: {XERO_KEY}\n", 1))
    config = load_config(cfg)

    def references() -> list[str]:
        return [i["Reference"] for i in xero.invoices() if i["Status"] not in ("DELETED", "VOIDED")]

    fired = Fired()
    with open_runtime(config, configure_logs=False) as rt:
        with rt.runner("main") as runner:
            first = runner.run()
        assert first.status == "ok", first.error
        before = references()
        assert len(before) == first.counts["created"] > 0

        def trigger(pipeline: str, job: str) -> None:
            with fired.lock:
                fired.at.append((pipeline, job, time.monotonic()))
            if job == "sync":
                with rt.runner(pipeline) as r:
                    result = r.run()
                with fired.lock:
                    fired.results.append(result)

        receiver = WebhookReceiver(config, rt.store, trigger, debounce_s=WINDOW_S)
        server = ReceiverServer(receiver)
        servers.append(server)
        try:
            assert receiver.endpoints() == ["/webhooks/main/hubspot", "/webhooks/main/xero"]
            reg = httpx.post(hs_server.url + "/_sandbox/webhooks", timeout=10, json={
                "url": server.url + "/webhooks/main/hubspot", "client_secret": HS_SECRET, "deliveries": 10})
            assert reg.status_code == 200, reg.text
            reg = httpx.post(xero_server.url + "/_sandbox/webhooks", timeout=10, json={
                "url": server.url + "/webhooks/main/xero", "webhook_key": XERO_KEY, "deliveries": 3})
            assert reg.status_code == 200, reg.text
            assert "webhook_key" not in reg.json()
            itr = httpx.post(xero_server.url + "/_sandbox/webhooks/intent-to-receive", timeout=15).json()
            assert itr["ok"], itr
            assert [a["status"] for a in itr["answers"]] == [200, 401]

            a, b, c = _open_default_deals(hs, 3)

            # Phase 1: one deal won; ten copies of its signed webhook, plus a forged one.
            started = time.monotonic()
            won = httpx.patch(f"{hs_server.url}/_sandbox/deals/{a}", json={"properties": {"dealstage": "closedwon"}},
                              timeout=10)
            assert won.status_code == 200, won.text
            forged = json.dumps([{"eventId": 1, "subscriptionId": 1, "portalId": hs.portal_id, "occurredAt": 1,
                                  "subscriptionType": "deal.propertyChange", "attemptNumber": 0,
                                  "objectId": int(b), "propertyName": "dealstage",
                                  "propertyValue": "closedwon"}]).encode()
            ts = str(int(time.time() * 1000))
            bad = httpx.post(server.url + "/webhooks/main/hubspot", content=forged, timeout=10, headers={
                "X-HubSpot-Request-Timestamp": ts, "Content-Type": "application/json",
                "X-HubSpot-Signature-v3": sign_hubspot_v3("guessed-secret", "POST",
                                                          server.url + "/webhooks/main/hubspot", forged, ts)})
            assert bad.status_code == 401

            assert wait_until(lambda: f"LB-main:{a}" in references(), timeout=10)
            assert drained(hs_server.url)
            assert receiver.debouncer.wait_idle(10)
            assert references().count(f"LB-main:{a}") == 1
            assert len(references()) == len(before) + 1
            assert f"LB-main:{b}" not in references()  # the forged webhook ran nothing for deal b
            hs_stats = httpx.get(hs_server.url + "/_sandbox/webhooks", timeout=10).json()
            assert hs_stats["requests"] == 10
            assert hs_stats["statuses"] == {"200": 10}
            syncs = fired.of("sync")
            assert len(syncs) == 1
            assert syncs[0] - started >= WINDOW_S * 0.9  # fired at the end of the window, not per request

            # Phase 2: two deals won within one window: two webhooks (ten copies each), one run for both.
            for deal in (b, c):
                r = httpx.patch(f"{hs_server.url}/_sandbox/deals/{deal}",
                                json={"properties": {"dealstage": "closedwon"}}, timeout=10)
                assert r.status_code == 200
            assert wait_until(lambda: {f"LB-main:{b}", f"LB-main:{c}"} <= set(references()), timeout=10)
            assert drained(hs_server.url)
            assert receiver.debouncer.wait_idle(10)
            refs = references()
            assert len(refs) == len(before) + 3
            assert len(set(refs)) == len(refs)
            assert len(fired.of("sync")) == 2
            assert all(res.status == "ok" for res in fired.results)
            assert sum(res.counts["created"] for res in fired.results) == 3

            # The invoices the runs created came back as Xero webhooks: checked, deduped, one ledger job.
            assert drained(xero_server.url)
            assert receiver.debouncer.wait_idle(10)
            assert 1 <= len(fired.of("ledger")) <= 2  # the two phases are two windows at most
            assert rt.store.webhook_event_count("xero:main") == 3
            xero_stats = httpx.get(xero_server.url + "/_sandbox/webhooks", timeout=10).json()
            assert xero_stats["delivered_events"] == 3
            assert xero_stats["failed_events"] == 0
            assert rt.store.webhook_event_count("hubspot:main") == 3
            with server.lock:
                assert server.answers.count(401) == 2  # the forged request and the intent-to-receive probe
        finally:
            receiver.close()


def test_pipedrive_sandbox_webhooks_are_retried_and_deduped(tmp_path: Path, servers: list[Any]) -> None:
    pd = PipedriveSandbox(seed=5)
    pd.load_book(generate_book(5, companies=4, deals=8, won_share=0.3))
    pd_server = serve(pd)
    servers.append(pd_server)
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(f"""\
state:
  url: sqlite:///{tmp_path / 'state.db'}
pipelines:
  pd:
    crm:
      type: pipedrive
      base_url: {pd_server.url}
      api_token: demo-pipedrive-token
      webhook_user: lb
      webhook_password: hook-pass
    ledger:
      type: xero
      tenant_id: t
      client_id: c
      client_secret: s
""")
    config = load_config(cfg)
    calls: list[tuple[str, str]] = []
    with StateStore.open(config.app.state.url) as store:
        receiver = WebhookReceiver(config, store, lambda p, j: calls.append((p, j)), debounce_s=0.2)
        server = ReceiverServer(receiver)
        servers.append(server)
        try:
            server.refuse_next = 1  # the first delivery fails: Pipedrive tries again, attempt 2
            reg = httpx.post(pd_server.url + "/_sandbox/webhooks", timeout=10, json={
                "url": server.url + "/webhooks/pd/pipedrive", "http_auth_user": "lb", "http_auth_password": "hook-pass",
                "deliveries": 3, "retry_delay_s": 0.05})
            assert reg.status_code == 200, reg.text
            deal = next(d for d in pd.deals_snapshot() if not d["closed"])
            r = httpx.patch(f"{pd_server.url}/_sandbox/deals/{deal['id']}", json={"properties": {"status": "won"}},
                            timeout=10)
            assert r.status_code == 200, r.text
            assert drained(pd_server.url)
            assert receiver.debouncer.wait_idle(10)
            with server.lock:
                assert server.answers == [503, 200, 200, 200], (server.answers, reg.json())
                payloads = [json.loads(body) for _path, body in server.requests]
            assert [p["meta"]["attempt"] for p in payloads] == [1, 2, 2, 2]
            assert {p["meta"]["id"] for p in payloads} == {payloads[0]["meta"]["id"]}
            assert payloads[1]["meta"]["entity_id"] == deal["id"]
            assert payloads[1]["data"]["status"] == "won"
            assert payloads[1]["previous"]["status"] == "open"
            assert calls == [("pd", "sync")], calls
            assert store.webhook_event_count("pipedrive:pd") == 1

            # Wrong credentials on the sandbox's side: every attempt is refused, nothing is triggered.
            httpx.post(pd_server.url + "/_sandbox/webhooks", timeout=10, json={
                "url": server.url + "/webhooks/pd/pipedrive", "http_auth_user": "lb", "http_auth_password": "old",
                "max_attempts": 2, "retry_delay_s": 0.05})
            pd.modify_deal(int(deal["id"]), title="Renamed deal")
            assert drained(pd_server.url)
            stats = httpx.get(pd_server.url + "/_sandbox/webhooks", timeout=10).json()
            assert stats["failed_events"] == 1, stats
            assert stats["statuses"] == {"401": 2}, stats
            assert receiver.debouncer.wait_idle(10)
            assert calls == [("pd", "sync")]
        finally:
            receiver.close()
