"""Per-layer conv arithmetic of any cnnlab model: output shape, parameters, multiply-adds,
receptive field and jump, then totals and the FLOPs of one training step (lecture seed 004).

    python launch.py --config=experiments/default.py --mode=summary

Rows are the leaf layers (conv, dense, BatchNorm, pooling, dropout) in call order, found by
intercepting module calls while the model is traced abstractly (`jax.eval_shape`: nothing is
allocated, so VGG-16 at 224x224 summarises in a second).

Receptive field (RF) and jump per spatial axis, in input pixels, follow the textbook recursion
for a layer with kernel k, dilation d and stride s:  rf_out = rf_in + d (k - 1) jump_in,
jump_out = jump_in * s. Where branches meet (residual additions, Inception concatenations) a
block's output takes the largest RF of its branches, the theoretical receptive field. Dense
layers and global pooling see the whole input ("all"). Multiply-adds count one per weight use
(conv: output elements x kernel volume x input channels per group; dense: in x out), without
biases, BN or pooling, as the lecture does (10 5x5 filters on 3x32x32, pad 2: 768,000).
The training-step FLOPs are XLA's own count (cost analysis of the lowered program) for
`steps.train_step` (forward, backward and optimizer update) at the config's batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnlab import data
from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers, models
from cnnlab.training import optim, steps
from cnnlab.training.validation import validate_config

GLOBAL = None   # The geometry of values that depend on every input pixel.
LABEL_MAX = 2**31 - 1   # Labels are int32 (the train step's batch): the most classes a model has.
Geometry = tuple[tuple[float, ...], tuple[float, ...]] | None   # (rf, jump) per spatial axis.
_LEAVES = (nn.Conv, nn.Dense, layers.TableConv, layers.BatchNorm, layers.Pool,
           layers.AdaptiveAvgPool, layers.GlobalAvgPool, layers.Dropout)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str                       # Module path, e.g. "stage1_unit1/conv1".
  layer: str                      # Conv 3x3/2, BatchNorm, Pool max 2x2/2, ...
  output_shape: tuple[int, ...]   # Without the batch axis.
  params: int
  macs: int                       # Multiply-adds per example.
  geometry: Geometry

  @property
  def receptive_field(self) -> str:
    return "all" if self.geometry is GLOBAL else _fmt(self.geometry[0])

  @property
  def jump(self) -> str:
    return "-" if self.geometry is GLOBAL else _fmt(self.geometry[1])


@dataclasses.dataclass(frozen=True)
class Summary:
  model: str
  input_shape: tuple[int, ...]    # (H, W, C).
  num_classes: int
  rows: tuple[Row, ...]
  total_params: int
  train_step_flops: float | None  # XLA's count for one training step, or None if not asked.
  batch_size: int

  @property
  def total_macs(self) -> int:
    return sum(r.macs for r in self.rows)

  def table(self) -> str:
    """The summary as fixed-width text: one row per layer, then the totals."""
    head = ("layer", "type", "output", "params", "mult-adds", "RF", "jump")
    body = [(r.name, r.layer, "x".join(map(str, r.output_shape)), f"{r.params:,}",
             f"{r.macs:,}", r.receptive_field, r.jump) for r in self.rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    right = {3, 4, 5, 6}
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines = [f"{self.model} on {'x'.join(map(str, self.input_shape))} inputs, "
             f"{self.num_classes} classes", fmt(head), "-" * len(fmt(head))]
    lines += [fmt(row) for row in body]
    lines += ["-" * len(fmt(head)),
              f"total parameters:       {self.total_params:,}",
              f"multiply-adds/example:  {self.total_macs:,} (forward)"]
    if self.train_step_flops is not None:
      lines.append(f"training step FLOPs:    {self.train_step_flops:,.0f} (batch "
                   f"{self.batch_size}; XLA cost analysis: forward + backward + update)")
    return "\n".join(lines)


def _fmt(values: tuple[float, ...]) -> str:
  text = [str(int(v)) if float(v).is_integer() else f"{v:.2f}" for v in values]
  return text[0] if len(set(text)) == 1 else "x".join(text)


def _spatial(x) -> tuple[int, ...] | None:
  return tuple(x.shape[1:-1]) if getattr(x, "ndim", 0) >= 3 else None


def _grow(geometry: Geometry, kernel, strides, dilation=None) -> Geometry:
  """One sliding window: rf + d (k - 1) jump, jump * s per axis."""
  if geometry is GLOBAL:
    return GLOBAL
  rf, jump = geometry
  dilation = dilation or (1,) * len(kernel)
  strides = strides or (1,) * len(kernel)
  return (tuple(r + d * (k - 1) * j for r, k, d, j in zip(rf, kernel, dilation, jump)),
          tuple(j * s for j, s in zip(jump, strides)))


def _leaf(module: nn.Module, x, y, geometry: Geometry) -> tuple[str, int, Geometry]:
  """(layer description, multiply-adds per example, output geometry) of one leaf call."""
  out = math.prod(y.shape[1:])
  if isinstance(module, (nn.Conv, layers.TableConv)):
    kernel = tuple(module.kernel_size)
    strides = module.strides if not isinstance(module.strides, int) else (module.strides,) * len(
        kernel)
    dilation = getattr(module, "kernel_dilation", None)
    dilation = (dilation,) * len(kernel) if isinstance(dilation, int) else dilation
    if isinstance(module, layers.TableConv):
      macs = math.prod(y.shape[1:-1]) * math.prod(kernel) * module.fan_in()
    else:
      macs = out * math.prod(kernel) * x.shape[-1] // (module.feature_group_count or 1)
    desc = f"Conv {'x'.join(map(str, kernel))}/{_fmt(tuple(strides or (1,)))}"
    return desc, macs, _grow(geometry, kernel, strides, dilation)
  if isinstance(module, nn.Dense):
    return "Dense", x.shape[-1] * y.shape[-1], GLOBAL
  if isinstance(module, layers.Pool):
    window, strides, _ = module.geometry(x)
    desc = f"Pool {module.kind} {'x'.join(map(str, window))}/{_fmt(strides)}"
    if module.kind == "blur":   # Max at stride 1, then the blur filter at the stride.
      geometry = _grow(geometry, window, None)
      return desc, 0, _grow(geometry, (module.blur_filter_size,) * len(window), strides)
    return desc, 0, _grow(geometry, window, strides)
  if isinstance(module, layers.AdaptiveAvgPool):
    sizes, outs = x.shape[1:-1], y.shape[1:-1]
    kernel = tuple(-(-s // o) if s > o else 1 for s, o in zip(sizes, outs))
    if geometry is not GLOBAL:
      rf, jump = _grow(geometry, kernel, None)
      geometry = rf, tuple(j * s / o for j, s, o in zip(jump, sizes, outs))
    return f"AdaptiveAvgPool {'x'.join(map(str, outs))}", 0, geometry
  if isinstance(module, layers.GlobalAvgPool):
    return "GlobalAvgPool", 0, GLOBAL
  if isinstance(module, layers.BatchNorm):
    return "BatchNorm", 0, geometry
  return f"Dropout {module.kind}", 0, geometry   # layers.Dropout


class _Tracer:
  """Records leaf rows while a model is traced; keeps every value alive so ids stay unique."""

  def __init__(self, input_value, n_spatial: int):
    start = ((1.0,) * n_spatial, (1.0,) * n_spatial)
    self.known: dict[int, Geometry] = {id(input_value): start}
    self.frames: list[list[tuple[Any, Geometry]]] = [[(_spatial(input_value), start)]]
    self.keep = [input_value]
    # (module, output, layer description, multiply-adds, output geometry) per leaf call.
    self.calls: list[tuple[nn.Module, Any, str, int, Geometry]] = []
    self.depth_in_leaf = 0

  def _geometry_of(self, x) -> Geometry:
    """A value's geometry: known by identity, else (made by a non-module op such as an
    activation or an addition) that of the latest value of the same spatial shape in this
    block, else the latest value in this block."""
    if id(x) in self.known:
      return self.known[id(x)]
    frame = self.frames[-1]
    for shape, geometry in reversed(frame):
      if shape == _spatial(x):
        return geometry
    return frame[-1][1]

  def _note(self, y, geometry: Geometry) -> None:
    self.keep.append(y)
    self.known[id(y)] = geometry
    self.frames[-1].append((_spatial(y), geometry))

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or self.depth_in_leaf or not args:
      return next_fun(*args, **kwargs)
    x = args[0]
    geometry = self._geometry_of(x)
    if isinstance(module, _LEAVES):
      self.depth_in_leaf += 1
      try:
        y = next_fun(*args, **kwargs)
      finally:
        self.depth_in_leaf -= 1
      layer, macs, out_geometry = _leaf(module, x, y, geometry)
      self.calls.append((module, y, layer, macs, out_geometry))
      self._note(y, out_geometry)
      return y
    self.frames.append([(_spatial(x), geometry)])
    y = next_fun(*args, **kwargs)
    frame = self.frames.pop()
    geometries = [g for _, g in frame[1:]]
    if any(g is GLOBAL for g in geometries):
      out_geometry = GLOBAL
    elif geometries:   # The largest receptive field over the block's branches.
      out_geometry = max(geometries, key=lambda g: (sum(g[0]), sum(g[1])))
    else:
      out_geometry = geometry
    if isinstance(y, jax.Array) or hasattr(y, "shape"):
      self._note(y, out_geometry)
    return y


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _subtree(params, path: tuple[str, ...]):
  for name in path:
    if not isinstance(params, dict) or name not in params:
      return {}
    params = params[name]
  return params


def summarize_model(model: nn.Module, input_shape: tuple[int, ...], *,
                    name: str = "model", num_classes: int = 0) -> Summary:
  """Rows for `model` on one input of `input_shape` = (*spatial, C), traced in train mode (so
  auxiliary heads and dropout appear); no training-step FLOPs."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  key = jax.random.key(0)
  variables = jax.eval_shape(lambda x: model.init({"params": key}, x, train=False), x)
  holder = {}

  def traced(variables, x):
    tracer = _Tracer(x, len(input_shape) - 1)
    holder["tracer"] = tracer
    with nn.intercept_methods(tracer):
      return model.apply(variables, x, train=True, mutable=["batch_stats", "aux_logits"],
                         rngs={"dropout": key, "channel_dropout": key})
  jax.eval_shape(traced, variables, x)
  tracer = holder["tracer"]
  rows = []
  for module, y, layer, macs, out_geometry in tracer.calls:
    if isinstance(module, layers.Dropout) and (module.kind == "none" or module.rate == 0):
      continue   # Inactive: nothing to show.
    path = tuple(module.scope.path)
    rows.append(Row("/".join(path), layer, tuple(y.shape[1:]),
                    _count(_subtree(variables["params"], path)), macs, out_geometry))
  return Summary(name, tuple(input_shape), num_classes, tuple(rows), _count(variables["params"]),
                 None, 1)


