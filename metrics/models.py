"""Customer-base models: how many purchases a customer will make, how much they spend, and what that is worth.

Purchase models (non-contractual, continuous time): each customer buys at a Poisson rate with gamma
heterogeneity across customers, and drops out at some unobserved point.

- :class:`BGNBD` - Fader, Hardie & Lee (2005), "Counting Your Customers the Easy Way" (dropout after a
  purchase with a beta-distributed probability).
- :class:`MBGNBD` - Batislam, Denizel & Filiztekin (2007): like BG/NBD, but a customer can also drop out
  right after the first purchase, so P(alive) < 1 for one-time buyers.
- :class:`ParetoNBD` - Schmittlein, Morrison & Colombo (1987): exponential lifetimes with gamma
  heterogeneity; likelihood from Fader & Hardie's note 009.

Spend model: :class:`GammaGamma` (Fader, Hardie & Lee 2005, "RFM and CLV"; Fader & Hardie note 025).

Every model is fitted by maximum likelihood on log-parameters (Nelder-Mead, then a BFGS polish),
with the likelihood computed in log space (``gammaln``, ``betaln``, ``logaddexp``) so that large
purchase counts do not overflow. Inputs are an :class:`RFM` summary with an explicit time unit; the
fitted rate parameters (``alpha``, ``beta``) are per that unit, and :func:`predictive_clv` converts
calendar months into it explicitly.

Fits merge identical (x, t_x, T) rows into weighted rows before optimising (the likelihood is a weighted
sum, so this is exact), so their cost scales with the distinct rows. :func:`group` does the same with
rounding, for callers that want to store or fit a compact summary and map results back to customers.
"""

from __future__ import annotations

import abc
import datetime as dt
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy import optimize, special  # type: ignore[import-untyped]

from connectors.errors import LedgerBridgeError

__all__ = [
    "BGNBD",
    "DAYS_PER_UNIT",
    "MBGNBD",
    "RFM",
    "GammaGamma",
    "ModelFitError",
    "ParetoNBD",
    "PurchaseModel",
    "TimeUnit",
    "group",
    "predictive_clv",
    "rfm_from_transactions",
]

TimeUnit = Literal["day", "week", "month"]
DAYS_PER_UNIT: dict[str, float] = {"day": 1.0, "week": 7.0, "month": 365.25 / 12}

FloatArray = npt.NDArray[np.float64]

# A log-parameter beyond this bound means the optimiser ran off to 0 or infinity: the data does not
# identify the model (e.g. nobody ever drops out), and the "fit" would be meaningless.
_MAX_LOG_PARAM = 18.0
_INFEASIBLE = 1e300
_CLV_BLOCK_CELLS = 1_000_000


class ModelFitError(LedgerBridgeError):
    """A model could not be fitted: the data is degenerate (e.g. no repeat buyers) or the fit did not converge."""


# --------------------------------------------------------------------------------------------------
# RFM summaries
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RFM:
    """Recency-frequency-monetary summary, one row per customer (or per group of identical customers).

    ``x`` counts repeat purchases (the first purchase is excluded; same-day purchases count once),
    ``t_x`` is the time of the last purchase since the first, ``T`` the time from the first purchase to
    the end of observation, both in ``unit``. ``m_x`` is the mean value of the repeat purchases (0 when
    ``x == 0``). ``weights`` counts identical customers per row; ``None`` means one customer per row.
    """

    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    m_x: FloatArray
    unit: TimeUnit
    weights: FloatArray | None = None

    def __post_init__(self) -> None:
        for name in ("x", "t_x", "T", "m_x"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64).reshape(-1))
        if self.weights is not None:
            object.__setattr__(self, "weights", np.asarray(self.weights, dtype=np.float64).reshape(-1))
        n = self.x.shape[0]
        arrays = [self.t_x, self.T, self.m_x] + ([self.weights] if self.weights is not None else [])
        if any(a.shape[0] != n for a in arrays):
            raise ValueError("RFM arrays must all have the same length")
        if self.unit not in DAYS_PER_UNIT:
            raise ValueError(f"unknown time unit {self.unit!r}; expected one of {sorted(DAYS_PER_UNIT)}")
        if n and (np.any(self.x < 0) or np.any(self.t_x < 0) or np.any(self.t_x > self.T + 1e-9)):
            raise ValueError("RFM rows need x >= 0 and 0 <= t_x <= T")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def w(self) -> FloatArray:
        """The weights, with ``None`` read as one customer per row."""
        return self.weights if self.weights is not None else np.ones_like(self.x)

    def in_unit(self, unit: TimeUnit) -> RFM:
        """The same summary with ``t_x`` and ``T`` expressed in ``unit``."""
        if unit == self.unit:
            return self
        factor = DAYS_PER_UNIT[self.unit] / DAYS_PER_UNIT[unit]
        return replace(self, t_x=self.t_x * factor, T=self.T * factor, unit=unit)


