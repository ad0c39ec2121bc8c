"""``ledgerbridge daemon``: runs every enabled pipeline on its schedule until stopped.

- APScheduler 3.x, one job per pipeline, ``max_instances=1`` and ``coalesce=True`` so a slow run is
  never doubled and missed runs collapse into one.
- SQLite means exactly one daemon: a second one on the same database file refuses to start.
- An operations endpoint serves ``/healthz`` (the process is alive) and ``/readyz`` (the state store
  answers and the scheduler runs).
- SIGTERM or SIGINT lets the run in flight finish, then exits 0.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import text

from config.loader import LoadedConfig
from connectors.errors import ConfigError
from sync.runtime import Runtime, open_runtime

__all__ = ["run_daemon", "sqlite_single_instance"]

log = structlog.get_logger("ledgerbridge.daemon")


@contextmanager
def sqlite_single_instance(url: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite database for the daemon's lifetime."""
    if not url.startswith("sqlite:"):
        yield
        return
    db = url.split("///", 1)[-1] or "ledgerbridge.db"
    lock_path = Path(db + ".daemon.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another ledgerbridge daemon already uses {db}; SQLite supports one daemon "
                "(use PostgreSQL to run several replicas)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _ops_server(rt: Runtime, scheduler: BackgroundScheduler, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Health probes are too frequent to log."""

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, "ok\n")
            elif self.path == "/readyz":
                problems = []
                try:
                    with rt.store.engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                except Exception as exc:  # any failure means not ready; the reason is reported
                    problems.append(f"state store unreachable: {type(exc).__name__}")
                if not scheduler.running:
                    problems.append("scheduler not running")
                self._reply(503 if problems else 200, ("\n".join(problems) or "ready") + "\n")
            else:
                self._reply(404, "not found\n")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    return server


def run_daemon(config: LoadedConfig, *, host: str = "127.0.0.1", port: int = 8080) -> int:
    stop = threading.Event()
    with sqlite_single_instance(config.app.state.url), open_runtime(config) as rt:
        scheduler = BackgroundScheduler(timezone=dt.UTC)

        def run_pipeline(name: str) -> None:
            try:
                with rt.runner(name) as runner:
                    runner.run()
            except Exception:  # a failed run must not kill the scheduler; it is logged with its traceback
                log.exception("pipeline run crashed", pipeline=name)

        for name in rt.pipeline_names():
            sched = config.app.pipelines[name].schedule
            trigger = (CronTrigger.from_crontab(sched.cron, timezone=dt.UTC) if sched.cron
                       else IntervalTrigger(minutes=sched.interval_minutes, timezone=dt.UTC))
            scheduler.add_job(run_pipeline, trigger, args=[name], id=f"sync:{name}", max_instances=1,
                              coalesce=True, misfire_grace_time=300, next_run_time=dt.datetime.now(dt.UTC))
        server = _ops_server(rt, scheduler, host, port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        scheduler.start()
        log.info("daemon started", pipelines=rt.pipeline_names(), ops=f"http://{host}:{server.server_address[1]}")
        stop.wait()
        log.info("stopping: letting runs in flight finish")
        scheduler.shutdown(wait=True)
        server.shutdown()
        server.server_close()
    log.info("daemon stopped")
    return 0
