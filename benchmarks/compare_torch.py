"""cnnlab's jitted train and eval steps against the same nets in PyTorch, interleaved in one run.

    python benchmarks/compare_torch.py --repeats=5 --steps=10 --out=/tmp/compare_torch.json

Nets (nets.py: vgg_small, resnet20 and the main job's net; BN before the activation, 10 classes,
random inputs, SGD momentum 0.9 nesterov, weight decay 5e-4 on kernels only, as cnnlab's base
config; the PyTorch twins are in torch_nets.py).
Variants: cnnlab (per --dtypes; float32 at true float32 precision, cnnlab's default), torch
eager NCHW, torch channels_last, torch channels_last under bfloat16 autocast (when --dtypes has
bfloat16), torch.compile (channels_last; reported as failed where it does not work here). On a
GPU (used when JAX and torch both see one) both run there, cuDNN autotuned (torch's
`cudnn.benchmark`, XLA's autotuner), float32 without TF32 unless the variant's name says TF32;
--tf32 adds cnnlab and torch channels_last with TF32 tensor cores (cnnlab's
`matmul_precision="default"`). --deterministic=false drops cnnlab's default
`--xla_gpu_deterministic_ops=true` (a process-wide XLA flag: run the script twice to see its
cost). Every repeat times every variant for --steps steps, in an order rotated per repeat, so a
load change hits all of them. Each timed window follows --warmup_steps untimed steps of the same
variant: a training loop never switches frameworks, but here the first step after the other
framework's window pays for its threads (measured on the 2-core CPU: cnnlab's first step after a
torch window took 9.9 ms against 4.7 in steady state, torch's first after cnnlab's 6.7 against
5.0: torch's OpenMP threads spin on after their work, XLA's pool wakes its own), which is 5-10%
of a 10-step window.
Reports images/s (min/median/max over repeats), achieved GFLOP/s (6 x multiply-adds per training
example, 2 x per eval example, from cnnlab.inspection.summary) against the measured float32 matmul
peak of this machine (numpy and jax, the best; on a GPU jax's float32 without TF32), the first call
(compile) time, and the ratio to torch channels_last (float32). CPU contention: the load
average before/after, and per timed window the CPU share other processes took (/proc/stat busy
time minus this process's); a window where they used more than --noisy_share of a core is
marked noisy. A drift probe, cnnlab's train step of the ablation net timed before and after
all nets, shows a change of the machine's speed that no other process explains (this machine has
slow phases that slow XLA by 25-50% and PyTorch barely); a change above --drift_warning marks
the table. Prints a markdown table for the README.
Only a quiet machine gives numbers to publish: interleaving does not cancel contention, because
the two runtimes suffer differently (measured on 2 shared cores with ~1.7 cores taken by others:
torch's OpenMP steps slowed 10-25x, XLA's 2-3x, so the ratios flipped in cnnlab's favour).
torch is a benchmark-only dependency (the `torch` extra); cnnlab itself never imports it.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_nets
from absl import app, flags
from nets import LEARNING_RATE, NETS, NUM_CLASSES, CnnlabRunner, cnnlab_config

from cnnlab import cli
from cnnlab.base import environment
from cnnlab.configs import base_config
from cnnlab.inspection import summary
from cnnlab.nets import models

_NETS = flags.DEFINE_list("nets", ["vgg_small", "resnet20", "main"], "Nets to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds over all variants.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per variant per round.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps of a variant right before each "
                               "of its timed windows.", lower_bound=0)
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "cnnlab activation dtypes to time.")
_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time torch.compile (slow to compile).")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch variants (false: cnnlab's alone).")
_TF32 = flags.DEFINE_bool("tf32", False, "Also time float32 with TF32 tensor cores (GPUs).")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", True, "cnnlab's config.deterministic: XLA's "
                                   "deterministic GPU ops (no effect on the CPU).")
_NOISY = flags.DEFINE_float("noisy_share", 0.1, "Other processes' cores above which a window "
                            "is noisy.", lower_bound=0)
_DRIFT = flags.DEFINE_float("drift_warning", 0.15, "Relative change of the drift probe (before "
                            "against after the run) above which the table is marked.",
                            lower_bound=0)
_OUT = flags.DEFINE_string("out", None, "Write all measurements as JSON here.")

flags.register_validator("nets", lambda v: set(v) <= set(NETS),
                         f"takes a comma-separated list of {', '.join(NETS)}")
flags.register_validator("dtypes", lambda v: set(v) <= {"float32", "bfloat16"},
                         "takes a comma-separated list of float32, bfloat16")
# absl's bounds let nan and inf through.
flags.register_validator("noisy_share", math.isfinite, "takes a finite number")
flags.register_validator("drift_warning", math.isfinite, "takes a finite number")


# ----------------------------------------------------------------------------------------------
# Contention.

def _cpu_seconds() -> tuple[float, float, float]:
  """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process)."""
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
  busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
  own = os.times()
  return time.perf_counter(), busy, own.user + own.system


def _other_cores(before, after) -> float:
  """Cores other processes kept busy between two `_cpu_seconds` samples."""
  wall = after[0] - before[0]
  return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall


# ----------------------------------------------------------------------------------------------
# cnnlab side.

# ----------------------------------------------------------------------------------------------
# Measurement.

def on_gpu() -> bool:
  """Whether cnnlab and torch both run on a GPU here (else both on the CPU)."""
  return jax.default_backend() == "gpu" and torch.cuda.is_available()


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Best float32 GFLOP/s of an n x n matmul in numpy and in jax (its default device; on a GPU
  n = 8192 and true float32, no TF32)."""
  n = 8192 if on_gpu() else n
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  ja = jnp.asarray(a)
  jdot = jax.jit(functools.partial(jnp.dot, precision="highest"))
  jdot(ja, ja).block_until_ready()
  best = {"numpy": 0.0, "jax": 0.0}
  for _ in range(repeats):
    for name, f in (("numpy", lambda: a @ a), ("jax", lambda: jdot(ja, ja).block_until_ready())):
      start = time.perf_counter()
      f()
      best[name] = max(best[name], 2 * n**3 / (time.perf_counter() - start) / 1e9)
  return best


