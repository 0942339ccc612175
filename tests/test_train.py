"""Training core: reproducibility, resume, RNG discipline, optimizers and schedules."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, load_config, wait_for_checkpoint

from cnnlab import data
from cnnlab.base.errors import WorkdirError
from cnnlab.nets import models
from cnnlab.training import loop, optim, steps
from cnnlab.training.rundir import RunDir

# Fields of results.json that measure time, not numbers: the only ones allowed to differ.
TIMING_FIELDS = ("wall_time_s",)


def numbers_of(results):
  return {k: v for k, v in results.items() if k not in TIMING_FIELDS}


def test_rerun_is_bit_identical_and_seed_changes_it(tiny_config, tmp_path):
  a = loop.train_and_evaluate(tiny_config, str(tmp_path / "a"), progress=False)
  b = loop.train_and_evaluate(tiny_config, str(tmp_path / "b"), progress=False)
  assert numbers_of(a) == numbers_of(b)
  assert a["test_accuracy"] > 0.5  # It learned something: 2 epochs on digits.
  tiny_config.seed = 1
  c = loop.train_and_evaluate(tiny_config, str(tmp_path / "c"), progress=False)
  assert c["params_sha256"] != a["params_sha256"]
  assert c["test_loss"] != a["test_loss"]
  # The metrics logs agree line for line, apart from wall time.
  strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rs]
  assert strip(RunDir(str(tmp_path / "a")).read_metrics()) == strip(
      RunDir(str(tmp_path / "b")).read_metrics())


def test_workdir_contents(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  results = loop.train_and_evaluate(tiny_config, workdir, overrides=["model.name='vgg_cnn'"],
                                     progress=False)
  for key in ("test_accuracy", "test_loss", "train_loss", "epochs", "steps", "seed",
              "wall_time_s", "params_sha256", "environment"):
    assert key in results
  run = RunDir(workdir)
  config = json.load(open(run.config_path))
  assert config["config"]["model"]["dropout"] == "spatial"
  assert config["overrides"] == ["model.name='vgg_cnn'"]
  env = json.load(open(run.environment_path))
  for key in ("packages", "backend", "device_count", "threads", "xla_flags", "dtype",
              "git_commit"):
    assert key in env
  metrics = run.read_metrics()
  steps_per_epoch = results["steps"] // results["epochs"]
  train_lines = [m for m in metrics if m["split"] == "train"]
  test_lines = [m for m in metrics if m["split"] == "test"]
  assert {"step", "epoch", "loss", "accuracy", "learning_rate", "wall_time_s"} <= set(
      train_lines[0])
  assert [m["step"] for m in test_lines] == [steps_per_epoch * (e + 1) for e in range(2)]
  assert train_lines[-1]["step"] == results["steps"]
  assert os.listdir(run.checkpoint_dir)
  # XLA's FLOPs of one step, taken from the loop's own (cached) lowering, are the count
  # `cnnlab.inspection.summary` gets by lowering the step afresh (whose stand-in learning-rate
  # schedule costs a few scalar FLOPs less): the report reads this instead.
  from cnnlab.inspection import summary
  assert results["train_step_flops"] == pytest.approx(
      summary.summarize(tiny_config).train_step_flops, rel=1e-4)


def test_finished_workdir_is_not_retrained(tiny_config, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  first = loop.train_and_evaluate(tiny_config, workdir, progress=False)
  mtime = os.path.getmtime(os.path.join(workdir, "metrics.jsonl"))
  again = loop.train_and_evaluate(tiny_config, workdir, progress=False)
  assert "already holds a finished run" in capsys.readouterr().out
  assert again == first
  assert os.path.getmtime(os.path.join(workdir, "metrics.jsonl")) == mtime


def test_progress_bar_names_its_numbers(tiny_config, tmp_path, capsys):
  """The bar's postfix said `loss=... tes_acc=...`: which loss, and 'tes'?"""
  tiny_config.num_epochs = 1
  loop.train_and_evaluate(tiny_config, str(tmp_path / "run"), progress=True)
  bar = capsys.readouterr().err.split("\r")[-1]
  assert "train_loss=" in bar and "test_acc=" in bar and "tes_acc" not in bar, bar


