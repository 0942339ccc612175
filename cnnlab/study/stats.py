"""Statistics for the sweep report: intervals, multiple-comparison corrections, power.

Pure numpy/scipy/statsmodels; no JAX. The power code is written here on scipy's noncentral t so
that every number the report prints has one short, readable definition:

  paired t-test of n differences d_i with std s (ddof=1): t = mean(d) / (s / sqrt(n)), n-1 df;
  for a true mean difference delta the statistic is noncentral t with noncentrality
  delta / s * sqrt(n), so the two-sided power at level alpha is
  P(T > c) + P(T < -c) with c = t_{1 - alpha/2, n-1}.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # Two-sided level of every test and interval the report states.
POWER = 0.8  # The power at which the report states detectable differences and seeds needed.
# Families of at most this many comparisons are judged by Holm (family-wise error rate: the
# chance of any false claim); larger ones by Benjamini-Hochberg (false discovery rate: the
# expected share of false claims among those made), whose power does not collapse with the size.
HOLM_MAX_FAMILY = 10
# Differences closer than this many float64 epsilons (relative to their size) are rounding
# noise: `a - b` is rounded to within eps/2 of its size, so differences equal on paper can
# differ by about eps; scipy warns of catastrophic cancellation for spreads below 10 eps.
ROUNDING_EPS = 16


def mean_ci(values, confidence: float = 1 - ALPHA) -> tuple[float, float, float, float]:
  """(mean, sample std, CI low, CI high) with the t distribution (n-1 df); nan where n < 2."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean()) if len(x) else math.nan
  if len(x) < 2:
    return mean, math.nan, math.nan, math.nan
  std = float(x.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
  return mean, std, mean - half, mean + half


def identical(differences) -> bool:
  """Whether differences [n] are all equal up to float rounding (then no test is possible)."""
  d = np.asarray(differences, np.float64)
  if not len(d):
    return True
  spread = float(np.max(np.abs(d - d.mean())))
  return spread <= ROUNDING_EPS * np.finfo(np.float64).eps * float(np.max(np.abs(d)))


def correction_method(family_size: int) -> str:
  """statsmodels' name of the correction the report judges a family of this size by."""
  return "holm" if family_size <= HOLM_MAX_FAMILY else "fdr_bh"


CORRECTION_NAMES = {"holm": "Holm", "fdr_bh": "Benjamini-Hochberg"}


def adjust_p_values(p_values) -> tuple[np.ndarray, np.ndarray]:
  """(Holm, Benjamini-Hochberg) adjusted p-values [m] of one family of tests.

  NaN entries (comparisons without a test) stay NaN and are not members of the family.
  """
  p = np.asarray(p_values, np.float64)
  holm, bh = np.full_like(p, math.nan), np.full_like(p, math.nan)
  tested = ~np.isnan(p)
  if tested.any():
    holm[tested] = multipletests(p[tested], method="holm")[1]
    bh[tested] = multipletests(p[tested], method="fdr_bh")[1]
  return holm, bh


def paired_t_power(effect_size: float, n: float, alpha: float = ALPHA) -> float:
  """Two-sided power of a paired t-test of n pairs for a true mean difference of
  `effect_size` standard deviations of the differences (n may be fractional for solving)."""
  df = n - 1
  noncentrality = effect_size * math.sqrt(n)
  critical = scipy_stats.t.isf(alpha / 2, df)
  # P(T < -c | nc) = P(T > c | -nc): scipy's cdf returns nan far in the lower tail, sf does not.
  return float(scipy_stats.nct.sf(critical, df, noncentrality)
               + scipy_stats.nct.sf(critical, df, -noncentrality))


def _solve_increasing(f, low: float, target: float) -> float:
  """The x >= low where the increasing f(x) reaches `target`, given f(low) < target (the
  bracket's upper end is found by doubling)."""
  high = 2 * low
  while f(high) < target:
    low, high = high, 2 * high
  return optimize.brentq(lambda x: f(x) - target, low, high, xtol=1e-12, rtol=1e-12)


def min_detectable_effect(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
  """The effect size (in std of the differences) a paired t-test of n >= 2 pairs detects
  with probability `power`."""
  return _solve_increasing(lambda e: paired_t_power(e, n, alpha), 1.0 / math.sqrt(n), power)


def pairs_needed(effect_size: float, alpha: float = ALPHA, power: float = POWER) -> int:
  """The smallest number of pairs n >= 2 whose paired t-test detects `effect_size` (in std of
  the differences, > 0) with probability at least `power`."""
  if paired_t_power(effect_size, 2, alpha) >= power:
    return 2
  n = math.ceil(_solve_increasing(lambda m: paired_t_power(effect_size, m, alpha), 2.0, power))
  while n > 2 and paired_t_power(effect_size, n - 1, alpha) >= power:  # Guard the ceil.
    n -= 1
  return n


def power_statement(differences, min_effect: float | None) -> dict:
  """What the pairs could detect, from the observed differences [n] (cell minus baseline).

  Returns `min_detectable_diff` (the true mean difference detected with 80% power at the
  observed std and n, in the differences' units), `seeds_needed` (pairs needed for
  `min_effect`, None without one) and `power_note` (why there is no statement, else "").
  """
  d = np.asarray(differences, np.float64)
  none = {"min_detectable_diff": math.nan, "seeds_needed": None}
  if len(d) < 2:
    return {**none, "power_note": f"{len(d)} paired seed(s): no std of the differences"}
  if identical(d):
    return {**none, "power_note": "identical differences on every seed (std 0): power "
                                  "is undefined"}
  std = float(d.std(ddof=1))
  return {"min_detectable_diff": min_detectable_effect(len(d)) * std,
          "seeds_needed": None if min_effect is None else pairs_needed(min_effect / std),
          "power_note": ""}