def train_step_flops(config: ml_collections.ConfigDict, model: nn.Module,
                     input_shape: tuple[int, ...], batch_size: int) -> float:
  """XLA's FLOP count of one compiled `steps.train_step` of `model` on a batch (no data read)."""
  tx = optim.build_optimizer(config.optimizer, 1, 1)
  streams = steps.split_seed(0)
  state = steps.create_train_state(model, tx, streams, input_shape, abstract=True)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.dtype(config.dtype)),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  step = functools.partial(steps.train_step,
                           aux_loss_weight=float(config.model.get("aux_loss_weight", 0.3)))
  return steps.lowered_flops(jax.jit(step).lower(state, batch))   # Lowered, not compiled: fast.


def summarize(config: ml_collections.ConfigDict, input_shape: tuple[int, ...] | None = None,
              num_classes: int | None = None, *, step_flops: bool = True) -> Summary:
  """The summary of `config.model` on the input shape (after `resize` or `image_size`) and
  classes of `config.dataset` (no image is read, but one of a streamed dataset), or on
  `input_shape` (H, W, C) / `num_classes` when given (e.g. 224x224x3, 1000).

  Raises ConfigError for a bad config, an `input_shape` that is not 3 positive integers, or a
  `num_classes` below 1 (given values are used or refused, never replaced by the dataset's)."""
  validate_config(config)
  if input_shape is None:
    shape = data.image_shape(config.dataset)
  else:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(layers.is_int(v) and v >= 1 for v in shape):
      raise ConfigError(f"input_shape={shape!r} must be 3 positive integers (H, W, C), e.g. "
                        f"(224, 224, 3).")
  # get_model checks it is positive.
  classes = data.num_classes(config.dataset) if num_classes is None else num_classes
  if layers.is_int(classes) and classes > LABEL_MAX:
    raise ConfigError(f"num_classes={classes} is out of range; allowed: [1, {LABEL_MAX}] (labels "
                      f"are int32).")
  model = models.get_model(config.model, classes, dtype=jnp.dtype(config.dtype))
  summary = summarize_model(model, shape, name=config.model.name, num_classes=classes)
  if step_flops:
    summary = dataclasses.replace(
        summary, train_step_flops=train_step_flops(config, model, shape, config.batch_size),
        batch_size=config.batch_size)
  return summary
