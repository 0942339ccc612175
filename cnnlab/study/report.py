"""The sweep report: statistics over seeds, paired comparisons, tables and plots.

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

import contextlib
import csv
import io
import json
import math
import os

import numpy as np
from scipy import stats as scipy_stats

from cnnlab.base.errors import CnnlabError, ConfigError
from cnnlab.inspection import plots
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


def _by_cell(rows):
  cells: dict[str, list[dict]] = {}
  for row in rows:
    cells.setdefault(row["cell"], []).append(row)
  return cells


def _finished(rows):
  return [r for r in rows if r.get("status", "finished") == "finished"]


def cell_summary(rows: list[dict]) -> list[dict]:
  """One dict per cell (in row order) with the statistics of its finished seeds, the number of
  runs and the diverged runs as (seed, step, reason)."""
  out = []
  for cell, group in _by_cell(with_status(rows)).items():
    done = _finished(group)
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
  cells = _by_cell(with_status(rows))
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
  from cnnlab.training import rundir  # Heavy (orbax): only when files are written.
  columns = list(dict.fromkeys(k for row in rows for k in row))
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else repr(row[k])
                     if isinstance(row[k], float) else row[k] for k in columns})
  rundir.write_text_atomic(path, text.getvalue())  # The old file or the whole new one.


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
  """Parameters and compute per cell (from `cnnlab.inspection.summary`), when the rows carry
  them."""
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


def _cell_section(summary, target_accuracy, curve_split: str = "test") -> list[str]:
  """The per-cell table, and the diverged runs with their step and reason."""
  lines = ["## Per cell", "",
           "Mean ± sample std [95% t-interval] over seeds. Accuracy in %, loss in nats. "
           "Runs whose loss became non-finite are counted under *diverged* and left out: n and "
           "every statistic are over the runs that finished.", "",
           f"| cell | n | diverged | test accuracy (%) | test loss | final train loss | steps to "
           f"{100 * target_accuracy:.0f}% {curve_split} acc. (mean, reached) |",
           "|---|---|---|---|---|---|---|"]
  for s in summary:
    head = f"| `{s['cell']}` | {s['n']} | {len(s['diverged'])} of {s['runs']} |"
    if not s["n"]:
      lines.append(head + " all seeds diverged | — | — | — |")
      continue
    lines.append(f"{head} {_ci(s['test_accuracy'])} | {_ci(s['test_loss'], 4, 1.0)} | "
                 f"{_f(s['train_loss'][0])} ± {_f(s['train_loss'][1])} | "
                 f"{_f(s['steps_to_target'], 1)} ({s['reached']}/{s['n']}) |")
  diverged = [(s["cell"], *d) for s in summary for d in s["diverged"]]
  if diverged:
    lines += ["", "Diverged runs:", ""] + [f"- `{cell}` seed {seed}: step {step}, {reason}"
                                          for cell, seed, step, reason in diverged]
  return lines


def _verdict(family: list[dict], metric: str, baseline: str) -> str:
  """Which differences on `metric` are significant after the family's correction, in words."""
  name, scale, digits, unit = DISPLAY[metric]
  tested = [c for c in family if c["significant"] is not None]
  if not tested:
    return f"**{name.capitalize()}**: no comparison has a p-value, so none is tested."
  method = tested[0]["correction"]
  key = {"holm": "p_holm", "fdr_bh": "p_bh"}[method]
  text = (f"**{name.capitalize()}**: the family is the {len(tested)} comparisons against "
          f"`{baseline}` on {name} that have a p-value; judged by "
          f"{stats.CORRECTION_NAMES[method]}-adjusted p < {stats.ALPHA}.")
  won = [c for c in tested if c["significant"]]
  lost = [c for c in tested if not c["significant"] and c["p_value"] < stats.ALPHA]
  if won:
    text += " Significant after correction: " + "; ".join(
        f"`{c['cell']}` ({c['mean_diff'] * scale:+.{digits}f} {unit}, adjusted p "
        f"{c[key]:.4f})" for c in won) + "."
  else:
    text += " No cell differs significantly from the baseline after correction."
  if lost:
    text += " Raw p < {} but not significant after correction: {}.".format(stats.ALPHA, "; ".join(
        f"`{c['cell']}` (p {c['p_value']:.4f}, adjusted {c[key]:.4f})" for c in lost))
  return text


