"""cnnlab's command line: parses flags and calls into `cnnlab`; nothing else lives here.

    python launch.py --config=experiments/default.py --workdir=runs/default
    python launch.py --config=experiments/default.py --config.model.dropout=spatial
    python launch.py --config=experiments/default.py --mode=summary
    python launch.py --config=experiments/default.py --mode=summary \
        --config.model.name=resnet50 --input_shape=224,224,3 --num_classes=1000

`--config` takes `file.py` or `file.py:variant`; `--config.a.b=value` overrides come after it.
A config with a `sweep` section trains every cell of its grid and writes a report.
`--mode=summary` prints the model's per-layer table (shapes, parameters, multiply-adds, receptive
fields) and the FLOPs of one training step, without reading data or training.
`--mode=visualize --workdir=W` (no --config) writes pictures of the run in W to W/pictures/.
Errors in the user's config, data or workdir print one line and exit with status 2; SIGTERM or
Ctrl-C one line and status 130 (a second signal exits at once).
"""

import os
import shlex
import sys
import traceback
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cnnlab.base import interrupts  # Standard library only: keeps `--help` fast.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/default.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for this run's outputs; default runs/<config name>[_<variant>].")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "summary", "visualize"],
                          "train: train (every cell of a sweep); summary: print the model summary; "
                          "visualize: write pictures of the run in --workdir (no --config).")
_INPUT_SHAPE = flags.DEFINE_list(
    "input_shape", None, "summary only: H,W,C instead of the dataset's (e.g. 224,224,3).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "summary only: classes instead of the dataset's (e.g. 1000).")
# Multi-host: the arguments of jax.distributed.initialize (none: one process, or SLURM's).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0, e.g. 10.0.0.1:1234.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index.")


def _fail(message: str, status: int = 2) -> NoReturn:
  """The one way launch.py reports a problem in the user's input: one line, exit status 2
  (130 for an interrupted run, which saved a checkpoint)."""
  hosts = sys.modules.get("cnnlab.training.hosts")
  if hosts is not None and hosts.attempted():  # Every process of the run ends, in one line.
    hosts.fail(message, status)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a bad flag, `--config.*` override or config file ends in one
  `error:` line and exit 2 (absl would exit 1; ml_collections lets the config file's own
  exceptions escape as tracebacks and defers a missing file's error to the first use)."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.present and not isinstance(_CONFIG.value, ml_collections.ConfigDict):
      _CONFIG.value.keys()  # A file that failed to load (e.g. missing) raises its error here.
      raise TypeError(f"get_config() returned a {type(_CONFIG.value).__name__}, not a ConfigDict")
    return rest
  except Exception as e:  # flags.Error, or raised by the user's config file or an override.
    signalled = interrupts.signalled_as(e)
    if signalled is not None:  # A signal inside an import the config file made.
      raise signalled from None
    from cnnlab import cli  # The error path only: keeps `--help` fast.
    _fail(cli.flag_error_line(e, argv, flags.FLAGS))


def _input_shape() -> tuple[int, ...] | None:
  try:
    return tuple(int(v) for v in _INPUT_SHAPE.value) if _INPUT_SHAPE.value is not None else None
  except ValueError:
    _fail(f"--input_shape={','.join(_INPUT_SHAPE.value)} must be 3 positive integers H,W,C, "
          "e.g. 224,224,3.")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}; flags take the form --name=value.")
  logging.set_verbosity(logging.WARNING)  # JAX/orbax INFO lines would bury the progress bar.
  from cnnlab import cli
  ignored = cli.mode_flag_error(_MODE.value, flags.FLAGS)
  if ignored:
    _fail(ignored)
  from cnnlab.training import (
    supervisor,  # The parent of a multi-process run's process starts no backend.
  )
  hosts_flags = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if (_MODE.value == "train" and supervisor.requested(*hosts_flags)
      and not supervisor.is_child()):
    try:
      supervisor.check_arguments(*hosts_flags)
    except ValueError as e:  # A ConfigError: flags the user can fix.
      _fail(str(e))
    sys.exit(supervisor.run(sys.argv, _PROCESS_ID.value
                            if _PROCESS_ID.value is not None else os.environ.get("SLURM_PROCID")))
  if _MODE.value == "visualize":
    return _visualize()
  if _CONFIG.value is None:
    _fail("--config is required (all modes but --mode=visualize), e.g. "
          "--config=experiments/default.py.")
  from cnnlab import api, configs
  from cnnlab.base import errors
  from cnnlab.inspection import summary
  from cnnlab.study import sweep
  from cnnlab.training import hosts, rundir
  try:
    if _MODE.value == "summary":
      configs.complete(_CONFIG.value)  # The models of `config.imports`.
      print(summary.summarize(_CONFIG.value, _input_shape(), _NUM_CLASSES.value).table())
      return
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    workdir = rundir.default_workdir(config_arg) if _WORKDIR.value is None else _WORKDIR.value
    # Checked before anything is written; numerics set before JAX starts its backend, then the
    # processes of a multi-host run join.
    api.prepare(_CONFIG.value, workdir)
    hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    hosts.check_same_config(_CONFIG.value)
    outcome = sweep.run(
        _CONFIG.value, workdir, overrides=[f"{k}={v!r}" for k, v in sorted(overrides.items())],
        command=shlex.join(["python", *sys.argv]), progress=_PROGRESS.value)
    hosts.finish()
  except Exception as e:  # One line for what the user can act on; anything else may be a bug.
    known = errors.user_error(e)
    if known is None:
      if not hosts.attempted():
        raise
      hosts.lost_peer(e)
      traceback.print_exc()  # A bug; the other processes are told in one line.
      _fail(f"{type(e).__name__} (a bug in cnnlab? traceback above)")
    _fail(str(known), getattr(known, "exit_code", 2))
  print("\n".join(cli.outcome_lines(outcome)))


def _visualize():
  """--mode=visualize: pictures of a trained run; its config comes from --workdir/config.json."""
  if not _WORKDIR.value or _CONFIG.value is not None:
    _fail("--mode=visualize takes --workdir (a trained or checkpointed run) and no --config: "
          "the config is read from the workdir.")
  from cnnlab.base import errors
  from cnnlab.inspection import visualize
  try:
    print(f"wrote {visualize.write_pictures(_WORKDIR.value)}")
  except errors.CnnlabError as e:
    _fail(str(e))


if __name__ == "__main__":
  interrupts.stop_on_signal()  # Before anything starts: a signal anywhere is one line.
  try:
    app.run(main, flags_parser=_parse_flags)
  except BaseException as e:  # noqa: BLE001 -- a signal, perhaps wrapped by an import; else re-raised.
    signalled = None if isinstance(e, SystemExit) else interrupts.signalled_as(e)
    if signalled is None:
      raise
    _fail(str(signalled), 130)
