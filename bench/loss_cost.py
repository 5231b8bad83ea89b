r"""Cost of PRSL against cross-entropy, alone and inside a fine-tuning step.

  python bench/loss_cost.py                 # C = 10, 1000, 49408 at batch 256 + step share
  python bench/loss_cost.py --quick         # small step model for a smoke test
  python bench/loss_cost.py --no_step       # loss microbenchmark only (seconds)

1. Loss alone: jitted forward + backward (gradient w.r.t. the logits) of the
   registry's batch losses (losses.get_loss): the authors' PRSL (window 0:4,
   weight 1e-3, the batch as one group) and cross-entropy, on (256, C) float32
   logits; the ratio prsl / ce.
2. Share of a fine-tuning step at 1000 classes: the trainer's step
   (training.make_train_step: PGD-2 + loss + AdamW; ViT-B/32 vision tower,
   batch --step_batch_size) compiled once with loss='prsl' and once with
   loss='ce'. The share PRSL adds is reported three ways:
   - flops: XLA cost-analysis FLOPs of the two steps (exact, noise-free;
     top_k is a sort that XLA does not count as FLOPs, hence also:)
   - micro: (prsl - ce) loss time at the step's (batch, 1000) logits, from
     part 1's method, divided by the measured step time;
   - direct: (step_prsl - step_ce) / step_ce from timing both steps, round-robin
     (on a loaded machine its noise is far larger than the effect: read it
     with the per-call times).

Prints one JSON object and appends it to bench/results.jsonl.
"""

import argparse
import functools
import sys
import time

import common

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from prsl_jax import losses  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", default="10,1000,49408")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--start", type=int, default=0, help="PRSL's window of wrong-class ranks")
  p.add_argument("--end", type=int, default=4)
  p.add_argument("--weight", type=float, default=1e-3, help="PRSL's b")
  p.add_argument("--repeats", type=int, default=20, help="timed calls per loss (best-of)")
  p.add_argument("--no_step", action="store_true", help="skip part 2 (the fine-tuning step)")
  p.add_argument("--step_batch_size", type=int, default=8)
  p.add_argument("--step_repeats", type=int, default=1)
  p.add_argument("--quick", action="store_true", help="small ViT for the step (smoke test)")
  return p.parse_args(argv)


def loss_grad_fn(name, args):
  """Jitted logits, labels -> (batch loss, d loss / d logits)."""
  kwargs = dict(start=args.start, end=args.end, weight=args.weight) if name == "prsl" else {}
  fn = losses.get_loss(name, **kwargs)
  return jax.jit(jax.value_and_grad(lambda z, y: fn(z, y)))


def time_losses(batch, num_classes, args):
  z = 3.0 * jax.random.normal(jax.random.key(0), (batch, num_classes), jnp.float32)
  y = jax.random.randint(jax.random.key(1), (batch,), 0, num_classes)
  fns = {name: functools.partial(loss_grad_fn(name, args), z, y) for name in ("ce", "prsl")}
  t = common.interleaved(fns, warmup=2, repeats=args.repeats)
  out = {name: {"min_s": v["min_s"], "median_s": v["median_s"]} for name, v in t.items()}
  out["ratio_prsl_over_ce_min"] = t["prsl"]["min_s"] / t["ce"]["min_s"]
  out["ratio_prsl_over_ce_median"] = t["prsl"]["median_s"] / t["ce"]["median_s"]
  out["added_s_min"] = t["prsl"]["min_s"] - t["ce"]["min_s"]
  return out


def step_share(args, micro_added_s):
  import train_step  # pylint: disable=g-import-not-at-top
  clip = common.make_clip(args.quick)
  cls = common.class_embeddings(1000)
  x, y = common.images_and_labels(args.step_batch_size, clip.model.image_size, 1000)
  exes, flops, compile_s = {}, {}, {}
  for name in ("ce", "prsl"):
    targs = train_step.parse_args(["--loss", name, "--start", str(args.start), "--end",
                                   str(args.end), "--weight", str(args.weight)])
    exes[name], cs, exe = train_step.jax_step(clip, cls, train_step.make_config(targs), x, y)
    ca = exe.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops[name] = float(ca.get("flops", float("nan")))
    compile_s[name] = round(cs, 2)
  t = common.interleaved(exes, warmup=0, repeats=args.step_repeats)
  step_s = t["ce"]["min_s"]
  return {
      "step": "training.make_train_step: PGD-2 (CE) + loss + AdamW, 1000 classes",
      "step_batch_size": args.step_batch_size,
      "step_flops": flops,
      "share_flops": (flops["prsl"] - flops["ce"]) / flops["ce"],
      "micro_added_s": micro_added_s,
      "step_ce_s": t["ce"], "step_prsl_s": t["prsl"],
      "share_micro": micro_added_s / step_s,
      "share_direct": (t["prsl"]["min_s"] - t["ce"]["min_s"]) / t["ce"]["min_s"],
      "compile_s": compile_s,
  }


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  per_c = {}
  for c in [int(v) for v in args.classes.split(",")]:
    per_c[str(c)] = time_losses(args.batch_size, c, args)
    print(f"# C={c}: prsl/ce = {per_c[str(c)]['ratio_prsl_over_ce_min']:.2f}",
          file=sys.stderr, flush=True)
  out = {"loss": f"get_loss('prsl', start={args.start}, end={args.end}, weight={args.weight})"
                 f" vs get_loss('ce'), jitted forward+backward w.r.t. logits, batch "
                 f"{args.batch_size}",
         "per_num_classes": per_c}
  if not args.no_step:
    micro = time_losses(args.step_batch_size, 1000, args)
    share = step_share(args, micro["added_s_min"])
    share["target"] = "PRSL adds < 5% to a fine-tuning step at 1000 classes"
    share["met"] = bool(share["share_micro"] < 0.05 and share["share_flops"] < 0.05)
    out["finetune_step_share"] = share
    out["model"] = "quick" if args.quick else "ViT-B/32 vision tower, random weights"
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  common.emit("loss_cost", out)


if __name__ == "__main__":
  main()
