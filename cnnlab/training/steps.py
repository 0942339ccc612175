"""One training step and what it needs: a row of small pure functions, after flax's
examples/imagenet (the loop that runs them is cnnlab.training.loop).

    setup(config)            data facts, model, schedule, optimizer
    create_train_state(...)  parameters, BN statistics, optimizer state, RNG streams
    train_step / eval_step   pure, jit-compiled over a device mesh (cnnlab.training.mesh)

One run trains data-parallel over every device (`config.batch_size` is the global batch). K seeds
trained as one vmapped program (cnnlab.training.seeds) use the same steps under `jax.vmap`.

RNG discipline: `jax.random.key(config.seed)` is split once into the streams `params`, `dropout`,
`channel_dropout` and `data`; the train step draws with `fold_in(stream_key, step)`, so a resumed
run draws exactly the masks an uninterrupted one draws.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from cnnlab import data as data_lib
from cnnlab.nets import models
from cnnlab.training import init_settings, optim, rundir
from cnnlab.training import mesh as mesh_lib

DROPOUT_STREAMS = ("dropout", "channel_dropout")
# Non-finite checks the train step makes, in the order they are reported.
HEALTH_KEYS = ("nonfinite_loss", "nonfinite_gradients", "nonfinite_params", "nonfinite_bn_stats")


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; `apply_fn` and `tx` are static."""
  step: jax.Array                 # int32 scalar: optimizer steps taken.
  params: Any
  batch_stats: Any                # BatchNorm running statistics (may be an empty dict).
  opt_state: Any
  rngs: dict[str, jax.Array]      # one key per dropout stream; fold_in(step) per step.
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  # `tx.update`'s keyword inputs (optim.runtime_inputs: the learning rate, a float32 scalar);
  # derived from the config like `rngs`, not checkpointed.
  tx_inputs: dict[str, jax.Array] = struct.field(default_factory=dict)


def split_seed(seed: int) -> dict[str, jax.Array]:
  """One root key, split once into the named streams every run uses."""
  names = ("params",) + DROPOUT_STREAMS + ("data",)
  return dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))


def data_seed(key: jax.Array) -> int:
  """A host integer seed for the data order, derived from the `data` stream."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def init_program(model, tx: optax.GradientTransformation, input_shape: tuple[int, ...]):
  """key -> (params, batch_stats, opt_state): `model.init` and `tx.init` as one function."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)

  def init(key):
    variables = model.init({"params": key}, dummy, train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params)
  return init


# XLA options of the jitted initialisation per backend (see `_init_fn`).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


@functools.lru_cache(maxsize=32)
def _init_fn(model, tx: optax.GradientTransformation, input_shape: tuple[int, ...]):
  """`init_program` jitted, cached so that the seeds of a cell compile it once (run op by op,
  the optimizer's init alone compiled dozens of small programs).

  On CPU it is compiled at LLVM optimisation level 1: its threefry draws took XLA 3-6 s to
  compile at the default level (LeNet-5 6.4 s, ResNet-20 6.5 s) and take 1-2 s at level 1, for
  a program that runs once. The values are bit-identical (tests/test_train.py checks it across
  the model zoo); the train and eval steps keep the default level.
  """
  return jax.jit(init_program(model, tx, input_shape),
                 compiler_options=INIT_COMPILER_OPTIONS.get(jax.default_backend()))



def create_train_state(model, tx: optax.GradientTransformation, streams: dict[str, jax.Array],
                       input_shape: tuple[int, ...], *, abstract: bool = False) -> TrainState:
  """Initialises parameters and BN statistics for inputs of shape `input_shape` = (H, W, C);
  `abstract`: only their shapes and dtypes (`jax.eval_shape`: nothing is computed or compiled)."""
  if abstract:
    init = functools.partial(jax.eval_shape, init_program(model, tx, tuple(input_shape)))
  else:
    init = _init_fn(model, tx, tuple(input_shape))
  params, batch_stats, opt_state = init(streams["params"])
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=opt_state, rngs={name: streams[name] for name in DROPOUT_STREAMS},
      apply_fn=model.apply, tx=tx, tx_inputs=optim.runtime_inputs(tx))


