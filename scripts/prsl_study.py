r"""Does the authors' PRSL make CLIP robust? The study, on the embedded digits benchmark.

  python -m scripts.prsl_study                                 # the full study, runs/study
  python -m scripts.prsl_study --quick --outdir /tmp/study_q   # a 1-2 minute smoke run

Fine-tunes the bundled tiny CLIP (prsl_jax.TINY_CLIP; vision tower, text frozen,
global batch 32) on the digits with cross-entropy, the authors' PRSL
(arXiv:2402.03627; karlieswift/Mattack lossfunctions.py) over a grid of windows
and weights, PRSL in groups of 8, the authors' DRSL, our old misreading (top-k
probability variance, an ablation), and TeCoA-style adversarial fine-tuning with
CE and with PRSL; three training seeds each (configs/study_common.py has the
rows and why their weights). Every model, and the starting one under each seed,
is evaluated on the same fixed subset of the digits test split:

- clean accuracy on the whole test split (359 images);
- robust accuracy at L-inf 1/255, 2/255, 4/255 under
  * 'standard': AutoAttack's cascade (APGD-CE, APGD-T, FAB-T, Square; worst case
    per example), with the accuracy after each attack;
  * 'pgd-ce': PGD-CE alone;
  * 'paper': the paper's protocol, BIM-10 (sign steps, no random start) through
    the model's own training loss (the start and CE rows: through CE);
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
from prsl_jax import attacks
from prsl_jax import cli
from prsl_jax import compilation
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import losses
from prsl_jax import runlock
from prsl_jax import trainer
from prsl_jax import training
from prsl_jax import zeroshot

# ----------------------------------------------------------------------------
# The study: rows (configs/study_common.py) and settings.
# ----------------------------------------------------------------------------

SEEDS = (0, 1, 2)
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

# The eps of the tables' headline comparisons (the one where models differ).
KEY_EPS = 2 / 255


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


def eps_key(e):
  return f"{e * 255:g}/255"


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
  """(loss name, kwargs) the row trains with, as the paper's attack takes it; None = CE."""
  loss = ROWS[name]["loss"]
  if loss["name"] == "ce":
    return None
  kwargs = {k: v for k, v in loss.items() if k != "name"}
  if "group_size" in kwargs:
    kwargs["group_size"] = kwargs["group_size"] or None  # 0: the whole batch
  return loss["name"], kwargs


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
    fn = losses.get_loss("prsl", start=loss["start"], end=loss["end"], weight=1.0,
                         ce_weight=0.0, group_size=loss.get("group_size") or None)
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
                    trainable_keys=training.VISION_KEYS):
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


def param_change(params, start_params, keys=training.VISION_KEYS):
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


def mean_std(v):
  v = np.asarray(v, float)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def fmt(v, scale=100, digits=1, signed=False):
  if v is None or len(v) == 0:
    return "–"
  m, s = mean_std(v)
  sign = "+" if signed else ""
  if s is None:
    return f"{scale * m:{sign}.{digits}f}"
  return f"{scale * m:{sign}.{digits}f} ± {scale * s:.{digits}f}"


def fmt_share(x):
  return "–" if x is None else (f"{x:.2g}" if x < 10 else f"{x:.0f}")


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


def paired(summary, name, metric, ref="ce"):
  """Per-seed differences metric(name) - metric(ref) over the seeds both have."""
  a, b = summary.get(name), summary.get(ref)
  if not a or not b or metric not in a["values"] or metric not in b["values"]:
    return []
  va = dict(zip(a["seeds"], a["values"][metric]))
  vb = dict(zip(b["seeds"], b["values"][metric]))
  if name == "start":  # one model: compare it with every seed of ref
    return [va[a["seeds"][0]] - vb[s] for s in b["seeds"]]
  return [va[s] - vb[s] for s in a["seeds"] if s in vb]


def wins(diffs):
  up = sum(d > 0 for d in diffs)
  down = sum(d < 0 for d in diffs)
  return f"{up}↑ {down}↓ {len(diffs) - up - down}="


def table(head, rows_):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows_]
  return lines


