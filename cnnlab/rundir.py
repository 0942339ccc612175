"""A training run's working directory: what a run leaves behind, and how it is resumed.

    <workdir>/config.json      the full resolved config, its fingerprint, the command-line
                               overrides and the command
    <workdir>/environment.json what else changes the bits (cnnlab.environment.describe)
    <workdir>/metrics.jsonl    one JSON object per line: step, epoch, split, loss, accuracy
                               (+ learning_rate, wall_time_s on train lines)
    <workdir>/checkpoints/     orbax checkpoints (cnnlab.checkpoint)
    <workdir>/results.json     written last, atomically: its presence means the run finished

A workdir belongs to one config: the fingerprint (a hash of the resolved config) is stored in
config.json and in every checkpoint, and a run with a different config refuses to use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any

import ml_collections
import tqdm

from cnnlab import environment
from cnnlab.errors import CheckpointError

# Config fields that only change how a run is observed, never its numbers.
_NOT_FINGERPRINTED = ("log_every_steps", "checkpoint_every_steps", "checkpoints_to_keep")


def default_workdir(config_arg: str, root: str = "runs") -> str:
  """`experiments/ablation.py:quick` -> `runs/ablation_quick`; `x.py` -> `runs/x`."""
  path, _, variant = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(root, f"{stem}_{variant}" if variant else stem)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-able dict of the resolved config (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def fingerprint(config: ml_collections.ConfigDict, exclude: tuple[str, ...] = ()) -> str:
  """A short hash of everything in `config` (but `exclude`d top-level keys) that can change a
  run's numbers."""
  skip = _NOT_FINGERPRINTED + tuple(exclude)
  d = {k: v for k, v in config_to_dict(config).items() if k not in skip}
  d.pop("sweep", None)  # How a run was scheduled does not change it.
  blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` to `path` so that a reader sees either the old file or the complete new one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class RunDir:
  """Paths and bookkeeping of one run's workdir."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.config_path = os.path.join(workdir, "config.json")
    self.environment_path = os.path.join(workdir, "environment.json")
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.results_path = os.path.join(workdir, "results.json")
    self.checkpoint_dir = os.path.join(workdir, "checkpoints")
    self.fingerprint: str | None = None

  def claim(self, config: ml_collections.ConfigDict, overrides=(), command: str = "") -> None:
    """Takes the workdir for `config`; refuses one holding progress of a different config.

    Raises:
      CheckpointError: the workdir holds a config.json with another fingerprint.
    """
    self.fingerprint = fingerprint(config)
    os.makedirs(self.workdir, exist_ok=True)
    if os.path.exists(self.config_path) and self.has_progress():
      try:
        previous = read_json(self.config_path)
      except (OSError, ValueError):
        previous = {}  # An unreadable config.json from a killed run: rewrite it below.
      if previous and previous.get("fingerprint") != self.fingerprint:
        changed = _changed_keys(previous.get("config", {}), config_to_dict(config))
        raise CheckpointError(
            f"workdir {self.workdir} holds a run of a different config (fingerprint "
            f"{previous.get('fingerprint')}, this config {self.fingerprint}; differing keys: "
            f"{', '.join(changed) or 'unknown'}). Use another --workdir, or delete "
            f"{self.workdir} to start over.")
    if self.finished():
      return  # Keep the config and environment that produced the results.
    write_json_atomic(self.config_path, {
        "fingerprint": self.fingerprint, "config": config_to_dict(config),
        "overrides": list(overrides), "command": command})
    now = environment.describe(config.dtype)
    if self.has_progress() and os.path.exists(self.environment_path):
      before = read_json(self.environment_path)
      changed = [k for k in environment.BIT_DETERMINING_KEYS if before.get(k) != now.get(k)]
      if changed:
        logging.warning("resuming %s under different settings (%s): its results will not be "
                        "bit-identical to an uninterrupted run's.", self.workdir,
                        ", ".join(changed))
    write_json_atomic(self.environment_path, now)

  def has_progress(self) -> bool:
    """Whether the workdir holds checkpoints or results (something a different config must not
    overwrite); a workdir with only config.json from a run that failed early has none."""
    return self.finished() or (os.path.isdir(self.checkpoint_dir)
                               and any(n.isdigit() for n in os.listdir(self.checkpoint_dir)))

  def check_fingerprint(self, saved: str) -> None:
    """Raises CheckpointError if a checkpoint was written by a different config."""
    if saved != self.fingerprint:
      raise CheckpointError(
          f"the checkpoints in {self.checkpoint_dir} were written by a different config "
          f"(fingerprint {saved}, this config {self.fingerprint}). Use another --workdir, or "
          f"delete {self.checkpoint_dir} to start over.")

  def finished(self) -> bool:
    return os.path.exists(self.results_path)

  def read_results(self) -> dict[str, Any]:
    return read_json(self.results_path)

  def write_results(self, results: dict[str, Any]) -> None:
    write_json_atomic(self.results_path, results)

  def log(self, record: dict[str, Any]) -> None:
    """Appends one metrics line (flushed, so a killed run loses at most the line being written)."""
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def read_metrics(self) -> list[dict[str, Any]]:
    """The complete lines of metrics.jsonl (a line cut short by a kill is skipped)."""
    if not os.path.exists(self.metrics_path):
      return []
    records = []
    with open(self.metrics_path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          continue
    return records

  def truncate_metrics(self, after_step: int) -> None:
    """Drops the lines logged after `after_step` (they are logged again on resume)."""
    if not os.path.exists(self.metrics_path):
      return
    keep = [r for r in self.read_metrics() if r["step"] <= after_step]
    tmp = self.metrics_path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
    os.replace(tmp, self.metrics_path)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two nested config dicts."""
  changed = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += _changed_keys(a, b, f"{prefix}{key}.")
    elif a != b:
      changed.append(f"{prefix}{key}")
  return changed


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "",
                 unit: str = "step"):
  """A tqdm bar on stderr with rate and ETA; disabled when `enabled` is False. A bar opened
  while another is open (a run inside a sweep) sits below it and disappears when done."""
  nested = bool(getattr(tqdm.tqdm, "_instances", None))
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit,
                   dynamic_ncols=True, file=sys.stderr, leave=not nested)
