"""Tests for cnnlab.inspection.summary: the lecture's conv arithmetic (seed 004) by hand, published
receptive fields, and a summary of every registered model at every bundled input size."""

import flax.linen as nn
import pytest
from conftest import run_launch

from cnnlab import data
from cnnlab.configs import base_config
from cnnlab.inspection import summary
from cnnlab.nets import layers, models


class Stack(nn.Module):
  """Convs given as (features, kernel, stride, padding), identity activation."""
  convs: tuple

  @nn.compact
  def __call__(self, x, train):
    for i, (features, kernel, stride, padding) in enumerate(self.convs):
      x = layers.ConvBlock(features, kernel, stride, padding,
                           options=layers.BlockOptions(activation="identity"), name=f"c{i}")(x,
                                                                                              train)
    return x


def rows(convs, shape):
  return summary.summarize_model(Stack(tuple(convs)), shape).rows


def test_seed_004_conv_output_params_and_multiply_adds():
  # 10 filters 5x5, stride 1, pad 2 on 3x32x32: (32 + 4 - 5)/1 + 1 = 32 -> 10x32x32;
  # params 10 * (3*5*5 + 1) = 760; multiply-adds 10*32*32 outputs x 75 = 768,000.
  (row,) = rows([(10, 5, 1, 2)], (32, 32, 3))
  assert row.output_shape == (32, 32, 10)
  assert row.params == 760 and row.macs == 768_000
  assert row.receptive_field == "5" and row.jump == "1"


def test_seed_004_output_sizes():
  # 7x7 input, 3x3 kernel: (7 - 3)/1 + 1 = 5; stride 2: (7 - 3)/2 + 1 = 3.
  assert rows([(1, 3, 1, 0)], (7, 7, 1))[0].output_shape == (5, 5, 1)
  assert rows([(1, 3, 2, 0)], (7, 7, 1))[0].output_shape == (3, 3, 1)


def test_seed_004_receptive_fields():
  # Three 3x3 stride-1 convs: 3, 5, 7 (each adds k - 1 = 2 pixels).
  stride1 = rows([(2, 3, 1, 1)] * 3, (32, 32, 1))
  assert [r.receptive_field for r in stride1] == ["3", "5", "7"]
  assert {r.jump for r in stride1} == {"1"}
  # Stride 2: the jump doubles each layer, so the field grows exponentially: 3, 3 + 2*2 = 7,
  # 7 + 2*4 = 15 (and 31, 63, ... for more layers).
  stride2 = rows([(2, 3, 2, 1)] * 5, (64, 64, 1))
  assert [r.receptive_field for r in stride2] == ["3", "7", "15", "31", "63"]
  assert [r.jump for r in stride2] == ["2", "4", "8", "16", "32"]


def test_anisotropic_and_dilated_geometry():
  # Kernel (3, 1), stride (1, 2): RF 3x1, jump 1x2; dilation 2 on 3x3: RF 1 + 2*2 = 5.
  (row,) = rows([(2, (3, 1), (1, 2), 0)], (8, 8, 1))
  assert (row.receptive_field, row.jump) == ("3x1", "1x2")

  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return nn.Conv(2, (3, 3), kernel_dilation=2)(x)
  (row,) = summary.summarize_model(Dilated(), (9, 9, 1)).rows
  assert row.receptive_field == "5" and row.macs == 9 * 9 * 2 * 9


def _summary(name, shape=(224, 224, 3), num_classes=1000, **fields):
  config = base_config()
  config.model.name = name
  config.model.update(fields)
  return summary.summarize(config, shape, num_classes, step_flops=False)


def last_rf(s, layer_name):
  return next(r for r in s.rows if r.name == layer_name).receptive_field


def test_published_receptive_fields():
  # Araujo, Norris & Sim 2019 ("Computing receptive fields of CNNs"): AlexNet 195, VGG-16 212
  # at their last pooling layer. AlexNet by hand: 11 (jump 4) -> pool 19 (8) -> 5x5: 51 ->
  # pool 67 (16) -> three 3x3: 163 -> pool 195 (32).
  assert last_rf(_summary("alexnet"), "pool5") == "195"
  assert last_rf(_summary("vgg16"), "pool4") == "212"
  # ResNet-50 (stride in the 3x3 conv, torchvision's v1.5): 427.
  assert last_rf(_summary("resnet50", bn_placement="before_act"), "stage4_unit3/conv3") == "427"


def test_resnet_block_takes_the_largest_branch():
  s = _summary("resnet20", (32, 32, 3), 10, bn_placement="before_act")
  by_name = {r.name: r for r in s.rows}
  # Stem 3; each basic unit adds two 3x3 convs at jump 1 (stage 1): 3 + 4 = 7 after unit 1;
  # the next unit's first conv reads the unit's output (RF 7), not its identity shortcut.
  assert by_name["stage1_unit1/conv2"].receptive_field == "7"
  assert by_name["stage1_unit2/conv1"].receptive_field == "9"


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_summarises_at_every_bundled_input_size(name):
  sizes = {data.dataset_shape(d) for d in ("digits", "mnist5k", "cifar10")}
  assert {shape for shape, _ in sizes} == {(8, 8, 1), (28, 28, 1), (32, 32, 3)}
  bn = "none" if name == "linear" else "before_act"
  for shape, classes in sizes:
    s = _summary(name, shape, classes, bn_placement=bn, dropout="spatial", dropout_rate=0.1)
    assert s.rows and s.rows[-1].output_shape == (classes,)
    # Every parameter belongs to exactly one row.
    assert sum(r.params for r in s.rows) == s.total_params
    assert s.total_macs > 0 and "total parameters" in s.table()
  s = _summary(name, (224, 224, 3), 1000, bn_placement=bn)   # ImageNet-sized inputs too.
  assert s.rows[-1].output_shape == (1000,) and sum(r.params for r in s.rows) == s.total_params


def test_training_step_flops_are_about_six_times_the_forward_multiply_adds():
  config = base_config()
  config.batch_size = 32
  s = summary.summarize(config)   # LeNet-5 on mnist5k: 28x28x1.
  assert s.input_shape == (28, 28, 1) and s.batch_size == 32
  # Forward = 2 FLOPs per multiply-add, backward ~2x forward; plus activations and the update.
  ratio = s.train_step_flops / (6 * s.total_macs * 32)
  assert 1.0 < ratio < 1.6, ratio
  assert f"{s.train_step_flops:,.0f}" in s.table()


def test_launch_summary_mode():
  proc = run_launch("--config=experiments/default.py", "--mode=summary",
                    "--config.model.name=resnet18", "--config.model.bn_placement=before_act",
                    "--input_shape=224,224,3", "--num_classes=1000")
  assert proc.returncode == 0, proc.stderr
  assert "total parameters:       11,689,512" in proc.stdout
  assert "training step FLOPs" in proc.stdout
  proc = run_launch("--config=experiments/default.py", "--mode=summary",
                    "--config.model.name=resnet999")
  assert proc.returncode == 2 and "resnet999" in proc.stderr and "Traceback" not in proc.stderr
