r"""Does the authors' PRSL make CLIP robust? The study, on the embedded digits benchmark.

  python -m scripts.prsl_study                                 # the full study, runs/study
  python -m scripts.prsl_study --quick --outdir /tmp/study_q   # a 1-2 minute smoke run

Fine-tunes the bundled tiny CLIP (prsl_jax.TINY_CLIP; vision tower, text frozen,
global batch 32) on the digits with cross-entropy, the authors' PRSL
(arXiv:2402.03627; karlieswift/Mattack lossfunctions.py) over a grid of windows
and weights, PRSL in groups of 8, the authors' DRSL, our old misreading (top-k
probability variance, an ablation), adversarial fine-tuning with CE (TeCoA) and
with PRSL, and the field's FARE and PMG-AFT at the same attack budget; three
training seeds each (configs/study_common.py has the rows and why their
weights). Every model, and the starting one under each seed, is evaluated on
the same fixed subset of the digits test split:

- clean accuracy on the whole test split (359 images);
- robust accuracy at L-inf 1/255, 2/255, 4/255 under
  * 'standard': AutoAttack's cascade (APGD-CE, APGD-T, FAB-T, Square; worst case
    per example), with the accuracy after each attack;
  * 'pgd-ce': PGD-CE alone;
  * 'paper': the paper's protocol, BIM-10 (sign steps, no random start) through
    the model's own training loss (the start, CE, TeCoA, FARE and PMG-AFT rows:
    through CE; FARE's and PMG-AFT's losses need the frozen original model);
  * 'bim-ce': the same BIM-10 through CE, for models trained with another loss;
  * 'bim@ROW' (the start and CE models only): BIM-10 through ROW's training
    loss, the control that tells a more robust model from a weaker attack;
- output diversity on the clean test images: the mean entropy of the softmax and
  of its top-3 part, and PRSL's spread x - n log n (groups of the batch size);
- how far training moved the vision parameters from the start.

Before any training it measures, at the starting model on the first training
batches, ||grad CE|| / ||grad penalty|| for every penalty of the rows (w.r.t. the
logits and the vision parameters, on clean and on PGD-2 images): the numbers the
weights were chosen from (written to gradient_ratios.json and study.json).

Attack budgets are reduced from AutoAttack's so the study fits a few hours on 2
busy CPU cores: STUDY below, printed beside the results.

Resumable: each (row, seed) trains in <outdir>/runs/<row>/seed<s> (the trainer
resumes from its checkpoint) and its evaluation is cached there as eval.json, so
a rerun skips everything that finished. Changed training settings for a row with
outputs are an error (use a new --outdir); changed evaluation settings evaluate
the kept model again. Compiled programs are cached in <outdir>/jax_cache.

Writes <outdir>/study.json (every number, settings, gradient ratios, timings,
machine load), study.md (the tables), weights.png, tradeoff.png and
robust_vs_eps.png, and prints the tables and the wall time. RESULTS.md at the
repo root is written from a full run.
"""

import argparse
import functools
import glob
import hashlib
import json
import math
import os
import platform
import resource
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from configs import base
from configs import study_common
from scripts.prsl_study_reports import KEY_EPS
from scripts.prsl_study_reports import eps_key
from scripts.prsl_study_reports import mean_std
from scripts.prsl_study_reports import paired
from scripts.prsl_study_reports import plots
from scripts.prsl_study_reports import tables
from prsl_jax import attacks
from prsl_jax import cli
from prsl_jax import compilation
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import finetune_losses
from prsl_jax import losses
from prsl_jax import runlock
from prsl_jax import trainer
from prsl_jax import zeroshot
from prsl_jax.models import clip as clip_lib

# ----------------------------------------------------------------------------
# The study: rows (configs/study_common.py) and settings.
# ----------------------------------------------------------------------------

SEEDS = (0, 1, 2)
VISION_KEYS = clip_lib.CLIP.towers["vision"]  # the tower the study fine-tunes
START = {"label": "starting model (zero-shot)", "family": "start", "loss": {"name": "ce"},
         "adversarial": False}
ROWS = {"start": START, **study_common.ROWS}

