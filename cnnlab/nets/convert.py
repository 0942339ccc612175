"""torchvision weights -> cnnlab variables, for resnet18/34/50, vgg11-19 (with and without BN),
alexnet and googlenet.

    config.model.update(torchvision_model_config("resnet50"))
    variables = from_torchvision("resnet50", read_state_dict("resnet50.pth"))
    model = cnnlab.nets.models.get_model(config.model, num_classes=1000)
    logits = model.apply(variables, images_nhwc, train=False)

What changes on the way: conv kernels OIHW -> HWIO, dense kernels [out, in] -> [in, out], and the
rows of the first dense layer after a spatial map (AlexNet's and VGG's classifier, GoogLeNet's
auxiliary heads) are reordered, because PyTorch flattens [C, H, W] and cnnlab [H, W, C]. BN
`weight`/`bias`/`running_mean`/`running_var` become `scale`/`bias` (params) and `mean`/`var`
(batch_stats); `num_batches_tracked` is dropped. The cnnlab config from `torchvision_model_config`
reproduces the layout (pools, paddings, BN epsilon) so eval-mode logits agree to float32
rounding. Files are read safely (safetensors, or `torch.load(weights_only=True)`); torch is only
imported to read .pt/.pth/.bin files.

googlenet: torchvision's pretrained weights expect `transform_input=True`, which turns an
ImageNet-normalised image into one normalised with mean = std = 0.5; cnnlab's GoogLeNet does not
do this inside the model, so feed it `googlenet_transform_input(x)` (or normalise that way).
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnlab.base.errors import CheckpointError, ConfigError
from cnnlab.nets.models import alexnet, get_model, inception, vgg

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
VGG_ARCHS = tuple(f"vgg{d}{bn}" for d in sorted(vgg.VGG_STAGES) for bn in ("", "_bn"))
TORCHVISION_ARCHS = (*RESNET_ARCHS, *VGG_ARCHS, "alexnet", "googlenet")
STATE_DICT_FORMATS = (".safetensors", ".pt", ".pth", ".bin")
TORCH_BN_EPSILON = 1e-5
RANDOM_PERIOD = 65_521  # The largest prime below 2**16; see random_state_dict.

# torchvision's `transform_input` for googlenet: per-channel (scale, shift) on NHWC input.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# A rule maps a torch module name (re.fullmatch) to (cnnlab module path, the side of the square
# map a dense layer's input was flattened from, or None).
Rule = tuple[str, Callable[[re.Match], tuple[tuple[str, ...], int | None]]]


def _check_arch(arch: str) -> None:
  if arch not in TORCHVISION_ARCHS:
    raise ConfigError(f"torchvision arch={arch!r} is not supported; choose one of: "
                      f"{', '.join(TORCHVISION_ARCHS)}.")


def torchvision_model_config(arch: str, aux_classifiers: bool = False) -> dict:
  """`config.model` overrides under which cnnlab's model is torchvision's `arch` (eval mode).

  `aux_classifiers` (googlenet only) keeps GoogLeNet's auxiliary heads (torchvision's
  `aux_logits=True`; its pretrained file holds untrained ones).

  Dropout acts in training only (eval-mode logits do not depend on it), and these overrides set
  none: VGG's and AlexNet's classifier dropout (torchvision: 0.5) is what `model.dropout` and
  `model.dropout_rate` give every block (none by default); googlenet keeps cnnlab's fixed dropout
  0.4 before its last Dense layer (the paper's; torchvision: 0.2), and 0.7 in the auxiliary
  heads, whatever the config says, so a converted googlenet fine-tunes with dropout 0.4.
  """
  _check_arch(arch)
  if arch in RESNET_ARCHS:
    return dict(name=arch, bn_placement="before_act", unit="original", stem="imagenet",
                activation="relu", bn_epsilon=TORCH_BN_EPSILON)
  if arch in VGG_ARCHS:
    with_bn = arch.endswith("_bn")
    return dict(name=arch.removesuffix("_bn"), bn_placement="before_act" if with_bn else "none",
                conv_bias=True, pool="max", activation="relu", bn_epsilon=TORCH_BN_EPSILON)
  if arch == "alexnet":
    return dict(name="alexnet", bn_placement="none", stem="imagenet", pool="max",
                activation="relu")
  return dict(name="googlenet", bn_placement="before_act", stem="imagenet", c5_kernel=3,
              pool4_window=2, aux_classifiers=bool(aux_classifiers), activation="relu",
              bn_epsilon=inception.BN_EPSILON)


def googlenet_transform_input(x: jax.Array) -> jax.Array:
  """torchvision googlenet's `transform_input`, NHWC: an ImageNet-normalised x [N,H,W,3] ->
  the same image normalised with mean = std = 0.5 (what its pretrained weights expect)."""
  scale = jnp.asarray(_IMAGENET_STD) / 0.5
  shift = (jnp.asarray(_IMAGENET_MEAN) - 0.5) / 0.5
  return x * scale.astype(x.dtype) + shift.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Reading files.

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state_dict file -> {key: numpy array}, read without running arbitrary pickled code.

  `.safetensors` through safetensors' numpy API; `.pt`/`.pth`/`.bin` through
  `torch.load(weights_only=True)` (needs torch), either a flat {key: tensor} mapping or one under
  a "state_dict" key. Raises CheckpointError for a missing or unreadable file or one holding
  anything but tensors, ConfigError for another format.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in STATE_DICT_FORMATS:
    raise ConfigError(f"state_dict file {path!r} has an unknown format; allowed: "
                      f"{', '.join(STATE_DICT_FORMATS)}.")
  if not os.path.isfile(path):
    raise CheckpointError(f"state_dict file {path!r} does not exist.")
  if suffix == ".safetensors":
    return _read_safetensors(path)
  return _read_torch(path)


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _require(module: str, path: str, what: str):
  """The optional `module`, or ConfigError saying that reading `path` needs `what`."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ConfigError(f"reading {path!r} needs {what}.") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  safetensors_numpy = _require("safetensors.numpy", path,
                               "the safetensors package (pip install safetensors)")
  try:
    return dict(safetensors_numpy.load_file(path))
  except Exception as e:  # safetensors raises its own error types and OSError.
    raise CheckpointError(f"{path!r} is not a readable safetensors file: {_first_line(e)}") from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
  torch = _require("torch", path, "torch (pip install torch), or save the weights as .safetensors")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
    raise CheckpointError(f"{path!r} is not a plain weights file: torch.load(weights_only=True) "
                          f"refused it ({detail[1] if detail else _first_line(e)}); load it "
                          "with weights_only=False only if you trust its source.") from e
  except Exception as e:  # A corrupt or truncated file: RuntimeError, KeyError, EOFError...
    raise CheckpointError(f"{path!r} is not a readable torch file ({type(e).__name__}: "
                          f"{_first_line(e)}).") from e
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise CheckpointError(f"{path!r} holds a {type(loaded).__name__}, not a state_dict "
                          "(a mapping of names to tensors).")
  result = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path!r}: entry {key!r} is a {type(value).__name__}, not a tensor.")
    value = value.detach().cpu()
    result[key] = (value.float() if value.is_floating_point() else value).numpy()
  return result


