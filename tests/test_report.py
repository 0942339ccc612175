"""Report statistics against hand-computed numbers; tables and errors on synthetic rows."""

import math
import os
import re
import subprocess
import sys
import warnings

import pytest

from cnnlab.base.errors import CnnlabError, ConfigError
from cnnlab.study import report, stats, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_ci_by_hand():
  # mean 3; sample std sqrt(10/4) = 1.5811388; t_{0.975, 4} = 2.7764451;
  # half-width 2.7764451 * 1.5811388 / sqrt(5) = 1.9632432.
  mean, std, lo, hi = tables.mean_ci([1, 2, 3, 4, 5])
  assert mean == 3
  assert std == pytest.approx(1.5811388, abs=1e-7)
  assert (lo, hi) == (pytest.approx(1.0367568, abs=1e-6), pytest.approx(4.9632432, abs=1e-6))
  mean, std, lo, hi = tables.mean_ci([0.7])
  assert mean == 0.7 and math.isnan(std) and math.isnan(lo)


META = {"config": {"name": "synthetic"}, "command": "python launch.py", "git_commit": "abc",
        "environment": {}, "packages": {}}


def _rows(cell, values, losses=None):
  return [{"cell": cell, "seed": s, "test_accuracy": v, "test_loss": (losses or values)[s],
           "train_loss": 0.1, "steps_to_target": 10 * (s + 1) if v > 0.905 else None}
          for s, v in enumerate(values)]


def _paired(rows, baseline="base", **kwargs):
  """{(cell, metric): comparison} from tables.paired_comparison."""
  return {(c["cell"], c["metric"]): c
          for c in tables.paired_comparison(rows, baseline, **kwargs)}


def test_paired_comparison_by_hand():
  rows = _rows("base", [0.90, 0.92, 0.91]) + _rows("cell", [0.93, 0.94, 0.92])
  c = _paired(rows)["cell", "test_accuracy"]
  # Differences 0.03, 0.02, 0.01: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.4641016.
  # With 2 df, P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)) = 0.0370900; two-sided p = 0.0741799.
  # t_{0.975, 2} = 4.3026527: half-width 4.3026527 * 0.01 / sqrt 3 = 0.0248414.
  assert c["pairs"] == 3
  assert c["mean_diff"] == pytest.approx(0.02, abs=1e-12)
  assert c["std_diff"] == pytest.approx(0.01, abs=1e-12)
  assert c["t_statistic"] == pytest.approx(3.4641016, abs=1e-6)
  assert c["p_value"] == pytest.approx(0.0741799, abs=1e-6)
  assert (c["ci_low"], c["ci_high"]) == (pytest.approx(-0.0048414, abs=1e-6),
                                         pytest.approx(0.0448414, abs=1e-6))


def test_paired_comparison_matches_seeds_and_survives_degenerate_input():
  rows = _rows("base", [0.9, 0.9]) + _rows("same", [0.9, 0.9])
  c = _paired(rows)["same", "test_accuracy"]
  assert c["mean_diff"] == 0 and math.isnan(c["p_value"])  # sd 0: no p.
  assert c["significant"] is None and c["family_size"] == 0 and "identical" in c["power_note"]
  with pytest.raises(ConfigError, match="'nope'.*base"):
    tables.paired_comparison(rows, "nope")


def test_differences_equal_up_to_rounding_get_no_p_value_and_no_warning():
  # 0.3 - 0.1 and 0.9 - 0.7 differ in the last bits only: no test, not a spurious p ~ 1e-16.
  rows = _rows("base", [0.1, 0.7]) + _rows("cell", [0.3, 0.9])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    c = _paired(rows)["cell", "test_accuracy"]
  assert math.isnan(c["p_value"]) and c["significant"] is None


def _by_differences(differences: dict[str, list[float]]):
  base = [0.90, 0.92, 0.91]
  rows = _rows("base", base)
  for cell, diffs in differences.items():
    rows += _rows(cell, [b + d for b, d in zip(base, diffs)])
  return rows


