"""Several daemons on one PostgreSQL: leases, hard kills, a database outage, and token refreshes across processes.

Uses the server at 127.0.0.1:5432 (database ``test``) like the other PostgreSQL tests: each test works in a
schema of its own (chosen through the URL) that is dropped afterwards. When the server is unreachable the
tests are skipped, unless ``CI=true``, where they fail.

- Three ``ledgerbridge daemon`` processes run 20 pipelines (each with its own HubSpot and Xero sandbox)
  on schedules of a few seconds while replicas are SIGKILLed at random and restarted, and deals are won
  meanwhile. The runs table then shows that no (pipeline, job) ever ran twice at the same time, that a
  killed replica's work was taken over within the lease time, every won deal has exactly one invoice,
  and every pipeline kept running after the last kill.
- A daemon whose PostgreSQL goes away (a TCP proxy in front of the server is stopped) answers 503 on
  ``/readyz`` and 200 again once it is back, and goes on syncing.
- Fifty token users in three processes share one Xero connection across several access-token expiries:
  each expiry costs exactly one call to the token endpoint, and nobody is ever refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from connectors.hubspot.sandbox import CUSTOM_PIPELINE_ID, HubSpotSandbox
from connectors.sandboxkit import FaultPlan, SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_TENANT_ID, XeroSandbox
from sync.crypto import generate_key
from sync.state import StateStore
from tests.harness import REPO, XERO_CLIENT_ID, cli, wait_until, write_config

pytestmark = pytest.mark.postgres

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
CONNECTION = f"xero:{DEMO_TENANT_ID}"
LEASE_S = 3.0
PIPELINES = 20
JOB_SCHEDULES = (
    "    schedule:\n      cron: '*/4 * * * * *'\n"
    "    ledger_schedule:\n      cron: '*/6 * * * * *'\n"
    "    metrics:\n      schedule:\n        cron: '*/10 * * * * *'\n"
)


def _require_pg() -> None:
    try:
        with psycopg.connect(PG_SERVER, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {PG_SERVER} is unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


def _state_url(schema: str, port: int = 5432) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema, dropped afterwards."""
    _require_pg()
    schema = f"lb_replicas_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# --------------------------------------------------------------------------------------------------
# Sandboxes and configs
# --------------------------------------------------------------------------------------------------


@dataclass
class Shop:
    """One pipeline's CRM and ledger."""

    name: str
    hubspot: HubSpotSandbox
    xero: XeroSandbox
    servers: list[SandboxServer]

    def won(self) -> set[str]:
        return {f"LB-{self.name}:{d['hs_object_id']}" for d in self.hubspot.deals_snapshot()
                if d.get("hs_is_closed_won") == "true"}

    def open_deals(self) -> list[dict[str, str]]:
        return [d for d in self.hubspot.deals_snapshot() if d.get("hs_is_closed") != "true"]

    def win(self, deal: dict[str, str]) -> None:
        stage = "84213561" if deal.get("pipeline") == CUSTOM_PIPELINE_ID else "closedwon"
        self.hubspot.modify_deal(deal["hs_object_id"], dealstage=stage)

    def references(self) -> list[str]:
        return [i["Reference"] for i in self.xero.invoices() if i["Status"] not in ("DELETED", "VOIDED")]


@pytest.fixture
def make_shops() -> Iterator[Callable[[int], list[Shop]]]:
    """Builds N pipelines' sandboxes, served in this process; all are stopped (at once) afterwards."""
    made: list[Shop] = []

    def make(count: int) -> list[Shop]:
        for i in range(count):
            hs = HubSpotSandbox(seed=500 + i)
            hs.load_book(generate_book(500 + i, companies=5, deals=10, won_share=0.4))
            xero = XeroSandbox(seed=500 + i, calls_per_minute=1200)
            made.append(Shop(f"p{i:02d}", hs, xero, [serve(hs), serve(xero)]))
        return made[-count:]

    yield make
    with ThreadPoolExecutor(16) as pool:  # each stop waits for its server's poll interval
        list(pool.map(lambda server: server.stop(), [srv for shop in made for srv in shop.servers]))