def rfm_from_transactions(
    customer_ids: Sequence[str],
    days: Sequence[dt.date],
    values: Sequence[float],
    as_of: dt.date,
    unit: TimeUnit = "week",
) -> tuple[list[str], RFM]:
    """Build the RFM summary of a transaction log as of ``as_of``.

    Per customer: transactions after ``as_of`` are ignored; transactions on the same day are merged into one
    purchase (values summed); the first purchase day is excluded from ``x`` and ``m_x``; ``t_x`` and ``T``
    are in ``unit`` and not rounded. Customers whose first purchase is after ``as_of`` are left out. The
    order of the input does not matter; customers come back sorted by id.
    """
    if not len(customer_ids) == len(days) == len(values):
        raise ValueError("customer_ids, days and values must have the same length")
    if unit not in DAYS_PER_UNIT:
        raise ValueError(f"unknown time unit {unit!r}; expected one of {sorted(DAYS_PER_UNIT)}")
    per_customer: dict[str, dict[int, float]] = {}
    cutoff = as_of.toordinal()
    for cid, day, value in zip(customer_ids, days, values, strict=True):
        ordinal = day.toordinal()
        if ordinal > cutoff:
            continue
        by_day = per_customer.setdefault(cid, {})
        by_day[ordinal] = by_day.get(ordinal, 0.0) + float(value)
    ids = sorted(per_customer)
    n = len(ids)
    x = np.zeros(n)
    t_x = np.zeros(n)
    T = np.zeros(n)
    m_x = np.zeros(n)
    per_unit = DAYS_PER_UNIT[unit]
    for i, cid in enumerate(ids):
        by_day = per_customer[cid]
        first = min(by_day)
        last = max(by_day)
        x[i] = len(by_day) - 1
        t_x[i] = (last - first) / per_unit
        T[i] = (cutoff - first) / per_unit
        if x[i] > 0:
            m_x[i] = (math.fsum(by_day.values()) - by_day[first]) / x[i]
    return ids, RFM(x=x, t_x=t_x, T=T, m_x=m_x, unit=unit)


def group(rfm: RFM, decimals: int = 6) -> tuple[RFM, npt.NDArray[np.intp]]:
    """Merge rows with identical (x, t_x, T) (compared after rounding to ``decimals``) into weighted rows.

    ``m_x`` is not part of the key (grouping serves the purchase models); a group's ``m_x`` is the
    weighted mean of its members' values. Returns the grouped summary, whose weights are the summed weights
    of the members, and for each input row the index of its group, so ``grouped.x[index]`` maps results
    back to customers.
    """
    if len(rfm) == 0:
        return rfm, np.zeros(0, dtype=np.intp)
    first, inverse = _unique_rows(rfm.x, np.round(rfm.t_x, decimals), np.round(rfm.T, decimals))
    n_groups = first.shape[0]
    w = rfm.w
    weights = np.bincount(inverse, weights=w, minlength=n_groups).astype(np.float64)
    spend = np.bincount(inverse, weights=w * rfm.m_x, minlength=n_groups).astype(np.float64)
    m_x = np.divide(spend, weights, out=np.zeros(n_groups), where=weights > 0)
    grouped = RFM(x=rfm.x[first], t_x=rfm.t_x[first], T=rfm.T[first], m_x=m_x, unit=rfm.unit, weights=weights)
    return grouped, inverse


