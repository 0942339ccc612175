"""The input pipeline's speed: cnnlab's streaming pipeline against PyTorch's DataLoader on one JPEG
folder, whether a train step waits for its data, and peak memory against dataset size.

    python benchmarks/input_pipeline.py --repeats=3 --out=/tmp/input_pipeline.json

Sections (--sections; each prints its markdown table when done):
  pipeline  images/s of 224-px decode + random-resized-crop + flip + normalise in batches of
            --batch_size: cnnlab's StreamIterator over folders.FolderSource with
            transforms.train_transform("imagenet", 224), against torchvision's ImageFolder +
            RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize in a DataLoader
            (shuffle, the same workers, the same files: the folder's seeded 90% train split), per
            --workers. Every repeat starts a fresh iterator of each, takes --warmup_batches
            untimed (worker start-up included) and times --timed_batches; the two alternate
            first; median (min-max) of --repeats.
  read      ms per image in this process over the first --read_images files: reading the file's
            bytes (page cache warm) against decoding them and against decode + crop + flip; why
            the folder is read in place rather than copied into a record file first.
  step      ms per train step of the ablation's net (nets.py "main": vgg_cnn (16,),(32,),(64,),
            BN before the activation, batch --batch_size) fed one pre-made batch again and again,
            against the same step fed by an iterator, as the training loop feeds it: on
            --dataset (the ablation's data) in memory (TrainIterator) and streamed
            (StreamIterator over stream.ArraySource), and on a --small_size-px JPEG folder
            (--small_images files of 80-120 px, ImageNet-style augmentation) streamed; per
            --step_workers. --steps timed after 5 untimed, median of --repeats.
  rss       peak RSS of one epoch of StreamIterator (--rss_workers workers) over folders of
            each of --rss_images small JPEGs, each in a fresh process: getrusage's maxrss of
            that process (RUSAGE_SELF) and of its largest finished worker (RUSAGE_CHILDREN).
The synthetic folders (root/class_XX/*.jpg: smooth random colour fields plus grain, sides drawn
uniformly, quality --quality, seeded) are made once in --cache_dir; --folder replaces the
ImageNet-like one. torch is needed only for the torch variant (--torch=false: cnnlab's alone).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from image_folders import IMAGENET_MEAN, IMAGENET_STD, make_folder, open_folder, torch_loader
from nets import CnnlabRunner

from cnnlab import cli
from cnnlab import data as data_lib
from cnnlab.base import environment
from cnnlab.configs import base_config, sweep_base
from cnnlab.data import pipeline, stream, transforms

SECTIONS = ("pipeline", "read", "step", "rss")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), "Sections to run, in this order.")
_FOLDER = flags.DEFINE_string("folder", None, "A root/<class>/*.jpg folder for the pipeline and "
                              "read sections (default: a synthetic one in --cache_dir).")
_CACHE = flags.DEFINE_string("cache_dir", os.path.join(tempfile.gettempdir(),
                                                        "cnnlab_input_pipeline"),
                             "Where the synthetic folders and the folder indexes are kept.")
_CLASSES = flags.DEFINE_integer("classes", 10, "Classes of the synthetic folders.", lower_bound=1)
_IMAGES = flags.DEFINE_integer("images", 1000, "Images of the ImageNet-like folder.", lower_bound=1)
_MIN = flags.DEFINE_integer("min_size", 300, "Smallest side drawn (px).", lower_bound=8)
_MAX = flags.DEFINE_integer("max_size", 500, "Largest side drawn (px).", lower_bound=8)
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality.", lower_bound=1, upper_bound=100)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic folders and the shuffles.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Crop size of the pipeline section.", lower_bound=8)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size everywhere.", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "all"], "Worker processes of the pipeline "
                             "section (all: this machine's cores; 0: in the main process).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of every variant.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_batches", 2, "Untimed batches of a fresh iterator.",
                               lower_bound=1)
_TIMED = flags.DEFINE_integer("timed_batches", 6, "Timed batches per repeat.", lower_bound=1)
_READ = flags.DEFINE_integer("read_images", 200, "Files the read section times.", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", "mnist5k", "The in-memory dataset of the step section.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Its TFDS data dir (default: cnnlab's).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed train steps per repeat.", lower_bound=1)
_FOLDER_STEPS = flags.DEFINE_integer("folder_steps", 20, "Timed train steps per repeat on the "
                                     "small-JPEG folder (a slower step).", lower_bound=1)
_STEP_WORKERS = flags.DEFINE_list("step_workers", ["0", "1", "2"], "Workers of the streamed "
                                  "feeds of the step section.")
_SMALL_IMAGES = flags.DEFINE_integer("small_images", 3000, "Images of the small-JPEG folder of "
                                     "the step section.", lower_bound=1)
_SMALL_SIZE = flags.DEFINE_integer("small_size", 64, "Its crop size.", lower_bound=8)
_RSS_IMAGES = flags.DEFINE_list("rss_images", ["500", "5000"], "Folder sizes of the rss section.")
_RSS_WORKERS = flags.DEFINE_integer("rss_workers", 2, "Workers of the rss section.", lower_bound=0)
_TORCH = flags.DEFINE_bool("torch", True, "Time PyTorch's DataLoader too (false: cnnlab alone).")
_OUT = flags.DEFINE_string("out", None, "Write all measurements as JSON here.")


def _counts(values: list[str]) -> bool:
  return all(v == "all" or (v.isdigit()) for v in values) and bool(values)


flags.register_validator("sections", lambda v: bool(v) and set(v) <= set(SECTIONS),
                         f"takes a comma-separated list of {', '.join(SECTIONS)}")
for _name in ("workers", "step_workers"):
  flags.register_validator(_name, _counts, "takes a comma-separated list of worker counts "
                           "(0, 1, ...) or all")
flags.register_validator("rss_images", lambda v: bool(v) and all(x.isdigit() and int(x) > 0
                                                                 for x in v),
                         "takes a comma-separated list of positive image counts")
flags.register_multi_flags_validator(["min_size", "max_size"],
                                     lambda f: f["min_size"] <= f["max_size"],
                                     "--min_size must not exceed --max_size")
SMALL_SIDES = (80, 120)


def worker_counts(values: list[str]) -> list[int]:
  """--workers' values as counts, `all` = this machine's cores, duplicates dropped."""
  return list(dict.fromkeys(os.cpu_count() if v == "all" else int(v) for v in values))


# ----------------------------------------------------------------------------------------------
# Folders.

def synthetic(images: int, sides: tuple[int, int]) -> str:
  name = f"jpeg_{_CLASSES.value}x{images}_{sides[0]}-{sides[1]}px_q{_QUALITY.value}_s{_SEED.value}"
  return make_folder(os.path.join(_CACHE.value, name), _CLASSES.value, images, sides,
                     _QUALITY.value, _SEED.value)


def index_dir(root: str) -> str:
  return os.path.join(_CACHE.value, "index-" + hashlib.sha1(
      os.path.abspath(root).encode()).hexdigest()[:12])


# ----------------------------------------------------------------------------------------------
# Iterators: make() -> (iterator, close).

def cnnlab_stream(source, transform, mean, std, workers: int, seed: int = 0):
  it = stream.StreamIterator(source, _BATCH.value, seed, transform, mean, std, workers=workers)
  return it, it.close


def fixed(batch: dict):
  return itertools.repeat(batch), lambda: None


def _spread(values: list[float]) -> dict[str, float]:
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def interleaved(variants: dict, measure) -> dict[str, list]:
  """measure(make) of every variant per repeat, the first variant rotating, so a change of the
  machine's speed hits all of them."""
  names, out = list(variants), {name: [] for name in variants}
  for r in range(_REPEATS.value):
    for name in names[r % len(names):] + names[:r % len(names)]:
      out[name].append(measure(variants[name]))
  return out


