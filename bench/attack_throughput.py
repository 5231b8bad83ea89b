r"""PGD L-inf attack throughput on a CLIP ViT-B/32-shaped vision tower, ours vs PyTorch.

  python bench/attack_throughput.py                      # the issue's figures
  python bench/attack_throughput.py --quick              # smoke test, ~1 min
  python bench/attack_throughput.py --batch_sizes 8 --frameworks jax,torch

What runs, per batch size, on the same random weights and images:
  jax          prsl_jax.attacks.pgd through prsl_jax.zeroshot.Classifier, jitted
               once per shape with the params as an argument (float32 compute);
  jax_bf16     the same with the model's compute dtype bfloat16 (params,
               logits and input gradients stay float32);
  torch        the same attack written in PyTorch (common.torch_pgd: same random
               start, steps, projection, best-iterate tracking and last scoring
               pass) on transformers' CLIPModel vision tower, torch threads = cores;
  torchattacks torchattacks.PGD on the same torch model (no best-iterate tracking,
               no last scoring pass: slightly less work than ours), if installed.

Before timing, the clean logits of ours and torch's are compared (max abs diff).
Model FLOPs utilisation: FLOPs of one attack step from XLA's cost analysis of the
jitted step (checked against the analytic count) times the number of passes,
divided by the measured time, against the float32 matmul peak measured in this
run (best of jitted 2048^3 jnp.dot calls, before and after the attacks).

Prints one JSON object and appends it to bench/results.jsonl. On a shared
machine timings are noisy: the JSON records os.getloadavg() and each call's time;
frameworks are timed round-robin so they see the same load.
"""

import argparse
import functools
import sys
import time

import common

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from prsl_jax import attacks  # pylint: disable=wrong-import-position

FRAMEWORKS = ("jax", "jax_bf16", "torch", "torchattacks")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_sizes", default="8,16,32", help="comma-separated batch sizes")
  p.add_argument("--steps", type=int, default=10, help="PGD steps (PGD-10)")
  p.add_argument("--eps", type=float, default=4 / 255, help="L-inf budget on [0, 1] pixels")
  p.add_argument("--num_classes", type=int, default=1000, help="zero-shot classes")
  p.add_argument("--repeats", type=int, default=1, help="timed calls per setting")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed calls per setting before timing (default 0; 1 with --quick)")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help=f"subset of {','.join(FRAMEWORKS)}")
  p.add_argument("--extra_batch_sizes", default="",
                 help="bf16 and torchattacks run only at the first batch size unless "
                      "their batch sizes are listed here too (comma-separated)")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = the number of cores")
  p.add_argument("--no_random_start", action="store_true",
                 help="start every attack at the clean image (the issue 14 setting)")
  p.add_argument("--max_load", type=float, default=common.QUIET_LOAD,
                 help="wait (up to 4 min) for a load average below this before timing; "
                      "ratios are withheld when it was not reached")
  p.add_argument("--quick", action="store_true",
                 help="small ViT (64 px, patch 16, width 128, 2 layers) for smoke tests")
  return p.parse_args(argv)


def _ints(s):
  return [int(v) for v in s.split(",") if v.strip()]


def jax_attack(classify, steps, eps, random_start=True):
  """Jitted (variables, images, labels, key) -> adversarial images (PGD-`steps`, L-inf, CE).

  classify: a value-hashable model under attack (common.classifier), static.
  """
  def run(variables, images, labels, key):
    return attacks.pgd(classify.bind(variables), images, labels, key=key, eps=eps,
                       steps=steps, random_start=random_start)
  return jax.jit(run)


def step_flops(classify, variables, images, labels):
  """XLA's FLOP count of one attack step (value and input gradient of the CE sum)."""
  def step(variables, x):
    logits_fn = classify.bind(variables)
    return jax.value_and_grad(lambda x: jnp.sum(attacks.ce_objective(logits_fn(x), labels)))(x)
  def fwd(variables, x):
    return classify(variables, x)
  out = {}
  for name, fn in (("step", step), ("forward", fwd)):
    ca = jax.jit(fn).lower(variables, images).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out[name] = float(ca.get("flops", float("nan")))
  return out


