"""Models by name: `get_model(config.model, num_classes, dtype)` -> a Linen classifier.

Every model maps x [N,H,W,C] float -> float32 logits [N, num_classes] via
`model.apply(variables, x, train=...)`; BN statistics live in `batch_stats`, dropout draws from the
`dropout` / `channel_dropout` streams, auxiliary classifiers (GoogLeNet) sow their logits into
`aux_logits` in training. Every model has the fields `num_classes` and `options`
(`layers.BlockOptions`: BN placement, dropout kind, activation, dtype), built from the same-named
`config.model` fields. Models become known through `register_model` (cnnlab.nets.models.registry),
cnnlab's own below as a researcher's own from their file.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from cnnlab.base.errors import ConfigError
from cnnlab.nets import layers
from cnnlab.nets.models import alexnet, baselines, inception, lenet, nin, resnet, vgg
from cnnlab.nets.models.registry import (
  OPTION_FIELDS,
  field_defaults,
  freeze,
  lookup,
  model_names,
  register_model,
  used_fields,
)

__all__ = ["MODEL_NAMES", "block_options", "field_defaults", "get_model", "lookup",
           "model_names", "register_model", "used_fields"]

# Fields several families read, with one default each.
_POOL = {"pool": "max"}     # lenet5, vgg*, alexnet: max | avg | blur (anti-aliased, Zhang 2019).
# alexnet, resnet18/34/50, googlenet: auto (ImageNet stem for inputs >= 64 px) | imagenet | small.
_STEM = {"stem": "auto"}
# resnet*: where BN and the activation sit around the addition (He et al. 2016b): original |
# bn_after_add | relu_before_add | relu_only_preact | full_preact.
_UNIT = {"unit": "original"}

register_model("linear", baselines.MLP, hidden=())
register_model("mlp", baselines.MLP, fields={"hidden": (256, 256)})   # Hidden layer widths.
register_model("lenet5", lenet.LeNet5, fields=_POOL, fully_conv=False)
register_model("lenet5_fcn", lenet.LeNet5, fields=_POOL, fully_conv=True)
register_model("alexnet", alexnet.AlexNet, fields={**_POOL, **_STEM})
# Conv widths per stage (a 2x2 max-pool follows each stage) and the head: gap (global average
# pool) | flatten | classifier.
register_model("vgg_cnn", vgg.VGG, fields={**_POOL, "stages": ((32, 32), (64, 64)), "head": "gap"})
for _depth in sorted(vgg.VGG_STAGES):
  register_model(f"vgg{_depth}", vgg.VGG, fields=_POOL, stages=vgg.VGG_STAGES[_depth],
                 head="classifier")
for _depth in resnet.CIFAR_DEPTHS:
  register_model(f"resnet{_depth}", resnet.ResNet, fields={**_STEM, **_UNIT},
                 **resnet.cifar_resnet(_depth))
for _depth in resnet.IMAGENET_DEPTHS:
  register_model(f"resnet{_depth}", resnet.ResNet, fields={**_STEM, **_UNIT},
                 **resnet.imagenet_resnet(_depth))
register_model("nin", nin.NiN)
# googlenet: auxiliary classifiers; 5 (paper) or 3 (torchvision) for the kernels of the "5x5"
# branches; the max pool between inception 4e and 5a: 3 (paper) or 2 (torchvision).
register_model("googlenet", inception.GoogLeNet, fields={
    **_STEM, "aux_classifiers": True, "c5_kernel": 5, "pool4_window": 3})

MODEL_NAMES = model_names()   # cnnlab's own models (the zoo the tests and benchmarks cover).


def block_options(model_config: ml_collections.ConfigDict, dtype=jnp.float32,
                  prefix: str = "config.model.") -> layers.BlockOptions:
  """`layers.BlockOptions` from `config.model` (absent fields take the defaults), checked:
  ConfigError names `prefix + field` for a bad value."""
  kwargs = {k: freeze(model_config[k]) for k in OPTION_FIELDS if k in model_config}
  if isinstance(kwargs.get("dropout_rate"), int) and not isinstance(kwargs["dropout_rate"], bool):
    kwargs["dropout_rate"] = float(kwargs["dropout_rate"])
  options = layers.BlockOptions(**kwargs, dtype=dtype)
  options.check(prefix)
  return options


def get_model(model_config: ml_collections.ConfigDict, num_classes: int,
              dtype=jnp.float32):
  """Builds the classifier `model_config.name` with `num_classes` outputs.

  Raises ConfigError for an unknown name or a bad shared option (bn_placement, bn_convention,
  dropout, dropout_rate, dropblock_size, activation, conv_bias); model-specific fields are
  checked when the model is called.
  """
  entry = lookup(model_config.get("name", None))
  options = block_options(model_config, dtype, prefix="model.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes={num_classes!r} must be a positive int.")
  return entry.build(model_config, num_classes, options)
