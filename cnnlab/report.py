"""The sweep report: statistics over seeds, paired comparisons, tables and plots.

Pure post-processing of finished runs (no JAX). Everything in report.md is computed from the rows
that are also written to results.csv, so a reader can recompute every number:

  per cell    n, mean +- sample std (ddof=1) and the 95% t-interval of test accuracy and test
              loss, final train loss, steps to reach the target test accuracy;
  paired      every cell minus the baseline over matched seeds: mean difference, its 95%
              t-interval, and the two-sided paired t-test p-value (scipy.stats.ttest_rel).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
from scipy import stats

from cnnlab import plots
from cnnlab.errors import ConfigError

# Settings that change the low bits; every row of a report must share them.
PROVENANCE = ("threads", "xla_flags", "dtype", "backend", "matmul_precision")


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
  """(mean, sample std, CI low, CI high) with the t distribution (n-1 df); nan where n < 2."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean()) if len(x) else math.nan
  if len(x) < 2:
    return mean, math.nan, math.nan, math.nan
  std = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
  return mean, std, mean - half, mean + half


def _by_cell(rows):
  cells: dict[str, list[dict]] = {}
  for row in rows:
    cells.setdefault(row["cell"], []).append(row)
  return cells


def cell_summary(rows: list[dict]) -> list[dict]:
  """One dict per cell (in row order) with the statistics of its seeds."""
  out = []
  for cell, group in _by_cell(rows).items():
    reached = [r["steps_to_target"] for r in group if r["steps_to_target"] not in (None, "")]
    summary = {"cell": cell, "n": len(group),
               "steps_to_target": float(np.mean(reached)) if reached else math.nan,
               "reached": len(reached)}
    for metric in ("test_accuracy", "test_loss", "train_loss"):
      summary[metric] = mean_ci([r[metric] for r in group])
    out.append(summary)
  return out


def paired_comparison(rows: list[dict], baseline: str) -> list[dict]:
  """Every other cell minus `baseline`, over the seeds both have."""
  cells = _by_cell(rows)
  if baseline not in cells:
    raise ConfigError(f"config.sweep.baseline={baseline!r} names no cell; the cells are: "
                      f"{'; '.join(cells)}.")
  base = {r["seed"]: r for r in cells[baseline]}
  out = []
  for cell, group in cells.items():
    if cell == baseline:
      continue
    pairs = [(r, base[r["seed"]]) for r in group if r["seed"] in base]
    result = {"cell": cell, "n": len(pairs)}
    for metric in ("test_accuracy", "test_loss"):
      diff = [a[metric] - b[metric] for a, b in pairs]
      mean, _, lo, hi = mean_ci(diff)
      p = math.nan
      if len(pairs) >= 2 and np.std(diff) > 0:
        p = float(stats.ttest_rel([a[metric] for a, _ in pairs],
                                  [b[metric] for _, b in pairs]).pvalue)
      result[metric] = (mean, lo, hi, p)
    out.append(result)
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
  columns = list(rows[0])
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row[k] is None else repr(row[k]) if isinstance(row[k], float)
                       else row[k] for k in columns})


def read_results_csv(path: str) -> list[dict]:
  """results.csv back into rows, numbers parsed (empty -> None)."""
  def parse(v: str):
    if v == "":
      return None
    for kind in (int, float):
      try:
        return kind(v)
      except ValueError:
        pass
    return v
  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _f(x: float, digits: int = 4, scale: float = 1.0) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (
      f"{x * scale:.{digits}f}")


def _ci(stat, digits=2, scale=100.0) -> str:
  mean, std, lo, hi = stat
  return (f"{_f(mean, digits, scale)} ± {_f(std, digits, scale)} "
          f"[{_f(lo, digits, scale)}, {_f(hi, digits, scale)}]")


def _p(p: float) -> str:
  return "n/a" if math.isnan(p) else f"{p:.4f}"


def _cost_section(rows, meta) -> list[str]:
  """Parameters and compute per cell (from `cnnlab.summary`), when the rows carry them."""
  if not all(r.get("train_step_flops") not in (None, "") for r in rows):
    return []
  batch = meta["config"].get("batch_size", "?")
  lines = ["", "## Cost per cell", "",
           "Trainable parameters, forward multiply-adds per example (convs and dense layers) and "
           f"XLA's FLOP count of one training step at batch {batch} (forward, backward, update); "
           "`python launch.py --mode=summary` shows them layer by layer.", "",
           "| cell | parameters | multiply-adds / example | training-step GFLOPs |",
           "|---|---|---|---|"]
  for cell, group in _by_cell(rows).items():
    r = group[0]
    lines.append(f"| `{cell}` | {int(r['num_params']):,} | {int(r['forward_macs']):,} | "
                 f"{float(r['train_step_flops']) / 1e9:.3f} |")
  return lines


