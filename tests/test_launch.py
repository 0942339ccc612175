"""The command line: overrides, default workdir, and a clear one-line error for every bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_launch

from cnnlab.base import environment, errors
from cnnlab.training import loop, rundir


def _assert_clean_failure(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in error_lines[0]


def test_override_reaches_config_json_and_bad_value_fails_cleanly(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
                    "--config.model.dropout=spatial", "--config.model.dropout_rate=1.5")
  _assert_clean_failure(proc, "config.model.dropout_rate=1.5", "[0, 1)")
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
                    "--config.model.name=mlp", "--config.model.hidden=(16,)",
                    "--config.model.dropout=standard", "--config.model.dropout_rate=0.1",
                    "--config.num_epochs=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["config"]["model"]["dropout"] == "standard"
  assert saved["config"]["model"]["hidden"] == [16]
  assert "model.dropout='standard'" in saved["overrides"]
  assert os.path.exists(os.path.join(workdir, "results.json"))
  # The default xla_cpu_ynn_convolutions=False and xla_cpu_vector_width=512 are in the flags
  # XLA started with, as recorded.
  recorded = json.load(open(os.path.join(workdir, "environment.json")))["xla_flags"].split()
  assert environment.YNN_CONVOLUTIONS_OFF_XLA_FLAG in recorded
  assert "--xla_cpu_prefer_vector_width=512" in recorded

  # The same workdir with a different config: refused, naming the differing key.
  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
                    "--config.model.name=mlp", "--config.model.hidden=(16,)",
                    "--config.model.dropout=standard", "--config.model.dropout_rate=0.2",
                    "--config.num_epochs=1")
  _assert_clean_failure(proc, "different config", "model.dropout_rate")


def test_a_run_ends_with_its_test_accuracy_and_a_rerun_says_it_had_finished(data_dir, tmp_path):
  """A run ended with only `wrote W/results.json` (how well it did was inside the file), and
  rerunning the finished run printed that same line."""
  workdir = str(tmp_path / "run")
  args = ("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
          f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
          "--config.num_epochs=1")
  proc = run_launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = os.path.join(workdir, "results.json")
  accuracy = json.load(open(results))["test_accuracy"]
  assert proc.stdout.splitlines()[-1] == f"wrote {results}: test accuracy {accuracy:.4f}"
  mtime = os.path.getmtime(results)
  proc = run_launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [f"{workdir} already holds a finished run of this config "
                                      f"(test accuracy {accuracy:.4f}): {results}"]
  assert os.path.getmtime(results) == mtime


def test_a_large_sweep_ends_with_its_best_cell():
  from cnnlab import cli
  from cnnlab.study import sweep
  cells = {f"lr={i}": (i / 100, 3, 3) for i in range(20)} | {"lr=99": (None, 0, 3)}
  assert cli.outcome_lines(sweep.Outcome("W/report.md", False, cells)) == [
      "wrote W/report.md; best of 21 cells by test accuracy: lr=19: 0.1900 (mean of 3 of 3 "
      "seeds)"]
  assert cli.outcome_lines(sweep.Outcome("W/report.md", False, {"lr=99": (None, 0, 3)})) == [
      "wrote W/report.md; test accuracy per cell:", "  lr=99: all 3 seeds diverged"]


@pytest.mark.parametrize("key, value, fragments", [
    ("model.dropout_rate", 1.5, ("config.model.dropout_rate=1.5", "[0, 1)")),
    ("model.bn_placement", "middle", ("'middle'", "before_act", "after_act")),
    ("model.dropout", "gaussian", ("'gaussian'", "spatial")),
    ("model.name", "resnet9000", ("'resnet9000'", "lenet5")),
    ("dataset.name", "imagenet_xl", ("'imagenet_xl'", "mnist5k")),
    ("optimizer.name", "lbfgs", ("'lbfgs'", "adamw")),
    ("batch_size", 100000, ("100000",)),
    ("dtype", "float16", ("'float16'", "bfloat16")),
])
def test_bad_values_raise_one_clear_error(tiny_config, tmp_path, key, value, fragments):
  section, _, field = key.rpartition(".")
  (tiny_config[section] if section else tiny_config)[field] = value
  workdir = str(tmp_path / "run")
  with pytest.raises(errors.CnnlabError) as info:
    loop.train_and_evaluate(tiny_config, workdir, progress=False)
  for fragment in fragments:
    assert fragment in str(info.value)
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_flipped_checkpoint_bit_falls_back_then_all_corrupt_is_a_clear_error(tiny_config,
                                                                            tmp_path):
  """One flipped bit in the newest checkpoint: detected by its digest, set aside, and the run
  resumes from the newest intact checkpoint to the same results; with every checkpoint corrupt,
  one CheckpointError line."""
  workdir = str(tmp_path / "run")
  tiny_config.num_epochs = 1
  first = loop.train_and_evaluate(tiny_config, workdir, progress=False)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert len(steps) >= 2
  os.remove(os.path.join(workdir, "results.json"))
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(ckpt_dir,
                                                                           str(steps[-1])))
           for n in names]
  biggest = max(files, key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(biggest, "wb").write(bytes(data))
  again = loop.train_and_evaluate(tiny_config, workdir, progress=False)
  assert {k: v for k, v in again.items() if k != "wall_time_s"} == {
      k: v for k, v in first.items() if k != "wall_time_s"}
  assert os.path.isdir(os.path.join(ckpt_dir, f"{steps[-1]}.corrupt"))

  os.remove(os.path.join(workdir, "results.json"))
  for step in sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()):
    for root, _, names in os.walk(os.path.join(ckpt_dir, str(step), "state")):
      for name in names:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(errors.CheckpointError, match="can be restored"):
    loop.train_and_evaluate(tiny_config, workdir, progress=False)


def test_default_workdir_from_config_name():
  assert rundir.default_workdir("experiments/default.py") == os.path.join("runs", "default")
  assert rundir.default_workdir("experiments/ablation.py:quick") == os.path.join(
      "runs", "ablation_quick")


def _bad_config_files(tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n  pass\n")
  (tmp_path / "no_get_config.py").write_text("def other():\n  return None\n")
  return tmp_path


_TRAIN = ("--config=experiments/default.py",)
_QUICK_SWEEP = ("--config=experiments/ablation.py:quick",)
_SUMMARY = ("--config=experiments/default.py", "--mode=summary")


@pytest.mark.parametrize("args, fragments", [
    ((*_TRAIN, "--config.model.nonexistent=1"),
     ("--config.model.nonexistent=1", "config.model has no 'nonexistent'", "dropout_rate")),
    (("--config=experiments/missing.py",), ("--config=experiments/missing.py", "No such file")),
    (("--config={tmp}/syntax.py",), ("syntax.py", "SyntaxError")),
    (("--config={tmp}/no_get_config.py",), ("no_get_config.py", "no attribute 'get_config'")),
    (("--config=experiments/ablation.py:bogus",), ("ablation.py:bogus is not a variant",
                                                  "full, quick, cifar10")),
    ((*_TRAIN, "--config.matmul_precision=bogus"), ("matmul_precision='bogus'", "highest")),
    ((*_TRAIN, "--config.xla_cpu_ynn_convolutions=maybe"),
     ("--config.xla_cpu_ynn_convolutions=maybe", "true or false")),
    ((*_TRAIN, "--config.xla_cpu_vector_width=384"),
     ("xla_cpu_vector_width=384", "128, 256, 512")),
    ((*_TRAIN, "--workdir={tmp}/syntax.py"), ("syntax.py' is an existing file",)),
    ((*_QUICK_SWEEP, "--config.sweep.seeds=(0, 1.5)"), ("seeds=(0, 1.5)", "non-negative integers")),
    ((*_QUICK_SWEEP, "--config.sweep.seeds=(-1, 0)"), ("seeds=(-1, 0)", "non-negative integers")),
    ((*_TRAIN, "--config.optimizer.momentum=nan"), ("momentum=nan", "finite number in [0, 1)")),
    ((*_TRAIN, "--config.checkpoint_every_steps=120"), ("checkpoint_every_steps=120", "multiple")),
    ((*_TRAIN, "--config.batch_size=abc"), ("--config.batch_size=abc", "takes an integer")),
    ((*_TRAIN, "--config.dataset.train_per_class=nan"),
     ("--config.dataset.train_per_class=nan", "takes an integer")),
    ((*_TRAIN, "--config.dataset.train_per_class=5", "--config.dataset.subset_seed=-1"),
     ("subset_seed=-1", "out of range; allowed: [0, 9223372036854775807]")),
    # Each padded eval batch is allocated whole: numpy raised ArrayMemoryError (2.85 TiB).
    ((*_TRAIN, "--config.eval_batch_size=1000000000"),
     ("config.eval_batch_size=1000000000 needs", "GiB of memory is available")),
    ((*_TRAIN, "--progress=maybe"), ("--progress=maybe", "true or false")),
    ((*_TRAIN, "--input_shape=8,8,1"), ("--input_shape", "--mode=summary only")),
    ((*_SUMMARY, "--input_shape=0,0,3"), ("input_shape=(0, 0, 3)", "3 positive integers")),
    ((*_SUMMARY, "--input_shape=a,8,1"), ("--input_shape=a,8,1", "3 positive integers")),
    ((*_SUMMARY, "--num_classes=0"), ("num_classes=0", "positive")),
    # Labels are int32: it was a 40-line OverflowError traceback.
    ((*_SUMMARY, "--num_classes=99999999999"),
     ("num_classes=99999999999 is out of range", "[1, 2147483647]")),
    # It was an OverflowError traceback from the learning-rate schedule.
    ((*_TRAIN, "--config.optimizer.warmup_epochs=1e308"),
     ("warmup_epochs=1e+308 is longer than the run (config.num_epochs=12)", "[0, 12]")),
    ((*_SUMMARY, "--process_id=0"), ("--process_id applies to --mode=train only",)),
    # The full ablation's workers default to None (one per core); an int still overrides it.
    (("--config=experiments/ablation.py", "--config.sweep.workers=0"),
     ("sweep.workers=0", "out of range")),
], ids=["unknown_key", "missing_file", "syntax_error", "no_get_config", "bad_variant",
        "matmul_precision", "ynn_convolutions", "vector_width", "workdir_is_file",
        "fractional_seed", "negative_seed", "nan_momentum",
        "checkpoint_not_multiple", "int_flag_type", "placeholder_int_type", "negative_subset_seed",
        "huge_eval_batch", "bool_flag_type", "input_shape_in_train",
        "zero_input_shape", "non_int_input_shape", "zero_num_classes", "huge_num_classes",
        "huge_warmup", "multi_host_flag_in_summary", "workers_override"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, fragments):
  tmp = _bad_config_files(tmp_path)
  args = [a.format(tmp=tmp) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'run'}")
  proc = run_launch(*args, "--noprogress", f"--config.dataset.data_dir={tmp_path / 'tfds'}")
  _assert_clean_failure(proc, *fragments)
  # Nothing written: no workdir, no prepared dataset.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["no_get_config.py", "syntax.py"]


@pytest.mark.parametrize("overrides, fragments", [
    (("batch_size=100000",),
     ("config.batch_size=100000 is larger than the 1433 training examples of 'digits'",)),
    (("batch_size=99999999999999999999999",), ("batch_size=99999999999999999999999 is larger",)),
    (("model.pool=bogus",), ("model.pool='bogus' is not allowed", "max, avg, blur")),
    (("model.stages=((0,),)",), ("model.stages=((0,),) must be", "positive ints")),
    (("model.stages=()",), ("model.stages=() must be",)),
    (("model.stages=((8,), ('a',))",), ("model.stages=((8,), ('a',)) must be",)),
    (("model.name=mlp", "model.hidden=(-1,)"), ("model.hidden=(-1,) must be",)),
], ids=["batch_over_dataset", "batch_over_int64", "pool", "zero_width", "no_stages",
        "text_width", "negative_hidden"])
def test_values_only_the_model_or_data_refuse_write_nothing(data_dir, tmp_path, overrides,
                                                             fragments):
  """Values checked when the model is built or the data read were refused only after the run
  had written config.json, environment.json and checkpoints/."""
  workdir = tmp_path / "run"
  proc = run_launch("--config=experiments/default.py", f"--workdir={workdir}", "--noprogress",
                    f"--config.dataset.data_dir={data_dir}", "--config.dataset.name=digits",
                    "--config.model.name=vgg_cnn", *[f"--config.{o}" for o in overrides])
  _assert_clean_failure(proc, *fragments)
  assert not workdir.exists()


def test_empty_workdir_is_refused(tmp_path):
  """`--workdir=` trained in the default runs/<config name> of the current directory."""
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         f"--config={ROOT}/experiments/default.py", "--workdir=", "--noprogress",
                         "--config.dataset.name=digits", f"--config.dataset.data_dir={tmp_path}",
                         "--config.num_epochs=1"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  _assert_clean_failure(proc, "--workdir= is empty", "leave the flag out")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, fragment", [
    ("--input_shape=8,8,1", "--input_shape applies to --mode=summary only"),
    ("--num_classes=3", "--num_classes applies to --mode=summary only"),
    ("--coordinator_address=127.0.0.1:1234", "--coordinator_address applies to --mode=train only"),
    ("--num_processes=2", "--num_processes applies to --mode=train only"),
    ("--process_id=0", "--process_id applies to --mode=train only"),
    ("--workdir=", "--mode=visualize takes --workdir"),
])
def test_visualize_refuses_flags_it_would_ignore(tmp_path, flag, fragment):
  """--mode=visualize silently ignored the summary's and the multi-host flags."""
  args = ["--mode=visualize", flag]
  if not flag.startswith("--workdir"):
    args.append(f"--workdir={tmp_path / 'run'}")
  _assert_clean_failure(run_launch(*args), fragment)
  assert list(tmp_path.iterdir()) == []


OUT_OF_MEMORY = """
import runpy, sys
import jax
from cnnlab.study import sweep


def out_of_memory(*args, **kwargs):  # What XLA:CPU raised for --config.model.stages="((100000,),)".
  raise jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: Error dispatching "
                                   "computation: Out of memory allocating 40150400848 bytes.")


sweep.run = out_of_memory
sys.argv = ["launch.py", "--config=experiments/default.py", f"--workdir={sys.argv[1]}"]
runpy.run_path("launch.py", run_name="__main__")
"""


def test_xla_out_of_memory_is_one_line(tmp_path):
  """A model whose step does not fit in memory ended in JAX's traceback (JaxRuntimeError)."""
  proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(tmp_path / "run")], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  _assert_clean_failure(proc, "error: XLA ran out of memory (Out of memory allocating "
                        "40150400848 bytes = 37.4 GiB); use a smaller model, batch size or image "
                        "size. What the workdir holds is kept: once it fits, the same command "
                        "resumes.")
