r"""evaluate.py's standard suite against AutoAttack in PyTorch, whole process each.

  python bench/autoattack_compare.py                                # tiny CLIP, 128 digits
  python bench/autoattack_compare.py --model vitb32 --num_examples 8 --eps 1/255

The same zero-shot classifier (the bundled tiny CLIP, or a random-weight
ViT-B/32 saved as a HuggingFace folder), the same seeded subset of the digits
test split, the same budgets, and AutoAttack's standard ensemble on both sides:

  ours   `python evaluate.py --suite standard` (APGD-CE, APGD-T, FAB-T, Square;
         100 steps, 9 targets, 5000 queries), run twice: with an empty
         persistent compilation cache (cold) and again (warm);
  torch  torchattacks' APGD, APGDT, FAB (multi-targeted) and Square in a
         MultiAttack cascade with AutoAttack's standard settings (100 steps, 1
         restart, n_classes - 1 targets, 5000 queries), on transformers'
         PyTorch CLIPModel with the same weights and prompts, torch threads =
         cores. torchattacks' own AutoAttack(version="standard") would build
         these with its 10-step defaults, hence the explicit cascade.

Each side is one subprocess, timed whole (start-up, loading, clean pass,
compilation, attacks), after waiting for the 1-minute load average to fall
below 1; the JSON records wall, user and system seconds, both robust
accuracies, and the load average each process started on. A ratio whose runs
started above load 1 is reported as null with the reason: on a shared machine
it can flatter either side.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET_LOAD = common.QUIET_LOAD


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=("tiny", "vitb32"), default="tiny")
  p.add_argument("--num_examples", type=int, default=128)
  p.add_argument("--eps", default="1/255,2/255")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=128, help="ours: examples per attack call")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--queries", type=int, default=5000)
  p.add_argument("--sides", default="ours,torch", help="subset of ours,torch")
  p.add_argument("--torch_worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _eps(text):
  import fractions  # pylint: disable=g-import-not-at-top
  return [float(fractions.Fraction(e)) for e in text.split(",")]


def vitb32_checkpoint(folder):
  """A random-weight ViT-B/32 CLIP with a word tokenizer for the digit prompts."""
  import prsl_jax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  from prsl_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  pretrained = common.make_clip()
  words = [f"This is a photo of a {n}" for n in data.DIGIT_NAMES]
  size = tokenizer_lib.build_word_tokenizer(words, folder, 16)
  assert size <= pretrained.model.config.text.vocab_size
  tok = transformers.CLIPTokenizerFast.from_pretrained(folder)
  prsl_jax.save_pretrained(pretrained.model, pretrained.params, folder, tokenizer=tok)
  return folder


def timed(cmd, env=None):
  """Runs cmd; returns (wall, user, sys, stdout, load before, load after)."""
  load0 = common.wait_for_quiet(QUIET_LOAD)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
  return dict(wall_s=round(wall, 1), user_s=round(after.ru_utime - before.ru_utime, 1),
              sys_s=round(after.ru_stime - before.ru_stime, 1), load_before=load0,
              load_after=os.getloadavg()[0]), proc.stdout


def run_ours(args, checkpoint, tmp, cache):
  out = os.path.join(tmp, f"ours_{len(os.listdir(tmp))}")
  cmd = [sys.executable, "evaluate.py", "--checkpoint", checkpoint, "--dataset", "digits",
         "--eps", args.eps, "--suite", "standard", "--num_examples", str(args.num_examples),
         "--seed", str(args.seed), "--batch_size", str(args.batch_size),
         "--steps", str(args.steps), "--square_queries", str(args.queries),
         "--outdir", out, "--compilation_cache_dir", cache]
  times, _ = timed(cmd)
  with open(os.path.join(out, "results.json")) as f:
    (model,) = json.load(f)["models"].values()
  robust = [r["robust_accuracy"] for r in model["robust"]["standard"]]
  return dict(times, clean_accuracy=model["clean_accuracy"], robust_accuracy=robust,
              timing=model["timing"])


def torch_worker(args):
  """The PyTorch side (in its own process): AutoAttack's standard cascade."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  threads = common.set_torch_threads()
  hf = transformers.CLIPModel.from_pretrained(args.checkpoint).eval()
  tok = transformers.CLIPTokenizerFast.from_pretrained(args.checkpoint)
  with open(os.path.join(args.checkpoint, "preprocessor_config.json")) as f:
    pre = json.load(f)
  mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
  std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
  prompts = [f"This is a photo of a {n}" for n in data.DIGIT_NAMES]
  enc = tok(prompts, padding="max_length", max_length=hf.config.text_config.max_position_embeddings,
            truncation=True, return_tensors="pt")
  with torch.no_grad():
    cls = hf.get_text_features(**enc)
    cls = getattr(cls, "pooler_output", cls)
    cls = cls / cls.norm(dim=-1, keepdim=True)

  class ZeroShot(torch.nn.Module):
    def forward(self, x):  # x: (B, 3, H, W) in [0, 1]
      img = hf.get_image_features(pixel_values=(x - mean) / std)
      img = getattr(img, "pooler_output", img)
      img = img / img.norm(dim=-1, keepdim=True)
      return hf.logit_scale.exp() * img @ cls.T

  model = ZeroShot().eval()
  source, _ = data.load("digits", "test", image_size=hf.config.vision_config.image_size)
  idx = data.eval_indices(len(source), args.num_examples, args.seed)
  batch = next(data.eval_batches(source, idx, len(idx)))
  x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(batch["label"].astype(np.int64))
  with torch.no_grad():
    clean = model(x).argmax(1) == y
  out = {"threads": threads, "clean_accuracy": float(clean.float().mean()), "robust": []}
  for eps in _eps(args.eps):
    kw = dict(eps=eps, norm="Linf", seed=args.seed, n_restarts=1)
    cascade = torchattacks.MultiAttack([
        torchattacks.APGD(model, loss="ce", steps=args.steps, **kw),
        torchattacks.APGDT(model, n_classes=10, steps=args.steps, **kw),
        torchattacks.FAB(model, multi_targeted=True, n_classes=10, steps=args.steps, **kw),
        torchattacks.Square(model, n_queries=args.queries, **kw),
    ])
    t0 = time.perf_counter()
    adv = cascade(x, y)
    with torch.no_grad():
      robust = (model(adv).argmax(1) == y) & clean
      dist = (adv - x).abs().amax()
    out["robust"].append({"eps": eps, "robust_accuracy": float(robust.float().mean()),
                          "max_distance": float(dist), "seconds": time.perf_counter() - t0})
  print("RESULT" + json.dumps(out))


