r"""Peak memory of one PGD attack batch, each setting in a fresh subprocess.

  python bench/memory.py                        # ViT-B/32: jax f32 at 8 and 32,
                                                # remat and bf16 at 32, torch at 8 and 32
  python bench/memory.py --quick                # small ViT smoke test
  python bench/memory.py --settings jax:32:float32:remat,torch:32

Each setting runs in its own python process (so one setting's allocations and
compilation never hide another's peak) that builds the model, then runs the
attack while a thread samples the process's resident set (/proc/self/statm, every 5 ms).
Reported per setting:
  rss_before_attack_mib   resident set with model, data and (jax) the compiled
                          attack loaded
  rss_peak_attack_mib     highest sampled resident set during the attack call
  attack_extra_mib        the difference: what the attack batch itself needs
  maxrss_mib              the process's lifetime high-water mark (getrusage),
                          which for jax includes XLA's compilation
  xla_memory_analysis     (jax) XLA's own plan for the compiled attack: temp,
                          argument and output bytes
  device_peak_bytes       (jax on a GPU/TPU) the device allocator's peak
The attack runs --steps PGD steps (default 2): the steps share one loop body
whose buffers are reused, so the peak does not grow with the number of steps
(the jax:8 setting also compiles the PGD-10 program and reports its XLA temp
size next to PGD-2's to show it).

Prints one JSON object and appends it to bench/results.jsonl.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


DEFAULT_SETTINGS = ("jax:8:float32,jax:32:float32,jax:32:float32:remat,jax:32:bfloat16,"
                    "torch:8,torch:32")
MIB = 2 ** 20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--settings", default=DEFAULT_SETTINGS,
                 help="comma-separated framework:batch[:dtype[:remat]]")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--compare_steps", type=int, default=10,
                 help="the first jax setting also reports XLA's temp size at this many steps")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--eps", type=float, default=4 / 255)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


class PeakSampler:
  """Samples this process's RSS in a thread; .peak is the highest seen (bytes)."""

  def __init__(self, interval=0.005):
    import common  # pylint: disable=g-import-not-at-top
    self.rss = common.rss_bytes
    self.interval = interval
    self.peak = self.rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss())
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.rss())


def _maxrss_bytes():
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _memory_analysis(exe):
  ma = exe.memory_analysis()
  if ma is None:
    return None
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f: int(getattr(ma, f)) for f in fields if hasattr(ma, f)}


def child(setting, args):
  """Runs one setting in this (fresh) process; returns its measurements."""
  import common  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  parts = setting.split(":")
  framework, batch = parts[0], int(parts[1])
  dtype = parts[2] if len(parts) > 2 else "float32"
  remat = len(parts) > 3 and parts[3] == "remat"
  out = {"setting": setting, "framework": framework, "batch_size": batch, "dtype": dtype,
         "remat": remat, "steps": args.steps}
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  clip = common.make_clip(args.quick, dtype=jnp.dtype(dtype), remat=remat)
  cls = common.class_embeddings(args.num_classes)
  x, y = common.images_and_labels(batch, clip.model.image_size, args.num_classes)
  if framework == "jax":
    import attack_throughput  # pylint: disable=g-import-not-at-top
    key = jax.random.key(0)
    classify, variables = common.classifier(clip, cls)
    exe = attack_throughput.jax_attack(classify, args.steps, args.eps).lower(
        variables, x, y, key).compile()
    out["xla_memory_analysis"] = _memory_analysis(exe)
    if args.compare_steps and setting == args.first_jax:
      exe_n = attack_throughput.jax_attack(classify, args.compare_steps, args.eps).lower(
          variables, x, y, key).compile()
      out[f"xla_memory_analysis_steps_{args.compare_steps}"] = _memory_analysis(exe_n)
      del exe_n
    variables = jax.device_put(variables)
    xd = jax.device_put(x)
    yd = jax.device_put(y)
    run = lambda: jax.block_until_ready(exe(variables, xd, yd, key))
  elif framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    common.set_torch_threads()
    zs = common.TorchZeroShot(common.torch_clip(clip, args.quick), np.asarray(cls),
                              clip.model.config.vision.image_mean,
                              clip.model.config.vision.image_std)
    xt, yt = common.nchw(x), torch.from_numpy(y).long()
    run = lambda: common.torch_pgd(zs, xt, yt, eps=args.eps, steps=args.steps)
  else:
    raise SystemExit(f"unknown framework {framework!r} in setting {setting!r}")
  before = common.rss_bytes()
  t0 = time.perf_counter()
  with PeakSampler() as s:
    run()
  out["attack_s"] = round(time.perf_counter() - t0, 2)
  out["rss_before_attack_mib"] = round(before / MIB, 1)
  out["rss_peak_attack_mib"] = round(s.peak / MIB, 1)
  out["attack_extra_mib"] = round((s.peak - before) / MIB, 1)
  out["maxrss_mib"] = round(_maxrss_bytes() / MIB, 1)
  if framework == "jax":
    stats = jax.devices()[0].memory_stats()
    if stats:
      out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
      out["device_bytes_limit"] = stats.get("bytes_limit")
  return out


def main(argv=None):
  args = parse_args(argv)
  settings = [s for s in args.settings.split(",") if s]
  jax_settings = [s for s in settings if s.startswith("jax:")]
  args.first_jax = jax_settings[0] if jax_settings else None
  if args.child:
    print(json.dumps(child(args.child, args)), flush=True)
    return
  import common  # pylint: disable=g-import-not-at-top
  t_start = time.perf_counter()
  rows = []
  for s in settings:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", s, "--settings", args.settings,
           "--steps", str(args.steps), "--compare_steps", str(args.compare_steps),
           "--num_classes", str(args.num_classes), "--eps", str(args.eps)]
    if args.quick:
      cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      rows.append({"setting": s, "error": proc.stderr.strip().splitlines()[-3:]})
    else:
      rows.append(json.loads(lines[-1]))
    print(f"# {s}: {rows[-1].get('rss_peak_attack_mib', rows[-1].get('error'))} MiB peak",
          file=sys.stderr, flush=True)
  common.emit("memory", {
      "model": "quick" if args.quick else "ViT-B/32 vision tower, random weights",
      "attack": f"PGD-{args.steps} L-inf, {args.num_classes} classes",
      "results": rows, "wall_s": round(time.perf_counter() - t_start, 1),
  })


if __name__ == "__main__":
  main()
