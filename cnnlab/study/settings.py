"""A sweep's settings (`config.sweep`): every field with its default, filled in and checked, so
that a sweep is refused before anything is written."""

from __future__ import annotations

import numbers

import ml_collections
from ml_collections import config_dict

from cnnlab.base.errors import ConfigError
from cnnlab.study import launchers, tuning
from cnnlab.training.validation import SEED_MAX, check_number, choice

VMAP_CHOICES = ("auto", "on", "off")
# Measured (see README, "Performance"): on this 2-core CPU vmapped seeds ran slower than one
# after another; on a GPU they share the idle device and win.
VMAP_AUTO = {"cpu": False, "gpu": True, "tpu": True}


def sweep_defaults(seed: int = 0) -> config_dict.ConfigDict:
  """Every field of `config.sweep`, with its default (the one place they are stated)."""
  sweep = config_dict.ConfigDict()
  # Named axes: axes.<name> = {key: dotted config key, values: tuple}; cells are their product.
  sweep.axes = config_dict.ConfigDict()
  sweep.seeds = (seed,)
  # The cell every other is paired with in the report ("" = the first cell).
  sweep.baseline = ""
  # Train a cell's seeds as one vmapped program: auto (= off on CPU, on on GPU/TPU) | on | off.
  sweep.vmap_seeds = "auto"
  # Processes training cells in parallel, each pinned to one core and one XLA thread. None: one
  # per CPU core this process may use (at most one per cell) when JAX runs on CPU with the local
  # launcher, else 1.
  sweep.workers = 1
  # "Steps to reach" this end-of-epoch accuracy, per cell.
  sweep.target_accuracy = 0.9
  # A pretraining stage (cnnlab.study.pretrain): overrides of the config (nested, e.g.
  # {"dataset": {"name": "mnist5k"}}) for runs trained once per seed into
  # <workdir>/pretrain/seed_<s> before any cell; cells start from them with
  # init.source="sweep:pretrain". Empty: no stage.
  sweep.pretrain = config_dict.ConfigDict()
  # Config keys set to each run's seed besides `seed`, e.g. ("dataset.subset_seed",): every
  # seed draws its own training subset, so the spread over seeds includes the draw's.
  sweep.seed_keys = ()
  # An axis to plot test accuracy against, one line per value of the other axes ("" = none).
  sweep.plot_axis = ""
  # Each cell's diagnostics for the report: BatchNorm's variance shift (train vs eval mode) and a
  # picture of the first layer's filters, about 1-1.5 s a cell on a CPU. A tuned sweep's tuning
  # trials skip them (no report compares the trials).
  sweep.diagnostics = True
  # The smallest test-accuracy difference worth detecting (0.01 = 1 point): the report says how
  # many seeds a paired t-test would need to detect it with 80% power.
  sweep.min_effect = 0.01
  # Nuisance hyperparameters (cnnlab.study.tuning), tuned for every cell on the validation
  # split before the cells are compared: {name: {key, and values=(...) | log=(low, high) |
  # linear=(low, high)}}. Empty: every cell trains at the config's values.
  sweep.nuisance = config_dict.ConfigDict()
  # Seeds of the tuning trials (disjoint from `seeds`, whose runs are the final, compared ones).
  sweep.tuning_seeds = (1000, 1001, 1002)
  # Trial points per cell: halton | sobol (scrambled quasi-random, `tuning_budget` points) |
  # grid (the product of the axes, `tuning_budget` points per range axis).
  sweep.tuning_method = "halton"
  sweep.tuning_budget = 8
  # With nuisance axes: also train every cell at the config's own (fixed) values with the final
  # seeds, so the report compares the cells both ways, side by side.
  sweep.compare_fixed = True
  # ((cell name, ((dotted key, value), ...)), ...): settings of single cells on top of the axes
  # (a tuned sweep sets each cell's chosen point here).
  sweep.cell_overrides = ()
  # Where workers run: local (`workers` processes on this machine) | slurm (a job array).
  sweep.launcher = "local"
  # launcher=slurm: a submitit job array; each job trains cells until none is left.
  sweep.slurm = config_dict.ConfigDict(dict(
      cluster="slurm",      # slurm | local (the same job array run on this machine, for a test)
      partition="", account="", qos="",   # "" = the cluster's default
      array_size=4, gpus_per_job=1, cpus_per_job=4, mem_gb=0, time_limit_min=240,
      max_requeues=3))
  return sweep


