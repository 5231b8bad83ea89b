r"""Adversarial fine-tuning step (PGD-2 + PRSL + AdamW), steps/s, ours vs PyTorch.

  python bench/train_step.py                      # ViT-B/32 vision tower, batch 8
  python bench/train_step.py --quick              # smoke test
  python bench/train_step.py --batch_size 16 --dtype bfloat16 --remat

Ours: prsl_jax.training.make_train_step (the trainer's own jitted, state-donated
shard_map step) with a TeCoA-style config: PGD-2 L-inf (eps 1/255) on the
zero-shot logits against random unit class embeddings (text frozen), then the
authors' PRSL (window 0:4, weight 1e-3, the global batch as its group) on the
adversarial images, gradients w.r.t. the vision tower, AdamW behind global-norm
clipping at 1.0.

PyTorch: the same on transformers' CLIPModel holding the same weights: the same
PGD (common.torch_pgd, params frozen during the attack), the authors' PRSL written
in torch (torch_prsl; docs/design.md section 1), clip_grad_norm_(1.0) and
torch.optim.AdamW on the vision tower and projection. Torch threads = cores.

Prints one JSON object and appends it to bench/results.jsonl.
"""

import argparse
import functools
import time

import common

import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--attack_steps", type=int, default=2)
  p.add_argument("--eps", type=float, default=1 / 255)
  p.add_argument("--loss", default="prsl", choices=("prsl", "ce", "topk_ce"))
  p.add_argument("--start", type=int, default=0, help="PRSL's window of wrong-class ranks")
  p.add_argument("--end", type=int, default=4)
  p.add_argument("--weight", type=float, default=1e-3, help="PRSL's b")
  p.add_argument("--k", type=int, default=3, help="topk_ce's k")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per framework")
  p.add_argument("--repeats", type=int, default=2, help="timed steps per framework")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="our compute dtype (torch stays float32)")
  p.add_argument("--remat", action="store_true", help="rematerialise our encoder layers")
  p.add_argument("--frameworks", default="jax,torch")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = the number of cores")
  p.add_argument("--max_load", type=float, default=common.QUIET_LOAD,
                 help="wait (up to 4 min) for a load average below this before timing; "
                      "the ratio is withheld when it was not reached")
  p.add_argument("--quick", action="store_true", help="small ViT for smoke tests")
  return p.parse_args(argv)


def make_config(args):
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.base_config()
  c.loss.name = args.loss
  c.loss.start, c.loss.end = args.start, args.end
  c.loss.weight = args.weight
  c.loss.k = args.k
  c.adversarial.enabled = True
  c.adversarial.eps = args.eps
  c.adversarial.steps = args.attack_steps
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  return c


def jax_step(pretrained, cls, config, x, y):
  """prsl_jax's trainer step, compiled: (run, compile seconds, executable).

  run() takes one step and returns its metrics; the step donates its state, so
  run feeds each new state to the next call.
  """
  from prsl_jax import sharding  # pylint: disable=g-import-not-at-top
  from prsl_jax import losses  # pylint: disable=g-import-not-at-top
  from prsl_jax import tasks  # pylint: disable=g-import-not-at-top
  from prsl_jax import training  # pylint: disable=g-import-not-at-top
  model, params, _ = pretrained
  mesh = sharding.make_mesh()
  tx = training.make_optimizer(config.optimizer, 1000, params,
                               training.trainable_keys(model, config.train_towers))
  holder = {"state": sharding.replicate(training.init_state(params, tx, config.seed), mesh)}
  batch = sharding.to_global({"image": x, "label": y}, mesh)
  head = sharding.replicate({"class_emb": cls}, mesh)
  step = training.make_train_step(mesh, model=model, task=tasks.get(config.objective),
                                  loss_fn=losses.from_config(config.loss),
                                  adversarial=config.adversarial, tx=tx)
  t0 = time.perf_counter()
  exe = step.lower(holder["state"], batch, head).compile()
  compile_s = time.perf_counter() - t0

  def run():
    holder["state"], metrics = exe(holder["state"], batch, head)
    return metrics
  return run, compile_s, exe


