"""Nuisance tuning's pure core against hand-made spaces and trials: parse errors, trial points,
the selection and tie rules, the boundary check, and the tuning figure."""

import math

import ml_collections
import numpy as np
import pytest

from cnnlab import configs
from cnnlab.base.errors import ConfigError
from cnnlab.inspection import plots
from cnnlab.study import tuning
from cnnlab.study.tuning import Axis

LR = {"key": "optimizer.learning_rate", "log": (0.01, 0.3)}


@pytest.mark.parametrize("nuisance, message", [
    ({}, "config.sweep.nuisance is empty"),
    ({"lr": {"key": "optimizer.learning_rate", "values": ()}}, "config.sweep.nuisance.lr.values"),
    ({"lr": {"key": "optimizer.learning_rate", "linear": (0.3, 0.1)}},
     r"config.sweep.nuisance.lr.linear=\(0.3, 0.1\) needs low < high"),
    ({"lr": {"key": "optimizer.learning_rate", "log": (0.0, 0.1)}},
     r"config.sweep.nuisance.lr.log=\(0.0, 0.1\) needs 0 < low"),
    ({"lr": {"key": "optimizer.learning_rate", "log": (0.01, math.inf)}},
     "config.sweep.nuisance.lr.log=.* must be two finite numbers"),
    ({"lr": {"key": "optimizer.learning_rate", "values": (0.1, math.nan)}},
     "config.sweep.nuisance.lr.values=.* holds nan"),
    ({"drop": {"key": "model.dropout", "values": ("none", "standard")}},
     "config.sweep.nuisance.drop.key='model.dropout' is also a scientific axis"),
    ({"lr": dict(LR, step=2)}, "config.sweep.nuisance.lr has unknown field 'step'"),
    ({"lr": {"log": (0.01, 0.3)}}, "config.sweep.nuisance.lr needs a `key`"),
    ({"lr": dict(LR, values=(0.1,))}, "config.sweep.nuisance.lr needs exactly one of"),
    ({"lr": LR, "lr2": LR}, "config.sweep.nuisance.lr2.key='optimizer.learning_rate' is also"),
])
def test_bad_spaces_are_one_line_errors_naming_the_field(nuisance, message):
  with pytest.raises(ConfigError, match=message) as error:
    tuning.parse_space(nuisance, cell_axes_keys=("model.dropout", "model.bn"))
  assert "\n" not in str(error.value)


def test_parse_space_sorts_axes_and_reads_config_dicts():
  config = configs.base_config()
  nuisance = ml_collections.ConfigDict({"wd": {"key": "optimizer.weight_decay",
                                               "values": (0.0, 1e-4)}, "lr": LR})
  axes = tuning.parse_space(nuisance)
  assert axes == [Axis("lr", "optimizer.learning_rate", "log", None, 0.01, 0.3),
                  Axis("wd", "optimizer.weight_decay", "values", (0.0, 1e-4), None, None)]
  tuning.check_keys(axes, config)
  with pytest.raises(ConfigError, match=r"config.sweep.nuisance.lr.key: config.optimizer.lr "
                     r"names no config field: config.optimizer has no 'lr'"):
    tuning.check_keys([Axis("lr", "optimizer.lr", "log", None, 0.01, 0.3)], config)
  with pytest.raises(ConfigError, match=r"config.sweep.nuisance.bs: batch_size=0.5 does not fit"):
    tuning.check_keys([Axis("bs", "batch_size", "values", (32, 0.5), None, None)], config)
  assert config.optimizer.learning_rate != 0.3 and config.batch_size != 0.5  # Left unchanged.


