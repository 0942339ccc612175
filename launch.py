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
Errors in the user's config, data or workdir print one line and exit with status 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/default.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for this run's outputs; default runs/<config name>[_<variant>].")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "summary"],
                          "train: train (every cell of a sweep); summary: print the model summary.")
_INPUT_SHAPE = flags.DEFINE_list(
    "input_shape", None, "summary only: H,W,C instead of the dataset's (e.g. 224,224,3).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "summary only: classes instead of the dataset's (e.g. 1000).")
# Multi-host: the arguments of jax.distributed.initialize (none: one process, or SLURM's).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: host:port of process 0, e.g. 10.0.0.1:1234.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index.")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # JAX/orbax INFO lines would bury the progress bar.
  from cnnlab import errors, rundir, summary, sweep  # After flag parsing: keeps `--help` fast.
  if _MODE.value == "summary":
    try:
      shape = tuple(int(v) for v in _INPUT_SHAPE.value) if _INPUT_SHAPE.value else None
    except ValueError:
      raise app.UsageError(f"--input_shape={','.join(_INPUT_SHAPE.value)} must be integers "
                           "H,W,C, e.g. 224,224,3.") from None
    try:
      print(summary.summarize(_CONFIG.value, shape, _NUM_CLASSES.value).table())
    except errors.CnnlabError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  from cnnlab import environment, mesh
  try:  # Once, before JAX starts its backend: numerics and the processes of a multi-host run.
    environment.apply_numerics(_CONFIG.value.deterministic, _CONFIG.value.matmul_precision)
    mesh.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except errors.CnnlabError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  workdir = _WORKDIR.value or rundir.default_workdir(config_arg)
  try:
    written = sweep.run(
        _CONFIG.value, workdir, overrides=[f"{k}={v!r}" for k, v in sorted(overrides.items())],
        command=" ".join(sys.argv), progress=_PROGRESS.value)
  except errors.CnnlabError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))
  print(f"wrote {written}")


if __name__ == "__main__":
  app.run(main)
