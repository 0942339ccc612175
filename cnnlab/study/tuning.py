"""Nuisance-hyperparameter tuning, the pure part: search spaces, trial points, the selection rule
and the search-space boundary check (Godbole et al., Deep Learning Tuning Playbook, 2023).

The settings under study (a sweep's `axes`) are *scientific*; `config.sweep.nuisance` names the
*nuisance* ones (learning rate, weight decay, ...), searched separately for every cell on the
validation split before cells are compared. Each nuisance axis is
  {"key": dotted config key, and exactly one of
   "values": (v1, v2, ...)   a list to search,
   "log": (low, high)        a log-uniform range, 0 < low < high,
   "linear": (low, high)     a uniform range, low < high}.
No JAX here: the sweep trains the points, this module says which points and which one won.
This module sits low in cnnlab.study (below settings and report) so that both can use it; it
checks keys against a config with `validation.check_key` rather than the grid's setter.
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from scipy.stats import qmc

from cnnlab.base import environment
from cnnlab.base.errors import CnnlabError, ConfigError
from cnnlab.study import stats
from cnnlab.study.tables import STATUSES
from cnnlab.training.validation import check_key

KINDS = ("values", "log", "linear")
METHODS = ("grid", "sobol", "halton")
# Trial means closer than this are equal: the tie rules of `select` decide between them.
TIE = 1e-12
# The boundary check's suggestion for a log axis: extend by half a decade (x sqrt(10) ~ 3).
LOG_STEP = 3.0


class Axis(NamedTuple):
  """One nuisance axis: `values` for kind "values", else the range [low, high]."""
  name: str
  key: str
  kind: str
  values: tuple | None
  low: float | None
  high: float | None


class Selection(NamedTuple):
  """The chosen point (None when every trial diverged; `reason` says why), its mean validation
  accuracy, one row per point (point, mean, std, n, diverged, reached_target, steps_to_target)
  in trial order, and notes for the report."""
  point: dict | None
  mean: float
  per_point: list[dict]
  reason: str
  notes: list[str]


def _finite(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _axis(name: str, spec, scientific_keys) -> Axis:
  where = f"config.sweep.nuisance.{name}"
  spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec
  if not isinstance(spec, dict):
    raise ConfigError(f"{where}={spec!r} must be a dict: key and one of {', '.join(KINDS)}.")
  unknown = sorted(set(spec) - {"key", *KINDS})
  if unknown:
    raise ConfigError(f"{where} has unknown field {unknown[0]!r}; allowed: key, "
                      f"{', '.join(KINDS)}.")
  key = spec.get("key")
  if not isinstance(key, str) or not key:
    raise ConfigError(f"{where} needs a `key` (a dotted config key, e.g. "
                      f"'optimizer.learning_rate').")
  if key in scientific_keys:
    raise ConfigError(f"{where}.key={key!r} is also a scientific axis (config.sweep.axes); a "
                      f"setting is either studied or tuned, not both.")
  if key == "seed" or key in environment.PROCESS_WIDE_FIELDS:
    raise ConfigError(f"{where}.key={key!r} cannot be tuned (the seed, or a field set for a "
                      f"whole process).")
  kinds = [k for k in KINDS if k in spec]
  if len(kinds) != 1:
    raise ConfigError(f"{where} needs exactly one of {', '.join(KINDS)}; it has "
                      f"{', '.join(kinds) or 'none'}.")
  (kind,) = kinds
  given = spec[kind]
  if kind == "values":
    if not isinstance(given, (tuple, list)) or not given:
      raise ConfigError(f"{where}.values={given!r} must be a non-empty tuple, e.g. (0.01, 0.1).")
    bad = [v for v in given if isinstance(v, float) and not math.isfinite(v)]
    if bad:
      raise ConfigError(f"{where}.values={tuple(given)!r} holds {bad[0]!r}; give finite numbers.")
    if len({repr(v) for v in given}) != len(given):
      raise ConfigError(f"{where}.values={tuple(given)!r} repeats a value; give each once.")
    return Axis(name, key, kind, tuple(given), None, None)
  if (not isinstance(given, (tuple, list)) or len(given) != 2
      or not all(_finite(v) for v in given)):
    raise ConfigError(f"{where}.{kind}={given!r} must be two finite numbers (low, high).")
  low, high = (float(v) for v in given)
  if low >= high:
    raise ConfigError(f"{where}.{kind}={tuple(given)!r} needs low < high.")
  if kind == "log" and low <= 0:
    raise ConfigError(f"{where}.log={tuple(given)!r} needs 0 < low: a log range has no "
                      f"non-positive values (use linear).")
  return Axis(name, key, kind, None, low, high)


def parse_space(nuisance, cell_axes_keys=()) -> list[Axis]:
  """The nuisance axes of `config.sweep.nuisance` sorted by name (the order of a point's
  coordinates); ConfigError, one line naming the axis, for a bad space. `cell_axes_keys`: the
  config keys of the scientific axes, which no nuisance axis may share."""
  nuisance = (nuisance.to_dict() if isinstance(nuisance, ml_collections.ConfigDict)
              else nuisance)
  if not isinstance(nuisance, dict) or not nuisance:
    raise ConfigError("config.sweep.nuisance is empty; tuning needs at least one axis, e.g. "
                      "{'lr': {'key': 'optimizer.learning_rate', 'log': (0.01, 0.3)}}.")
  keys = set(cell_axes_keys)
  axes = [_axis(name, nuisance[name], keys) for name in sorted(nuisance)]
  seen: dict[str, str] = {}
  for axis in axes:
    if axis.key in seen:
      raise ConfigError(f"config.sweep.nuisance.{axis.name}.key={axis.key!r} is also the key of "
                        f"config.sweep.nuisance.{seen[axis.key]}; tune each key once.")
    seen[axis.key] = axis.name
  return axes


def check_keys(axes: list[Axis], config: ml_collections.ConfigDict) -> None:
  """ConfigError unless every axis's key names a field of `config` that takes the values the
  axis can give (its values, or both ends of its range; a range gives floats). The value's
  own range (e.g. a learning rate > 0) is checked by the caller's validation of each trial."""
  for axis in axes:
    where = f"config.sweep.nuisance.{axis.name}"
    try:
      check_key(config, axis.key)
    except ConfigError as e:
      raise ConfigError(f"{where}.key: {e}") from None
    *parents, leaf = axis.key.split(".")
    node = copy.deepcopy(config)
    for part in parents:
      node = node[part]
    for value in axis.values if axis.kind == "values" else (axis.low, axis.high):
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {axis.key}={value!r} does not fit the field ({e}).") from None


