"""cnnlab.study.stats against hand-computed numbers and statsmodels: Holm/BH, paired t-test
power."""

import math
import warnings

import pytest
from scipy import integrate
from scipy import stats as scipy_stats
from statsmodels.stats.power import TTestPower

from cnnlab.study import stats


def test_holm_and_bh_by_hand():
  p = [0.0215, 0.0309, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  holm, bh = stats.adjust_p_values(p)
  # Holm: the i-th smallest times (m - i + 1), running maximum, capped at 1:
  # 0.0215 * 8 = 0.172, 0.0309 * 7 = 0.2163, 0.2 * 6 = 1.2 -> 1, the rest 1.
  assert list(holm) == pytest.approx([0.172, 0.2163, 1, 1, 1, 1, 1, 1], abs=1e-12)
  # BH: the i-th smallest times m / i, running minimum from the largest down:
  # 0.7, 0.6 * 8/7 = 0.685714, 0.5 * 8/6 = 0.666667, 0.4 * 8/5 = 0.64, 0.3 * 8/4 = 0.6,
  # 0.2 * 8/3 = 0.533333, 0.0309 * 8/2 = 0.1236, min(0.0215 * 8 = 0.172, 0.1236) = 0.1236.
  assert list(bh) == pytest.approx([0.1236, 0.1236, 0.533333, 0.6, 0.64, 0.666667, 0.685714,
                                    0.7], abs=1e-6)


def test_untested_comparisons_are_not_in_the_family():
  # Two tested p-values: Holm multiplies the smaller by 2, not by 3.
  holm, bh = stats.adjust_p_values([0.01, math.nan, 0.04])
  assert holm[0] == pytest.approx(0.02) and holm[2] == pytest.approx(0.04)
  assert bh[0] == pytest.approx(0.02) and bh[2] == pytest.approx(0.04)
  assert math.isnan(holm[1]) and math.isnan(bh[1])
  holm, bh = stats.adjust_p_values([math.nan])
  assert math.isnan(holm[0]) and math.isnan(bh[0])


def test_correction_rule_switches_to_bh_above_the_holm_family_size():
  assert stats.correction_method(stats.HOLM_MAX_FAMILY) == "holm"
  assert stats.correction_method(stats.HOLM_MAX_FAMILY + 1) == "fdr_bh"


def test_power_by_hand():
  # Effect 0: the test rejects with probability alpha, whatever n.
  assert stats.paired_t_power(0.0, 5) == pytest.approx(stats.ALPHA, abs=1e-12)
  # n = 10, effect 1 sd: with T = (Z + nc) / sqrt(V / 9), nc = sqrt(10), V ~ chi2(9),
  # power = E_V[Phi(nc - c sqrt(V/9)) + Phi(-nc - c sqrt(V/9))], c = t_{0.975, 9} = 2.2621572;
  # integrated over V: 0.8030969 (G*Power's one-sample t gives 0.8031 too).
  n, effect = 10, 1.0
  c, nc = scipy_stats.t.isf(0.025, n - 1), effect * math.sqrt(n)
  by_hand, _ = integrate.quad(
      lambda v: (scipy_stats.norm.sf(c * math.sqrt(v / (n - 1)) - nc)
                 + scipy_stats.norm.cdf(-c * math.sqrt(v / (n - 1)) - nc))
      * scipy_stats.chi2.pdf(v, n - 1), 0, math.inf)
  assert by_hand == pytest.approx(0.8030969, abs=1e-7)
  assert stats.paired_t_power(effect, n) == pytest.approx(by_hand, abs=1e-9)
  # Effect 0.5 sd needs 34 pairs for 80% (power 0.8078 at 34, below 0.8 at 33).
  assert stats.pairs_needed(0.5) == 34
  assert stats.paired_t_power(0.5, 34) == pytest.approx(0.8077775, abs=1e-6)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 40])
@pytest.mark.parametrize("effect", [0.3, 1.0, 2.5])
def test_power_matches_statsmodels(n, effect):
  reference = TTestPower().power(effect_size=effect, nobs=n, alpha=stats.ALPHA)
  if math.isnan(reference):  # statsmodels' lower tail (nct.cdf) gives nan where power is ~1.
    assert stats.paired_t_power(effect, n) == pytest.approx(1.0, abs=1e-12)
  else:
    assert stats.paired_t_power(effect, n) == pytest.approx(reference, abs=1e-10)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 40])
def test_min_detectable_effect_matches_statsmodels(n):
  reference = TTestPower().solve_power(effect_size=None, nobs=n, alpha=stats.ALPHA,
                                       power=stats.POWER)
  effect = stats.min_detectable_effect(n)
  assert effect == pytest.approx(reference, rel=1e-5)  # statsmodels solves to about 1e-6.
  assert stats.paired_t_power(effect, n) == pytest.approx(stats.POWER, abs=1e-9)


@pytest.mark.parametrize("effect", [0.2, 0.5, 1.0, 3.0])
def test_pairs_needed_matches_statsmodels(effect):
  reference = TTestPower().solve_power(effect_size=effect, nobs=None, alpha=stats.ALPHA,
                                       power=stats.POWER)
  n = stats.pairs_needed(effect)
  assert n == math.ceil(reference)
  assert stats.paired_t_power(effect, n - 1) < stats.POWER <= stats.paired_t_power(effect, n)


def test_power_statement_without_std_says_why_and_warns_nothing():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for differences, reason in (([], "0 paired"), ([0.01], "1 paired"),
                                ([0.02, 0.02, 0.02], "identical"),
                                ([0.3 - 0.1, 0.9 - 0.7], "identical")):  # Equal up to rounding.
      statement = stats.power_statement(differences, 0.01)
      assert math.isnan(statement["min_detectable_diff"]) and statement["seeds_needed"] is None
      assert reason in statement["power_note"]
    statement = stats.power_statement([0.01, 0.03, 0.02], 0.01)
  # sd 0.01, n 3: detectable 3.2640435 sd (statsmodels agrees above); 1 point = 1 sd -> 10 pairs.
  assert statement["min_detectable_diff"] == pytest.approx(0.032640435, abs=1e-8)
  assert statement["seeds_needed"] == 10 and statement["power_note"] == ""
  assert stats.power_statement([0.01, 0.03, 0.02], None)["seeds_needed"] is None