def _write_config(path: Path, shops: list[Shop], state_url: str, key: str) -> Path:
    """One config with a pipeline per shop, each on a schedule of a few seconds."""
    blocks: list[str] = []
    head = ""
    for shop in shops:
        one = write_config(path, hubspot_url=shop.servers[0].url, xero_url=shop.servers[1].url,
                           refresh_token=shop.xero.issue_tokens()["refresh_token"], pipeline=shop.name,
                           state_url=f"{state_url}\n  secret_key: {key}", extra=JOB_SCHEDULES).read_text()
        head, _, block = one.partition("pipelines:\n")
        # Each sandbox is a Xero organisation of its own with the same tenant id: the connections (token sets)
        # are named apart. The ledger allows more calls than Xero's 60 a minute, so that twenty pipelines on
        # schedules of seconds spend their time on leases and runs rather than on waiting for the rate budget.
        ledger_extra = f"      connection: xero:{shop.name}\n      calls_per_minute: 1200\n"
        blocks.append(block.replace(f"      client_id: {XERO_CLIENT_ID}\n",
                                    f"      client_id: {XERO_CLIENT_ID}\n{ledger_extra}", 1))
    path.write_text(head + "pipelines:\n" + "".join(blocks))
    return path


# --------------------------------------------------------------------------------------------------
# Daemon processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    log: Path
    stream: IO[str]
    killed_at: float | None = None
    _ops: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def watch_stdout(self) -> None:
        """Read the ops line in the background: starting a replica never blocks the test."""
        def read() -> None:
            assert self.proc.stdout is not None
            self._ops.append(self.proc.stdout.readline().strip())

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    @property
    def ops(self) -> str:
        assert self._reader is not None
        self._reader.join(60)
        line = self._ops[0] if self._ops else ""
        assert line.startswith("ops http://"), f"no ops line: {line!r}\n{self.log.read_text()[-3000:]}"
        return line.removeprefix("ops ").strip()


@dataclass
class Fleet:
    cfg: Path
    logs: Path
    schema: str
    replicas: list[Replica] = field(default_factory=list)
    kills: dict[int, float] = field(default_factory=dict)  # pid -> when it was dead for sure (epoch seconds)
    # pid -> the leases the killed replica still held, with when each falls free (epoch seconds)
    orphans: dict[int, list[tuple[str, float]]] = field(default_factory=dict)

    def start(self, *args: str) -> Replica:
        log = self.logs / f"replica-{len(self.replicas)}.log"
        stream = log.open("w")
        proc = subprocess.Popen(
            cli("daemon", "-c", str(self.cfg), "--port", "0", "--lease-seconds", str(LEASE_S), "--workers", "6",
                *args),
            cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=stream)
        replica = Replica(proc, log, stream)
        replica.watch_stdout()
        self.replicas.append(replica)
        return replica

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc.poll() is None]

    def kill(self, replica: Replica) -> None:
        replica.proc.kill()
        replica.proc.wait()
        replica.killed_at = time.time()
        pid = replica.proc.pid
        self.kills[pid] = replica.killed_at
        try:
            with psycopg.connect(PG_SERVER) as conn:
                rows = conn.execute(
                    sql.SQL("SELECT name, expires_at FROM {}.job_leases WHERE owner LIKE %s AND expires_at > now()")
                    .format(sql.Identifier(self.schema)), (f"%:{pid}:%",)).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []
        self.orphans[pid] = [(name, expires.timestamp()) for name, expires in rows]

    def stop_all(self) -> list[int]:
        codes = []
        for replica in self.live():
            replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.killed_at is None:
                codes.append(replica.proc.wait(30))
        return codes

    def close(self) -> None:
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait()
            assert replica.proc.stdout is not None
            replica.proc.stdout.close()
            replica.stream.close()

    def logs_text(self) -> str:
        return "\n".join(r.log.read_text(errors="replace") for r in self.replicas)


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[list[Fleet]]:
    fleets: list[Fleet] = []
    yield fleets
    for fleet in fleets:
        fleet.close()


@dataclass(frozen=True)
class Run:
    pipeline: str
    job: str
    pid: int
    started: float
    finished: float | None
    status: str


def _runs(schema: str) -> list[Run]:
    """The runs table (empty until a daemon has migrated the schema)."""
    try:
        with psycopg.connect(PG_SERVER) as conn:
            rows = conn.execute(sql.SQL("SELECT pipeline, job, pid, started_at, finished_at, status FROM {}.runs")
                                .format(sql.Identifier(schema))).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    return [Run(p, j, int(pid), s.timestamp(), f.timestamp() if f is not None else None, st)
            for p, j, pid, s, f, st in rows]


