"""The variance-shift diagnostic's per-layer numbers, by hand."""

import jax
import numpy as np
import pytest
from conftest import load_config

from cnnlab.inspection import diagnostics
from cnnlab.nets import models


def test_bn_input_variance_by_hand_and_one_compilation_per_model():
  config = load_config("experiments/default.py")
  config.model.name, config.model.stages = "vgg_cnn", ((4,), (6,))
  config.model.bn_placement = "before_act"
  model = models.get_model(config.model, 10)
  images = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), images, train=False)
  got = diagnostics.bn_input_variances(model, variables, images, train_mode=False)
  assert sorted(got) == ["stage0_conv0/bn", "stage1_conv0/bn"]
  # The first BN's input is the first conv's output (no bias before BN).
  kernel = variables["params"]["stage0_conv0"]["conv"]["kernel"]
  conv = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  by_hand = float(np.mean(np.var(np.asarray(conv, np.float64), axis=(0, 1, 2))))
  assert got["stage0_conv0/bn"]["var"] == pytest.approx(by_hand, rel=1e-5)
  assert got["stage0_conv0/bn"]["running_var"] == 1.0  # Freshly initialised statistics.
  # Seeds of a cell share the jitted program: another call compiles nothing new.
  misses = diagnostics._recording_forward.cache_info().misses
  again = diagnostics.bn_input_variances(model, variables, 2 * images, train_mode=False)
  assert diagnostics._recording_forward.cache_info().misses == misses
  assert again["stage0_conv0/bn"]["var"] == pytest.approx(4 * by_hand, rel=1e-5)


def test_variance_shift_of_a_run_without_batchnorm_is_empty_and_compiles_nothing(tiny_config,
                                                                                  tmp_path):
  from cnnlab.training import loop
  tiny_config.model.bn_placement, tiny_config.num_epochs = "none", 1
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config, workdir, progress=False)
  misses = diagnostics._recording_forward.cache_info().misses
  assert diagnostics.variance_shift(tiny_config, workdir) == []
  assert diagnostics._recording_forward.cache_info().misses == misses