def random_state_dict(shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
  """Deterministic stand-in weights for a torchvision state_dict's {key: shape}, from numpy only
  (so tests need no torch): key i draws from default_rng((seed, i)). Conv/dense weights are
  He-scaled normals, biases and running means 0.1 x normal, BN weights and running variances
  uniform in [0.5, 1.5]; `num_batches_tracked` is 0. A tensor larger than RANDOM_PERIOD elements
  repeats its first RANDOM_PERIOD draws (a prime, so the repeats do not line up with rows or
  channels): VGG's 100M-element dense layers then cost a copy, not 100M draws."""
  result = {}
  for i, (key, shape) in enumerate(shapes.items()):
    rng, shape, leaf = np.random.default_rng((seed, i)), tuple(shape), key.rsplit(".", 1)[-1]
    size = int(np.prod(shape))
    draws = min(size, RANDOM_PERIOD)
    if leaf == "num_batches_tracked":
      result[key] = np.zeros(shape, np.int64)
      continue
    if leaf == "running_var" or (leaf == "weight" and len(shape) == 1):
      values = rng.uniform(0.5, 1.5, draws).astype(np.float32)
    elif leaf == "weight":
      values = rng.standard_normal(draws, np.float32) * np.float32(np.sqrt(2 * shape[0] / size))
    else:
      values = rng.standard_normal(draws, np.float32) * np.float32(0.1)
    result[key] = np.resize(values, shape)
  return result


# ----------------------------------------------------------------------------------------------
# Name mapping.

def _fixed(names: Mapping[str, tuple[tuple[str, ...], int | None]]) -> list[Rule]:
  return [(re.escape(torch_name), lambda m, target=target: target)
          for torch_name, target in names.items()]


def _resnet_rules() -> list[Rule]:
  unit = lambda m: f"stage{m[1]}_unit{int(m[2]) + 1}"
  return [("conv1", lambda m: (("stem_conv",), None)), ("bn1", lambda m: (("stem_bn",), None)),
          (r"layer(\d)\.(\d+)\.((?:conv|bn)\d)", lambda m: ((unit(m), m[3]), None)),
          (r"layer(\d)\.(\d+)\.downsample\.([01])",
           lambda m: ((unit(m), ("proj", "proj_bn")[int(m[3])]), None)),
          ("fc", lambda m: (("head",), None))]


def _vgg_rules(arch: str) -> list[Rule]:
  """torchvision's `features` is a flat Sequential: conv, (BN), ReLU per conv, a pool per stage."""
  with_bn, index, names = arch.endswith("_bn"), 0, {}
  for i, widths in enumerate(vgg.VGG_STAGES[int(arch.removesuffix("_bn")[3:])]):
    for j in range(len(widths)):
      names[f"features.{index}"] = ((f"stage{i}_conv{j}", "conv"), None)
      if with_bn:
        names[f"features.{index + 1}"] = ((f"stage{i}_conv{j}", "bn"), None)
      index += 3 if with_bn else 2
    index += 1
  names["classifier.0"] = (("fc0", "dense"), vgg.CLASSIFIER_POOL)
  names["classifier.3"] = (("fc1", "dense"), None)
  names["classifier.6"] = (("head",), None)
  return _fixed(names)


def _alexnet_rules() -> list[Rule]:
  names = {f"features.{k}": ((f"conv{i}", "conv"), None)
           for i, k in enumerate((0, 3, 6, 8, 10), start=1)}
  names.update({"classifier.1": (("fc1", "dense"), alexnet.CLASSIFIER_POOL),
                "classifier.4": (("fc2", "dense"), None),
                "classifier.6": (("head",), None)})
  return _fixed(names)


_INCEPTION_BRANCHES = {"1": "b1_1x1", "2.0": "b3_reduce", "2.1": "b3_3x3", "3.0": "b5_reduce",
                       "3.1": "b5_5x5", "4.1": "pool_proj"}


def _googlenet_rules() -> list[Rule]:
  return [(r"conv([123])\.(conv|bn)", lambda m: ((f"conv{m[1]}", m[2]), None)),
          (r"inception(\d[a-e])\.branch(1|[234]\.[01])\.(conv|bn)",
           lambda m: ((f"inception{m[1]}", _INCEPTION_BRANCHES[m[2]], m[3]), None)),
          (r"aux([12])\.conv\.(conv|bn)", lambda m: ((f"aux{m[1]}", "conv", m[2]), None)),
          (r"aux([12])\.fc1", lambda m: ((f"aux{m[1]}", "fc", "dense"), inception.AUX_POOL)),
          (r"aux([12])\.fc2", lambda m: ((f"aux{m[1]}", "head"), None)),
          ("fc", lambda m: (("head",), None))]


def _rules(arch: str) -> list[Rule]:
  if arch in RESNET_ARCHS:
    return _resnet_rules()
  if arch in VGG_ARCHS:
    return _vgg_rules(arch)
  return _alexnet_rules() if arch == "alexnet" else _googlenet_rules()


# ----------------------------------------------------------------------------------------------
# Conversion.

def _convert_leaf(leaf: str, value: np.ndarray, flatten_hw: int | None):
  """(collection, cnnlab leaf name, converted array) of one torch tensor, or None if unknown."""
  value = np.asarray(value, np.float32)
  if leaf in ("running_mean", "running_var"):
    return "batch_stats", leaf.removeprefix("running_"), value
  if leaf == "bias":
    return "params", "bias", value
  if leaf != "weight":
    return None
  if value.ndim == 1:
    return "params", "scale", value
  if value.ndim == 4:
    return "params", "kernel", value.transpose(2, 3, 1, 0)     # OIHW -> HWIO
  if value.ndim == 2 and flatten_hw is not None and value.shape[1] % flatten_hw ** 2 == 0:
    out = value.shape[0]  # Rows flattened from [C, H, W] (torch) -> [H, W, C] (cnnlab).
    value = value.reshape(out, -1, flatten_hw, flatten_hw).transpose(2, 3, 1, 0)
    return "params", "kernel", value.reshape(-1, out)
  return ("params", "kernel", value.T) if value.ndim == 2 else None


@functools.cache
def _abstract_variables(arch: str, aux_classifiers: bool, num_classes: int):
  """{collection: {path: shape}} of cnnlab's model for `arch` (shapes only, nothing computed)."""
  config = ml_collections.ConfigDict(torchvision_model_config(arch, aux_classifiers))
  model = get_model(config, num_classes)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return {collection: {path: leaf.shape for path, leaf in _flatten(tree).items()}
          for collection, tree in abstract.items()}


def _flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  return {path: leaf for key, sub in tree.items() for path, leaf in _flatten(sub, (*prefix, key))
          .items()}


def _nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  """{path: numpy array} -> the nested dict of jax arrays Flax uses."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value)
  return tree


def _listing(names: Sequence[str], limit: int = 3) -> str:
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def from_torchvision(arch: str, state_dict: Mapping[str, np.ndarray],
                     aux_classifiers: bool = False) -> dict:
  """torchvision `arch`'s state_dict -> {"params": ..., "batch_stats": ...} for cnnlab's model
  under `torchvision_model_config(arch, aux_classifiers)` (num_classes = the last layer's width).

  googlenet's `aux1.*`/`aux2.*` entries are ignored unless `aux_classifiers`. Raises
  CheckpointError naming the first few unknown, missing or wrongly shaped entries when the
  state_dict is not `arch`'s (e.g. resnet34's weights for resnet18).
  """
  _check_arch(arch)
  rules = [(re.compile(pattern), target) for pattern, target in _rules(arch)]
  converted: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
  source: dict[tuple[str, tuple[str, ...]], str] = {}
  unknown = []
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked" or (arch == "googlenet" and not aux_classifiers
                                         and re.match(r"aux[12]\.", key)):
      continue
    target = next((to(m) for pattern, to in rules if (m := pattern.fullmatch(module))), None)
    result = target and _convert_leaf(leaf, np.asarray(value), target[1])
    if not result:
      unknown.append(key)
      continue
    collection, name, array = result
    path = (*target[0], name)
    converted[collection][path] = array
    source[collection, path] = key
  head = converted["params"].get(("head", "kernel"))
  num_classes = head.shape[-1] if head is not None and head.ndim == 2 else 1000
  expected = _abstract_variables(arch, aux_classifiers, num_classes)
  missing, wrong = [], []
  for collection in ("params", "batch_stats"):
    want, have = expected.get(collection, {}), converted[collection]
    missing += ["/".join(p) for p in want if p not in have]
    unknown += [source[collection, p] for p in have if p not in want]
    wrong += [f"{source[collection, p]} {tuple(v.shape)} (cnnlab {'/'.join(p)} wants "
              f"{tuple(want[p])})" for p, v in have.items() if p in want and v.shape != want[p]]
  problems = [f"{what}: {_listing(names)}" for what, names in
              (("unexpected entries", unknown), ("cnnlab variables with no entry", missing),
               ("wrong shapes", wrong)) if names]
  if problems:
    raise CheckpointError(f"this state_dict is not torchvision's {arch}: {'; '.join(problems)}.")
  return {collection: _nest(flat) for collection, flat in converted.items() if flat}
