"""``ledgerbridge daemon``: runs every enabled pipeline's jobs on their schedules until stopped.

Jobs
    Each pipeline has three jobs: ``sync`` (won deals to invoices, on ``schedule``), ``ledger`` (the pull
    of invoices, credit notes and payments, on ``ledger_schedule``) and ``metrics`` (on
    ``metrics.schedule``; none when ``metrics.enabled`` is false). They are APScheduler 3.x jobs with
    ``max_instances=1`` and ``coalesce=True``: a slow run is never doubled, missed runs collapse into one.
    Every job runs once at start. A schedule is an interval in minutes or a crontab expression (UTC; 5
    fields, or 6 with a leading seconds field). :meth:`Daemon.trigger` runs a job soon (webhooks use it).

Replicas
    Several daemons may share one PostgreSQL state store. A job runs under a lease (:mod:`sync.leases`)
    named ``"<pipeline>:<job>"``: one replica at a time runs it, and a replica that dies gives it up within
    the lease time (``--lease-seconds``). Every replica tries every job on its schedule; the one that
    takes the lease runs it, the others skip (logged at debug). A scheduled run is also skipped when
    another replica started the job less than 90 % of its period ago, so N replicas run a job about once
    per period between them, not N times. Runs at start and triggered runs skip that check. The metrics
    job pulls the ledger first, so it also holds the ledger job's lease. Leases live in the database; the
    correctness of ledger writes does not rest on them (idempotency keys and committed intents do).
    SQLite means exactly one daemon: a second one on the same database file refuses to start (exit 1).

Operations endpoint
    ``/healthz`` (alive: always 200), ``/readyz`` (200 when the state store answers within
    :data:`READY_CHECK_TIMEOUT_S`, the scheduler runs and the config file on disk is valid; 503 with the
    reasons otherwise), ``/metrics`` (Prometheus text format, see :mod:`sync.observability`) and, when a
    webhook handler is given (the CLI gives :class:`sync.webhooks.WebhookReceiver`, rebuilt on each config
    reload), ``/webhooks/...``. No request line is logged. The URL is printed on the first line of standard
    output as ``ops http://HOST:PORT`` (so that ``--port 0``, any free port, can be used).

Signals and reloads
    SIGTERM or SIGINT: no new run starts; a run in flight finishes the part it is on (the page of deals,
    the chunk of ledger facts or of written values), records it, moves its cursor past it and ends
    ``partial``; then the daemon exits 0. Runs still going after ``--stop-timeout`` seconds (a single slow
    vendor call, a metrics computation) are abandoned (the process exits 0 anyway): the intents committed
    before every ledger write make the next run finish their work without duplicating it. A second signal
    stops at once (exit 128 + signal number). SIGHUP, or a change of the config file (polled every
    ``--reload-interval`` seconds), reloads the config: it is validated first; an invalid file is logged
    and the running config kept (``/readyz`` reports it until the file is fixed); a valid one replaces it
    and the jobs are rescheduled. A change of the state store (URL or key) needs a restart.

Revoked connections
    A job that ends because the vendor refused the connection's refresh token (``invalid_grant``, after the
    token store was read again in case another replica had rotated it; the connector raises
    :class:`~connectors.errors.ReauthorizationRequired` and the job's outcome says so) pauses the pipeline: an error is
    logged, ``ledgerbridge_pipeline_paused`` goes to 1 and ``ledgerbridge_token_refresh_failures_total``
    counts it. The pipeline's jobs are skipped, not retried, until its config or its stored token changes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TextIO

import structlog
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from config.loader import LoadedConfig, load_config
from config.schema import Pipeline, Schedule
from connectors.errors import ConfigError, redact
from sync.engine import STREAM
from sync.leases import DEFAULT_LEASE_S, Leases, replica_id
from sync.logging import configure_logging
from sync.observability import CONTENT_TYPE, DaemonMetrics, watching_connectors
from sync.runtime import Job, JobOutcome, Runtime, open_runtime
from sync.state import StateError, StateStore

__all__ = [
    "READY_CHECK_TIMEOUT_S",
    "Daemon",
    "DaemonOptions",
    "OpsServer",
    "Readiness",
    "WebhookHandler",
    "job_schedules",
    "run_daemon",
    "schedule_trigger",
    "sqlite_database",
    "sqlite_single_instance",
]

log = structlog.get_logger("ledgerbridge.daemon")

READY_CHECK_TIMEOUT_S = 3.0
"""Longest a ``/readyz`` probe waits for the state store before answering 503."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.2
_TRIGGER_RETRY_S = 2.0  # a triggered run that finds the job running elsewhere tries again this much later
_TRIGGER_RETRIES = 30
_GAP_SHARE = 0.9  # a scheduled run is skipped when the job started less than this share of its period ago
_MAX_WEBHOOK_BODY = 1 << 20

