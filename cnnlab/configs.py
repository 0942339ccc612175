"""The base config every experiment file starts from: all fields a run reads, documented.

Experiment files under `experiments/` call `base_config()` and change what their study needs;
fields that default to None are declared with `config_dict.placeholder(type)` so that
`--config.a.b=value` can still set them. Each section comes from the package that owns it: the
model's fields from the model registry, `init` from training, `sweep` from study.

A study's own models and datasets live in modules it names: `base_config(imports=(...))`
imports them first (so their models' fields exist), and records them in `config.imports`, which
every other process that reads the config imports too.
"""

from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from cnnlab.base import plugins
from cnnlab.nets import models
from cnnlab.study.settings import sweep_defaults
from cnnlab.training import optim
from cnnlab.training.init_settings import init_defaults


def base_config(imports: Sequence[str] = ()) -> config_dict.ConfigDict:
  """Every field a run reads, with the values of the default experiment (LeNet-5 on mnist5k).

  `imports`: module names or .py paths (relative to the current directory) to import first,
  e.g. ("my_models.py",): the models and datasets they register become names a config may use,
  their models' fields part of `config.model`. ConfigError, one line, for one that fails."""
  plugins.import_modules(imports)
  config = config_dict.ConfigDict()
  config.name = "default"
  # The user's modules every process imports before it builds or reads this config (.py paths
  # made absolute).
  config.imports = plugins.resolved(imports)
  config.seed = 0
  # Floating-point dtype of activations ("float32" or "bfloat16"); parameters stay float32.
  config.dtype = "float32"
  # Deterministic GPU kernels (XLA --xla_gpu_deterministic_ops): bit-identical reruns on GPU
  # at some speed cost. The CPU is deterministic either way.
  config.deterministic = True
  # float32 matmul/conv precision: highest (true float32, as on CPU) | default (TF32 on GPUs).
  config.matmul_precision = "highest"
  # XLA:CPU's convolutions by the YNNPACK library (XLA's default). False runs XLA's own kernels:
  # 1.05-1.36x faster train steps on the 2-core AVX-512 machine cnnlab is built on (README,
  # "Speed against PyTorch"). Changes low bits on CPU; no effect on GPUs.
  config.xla_cpu_ynn_convolutions = False
  # LLVM's preferred vector width (bits) for the code XLA:CPU generates: 128 | 256 (XLA's
  # default) | 512 (fills AVX-512 registers; the ablation net's train step 1.1x faster on the
  # machine cnnlab is built on). Recorded with the other XLA flags; no effect on GPUs.
  config.xla_cpu_vector_width = 512

  config.dataset = config_dict.ConfigDict()
  config.dataset.name = "mnist5k"
  # Where TFDS keeps prepared datasets; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.dataset.data_dir = config_dict.placeholder(str)
  # Directory with the official raw files, for preparing mnist/cifar10/... on offline machines.
  config.dataset.manual_dir = config_dict.placeholder(str)
  # Training augmentation, seeded per (seed, epoch, example): "none"; "cifar" (random flips and
  # 4-pixel zero-padded crops); "imagenet" (random-resized crop to image_size and flips; eval
  # images: shorter side resized to image_size / 0.875, center crop). None: "imagenet" for the
  # folder and tfds datasets, else "none".
  config.dataset.augment = config_dict.placeholder(str)
  # Side of the square images fed to the net (streamed: each image is resized and cropped to
  # it). None: as stored; 224 for the folder and tfds datasets, whose images differ in size.
  config.dataset.image_size = config_dict.placeholder(int)
  # Per-channel normalisation: "data" (mean/std of the train split, or of 2,048 sampled train
  # images when streamed) | "imagenet" (ImageNet's mean/std, for RGB images).
  config.dataset.normalization = "data"
  # dataset.name="folder": a folder of images, root/<class>/*.jpg|png (then a seeded
  # class-stratified `test_fraction` of each class, drawn with `split_seed`, is the test split)
  # or root/train/<class>/... and root/val/<class>/...; read in place, class names from folders.
  config.dataset.folder = config_dict.placeholder(str)
  config.dataset.test_fraction = 0.2
  config.dataset.split_seed = 0
  # dataset.name="tfds": any TFDS dataset prepared in array_record format in data_dir
  # (`tfds build NAME --file_format=array_record`), e.g. "imagenette"; read without TensorFlow.
  config.dataset.tfds_name = config_dict.placeholder(str)
  # Streamed datasets decode and augment in this many worker processes (None: the cores less
  # one, at most 8; 0: in the training process). A dataset stored as arrays is read into memory
  # when it takes at most in_memory_limit_mb, else streamed too.
  config.dataset.workers = config_dict.placeholder(int)
  config.dataset.in_memory_limit_mb = 1024
  # Images resized to (H, W) (area-weighted, antialiased) before anything else; None = as stored.
  config.dataset.resize = config_dict.placeholder(tuple)
  # A class-stratified subset of the train split: this many examples per class, drawn with
  # `subset_seed` (None = the whole split). With `subset_repeat` an epoch repeats the subset up
  # to the whole split's length, so `num_epochs` means the same number of steps for every size.
  config.dataset.train_per_class = config_dict.placeholder(int)
  config.dataset.subset_seed = 0
  config.dataset.subset_repeat = True
  # Share of each class of the train split held out for validation (0 = none). With one,
  # learning curves, steps-to-target and any selection use it, and the test split is evaluated
  # once, at the end. Drawn with validation_seed, the same for every run seed.
  config.dataset.validation_fraction = 0.0
  config.dataset.validation_seed = 0

  # config.model.name: a registered model (cnnlab.nets.models: linear, mlp, lenet5, lenet5_fcn,
  # alexnet, vgg_cnn, vgg11/13/16/19, resnet20/32/44/56/110 (CIFAR), resnet18/34/50 (ImageNet),
  # nin, googlenet, and those of the modules in `imports`); the options every block shares; and
  # each registered model's own fields, with their defaults (cnnlab.nets.models.registry).
  config.model = models.field_defaults()

  # The optimizer (cnnlab.training.optim: sgd | adam | adamw | rmsprop | a registered one), its
  # learning-rate schedule (constant | cosine | step, after a linear warm-up) and weight decay.
  config.optimizer = optim.field_defaults()

  # Label smoothing of the training loss (0: none; ImageNet recipes use 0.1). Evaluation loss is
  # the plain cross-entropy.
  config.label_smoothing = 0.0
  # Evaluate the test split at the end (False: a tuning trial, judged on validation only,
  # never reads it).
  config.evaluate_test = True
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 12
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.checkpoints_to_keep = 2
  config.init = init_defaults()
  return config


