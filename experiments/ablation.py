"""Ablation: dropout kind x BatchNorm placement on a VGG-style CNN, over seeds.

The main job of cnnlab. Run it with:

    python launch.py --config=experiments/ablation.py

(workdir: runs/ablation). It trains 3 dropout kinds (none, standard, spatial) x 3 BN placements
(none, before_act, after_act) x 5 seeds on the offline mnist5k dataset and writes
runs/ablation/report.md, results.csv and the plots. Variants:

    python launch.py --config=experiments/ablation.py:quick    # smoke test, ~1 min (digits 8x8)
    python launch.py --config=experiments/ablation.py:cifar10  # needs CIFAR-10 prepared
    python launch.py --config=experiments/ablation.py:tuned    # each cell at its own best
                                                              # learning rate (below)

`tuned` is the fair comparison of the Deep Learning Tuning Playbook: the learning rate is a
nuisance hyperparameter, tuned for every cell separately over a log range (6 points: 0.0125,
0.025, 0.05, 0.1, 0.2, 0.4) with 3 tuning seeds on the validation split; each cell then trains at
its chosen rate with the 5 final seeds, and the same cells at the fixed rate 0.05 with the same
seeds, so the report shows both comparisons side by side (workdir: runs/ablation_tuned).

Change the grid or the seeds like any other value, e.g.
`--config.sweep.seeds="(0, 1, 2)"` or `--config.sweep.axes.dropout.values="('none', 'spatial')"`.
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("ablation", "full" if arg == "tuned" else arg or "full")
  config.model.dropout_rate = 0.2
  config.sweep.axes.dropout = config_dict.ConfigDict(
      {"key": "model.dropout", "values": ("none", "standard", "spatial")})
  config.sweep.axes.bn = config_dict.ConfigDict(
      {"key": "model.bn_placement", "values": ("none", "before_act", "after_act")})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2, 3, 4)
  # The cell every other is compared against (paired over seeds).
  config.sweep.baseline = "bn=none,dropout=none"
  if arg == "tuned":
    config.name = "ablation_tuned"
    config.sweep.nuisance.learning_rate = config_dict.ConfigDict(
        {"key": "optimizer.learning_rate", "log": (0.0125, 0.4)})
    config.sweep.tuning_method = "grid"
    config.sweep.tuning_budget = 6
    config.sweep.tuning_seeds = (1000, 1001, 1002)
  return config
