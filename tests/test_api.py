"""The Python API (cnnlab.api, exported from cnnlab) gives what the command line gives: a
notebook's run of a config has the command line's params_sha256 and recorded numerics; a
process where JAX already runs without the config's XLA flags is refused in one line."""

import json
import os
import subprocess
import sys

import pytest

import cnnlab
from cnnlab.base.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"dataset.name": "digits", "model.name": "vgg_cnn", "model.stages": ((8,), (16,)),
        "batch_size": 32, "num_epochs": 1}

NOTEBOOK = '''
import json, sys
import numpy as np
import cnnlab

data_dir, workdir = sys.argv[1], sys.argv[2]
tiny = json.loads(sys.argv[3])
tiny["model.stages"] = tuple(tuple(s) for s in tiny["model.stages"])
config = cnnlab.load_config("experiments/default.py",
                            overrides={**tiny, "dataset.data_dir": data_dir})
results = cnnlab.train(config, workdir)
run = cnnlab.load_run(workdir)
model = cnnlab.build_model(run.config)
images = np.zeros((3, 8, 8, 1), np.float32)
logits = run.model.apply(run.variables, images, train=False)
same = model.apply(run.variables, images, train=False)
print(json.dumps({"sha": results["params_sha256"], "run_sha": run.results["params_sha256"],
                  "logits": list(logits.shape), "same": bool(np.array_equal(logits, same)),
                  "metrics": len(run.metrics), "name": run.config.model.name}))
'''


def _environment(workdir):
  with open(os.path.join(workdir, "environment.json")) as f:
    saved = json.load(f)
  return {k: saved[k] for k in ("xla_flags", "matmul_precision", "threads", "backend")}


def test_the_notebook_flow_gives_the_command_line_run(tmp_path, data_dir):
  done = subprocess.run([sys.executable, "-c", NOTEBOOK, data_dir, str(tmp_path / "nb"),
                         json.dumps(TINY)], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  notebook = json.loads(done.stdout.strip().splitlines()[-1])
  assert notebook["logits"] == [3, 10] and notebook["same"] and notebook["metrics"] > 0
  assert notebook["sha"] == notebook["run_sha"] and notebook["name"] == "vgg_cnn"

  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  cli = subprocess.run([sys.executable, "launch.py", "--config=experiments/default.py",
                        f"--workdir={tmp_path / 'cli'}", "--noprogress",
                        f"--config.dataset.data_dir={data_dir}", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert cli.returncode == 0, cli.stderr[-3000:]
  with open(tmp_path / "cli" / "results.json") as f:
    assert json.load(f)["params_sha256"] == notebook["sha"]
  recorded = _environment(tmp_path / "nb")
  assert recorded == _environment(tmp_path / "cli")
  assert "--xla_cpu_prefer_vector_width=512" in recorded["xla_flags"]  # The config's flags ran.
  assert recorded["matmul_precision"] == "highest"


def test_a_process_where_jax_runs_without_the_flags_is_refused(tmp_path, data_dir):
  code = ("import jax, cnnlab\nfrom cnnlab.base.errors import ConfigError\n"
          "jax.numpy.zeros(1).block_until_ready()\n"
          f"config = cnnlab.load_config({os.path.join(ROOT, 'experiments', 'default.py')!r}, "
          f"overrides={{'dataset.data_dir': {data_dir!r}}})\n"
          "try:\n  cnnlab.train(config, 'nb')\n"
          "except ConfigError as e:\n  print('error:', e)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={k: v for k, v in os.environ.items()
                                                     if k != "XLA_FLAGS"})
  assert done.returncode == 0, done.stderr[-3000:]
  (line,) = done.stdout.strip().splitlines()
  assert line.startswith("error: config.deterministic=True needs the XLA flag "
                         "--xla_gpu_deterministic_ops=true, but JAX already started in this "
                         "process without it (XLA_FLAGS='(empty)'); train in a fresh Python "
                         "process"), line
  assert not (tmp_path / "nb").exists()  # Nothing written.


def test_load_config_takes_variants_and_overrides_and_names_a_bad_one():
  config = cnnlab.load_config("experiments/ablation.py:quick", ["model.dropout=spatial"])
  assert config.dataset.name == "digits" and config.model.dropout == "spatial"
  config = cnnlab.load_config("experiments/default.py", {"model.dropout_rate": 0.25})
  assert config.model.dropout_rate == 0.25
  with pytest.raises(ConfigError, match=r"config.model.dropuot names no config field"):
    cnnlab.load_config("experiments/default.py", {"model.dropuot": "spatial"})
  with pytest.raises(ConfigError, match=r"--config.num_epochs=two"):
    cnnlab.load_config("experiments/default.py", ["num_epochs=two"])
  with pytest.raises(ConfigError, match=r"is a sweep of 9 cells x 5 seeds; run it with "
                                        r"cnnlab.sweep"):
    cnnlab.train(cnnlab.load_config("experiments/ablation.py"), "unused")


def test_build_model_and_the_lazy_exports(data_dir):
  config = cnnlab.load_config("experiments/default.py", {"dataset.data_dir": data_dir})
  model = cnnlab.build_model(config, num_classes=7)
  assert model.num_classes == 7 and type(model).__name__ == "LeNet5"
  assert set(cnnlab.__all__) >= {"load_config", "train", "sweep", "load_run", "build_model",
                                 "register_model", "register_dataset", "base_config"}
  with pytest.raises(AttributeError):
    cnnlab.no_such_thing  # noqa: B018