STUDY = dict(
    # Fine-tuning: vision tower, text frozen, AdamW, cosine schedule (configs/base.py).
    batch_size=32,        # global; PRSL's group (group_size 0) is this batch
    train_steps=80,       # 1.8 epochs of the 1,438 training digits
    adv_train_steps=100,
    lr=1e-4,
    warmup_steps=8,
    adv_eps=2 / 255,      # TeCoA-style: PGD-2, step 2.5 * eps / 2, random start, CE
    adv_steps=2,
    # Evaluation: a fixed seeded subset of the test split, the same for every model.
    eval_examples=64,
    eval_batch_size=32,   # = the training group, so the paper's PRSL attack groups alike
    eval_seed=0,
    eps=(1 / 255, 2 / 255, 4 / 255),
    attack_steps=10,      # APGD-CE, APGD-T and FAB-T (per target); AutoAttack: 100
    num_targets=9,        # APGD-T and FAB-T: every wrong class, as AutoAttack
    square_queries=200,   # AutoAttack: 5000
    pgd_steps=10,         # PGD-CE, step 2.5 * eps / steps, one random start
    bim_steps=10,         # the paper's BIM, step 2.5 * eps / steps, no random start
    topk_entropy=3,
    # Gradient ratios at the start: the first batches of seed 0's training stream.
    ratio_batches=20,
)

QUICK_ROWS = ("start", "ce", "prsl_0_4_b1e-3", "adv_prsl_0_4_b1e-1")
QUICK_SEEDS = (0, 1)
QUICK = dict(STUDY, batch_size=16, train_steps=3, adv_train_steps=3, warmup_steps=1,
             eval_examples=8, eval_batch_size=8, eps=(2 / 255,), attack_steps=2,
             num_targets=2, square_queries=8, pgd_steps=2, bim_steps=2, ratio_batches=2)


def cpu_seconds():
  """CPU time of this process (all threads), user + system."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def fingerprint(obj):
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_training(old, new):
  """Whether two train specs (config dicts) train the same model.

  A field the old spec lacks was added to configs/base.py since: it matches when
  the new spec keeps base's default (the old run had that behaviour).
  """
  if old is None or new is None:
    return old is None and new is None
  old, new = trainer.flat_fields(portable(old)), trainer.flat_fields(portable(new))
  default = trainer.flat_fields(json.loads(json.dumps(json.loads(base.base_config().to_json()), default=str)))
  for key in set(old) | set(new):
    if key not in old:
      if key not in default or new[key] != default[key]:
        return False
    elif key not in new or old[key] != new[key]:
      return False
  return True


class LoadSampler:
  """The 1-minute load average, sampled every `every` seconds in a daemon thread."""

  def __init__(self, every=15.0):
    self.samples = [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
    self._thread.start()

  def _run(self, every):
    while not self._stop.wait(every):
      self.samples.append(os.getloadavg()[0])

  def summary(self):
    s = np.asarray(self.samples)
    return {"mean": float(s.mean()), "max": float(s.max()), "min": float(s.min()),
            "samples": int(len(s))}


# ----------------------------------------------------------------------------
# Rows -> configs and losses.
# ----------------------------------------------------------------------------


def row_config(name, study, seed):
  """The trainer ConfigDict of one (row, seed): configs/base.py with the row's loss."""
  c = study_common.apply_row(base.base_config(), name)
  c.seed = seed
  c.batch_size = study["batch_size"]
  c.total_steps = study["adv_train_steps"] if c.adversarial.enabled else study["train_steps"]
  c.optimizer.lr = study["lr"]
  c.optimizer.warmup_steps = study["warmup_steps"]
  c.adversarial.eps = study["adv_eps"]
  c.adversarial.steps = study["adv_steps"]
  c.log_every = max(1, c.total_steps // 8)
  c.eval_every = 0
  c.checkpoint_every = c.total_steps  # one checkpoint, at the end
  c.keep_checkpoints = 1
  c.export = False
  return c


def training_loss(name):
  """(loss name, kwargs) the row trains with, as the paper's attack takes it; None = CE
  (also FARE's and PMG-AFT's rows: their losses need the frozen original model, so
  their paper attack is BIM-CE; finetune_losses.paper_attack_loss)."""
  return finetune_losses.paper_attack_loss(ROWS[name]["loss"])


def penalty_key(name):
  """The row's penalty without its weight (rows that differ only by b share it)."""
  loss = ROWS[name]["loss"]
  if loss["name"] == "prsl":
    key = f"prsl {loss['start']}:{loss['end']}"
    return key + (f" groups of {loss['group_size']}" if loss.get("group_size") else "")
  if loss["name"] == "drsl":
    return "drsl"
  if loss["name"] == "topk_variance":
    return f"top-{loss['k']} variance" + (" renormalised" if loss["renormalize"] else "")
  return None


def penalty_fn(name):
  """fn(logits, labels) -> the row's penalty at weight 1 (no CE term)."""
  loss = ROWS[name]["loss"]
  if loss["name"] == "prsl":
    fn = losses.get_loss("prsl", **dict(losses.config_kwargs(loss), weight=1.0,
                                        ce_weight=0.0))
    return lambda z, y: fn(z, y)
  if loss["name"] == "drsl":
    fn = losses.get_loss("drsl", weight=1.0, ce_weight=0.0)
    return lambda z, y: fn(z, y)
  if loss["name"] == "topk_variance":
    return lambda z, y: jnp.mean(losses.topk_variance(z, y, k=loss["k"],
                                                      renormalize=loss["renormalize"]))
  raise ValueError(f"row {name!r} has no penalty")


def suites_for(name, study, rows):
  """{suite name: tuple of evaluation.Attack} for one model (see the module docstring)."""
  suites = {
      "standard": evaluation.make_suite("standard", steps=study["attack_steps"],
                                        queries=study["square_queries"],
                                        num_targets=study["num_targets"]),
      "pgd-ce": evaluation.make_suite("pgd-ce", steps=study["pgd_steps"]),
      "paper": evaluation.make_suite("paper", steps=study["bim_steps"],
                                     train_loss=training_loss(name)),
  }
  if training_loss(name) is not None:
    suites["bim-ce"] = evaluation.make_suite("bim", steps=study["bim_steps"])
  if name in ("start", "ce"):
    for other in rows:
      if training_loss(other) is not None:
        suites[f"bim@{other}"] = evaluation.make_suite("bim", steps=study["bim_steps"],
                                                       train_loss=training_loss(other))
  return suites


def eval_settings(study, suites):
  keys = ("eval_examples", "eval_batch_size", "eval_seed", "eps", "topk_entropy", "batch_size")
  out = {k: study[k] for k in keys}
  out["suites"] = {s: [json.loads(json.dumps(a.__dict__, default=str)) for a in attack_list]
                   for s, attack_list in suites.items()}
  return out


def portable(train_spec):
  """The train spec with the bundled model's path relative to the repo (clones compare)."""
  if not train_spec:
    return train_spec
  out = json.loads(json.dumps(train_spec))
  path = out["model"]["path"]
  if os.path.isabs(path) and path.endswith(os.path.join("prsl_jax", "assets", "tiny_clip")):
    out["model"]["path"] = os.path.join("prsl_jax", "assets", "tiny_clip")
  return out


# ----------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------


def _split(params, keys):
  return ({k: v for k, v in params.items() if k in keys},
          {k: v for k, v in params.items() if k not in keys})


def _tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)))
                      for leaf in jax.tree.leaves(tree)))


