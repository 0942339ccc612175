"""What, besides the config and the seed, changes the bits of a run's results.

Floating-point results depend on the package versions, the backend and its device count, the
number of threads XLA uses, the XLA flags, the dtype and the code itself. Every run records these
in `environment.json`; a sweep refuses to mix results computed under different settings.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import subprocess

import jax
from jax._src import xla_bridge

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain",
            "numpy", "scipy", "ml-collections", "cnnlab")


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def git_commit() -> str:
  """The commit of the cnnlab source tree, with '-dirty' if it has uncommitted changes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown (not a git checkout)"


DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)


MATMUL_PRECISIONS = ("highest", "default")


# XLA:CPU hands convolutions, dots and reductions to the YNNPACK library by default. This flag
# takes convolutions back to XLA's own kernels (dots and reductions stay with YNNPACK), which was
# faster on the 2-core AVX-512 machine cnnlab is built on: the ablation net's train step 6.8 ->
# 5.6 ms (2 threads), 9.0 -> 8.5 ms (1 thread); VGG-small and ResNet-20 1.36x and 1.15x at batch
# 128 (README, "Speed against PyTorch"). With dots and reductions taken from YNNPACK too, XLA's
# own GEMMs start threads past `--xla_cpu_multi_thread_eigen=false`: a one-core sweep worker's
# step with standard dropout went from 10 to 14 ms.
YNN_CONVOLUTIONS_OFF_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


# LLVM's preferred vector width, in bits, for the code XLA:CPU generates itself (its fusions:
# BatchNorm, activations, dropout and pooling selects, layout transposes; not the convolution
# kernels, which are precompiled). XLA's default is 256; 512 fills AVX-512 registers where the CPU
# has them and is only a preference elsewhere. On the 2-core AVX-512 machine cnnlab is built on
# the ablation net's train step went 5.0 -> 4.4 ms (2 threads) and 8.2 -> 7.2 ms (one thread),
# VGG-small's 3-6% faster, ResNet-20's within 1% (README, "Speed against PyTorch").
XLA_CPU_VECTOR_WIDTHS = (128, 256, 512)
XLA_DEFAULT_CPU_VECTOR_WIDTH = 256

# Numerics fields added to the config after runs were saved without them, with the value such
# runs had (XLA's own defaults): `numerics_setting` reads a saved config through this.
SAVED_BEFORE_THE_FIELD = {"xla_cpu_ynn_convolutions": True,
                          "xla_cpu_vector_width": XLA_DEFAULT_CPU_VECTOR_WIDTH,
                          "label_smoothing": 0.0, "evaluate_test": True}


def numerics_setting(config, key: str):
  """`config`'s value of a field of SAVED_BEFORE_THE_FIELD, or the value runs had before it."""
  return config.get(key, SAVED_BEFORE_THE_FIELD[key])


# The config fields `apply_numerics` sets for a whole process (XLA reads its flags once, when it
# starts): every run a process trains shares them, so a sweep cannot vary them between cells.
PROCESS_WIDE_FIELDS = ("deterministic", "matmul_precision", "xla_cpu_ynn_convolutions",
                       "xla_cpu_vector_width")


# XLA:CPU's PjRt client runs every device's part of a program on one thread pool, sized from
# PJRT_NPROC (else NPROC, else the cores) when the backend starts. Over forced host devices each
# device's launch holds a pool thread until its part is done (blocked on its completion, or in a
# collective until every device joins), and the launch of the next program holds another while it
# waits for the device: with fewer than two threads a device, the device whose part has no thread
# never joins the collective and XLA aborts after 40 s (`rendezvous.cc ... Termination timeout`).
# Measured on 2 cores with 4 devices, whole default runs: 2 threads (XLA's default) aborted in
# 2 of 3, 6 in 8 of 8, 8 in 0 of 8. cnnlab gives the pool two threads a device plus the cores.
THREAD_POOL_ENV = ("PJRT_NPROC", "NPROC")


def forced_cpu_device_count() -> int:
  """The CPU devices this process asks XLA for (`--xla_force_host_platform_device_count` in
  XLA_FLAGS, or jax's `jax_num_cpu_devices`); 1 when it asks for none."""
  counts = [int(f.split("=", 1)[1]) for f in os.environ.get("XLA_FLAGS", "").split()
            if f.startswith("--xla_force_host_platform_device_count=")
            and f.split("=", 1)[1].isdigit()]
  counts.append(int(jax.config.jax_num_cpu_devices))
  return max(1, *counts)


