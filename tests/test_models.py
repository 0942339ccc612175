"""Tests for cnnlab.nets.models: the registry, output shapes for every model/option/input size,
LeNet-5's 1998 parameter structure, and config errors.

Shape checks use `jax.eval_shape` (tracing only, no compilation), so the grid stays fast; one
numeric train step per model checks the values are finite and BN statistics move.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax_helpers import eval_apply, init_np

from cnnlab.base.errors import ConfigError
from cnnlab.nets import models
from experiments.default import get_config

KEY = jax.random.key(0, impl="unsafe_rbg")  # Compiles much faster than threefry on this CPU.
RNGS = {"params": KEY, "dropout": KEY, "channel_dropout": KEY}
# Each model runs on every bundled input size; the sizes cycle through every BN placement and
# dropout kind (a full grid would multiply the time; the options' code paths are independent of
# the model and tested in test_layers.py). ResNets have no `after_act` (tested below).
GRID = (((8, 8, 1), "none", "standard"), ((28, 28, 1), "before_act", "dropblock"),
        ((32, 32, 3), "after_act", "spatial"))
RESNETS = tuple(n for n in models.MODEL_NAMES if n.startswith("resnet"))


def model_config(name="lenet5", **overrides) -> ml_collections.ConfigDict:
  config = get_config().model
  config.name = name
  config.dropout_rate = 0.3
  config.update(overrides)
  return config


def abstract_run(model, shape, batch=2):
  """Shapes/dtypes of (variables, eval logits, train logits, train updates), traced only."""
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({"params": KEY}, x, train=False), x)
  logits_eval = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  logits_train, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs=RNGS, mutable=["batch_stats"]),
      variables, x)
  return variables, logits_eval, logits_train, updates


def num_params(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def test_registry_names():
  assert set(models.MODEL_NAMES) >= {"mlp", "lenet5", "vgg_cnn"}
  assert isinstance(models.MODEL_NAMES, tuple)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_logits_shape_for_every_input_and_option(name):
  for shape, bn, dropout in GRID:
    if name in RESNETS and bn == "after_act":
      bn = "before_act"
    model = models.get_model(model_config(name, bn_placement=bn, dropout=dropout), 10)
    variables, logits_eval, logits_train, updates = abstract_run(model, shape)
    for logits in (logits_eval, logits_train):
      assert logits.shape == (2, 10) and logits.dtype == jnp.float32, (name, shape, bn, dropout)
    has_bn = bn != "none" and name != "linear"
    assert ("batch_stats" in variables) == has_bn
    assert (len(jax.tree_util.tree_leaves(updates["batch_stats"] if has_bn else {})) > 0) == has_bn


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_activations_float32_params_and_logits(name):
  model = models.get_model(model_config(name, bn_placement="before_act"), 7, dtype=jnp.bfloat16)
  variables, logits_eval, logits_train, _ = abstract_run(model, (28, 28, 1))
  assert logits_eval.dtype == logits_train.dtype == jnp.float32
  assert logits_eval.shape == (2, 7)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}


def test_numeric_train_forward():
  """A real (compiled) train-mode LeNet-5 forward with BN and spatial dropout: finite logits,
  BN statistics updated. (Compiling every model's backward pass costs seconds here; the layers'
  values and gradients are tested in test_layers.py.)"""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
  model = models.get_model(model_config("lenet5", bn_placement="after_act", dropout="spatial"),
                           10)
  shapes = jax.eval_shape(lambda x: model.init({"params": KEY}, x, train=False), x)
  # Hand-filled weights (the initialisers compile slowly here): N(0, 0.1^2), BN at its init.
  fill = {"scale": np.ones, "var": np.ones, "bias": np.zeros, "mean": np.zeros}
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: fill.get(p[-1].key, lambda shape, dtype: 0.1 * rng.standard_normal(
          shape).astype(dtype))(s.shape, np.float32), shapes)
  logits, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, rngs=RNGS, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (4, 10) and np.isfinite(np.asarray(logits)).all()
  for layer in ("C1", "C3", "C5", "F6"):
    assert np.abs(np.asarray(updates["batch_stats"][layer]["bn"]["mean"])).max() > 0, layer


# ----------------------------------------------------------------------------------------------
# LeNet-5.

def _per_layer_params(params):
  return {name: num_params(tree) for name, tree in params.items()}


def test_lenet5_1998_parameter_structure():
  model = models.get_model(model_config("lenet5"), 10)
  variables, *_ = abstract_run(model, (32, 32, 1))
  counts = _per_layer_params(variables["params"])
  # C1: 6 * (5*5*1 + 1) = 156. C3 (Table I): 6 maps * (3*25 + 1) + 9 * (4*25 + 1) + 1 * (6*25
  # + 1) = 456 + 909 + 151 = 1516. C5: 120 * (16*25 + 1) = 48120. F6: 84 * (120 + 1) = 10164.
  # Output: 10 * (84 + 1) = 850.
  assert counts == {"C1": 156, "C3": 1516, "C5": 48120, "F6": 10164, "output": 850}
  full = models.get_model(model_config("lenet5", c3_table=False), 10)
  # Without the table every C3 map reads all 6 S2 maps: 16 * (6*25 + 1) = 2416.
  assert _per_layer_params(abstract_run(full, (32, 32, 1))[0]["params"])["C3"] == 2416


@pytest.mark.parametrize("shape, c1, c3, c5", [
    ((32, 32, 1), (28, 28, 6), (10, 10, 16), (1, 1, 120)),   # Native.
    ((28, 28, 1), (28, 28, 6), (10, 10, 16), (1, 1, 120)),   # MNIST: C1 padded by 2.
    ((8, 8, 1), (8, 8, 6), (4, 4, 16), (1, 1, 120)),         # Digits: SAME C1, pools skipped.
])
def test_lenet5_feature_map_shapes(shape, c1, c3, c5):
  model = models.get_model(model_config("lenet5", pool="avg"), 10)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  _, state = jax.eval_shape(lambda x: model.init_with_output(
      {"params": KEY}, x, train=False, capture_intermediates=True), x)
  inter = state["intermediates"]
  assert inter["C1"]["__call__"][0].shape == (2, *c1)
  assert inter["C3"]["__call__"][0].shape == (2, *c3)
  assert inter["C5"]["__call__"][0].shape == (2, *c5)
  assert inter["F6"]["__call__"][0].shape == (2, 84)


def test_lenet5_blocks_follow_bn_placement():
  model = models.get_model(model_config("lenet5", bn_placement="before_act"), 10)
  params = abstract_run(model, (32, 32, 1))[0]["params"]
  assert "bias" not in params["C1"]["conv"] and set(params["C1"]) == {"conv", "bn"}
  assert set(params["F6"]) == {"dense", "bn"} and "bias" not in params["F6"]["dense"]


# ----------------------------------------------------------------------------------------------
# VGG-style CNN and MLP.

def test_vgg_cnn_parameters_and_heads():
  model = models.get_model(model_config("vgg_cnn"), 10)   # stages ((32, 32), (64, 64)), gap.
  params = abstract_run(model, (28, 28, 1))[0]["params"]
  # 3x3 convs: 9*1*32 + 32 = 320; 9*32*32 + 32 = 9248; 9*32*64 + 64 = 18496;
  # 9*64*64 + 64 = 36928; head 64*10 + 10 = 650.
  assert _per_layer_params(params) == {"stage0_conv0": 320, "stage0_conv1": 9248,
                                       "stage1_conv0": 18496, "stage1_conv1": 36928,
                                       "head": 650}
  flat = models.get_model(model_config("vgg_cnn", head="flatten"), 10)
  # 28 -> 14 -> 7: the head sees 7*7*64 = 3136 features: 3136*10 + 10 = 31370.
  assert num_params(abstract_run(flat, (28, 28, 1))[0]["params"]["head"]) == 31370


def test_vgg_cnn_skips_pools_at_size_one_and_accepts_lists():
  # 8 -> 4 -> 2 -> 1 -> (no pool) -> 1: four stages on 8x8 inputs; lists as from an override.
  config = model_config("vgg_cnn", head="flatten")
  config.stages = [[4], [4], [4], [8]]
  params = abstract_run(models.get_model(config, 3), (8, 8, 1))[0]["params"]
  assert params["head"]["kernel"].shape == (8, 3)


def test_mlp_parameters():
  model = models.get_model(model_config("mlp", hidden=(256, 256)), 10)
  params = abstract_run(model, (28, 28, 1))[0]["params"]
  # 784*256 + 256 = 200960; 256*256 + 256 = 65792; 256*10 + 10 = 2570.
  assert _per_layer_params(params) == {"hidden0": 200960, "hidden1": 65792, "head": 2570}


def test_optional_fields_default():
  config = ml_collections.ConfigDict({"name": "vgg_cnn"})
  _, logits, _, _ = abstract_run(models.get_model(config, 5), (32, 32, 3))
  assert logits.shape == (2, 5)


# ----------------------------------------------------------------------------------------------
# Errors.

def test_unknown_model_name():
  with pytest.raises(ConfigError, match="resnet999") as err:
    models.get_model(model_config("resnet999"), 10)
  for name in models.MODEL_NAMES:
    assert name in str(err.value)


@pytest.mark.parametrize("field, value", [("bn_placement", "middle"), ("dropout", "gaussian"),
                                          ("bn_convention", "keras"), ("activation", "swish2"),
                                          ("dropout_rate", 1.0)])
def test_bad_shared_option(field, value):
  with pytest.raises(ConfigError, match=field) as err:
    models.get_model(model_config("lenet5", **{field: value}), 10)
  assert repr(value) in str(err.value)


@pytest.mark.parametrize("name, field, value", [("vgg_cnn", "head", "avg"),
                                                ("vgg_cnn", "stages", ((32, 0),)),
                                                ("mlp", "hidden", (0,)),
                                                ("lenet5", "pool", "median")])
def test_bad_model_specific_option(name, field, value):
  model = models.get_model(model_config(name, **{field: value}), 10)
  with pytest.raises(ConfigError, match=field):
    abstract_run(model, (8, 8, 1))


# ----------------------------------------------------------------------------------------------
# The model zoo: parameter counts against published ones.

def _count(name, shape=(224, 224, 3), num_classes=1000, **fields):
  model = models.get_model(ml_collections.ConfigDict(dict(name=name, **fields)), num_classes)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return num_params(jax.eval_shape(lambda x: model.init({"params": KEY}, x, train=False),
                                   x)["params"])


TORCHVISION = {  # torchvision.models' documented parameter counts (1000 classes, 224x224).
    "resnet18": (11_689_512, dict(bn_placement="before_act")),
    "resnet34": (21_797_672, dict(bn_placement="before_act")),
    "resnet50": (25_557_032, dict(bn_placement="before_act")),
    "vgg11": (132_863_336, {}),
    "vgg13": (133_047_848, {}),
    "vgg16": (138_357_544, {}),
    "vgg19": (143_667_240, {}),
    "vgg11_bn": (132_868_840, dict(bn_placement="before_act", conv_bias=True)),
    "vgg16_bn": (138_365_992, dict(bn_placement="before_act", conv_bias=True)),
    "vgg19_bn": (143_678_248, dict(bn_placement="before_act", conv_bias=True)),
    "alexnet": (61_100_840, {}),
    "googlenet": (6_624_904, dict(bn_placement="before_act", c5_kernel=3,
                                  aux_classifiers=False)),
}


@pytest.mark.parametrize("torchvision_name", sorted(TORCHVISION))
def test_parameter_counts_match_torchvision(torchvision_name):
  expected, fields = TORCHVISION[torchvision_name]
  name = torchvision_name.removesuffix("_bn")
  assert _count(name, **fields) == expected


def test_cifar_resnet_parameter_counts():
  # He 2016a, Table 6: ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M. ResNet-20 by
  # hand: stem 432 + 32 (BN); stage 1: 6 convs 16->16 = 6 * 2304 + 6 * 32; stage 2: 4608 +
  # 5 * 9216 + 6 * 64; stage 3: 18432 + 5 * 36864 + 6 * 128; head 64 * 10 + 10 = 269,722.
  published = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}
  assert _count("resnet20", (32, 32, 3), 10, bn_placement="before_act") == 269_722
  for depth, count in published.items():
    got = _count(f"resnet{depth}", (32, 32, 3), 10, bn_placement="before_act")
    assert abs(got - count) / count < 0.02, (depth, got)


def test_googlenet_aux_heads_only_in_training():
  config = model_config("googlenet", bn_placement="before_act")
  model = models.get_model(config, 10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({"params": KEY}, x, train=False), x)
  assert {"aux1", "aux2"} <= set(variables["params"])
  _, state = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, rngs=RNGS, mutable=["batch_stats", "aux_logits"]), variables, x)
  aux = state["aux_logits"]
  assert set(aux) == {"after_4a", "after_4d"} and aux["after_4a"][0].shape == (2, 10)
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["aux_logits"]),
                            variables, x)
  assert not state.get("aux_logits")
  no_aux = models.get_model(model_config("googlenet", aux_classifiers=False), 10)
  assert "aux1" not in jax.eval_shape(lambda x: no_aux.init({"params": KEY}, x, train=False),
                                      x)["params"]


def test_resnets_reject_after_act():
  model = models.get_model(model_config("resnet20", bn_placement="after_act"), 10)
  with pytest.raises(ConfigError, match="after_act"):
    abstract_run(model, (8, 8, 1))


def test_imagenet_stems_follow_the_input_size():
  def first_kernel(name, shape, **fields):
    model = models.get_model(model_config(name, **fields), 10)
    params = abstract_run(model, shape, batch=1)[0]["params"]
    first = params.get("stem_conv") or params["conv1"]["conv"]
    return first["kernel"].shape[:2]
  assert first_kernel("resnet18", (224, 224, 3), bn_placement="before_act") == (7, 7)
  assert first_kernel("resnet18", (32, 32, 3), bn_placement="before_act") == (3, 3)
  assert first_kernel("resnet18", (32, 32, 3), bn_placement="before_act",
                      stem="imagenet") == (7, 7)
  assert first_kernel("alexnet", (224, 224, 3)) == (11, 11)
  assert first_kernel("alexnet", (28, 28, 1)) == (3, 3)


# ----------------------------------------------------------------------------------------------
# Fully convolutional LeNet-5 (seed 001: a conv with kernel = input size is a dense layer).

def _as_fcn_params(params):
  """lenet5's params in lenet5_fcn's layout: F6/output Dense kernels [C, F] -> [1, 1, C, F]."""
  fcn = dict(params)
  fcn["F6"] = {"conv": {"kernel": params["F6"]["dense"]["kernel"][None, None],
                        "bias": params["F6"]["dense"]["bias"]}}
  fcn["output"] = {"kernel": params["output"]["kernel"][None, None],
                   "bias": params["output"]["bias"]}
  return fcn


def test_lenet5_fcn_equals_lenet5_and_slides_over_larger_images():
  dense = models.get_model(model_config("lenet5"), 10)
  fcn = models.get_model(model_config("lenet5_fcn"), 10)
  x = np.random.default_rng(0).standard_normal((2, 40, 40, 1)).astype(np.float32)
  variables = init_np(dense, x[:, :32, :32], train=False)
  fcn_variables = {"params": _as_fcn_params(variables["params"])}
  assert num_params(variables) == num_params(fcn_variables)
  # 32x32: the same function.
  np.testing.assert_allclose(eval_apply(fcn, fcn_variables, x[:, :32, :32]),
                             eval_apply(dense, variables, x[:, :32, :32]), rtol=1e-4, atol=1e-4)
  # 40x40: C5's map is 3x3 (stride 4); the FCN's logits are the mean of LeNet-5 on the nine
  # 32x32 windows at offsets 0, 4, 8.
  windows = [eval_apply(dense, variables, x[:, i:i + 32, j:j + 32])
             for i in (0, 4, 8) for j in (0, 4, 8)]
  np.testing.assert_allclose(eval_apply(fcn, fcn_variables, x), np.mean(windows, axis=0),
                             rtol=1e-4, atol=1e-4)
