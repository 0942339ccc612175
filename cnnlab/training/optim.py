"""Optimizers and learning-rate schedules from `config.optimizer`, built with optax.

Optimizers are known by name through `register_optimizer`: cnnlab's own (sgd, adam, adamw,
rmsprop) below, a researcher's from their own module (`config.imports`) the same way:

    @register_optimizer("lion", fields={"b1": 0.9, "b2": 0.99})
    def lion(opt, schedule):   # opt: config.optimizer; schedule: step -> learning rate
      return optax.lion(schedule, b1=opt.b1, b2=opt.b2)

Weight decay is applied to kernels only (parameters with ndim > 1), not to biases or BatchNorm's
scale/bias: decaying those only fights the normalisation. For `sgd`, `adam` and `rmsprop` it is
the coupled L2 form (the gradient gets `weight_decay * w`, as PyTorch's `weight_decay=`); `adamw`
uses decoupled weight decay (Loshchilov & Hutter). Parameters can be partitioned into groups with
their own learning-rate scale, scale 0 freezing a group (fine-tuning, cnnlab.training.transfer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from cnnlab.base.errors import ConfigError
from cnnlab.base.registry import Registry

SCHEDULES = ("constant", "cosine", "step")
Builder = Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
  name: str
  build: Builder
  fields: Mapping[str, Any]   # Its own config.optimizer fields, with their defaults.
  decoupled_decay: bool       # It applies weight_decay itself (adamw); else coupled L2 is added.
  module: str


OPTIMIZERS_REGISTRY = Registry("optimizer", "optimizer.name",
                               "cnnlab.training.optim.register_optimizer")


def register_optimizer(name: str, build: Builder | None = None, *,
                       fields: Mapping[str, Any] | None = None,
                       decoupled_decay: bool = False) -> Callable:
  """Registers `build(config.optimizer, schedule) -> optax.GradientTransformation` as
  `config.optimizer.name = name`; usable as a decorator. `fields` ({field: default}) become
  `config.optimizer` fields. Unless `decoupled_decay`, `weight_decay` is applied as coupled L2 on
  kernels before the update (as PyTorch's `weight_decay=`). Registering a name again from
  another module or function is a ConfigError."""
  def register(fn: Builder) -> Builder:
    clash = sorted(set(fields or {}) & set(shared_defaults()))
    if clash:
      raise ConfigError(f"register_optimizer({name!r}): config.optimizer.{clash[0]} is shared "
                        f"by every optimizer; read it from `opt` instead of declaring it.")
    OPTIMIZERS_REGISTRY.add(name, OptimizerEntry(name, fn, dict(fields or {}), decoupled_decay,
                                                  getattr(fn, "__module__", "?")), fn)
    return fn
  return register if build is None else register(build)


def optimizer_names() -> tuple[str, ...]:
  return OPTIMIZERS_REGISTRY.names()


def lookup(name) -> OptimizerEntry:
  """The entry of `name`; ConfigError listing the registered optimizers for an unknown one."""
  return OPTIMIZERS_REGISTRY.get(name)


def shared_defaults() -> config_dict.ConfigDict:
  """`config.optimizer`'s fields every optimizer and schedule reads, with their defaults."""
  opt = config_dict.ConfigDict()
  opt.name = "sgd"           # See `optimizer_names()`: sgd | adam | adamw | rmsprop | yours.
  opt.learning_rate = 0.05
  opt.momentum = 0.9         # sgd, rmsprop.
  opt.nesterov = True        # sgd.
  opt.weight_decay = 5e-4
  opt.schedule = "cosine"    # constant | cosine | step
  opt.warmup_epochs = 1.0
  # step schedule only: multiply the rate by `step_factor` at these fractions of training.
  opt.step_boundaries = (0.5, 0.75)
  opt.step_factor = 0.1
  return opt


def field_defaults() -> config_dict.ConfigDict:
  """`config.optimizer` with every field: the shared ones and each registered optimizer's."""
  opt = shared_defaults()
  for entry in OPTIMIZERS_REGISTRY:
    for field, default in entry.fields.items():
      if field not in opt:
        opt[field] = default
  return opt


register_optimizer("sgd", lambda opt, schedule: optax.sgd(
    schedule, momentum=float(opt.momentum) or None, nesterov=bool(opt.nesterov)))
register_optimizer("adam", lambda opt, schedule: optax.adam(schedule))
register_optimizer("rmsprop", lambda opt, schedule: optax.rmsprop(
    schedule, momentum=float(opt.momentum)))
register_optimizer("adamw", lambda opt, schedule: optax.adamw(
    schedule, weight_decay=float(opt.weight_decay), mask=kernel_mask), decoupled_decay=True)
OPTIMIZERS = optimizer_names()   # cnnlab's own.


def used_fields(opt_config: ml_collections.ConfigDict) -> frozenset[str]:
  """The fields of `config.optimizer` the named optimizer reads (the shared ones and its own):
  another optimizer's fields cannot change a run, so they stay out of its fingerprint."""
  name = opt_config.get("name")
  entry = OPTIMIZERS_REGISTRY.get(name) if name in OPTIMIZERS_REGISTRY else None
  own = frozenset(entry.fields) if entry is not None else frozenset(opt_config)
  return frozenset(shared_defaults()) | own


def kernel_mask(params):
  """True for parameters weight decay applies to: kernels (ndim > 1)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def warmup_target(opt: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> float:
  """The rate the warm-up ramps to: `opt.learning_rate`, times `step_factor` for each step
  boundary that falls inside the warm-up (or at its end). Computed in float64 on the host."""
  factor = 1.0
  if opt.schedule == "step":
    warmup = _warmup_steps(opt, steps_per_epoch, total_steps)
    for fraction in opt.step_boundaries:
      if max(int(round(fraction * total_steps)) - warmup, 0) == 0:
        factor *= float(opt.step_factor)
  return float(opt.learning_rate) * factor


def _warmup_steps(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> int:
  return min(int(round(opt.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int, target=None) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_epochs`, then constant, cosine (to 0) or step decay.

  The step schedule multiplies the rate by `step_factor` at each of `step_boundaries`, given as
  fractions of the whole run, warm-up included (0.5 = half-way: step round(0.5 * total_steps)).
  Every boundary applies: one that falls inside the warm-up scales the warm-up's target and
  everything after it; boundaries that round to the same step multiply.

  `target`: the rate the warm-up ramps to, `warmup_target(...)` when None; a traced scalar makes
  the rate an input of the compiled program (`rate_as_input`) with the same arithmetic.
  """
  peak = warmup_target(opt, steps_per_epoch, total_steps) if target is None else target
  warmup = _warmup_steps(opt, steps_per_epoch, total_steps)
  rest = max(total_steps - warmup, 1)
  if opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=rest)
  else:  # "step"; validated earlier. Boundaries inside the warm-up are in `peak` already.
    scales = {}   # Step after the warm-up -> factor applied from there on.
    for fraction in opt.step_boundaries:
      step = max(int(round(fraction * total_steps)) - warmup, 0)
      if step:
        scales[step] = scales.get(step, 1.0) * float(opt.step_factor)
    main = optax.piecewise_constant_schedule(peak, scales)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


