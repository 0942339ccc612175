"""Ablation: dropout kind x BatchNorm placement on a VGG-style CNN, over seeds.

The main job of cnnlab. Run it with:

    python launch.py --config=experiments/ablation.py

(workdir: runs/ablation). It trains 3 dropout kinds (none, standard, spatial) x 3 BN placements
(none, before_act, after_act) x 5 seeds on the offline mnist5k dataset and writes
runs/ablation/report.md, results.csv and the plots. Variants:

    python launch.py --config=experiments/ablation.py:quick    # smoke test, ~1 min (digits 8x8)
    python launch.py --config=experiments/ablation.py:cifar10  # needs CIFAR-10 prepared

Change the grid or the seeds like any other value, e.g.
`--config.sweep.seeds="(0, 1, 2)"` or `--config.sweep.axes.dropout.values="('none', 'spatial')"`.
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("ablation", arg or "full")
  config.model.dropout_rate = 0.2
  config.sweep.axes.dropout = config_dict.ConfigDict(
      {"key": "model.dropout", "values": ("none", "standard", "spatial")})
  config.sweep.axes.bn = config_dict.ConfigDict(
      {"key": "model.bn_placement", "values": ("none", "before_act", "after_act")})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2, 3, 4)
  # The cell every other is compared against (paired over seeds).
  config.sweep.baseline = "bn=none,dropout=none"
  return config
