"""Variance-shift diagnostic (Li et al. 2019, "Understanding the disharmony between dropout and
batch normalization by variance shift").

Dropout scales its survivors by 1/(1-p) in training, which keeps the mean of a unit but not its
variance: a BatchNorm layer *after* dropout sees inputs of one variance in training and another at
test time, while normalising with running statistics gathered in training. For every BatchNorm
layer of a trained model this module measures, on one fixed batch of training images:

  var_train    mean over channels of the per-channel variance of the BN layer's input in training
               mode (dropout on, BN on batch statistics), over N, H, W;
  var_eval     the same in evaluation mode (dropout off, BN on running statistics);
  running_var  mean over channels of the running variance BN divides by at evaluation;
  ratio        var_train / var_eval: 1 means no shift; far from 1 means the eval-time inputs
               are not what the running statistics describe.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import data as data_lib
from cnnlab.base import files
from cnnlab.nets import layers
from cnnlab.training import restore, steps

DIAGNOSTIC_BATCH = 512


def bn_input_variances(model: nn.Module, variables: dict, images: jax.Array, *, train_mode: bool,
                       rngs: dict | None = None) -> dict[str, dict[str, float]]:
  """{BN layer path: {"var": mean per-channel input variance, "running_var": ...}} for one
  forward pass of `images` [N, H, W, C] in training or evaluation mode (one jitted program,
  compiled once per model and mode: a cell's seeds share it)."""
  found = _recording_forward(model, train_mode)(variables, images, rngs or {})
  return {name: {k: float(v) for k, v in d.items()} for name, d in found.items()}


@functools.lru_cache(maxsize=16)
def _recording_forward(model: nn.Module, train_mode: bool):
  """jit(variables, images, rngs -> {BN layer path: {"var", "running_var"}}) for `model`."""

  def forward(variables, images, rngs):
    found: dict[str, dict[str, jax.Array]] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if isinstance(module, layers.BatchNorm) and context.method_name == "__call__":
        x = jnp.asarray(args[0], jnp.float32)
        var = jnp.var(x, axis=tuple(range(x.ndim - 1)))
        running = module.get_variable("batch_stats", "var")
        name = "/".join(module.path) or module.name
        found[name] = {"var": jnp.mean(var),
                       "running_var": jnp.mean(running) if running is not None else jnp.nan}
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      if train_mode:
        model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
      else:
        model.apply(variables, images, train=False)
    return found

  return jax.jit(forward)


def variance_shift(config, workdir: str) -> list[dict[str, float | str]]:
  """The diagnostic records of one trained run (empty for a model without BatchNorm)."""
  state = restore.load_trained_state(config, workdir)
  if not jax.tree_util.tree_leaves(state.batch_stats):
    return []  # No BatchNorm: nothing to record, and no forward to compile.
  model = steps.setup(config).model
  batch = next(iter(data_lib.eval_batches(config.dataset, "train", DIAGNOSTIC_BATCH)))
  images = jnp.asarray(batch["image"])[: int(np.sum(batch["mask"]))]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  # Draw dropout masks as the last training step did.
  rngs = steps.step_rngs(state.rngs, state.step - 1)
  in_train = bn_input_variances(model, variables, images, train_mode=True, rngs=rngs)
  in_eval = bn_input_variances(model, variables, images, train_mode=False)
  return [{"layer": name, "var_train": in_train[name]["var"], "var_eval": in_eval[name]["var"],
           "running_var": in_eval[name]["running_var"],
           "ratio": in_train[name]["var"] / in_eval[name]["var"]} for name in in_eval]


def write_variance_shift(cell, seeds, seed_workdirs: list[str], path: str) -> list[dict]:
  """Averages the diagnostic of a cell's seeds (layer by layer) and writes it to `path`."""
  per_seed = [variance_shift(cell.seed_config(seed), workdir)
              for seed, workdir in zip(seeds, seed_workdirs)]
  averaged = [{"layer": record["layer"], **{
      key: float(np.mean([seed[i][key] for seed in per_seed]))
      for key in ("var_train", "var_eval", "running_var", "ratio")}}
      for i, record in enumerate(per_seed[0])] if per_seed else []  # No seed finished: none.
  files.write_json_atomic(path, averaged)
  return averaged
