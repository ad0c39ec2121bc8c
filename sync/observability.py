"""What the daemon tells Prometheus (``/metrics``), and how it sees the connectors a job builds.

:class:`DaemonMetrics` owns one :class:`~prometheus_client.CollectorRegistry` per daemon (never the
process-global one, so two daemons in one test process do not mix their counts). The daemon feeds it after
every job; scrape-time values (the CRM lag, the rate budgets of jobs still running) are computed when
``/metrics`` is read.

Connectors are built inside a job (``Runtime``), out of the daemon's sight. Whoever builds them calls
:func:`connectors_built`; while the daemon runs a job inside :func:`watching_connectors`, that hands it
the connectors, from which it reads the 429 answers (``stats.rate_limited``) and the calls left in their
rate budgets (:meth:`connectors.http.RateBudget.remaining`). Outside a watch the call does nothing.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from connectors.http import RateBudget

__all__ = [
    "CONTENT_TYPE",
    "ConnectorWatch",
    "DaemonMetrics",
    "JobReport",
    "connectors_built",
    "rate_budgets",
    "watching_connectors",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of :meth:`DaemonMetrics.render`: the Prometheus text format 0.0.4, which every Prometheus
reads (the metric names here need none of the later format's escaping)."""

_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))


class JobReport(Protocol):
    """What a job tells about itself (``Runtime.run_job``'s outcome)."""

    @property
    def status(self) -> str: ...

    @property
    def counts(self) -> Mapping[str, int]: ...

    @property
    def api_calls(self) -> Mapping[str, int]: ...

    @property
    def error(self) -> str | None: ...


# --------------------------------------------------------------------------------------------------
# Connectors built during a job
# --------------------------------------------------------------------------------------------------


@dataclass
class ConnectorWatch:
    """The connectors one job built (CRM sources and ledgers), in the order they were built."""

    connectors: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *connectors: object) -> None:
        with self._lock:
            self.connectors.extend(c for c in connectors if c is not None)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.connectors)


_WATCH: contextvars.ContextVar[ConnectorWatch | None] = contextvars.ContextVar("ledgerbridge_watch", default=None)


def connectors_built(*connectors: object) -> None:
    """Report connectors just built for a job to the daemon watching it (a no-op when none watches)."""
    watch = _WATCH.get()
    if watch is not None:
        watch.add(*connectors)


@contextmanager
def watching_connectors() -> Iterator[ConnectorWatch]:
    """Collect the connectors built (in this thread or context) until the block ends."""
    watch = ConnectorWatch()
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def rate_budgets(connector: object) -> list[RateBudget]:
    """The rate budgets a connector paces its calls with (on it, or on its ``client``), found by type."""
    found: list[RateBudget] = []
    for holder in (connector, getattr(connector, "client", None)):
        if holder is None:
            continue
        try:
            attributes = vars(holder)
        except TypeError:
            continue
        found.extend(v for v in attributes.values() if isinstance(v, RateBudget) and v not in found)
    return found


def _vendor(connector: object) -> str:
    return str(getattr(connector, "vendor", None) or type(connector).__name__.lower())


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


