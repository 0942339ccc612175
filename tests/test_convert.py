"""Tests for cnnlab.nets.convert (torchvision weights -> cnnlab) and the torch layouts it relies on:
ceil-mode max pooling, BatchNorm epsilon, GoogLeNet's pools. No torch needed: torch is blocked
for the whole module, and torchvision's logits come from fixtures made by
scripts/make_torchvision_fixtures.py (numpy weights, torchvision's eval-mode logits).
"""

import glob
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnnlab.base.errors import CheckpointError, ConfigError
from cnnlab.inspection.summary import summarize_model
from cnnlab.nets import convert, layers, models

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "torchvision",
                                         "*.json")))
TOLERANCE = 1e-4   # max |cnnlab - torch| / max |torch|


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
  """Any `import torch` / `import torchvision` in this module's tests raises ImportError."""
  for name in ("torch", "torchvision"):
    monkeypatch.setitem(sys.modules, name, None)


def _load(name: str) -> dict:
  path = next(p for p in FIXTURES if os.path.basename(p) == f"{name}.json")
  with open(path) as f:
    return json.load(f)


def _model(arch: str, num_classes: int, **overrides):
  config = ml_collections.ConfigDict({**convert.torchvision_model_config(arch), **overrides})
  return models.get_model(config, num_classes)


def test_fixtures_cover_every_arch_at_64():
  names = {os.path.basename(p) for p in FIXTURES}
  assert {f"{arch}_64.json" for arch in convert.TORCHVISION_ARCHS} <= names
  assert sum(os.path.getsize(p) for p in FIXTURES) < 1_000_000


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: os.path.basename(p)[:-5])
def test_logits_match_torchvision(path):
  with open(path) as f:
    fixture = json.load(f)
  state_dict = convert.random_state_dict(fixture["manifest"], fixture["seed"])
  variables = convert.from_torchvision(fixture["arch"], state_dict)
  expected = np.asarray(fixture["logits"], np.float32)
  model = _model(fixture["arch"], expected.shape[1])
  x = np.random.default_rng(fixture["seed"]).standard_normal(fixture["input_shape"], np.float32)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  error = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
  assert error <= TOLERANCE, f"{fixture['arch']} at {fixture['size']}: relative error {error:.2e}"


def test_ceil_mode_pool_15x15_gives_torchs_7x7():
  # x[i, j] = 15 i + j grows along both axes, so each window's max is its bottom-right element.
  # Windows of 3 at stride 2 start at 0, 2, ..., 12 (torch: ceil((15 - 3) / 2) + 1 = 7) and end
  # at 2, 4, ..., 14, so out[i, j] = 15 (2i + 2) + 2j + 2. 'SAME' would give ceil(15/2) = 8.
  x = jnp.arange(15 * 15, dtype=jnp.float32).reshape(1, 15, 15, 1)
  out = layers.Pool("max", 3, 2, "VALID", ceil_mode=True).apply({}, x)[0, :, :, 0]
  i, j = np.meshgrid(np.arange(7), np.arange(7), indexing="ij")
  np.testing.assert_array_equal(out, 15 * (2 * i + 2) + 2 * j + 2)
  assert layers.Pool("max", 3, 2, "SAME").apply({}, x).shape == (1, 8, 8, 1)


def test_ceil_mode_pool_keeps_the_partial_last_window():
  # 16 wide, window 3, stride 2: torch gives ceil(13 / 2) + 1 = 8 windows; the last starts at 14
  # and sees only 14, 15 (the rest is -inf padding). Floor mode gives 7. Values: -|k - 9| peaks
  # at 9 -> windows [0..2] -7, [2..4] -5, [4..6] -3, [6..8] -1, [8..10] 0, [10..12] -1,
  # [12..14] -3, [14..15] -5.
  x = -jnp.abs(jnp.arange(16, dtype=jnp.float32) - 9).reshape(1, 16, 1)
  out = layers.Pool("max", 3, 2, ceil_mode=True).apply({}, x)[0, :, 0]
  np.testing.assert_array_equal(out, [-7, -5, -3, -1, 0, -1, -3, -5])
  assert layers.Pool("max", 3, 2).apply({}, x).shape == (1, 7, 1)
  with pytest.raises(ConfigError, match="max pools only"):
    layers.Pool("avg", 3, 2, ceil_mode=True).apply({}, x)


def test_googlenet_pools_follow_torch_at_odd_sizes():
  # torchvision at 72x72: conv1 /2 -> 36; 3/2 ceil pools: 36 -> 18 -> 9 -> 4; its 2/2 pool -> 2.
  # (With 'SAME' pools 9 would become 5, then 3.)
  summary = summarize_model(_model("googlenet", 10), (72, 72, 3))
  sizes = {row.name: row.output_shape[:2] for row in summary.rows if row.name.startswith("pool")}
  assert sizes == {"pool1": (18, 18), "pool2": (9, 9), "pool3": (4, 4), "pool4": (2, 2)}