def step_rngs(rngs: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
  """The keys a train step at `step` draws its dropout masks from: fold_in(stream key, step)."""
  return {name: jax.random.fold_in(key, step) for name, key in rngs.items()}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy; logits [B, K] float, labels [B] int -> [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _nonfinite(tree) -> jax.Array:
  """1.0 if any element of `tree` is NaN or infinite, else 0.0 (float32 scalar)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()
  return 1.0 - finite.astype(jnp.float32)


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Cross-entropy against labels smoothed by `smoothing` (Szegedy et al. 2016): the target puts
  1 - smoothing + smoothing / K on the true class and smoothing / K on each other; [B]."""
  if not smoothing:
    return cross_entropy(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict[str, jax.Array], aux_loss_weight: float,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on `batch` = {"image": [B,H,W,C], "label": [B]}; BN and dropout in train mode.

  Auxiliary classifiers a model sows into the `aux_logits` collection add their cross-entropy
  times `aux_loss_weight` to the loss; every cross-entropy is against targets smoothed by
  `label_smoothing`. Returns the new state and scalars: "loss", "accuracy" (of the main head)
  and the HEALTH_KEYS (1.0 where the loss, the gradients, the new parameters or the new BN
  statistics hold a NaN/inf).
  """
  rngs = step_rngs(state.rngs, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        rngs=rngs, mutable=["batch_stats", "aux_logits"])
    loss = smoothed_cross_entropy(logits, batch["label"], label_smoothing).mean()
    total = loss
    for aux in jax.tree_util.tree_leaves(updates.get("aux_logits", {})):
      total = total + aux_loss_weight * smoothed_cross_entropy(aux, batch["label"],
                                                               label_smoothing).mean()
    return total, (loss, logits, updates.get("batch_stats", {}))

  grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **state.tx_inputs)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
  health = dict(zip(HEALTH_KEYS, (_nonfinite(loss), _nonfinite(grads), _nonfinite(state.params),
                                  _nonfinite(batch_stats))))
  return state, {"loss": loss, "accuracy": accuracy, **health}


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the unmasked examples of a padded batch.

  Uses the running BN statistics and no dropout. `batch["mask"]` [B] is 0 for padding.
  """
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=False)
  mask = batch["mask"]
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
          "correct": (correct * mask).sum(), "count": mask.sum()}


def state_digest(state: TrainState) -> str:
  """SHA-256 of the bytes of params and batch_stats: equal digests mean bit-identical weights."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(mesh_lib.to_host((state.params, state.batch_stats))):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def checkpointed(state: TrainState) -> dict[str, Any]:
  """The parts of the state a checkpoint stores (the RNG keys are re-derived from the seed)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


class Setup(NamedTuple):
  """What a config builds before training: data facts, model, schedule, optimizer."""
  info: data_lib.DatasetInfo
  model: Any
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation


_SETUPS: dict[str, Setup] = {}


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Builds the dataset facts, model, learning-rate schedule and optimizer of `config`.

  Cached by the config's fingerprint without the seed, so the seeds of a sweep cell share one
  model and optimizer object, and with them the compiled train and eval steps. The learning
  rate is an input of the train step (optim.rate_as_input): configs that differ only in it
  compile one program.
  """
  key = rundir.fingerprint(config, exclude=("seed",))
  if key not in _SETUPS:
    info = data_lib.dataset_info(config.dataset)
    model = models.get_model(config.model, info.num_classes, dtype=jnp.dtype(config.dtype))
    steps_per_epoch = info.num_train // config.batch_size  # Each epoch drops its remainder.
    total_steps = steps_per_epoch * config.num_epochs
    schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
    model, param_labels, lr_scales = init_settings.prepare(config, model, info.image_shape)
    tx = optim.build_optimizer(config.optimizer, steps_per_epoch, total_steps, param_labels,
                               lr_scales)
    _SETUPS[key] = Setup(info, model, steps_per_epoch, total_steps, schedule, tx)
  return _SETUPS[key]


def lowered_flops(lowered: jax.stages.Lowered) -> float:
  """XLA's FLOP count of a lowered program (the whole program: every seed and device)."""
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:  # PJRT plugin backends (GPUs) count only compiled programs.
    cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])