def tables(summary, study, ratios, share):
  """The study's tables, markdown (mean ± sample std over seeds, n = seeds)."""
  ek = [eps_key(e) for e in study["eps"]]
  key = eps_key(KEY_EPS) if KEY_EPS in study["eps"] else ek[0]
  topk = study["topk_entropy"]
  n_eval = study["eval_examples"]
  out = []

  out += [f"## Gradient ratios at the start", "",
          f"||grad CE|| / ||grad penalty|| at the starting model, on the first "
          f"{ratios['batches']} training batches of {ratios['rows_per_batch']} (seed 0's "
          "stream), clean and PGD-2 at "
          f"{eps_key(study['adv_eps'])}: median [min, max] over batches. The weight b at "
          "which the penalty pulls as hard as CE; a row's share is b / ratio. Clean "
          f"accuracy {100 * ratios['clean']['accuracy']:.1f}%, CE "
          f"{ratios['clean']['ce']['value']['median']:.3g}; PGD-2 accuracy "
          f"{100 * ratios['pgd']['accuracy']:.1f}%, CE {ratios['pgd']['ce']['value']['median']:.3g}.",
          ""]
  rr = []
  for kind in ("clean", "pgd"):
    for k, rec in ratios[kind].items():
      if k in ("accuracy", "ce"):
        continue
      f = lambda d: f"{d['median']:.2g} [{d['min']:.2g}, {d['max']:.2g}]"
      rr.append([kind, k, f"{rec['value']['median']:.4g}", f(rec["ratio_logits"]),
                 f(rec["ratio_params"])])
  out += table(["images", "penalty", "value (weight 1)", "ratio w.r.t. logits",
                "ratio w.r.t. vision params"], rr)

  out += ["", "## Clean and robust accuracy", "",
          f"Accuracy (%): clean on the whole test split (359 images); robust on a fixed "
          f"subset of {n_eval} test images, L-inf. 'AA': the standard cascade (APGD-CE, "
          "APGD-T, FAB-T, Square; worst case per example). 'paper': BIM-10 through the "
          "model's own training loss. Share: b / ratio at the start (w.r.t. logits). Mean "
          "± std over the seeds (n).", ""]
  head = ["row", "share", "n", "clean"] + [f"AA {e}" for e in ek] + \
      [f"paper {e}" for e in ek] + ["checks"]
  rr = []
  for name, s in summary.items():
    v = s["values"]
    sh = share.get(name)
    rr.append([s["label"], fmt_share(sh["logits"]) if sh else "–", str(s["n"]),
               fmt(v.get("clean_full"))] + [fmt(v.get(f"standard@{e}")) for e in ek]
              + [fmt(v.get(f"paper@{e}")) for e in ek] + [s["checks"]])
  out += table(head, rr)

  out += ["", f"## The paper's attack against the cascade, paired with CE ({key})", "",
          "Robust accuracy (%) and its per-seed difference to the CE row (same seed = same "
          "data order; the start row against each CE seed). 'paper': BIM-10 through the "
          "row's own training loss; 'BIM-CE': the same attack through CE; 'PGD-CE': PGD-10 "
          "through CE, random start; 'AA': the standard cascade. ↑/↓: seeds above/below "
          "CE.", ""]
  head = ["row", "paper", "BIM-CE", "PGD-CE", "AA", "paper − CE", "(seeds)", "AA − CE",
          "(seeds)"]
  rr = []
  for name, s in summary.items():
    v = s["values"]
    dp, da = paired(summary, name, f"paper@{key}"), paired(summary, name, f"standard@{key}")
    rr.append([s["label"], fmt(v.get(f"paper@{key}")), fmt(v.get(f"bim-ce@{key}")),
               fmt(v.get(f"pgd-ce@{key}")), fmt(v.get(f"standard@{key}")),
               fmt(dp, signed=True) if name != "ce" else "–", wins(dp) if name != "ce" else "",
               fmt(da, signed=True) if name != "ce" else "–", wins(da) if name != "ce" else ""])
  out += table(head, rr)

  controls = [n for n in summary if f"bim@{n}@{key}" in summary.get("ce", {"values": {}})["values"]]
  if controls:
    out += ["", f"## Control: the paper's attack on models that did not train with the loss "
            f"({key})", "",
            "BIM-10 through ROW's training loss, on ROW itself ('ROW'), on the CE models "
            "(paired by seed) and on the starting model. If the CE model is as 'robust' "
            "under ROW's loss as ROW is, the paper's number measures the attack objective, "
            "not the model. Robust accuracy (%).", ""]
    head = ["row (its loss)", "ROW", "CE models", "start", "ROW − CE models", "(seeds)",
            "CE models under CE"]
    rr = []
    ce, st = summary["ce"], summary.get("start")
    for name in controls:
      v = summary[name]["values"]
      mine = dict(zip(summary[name]["seeds"], v.get(f"paper@{key}", [])))
      theirs = dict(zip(ce["seeds"], ce["values"][f"bim@{name}@{key}"]))
      diffs = [mine[s] - theirs[s] for s in mine if s in theirs]
      rr.append([summary[name]["label"], fmt(v.get(f"paper@{key}")),
                 fmt(ce["values"][f"bim@{name}@{key}"]),
                 fmt(st["values"].get(f"bim@{name}@{key}")) if st else "–",
                 fmt(diffs, signed=True), wins(diffs), fmt(ce["values"].get(f"paper@{key}"))])
    out += table(head, rr)

  out += ["", "## Every suite at every budget", "",
          "Robust accuracy (%). 'APGD-CE', 'APGD-T', 'FAB-T': the accuracy after that "
          "attack of the cascade (cumulative), the last column being the cascade.", ""]
  for e in ek:
    head = ["row", f"paper {e}", f"BIM-CE {e}", f"PGD-CE {e}", f"APGD-CE {e}",
            f"+APGD-T {e}", f"+FAB-T {e}", f"AA {e}"]
    rr = []
    for name, s in summary.items():
      v = s["values"]
      rr.append([s["label"]] + [fmt(v.get(f"{m}@{e}")) for m in (
          "paper", "bim-ce", "pgd-ce", "apgd-ce", "apgd-t", "fab-t", "standard")])
    out += table(head, rr) + [""]

  out += ["## Output diversity and what training moved", "",
          f"On the clean test split: mean "
          f"softmax entropy (nats; max {math.log(10):.3f}), entropy of the top-{topk} part "
          f"(max {math.log(topk):.3f}), PRSL's spread x − n log n for the windows 0:4 and "
          f"0:9 (batches of {study['batch_size']}, ≥ 0), and ||θ − θ_start|| / ||θ_start|| "
          "of the vision tower.", ""]
  head = ["row", "entropy", f"top-{topk} entropy", "spread 0:4", "spread 0:9",
          "param change"]
  rr = []
  for name, s in summary.items():
    v = s["values"]
    rr.append([s["label"], fmt(v.get("entropy"), 1, 4), fmt(v.get(f"top{topk}_entropy"), 1, 4),
               fmt(v.get("spread_0_4"), 1, 3), fmt(v.get("spread_0_9"), 1, 3),
               fmt(v.get("param_change"), 1, 4)])
  out += table(head, rr)
  return "\n".join(out) + "\n"