def sweep_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.sweep` with defaults filled in; a config without one is a single run. A baseline
  cell named with its axes in any order is named as its cell is (axes sorted)."""
  s = sweep_defaults(config.seed)
  if "sweep" in config:
    s.update(config.sweep)
  validate_sweep(s)
  if "," in s.baseline:
    s.baseline = ",".join(sorted(s.baseline.split(","), key=lambda part: part.partition("=")[0]))
  return s


def validate_sweep(settings: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid value of a sweep's settings (`config.sweep` with
  its defaults filled in: seeds, workers, vmap_seeds, target_accuracy, baseline), so that a sweep
  is refused before anything is written."""
  seeds = settings.seeds
  if (not isinstance(seeds, (tuple, list)) or not seeds
      or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                 and 0 <= s <= SEED_MAX for s in seeds)
      or len(set(seeds)) != len(seeds)):
    raise ConfigError(f"config.sweep.seeds={_as_tuple(seeds)!r} must be a non-empty tuple of "
                      f"distinct non-negative integers below 2**63, e.g. (0, 1, 2).")
  keys = settings.get("seed_keys", ())
  if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) and k for k in keys):
    raise ConfigError(f"config.sweep.seed_keys={_as_tuple(keys)!r} must be a tuple of dotted "
                      f"config keys, e.g. ('dataset.subset_seed',).")
  if settings.workers is not None:  # None: one per CPU core (sweep.worker_count).
    check_number("sweep.workers", settings.workers, low=1, integer=True)
  choice("sweep.vmap_seeds", settings.vmap_seeds, VMAP_CHOICES)
  choice("sweep.diagnostics", settings.get("diagnostics", True), (True, False))
  check_number("sweep.target_accuracy", settings.target_accuracy, low=0, high=1, low_open=True)
  if settings.get("min_effect") is not None:
    check_number("sweep.min_effect", settings.min_effect, low=0, high=1, low_open=True)
  choice("sweep.launcher", settings.get("launcher", "local"), launchers.LAUNCHERS)
  if "slurm" in settings:  # Checked whatever the launcher: a value set is honoured or refused.
    launchers.slurm_settings(settings.slurm.to_dict())
  if settings.get("nuisance"):
    validate_tuning(settings)
  if not isinstance(settings.baseline, str):
    raise ConfigError(f"config.sweep.baseline={settings.baseline!r} must be a cell name (a "
                      f"string; \"\" = the first cell).")


def validate_tuning(settings: ml_collections.ConfigDict) -> None:
  """The tuning settings of a sweep with nuisance axes: a valid space (one-line errors naming
  the field), a method and budget that give points, and tuning seeds disjoint from the final
  ones (a final run must not reuse a tuning run's seed: its result would be selected on)."""
  axes = tuning.parse_space(settings.nuisance, tuple(
      key for axis in settings.axes.values()
      for key in (axis.get("keys") or (axis.get("key"),))))
  tuning.points(axes, settings.tuning_method, settings.tuning_budget)
  seeds = settings.tuning_seeds
  if (not isinstance(seeds, (tuple, list)) or not seeds
      or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                 and 0 <= s <= SEED_MAX for s in seeds) or len(set(seeds)) != len(seeds)):
    raise ConfigError(f"config.sweep.tuning_seeds={_as_tuple(seeds)!r} must be a non-empty tuple "
                      f"of distinct non-negative integers, e.g. (1000, 1001, 1002).")
  shared = sorted(set(seeds) & set(settings.seeds))
  if shared:
    raise ConfigError(f"config.sweep.tuning_seeds and config.sweep.seeds share {shared}; the "
                      f"final runs need fresh seeds, disjoint from the tuning ones.")
  choice("sweep.compare_fixed", settings.compare_fixed, (True, False))


def _as_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else value