def timed(fn, steps: int) -> dict[str, float]:
  """Seconds for fn(steps), and the cores other processes used meanwhile."""
  before = _cpu_seconds()
  fn(steps)
  after = _cpu_seconds()
  return {"seconds": after[0] - before[0], "other_cores": _other_cores(before, after)}


def build_variants(net: str) -> dict[str, object]:
  """Every variant of `net` with its first-call (compile) time, on the same random batch."""
  batch, shape = NETS[net]["batch"], NETS[net]["shape"]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, *shape)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  makers = {f"cnnlab {d}": lambda d=d: CnnlabRunner(net, d, images, labels) for d in _DTYPES.value}
  if _TF32.value:
    makers["cnnlab float32 TF32"] = lambda: CnnlabRunner(net, "float32", images, labels, "default")
  device = "cuda" if on_gpu() else "cpu"
  make_model = functools.partial(torch_nets.torch_net, net, NETS[net]["model"].get("stages"),
                                 num_classes=NUM_CLASSES)
  torch_runner = functools.partial(torch_nets.TorchRunner, make_model, images, labels,
                                   learning_rate=LEARNING_RATE, device=device)
  if _TORCH.value:
    makers["torch NCHW"] = lambda: torch_runner("nchw", False)
    makers["torch channels_last"] = lambda: torch_runner("channels_last", False)
    if _TF32.value:
      makers["torch channels_last TF32"] = lambda: torch_runner("channels_last", False, tf32=True)
    if "bfloat16" in _DTYPES.value:
      makers["torch channels_last bfloat16"] = lambda: torch_runner(
          "channels_last", False, autocast=torch.bfloat16)
    if _COMPILE.value:
      makers["torch.compile"] = lambda: torch_runner("channels_last", True)
  variants = {}
  for name, make in makers.items():
    try:
      runner = make()
      start = time.perf_counter()
      runner.train(1)
      first_train = time.perf_counter() - start
      start = time.perf_counter()
      runner.eval(1)
      variants[name] = (runner, {"first_train_s": first_train,
                                 "first_eval_s": time.perf_counter() - start})
    except Exception as e:  # torch.compile needs a working C++ toolchain; report, go on.
      print(f"{net}: {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return variants


def _spread(values: list[float]) -> dict[str, float]:
  return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_net(net: str) -> list[dict]:
  """Times every variant of `net` interleaved; one result row per variant."""
  variants = build_variants(net)
  names = list(variants)
  batch = NETS[net]["batch"]
  macs = summary.summarize_model(
      models.get_model(cnnlab_config(net, "float32").model, NUM_CLASSES),
      NETS[net]["shape"]).total_macs
  windows = {name: {"train": [], "eval": []} for name in names}
  for r in range(_REPEATS.value):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      runner = variants[name][0]
      for kind in ("train", "eval"):
        step = getattr(runner, kind)
        if _WARMUP.value:
          step(_WARMUP.value)
        windows[name][kind].append(timed(step, _STEPS.value))
  rows = []
  for name in names:
    row = {"net": net, "variant": name, "batch": batch, **variants[name][1]}
    for kind, flops_per_example in (("train", 6 * macs), ("eval", 2 * macs)):
      ws = windows[name][kind]
      rate = [_STEPS.value * batch / w["seconds"] for w in ws]
      row[f"{kind}_img_s"] = _spread(rate)
      row[f"{kind}_gflop_s"] = statistics.median(rate) * flops_per_example / 1e9
      row[f"{kind}_noisy_windows"] = sum(w["other_cores"] > _NOISY.value for w in ws)
      row[f"{kind}_other_cores_max"] = max(w["other_cores"] for w in ws)
    rows.append(row)
  ref = next((r for r in rows if r["variant"] == "torch channels_last"), None)
  for row in rows:
    for kind in ("train", "eval"):
      row[f"{kind}_vs_channels_last"] = (row[f"{kind}_img_s"]["median"]
                                         / ref[f"{kind}_img_s"]["median"]) if ref else None
  return rows


def probe_step_ms() -> float:
  """cnnlab's train step of the ablation's net (batch 64) in ms, the best of 5 windows of 20
  steps: a fixed XLA program timed before and after all nets. This machine has slow phases in
  which XLA's steps run 25-50% slower while torch's barely change and /proc/stat shows no other
  process, so a change of this probe is the one sign that one began during the run."""
  batch, shape = NETS["main"]["batch"], NETS["main"]["shape"]
  rng = np.random.default_rng(1)
  runner = CnnlabRunner("main", "float32", rng.standard_normal((batch, *shape)).astype(np.float32),
                        rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
  runner.train(3)
  return min(timed(runner.train, 20)["seconds"] for _ in range(5)) / 20 * 1e3


def machine() -> dict:
  with open("/proc/cpuinfo") as f:
    cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown")
  env = environment.describe("float32")
  return {"cpu": cpu, "accelerator": env["device_kind"] if on_gpu() else "none",
          "threads": env["threads"], "platform": env["platform"],
          "python": env["python"], "jax": env["packages"]["jax"],
          "jaxlib": env["packages"]["jaxlib"], "flax": env["packages"]["flax"],
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "numpy": np.__version__, "xla_flags": env["xla_flags"], "git_commit": env["git_commit"]}


def markdown(info: dict, rows: list[dict]) -> str:
  fmt = lambda s: f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"
  ratio = lambda v: "" if v is None else f"{v:.2f}x"
  lines = [
      f"Machine: {info['cpu']}, {info['threads']} threads, accelerator "
      f"{info['accelerator']}; jax {info['jax']} (jaxlib "
      f"{info['jaxlib']}), flax {info['flax']}, torch {info['torch']} ({info['torch_threads']} "
      f"threads), numpy {info['numpy']}; XLA_FLAGS='{info['xla_flags']}'; cnnlab "
      f"{info['git_commit'][:12]}. float32 matmul peak {info['peak_gflop_s']:.0f} GFLOP/s "
      f"(numpy {info['matmul']['numpy']:.0f}, jax {info['matmul']['jax']:.0f}). Load average "
      f"{info['load_before'][0]:.2f} before, {info['load_after'][0]:.2f} after; "
      f"{info['noisy_windows']} of {info['windows']} timed windows noisy (other processes > "
      f"{_NOISY.value:g} core). Drift probe (cnnlab's train step of the ablation net, batch 64): "
      f"{info['probe_ms_before']:.2f} ms before, {info['probe_ms_after']:.2f} ms after.",
      *([f"WARNING: other processes used up to {max(r['train_other_cores_max'] for r in rows):.1f}"
         " cores while timing; these numbers and ratios are not those of a quiet machine."]
        if info["noisy_windows"] else []),
      *([f"WARNING: the drift probe changed by {100 * (drift - 1):+.0f}% during the run: the "
         "machine's speed changed while timing (in its slow phases XLA runs 25-50% slower and "
         "PyTorch barely changes), so the ratios of different nets are not comparable."]
        if abs((drift := info["probe_ms_after"] / info["probe_ms_before"]) - 1) > _DRIFT.value
        else []),
      "",
      "| net | variant | train img/s median (min-max) | train GFLOP/s (% peak) | vs torch "
      "channels_last | eval img/s | eval vs channels_last | first train call s |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['net']} (batch {r['batch']}) | {r['variant']} | {fmt(r['train_img_s'])} | "
        f"{r['train_gflop_s']:.1f} ({100 * r['train_peak_share']:.0f}%) | "
        f"{ratio(r['train_vs_channels_last'])} | {fmt(r['eval_img_s'])} | "
        f"{ratio(r['eval_vs_channels_last'])} | {r['first_train_s']:.1f} |")
  return "\n".join(lines)


def main(_):
  # cnnlab's steps run with the XLA settings a default config gives a training process.
  config = base_config()
  config.deterministic = _DETERMINISTIC.value
  environment.apply_numerics(config)
  if jax.default_backend() != "cpu" and not on_gpu():
    cli.fail(f"cnnlab runs on {jax.default_backend()} but torch sees no CUDA GPU, so the two "
             "would run on different devices; install torch with CUDA or run both on the CPU "
             "with JAX_PLATFORMS=cpu.")
  torch.backends.cudnn.benchmark = True
  info = machine()
  info["load_before"] = os.getloadavg()
  start = _cpu_seconds()
  info["matmul"] = matmul_peak()
  info["probe_ms_before"] = probe_step_ms()
  rows = []
  for net in _NETS.value:
    net_rows = run_net(net)
    rows += net_rows
    for r in net_rows:  # Printed at once: kept if the run is cut short.
      print(f"{net}: {r['variant']}: train {r['train_img_s']['median']:.0f} img/s, eval "
            f"{r['eval_img_s']['median']:.0f} img/s, first train call {r['first_train_s']:.1f} s",
            flush=True)
  info["probe_ms_after"] = probe_step_ms()
  info["matmul_after"] = matmul_peak()
  info["peak_gflop_s"] = max(*info["matmul"].values(), *info["matmul_after"].values())
  info["load_after"] = os.getloadavg()
  info["other_cores_whole_run"] = _other_cores(start, _cpu_seconds())
  info["windows"] = 2 * _REPEATS.value * len(rows)
  info["noisy_windows"] = sum(r["train_noisy_windows"] + r["eval_noisy_windows"] for r in rows)
  for row in rows:
    for kind in ("train", "eval"):
      row[f"{kind}_peak_share"] = row[f"{kind}_gflop_s"] / info["peak_gflop_s"]
  print(markdown(info, rows))
  if _OUT.value:
    cli.write_json_or_fail("out", _OUT.value, {"machine": info, "rows": rows})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
