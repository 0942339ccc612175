"""Turning a failed command line into the one line a user can act on (used by launch.py).

absl exits 1 with a usage dump on a bad flag, and ml_collections lets a config file's own
exception escape as a traceback; `flag_error_line` names the flag or `--config.*` override, the
value and what it allows instead (an unknown config key lists the fields that exist there).
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from cnnlab.base import errors, files
from cnnlab.training import validation


def flag_error_line(error: Exception, argv: list[str], flag_values: flags.FlagValues) -> str:
  """One line for a flag parsing failure, naming the flag and what it allows: an override of a
  config field that does not exist lists the fields there; a value of the wrong type says the
  type; a config file's own exception is its last line (absl shows a whole traceback)."""
  spec = config_spec(argv)
  config = load_config(spec) if spec else None
  for arg in [a for a in argv[1:] if a.startswith("--config.")] if config is not None else ():
    key, _, _ = arg[len("--config."):].partition("=")
    try:
      validation.check_key(config, key)
    except errors.ConfigError as e:
      return f"{arg}: {e}"
  text = str(error).strip()
  last = text.splitlines()[-1].strip() if text else type(error).__name__
  if not isinstance(error, flags.Error):
    return f"--config={spec}: {type(error).__name__}: {last}"
  # absl: "flag --name=value: what is wrong", or a config file's traceback after such a line.
  flag_and_value, _, reason = text.splitlines()[0].removeprefix("flag ").partition(": ")
  reason = last if "\n" in text else reason
  # A config file that raised one of cnnlab's errors (e.g. a module of config.imports that fails):
  # its message is the line, not the exception's dotted class name.
  reason = re.sub(r"^cnnlab(\.\w+)*\.\w+Error: ", "", reason)
  if not reason:  # E.g. "Unknown command line flag 'x'".
    return flag_and_value
  name = flag_and_value.lstrip("-").partition("=")[0]
  if name.startswith("config.") and config is not None:
    *parents, leaf = name.split(".")[1:]
    node = config
    for part in parents:
      node = node[part]
    kind = node.get_ref(leaf).get_type().__name__  # The declared type, also of a None field.
    return f"{flag_and_value}: {reason}; config.{name[7:]} takes {_KINDS.get(kind, kind)}."
  if name in flag_values and flag_values[name].flag_type() in _KINDS:
    return f"{flag_and_value}: {reason}; --{name} takes {_KINDS[flag_values[name].flag_type()]}."
  return f"{flag_and_value}: {reason}"


# launch.py's flags that apply to one mode only -> that mode; what each other mode does instead.
MODE_FLAGS = {"input_shape": "summary", "num_classes": "summary", "coordinator_address": "train",
              "num_processes": "train", "process_id": "train"}
_MODE_INSTEAD = {
    "train": "training uses the dataset's input shape and classes",
    "summary": "the summary runs in one process",
    "visualize": "visualize reads the run's config and dataset from --workdir and runs in one "
                 "process"}


def mode_flag_error(mode: str, flag_values: flags.FlagValues) -> str | None:
  """The one line for a flag given with a mode that would silently ignore it (`MODE_FLAGS`),
  naming the flag; None when every flag given applies to `mode`."""
  for name, applies_to in MODE_FLAGS.items():
    if mode != applies_to and flag_values[name].present:
      return f"--{name} applies to --mode={applies_to} only; {_MODE_INSTEAD[mode]}."
  return None


# A sweep with more cells than this ends with its best cell's line instead of one per cell.
MAX_CELL_LINES = 12


def outcome_lines(outcome) -> list[str]:
  """What `launch.py` prints when training ends (`outcome`: a `sweep.Outcome`): the file it
  wrote and the test accuracy, a sweep's per cell as the mean over its finished seeds; or that
  the workdir already held every run finished, so nothing was trained."""
  workdir = os.path.dirname(outcome.path)
  if outcome.single:
    ((accuracy, _, _),) = outcome.test_accuracy.values()
    if outcome.already_finished:
      return [f"{workdir} already holds a finished run of this config (test accuracy "
              f"{accuracy:.4f}): {outcome.path}"]
    return [f"wrote {outcome.path}: test accuracy {accuracy:.4f}"]
  wrote = (f"{workdir} already holds a finished sweep of this config, nothing was retrained; "
           f"wrote its report {outcome.path}" if outcome.already_finished
           else f"wrote {outcome.path}")

  def line(cell, accuracy, done, seeds):
    if accuracy is None:
      return f"{cell or 'base'}: all {seeds} seeds diverged"
    return f"{cell or 'base'}: {accuracy:.4f} (mean of {done} of {seeds} seeds)"
  cells = outcome.test_accuracy
  if len(cells) > MAX_CELL_LINES:
    trained = {c: a for c, a in cells.items() if a[0] is not None}
    best = max(trained, key=lambda c: trained[c][0]) if trained else None
    return [f"{wrote}; best of {len(cells)} cells by test accuracy: "
            + (line(best, *trained[best]) if best is not None else "none, every run diverged")]
  return [f"{wrote}; test accuracy per cell:"] + [
      f"  {line(c, *a)}" for c, a in cells.items()]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for scripts without a config file (the benchmarks; pass it as
  `app.run(main, flags_parser=cli.parse_flags)`): a bad flag ends in one `error:` line naming
  it and what it takes, and exit status 2, instead of absl's usage dump and exit 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e, argv, flags.FLAGS))


def write_json_or_fail(flag: str, path: str, obj) -> None:
  """A script's `--<flag>=path` JSON output, written atomically (`files.write_json_atomic`); a
  failed write (missing folder, full disk, no permission) is one `error:` line and exit 2."""
  try:
    files.write_json_atomic(path, obj)
  except errors.WorkdirError as e:
    fail(f"--{flag}={path}: cannot write it ({getattr(e.__cause__, 'strerror', None) or e}).")


def fail(message: str) -> NoReturn:
  """How a script reports a problem a user can act on: one `error:` line, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_spec(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=x.py:v` or `--config x.py:v`)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.partition("=")[2]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(spec: str) -> ml_collections.ConfigDict | None:
  """The config file's config without overrides (None if the file itself fails to load): when
  an override fails, ml_collections leaves the `--config` flag without a value."""
  probe, argv = flags.FlagValues(), ["launch.py", f"--config={spec}"]
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=probe, sys_argv=argv)
  try:
    probe(argv)
    return holder.value if isinstance(holder.value, ml_collections.ConfigDict) else None
  except Exception:  # The file's own error; reported as such by the caller.
    return None


# Python or absl flag type -> what a value of it looks like.
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "tuple": "a tuple, e.g. (1, 2)", "list": "a comma-separated list"}