def _unique_rows(*columns: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Distinct rows of the given columns: (index of one member of each, group index of every row).

    Groups are numbered in lexicographic order of the rows. (A lexsort is much faster than
    ``np.unique(..., axis=0)``, which sorts a structured view.)
    """
    n = columns[0].shape[0]
    order = np.lexsort(columns[::-1])
    starts = np.zeros(n, dtype=bool)
    starts[:1] = True
    for column in columns:
        ordered = column[order]
        starts[1:] |= ordered[1:] != ordered[:-1]
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


# --------------------------------------------------------------------------------------------------
# Fitting machinery
# --------------------------------------------------------------------------------------------------


def _as_float(values: npt.ArrayLike) -> FloatArray:
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def _flat(*values: npt.ArrayLike) -> list[FloatArray]:
    """The arguments broadcast against each other and flattened to 1-D float arrays."""
    return [np.array(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(*(_as_float(v) for v in values))]


class _Rows:
    """Purchase data prepared for repeated likelihood evaluation.

    Special functions of x alone are evaluated once per distinct x, and the Pareto/NBD hypergeometric
    terms once per distinct (x, t_x) or (x, T) pair; the results are scattered back to the rows.
    """

    def __init__(self, x: FloatArray, t_x: FloatArray, T: FloatArray, w: FloatArray | None = None) -> None:
        self.x, self.t_x, self.T = x, t_x, T
        self.w = np.ones_like(x) if w is None else w
        self.ux, x_index = np.unique(x, return_inverse=True)
        self.x_index = x_index.reshape(-1)

    @classmethod
    def of(cls, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike) -> _Rows:
        xa, ta, Ta = _flat(x, t_x, T)
        return cls(xa, ta, Ta)

    @classmethod
    def merged(cls, rfm: RFM) -> _Rows:
        """Rows of ``rfm`` with exact duplicates merged (the weighted likelihood is unchanged)."""
        first, inverse = _unique_rows(rfm.x, rfm.t_x, rfm.T)
        weights = np.bincount(inverse, weights=rfm.w, minlength=first.shape[0]).astype(np.float64)
        keep = weights > 0
        rows = first[keep]
        return cls(rfm.x[rows], rfm.t_x[rows], rfm.T[rows], weights[keep])

    def per_x(self, values: FloatArray) -> FloatArray:
        """Scatter values computed on ``self.ux`` back to the rows."""
        return values[self.x_index]

    @functools.cached_property
    def pairs(self) -> tuple[FloatArray, FloatArray, npt.NDArray[np.intp]]:
        """Distinct (x, time) pairs over (x, t_x) and (x, T); the index maps [t_x rows, T rows] to them."""
        pair_x = np.concatenate([self.x, self.x])
        pair_t = np.concatenate([self.t_x, self.T])
        first, inverse = _unique_rows(pair_x, pair_t)
        return pair_x[first], pair_t[first], inverse


def _maximise(loglik: Callable[[FloatArray], float], start: FloatArray, model: str) -> tuple[FloatArray, float]:
    """Maximise ``loglik`` over positive parameters; returns (parameters, maximum log-likelihood).

    The search runs on log-parameters: Nelder-Mead from ``start`` gets close robustly, then BFGS polishes.
    If the polish does not report convergence, a second, tighter Nelder-Mead pass and polish start from the
    best point so far. Raises :class:`ModelFitError` when no finite, converged optimum is found.
    """

    def objective(log_params: FloatArray) -> float:
        if np.any(np.abs(log_params) > 2 * _MAX_LOG_PARAM):
            return _INFEASIBLE
        with np.errstate(all="ignore"):
            value = loglik(np.exp(log_params))
        return -value if math.isfinite(value) else _INFEASIBLE

    def nelder_mead(x0: FloatArray, tol: float, step: float) -> optimize.OptimizeResult:
        n = x0.shape[0]
        # scipy's default simplex moves a zero coordinate by only 0.00025, far too little on log-parameters
        simplex = np.vstack([x0, x0 + step * np.eye(n)])
        options = {"xatol": tol, "fatol": tol, "maxiter": 400 * n, "maxfev": 600 * n, "initial_simplex": simplex}
        return optimize.minimize(objective, x0, method="Nelder-Mead", options=options)

    def polish(x0: FloatArray) -> optimize.OptimizeResult:
        return optimize.minimize(objective, x0, method="BFGS", jac="3-point", options={"gtol": 1e-3, "maxiter": 200})

    x0 = np.log(start)
    if objective(x0) >= _INFEASIBLE:
        raise ModelFitError(f"{model}: the log-likelihood is not finite at the starting point; check the data")
    first = nelder_mead(x0, 1e-4, 0.5)
    polished = polish(first.x)
    results = [first, polished]
    converged = bool(polished.success)
    if not converged:
        second = nelder_mead(min(results, key=lambda res: float(res.fun)).x, 1e-7, 0.1)
        polished = polish(second.x)
        results += [second, polished]
        converged = bool(second.success or polished.success)
    best = min(results, key=lambda res: float(res.fun))
    if not best.fun < _INFEASIBLE:
        raise ModelFitError(f"{model}: no parameter values give a finite log-likelihood on this data")
    if np.any(np.abs(best.x) > _MAX_LOG_PARAM):
        params = ", ".join(f"{v:.3g}" for v in np.exp(best.x))
        raise ModelFitError(
            f"{model}: the fit did not converge (parameters ran off to 0 or infinity: {params}); "
            "the data does not identify the model"
        )
    if not converged:
        params = ", ".join(f"{v:.3g}" for v in np.exp(best.x))
        raise ModelFitError(
            f"{model}: the fit did not converge ({polished.message} Last parameters: {params}); "
            "the data may not identify the model"
        )
    return np.exp(best.x), -float(best.fun)


def _purchase_rows(rfm: RFM, model: str) -> tuple[_Rows, FloatArray]:
    """Validated, merged rows for a purchase-model fit, and a starting point (r, alpha, 1, 1) on the data's scale."""
    w = rfm.w
    if len(rfm) == 0 or not np.sum(w) > 0:
        raise ModelFitError(f"{model}: no customers to fit")
    if not np.all(np.isfinite(rfm.x) & np.isfinite(rfm.t_x) & np.isfinite(rfm.T) & np.isfinite(w)):
        raise ModelFitError(f"{model}: the RFM data holds non-finite values")
    if np.any(w < 0):
        raise ModelFitError(f"{model}: negative weights")
    if not np.any((rfm.x > 0) & (w > 0)):
        raise ModelFitError(f"{model}: no repeat buyers (every customer has x == 0); the model cannot be fitted")
    rows = _Rows.merged(rfm)
    # r = 1 and alpha = mean T / mean x make the prior mean purchase rate match the observed one.
    alpha = float(np.dot(rows.w, rows.T) / np.dot(rows.w, rows.x))
    if not alpha > 0:
        raise ModelFitError(f"{model}: every customer has T == 0; there is no observation time to fit on")
    return rows, np.array([1.0, alpha, 1.0, 1.0])


def _one_minus_power_over(base_log: FloatArray, exponent: float) -> FloatArray:
    """``(1 - exp(exponent * base_log)) / exponent``, with its limit ``-base_log`` at ``exponent == 0``."""
    if abs(exponent) < 1e-12:
        return np.asarray(-base_log, dtype=np.float64)
    return np.asarray(-np.expm1(exponent * base_log) / exponent, dtype=np.float64)


class PurchaseModel(Protocol):
    """What :func:`predictive_clv` and the metric code need from a fitted purchase model."""

    @property
    def unit(self) -> TimeUnit: ...

    def p_alive(self, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike) -> FloatArray: ...

    def expected_purchases(
        self, t: npt.ArrayLike, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
    ) -> FloatArray: ...

    def expected_purchases_unconditional(self, t: npt.ArrayLike) -> FloatArray: ...

    def loglik_of(self, rfm: RFM) -> float: ...


def _ln_nbd_common(r: float, alpha: float, rows: _Rows) -> FloatArray:
    """ln[Gamma(r+x) alpha^r / Gamma(r)], shared by the three purchase models."""
    common = rows.per_x(special.gammaln(r + rows.ux)) - special.gammaln(r) + r * np.log(alpha)
    return np.asarray(common, dtype=np.float64)


Terms = tuple[FloatArray, FloatArray, FloatArray]


class _LatentAttrition(abc.ABC):
    """What BG/NBD, MBG/NBD and Pareto/NBD share: each likelihood is ``exp(common) * (alive + dropped)``,
    the two terms being a customer still active at T and one who left after the last purchase, so that the
    log-likelihood is ``common + logaddexp(ln alive, ln dropped)`` and P(alive) is the share of the first."""

    name: ClassVar[str]
    unit: TimeUnit

    @classmethod
    @abc.abstractmethod
    def _terms(cls, p: Sequence[float] | FloatArray, rows: _Rows) -> Terms:
        """(ln common, ln alive, ln dropped) at the four parameters ``p``."""

    @abc.abstractmethod
    def _params(self) -> tuple[float, float, float, float]:
        """The four parameters, in the order ``_terms`` takes them."""

    @classmethod
    def _fit_params(cls, rows: _Rows, start: FloatArray) -> tuple[FloatArray, float]:
        def loglik(p: FloatArray) -> float:
            ln_common, ln_alive, ln_dropped = cls._terms(p, rows)
            return float(np.dot(rows.w, ln_common + np.logaddexp(ln_alive, ln_dropped)))

        return _maximise(loglik, start, cls.name)

    def loglik_terms(self, rfm: RFM) -> FloatArray:
        """Per-row log-likelihood (unweighted), times read in the model's unit."""
        rfm = rfm.in_unit(self.unit)
        ln_common, ln_alive, ln_dropped = self._terms(self._params(), _Rows(rfm.x, rfm.t_x, rfm.T))
        return np.asarray(ln_common + np.logaddexp(ln_alive, ln_dropped), dtype=np.float64)

    def loglik_of(self, rfm: RFM) -> float:
        """Total weighted log-likelihood of ``rfm`` at these parameters."""
        return float(np.dot(rfm.w, self.loglik_terms(rfm)))

    def p_alive(self, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike) -> FloatArray:
        """P(still alive at T | x, t_x, T) = 1 / (1 + exp(ln dropped - ln alive))."""
        _, ln_alive, ln_dropped = self._terms(self._params(), _Rows.of(x, t_x, T))
        return np.asarray(special.expit(ln_alive - ln_dropped), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# BG/NBD
# --------------------------------------------------------------------------------------------------


def _bgnbd_terms(r: float, alpha: float, a: float, b: float, rows: _Rows) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(ln A1 + ln A2, ln A3, ln A4) of the BG/NBD likelihood (Hardie note 027); ln A4 = -inf when x == 0."""
    x = rows.x
    ux = rows.ux
    ln_a2 = special.gammaln(a + b) - special.gammaln(b)
    ln_a2 = ln_a2 + rows.per_x(special.gammaln(b + ux) - special.gammaln(a + b + ux))
    ln_a3 = -(r + x) * np.log(alpha + rows.T)
    repeat = x > 0
    safe_b = np.where(repeat, b + x - 1, 1.0)
    ln_a4 = np.where(repeat, np.log(a) - np.log(safe_b) - (r + x) * np.log(alpha + rows.t_x), -np.inf)
    return _ln_nbd_common(r, alpha, rows) + ln_a2, ln_a3, ln_a4


@dataclass(frozen=True)
class BGNBD(_LatentAttrition):
    """Fitted BG/NBD model: purchase rate ~ Gamma(r, alpha) per ``unit``; dropout p ~ Beta(a, b).

    P(alive) is identically 1 for one-time buyers (x == 0): use MBG/NBD or Pareto/NBD for churn.
    """

    name: ClassVar[str] = "BG/NBD"
    r: float
    alpha: float
    a: float
    b: float
    loglik: float = float("nan")
    n: int = 0
    unit: TimeUnit = "week"

    @classmethod
    def fit(cls, rfm: RFM) -> BGNBD:
        """Maximum-likelihood fit on ``rfm`` (weighted by ``rfm.weights``)."""
        rows, start = _purchase_rows(rfm, "BG/NBD")
        params, ll = cls._fit_params(rows, start)
        r, alpha, a, b = (float(v) for v in params)
        return cls(r=r, alpha=alpha, a=a, b=b, loglik=ll, n=round(float(np.sum(rows.w))), unit=rfm.unit)

    @classmethod
    def _terms(cls, p: Sequence[float] | FloatArray, rows: _Rows) -> Terms:
        return _bgnbd_terms(p[0], p[1], p[2], p[3], rows)

    def _params(self) -> tuple[float, float, float, float]:
        return (self.r, self.alpha, self.a, self.b)

    def expected_purchases(
        self, t: npt.ArrayLike, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
    ) -> FloatArray:
        """E[Y(t) | x, t_x, T]: expected purchases in the next ``t`` units (FHL 2005 eq. 10)."""
        ta, xa, txa, Ta = _flat(t, x, t_x, T)
        return np.asarray(self._purchases_if_alive(ta, xa, Ta) * self.p_alive(xa, txa, Ta), dtype=np.float64)

    def _purchases_if_alive(self, t: FloatArray, x: FloatArray, T: FloatArray) -> FloatArray:
        """The numerator of eq. 10, (a+b+x-1)/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z)].

        With z = t/(alpha+T+t), Euler's transformation turns the power times 2F1 into
        (1-z)^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z), whose parameters do not grow with x (no overflow).
        """
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        tail = np.exp((a - 1) * np.log1p(-z)) * special.hyp2f1(a + b - 1 - r, a - 1, a + b + x - 1, z)
        return np.asarray((a + b + x - 1) / (a - 1) * (1.0 - tail), dtype=np.float64)

    def expected_purchases_unconditional(self, t: npt.ArrayLike) -> FloatArray:
        """E[X(t)]: expected repeat purchases of a new customer in ``t`` units after the first (eq. 9)."""
        ta = _as_float(t)
        zero = np.zeros_like(ta)
        return self._purchases_if_alive(ta, zero, zero)

    def in_unit(self, unit: TimeUnit) -> BGNBD:
        """The same model with its rate parameter expressed per ``unit``."""
        return replace(self, alpha=self.alpha * DAYS_PER_UNIT[self.unit] / DAYS_PER_UNIT[unit], unit=unit)


# --------------------------------------------------------------------------------------------------
# MBG/NBD
# --------------------------------------------------------------------------------------------------


def _mbgnbd_terms(r: float, alpha: float, a: float, b: float, rows: _Rows) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(common log factor, log of the "alive at T" term, log of the "dropped out at t_x" term)."""
    x, ux = rows.x, rows.ux
    ln_common = _ln_nbd_common(r, alpha, rows) - special.betaln(a, b)
    ln_alive = rows.per_x(special.betaln(a, b + ux + 1)) - (r + x) * np.log(alpha + rows.T)
    ln_dropped = rows.per_x(special.betaln(a + 1, b + ux)) - (r + x) * np.log(alpha + rows.t_x)
    return ln_common, ln_alive, ln_dropped