def _from_unit(axis: Axis, u: np.ndarray) -> list:
  """Values of `axis` at positions u in [0, 1): log axes uniform in log space, values axes by
  index floor(u * len)."""
  if axis.kind == "values":
    index = np.minimum((u * len(axis.values)).astype(int), len(axis.values) - 1)
    return [axis.values[i] for i in index]
  if axis.kind == "log":
    lo, hi = math.log(axis.low), math.log(axis.high)
    return [_rounded(np.clip(math.exp(lo + x * (hi - lo)), axis.low, axis.high)) for x in u]
  return [_rounded(axis.low + x * (axis.high - axis.low)) for x in u]


def _rounded(value) -> float:
  """A point's value to 6 significant digits: 0.05, not geomspace's 0.049999999999999996, in
  configs, cell names and reports."""
  return float(f"{float(value):.6g}")


def points(axes: list[Axis], method: str, budget: int, seed: int = 0) -> list[dict[str, Any]]:
  """The trial points {axis name: value}, deterministic in (axes, method, budget, seed).

  grid: the product of the axes (in `axes` order, the last varying fastest); a values axis
  gives its values, a range axis `budget` points from low to high inclusive (np.geomspace on a
  log axis, np.linspace on a linear one), so `budget` is points per range axis here.
  sobol | halton: `budget` points of the scrambled quasi-random sequence seeded with `seed`
  (scipy.stats.qmc), the playbook's recommendation: they cover the space more evenly than random
  points and, unlike a grid, try a new value of every axis in every trial. Sobol points are
  balanced only in powers of 2, so other budgets are refused (halton takes any).
  """
  if method not in METHODS:
    raise ConfigError(f"config.sweep.tuning_method={method!r} is not allowed; choose one of: "
                      f"{', '.join(METHODS)}.")
  ranges = any(a.kind != "values" for a in axes)
  least = 2 if method == "grid" and ranges else 1
  if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < least:
    raise ConfigError(f"config.sweep.tuning_budget={budget!r} must be an integer >= {least}"
                      + (" (grid: points per range axis, both ends included)." if least == 2
                         else "."))
  if method == "sobol" and budget & (budget - 1):
    power = 1 << (int(budget).bit_length() - 1)
    raise ConfigError(f"config.sweep.tuning_budget={budget} with tuning_method='sobol': Sobol "
                      f"points are balanced only in powers of 2; use {power} or {2 * power}, or "
                      f"tuning_method='halton'.")
  if method == "grid":
    columns = [axis.values if axis.kind == "values" else tuple(_rounded(v) for v in (
        np.geomspace if axis.kind == "log" else np.linspace)(axis.low, axis.high, budget))
        for axis in axes]
    return [dict(zip((a.name for a in axes), combo)) for combo in itertools.product(*columns)]
  engine = (qmc.Sobol if method == "sobol" else qmc.Halton)(len(axes), scramble=True, rng=seed)
  unit = engine.random(budget)
  columns = [_from_unit(axis, unit[:, j]) for j, axis in enumerate(axes)]
  return [dict(zip((a.name for a in axes), row)) for row in zip(*columns)]