def run_torch(args, checkpoint):
  cmd = [sys.executable, os.path.abspath(__file__), "--torch_worker", "1", "--checkpoint",
         checkpoint, "--num_examples", str(args.num_examples), "--eps", args.eps,
         "--seed", str(args.seed), "--steps", str(args.steps), "--queries", str(args.queries)]
  times, stdout = timed(cmd)
  res = json.loads(stdout.split("RESULT", 1)[1])
  return dict(times, clean_accuracy=res["clean_accuracy"], threads=res["threads"],
              robust_accuracy=[r["robust_accuracy"] for r in res["robust"]],
              attack_seconds=[round(r["seconds"], 1) for r in res["robust"]])


def main(argv=None):
  args = parse_args(argv)
  if args.torch_worker:
    return torch_worker(args)
  sides = args.sides.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    import prsl_jax  # pylint: disable=g-import-not-at-top
    checkpoint = prsl_jax.TINY_CLIP if args.model == "tiny" else \
        vitb32_checkpoint(os.path.join(tmp, "vitb32"))
    cache = os.path.join(tmp, "jax_cache")
    result = {"model": args.model, "num_examples": args.num_examples, "eps": args.eps,
              "steps": args.steps, "queries": args.queries, "batch_size": args.batch_size}
    if "ours" in sides:
      result["ours_cold"] = run_ours(args, checkpoint, tmp, cache)
      result["ours_warm"] = run_ours(args, checkpoint, tmp, cache)
    if "torch" in sides:
      result["torch"] = run_torch(args, checkpoint)
  if "ours" in sides and "torch" in sides:
    # The load each process started on (its own threads raise the average
    # while it runs, so the load after it is no measure of other work).
    loads = [r["load_before"] for r in (result["ours_cold"], result["ours_warm"],
                                        result["torch"])]
    if max(loads) > QUIET_LOAD:
      result["speedup"] = None
      result["speedup_note"] = (f"not reported: load average up to {max(loads):.2f} > "
                                f"{QUIET_LOAD} during the runs")
    else:
      result["speedup"] = {
          "cold": round(result["torch"]["wall_s"] / result["ours_cold"]["wall_s"], 2),
          "warm": round(result["torch"]["wall_s"] / result["ours_warm"]["wall_s"], 2)}
  common.emit("autoattack_compare", result)


if __name__ == "__main__":
  main()