def test_bn_epsilon_option_and_googlenet_default():
  # Eval BN: (x - mean) * scale / sqrt(var + eps) + bias; var = 0.75, x = 1 -> 1/sqrt(0.75 + eps).
  variables = {"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
               "batch_stats": {"mean": jnp.zeros(1), "var": jnp.full(1, 0.75)}}
  x = jnp.ones((1, 1))
  for eps, expected in ((0.25, 1.0), (None, 1 / np.sqrt(0.75 + 1e-5))):
    bn = layers.BlockOptions(bn_epsilon=eps).norm()
    np.testing.assert_allclose(bn.apply(variables, x, train=False), [[expected]], rtol=1e-6)
  with pytest.raises(ConfigError, match="bn_epsilon=0"):
    layers.BlockOptions(bn_epsilon=0).check("model.")
  epsilons = set()

  def record(call, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm):
      epsilons.add(context.module.epsilon)
    return call(*args, **kwargs)
  model = models.get_model(ml_collections.ConfigDict(dict(name="googlenet",
                                                          bn_placement="before_act")), 10)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert epsilons == {1e-3}


def test_the_dropout_a_converted_net_trains_with_is_the_one_documented():
  """The docstring said googlenet's dropout 'is left out'; the converted net trains with 0.4."""
  doc = " ".join(convert.torchvision_model_config.__doc__.split())
  assert "googlenet keeps cnnlab's fixed dropout 0.4 before its last Dense layer" in doc
  assert "VGG's and AlexNet's classifier dropout (torchvision: 0.5) is what `model.dropout`" in doc
  active = {}

  def record(call, args, kwargs, context):
    module = context.module
    if isinstance(module, layers.Dropout) and module.kind != "none" and module.rate > 0:
      active[module.name] = (module.kind, module.rate)
    return call(*args, **kwargs)
  for arch in ("googlenet", "vgg11", "alexnet"):
    model = models.get_model(ml_collections.ConfigDict(convert.torchvision_model_config(arch)), 10)
    active.clear()
    with nn.intercept_methods(record):  # Shapes only: nothing is computed.
      jax.eval_shape(lambda x, model=model: model.init_with_output(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=True,
          mutable=True), jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert active == ({"dropout": ("standard", 0.4)} if arch == "googlenet" else {}), arch


def test_another_architectures_state_dict_is_named():
  resnet34 = _load("resnet34_64")["manifest"]
  with pytest.raises(CheckpointError, match=r"not torchvision's resnet18: unexpected entries: "
                     r"layer1\.2\.conv1\.weight"):
    convert.from_torchvision("resnet18", convert.random_state_dict(resnet34, 0))
  vgg11 = dict(_load("vgg11_64")["manifest"])
  vgg11["classifier.0.weight"] = [4096, 512]
  with pytest.raises(CheckpointError, match=r"wrong shapes: classifier\.0\.weight \(512, 4096\)"):
    convert.from_torchvision("vgg11", convert.random_state_dict(vgg11, 0))
  del vgg11["features.0.bias"]
  with pytest.raises(CheckpointError, match="no entry: stage0_conv0/conv/bias"):
    convert.from_torchvision("vgg11", convert.random_state_dict(vgg11, 0))
  with pytest.raises(ConfigError, match="arch='resnet101' is not supported"):
    convert.torchvision_model_config("resnet101")


def test_googlenet_aux_heads_convert_on_request():
  manifest = dict(_load("googlenet_64")["manifest"])
  manifest.update({f"aux{k}.{name}": shape for k in (1, 2) for name, shape in (
      ("conv.conv.weight", [128, 512 if k == 1 else 528, 1, 1]), ("conv.bn.weight", [128]),
      ("conv.bn.bias", [128]), ("conv.bn.running_mean", [128]), ("conv.bn.running_var", [128]),
      ("fc1.weight", [1024, 2048]), ("fc1.bias", [1024]), ("fc2.weight", [10, 1024]),
      ("fc2.bias", [10]))})
  state_dict = convert.random_state_dict(manifest, 0)
  assert "aux1" not in convert.from_torchvision("googlenet", state_dict)["params"]
  params = convert.from_torchvision("googlenet", state_dict, aux_classifiers=True)["params"]
  # fc1's input rows: torch [C=128, 4, 4] -> cnnlab [4, 4, 128]; torch row c*16 + h*4 + w.
  torch_fc1 = state_dict["aux1.fc1.weight"]
  np.testing.assert_array_equal(params["aux1"]["fc"]["dense"]["kernel"][(2 * 4 + 3) * 128 + 5],
                                torch_fc1[:, 5 * 16 + 2 * 4 + 3])


def test_read_state_dict(tmp_path):
  from safetensors.numpy import save_file
  weights = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
  save_file(weights, str(tmp_path / "w.safetensors"))
  np.testing.assert_array_equal(convert.read_state_dict(tmp_path / "w.safetensors")["fc.weight"],
                                weights["fc.weight"])
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    convert.read_state_dict(tmp_path / "bad.safetensors")
  with pytest.raises(CheckpointError, match="does not exist"):
    convert.read_state_dict(tmp_path / "missing.pth")
  with pytest.raises(ConfigError, match="unknown format; allowed: .safetensors"):
    convert.read_state_dict(tmp_path / "w.pkl")
  (tmp_path / "w.pth").write_bytes(b"")
  with pytest.raises(ConfigError, match=r"needs torch \(pip install torch\)"):
    convert.read_state_dict(tmp_path / "w.pth")


def test_googlenet_transform_input_is_torchvisions():
  # torchvision: channel 0 -> x * 0.229 / 0.5 + (0.485 - 0.5) / 0.5, likewise 1 and 2.
  x = jnp.ones((1, 1, 1, 3))
  np.testing.assert_allclose(convert.googlenet_transform_input(x)[0, 0, 0],
                             [0.458 - 0.03, 0.448 - 0.088, 0.45 - 0.188], rtol=1e-6)