def torch_prsl(logits, labels, start, end, weight, ce_weight=1.0):
  """The authors' PRSL (docs/design.md section 1) in torch: one group, the batch.

  m_i = mean of row i's wrong-class logits ranked start..end-1 (descending),
  x = n * logsumexp(m) - sum(m); returns ce_weight * mean CE + weight * x.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  z = logits.float()
  ce = F.cross_entropy(z, labels)
  wrong = z.scatter(1, labels[:, None], float("-inf"))
  m = wrong.topk(end, dim=-1).values[:, start:end].mean(-1)
  x = m.numel() * torch.logsumexp(m, dim=0) - m.sum()
  return ce_weight * ce + weight * x


def torch_step_fn(clip, cls, args, quick):
  """A closure running one PyTorch adversarial fine-tuning step on (x, y)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model = common.torch_clip(clip, quick)
  zs = common.TorchZeroShot(model, np.asarray(cls), clip.model.config.vision.image_mean,
                            clip.model.config.vision.image_std)
  trainable = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
  gen = torch.Generator().manual_seed(0)

  def step(xt, yt):
    for p in trainable:  # the attack sees frozen params (stop_gradient in ours)
      p.requires_grad_(False)
    x_adv = common.torch_pgd(zs, xt, yt, eps=args.eps, steps=args.attack_steps, generator=gen)
    for p in trainable:
      p.requires_grad_(True)
    logits = zs(x_adv.detach())
    if args.loss == "prsl":
      loss = torch_prsl(logits, yt, args.start, args.end, args.weight)
    else:
      loss = F.cross_entropy(logits, yt)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    acc = (logits.argmax(-1) == yt).float().mean()
    return loss.detach(), acc, grad_norm
  return step


def _loss_args(args):
  if args.loss == "prsl":
    return f"window {args.start}:{args.end}, weight={args.weight}"
  return f"k={args.k}" if args.loss == "topk_ce" else "no arguments"


def main(argv=None):
  args = parse_args(argv)
  frameworks = [f for f in args.frameworks.split(",") if f]
  if "torch" in frameworks and args.loss not in ("prsl", "ce"):
    raise SystemExit(f"--loss {args.loss}: the PyTorch step has prsl and ce only; "
                     "use --frameworks jax")
  t_start = time.perf_counter()
  clip = common.make_clip(args.quick)
  clip_ours = common.with_dtype(clip, jnp.dtype(args.dtype), remat=args.remat) \
      if args.dtype != "float32" or args.remat else clip
  cls = common.class_embeddings(args.num_classes)
  size = clip.model.image_size
  x, y = common.images_and_labels(args.batch_size, size, args.num_classes)
  config = make_config(args)

  fns, extra = {}, {}
  if "jax" in frameworks:
    fns["jax"], compile_s, exe = jax_step(clip_ours, cls, config, x, y)
    extra["jax_compile_s"] = round(compile_s, 2)
    ca = exe.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    extra["jax_step_flops_xla"] = float(ca.get("flops", float("nan")))
  torch_threads = None
  if "torch" in frameworks:
    import torch  # pylint: disable=g-import-not-at-top
    torch_threads = common.set_torch_threads(args.torch_threads or None)
    torch.manual_seed(0)
    step = torch_step_fn(clip, cls, args, args.quick)
    xt, yt = common.nchw(x), torch.from_numpy(y).long()
    fns["torch"] = functools.partial(step, xt, yt)

  load = common.wait_for_quiet(args.max_load)
  timed = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
  results = {name: {**t, "steps_per_s": 1.0 / t["median_s"], "steps_per_s_best": 1.0 / t["min_s"],
                    "images_per_s": args.batch_size / t["median_s"]}
             for name, t in timed.items()}
  ratio = None
  if "jax" in results and "torch" in results:
    ratio = round(results["jax"]["steps_per_s"] / results["torch"]["steps_per_s"], 3)
  ratio, load_note = common.gate_on_load(ratio, [load], args.max_load)

  common.emit("train_step", {
      "model": "quick" if args.quick else "ViT-B/32 vision tower, random weights",
      "step": (f"PGD-{args.attack_steps} L-inf eps={args.eps:.5f} (CE) + {args.loss} "
               f"({_loss_args(args)}) + AdamW, grad clip 1.0, vision tower trained"),
      "batch_size": args.batch_size, "num_classes": args.num_classes,
      "dtype": args.dtype, "remat": args.remat, "torch_threads": torch_threads,
      "results": results, "ratio_jax_over_torch": ratio, "load_before": load,
      "load_note": load_note, **extra,
      "wall_s": round(time.perf_counter() - t_start, 1),
  })


if __name__ == "__main__":
  main()
