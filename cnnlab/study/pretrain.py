"""A sweep's pretraining stage: the runs its cells start from (`init.source="sweep:pretrain"`).

`config.sweep.pretrain` holds overrides of the sweep's config (nested, e.g.
{"dataset": {"name": "mnist5k"}}) that make the pretraining config. Before any cell trains, one
pretraining run per sweep seed trains into <sweep workdir>/pretrain/seed_<s>; a cell's run of
seed s then starts from that run's weights (cnnlab.training.transfer). Empty overrides: no stage.
"""

from __future__ import annotations

import copy
import os
import time

import ml_collections

from cnnlab.base.locks import CellLock
from cnnlab.study.grid import finished
from cnnlab.study.settings import sweep_settings
from cnnlab.training.init_settings import init_defaults


def run_dir(sweep_workdir: str, seed: int) -> str:
  """The workdir of the pretraining run of `seed`."""
  return os.path.join(sweep_workdir, "pretrain", f"seed_{seed}")


def stage_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The pretraining run of every sweep seed: `config` without its sweep and init sections,
  updated with `config.sweep.pretrain` (empty: no stage, [])."""
  s = sweep_settings(config)
  if not s.pretrain:
    return []
  base = copy.deepcopy(config)
  with base.unlocked():
    del base["sweep"]
    base.init = init_defaults()
    base.update(s.pretrain)
  out = []
  for seed in s.seeds:
    seeded = copy.deepcopy(base)
    seeded.seed = seed
    out.append(seeded)
  return out


def run_stage(config: ml_collections.ConfigDict, sweep_workdir: str, *, poll_s: float = 2.0,
              **train_kwargs) -> None:
  """Trains the pretraining runs of `config`'s sweep (resumable; one process at a time holds
  <sweep_workdir>/pretrain/.lock, the others wait until every run is finished)."""
  from cnnlab.training import loop
  runs = [(c, run_dir(sweep_workdir, c.seed)) for c in stage_configs(config)]
  while not all(finished(d, c) for c, d in runs):
    lock = CellLock(os.path.join(sweep_workdir, "pretrain"))
    if not lock.acquire():
      lock.close()
      time.sleep(poll_s)
      continue
    try:
      for c, d in runs:
        if not finished(d, c):
          loop.train_and_evaluate(c, d, **train_kwargs)
    finally:
      lock.release()
