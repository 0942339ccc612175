"""Report statistics against hand-computed numbers; tables and errors on synthetic rows."""

import math

import pytest

from cnnlab import report
from cnnlab.errors import ConfigError


def test_mean_ci_by_hand():
  # mean 3; sample std sqrt(10/4) = 1.5811388; t_{0.975, 4} = 2.7764451;
  # half-width 2.7764451 * 1.5811388 / sqrt(5) = 1.9632432.
  mean, std, lo, hi = report.mean_ci([1, 2, 3, 4, 5])
  assert mean == 3
  assert std == pytest.approx(1.5811388, abs=1e-7)
  assert (lo, hi) == (pytest.approx(1.0367568, abs=1e-6), pytest.approx(4.9632432, abs=1e-6))
  mean, std, lo, hi = report.mean_ci([0.7])
  assert mean == 0.7 and math.isnan(std) and math.isnan(lo)


def _rows(cell, values, losses=None):
  return [{"cell": cell, "seed": s, "test_accuracy": v, "test_loss": (losses or values)[s],
           "train_loss": 0.1, "steps_to_target": 10 * (s + 1) if v > 0.905 else None}
          for s, v in enumerate(values)]


def test_paired_comparison_by_hand():
  rows = _rows("base", [0.90, 0.92, 0.91]) + _rows("cell", [0.93, 0.94, 0.92])
  (c,) = report.paired_comparison(rows, "base")
  mean, lo, hi, p = c["test_accuracy"]
  # Differences 0.03, 0.02, 0.01: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.4641016.
  # With 2 df, P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0370900; two-sided p = 0.0741799.
  # t_{0.975, 2} = 4.3026527: half-width 4.3026527 * 0.01 / sqrt 3 = 0.0248414.
  assert c["n"] == 3
  assert mean == pytest.approx(0.02, abs=1e-12)
  assert p == pytest.approx(0.0741799, abs=1e-6)
  assert (lo, hi) == (pytest.approx(-0.0048414, abs=1e-6), pytest.approx(0.0448414, abs=1e-6))


def test_paired_comparison_matches_seeds_and_survives_degenerate_input():
  rows = _rows("base", [0.9, 0.9]) + _rows("same", [0.9, 0.9])
  (c,) = report.paired_comparison(rows, "base")
  assert c["test_accuracy"][0] == 0 and math.isnan(c["test_accuracy"][3])  # sd 0: no p.
  with pytest.raises(ConfigError, match="'nope'.*base"):
    report.paired_comparison(rows, "nope")


def test_cell_summary_counts_seeds_reaching_the_target():
  (s,) = report.cell_summary(_rows("c", [0.90, 0.92, 0.91]))
  assert s["n"] == 3 and s["reached"] == 2 and s["steps_to_target"] == 25.0


def test_mixed_provenance_is_refused():
  rows = [dict(r, threads=t, xla_flags="", dtype="float32", backend="cpu",
               matmul_precision="highest")
          for r, t in zip(_rows("c", [0.9, 0.8]), (1, 2))]
  with pytest.raises(ConfigError, match="threads"):
    report.check_provenance(rows)