def render_markdown(rows, diagnostics, *, baseline, target_accuracy, meta) -> str:
  summary = cell_summary(rows)
  paired = paired_comparison(rows, baseline)
  seeds = sorted({r["seed"] for r in rows})
  lines = [f"# Ablation report: {meta['config'].get('name', '')}", "",
           f"{len(summary)} cells × {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
           f"baseline `{baseline}`. Every number below is recomputable from `results.csv`.", "",
           "## Per cell", "",
           "Mean ± sample std [95% t-interval] over seeds. Accuracy in %, loss in nats.", "",
           f"| cell | n | test accuracy (%) | test loss | final train loss | steps to "
           f"{100 * target_accuracy:.0f}% test acc. (mean, reached) |",
           "|---|---|---|---|---|---|"]
  for s in summary:
    lines.append(f"| `{s['cell']}` | {s['n']} | {_ci(s['test_accuracy'])} | "
                 f"{_ci(s['test_loss'], 4, 1.0)} | {_f(s['train_loss'][0])} ± "
                 f"{_f(s['train_loss'][1])} | {_f(s['steps_to_target'], 1)} "
                 f"({s['reached']}/{s['n']}) |")
  lines += _cost_section(rows, meta)
  lines += ["", f"## Paired against `{baseline}`", "",
            "Cell minus baseline over matched seeds: mean difference [95% t-interval], "
            "two-sided paired t-test p (n/a: fewer than 2 pairs or identical differences).", "",
            "| cell | pairs | Δ test accuracy (points) | p | Δ test loss | p |",
            "|---|---|---|---|---|---|"]
  for c in paired:
    acc, loss = c["test_accuracy"], c["test_loss"]
    lines.append(f"| `{c['cell']}` | {c['n']} | {_f(acc[0], 2, 100)} "
                 f"[{_f(acc[1], 2, 100)}, {_f(acc[2], 2, 100)}] | {_p(acc[3])} | "
                 f"{_f(loss[0])} [{_f(loss[1])}, {_f(loss[2])}] | {_p(loss[3])} |")
  lines += ["", "## Variance shift (Li et al. 2019)", "",
            "Per BatchNorm layer, the mean over channels of its input's variance in training mode "
            "(dropout on) and in evaluation mode (dropout off), their ratio, and the running "
            "variance BN divides by at evaluation. A ratio far from 1 means the statistics BN "
            "learned in training do not describe its inputs at test time.", "",
            "| cell | BN layer | var train | var eval | ratio | running var |",
            "|---|---|---|---|---|---|"]
  for cell in [s["cell"] for s in summary]:
    for d in diagnostics.get(cell, []):
      lines.append(f"| `{cell}` | {d['layer']} | {_f(d['var_train'])} | {_f(d['var_eval'])} | "
                   f"{_f(d['ratio'], 3)} | {_f(d['running_var'])} |")
  lines += ["", "## Figures", "", "![test accuracy](accuracy.png)", "",
            "![learning curves](curves.png)", "", "![variance shift](variance_shift.png)", "",
            "## Reproduce", "", "```", meta["command"], "```", "",
            f"git commit `{meta['git_commit']}`; environment: "
            + ", ".join(f"{k}={meta['environment'][k]!r}" for k in sorted(meta["environment"])),
            "", "Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["packages"].items())),
            "", "```json", json.dumps(meta["config"], indent=2, sort_keys=True), "```", ""]
  return "\n".join(lines)


def write_report(workdir: str, rows: list[dict], curves: dict[str, list[list[dict]]],
                 diagnostics: dict[str, list[dict]], *, baseline: str, target_accuracy: float,
                 meta: dict) -> str:
  """Writes results.csv, report.md and the PNG plots into `workdir`; returns report.md's path."""
  check_provenance(rows)
  text = render_markdown(rows, diagnostics, baseline=baseline, target_accuracy=target_accuracy,
                         meta=meta)
  write_results_csv(os.path.join(workdir, "results.csv"), rows)
  plots.accuracy(os.path.join(workdir, "accuracy.png"), cell_summary(rows), rows, baseline)
  plots.curves(os.path.join(workdir, "curves.png"), curves)
  plots.variance_shift(os.path.join(workdir, "variance_shift.png"), diagnostics)
  path = os.path.join(workdir, "report.md")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)  # Last: a report.md on disk is always a complete one.
  return path