def test_a_run_draws_its_learning_curve_before_it_counts_as_finished(tiny_config, tmp_path,
                                                                     monkeypatch):
  """A single run had no picture of its learning curve (only a sweep's curves.png)."""
  from cnnlab.inspection import plots
  drawn = []
  real_save = plots.save
  monkeypatch.setattr(plots, "save", lambda fig, path: drawn.append(fig) or real_save(fig, path))
  workdir = str(tmp_path / "run")
  run = RunDir(workdir)
  os.makedirs(os.path.join(run.learning_curve_path, "in_the_way"))  # The write is refused.
  with pytest.raises(WorkdirError, match="cannot write .*learning_curve.png"):
    loop.train_and_evaluate(tiny_config, workdir, progress=False,
                            learning_curve=plots.learning_curve)
  assert not run.finished()  # A rerun evaluates the final checkpoint again and draws it.
  shutil.rmtree(run.learning_curve_path)
  drawn.clear()
  results = loop.train_and_evaluate(tiny_config, workdir, progress=False,
                                    learning_curve=plots.learning_curve)
  assert plots.plt.imread(run.learning_curve_path).shape[2] == 4  # An RGBA PNG.
  (fig,) = drawn
  metrics = run.read_metrics()
  for ax, key, scale in zip(fig.axes, ("loss", "accuracy"), (1, 100)):
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"train", "test"}
    for split, line in lines.items():
      assert list(line.get_xdata()) == [m["step"] for m in metrics if m["split"] == split]
      np.testing.assert_allclose(line.get_ydata(), [scale * m[key] for m in metrics
                                                    if m["split"] == split])
  assert f"test accuracy {results['test_accuracy']:.4f}" in fig.get_suptitle()


def _state_and_batch(config):
  info = data.dataset_info(config.dataset)
  model = models.get_model(config.model, info.num_classes)
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.01))
  state = steps.create_train_state(model, tx, steps.split_seed(config.seed), info.image_shape)
  batch = next(data.train_iterator(config.dataset, config.batch_size, 0))
  return model, state, batch


def test_dropout_masks_differ_between_steps_and_repeat_across_reruns(tiny_config):
  model, state, batch = _state_and_batch(tiny_config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def forward(step):
    out, _ = model.apply(variables, batch["image"], train=True,
                         rngs=steps.step_rngs(state.rngs, jnp.int32(step)),
                         mutable=["batch_stats"])
    return np.asarray(out)

  np.testing.assert_array_equal(forward(3), forward(3))
  assert not np.array_equal(forward(3), forward(4))
  # A fresh state from the same seed draws the same masks: rerunning repeats them.
  _, state2, _ = _state_and_batch(tiny_config)
  for a, b in zip(jax.tree_util.tree_leaves(state.rngs), jax.tree_util.tree_leaves(state2.rngs)):
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))