def gradient_ratios(model, params, class_emb, batches, penalties, *, adv_eps, adv_steps,
                    trainable_keys=VISION_KEYS):
  """||grad CE|| / ||grad penalty|| per batch, w.r.t. the logits and the trainable params.

  The ratio is the weight b at which b * penalty pulls as hard as the mean CE;
  b / ratio is the penalty's share. On clean images and on PGD images (CE, random
  start, per-example keys fold_in(key(i), row)), as adversarial fine-tuning sees them.

  Args:
    model, params, class_emb: the zero-shot classifier (prsl_jax.zeroshot.logits).
    batches: list of {"image", "label"} host batches.
    penalties: {key: fn(logits, labels) -> scalar}.
    adv_eps, adv_steps: the PGD of adversarial fine-tuning.

  Returns:
    {"clean" | "pgd": {"ce": {...}, key: {value, grad_logits, grad_params,
     ratio_logits, ratio_params: {median, min, max}}}, "accuracy": ...}
  """
  trainable, frozen = _split(params, trainable_keys)
  terms = {"ce": losses.mean_cross_entropy, **penalties}

  def logits_of(p, x):
    return zeroshot.logits(model, {**frozen, **p}, class_emb, x)

  @jax.jit
  def stats(p, x, y):
    z = logits_of(p, x)
    out = {"accuracy": jnp.mean(jnp.argmax(z, -1) == y)}
    for key, fn in terms.items():
      out[key] = {"value": fn(z, y), "grad_logits": _tree_norm(jax.grad(fn)(z, y)),
                  "grad_params": _tree_norm(jax.grad(lambda q: fn(logits_of(q, x), y))(p))}
    return out

  @jax.jit
  def pgd(p, x, y, key):
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(x.shape[0]))
    return attacks.pgd(functools.partial(logits_of, p), x, y, key=keys, eps=adv_eps,
                       steps=adv_steps)

  per = {"clean": [], "pgd": []}
  for i, b in enumerate(batches):
    x, y = jnp.asarray(b["image"]), jnp.asarray(b["label"])
    per["clean"].append(jax.device_get(stats(trainable, x, y)))
    xa = pgd(trainable, x, y, jax.random.key(i))
    per["pgd"].append(jax.device_get(stats(trainable, xa, y)))

  def rng(v):
    v = np.asarray(v, np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}

  out = {"batches": len(batches), "rows_per_batch": int(len(batches[0]["label"]))}
  for kind, recs in per.items():
    res = {"accuracy": float(np.mean([r["accuracy"] for r in recs]))}
    for key in terms:
      rec = {"value": rng([r[key]["value"] for r in recs]),
             "grad_logits": rng([r[key]["grad_logits"] for r in recs]),
             "grad_params": rng([r[key]["grad_params"] for r in recs])}
      if key != "ce":
        for wrt in ("logits", "params"):
          rec[f"ratio_{wrt}"] = rng([r["ce"][f"grad_{wrt}"] / r[key][f"grad_{wrt}"]
                                     for r in recs])
      res[key] = rec
    out[kind] = res
  return out


