"""``ledgerbridge daemon``: runs every enabled pipeline on its schedule until stopped.

- APScheduler 3.x, one job per pipeline, ``max_instances=1`` and ``coalesce=True`` so a slow run is
  never doubled and missed runs collapse into one. Each pipeline's first run starts at once.
- SQLite means exactly one daemon: a second one on the same database file refuses to start (exit 1),
  naming the file. PostgreSQL takes several replicas.
- An operations endpoint serves ``/healthz`` (the process is alive: always 200) and ``/readyz`` (200 when
  the state store answers within :data:`READY_CHECK_TIMEOUT_S` and the scheduler runs, 503 otherwise, with
  the reasons in the body). It logs no request line. Its URL is printed on the first line of standard
  output as ``ops http://HOST:PORT``, so that ``--port 0`` (any free port) can be used.
- SIGTERM or SIGINT lets the run in flight finish, then exits 0; a second signal stops at once (exit
  128 + signal number), which the intents written before every ledger write make safe.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from config.loader import LoadedConfig
from connectors.errors import ConfigError, redact
from sync.runtime import open_runtime
from sync.state import StateError, StateStore

__all__ = ["READY_CHECK_TIMEOUT_S", "OpsServer", "Readiness", "run_daemon", "sqlite_single_instance"]

log = structlog.get_logger("ledgerbridge.daemon")

READY_CHECK_TIMEOUT_S = 3.0
"""Longest a ``/readyz`` probe waits for the state store before answering 503."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.2


# --------------------------------------------------------------------------------------------------
# One daemon per SQLite database
# --------------------------------------------------------------------------------------------------


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, resolved as :class:`~sync.state.StateStore` does; else None."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None  # in-memory databases belong to one process anyway
    return Path(database).expanduser().resolve()