class _ScrapeTime(Collector):
    """Values computed when /metrics is read: CRM lag per pipeline and rate budgets left per vendor."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        lag = GaugeMetricFamily(
            "ledgerbridge_crm_lag_seconds",
            "Seconds between now and the modification time of the last CRM change the deal sync has handled",
            labels=["pipeline"],
        )
        now = self._metrics.clock()
        for pipeline, seen in sorted(self._metrics.cursors().items()):
            lag.add_metric([pipeline], max(now - seen.timestamp(), 0.0))
        yield lag
        budget = GaugeMetricFamily(
            "ledgerbridge_rate_budget_remaining",
            "Calls a vendor's client-side rate budget allows right now without waiting (the tightest budget of "
            "the vendor's connectors in running jobs, else as the last job left it)",
            labels=["vendor"],
        )
        for vendor, left in sorted(self._metrics.budgets_left().items()):
            budget.add_metric([vendor], float(left))
        yield budget


class DaemonMetrics:
    """The daemon's Prometheus metrics, on a registry of its own."""

    def __init__(self, replica: str, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs = Counter("ledgerbridge_job_runs", "Job runs finished, by pipeline, job and status",
                            ["pipeline", "job", "status"], registry=r)
        self.crashes = Counter("ledgerbridge_job_crashes", "Jobs that raised instead of reporting an outcome",
                               ["pipeline", "job"], registry=r)
        self.invoices = Counter("ledgerbridge_invoices_created", "Invoices created in the ledger",
                                ["pipeline"], registry=r)
        self.api_calls = Counter("ledgerbridge_api_calls", "Vendor API calls made by jobs", ["vendor"], registry=r)
        self.rate_limited = Counter("ledgerbridge_api_rate_limited",
                                    "Vendor answers asking to slow down (HTTP 429 and the like)", ["vendor"],
                                    registry=r)
        self.last_success = Gauge("ledgerbridge_last_success_timestamp_seconds",
                                  "When the job last finished with status ok or partial (Unix time)",
                                  ["pipeline", "job"], registry=r)
        self.duration = Histogram("ledgerbridge_job_duration_seconds", "Wall time of job runs", ["job"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.lease_skips = Counter("ledgerbridge_lease_skips",
                                   "Scheduled job runs skipped because another replica holds (or just ran) the job",
                                   ["pipeline", "job"], registry=r)
        self.leases_lost = Counter("ledgerbridge_leases_lost",
                                   "Job leases lost while their job ran (the replica could not renew them in time)",
                                   ["pipeline", "job"], registry=r)
        self.token_failures = Counter("ledgerbridge_token_refresh_failures",
                                      "OAuth refresh tokens refused (invalid_grant after re-reading the store)",
                                      ["pipeline"], registry=r)
        self.paused = Gauge("ledgerbridge_pipeline_paused",
                            "1 while a pipeline is paused until its config or stored token changes (alert on it)",
                            ["pipeline", "reason"], registry=r)
        self.reloads = Counter("ledgerbridge_config_reloads", "Configuration reloads, by result", ["result"],
                               registry=r)
        self.config_valid = Gauge("ledgerbridge_config_valid",
                                  "0 when the config file on disk failed validation (the last valid one runs)",
                                  registry=r)
        self.config_valid.set(1)
        Gauge("ledgerbridge_replica_info", "This daemon replica (value is always 1)", ["replica"],
              registry=r).labels(replica).set(1)
        self._lock = threading.Lock()
        self._cursors: dict[str, dt.datetime] = {}
        self._budgets: dict[str, int] = {}
        self._live: dict[int, ConnectorWatch] = {}
        r.register(_ScrapeTime(self))

    # ---- fed by the daemon --------------------------------------------------------------------------

    def job_started(self, watch: ConnectorWatch) -> None:
        with self._lock:
            self._live[id(watch)] = watch

    def job_finished(self, pipeline: str, job: str, outcome: JobReport | None, seconds: float,
                     watch: ConnectorWatch) -> None:
        """Count a finished job (``outcome`` None: it crashed) and what its connectors did."""
        with self._lock:
            self._live.pop(id(watch), None)
        self.duration.labels(job).observe(seconds)
        if outcome is not None:
            created = int(outcome.counts.get("created", 0)) if job == "sync" else 0
            if created:
                self.invoices.labels(pipeline).inc(created)
            for vendor, calls in outcome.api_calls.items():
                if calls:
                    self.api_calls.labels(vendor).inc(calls)
            if outcome.status in ("ok", "partial"):
                self.last_success.labels(pipeline, job).set(self.clock())
        for connector in watch.snapshot():
            stats = getattr(connector, "stats", None)
            limited = int(getattr(stats, "rate_limited", 0) or 0)
            if limited:
                self.rate_limited.labels(_vendor(connector)).inc(limited)
            budgets = rate_budgets(connector)
            if budgets:
                with self._lock:
                    self._budgets[_vendor(connector)] = min(b.remaining() for b in budgets)
        # Counted last, so a scrape that sees the run also sees what the run did.
        if outcome is None:
            self.crashes.labels(pipeline, job).inc()
        else:
            self.runs.labels(pipeline, job, outcome.status).inc()

    def cursor_seen(self, pipeline: str, value: dt.datetime | None) -> None:
        """The deal sync's cursor (modification time of the last CRM change handled), for the lag gauge."""
        with self._lock:
            if value is None:
                self._cursors.pop(pipeline, None)
            else:
                self._cursors[pipeline] = value

    def forget_pipelines(self, keep: Iterable[str]) -> None:
        """Drop per-pipeline scrape-time values of pipelines no longer configured."""
        kept = set(keep)
        with self._lock:
            for name in [n for n in self._cursors if n not in kept]:
                del self._cursors[name]

    def set_paused(self, pipeline: str, reason: str, paused: bool) -> None:
        self.paused.labels(pipeline, reason).set(1 if paused else 0)

    # ---- read at scrape time ------------------------------------------------------------------------

    def cursors(self) -> dict[str, dt.datetime]:
        with self._lock:
            return dict(self._cursors)

    def budgets_left(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._budgets)
            live = [w.snapshot() for w in self._live.values()]
        current: dict[str, int] = {}
        for connectors in live:
            for connector in connectors:
                budgets = rate_budgets(connector)
                if budgets:
                    vendor = _vendor(connector)
                    left = min(b.remaining() for b in budgets)
                    current[vendor] = min(left, current.get(vendor, left))
        out.update(current)
        return out

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
