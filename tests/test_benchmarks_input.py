"""benchmarks/input_pipeline.py, the command of docs/performance.md's input pipeline section, runs:
cnnlab's side of every section at tiny sizes (no torch: --torch=false) gives its rows and tables;
a bad flag is one `error:` line."""

import json
import os
import subprocess
import sys

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks", "input_pipeline.py")


def test_input_pipeline_tiny_run_gives_every_section(tmp_path, data_dir):
  out = tmp_path / "input.json"
  result = subprocess.run(
      [sys.executable, BENCH, "--torch=false", f"--cache_dir={tmp_path / 'cache'}", "--classes=2",
       "--images=24", "--min_size=40", "--max_size=60", "--image_size=32", "--batch_size=4",
       "--workers=0", "--repeats=1", "--warmup_batches=1", "--timed_batches=2",
       "--read_images=4", "--dataset=digits", f"--data_dir={data_dir}", "--steps=2",
       "--folder_steps=2",
       "--step_workers=0", "--small_images=24", "--small_size=16", "--rss_images=12,24",
       "--rss_workers=0", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report["pipeline"]
  assert row["workers"] == 0 and "torch" not in row and row["cnnlab"]["img_s"]["min"] > 0
  assert report["read"]["images"] == 4 and report["read"]["decode_crop_flip_ms"] > 0
  folder = "22 JPEGs 80-120 px, crops 16x16x3"
  assert [(r["data"], r["feed"]) for r in report["step"]] == [
      ("digits 8x8x1", "one pre-made batch"), ("digits 8x8x1", "in memory (TrainIterator)"),
      ("digits 8x8x1", "StreamIterator over ArraySource, 0 workers"),
      (folder, "one pre-made batch"), (folder, "StreamIterator over the folder, 0 workers")]
  assert all(r["ms"]["min"] > 0 and r["wait_ms"]["min"] >= 0 for r in report["step"])
  assert report["step"][0]["minus_premade_ms"] == report["step"][0]["minus_premade_best_ms"] == 0
  small, large = report["rss"]
  assert [(r["images"], r["examples"]) for r in (small, large)] == [(12, 10), (24, 22)]
  assert small["peak_mb"] >= small["rss_before_mb"] > 0 and small["worker_peaks_mb"] == []
  assert small["maxrss_self_mb"] >= small["peak_mb"]
  assert report["machine"]["commit"] and report["machine"]["cores"] == os.cpu_count()
  for header in ("| workers | cnnlab img/s", "| read the file | decode |",
                 "| data | fed by | steps |", "| JPEGs (train split) | epoch s |"):
    assert header in result.stdout
  assert "| digits 8x8x1 | in memory (TrainIterator) | " in result.stdout


def test_input_pipeline_bad_flag_is_one_line_exit_2():
  result = subprocess.run([sys.executable, BENCH, "--workers=two"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --workers=") and "two" in lines[0], \
      result.stderr
