"""Purchase and spend models against the published CDNOW estimates and against brute-force integration.

Reference numbers: Fader, Hardie & Lee (2005) and the CLVTools / lifetimes / BTYDplus / pymc-marketing test
suites as collected in shared/docs/metrics-notes.md section 1. The CDNOW files are read from shared/data.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from connectors.errors import LedgerBridgeError
from metrics.models import (
    BGNBD,
    DAYS_PER_UNIT,
    MBGNBD,
    RFM,
    GammaGamma,
    ModelFitError,
    ParetoNBD,
    group,
    predictive_clv,
    rfm_from_transactions,
)

CDNOW = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cdnow"
CALIBRATION_END = dt.date(1997, 9, 30)
# Fits are well under 0.2 s each on CDNOW; this bound only catches a fit that has become pathological.
FIT_SECONDS = 1.5

# CLVTools' 7-digit BG/NBD estimates on CDNOW (FHL 2005 report 0.243, 4.414, 0.793, 2.426)
BG_PUBLISHED = BGNBD(r=0.2425945, alpha=4.4136019, a=0.7929199, b=2.4258881)


def _read_csv(name: str) -> list[dict[str, str]]:
    with (CDNOW / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _timed(fit: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    model = fit()
    return model, time.perf_counter() - started


@pytest.fixture(scope="module")
def summary() -> RFM:
    rows = _read_csv("cdnow_customers_summary.csv")
    return RFM(
        x=np.array([float(r["frequency"]) for r in rows]),
        t_x=np.array([float(r["recency"]) for r in rows]),
        T=np.array([float(r["T"]) for r in rows]),
        m_x=np.zeros(len(rows)),
        unit="week",
    )


@pytest.fixture(scope="module")
def with_spend() -> tuple[list[str], RFM]:
    rows = _read_csv("cdnow_customers_summary_with_transactions.csv")
    rfm = RFM(
        x=np.array([float(r["x"]) for r in rows]),
        t_x=np.array([float(r["t_x"]) for r in rows]),
        T=np.array([float(r["T"]) for r in rows]),
        m_x=np.array([float(r["zbar"]) for r in rows]),
        unit="week",
    )
    return [r["ID"] for r in rows], rfm


@pytest.fixture(scope="module")
def transactions() -> tuple[list[str], list[dt.date], list[float]]:
    """CDNOW_sample.txt: master_id sample_id date(YYYYMMDD) cds value; customers are the sample ids."""
    ids: list[str] = []
    days: list[dt.date] = []
    values: list[float] = []
    with (CDNOW / "CDNOW_sample.txt").open() as fh:
        for line in fh:
            _, sample_id, day, _, value = line.split()
            ids.append(sample_id)
            days.append(dt.date(int(day[:4]), int(day[4:6]), int(day[6:])))
            values.append(float(value))
    return ids, days, values


@pytest.fixture(scope="module")
def bg(summary: RFM) -> tuple[BGNBD, float]:
    model, seconds = _timed(lambda: BGNBD.fit(summary))
    assert isinstance(model, BGNBD)
    return model, seconds


@pytest.fixture(scope="module")
def pareto(summary: RFM) -> tuple[ParetoNBD, float]:
    model, seconds = _timed(lambda: ParetoNBD.fit(summary))
    assert isinstance(model, ParetoNBD)
    return model, seconds


@pytest.fixture(scope="module")
def mbg(summary: RFM) -> tuple[MBGNBD, float]:
    model, seconds = _timed(lambda: MBGNBD.fit(summary))
    assert isinstance(model, MBGNBD)
    return model, seconds


@pytest.fixture(scope="module")
def gg(with_spend: tuple[list[str], RFM]) -> tuple[GammaGamma, float]:
    rfm = with_spend[1]
    model, seconds = _timed(lambda: GammaGamma.fit(rfm.x, rfm.m_x))
    assert isinstance(model, GammaGamma)
    return model, seconds


def _one(x: float, t_x: float, T: float) -> RFM:
    return RFM(x=np.array([x]), t_x=np.array([t_x]), T=np.array([T]), m_x=np.zeros(1), unit="week")


# ------------------------------------------------------------------------------------------------
# Maximum-likelihood estimates on CDNOW
# ------------------------------------------------------------------------------------------------


def test_bgnbd_reproduces_the_published_cdnow_estimates(bg: tuple[BGNBD, float]) -> None:
    model, seconds = bg
    assert [model.r, model.alpha, model.a, model.b] == pytest.approx([0.2426, 4.4136, 0.7929, 2.4259], rel=1e-3)
    assert model.loglik == pytest.approx(-9582.43, abs=0.01)
    assert model.n == 2357
    assert model.unit == "week"
    assert seconds < FIT_SECONDS


def test_paretonbd_reproduces_the_published_cdnow_estimates(pareto: tuple[ParetoNBD, float]) -> None:
    model, seconds = pareto
    # beta is weakly identified (SE 6.2): 0.1 % still separates a converged fit from a stalled one
    assert [model.r, model.alpha, model.s, model.beta] == pytest.approx([0.5532, 10.5763, 0.6062, 11.6715], rel=1e-3)
    assert model.loglik == pytest.approx(-9594.97, abs=0.01)
    assert model.n == 2357
    assert seconds < FIT_SECONDS


def test_mbgnbd_reproduces_the_btydplus_cdnow_estimates(mbg: tuple[MBGNBD, float]) -> None:
    model, seconds = mbg
    assert [model.r, model.alpha, model.a, model.b] == pytest.approx([0.525, 6.183, 0.891, 1.614], rel=1e-3)
    assert model.loglik == pytest.approx(-9582.13, abs=0.01)
    assert seconds < FIT_SECONDS


def test_gamma_gamma_reproduces_the_published_estimates(
    gg: tuple[GammaGamma, float], with_spend: tuple[list[str], RFM]
) -> None:
    model, seconds = gg
    rfm = with_spend[1]
    assert [model.p, model.q, model.gamma] == pytest.approx([6.249, 3.745, 15.448], rel=1e-3)
    assert model.loglik == pytest.approx(-4055.92, abs=0.01)
    assert model.n == 946  # only the repeat buyers
    assert model.loglik_of(rfm.x, rfm.m_x) == pytest.approx(model.loglik, abs=1e-9)
    # CLVTools: LL at Fader & Hardie's rounded estimates
    assert GammaGamma(p=6.25, q=3.74, gamma=15.44).loglik_of(rfm.x, rfm.m_x) == pytest.approx(-4055.9177, abs=0.01)
    assert seconds < FIT_SECONDS


def test_the_fitted_likelihood_is_the_maximum(
    summary: RFM, bg: tuple[BGNBD, float], pareto: tuple[ParetoNBD, float], mbg: tuple[MBGNBD, float]
) -> None:
    for model in (bg[0], pareto[0], mbg[0]):
        assert model.loglik_of(summary) == pytest.approx(model.loglik, abs=1e-9)
    bg_model = bg[0]
    for name in ("r", "alpha", "a", "b"):
        for factor in (0.99, 1.01):
            moved = BGNBD(**{**_params(bg_model), name: getattr(bg_model, name) * factor})
            assert moved.loglik_of(summary) < bg_model.loglik
    # the CLVTools optimum of the same likelihood, on data rounded to 2 dp, is within 0.01
    assert BG_PUBLISHED.loglik_of(summary) == pytest.approx(bg_model.loglik, abs=0.01)


def _params(model: BGNBD) -> dict[str, float]:
    return {"r": model.r, "alpha": model.alpha, "a": model.a, "b": model.b}


# ------------------------------------------------------------------------------------------------
# Predictions against published values
# ------------------------------------------------------------------------------------------------


def test_bgnbd_single_customer_matches_hardies_spreadsheet() -> None:
    assert BG_PUBLISHED.expected_purchases(39, 2, 30.43, 38.86)[0] == pytest.approx(1.226, abs=0.001)
    assert BG_PUBLISHED.p_alive(2, 30.43, 38.86)[0] == pytest.approx(0.7266, abs=0.001)
    assert BG_PUBLISHED.p_alive(2, 30.43, 38.86)[0] == pytest.approx(0.727, abs=0.001)


def test_bgnbd_unconditional_expectation_matches_hardies_spreadsheet(bg: tuple[BGNBD, float]) -> None:
    times = [0.1429, 1.0, 3.0, 31.8571, 32.0, 78.0]
    expected = [0.0078, 0.0532, 0.1506, 1.0405, 1.0437, 1.8576]
    assert bg[0].expected_purchases_unconditional(times) == pytest.approx(expected, abs=1e-3)


def test_bgnbd_log_likelihood_is_numerically_stable_for_heavy_buyers() -> None:
    model = BGNBD(r=0.25, alpha=4.0, a=0.8, b=2.5)
    terms = model.loglik_terms(
        RFM(x=np.array([0.0, 200.0]), t_x=np.array([0.0, 38.0]), T=np.array([40.0, 40.0]), m_x=np.zeros(2), unit="week")
    )
    assert terms[0] == pytest.approx(-0.59947382, abs=1e-7)
    assert terms[1] == pytest.approx(100.7957, abs=1e-4)


def test_p_alive_of_one_time_buyers(bg: tuple[BGNBD, float], mbg: tuple[MBGNBD, float]) -> None:
    T = np.array([1.0, 10.0, 38.0])
    zeros = np.zeros(3)
    assert np.all(bg[0].p_alive(zeros, zeros, T) == 1.0)  # a BG/NBD artefact, by construction
    mbg_alive = mbg[0].p_alive(zeros, zeros, T)
    assert np.all((mbg_alive > 0) & (mbg_alive < 1))
    assert np.all(np.diff(mbg_alive) < 0)  # the longer a one-time buyer stays silent, the likelier gone


def test_paretonbd_p_alive_matches_the_btyd_walkthrough() -> None:
    model = ParetoNBD(r=0.5534, alpha=10.5802, s=0.6061, beta=11.6562)
    assert model.p_alive(26, 30.86, 31)[0] == pytest.approx(0.9979, abs=1e-4)


def test_mbgnbd_conditional_expectation_is_close_to_bgnbd(mbg: tuple[MBGNBD, float]) -> None:
    assert mbg[0].expected_purchases(39, 2, 30.43, 38.86)[0] == pytest.approx(1.226, abs=0.05)


def test_holdout_forecasts_match_the_paper(
    summary: RFM, bg: tuple[BGNBD, float], pareto: tuple[ParetoNBD, float]
) -> None:
    one_time = summary.x == 0
    for model, total, zero_class in ((bg[0], 1653.9, 0.225), (pareto[0], 1665.7, 0.138)):
        forecast = model.expected_purchases(39, summary.x, summary.t_x, summary.T)
        assert forecast.sum() == pytest.approx(total, rel=1e-3)
        assert forecast[one_time].mean() == pytest.approx(zero_class, abs=1e-3)


def test_gamma_gamma_expected_spend(gg: tuple[GammaGamma, float], with_spend: tuple[list[str], RFM]) -> None:
    model = gg[0]
    rfm = with_spend[1]
    first_ten = model.expected_spend(rfm.x[:10], rfm.m_x[:10])
    expected = [24.65, 18.91, 35.17, 35.17, 35.17, 71.46, 18.91, 35.17, 27.28, 35.17]
    assert first_ten == pytest.approx(expected, abs=0.01)
    assert model.population_mean == pytest.approx(model.p * model.gamma / (model.q - 1))
    assert model.expected_spend([0, 0], [0.0, 99.0]) == pytest.approx([model.population_mean] * 2)
    # shrinkage: between the customer's own mean and the population mean, closer to their own with more purchases
    few, many = model.expected_spend([1, 20], [100.0, 100.0])
    assert model.population_mean < few < many < 100.0


# ------------------------------------------------------------------------------------------------
# Closed forms against brute-force integration over the individual-level model
# ------------------------------------------------------------------------------------------------


def _gamma_nodes(shape: float, rate: float, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature for E[g(lambda)], lambda ~ Gamma(shape, rate)."""
    u, w = special.roots_genlaguerre(n, shape - 1)
    return u / rate, w / w.sum()


