"""Default experiment: LeNet-5 on the offline `mnist5k` dataset (real MNIST digits).

Run it with:

    python launch.py --config=experiments/default.py --workdir=runs/default

Override any value on the command line, after `--config`:

    python launch.py --config=experiments/default.py --config.model.dropout=spatial \
        --config.model.dropout_rate=0.2 --config.model.bn_placement=before_act
"""

from cnnlab.configs import base_config


def get_config(arg: str | None = None):
  """LeNet-5 on mnist5k: the base config as it is. Takes no variant."""
  if arg:
    raise ValueError(f"experiments/default.py takes no variant (got {arg!r}).")
  return base_config()
