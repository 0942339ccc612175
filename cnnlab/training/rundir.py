"""A training run's working directory: what a run leaves behind, and how it is resumed.

    <workdir>/config.json      the full resolved config, its fingerprint, the command-line
                               overrides and the command
    <workdir>/environment.json what else changes the bits (cnnlab.base.environment.describe)
    <workdir>/metrics.jsonl    one JSON object per line: step, epoch, split, loss, accuracy
                               (+ learning_rate, wall_time_s on train lines)
    <workdir>/checkpoints/     orbax checkpoints (cnnlab.training.checkpoint)
    <workdir>/learning_curve.png  loss and accuracy vs step, train and held-out, drawn at the end
    <workdir>/results.sha256   SHA-256 of results.json's bytes (`sha256sum -c` reads it)
    <workdir>/results.json     written last, atomically: its presence means the run finished

A workdir belongs to one config: the fingerprint (a hash of the resolved config) is stored in
config.json, in every checkpoint and in results.json, and a run with a different config refuses
to use it. results.json also carries the seed, and results.sha256 its digest, so a finished run
proves it is this config's even when config.json is lost, and a garbled or swapped results.json
is refused rather than reported. Every write that fails (disk full, read-only)
raises one WorkdirError line and leaves what was already saved intact.
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

from cnnlab.base import digests, environment, files, plugins
from cnnlab.base.errors import CheckpointError
from cnnlab.data import data_digest
from cnnlab.data.streamed import augmentation
from cnnlab.training import checkpoint, optim

# Config fields that only change how a run is observed, never its numbers.
# (`imports` names the modules where a model or dataset comes from; the config names the model
# and its fields, which are fingerprinted.)
_NOT_FINGERPRINTED = ("log_every_steps", "checkpoint_every_steps", "checkpoints_to_keep",
                      "imports")

# Fields added to the config after runs were saved without them, with the value those runs had
# (environment.SAVED_BEFORE_THE_FIELD). At that value a field is left out of the fingerprint, so
# an older run resumes when given it. (xla_cpu_ynn_convolutions predates this rule: runs saved
# with it hash it at every value, so it is not here.)
_ADDED_FIELDS = ("xla_cpu_vector_width", "label_smoothing", "evaluate_test")


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
  from cnnlab.nets import models  # Heavy (flax): only where a fingerprint is taken.
  skip = _NOT_FINGERPRINTED + tuple(exclude)
  d = {k: v for k, v in config_to_dict(config).items() if k not in skip}
  for key in _ADDED_FIELDS:
    if d.get(key) == environment.SAVED_BEFORE_THE_FIELD[key]:
      del d[key]
  d.pop("sweep", None)  # How a run was scheduled does not change it.
  if "dataset" in d:
    d["dataset"] = _dataset_fields(config.dataset, d["dataset"])
  if "model" in d:  # Only the model fields its architecture reads.
    used = models.used_fields(config.model)
    d["model"] = {k: v for k, v in d["model"].items() if k in used}
  if "optimizer" in d:  # Likewise for the optimizer.
    used = optim.used_fields(config.optimizer)
    d["optimizer"] = {k: v for k, v in d["optimizer"].items() if k in used}
  return digests.json_sha256(d)[:12]


# config.dataset fields that do not change a run's numbers (where and how fast data is read), and
# fields added with the streaming pipeline, left out at the value that means "not used" so that
# runs saved before them keep their fingerprints.
_DATASET_NOT_FINGERPRINTED = ("workers", "in_memory_limit_mb")
_DATASET_UNUSED = {"image_size": None, "normalization": "data", "folder": None, "tfds_name": None,
                   "test_fraction": 0.2, "split_seed": 0}


def _dataset_fields(data_config, d: dict) -> dict:
  """The fingerprinted part of config.dataset (as dict `d`): augment as it resolves (False for
  none, as runs recorded it before it took a style)."""
  d = {k: v for k, v in d.items() if k not in _DATASET_NOT_FINGERPRINTED
       and not (k in _DATASET_UNUSED and v == _DATASET_UNUSED[k])}
  if d.get("name") != "folder":
    for key in ("test_fraction", "split_seed"):
      d.pop(key, None)
  style = augmentation(data_config)
  d["augment"] = False if style == "none" else style
  return d


class RunDir:
  """Paths and bookkeeping of one run's workdir."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.config_path = os.path.join(workdir, "config.json")
    self.environment_path = os.path.join(workdir, "environment.json")
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.results_path = os.path.join(workdir, "results.json")
    self.results_digest_path = os.path.join(workdir, "results.sha256")
    self.checkpoint_dir = os.path.join(workdir, "checkpoints")
    self.learning_curve_path = os.path.join(workdir, "learning_curve.png")
    self.fingerprint: str | None = None

  def claim(self, config: ml_collections.ConfigDict, overrides=(), command: str = "") -> None:
    """Takes the workdir for `config`; refuses one holding progress of a different config.

    Ownership is proven by every record the workdir still has: config.json, the newest readable
    checkpoint's progress record, and results.json (fingerprint and seed, checked against
    results.sha256); a deleted or garbled config.json is rewritten once the others agree.

    Raises:
      CheckpointError: a record belongs to another config or seed, or results.json is garbled.
      WorkdirError: config.json or environment.json cannot be written.
    """
    self.fingerprint = fingerprint(config)
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise files.write_error(self.workdir, e, None) from e
    previous = files.read_json_or_none(self.config_path)
    if self.has_progress():
      self._check_owner(config, previous)
    if self.finished_result(config) is not None:
      if not isinstance(previous, dict):  # Lost: results.json proved the run is this config's.
        self._write_config(config, overrides, command)
      return  # Keep the config and environment that produced the results.
    self._write_config(config, overrides, command)
    now = environment.describe(config.dtype)
    before = files.read_json_or_none(self.environment_path)
    if self.has_progress() and isinstance(before, dict):
      changed = [k for k in environment.BIT_DETERMINING_KEYS if before.get(k) != now.get(k)]
      if changed:
        logging.warning("resuming %s under different settings (%s): its results will not be "
                        "bit-identical to an uninterrupted run's.", self.workdir,
                        ", ".join(changed))
    files.write_json_atomic(self.environment_path, now, self.resume_step())

  def _write_config(self, config, overrides, command) -> None:
    files.write_json_atomic(self.config_path, {
        "fingerprint": self.fingerprint, "config": config_to_dict(config),
        "overrides": list(overrides), "command": command}, self.resume_step())

  def _check_owner(self, config: ml_collections.ConfigDict, previous: Any) -> None:
    """Raises CheckpointError unless config.json (when readable) and the newest readable
    checkpoint both carry this config's fingerprint."""
    owners = [("config.json", previous.get("fingerprint"))] if isinstance(previous, dict) else []
    for source, saved in owners + self._checkpoint_owner():
      if saved != self.fingerprint:
        raise CheckpointError(
            f"workdir {self.workdir} holds a run of a different config (fingerprint {saved} in "
            f"its {source}, this config {self.fingerprint}; differing keys: "
            f"{self._differing_keys(config)}). Use another --workdir, or delete "
            f"{self.workdir} to start over.")

  def _checkpoint_owner(self) -> list[tuple[str, Any]]:
    """[("checkpoint <step>", its config fingerprint)] of the newest checkpoint whose record is
    intact, or []. Opens no orbax manager (a barrier of every process)."""
    newest = checkpoint.newest_progress(self.checkpoint_dir)
    return [] if newest is None else [(f"checkpoint {newest[0]}",
                                       newest[1].get("config_fingerprint"))]

  def recorded_config(self, hint: str) -> tuple[ml_collections.ConfigDict, str]:
    """(config, fingerprint) that config.json records, for a reader of the run (visualize, a
    transfer source), once results.json and the newest checkpoint show it made them.

    Raises:
      CheckpointError: config.json is missing or unreadable, or records another config (the
        message ends with `hint`).
    """
    try:
      saved = files.read_json(self.config_path)
      config, recorded = ml_collections.ConfigDict(saved["config"]), saved["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{self.config_path} is missing or unreadable ({type(e).__name__}); "
                            f"{hint}.") from None
    owners = [("results.json", self.read_results().get("config_fingerprint"))] if (
        self.finished()) else []
    self._check_config_json(recorded, owners + self._checkpoint_owner(), hint)
    plugins.import_modules(tuple(config.get("imports", ())))  # Its models and datasets.
    return config, recorded

  def _check_config_json(self, recorded: Any, owners: list[tuple[str, Any]], hint: str) -> None:
    """Raises CheckpointError if config.json's fingerprint `recorded` is not that of each of
    `owners` ((what, fingerprint) of the run's other records)."""
    for source, saved in owners:
      if saved != recorded:
        raise CheckpointError(
            f"{self.config_path} records another config (fingerprint {recorded}) than the run's "
            f"{source} ({saved}): it was replaced or edited; {hint}.")

  def has_progress(self) -> bool:
    """Whether the workdir holds checkpoints or results (something a different config must not
    overwrite); a workdir with only config.json from a run that failed early has none."""
    return self.finished() or bool(checkpoint.saved_steps(self.checkpoint_dir))

  def resume_step(self) -> int:
    """The step a rerun resumes from: that of the newest complete checkpoint (0 if none)."""
    return max(checkpoint.saved_steps(self.checkpoint_dir), default=0)

  def check_fingerprint(self, saved: str) -> None:
    """Raises CheckpointError if a checkpoint was written by a different config."""
    if saved != self.fingerprint:
      raise CheckpointError(
          f"the checkpoints in {self.checkpoint_dir} were written by a different config "
          f"(fingerprint {saved}, this config {self.fingerprint}). Use another --workdir, or "
          f"delete {self.checkpoint_dir} to start over.")

  def finished(self) -> bool:
    """Whether results.json exists (not whether it is intact or this config's:
    `finished_result` checks that)."""
    return os.path.exists(self.results_path)

  def finished_result(self, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """results.json's dict if the run of `config` finished here; None if it has not finished.
    A finished workdir is checked whole: a rerun, a sweep or a report never reaches `claim`.

    Raises:
      CheckpointError: results.json is unreadable, garbled, or belongs to another config/seed;
        config.json (when readable) records another config; metrics.jsonl is damaged.
    """
    if not self.finished():
      return None
    results = self.read_results()
    want = (fingerprint(config), config.seed)
    got = (results.get("config_fingerprint"), results.get("seed"))
    if got != want:
      raise CheckpointError(
          f"{self.results_path} belongs to a run of a different config or seed (fingerprint "
          f"{got[0]}, seed {got[1]}; this config {want[0]}, seed {want[1]}; differing keys: "
          f"{self._differing_keys(config)}). Use another --workdir, or delete that file to "
          f"re-evaluate this workdir's own final checkpoint.")
    previous = files.read_json_or_none(self.config_path)  # A lost one is written again by claim.
    if isinstance(previous, dict):
      self._check_config_json(previous.get("fingerprint"), [("results.json", want[0])],
                              "put back the run's own config.json, or use another --workdir")
    self.read_metrics()  # Raises for a damaged line.
    self.check_data(config, results.get("data_digest"), "finished")
    return results

  def check_data(self, config: ml_collections.ConfigDict, recorded: str | None, how: str,
                 now: str | None = None) -> None:
    """CheckpointError when the run here was trained on other files than the dataset holds now
    (`recorded`: the data digest its results or checkpoint kept; `now`: the current one, computed
    when not given)."""
    if recorded is None:
      return
    now = now or data_digest(config.dataset)
    if recorded != now:
      raise CheckpointError(
          f"{self.workdir} holds a {how} run of dataset {config.dataset.name!r} whose files have "
          f"changed since (data digest {recorded[:12]}, now {str(now)[:12]}); use another "
          f"--workdir to train on the data as it is.")

  def _differing_keys(self, config: ml_collections.ConfigDict) -> str:
    """The dotted keys in which `config` differs from the one config.json records ("unknown"
    when config.json is missing or unreadable)."""
    previous = files.read_json_or_none(self.config_path)
    old = previous.get("config", {}) if isinstance(previous, dict) else {}
    keys = _changed_keys(old, config_to_dict(config)) if old else []
    named = []
    for key in keys:
      if key in _ADDED_FIELDS and key not in old:
        value = environment.SAVED_BEFORE_THE_FIELD[key]
        named.append(f"{key} (the saved run predates it and ran with {value}: "
                     f"--config.{key}={value} resumes it)")
      else:
        named.append(key)
    return ", ".join(named) or "unknown"

  def read_results(self) -> dict[str, Any]:
    """results.json's dict, after checking it against results.sha256.

    Raises:
      CheckpointError: results.json is unreadable or does not match its digest.
    """
    fix = ("delete it and rerun the same command to re-evaluate the run's final checkpoint, or "
           "use another --workdir")
    try:
      with open(self.results_path, "rb") as f:
        blob = f.read()
      results = json.loads(blob)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{self.results_path} cannot be read ({e}); {fix}.") from None
    saved = (files.read_text_or_none(self.results_digest_path) or "").split()
    if not isinstance(results, dict) or saved[:1] != [hashlib.sha256(blob).hexdigest()]:
      raise CheckpointError(
          f"{self.results_path} does not match {self.results_digest_path} (garbled, edited, or "
          f"written before cnnlab signed results); {fix}.")
    return results

  def write_results(self, results: dict[str, Any]) -> None:
    """Writes results.sha256, then results.json (whose presence marks the run finished)."""
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    step = self.resume_step()
    files.write_text_atomic(self.results_digest_path,
                      f"{hashlib.sha256(text.encode()).hexdigest()}  results.json\n", step)
    files.write_text_atomic(self.results_path, text, step)

  def log(self, record: dict[str, Any]) -> None:
    """Appends one metrics line in one write; a write that fails leaves no partial line.

    Raises:
      WorkdirError: the line cannot be written (disk full, read-only).
    """
    files.append_bytes(self.metrics_path, (json.dumps(record, sort_keys=True) + "\n").encode(),
                 self.resume_step())

  def read_metrics(self) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a last line a kill cut short (no newline yet) is skipped.

    Raises:
      CheckpointError: another line is not a metrics record (the file was damaged or edited).
    """
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path, "rb") as f:
      lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: b"", or the line cut short.
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if not (isinstance(record, dict) and "step" in record and "split" in record):
        raise CheckpointError(
            f"{self.metrics_path} line {number} is not a metrics record ({line[:60]!r}): the "
            f"file was damaged or edited. Delete {self.workdir} to train the run again, or use "
            f"another --workdir.")
      records.append(record)
    return records

  def truncate_metrics(self, after_step: int) -> None:
    """Drops the lines logged after `after_step` (they are logged again on resume).

    Raises:
      WorkdirError: metrics.jsonl cannot be rewritten (it is left as it was).
    """
    if not os.path.exists(self.metrics_path):
      return
    keep = [r for r in self.read_metrics() if r["step"] <= after_step]
    files.write_text_atomic(self.metrics_path,
                      "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep),
                      self.resume_step())


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