def _point_key(point: dict) -> str:
  return repr(sorted(point.items()))


def _per_point(trials: list[dict]) -> list[dict]:
  """One row per distinct point, in order of first appearance; a diverged seed counts 0.0."""
  rows: dict[str, dict] = {}
  for i, trial in enumerate(trials):
    status, accuracy = trial.get("status"), trial.get("validation_accuracy")
    if status not in STATUSES:
      raise CnnlabError(f"tuning trial {i} has status={status!r}; allowed: "
                        f"{', '.join(STATUSES)}.")
    if status == "finished" and not _finite(accuracy):
      raise CnnlabError(f"tuning trial {i} finished but has no finite validation_accuracy "
                        f"({accuracy!r}).")
    row = rows.setdefault(_point_key(trial["point"]), dict(
        point=dict(trial["point"]), accuracies=[], steps=[], diverged=0))
    row["accuracies"].append(float(accuracy) if status == "finished" else 0.0)
    row["diverged"] += status == "diverged"
    row["steps"].append(trial.get("steps_to_target") if status == "finished" else None)
  table = []
  for row in rows.values():
    mean, std, _, _ = stats.mean_ci(row["accuracies"])
    reached = all(s is not None for s in row["steps"])
    table.append(dict(point=row["point"], mean=mean, std=std, n=len(row["accuracies"]),
                      diverged=row["diverged"], reached_target=reached,
                      steps_to_target=float(np.mean(row["steps"])) if reached else None))
  return table


