"""Transfer learning: MNIST digits -> scikit-learn digits, by method and amount of target data.

Run it with:

    python launch.py --config=experiments/transfer.py

(workdir: runs/transfer). A VGG-style CNN (BN before the activation) is pretrained once per seed
on mnist5k shrunk to 8x8 (<workdir>/pretrain/seed_<s>, shared by every cell), then trained on
scikit-learn's 8x8 digits with 2, 10, 50 or all (~129 once sweep_base's 10% validation share is
held out) training examples per class, four ways:

    scratch     no source: the same network from a random initialisation;
    probe       the source's network with a new head; everything but the head frozen (a linear
                probe on frozen features, BN on the source's running statistics);
    last_stage  a new head; the first two stages frozen, the last stage and the head trained;
    full        a new head; everything trained, the transferred layers at 1/10 of the rate.

Every cell takes the same number of steps (a small subset is repeated to the whole split's length
per epoch). Seed s draws its own subset (subset_seed = s), the same for every method, so the spread
over seeds includes which examples were drawn and the pairs share them. The report pairs every
method with `scratch` at the same data size, over 5 seeds, and plots test accuracy against the data
size per method (accuracy_by_per_class.png).

Why this pair: both are handwritten digits (related tasks, so transfer can help), but from
different writers, scanners and preprocessing (MNIST's 28x28 anti-aliased strokes vs digits'
8x8 counts of 4x4 blocks), so the source is not the target; the source is the larger set (4,000
vs 1,433 training images); and at 8x8 the whole grid fits in minutes on two CPU cores. The head
is replaced although both have 10 classes ("replace the last layer"), so no method inherits the
source's class mapping. Variants:

    python launch.py --config=experiments/transfer.py:quick    # smoke test (~1 min): 2 seeds,
                                                              # 2 sizes, short pretraining
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base
from cnnlab.training import init_settings

NEW_HEAD = ("head/*",)
RECIPES = {
    "scratch": {"source": ""},
    "probe": {"source": init_settings.SWEEP_PRETRAIN, "reinit": NEW_HEAD,
              "freeze": ("*", "!head/*")},
    "last_stage": {"source": init_settings.SWEEP_PRETRAIN, "reinit": NEW_HEAD,
                   "freeze": ("stage0_*", "stage1_*")},
    "full": {"source": init_settings.SWEEP_PRETRAIN, "reinit": NEW_HEAD, "body_lr_scale": 0.1},
}
VARIANTS = ("full", "quick")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  variant = arg or "full"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/transfer.py:{variant} is not a variant; choose one of: "
                     f"{', '.join(VARIANTS)}.")
  config = sweep_base("transfer")
  config.name = "transfer" if variant == "full" else f"transfer_{variant}"
  config.dataset.name = "digits"
  config.model.bn_placement = "before_act"
  config.model.dropout = "none"
  config.num_epochs = 6
  config.batch_size = 32
  config.log_every_steps = 22
  config.checkpoint_every_steps = 132
  for name, recipe in RECIPES.items():
    config.init.recipes[name] = config_dict.ConfigDict(recipe)

  config.sweep.pretrain = config_dict.ConfigDict(
      {"dataset": {"name": "mnist5k", "resize": (8, 8)}, "num_epochs": 6, "batch_size": 64,
       "log_every_steps": 31, "checkpoint_every_steps": 186})
  config.sweep.axes.method = config_dict.ConfigDict(
      {"key": "init.recipe", "values": tuple(RECIPES)})
  config.sweep.axes.per_class = config_dict.ConfigDict(
      {"key": "dataset.train_per_class", "values": (2, 10, 50, None)})
  config.sweep.seeds = (0, 1, 2, 3, 4)
  config.sweep.seed_keys = ("dataset.subset_seed",)  # Each seed its own subset of the target.
  config.sweep.baseline = "method=scratch"
  config.sweep.plot_axis = "per_class"
  config.sweep.target_accuracy = 0.9

  if variant == "quick":
    config.num_epochs = 1
    config.sweep.pretrain.num_epochs = 1
    config.sweep.axes.per_class.values = (10, None)
    config.sweep.seeds = (0, 1)
    config.sweep.target_accuracy = 0.5
  return config