def shares(ratios):
  """{row: b / r at the start (median over batches), w.r.t. logits and params}."""
  out = {}
  for name, row in ROWS.items():
    key = penalty_key(name)
    images = "pgd" if row["adversarial"] else "clean"
    if key is None or key not in ratios[images]:
      continue
    rec = ratios[images][key]
    b = row["loss"]["weight"]
    out[name] = {"images": "pgd" if row["adversarial"] else "clean",
                 "logits": b / rec["ratio_logits"]["median"],
                 "params": b / rec["ratio_params"]["median"]}
  return out


@functools.partial(jax.jit, static_argnames=("model", "topk", "windows"))
def _clean_stats(params, class_emb, images, labels, *, model, topk, windows):
  z = zeroshot.logits(model, params, class_emb, images)
  logp = jax.nn.log_softmax(z, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  top, _ = jax.lax.top_k(logp, topk)
  logq = jax.nn.log_softmax(top, axis=-1)  # the softmax renormalised over the top-k classes
  top_entropy = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
  spreads = tuple(losses.prsl_loss(z, labels, start=s, end=e, weight=1.0, ce_weight=0.0)
                  for s, e in windows)
  return jnp.argmax(z, -1), entropy, top_entropy, spreads


SPREAD_WINDOWS = ((0, 4), (0, 9))


def clean_metrics(model, params, class_emb, source, study):
  """Accuracy, output diversity and PRSL's spread on every image of `source` (clean).

  The spread x - n log n (>= 0) is averaged over the full batches of
  study['batch_size'] test images, in order: how unequal the window means are
  across the rows of a batch, the quantity PRSL pulls down.
  """
  bs, topk = study["batch_size"], study["topk_entropy"]
  floor = losses.prsl_floor(bs)
  correct, ent, top_ent, spread = [], [], [], {w: [] for w in SPREAD_WINDOWS}
  for batch in data.eval_batches(source, np.arange(len(source)), bs):
    pred, e, t, sp = jax.device_get(_clean_stats(
        params, class_emb, batch["image"], batch["label"], model=model, topk=topk,
        windows=SPREAD_WINDOWS))
    m = batch["mask"]
    correct.append((pred == batch["label"])[m])
    ent.append(e[m])
    top_ent.append(t[m])
    if m.all():
      for w, v in zip(SPREAD_WINDOWS, sp):
        spread[w].append(float(v) - floor)
  correct, ent, top_ent = map(np.concatenate, (correct, ent, top_ent))
  out = {"clean_accuracy_full": float(correct.mean()), "num_full": int(len(correct)),
         "entropy": float(ent.mean()), f"top{topk}_entropy": float(top_ent.mean())}
  for (s, e), v in spread.items():
    out[f"spread_{s}_{e}"] = float(np.mean(v))
  return out


def param_change(params, start_params, keys=VISION_KEYS):
  """||theta - theta_start|| / ||theta_start|| over the trainable (vision) params."""
  diff = sq = 0.0
  for k in keys:
    for a, b in zip(jax.tree.leaves(params[k]), jax.tree.leaves(start_params[k])):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      diff += float(np.sum((a - b) ** 2))
      sq += float(np.sum(b ** 2))
  return math.sqrt(diff / sq)


def compact(result):
  """evaluate()'s Result without the per-example lists (those stay in eval_full.json)."""
  res = result.to_dict()
  return {
      "clean_accuracy": res["clean_accuracy"],
      "robust": {suite: {eps_key(r["eps"]): {
          "robust_accuracy": r["robust_accuracy"], "accuracy_after": r["accuracy_after"],
          "broken": r["broken"], "gradient_masking": r["gradient_masking"],
          "seconds": r["seconds"]} for r in rs} for suite, rs in res["robust"].items()},
      "checks_passed": res["checks"]["passed"],
      "warnings": res["checks"]["warnings"],
      "seconds": res["seconds"],
  }


# ----------------------------------------------------------------------------
# Aggregation and reports.
# ----------------------------------------------------------------------------


def outcome(r):
  """A run's measured numbers without its timings and load (what must reproduce)."""
  robust = {suite: {e: {k: v for k, v in rec.items() if k != "seconds"}
                    for e, rec in by_eps.items()} for suite, by_eps in r["eval"]["robust"].items()}
  skip = ("seed", "load_average", "load_average_start", "train_seconds", "train_cpu_seconds",
          "eval_seconds", "eval_cpu_seconds", "eval", "copied_from")
  return {"robust": robust, "clean_accuracy": r["eval"]["clean_accuracy"],
          **{k: v for k, v in r.items() if k not in skip}}


def run_values(r, study):
  """One (row, seed)'s metrics -> {metric: value} (fractions, nats)."""
  topk = study["topk_entropy"]
  v = {"clean_full": r["clean_accuracy_full"], "clean_subset": r["eval"]["clean_accuracy"],
       "entropy": r["entropy"], f"top{topk}_entropy": r[f"top{topk}_entropy"],
       "param_change": r["param_change"]}
  for s, e in SPREAD_WINDOWS:
    v[f"spread_{s}_{e}"] = r[f"spread_{s}_{e}"]
  for suite, by_eps in r["eval"]["robust"].items():
    for e, rec in by_eps.items():
      v[f"{suite}@{e}"] = rec["robust_accuracy"]
      if suite == "standard":
        for a, acc in rec["accuracy_after"].items():
          v[f"{a}@{e}"] = acc
    if suite == "paper" and "bim-ce" not in r["eval"]["robust"]:
      for e, rec in by_eps.items():  # trained with CE: the paper's attack is BIM-CE
        v[f"bim-ce@{e}"] = rec["robust_accuracy"]
  return v


def summarize(rows, results, seeds_of, study):
  """{row: {label, family, n, checks, values: {metric: [per seed]}, seeds}}."""
  summary = {}
  for name in rows:
    seeds = [s for s in seeds_of[name] if (name, s) in results]
    runs = [results[(name, s)] for s in seeds]
    if not runs:
      continue
    values = {}
    for r in runs:
      for k, x in run_values(r, study).items():
        values.setdefault(k, []).append(x)
    failed = sorted({w.split(":")[0] for r in runs for w in r["eval"]["warnings"]})
    masked = any(rec["gradient_masking"] for r in runs
                 for rec in r["eval"]["robust"]["standard"].values())
    checks = "ok" if all(r["eval"]["checks_passed"] for r in runs) else (
        ("MASKING; " if masked else "") + "failed: " + "; ".join(failed)[:80])
    summary[name] = {"label": ROWS[name]["label"], "family": ROWS[name]["family"],
                     "n": len(runs), "seeds": seeds, "checks": checks, "values": values}
  return summary


def previous_invocations(outdir):
  """Timings of the earlier invocations on this outdir (so a rerun keeps them)."""
  path = os.path.join(outdir, "study.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f).get("invocations", [])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--outdir", default=None,
                      help="default runs/study (runs/study_quick with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help=f"rows {', '.join(QUICK_ROWS)}, seeds {QUICK_SEEDS}, tiny budgets "
                      "(a smoke test of the whole pipeline)")
  parser.add_argument("--rows", default=None,
                      help="comma-separated rows (with --quick: instead of its rows)")
  parser.add_argument("--seeds", default=None, help="comma-separated subset of seeds")
  parser.add_argument("--report_only", action="store_true",
                      help="write the tables from the runs already done in outdir (any "
                      "seeds); train and evaluate nothing")
  parser.add_argument("--jax_cache", default=None,
                      help="persistent compilation cache (default <outdir>/jax_cache)")
  return parser.parse_args(argv)


class RunCache:
  """One run's resumable record in its folder: study_spec.json, what the run
  trains and evaluates, and eval.json, its results (present once it finished).

  A rerun reads eval.json instead of running again when the spec is the same; a
  spec that trains something else is refused; changed evaluation settings drop
  eval.json, so the trained model is evaluated again.
  """

  def __init__(self, wd):
    self.spec_path = os.path.join(wd, "study_spec.json")
    self.path = os.path.join(wd, "eval.json")

  def load(self):
    """The finished run's record, or None."""
    if not os.path.exists(self.path):
      return None
    with open(self.path) as f:
      return json.load(f)

  def save(self, record):
    with open(self.path, "w") as f:
      json.dump(record, f, indent=1)

  def write_spec(self, spec):
    with open(self.spec_path, "w") as f:
      json.dump(spec, f, indent=2)

  def check(self, spec, wd, label):
    """Refuses a folder trained otherwise; drops eval.json when evaluation changed."""
    if not os.path.exists(self.spec_path):
      return
    with open(self.spec_path) as f:
      old = json.load(f)
    if not same_training(old["train"], spec["train"]):
      raise SystemExit(f"{wd} holds a model trained with other settings "
                       "(study_spec.json differs); use a new --outdir")
    if fingerprint(old["eval"]) != fingerprint(spec["eval"]) and os.path.exists(self.path):
      print(f"[{label}] evaluation settings changed: evaluating again", flush=True)
      os.remove(self.path)


def _start_record(outdir, eval_spec, seed):
  """The start model's evaluation for `seed`, copied once two seeds evaluated it alike.

  The starting weights and the evaluation seed are the same for every training
  seed. Two independent evaluations with the same settings (the reproducibility
  check, study.json -> start_identical_across_seeds) are always run; a further
  seed reuses the first of them. None when fewer than two exist or they differ.
  """
  found = []
  for other in sorted(glob.glob(os.path.join(outdir, "runs", "start", "seed*", "eval.json"))):
    spec_path = os.path.join(os.path.dirname(other), "study_spec.json")
    if not os.path.exists(spec_path):
      continue
    with open(spec_path) as f:
      if fingerprint(json.load(f)["eval"]) != fingerprint(eval_spec):
        continue
    with open(other) as f:
      record = json.load(f)
    if "copied_from" not in record:
      found.append((other, record))
  if len(found) < 2 or any(outcome(r) != outcome(found[0][1]) for _, r in found):
    return None
  path, record = found[0]
  return dict(record, seed=seed, copied_from=os.path.relpath(path, outdir))


def main(argv=None):
  args = parse_args(argv)
  compilation.set_cpu_flags()  # train.py's XLA:CPU settings (prsl_jax/compilation.py)
  cli.quiet_transformers()  # no "PyTorch was not found" line on an install without torch
  t_start, cpu_start = time.time(), cpu_seconds()
  load = LoadSampler()
  study = QUICK if args.quick else STUDY
  outdir = args.outdir or ("runs/study_quick" if args.quick else "runs/study")
  os.makedirs(outdir, exist_ok=True)
  try:
    runlock.hold(outdir, flag="--outdir")  # one study per folder
  except runlock.RunLockedError as e:
    raise SystemExit(f"error: {e}") from None
  previous = previous_invocations(outdir)
  rows = [n for n in ROWS if not args.quick or n in QUICK_ROWS]
  if args.rows:
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
      raise SystemExit(f"unknown rows {unknown}; rows: {list(ROWS)}")
    rows = [n for n in ROWS if n in wanted]  # any row, --quick too (its budgets)
  seeds = QUICK_SEEDS if args.quick else SEEDS
  if args.seeds:
    seeds = tuple(int(s) for s in args.seeds.split(","))
  seeds_of = {n: seeds for n in rows}
  # The control attacks use every row of the study (quick: of the quick study), not
  # just the ones asked for, so a subset run evaluates the start and CE models alike.
  control_rows = [n for n in ROWS if not args.quick or n in QUICK_ROWS]

  jax.config.update("jax_compilation_cache_dir",
                    os.path.abspath(args.jax_cache or os.path.join(outdir, "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.set_verbosity(logging.WARNING)

  setup_config = row_config("ce", study, 0)
  s = trainer.setup(setup_config)
  model, start_params, _ = s.pretrained
  class_emb = jax.device_get(s.head["class_emb"])
  classify = zeroshot.Classifier(model)  # one object: every model shares the compilations
  indices = data.eval_indices(len(s.eval_source), study["eval_examples"], study["eval_seed"])

  # Gradient ratios at the start, cached.
  penalties = {penalty_key(n): penalty_fn(n) for n in control_rows if penalty_key(n)}
  ratio_spec = {"study": {k: study[k] for k in ("batch_size", "ratio_batches", "adv_eps",
                                               "adv_steps")},
                "penalties": sorted(penalties)}
  ratio_path = os.path.join(outdir, "gradient_ratios.json")
  ratios = None
  if os.path.exists(ratio_path):
    with open(ratio_path) as f:
      cached = json.load(f)
    if cached.get("spec") == json.loads(json.dumps(ratio_spec)):
      ratios = cached["ratios"]
  if ratios is None:
    it = data.train_iterator(s.train_source, global_batch_size=study["batch_size"], seed=0)
    batches = [next(it) for _ in range(study["ratio_batches"])]
    t0 = time.time()
    ratios = gradient_ratios(model, start_params, class_emb, batches, penalties,
                             adv_eps=study["adv_eps"], adv_steps=study["adv_steps"])
    ratios["seconds"] = time.time() - t0
    with open(ratio_path, "w") as f:
      json.dump({"spec": ratio_spec, "ratios": ratios}, f, indent=1)
  share = shares(ratios)
  print("gradient ratios at the start, ||grad CE|| / ||grad penalty|| w.r.t. logits "
        "(median): " + "; ".join(f"{k} {v['ratio_logits']['median']:.2g}"
                                  for k, v in ratios["clean"].items()
                                  if k not in ("accuracy", "ce")), flush=True)

  n_runs = sum(len(v) for v in seeds_of.values())
  print(f"PRSL study: {len(rows)} rows x seeds {list(seeds)} ({n_runs} runs), outdir "
        f"{outdir}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True)
  results, fresh = {}, set()
  for seed in seeds:
    for name in rows:
      if seed not in seeds_of[name]:
        continue
      wd = os.path.join(outdir, "runs", name, f"seed{seed}")
      os.makedirs(wd, exist_ok=True)
      cfg = None if name == "start" else row_config(name, study, seed)
      suites = suites_for(name, study, control_rows)
      spec = json.loads(json.dumps(
          {"row": ROWS[name], "train": None if cfg is None else json.loads(cfg.to_json()),
           "eval": eval_settings(study, suites)}, default=str))
      cache = RunCache(wd)
      if args.report_only:
        if cache.load() is not None:
          results[(name, seed)] = cache.load()
        continue
      cache.check(spec, wd, f"{name} seed {seed}")
      if name == "start" and cache.load() is None:
        # The starting weights and the evaluation seed are the same for every
        # training seed: its evaluation under another seed is this one.
        done = _start_record(outdir, spec["eval"], seed)
        if done is not None:
          cache.write_spec(spec)
          cache.save(done)
      cached = cache.load()
      if cached is not None:
        results[(name, seed)] = cached
        print(f"[{name} seed {seed}] cached", flush=True)
        continue
      cache.write_spec(spec)

      t0, c0 = time.time(), cpu_seconds()
      record = {"row": name, "seed": seed, "load_average_start": os.getloadavg()[0]}
      if cfg is None:
        params = start_params
      else:
        trainer.validate(cfg, num_classes=len(s.class_names))
        params, step = trainer.train(cfg, wd, s, desc=f"{name} s{seed}")
        if step != cfg.total_steps:
          raise RuntimeError(f"{wd}: training ended at step {step}, not {cfg.total_steps}")
        with open(os.path.join(wd, "metrics.jsonl")) as f:
          record["train_last_logged"] = json.loads(f.read().splitlines()[-1])
      t1, c1 = time.time(), cpu_seconds()
      record["train_seconds"], record["train_cpu_seconds"] = t1 - t0, c1 - c0
      record["param_change"] = param_change(params, start_params)

      record.update(clean_metrics(model, params, class_emb, s.eval_source, study))
      with warnings.catch_warnings():
        # Recorded in the results (checks.warnings); not repeated on the console.
        warnings.simplefilter("ignore", evaluation.SoundnessWarning)
        result = evaluation.evaluate(
            classify, {"params": params, "class_emb": class_emb}, s.eval_source, indices,
            eps_list=list(study["eps"]), suites=suites, seed=study["eval_seed"],
            batch_size=study["eval_batch_size"], progress_bar=False)
      record["eval"] = compact(result)
      with open(os.path.join(wd, "eval_full.json"), "w") as f:
        json.dump(result.to_dict(), f, default=str)
      record["eval_seconds"], record["eval_cpu_seconds"] = time.time() - t1, cpu_seconds() - c1
      record["load_average"] = os.getloadavg()[0]
      cache.save(record)
      results[(name, seed)] = record
      fresh.add((name, seed))
      rob = record["eval"]["robust"]
      k = eps_key(KEY_EPS) if KEY_EPS in study["eps"] else eps_key(study["eps"][0])
      print(f"[{name} seed {seed}] clean {record['clean_accuracy_full']:.3f}  at {k}: AA "
            f"{rob['standard'][k]['robust_accuracy']:.3f} PGD-CE "
            f"{rob['pgd-ce'][k]['robust_accuracy']:.3f} paper "
            f"{rob['paper'][k]['robust_accuracy']:.3f}  H {record['entropy']:.4f}  "
            f"Δθ {record['param_change']:.2e}  train {record['train_seconds']:.0f}s (cpu "
            f"{record['train_cpu_seconds']:.0f}s) eval {record['eval_seconds']:.0f}s (cpu "
            f"{record['eval_cpu_seconds']:.0f}s)  load {record['load_average']:.1f}",
            flush=True)
      write_reports(rows, results, seeds_of, study, outdir, seeds, t_start, cpu_start, load,
                    previous, fresh, ratios, share, indices)

  paths = write_reports(rows, results, seeds_of, study, outdir, seeds, t_start, cpu_start, load,
                        previous, fresh, ratios, share, indices)
  with open(os.path.join(outdir, "study.md")) as f:
    print("\n" + f.read())
  wall, cpu = time.time() - t_start, cpu_seconds() - cpu_start
  ls = load.summary()
  print(f"wrote {', '.join(paths)}")
  print(f"wall time {wall / 60:.1f} min (this invocation: {len(fresh)} runs done, "
        f"{n_runs - len(fresh)} cached; process CPU time {cpu / 60:.1f} min); load average "
        f"{ls['mean']:.1f} mean, {ls['max']:.1f} max on {os.cpu_count()} CPUs")
  if previous:
    total = sum(i["wall_seconds"] for i in previous) + wall
    print(f"all {len(previous) + 1} invocations on {outdir}: {total / 60:.1f} min wall")
  return {"results": results, "fresh": fresh, "outdir": outdir}


def write_reports(rows, results, seeds_of, study, outdir, seeds, t_start, cpu_start, load,
                  previous, fresh, ratios, share, indices):
  summary = summarize(rows, results, seeds_of, study)
  md = tables(summary, study, ratios, share)
  with open(os.path.join(outdir, "study.md"), "w") as f:
    f.write(md)
  paths = plots(summary, study, outdir, ROWS)
  key = eps_key(KEY_EPS) if KEY_EPS in study["eps"] else eps_key(study["eps"][0])
  start_runs = [results[("start", s)] for s in seeds_of.get("start", ()) if ("start", s) in results]
  current = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t_start)),
             "wall_seconds": time.time() - t_start, "cpu_seconds": cpu_seconds() - cpu_start,
             "load_average": load.summary(), "runs_done": len(fresh),
             "runs_cached": len(results) - len(fresh), "command": "python -m scripts.prsl_study " + " ".join(sys.argv[1:])}
  totals = {k: sum(r.get(k, 0) for r in results.values())
            for k in ("train_seconds", "train_cpu_seconds", "eval_seconds", "eval_cpu_seconds")}
  doc = {
      "study": {k: (list(v) if isinstance(v, tuple) else v) for k, v in study.items()},
      "seeds": list(seeds),
      "rows": {n: ROWS[n] for n in rows},
      "eval_indices": [int(i) for i in indices],
      "gradient_ratios": ratios,
      "shares": share,
      "summary": {n: {"label": s["label"], "family": s["family"], "n": s["n"],
                      "seeds": s["seeds"], "checks": s["checks"],
                      "mean": {k: mean_std(v)[0] for k, v in s["values"].items()},
                      "std": {k: mean_std(v)[1] for k, v in s["values"].items()},
                      "per_seed": s["values"]}
                  for n, s in summary.items()},
      "paired_vs_ce": {n: {m: paired(summary, n, f"{m}@{key}")
                           for m in ("paper", "standard", "pgd-ce", "bim-ce")}
                       for n in summary if n != "ce"},
      "start_identical_across_seeds": (all(outcome(r) == outcome(start_runs[0])
                                           for r in start_runs) if start_runs else None),
      "runs": {f"{n}/seed{s}": r for (n, s), r in sorted(results.items())},
      "totals_over_runs": totals,
      "this_invocation": current,
      "invocations": previous + [current],
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(), "jax": jax.__version__},
  }
  with open(os.path.join(outdir, "study.json"), "w") as f:
    json.dump(doc, f, indent=1, default=str)
  return [os.path.join(outdir, "study.json"), os.path.join(outdir, "study.md")] + paths


if __name__ == "__main__":
  main()