# ----------------------------------------------------------------------------------------------
# Sections.

def images_per_s(make) -> tuple[float, float]:
  """(images/s over --timed_batches after --warmup_batches, seconds to the first batch) of a
  fresh iterator."""
  start = time.perf_counter()
  it, close = make()
  try:
    next(it)
    first = time.perf_counter() - start
    for _ in range(_WARMUP.value - 1):
      next(it)
    start = time.perf_counter()
    for _ in range(_TIMED.value):
      next(it)
    return _TIMED.value * _BATCH.value / (time.perf_counter() - start), first
  finally:
    close()


def pipeline_section(root: str, index, source) -> list[dict]:
  size, rows, needed = _SIZE.value, [], (_WARMUP.value + _TIMED.value) * _BATCH.value
  if needed > len(source):  # A DataLoader's iterator ends with its epoch.
    cli.fail(f"--warmup_batches + --timed_batches of --batch_size={_BATCH.value} take {needed} "
             f"images, but the train split of {root} has {len(source)}; time fewer batches.")
  transform = transforms.train_transform("imagenet", size)
  for w in worker_counts(_WORKERS.value):
    variants = {"cnnlab": functools.partial(cnnlab_stream, source, transform, IMAGENET_MEAN,
                                            IMAGENET_STD, w, _SEED.value)}
    if _TORCH.value:
      variants["torch"] = functools.partial(torch_loader, root, index.splits["train"].paths,
                                            size, w, _BATCH.value, _SEED.value)
    row = {"workers": w}
    for name, results in interleaved(variants, images_per_s).items():
      row[name] = {"img_s": _spread([r[0] for r in results]),
                   "first_batch_s": statistics.median(r[1] for r in results)}
      print(f"pipeline: {name}, {w} workers: {row[name]['img_s']['median']:.0f} img/s",
            flush=True)
    rows.append(row)
  return rows