def cpu_thread_pool_size(devices: int, cores: int) -> int:
  """Threads XLA:CPU's pool needs so that `devices` forced devices never starve it."""
  return cores + 2 * devices if devices > 1 else cores


def apply_cpu_thread_pool() -> None:
  """Sets PJRT_NPROC to `cpu_thread_pool_size` when this process runs several CPU devices and
  neither PJRT_NPROC nor NPROC is set (a user's value is kept). Like the XLA flags it must be set
  before JAX starts its backend, and what the pool had is recorded (`threads`)."""
  devices = forced_cpu_device_count()
  if devices <= 1 or any(os.environ.get(name, "").strip().isdigit() for name in THREAD_POOL_ENV):
    return
  if xla_bridge.backends_are_initialized():
    logging.warning("XLA has started with a thread pool of %d for %d CPU devices; set "
                    "PJRT_NPROC=%d before JAX starts, or runs may abort in a collective.",
                    thread_count(), devices, cpu_thread_pool_size(devices, _cores()))
    return
  os.environ["PJRT_NPROC"] = str(cpu_thread_pool_size(devices, _cores()))


def apply_numerics(config) -> None:
  """Sets the process-wide numerics `config` asks for: `deterministic` (`apply_determinism`),
  `xla_cpu_ynn_convolutions` and `xla_cpu_vector_width` (XLA's defaults, True and 256, for
  configs saved before they existed) and the float32 matmul/conv precision: `highest` is true
  float32 everywhere; `default` lets GPUs use TF32 tensor cores (faster, ~1e-3 relative rounding).
  Measured on an H100: with `default`, a vmapped cell and its seeds run one by one drifted apart
  by 2 test examples within 88 steps; with `highest` they agreed to 1e-4, as on the CPU."""
  apply_determinism(config.deterministic)
  apply_cpu_thread_pool()
  apply_xla_cpu_ynn_convolutions(numerics_setting(config, "xla_cpu_ynn_convolutions"))
  apply_xla_cpu_vector_width(numerics_setting(config, "xla_cpu_vector_width"))
  jax.config.update("jax_default_matmul_precision", config.matmul_precision)


def numerics_not_applied(config) -> str | None:
  """Once XLA has started, the first XLA flag `config` asks for that it started without (`config`
  field, flag), as one sentence; None if it started with all of them or has not started yet (then
  `apply_numerics` sets them). A Python session that already ran JAX cannot honour such a config:
  its runs would record settings that never applied."""
  if not xla_bridge.backends_are_initialized():
    return None
  current = os.environ.get("XLA_FLAGS", "").split()
  wanted = []
  if config.deterministic:
    wanted += [("deterministic=True", f) for f in DETERMINISTIC_XLA_FLAGS]
  if (not numerics_setting(config, "xla_cpu_ynn_convolutions")
      and not _has_flag("--xla_cpu_experimental_ynn_fusion_type")):
    wanted.append(("xla_cpu_ynn_convolutions=False", YNN_CONVOLUTIONS_OFF_XLA_FLAG))
  width = numerics_setting(config, "xla_cpu_vector_width")
  if width != XLA_DEFAULT_CPU_VECTOR_WIDTH and not _has_flag("--xla_cpu_prefer_vector_width"):
    wanted.append((f"xla_cpu_vector_width={width}", f"--xla_cpu_prefer_vector_width={width}"))
  missing = [(setting, flag) for setting, flag in wanted if flag not in current]
  if not missing:
    return None
  setting, flag = missing[0]
  return (f"config.{setting} needs the XLA flag {flag}, but JAX already started in this process "
          f"without it (XLA_FLAGS={' '.join(current) or '(empty)'!r})")


