"""The sweep report: report.md, cells.csv, comparisons.csv and the plots, rendered from the
numbers of cnnlab.study.tables.

Pure post-processing of finished runs (no JAX). Everything in report.md is computed from the rows
that are also written to results.csv (what each statistic is: cnnlab.study.tables), so a reader
can recompute every number; cells.csv and comparisons.csv hold the computed statistics under
self-explanatory column names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

from cnnlab.base import files
from cnnlab.base.errors import ConfigError
from cnnlab.inspection import plots
from cnnlab.study import stats
from cnnlab.study.tables import (
  DISPLAY,
  METRICS,
  by_cell,
  cell_summary,
  cells_table,
  check_provenance,
  finished_rows,
  paired_comparison,
  with_status,
  write_results_csv,
)


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
  for cell, group in by_cell(rows).items():
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
  pairs = by_cell(paired)
  for cell, (acc, loss) in pairs.items():
    lines.append(f"| `{cell}` | {acc['pairs']} | " + " | ".join(
        f"{_f(c['mean_diff'], d, s)} [{_f(c['ci_low'], d, s)}, {_f(c['ci_high'], d, s)}] | "
        f"{_p(c['p_value'])} | {_p(c['p_holm'])} | {_p(c['p_bh'])}"
        for c, (_, s, d, _) in ((acc, DISPLAY[acc["metric"]]), (loss, DISPLAY[loss["metric"]])))
        + " |")
  dropped = [f"`{cell}`: seeds {acc['seeds_dropped_diverged']}"
             for cell, (acc, _) in pairs.items() if acc["seeds_dropped_diverged"]]
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


def _tuning_section(tuned: dict, seeds: list[int]) -> list[str]:
  """How each cell's nuisance point was chosen: the search, the rule, the cost, the choices with
  their notes, and the search-space boundary warnings."""
  axes = [a["name"] for a in tuned["axes"]]
  where = ", ".join(f"`{a['key']}` ({a['kind']} " + (
      f"{a['low']:g}-{a['high']:g})" if a["kind"] != "values"
      else ", ".join(map(str, a["values"])) + ")") for a in tuned["axes"])
  cost = tuned["cost"]
  lines = ["", "## Tuning", "",
           f"The nuisance hyperparameters {where} were searched for every cell separately: "
           f"{cost['points_per_cell']} points ({tuned['method']}) x {len(tuned['tuning_seeds'])} "
           f"tuning seeds ({', '.join(map(str, tuned['tuning_seeds']))}), judged on the "
           "validation split only (the test split is not read). Rule: the point with the best "
           "mean validation accuracy over the tuning seeds, a diverged seed counting as 0; ties "
           "go to fewer diverged seeds, then fewer steps to the target, then the earlier point. "
           f"Every number above comes from final runs at the chosen points with seeds "
           f"{', '.join(map(str, seeds))}, disjoint from the tuning seeds, each evaluated on the "
           f"test split once. Cost: {cost['runs']} tuning runs, "
           f"{cost['wall_time_s']:.0f} s of training (tuning.json holds every trial)."
           + _same_as_fixed(tuned.get("same_as_fixed", [])), "",
           "| cell | " + " | ".join(f"chosen {a}" for a in axes)
           + " | mean validation accuracy (%) | notes |",
           "|---|" + "---|" * len(axes) + "---|---|"]
  warnings = []
  for cell, t in tuned["cells"].items():
    chosen = t["chosen"] or {}
    values = " | ".join(f"{chosen[a]:.4g}" if isinstance(chosen.get(a), float)
                        else str(chosen.get(a, "none")) for a in axes)
    note = t["reason"] or "; ".join(t["notes"])
    lines.append(f"| `{cell}` | {values} | {_f(t['mean'], 2, 100)} | {note} |")
    warnings += [f"- `{cell}`: {w}" for w in t["warnings"]]
  lines += ["", "Search-space boundary check: " + (
      "the chosen value sits on the edge of what was tried here, so the best may lie beyond:"
      if warnings else "no chosen value sits on the edge of what was tried."), *warnings,
            "", "![tuning](tuning.png)"]
  return lines


def _same_as_fixed(cells: list[str]) -> str:
  """The sentence naming the cells whose chosen point is the fixed one ("" for none)."""
  if not cells:
    return ""
  names = ", ".join(f"`{c}`" for c in cells)
  return (f" {names} chose the fixed point: {'their' if len(cells) > 1 else 'its'} final runs "
          f"are the fixed-point runs (the same config and seeds), copied rather than trained "
          f"again.")


def _against_fixed_section(rows, fixed_rows, baseline, min_effect) -> list[str]:
  """The comparison against the baseline at the tuned points and at the fixed one, side by
  side, and the cells whose verdict tuning changed."""
  tuned_cells = {s["cell"]: s for s in cell_summary(rows)}
  fixed_cells = {s["cell"]: s for s in cell_summary(fixed_rows)}
  pick = lambda paired: {c["cell"]: c for c in paired if c["metric"] == "test_accuracy"}
  tuned_pairs = pick(paired_comparison(rows, baseline, min_effect=min_effect))
  fixed_pairs = pick(paired_comparison(fixed_rows, baseline, min_effect=min_effect))
  word = lambda c: "n/a" if c is None or c["significant"] is None else (
      ("better" if c["mean_diff"] > 0 else "worse") if c["significant"] else "no difference")
  adjusted = lambda c: "n/a" if c is None else _p(c["p_holm"] if c["correction"] == "holm"
                                                    else c["p_bh"])
  lines = ["", "## Tuned against fixed", "",
           "The same cells and final seeds at the config's own values of the nuisance "
           "hyperparameters (fixed/report.md has that sweep's full report): test accuracy (%, "
           "mean ± std [95% t-interval]) and the paired difference to the baseline (points, "
           "adjusted p as in the paired section, verdict).", "",
           "| cell | tuned accuracy | tuned Δ, p, verdict | fixed accuracy | fixed Δ, p, verdict |",
           "|---|---|---|---|---|"]
  changed = []
  for cell, summary in tuned_cells.items():
    t, f = tuned_pairs.get(cell), fixed_pairs.get(cell)
    fixed = fixed_cells.get(cell)
    cells = [(f"{_f(c['mean_diff'], 2, 100)}, {adjusted(c)}, {word(c)}" if c else "baseline")
             for c in (t, f)]
    lines.append(f"| `{cell}` | {_ci(summary['test_accuracy'])} | {cells[0]} | "
                 f"{_ci(fixed['test_accuracy']) if fixed else 'n/a'} | {cells[1]} |")
    if t and f and word(t) != word(f):
      changed.append(f"`{cell}` ({word(f)} at the fixed point, {word(t)} tuned)")
  lines += ["", ("Tuning changed the verdict for " + ", ".join(changed) + ".") if changed
            else "Tuning changed no verdict against the baseline."]
  return lines


def check_min_effect(min_effect: float | None) -> None:
  """Raises ConfigError unless `min_effect` is None or an accuracy difference in (0, 1]."""
  number = isinstance(min_effect, (int, float)) and not isinstance(min_effect, bool)
  if min_effect is not None and not (number and 0 < min_effect <= 1):
    raise ConfigError(f"config.sweep.min_effect={min_effect!r} must be an accuracy difference "
                      "in (0, 1] (0.01 = 1 point), or None for no seeds-needed estimate.")


def render_markdown(rows, diagnostics, *, baseline, target_accuracy, meta,
                    min_effect: float | None = None, plot_axis: str = "",
                    tuned: dict | None = None, fixed_rows: list[dict] | None = None) -> str:
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
  if tuned is not None:
    lines += _tuning_section(tuned, seeds)
  if fixed_rows is not None:
    lines += _against_fixed_section(rows, with_status(fixed_rows), baseline, min_effect)
  if diagnostics is not None:  # None: the sweep measured none (sweep.diagnostics=False).
    lines += ["", "## Variance shift (Li et al. 2019)", "",
              "Per BatchNorm layer, the mean over channels of its input's variance in training "
              "mode (dropout on) and in evaluation mode (dropout off), their ratio, and the "
              "running variance BN divides by at evaluation. A ratio far from 1 means the "
              "statistics BN learned in training do not describe its inputs at test time.", "",
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
  lines += ["![learning curves](curves.png)", ""]
  if diagnostics is not None:
    lines += ["![variance shift](variance_shift.png)", ""]
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
                 meta: dict, min_effect: float | None = None, plot_axis: str = "",
                 tuned: dict | None = None, fixed_rows: list[dict] | None = None) -> str:
  """Writes results.csv, cells.csv, comparisons.csv, report.md and the PNG plots into
  `workdir`; returns report.md's path.

  `curves[cell][i]` holds the metrics of the i-th row of that cell; diverged runs are left out
  of the plots. `diagnostics[cell]`: its variance-shift records (None: none measured, no
  section or figure). `min_effect` is the accuracy difference (0.01 = 1 point) whose seeds
  needed the report states (None: no such statement). `plot_axis` (an axis, "" = none) adds a
  plot of test accuracy against its values, one line per value of the other axes. A tuned sweep
  adds its tuning summary `tuned` (cnnlab.study.tuning.summarize) and its fixed-point runs'
  rows.

  Each file is written atomically; report.md is removed first and written last, so one on disk
  always describes the files beside it. A failed write (a full disk) raises WorkdirError.
  """
  check_min_effect(min_effect)
  rows = with_status(rows)
  check_provenance(rows)
  path = os.path.join(workdir, "report.md")
  with contextlib.suppress(FileNotFoundError):  # An interrupted rewrite leaves no stale report.
    os.remove(path)
  text = render_markdown(rows, diagnostics, baseline=baseline, target_accuracy=target_accuracy,
                         meta=meta, min_effect=min_effect, plot_axis=plot_axis, tuned=tuned,
                         fixed_rows=fixed_rows)
  summary = cell_summary(rows)
  write_results_csv(os.path.join(workdir, "results.csv"), rows)
  write_results_csv(os.path.join(workdir, "cells.csv"), cells_table(summary))
  write_results_csv(os.path.join(workdir, "comparisons.csv"),
                    paired_comparison(rows, baseline, min_effect=min_effect))
  finished_curves = {cell: [run for run, row in zip(curves[cell], group, strict=True)
                            if row["status"] == "finished"]
                     for cell, group in by_cell(rows).items()}
  plots.accuracy(os.path.join(workdir, "accuracy.png"), summary, finished_rows(rows), baseline)
  plots.curves(os.path.join(workdir, "curves.png"), finished_curves)
  if diagnostics is not None:
    plots.variance_shift(os.path.join(workdir, "variance_shift.png"), diagnostics)
  if plot_axis:
    plots.accuracy_by_axis(os.path.join(workdir, f"accuracy_by_{plot_axis}.png"), summary,
                           finished_rows(rows), plot_axis)
  files.write_text_atomic(path, text)  # Last: report.md describes the files beside it.
  return path
