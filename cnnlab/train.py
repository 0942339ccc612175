"""Training: a row of small pure functions, after google/flax examples/imagenet.

`create_train_state` -> `train_step` / `eval_step` (pure, jit-compiled, state donated) ->
`train_and_evaluate` (the loop: data, logging, checkpoints, results). The steps take and return
plain pytrees, so they can be `jax.vmap`-ed over seeds and sharded over devices unchanged.

RNG discipline: `jax.random.key(config.seed)` is split once into the streams `params`, `dropout`,
`channel_dropout` and `data`; the train step draws with `fold_in(stream_key, step)`, so a resumed run
draws exactly the masks an uninterrupted one draws.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any, Callable, NamedTuple

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


@functools.lru_cache(maxsize=32)
def _init_fn(model, input_shape: tuple[int, ...]):
  """The jitted `model.init`, cached so that the seeds of a cell compile it once."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  return jax.jit(lambda key: model.init({"params": key}, dummy, train=False))


def create_train_state(model, tx: optax.GradientTransformation, streams: dict[str, jax.Array],
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initialises parameters and BN statistics for inputs of shape `input_shape` = (H, W, C)."""
  variables = _init_fn(model, tuple(input_shape))(streams["params"])
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


def evaluate(eval_fn, state: TrainState, batches, dtype, num_seeds: int) -> list[dict]:
  """Mean loss and accuracy over every batch of a split, for each of the `num_seeds` states
  stacked in `state` (eval_fn maps over the leading seed axis)."""
  totals = None
  for batch in batches:
    batch = dict(batch, image=jnp.asarray(batch["image"], dtype))
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return [{"loss": float(totals["loss_sum"][i] / totals["count"][i]),
           "accuracy": float(totals["correct"][i] / totals["count"][i])}
          for i in range(num_seeds)]


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
  return train_seeds([config], [workdir], vmap_seeds=False, overrides=overrides,
                     command=command, progress=progress)[0]


class _Seat:
  """One seed's share of a group: its config, workdir, data iterator and checkpointer."""

  def __init__(self, config, workdir, overrides, command):
    self.config = config
    self.run = rundir.RunDir(workdir)
    self.run.claim(config, overrides=overrides, command=command)
    self.streams = split_seed(config.seed)

  def open(self, keep: int) -> None:
    """Builds the data iterator (may raise a DatasetError/ConfigError) and the checkpointer."""
    self.train_iter = data_lib.train_iterator(
        self.config.dataset, self.config.batch_size, data_seed(self.streams["data"]))
    self.checkpointer = Checkpointer(self.run.checkpoint_dir, keep=keep)


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n):
  return [jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(n)]


@functools.lru_cache(maxsize=None)
def _group_steps(vmap_seeds: bool, aux_weight: float):
  """Jitted train/eval steps over a leading seed axis S: vmapped, or S=1 run unbatched."""
  step = lambda s, b: train_step(s, b, aux_weight)
  if vmap_seeds:
    train_fn, eval_fn = jax.vmap(step), jax.vmap(eval_step, in_axes=(0, None))
  else:  # S == 1: the plain step, so a single run computes exactly what it would alone.
    first = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
    add = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
    train_fn = lambda s, b: add(step(first(s), first(b)))
    eval_fn = lambda s, b: add(eval_step(first(s), b))
  return jax.jit(train_fn, donate_argnums=0), jax.jit(eval_fn)