def _paired_section(paired, baseline) -> list[str]:
  """The paired table with raw and adjusted p-values, the correction rule and the verdicts."""
  lines = ["", f"## Paired against `{baseline}`", "",
           "Cell minus baseline over the seeds that finished in both: mean difference [95% "
           "t-interval], two-sided paired t-test p (n/a: fewer than 2 pairs or differences "
           "identical up to rounding), and p adjusted by Holm and by Benjamini-Hochberg (BH) "
           "over the family of that metric: the comparisons against the baseline on the same "
           "metric that have a p-value. Rule: a family of at most "
           f"{stats.HOLM_MAX_FAMILY} comparisons is judged by Holm (chance of any false "
           "claim), a larger one by BH (expected share of false claims); raw p-values are "
           "not used to call a difference significant.", "",
           "| cell | pairs | Δ test accuracy (points) | p | p Holm | p BH | Δ test loss | p | "
           "p Holm | p BH |", "|---|---|---|---|---|---|---|---|---|---|"]
  by_cell = _by_cell(paired)
  for cell, (acc, loss) in by_cell.items():
    lines.append(f"| `{cell}` | {acc['pairs']} | " + " | ".join(
        f"{_f(c['mean_diff'], d, s)} [{_f(c['ci_low'], d, s)}, {_f(c['ci_high'], d, s)}] | "
        f"{_p(c['p_value'])} | {_p(c['p_holm'])} | {_p(c['p_bh'])}"
        for c, (_, s, d, _) in ((acc, DISPLAY[acc["metric"]]), (loss, DISPLAY[loss["metric"]])))
        + " |")
  dropped = [f"`{cell}`: seeds {acc['seeds_dropped_diverged']}"
             for cell, (acc, _) in by_cell.items() if acc["seeds_dropped_diverged"]]
  if dropped:
    lines += ["", "Seeds left out because they diverged in the cell or the baseline: "
              + "; ".join(dropped) + "."]
  for metric in METRICS:
    lines += ["", _verdict([c for c in paired if c["metric"] == metric], metric, baseline)]
  return lines


def _power_section(paired, min_effect) -> list[str]:
  """Per comparison on test accuracy: the smallest detectable difference and seeds needed."""
  effect = ("no effect size was given (config.sweep.min_effect), so no seeds are estimated"
            if min_effect is None else f"the seeds (pairs) a paired t-test needs to detect "
            f"a true difference of {100 * min_effect:.2f} points (config.sweep.min_effect) "
            "at that std")
  lines = ["", "## Were there enough seeds?", "",
           f"For each comparison on test accuracy: the smallest true mean difference the "
           f"paired t-test (α = {stats.ALPHA} two-sided) detects with {stats.POWER:.0%} power, "
           "at the observed std of the paired differences and n = the pairs (noncentral t); "
           f"and {effect}. A difference below the detectable one may exist unseen.", "",
           "| cell | std of Δ (points) | pairs | smallest detectable Δ (points) | "
           "seeds needed |", "|---|---|---|---|---|"]
  for c in (c for c in paired if c["metric"] == "test_accuracy"):
    detectable = (f"n/a: {c['power_note']}" if c["power_note"]
                  else _f(c["min_detectable_diff"], 2, 100))
    lines.append(f"| `{c['cell']}` | {_f(c['std_diff'], 2, 100)} | {c['pairs']} | "
                 f"{detectable} | {c['seeds_needed'] or 'n/a'} |")
  return lines


def check_min_effect(min_effect: float | None) -> None:
  """Raises ConfigError unless `min_effect` is None or an accuracy difference in (0, 1]."""
  number = isinstance(min_effect, (int, float)) and not isinstance(min_effect, bool)
  if min_effect is not None and not (number and 0 < min_effect <= 1):
    raise ConfigError(f"config.sweep.min_effect={min_effect!r} must be an accuracy difference "
                      "in (0, 1] (0.01 = 1 point), or None for no seeds-needed estimate.")