def _scrape(ops: str) -> dict[str, Any]:
    text = httpx.get(ops + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


# --------------------------------------------------------------------------------------------------
# Three replicas, random SIGKILLs
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_three_replicas_under_random_sigkill_never_overlap_a_job_and_invoice_each_won_deal_once(
    pg_schema: str, make_shops: Callable[[int], list[Shop]], tmp_path: Path, fleet_factory: list[Fleet]
) -> None:
    rng = random.Random(20261126)
    shops = make_shops(PIPELINES)
    cfg = _write_config(tmp_path / "lb.yaml", shops, _state_url(pg_schema), generate_key())
    # Every ledger write takes a little while, so that kills land in the middle of runs.
    for shop in shops:
        shop.xero.faults = FaultPlan("w:latency=1:0.15", seed=1)
    fleet = Fleet(cfg, tmp_path, pg_schema)
    fleet_factory.append(fleet)
    for _ in range(3):
        fleet.start()

    def synced(names: set[str], after: float) -> bool:
        done = {r.pipeline for r in _runs(pg_schema) if r.job == "sync" and r.status == "ok" and r.started > after}
        return names <= done

    names = {s.name for s in shops}
    assert wait_until(lambda: synced(names, 0), timeout=60, interval=0.5), fleet.logs_text()[-5000:]

    # Chaos: a replica (running, or still starting) is killed and a new one started every second or two, while
    # deals are being won.
    started_chaos = time.monotonic()
    chaos_end = started_chaos + 14
    next_kill = time.monotonic() + rng.uniform(0.5, 1.5)
    while time.monotonic() < chaos_end:
        shop = rng.choice(shops)
        candidates = shop.open_deals()
        if candidates:
            shop.win(rng.choice(candidates))
        if time.monotonic() >= next_kill:
            fleet.kill(rng.choice(fleet.live()))
            fleet.start()
            next_kill = time.monotonic() + rng.uniform(0.8, 2.0)
        time.sleep(0.25)
    last_kill = max(fleet.kills.values())
    assert len(fleet.kills) >= 6

    # Everything settles: every pipeline syncs again after the last kill, with every won deal invoiced.
    def settled() -> bool:
        if not synced(names, last_kill + LEASE_S) or any(set(s.references()) != s.won() for s in shops):
            return False
        runs = _runs(pg_schema)
        killed = {(r.pipeline, r.job, r.started) for r in runs if r.finished is None and r.pid in fleet.kills}
        return all(any(o.pipeline == p and o.job == j and o.started > started for o in runs)
                   for p, j, started in killed)

    assert wait_until(settled, timeout=90, interval=1), fleet.logs_text()[-5000:]

    scraped = [_scrape(r.ops) for r in fleet.live()]
    codes = fleet.stop_all()
    assert codes == [0] * len(codes)
    runs = _runs(pg_schema)

    # 1. No (pipeline, job) ran twice at once. A killed replica's runs end when it died.
    by_job: dict[tuple[str, str], list[tuple[float, float, Run]]] = defaultdict(list)
    for run in runs:
        end = run.finished
        if end is None:
            assert run.pid in fleet.kills, f"an unfinished run of a replica that was not killed: {run}"
            end = fleet.kills[run.pid]
        by_job[(run.pipeline, run.job)].append((run.started, end, run))
    overlaps = []
    takeovers: list[float] = []
    for key, intervals in by_job.items():
        intervals.sort(key=lambda x: x[0])
        for (_s1, e1, r1), (s2, _e2, r2) in itertools.pairwise(intervals):
            if s2 < e1:
                overlaps.append((key, r1, r2))
            if r1.finished is None:  # the successor of a killed run
                takeovers.append(s2 - e1)
    assert not overlaps, "\n".join(map(str, overlaps[:6]))
    assert {j for _, j in by_job} == {"sync", "ledger", "metrics"}
    killed_runs = [r for r in runs if r.finished is None]
    assert killed_runs, "no kill landed in a run"
    # A killed replica's leases fall free within LEASE_S of its death (they were last renewed before it), and
    # every job caught by a kill ran again later, on another replica or a restarted one.
    orphaned = [(pid, name, free_at - fleet.kills[pid]) for pid, leases in fleet.orphans.items()
                for name, free_at in leases]
    assert orphaned, "no kill caught a replica holding a lease"
    assert all(0 < after <= LEASE_S + 0.05 for _, _, after in orphaned), orphaned
    assert len(takeovers) == len([r for r in runs if r.finished is None])
    assert {r.pid for r in runs} >= {r.proc.pid for r in fleet.replicas if r.killed_at is None}

    # 2. Exactly one invoice per won deal, in every pipeline.
    won_during_test = 0
    for shop in shops:
        refs = shop.references()
        assert len(refs) == len(set(refs)), f"{shop.name}: duplicate invoices"
        assert set(refs) == shop.won(), shop.name
        won_during_test += len(shop.won())
    assert won_during_test > PIPELINES * 4

    # 3. Every pipeline kept running: each job of each pipeline ran to the end after the last kill.
    for shop in shops:
        for job in ("sync", "ledger"):
            assert any(r.pipeline == shop.name and r.job == job and r.status == "ok" and r.started > last_kill
                       for r in runs), (shop.name, job)

    # The replicas' /metrics parse, and count what they did; no job crashed, no lease was lost.
    total_runs = 0.0
    for families in scraped:
        total_runs += sum(s.value for s in families["ledgerbridge_job_runs"].samples if s.name.endswith("_total"))
        lost = families.get("ledgerbridge_leases_lost")
        assert lost is None or sum(s.value for s in lost.samples if s.name.endswith("_total")) == 0
    assert total_runs > 0
    logs = fleet.logs_text()
    assert "job crashed" not in logs
    assert "lease lost" not in logs
    assert "Traceback" not in logs


# --------------------------------------------------------------------------------------------------
# A database outage
# --------------------------------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; :meth:`cut` closes the port and every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        if self._thread is not None:
            self._thread.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in sel.select(timeout=1):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            a.close()
            b.close()


@pytest.mark.timeout(90)
def test_readyz_follows_a_postgresql_outage_and_the_daemon_syncs_again_after_it(
    pg_schema: str, make_shops: Callable[[int], list[Shop]], tmp_path: Path, fleet_factory: list[Fleet]
) -> None:
    shops = make_shops(2)
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.open()
    try:
        cfg = _write_config(tmp_path / "lb.yaml", shops, _state_url(pg_schema, proxy.port) + "&connect_timeout=2",
                            generate_key())
        fleet = Fleet(cfg, tmp_path, pg_schema)
        fleet_factory.append(fleet)
        daemon = fleet.start()

        def status() -> int:
            return httpx.get(daemon.ops + "/readyz", timeout=10).status_code

        assert wait_until(lambda: status() == 200, timeout=30)
        assert wait_until(lambda: {r.pipeline for r in _runs(pg_schema) if r.status == "ok"} == {"p00", "p01"},
                          timeout=30)
        families = _scrape(daemon.ops)
        assert {"ledgerbridge_job_runs", "ledgerbridge_api_calls", "ledgerbridge_rate_budget_remaining",
                "ledgerbridge_crm_lag_seconds", "ledgerbridge_last_success_timestamp_seconds",
                "ledgerbridge_token_refresh_failures", "ledgerbridge_replica_info"} <= set(families)

        proxy.cut()
        assert wait_until(lambda: status() == 503, timeout=20)
        assert "state store unreachable" in httpx.get(daemon.ops + "/readyz", timeout=10).text
        assert httpx.get(daemon.ops + "/healthz", timeout=5).status_code == 200
        _scrape(daemon.ops)  # /metrics needs no database
        time.sleep(2)  # scheduled runs fail meanwhile, and the daemon lives on
        assert daemon.proc.poll() is None

        restored = time.time()
        proxy.open()
        assert wait_until(lambda: status() == 200, timeout=30)
        shops[0].win(shops[0].open_deals()[0])
        assert wait_until(lambda: set(shops[0].references()) == shops[0].won(), timeout=30), \
            daemon.log.read_text()[-3000:]
        assert wait_until(lambda: any(r.job == "sync" and r.status == "ok" and r.started > restored
                                      for r in _runs(pg_schema)), timeout=20)
        assert fleet.stop_all() == [0]
    finally:
        proxy.cut()


# --------------------------------------------------------------------------------------------------
# Token refreshes across processes
# --------------------------------------------------------------------------------------------------

_TOKEN_WORKER = r"""
import json, sys, threading, time
import httpx
from connectors.oauth import RotatingOAuth2
from sync.logging import configure_logging
from sync.state import StateStore

url, key, base, client_id, client_secret, connection, initial, users = sys.argv[1:9]
configure_logging("debug", "json")
store = StateStore(url, secret_key=key)
# Several connector instances per process, as when several jobs of one pipeline run at once.
auths = [RotatingOAuth2(vendor="xero", token_url=base + "/connect/token", client_id=client_id,
                        client_secret=client_secret, connection=connection,
                        store=store.token_store(), initial_refresh_token=initial, margin_s=1.0)
         for _ in range(3)]
users = int(users)
print("ready", flush=True)
until = float(sys.stdin.readline())  # every process starts once all are ready, and stops at the same time
results = []
lock = threading.Lock()

def user(i):
    auth, ok, refused, errors = auths[i % len(auths)], 0, 0, []
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.time() < until:
            try:
                token = auth.token()
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
                time.sleep(0.2)
                continue
            answer = client.get("/connections", headers={"Authorization": "Bearer " + token.access_token})
            if answer.status_code == 200:
                ok += 1
            else:
                refused += 1
            time.sleep(0.02)
    with lock:
        results.append({"ok": ok, "refused": refused, "errors": errors[:3]})

threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"users": results, "exchanges": sum(a.refreshes for a in auths)}))
"""


@pytest.mark.timeout(90)
def test_fifty_token_users_in_three_processes_cause_one_refresh_per_expiry(pg_schema: str) -> None:
    """Access tokens live 3 s and are refreshed 1 s before they expire; over 8 s, 50 users in 3 processes (3
    connector instances each) make exactly one token-endpoint call per expiry and are never refused. No token
    appears in clear in the database or in the (debug-level) logs."""
    xero = XeroSandbox(seed=9, access_token_ttl_s=3.0, calls_per_minute=100_000, concurrency=100)
    server = serve(xero)
    url = _state_url(pg_schema)
    key = generate_key()
    StateStore.open(url, secret_key=key).close()  # migrated once, before the workers start
    initial = xero.issue_tokens()["refresh_token"]
    duration = 8.0
    procs = [
        subprocess.Popen([sys.executable, "-c", _TOKEN_WORKER, url, key, server.url, DEMO_CLIENT_ID,
                          DEMO_CLIENT_SECRET, CONNECTION, initial, str(users)],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for users in (17, 17, 16)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        until = time.time() + duration
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{until}\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60) for p in procs]
        stats = httpx.get(server.url + "/_sandbox/stats", timeout=5).json()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    users = [u for r in reports for u in r["users"]]
    assert len(users) == 50
    assert all(u["errors"] == [] and u["refused"] == 0 for u in users), [u for u in users if u["errors"]][:3]
    assert all(u["ok"] > 0 for u in users), reports

    calls, rejected = stats["refresh_calls"], stats["refresh_rejected"]
    assert rejected == 0  # nobody presented a rotated-away refresh token
    assert calls == sum(r["exchanges"] for r in reports)
    # One refresh per expiry: tokens are good for 3 s and renewed in their last second, so at most one call
    # every 2 s (plus the first one), and at least one per expiry crossed.
    assert 3 <= calls <= int(duration // 2) + 2, calls
    store = StateStore(url, secret_key=key)
    try:
        assert store.token_generation(CONNECTION) == calls  # each call's token was saved, in order
    finally:
        store.close()

    # Canary: no token or client secret in clear, in any table or any log line.
    with xero._auth_lock:
        issued = [initial, *xero._refresh, *xero._access]
    assert len(issued) > calls
    with psycopg.connect(PG_SERVER) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (pg_schema,))]
        dump = "\n".join(r[0] for t in tables for r in conn.execute(
            sql.SQL("SELECT t::text FROM {}.{} AS t").format(sql.Identifier(pg_schema), sql.Identifier(t))))
    logs = "\n".join(err for _, err in outputs)
    assert "oauth token refreshed" in logs
    for secret in (*issued, DEMO_CLIENT_SECRET):
        assert secret not in dump
        assert secret not in logs