def train_seeds(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                vmap_seeds: bool, overrides=(), command: str = "",
                progress: bool = True) -> list[dict[str, Any]]:
  """Trains configs that differ only in `seed`, each in its own workdir, as one program.

  With `vmap_seeds` the steps are `jax.vmap`-ed over a leading seed axis S (params, batch_stats,
  optimizer state and RNG keys are stacked); each seed keeps its own data order, its own
  workdir, metrics, checkpoints and results.json, exactly as its single run would lay them out.
  Without it, `configs` must hold one config. Finished seeds are skipped; unfinished ones resume
  from the latest checkpoint step they all hold.
  """
  for config in configs:
    validate_config(config)
  environment.apply_numerics(configs[0].deterministic, configs[0].matmul_precision)
  if not vmap_seeds and len(configs) != 1:
    raise ValueError("train_seeds without vmap_seeds takes exactly one config")
  seats = [_Seat(c, w, overrides, command) for c, w in zip(configs, workdirs)]
  results = {id(s): s.run.read_results() for s in seats if s.run.finished()}
  for seat in seats:
    if id(seat) in results:
      print(f"{seat.run.workdir} already holds a finished run of this config: "
            f"{seat.run.results_path}")
  todo = [s for s in seats if id(s) not in results]
  if todo:
    for seat, res in zip(todo, _train_group(todo, vmap_seeds, progress)):
      results[id(seat)] = res
  return [results[id(s)] for s in seats]


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
  model and optimizer object, and with them the jit cache of the train and eval steps.
  """
  key = rundir.fingerprint(config, exclude=("seed",))
  if key not in _SETUPS:
    _SETUPS[key] = _build_setup(config)
  return _SETUPS[key]


def _build_setup(config: ml_collections.ConfigDict) -> Setup:
  info = data_lib.dataset_info(config.dataset)
  model = models.get_model(config.model, info.num_classes, dtype=jnp.dtype(config.dtype))
  steps_per_epoch = info.num_train // config.batch_size  # Each epoch drops its remainder.
  total_steps = steps_per_epoch * config.num_epochs
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, total_steps)
  return Setup(info, model, steps_per_epoch, total_steps, schedule,
               optim.create_optimizer(config.optimizer, schedule))


def load_trained_state(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """The state of the latest checkpoint in `workdir` (the final one, for a finished run)."""
  s = setup(config)
  state = create_train_state(s.model, s.tx, split_seed(config.seed), s.info.image_shape)
  checkpointer = Checkpointer(rundir.RunDir(workdir).checkpoint_dir)
  try:
    restored, _ = checkpointer.restore(checkpointer.latest_step(), _checkpointed(state))
  finally:
    checkpointer.close()
  return state.replace(**restored)


def _train_group(seats: list[_Seat], vmap_seeds: bool, progress: bool) -> list[dict[str, Any]]:
  config = seats[0].config  # Everything but the seed is shared.
  info, model, steps_per_epoch, total_steps, schedule, tx = setup(config)
  dtype = jnp.dtype(config.dtype)
  keep = max(2, config.checkpoints_to_keep)  # A group needs the step before the latest.
  for seat in seats:
    seat.open(keep)
  assert seats[0].train_iter.steps_per_epoch == steps_per_epoch
  states = [create_train_state(model, tx, s.streams, info.image_shape) for s in seats]

  elapsed_before = 0.0
  latest = _common_latest_step(seats)
  if latest is not None:
    for i, seat in enumerate(seats):
      restored, saved = seat.checkpointer.restore(latest, _checkpointed(states[i]))
      seat.run.check_fingerprint(saved["config_fingerprint"])
      states[i] = states[i].replace(**restored)
      seat.train_iter.set_state(saved["data_iterator"])
      elapsed_before = max(elapsed_before, saved["wall_time_s"])
    print(f"resuming {', '.join(s.run.workdir for s in seats)} from step {latest} of "
          f"{total_steps}")
  for seat in seats:
    seat.run.truncate_metrics(after_step=latest or 0)
  state = _stack(states)
  n = len(seats)

  train_fn, eval_fn = _group_steps(vmap_seeds, float(config.model.get("aux_loss_weight", 0.3)))
  eval_split = lambda state, split: evaluate(
      eval_fn, state, data_lib.eval_batches(config.dataset, split, config.eval_batch_size), dtype,
      n)
  start_time = time.perf_counter()
  wall = lambda: elapsed_before + time.perf_counter() - start_time
  # Checkpoints are only written where the metric accumulators are empty (log points), so a
  # resumed run logs exactly the lines an uninterrupted one logs.
  log_every = config.log_every_steps
  ckpt_every = max(log_every, config.checkpoint_every_steps // log_every * log_every)
  first_step = int(state.step[0])
  bar = rundir.progress_bar(total_steps, first_step, enabled=progress, desc=config.name)
  sums, count = None, 0
  for step in range(first_step, total_steps):
    batches = [next(seat.train_iter) for seat in seats]
    batch = {"image": jnp.asarray(np.stack([b["image"] for b in batches]), dtype),
             "label": jnp.asarray(np.stack([b["label"] for b in batches]))}
    state, metrics = train_fn(state, batch)
    sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
    count += 1
    done = step + 1
    end_of_epoch = done % steps_per_epoch == 0
    bar.update(1)
    if done % log_every and not end_of_epoch:
      continue
    means = jax.device_get(sums)  # The only host sync: at log points.
    sums, count_now, count = None, count, 0
    epoch = done / steps_per_epoch
    lr = float(schedule(step))
    for i, seat in enumerate(seats):
      line = {k: float(v[i]) / count_now for k, v in means.items()}
      if not np.isfinite(line["loss"]):
        raise TrainingDivergedError(
            f"the training loss of seed {seat.config.seed} became {line['loss']} at step {done} "
            f"(epoch {epoch:.2f}); lower optimizer.learning_rate (now "
            f"{config.optimizer.learning_rate}) or add BatchNorm. No results.json was written.")
      seat.run.log({"step": done, "epoch": epoch, "split": "train", **line,
                    "learning_rate": lr, "wall_time_s": wall()})
    postfix = {"loss": f"{float(means['loss'].mean()) / count_now:.4f}",
               "acc": f"{float(means['accuracy'].mean()) / count_now:.3f}"}
    if end_of_epoch:
      test = eval_split(state, "test")
      for i, seat in enumerate(seats):
        seat.run.log({"step": done, "epoch": epoch, "split": "test", **test[i]})
      postfix["test_acc"] = f"{np.mean([t['accuracy'] for t in test]):.4f}"
    bar.set_postfix(postfix)
    if end_of_epoch or done % ckpt_every == 0:
      for seat, seed_state in zip(seats, _unstack(state, n)):
        seat.checkpointer.save(done, _checkpointed(seed_state), {
            "data_iterator": seat.train_iter.get_state(), "wall_time_s": wall(),
            "config_fingerprint": seat.run.fingerprint})
  bar.close()

  test, train = eval_split(state, "test"), eval_split(state, "train")
  env = {k: v for k, v in environment.describe(config.dtype).items()
         if k in environment.BIT_DETERMINING_KEYS + ("git_commit",)}
  out = []
  for i, (seat, seed_state) in enumerate(zip(seats, _unstack(state, n))):
    seat.checkpointer.close()
    results = {
        "test_accuracy": test[i]["accuracy"], "test_loss": test[i]["loss"],
        "train_loss": train[i]["loss"], "train_accuracy": train[i]["accuracy"],
        "epochs": config.num_epochs, "steps": total_steps, "seed": seat.config.seed,
        "dataset": info.name, "model": config.model.name,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(seed_state.params))),
        "params_sha256": state_digest(seed_state), "config_fingerprint": seat.run.fingerprint,
        "vmapped_seeds": n if vmap_seeds else 1, "environment": env, "wall_time_s": wall(),
    }
    seat.run.write_results(results)
    out.append(results)
  return out


def _common_latest_step(seats: list[_Seat]) -> int | None:
  """The newest checkpoint step every seat holds (None if some seat has none)."""
  common = None
  for seat in seats:
    steps = set(seat.checkpointer.all_steps())
    common = steps if common is None else common & steps
  return max(common) if common else None
