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

from cnnlab.configs import base_config

VARIANTS = ("full", "quick", "cifar10")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "full"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/ablation.py:{variant} is not a variant; choose one of: "
                     f"{', '.join(VARIANTS)}.")
  config = base_config()
  config.name = "ablation" if variant == "full" else f"ablation_{variant}"
  config.model.name = "vgg_cnn"
  config.model.stages = ((16,), (32,), (64,))
  config.model.head = "gap"
  config.model.dropout_rate = 0.2
  config.optimizer.learning_rate = 0.05
  config.optimizer.warmup_epochs = 0.5
  config.batch_size = 64
  config.num_epochs = 4
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100

  config.sweep = config_dict.ConfigDict()
  config.sweep.axes = config_dict.ConfigDict()
  config.sweep.axes.dropout = config_dict.ConfigDict(
      {"key": "model.dropout", "values": ("none", "standard", "spatial")})
  config.sweep.axes.bn = config_dict.ConfigDict(
      {"key": "model.bn_placement", "values": ("none", "before_act", "after_act")})
  config.sweep.seeds = (0, 1, 2, 3, 4)
  # The cell every other is compared against (paired over seeds).
  config.sweep.baseline = "bn=none,dropout=none"
  # Train a cell's seeds as one vmapped program: auto (= off on CPU, on on GPU/TPU) | on | off.
  config.sweep.vmap_seeds = "auto"
  # Processes training cells in parallel, each pinned to one core and one XLA thread.
  config.sweep.workers = 1
  # "Steps to reach" this end-of-epoch test accuracy, per cell.
  config.sweep.target_accuracy = 0.95

  if variant == "quick":
    config.dataset.name = "digits"
    config.model.stages = ((8,), (16,))
    config.batch_size = 32
    config.num_epochs = 2
    config.log_every_steps = 10
    config.checkpoint_every_steps = 20
    config.sweep.seeds = (0, 1)
    config.sweep.target_accuracy = 0.5
  elif variant == "cifar10":
    config.dataset.name = "cifar10"
    config.dataset.augment = True
    config.model.stages = ((64, 64), (128, 128), (256, 256))
    config.batch_size = 128
    config.num_epochs = 30
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.sweep.target_accuracy = 0.8
  return config