class RateAsInput(NamedTuple):
  """An optax transformation whose rate (the warm-up target of its schedule) is an argument of
  `update`, `learning_rate=` a float32 scalar, rather than a constant compiled into the train
  step: runs that differ only in the learning rate (a tuning sweep's trials) share one compiled
  program. Built by `rate_as_input`; `learning_rate` is the value the config gives."""
  init: Callable
  update: Callable
  learning_rate: float


# What a builder that needs the rate as a Python number raises when it gets a traced one.
_NEEDS_A_NUMBER = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                   jax.errors.TracerIntegerConversionError)


def rate_as_input(build: Callable[[Any], optax.GradientTransformation],
                  learning_rate: float) -> RateAsInput | optax.GradientTransformation:
  """`build(rate)` (rate: a float, or the traced scalar a train step passes) as a RateAsInput.
  The traced rate goes through the same float32 operations as the constant did, so the results
  are bit for bit those of `build(learning_rate)`. A builder that needs the rate as a number
  (a registered optimizer that calls `float(schedule(0))` or branches on it) gets it: then
  `build(learning_rate)` itself, the rate a constant of the program."""
  try:
    jax.eval_shape(lambda rate: (build(rate), jnp.zeros(()))[1], jnp.float32(learning_rate))
  except _NEEDS_A_NUMBER:
    return build(learning_rate)

  def update(updates, state, params=None, *, learning_rate):
    return build(learning_rate).update(updates, state, params)
  return RateAsInput(build(learning_rate).init, update, learning_rate)


def build_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
                    param_labels=None, lr_scales: dict[str, float] | None = None
                    ) -> RateAsInput | optax.GradientTransformation:
  """The optimizer `opt` names, driven by its learning-rate schedule (`create_optimizer` over
  `learning_rate_schedule`), the rate an input of `update` (`rate_as_input`)."""
  def build(target) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, steps_per_epoch, total_steps, target)
    return create_optimizer(opt, schedule, param_labels, lr_scales)
  return rate_as_input(build, warmup_target(opt, steps_per_epoch, total_steps))


def runtime_inputs(tx) -> dict[str, Any]:
  """The keyword arguments a train step passes to `tx.update`: a RateAsInput's learning rate as
  a float32 scalar, nothing for any other transformation."""
  if isinstance(tx, RateAsInput):
    return {"learning_rate": jnp.asarray(tx.learning_rate, jnp.float32)}
  return {}


def create_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule,
                     param_labels=None, lr_scales: dict[str, float] | None = None
                     ) -> optax.GradientTransformation:
  """The optax transformation named by `opt.name`, driven by `schedule`.

  With `param_labels` (a pytree of labels shaped like the parameters) the parameters are
  partitioned (optax.multi_transform): the group of label L trains with the learning rate times
  `lr_scales[L]`; a group of scale 0 is frozen: optax.set_to_zero gives it zero updates, no
  optimizer state (no momentum or Adam moments) and no weight decay.
  """
  if param_labels is None:
    return _single_optimizer(opt, schedule)
  def group(scale: float) -> optax.GradientTransformation:
    if scale == 0:
      return optax.set_to_zero()
    scaled = schedule if scale == 1 else (lambda step: scale * schedule(step))
    return _single_optimizer(opt, scaled)
  return optax.multi_transform({label: group(s) for label, s in lr_scales.items()}, param_labels)


def _single_optimizer(opt: ml_collections.ConfigDict,
                      schedule: optax.Schedule) -> optax.GradientTransformation:
  entry = lookup(opt.name)
  base = entry.build(opt, schedule)
  decay = float(opt.weight_decay)
  if entry.decoupled_decay or decay == 0:
    return base
  return optax.chain(optax.masked(optax.add_decayed_weights(decay), kernel_mask), base)