def test_adjusted_p_values_and_verdict_by_hand():
  # 3 pairs, 2 df: two-sided p = 1 - sqrt(t^2 / (2 + t^2)).
  rows = _by_differences({
      "big": [0.05, 0.051, 0.049],  # t = 50 sqrt 3: p = 1 - sqrt(7500/7502) = 0.000133307
      "mid": [0.02, 0.03, 0.025],   # t = 5 sqrt 3:  p = 1 - sqrt(75/77) = 0.0130725
      "a": [0.03, 0.02, 0.01],      # t = 2 sqrt 3:  p = 1 - sqrt(12/14) = 0.0741799
      "c": [0.06, 0.04, 0.02],      # the same t and p as "a"
      "b": [0.01, -0.01, 0.0]})     # t = 0: p = 1
  paired = _paired(rows)
  p = {cell: paired[cell, "test_accuracy"] for cell in ("big", "mid", "a", "c", "b")}
  assert [p[c]["p_value"] for c in p] == pytest.approx(
      [0.000133307, 0.0130725, 0.0741799, 0.0741799, 1.0], abs=1e-6)
  # Holm over the 5: 5 * 0.000133307, 4 * 0.0130725, 3 * 0.0741799 (twice), 1.
  assert [p[c]["p_holm"] for c in p] == pytest.approx(
      [0.000666533, 0.0522898, 0.2225397, 0.2225397, 1.0], abs=1e-6)
  # BH: 5/1 * 0.000133307, 5/2 * 0.0130725, min(5/3, 5/4) * 0.0741799 (twice), 1.
  assert [p[c]["p_bh"] for c in p] == pytest.approx(
      [0.000666533, 0.0326811, 0.0927249, 0.0927249, 1.0], abs=1e-6)
  assert {c: p[c]["significant"] for c in p} == {"big": True, "mid": False, "a": False,
                                                 "c": False, "b": False}
  assert {p[c]["family_size"] for c in p} == {5} and {p[c]["correction"] for c in p} == {"holm"}
  text = report.render_markdown(rows, {}, baseline="base", target_accuracy=0.9, meta=META)
  verdict = next(l for l in text.splitlines() if l.startswith("**Test accuracy**"))
  assert "the 5 comparisons against `base` on test accuracy" in verdict
  assert "Significant after correction: `big` (+5.00 points, adjusted p 0.0007)" in verdict
  # mid's raw p is below 0.05 but Holm's is not: the report says so rather than call it a win.
  assert "not significant after correction: `mid` (p 0.0131, adjusted 0.0523)" in verdict


def test_large_family_is_judged_by_benjamini_hochberg():
  # HOLM_MAX_FAMILY + 1 cells, each with p = 0.0130725 (see above). Holm multiplies the
  # smallest by the family size (> 0.05: nothing significant); BH's adjusted p of m equal
  # p-values is p itself (m/m), so every one is significant, and the verdict follows BH.
  size = stats.HOLM_MAX_FAMILY + 1
  rows = _by_differences({f"c{i}": [0.02, 0.03, 0.025] for i in range(size)})
  family = [c for c in tables.paired_comparison(rows, "base") if c["metric"] == "test_accuracy"]
  assert {c["correction"] for c in family} == {"fdr_bh"} and all(c["significant"] for c in family)
  assert [c["p_bh"] for c in family] == pytest.approx([0.0130725] * size, abs=1e-6)
  assert [c["p_holm"] for c in family] == pytest.approx([0.0130725 * size] * size, abs=1e-6)
  text = report.render_markdown(rows, {}, baseline="base", target_accuracy=0.9, meta=META)
  assert f"the {size} comparisons against `base` on test accuracy that have a p-value; judged " \
         "by Benjamini-Hochberg-adjusted p < 0.05. Significant after correction: `c0`" in text


def test_power_columns_and_table():
  rows = _by_differences({"cell": [0.01, 0.03, 0.02], "one": [0.01, 0.01, 0.01]})
  paired = _paired(rows, min_effect=0.01)
  c = paired["cell", "test_accuracy"]
  # sd 0.01 over 3 pairs: 3.2640435 sd detectable (see test_stats); 1 point = 1 sd: 10 pairs.
  assert c["min_detectable_diff"] == pytest.approx(0.032640435, abs=1e-8)
  assert c["seeds_needed"] == 10 and c["min_effect"] == 0.01
  assert paired["cell", "test_loss"]["seeds_needed"] is None  # min_effect is in accuracy.
  text = report.render_markdown(rows, {}, baseline="base", target_accuracy=0.9, meta=META,
                                min_effect=0.01)
  assert "| `cell` | 1.00 | 3 | 3.26 | 10 |" in text
  assert "| `one` | 0.00 | 3 | n/a: identical differences" in text
  with pytest.raises(ConfigError, match="min_effect=0"):
    report.check_min_effect(0)


def test_cell_summary_counts_seeds_reaching_the_target():
  (s,) = tables.cell_summary(_rows("c", [0.90, 0.92, 0.91]))
  assert s["n"] == 3 and s["reached"] == 2 and s["steps_to_target"] == 25.0