def render_markdown(rows, diagnostics, *, baseline, target_accuracy, meta,
                    min_effect: float | None = None, plot_axis: str = "") -> str:
  rows = with_status(rows)
  summary = cell_summary(rows)
  paired = paired_comparison(rows, baseline, min_effect=min_effect)
  seeds = sorted({r["seed"] for r in rows})
  diverged = sum(len(s["diverged"]) for s in summary)
  lines = [f"# Ablation report: {meta['config'].get('name', '')}", "",
           f"{len(summary)} cells × {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
           f"baseline `{baseline}`; {diverged} of {len(rows)} runs diverged. Every number "
           "below is recomputable from `results.csv` (statistics: `cells.csv`, "
           "`comparisons.csv`).", ""]
  lines += _cell_section(summary, target_accuracy, (rows[0].get("curve_split") if rows else None)
                        or "test")
  lines += _cost_section(rows, meta)
  lines += _paired_section(paired, baseline)
  lines += _power_section(paired, min_effect)
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
  lines += ["", "## Figures", "", "![test accuracy](accuracy.png)", ""]
  cut = [f"`{s['cell']}`" for s in summary if s["n"] and plots.clipped(s["test_accuracy"])]
  if cut:  # An accuracy stays in [0, 100]%; its t-interval need not.
    lines += [f"The 95% t-intervals of {', '.join(cut)} run past 0-100%: the figures draw them "
              "clipped there (arrowheads); the table gives them whole.", ""]
  if plot_axis:
    lines += [f"![test accuracy by {plot_axis}](accuracy_by_{plot_axis}.png)", ""]
  lines += ["![learning curves](curves.png)", "", "![variance shift](variance_shift.png)", ""]
  lines += [f"![first-layer filters of `{cell}`, seed {seed}]({path})\n"
            for cell, (seed, path) in meta.get("filter_grids", {}).items()]
  lines += ["## Reproduce", "", "```", meta["command"], "```", "",
            f"git commit `{meta['git_commit']}`; environment: "
            + ", ".join(f"{k}={meta['environment'][k]!r}" for k in sorted(meta["environment"])),
            "", "Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["packages"].items())),
            "", "```json", json.dumps(meta["config"], indent=2, sort_keys=True), "```", ""]
  return "\n".join(lines)


def write_report(workdir: str, rows: list[dict], curves: dict[str, list[list[dict]]],
                 diagnostics: dict[str, list[dict]], *, baseline: str, target_accuracy: float,
                 meta: dict, min_effect: float | None = None, plot_axis: str = "") -> str:
  """Writes results.csv, cells.csv, comparisons.csv, report.md and the PNG plots into
  `workdir`; returns report.md's path.

  `curves[cell][i]` holds the metrics of the i-th row of that cell; diverged runs are left out
  of the plots. `min_effect` is the accuracy difference (0.01 = 1 point) whose seeds needed the
  report states (None: no such statement). `plot_axis` (an axis, "" = none) adds a plot of test
  accuracy against its values, one line per value of the other axes.

  Each file is written atomically; report.md is removed first and written last, so one on disk
  always describes the files beside it. A failed write (a full disk) raises WorkdirError.
  """
  from cnnlab.training import rundir  # Heavy (orbax): only when files are written.
  check_min_effect(min_effect)
  rows = with_status(rows)
  check_provenance(rows)
  path = os.path.join(workdir, "report.md")
  with contextlib.suppress(FileNotFoundError):  # An interrupted rewrite leaves no stale report.
    os.remove(path)
  text = render_markdown(rows, diagnostics, baseline=baseline, target_accuracy=target_accuracy,
                         meta=meta, min_effect=min_effect, plot_axis=plot_axis)
  summary = cell_summary(rows)
  write_results_csv(os.path.join(workdir, "results.csv"), rows)
  write_results_csv(os.path.join(workdir, "cells.csv"), cells_table(summary))
  write_results_csv(os.path.join(workdir, "comparisons.csv"),
                    paired_comparison(rows, baseline, min_effect=min_effect))
  finished_curves = {cell: [run for run, row in zip(curves[cell], group, strict=True)
                            if row["status"] == "finished"]
                     for cell, group in _by_cell(rows).items()}
  plots.accuracy(os.path.join(workdir, "accuracy.png"), summary, _finished(rows), baseline)
  plots.curves(os.path.join(workdir, "curves.png"), finished_curves)
  plots.variance_shift(os.path.join(workdir, "variance_shift.png"), diagnostics)
  if plot_axis:
    plots.accuracy_by_axis(os.path.join(workdir, f"accuracy_by_{plot_axis}.png"), summary,
                           _finished(rows), plot_axis)
  rundir.write_text_atomic(path, text)  # Last: report.md describes the files beside it.
  return path
