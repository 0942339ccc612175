"""Every model of the zoo trained a few steps twice from the same start: do both runs compile, and
are they bit-identical?

    python benchmarks/zoo_determinism.py --deterministic=true --steps=3 --out=/tmp/zoo.json

Written for GPUs, where `config.deterministic` (default True) adds XLA's
`--xla_gpu_deterministic_ops=true`: the overlapping max pools' gradients (AlexNet, GoogLeNet,
NiN, the ImageNet ResNet stem: select-and-scatter) and cuDNN's convolution algorithms are where
some XLA versions refuse to compile or give run-to-run differences. Run it once with the flag
and once without (`--deterministic=false`, a separate process: XLA reads its flags at start) to
see which models need it and what it costs. On the CPU every model is deterministic either way.

Each model runs at its natural input size (ImageNet 224x224x3, CIFAR 32x32x3, MNIST 28x28x1),
BN before the activation and standard dropout (so the dropout streams are used), on one random
batch, with cnnlab's jitted `steps.train_step` and the default SGD; the two runs share the
compiled program and the initial state, so only the kernels' own run-to-run behaviour can part
them. Prints a markdown table: compile (first step) seconds, median ms per later step, whether
the digests of params and batch_stats after both runs are equal, and the final loss.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cnnlab import cli
from cnnlab.base import environment
from cnnlab.configs import base_config
from cnnlab.nets import models
from cnnlab.training import optim
from cnnlab.training import steps as steps_lib

_MODELS = flags.DEFINE_list("models", list(models.MODEL_NAMES), "Zoo models to train.")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps per run (two runs per model).",
                              lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Examples per step.", lower_bound=1)
_DETERMINISTIC = flags.DEFINE_bool("deterministic", True, "config.deterministic (XLA's "
                                   "deterministic GPU ops).")
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here.")

IMAGENET = ("alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50",
            "googlenet")
MNIST = ("linear", "mlp", "lenet5", "lenet5_fcn")


def input_shape(name: str) -> tuple[int, int, int]:
  """The input size a model of the zoo is built for: ImageNet, MNIST, else CIFAR."""
  if name in IMAGENET:
    return (224, 224, 3)
  return (28, 28, 1) if name in MNIST else (32, 32, 3)


def check_model(name: str, steps: int, batch_size: int) -> dict:
  """Trains `name` for `steps` steps twice from one initial state on one random batch
  [batch_size, *input_shape(name)]; returns compile seconds, ms per step, both digests and the
  last loss."""
  config = base_config()
  config.model.update(name=name, bn_placement="before_act", dropout="standard")
  shape = input_shape(name)
  model = models.get_model(config.model, 10)
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.01))
  start = steps_lib.create_train_state(model, tx, steps_lib.split_seed(0), shape)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((batch_size, *shape)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  step = jax.jit(functools.partial(steps_lib.train_step,
                                   aux_loss_weight=config.model.aux_loss_weight))
  digests, seconds = [], []
  for _ in range(2):
    state = start
    for _ in range(steps):
      begin = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      seconds.append(time.perf_counter() - begin)
    digests.append(steps_lib.state_digest(state))
  return {"model": name, "input": "x".join(map(str, shape)), "compile_s": seconds[0],
          "step_ms": 1e3 * statistics.median(seconds[1:]), "digests": digests,
          "bit_identical": digests[0] == digests[1], "loss": float(metrics["loss"])}


def markdown(rows: list[dict]) -> str:
  lines = ["| model | input | compiles | first step s | ms/step | two runs bit-identical | loss |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['input']} | no: {r['error']} | | | | |")
    else:
      lines.append(f"| {r['model']} | {r['input']} | yes | {r['compile_s']:.1f} | "
                   f"{r['step_ms']:.2f} | {'yes' if r['bit_identical'] else '**no**'} | "
                   f"{r['loss']:.4f} |")
  return "\n".join(lines)


def main(_):
  config = base_config()
  config.deterministic = _DETERMINISTIC.value
  environment.apply_numerics(config)
  env = environment.describe("float32")
  print(f"{env['backend']} ({env['device_kind']}), jax {env['packages']['jax']}, "
        f"XLA_FLAGS='{env['xla_flags']}', matmul precision {env['matmul_precision']}, batch "
        f"{_BATCH.value}, {_STEPS.value} steps per run", flush=True)
  rows = []
  for name in _MODELS.value:
    try:
      rows.append(check_model(name, _STEPS.value, _BATCH.value))
    except Exception as e:  # A model XLA refuses to compile is a result here, not a crash.
      rows.append({"model": name, "input": "x".join(map(str, input_shape(name))),
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
  print(markdown(rows))
  if _OUT.value:
    cli.write_json_or_fail("out", _OUT.value, {"environment": env, "rows": rows})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
