r"""PGD-10 on ViT-B/32 under XLA:CPU settings, against PyTorch, one process each.

  python bench/xla_settings.py                       # every setting in SETTINGS
  python bench/xla_settings.py --settings cli,jax_default --repeats 3

XLA reads $XLA_FLAGS once, when its backend starts, so each setting runs in a
fresh subprocess: the bench's ViT-B/32 zero-shot classifier (common.make_clip,
1000 random class embeddings, batch 8), PGD-10 L-inf eps 4/255 with CE and no
random start (the issue 14 setting), compiled ahead of time, then the best of
`--repeats` calls. PyTorch runs the same attack (common.torch_pgd) on the same
weights at torch threads = cores, in its own subprocess, first and last (a drift
check). Each subprocess waits for the 1-minute load average to fall below
common.QUIET_LOAD; ratios are withheld when it did not.

Prints one JSON object and appends it to bench/results.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time


# name -> $XLA_FLAGS. "cli" is what train.py and evaluate.py set
# (prsl_jax/compilation.py, CPU_XLA_FLAGS); the others change one thing.
SETTINGS = {
    "cli": "--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce",
    "jax_default": "",
    "ynn_all_off": "--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce,-dot",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce --xla_cpu_use_onednn=true",
    "xnn_dot": ("--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce,-dot "
                "--xla_cpu_experimental_xnn_fusion_type=dot"),
    "concurrency_scheduler": ("--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce "
                              "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    # evaluate.py's default on a 2-core CPU: the batch split over one host device
    # per core (prsl_jax/compilation.py, auto_cpu_devices), run with shard_map.
    "cli_2_devices": ("--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce "
                      "--xla_force_host_platform_device_count=2"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--settings", default=",".join(SETTINGS), help="subset of " + ",".join(SETTINGS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--eps", type=float, default=4 / 255)
  p.add_argument("--repeats", type=int, default=2, help="timed calls after compiling; best kept")
  p.add_argument("--max_load", type=float, default=None, help="default common.QUIET_LOAD")
  p.add_argument("--quick", action="store_true", help="the small ViT of common.QUICK_VISION")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def worker(args):
  """One side in this process: prints RESULT {seconds, load, ...}."""
  import common  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from prsl_jax import attacks  # pylint: disable=g-import-not-at-top
  clip = common.make_clip(args.quick)
  cls = common.class_embeddings(1000)
  x, y = common.images_and_labels(args.batch, clip.model.image_size, 1000)
  out = {"side": args.worker, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if args.worker == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    out["torch_threads"] = common.set_torch_threads()
    zs = common.TorchZeroShot(common.torch_clip(clip, args.quick), np.asarray(cls),
                              clip.model.config.vision.image_mean,
                              clip.model.config.vision.image_std)
    xt, yt = common.nchw(x), torch.from_numpy(y).long()
    fn = lambda: common.torch_pgd(zs, xt, yt, eps=args.eps, steps=args.steps,
                                  random_start=False)
  else:
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    classify, variables = common.classifier(clip, cls)
    def run(variables, images, labels):
      return attacks.pgd(classify.bind(variables), images, labels, key=None, eps=args.eps,
                         steps=args.steps, random_start=False)
    if jax.device_count() > 1:  # the batch split over the devices, as evaluate.py does
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
      run = jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                          out_specs=P("data"), check_vma=False)
      out["devices"] = jax.device_count()
    t0 = time.perf_counter()
    exe = jax.jit(run).lower(variables, x, y).compile()
    out["compile_s"] = time.perf_counter() - t0
    fn = lambda: exe(variables, x, y)
  out["load_before"] = common.wait_for_quiet(args.max_load or common.QUIET_LOAD)
  out.update(common.time_calls(fn, warmup=0, repeats=args.repeats))
  out["load_after"] = os.getloadavg()[0]
  print("RESULT " + json.dumps(out), flush=True)


def _side(args, side, flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PRSL_JAX_BENCH_RAW_FLAGS="1", XLA_FLAGS=flags)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--batch", str(args.batch),
         "--steps", str(args.steps), "--eps", str(args.eps), "--repeats", str(args.repeats)]
  if args.max_load is not None:
    cmd += ["--max_load", str(args.max_load)]
  if args.quick:
    cmd.append("--quick")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0 or "RESULT " not in proc.stdout:
    return {"side": side, "xla_flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
  return json.loads(proc.stdout.split("RESULT ", 1)[1])


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  import common  # pylint: disable=g-import-not-at-top
  names = [n for n in args.settings.split(",") if n]
  for n in names:
    if n not in SETTINGS:
      raise SystemExit(f"--settings: unknown {n!r}; choose from {', '.join(SETTINGS)}")
  runs = [_side(args, "torch", "")]
  for n in names:
    runs.append(dict(_side(args, "jax", SETTINGS[n]), setting=n))
    print(f"# {n}: {runs[-1].get('min_s', runs[-1].get('error'))}", file=sys.stderr, flush=True)
  runs.append(_side(args, "torch", ""))
  torch_best = min(r["min_s"] for r in runs if r["side"] == "torch" and "min_s" in r)
  ratios = {r["setting"]: torch_best / r["min_s"] for r in runs if "setting" in r and "min_s" in r}
  loads = [r["load_before"] for r in runs if "load_before" in r]
  ratios, note = common.gate_on_load(ratios, loads, args.max_load or common.QUIET_LOAD)
  result = {
      "attack": f"PGD-{args.steps} L-inf eps={args.eps:.5f} CE, no random start, 1000 classes, "
                f"batch {args.batch}, best of {args.repeats} calls after compiling",
      "model": "quick" if args.quick else "ViT-B/32 vision tower, random weights",
      "runs": runs, "speed_vs_torch": ratios, "load_note": note,
  }
  common.emit("xla_settings", result)


if __name__ == "__main__":
  main()