def _beta_nodes(a: float, b: float, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature for E[g(p)], p ~ Beta(a, b)."""
    y, w = special.roots_jacobi(n, b - 1, a - 1)
    return (1 + y) / 2, w / w.sum()


CASES = [(0.0, 0.0, 10.0), (1.0, 12.0, 12.0), (3.0, 5.0, 12.0), (10.0, 30.0, 40.0), (2.0, 30.43, 38.86)]


@pytest.mark.parametrize("modified", [False, True])
@pytest.mark.parametrize("params", [(0.2426, 4.4136, 0.7929, 2.4259), (2.0, 4.0, 1.5, 3.0)])
def test_bg_family_closed_forms_match_integration(params: tuple[float, float, float, float], modified: bool) -> None:
    r, alpha, a, b = params
    model: BGNBD | MBGNBD = MBGNBD(r=r, alpha=alpha, a=a, b=b) if modified else BGNBD(r=r, alpha=alpha, a=a, b=b)
    lam, wl = _gamma_nodes(r, alpha)
    p, wp = _beta_nodes(a, b)
    L, P = np.meshgrid(lam, p, indexing="ij")
    W = np.outer(wl, wp)
    horizon = 39.0
    per_alive_customer = -np.expm1(-L * P * horizon) / P  # E[purchases in (T, T+t] | lambda, p, alive at T]
    for x, t_x, T in CASES:
        survive = x + 1 if modified else x  # MBG/NBD customers can also leave right after the first purchase
        alive = (1 - P) ** survive * L**x * np.exp(-L * T)
        dropped = P * (1 - P) ** (survive - 1) * L**x * np.exp(-L * t_x) if (modified or x > 0) else 0 * L
        likelihood = np.sum(W * (alive + dropped))
        assert model.loglik_terms(_one(x, t_x, T))[0] == pytest.approx(math.log(likelihood), abs=1e-9)
        assert model.p_alive(x, t_x, T)[0] == pytest.approx(np.sum(W * alive) / likelihood, rel=1e-9)
        expected = np.sum(W * alive * per_alive_customer) / likelihood
        assert model.expected_purchases(horizon, x, t_x, T)[0] == pytest.approx(expected, rel=1e-9)
    first_survives = (1 - P) if modified else 1.0
    for t in (0.5, 10.0, 78.0):
        expected = np.sum(W * first_survives * -np.expm1(-L * P * t) / P)
        assert model.expected_purchases_unconditional(t)[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "params",
    [
        (0.5532, 10.5763, 0.6062, 11.6715),  # alpha < beta
        (2.0, 8.0, 1.5, 4.0),  # alpha > beta
        (2.0, 4.0, 1.5, 8.0),  # alpha < beta
        (1.0, 5.0, 1.0, 5.0),  # alpha == beta, s == 1
    ],
)
def test_paretonbd_closed_forms_match_integration(params: tuple[float, float, float, float]) -> None:
    r, alpha, s, beta = params
    model = ParetoNBD(r=r, alpha=alpha, s=s, beta=beta)
    lam, wl = _gamma_nodes(r, alpha)
    mu, wm = _gamma_nodes(s, beta)
    L, M = np.meshgrid(lam, mu, indexing="ij")
    W = np.outer(wl, wm)
    horizon = 39.0
    per_alive_customer = L / M * -np.expm1(-M * horizon)
    for x, t_x, T in CASES:
        alive = L**x * np.exp(-(L + M) * T)
        died = L**x * M / (L + M) * (np.exp(-(L + M) * t_x) - np.exp(-(L + M) * T))
        likelihood = np.sum(W * (alive + died))
        assert model.loglik_terms(_one(x, t_x, T))[0] == pytest.approx(math.log(likelihood), abs=1e-9)
        assert model.p_alive(x, t_x, T)[0] == pytest.approx(np.sum(W * alive) / likelihood, rel=1e-9)
        expected = np.sum(W * alive * per_alive_customer) / likelihood
        assert model.expected_purchases(horizon, x, t_x, T)[0] == pytest.approx(expected, rel=1e-9)
    for t in (0.5, 10.0, 78.0):
        expected = np.sum(W * L / M * -np.expm1(-M * t))
        assert model.expected_purchases_unconditional(t)[0] == pytest.approx(expected, rel=1e-9)


def test_paretonbd_is_continuous_across_its_branches_and_at_s_equal_one() -> None:
    rfm = RFM(
        x=np.array([0.0, 4.0, 25.0]),
        t_x=np.array([0.0, 20.0, 35.0]),
        T=np.array([38.0, 38.0, 38.0]),
        m_x=np.zeros(3),
        unit="week",
    )
    below = ParetoNBD(r=0.55, alpha=10.0 - 1e-9, s=1.0 - 1e-9, beta=10.0)
    at = ParetoNBD(r=0.55, alpha=10.0, s=1.0, beta=10.0)
    above = ParetoNBD(r=0.55, alpha=10.0 + 1e-9, s=1.0 + 1e-9, beta=10.0)
    for model in (below, above):
        assert model.loglik_terms(rfm) == pytest.approx(at.loglik_terms(rfm), rel=1e-7)
        assert model.expected_purchases(39, rfm.x, rfm.t_x, rfm.T) == pytest.approx(
            at.expected_purchases(39, rfm.x, rfm.t_x, rfm.T), rel=1e-7
        )
        assert model.expected_purchases_unconditional(39) == pytest.approx(at.expected_purchases_unconditional(39))


@pytest.mark.parametrize(
    "model",
    [
        BG_PUBLISHED,
        MBGNBD(r=0.525, alpha=6.183, a=0.891, b=1.614),
        ParetoNBD(r=0.5532, alpha=10.5763, s=0.6062, beta=11.6715),
        ParetoNBD(r=0.5532, alpha=10.5763, s=0.6062, beta=30.0),
    ],
)
def test_heavy_buyers_do_not_overflow(model: BGNBD | MBGNBD | ParetoNBD) -> None:
    x = np.array([50.0, 1000.0, 5000.0, 5000.0])
    t_x = np.array([38.0, 38.0, 38.0, 39.9])
    T = np.full(4, 40.0)
    rfm = RFM(x=x, t_x=t_x, T=T, m_x=np.zeros(4), unit="week")
    assert np.all(np.isfinite(model.loglik_terms(rfm)))
    alive = model.p_alive(x, t_x, T)
    assert np.all((alive >= 0) & (alive <= 1))
    assert alive[3] > alive[2]  # a purchase closer to T means more likely alive
    forecast = model.expected_purchases(39, x, t_x, T)
    assert np.all(np.isfinite(forecast) & (forecast >= 0))
    # a heavy buyer seen at T buys at most at their posterior mean rate, less only by a possible dropout
    no_dropout = (model.r + 5000) / (model.alpha + 40) * 39
    assert 0.5 * no_dropout < model.expected_purchases(39, 5000, 40.0, 40.0)[0] <= no_dropout


# ------------------------------------------------------------------------------------------------
# Building and grouping RFM data
# ------------------------------------------------------------------------------------------------


def test_rfm_from_transactions_reproduces_the_cdnow_summary(
    transactions: tuple[list[str], list[dt.date], list[float]], with_spend: tuple[list[str], RFM]
) -> None:
    ids, days, values = transactions
    assert max(days) > CALIBRATION_END  # the file also holds the holdout period, which must not count
    customers, rfm = rfm_from_transactions(ids, days, values, CALIBRATION_END, unit="week")
    reference_ids, reference = with_spend
    assert len(customers) == 2357
    assert customers == sorted(customers)
    assert [int(c) for c in customers] == [int(c) for c in reference_ids]
    assert rfm.unit == "week"
    assert rfm.weights is None
    np.testing.assert_array_equal(rfm.x, reference.x)
    assert rfm.x.sum() == 2457  # repeat purchase days: the 223 same-day duplicate rows are merged
    # the summary file rounds to 2 dp
    np.testing.assert_allclose(np.round(rfm.t_x, 2), reference.t_x, atol=1e-9)
    np.testing.assert_allclose(np.round(rfm.T, 2), reference.T, atol=1e-9)
    np.testing.assert_allclose(rfm.m_x, reference.m_x, atol=0.005 + 1e-9)


def test_rfm_from_transactions_by_hand() -> None:
    d = dt.date
    log = [
        ("b", d(2024, 1, 15), 20.0),
        ("b", d(2024, 1, 1), 10.0),
        ("c", d(2024, 2, 20), 99.0),  # first purchase after as_of: not a customer yet
        ("b", d(2024, 3, 1), 70.0),  # after as_of: ignored
        ("a", d(2024, 2, 5), 8.0),
        ("b", d(2024, 1, 29), 15.0),
        ("b", d(2024, 1, 1), 5.0),  # same day as the first purchase: merged into it
        ("b", d(2024, 1, 29), 25.0),  # same day: merged, values summed
    ]
    expected = (["a", "b"], [0.0, 2.0], [0.0, 4.0], [1.0, 6.0], [0.0, 30.0])
    for order in (log, list(reversed(log)), random.Random(3).sample(log, len(log))):
        ids, rfm = rfm_from_transactions(
            [c for c, _, _ in order], [t for _, t, _ in order], [v for _, _, v in order], d(2024, 2, 12), unit="week"
        )
        assert (ids, list(rfm.x), list(rfm.t_x), list(rfm.T), list(rfm.m_x)) == expected
    _, days = rfm_from_transactions(
        [c for c, _, _ in log], [t for _, t, _ in log], [v for _, _, v in log], d(2024, 2, 12), unit="day"
    )
    assert list(days.t_x) == [0.0, 28.0]
    assert list(days.T) == [7.0, 42.0]
    _, months = rfm_from_transactions(["a", "a"], [d(2024, 1, 1), d(2024, 1, 31)], [1.0, 2.0], d(2024, 3, 1), "month")
    assert months.t_x[0] == pytest.approx(30 / DAYS_PER_UNIT["month"])
    assert months.T[0] == pytest.approx(60 * 12 / 365.25)


def test_grouping_leaves_the_fits_unchanged(summary: RFM, with_spend: tuple[list[str], RFM]) -> None:
    grouped, index = group(summary)
    assert len(grouped) < len(summary) / 2
    assert grouped.weights is not None
    assert grouped.weights.sum() == len(summary)
    np.testing.assert_array_equal(grouped.x[index], summary.x)
    np.testing.assert_allclose(grouped.t_x[index], summary.t_x, atol=1e-6)
    np.testing.assert_allclose(grouped.T[index], summary.T, atol=1e-6)
    for model_type in (BGNBD, MBGNBD, ParetoNBD):
        plain = model_type.fit(summary)
        weighted = model_type.fit(grouped)
        assert weighted.loglik == pytest.approx(plain.loglik, abs=1e-6)
        assert weighted.n == plain.n == len(summary)
        assert list(vars(weighted).values())[:4] == pytest.approx(list(vars(plain).values())[:4], rel=1e-6)
        assert plain.loglik_of(grouped) == pytest.approx(plain.loglik_of(summary), abs=1e-6)
    # group m_x is the weighted mean of the members' spend
    spend = with_spend[1]
    grouped_spend, spend_index = group(spend)
    for g in range(len(grouped_spend)):
        members = spend.m_x[spend_index == g]
        assert grouped_spend.m_x[g] == pytest.approx(members.mean())
    # grouping already grouped data adds the weights up
    regrouped, _ = group(grouped)
    assert regrouped.weights is not None
    np.testing.assert_array_equal(regrouped.weights, grouped.weights)


def test_gamma_gamma_weights_count_customers(with_spend: tuple[list[str], RFM]) -> None:
    rfm = with_spend[1]
    repeat = rfm.x > 0
    x, m_x = rfm.x[repeat], rfm.m_x[repeat]
    doubled = GammaGamma.fit(np.concatenate([x, x[:100]]), np.concatenate([m_x, m_x[:100]]))
    weights = np.ones(len(x))
    weights[:100] = 2
    weighted = GammaGamma.fit(x, m_x, weights=weights)
    assert weighted.n == doubled.n == len(x) + 100
    assert weighted.loglik == pytest.approx(doubled.loglik, abs=1e-6)
    assert [weighted.p, weighted.q, weighted.gamma] == pytest.approx([doubled.p, doubled.q, doubled.gamma], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Time units and predictive CLV
# ------------------------------------------------------------------------------------------------


def test_fits_do_not_depend_on_the_time_unit(transactions: tuple[list[str], list[dt.date], list[float]]) -> None:
    ids, days, values = transactions
    _, weeks = rfm_from_transactions(ids, days, values, CALIBRATION_END, unit="week")
    _, in_days = rfm_from_transactions(ids, days, values, CALIBRATION_END, unit="day")
    jacobian = weeks.x.sum() * math.log(7)  # densities of times measured in days are 1/7 of those in weeks
    for model_type in (BGNBD, ParetoNBD):
        weekly = model_type.fit(weeks)
        daily = model_type.fit(in_days)
        assert daily.unit == "day"
        assert daily.loglik == pytest.approx(weekly.loglik - jacobian, abs=0.01)
        assert daily.alpha / 7 == pytest.approx(weekly.alpha, rel=1e-3)
        assert weekly.in_unit("day").loglik_of(in_days) == pytest.approx(weekly.loglik - jacobian, abs=1e-6)
        # the model reads an RFM in another unit by converting it
        assert weekly.loglik_of(in_days) == pytest.approx(weekly.loglik, abs=1e-6)


def test_clv_without_discount_is_spend_times_expected_purchases(
    with_spend: tuple[list[str], RFM], bg: tuple[BGNBD, float], gg: tuple[GammaGamma, float]
) -> None:
    rfm = with_spend[1]
    clv = predictive_clv(bg[0], gg[0], rfm, horizon_months=12, annual_discount_rate=0.0, margin=0.3)
    year_in_weeks = 365.25 / 7
    expected = (
        0.3 * gg[0].expected_spend(rfm.x, rfm.m_x) * bg[0].expected_purchases(year_in_weeks, rfm.x, rfm.t_x, rfm.T)
    )
    np.testing.assert_allclose(clv, expected, rtol=1e-12)
    discounted = predictive_clv(bg[0], gg[0], rfm, horizon_months=12, annual_discount_rate=0.1, margin=0.3)
    assert np.all(discounted < clv)
    assert np.all(discounted > clv / 1.1)  # no cash flow is discounted by more than a year
    assert not predictive_clv(bg[0], gg[0], rfm, horizon_months=0, annual_discount_rate=0.1).any()


def test_clv_matches_lifetimes_with_weekly_frequency(
    with_spend: tuple[list[str], RFM], bg: tuple[BGNBD, float], gg: tuple[GammaGamma, float]
) -> None:
    rfm = with_spend[1]
    clv = predictive_clv(bg[0], gg[0], rfm, horizon_months=12, annual_discount_rate=1.01**12 - 1)
    # lifetimes (freq="W", 1 %/month) gives 36.28, 283.52 and 71,510 with a 4.345-week month; ours is 4.348 weeks
    assert [clv[0], clv[5], clv.sum()] == pytest.approx([36.28, 283.52, 71510], rel=2e-3)


def test_clv_does_not_depend_on_the_time_unit(
    transactions: tuple[list[str], list[dt.date], list[float]], with_spend: tuple[list[str], RFM]
) -> None:
    ids, days, values = transactions
    _, weeks = rfm_from_transactions(ids, days, values, CALIBRATION_END, unit="week")
    _, in_days = rfm_from_transactions(ids, days, values, CALIBRATION_END, unit="day")
    spend = GammaGamma.fit(weeks.x, weeks.m_x)
    terms = {"horizon_months": 24, "annual_discount_rate": 0.08, "margin": 0.4}
    for weekly in (BGNBD.fit(weeks), MBGNBD.fit(weeks), ParetoNBD.fit(weeks)):
        reference = predictive_clv(weekly, spend, weeks, **terms)
        assert reference.sum() > 0
        daily = weekly.in_unit("day")
        np.testing.assert_allclose(predictive_clv(daily, spend, in_days, **terms), reference, rtol=1e-6)
        np.testing.assert_allclose(predictive_clv(weekly, spend, in_days, **terms), reference, rtol=1e-6)
        np.testing.assert_allclose(predictive_clv(daily, spend, weeks, **terms), reference, rtol=1e-6)
    # a model fitted on the day-unit data forecasts the same values, up to the optimiser's tolerance
    bg_weekly = BGNBD.fit(weeks)
    bg_daily = BGNBD.fit(in_days)
    np.testing.assert_allclose(
        predictive_clv(bg_daily, spend, in_days, **terms), predictive_clv(bg_weekly, spend, weeks, **terms), rtol=2e-3
    )


# ------------------------------------------------------------------------------------------------
# Degenerate data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [BGNBD, MBGNBD, ParetoNBD])
def test_purchase_models_refuse_data_without_repeat_buyers(model_type: type[BGNBD | MBGNBD | ParetoNBD]) -> None:
    nobody_returns = RFM(x=np.zeros(50), t_x=np.zeros(50), T=np.linspace(1, 50, 50), m_x=np.zeros(50), unit="week")
    with pytest.raises(ModelFitError, match="no repeat buyers"):
        model_type.fit(nobody_returns)
    empty = RFM(x=np.zeros(0), t_x=np.zeros(0), T=np.zeros(0), m_x=np.zeros(0), unit="week")
    with pytest.raises(ModelFitError, match="no customers"):
        model_type.fit(empty)
    assert issubclass(ModelFitError, LedgerBridgeError)


def test_gamma_gamma_refuses_degenerate_spend() -> None:
    with pytest.raises(ModelFitError, match="at least 2"):
        GammaGamma.fit([0, 0, 0, 1], [0.0, 0.0, 0.0, 12.0])
    with pytest.raises(ModelFitError, match="same mean spend"):
        GammaGamma.fit([1, 2, 3], [10.0, 10.0, 10.0])
    # spend that barely varies has its maximum likelihood at p, q -> infinity: no finite fit exists
    rng = np.random.default_rng(5)
    with pytest.raises(ModelFitError, match="did not converge"):
        GammaGamma.fit(rng.integers(1, 5, 300), 10 * np.exp(rng.normal(0, 0.001, 300)))


def test_rfm_rejects_inconsistent_rows() -> None:
    with pytest.raises(ValueError, match="same length"):
        RFM(x=np.zeros(2), t_x=np.zeros(3), T=np.ones(2), m_x=np.zeros(2), unit="week")
    with pytest.raises(ValueError, match="t_x <= T"):
        RFM(x=np.ones(1), t_x=np.array([5.0]), T=np.array([4.0]), m_x=np.zeros(1), unit="week")
