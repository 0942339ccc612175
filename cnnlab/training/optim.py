"""Optimizers and learning-rate schedules from `config.optimizer`, built with optax.

Weight decay is applied to kernels only (parameters with ndim > 1), not to biases or BatchNorm's
scale/bias: decaying those only fights the normalisation. For `sgd`, `adam` and `rmsprop` it is
the coupled L2 form (the gradient gets `weight_decay * w`, as PyTorch's `weight_decay=`); `adamw`
uses decoupled weight decay (Loshchilov & Hutter). Parameters can be partitioned into groups with
their own learning-rate scale, scale 0 freezing a group (fine-tuning, cnnlab.training.transfer).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")


def kernel_mask(params):
  """True for parameters weight decay applies to: kernels (ndim > 1)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_epochs`, then constant, cosine (to 0) or step decay.

  The step schedule multiplies the rate by `step_factor` at each of `step_boundaries`, given as
  fractions of the whole run, warm-up included (0.5 = half-way: step round(0.5 * total_steps)).
  Every boundary applies: one that falls inside the warm-up scales the warm-up's target and
  everything after it; boundaries that round to the same step multiply.
  """
  peak = float(opt.learning_rate)   # The rate the warm-up ramps to.
  warmup = min(int(round(opt.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  rest = max(total_steps - warmup, 1)
  if opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps=rest)
  else:  # "step"; validated earlier.
    scales = {}   # Step after the warm-up -> factor applied from there on.
    for fraction in opt.step_boundaries:
      step = max(int(round(fraction * total_steps)) - warmup, 0)
      scales[step] = scales.get(step, 1.0) * float(opt.step_factor)
    peak *= scales.pop(0, 1.0)   # Boundaries inside the warm-up (or at its end).
    main = optax.piecewise_constant_schedule(peak, scales)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


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
  decay = float(opt.weight_decay)
  if opt.name == "adamw":
    return optax.adamw(schedule, weight_decay=decay, mask=kernel_mask)
  if opt.name == "sgd":
    base = optax.sgd(schedule, momentum=float(opt.momentum) or None, nesterov=bool(opt.nesterov))
  elif opt.name == "adam":
    base = optax.adam(schedule)
  else:  # "rmsprop"
    base = optax.rmsprop(schedule, momentum=float(opt.momentum))
  if decay == 0:
    return base
  return optax.chain(optax.masked(optax.add_decayed_weights(decay), kernel_mask), base)