#: The leases a job holds besides its own: the metrics job pulls the ledger first, so it also holds the ledger
#: pull's lease (waiting up to the lease time for a ledger pull in flight to end); two pulls of one ledger
#: never run at once.
_ALSO_HOLDS: dict[str, tuple[Job, ...]] = {"metrics": ("ledger",)}


# --------------------------------------------------------------------------------------------------
# One daemon per SQLite database
# --------------------------------------------------------------------------------------------------


def sqlite_database(url: str) -> Path | None:
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
    db = sqlite_database(url)
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
# Schedules
# --------------------------------------------------------------------------------------------------

_CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_day_of_week(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) in APScheduler 3's terms (which count from Monday).

    Numbers become day names, and numeric ranges become lists of names; names and ``*`` pass unchanged.
    """
    parts: list[str] = []
    for part in field.split(","):
        m = re.fullmatch(r"(\d)(?:-(\d)(?:/(\d+))?)?", part)
        if m is None:
            parts.append(part)
            continue
        first, last, step = m.group(1), m.group(2), m.group(3)
        if last is None:
            parts.append(_CRONTAB_DAYS[int(first) % 7])
            continue
        days = range(int(first), int(last) + 1, int(step or 1))
        parts.extend(dict.fromkeys(_CRONTAB_DAYS[d % 7] for d in days))
    return ",".join(parts)


def schedule_trigger(schedule: Schedule) -> BaseTrigger:
    """The APScheduler trigger of a schedule (UTC). Raises :class:`ConfigError` for a bad cron expression."""
    if not schedule.cron:
        return IntervalTrigger(minutes=schedule.interval_minutes, timezone=dt.UTC)
    fields = schedule.cron.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron expression {schedule.cron!r}: expected 5 fields (minute hour day month weekday) "
                          "or 6 (second first)")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_crontab_day_of_week(weekday), timezone=dt.UTC)
    except ValueError as exc:
        raise ConfigError(f"cron expression {schedule.cron!r}: {exc}") from None


def job_schedules(pipeline: Pipeline) -> dict[Job, Schedule]:
    """The jobs a pipeline runs and their schedules (no metrics job when metrics are disabled)."""
    out: dict[Job, Schedule] = {"sync": pipeline.schedule, "ledger": pipeline.ledger_schedule}
    if pipeline.metrics.enabled:
        out["metrics"] = pipeline.metrics.schedule
    return out


def _planned_jobs(config: LoadedConfig) -> dict[str, tuple[str, Job, Schedule, BaseTrigger]]:
    """Every job of every enabled pipeline by id (``pipeline:job``), its schedule checked."""
    jobs: dict[str, tuple[str, Job, Schedule, BaseTrigger]] = {}
    for name, pipeline in config.app.pipelines.items():
        if not pipeline.enabled:
            continue
        for job, schedule in job_schedules(pipeline).items():
            try:
                trigger = schedule_trigger(schedule)
            except ConfigError as exc:
                raise ConfigError(f"{config.path}: pipelines.{name}: {job} schedule: {exc}") from None
            jobs[f"{name}:{job}"] = (name, job, schedule, trigger)
    return jobs


def _period_s(trigger: BaseTrigger, now: dt.datetime) -> float:
    """The time between two runs of ``trigger`` around ``now`` (0 when it has no next run)."""
    if isinstance(trigger, IntervalTrigger):
        return float(trigger.interval_length)
    following = trigger.get_next_fire_time(now, now)
    return max((following - now).total_seconds(), 0.0) if following is not None else 0.0


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
        self._config_problem: Callable[[], str | None] = lambda: None
        self._stopping = False
        self._lock = threading.Lock()
        self._probe: Future[str | None] | None = None
        self._last_store_problem: str | None = None

    def attach(self, store: StateStore, scheduler_running: Callable[[], bool],
               config_problem: Callable[[], str | None] | None = None) -> None:
        """The daemon has opened its state store and built its scheduler."""
        with self._lock:
            self._store = store
            self._scheduler_running = scheduler_running
            if config_problem is not None:
                self._config_problem = config_problem

    def stopping(self) -> None:
        """Shutdown has begun: report unready so that traffic and rollouts move on."""
        with self._lock:
            self._stopping = True

    def problems(self) -> list[str]:
        with self._lock:
            store, running, stopping = self._store, self._scheduler_running, self._stopping
            config_problem = self._config_problem
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
        bad_config = config_problem()
        if bad_config:
            found.append(bad_config)
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


class WebhookHandler(Protocol):
    """Receives the requests under ``/webhooks/`` (:class:`sync.webhooks.WebhookReceiver` is one).

    ``path`` is the request target as sent (query string included, as signatures cover it), ``headers`` a
    case-insensitive mapping, ``body`` the raw bytes, ``now`` the receipt time (Unix seconds). Returns the
    status and the body of the answer (a non-empty body is sent as JSON). A handler with a ``max_body``
    attribute gets 413 answered for it above that size (else above 1 MiB); one with ``close()`` is closed
    when it is replaced (config reload) and at shutdown.
    """

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               now: float) -> tuple[int, bytes]: ...


class _Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup (the last value of a repeated header wins)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = {k.lower(): (k, v) for k, v in items}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items


class _OpsHandler(BaseHTTPRequestHandler):
    server: _OpsHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "ledgerbridge"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Probes are too frequent to log; nothing about requests is logged."""

    def _reply(self, status: int, body: str | bytes, *, head: bool = False,
               content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
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
        elif path == "/metrics" and self.server.metrics is not None:
            self._reply(200, self.server.metrics(), head=head, content_type=CONTENT_TYPE)
        elif path.startswith("/webhooks/") and self.server.webhooks is not None and not head:
            self._webhook("GET")
        else:
            self._reply(404, "not found\n", head=head)

    def _webhook(self, method: str) -> None:
        handler = self.server.webhooks
        assert handler is not None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._reply(400, "bad Content-Length\n")
            return
        if length < 0 or length > int(getattr(handler, "max_body", _MAX_WEBHOOK_BODY)):
            self.close_connection = True
            self._reply(413, "payload too large\n")
            return
        body = self.rfile.read(length) if length else b""
        try:
            status, answer = handler.handle(method, self.path, _Headers(list(self.headers.items())), body,
                                            time.time())
        except Exception:  # the handler's failure is a 500 for the sender, never a dead server
            log.exception("webhook handler failed", path=self.path.split("?", 1)[0])
            status, answer = 500, b"internal error\n"
        self._reply(status, answer, content_type="application/json" if answer else "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:
        if self.path.startswith("/webhooks/") and self.server.webhooks is not None:
            self._webhook("POST")
        else:
            self.close_connection = True  # the unread body must not be taken for the next request
            self._reply(404, "not found\n")


class _OpsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], problems: Callable[[], list[str]],
                 family: socket.AddressFamily, metrics: Callable[[], bytes] | None,
                 webhooks: WebhookHandler | None) -> None:
        self.address_family = family
        self.problems = problems
        self.metrics = metrics
        self.webhooks = webhooks
        super().__init__(address, _OpsHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is no news: print no traceback, log nothing."""


class OpsServer:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/webhooks/...`` on ``host:port`` (port 0: any free port).

    Served by a background thread. ``metrics`` renders the Prometheus text (no ``/metrics`` without it);
    ``webhooks`` receives ``/webhooks/...`` (404 without it; :meth:`set_webhooks` may add it later).
    """

    def __init__(self, host: str, port: int, problems: Callable[[], list[str]], *,
                 metrics: Callable[[], bytes] | None = None, webhooks: WebhookHandler | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = _OpsHTTPServer((host, port), problems, family, metrics, webhooks)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"cannot serve the operations endpoint on {host}:{port}: {reason}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": _POLL_S},
                                        name="ops-http", daemon=True)
        self._thread.start()

    def set_webhooks(self, webhooks: WebhookHandler | None) -> None:
        self._server.webhooks = webhooks

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