@dataclass(frozen=True)
class MBGNBD(_LatentAttrition):
    """Fitted MBG/NBD model (Batislam et al. 2007): BG/NBD with dropout also possible after the first purchase."""

    name: ClassVar[str] = "MBG/NBD"
    r: float
    alpha: float
    a: float
    b: float
    loglik: float = float("nan")
    n: int = 0
    unit: TimeUnit = "week"

    @classmethod
    def fit(cls, rfm: RFM) -> MBGNBD:
        """Maximum-likelihood fit on ``rfm`` (weighted by ``rfm.weights``)."""
        rows, start = _purchase_rows(rfm, "MBG/NBD")
        params, ll = cls._fit_params(rows, start)
        r, alpha, a, b = (float(v) for v in params)
        return cls(r=r, alpha=alpha, a=a, b=b, loglik=ll, n=round(float(np.sum(rows.w))), unit=rfm.unit)

    @classmethod
    def _terms(cls, p: Sequence[float] | FloatArray, rows: _Rows) -> Terms:
        return _mbgnbd_terms(p[0], p[1], p[2], p[3], rows)

    def _params(self) -> tuple[float, float, float, float]:
        return (self.r, self.alpha, self.a, self.b)

    def expected_purchases(
        self, t: npt.ArrayLike, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
    ) -> FloatArray:
        """E[Y(t) | x, t_x, T]: expected purchases in the next ``t`` units."""
        ta, xa, txa, Ta = _flat(t, x, t_x, T)
        return np.asarray(self._purchases_if_alive(ta, xa, Ta) * self.p_alive(xa, txa, Ta), dtype=np.float64)

    def _purchases_if_alive(self, t: FloatArray, x: FloatArray, T: FloatArray) -> FloatArray:
        """(a+b+x)/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x+1; a+b+x; z)], z = t/(alpha+T+t).

        Computed as (a+b+x)/(a-1) [1 - (1-z)^(a-1) 2F1(a+b-r, a-1; a+b+x; z)] (Euler's transformation).
        """
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        tail = np.exp((a - 1) * np.log1p(-z)) * special.hyp2f1(a + b - r, a - 1, a + b + x, z)
        return np.asarray((a + b + x) / (a - 1) * (1.0 - tail), dtype=np.float64)

    def expected_purchases_unconditional(self, t: npt.ArrayLike) -> FloatArray:
        """E[X(t)]: expected repeat purchases of a new customer in ``t`` units after the first."""
        ta = _as_float(t)
        zero = np.zeros_like(ta)
        # a new customer survives the first purchase with probability b/(a+b)
        return np.asarray(self.b / (self.a + self.b) * self._purchases_if_alive(ta, zero, zero), dtype=np.float64)

    def in_unit(self, unit: TimeUnit) -> MBGNBD:
        """The same model with its rate parameter expressed per ``unit``."""
        return replace(self, alpha=self.alpha * DAYS_PER_UNIT[self.unit] / DAYS_PER_UNIT[unit], unit=unit)


