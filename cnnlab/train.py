"""Training: a row of small pure functions, after google/flax examples/imagenet.

`create_train_state` -> `train_step` / `eval_step` (pure, jit-compiled, state donated) ->
`train_and_evaluate` (the loop: data, logging, checkpoints, results). The steps take and return
plain pytrees, so they can be `jax.vmap`-ed over seeds and sharded over devices unchanged.

RNG discipline: `jax.random.key(config.seed)` is split once into the streams `params`, `dropout`,
`channel_dropout` and `data`; the train step draws with `fold_in(stream_key, step)`, so a resumed run
draws exactly the masks an uninterrupted one draws.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from cnnlab import data as data_lib
from cnnlab import environment, models, optim, rundir
from cnnlab.checkpoint import Checkpointer
from cnnlab.errors import TrainingDivergedError
from cnnlab.validation import validate_config

DROPOUT_STREAMS = ("dropout", "channel_dropout")


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; `apply_fn` and `tx` are static."""
  step: jax.Array                 # int32 scalar: optimizer steps taken.
  params: Any
  batch_stats: Any                # BatchNorm running statistics (may be an empty dict).
  opt_state: Any
  rngs: dict[str, jax.Array]      # one key per dropout stream; fold_in(step) per step.
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def split_seed(seed: int) -> dict[str, jax.Array]:
  """One root key, split once into the named streams every run uses."""
  names = ("params",) + DROPOUT_STREAMS + ("data",)
  return dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))


def data_seed(key: jax.Array) -> int:
  """A host integer seed for the data order, derived from the `data` stream."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def create_train_state(model, tx: optax.GradientTransformation, streams: dict[str, jax.Array],
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises parameters and BN statistics for inputs of shape `input_shape` = (H, W, C)."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init({"params": k}, dummy, train=False))(streams["params"])
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      rngs={name: streams[name] for name in DROPOUT_STREAMS},
      apply_fn=model.apply, tx=tx)


def step_rngs(rngs: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
  """The keys a train step at `step` draws its dropout masks from: fold_in(stream key, step)."""
  return {name: jax.random.fold_in(key, step) for name, key in rngs.items()}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy; logits [B, K] float, labels [B] int -> [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               aux_loss_weight: float = 0.3) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on `batch` = {"image": [B,H,W,C], "label": [B]}; BN and dropout in train mode.

  Auxiliary classifiers a model sows into the `aux_logits` collection add their cross-entropy
  times `aux_loss_weight` to the loss. Returns the new state and {"loss", "accuracy"} scalars
  (of the main head).
  """
  rngs = step_rngs(state.rngs, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        rngs=rngs, mutable=["batch_stats", "aux_logits"])
    loss = cross_entropy(logits, batch["label"]).mean()
    total = loss
    for aux in jax.tree_util.tree_leaves(updates.get("aux_logits", {})):
      total = total + aux_loss_weight * cross_entropy(aux, batch["label"]).mean()
    return total, (loss, logits, updates.get("batch_stats", {}))

  grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
  return state, {"loss": loss, "accuracy": accuracy}


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