def test_mixed_provenance_is_refused():
  rows = [dict(r, threads=t, xla_flags="", dtype="float32", backend="cpu",
               matmul_precision="highest")
          for r, t in zip(_rows("c", [0.9, 0.8]), (1, 2))]
  with pytest.raises(ConfigError, match="threads"):
    tables.check_provenance(rows)


def _diverge(row, step=40):
  return dict(row, status="diverged", diverged_step=step, diverged_reason="loss is nan",
              test_accuracy=None, test_loss=None, train_loss=None, steps_to_target=None)


def _with_divergences():
  """base: seed 2 diverged; cell: seed 0 diverged; dead: every seed diverged. The finished
  rows of `cell` have no status (older results), those of `base` say "finished"."""
  rows = _by_differences({"cell": [0.03, 0.02, 0.01], "dead": [0, 0, 0]})
  return [_diverge(r) if (r["cell"], r["seed"]) in {("base", 2), ("cell", 0)}
          or r["cell"] == "dead" else dict(r, status="finished") if r["cell"] == "base" else r
          for r in rows]


def test_diverged_runs_are_counted_and_left_out_of_the_statistics():
  rows = _with_divergences()
  summary = {s["cell"]: s for s in tables.cell_summary(rows)}
  assert (summary["base"]["n"], summary["base"]["runs"]) == (2, 3)
  assert summary["base"]["test_accuracy"][0] == pytest.approx(0.91)  # Seeds 0, 1 only.
  assert summary["base"]["diverged"] == [(2, 40, "loss is nan")]
  assert summary["dead"]["n"] == 0 and math.isnan(summary["dead"]["test_accuracy"][0])
  paired = _paired(rows)
  # Only seed 1 finished in both cell and base: one pair, so no p-value and no power statement.
  c = paired["cell", "test_accuracy"]
  assert c["pairs"] == 1 and c["seeds_dropped_diverged"] == "0 2"
  assert c["mean_diff"] == pytest.approx(0.02) and math.isnan(c["p_value"])
  assert "1 paired seed" in c["power_note"]
  assert paired["dead", "test_accuracy"]["pairs"] == 0
  text = report.render_markdown(rows, {}, baseline="base", target_accuracy=0.9, meta=META)
  assert "| `base` | 2 | 1 of 3 | 91.00 ± 1.41" in text
  assert "| `dead` | 0 | 3 of 3 | all seeds diverged |" in text
  assert "- `base` seed 2: step 40, loss is nan" in text
  assert "5 of 9 runs diverged" in text and "`cell`: seeds 0 2" in text


def test_report_recomputed_from_results_csv_is_the_report(tmp_path, monkeypatch):
  rows = [dict(r, **{k: "x" for k in tables.PROVENANCE}) for r in _with_divergences()]
  curves = {}
  for r in rows:
    curves.setdefault(r["cell"], []).append([{"step": 1, "split": "train", "loss": r["seed"]}])
  plotted = {}
  monkeypatch.setattr(report.plots, "curves", lambda path, c: plotted.update(curves=c))
  monkeypatch.setattr(report.plots, "accuracy",
                      lambda path, summary, finished, baseline: plotted.update(rows=finished))
  path = report.write_report(str(tmp_path), rows, curves, {}, baseline="base",
                             target_accuracy=0.9, meta=META, min_effect=0.01)
  back = tables.read_results_csv(str(tmp_path / "results.csv"))
  assert [r["status"] for r in back] == [r.get("status", "finished") for r in rows]
  assert back[2]["diverged_reason"] == "loss is nan" and back[2]["diverged_step"] == 40
  with open(path) as f:
    assert report.render_markdown(back, {}, baseline="base", target_accuracy=0.9, meta=META,
                                  min_effect=0.01) == f.read()
  # The plots get the finished runs only.
  assert all(r["status"] == "finished" for r in plotted["rows"]) and len(plotted["rows"]) == 4
  assert plotted["curves"] == {"base": [curves["base"][0], curves["base"][1]],
                               "cell": [curves["cell"][1], curves["cell"][2]], "dead": []}
  comparisons = tables.read_results_csv(str(tmp_path / "comparisons.csv"))
  assert {"cell", "baseline", "metric", "pairs", "seeds_dropped_diverged", "mean_diff",
          "ci_low", "ci_high", "std_diff", "p_value", "p_holm", "p_bh", "family_size",
          "correction", "significant", "alpha", "power", "min_detectable_diff", "min_effect",
          "seeds_needed", "power_note"} <= set(comparisons[0])
  cells = tables.read_results_csv(str(tmp_path / "cells.csv"))
  assert [(c["cell"], c["finished"], c["diverged"]) for c in cells] == [
      ("base", 2, 1), ("cell", 2, 1), ("dead", 0, 3)]


