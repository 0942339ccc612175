"""What, besides the config and the seed, changes the bits of a run's results.

Floating-point results depend on the package versions, the backend and its device count, the
number of threads XLA uses, the XLA flags, the dtype and the code itself. Every run records these
in `environment.json`; a sweep refuses to mix results computed under different settings.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import jax

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


def thread_count() -> int:
  """CPU threads this process may run on (XLA's CPU thread pool sizes itself from this)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


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
      "dtype": dtype,
      "git_commit": git_commit(),
  }


# The parts of `describe` that must agree for results to be comparable bit for bit.
BIT_DETERMINING_KEYS = ("packages", "backend", "device_count", "threads", "xla_flags", "dtype")
