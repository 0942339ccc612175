"""How much of a train step XLA's convolution kernels take: every convolution of cnnlab's train
step, run alone.

    python benchmarks/conv_kernels.py --nets=vgg_small,resnet20 --repeats=5 --steps=10

For each net of nets.py, traces cnnlab's train step (jax.make_jaxpr) and collects every
`conv_general_dilated` in it: the forward convolutions and, from autodiff, their input and
weight gradients, with their exact shapes, strides, paddings, dilations and dimension numbers.
Each distinct one is compiled alone (its operands random, as parameters of its own program) and
timed: the best of --repeats windows of --steps calls. Their sum over the step is what the
convolution kernels alone cost, with the layout transposes XLA puts around them; the whole train
step, timed the same way in the same process, is printed beside it. If the kernels alone take
longer than another framework's whole step, no change outside the kernels closes the gap.
Runs with the XLA settings a default config gives a training process.
"""

from __future__ import annotations

import collections
import time

import jax
import numpy as np
from absl import app, flags
from jax import lax
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public API.
from nets import NETS, NUM_CLASSES, CnnlabRunner

from cnnlab import cli
from cnnlab.base import environment
from cnnlab.configs import base_config
from cnnlab.training import steps

_NETS = flags.DEFINE_list("nets", ["vgg_small", "resnet20"], "Nets to profile.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows per program (the best counts).",
                                lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Calls per timed window.", lower_bound=1)
flags.register_validator("nets", lambda v: set(v) <= set(NETS),
                         f"takes a comma-separated list of {', '.join(NETS)}")


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _kind(eqn) -> str:
  """forward, input gradient or weight gradient (the one whose lhs batch axis is not axis 0:
  autodiff contracts the batch there, so it swaps the batch and feature axes)."""
  if eqn.params["dimension_numbers"].lhs_spec[0] != 0:
    return "weight gradient"
  return "input gradient" if "transpose" in str(eqn.source_info.name_stack) else "forward"


def step_convolutions(runner: CnnlabRunner) -> collections.Counter:
  """{(kind, lhs shape, rhs shape, dtype, conv params): how often the train step runs it}."""
  with jax.default_matmul_precision(runner.precision):
    closed = jax.make_jaxpr(runner.train_step)(runner.state, runner.batch)
  # Without what XLA drops as unused too (e.g. a first layer's input gradient, which a custom
  # VJP's backward pass computes along with the weight gradient).
  used, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  counts = collections.Counter()
  for eqn in _equations(used):
    if eqn.primitive is lax.conv_general_dilated_p:
      lhs, rhs = (v.aval for v in eqn.invars)
      counts[(_kind(eqn), lhs.shape, rhs.shape, lhs.dtype,
              tuple(sorted(eqn.params.items())))] += 1
  return counts


def best_ms(fn, *args) -> float:
  """Best milliseconds per call of the jitted `fn` over --repeats windows of --steps calls."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / _STEPS.value * 1e3)
  return best


def profile(net: str) -> list[str]:
  """Markdown rows: each distinct convolution of `net`'s train step, then the totals."""
  spec = NETS[net]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((spec["batch"], *spec["shape"])).astype(np.float32)
  runner = CnnlabRunner(net, "float32", images, rng.integers(0, NUM_CLASSES, spec["batch"]))
  rows, total = [], 0.0
  for (kind, lhs, rhs, dtype, params), count in step_convolutions(runner).items():
    conv = jax.jit(lambda x, w, params=params:
                   lax.conv_general_dilated_p.bind(x, w, **dict(params)))
    x = np.asarray(rng.standard_normal(lhs), dtype)
    w = np.asarray(rng.standard_normal(rhs), dtype)
    with jax.default_matmul_precision(runner.precision):
      flops = steps.lowered_flops(conv.lower(x, w))
      ms = best_ms(conv, x, w)
    total += count * ms
    rows.append(f"| {net} | {kind} | {'x'.join(map(str, lhs))} * {'x'.join(map(str, rhs))} | "
                f"{count} | {ms:.2f} | {flops / ms / 1e6:.0f} |")
  step_ms = best_ms(lambda: runner.train(1) or runner.state.step)
  rows.append(f"| **{net}** | **all convolutions** | {len(rows)} distinct | | **{total:.1f}** | |")
  rows.append(f"| **{net}** | **whole train step** | batch {spec['batch']} | | **{step_ms:.1f}** "
              "| |")
  return rows


def main(_):
  config = base_config()
  environment.apply_numerics(config)
  env = environment.describe("float32")
  print(f"{env['backend']} ({env['device_kind']}), jax {env['packages']['jax']}, "
        f"XLA_FLAGS='{env['xla_flags']}', best of {_REPEATS.value} windows of {_STEPS.value} "
        "calls", flush=True)
  lines = ["| net | convolution | lhs * rhs | per step | ms | GFLOP/s |",
           "|---|---|---|---|---|---|"]
  for net in _NETS.value:
    for row in profile(net):
      print(row, flush=True)
      lines.append(row)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
