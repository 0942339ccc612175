"""Process-wide numerics: XLA flags set before JAX starts, applied by XLA, recorded as set."""

import glob
import json
import os
import subprocess
import sys

from conftest import SHELL_XLA_FLAGS

from cnnlab.base import environment
from cnnlab.configs import base_config
from cnnlab.study import workers as local_workers

_PROBE = """
import os, jax
from cnnlab.base import environment
from cnnlab.configs import base_config
if {start_first}:
  jax.devices()
config = base_config()
config.xla_cpu_ynn_convolutions = {enabled}
config.xla_cpu_vector_width = {width}
environment.apply_numerics(config)
print(repr(os.environ.get("XLA_FLAGS", "")))
jax.jit(lambda x: x * 2)(jax.numpy.ones(3)).block_until_ready()
"""


def _run(enabled: bool, tmp_path, start_first: bool = False, xla_flags: str = "",
         width: int = environment.XLA_DEFAULT_CPU_VECTOR_WIDTH) -> tuple:
  """(XLA_FLAGS after apply_numerics, the debug options XLA compiled with, as text)."""
  dump = tmp_path / f"dump_{len(list(tmp_path.iterdir()))}"
  env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} {xla_flags}".strip())
  code = _PROBE.format(enabled=enabled, start_first=start_first, width=width)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  options = sorted(glob.glob(str(dump / "**" / "*compile_options*"), recursive=True))
  assert options, "XLA wrote no dump"
  flags = eval(proc.stdout.splitlines()[0]).split()
  flags.remove(f"--xla_dump_to={dump}")
  return flags, open(options[-1]).read()


def test_ynn_convolutions_off_reaches_xla_in_a_single_threaded_worker(tmp_path):
  # What a worker starts with: the parent's flags, then the single-thread flags, and a user's
  # flag after those still applies (XLA stops reading at a bare token such as the common recipe's
  # intra_op_parallelism_threads=1, which cnnlab does not use).
  flags, options = _run(False, tmp_path, xla_flags=f"{local_workers.SINGLE_THREAD_XLA_FLAGS} "
                        "--xla_dump_hlo_as_text")
  assert flags[0] == environment.YNN_CONVOLUTIONS_OFF_XLA_FLAG
  assert "xla_dump_hlo_as_text: true" in options
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" not in options
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in options  # Dots stay with YNNPACK.
  assert "xla_cpu_multi_thread_eigen: false" in options
  assert "xla_gpu_deterministic_ops: true" in options


def test_ynn_convolutions_on_and_users_own_setting_are_kept(tmp_path):
  flags, options = _run(True, tmp_path)
  assert flags == list(environment.DETERMINISTIC_XLA_FLAGS)
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" in options
  users = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
  flags, options = _run(False, tmp_path, xla_flags=users)
  assert environment.YNN_CONVOLUTIONS_OFF_XLA_FLAG not in flags and users in flags
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" in options
  assert "LIBRARY_FUSION_TYPE_REDUCE" not in options


def test_ynn_setting_after_jax_started_leaves_the_recorded_flags_true(tmp_path):
  # XLA read its flags when it started; adding one now would record a flag it never applied.
  flags, options = _run(False, tmp_path, start_first=True)
  assert environment.YNN_CONVOLUTIONS_OFF_XLA_FLAG not in flags
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" in options


def test_vector_width_reaches_xla_and_users_own_width_is_kept(tmp_path):
  # The base config's 512 is applied (XLA's own default is 256) and recorded in XLA_FLAGS.
  assert base_config().xla_cpu_vector_width == 512
  flags, options = _run(False, tmp_path, width=512,
                        xla_flags=local_workers.SINGLE_THREAD_XLA_FLAGS)
  assert "--xla_cpu_prefer_vector_width=512" in flags
  assert "xla_cpu_prefer_vector_width: 512" in options
  assert "xla_cpu_multi_thread_eigen: false" in options
  flags, options = _run(False, tmp_path, width=256)
  assert not any("vector_width" in f for f in flags)
  assert "xla_cpu_prefer_vector_width: 256" in options
  flags, options = _run(False, tmp_path, width=512, xla_flags="--xla_cpu_prefer_vector_width=128")
  assert "--xla_cpu_prefer_vector_width=512" not in flags
  assert "xla_cpu_prefer_vector_width: 128" in options