def read_section(root: str, index) -> dict:
  paths = [os.path.join(root, p) for p in index.splits["train"].paths[:_READ.value]]
  transform = transforms.train_transform("imagenet", _SIZE.value)

  def per_image_ms(fn) -> float:
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      fn()
      times.append((time.perf_counter() - start) / len(paths) * 1e3)
    return statistics.median(times)

  blobs = [open(p, "rb").read() for p in paths]  # Into the page cache, if not there already.
  read_bytes = lambda: [open(p, "rb").read() for p in paths]
  decode = lambda: [transforms.decode(b) for b in blobs]
  crop = lambda: [transform(transforms.decode(b), transforms.example_rng(0, 0, i))
                  for i, b in enumerate(blobs)]
  return {"images": len(paths), "mean_kb": float(np.mean([len(b) for b in blobs]) / 1024),
          "read_ms": per_image_ms(read_bytes), "decode_ms": per_image_ms(decode),
          "decode_crop_flip_ms": per_image_ms(crop)}


def steps_ms(runner: CnnlabRunner, steps: int, make) -> tuple[float, float]:
  """(ms per train step, ms of it waiting for the next batch) fed by a fresh iterator: `steps`
  timed after 5 untimed."""
  it, close = make()
  try:
    runner.train_from(it, 5)
    start = time.perf_counter()
    waited = runner.train_from(it, steps)
    return (time.perf_counter() - start) / steps * 1e3, waited / steps * 1e3
  finally:
    close()


def step_rows(data: str, runner: CnnlabRunner, steps: int, feeds: dict) -> list[dict]:
  """One row per feed; the differences to the pre-made batch's median and best (contention
  only adds time, so the bests are the quieter comparison)."""
  results = interleaved(feeds, functools.partial(steps_ms, runner, steps))
  base = _spread([ms for ms, _ in results["one pre-made batch"]])
  rows = []
  for feed, timed in results.items():
    ms, waits = [t for t, _ in timed], [w for _, w in timed]
    rows.append({"data": data, "feed": feed, "steps": steps, "ms": _spread(ms),
                 "wait_ms": _spread(waits),
                 "minus_premade_ms": statistics.median(ms) - base["median"],
                 "minus_premade_best_ms": min(ms) - base["min"]})
    print(f"step: {data}, {feed}: {rows[-1]['ms']['median']:.2f} ms", flush=True)
  return rows