COLORS = {"start": "black", "ce": "tab:blue", "prsl": "tab:orange", "prsl_group": "tab:brown",
          "drsl": "tab:purple", "ours": "tab:gray", "adv": "tab:green"}
WINDOW_COLORS = {(0, 4): "tab:orange", (0, 6): "tab:red", (0, 9): "tab:purple",
                 (4, 9): "tab:olive"}


def plots(summary, study, outdir):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  ek = [eps_key(e) for e in study["eps"]]
  key = eps_key(KEY_EPS) if KEY_EPS in study["eps"] else ek[0]

  # Robust accuracy vs b, one panel per window: the paper's attack through the row's
  # own loss, the same attack on the CE models (the control), and the cascade.
  windows = [w for w in study_common.PRSL_GRID
             if any(n.startswith(f"prsl_{w[0]}_{w[1]}_b") and n in summary
                    and ROWS[n]["family"] == "prsl" for n in summary)]
  if windows and "ce" in summary:
    fig, axes = plt.subplots(1, len(windows), figsize=(3.6 * len(windows), 3.6), sharey=True,
                             squeeze=False)
    ce = summary["ce"]["values"]
    for ax, w in zip(axes[0], windows):
      names = [n for n in summary if ROWS[n]["family"] == "prsl"
               and (ROWS[n]["loss"]["start"], ROWS[n]["loss"]["end"]) == w]
      bs = [ROWS[n]["loss"]["weight"] for n in names]
      for metric, style, label in ((f"paper@{key}", "-o", "PRSL model, paper's attack"),
                                   (f"standard@{key}", "-s", "PRSL model, AA cascade")):
        ms = [mean_std(summary[n]["values"][metric]) for n in names]
        ax.errorbar(bs, [100 * m for m, _ in ms], yerr=[100 * (s or 0) for _, s in ms],
                    fmt=style, color=WINDOW_COLORS[w] if "paper" in metric else "k",
                    capsize=2, ms=4, label=label)
      ctl = [(b, mean_std(ce[f"bim@{n}@{key}"])) for n, b in zip(names, bs)
             if f"bim@{n}@{key}" in ce]
      if ctl:
        ax.errorbar([b for b, _ in ctl], [100 * m for _, (m, _) in ctl],
                    yerr=[100 * (s or 0) for _, (_, s) in ctl], fmt="--^", color="tab:blue",
                    capsize=2, ms=4, label="CE model, same attack (control)")
      for metric, ls, label in ((f"paper@{key}", ":", "CE model, BIM-CE"),
                                (f"standard@{key}", "-.", "CE model, AA cascade")):
        ax.axhline(100 * mean_std(ce[metric])[0], color="tab:blue", ls=ls, lw=1, label=label)
      ax.set_xscale("log")
      ax.set_xlabel("PRSL weight b")
      ax.set_title(f"window {w[0]}:{w[1]}", fontsize=9)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"robust accuracy (%) at ε={key}, {study['eval_examples']} images")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("The paper's attack (BIM-10 through the model's own loss) vs the standard "
                 "cascade; mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "weights.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

  # Robust (cascade, and paper) vs clean accuracy at the key eps.
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
  for ax, (metric, title) in zip(axes, (("standard", "standard cascade (AA)"),
                                        ("paper", "paper's attack (own loss)"))):
    for name, s in summary.items():
      v = s["values"]
      if not v.get(f"{metric}@{key}"):
        continue
      (cx, sx), (ry, sy) = mean_std(v["clean_full"]), mean_std(v[f"{metric}@{key}"])
      ax.errorbar(100 * cx, 100 * ry, xerr=100 * (sx or 0), yerr=100 * (sy or 0), fmt="o",
                  color=COLORS[s["family"]], ms=5, capsize=2, alpha=0.85)
      ax.annotate(name.replace("prsl_", "").replace("_b", " b"), (100 * cx, 100 * ry),
                  fontsize=5, xytext=(3, 2), textcoords="offset points")
    ax.set_title(f"{title}, ε={key}", fontsize=9)
    ax.set_xlabel("clean accuracy (%), test split")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"robust accuracy (%), {study['eval_examples']} images")
  handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in COLORS.items()]
  axes[1].legend(handles=handles, fontsize=7, loc="best")
  fig.tight_layout()
  paths.append(os.path.join(outdir, "tradeoff.png"))
  fig.savefig(paths[-1], dpi=90)
  plt.close(fig)

  # Robust accuracy vs eps for a readable subset of rows.
  shown = [n for n in summary if ROWS[n]["family"] in ("start", "ce", "drsl", "ours", "adv")
           or n.startswith("prsl_0_4_b") and ROWS[n]["family"] == "prsl"]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
  xs = [0.0] + [e * 255 for e in study["eps"]]
  for ax, (metric, title) in zip(axes, (("standard", "standard cascade (AA)"),
                                        ("pgd-ce", f"PGD-CE, {study['pgd_steps']} steps"),
                                        ("paper", "paper: BIM-10, own training loss"))):
    for name in shown:
      v = summary[name]["values"]
      ys = [mean_std(v["clean_subset"])] + [mean_std(v[f"{metric}@{e}"]) for e in ek]
      ax.errorbar(xs, [100 * m for m, _ in ys], yerr=[100 * (sd or 0) for _, sd in ys],
                  color=COLORS[summary[name]["family"]], marker="o", ms=3, capsize=2,
                  alpha=0.8, label=name, lw=1,
                  ls="--" if summary[name]["family"] == "prsl" else "-")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("L-inf ε (× 1/255)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"accuracy (%) on {study['eval_examples']} test images")
  axes[-1].legend(fontsize=6, ncol=2, loc="lower left")
  fig.tight_layout()
  paths.append(os.path.join(outdir, "robust_vs_eps.png"))
  fig.savefig(paths[-1], dpi=90)
  plt.close(fig)
  return paths


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


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
  parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
  parser.add_argument("--seeds", default=None, help="comma-separated subset of seeds")
  parser.add_argument("--report_only", action="store_true",
                      help="write the tables from the runs already done in outdir (any "
                      "seeds); train and evaluate nothing")
  parser.add_argument("--jax_cache", default=None,
                      help="persistent compilation cache (default <outdir>/jax_cache)")
  return parser.parse_args(argv)


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
    rows = [n for n in rows if n in wanted]
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
      spec_path = os.path.join(wd, "study_spec.json")
      cache = os.path.join(wd, "eval.json")
      if args.report_only:
        if os.path.exists(cache):
          with open(cache) as f:
            results[(name, seed)] = json.load(f)
        continue
      if os.path.exists(spec_path):
        with open(spec_path) as f:
          old = json.load(f)
        if not same_training(old["train"], spec["train"]):
          raise SystemExit(f"{wd} holds a model trained with other settings "
                           "(study_spec.json differs); use a new --outdir")
        if fingerprint(old["eval"]) != fingerprint(spec["eval"]) and os.path.exists(cache):
          print(f"[{name} seed {seed}] evaluation settings changed: evaluating again",
                flush=True)
          os.remove(cache)
      if name == "start" and not os.path.exists(cache):
        # The starting weights and the evaluation seed are the same for every
        # training seed: its evaluation under another seed is this one.
        done = _start_record(outdir, spec["eval"], seed)
        if done is not None:
          with open(spec_path, "w") as f:
            json.dump(spec, f, indent=2)
          with open(cache, "w") as f:
            json.dump(done, f, indent=1)
      if os.path.exists(cache):
        with open(cache) as f:
          results[(name, seed)] = json.load(f)
        print(f"[{name} seed {seed}] cached", flush=True)
        continue
      with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)

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
      with open(cache, "w") as f:
        json.dump(record, f, indent=1)
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
  paths = plots(summary, study, outdir)
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