def hot_path_checks(classify, variables, images, labels, steps, eps):
  """Structural checks of the jitted attack (cheap: tracing and lowering only).

  - host round trips: no callback primitives anywhere in the attack's jaxpr;
  - one loop: the steps run inside one loop (lax.fori_loop with static bounds
    lowers to a scan), so the program (and its compile time) does not grow
    with `steps`: the lowered program for `steps` and for 1 step have the same size;
  - attention: the model calls jax.nn.dot_product_attention (a source check:
    on CPU it lowers to plain XLA ops, leaving no name in the jaxpr).
  """
  import inspect  # pylint: disable=g-import-not-at-top
  from prsl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  def run(variables, images, labels, key):
    return attacks.pgd(classify.bind(variables), images, labels, key=key, eps=eps,
                       steps=steps)
  text = str(jax.make_jaxpr(run)(variables, images, labels, jax.random.key(0)))
  callbacks = [p for p in ("pure_callback", "io_callback", "debug_callback", "host_callback")
               if p in text]
  hlo_1 = jax_attack(classify, 1, eps).lower(
      variables, images, labels, jax.random.key(0)).as_text()
  hlo_n = jax_attack(classify, steps, eps).lower(
      variables, images, labels, jax.random.key(0)).as_text()
  return {
      "host_callbacks_in_attack": callbacks,
      "loops_in_jaxpr": text.count("while[") + text.count("scan["),
      "program_size_ratio_steps_n_vs_1": round(len(hlo_n) / len(hlo_1), 3),
      "uses_dot_product_attention": "jax.nn.dot_product_attention(" in inspect.getsource(
          clip_lib.Attention),
  }