def test_accuracy_figure_clips_intervals_and_shows_its_title(monkeypatch):
  """accuracy.png's title ran off the figure beside long cell names, and a t-interval of a cell
  with a large spread ran past 100%."""
  long = "bn=before_act,dropout=spatial,dropout_rate=0.3,learning_rate=0.1,weight_decay=0.0005"
  rows = _rows("base", [0.90, 0.92, 0.91]) + _rows(long, [0.99, 0.999, 0.5])
  summary = tables.cell_summary(rows)
  assert summary[1]["test_accuracy"][3] > 1  # The interval the figure must clip.
  drawn = []
  monkeypatch.setattr(report.plots, "save", lambda fig, path: drawn.append(fig))
  report.plots.accuracy("accuracy.png", summary, rows, "base")
  (fig,) = drawn
  fig.canvas.draw()
  (ax,) = fig.axes
  xs = [x for c in ax.collections if hasattr(c, "get_segments")  # The interval bars.
        for segment in c.get_segments() for x, _ in segment]
  assert xs and min(xs) >= 0 and max(xs) <= 100, xs
  assert [l.get_marker() for l in ax.get_lines() if l.get_marker() == ">"] == [">"]
  title = fig._suptitle
  assert "clipped" in title.get_text()
  box, page = title.get_window_extent(), fig.bbox
  assert (box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0
          and box.y1 <= page.y1), (box, page)
  text = report.render_markdown(rows, {}, baseline="base", target_accuracy=0.9, meta=META)
  assert (f"The 95% t-intervals of `{long}` run past 0-100%: the figures draw them clipped "
          "there") in text


def test_bad_status_or_missing_numbers_are_refused():
  (row,) = _rows("c", [0.9])
  with pytest.raises(CnnlabError, match="status='crashed'; allowed: finished, diverged"):
    tables.with_status([dict(row, status="crashed")])
  with pytest.raises(CnnlabError, match="finished but has no test_accuracy"):
    tables.with_status([dict(row, test_accuracy=None)])


FULL_DISK_SCRIPT = """
import os, resource, signal, sys
from cnnlab.study import report, tables
from cnnlab.base.errors import WorkdirError
workdir, limit = sys.argv[1], int(sys.argv[2])
meta = {"config": {"name": "synthetic"}, "command": "python launch.py", "git_commit": "abc",
        "environment": {}, "packages": {}}
def write(num_seeds):
  rows = [{"cell": cell, "seed": s, "test_accuracy": 0.9 + 0.01 * s + (cell == "b") * 0.003 * s,
           "test_loss": 0.3 - 0.01 * s, "train_loss": 0.1, "steps_to_target": 10,
           **{k: "x" for k in tables.PROVENANCE}}
          for cell in ("a", "b") for s in range(num_seeds)]
  curves = {c: [[{"step": 1, "split": "test", "accuracy": 0.5, "loss": 1.0}]] * num_seeds
            for c in ("a", "b")}
  report.write_report(workdir, rows, curves, {}, baseline="a", target_accuracy=0.9, meta=meta)
write(3)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A write past the limit fails with EFBIG instead.
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
  write(40)
except WorkdirError as e:
  print("error:", e)
"""


@pytest.mark.parametrize("limit", [1_000, 12_000])  # results.csv fails / a PNG fails.
def test_a_report_rewritten_on_a_full_disk_is_one_line_and_leaves_no_stale_report(tmp_path,
                                                                                   limit):
  """A rerun's report that cannot be written (the disk fills: here the file-size limit) ends in
  one WorkdirError line; every file left is a whole one (the old or the new), and the old
  report.md is gone, so no report.md sits beside results it does not describe."""
  done = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path), str(limit)],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.fullmatch(rf"error: cannot write {re.escape(str(tmp_path))}/\S+ \(File too large\); "
                      r"free space on the disk holding .*\n", done.stdout), done.stdout
  names = sorted(os.listdir(tmp_path))
  assert "report.md" not in names and not [n for n in names if ".tmp" in n], names
  for name in names:
    if name.endswith(".csv"):
      rows = tables.read_results_csv(str(tmp_path / name))
      assert rows and len(rows[0]) == len(rows[-1])
    else:
      with open(tmp_path / name, "rb") as f:
        assert f.read().endswith(b"IEND\xaeB`\x82"), name  # A whole PNG.
