"""The daemon's /metrics registry, the connectors it watches, and the rate budgets it reads."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from connectors.http import RateBudget
from connectors.interfaces import ApiStats
from sync.observability import DaemonMetrics, connectors_built, rate_budgets, watching_connectors


@dataclass
class Outcome:
    status: str
    counts: dict[str, int] = field(default_factory=dict)
    api_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class FakeClient:
    def __init__(self, budget: RateBudget) -> None:
        self.budget = budget


class FakeLedger:
    vendor = "xero"

    def __init__(self, budget: RateBudget, rate_limited: int = 0) -> None:
        self.stats = ApiStats(rate_limited=rate_limited)
        self.client = FakeClient(budget)


class FakeCrm:
    vendor = "hubspot"

    def __init__(self, *budgets: RateBudget) -> None:
        self.stats = ApiStats()
        self._budget = budgets[0]
        self._search_budget = budgets[1]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _samples(metrics: DaemonMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_rate_budget_remaining_reads_the_tightest_window_and_pauses_without_changing_anything() -> None:
    now = [100.0]
    budget = RateBudget([(5, 10.0), (2, 1.0)], monotonic=lambda: now[0], slack=0.0)
    assert budget.remaining() == 2
    budget.acquire()
    assert budget.remaining() == 1
    budget.acquire()
    assert budget.remaining() == 0  # the one-second window is full
    now[0] += 1.5
    assert budget.remaining() == 2  # ... and frees; the ten-second window has 3 left, the 1 s one 2
    assert budget.remaining() == 2  # reading twice changes nothing
    budget.acquire()
    budget.acquire()
    now[0] += 1.5
    assert budget.remaining() == 1  # 4 of 5 used in ten seconds
    budget.pause(30)
    assert budget.remaining() == 0
    now[0] += 31
    assert budget.remaining() == 2


def test_connectors_built_reach_only_the_watch_of_their_own_context() -> None:
    connectors_built(object())  # nobody watches: nothing happens
    seen: dict[str, list[object]] = {}

    def job(name: str) -> None:
        with watching_connectors() as watch:
            connectors_built(name + "-crm", name + "-ledger")
            connectors_built(None)
            seen[name] = watch.snapshot()

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": ["a-crm", "a-ledger"], "b": ["b-crm", "b-ledger"]}
    with watching_connectors() as outer:
        with watching_connectors() as inner:
            connectors_built("x")
        connectors_built("y")
    assert (inner.snapshot(), outer.snapshot()) == (["x"], ["y"])


def test_rate_budgets_are_found_on_the_connector_and_its_client() -> None:
    b1, b2, b3 = (RateBudget([(10, 1.0)]) for _ in range(3))
    assert rate_budgets(FakeCrm(b1, b2)) == [b1, b2]
    assert rate_budgets(FakeLedger(b3)) == [b3]
    assert rate_budgets(object()) == []


def test_job_outcomes_become_counters_gauges_and_a_histogram() -> None:
    clock = Clock(1_800_000_000.0)
    metrics = DaemonMetrics("host:1:abc", clock=clock)
    xero_budget = RateBudget([(60, 60.0)])
    for _ in range(15):
        xero_budget.acquire()
    crm_general, crm_search = RateBudget([(90, 10.0)]), RateBudget([(4, 1.0)])
    crm_search.acquire()
    with watching_connectors() as watch:
        connectors_built(FakeCrm(crm_general, crm_search), FakeLedger(xero_budget, rate_limited=3))
        metrics.job_started(watch)
        live = metrics.budgets_left()
        metrics.job_finished("main", "sync", Outcome("ok", {"created": 7}, {"hubspot": 12, "xero": 9}), 2.5, watch)
    assert live == {"hubspot": 3, "xero": 45}
    with watching_connectors() as watch:
        metrics.job_finished("main", "ledger", Outcome("failed", {"invoices": 4}, {"xero": 2}, "boom"), 0.5, watch)
    with watching_connectors() as watch:
        metrics.job_finished("main", "metrics", None, 0.1, watch)  # crashed
    metrics.cursor_seen("main", dt.datetime.fromtimestamp(clock.now - 90, dt.UTC))
    metrics.set_paused("main", "reauthorisation_required", True)
    metrics.token_failures.labels("main").inc()

    s = _samples(metrics)
    assert s[("ledgerbridge_job_runs_total", (("job", "sync"), ("pipeline", "main"), ("status", "ok")))] == 1
    assert s[("ledgerbridge_job_runs_total", (("job", "ledger"), ("pipeline", "main"), ("status", "failed")))] == 1
    assert s[("ledgerbridge_job_crashes_total", (("job", "metrics"), ("pipeline", "main")))] == 1
    assert s[("ledgerbridge_invoices_created_total", (("pipeline", "main"),))] == 7  # only the sync creates
    assert s[("ledgerbridge_api_calls_total", (("vendor", "hubspot"),))] == 12
    assert s[("ledgerbridge_api_calls_total", (("vendor", "xero"),))] == 11
    assert s[("ledgerbridge_api_rate_limited_total", (("vendor", "xero"),))] == 3
    assert ("ledgerbridge_api_rate_limited_total", (("vendor", "hubspot"),)) not in s
    assert s[("ledgerbridge_rate_budget_remaining", (("vendor", "hubspot"),))] == 3  # the tightest budget
    assert s[("ledgerbridge_rate_budget_remaining", (("vendor", "xero"),))] == 45
    assert s[("ledgerbridge_last_success_timestamp_seconds", (("job", "sync"), ("pipeline", "main")))] == clock.now
    assert ("ledgerbridge_last_success_timestamp_seconds", (("job", "ledger"), ("pipeline", "main"))) not in s
    assert s[("ledgerbridge_job_duration_seconds_count", (("job", "sync"),))] == 1
    assert s[("ledgerbridge_job_duration_seconds_sum", (("job", "sync"),))] == 2.5
    assert s[("ledgerbridge_crm_lag_seconds", (("pipeline", "main"),))] == 90
    assert s[("ledgerbridge_pipeline_paused", (("pipeline", "main"), ("reason", "reauthorisation_required")))] == 1
    assert s[("ledgerbridge_token_refresh_failures_total", (("pipeline", "main"),))] == 1
    assert s[("ledgerbridge_replica_info", (("replica", "host:1:abc"),))] == 1
    assert s[("ledgerbridge_config_valid", ())] == 1

    clock.now += 60
    metrics.forget_pipelines(["other"])
    later = _samples(metrics)
    assert ("ledgerbridge_crm_lag_seconds", (("pipeline", "main"),)) not in later


def test_two_daemons_in_one_process_keep_their_counts_apart() -> None:
    a, b = DaemonMetrics("a"), DaemonMetrics("b")
    with watching_connectors() as watch:
        a.job_finished("p", "sync", Outcome("ok"), 1.0, watch)
    assert _samples(a)[("ledgerbridge_job_runs_total", (("job", "sync"), ("pipeline", "p"), ("status", "ok")))] == 1
    assert not any(name == "ledgerbridge_job_runs_total" for name, _ in _samples(b))