def evaluate(eval_fn, state: TrainState, batches, dtype) -> dict[str, float]:
  """Mean loss and accuracy of `state` over every batch of a split."""
  totals = None
  for batch in batches:
    batch = dict(batch, image=jnp.asarray(batch["image"], dtype))
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {"loss": float(totals["loss_sum"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}


def state_digest(state: TrainState) -> str:
  """SHA-256 of the bytes of params and batch_stats: equal digests mean bit-identical weights."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(jax.device_get((state.params, state.batch_stats))):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def _checkpointed(state: TrainState) -> dict[str, Any]:
  """The parts of the state a checkpoint stores (the RNG keys are re-derived from the seed)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overrides: tuple[str, ...] = (), command: str = "",
                       progress: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns results.json's dict.

  A workdir that already holds results.json for the same config is not retrained.
  """
  validate_config(config)
  run = rundir.RunDir(workdir)
  run.claim(config, overrides=overrides, command=command)
  if run.finished():
    print(f"{workdir} already holds a finished run of this config: {run.results_path}")
    return run.read_results()

  info = data_lib.dataset_info(config.dataset)
  dtype = jnp.dtype(config.dtype)
  streams = split_seed(config.seed)
  train_iter = data_lib.train_iterator(config.dataset, config.batch_size, data_seed(streams["data"]))
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = steps_per_epoch * config.num_epochs
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
  model = models.get_model(config.model, info.num_classes, dtype=dtype)
  state = create_train_state(model, optim.create_optimizer(config.optimizer, schedule),
                             streams, info.image_shape)

  checkpointer = Checkpointer(run.checkpoint_dir, keep=config.checkpoints_to_keep)
  elapsed_before = 0.0
  latest = checkpointer.latest_step()
  if latest is not None:
    restored, saved = checkpointer.restore(latest, _checkpointed(state))
    run.check_fingerprint(saved["config_fingerprint"])
    state = state.replace(**restored)
    train_iter.set_state(saved["data_iterator"])
    elapsed_before = saved["wall_time_s"]
    print(f"resuming {workdir} from step {latest} of {total_steps}")
  run.truncate_metrics(after_step=latest or 0)

  aux_weight = float(config.model.get("aux_loss_weight", 0.3))
  train_fn = jax.jit(lambda s, b: train_step(s, b, aux_weight), donate_argnums=0)
  eval_fn = jax.jit(eval_step)
  eval_split = lambda state, split: evaluate(
      eval_fn, state, data_lib.eval_batches(config.dataset, split, config.eval_batch_size), dtype)

  start_time = time.perf_counter()
  wall = lambda: elapsed_before + time.perf_counter() - start_time
  # Checkpoints are only written where the metric accumulators are empty (log points), so a
  # resumed run logs exactly the lines an uninterrupted one logs.
  log_every = config.log_every_steps
  ckpt_every = max(log_every, config.checkpoint_every_steps // log_every * log_every)
  bar = rundir.progress_bar(total_steps, int(state.step), enabled=progress, desc=config.name)
  sums, count = None, 0
  for step in range(int(state.step), total_steps):
    batch = next(train_iter)
    batch = {"image": jnp.asarray(batch["image"], dtype), "label": jnp.asarray(batch["label"])}
    state, metrics = train_fn(state, batch)
    sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
    count += 1
    done = step + 1
    end_of_epoch = done % steps_per_epoch == 0
    bar.update(1)
    if done % log_every and not end_of_epoch:
      continue
    means = {k: float(v) / count for k, v in jax.device_get(sums).items()}  # host sync.
    sums, count = None, 0
    if not np.isfinite(means["loss"]):
      raise TrainingDivergedError(
          f"the training loss became {means['loss']} at step {done} (epoch "
          f"{done / steps_per_epoch:.2f}); lower optimizer.learning_rate (now "
          f"{config.optimizer.learning_rate}) or add BatchNorm. No results.json was written.")
    run.log({"step": done, "epoch": done / steps_per_epoch, "split": "train", **means,
             "learning_rate": float(schedule(step)), "wall_time_s": wall()})
    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}")
    if end_of_epoch:
      test = eval_split(state, "test")
      run.log({"step": done, "epoch": done / steps_per_epoch, "split": "test", **test})
      bar.set_postfix(loss=f"{means['loss']:.4f}", test_acc=f"{test['accuracy']:.4f}")
    if end_of_epoch or done % ckpt_every == 0:
      checkpointer.save(done, _checkpointed(state), {
          "data_iterator": train_iter.get_state(), "wall_time_s": wall(),
          "config_fingerprint": run.fingerprint})
  bar.close()
  checkpointer.close()

  test = eval_split(state, "test")
  train = eval_split(state, "train")
  results = {
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
      "epochs": config.num_epochs, "steps": total_steps, "seed": config.seed,
      "dataset": info.name, "model": config.model.name,
      "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
      "params_sha256": state_digest(state),
      "config_fingerprint": run.fingerprint,
      "environment": {k: v for k, v in environment.describe(config.dtype).items()
                      if k in environment.BIT_DETERMINING_KEYS + ("git_commit",)},
      "wall_time_s": wall(),
  }
  run.write_results(results)
  return results
