"""Standard vs spatial dropout over dropout rates 0.1-0.5 (BN before the activation), over seeds.

Run it with:

    python launch.py --config=experiments/dropout_rates.py

(workdir: runs/dropout_rates; 2 kinds x 5 rates x 3 seeds on mnist5k). Variants:

    python launch.py --config=experiments/dropout_rates.py:quick    # digits, 2 seeds, smoke test
    python launch.py --config=experiments/dropout_rates.py:cifar10  # needs CIFAR-10 prepared

The baseline is standard dropout at rate 0.1; the report pairs every other cell with it.
"""

from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = sweep_base("dropout_rates", arg or "full")
  config.model.bn_placement = "before_act"
  config.sweep.axes.dropout = config_dict.ConfigDict(
      {"key": "model.dropout", "values": ("standard", "spatial")})
  config.sweep.axes.rate = config_dict.ConfigDict(
      {"key": "model.dropout_rate", "values": (0.1, 0.2, 0.3, 0.4, 0.5)})
  config.sweep.seeds = (0, 1) if arg == "quick" else (0, 1, 2)
  config.sweep.baseline = "dropout=standard,rate=0.1"
  return config
