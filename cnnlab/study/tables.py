"""The numbers of a sweep report, from the rows of its runs (results.csv): statistics over seeds,
paired comparisons, provenance checks, and the CSV files themselves.

Pure post-processing of finished runs (no JAX). Everything in report.md is computed from the rows
that are also written to results.csv, so a reader can recompute every number; cells.csv and
comparisons.csv hold the computed statistics under self-explanatory column names:

  runs        a row's `status` is "finished" or "diverged" (rows without one are finished);
              statistics use finished runs only, and the report counts the diverged ones.
  per cell    n, mean +- sample std (ddof=1) and the 95% t-interval of test accuracy and test
              loss, final train loss, steps to reach the target test accuracy;
  paired      every cell minus the baseline over the seeds finished in both: mean difference,
              its 95% t-interval, the two-sided paired t-test p-value (scipy.stats.ttest_rel),
              Holm and Benjamini-Hochberg adjusted p-values over the family of comparisons on
              the same metric, and the verdict by `stats.correction_method`;
  power       the smallest difference detectable with 80% power at the observed std of the
              differences, and the seeds needed for `min_effect` (cnnlab/study/stats.py).
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
from scipy import stats as scipy_stats

from cnnlab.base import files
from cnnlab.base.errors import CnnlabError, ConfigError
from cnnlab.study import stats

mean_ci = stats.mean_ci

# Settings that change the low bits; every row of a report must share them.
PROVENANCE = ("threads", "xla_flags", "dtype", "backend", "matmul_precision")
STATUSES = ("finished", "diverged")
METRICS = ("test_accuracy", "test_loss")  # Each is its own family of paired comparisons.
# How each metric is printed: (name, scale, digits, unit).
DISPLAY = {"test_accuracy": ("test accuracy", 100.0, 2, "points"),
           "test_loss": ("test loss", 1.0, 4, "nats")}
# Columns read back from CSV as text even when they look like numbers.
TEXT_COLUMNS = ("cell", "cell_hash", "status", "diverged_reason", "params_sha256",
                "seeds_dropped_diverged", "power_note", "curve_split")


def with_status(rows: list[dict]) -> list[dict]:
  """Rows with `status`, `diverged_step`, `diverged_reason` filled in (older rows: finished);
  raises CnnlabError for an unknown status or a finished row without its numbers."""
  out = []
  for row in rows:
    row = {"status": "finished", "diverged_step": None, "diverged_reason": None, **row}
    where = f"the run of cell {row['cell']!r} seed {row['seed']}"
    if row["status"] not in STATUSES:
      raise CnnlabError(f"{where} has status={row['status']!r}; allowed: {', '.join(STATUSES)}.")
    missing = [m for m in (*METRICS, "train_loss") if row["status"] == "finished"
               and row[m] is None]
    if missing:
      raise CnnlabError(f"{where} is finished but has no {', '.join(missing)}; rerun it.")
    out.append(row)
  return out


def by_cell(rows):
  cells: dict[str, list[dict]] = {}
  for row in rows:
    cells.setdefault(row["cell"], []).append(row)
  return cells


def finished_rows(rows):
  return [r for r in rows if r.get("status", "finished") == "finished"]


def cell_summary(rows: list[dict]) -> list[dict]:
  """One dict per cell (in row order) with the statistics of its finished seeds, the number of
  runs and the diverged runs as (seed, step, reason)."""
  out = []
  for cell, group in by_cell(with_status(rows)).items():
    done = finished_rows(group)
    reached = [r["steps_to_target"] for r in done if r["steps_to_target"] not in (None, "")]
    summary = {"cell": cell, "runs": len(group), "n": len(done),
               "diverged": [(r["seed"], r["diverged_step"], r["diverged_reason"])
                            for r in group if r["status"] == "diverged"],
               "steps_to_target": float(np.mean(reached)) if reached else math.nan,
               "reached": len(reached)}
    for metric in (*METRICS, "train_loss"):
      summary[metric] = mean_ci([r[metric] for r in done])
    out.append(summary)
  return out


def _compare(cell, group, base, baseline, metric, min_effect) -> dict:
  """One paired comparison of `cell` minus `baseline` on `metric` (before adjustment)."""
  matched = [(r, base[r["seed"]]) for r in group if r["seed"] in base]
  both_finished = [a["status"] == b["status"] == "finished" for a, b in matched]
  pairs = [pair for pair, ok in zip(matched, both_finished) if ok]
  diff = [a[metric] - b[metric] for a, b in pairs]
  mean, std, lo, hi = mean_ci(diff)
  p = t = math.nan
  if len(pairs) >= 2 and not stats.identical(diff):
    test = scipy_stats.ttest_rel([a[metric] for a, _ in pairs], [b[metric] for _, b in pairs])
    p, t = float(test.pvalue), float(test.statistic)
  effect = min_effect if metric == "test_accuracy" else None
  return {"cell": cell, "baseline": baseline, "metric": metric, "pairs": len(pairs),
          "seeds_dropped_diverged": " ".join(
              str(a["seed"]) for (a, _), ok in zip(matched, both_finished) if not ok),
          "mean_diff": mean, "ci_low": lo, "ci_high": hi, "std_diff": std, "t_statistic": t,
          "p_value": p, "alpha": stats.ALPHA, "power": stats.POWER, "min_effect": effect,
          **stats.power_statement(diff, effect)}


def baseline_cells(cells: dict[str, list[dict]], baseline: str) -> dict[str, str]:
  """{cell: the cell it is paired with}. `baseline` names one cell, or is `axis=value`: each
  cell is paired with the cell that differs from it only in `axis`, set to `value` (e.g.
  `method=scratch`: every method against scratch at the same data size)."""
  if baseline in cells:
    return {cell: baseline for cell in cells}
  axis, _, _ = baseline.partition("=")
  out = {}
  for cell, group in cells.items():
    twin = cell.replace(f"{axis}={group[0].get(axis)}", baseline)
    if axis not in group[0] or twin not in cells:
      raise ConfigError(f"config.sweep.baseline={baseline!r} names no cell and no axis=value "
                        f"with a cell for {cell!r}; the cells are: {'; '.join(cells)}.")
    out[cell] = twin
  return out


def paired_comparison(rows: list[dict], baseline: str, *,
                      min_effect: float | None = None) -> list[dict]:
  """Every other cell minus its baseline (`baseline_cells`) on each metric, over the seeds
  finished in both: one flat dict per (cell, metric), in row order, with the family's adjusted
  p-values and verdict.

  The family of a metric is its comparisons that have a p-value; `significant` is None for the
  others. `min_effect` (accuracy units) gives test accuracy's `seeds_needed`.
  """
  cells = by_cell(with_status(rows))
  twins = baseline_cells(cells, baseline)
  out = [_compare(cell, group, {r["seed"]: r for r in cells[twins[cell]]}, twins[cell], metric,
                  min_effect)
         for cell, group in cells.items() if cell != twins[cell] for metric in METRICS]
  for metric in METRICS:
    family = [c for c in out if c["metric"] == metric]
    holm, bh = stats.adjust_p_values([c["p_value"] for c in family])
    size = sum(not math.isnan(c["p_value"]) for c in family)
    method = stats.correction_method(size)
    for c, p_holm, p_bh in zip(family, holm, bh):
      adjusted = {"holm": p_holm, "fdr_bh": p_bh}[method]
      c.update(family_size=size, correction=method, p_holm=float(p_holm), p_bh=float(p_bh),
               significant=None if math.isnan(adjusted) else bool(adjusted < stats.ALPHA))
  return out


def check_provenance(rows: list[dict]) -> None:
  """Raises ConfigError if rows were computed under different bit-determining settings."""
  differing = [k for k in PROVENANCE if len({str(r[k]) for r in rows}) > 1]
  if differing:
    raise ConfigError(
        "results computed under different settings cannot be compared bit for bit: "
        + "; ".join(f"{k} takes {sorted({str(r[k]) for r in rows})}" for k in differing)
        + ". Rerun the sweep with one setting (threads, XLA_FLAGS, dtype) for every cell.")


def write_results_csv(path: str, rows: list[dict]) -> None:
  """Rows as CSV: the union of their keys as columns, floats exact (repr), None as empty.
  Written atomically; a failed write raises WorkdirError and leaves the old file."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else repr(row[k])
                     if isinstance(row[k], float) else row[k] for k in columns})
  files.write_text_atomic(path, text.getvalue())  # The old file or the whole new one.


def read_results_csv(path: str) -> list[dict]:
  """results.csv back into rows, numbers parsed (empty -> None; TEXT_COLUMNS stay text)."""
  def parse(column: str, v: str):
    if v == "":
      return None
    for kind in () if column in TEXT_COLUMNS else (int, float):
      try:
        return kind(v)
      except ValueError:
        pass
    return v
  with open(path, newline="") as f:
    return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def cells_table(summary: list[dict]) -> list[dict]:
  """`cell_summary` flattened into cells.csv's rows (statistics over finished runs)."""
  out = []
  for s in summary:
    row = {"cell": s["cell"], "runs": s["runs"], "finished": s["n"],
           "diverged": len(s["diverged"])}
    for metric in (*METRICS, "train_loss"):
      row.update(zip((f"{metric}_{k}" for k in ("mean", "std", "ci_low", "ci_high")),
                     s[metric]))
    out.append({**row, "steps_to_target_mean": s["steps_to_target"],
                "reached_target": s["reached"]})
  return out