def recompile_check(cls, eps, steps):
  """Calls the jitted attack on two different batches/keys of one shape and
  counts backend compilations: expected exactly 1 (one per shape). Uses the
  --quick model: the check is structural and the same for any size."""
  classify, variables = common.classifier(common.make_clip(quick=True), cls)
  count = []
  def listener(event, duration, **kw):
    del duration, kw
    if event == "/jax/core/compile/backend_compile_duration":
      count.append(1)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn = jax_attack(classify, steps, eps)
    s = classify.model.image_size
    for seed in (0, 1):
      x, y = common.images_and_labels(2, s, cls.shape[0], seed=seed)
      common.block(fn(variables, x, y, jax.random.key(seed)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return {"backend_compiles_for_2_calls_same_shape": len(count), "jit_cache_size": fn._cache_size()}  # pylint: disable=protected-access


class _TorchModule:
  """torchattacks wants an nn.Module returning logits; built lazily (imports torch)."""

  @staticmethod
  def make(zs):
    import torch  # pylint: disable=g-import-not-at-top

    class Wrapped(torch.nn.Module):
      def __init__(self):
        super().__init__()
        self.clip = zs.model

      def forward(self, x):
        return zs(x)
    return Wrapped().eval()


def main(argv=None):
  args = parse_args(argv)
  frameworks = [f for f in args.frameworks.split(",") if f]
  for f in frameworks:
    if f not in FRAMEWORKS:
      raise SystemExit(f"--frameworks: unknown {f!r}; choose from {FRAMEWORKS}")
  if args.warmup is None:
    args.warmup = 1 if args.quick else 0
  batch_sizes = _ints(args.batch_sizes)
  extra = set(_ints(args.extra_batch_sizes)) | {batch_sizes[0]}
  t_start = time.perf_counter()
  notes = []
  loads = []  # the load average before each batch size's timed calls

  clip = common.make_clip(args.quick)
  vision = common.QUICK_VISION if args.quick else common.VITB32_VISION
  size = clip.model.image_size
  cls = common.class_embeddings(args.num_classes)
  classify, variables = common.classifier(clip, cls)
  classify_bf16 = None
  if "jax_bf16" in frameworks:
    classify_bf16, _ = common.classifier(common.with_dtype(clip, jnp.bfloat16), cls)

  torch_threads = None
  zs = ta_model = None
  if "torch" in frameworks or "torchattacks" in frameworks:
    import torch  # pylint: disable=g-import-not-at-top
    torch_threads = common.set_torch_threads(args.torch_threads or None)
    torch.manual_seed(0)
    zs = common.TorchZeroShot(common.torch_clip(clip, args.quick), np.asarray(cls),
                              clip.model.config.vision.image_mean,
                              clip.model.config.vision.image_std)
  torchattacks = None
  if "torchattacks" in frameworks:
    try:
      import torchattacks  # pylint: disable=g-import-not-at-top
      ta_model = _TorchModule.make(zs)
    except ImportError as e:
      notes.append(f"torchattacks not installed ({e}); `pip install torchattacks --no-deps` "
                   "adds it (it imports without torchvision)")
      frameworks.remove("torchattacks")

  # The matmul peak is measured before the attacks and after each batch size;
  # the best of these is the reference (on a shared machine any one reading
  # can land in a busy moment).
  peaks = [common.matmul_peak()]

  # Sanity: ours and torch's clean logits on the same weights and images.
  sanity = {}
  x8, y8 = common.images_and_labels(batch_sizes[0], size, args.num_classes)
  ours = np.asarray(jax.jit(classify)(variables, x8))
  if zs is not None:
    import torch  # pylint: disable=g-import-not-at-top
    with torch.no_grad():
      theirs = zs(common.nchw(x8)).numpy()
    sanity["max_abs_logit_diff_jax_vs_torch"] = float(np.abs(ours - theirs).max())
    sanity["same_argmax_fraction"] = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
  if classify_bf16 is not None:
    ours16 = np.asarray(jax.jit(classify_bf16)(variables, x8))
    sanity["max_abs_logit_diff_bf16_vs_f32"] = float(np.abs(ours16 - ours).max())
  sanity["max_abs_logit"] = float(np.abs(ours).max())

  flops = step_flops(classify, variables, x8, y8)
  per_image = {
      "step_flops_xla": flops["step"] / batch_sizes[0],
      "forward_flops_xla": flops["forward"] / batch_sizes[0],
      "forward_flops_analytic": float(common.vit_flops_per_image(vision, num_classes=args.num_classes)),
  }
  # Attack = `steps` value-and-grad passes + one last forward (see attacks.pgd).
  per_image["attack_flops_xla"] = args.steps * per_image["step_flops_xla"] + per_image["forward_flops_xla"]
  per_image["attack_flops_analytic"] = float(
      common.attack_flops_per_image(vision, args.steps, args.num_classes))

  checks = hot_path_checks(classify, variables, x8, y8, args.steps, args.eps)
  checks.update(recompile_check(cls, args.eps, args.steps))

  results = []
  for b in batch_sizes:
    x, y = common.images_and_labels(b, size, args.num_classes, seed=b)
    key = jax.random.key(b)
    fns, compile_s = {}, {}
    if "jax" in frameworks:
      t0 = time.perf_counter()
      # AOT: compile once for this shape, outside the timed calls.
      exe = jax_attack(classify, args.steps, args.eps, random_start=not args.no_random_start).lower(variables, x, y, key).compile()
      compile_s["jax"] = time.perf_counter() - t0
      fns["jax"] = functools.partial(exe, variables, x, y, key)
    if "jax_bf16" in frameworks and b in extra:
      t0 = time.perf_counter()
      exe16 = jax_attack(classify_bf16, args.steps, args.eps,
                         random_start=not args.no_random_start).lower(
          variables, x, y, key).compile()
      compile_s["jax_bf16"] = time.perf_counter() - t0
      fns["jax_bf16"] = functools.partial(exe16, variables, x, y, key)
    if "torch" in frameworks or "torchattacks" in frameworks:
      import torch  # pylint: disable=g-import-not-at-top
      xt, yt = common.nchw(x), torch.from_numpy(y).long()
      gen = torch.Generator().manual_seed(b)
      if "torch" in frameworks:
        fns["torch"] = functools.partial(common.torch_pgd, zs, xt, yt, eps=args.eps,
                                         steps=args.steps, generator=gen,
                                         random_start=not args.no_random_start)
      if "torchattacks" in frameworks and b in extra:
        atk = torchattacks.PGD(ta_model, eps=args.eps, alpha=2.5 * args.eps / args.steps,
                               steps=args.steps, random_start=not args.no_random_start)
        fns["torchattacks"] = functools.partial(atk, xt, yt)
    # By default no warmup call: one ViT-B/32 PGD-10 call is tens of seconds on a
    # CPU, JAX's compilation is already done (AOT above) and torch has no
    # compile step; the first-call overheads (<0.5 s) are small beside that.
    loads.append(common.wait_for_quiet(args.max_load))
    timed = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    for name, t in timed.items():
      row = {"framework": name, "batch_size": b, **t,
             "images_per_s": b / t["median_s"], "images_per_s_best": b / t["min_s"]}
      if name in compile_s:
        row["compile_s"] = round(compile_s[name], 2)
      if name.startswith("jax"):
        row["achieved_flops_per_s"] = per_image["attack_flops_xla"] * b / t["median_s"]
        row["achieved_flops_per_s_best"] = per_image["attack_flops_xla"] * b / t["min_s"]
      results.append(row)
    peaks.append(common.matmul_peak())
    print(f"# batch {b}: " + ", ".join(f"{n} {b / t['median_s']:.3f} img/s" for n, t in timed.items()),
          file=sys.stderr, flush=True)

  peak = max(p["best_flops_per_s"] for p in peaks)
  ratios, mfu = {}, {}
  for r in results:
    if r["framework"].startswith("jax"):
      r["mfu_vs_measured_matmul_peak"] = r["achieved_flops_per_s"] / peak
      r["mfu_best_vs_measured_matmul_peak"] = r["achieved_flops_per_s_best"] / peak
      mfu[f"{r['framework']}@{r['batch_size']}"] = round(r["mfu_vs_measured_matmul_peak"], 3)
  by = {(r["framework"], r["batch_size"]): r for r in results}
  for (name, b), r in by.items():
    if name == "jax":
      for base in ("torch", "torchattacks"):
        if (base, b) in by:
          ratios[f"jax/{base}@{b}"] = round(r["images_per_s"] / by[(base, b)]["images_per_s"], 3)
      if ("jax_bf16", b) in by:
        ratios[f"jax_bf16/jax@{b}"] = round(by[("jax_bf16", b)]["images_per_s"] / r["images_per_s"], 3)

  ratios, load_note = common.gate_on_load(ratios, loads, args.max_load)
  notes.append(load_note)
  common.emit("attack_throughput", {
      "model": "quick" if args.quick else "ViT-B/32 vision tower (224 px, patch 32, width 768, "
                                          "12 layers, 12 heads, projection 512), random weights",
      "attack": f"PGD-{args.steps} L-inf eps={args.eps:.5f} CE, "
                f"{'no' if args.no_random_start else 'random'} start, {args.num_classes} classes",
      "torch_threads": torch_threads,
      "sanity": sanity,
      "flops_per_image": per_image,
      "hot_path": checks,
      "matmul_peak_flops_per_s": peak,
      "matmul_peak_runs": peaks,
      "results": results,
      "ratios": ratios,
      "load_before_timed_calls": loads,
      "mfu": mfu,
      "notes": notes,
      "wall_s": round(time.perf_counter() - t_start, 1),
  })


if __name__ == "__main__":
  main()
