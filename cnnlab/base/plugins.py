"""Importing the researcher's own modules that a config names (`config.imports`): where their
models and datasets register themselves. Every process that builds or reads a config imports
them first, so a sweep worker, a SLURM job or `--mode=visualize` knows what the launching
process knew."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from cnnlab.base.errors import ConfigError


def _import_file(path: str) -> None:
  """Imports the .py file `path` as the module named by its file name (so that registrations
  record the same module name in every process)."""
  full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise ConfigError(f"config.imports names {path!r}, which is not a file (paths are relative "
                      f"to the current directory, {os.getcwd()}).")
  name = os.path.splitext(os.path.basename(full))[0]
  loaded = sys.modules.get(name)
  if loaded is not None:
    if os.path.abspath(getattr(loaded, "__file__", "") or "") == full:
      return
    raise ConfigError(f"config.imports names {path!r}, but the module name {name!r} is already "
                      f"taken by {getattr(loaded, '__file__', None) or 'a built-in module'}; "
                      f"rename the file.")
  spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  directory = os.path.dirname(full)
  if directory not in sys.path:  # Its own imports of files beside it work as in a script.
    sys.path.append(directory)
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise


def _is_file(name: str) -> bool:
  return name.endswith(".py") or os.sep in name


def resolved(names: Sequence[str]) -> tuple[str, ...]:
  """`names` with .py paths made absolute, so that a process started elsewhere (a SLURM job, a
  worker) imports the same files."""
  return tuple(os.path.abspath(n) if isinstance(n, str) and _is_file(n) else n for n in names)


def import_modules(names: Sequence[str]) -> None:
  """Imports each entry of `names`: a module name (`my_lab.models`) or a path to a .py file.
  A module imported before is not imported again. Raises ConfigError, one line naming the
  entry, for one that is missing or fails while it is imported."""
  if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
    raise ConfigError(f"config.imports={names!r} must be a tuple of module names or .py paths, "
                      f"e.g. ('my_models.py',).")
  for name in names:
    try:
      if _is_file(name):
        _import_file(name)
      else:
        importlib.import_module(name)
    except ConfigError as e:
      if str(e).startswith("config.imports"):
        raise
      raise ConfigError(f"config.imports: {name!r} failed while importing: {e}") from None
    except ModuleNotFoundError as e:
      raise ConfigError(f"config.imports names {name!r}, which cannot be imported: {e} (a "
                        f"module must be on PYTHONPATH; a file is given as a path ending in "
                        f".py).") from None
    except Exception as e:  # The user's module raised: name it, in one line.
      last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
      raise ConfigError(f"config.imports: {name!r} failed while importing: "
                        f"{type(e).__name__}: {last}") from None