_STEP_DIGEST = """
import functools
import jax, jax.numpy as jnp, numpy as np, optax
from cnnlab.base import digests, environment
from cnnlab.nets import models
from cnnlab.training import optim, steps
from cnnlab.configs import base_config


def step_digest():
  \"\"\"The params' digest after one train step of a small BN net on a fixed random batch.\"\"\"
  config = base_config()
  config.model.update(name="vgg_cnn", stages=((16,), (32,)), bn_placement="before_act")
  model = models.get_model(config.model, 10)
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.05))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((32, 28, 28, 1)).astype(np.float32)
  state = steps.create_train_state(model, tx, steps.split_seed(0), images.shape[1:])
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(rng.integers(0, 10, 32))}
  state, _ = jax.jit(functools.partial(steps.train_step, aux_loss_weight=0.0))(state, batch)
  return digests.tree_sha256(state.params)["sha256"]
"""


def test_in_process_tests_run_under_the_default_numerics():
  """conftest starts this process's JAX under the XLA flags a default config gives a training
  process, so the in-process parity tests check the numerics users run. One BN train step's bits
  here equal a fresh process's under `apply_numerics` and differ from one under XLA's defaults
  (XLA's or YNNPACK's convolution kernels), and XLA_FLAGS is left as this shell had it."""
  namespace = {}
  exec(_STEP_DIGEST, namespace)
  digests = {}
  for numerics in ("default config", "XLA defaults"):
    apply = "environment.apply_numerics(base_config())" if numerics == "default config" else ""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", f"{_STEP_DIGEST}\n{apply}\nprint(step_digest())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    digests[numerics] = proc.stdout.split()[-1]
  assert digests["default config"] != digests["XLA defaults"]  # The check can tell them apart.
  assert namespace["step_digest"]() == digests["default config"]
  assert os.environ.get("XLA_FLAGS") == SHELL_XLA_FLAGS


_POOL_PROBE = """
import collections, json, os, jax
from cnnlab.base import environment
from cnnlab.configs import base_config
environment.apply_numerics(base_config())
jax.jit(lambda x: x + 1)(jax.numpy.ones(3)).block_until_ready()
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip()
                            for t in os.listdir("/proc/self/task"))
print(json.dumps({"pool": names["tf_XLAEigen"],
                  "recorded": environment.describe("float32")["threads"],
                  "cores": len(os.sched_getaffinity(0))}))
"""


def _pool(devices: int, **env) -> dict:
  """XLA:CPU's thread pool (its threads, counted by name) in a fresh process over `devices`
  forced CPU devices after apply_numerics, and what a run records."""
  env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-c", _POOL_PROBE], capture_output=True, text=True,
                        env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.splitlines()[-1])


def test_forced_devices_get_two_pool_threads_each_plus_the_cores():
  """XLA's default pool (one thread per core or device) starves a collective: each device's
  launch holds a thread, and the next launch another; 4 devices on 2 cores aborted in most whole
  runs (`rendezvous.cc ... Termination timeout`)."""
  got = _pool(4, PJRT_NPROC=None, NPROC=None)
  assert got["pool"] == got["recorded"] == got["cores"] + 2 * 4
  assert environment.cpu_thread_pool_size(1, 2) == 2  # One device: XLA's default, bits unchanged.


def test_a_users_thread_pool_size_is_kept():
  got = _pool(4, PJRT_NPROC="5", NPROC=None)
  assert got["pool"] == got["recorded"] == 5
