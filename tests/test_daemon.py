"""`ledgerbridge daemon`: scheduled sync, health and readiness probes, one daemon per SQLite file, clean stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.sandboxkit import FaultPlan, SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from sync.crypto import generate_key
from sync.daemon import OpsServer, Readiness
from sync.state import StateStore
from tests.harness import REPO, cli, run_cli, wait_until, write_config

SCHEDULE = "    schedule:\n      interval_minutes: 1\n"


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


def _config(tmp_path: Path, v: Vendors) -> Path:
    return write_config(tmp_path / "lb.yaml", hubspot_url=v.hubspot_url, xero_url=v.xero_url,
                        refresh_token=v.xero.issue_tokens()["refresh_token"],
                        state_url=f"sqlite:///{tmp_path / 'state.db'}", extra=SCHEDULE)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    started: list[tuple[Daemon, IO[str]]] = []

    def start(cfg: Path, name: str = "daemon") -> Daemon:
        err = (tmp_path / f"{name}.stderr").open("w")
        proc = subprocess.Popen(cli("daemon", "-c", str(cfg), "--port", "0"), cwd=REPO, text=True,
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
    """The first run starts at once; a second daemon on the SQLite file exits 1; SIGTERM exits 0 within 10 s."""
    cfg = _config(tmp_path, vendors)
    daemon = start_daemon(cfg)

    assert _get(daemon.ops + "/healthz").status_code == 200
    assert wait_until(lambda: _ready(daemon.ops), timeout=15), _get(daemon.ops + "/readyz").text
    assert _get(daemon.ops + "/nothing").status_code == 404

    won = vendors.won_references()
    assert len(won) >= 10
    assert wait_until(lambda: set(vendors.invoice_references()) == won, timeout=20), daemon.stderr()[-3000:]
    assert sorted(vendors.invoice_references()) == sorted(won)  # one invoice per won deal

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
        assert wait_until(lambda: len([r for r in store.recent_runs(10) if r.status != "running"]) >= 2,
                          timeout=20), again.stderr()[-3000:]
        runs = store.recent_runs(10)
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
        assert wait_until(lambda: any(r.status == "running" for r in store.recent_runs(5)), timeout=15)
        graceful.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert graceful.proc.poll() is None, "the daemon did not wait for the run in flight"
        assert graceful.proc.wait(30) == 0
        assert [r.status for r in store.recent_runs(5)] == ["ok"]
        assert sorted(vendors.invoice_references()) == sorted(vendors.won_references())
        _assert_quiet(graceful.stderr())

        vendors.xero.faults = FaultPlan(None)
        vendors.hubspot.faults = FaultPlan("latency=1:1.0")  # now every CRM call takes a second
        forced = start_daemon(cfg, "forced")
        assert wait_until(lambda: len(store.recent_runs(5)) == 2, timeout=15)
        forced.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert forced.proc.poll() is None
        code, took = forced.stop(signal.SIGINT)
        assert code == 128 + signal.SIGINT
        assert took < 2
        assert "second signal" in forced.stderr()
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