# --------------------------------------------------------------------------------------------------
# Pareto/NBD
# --------------------------------------------------------------------------------------------------


def _paretonbd_terms(
    r: float, alpha: float, s: float, beta: float, rows: _Rows
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(common log factor, log of the "alive at T" term, log of the "died in (t_x, T)" term).

    The last term is ``s/(r+s+x) * A0`` of Fader & Hardie note 009, in log space:
    ``ln A0 = l1 + log1p(-exp(l2 - l1))`` with ``l1``, ``l2`` the logs of its t_x and T parts, using the
    ``alpha < beta`` form of the hypergeometric argument when needed; ``-inf`` where ``t_x == T`` (A0 = 0).
    """
    x = rows.x
    n = x.shape[0]
    ln_common = _ln_nbd_common(r, alpha, rows) + s * np.log(beta)
    ln_alive = -(r + x) * np.log(alpha + rows.T) - s * np.log(beta + rows.T)
    if alpha >= beta:
        big, small = alpha, beta
    else:
        big, small = beta, alpha
    pair_x, pair_t, index = rows.pairs
    rsx = r + s + pair_x
    z = (big - small) / (big + pair_t)
    # 2F1(r+s+x, s+1; r+s+x+1; z) (alpha >= beta) or 2F1(r+s+x, r+x; r+s+x+1; z) (alpha < beta), through
    # Euler's transformation 2F1(a, b; c; z) = (1-z)^(c-a-b) 2F1(c-a, c-b; c; z): here c - a = 1, and the
    # power carries the growth in x in log space, so large purchase counts do not overflow.
    if alpha >= beta:
        ln_hyp = -s * np.log1p(-z) + np.log(special.hyp2f1(1.0, r + pair_x, rsx + 1, z))
    else:
        ln_hyp = (1 - r - pair_x) * np.log1p(-z) + np.log(special.hyp2f1(1.0, s + 1, rsx + 1, z))
    ln_part = (ln_hyp - rsx * np.log(big + pair_t))[index]
    l1, l2 = ln_part[:n], ln_part[n:]
    gap = l2 - l1
    positive = gap < 0
    ln_a0 = np.where(positive, l1 + np.log(-np.expm1(np.where(positive, gap, -1.0))), -np.inf)
    ln_died = np.log(s) - np.log(r + s + x) + ln_a0
    return ln_common, ln_alive, ln_died


@dataclass(frozen=True)
class ParetoNBD(_LatentAttrition):
    """Fitted Pareto/NBD model: purchase rate ~ Gamma(r, alpha), dropout rate ~ Gamma(s, beta), per ``unit``."""

    name: ClassVar[str] = "Pareto/NBD"
    r: float
    alpha: float
    s: float
    beta: float
    loglik: float = float("nan")
    n: int = 0
    unit: TimeUnit = "week"

    @classmethod
    def fit(cls, rfm: RFM) -> ParetoNBD:
        """Maximum-likelihood fit on ``rfm`` (weighted by ``rfm.weights``)."""
        rows, start = _purchase_rows(rfm, "Pareto/NBD")
        start[3] = start[1]
        params, ll = cls._fit_params(rows, start)
        r, alpha, s, beta = (float(v) for v in params)
        return cls(r=r, alpha=alpha, s=s, beta=beta, loglik=ll, n=round(float(np.sum(rows.w))), unit=rfm.unit)

    @classmethod
    def _terms(cls, p: Sequence[float] | FloatArray, rows: _Rows) -> Terms:
        return _paretonbd_terms(p[0], p[1], p[2], p[3], rows)

    def _params(self) -> tuple[float, float, float, float]:
        return (self.r, self.alpha, self.s, self.beta)

    def expected_purchases(
        self, t: npt.ArrayLike, x: npt.ArrayLike, t_x: npt.ArrayLike, T: npt.ArrayLike
    ) -> FloatArray:
        """E[Y(t) | x, t_x, T]: expected purchases in the next ``t`` units."""
        ta, xa, txa, Ta = _flat(t, x, t_x, T)
        r, alpha, s, beta = self.r, self.alpha, self.s, self.beta
        # (r+x)(beta+T)/((alpha+T)(s-1)) * [1 - ((beta+T)/(beta+T+t))^(s-1)], continuous at s == 1
        decay = _one_minus_power_over(np.log(beta + Ta) - np.log(beta + Ta + ta), s - 1)
        alive_part = (r + xa) * (beta + Ta) / (alpha + Ta) * decay
        return np.asarray(alive_part * self.p_alive(xa, txa, Ta), dtype=np.float64)

    def expected_purchases_unconditional(self, t: npt.ArrayLike) -> FloatArray:
        """E[X(t)]: expected repeat purchases of a new customer in ``t`` units after the first."""
        ta = _as_float(t)
        decay = _one_minus_power_over(np.log(self.beta) - np.log(self.beta + ta), self.s - 1)
        return np.asarray(self.r * self.beta / self.alpha * decay, dtype=np.float64)

    def in_unit(self, unit: TimeUnit) -> ParetoNBD:
        """The same model with its rate parameters expressed per ``unit``."""
        factor = DAYS_PER_UNIT[self.unit] / DAYS_PER_UNIT[unit]
        return replace(self, alpha=self.alpha * factor, beta=self.beta * factor, unit=unit)


# --------------------------------------------------------------------------------------------------
# Gamma-Gamma spend model
# --------------------------------------------------------------------------------------------------


def _gamma_gamma_terms(p: float, q: float, gamma: float, x: FloatArray, m_x: FloatArray) -> FloatArray:
    """Log density of the mean spend ``m_x`` over ``x`` purchases (Fader & Hardie note 025, eq. 4)."""
    px = p * x
    return np.asarray(
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(gamma)
        + (px - 1) * np.log(m_x)
        + px * np.log(x)
        - (px + q) * np.log(gamma + m_x * x),
        dtype=np.float64,
    )


@dataclass(frozen=True)
class GammaGamma:
    """Fitted Gamma-Gamma spend model: transaction values ~ Gamma(p, nu), nu ~ Gamma(q, gamma) across customers."""

    p: float
    q: float
    gamma: float
    loglik: float = float("nan")
    n: int = 0

    @staticmethod
    def _usable(
        x: npt.ArrayLike, m_x: npt.ArrayLike, weights: npt.ArrayLike | None
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        xa, ma = np.broadcast_arrays(_as_float(x), _as_float(m_x))
        w = np.ones_like(xa) if weights is None else np.broadcast_to(_as_float(weights), xa.shape)
        keep = (xa > 0) & (ma > 0) & (w > 0)
        return xa[keep], ma[keep], w[keep]

    @classmethod
    def fit(cls, x: npt.ArrayLike, m_x: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> GammaGamma:
        """Maximum-likelihood fit on the rows with ``x > 0`` and ``m_x > 0`` (repeat buyers with positive spend)."""
        xa, ma, w = cls._usable(x, m_x, weights)
        if xa.shape[0] < 2:
            raise ModelFitError(
                f"Gamma-Gamma: {xa.shape[0]} repeat buyer(s) with a positive mean spend; at least 2 are needed"
            )
        if not np.all(np.isfinite(xa) & np.isfinite(ma) & np.isfinite(w)):
            raise ModelFitError("Gamma-Gamma: the spend data holds non-finite values")
        if np.ptp(ma) <= 1e-12 * np.max(ma):
            raise ModelFitError("Gamma-Gamma: every repeat buyer has the same mean spend; the model is not identified")

        def loglik(params: FloatArray) -> float:
            return float(np.dot(w, _gamma_gamma_terms(params[0], params[1], params[2], xa, ma)))

        # Start gamma on the scale of the data: with p = q = 1 the prior mean of the spend is gamma.
        start = np.array([1.0, 1.0, float(np.average(ma, weights=w))])
        params, ll = _maximise(loglik, start, "Gamma-Gamma")
        p, q, gamma = (float(v) for v in params)
        if q <= 1:
            raise ModelFitError(
                f"Gamma-Gamma: fitted q = {q:.3g} <= 1, so the population mean spend is infinite; "
                "the spend data is too heavy-tailed for this model"
            )
        return cls(p=p, q=q, gamma=gamma, loglik=ll, n=round(float(np.sum(w))))

    def loglik_of(self, x: npt.ArrayLike, m_x: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> float:
        """Total weighted log-likelihood of the usable rows (``x > 0``, ``m_x > 0``) at these parameters."""
        xa, ma, w = self._usable(x, m_x, weights)
        return float(np.dot(w, _gamma_gamma_terms(self.p, self.q, self.gamma, xa, ma)))

    @property
    def population_mean(self) -> float:
        """Mean spend per transaction across the population, p * gamma / (q - 1)."""
        return self.p * self.gamma / (self.q - 1)

    def expected_spend(self, x: npt.ArrayLike, m_x: npt.ArrayLike) -> FloatArray:
        """E[M | x, m_x]: the customer's mean spend shrunk toward the population mean (which x == 0 gets)."""
        xa, ma = np.broadcast_arrays(_as_float(x), _as_float(m_x))
        ma = np.where(xa > 0, ma, 0.0)
        return np.asarray(self.p * (self.gamma + xa * ma) / (self.p * xa + self.q - 1), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Predictive CLV
# --------------------------------------------------------------------------------------------------


def predictive_clv(
    purchase_model: PurchaseModel,
    spend_model: GammaGamma,
    rfm: RFM,
    *,
    horizon_months: int,
    annual_discount_rate: float,
    margin: float = 1.0,
) -> FloatArray:
    """Discounted expected value of each customer's purchases over the next ``horizon_months`` months.

    ``sum_k margin * E[M] * (E[Y(t_k)] - E[Y(t_{k-1})]) / (1 + d_m)^k`` for k = 1..horizon, where t_k is k
    calendar months (365.25/12 days) expressed in the purchase model's time unit and
    ``d_m = (1 + annual_discount_rate)^(1/12) - 1``. ``rfm`` may be in any unit: its times are converted to
    the model's unit first, so the result does not depend on the unit the data was summarised in.
    """
    if horizon_months < 0:
        raise ValueError("horizon_months must be >= 0")
    if annual_discount_rate <= -1:
        raise ValueError("annual_discount_rate must be > -1")
    data = rfm.in_unit(purchase_model.unit)
    spend = spend_model.expected_spend(data.x, data.m_x)
    monthly = (1.0 + annual_discount_rate) ** (1.0 / 12.0) - 1.0
    months_in_unit = DAYS_PER_UNIT["month"] / DAYS_PER_UNIT[purchase_model.unit]
    months = np.arange(1, horizon_months + 1, dtype=np.float64)
    horizons = months * months_in_unit
    discount = (1.0 + monthly) ** -months
    n = len(data)
    value = np.zeros(n)
    # one vectorised call per block of customers (months x customers), bounded in memory
    block = max(1, _CLV_BLOCK_CELLS // max(horizon_months, 1))
    for lo in range(0, n if horizon_months else 0, block):
        hi = min(n, lo + block)
        size = hi - lo
        cumulative = purchase_model.expected_purchases(
            np.repeat(horizons, size),
            np.tile(data.x[lo:hi], horizon_months),
            np.tile(data.t_x[lo:hi], horizon_months),
            np.tile(data.T[lo:hi], horizon_months),
        ).reshape(horizon_months, size)
        value[lo:hi] = discount @ np.diff(cumulative, axis=0, prepend=0.0)
    return np.asarray(margin * spend * value, dtype=np.float64)
