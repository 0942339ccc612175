"""Architectures on the same data: MLP vs LeNet-5 vs VGG vs ResNet vs Network-in-Network.

Run it with:

    python launch.py --config=experiments/architectures.py

(workdir: runs/architectures). It trains an MLP on flattened pixels, LeNet-5, the small VGG-style
CNN of the other sweeps, ResNet-20 and NiN, all with BN before the activation, over 3 seeds on
the offline mnist5k dataset. runs/architectures/report.md puts each net's test accuracy next to
its parameter count, multiply-adds and training-step FLOPs, and pairs every net against the MLP:
the lecture's "a CNN keeps the spatial structure" as a measured table. Variants:

    python launch.py --config=experiments/architectures.py:quick    # digits 8x8, 2 seeds
    python launch.py --config=experiments/architectures.py:cifar10  # needs CIFAR-10 prepared
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base

MODELS = ("mlp", "lenet5", "vgg_cnn", "resnet20", "nin")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("architectures", arg or "full")
  config.model.bn_placement = "before_act"
  config.model.dropout = "none"
  config.sweep.axes.model = config_dict.ConfigDict({"key": "model.name", "values": MODELS})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2)
  config.sweep.baseline = "model=mlp"
  return config