def apply_xla_cpu_ynn_convolutions(enabled: bool) -> None:
  """With `enabled` False, adds `YNN_CONVOLUTIONS_OFF_XLA_FLAG` to XLA_FLAGS: XLA:CPU then runs
  convolutions with its own kernels instead of YNNPACK's. That changes the low bits of CPU
  results (XLA_FLAGS is recorded in every run's environment) and nothing on GPUs. A YNN setting
  already in XLA_FLAGS (the user's) is kept. Like `apply_determinism` it must run before JAX
  starts its backend; once the backend runs, XLA_FLAGS is left alone, so what a run records is
  what XLA was started with."""
  if not enabled and not _has_flag("--xla_cpu_experimental_ynn_fusion_type"):
    _add_flags([YNN_CONVOLUTIONS_OFF_XLA_FLAG], "xla_cpu_ynn_convolutions=False")


def apply_xla_cpu_vector_width(width: int) -> None:
  """Unless `width` is XLA's default, adds `--xla_cpu_prefer_vector_width=<width>` to XLA_FLAGS
  (see XLA_CPU_VECTOR_WIDTHS); a width already in XLA_FLAGS (the user's) is kept. Like the other
  flags it must be set before JAX starts its backend, and it is recorded in every run's
  environment."""
  if (width != XLA_DEFAULT_CPU_VECTOR_WIDTH
      and not _has_flag("--xla_cpu_prefer_vector_width")):
    _add_flags([f"--xla_cpu_prefer_vector_width={width}"], f"xla_cpu_vector_width={width}")


def _has_flag(name: str) -> bool:
  return any(f.split("=")[0] == name for f in os.environ.get("XLA_FLAGS", "").split())


def _add_flags(new: list[str], setting: str) -> None:
  """Puts the flags of `new` not yet in XLA_FLAGS first in it: XLA stops reading at a token that
  is not a `--` flag (such as the `intra_op_parallelism_threads=1` of a common single-thread
  recipe), so a flag appended after one would be recorded but never applied. Once XLA has
  started it read its flags already: then XLA_FLAGS is left as it is (a run records what XLA
  started with) and `setting` applies from the next process, with a warning."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  missing = [f for f in new if f not in flags]
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    logging.warning("XLA has started without %s, so %s applies from the next process.",
                    " ".join(missing), setting)
    return
  os.environ["XLA_FLAGS"] = " ".join(missing + flags)


def apply_determinism(deterministic: bool) -> None:
  """With `deterministic`, adds XLA's deterministic-ops flag to XLA_FLAGS (the lecture's
  `torch.backends.cudnn.deterministic = True`): GPU convolutions and scatter-adds then always
  run the same algorithm in the same order. Measured on an H100: without it two identical runs
  differed in the low bits; with it they were bit-identical. The CPU backend is deterministic
  either way and ignores the flag.

  XLA reads XLA_FLAGS when the backend starts, so this must run before the first JAX
  computation of the process (cnnlab's entry points call it first).
  """
  if deterministic:
    _add_flags(list(DETERMINISTIC_XLA_FLAGS), "deterministic=True")


def enable_compilation_cache(directory: str | None = None) -> str:
  """Keeps XLA's compiled programs on disk (JAX's persistent compilation cache), so a rerun of a
  study, or the next worker process, loads what an earlier one compiled instead of compiling it
  again. The executables are the same bytes, so results are too. `directory` defaults to
  $CNNLAB_XLA_CACHE or ~/.cache/cnnlab/xla; "off" disables it. Returns the directory used."""
  directory = directory or os.environ.get("CNNLAB_XLA_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "cnnlab", "xla")
  if directory == "off":
    return directory
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def _cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def thread_count() -> int:
  """Threads of XLA's CPU thread pool: PJRT_NPROC or NPROC where set (as XLA reads them), else
  the cores this process may run on."""
  for name in THREAD_POOL_ENV:
    value = os.environ.get(name, "")
    if value.strip().isdigit():
      return int(value)
  return _cores()


def describe(dtype: str) -> dict:
  """The settings that determine the low bits of a run's results."""
  devices = jax.devices()
  return {
      "packages": package_versions(),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "backend": jax.default_backend(),
      "device_count": len(devices),
      "device_kind": devices[0].device_kind,
      "threads": thread_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
      "dtype": dtype,
      "git_commit": git_commit(),
  }


# The parts of `describe` that must agree for results to be comparable bit for bit.
BIT_DETERMINING_KEYS = ("packages", "backend", "device_count", "threads", "xla_flags", "dtype",
                        "matmul_precision")
