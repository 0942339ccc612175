"""A researcher's own model and dataset, from files outside the package, through every process
that reads a config: launch.py, sweep workers, a submitit job array, --mode=summary and
--mode=visualize. Nothing under cnnlab/ is edited; the study file names its module."""

import json
import os
import subprocess
import sys

import pytest

from cnnlab.base.errors import ConfigError
from cnnlab.nets import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MY_MODELS = '''
"""A depthwise-separable CNN and a dataset of bars, registered from the study's folder."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import cnnlab
from cnnlab.nets import layers


@cnnlab.register_model("dsnet", fields={"width_mult": 1.0})
class DSNet(nn.Module):
  """A 3x3 conv, then two depthwise-separable blocks (a depthwise 3x3 conv, stride 2, and a
  pointwise 1x1 conv), global average pooling and a dense head; `width_mult` scales the widths.
  x [N, H, W, C] -> float32 logits [N, num_classes]."""
  num_classes: int
  options: layers.BlockOptions
  width_mult: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    width = lambda c: max(1, int(round(c * self.width_mult)))
    x = layers.ConvBlock(width(16), 3, options=self.options)(x, train)
    for c in (32, 64):
      x = layers.ConvBlock(x.shape[-1], 3, strides=2, groups=x.shape[-1],
                           options=self.options)(x, train)
      x = layers.ConvBlock(width(c), 1, options=self.options)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def load_bars(data_dir):
  """8x8 gray images of one horizontal (label 0) or vertical (label 1) bar, with noise."""
  rng = np.random.default_rng(0)

  def split(n):
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 8, 8, 1))
    where = rng.integers(0, 8, n)
    for i in range(n):
      if labels[i] == 0:
        images[i, where[i], :, 0] = 255
      else:
        images[i, :, where[i], 0] = 255
    return images.astype(np.uint8), labels
  return {"train": split(320), "test": split(96)}


cnnlab.register_dataset("bars", load_bars, class_names=("horizontal", "vertical"))
'''

STUDY = '''
from ml_collections import config_dict

from cnnlab.configs import sweep_base


def get_config(arg=None):
  """dsnet against cnnlab's vgg_cnn on the bars."""
  config = sweep_base("ds_study", arg or "full", imports=("my_models.py",))
  config.dataset.name = "bars"
  config.model.name = "dsnet"
  config.model.width_mult = 0.5
  config.model.stages = ((8,), (16,))
  config.batch_size = 32
  config.num_epochs = 1
  config.log_every_steps = 3
  config.checkpoint_every_steps = 9
  config.sweep.axes.model = config_dict.ConfigDict(
      {"key": "model.name", "values": ("dsnet", "vgg_cnn")})
  config.sweep.seeds = (0,)
  config.sweep.target_accuracy = 0.6
  return config
'''


@pytest.fixture
def study_dir(tmp_path):
  """A folder beside nothing of cnnlab's: the user's models file and study file."""
  folder = tmp_path / "lab"
  folder.mkdir()
  (folder / "my_models.py").write_text(MY_MODELS)
  (folder / "study.py").write_text(STUDY)
  return folder