def select(trials: list[dict], target: float | None = None) -> Selection:
  """The nuisance point of one cell to train its final runs at.

  Rule: per point, the mean validation accuracy over its tuning seeds, a diverged seed counting
  as 0.0 (instability is penalised, not hidden); the best mean wins. Means within 1e-12 tie and
  are decided by (1) fewer diverged seeds, (2) a lower mean steps_to_target among points whose
  every seed reached the target (those rank before points that did not), (3) the first point in
  trial order. Every trial diverged: no point, and `reason` says so. A chosen point whose seeds
  did not all reach the target (accuracy `target`, named in the note) is chosen but noted.
  trials: dicts {point, seed, status: finished | diverged, validation_accuracy, steps_to_target}.
  """
  table = _per_point(trials)
  if not table:
    return Selection(None, math.nan, [], "no tuning trials", ["no tuning trials"])
  if all(row["diverged"] == row["n"] for row in table):
    reason = f"every tuning trial diverged ({len(trials)} trials over {len(table)} points)"
    return Selection(None, math.nan, table, reason, [reason])
  best = max(row["mean"] for row in table)
  tied = [row for row in table if row["mean"] >= best - TIE]
  chosen = min(tied, key=lambda row: (
      row["diverged"], row["steps_to_target"] if row["reached_target"] else math.inf,
      table.index(row)))
  notes = []
  if len(tied) > 1:
    notes.append(f"{len(tied)} points tie at mean validation accuracy {best:.4f}; chosen by "
                 f"fewer diverged seeds, then fewer steps to the target, then trial order")
  if chosen["diverged"]:
    notes.append(f"the chosen point diverged in {chosen['diverged']} of {chosen['n']} tuning "
                 f"seeds (counted as accuracy 0)")
  if not chosen["reached_target"]:
    what = f"the target accuracy {target:g}" if target is not None else "the target accuracy"
    notes.append(f"the chosen point did not reach {what} with every tuning seed")
  return Selection(chosen["point"], chosen["mean"], table, "", notes)


def _ordered_numbers(axis: Axis) -> bool:
  """Whether the boundary check applies: a range, or >= 3 numeric values."""
  return axis.kind != "values" or (len(axis.values) >= 3 and all(_finite(v)
                                                                  for v in axis.values))


def boundary_warnings(axes: list[Axis], chosen_point: dict | None,
                      trial_points: list[dict]) -> list[str]:
  """The playbook's search-space boundary check: one sentence per axis whose chosen value is
  the smallest or largest value tried on it (the best may lie beyond), naming the direction to
  extend. Axes with fewer than 2 distinct values tried, or unordered values, are not checked."""
  if chosen_point is None:
    return []
  warnings = []
  for axis in filter(_ordered_numbers, axes):
    tried = sorted({p[axis.name] for p in trial_points if axis.name in p})
    value = chosen_point.get(axis.name)
    if len(tried) < 2 or value not in (tried[0], tried[-1]):
      continue
    up = value == tried[-1]
    if axis.kind == "log":
      hint = f"log axis: e.g. to {value * LOG_STEP if up else value / LOG_STEP:.3g}"
    elif axis.kind == "linear":
      width = (tried[-1] - tried[0]) / 2
      hint = f"linear axis: e.g. to {value + width if up else value - width:.3g}"
    else:
      hint = f"values axis: add a value {'above' if up else 'below'} {value:g}"
    warnings.append(f"{axis.key}: the best value {value:.3g} is the "
                    f"{'largest' if up else 'smallest'} of {len(tried)} tried; extend the range "
                    f"{'upward' if up else 'downward'} ({hint}).")
  return warnings


def summarize(axes: list[Axis], trial_points: list[dict], trials: dict[str, list[dict]],
              settings) -> dict:
  """What a tuned sweep records in tuning.json and reports: the search (axes, method, budget,
  points, tuning seeds), its cost (trials, runs, wall time) and per cell the selection (chosen
  point or None with the reason, its mean validation accuracy, every point's row, notes) and the
  boundary warnings."""
  cells = {}
  for cell, cell_trials in trials.items():
    chosen = select(cell_trials, settings.target_accuracy)
    cells[cell] = {"chosen": chosen.point, "mean": chosen.mean, "per_point": chosen.per_point,
                   "reason": chosen.reason, "notes": list(chosen.notes),
                   "warnings": boundary_warnings(axes, chosen.point, trial_points)}
  runs = sum(len(t) for t in trials.values())
  return {"method": settings.tuning_method, "budget": settings.tuning_budget,
          "tuning_seeds": list(settings.tuning_seeds), "axes": [a._asdict() for a in axes],
          "points": trial_points,
          "cost": {"points_per_cell": len(trial_points), "runs": runs,
                   "wall_time_s": sum(t["wall_time_s"] for ts in trials.values() for t in ts)},
          "cells": cells}
