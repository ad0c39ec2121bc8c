"""`ledgerbridge daemon`: scheduled jobs, probes and metrics, one daemon per SQLite file, stops, reloads, pauses."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from config.loader import load_config
from config.schema import Schedule
from connectors.errors import ConfigError
from connectors.hubspot.sandbox import CUSTOM_PIPELINE_ID, HubSpotSandbox
from connectors.sandboxkit import FaultPlan, SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from sync.crypto import generate_key
from sync.daemon import Daemon as Daemon_
from sync.daemon import DaemonOptions, OpsServer, Readiness, job_schedules, schedule_trigger
from sync.leases import Leases
from sync.observability import DaemonMetrics
from sync.runtime import open_runtime
from sync.state import RunRow, StateStore
from tests.harness import REPO, cli, hubspot_block, run_cli, wait_until, write_config

SCHEDULE = "    schedule:\n      interval_minutes: 1\n"
NO_METRICS = "    metrics:\n      enabled: false\n"


@dataclass
class Vendors:
    hubspot: HubSpotSandbox
    xero: XeroSandbox
    hubspot_url: str
    xero_url: str

    def won_references(self) -> set[str]:
        return {f"LB-main:{d['hs_object_id']}" for d in self.hubspot.deals_snapshot()
                if d.get("hs_is_closed_won") == "true"}

    def invoice_references(self) -> list[str]:
        return [i["Reference"] for i in self.xero.invoices() if i["Status"] not in ("DELETED", "VOIDED")]


@pytest.fixture
def vendors() -> Iterator[Vendors]:
    hs = HubSpotSandbox(seed=11)
    hs.load_book(generate_book(11, companies=12, deals=30, won_share=0.5))
    xero = XeroSandbox(seed=11)
    servers: list[SandboxServer] = [serve(hs), serve(xero)]
    try:
        yield Vendors(hs, xero, servers[0].url, servers[1].url)
    finally:
        for s in servers:
            s.stop()


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    ops: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``sig``; returns the exit code and the seconds it took."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start


StartDaemon = Callable[..., Daemon]


def _config(tmp_path: Path, v: Vendors, extra: str = NO_METRICS) -> Path:
    return write_config(tmp_path / "lb.yaml", hubspot_url=v.hubspot_url, xero_url=v.xero_url,
                        refresh_token=v.xero.issue_tokens()["refresh_token"],
                        state_url=f"sqlite:///{tmp_path / 'state.db'}", extra=SCHEDULE + extra)


def _sync_runs(store: StateStore, limit: int = 20) -> list[RunRow]:
    return [r for r in store.recent_runs(limit) if r.job == "sync"]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    started: list[tuple[Daemon, IO[str]]] = []

    def start(cfg: Path, name: str = "daemon", args: tuple[str, ...] = ()) -> Daemon:
        err = (tmp_path / f"{name}.stderr").open("w")
        proc = subprocess.Popen(cli("daemon", "-c", str(cfg), "--port", "0", *args), cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        daemon = Daemon(proc, line.removeprefix("ops ").strip(), tmp_path / f"{name}.stderr")
        started.append((daemon, err))
        assert line.startswith("ops http://127.0.0.1:"), f"no ops line: {line!r}\n{daemon.stderr()[-3000:]}"
        return daemon

    yield start
    for daemon, err in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        assert daemon.proc.stdout is not None
        daemon.proc.stdout.close()
        err.close()


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=5)


def _ready(ops: str) -> bool:
    try:
        return _get(ops + "/readyz").status_code == 200
    except httpx.TransportError:
        return False


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "/healthz" not in stderr, "the ops server logged request lines"
    assert "/readyz" not in stderr, "the ops server logged request lines"


@pytest.mark.timeout(60)
def test_daemon_invoices_won_deals_serves_probes_refuses_a_second_daemon_and_stops_on_sigterm(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """Every job runs once at start; /metrics tells what they did; a second daemon on the SQLite file exits 1;
    SIGTERM exits 0 within 10 s."""
    cfg = _config(tmp_path, vendors, extra="")  # metrics enabled: all three jobs
    daemon = start_daemon(cfg)

    assert _get(daemon.ops + "/healthz").status_code == 200
    assert wait_until(lambda: _ready(daemon.ops), timeout=15), _get(daemon.ops + "/readyz").text
    assert _get(daemon.ops + "/nothing").status_code == 404

    won = vendors.won_references()
    assert len(won) >= 10
    assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=20), daemon.stderr()[-3000:]
    assert sorted(vendors.invoice_references()) == sorted(won)  # one invoice per won deal

    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert wait_until(lambda: {(r.job, r.status) for r in store.recent_runs(10)} >= {
            ("sync", "ok"), ("ledger", "ok"), ("metrics", "ok")}, timeout=30), store.recent_runs(10)
        cursor = store.get_cursor("main", "deals")
    finally:
        store.close()
    assert cursor is not None

    def scrape() -> dict[str, Metric]:
        return {f.name: f for f in text_string_to_metric_families(_get(daemon.ops + "/metrics").text)}

    def job_runs(families: dict[str, Metric]) -> dict[tuple[str, str], float]:
        return {(s.labels["job"], s.labels["status"]): s.value for s in families["ledgerbridge_job_runs"].samples
                if s.name.endswith("_total")}

    def settled(families: dict[str, Metric]) -> bool:
        """Sync and metrics ran once; the ledger job ran once, or found the ledger lease held by the metrics run
        (whose first step is the same ledger pull) and left it to that run."""
        runs = job_runs(families)
        skipped = sum(s.value for s in families["ledgerbridge_lease_skips"].samples
                      if s.name.endswith("_total") and s.labels["job"] == "ledger")
        ledger = runs.pop(("ledger", "ok"), 0)
        return runs == {("sync", "ok"): 1, ("metrics", "ok"): 1} and (ledger == 1 or (ledger == 0 and skipped >= 1))

    # A run's row is committed before the daemon counts the run, so the counters may trail the table briefly.
    assert wait_until(lambda: settled(scrape()), timeout=20), scrape()
    families = scrape()
    created = [s.value for s in families["ledgerbridge_invoices_created"].samples if s.name.endswith("_total")]
    assert created == [len(won)]
    calls = {s.labels["vendor"]: s.value for s in families["ledgerbridge_api_calls"].samples
             if s.name.endswith("_total")}
    assert calls.keys() == {"hubspot", "xero"}
    assert all(v > 0 for v in calls.values())
    budgets = {s.labels["vendor"]: s.value for s in families["ledgerbridge_rate_budget_remaining"].samples}
    assert budgets.keys() == {"hubspot", "xero"}
    success = {s.labels["job"]: s.value for s in families["ledgerbridge_last_success_timestamp_seconds"].samples}
    assert set(success) == {"sync", "ledger", "metrics"}
    assert all(abs(v - time.time()) < 120 for v in success.values())
    lag = [s for s in families["ledgerbridge_crm_lag_seconds"].samples if s.labels["pipeline"] == "main"]
    assert len(lag) == 1  # the time since the newest CRM change the sync has handled
    assert lag[0].value == pytest.approx(time.time() - cursor.value.timestamp(), abs=30)

    second = run_cli("daemon", "-c", str(cfg), "--port", "0", timeout=30)
    assert second.returncode == 1, second.stdout + second.stderr
    assert str((tmp_path / "state.db").resolve()) in second.stderr
    assert "PostgreSQL" in second.stderr
    assert "Traceback" not in second.stderr
    assert second.stdout == ""  # it never opened an ops port
    assert _ready(daemon.ops)  # the first daemon is unaffected

    code, took = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert took < 10
    _assert_quiet(daemon.stderr())
    assert sorted(vendors.invoice_references()) == sorted(won)


@pytest.mark.timeout(60)
def test_daemon_restarted_on_the_same_database_creates_nothing_and_stops_on_sigint(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """After a stop the SQLite lock is free: a new daemon starts, duplicates nothing, and SIGINT exits 0."""
    cfg = _config(tmp_path, vendors)
    first = start_daemon(cfg, "first")
    won = vendors.won_references()
    assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=20), first.stderr()[-3000:]
    assert first.stop(signal.SIGTERM)[0] == 0

    again = start_daemon(cfg, "again")
    assert wait_until(lambda: _ready(again.ops), timeout=15)
    # Its first run starts at once; wait until it has finished (the state records it), then compare.
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert wait_until(lambda: len([r for r in _sync_runs(store) if r.status != "running"]) >= 2,
                          timeout=20), again.stderr()[-3000:]
        runs = _sync_runs(store)
    finally:
        store.close()
    assert runs[0].counts.get("created", 0) == 0, runs[0]
    assert sorted(vendors.invoice_references()) == sorted(won)

    code, took = again.stop(signal.SIGINT)
    assert code == 0
    assert took < 10
    _assert_quiet(first.stderr() + again.stderr())


@pytest.mark.timeout(60)
def test_sigterm_lets_the_run_in_flight_finish_and_a_second_signal_stops_at_once(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """SIGTERM during a run waits for it to finish (exit 0); a second signal ends the process at once (128+n)."""
    cfg = _config(tmp_path, vendors)
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        vendors.xero.faults = FaultPlan("w:latency=1:1.0")  # every ledger write takes a second
        graceful = start_daemon(cfg, "graceful")
        assert wait_until(lambda: any(r.status == "running" for r in _sync_runs(store)), timeout=15)
        graceful.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert graceful.proc.poll() is None, "the daemon did not wait for the run in flight"
        assert graceful.proc.wait(30) == 0
        assert [r.status for r in _sync_runs(store)] == ["ok"]
        assert all(r.finished_at is not None for r in store.recent_runs(10))  # the ledger pull finished too
        assert sorted(vendors.invoice_references()) == sorted(vendors.won_references())
        _assert_quiet(graceful.stderr())

        vendors.xero.faults = FaultPlan(None)
        vendors.hubspot.faults = FaultPlan("latency=1:1.0")  # now every CRM call takes a second
        forced = start_daemon(cfg, "forced")
        assert wait_until(lambda: len(_sync_runs(store)) == 2, timeout=15)
        forced.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert forced.proc.poll() is None
        code, took = forced.stop(signal.SIGINT)
        assert code == 128 + signal.SIGINT
        assert took < 2
        assert "second signal" in forced.stderr()
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_sigterm_ends_a_long_run_after_its_page_in_flight_and_the_next_daemon_goes_on_from_there(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """A run with pages still to come stops after the page in flight: exit 0 long before the run would have
    ended, the run recorded partial with its cursor past that page; a new daemon invoices the rest, once."""
    cfg = _config(tmp_path, vendors, extra=NO_METRICS + "    page_size: 3\n")
    won = vendors.won_references()
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        vendors.xero.faults = FaultPlan("w:latency=1:1.0")  # every ledger write takes a second
        first = start_daemon(cfg, "first")
        assert wait_until(lambda: len(vendors.invoice_references()) > 0, timeout=30), first.stderr()[-3000:]
        code, took = first.stop(signal.SIGTERM, timeout=30)
        assert code == 0
        done = vendors.invoice_references()
        assert 0 < len(done) < len(won)  # ten pages of three deals: it did not run to the end
        assert took < 8  # a page (at most three one-second writes and its customers), not the whole run
        runs = _sync_runs(store)
        assert [r.status for r in runs] == ["partial"]
        assert "stopped for shutdown" in (runs[0].error or "")
        assert store.get_cursor("main", "deals") is not None
        assert store.open_intents("main", "invoice") == []  # nothing left half-done
        _assert_quiet(first.stderr())

        vendors.xero.faults = FaultPlan(None)
        second = start_daemon(cfg, "second")
        assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=30), second.stderr()[-3000:]
        assert sorted(vendors.invoice_references()) == sorted(won)  # one invoice per won deal
        assert second.stop(signal.SIGTERM)[0] == 0
        assert _sync_runs(store)[0].status == "ok"
    finally:
        store.close()


def test_daemon_exits_1_with_a_message_when_its_port_is_taken_or_the_state_store_is_down(
    vendors: Vendors, tmp_path: Path
) -> None:
    """A taken ops port or a PostgreSQL that refuses connections stops the start with exit 1, no traceback."""
    cfg = _config(tmp_path, vendors)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = run_cli("daemon", "-c", str(cfg), "--port", str(taken.getsockname()[1]), timeout=30)
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert "cannot serve the operations endpoint" in busy.stderr
    assert "Traceback" not in busy.stderr

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    pg_down = f"postgresql+psycopg://postgres@127.0.0.1:{closed}/x\n  secret_key: {generate_key()}"
    cfg.write_text(cfg.read_text().replace(f"sqlite:///{tmp_path / 'state.db'}", pg_down))
    down = run_cli("daemon", "-c", str(cfg), "--port", "0", timeout=30)
    assert down.returncode == 1, down.stdout + down.stderr
    assert "cannot open the state store" in down.stderr
    assert "Traceback" not in down.stderr
    assert vendors.invoice_references() == []


# ---- the operations endpoint on its own ------------------------------------------------------------


@contextmanager
def _ops(readiness: Readiness) -> Iterator[OpsServer]:
    server = OpsServer("127.0.0.1", 0, readiness.problems)
    try:
        yield server
    finally:
        server.stop()


def test_readyz_reports_a_refused_state_store_connection_as_503() -> None:
    """/readyz answers 503 naming the state store when PostgreSQL refuses connections; /healthz stays 200."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = StateStore(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x?connect_timeout=2",
                       secret_key=generate_key())
    readiness = Readiness()
    readiness.attach(store, lambda: True)
    try:
        with _ops(readiness) as server:
            ready = _get(server.url + "/readyz")
            assert ready.status_code == 503
            assert "state store unreachable" in ready.text
            assert _get(server.url + "/healthz").status_code == 200
    finally:
        store.close()