def step_section() -> list[dict]:
  config = sweep_base("ablation")
  config.dataset.name, config.dataset.data_dir = _DATASET.value, _DATA_DIR.value
  train = data_lib.load_split(config.dataset, "train")
  mean, std = data_lib.normalisation(config.dataset)
  in_memory = lambda: (pipeline.TrainIterator(train.images, train.labels, _BATCH.value, 0, mean,
                                              std), lambda: None)
  identity = transforms.eval_transform(None)
  array_source = stream.ArraySource(train.images, train.labels)
  premade = next(in_memory()[0])
  runner = CnnlabRunner("main", "float32", premade["image"], premade["label"])
  workers = worker_counts(_STEP_WORKERS.value)
  feeds = {"one pre-made batch": functools.partial(fixed, premade), "in memory (TrainIterator)":
           in_memory, **{f"StreamIterator over ArraySource, {w} workers": functools.partial(
               cnnlab_stream, array_source, identity, mean, std, w) for w in workers}}
  shape = "x".join(map(str, train.images.shape[1:]))
  rows = step_rows(f"{_DATASET.value} {shape}", runner, _STEPS.value, feeds)

  root = synthetic(_SMALL_IMAGES.value, SMALL_SIDES)
  _, source = open_folder(root, index_dir(root))
  augment = transforms.train_transform("imagenet", _SMALL_SIZE.value)
  make = functools.partial(cnnlab_stream, source, augment, IMAGENET_MEAN, IMAGENET_STD)
  it, close = make(0)
  premade = next(it)
  close()
  runner = CnnlabRunner("main", "float32", premade["image"], premade["label"])
  feeds = {"one pre-made batch": functools.partial(fixed, premade),
           **{f"StreamIterator over the folder, {w} workers": functools.partial(make, w)
              for w in workers}}
  s = _SMALL_SIZE.value
  return rows + step_rows(f"{len(source)} JPEGs {SMALL_SIDES[0]}-{SMALL_SIDES[1]} px, "
                          f"crops {s}x{s}x3", runner, _FOLDER_STEPS.value, feeds)


def rss_section() -> list[dict]:
  """epoch_rss per folder size, each in a fresh Python process (maxrss is a lifetime peak)."""
  rows, code = [], ("import json, sys, pipeline_memory as m; "
                    "print(json.dumps(m.epoch_rss(*json.loads(sys.argv[1]))))")
  for n in (int(v) for v in _RSS_IMAGES.value):
    root = synthetic(n, SMALL_SIDES)
    args = [root, index_dir(root), _RSS_WORKERS.value, _BATCH.value, _SMALL_SIZE.value]
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode:
      raise RuntimeError(f"the memory probe over {root} failed:\n{done.stderr[-3000:]}")
    rows.append({"images": n, **json.loads(done.stdout.splitlines()[-1])})
    print(f"rss: {n} JPEGs: peak {rows[-1]['peak_mb']:.0f} MB, workers' "
          f"{', '.join(f'{p:.0f}' for p in rows[-1]['worker_peaks_mb'])} MB", flush=True)
  return rows


# ----------------------------------------------------------------------------------------------
# Report.

def machine() -> dict:
  with open("/proc/cpuinfo") as f:
    cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown")
  here = os.path.dirname(os.path.abspath(__file__))
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                          text=True).stdout.strip() or "unknown"
  versions = {"grain": "grain", "pillow": "PIL", "numpy": "numpy"}
  if _TORCH.value:
    versions.update(torch="torch", torchvision="torchvision")
  return {"date": datetime.date.today().isoformat(), "commit": commit, "cpu": cpu,
          "cores": os.cpu_count(), "load_before": os.getloadavg(),
          **{k: __import__(m).__version__ for k, m in versions.items()}}