def test_train_step_threads_batch_stats_and_eval_uses_them(tiny_config):
  _, state, batch = _state_and_batch(tiny_config)
  batch = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
  before = jax.tree_util.tree_map(np.asarray, state.batch_stats)
  eval_batch = dict(batch, mask=jnp.ones(batch["label"].shape, jnp.float32))
  eval_before = steps.eval_step(state, eval_batch)
  new_state, metrics = jax.jit(steps.train_step, static_argnums=2)(state, batch, 0.3)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                                   new_state.batch_stats)
  assert all(jax.tree_util.tree_leaves(changed))
  # Eval is deterministic (no dropout) and depends on the running statistics.
  e1, e2 = steps.eval_step(new_state, eval_batch), steps.eval_step(new_state, eval_batch)
  assert float(e1["loss_sum"]) == float(e2["loss_sum"])
  assert float(e1["loss_sum"]) != float(eval_before["loss_sum"])


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_takes_a_step(tiny_config, name):
  tiny_config.optimizer.name = name
  tx = optim.create_optimizer(tiny_config.optimizer, optax.constant_schedule(0.01))
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
  grads = {"kernel": jnp.zeros((3, 3)), "bias": jnp.zeros((3,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Zero gradient: only weight decay moves anything, and only the kernel.
  assert float(jnp.abs(updates["kernel"]).sum()) > 0
  np.testing.assert_array_equal(updates["bias"], 0)


def test_schedules_by_hand(tiny_config):
  opt = tiny_config.optimizer
  opt.learning_rate, opt.warmup_epochs = 0.1, 1.0
  opt.schedule = "constant"
  s = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([s(0), s(5), s(10), s(99)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)
  opt.schedule = "cosine"
  s = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  # After warm-up: 0.1 * (1 + cos(pi * t / 90)) / 2 at t = step - 10.
  np.testing.assert_allclose([s(10), s(55), s(100)], [0.1, 0.05, 0.0], rtol=1e-6, atol=1e-7)
  opt.schedule, opt.step_boundaries, opt.step_factor = "step", (0.5, 0.75), 0.1
  s = optim.learning_rate_schedule(opt, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([s(49), s(50), s(74), s(75)], [0.1, 0.01, 0.01, 0.001], rtol=1e-5)


def _setup_state_and_batch(config):
  """steps.setup's model and optimizer, a fresh state and the first batch (as jax arrays)."""
  s = steps.setup(config)
  state = steps.create_train_state(s.model, s.tx, steps.split_seed(config.seed),
                                   s.info.image_shape)
  batch = next(data.train_iterator(config.dataset, config.batch_size, 0))
  return s, state, {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}


def test_runs_that_differ_only_in_the_learning_rate_compile_one_train_step(tiny_config):
  """The rate is an input of the train step (optim.rate_as_input), not a constant in it: a
  tuning sweep's trials over the learning rate share one compiled program (one compile per
  cell, not per trial: 2-4 s each here, far more for a large net on a GPU)."""
  programs = []
  for rate in (0.05, 0.1):
    tiny_config.optimizer.learning_rate = rate
    _, state, batch = _setup_state_and_batch(tiny_config)
    step = jax.jit(functools.partial(steps.train_step, aux_loss_weight=0.0))
    programs.append(step.lower(state, batch).as_text())
    assert float(state.tx_inputs["learning_rate"]) == np.float32(rate)
  assert programs[0] == programs[1]


@pytest.mark.parametrize("changes", [
    {"schedule": "cosine"},
    {"schedule": "step", "step_boundaries": (0.1, 0.5, 0.5), "step_factor": 0.3},
    {"schedule": "constant", "warmup_epochs": 0.0, "name": "adamw"},
    {"name": "rmsprop", "learning_rate": 0.0123456789}])
def test_the_rate_as_an_input_trains_bit_for_bit_as_a_constant_rate(tiny_config, changes):
  """Against the optimizer built with the rate compiled in as a constant (as optax is used
  everywhere): the same float32 operations on the same values, so the same bits."""
  tiny_config.optimizer.update(changes)
  s, state, batch = _setup_state_and_batch(tiny_config)
  constant = optim.create_optimizer(tiny_config.optimizer, s.schedule)
  baseline = state.replace(tx=constant, tx_inputs={})
  step = jax.jit(functools.partial(steps.train_step, aux_loss_weight=0.0))
  for _ in range(3):
    state, _ = step(state, batch)
    baseline, _ = step(baseline, batch)
  assert steps.state_digest(state) == steps.state_digest(baseline)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(state.opt_state), leaves(baseline.opt_state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_optimizer_that_needs_the_rate_as_a_number_gets_it(tiny_config):
  """A builder that reads the rate on the host (as a registered optimizer calling
  float(schedule(0)) would) cannot take a traced rate: it gets the constant one, and trains as
  before. (Built directly: a registration here would stay in the process's registry.)"""
  tx = optim.rate_as_input(lambda rate: optax.sgd(float(rate) + 0.01), 0.05)
  s, _, batch = _setup_state_and_batch(tiny_config)
  state = steps.create_train_state(s.model, tx, steps.split_seed(0), s.info.image_shape)
  assert not isinstance(tx, optim.RateAsInput) and state.tx_inputs == {}
  state, metrics = jax.jit(functools.partial(steps.train_step, aux_loss_weight=0.0))(state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def _launch_args(config, workdir):
  return ["--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
          f"--config.dataset.name={config.dataset.name}",
          f"--config.dataset.data_dir={config.dataset.data_dir}",
          f"--config.model.name={config.model.name}",
          "--config.model.stages=((8,),(16,))",
          f"--config.model.bn_placement={config.model.bn_placement}",
          f"--config.model.dropout={config.model.dropout}",
          f"--config.model.dropout_rate={config.model.dropout_rate}",
          f"--config.batch_size={config.batch_size}", "--config.num_epochs=3",
          "--config.log_every_steps=5", "--config.checkpoint_every_steps=5"]


def test_sigkill_then_resume_equals_uninterrupted(tiny_config, tmp_path):
  """Kill a run with SIGKILL mid-training; rerunning the command ends bit-identical."""
  reference = str(tmp_path / "reference")
  killed = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(ROOT, "launch.py")]
  done = subprocess.run(cmd + _launch_args(tiny_config, reference), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  expected = json.load(open(os.path.join(reference, "results.json")))

  proc = subprocess.Popen(cmd + _launch_args(tiny_config, killed), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_checkpoint(killed, 10, proc, timeout=240)
  time.sleep(0.3)  # Land somewhere between checkpoints, possibly inside a save.
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "results.json"))

  resumed = subprocess.run(cmd + _launch_args(tiny_config, killed), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming" in resumed.stdout
  got = json.load(open(os.path.join(killed, "results.json")))
  assert numbers_of(got) == numbers_of(expected)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rs]
  assert strip(RunDir(killed).read_metrics()) == strip(RunDir(reference).read_metrics())
  # TensorBoard as its reader shows it: after the kill and resume, every step once, the same
  # values as metrics.jsonl (the killed process's events after the checkpoint are purged).
  from test_writers import _assert_events_equal_metrics
  _assert_events_equal_metrics(RunDir(killed))
  assert len([n for n in os.listdir(killed) if n.startswith("events.out.tfevents")]) == 2


def test_train_step_adds_sown_aux_losses_with_their_weight():
  """GoogLeNet-style auxiliary heads: their cross-entropy x aux_loss_weight joins the loss (so
  plain SGD moves the aux head by exactly weight x its own gradient); the reported loss is the
  main head's."""
  import flax.linen as nn

  class Toy(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = x.reshape(x.shape[0], -1)
      if train or self.is_initializing():
        aux = nn.Dense(3, name="aux")(x)
        if train:
          self.sow("aux_logits", "a", aux)
      return nn.Dense(3, name="main")(x)

  state = steps.create_train_state(Toy(), optax.sgd(1.0), steps.split_seed(0), (2, 2, 1))
  batch = {"image": jnp.asarray(np.random.default_rng(0).standard_normal((4, 2, 2, 1)),
                                jnp.float32), "label": jnp.array([0, 1, 2, 1])}
  delta = {}
  for weight in (0.0, 0.3, 0.6):
    new, metrics = steps.train_step(state, batch, weight)
    delta[weight] = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), new.params,
                                           state.params)
    main_only = steps.cross_entropy(state.apply_fn({"params": state.params}, batch["image"],
                                                   train=False), batch["label"]).mean()
    np.testing.assert_allclose(metrics["loss"], main_only, rtol=1e-6)
  assert not np.any(delta[0.0]["aux"]["kernel"])
  assert np.abs(delta[0.3]["aux"]["kernel"]).max() > 1e-4
  np.testing.assert_allclose(delta[0.6]["aux"]["kernel"], 2 * delta[0.3]["aux"]["kernel"],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(delta[0.0]["main"]["kernel"], delta[0.6]["main"]["kernel"])


def test_validation_split_drives_curves_and_test_is_read_once(tiny_config, tmp_path):
  tiny_config.dataset.validation_fraction = 0.1
  results = loop.train_and_evaluate(tiny_config, str(tmp_path / "run"), progress=False)
  metrics = RunDir(str(tmp_path / "run")).read_metrics()
  assert {m["split"] for m in metrics} == {"train", "validation"}
  assert [m["epoch"] for m in metrics if m["split"] == "validation"] == [1.0, 2.0]
  assert 0 < results["validation_accuracy"] <= 1 and 0 < results["test_accuracy"] <= 1
  info = data.dataset_info(tiny_config.dataset)
  assert results["steps"] == info.num_train // tiny_config.batch_size * 2


@pytest.mark.parametrize("name", ["lenet5", "vgg_cnn", "resnet20", "nin"])
def test_init_compiled_for_speed_gives_the_default_compilers_bits(name):
  """steps._init_fn compiles with INIT_COMPILER_OPTIONS (a faster compile): the parameters, BN
  statistics and optimizer state must be the bits XLA's default compilation gives."""
  config = load_config("experiments/default.py")
  config.model.name, config.model.bn_placement = name, "before_act"
  model = models.get_model(config.model, 10)
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.1))
  fast = steps._init_fn(model, tx, (16, 16, 3))
  default = jax.jit(steps.init_program(model, tx, (16, 16, 3)))  # XLA's default options.
  assert steps.INIT_COMPILER_OPTIONS["cpu"], "the test compares against a changed option"
  key = jax.random.key(7)
  for a, b in zip(jax.tree_util.tree_leaves(fast(key)), jax.tree_util.tree_leaves(default(key))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_label_smoothing_against_hand_computed_loss():
  # Targets (0.95, 0.05) for K=2, smoothing 0.1; log-softmax of [2, 0] is [2 - L, -L] with
  # L = log(e^2 + 1): loss = -(0.95 (2 - L) + 0.05 (-L)) = L - 1.9.
  logits, labels = jnp.array([[2.0, 0.0]]), jnp.array([0])
  expected = np.log(np.exp(2.0) + 1.0) - 1.9
  np.testing.assert_allclose(steps.smoothed_cross_entropy(logits, labels, 0.1), [expected],
                             rtol=1e-6)
  np.testing.assert_array_equal(steps.smoothed_cross_entropy(logits, labels, 0.0),
                                steps.cross_entropy(logits, labels))   # 0: the plain loss.