def test_readyz_answers_503_in_bounded_time_when_the_state_store_hangs() -> None:
    """A database host that accepts but never answers makes /readyz 503 within the probe timeout."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # the kernel completes handshakes; nothing ever answers them
        store = StateStore(f"postgresql+psycopg://postgres@127.0.0.1:{mute.getsockname()[1]}/x",
                           secret_key=generate_key())
        readiness = Readiness(timeout=0.5)
        readiness.attach(store, lambda: True)
        try:
            with _ops(readiness) as server:
                for _ in range(3):  # later probes share the hung one instead of piling up threads
                    start = time.monotonic()
                    ready = _get(server.url + "/readyz")
                    assert time.monotonic() - start < 3
                    assert ready.status_code == 503
                    assert "no answer within 0.5 s" in ready.text
            mute.close()  # the hung probe now fails; the next probes report the refused connection
            assert wait_until(lambda: readiness.problems() == ["state store unreachable: OperationalError"],
                              timeout=10)
        finally:
            store.close()


def test_readyz_follows_startup_the_store_and_shutdown(tmp_path: Path) -> None:
    """/readyz is 503 while starting, 200 with a migrated store and a running scheduler, 503 once stopping."""
    readiness = Readiness()
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    running = [True]
    try:
        with _ops(readiness) as server:
            assert _get(server.url + "/readyz").text == "starting\n"
            readiness.attach(store, lambda: running[0])
            ready = _get(server.url + "/readyz")
            assert (ready.status_code, ready.text) == (200, "ready\n")
            running[0] = False
            assert _get(server.url + "/readyz").text == "scheduler not running\n"
            readiness.stopping()
            stopping = httpx.head(server.url + "/readyz", timeout=5)
            assert stopping.status_code == 503
    finally:
        store.close()


def test_ops_server_logs_no_request_line_even_for_malformed_requests(capfd: pytest.CaptureFixture[str]) -> None:
    """Probes, unknown paths, garbage and clients that hang up write nothing to stdout or stderr."""
    readiness = Readiness()
    with _ops(readiness) as server:
        _get(server.url + "/healthz")
        _get(server.url + "/readyz")
        _get(server.url + "/missing")
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"NOT A REQUEST\r\n\r\n")
            raw.recv(4096)
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # hangs up mid-request
        assert _get(server.url + "/healthz").status_code == 200
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


class _Recorder:
    """A webhook handler that records what it was given and answers what it is told."""

    def __init__(self, answer: tuple[int, bytes] = (202, b'{"queued":true}'), fail: bool = False) -> None:
        self.calls: list[tuple[str, str, dict[str, str], bytes, float, str | None]] = []
        self.answer = answer
        self.fail = fail

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               now: float) -> tuple[int, bytes]:
        self.calls.append((method, path, dict(headers), body, now, headers.get("X-HUBSPOT-SIGNATURE-V3")))
        if self.fail:
            raise RuntimeError("handler failure")
        return self.answer


def test_ops_server_serves_metrics_and_hands_webhooks_to_the_handler() -> None:
    """/metrics answers the Prometheus text; /webhooks/... gets the raw request; other POSTs are 404."""
    readiness = Readiness()
    recorder = _Recorder()
    server = OpsServer("127.0.0.1", 0, readiness.problems, metrics=lambda: b"# HELP x y\n# TYPE x gauge\nx 1.0\n",
                       webhooks=recorder)
    try:
        scraped = _get(server.url + "/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert [f.name for f in text_string_to_metric_families(scraped.text)] == ["x"]

        before = time.time()
        body = b'[{"eventId": 1, "subscriptionType": "deal.propertyChange"}]'
        answer = httpx.post(server.url + "/webhooks/hubspot/main?x=1", content=body, timeout=5,
                            headers={"X-HubSpot-Signature-v3": "c2lnbmF0dXJl", "Content-Type": "application/json"})
        assert (answer.status_code, answer.content) == (202, b'{"queued":true}')
        assert answer.headers["content-type"] == "application/json"
        method, path, headers, got, now, signature = recorder.calls[-1]
        assert (method, path, got) == ("POST", "/webhooks/hubspot/main?x=1", body)
        assert signature == "c2lnbmF0dXJl"  # header lookup ignores case
        assert headers["X-HubSpot-Signature-v3"] == "c2lnbmF0dXJl"
        assert before <= now <= time.time()

        assert _get(server.url + "/webhooks/xero").status_code == 202
        assert recorder.calls[-1][:2] == ("GET", "/webhooks/xero")
        assert httpx.post(server.url + "/readyz", content=b"x", timeout=5).status_code == 404
        too_big = httpx.post(server.url + "/webhooks/xero", content=b"x" * (1 << 20 | 1), timeout=5)
        assert too_big.status_code == 413
        assert len(recorder.calls) == 2

        recorder.fail = True
        assert httpx.post(server.url + "/webhooks/xero", content=b"{}", timeout=5).status_code == 500
        assert _get(server.url + "/healthz").status_code == 200  # the server survives its handler

        server.set_webhooks(None)
        assert httpx.post(server.url + "/webhooks/xero", content=b"{}", timeout=5).status_code == 404
    finally:
        server.stop()
    bare = OpsServer("127.0.0.1", 0, readiness.problems)
    try:
        assert _get(bare.url + "/metrics").status_code == 404
    finally:
        bare.stop()


# ---- schedules ------------------------------------------------------------------------------------


def _fires(schedule: Schedule, start: dt.datetime, count: int) -> list[dt.datetime]:
    trigger = schedule_trigger(schedule)
    out: list[dt.datetime] = []
    previous: dt.datetime | None = None
    now = start
    for _ in range(count):
        nxt = trigger.get_next_fire_time(previous, now)
        assert nxt is not None
        out.append(nxt)
        previous, now = nxt, nxt
    return out


def test_schedules_read_crontab_weekdays_as_crontab_does_and_take_a_seconds_field() -> None:
    """Crontab counts weekdays from Sunday (0 and 7); a sixth, leading field gives seconds; intervals are minutes."""
    monday = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)  # a Monday
    assert monday.weekday() == 0
    at_nine = _fires(Schedule(cron="0 9 * * 1"), monday - dt.timedelta(days=1), 2)
    assert [d.strftime("%a %H:%M") for d in at_nine] == ["Mon 09:00", "Mon 09:00"]
    weekdays = _fires(Schedule(cron="30 6 * * 1-5"), monday, 6)
    assert [d.strftime("%a") for d in weekdays] == ["Mon", "Tue", "Wed", "Thu", "Fri", "Mon"]
    sundays = _fires(Schedule(cron="0 0 * * 0,7"), monday, 2)
    assert [d.strftime("%a %d") for d in sundays] == ["Sun 29", "Sun 06"]
    named = _fires(Schedule(cron="0 12 * * sat"), monday, 1)
    assert [d.strftime("%a %H") for d in named] == ["Sat 12"]

    every_five = _fires(Schedule(cron="*/5 * * * * *"), monday, 3)
    assert [(d - monday).total_seconds() for d in every_five] == [0, 5, 10]
    quarter = _fires(Schedule(interval_minutes=15), monday, 2)
    assert (quarter[1] - quarter[0]) == dt.timedelta(minutes=15)

    for bad in ("0 9 * *", "61 * * * *", "* * * * * * *", "0 9 * * funday"):
        with pytest.raises(ConfigError, match="cron expression"):
            schedule_trigger(Schedule(cron=bad))


def test_job_schedules_follow_the_pipeline_config(tmp_path: Path) -> None:
    """sync, ledger (60 minutes by default) and metrics; no metrics job when metrics are disabled."""
    cfg = write_config(tmp_path / "lb.yaml", hubspot_url="http://127.0.0.1:9", xero_url="http://127.0.0.1:9",
                       refresh_token="r", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                       extra="    schedule:\n      cron: '*/10 * * * * *'\n")
    pipeline = load_config(cfg).app.pipelines["main"]
    jobs = job_schedules(pipeline)
    assert list(jobs) == ["sync", "ledger", "metrics"]
    assert jobs["sync"].cron == "*/10 * * * * *"
    assert jobs["ledger"].interval_minutes == 60
    assert jobs["metrics"] == pipeline.metrics.schedule
    off = pipeline.model_copy(update={"metrics": pipeline.metrics.model_copy(update={"enabled": False})})
    assert list(job_schedules(off)) == ["sync", "ledger"]


def test_a_bad_schedule_stops_the_start_with_exit_1(vendors: Vendors, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "lb.yaml", hubspot_url=vendors.hubspot_url, xero_url=vendors.xero_url,
                       refresh_token="r", state_url=f"sqlite:///{tmp_path / 'state.db'}",
                       extra="    ledger_schedule:\n      cron: '0 25 * * *'\n")
    bad = run_cli("daemon", "-c", str(cfg), "--port", "0", timeout=30)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "pipelines.main: ledger schedule: cron expression '0 25 * * *'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert bad.stdout == ""


# ---- stop timeout and reloads ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_exits_0_after_the_stop_timeout_when_a_run_does_not_finish(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """A run still going after --stop-timeout is abandoned (its intents are committed); the exit code is 0."""
    cfg = _config(tmp_path, vendors)
    vendors.hubspot.faults = FaultPlan("latency=1:5.0")  # every CRM call takes five seconds
    store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        daemon = start_daemon(cfg, args=("--stop-timeout", "1"))
        assert wait_until(lambda: any(r.status == "running" for r in _sync_runs(store)), timeout=15)
        code, took = daemon.stop(signal.SIGTERM)
        assert code == 0
        assert 1 <= took < 4
        assert "stop timeout" in daemon.stderr()
        assert [r.status for r in _sync_runs(store)] == ["running"]  # left as it was; the next run settles it
        assert vendors.invoice_references() == []
    finally:
        store.close()


def _two_pipelines(cfg: Path) -> str:
    """The config with a second pipeline, ``extra``, a copy of ``main`` (same CRM and ledger)."""
    text = cfg.read_text()
    head, _, block = text.partition("pipelines:\n")
    return head + "pipelines:\n" + block + block.replace("  main:\n", "  extra:\n", 1)


@pytest.mark.timeout(60)
def test_sighup_or_a_changed_file_reloads_the_config_and_an_invalid_one_keeps_the_running_one(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """An invalid file is logged and reported by /readyz while the daemon keeps running; a valid one is applied:
    a pipeline added to it starts."""
    cfg = _config(tmp_path, vendors)
    valid = _two_pipelines(cfg)
    daemon = start_daemon(cfg, args=("--reload-interval", "0.3"))
    won = vendors.won_references()
    assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=20), daemon.stderr()[-3000:]

    cfg.write_text(valid.replace("interval_minutes: 1", "interval_minutes: 0"))  # fails validation
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "config file invalid" in _get(daemon.ops + "/readyz").text, timeout=10)
    assert _get(daemon.ops + "/readyz").status_code == 503
    assert "config reload failed" in daemon.stderr()
    assert "interval_minutes" in daemon.stderr()
    scraped = {f.name: f for f in text_string_to_metric_families(_get(daemon.ops + "/metrics").text)}
    assert scraped["ledgerbridge_config_valid"].samples[0].value == 0
    assert daemon.proc.poll() is None

    cfg.write_text(valid)  # no signal: the poll sees the change
    assert wait_until(lambda: _ready(daemon.ops), timeout=10), _get(daemon.ops + "/readyz").text
    extra = {r.replace("LB-main:", "LB-extra:") for r in won}
    assert wait_until(lambda: set(vendors.invoice_references()) == won | extra, timeout=20), daemon.stderr()[-3000:]
    assert sorted(vendors.invoice_references()) == sorted(won | extra)
    assert "config reloaded" in daemon.stderr()
    assert daemon.stop(signal.SIGTERM)[0] == 0
    _assert_quiet(daemon.stderr())


# ---- revoked connections, triggers (daemon in this process) ---------------------------------------


@contextmanager
def _in_process(cfg: Path, lease_s: float = 5.0) -> Iterator[tuple[Daemon_, DaemonMetrics, StateStore]]:
    loaded = load_config(cfg)
    with open_runtime(loaded, configure_logs=False) as rt:
        metrics = DaemonMetrics("test-replica")
        daemon = Daemon_(loaded, rt, Leases(rt.store, "test-replica", lease_s), metrics,
                         DaemonOptions(lease_s=lease_s, stop_timeout_s=20))
        daemon.start()
        try:
            yield daemon, metrics, rt.store
        finally:
            assert daemon.stop()


def _sample(metrics: DaemonMetrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


@pytest.mark.timeout(60)
def test_a_revoked_connection_pauses_its_pipeline_until_a_new_refresh_token_is_configured(
    vendors: Vendors, tmp_path: Path
) -> None:
    """invalid_grant (after re-reading the store) pauses the pipeline with an alert: triggers make no run and no
    token call; a reload with a new refresh token resumes it, and the new token replaces the dead stored one."""
    cfg = _config(tmp_path, vendors)
    with capture_logs() as logs, _in_process(cfg) as (daemon, metrics, store):
        assert wait_until(lambda: [r.status for r in _sync_runs(store)] == ["ok"], timeout=20)
        assert wait_until(lambda: not daemon.running_jobs(), timeout=20)
        vendors.xero.revoke_refresh_tokens()
        vendors.xero.expire_access_tokens()
        assert daemon.trigger("main", "ledger")  # the ledger pull always calls the ledger
        assert wait_until(lambda: daemon.paused_pipelines() == ["main"], timeout=20)
        failed = store.recent_runs(1)[0]
        assert (failed.job, failed.status) == ("ledger", "failed")
        assert "invalid_grant" in (failed.error or "")
        assert _sample(metrics, "ledgerbridge_pipeline_paused", pipeline="main") == 1
        assert _sample(metrics, "ledgerbridge_token_refresh_failures_total", pipeline="main") == 1
        alerts = [e for e in logs if e.get("alert") == "reauthorisation_required"]
        assert len(alerts) == 1
        assert alerts[0]["log_level"] == "error"

        refresh_calls = vendors.xero.refresh_calls
        runs = len(store.recent_runs(50))
        for job in ("sync", "ledger"):
            assert daemon.trigger("main", job)
        time.sleep(1.5)
        assert len(store.recent_runs(50)) == runs  # paused: no run, no retry loop
        assert vendors.xero.refresh_calls == refresh_calls
        assert not daemon.trigger("main", "nope")
        assert not daemon.trigger("nope", "sync")

        reauthorised = vendors.xero.issue_tokens()["refresh_token"]
        text = cfg.read_text()
        old_token = text.split("refresh_token: ", 1)[1].split("\n", 1)[0]
        cfg.write_text(text.replace(old_token, reauthorised))
        assert daemon.reload("test")
        assert daemon.paused_pipelines() == []
        assert _sample(metrics, "ledgerbridge_pipeline_paused", pipeline="main") == 0
        assert daemon.trigger("main", "ledger")
        assert wait_until(lambda: [(r.job, r.status) for r in store.recent_runs(1)] == [("ledger", "ok")], timeout=20)
        assert vendors.xero.refresh_calls == refresh_calls + 1  # the configured token, once
    assert sorted(vendors.invoice_references()) == sorted(vendors.won_references())


@pytest.mark.timeout(60)
def test_a_trigger_during_a_run_runs_the_job_again_right_after_it(vendors: Vendors, tmp_path: Path) -> None:
    """A change noticed while the job runs is not lost: the job runs once more when the run in flight ends."""
    cfg = _config(tmp_path, vendors)
    vendors.hubspot.faults = FaultPlan("latency=1:0.25")
    with _in_process(cfg) as (daemon, _metrics, store):
        assert wait_until(lambda: "main:sync" in daemon.running_jobs(), timeout=10)
        assert daemon.trigger("main", "sync")
        assert daemon.trigger("main", "sync")  # collapses with the first
        assert wait_until(lambda: len([r for r in _sync_runs(store) if r.status == "ok"]) == 2, timeout=30)
        time.sleep(1.0)
        assert len(_sync_runs(store)) == 2


HS_SECRET = "daemon-test-hubspot-client-secret"


@pytest.mark.timeout(60)
def test_signed_hubspot_webhooks_reach_the_daemon_and_run_the_sync_at_once(
    vendors: Vendors, tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """/webhooks/main/hubspot of the daemon: a won deal is invoiced seconds after its webhook, not at the next
    scheduled run (a minute later); a forged webhook is refused."""
    cfg = write_config(tmp_path / "lb.yaml", xero_url=vendors.xero_url,
                       refresh_token=vendors.xero.issue_tokens()["refresh_token"],
                       state_url=f"sqlite:///{tmp_path / 'state.db'}", extra=SCHEDULE + NO_METRICS,
                       crm_block=hubspot_block(vendors.hubspot_url) + f"      client_secret: {HS_SECRET}\n")
    daemon = start_daemon(cfg)
    won = vendors.won_references()
    assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=20), daemon.stderr()[-3000:]
    sender = None
    try:
        hook = daemon.ops + "/webhooks/main/hubspot"
        registered = httpx.post(vendors.hubspot_url + "/_sandbox/webhooks", timeout=10,
                                json={"url": hook, "client_secret": HS_SECRET})
        assert registered.status_code == 200, registered.text
        sender = vendors.hubspot.webhook_sender()
        deal = next(d for d in vendors.hubspot.deals_snapshot() if d.get("hs_is_closed") != "true")
        stage = "84213561" if deal.get("pipeline") == CUSTOM_PIPELINE_ID else "closedwon"
        won_at = time.monotonic()
        vendors.hubspot.modify_deal(deal["hs_object_id"], dealstage=stage)
        reference = f"LB-main:{deal['hs_object_id']}"
        assert wait_until(lambda: reference in vendors.invoice_references(), timeout=20), daemon.stderr()[-3000:]
        assert time.monotonic() - won_at < 15  # the next scheduled run was a minute away

        forged = b'[{"eventId": 1, "subscriptionType": "deal.propertyChange", "objectId": 1}]'
        refused = httpx.post(hook, content=forged, timeout=10, headers={
            "Content-Type": "application/json", "X-HubSpot-Request-Timestamp": str(int(time.time() * 1000)),
            "X-HubSpot-Signature-v3": "Zm9yZ2Vk"})
        assert refused.status_code == 401
    finally:
        if sender is not None:
            sender.stop()
    assert sorted(vendors.invoice_references()) == sorted(vendors.won_references())
    assert daemon.stop(signal.SIGTERM)[0] == 0
    _assert_quiet(daemon.stderr())
