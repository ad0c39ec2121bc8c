"""Benchmark: the finance metrics of a synthetic ledger of N customers, computed in one process.

The book is drawn from the models the metrics fit, at the parameters published for the CDNOW data
(docs: metrics notes, sections 1.2 and 1.5), so that the fitted models have something to find:

* purchases follow BG/NBD in weeks: each customer buys at a rate lambda ~ Gamma(r, alpha) and, after each
  purchase, drops out with probability p ~ Beta(a, b); first purchases are spread over the window (about two
  years). The purchase rates are scaled so that the customers average ``--invoices-per-customer`` invoices;
* the net amount of each invoice follows the Gamma-Gamma model (p, q, gamma), scaled to B2B euros;
* customers pay on 30, 45 or 60-day terms; some pay late, some in two instalments, a few never; invoices
  whose payments fall after the as-of date are still open; about 1 % of invoices get a credit note;
* each customer has a won acquisition deal with its CRM acquisition source and sales activities, some have
  an open or a lost deal, and spend is booked monthly per paid channel plus sales overhead.

At ten invoices a customer, the CDNOW heterogeneity makes the heaviest customers buy several times a day; the
metrics count invoices of one customer on one day as one purchase (about a quarter of the invoices are merged
so at the defaults), so the fitted models are not expected to return the generating parameters exactly.

The script prints the generation time, the wall time of ``metrics.compute.compute`` with its peak memory
(tracemalloc peak of a second, traced run, and the growth of the process's maximum resident set), and how
many customers got each metric.

    python bench/metrics_bench.py --customers 100000 --invoices-per-customer 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

import numpy as np
from scipy import optimize, special  # type: ignore[import-untyped]

from config.schema import MetricsConfig
from metrics.compute import CustomerMetrics, MetricsResult, compute
from metrics.facts import (
    ActivityFact,
    CreditFact,
    CustomerFact,
    DealFact,
    Facts,
    InvoiceFact,
    PaymentFact,
    SpendFact,
)

#: BG/NBD on CDNOW, weeks (Fader, Hardie & Lee 2005): r, alpha, a, b.
BGNBD_CDNOW = (0.243, 4.414, 0.793, 2.426)
#: Gamma-Gamma on CDNOW (Fader & Hardie 2013): p, q, gamma. Mean purchase p * gamma / (q - 1) = 35.2 USD.
GAMMA_GAMMA_CDNOW = (6.25, 3.74, 15.44)
#: CDNOW dollars to B2B euros: a mean invoice of about 3,500 EUR before tax.
SPEND_SCALE = 100.0
VAT_TENTHS = 12  # gross = net * 1.2
AS_OF = dt.date(2026, 10, 31)
CHANNELS = ("organic_search", "paid_search", "referrals", "paid_social", "direct_traffic", "offline",
            "email_marketing", "")
CHANNEL_WEIGHTS = (0.25, 0.20, 0.14, 0.10, 0.10, 0.08, 0.08, 0.05)
#: Paid CAC per new customer of each paid channel, EUR; overhead per new customer of any channel.
PAID_CAC = {"paid_search": 650.0, "paid_social": 900.0, "offline": 1600.0}
OVERHEAD_PER_CUSTOMER = 1200.0
ACTIVITY_COSTS = {"call": Decimal(12), "meeting": Decimal(80), "email": Decimal(2), "task": Decimal(5)}
OWNERS = ("camille.martin", "julien.petit", "sophie.bernard", "nicolas.roux", "claire.fontaine")
OPEN_STAGES = (("prospect", "0.1"), ("qualified", "0.25"), ("proposal", "0.5"), ("negotiation", "0.75"))


# -- purchase process -----------------------------------------------------------------------------

def expected_invoices(rate_scale: float, weeks: float) -> float:
    """Mean number of invoices (first purchase included) per customer under BG/NBD with the CDNOW
    parameters and purchase rates multiplied by ``rate_scale``, first purchases uniform over ``weeks``.

    Uses E[X(t)] = (a+b-1)/(a-1) [1 - (alpha/(alpha+t))^r 2F1(r, b; a+b-1; t/(alpha+t))] (paper eq. 9),
    averaged over the time left after the first purchase by the midpoint rule."""
    r, alpha, a, b = BGNBD_CDNOW
    alpha_s = alpha / rate_scale
    t = (np.arange(400) + 0.5) / 400 * weeks
    z = t / (alpha_s + t)
    ex = (a + b - 1) / (a - 1) * (1 - (alpha_s / (alpha_s + t)) ** r * special.hyp2f1(r, b, a + b - 1, z))
    return 1.0 + float(ex.mean())


def rate_scale_for(invoices_per_customer: float, weeks: float) -> float:
    """The purchase-rate multiplier that gives ``invoices_per_customer`` invoices on average."""
    if invoices_per_customer <= 1:
        raise ValueError("customers average at least their first invoice")
    log_scale = optimize.brentq(lambda x: expected_invoices(math.exp(x), weeks) - invoices_per_customer,
                                math.log(1e-4), math.log(1e5), xtol=1e-6)
    return math.exp(log_scale)


@dataclass
class Purchases:
    """One row per invoice: its customer (index) and its time in weeks since the window start, sorted by
    customer then time; and per customer the first purchase time."""

    customer: np.ndarray
    week: np.ndarray
    first_week: np.ndarray


def simulate_purchases(rng: np.random.Generator, n: int, weeks: float, rate_scale: float) -> Purchases:
    """BG/NBD purchases of ``n`` customers over ``weeks``.

    After its first purchase a customer sees N ~ Poisson(lambda T) purchase opportunities, uniform over the
    T weeks left, and drops out after its D-th repeat purchase, D ~ Geometric(p) (never before a repeat
    purchase); so it makes the first K = min(N, D) of them. Only those K are drawn, as the first K order
    statistics of N uniforms: 1 - U_(k) = prod_{j<k} V_j^(1/(N-j)) with V_j uniform."""
    r, alpha, a, b = BGNBD_CDNOW
    lam = rng.gamma(r, 1.0 / alpha, n) * rate_scale
    p = np.clip(rng.beta(a, b, n), 1e-12, 1.0)
    first = rng.uniform(0.0, weeks, n)
    horizon = weeks - first
    opportunities = rng.poisson(lam * horizon)
    repeats = np.minimum(opportunities, rng.geometric(p))
    idx = np.repeat(np.arange(n), repeats)
    starts = np.cumsum(repeats) - repeats
    rank = np.arange(idx.size) - starts[idx]
    steps = np.log1p(-rng.random(idx.size)) / (opportunities[idx] - rank)
    running = np.cumsum(steps)
    before = np.where(starts > 0, running[np.maximum(starts - 1, 0)], 0.0)
    times = first[idx] - np.expm1(running - before[idx]) * horizon[idx]
    customer = np.concatenate((np.arange(n), idx))
    week = np.concatenate((first, times))
    order = np.lexsort((week, customer))
    return Purchases(customer=customer[order], week=week[order], first_week=first)


# -- the synthetic book ---------------------------------------------------------------------------

@dataclass
class Generated:
    facts: Facts
    seconds: float
    stats: dict[str, Any]


CENT = Decimal("0.01")
ZERO = Decimal("0.00")


def _money(cents: int) -> Decimal:
    return Decimal(cents) * CENT


def build_facts(customers: int, invoices_per_customer: float, *, seed: int = 1, weeks: float = 104.0,
                as_of: dt.date = AS_OF) -> Generated:
    """The facts of the synthetic book (see the module doc), deterministic for the arguments."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = customers
    start = as_of - dt.timedelta(days=round(weeks * 7))
    scale = rate_scale_for(invoices_per_customer, weeks)
    purchases = simulate_purchases(rng, n, weeks, scale)
    cust, m = purchases.customer, purchases.customer.size
    day = np.minimum(np.floor(purchases.week * 7).astype(np.int64), (as_of - start).days)

    # Gamma-Gamma spend: nu_i ~ Gamma(q, 1/gamma), invoice net ~ Gamma(p, 1/nu_i).
    gp, gq, gg = GAMMA_GAMMA_CDNOW
    nu = rng.gamma(gq, 1.0 / gg, n)
    net = np.maximum(np.rint(rng.gamma(gp, 1.0, m) / nu[cust] * SPEND_SCALE * 100), 100).astype(np.int64)
    gross = (net * VAT_TENTHS + 5) // 10

    # Payer profiles and terms.
    terms = rng.choice(np.array([30, 45, 60]), n, p=[0.75, 0.17, 0.08])
    late = rng.random(n) < 0.15
    delay_mean = np.where(late, rng.uniform(20, 90, n), 0.0)
    never_share = np.where(late, rng.uniform(0.03, 0.10, n), np.where(rng.random(n) < 0.2, 0.02, 0.0))
    partial = rng.random(n) < 0.06
    due = day + terms[cust]

    # Credit notes on 1 % of invoices: a quarter or all of the invoice, ten days after it.
    credited = rng.random(m) < 0.01
    credit_share = np.where(rng.random(m) < 0.35, 1.0, 0.25)
    credit_net = np.where(credited, np.rint(net * credit_share), 0).astype(np.int64)
    credit_gross = np.where(credited, np.where(credit_share == 1.0, gross, (credit_net * VAT_TENTHS + 5) // 10), 0)
    credit_day = day + 10
    horizon_day = (as_of - start).days
    credited &= credit_day <= horizon_day
    credit_gross = np.where(credited, credit_gross, 0)
    owed = gross - credit_gross

    # Payments: punctual payers between the issue date and a few days after the due date, late payers around
    # due + their mean delay, some in two instalments, some never.
    punctual_day = day + np.rint(rng.triangular(0, 1, 1, m) * (terms[cust] + 5) - rng.random(m) * 8).astype(np.int64)
    late_day = due + np.maximum(1, np.rint(rng.normal(delay_mean[cust], np.maximum(3, delay_mean[cust] / 4))))
    pay_day = np.maximum(np.where(late[cust], late_day, punctual_day), day).astype(np.int64)
    pay_day = np.maximum(pay_day, np.where(credited, credit_day, day))
    never = (rng.random(m) < never_share[cust]) | (owed <= 0)
    split = partial[cust] & (rng.random(m) < 0.5) & ~never
    first_amount = np.where(split, (owed * 4 + 5) // 10, owed)
    second_day = pay_day + rng.integers(15, 61, m)
    paid1 = ~never & (pay_day <= horizon_day)
    paid2 = split & (second_day <= horizon_day)
    paid_total = np.where(paid1, first_amount, 0) + np.where(paid2, owed - first_amount, 0)
    balance = owed - paid_total

    arrays_s = time.perf_counter() - t0
    dates = [start + dt.timedelta(days=i) for i in range(horizon_day + 400)]
    cids = [f"C{i:07d}" for i in range(n)]
    cust_l, day_l, due_l = cust.tolist(), day.tolist(), due.tolist()
    invoices = [
        InvoiceFact(f"I{j:08d}", cids[c], dates[d], dates[du], Decimal(nt) * CENT, Decimal(gr) * CENT,
                    Decimal(bal) * CENT if bal else ZERO, "authorised" if bal else "paid", None, f"F{j:08d}", "EUR")
        for j, (c, d, du, nt, gr, bal) in enumerate(zip(cust_l, day_l, due_l, net.tolist(), gross.tolist(),
                                                        balance.tolist(), strict=True))
    ]
    payments: list[PaymentFact] = []
    for j in np.flatnonzero(paid1).tolist():
        payments.append(PaymentFact(f"P{j:08d}a", f"I{j:08d}", cids[cust_l[j]], dates[int(pay_day[j])],
                                    _money(int(first_amount[j]))))
    for j in np.flatnonzero(paid2).tolist():
        payments.append(PaymentFact(f"P{j:08d}b", f"I{j:08d}", cids[cust_l[j]], dates[int(second_day[j])],
                                    _money(int(owed[j] - first_amount[j]))))
    credits = [
        CreditFact(f"K{j:08d}", cids[cust_l[j]], dates[int(credit_day[j])], _money(int(credit_net[j])),
                   _money(int(credit_gross[j])), f"I{j:08d}")
        for j in np.flatnonzero(credited).tolist()
    ]

    # CRM side: customers with their acquisition source, won acquisition deals with activities, and some
    # open and lost deals.
    channel = rng.choice(len(CHANNELS), n, p=CHANNEL_WEIGHTS)
    first_day = day[np.searchsorted(cust, np.arange(n))]
    first_net = net[np.searchsorted(cust, np.arange(n))]
    lead_days = rng.integers(10, 121, n)
    owner = rng.integers(0, len(OWNERS), n)
    customers_f: list[CustomerFact] = []
    deals: list[DealFact] = []
    activities: list[ActivityFact] = []
    counts = rng.poisson([[3.0, 1.5, 8.0, 2.0]] * n)
    open_deal = rng.random(n) < 0.08
    lost_deal = rng.random(n) < 0.2
    open_stage = rng.integers(0, len(OPEN_STAGES), n)
    open_close = rng.integers(5, 181, n)
    for i in range(n):
        source = CHANNELS[channel[i]] or None
        created = dates[max(int(first_day[i]) - int(lead_days[i]), 0)]
        customers_f.append(CustomerFact(cids[i], f"Customer {i}", source, created))
        deal_id = f"D{i:07d}"
        deals.append(DealFact(deal_id, cids[i], _money(int(first_net[i])), "won", Decimal(1), True, True,
                              dates[int(first_day[i])], created, source, OWNERS[owner[i]]))
        for kind, k in zip(("call", "meeting", "email", "task"), counts[i].tolist(), strict=True):
            if k:
                activities.append(ActivityFact(deal_id, kind, k))
        if open_deal[i]:
            stage, prob = OPEN_STAGES[open_stage[i]]
            deals.append(DealFact(f"D{i:07d}o", cids[i], _money(int(first_net[i])), stage, Decimal(prob), False,
                                  False, as_of + dt.timedelta(days=int(open_close[i])), as_of, source,
                                  OWNERS[owner[i]]))
        if lost_deal[i]:
            deals.append(DealFact(f"D{i:07d}l", cids[i], _money(int(first_net[i])), "lost", Decimal(0), False,
                                  True, dates[int(first_day[i]) // 2], created, source, OWNERS[owner[i]]))

    # Monthly spend: each paid channel's new customers of the month at about its CAC, and sales overhead.
    spend: list[SpendFact] = []
    month_index = np.array([(d.year - start.year) * 12 + d.month - start.month for d in dates[: horizon_day + 1]])
    acquired_month = month_index[first_day]
    for mi in range(int(month_index.max()) + 1):
        month_day = dt.date(start.year + (start.month - 1 + mi) // 12, (start.month - 1 + mi) % 12 + 1, 1)
        new = channel[acquired_month == mi]
        for ch, cac in PAID_CAC.items():
            k = int(np.count_nonzero(new == CHANNELS.index(ch)))
            amount = round(cac * max(k, 1) * float(rng.uniform(0.8, 1.2)) * 100)
            spend.append(SpendFact(month_day, ch, _money(amount), f"{ch}-{month_day:%Y-%m}", "paid"))
        amount = round(OVERHEAD_PER_CUSTOMER * max(new.size, 1) * float(rng.uniform(0.95, 1.05)) * 100)
        spend.append(SpendFact(month_day, "overhead", _money(amount), None, "overhead"))

    facts = Facts(as_of=as_of, currency="EUR", invoices=invoices, payments=payments, credits=credits, deals=deals,
                  customers=customers_f, spend=spend, activities=activities, activity_costs=dict(ACTIVITY_COSTS))
    stats = {
        "customers": n, "invoices": m, "payments": len(payments), "credits": len(credits), "deals": len(deals),
        "activities": len(activities), "spend_rows": len(spend), "rate_scale": round(scale, 3),
        "repeat_customers": int(np.count_nonzero(np.bincount(cust, minlength=n) > 1)),
        "max_invoices_per_customer": int(np.bincount(cust, minlength=n).max()),
        "open_invoices": int(np.count_nonzero(balance > 0)),
        "late_payer_share": round(float(late.mean()), 3),
        "mean_invoice_net_eur": round(float(net.mean()) / 100, 2),
        "arrays_s": round(arrays_s, 2),
    }
    return Generated(facts=facts, seconds=time.perf_counter() - t0, stats=stats)


# -- measuring compute ----------------------------------------------------------------------------

@dataclass
class ComputeRun:
    result: MetricsResult
    seconds: float
    #: Peak of the memory Python allocated during compute (tracemalloc), or None when not traced.
    traced_peak_bytes: int | None
    #: Growth of the process's maximum resident set during compute (0 when an earlier peak was higher).
    maxrss_delta_bytes: int
    #: Maximum resident set after compute minus the resident set just before it.
    rss_peak_over_start_bytes: int


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_compute(facts: Facts, config: MetricsConfig, *, traced: bool) -> ComputeRun:
    """``compute(facts, config)`` timed, with tracemalloc on when ``traced`` (which slows it down)."""
    gc.collect()
    rss0, maxrss0 = _rss_bytes(), _maxrss_bytes()
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    result = compute(facts, config)
    seconds = time.perf_counter() - t0
    peak: int | None = None
    if traced:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    maxrss1 = _maxrss_bytes()
    return ComputeRun(result, seconds, peak, maxrss1 - maxrss0, maxrss1 - rss0)


def metric_coverage(result: MetricsResult) -> dict[str, int]:
    """How many customers have each metric: a value, for the metrics that may be None; a value other than
    zero (or at least one signal) for the others, which always have one; and how many have each risk signal."""
    out: dict[str, int] = {}
    customers = result.customers.values()
    for f in fields(CustomerMetrics):
        if f.name in ("customer_id", "name", "channel"):
            continue
        if "None" in str(f.type):
            out[f.name] = sum(1 for m in customers if getattr(m, f.name) is not None)
        else:
            out[f.name] = sum(1 for m in customers if getattr(m, f.name) not in (0, ()))
    for m in customers:
        for signal in m.risk_signals:
            key = f"risk_signal:{signal.split(':', 1)[0]}"
            out[key] = out.get(key, 0) + 1
    return out


def compute_section(generated: Generated, *, traced: bool) -> dict[str, Any]:
    """Time compute on the generated facts and describe its result."""
    config = MetricsConfig()
    plain = run_compute(generated.facts, config, traced=False)
    traced_run = run_compute(generated.facts, config, traced=True) if traced else None
    company = plain.result.company
    models = company["models"]
    return {
        "compute_s": round(plain.seconds, 2),
        "compute_traced_s": round(traced_run.seconds, 2) if traced_run else None,
        "tracemalloc_peak_mb": round(traced_run.traced_peak_bytes / 2**20, 1)
        if traced_run and traced_run.traced_peak_bytes is not None else None,
        "maxrss_delta_mb": round(plain.maxrss_delta_bytes / 2**20, 1),
        "rss_peak_over_start_mb": round(plain.rss_peak_over_start_bytes / 2**20, 1),
        "customers_in_result": len(plain.result.customers),
        "customers_with_metric": metric_coverage(plain.result),
        "models": {k: models.get(k) for k in ("status", "reason", "unit", "churn_model", "customers",
                                              "repeat_customers", "purchase_model", "spend_model")},
        "company": {k: company.get(k) for k in ("ar_total", "ar_overdue", "dso_countback", "bpdso", "add", "cei",
                                                "dso_simple_90d", "clv_historical_total")},
    }


# -- write-back -----------------------------------------------------------------------------------

def write_section(result: MetricsResult, next_day: MetricsResult, *, companies: int,
                  time_scale: float) -> dict[str, Any]:
    """Write the customer metrics of ``companies`` customers to a HubSpot sandbox (companies created there
    through its batch API), then the same values again, then the next day's values; count the update calls
    against the least possible (records changed / batch size) and check the sandbox holds the values."""
    import math
    import tempfile
    from pathlib import Path

    import httpx

    from config.schema import MetricsFields
    from connectors.hubspot.adapter import HubSpotSource
    from connectors.hubspot.sandbox import HubSpotSandbox
    from connectors.sandboxkit import Clock, serve
    from connectors.xero.testing import MemoryTokenStore
    from metrics.writeback import CUSTOMER_FIELDS, write_back
    from sync.factstore import FactStore
    from sync.sandboxes import crm_sandbox_settings
    from sync.state import StateStore

    ids = sorted(result.customers)[:companies]
    sandbox = HubSpotSandbox(seed=0, clock=Clock(scale=time_scale))
    server = serve(sandbox)
    try:
        hubspot_id: dict[str, str] = {}
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer demo-hubspot-token"},
                          timeout=60) as http:
            for i in range(0, len(ids), 100):
                chunk = ids[i:i + 100]
                while True:
                    r = http.post("/crm/v3/objects/companies/batch/create",
                                  json={"inputs": [{"properties": {"name": f"Customer {c}"}} for c in chunk]})
                    if r.status_code != 429:
                        break
                    time.sleep(float(r.headers.get("Retry-After", "1")) / time_scale)
                r.raise_for_status()
                for c, made in zip(chunk, sorted(r.json()["results"], key=lambda x: int(x["id"])), strict=True):
                    hubspot_id[c] = made["id"]
        crm = HubSpotSource.from_config(crm_sandbox_settings("hubspot", server.url, time_scale=time_scale),
                                        MemoryTokenStore())
        with tempfile.TemporaryDirectory() as tmp:
            store = StateStore.open(f"sqlite:///{Path(tmp) / 'bench.db'}")
            facts = FactStore(store)
            batch = crm.settings.batch_size

            def one(res: MetricsResult) -> dict[str, Any]:
                records = {hubspot_id[c]: res.customer_values(c) for c in ids}
                t0 = time.perf_counter()
                wb = write_back(crm, facts, "bench", "customer", CUSTOMER_FIELDS, records, currency=res.currency,
                                fields=MetricsFields())
                return {"values_changed": wb.values_changed, "records_changed": wb.records_changed,
                        "update_calls": wb.write_calls, "least_calls": math.ceil(wb.records_changed / batch),
                        "records_failed": wb.records_failed, "seconds": round(time.perf_counter() - t0, 2)}

            first, again, daily = one(result), one(result), one(next_day)
            store.close()
        crm.close()
    finally:
        server.stop()
    return {"companies": len(ids), "batch_size": batch, "clock": time_scale, "first": first, "same_again": again,
            "next_day": daily}


# -- output ---------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def print_report(out: dict[str, Any]) -> None:
    if "write" in out:
        w = out["write"]
        for label in ("first", "same_again", "next_day"):
            r = w[label]
            print(f"write-back {label}: {r['values_changed']:,} values on {r['records_changed']:,} of "
                  f"{w['companies']:,} companies; {r['update_calls']} update calls, least {r['least_calls']} "
                  f"(batch {w['batch_size']}); {r['records_failed']} rejected; {r['seconds']} s")
    g = out["generation"]
    print(f"synthetic book: {g['customers']:,} customers, {g['invoices']:,} invoices, {g['payments']:,} payments, "
          f"{g['credits']:,} credit notes, {g['deals']:,} deals, {g['activities']:,} activity rows "
          f"(rate scale x{g['rate_scale']}, {g['repeat_customers']:,} repeat customers, "
          f"{g['open_invoices']:,} open invoices)")
    print(f"generation: {out['generation_s']:.1f} s ({g['arrays_s']:.1f} s drawing the numbers, the rest building "
          f"the facts)")
    c = out["compute"]
    traced = (f"tracemalloc peak {c['tracemalloc_peak_mb']} MB (traced run {c['compute_traced_s']} s)"
              if c["tracemalloc_peak_mb"] is not None else "not traced")
    print(f"compute: {c['compute_s']:.2f} s wall; memory: {traced}, ru_maxrss delta {c['maxrss_delta_mb']} MB, "
          f"max RSS over the RSS at start {c['rss_peak_over_start_mb']} MB")
    print(f"models: {json.dumps(_jsonable(c['models']))}")
    print(f"company: {json.dumps(_jsonable(c['company']))}")
    print(f"customers with each metric (of {c['customers_in_result']:,}):")
    for name, k in c["customers_with_metric"].items():
        print(f"  {name:<36} {k:>9,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--invoices-per-customer", type=float, default=10.0)
    ap.add_argument("--weeks", type=float, default=104.0, help="length of the history window")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-trace", action="store_true", help="skip the second, tracemalloc-traced compute run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-companies", type=int, default=0,
                    help="also write the metrics of this many customers to a HubSpot sandbox and count the calls")
    ap.add_argument("--time-scale", type=float, default=50.0, help="clock of the HubSpot sandbox (x)")
    args = ap.parse_args()

    generated = build_facts(args.customers, args.invoices_per_customer, seed=args.seed, weeks=args.weeks)
    print(f"generated in {generated.seconds:.1f} s; computing", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"generation": generated.stats, "generation_s": round(generated.seconds, 2)}
    out["compute"] = compute_section(generated, traced=not args.no_trace)
    if args.write_companies:
        from dataclasses import replace

        config = MetricsConfig()
        today = compute(generated.facts, config)
        tomorrow = compute(replace(generated.facts, as_of=generated.facts.as_of + dt.timedelta(days=1)), config)
        out["write"] = write_section(today, tomorrow, companies=args.write_companies, time_scale=args.time_scale)
    if args.json:
        print(json.dumps(_jsonable(out), indent=2))
    else:
        print_report(out)


if __name__ == "__main__":
    main()
