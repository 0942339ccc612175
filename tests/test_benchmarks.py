"""benchmarks/zoo_determinism.py, the GPU determinism check, run here on the CPU: a model that
trains gives a row with equal digests; a model that fails gives an error row, not a crash.
benchmarks/conv_kernels.py finds every convolution of a train step."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from cnnlab.nets import models

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import zoo_determinism  # noqa: E402


def test_every_zoo_model_has_an_input_size():
  names = set(models.MODEL_NAMES)
  assert set(zoo_determinism.IMAGENET) <= names and set(zoo_determinism.MNIST) <= names
  assert zoo_determinism.input_shape("resnet50") == (224, 224, 3)
  assert zoo_determinism.input_shape("resnet20") == (32, 32, 3)
  assert zoo_determinism.input_shape("lenet5") == (28, 28, 1)


def test_zoo_determinism_rows_and_error_row(tmp_path):
  out = tmp_path / "zoo.json"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "zoo_determinism.py"),
       "--models=lenet5,no_such_model", "--steps=2", "--batch_size=2", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  lenet, bad = rows
  assert lenet["model"] == "lenet5" and lenet["input"] == "28x28x1"
  assert lenet["bit_identical"] and len(set(lenet["digests"])) == 1
  assert lenet["compile_s"] > 0 and lenet["step_ms"] > 0
  assert bad["error"].startswith("ConfigError: config.model.name='no_such_model' is not a "
                                  "registered model")
  assert "| lenet5 | 28x28x1 | yes |" in result.stdout
  assert "| no_such_model | 32x32x3 | no: ConfigError" in result.stdout


@pytest.mark.parametrize("arg, named", [("--steps=0", "--steps=0"),
                                        ("--batch_size=-3", "--batch_size=-3"),
                                        ("--deterministic=maybe", "--deterministic=maybe")])
def test_zoo_determinism_bad_flag_is_one_line_exit_2(arg, named):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "zoo_determinism.py"), arg],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), result.stderr


def test_zoo_determinism_unwritable_out_is_one_line_after_the_table(tmp_path):
  out = tmp_path / "missing_dir" / "zoo.json"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "zoo_determinism.py"), "--models=linear",
       "--steps=1", "--batch_size=2", f"--out={out}"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "| linear | 28x28x1 | yes |" in result.stdout  # The measurement is printed first.
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and str(out) in lines[0], result.stderr[-2000:]
  assert not out.parent.exists()


def test_conv_kernels_finds_every_convolution_of_the_train_step():
  """The main job's net: its first layer (one input channel) is a sum of shifted views
  (layers.tap_conv) whose backward pass keeps only lax's weight gradient; layers 2 and 3 are XLA
  convolutions with a forward pass, an input gradient and a weight gradient: 7 in all."""
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "conv_kernels.py"), "--nets=main",
       "--repeats=1", "--steps=1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  table = result.stdout[result.stdout.index("| net |"):]
  kinds = [line.split(" | ")[1] for line in table.splitlines()[2:] if not line.startswith("| **")]
  assert sorted(kinds) == ["forward"] * 2 + ["input gradient"] * 2 + ["weight gradient"] * 3
  assert "| main | weight gradient | 64x28x28x1 * 64x28x28x16 | 1 |" in table
  assert "| **main** | **all convolutions** | 7 distinct |" in table
  assert "| **main** | **whole train step** | batch 64 |" in table
