"""Residual unit ordering (He et al. 2016b, Fig. 4): where BN and ReLU sit around the addition.

Run it with:

    python launch.py --config=experiments/resnet_units.py

(workdir: runs/resnet_units). It trains ResNet-20 (CIFAR style, BN) with each of the five unit
orderings -- original, bn_after_add, relu_before_add, relu_only_preact, full_preact -- over 3
seeds on the offline mnist5k dataset, and writes runs/resnet_units/report.md with each ordering
paired against the original unit. Variants:

    python launch.py --config=experiments/resnet_units.py:quick    # digits 8x8, 2 seeds, smoke test
    python launch.py --config=experiments/resnet_units.py:cifar10  # ResNet-110 as in the paper;
                                                                   # needs CIFAR-10 prepared
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base
from cnnlab.nets import layers


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("resnet_units", arg or "full")
  config.model.name = "resnet110" if arg == "cifar10" else "resnet20"
  config.model.bn_placement = "before_act"
  config.model.dropout = "none"
  config.sweep.axes.unit = config_dict.ConfigDict(
      {"key": "model.unit", "values": layers.RESIDUAL_UNITS})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2)
  config.sweep.baseline = "unit=original"
  return config
