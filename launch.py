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
_MODE = flags.DEFINE_enum("mode", "train", ["train", "summary", "visualize"],
                          "train: train (every cell of a sweep); summary: print the model summary; "
                          "visualize: write pictures of the run in --workdir (no --config).")
_INPUT_SHAPE = flags.DEFINE_list(
    "input_shape", None, "summary only: H,W,C instead of the dataset's (e.g. 224,224,3).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "summary only: classes instead of the dataset's (e.g. 1000).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # JAX/orbax INFO lines would bury the progress bar.
  if _MODE.value == "visualize":
    return _visualize()
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (all modes but --mode=visualize).")
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
  config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  workdir = _WORKDIR.value or rundir.default_workdir(config_arg)
  try:
    written = sweep.run(
        _CONFIG.value, workdir, overrides=[f"{k}={v!r}" for k, v in sorted(overrides.items())],
        command=" ".join(sys.argv), progress=_PROGRESS.value)
  except errors.CnnlabError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {written}")


def _visualize():
  """--mode=visualize: pictures of a trained run; its config comes from --workdir/config.json."""
  if _WORKDIR.value is None or _CONFIG.value is not None:
    raise app.UsageError("--mode=visualize takes --workdir (a trained or checkpointed run) and no "
                         "--config: the config is read from the workdir.")
  from cnnlab import errors, visualize
  try:
    print(f"wrote {visualize.write_pictures(_WORKDIR.value)}")
  except errors.CnnlabError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