def _fmt(s: dict, digits: int = 0) -> str:
  return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def markdown(section: str, result, folder: str) -> list[str]:
  if section == "pipeline":
    lines = [f"Folder {folder}; {_BATCH.value}-image batches of {_SIZE.value}-px crops; "
             f"{_TIMED.value} batches timed after {_WARMUP.value}, {_REPEATS.value} repeats.", "",
             "| workers | cnnlab img/s median (min-max) | torch DataLoader img/s | cnnlab / torch "
             "| first batch s, cnnlab / torch |", "|---|---|---|---|---|"]
    for r in result:
      t = r.get("torch")
      lines.append(
          f"| {r['workers']} | {_fmt(r['cnnlab']['img_s'])} | {_fmt(t['img_s']) if t else ''} | "
          + (f"{r['cnnlab']['img_s']['median'] / t['img_s']['median']:.2f}x" if t else "")
          + f" | {r['cnnlab']['first_batch_s']:.2f}"
          + (f" / {t['first_batch_s']:.2f} |" if t else " |"))
    return lines
  if section == "read":
    r = result
    return [f"| ms per image ({r['images']} files of {r['mean_kb']:.0f} KiB on average, page "
            "cache warm) | read the file | decode | decode + random-resized-crop + flip |",
            "|---|---|---|---|",
            f"| one process | {r['read_ms']:.3f} | {r['decode_ms']:.2f} | "
            f"{r['decode_crop_flip_ms']:.2f} |"]
  if section == "step":
    lines = [f"Batch {_BATCH.value}, timed steps after 5, {_REPEATS.value} repeats.", "",
             "| data | fed by | steps | ms/step median (min-max) | minus the pre-made batch's, "
             "median / best | ms/step waiting for data, median (min-max) |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {r['data']} | {r['feed']} | {r['steps']} | {_fmt(r['ms'], 2)} | "
                    f"{r['minus_premade_ms']:+.2f} / {r['minus_premade_best_ms']:+.2f} | "
                    f"{_fmt(r['wait_ms'], 2)} |" for r in result]
  lines = [f"One epoch of StreamIterator, {_RSS_WORKERS.value} workers, {_SMALL_SIZE.value}-px "
           f"crops of {SMALL_SIDES[0]}-{SMALL_SIDES[1]}-px JPEGs, batch {_BATCH.value}; MB = "
           "2**20 bytes.", "",
           "| JPEGs (train split) | epoch s | RSS before iterating | peak RSS (VmHWM) | workers' "
           "peak RSS, each | getrusage maxrss self / children | the split decoded whole at "
           f"{_SMALL_SIZE.value} px |", "|---|---|---|---|---|---|---|"]
  return lines + [f"| {r['images']} ({r['examples']}) | {r['epoch_s']:.1f} | "
                  f"{r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{', '.join(f'{p:.0f}' for p in r['worker_peaks_mb']) or 'none'} | "
                  f"{r['maxrss_self_mb']:.0f} / {r['maxrss_children_mb']:.0f} | "
                  f"{r['decoded_whole_mb']:.0f} |" for r in result]


def main(_):
  environment.apply_numerics(base_config())  # The XLA settings of a default training process.
  os.makedirs(_CACHE.value, exist_ok=True)
  info = machine()
  print(f"{info['date']}, cnnlab {info['commit']}, {info['cpu']}, {info['cores']} cores; "
        f"load average {info['load_before'][0]:.2f}", flush=True)
  if _FOLDER.value is not None and not os.path.isdir(_FOLDER.value):
    cli.fail(f"--folder={_FOLDER.value}: not a directory; give a root/<class>/*.jpg folder.")
  root = _FOLDER.value or synthetic(_IMAGES.value, (_MIN.value, _MAX.value))
  results, tables = {}, []
  for section in _SECTIONS.value:
    if section in ("pipeline", "read"):
      if "index" not in results:
        results["index"] = open_folder(root, index_dir(root))
      index, source = results["index"]
    if section == "pipeline":
      results[section] = pipeline_section(root, index, source)
    elif section == "read":
      results[section] = read_section(root, index)
    else:
      results[section] = step_section() if section == "step" else rss_section()
    tables += ["", *markdown(section, results[section], root)]
  info["load_after"] = os.getloadavg()
  results.pop("index", None)
  print(f"\n{info['date']}, cnnlab {info['commit']}, {info['cpu']}, {info['cores']} cores; load "
        f"average {info['load_before'][0]:.2f} before, {info['load_after'][0]:.2f} after")
  print("\n".join(tables))
  if _OUT.value:
    cli.write_json_or_fail("out", _OUT.value, {"machine": info, **results})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