@dataclasses.dataclass(frozen=True)
class DaemonOptions:
    """How the daemon runs (the ``ledgerbridge daemon`` options)."""

    host: str = "127.0.0.1"
    port: int = 8080
    lease_s: float = DEFAULT_LEASE_S
    stop_timeout_s: float = 30.0
    reload_interval_s: float = 5.0
    workers: int = 8

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.stop_timeout_s < 0 or self.reload_interval_s <= 0 or self.workers < 1:
            raise ConfigError("daemon options: --lease-seconds, --reload-interval and --workers must be positive, "
                              "--stop-timeout not negative")


@dataclasses.dataclass
class _Pause:
    reason: str
    generations: dict[str, int]


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Daemon:
    """The scheduler and its jobs, the leases, the pauses and the config reloads of one daemon process."""

    def __init__(self, config: LoadedConfig, rt: Runtime, leases: Leases, metrics: DaemonMetrics,
                 options: DaemonOptions) -> None:
        self.config = config
        self.rt = rt
        self.leases = leases
        self.metrics = metrics
        self.options = options
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            executors={"default": ThreadPoolExecutor(options.workers)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 300},
        )
        self.scheduler.add_listener(self._scheduler_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running: set[str] = set()
        self._no_gap: set[str] = set()  # next run ignores the period check (first run, trigger)
        self._triggered: set[str] = set()  # next run retries while another replica holds the job
        self._again: set[str] = set()  # triggered while running here: run again when done
        self._retries: dict[str, int] = {}
        self._triggers: dict[str, BaseTrigger] = {}
        self._schedules: dict[str, Schedule] = {}
        self._paused: dict[str, _Pause] = {}
        self._stopping = False
        self._stop_event = threading.Event()
        self._config_problem: str | None = None
        self._config_stamp = _stamp(config.path)
        #: Called after a config reload was applied (the webhook handler is rebuilt on the new config).
        self.on_reload: list[Callable[[], None]] = []

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Schedule every job (first runs at once) and start the scheduler."""
        planned = _planned_jobs(self.config)
        for job_id, (name, job, schedule, trigger) in planned.items():
            self._add(job_id, name, job, schedule, trigger)
        self._load_cursors(self.rt.pipeline_names())
        self.scheduler.start()

    def stop(self) -> bool:
        """Start no new run and wait for the runs in flight, at most ``stop_timeout_s``; False if some remain."""
        with self._lock:
            self._stopping = True
        self._stop_event.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + self.options.stop_timeout_s
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def running_jobs(self) -> list[str]:
        with self._lock:
            return sorted(self._running)

    def config_problem(self) -> str | None:
        return self._config_problem

    # ---- scheduling ---------------------------------------------------------------------------------

    def _add(self, job_id: str, name: str, job: Job, schedule: Schedule, trigger: BaseTrigger) -> None:
        with self._lock:
            self._no_gap.add(job_id)
            self._triggers[job_id] = trigger
            self._schedules[job_id] = schedule
        self.scheduler.add_job(self._job, trigger, args=[name, job], id=job_id, name=job_id,
                               next_run_time=dt.datetime.now(dt.UTC), replace_existing=True)

    def _wake(self, job_id: str, delay_s: float = 0.0) -> None:
        """Run the job ``delay_s`` from now, unless its next run is due sooner anyway."""
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_s)
        scheduled = self.scheduler.get_job(job_id)
        if scheduled is None or (scheduled.next_run_time is not None and scheduled.next_run_time <= when):
            return
        with suppress(JobLookupError):
            self.scheduler.modify_job(job_id, next_run_time=when)

    def trigger(self, pipeline: str, job: str = "sync") -> bool:
        """Run ``job`` of ``pipeline`` soon (now, or right after the run in flight here); False if unknown.

        If another replica holds the job, this replica tries again every few seconds for a while, so the
        change that prompted the trigger is not left to the next scheduled run.
        """
        job_id = f"{pipeline}:{job}"
        with self._lock:
            if self._stopping or job_id not in self._triggers:
                return False
            self._no_gap.add(job_id)
            self._triggered.add(job_id)
            self._retries.pop(job_id, None)
            if job_id in self._running:
                self._again.add(job_id)
                return True
        self._wake(job_id)
        return True

    def _scheduler_event(self, event: JobExecutionEvent) -> None:
        what = "missed its run time" if event.code == EVENT_JOB_MISSED else "still running at its next run time"
        log.debug(f"scheduled run skipped: the job {what}", job_id=event.job_id)

    # ---- running a job ------------------------------------------------------------------------------

    def _job(self, pipeline: str, job: Job) -> None:
        job_id = f"{pipeline}:{job}"
        with self._lock:
            if self._stopping or job_id in self._running:
                return
            self._running.add(job_id)
        try:
            while True:
                with self._lock:
                    no_gap = job_id in self._no_gap
                    triggered = job_id in self._triggered
                    self._no_gap.discard(job_id)
                    self._triggered.discard(job_id)
                    trigger = self._triggers.get(job_id)
                self._attempt(pipeline, job, job_id, no_gap=no_gap, triggered=triggered, trigger=trigger)
                with self._lock:
                    # Triggered while it ran: run once more now, in this thread (the scheduler would count
                    # this run as still going and skip a run due now).
                    again = job_id in self._again and not self._stopping
                    self._again.discard(job_id)
                if not again:
                    return
        finally:
            with self._lock:
                self._running.discard(job_id)
                self._idle.notify_all()

    def _attempt(self, pipeline: str, job: Job, job_id: str, *, no_gap: bool, triggered: bool,
                 trigger: BaseTrigger | None) -> None:
        if self._is_paused(pipeline):
            log.debug("job skipped: the pipeline is paused", pipeline=pipeline, job=job)
            return
        gap = 0.0
        if not no_gap and trigger is not None:
            gap = _GAP_SHARE * _period_s(trigger, dt.datetime.now(dt.UTC))
        started = time.monotonic()
        try:
            with ExitStack() as stack:
                held = stack.enter_context(self.leases.hold(job_id, min_gap_s=gap))
                if held is None:
                    self.metrics.lease_skips.labels(pipeline, job).inc()
                    log.debug("job skipped: another replica runs it or ran it within its period",
                              pipeline=pipeline, job=job)
                    if triggered:
                        self._retry_later(job_id)
                    return
                also = [stack.enter_context(self.leases.hold(f"{pipeline}:{other}", wait_s=self.leases.lease_s,
                                                             give_up=self._stop_event))
                        for other in _ALSO_HOLDS.get(job, ())]
                if any(h is None for h in also):
                    log.debug("job postponed: a job it includes is running", pipeline=pipeline, job=job)
                    self._retry_later(job_id)
                    return
                with self._lock:
                    self._retries.pop(job_id, None)
                outcome = self._run(pipeline, job, held.token, started)
                if held.lost.is_set() or any(h is not None and h.lost.is_set() for h in also):
                    self.metrics.leases_lost.labels(pipeline, job).inc()
        except (SQLAlchemyError, StateError) as exc:
            log.warning("job not run: the state store is unreachable", pipeline=pipeline, job=job,
                        error=f"{type(exc).__name__}: {redact(str(exc), limit=200)}")
            if triggered:
                self._retry_later(job_id)
            return
        if outcome is None:
            return
        if job == "sync":
            self._load_cursors([pipeline])
        if outcome.status == "failed" and outcome.needs_authorisation:
            self._pause(pipeline, outcome.error)

    def _run(self, pipeline: str, job: Job, token: int, started: float) -> JobOutcome | None:
        outcome: JobOutcome | None = None
        with structlog.contextvars.bound_contextvars(pipeline=pipeline, job=job, lease_fence=token), \
                watching_connectors() as watch:
            self.metrics.job_started(watch)
            try:
                outcome = self.rt.run_job(pipeline, job, stop=self._stop_event.is_set)
            except SQLAlchemyError as exc:  # the state store went away mid-run; the next run picks up
                log.warning("job stopped: the state store is unreachable", pipeline=pipeline, job=job,
                            error=f"{type(exc).__name__}: {redact(str(exc), limit=200)}")
            except Exception:  # a crashed job must not kill the scheduler; it is logged with its traceback
                log.exception("job crashed", pipeline=pipeline, job=job)
            finally:
                self.metrics.job_finished(pipeline, job, outcome, time.monotonic() - started, watch)
        return outcome

    def _retry_later(self, job_id: str) -> None:
        with self._lock:
            tries = self._retries.get(job_id, 0) + 1
            if tries > _TRIGGER_RETRIES or self._stopping:
                self._retries.pop(job_id, None)
                return
            self._retries[job_id] = tries
            self._no_gap.add(job_id)
            self._triggered.add(job_id)
        self._wake(job_id, _TRIGGER_RETRY_S)

    def _load_cursors(self, pipelines: list[str]) -> None:
        for name in pipelines:
            try:
                cursor = self.rt.store.get_cursor(name, STREAM)
            except SQLAlchemyError:
                continue
            self.metrics.cursor_seen(name, cursor.value if cursor is not None else None)

    # ---- revoked connections ------------------------------------------------------------------------

    def _connections(self, pipeline: str) -> list[str]:
        names: list[str] = []
        for settings in (self.config.crm(pipeline), self.config.ledger(pipeline)):
            name = getattr(settings, "connection_name", None)
            if isinstance(name, str) and name:
                names.append(name)
        return names

    def _generations(self, pipeline: str) -> dict[str, int]:
        return {c: self.rt.store.token_generation(c) for c in self._connections(pipeline)}

    def _pause(self, pipeline: str, error: str | None) -> None:
        try:
            generations = self._generations(pipeline)
        except SQLAlchemyError:
            generations = {}
        with self._lock:
            self._paused[pipeline] = _Pause("reauthorisation_required", generations)
        self.metrics.token_failures.labels(pipeline).inc()
        self.metrics.set_paused(pipeline, "reauthorisation_required", True)
        log.error("pipeline paused: the vendor refused its connection's refresh token; re-authorise the connection "
                  "(a new refresh token in the config, or a new stored token) and the pipeline resumes",
                  pipeline=pipeline, alert="reauthorisation_required", error=error)

    def _resume(self, pipeline: str, why: str) -> None:
        with self._lock:
            pause = self._paused.pop(pipeline, None)
        if pause is not None:
            self.metrics.set_paused(pipeline, pause.reason, False)
            log.info("pipeline resumed", pipeline=pipeline, reason=why)

    def _is_paused(self, pipeline: str) -> bool:
        with self._lock:
            pause = self._paused.get(pipeline)
        if pause is None:
            return False
        try:
            changed = self._generations(pipeline) != pause.generations
        except SQLAlchemyError:
            return True
        if changed:
            self._resume(pipeline, "its stored token changed")
            return False
        return True

    def paused_pipelines(self) -> list[str]:
        with self._lock:
            return sorted(self._paused)

    # ---- config reloads -----------------------------------------------------------------------------

    def config_changed_on_disk(self) -> bool:
        stamp = _stamp(self.config.path)
        if stamp == self._config_stamp:
            return False
        self._config_stamp = stamp
        return True

    def reload(self, why: str) -> bool:
        """Load the config file again; apply it when valid, else keep the running one. True when applied."""
        path = self.config.path
        if path is None:
            return False
        self._config_stamp = _stamp(path)
        try:
            new = load_config(path)
            planned = _planned_jobs(new)
        except ConfigError as exc:
            self._config_problem = "config file invalid (the last valid config keeps running)"
            self.metrics.reloads.labels("invalid").inc()
            self.metrics.config_valid.set(0)
            log.error("config reload failed: the running config is kept", reason=why, error=str(exc))
            return False
        old = self.config
        if new.app.state != old.app.state:
            log.warning("the state store settings changed: they take effect when the daemon restarts", reason=why)
        if new.app.logging != old.app.logging:
            configure_logging(new.app.logging.level, new.app.logging.format)
        changed = [n for n in new.app.pipelines if n in old.app.pipelines and self._pipeline_changed(old, new, n)]
        self.config = new
        self.rt.config = new
        self._config_problem = None
        self.metrics.config_valid.set(1)
        self.metrics.reloads.labels("applied").inc()
        self._reschedule(planned)
        for name in changed:
            self._resume(name, "its config changed")
        for name in [n for n in self.paused_pipelines() if n not in new.app.pipelines]:
            self._resume(name, "it was removed from the config")
        self.metrics.forget_pipelines(new.app.pipelines)
        log.info("config reloaded", reason=why, pipelines=sorted(n for n, p in new.app.pipelines.items() if p.enabled),
                 changed=changed)
        for hook in self.on_reload:
            try:
                hook()
            except Exception:  # a hook must not undo the reload; it is logged with its traceback
                log.exception("config reload hook failed")
        return True

    @staticmethod
    def _pipeline_changed(old: LoadedConfig, new: LoadedConfig, name: str) -> bool:
        # SecretStr values compare by value, so a new refresh token or password counts as a change.
        if old.app.pipelines[name] != new.app.pipelines[name]:
            return True
        return bool(old.crm(name) != new.crm(name) or old.ledger(name) != new.ledger(name))

    def _reschedule(self, planned: dict[str, tuple[str, Job, Schedule, BaseTrigger]]) -> None:
        with self._lock:
            current = dict(self._schedules)
        for job_id in [j for j in current if j not in planned]:
            with suppress(JobLookupError):
                self.scheduler.remove_job(job_id)
            with self._lock:
                self._schedules.pop(job_id, None)
                self._triggers.pop(job_id, None)
        for job_id, (name, job, schedule, trigger) in planned.items():
            if job_id not in current:
                self._add(job_id, name, job, schedule, trigger)
            elif current[job_id] != schedule:
                with self._lock:
                    self._schedules[job_id] = schedule
                    self._triggers[job_id] = trigger
                with suppress(JobLookupError):
                    self.scheduler.reschedule_job(job_id, trigger=trigger)


# --------------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT/SIGHUP handlers that only record the signal (nothing that takes a lock runs in them)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._hangup = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handle_hangup)
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

    def _handle_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        self._hangup.set()

    def take_hangup(self) -> bool:
        if self._hangup.is_set():
            self._hangup.clear()
            return True
        return False


def _close(handler: object) -> None:
    close = getattr(handler, "close", None)
    if callable(close):
        with suppress(Exception):
            close()


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()


WebhookFactory = Callable[[Daemon], WebhookHandler]


def run_daemon(config: LoadedConfig, options: DaemonOptions | None = None, *, out: TextIO | None = None,
               webhooks: WebhookFactory | None = None) -> int:
    """Run the enabled pipelines' jobs until SIGTERM or SIGINT; returns the exit code.

    ``webhooks`` builds the handler of ``/webhooks/...`` once the daemon exists (its :meth:`Daemon.trigger`
    is what a webhook calls). Raises :class:`ConfigError` when the daemon cannot start (another daemon holds
    the SQLite database, the operations port is taken, a schedule is wrong).
    """
    options = options or DaemonOptions()
    out = out or sys.stdout
    _planned_jobs(config)  # a bad schedule stops the start, before any port or database is opened
    replica = replica_id()
    with _Signals() as signals, sqlite_single_instance(config.app.state.url):
        readiness = Readiness()
        metrics = DaemonMetrics(replica)
        ops = OpsServer(options.host, options.port, readiness.problems, metrics=metrics.render)
        try:
            with suppress(OSError, ValueError):  # a closed standard output must not stop the daemon
                out.write(f"ops {ops.url}\n")
                out.flush()
            return _serve(config, options, replica, ops, readiness, metrics, signals, webhooks)
        finally:
            ops.stop()


def _serve(config: LoadedConfig, options: DaemonOptions, replica: str, ops: OpsServer, readiness: Readiness,
           metrics: DaemonMetrics, signals: _Signals, webhooks: WebhookFactory | None) -> int:
    with ExitStack() as stack:
        try:
            rt = stack.enter_context(open_runtime(config))
            lease_store = _lease_store(config, rt.store)
            if lease_store is not rt.store:
                stack.callback(lease_store.close)
        except (SQLAlchemyError, OSError, StateError) as exc:
            log.error("cannot open the state store", error=f"{type(exc).__name__}: {redact(str(exc), limit=300)}")
            return 1
        # APScheduler's own lines ("Running job ...", "maximum number of running instances reached") repeat
        # what the daemon logs, or are expected when runs are long; its errors still show.
        logging.getLogger("apscheduler").setLevel(max(logging.getLogger().level, logging.ERROR))
        daemon = Daemon(config, rt, Leases(lease_store, replica, options.lease_s), metrics, options)
        if webhooks is not None:
            factory = webhooks
            installed: list[WebhookHandler] = []

            def install() -> None:
                handler = factory(daemon)
                ops.set_webhooks(handler)
                for old in installed:
                    _close(old)
                installed[:] = [handler]

            def close_installed() -> None:
                for handler in installed:
                    _close(handler)

            install()
            daemon.on_reload.append(install)
            stack.callback(close_installed)
        if signals.received is None:  # a signal during startup: stop before the first run
            daemon.start()
            readiness.attach(rt.store, lambda: bool(daemon.scheduler.running), daemon.config_problem)
            log.info("daemon started", replica=replica, pipelines=rt.pipeline_names(), ops=ops.url,
                     lease_s=options.lease_s)
            next_poll = time.monotonic() + options.reload_interval_s
            while signals.received is None:
                time.sleep(_POLL_S)
                if signals.take_hangup():
                    daemon.reload("SIGHUP")
                elif time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + options.reload_interval_s
                    if daemon.config_changed_on_disk():
                        daemon.reload("config file changed")
        log.info("stopping: letting runs in flight finish", running=daemon.running_jobs(),
                 signal=signal.Signals(signals.received).name if signals.received else None)
        readiness.stopping()
        if not daemon.stop():
            log.warning("stop timeout: exiting with runs unfinished; their committed intents let the next run "
                        "finish them without duplicates", running=daemon.running_jobs(),
                        stop_timeout_s=options.stop_timeout_s)
            _flush_logs()
            os._exit(0)
    log.info("daemon stopped")
    _flush_logs()
    return 0


def _lease_store(config: LoadedConfig, store: StateStore) -> StateStore:
    """A second connection pool to the state store for leases, so heartbeats never queue behind jobs."""
    if store.dialect == "sqlite" and sqlite_database(config.app.state.url) is None:
        return store  # an in-memory database exists once
    key = config.app.state.secret_key.get_secret_value() if config.app.state.secret_key else None
    return StateStore(config.app.state.url, secret_key=key)
