"""The training loop: restore-or-init, a loop of jitted steps, periodic log/eval/checkpoint, finish.

    runs = [Run(config, workdir)]                      # one seed's workdir, data, checkpoints
    train_runs(runs, Replicated(make_mesh()))          # -> [results.json dict]

A `Run` owns one seed's side effects (its workdir, data order, checkpoints, metric lines, results).
A placement says how the runs' states sit on the device mesh: `Replicated` is a single run,
data-parallel over every device; `cnnlab.training.seeds.StackedSeeds` stacks K runs of one sweep
cell into one vmapped program. The loop is the same for both: it asks the placement to `combine` the
runs' states and `split` them again for checkpoints and metrics.

Faults end in one line and keep the state: SIGTERM/SIGINT save a checkpoint at the next step
boundary and raise `Interrupted` (a second signal exits at once); a loss, gradient, parameter or BN
statistic that turns NaN/inf ends that run with a results.json that says so ("status": "diverged",
the step and what went non-finite first), while the other runs of a program go on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnlab import data as data_lib
from cnnlab.base import environment
from cnnlab.base.errors import Interrupted
from cnnlab.base.interrupts import Signalled, interrupt_guard
from cnnlab.training import hosts, images, rundir, steps, transfer
from cnnlab.training import mesh as mesh_lib
from cnnlab.training.checkpoint import Checkpointer
from cnnlab.training.validation import validate_config
from cnnlab.training.writers import MetricWriter

RESULT_METRICS = ("test_accuracy", "test_loss", "train_loss", "train_accuracy")


class Run:
  """One seed's run: its config, workdir (claimed on creation), data order and checkpoints.

  Only process 0 writes files other than checkpoints (metrics, config, results); every process
  takes part in checkpoint saves and restores (orbax coordinates them). `learning_curve`, if
  given, draws learning_curve.png at the end: `learning_curve(path, metrics lines, title)`
  (`cnnlab.inspection.plots.learning_curve`; a sweep's seeds leave it to the report's
  curves.png).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, overrides=(),
               command: str = "", pretrain_run: str | None = None,
               learning_curve: Callable[[str, list, str], None] | None = None):
    self.config = config
    self.learning_curve = learning_curve
    self.dir = rundir.RunDir(workdir)
    self.primary = jax.process_index() == 0
    self.pretrain_run = pretrain_run  # What init.source="sweep:pretrain" names (transfer).
    transfer.check(config, self.dir, pretrain_run)  # Before anything is written.
    if self.primary:
      self.dir.claim(config, overrides=overrides, command=command)
    else:
      self.dir.fingerprint = rundir.fingerprint(config)
    # Proves it is this config's, on this config's data, or raises.
    self.results = self.dir.finished_result(config)
    # A streamed dataset's identity (a folder's index digest): a run over changed files is not
    # resumed either.
    self.data_digest = data_lib.data_digest(config.dataset)
    self.streams = steps.split_seed(config.seed)
    self.diverged: dict | None = None
    self.writer: MetricWriter | None = None

  def open(self, rows: slice) -> None:
    """Builds the data iterator over this process's `rows` of each global batch (may raise a
    DatasetError/ConfigError) and the checkpointer."""
    self.train_iter = data_lib.train_iterator(
        self.config.dataset, self.config.batch_size, steps.data_seed(self.streams["data"]), rows)
    self.checkpointer = Checkpointer(self.dir.checkpoint_dir,
                                     keep=max(2, self.config.checkpoints_to_keep))

  def start_metrics(self, resume_step: int) -> None:
    """Opens the metric sink (metrics.jsonl + TensorBoard), dropping what was logged after
    `resume_step` (it is logged again), on process 0."""
    self.writer = MetricWriter(self.dir, resume_step) if self.primary else None

  def log(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if self.writer is not None:
      self.writer.write_scalars(step, split, scalars)

  def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    if self.writer is not None:
      self.writer.write_images(step, images)

  def save(self, step: int, state: steps.TrainState, progress: dict[str, Any]) -> None:
    self.checkpointer.save(step, steps.checkpointed(state), {
        "data_iterator": self.train_iter.get_state(), "data_digest": self.data_digest,
        "config_fingerprint": self.dir.fingerprint, **progress})

  def finish(self, results: dict[str, Any]) -> dict[str, Any]:
    if self.data_digest is not None:
      results = {**results, "data_digest": self.data_digest}
    if self.primary:  # The picture first: results.json, written last, says the run finished.
      if self.learning_curve is not None:
        self.write_learning_curve(results)
      self.dir.write_results(results)
    self.results = results
    return results

  def write_learning_curve(self, results: dict[str, Any]) -> None:
    """learning_curve.png from metrics.jsonl; a failed write is one WorkdirError (a rerun
    evaluates the final checkpoint again and writes it)."""
    done = (f"test accuracy {results['test_accuracy']:.4f}" if results.get("test_accuracy")
            is not None else f"diverged at step {results.get('diverged_step')}")
    self.learning_curve(self.dir.learning_curve_path, self.dir.read_metrics(),
                        f"{self.config.name}, seed {self.config.seed}: {done}")

  def close(self) -> None:
    if hasattr(getattr(self, "train_iter", None), "close"):   # Worker processes of a stream.
      self.train_iter.close()
    if hasattr(self, "checkpointer"):
      self.checkpointer.close()
    if getattr(self, "writer", None) is not None:
      self.writer.close()
      self.writer = None


def put(tree: Any, sharding) -> Any:
  """Places host or single-device arrays (the same on every process) on `sharding`."""
  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(one, tree)


class Replicated:
  """A single run: state replicated on every device of `mesh`, each batch split over `data`."""
  stacked = False

  def __init__(self, mesh):
    self.mesh = mesh
    self.state_sharding = mesh_lib.replicated(mesh)

  def combine(self, states: list) -> Any:
    (state,) = states
    return put(state, self.state_sharding)

  def split(self, tree: Any) -> list:
    return [tree]

  def batch(self, local_batches: list[dict]) -> dict[str, jax.Array]:
    (local,) = local_batches
    return mesh_lib.global_batch(local, mesh_lib.batch_sharding(self.mesh))

  def steps(self, aux_loss_weight: float, label_smoothing: float = 0.0):
    return _replicated_steps(self.mesh, aux_loss_weight, label_smoothing)


@functools.cache
def _replicated_steps(mesh, aux_loss_weight: float, label_smoothing: float):
  """The jitted train and eval steps of one run on `mesh` (compiled once per mesh and weight)."""
  state_out = mesh_lib.replicated(mesh)
  train_fn = jax.jit(functools.partial(steps.train_step, aux_loss_weight=aux_loss_weight,
                           label_smoothing=label_smoothing),
                     out_shardings=(state_out, state_out), donate_argnums=0)
  return train_fn, jax.jit(steps.eval_step, out_shardings=state_out)


@jax.jit
def add_trees(a: Any, b: Any) -> Any:
  """a + b leaf by leaf (metric sums): one dispatch instead of one eager op per leaf."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def _restore(runs, fresh_states, placement, total_steps):
  """Restores every run from the newest intact checkpoint they all hold (a corrupt newest one is
  set aside with one warning) into `placement`'s mesh: any topology resumes any other's
  checkpoint. Returns (states, step, progress)."""
  template = Replicated(placement.mesh)
  targets = [steps.checkpointed(template.combine([fresh])) for fresh in fresh_states]
  found = [run.checkpointer.restore_latest(t) for run, t in zip(runs, targets)]
  if any(f is None for f in found):  # A fresh start: from config.init's source, if any.
    return [transfer.start(run, fresh) for run, fresh in zip(runs, fresh_states)], 0, {}
  latest = min(step for step, _, _ in found)
  states, progress = [], {}
  for run, fresh, target, (step, restored, progress) in zip(runs, fresh_states, targets, found):
    if step != latest:  # A seed of a vmapped group is ahead of the others: take the common step.
      restored, progress = run.checkpointer.restore(latest, target)
    run.dir.check_fingerprint(progress["config_fingerprint"])
    run.dir.check_data(run.config, progress.get("data_digest"), "checkpointed", run.data_digest)
    run.train_iter.set_state(progress["data_iterator"])
    states.append(fresh.replace(**mesh_lib.to_host(restored)))
  print(f"resuming {', '.join(r.dir.workdir for r in runs)} from step {latest} of "
        f"{total_steps}")
  now = mesh_lib.describe(placement.mesh)
  before = progress.get("topology")
  if before and (before["device_count"], before["process_count"]) != (
      now["device_count"], now["process_count"]):
    print(f"the checkpoint was written on {before['device_count']} device(s) in "
          f"{before['process_count']} process(es) and resumes on {now['device_count']} in "
          f"{now['process_count']}: the data order and every setting are the same, but the "
          f"low bits of the results may differ from an uninterrupted run's.")
    progress = dict(progress, topology_changed={"from": before, "to": now})
  return states, latest, progress


def _divergence(run: Run, done: int, count: int, health: dict[str, float], epoch: float,
                lr: float) -> dict[str, Any]:
  """What is known when a run's values went non-finite within the last `count` steps to `done`:
  once NaN, they stay NaN, so a check that failed c times first failed at step done - c + 1."""
  first = {k.removeprefix("nonfinite_"): done - int(round(v)) + 1
           for k, v in health.items() if v > 0}
  order = sorted(first, key=lambda k: (first[k], k))
  what = ", ".join(f"{k} at step {first[k]}" for k in order)
  opt = run.config.optimizer
  reason = (f"seed {run.config.seed} diverged: non-finite {what} (epoch {epoch:.2f}, learning "
            f"rate {lr:.3g}; optimizer.learning_rate={opt.learning_rate}, "
            f"optimizer.momentum={opt.momentum}, model.bn_placement="
            f"{run.config.model.bn_placement})")
  return {"status": "diverged", "diverged_step": first[order[0]], "diverged_reason": reason,
          **{k: None for k in RESULT_METRICS}}


def train_runs(runs: list[Run], placement, *, progress: bool = True) -> list[dict[str, Any]]:
  """Trains `runs` (configs equal but for the seed) as one program on `placement`'s mesh;
  returns each run's results.json dict."""
  config = runs[0].config
  info, model, steps_per_epoch, total_steps, schedule, tx = steps.setup(config)
  mesh = placement.mesh
  mesh_lib.check_batch_size("batch_size", config.batch_size, mesh)
  for run in runs:
    run.open(mesh_lib.process_slice(config.batch_size))
  assert runs[0].train_iter.steps_per_epoch == steps_per_epoch
  fresh = [steps.create_train_state(model, tx, run.streams, info.image_shape) for run in runs]
  states, first_step, saved = _restore(runs, fresh, placement, total_steps)
  for run in runs:
    run.start_metrics(first_step)
  state = placement.combine(states)
  train_fn, eval_fn = placement.steps(float(config.model.aux_loss_weight),
                                      float(config.get("label_smoothing", 0.0)))
  learning_rate = jax.jit(schedule)  # Only logged: one call, not a dozen eager ops.

  # Learning curves on the validation split when there is one; the test split is then read once,
  # at the end.
  curve_split = "validation" if info.num_validation else "test"
  eval_multiple = mesh_lib.data_size(mesh)
  eval_padded = -(-config.eval_batch_size // eval_multiple) * eval_multiple
  eval_rows = mesh_lib.process_slice(eval_padded)
  eval_sharding = mesh_lib.batch_sharding(mesh)

  def evaluate(state, split: str) -> list[dict[str, float]]:
    totals = None
    for local in data_lib.eval_batches(config.dataset, split, config.eval_batch_size,
                                       eval_multiple, eval_rows):
      batch = mesh_lib.global_batch(local, eval_sharding)
      sums = eval_fn(state, batch)
      totals = sums if totals is None else add_trees(totals, sums)
    return [{"loss": float(t["loss_sum"] / t["count"]),
             "accuracy": float(t["correct"] / t["count"])}
            for t in placement.split(mesh_lib.to_host(totals))]

  elapsed_before = saved.get("wall_time_s", 0.0)
  start_time = time.perf_counter()
  wall = lambda: elapsed_before + time.perf_counter() - start_time
  # Checkpoints every checkpoint_every_steps (validated to be a multiple of log_every_steps, so at
  # log points) and at the last step, or with the pending metric sums when interrupted: a resumed
  # run logs exactly the lines an uninterrupted one logs.
  log_every, ckpt_every = config.log_every_steps, config.checkpoint_every_steps
  topology = mesh_lib.describe(mesh)
  sums, count = saved.get("pending_sums"), saved.get("pending_count", 0)
  if sums is not None:
    sums = placement.combine([jax.tree_util.tree_map(jnp.float32, s) for s in sums]) \
        if placement.stacked else jax.tree_util.tree_map(jnp.float32, sums[0])

  def save_all(done: int, state, pending=None) -> None:
    extra = {"wall_time_s": wall(), "topology": topology}
    if pending is not None:
      extra["pending_sums"] = [jax.tree_util.tree_map(float, s) for s in pending[0]]
      extra["pending_count"] = pending[1]
    for run, run_state in zip(runs, placement.split(state)):
      if run.diverged is None:
        run.save(done, run_state, extra)

  step_flops = _step_flops(train_fn, state, placement, runs)
  bar = rundir.progress_bar(total_steps, first_step, enabled=progress, desc=config.name)
  single_process = jax.process_count() == 1
  with interrupt_guard() as interrupt:
    for step in range(first_step, total_steps):
      state, metrics = train_fn(state, placement.batch([next(run.train_iter) for run in runs]))
      sums = metrics if sums is None else add_trees(sums, metrics)
      count += 1
      done = step + 1
      bar.update(1)
      end_of_epoch = done % steps_per_epoch == 0
      # One process stops at once; the processes of a multi-process run agree at log points.
      if interrupt["signal"] and single_process and (done % log_every and not end_of_epoch):
        save_all(done, state, (placement.split(mesh_lib.to_host(sums)), count))
        _interrupted(runs, interrupt["signal"], done, bar)
      if done % log_every and not end_of_epoch:
        continue
      stop = hosts.agree_to_stop(interrupt["signal"])
      means = placement.split(mesh_lib.to_host(sums))  # The only host sync: at log points.
      sums, count_now, count = None, count, 0
      epoch, lr = done / steps_per_epoch, float(learning_rate(step))
      for run, m in zip(runs, means):
        if run.diverged is not None:
          continue
        health = {k: float(m[k]) for k in steps.HEALTH_KEYS}
        if any(health.values()):
          run.diverged = _divergence(run, done, count_now, health, epoch, lr)
          if len(runs) > 1:  # One run's caller reports it: its one error line, or a sweep's note.
            print(f"{run.diverged['diverged_reason']}; recorded in {run.dir.results_path}; the "
                  f"other seeds go on.")
          continue
        run.log(done, "train", {"epoch": epoch, "learning_rate": lr, "wall_time_s": wall(),
                                **{k: float(m[k]) / count_now for k in ("loss", "accuracy")}})
      alive = [i for i, run in enumerate(runs) if run.diverged is None]
      if not alive:
        break
      # Mean over the live runs: train loss since the last log point, held-out accuracy.
      postfix = {"train_loss": f"{np.mean([means[i]['loss'] / count_now for i in alive]):.4f}"}
      if end_of_epoch:
        held_out = evaluate(state, curve_split)
        for run, t in zip(runs, held_out):
          if run.diverged is None:
            run.log(done, curve_split, {"epoch": epoch, **t})
        postfix[f"{curve_split}_acc"] = (
            f"{np.mean([held_out[i]['accuracy'] for i in alive]):.4f}")
      bar.set_postfix(postfix)
      if done % ckpt_every == 0 or done == total_steps or stop:
        save_all(done, state)
      if stop:
        _interrupted(runs, stop, done, bar)
  bar.close()
  try:
    return _finish(runs, placement, state, evaluate, wall, total_steps, saved, mesh, info,
                   step_flops)
  except Signalled as stop:  # Outside the loop's guard; its last checkpoint is written whole.
    for run in runs:
      run.close()
    raise Interrupted(f"interrupted by {stop.signame} during the final evaluation; the last "
                      f"checkpoint is kept: rerun the same command to evaluate and "
                      f"finish.") from None


def _step_flops(train_fn, state, placement, runs: list[Run]) -> float:
  """XLA's FLOPs of one run's train step (the program trains len(runs) seeds at once), from the
  lowering the first step then reuses, on a batch peeked from the data iterators (whose positions
  are put back)."""
  positions = [run.train_iter.get_state() for run in runs]
  batch = placement.batch([next(run.train_iter) for run in runs])
  for run, position in zip(runs, positions):
    run.train_iter.set_state(position)
  return steps.lowered_flops(train_fn.lower(state, batch)) / len(runs)


def _interrupted(runs: list[Run], signame: str, done: int, bar) -> None:
  bar.close()
  for run in runs:
    run.close()
  raise Interrupted(f"interrupted by {signame} at step {done}; a checkpoint was saved: rerun "
                    f"the same command to resume.")


def _finish(runs, placement, state, evaluate, wall, total_steps, saved, mesh, info,
            step_flops) -> list[dict]:
  """Final evaluation and every run's results.json (diverged runs record how they ended)."""
  config = runs[0].config
  alive = any(run.diverged is None for run in runs)
  # A tuning trial (evaluate_test=False) never reads the test split: it is selected on
  # validation, and the test split is for the final runs only.
  test = evaluate(state, "test") if alive and config.get("evaluate_test", True) else None
  train_eval = evaluate(state, "train") if alive else None
  validation = evaluate(state, "validation") if alive and info.num_validation else None
  env = {k: v for k, v in environment.describe(config.dtype).items()
         if k in environment.BIT_DETERMINING_KEYS + ("git_commit",)}
  out = []
  for i, (run, run_state) in enumerate(zip(runs, placement.split(state))):
    results = {
        "status": "finished", "epochs": config.num_epochs, "steps": total_steps,
        "seed": run.config.seed, "dataset": config.dataset.name, "model": config.model.name,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(run_state.params))),
        "config_fingerprint": run.dir.fingerprint,
        "vmapped_seeds": len(runs) if placement.stacked else 1,
        "topology": mesh_lib.describe(mesh), "environment": env, "wall_time_s": wall(),
    }
    results["train_step_flops"] = step_flops  # XLA's count for one seed's step.
    results.update(transfer.recorded(run.dir.workdir))
    if "topology_changed" in saved:
      results["topology_changed"] = saved["topology_changed"]
    if run.diverged is not None:
      results.update(run.diverged)
    else:
      if test is not None:
        results.update({"test_accuracy": test[i]["accuracy"], "test_loss": test[i]["loss"]})
      results.update({"train_loss": train_eval[i]["loss"],
                      "train_accuracy": train_eval[i]["accuracy"],
                      "params_sha256": steps.state_digest(run_state)})
      if validation is not None:
        results.update({"validation_accuracy": validation[i]["accuracy"],
                        "validation_loss": validation[i]["loss"]})
      _log_filters(run, total_steps, run_state)
    run.close()
    out.append(run.finish(results))
  return out


def _log_filters(run: Run, step: int, state: steps.TrainState) -> None:
  """The first conv layer's filters as a TensorBoard image (models without one have none)."""
  try:
    image = images.filter_grid_image(mesh_lib.to_host(state.params))
  except ValueError:  # No 2-D conv kernel (an MLP).
    return
  run.log_images(step, {"first_conv_filters": image})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overrides: tuple[str, ...] = (), command: str = "",
                       progress: bool = True, pretrain_run: str | None = None,
                       learning_curve: Callable[[str, list, str], None] | None = None
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir` data-parallel over all devices, resuming from its latest
  checkpoint; returns results.json's dict. A workdir that already holds results.json for the
  same config is not retrained. `pretrain_run`: the workdir `init.source="sweep:pretrain"`
  names (a sweep passes it); `learning_curve`: see `Run`."""
  validate_config(config)
  run = Run(config, workdir, overrides=overrides, command=command, pretrain_run=pretrain_run,
            learning_curve=learning_curve)
  if run.results is not None:
    print(f"{workdir} already holds a finished run of this config: {run.dir.results_path}")
    return run.results
  return train_runs([run], Replicated(mesh_lib.make_mesh(1)), progress=progress)[0]
