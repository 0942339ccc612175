"""ImageNet recipe: ResNet-50, the standard 90-epoch schedule (Goyal et al. 2017, He et al. 2019).

    python launch.py --config=experiments/imagenet.py --config.dataset.data_dir=/data/tfds

ImageNet from TFDS, prepared in array_record format in data_dir (`tfds build imagenet2012
--file_format=array_record --data_dir=/data/tfds --manual_dir=...`), streamed (decoded and
augmented in worker processes). The recipe:

    model         resnet50 (BN, He initialisation)
    optimizer     SGD, momentum 0.9, learning rate 0.1 x batch_size / 256 (follows an overridden
                  batch size), linear warm-up over 5 epochs, then cosine to 0
                  (`--config.optimizer.schedule=step`: x0.1 at epochs 30, 60 and 80)
    weight decay  1e-4 on kernels only (not on BN scales/offsets or biases)
    loss          cross-entropy with label smoothing 0.1
    data          random-resized crop to 224 (scale 0.08-1, ratio 3/4-4/3) and flips; eval:
                  shorter side to 256, center crop 224; ImageNet's mean/std
    batch         256, 90 epochs

Variants:

    experiments/imagenet.py:imagenette   the 10-class Imagenette (`tfds build imagenette
                                         --file_format=array_record`)
    experiments/imagenet.py:folder       any folder root/<class>/*.jpg (or root/train, root/val):
                                         --config.dataset.folder=/data/my_images
    experiments/imagenet.py:smoke        the folder variant shrunk to seconds (ResNet-18 at 32 px,
                                         1 epoch, batch 16) for a quick check of a folder
"""

from cnnlab.configs import base_config

VARIANTS = ("imagenet", "imagenette", "folder", "smoke")


def get_config(arg: str | None = None):
  variant = arg or "imagenet"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/imagenet.py:{variant} is not a variant; choose one of: "
                     f"{', '.join(VARIANTS)}.")
  config = base_config()
  config.name = variant if variant != "imagenet" else "imagenet"
  config.dataset.name = "tfds"
  config.dataset.tfds_name = "imagenette" if variant == "imagenette" else "imagenet2012"
  config.dataset.augment = "imagenet"
  config.dataset.image_size = 224
  config.dataset.normalization = "imagenet"
  config.model.name = "resnet50"
  config.label_smoothing = 0.1
  opt = config.optimizer
  opt.name = "sgd"
  opt.momentum = 0.9
  opt.weight_decay = 1e-4
  opt.schedule = "cosine"
  opt.warmup_epochs = 5.0
  opt.step_boundaries = (30 / 90, 60 / 90, 80 / 90)
  opt.step_factor = 0.1
  config.batch_size = 256
  # Linear scaling (Goyal et al.): 0.1 per 256 examples, also for a batch size set on the
  # command line.
  opt.learning_rate = config.get_ref("batch_size").to_float() * (0.1 / 256)
  config.eval_batch_size = 250
  config.num_epochs = 90
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  if variant in ("folder", "smoke"):
    config.dataset.name = "folder"
    config.dataset.tfds_name = None
  if variant == "smoke":
    config.model.name = "resnet18"
    config.dataset.image_size = 32
    config.batch_size = 16
    config.eval_batch_size = 50
    config.num_epochs = 1
    config.optimizer.warmup_epochs = 0.5
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
  return config
