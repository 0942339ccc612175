"""Errors a user can act on.

Everything raised as a `CnnlabError` is printed by `launch.py` as one line, without a traceback,
and the process exits non-zero. The message must name the offending value and what is allowed.
"""


class CnnlabError(Exception):
  """Base class: a problem in the user's config, data, or workdir (not a bug in cnnlab)."""


class ConfigError(CnnlabError, ValueError):
  """A config value is invalid; the message names the key, the value and the allowed values."""


class DatasetError(CnnlabError):
  """A dataset is unknown, missing, not prepared, or malformed."""


class CheckpointError(CnnlabError):
  """A checkpoint is corrupt or belongs to a different config."""


class TrainingDivergedError(CnnlabError):
  """The loss became NaN or infinite; the message names the step."""


class Interrupted(CnnlabError):
  """SIGTERM or SIGINT stopped training at a step boundary after saving a checkpoint."""
  exit_code = 130