def _launch(folder, *args, timeout=600):
  """`python launch.py ARGS` run from the user's folder, as they would."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=folder,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _digests(workdir):
  out = {}
  for cell in sorted(os.listdir(os.path.join(workdir, "cells"))):
    for seed in sorted(os.listdir(os.path.join(workdir, "cells", cell))):
      path = os.path.join(workdir, "cells", cell, seed, "results.json")
      if os.path.exists(path):
        with open(path) as f:
          out[(cell, seed)] = json.load(f)["params_sha256"]
  return out


def test_own_model_and_data_through_workers_submitit_summary_and_visualize(study_dir, data_dir):
  common = ("--config=study.py", "--noprogress", f"--config.dataset.data_dir={data_dir}")
  summary = _launch(study_dir, *common, "--mode=summary")
  assert summary.returncode == 0, summary.stderr[-3000:]
  assert "Conv" in summary.stdout and "Dense" in summary.stdout  # dsnet's layers, on 8x8x1.

  local = _launch(study_dir, *common, "--workdir=local", "--config.sweep.workers=2")
  assert local.returncode == 0, local.stderr[-3000:]
  assert "model=dsnet" in local.stdout and "model=vgg_cnn" in local.stdout
  workers = [study_dir / "local" / "logs" / f"worker_{i}.log" for i in range(2)]
  assert all(w.exists() for w in workers)  # Two worker processes imported my_models.py.
  digests = _digests(study_dir / "local")
  assert len(digests) == 2

  array = _launch(study_dir, *common, "--workdir=array", "--config.sweep.launcher=slurm",
                  "--config.sweep.slurm.cluster=local", "--config.sweep.slurm.array_size=2",
                  "--config.sweep.slurm.gpus_per_job=0", "--config.sweep.slurm.cpus_per_job=1",
                  "--config.sweep.slurm.time_limit_min=5")
  assert array.returncode == 0, array.stderr[-3000:]
  assert _digests(study_dir / "array") == digests  # The same bits through submitit's jobs.

  report = (study_dir / "local" / "report.md").read_text()
  assert "model=dsnet" in report and "model=vgg_cnn" in report
  run = next(p for p in (study_dir / "local" / "cells").iterdir() if "dsnet" in p.name)
  with open(run / "seed_0" / "config.json") as f:
    saved = json.load(f)["config"]
  assert saved["model"]["width_mult"] == 0.5
  assert saved["imports"] == [str(study_dir / "my_models.py")]

  pictures = _launch(ROOT, "--mode=visualize", f"--workdir={run / 'seed_0'}")  # Elsewhere.
  assert pictures.returncode == 0, pictures.stderr[-3000:]
  index = (run / "seed_0" / "pictures" / "index.md").read_text()
  assert "filters" in index.lower()
  assert "dsnet" not in models.model_names()  # This process never imported the user's file.


def test_a_bad_import_is_one_line(study_dir):
  (study_dir / "broken.py").write_text("import cnnlab\nraise RuntimeError('typo in my model')\n")
  (study_dir / "study.py").write_text(STUDY.replace('"my_models.py"', '"broken.py"'))
  done = _launch(study_dir, "--config=study.py", "--mode=summary")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: --config=study.py: config.imports: 'broken.py' failed while importing: "
      "RuntimeError: typo in my model"]
  (study_dir / "study.py").write_text(STUDY.replace('"my_models.py"', '"missing.py"'))
  done = _launch(study_dir, "--config=study.py", "--mode=summary")
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
  assert "'missing.py', which is not a file" in done.stderr


def test_an_unknown_model_lists_the_registered_ones_and_where_they_come_from(study_dir):
  done = _launch(study_dir, "--config=study.py", "--mode=summary", "--config.model.name=dsnte")
  assert done.returncode == 2
  (line,) = done.stderr.strip().splitlines()
  assert "config.model.name='dsnte' is not a registered model" in line
  assert "lenet5" in line and "dsnet (from my_models)" in line


def test_registration_checks():
  import flax.linen as nn

  from cnnlab.nets import layers

  class NoOptions(nn.Module):
    num_classes: int

  with pytest.raises(ConfigError, match="needs the fields num_classes: int and options"):
    models.register_model("no_options", NoOptions)

  class Net(nn.Module):
    num_classes: int
    options: layers.BlockOptions
    pool: str = "avg"
    depth: int = 2

  with pytest.raises(ConfigError, match=r"config.model.pool defaults to 'avg' here but to 'max'"):
    models.register_model("clash", Net, fields={"pool": "avg"})
  with pytest.raises(ConfigError, match="has no field widht"):
    models.register_model("typo", Net, fields={"widht": 1})
  with pytest.raises(ConfigError, match=r"register_model\('vgg11'\): the name is taken by "
                                        r"cnnlab.nets.models.vgg.VGG"):
    models.register_model("vgg11", Net)
  assert "clash" not in models.model_names() and "typo" not in models.model_names()


MY_OPTIMIZER = '''
import optax
from cnnlab.training.optim import register_optimizer


@register_optimizer("signsgd", fields={"sign_scale": 1.0})
def signsgd(opt, schedule):
  """Sign of the gradient times the learning rate (and `sign_scale`)."""
  return optax.chain(optax.scale_by_sign(), optax.scale(opt.sign_scale),
                     optax.scale_by_learning_rate(schedule))
'''


def test_an_optimizer_of_ones_own_with_a_field(tmp_path):
  import jax.numpy as jnp
  import optax

  from cnnlab import configs
  from cnnlab.training import optim, rundir
  sgd_fingerprint = rundir.fingerprint(configs.base_config())
  (tmp_path / "my_optim.py").write_text(MY_OPTIMIZER)
  config = configs.base_config(imports=(str(tmp_path / "my_optim.py"),))
  assert rundir.fingerprint(config) == sgd_fingerprint  # Its field: not sgd's concern.
  config.optimizer.name = "signsgd"
  config.optimizer.sign_scale = 0.5
  config.optimizer.weight_decay = 0.0
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.1))
  params = {"w": jnp.array([1.0, -2.0])}
  updates, _ = tx.update({"w": jnp.array([3.0, -0.5])}, tx.init(params), params)
  assert updates["w"].tolist() == pytest.approx([-0.05, 0.05], rel=1e-6)  # -lr * scale * sign(g)
  assert rundir.fingerprint(config) != sgd_fingerprint
  config.optimizer.name = "sgdd"
  with pytest.raises(ConfigError, match=r"'sgdd' is not a registered optimizer; choose one of: "
                                        r"sgd, adam, rmsprop, adamw, signsgd \(from my_optim\)"):
    optim.lookup(config.optimizer.name)