def test_grid_points_are_the_product_with_geomspace_on_log_axes():
  axes = tuning.parse_space({"lr": LR, "wd": {"key": "optimizer.weight_decay",
                                              "values": (0.0, 5e-4)}})
  pts = tuning.points(axes, "grid", 4, seed=0)
  assert len(pts) == 8
  lrs = [p["lr"] for p in pts[::2]]
  np.testing.assert_allclose(lrs, np.geomspace(0.01, 0.3, 4), rtol=1e-6)   # 6 digits kept.
  # 0.01 * 30 ** (1/3) = 0.031072325..., the second of four log-spaced points.
  assert lrs[1] == 0.0310723
  assert [p["wd"] for p in pts[:2]] == [0.0, 5e-4]
  linear = tuning.parse_space({"m": {"key": "optimizer.momentum", "linear": (0.5, 0.9)}})
  assert [p["m"] for p in tuning.points(linear, "grid", 5)] == pytest.approx(
      [0.5, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("method", ["sobol", "halton"])
def test_quasi_random_points_are_seeded_in_range_and_log_uniform(method):
  axes = tuning.parse_space({"lr": {"key": "optimizer.learning_rate", "log": (1e-4, 1.0)},
                             "wd": {"key": "optimizer.weight_decay", "values": (0.0, 1e-4, 1e-3)}})
  first = tuning.points(axes, method, 16, seed=3)
  assert first == tuning.points(axes, method, 16, seed=3)
  assert first != tuning.points(axes, method, 16, seed=4)
  logs = np.log10([p["lr"] for p in first])
  assert len(set(logs)) == 16 and logs.min() >= -4 and logs.max() <= 0
  # Log-uniform: each of the four decades holds 4 of 16 points (Sobol and Halton are balanced
  # within one in such strata); uniform in the value would put ~15 of 16 in the top decade.
  counts = np.histogram(logs, bins=4, range=(-4, 0))[0]
  assert counts.min() >= 3 and counts.max() <= 5, counts
  assert {p["wd"] for p in first} == {0.0, 1e-4, 1e-3}


def test_bad_budgets_and_methods_are_refused():
  axes = tuning.parse_space({"lr": LR})
  with pytest.raises(ConfigError, match="config.sweep.tuning_method='random' is not allowed"):
    tuning.points(axes, "random", 4)
  with pytest.raises(ConfigError, match="config.sweep.tuning_budget=0 must be an integer >= 1"):
    tuning.points(axes, "halton", 0)
  with pytest.raises(ConfigError, match="tuning_budget=1 must be an integer >= 2 .grid"):
    tuning.points(axes, "grid", 1)
  with pytest.raises(ConfigError, match="balanced only in powers of 2; use 4 or 8"):
    tuning.points(axes, "sobol", 6)
  assert len(tuning.points(axes, "halton", 6)) == 6


def _trials(point, accuracies, steps=None):
  """One trial per seed; an accuracy of None is a diverged seed."""
  steps = steps or [None] * len(accuracies)
  return [{"point": point, "seed": s, "status": "diverged" if a is None else "finished",
           "validation_accuracy": a, "steps_to_target": t}
          for s, (a, t) in enumerate(zip(accuracies, steps))]


def test_the_best_mean_wins_and_a_diverged_seed_counts_zero():
  # a: mean 0.9. b: (0.97 + 0.98 + 0) / 3 = 0.65, its best seeds do not hide its divergence.
  trials = _trials({"lr": 0.1}, [0.89, 0.90, 0.91]) + _trials({"lr": 0.3}, [0.97, 0.98, None])
  chosen = tuning.select(trials, target=0.95)
  assert chosen.point == {"lr": 0.1} and chosen.mean == pytest.approx(0.9)
  b = chosen.per_point[1]
  assert (b["mean"], b["n"], b["diverged"]) == (pytest.approx(0.65), 3, 1)
  assert b["std"] == pytest.approx(np.std([0.97, 0.98, 0.0], ddof=1))
  assert chosen.notes == ["the chosen point did not reach the target accuracy 0.95 with every "
                          "tuning seed"]


def test_ties_are_broken_by_divergence_then_steps_then_order():
  # Equal means 0.6: [0.9, 0.9, 0.0 diverged] against [0.6, 0.6, 0.6]: fewer diverged wins.
  steady = _trials({"lr": 0.3}, [0.6, 0.6, 0.6])
  chosen = tuning.select(_trials({"lr": 0.1}, [0.9, 0.9, None]) + steady)
  assert chosen.point == {"lr": 0.3} and "2 points tie" in chosen.notes[0]
  # Equal means, no divergence: the point reaching the target sooner (mean 150 < 200) wins.
  slow = _trials({"lr": 0.1}, [0.9, 0.92], steps=[200, 200])
  fast = _trials({"lr": 0.3}, [0.92, 0.9], steps=[100, 200])
  assert tuning.select(slow + fast).point == {"lr": 0.3}
  # A point with a seed that never reached the target ranks after one whose seeds all did.
  assert tuning.select(_trials({"lr": 0.3}, [0.91, 0.91], steps=[50, None]) + slow).point == {
      "lr": 0.1}
  # Everything equal: the first point in trial order.
  assert tuning.select(_trials({"lr": 0.3}, [0.9]) + _trials({"lr": 0.1}, [0.9])).point == {
      "lr": 0.3}


def test_all_diverged_chooses_nothing_and_says_why():
  chosen = tuning.select(_trials({"lr": 1.0}, [None, None]) + _trials({"lr": 3.0}, [None]))
  assert chosen.point is None and math.isnan(chosen.mean)
  assert chosen.reason == "every tuning trial diverged (3 trials over 2 points)"
  assert [row["diverged"] for row in chosen.per_point] == [2, 1]


def test_boundary_warnings_name_the_axis_and_direction():
  axes = tuning.parse_space({"lr": LR, "m": {"key": "optimizer.momentum",
                                             "values": (0.0, 0.5, 0.9)}})
  tried = tuning.points(axes, "grid", 4)
  (high,) = tuning.boundary_warnings(axes, {"lr": 0.3, "m": 0.5}, tried)
  assert high == ("optimizer.learning_rate: the best value 0.3 is the largest of 4 tried; extend "
                  "the range upward (log axis: e.g. to 0.9).")
  low, values = tuning.boundary_warnings(axes, {"lr": 0.01, "m": 0.0}, tried)
  assert low.startswith("optimizer.learning_rate: the best value 0.01 is the smallest of 4 "
                        "tried; extend the range downward (log axis: e.g. to 0.00333)")
  assert values.startswith("optimizer.momentum: the best value 0 is the smallest of 3 tried")
  interior = tried[4]   # lr = 0.0311 (second of 4), m = 0.5 (middle of 3).
  assert tuning.boundary_warnings(axes, interior, tried) == []
  two = tuning.parse_space({"wd": {"key": "optimizer.weight_decay", "values": (0.0, 1e-4)}})
  assert tuning.boundary_warnings(two, {"wd": 0.0}, tuning.points(two, "grid", 2)) == []


@pytest.mark.parametrize("space", [{"lr": LR},
                                   {"lr": LR, "opt": {"key": "optimizer.name",
                                                      "values": ("sgd", "adam")}}])
def test_tuning_figure_draws_trials_means_divergence_and_the_choice(space, monkeypatch, tmp_path):
  axes = tuning.parse_space(space)
  pts = tuning.points(axes, "grid", 3)
  trials = [t for i, p in enumerate(pts) for t in _trials(p, [0.5 + 0.1 * i, 0.6 + 0.1 * i])]
  trials[-1] = dict(trials[-1], status="diverged", validation_accuracy=None)
  chosen = tuning.select(trials)
  cells = {f"bn={bn}": {"axes": axes, "trials": trials, "per_point": chosen.per_point,
                        "chosen": chosen.point} for bn in ("none", "before_act")}
  drawn = []
  monkeypatch.setattr(plots, "save", lambda fig, path: drawn.append(fig))
  plots.tuning("tuning.png", cells)
  (fig,) = drawn
  grid = [ax for ax in fig.axes if ax.get_visible()]
  assert len(grid) == 2 * len(axes)
  lr = grid[0]
  assert lr.get_xscale() == "log" and lr.get_xlim()[0] < 0.01 and lr.get_xlim()[1] > 0.3
  crosses = [c for c in lr.collections if c.get_offsets().shape[0] and
             (c.get_offsets()[:, 1] == 0).all()]
  assert len(crosses) == 1   # The diverged trial, at 0.
  monkeypatch.undo()
  plots.tuning(str(tmp_path / "tuning.png"), cells)
  assert (tmp_path / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