SWEEP_VARIANTS = ("full", "quick", "cifar10")


def sweep_base(name: str, variant: str = "full",
               imports: Sequence[str] = ()) -> config_dict.ConfigDict:
  """The shared setting of cnnlab's sweep experiments (ablation, dropout_rates, bn_placement):
  a three-stage VGG-style CNN on mnist5k and an empty `config.sweep` for the study to fill.

  Variants: `full`; `quick` (8x8 digits, a smaller net, 2 epochs: a smoke test of ~1 minute);
  `cifar10` (needs CIFAR-10 prepared; a wider net, augmentation, 30 epochs). `imports`: as for
  `base_config`.
  """
  if variant not in SWEEP_VARIANTS:
    raise ValueError(f"experiments/{name}.py:{variant} is not a variant; choose one of: "
                     f"{', '.join(SWEEP_VARIANTS)}.")
  config = base_config(imports)
  config.name = name if variant == "full" else f"{name}_{variant}"
  config.dataset.validation_fraction = 0.1
  config.model.name = "vgg_cnn"
  config.model.stages = ((16,), (32,), (64,))
  config.model.head = "gap"
  config.optimizer.learning_rate = 0.05
  config.optimizer.warmup_epochs = 0.5
  config.batch_size = 64
  config.num_epochs = 4
  config.log_every_steps = 25
  # Only the last step: a run takes ~2 s, so a kill -9 loses at most that, and 45 runs save 90
  # checkpoints fewer (SIGTERM/SIGINT still save where they stop).
  config.checkpoint_every_steps = 250

  config.sweep = sweep_defaults()
  config.sweep.seeds = (0, 1, 2)
  # One single-threaded process per core: XLA:CPU spreads these small nets' ops over 2 threads at
  # ~73% efficiency (main job 142 s in one process, 118 s in two here).
  config.sweep.workers = config_dict.placeholder(int)  # None, still overridable by an int.
  config.sweep.target_accuracy = 0.95

  if variant == "quick":
    config.dataset.name = "digits"
    config.model.stages = ((8,), (16,))
    config.batch_size = 32
    config.num_epochs = 2
    config.log_every_steps = 10
    config.checkpoint_every_steps = 20
    config.sweep.target_accuracy = 0.5
    config.sweep.workers = 1  # A smoke test: starting worker processes costs more than it saves.
  elif variant == "cifar10":
    config.dataset.name = "cifar10"
    config.dataset.augment = "cifar"
    config.model.stages = ((64, 64), (128, 128), (256, 256))
    config.batch_size = 128
    config.num_epochs = 30
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.sweep.target_accuracy = 0.8
  return config


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` ready for a process that did not build it (or got `imports` as an override): its
  `imports` imported, and the fields of models registered since it was built added to
  `config.model` with their defaults. Returns `config`."""
  plugins.import_modules(tuple(config.get("imports", ())))
  for section, defaults in (("model", models.field_defaults()),
                            ("optimizer", optim.field_defaults())):
    missing = {k: v for k, v in defaults.items() if k not in config[section]}
    with config.unlocked():
      for field, default in missing.items():
        config[section][field] = default
  return config
