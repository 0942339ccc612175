"""The issue's two study files run end to end in their `:quick` variants: He 2016b's residual
unit orderings, and MLP vs LeNet-5 vs VGG vs ResNet vs NiN with their costs in the report."""

import os
import re

import pytest
from conftest import load_config, run_launch

from cnnlab.inspection import summary
from cnnlab.study import grid, tables, tuning


def _run_quick(path, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_launch(f"--config={path}:quick", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.sweep.seeds=(0,)",
                    timeout=900)  # One seed: what is checked here is per cell.
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = tables.read_results_csv(os.path.join(workdir, "results.csv"))
  with open(os.path.join(workdir, "report.md")) as f:
    return rows, f.read()


def _cost_rows(text):
  """{cell: (params, multiply-adds)} from report.md's cost table."""
  section = text.split("## Cost per cell")[1].split("## ")[0]
  return {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", "")))
          for m in re.finditer(r"\| `([^`]+)` \| ([\d,]+) \| ([\d,]+) \| [\d.]+ \|", section)}


def test_resnet_units_quick(data_dir, tmp_path):
  rows, text = _run_quick("experiments/resnet_units.py", data_dir, tmp_path)
  units = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
  assert {r["cell"] for r in rows} == {f"unit={u}" for u in units} and len(rows) == 5
  assert all(0.3 < r["test_accuracy"] <= 1 for r in rows)
  # ResNet-20 on 8x8x1 digits, 10 classes: 269,722 - 2 * 144 (the stem reads 1 channel, not 3).
  assert {p for p, _ in _cost_rows(text).values()} == {269_434}
  assert "Paired against `unit=original`" in text


def test_architectures_quick_reports_params_and_flops(data_dir, tmp_path):
  rows, text = _run_quick("experiments/architectures.py", data_dir, tmp_path)
  config = load_config("experiments/architectures.py", "quick")
  costs = _cost_rows(text)
  assert set(costs) == {f"model={m}" for m in ("mlp", "lenet5", "vgg_cnn", "resnet20", "nin")}
  for cell in grid.expand(config):
    expected = summary.summarize(cell.seed_config(0), step_flops=False)
    assert costs[cell.name] == (expected.total_params, expected.total_macs), cell.name
    assert {r["num_params"] for r in rows if r["cell"] == cell.name} == {expected.total_params}
  assert len(rows) == 5 and all(0.3 < r["test_accuracy"] <= 1 for r in rows)


@pytest.mark.parametrize("path, cells", [("experiments/resnet_units.py", 5),
                                         ("experiments/architectures.py", 5)])
@pytest.mark.parametrize("variant", [None, "quick", "cifar10"])
def test_study_files_expand(path, cells, variant):
  config = load_config(path, variant)
  assert len(grid.expand(config)) == cells
  assert config.sweep.baseline in {c.name for c in grid.expand(config)}


@pytest.mark.parametrize("variant", [None, "imagenette", "folder", "smoke"])
def test_the_imagenet_recipe(variant):
  config = load_config("experiments/imagenet.py", variant)
  assert (config.optimizer.name, config.optimizer.momentum, config.optimizer.weight_decay) == (
      "sgd", 0.9, 1e-4)
  assert config.label_smoothing == 0.1 and config.dataset.augment == "imagenet"
  assert config.dataset.normalization == "imagenet"
  assert config.optimizer.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
  config.batch_size = 1024   # The linear scaling rule follows a batch size set later.
  assert config.optimizer.learning_rate == pytest.approx(0.4)
  if variant is None:
    assert (config.model.name, config.num_epochs, config.dataset.image_size) == (
        "resnet50", 90, 224)
    assert config.optimizer.warmup_epochs == 5 and config.optimizer.schedule == "cosine"
    assert config.dataset.tfds_name == "imagenet2012"


def test_the_tuned_ablation_searches_six_rates_around_the_fixed_one():
  config = load_config("experiments/ablation.py", "tuned")
  settings = config.sweep
  axes = tuning.parse_space(settings.nuisance, ("model.dropout", "model.bn_placement"))
  rates = [p["learning_rate"] for p in tuning.points(axes, settings.tuning_method,
                                                     settings.tuning_budget)]
  assert rates == [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4]
  assert config.optimizer.learning_rate in rates   # Its fixed point is tried too.
  assert not set(settings.tuning_seeds) & set(settings.seeds) and len(settings.tuning_seeds) == 3
  assert len(grid.expand(config)) == 9 and len(settings.seeds) == 5
