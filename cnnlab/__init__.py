"""cnnlab: reproducible JAX/Flax research code for convolutional networks.

The Python API (cnnlab.api) and the extension points, importable from here:

    load_config, train, sweep, load_run, build_model   run and read experiments from Python
    base_config, sweep_base                            start an experiment file
    register_model, register_dataset                   bring your own model or data

They are imported on first use, so `import cnnlab` (and `launch.py --help`) stays fast.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "cnnlab.api", "train": "cnnlab.api", "sweep": "cnnlab.api",
    "load_run": "cnnlab.api", "build_model": "cnnlab.api", "Run": "cnnlab.api",
    "base_config": "cnnlab.configs", "sweep_base": "cnnlab.configs",
    "register_model": "cnnlab.nets.models", "register_dataset": "cnnlab.data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_EXPORTS])
