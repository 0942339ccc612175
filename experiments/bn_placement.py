"""BatchNorm placement x learning rate: does BN allow larger rates (Ioffe & Szegedy 2015)?

Run it with:

    python launch.py --config=experiments/bn_placement.py

(workdir: runs/bn_placement; 3 placements x 4 learning rates x 3 seeds on mnist5k, no dropout).
Without BN the largest rates diverge or stall; a cell whose loss becomes NaN stops with a clear
error naming the step, so drop that rate with `--config.sweep.axes.lr.values=...` if needed.
Variants:

    python launch.py --config=experiments/bn_placement.py:quick    # digits, 2 seeds, smoke test
    python launch.py --config=experiments/bn_placement.py:cifar10  # needs CIFAR-10 prepared
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("bn_placement", arg or "full")
  config.model.dropout = "none"
  config.model.dropout_rate = 0.0
  config.sweep.axes.bn = config_dict.ConfigDict(
      {"key": "model.bn_placement", "values": ("none", "before_act", "after_act")})
  config.sweep.axes.lr = config_dict.ConfigDict(
      {"key": "optimizer.learning_rate", "values": (0.01, 0.05, 0.1, 0.3)})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2)
  config.sweep.baseline = "bn=none,lr=0.05"
  return config