@contextmanager
def sqlite_single_instance(url: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite database for the daemon's lifetime.

    Raises :class:`ConfigError` naming the database when another daemon holds it. PostgreSQL (and
    in-memory SQLite) need no lock.
    """
    db = _sqlite_file(url)
    if db is None:
        yield
        return
    lock_path = db.with_name(db.name + ".daemon.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"another ledgerbridge daemon{pid} already uses the SQLite state database {db}: SQLite "
                "supports one daemon at a time; to run several replicas, use PostgreSQL "
                "(state.url: postgresql+psycopg://USER@HOST:5432/DB)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------------------------------
# Readiness
# --------------------------------------------------------------------------------------------------


class Readiness:
    """What ``/readyz`` reports: the reasons the daemon is not ready, none when it is.

    The state store is asked for its schema revision (a real read of the database, not a bare
    ``SELECT 1`` that SQLite answers without its file). The probe runs in a thread of its own and is
    awaited at most ``timeout`` seconds, so an unreachable PostgreSQL host cannot hold probes; while a
    probe hangs, later requests wait on the same probe rather than starting more.
    """

    def __init__(self, timeout: float = READY_CHECK_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._store: StateStore | None = None
        self._scheduler_running: Callable[[], bool] | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._probe: Future[str | None] | None = None
        self._last_store_problem: str | None = None

    def attach(self, store: StateStore, scheduler_running: Callable[[], bool]) -> None:
        """The daemon has opened its state store and built its scheduler."""
        with self._lock:
            self._store = store
            self._scheduler_running = scheduler_running

    def stopping(self) -> None:
        """Shutdown has begun: report unready so that traffic and rollouts move on."""
        with self._lock:
            self._stopping = True

    def problems(self) -> list[str]:
        with self._lock:
            store, running, stopping = self._store, self._scheduler_running, self._stopping
        if stopping:
            return ["shutting down"]
        if store is None or running is None:
            return ["starting"]
        found = []
        store_problem = self._check_store(store)
        if store_problem:
            found.append(store_problem)
        if not running():
            found.append("scheduler not running")
        return found

    def _check_store(self, store: StateStore) -> str | None:
        with self._lock:
            probe = self._probe
            if probe is None or probe.done():
                probe = Future()
                self._probe = probe
                threading.Thread(target=self._run_probe, args=(store, probe), name="ops-readyz-probe",
                                 daemon=True).start()
        try:
            problem = probe.result(timeout=self.timeout)
        except TimeoutError:
            problem = f"state store unreachable: no answer within {self.timeout:g} s"
        self._note(problem)
        return problem

    @staticmethod
    def _run_probe(store: StateStore, probe: Future[str | None]) -> None:
        try:
            revision = store.schema_revision()
        except Exception as exc:  # every failure means not ready; the reason is reported, not raised
            probe.set_result(f"state store unreachable: {type(exc).__name__}")
            log.debug("state store probe failed", error=redact(str(exc), limit=300))
            return
        probe.set_result(None if revision is not None else "state store has no schema")

    def _note(self, problem: str | None) -> None:
        """Log changes of the state store's health (once per change, not once per probe)."""
        with self._lock:
            before, self._last_store_problem = self._last_store_problem, problem
        if problem != before:
            if problem:
                log.warning("not ready", reason=problem)
            elif before:
                log.info("ready again", previous=before)


# --------------------------------------------------------------------------------------------------
# Operations endpoint
# --------------------------------------------------------------------------------------------------


class _OpsHandler(BaseHTTPRequestHandler):
    server: _OpsHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "ledgerbridge"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Probes are too frequent to log; nothing about requests is logged."""

    def _reply(self, status: int, body: str, *, head: bool = False) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _route(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, "ok\n", head=head)
        elif path == "/readyz":
            problems = self.server.problems()
            self._reply(503 if problems else 200, ("\n".join(problems) or "ready") + "\n", head=head)
        else:
            self._reply(404, "not found\n", head=head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


class _OpsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], problems: Callable[[], list[str]],
                 family: socket.AddressFamily) -> None:
        self.address_family = family
        self.problems = problems
        super().__init__(address, _OpsHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is no news: print no traceback, log nothing."""


class OpsServer:
    """``/healthz`` and ``/readyz`` on ``host:port`` (port 0: any free port), served by a background thread."""

    def __init__(self, host: str, port: int, problems: Callable[[], list[str]]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = _OpsHTTPServer((host, port), problems, family)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"cannot serve the operations endpoint on {host}:{port}: {reason}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": _POLL_S},
                                        name="ops-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT handlers that only record the signal (nothing that takes a lock runs in them)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            # A second signal: stop now. Intents are committed before every ledger write, so the next
            # run settles whatever was in flight without duplicating it.
            os.write(2, b"ledgerbridge daemon: second signal, stopping now\n")
            os._exit(128 + signum)
        self.received = signum

    def wait(self) -> int:
        while self.received is None:
            time.sleep(_POLL_S)
        return self.received


def run_daemon(config: LoadedConfig, *, host: str = "127.0.0.1", port: int = 8080,
               out: TextIO | None = None) -> int:
    """Run the enabled pipelines on their schedules until SIGTERM or SIGINT; returns the exit code.

    Raises :class:`ConfigError` when the daemon cannot start (another daemon holds the SQLite database,
    the operations port is taken, the state configuration is wrong).
    """
    out = out or sys.stdout
    with _Signals() as signals, sqlite_single_instance(config.app.state.url):
        readiness = Readiness()
        ops = OpsServer(host, port, readiness.problems)
        try:
            with suppress(OSError, ValueError):  # a closed standard output must not stop the daemon
                out.write(f"ops {ops.url}\n")
                out.flush()
            return _serve(config, ops, readiness, signals)
        finally:
            ops.stop()


def _serve(config: LoadedConfig, ops: OpsServer, readiness: Readiness, signals: _Signals) -> int:
    with ExitStack() as stack:
        try:
            rt = stack.enter_context(open_runtime(config))
        except (SQLAlchemyError, OSError, StateError) as exc:
            log.error("cannot open the state store", error=f"{type(exc).__name__}: {redact(str(exc), limit=300)}")
            return 1
        # APScheduler's own INFO lines ("Running job ...") repeat what the runs log.
        logging.getLogger("apscheduler").setLevel(max(logging.getLogger().level, logging.WARNING))
        scheduler = BackgroundScheduler(timezone=dt.UTC)

        def run_pipeline(name: str) -> None:
            try:
                with rt.runner(name) as runner:
                    runner.run()
            except Exception:  # a failed run must not kill the scheduler; it is logged with its traceback
                log.exception("pipeline run crashed", pipeline=name)

        names = rt.pipeline_names()
        for name in names:
            sched = config.app.pipelines[name].schedule
            trigger = (CronTrigger.from_crontab(sched.cron, timezone=dt.UTC) if sched.cron
                       else IntervalTrigger(minutes=sched.interval_minutes, timezone=dt.UTC))
            scheduler.add_job(run_pipeline, trigger, args=[name], id=f"sync:{name}", max_instances=1,
                              coalesce=True, misfire_grace_time=300, next_run_time=dt.datetime.now(dt.UTC))
        if signals.received is None:  # a signal during startup: stop before the first run
            scheduler.start()
            readiness.attach(rt.store, lambda: bool(scheduler.running))
            log.info("daemon started", pipelines=names, ops=ops.url)
            signals.wait()
        log.info("stopping: letting runs in flight finish",
                 signal=signal.Signals(signals.received).name if signals.received else None)
        readiness.stopping()
        if scheduler.running:
            scheduler.shutdown(wait=True)
    log.info("daemon stopped")
    return 0
