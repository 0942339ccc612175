"""SHA-256 digests that let a run prove its files are intact and its own.

`json_sha256` covers a JSON record (results.json, a checkpoint's progress record) independently
of its formatting; `tree_sha256` covers the bytes of every array of a pytree (a checkpoint's
state), per leaf and overall, from host copies, so arrays sharded over devices or processes
digest exactly like the same arrays on one device.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def json_sha256(record: Any) -> str:
  """Hex SHA-256 of `record`'s canonical JSON (sorted keys, no whitespace)."""
  blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()


def host_copy(x: Any) -> np.ndarray:
  """The full value of `x` as a numpy array on this host.

  A jax.Array spread over processes (not fully addressable) is read from this process's first
  shard when replicated, and gathered from every process otherwise (a collective: every process
  must call it, as every process calls a checkpoint's save and restore)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def tree_sha256(tree: Any) -> dict[str, Any]:
  """{"leaves": {path: hex SHA-256 of that array's bytes}, "sha256": hex SHA-256 over every
  leaf's path, dtype, shape and digest}: equal overall digests mean bit-identical trees."""
  leaves, overall = {}, hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = host_copy(leaf)
    name = jax.tree_util.keystr(path)
    leaves[name] = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    overall.update(f"{name} {array.dtype} {array.shape} {leaves[name]}\n".encode())
  return {"leaves": leaves, "sha256": overall.hexdigest()}


def differing_leaves(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
  """Paths whose digest differs between two `tree_sha256` results (or exist in only one)."""
  want, got = expected.get("leaves", {}), actual.get("leaves", {})
  return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
