r"""Does PRSL make CLIP robust? The study of issue 7, on the embedded digits benchmark.

  python scripts/prsl_study.py                          # the full study, runs/study
  python scripts/prsl_study.py --outdir runs/study_q --quick   # a 2-minute smoke run

Fine-tunes the bundled tiny CLIP (prsl_jax/assets/tiny_clip) on the digits with
cross-entropy, PRSL over a grid of k and weight, the renormalised PRSL, top-k
cross-entropy, and TeCoA-style adversarial fine-tuning (PGD at 2/255) with CE and
with PRSL, three training seeds each. Every model (and the starting one) is
evaluated on the same fixed subset of the digits test split:

- clean accuracy on the whole test split (359 images) and on the attacked subset;
- robust accuracy under the "standard" AutoAttack-style cascade (APGD-CE, APGD-T,
  Square; worst case per example) at L-inf eps 1/255, 2/255, 4/255, with the
  accuracy after each attack of the cascade;
- robust accuracy under PGD-CE alone at the same budgets (a defence that only
  beats PGD-CE is the classic false positive);
- output diversity on clean test images: the mean entropy of the softmax, and of
  its top-3 part (the softmax renormalised over the 3 most probable classes).

The attack budgets are reduced from AutoAttack's (100 APGD steps, 5000 Square
queries) so that the whole study fits in an hour on 2 CPU cores: see STUDY below;
the numbers are written beside the results.

Resumable: each (row, seed) trains in its own workdir under <outdir>/runs (train.train
resumes from its checkpoint) and its evaluation is cached there as eval.json, so a
rerun skips everything that finished. A changed setting for a row that already has
outputs is an error (use a new --outdir), never a silent mix. Compiled programs are
cached in <outdir>/jax_cache, so the seeds of a row compile its train step once.

Writes <outdir>/study.json (every number, the settings, timings, machine load),
<outdir>/study.md (the tables), tradeoff.png and robust_vs_eps.png, and prints the
tables and the wall time. RESULTS.md at the repo root is written from a full run.
"""

import argparse
import functools
import hashlib
import json
import os
import platform
import resource
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import prsl_jax
import train as train_lib
from configs import base
from configs import study_common
from prsl_jax import checkpoints
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import sharding
from prsl_jax import zeroshot

# ----------------------------------------------------------------------------
# The study: rows (what is fine-tuned) and settings (how it is trained and
# attacked). Budgeted by measurement on 2 CPU cores (see RESULTS.md).
# ----------------------------------------------------------------------------

SEEDS = (0, 1, 2)

# What each row fine-tunes (loss, k, weight, adversarial) is configs/study_common.py,
# shared with the full-scale configs; the weights are justified there and measured
# by loss_scales below on every run. Here: labels for the tables and plots.
# (label, family, same_as): a row with same_as is expected to train to exactly
# that row's params; it is evaluated only if it does not.
ROWS_META = {
    "start": ("starting model (zero-shot)", "start", None),
    "ce": ("CE", "ce", None),
    "prsl_k1": ("PRSL k=1 (R_1 = 0)", "prsl", "ce"),
    "prsl_k3_w1e4": ("PRSL k=3 w=1e4", "prsl", None),
    "prsl_k5_w1e4": ("PRSL k=5 w=1e4", "prsl", None),
    "prsl_k9_w1e4": ("PRSL k=9 w=1e4", "prsl", None),
    "prsl_k3_w1e5": ("PRSL k=3 w=1e5", "prsl", None),
    "prsl_k5_w1e5": ("PRSL k=5 w=1e5", "prsl", None),
    "prsl_k9_w1e5": ("PRSL k=9 w=1e5", "prsl", None),
    "prsl_renorm_k3_w10": ("PRSL renormalised k=3 w=10", "renorm", None),
    "topk_ce_k3": ("top-k CE k=3", "topk", None),
    "adv_ce": ("adversarial CE (PGD-2, 2/255)", "adv", None),
    "adv_prsl": ("adversarial PRSL k=3 w=100 (PGD-2, 2/255)", "adv", None),
}
assert set(ROWS_META) == {"start"} | set(study_common.ROWS)
ROWS = [dict(name=n, label=l, family=f, same_as=same) for n, (l, f, same) in ROWS_META.items()]

STUDY = dict(
    # Fine-tuning: vision tower, text frozen, AdamW, cosine schedule.
    batch_size=32,
    train_steps=80,
    adv_train_steps=100,
    lr=1e-4,
    warmup_steps=8,
    adv_eps=2 / 255,
    adv_steps=2,          # TeCoA: PGD-2, step size 2.5 * eps / steps
    # Evaluation: a fixed seeded subset of the test split (same for every model).
    eval_examples=64,
    eval_batch_size=16,   # small: the cascade's later attacks see few points
    eval_seed=0,
    eps=(1 / 255, 2 / 255, 4 / 255),
    apgd_steps=10,        # APGD-CE, and APGD-T per target (all 9 targets); AutoAttack: 100
    square_queries=200,   # AutoAttack: 5000
    pgd_steps=10,         # PGD-CE, step 2.5 * eps / steps, one random start
    topk_entropy=3,
)

QUICK_ROWS = ("start", "ce", "prsl_k1", "prsl_k3_w1e4", "adv_prsl")
QUICK = dict(STUDY, batch_size=16, train_steps=3, adv_train_steps=3, eval_examples=8,
             eval_batch_size=8, eps=(2 / 255,), apgd_steps=2, square_queries=8,
             pgd_steps=2, warmup_steps=1)


def cpu_seconds():
  """CPU time of this process (all threads), user + system."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def row_config(row, study, seed):
  """The train.py ConfigDict of one (row, seed): base config with the row's loss."""
  c = study_common.apply_row(base.base_config(), row["name"])
  c.seed = seed
  c.adversarial.eps = study["adv_eps"]
  c.adversarial.steps = study["adv_steps"]
  c.optimizer.lr = study["lr"]
  c.optimizer.warmup_steps = study["warmup_steps"]
  c.batch_size = study["batch_size"]
  c.total_steps = study["adv_train_steps"] if c.adversarial.enabled else study["train_steps"]
  c.log_every = max(1, c.total_steps // 8)
  c.checkpoint_every = c.total_steps  # one checkpoint, at the end
  c.keep_checkpoints = 1
  c.export = False
  return c


def portable(train_spec):
  """The train spec with the bundled model's path relative to the repo (clones compare)."""
  if not train_spec:
    return train_spec
  out = json.loads(json.dumps(train_spec))
  path = out["model"]["path"]
  if os.path.isabs(path) and path.endswith(os.path.join("prsl_jax", "assets", "tiny_clip")):
    out["model"]["path"] = os.path.join("prsl_jax", "assets", "tiny_clip")
  return out


def fingerprint(obj):
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_settings(study):
  keys = ("eval_examples", "eval_batch_size", "eval_seed", "eps", "apgd_steps",
          "square_queries", "pgd_steps", "topk_entropy")
  return {k: study[k] for k in keys} | {"apgd_targets": evaluation.APGD_TARGETS}


# ----------------------------------------------------------------------------
# Models as data: one logits_fn for every model, so each attack compiles once.
# ----------------------------------------------------------------------------


def _zs_logits(clip, params, images):
  clip_params, class_emb = params
  return zeroshot.logits(clip, clip_params, class_emb, images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _diversity_batch(clip, params, images, topk):
  logits = _zs_logits(clip, params, images)
  logp = jax.nn.log_softmax(logits, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  top, _ = jax.lax.top_k(logp, topk)
  logq = jax.nn.log_softmax(top, axis=-1)  # softmax renormalised over the top-k classes
  top_entropy = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
  return jnp.argmax(logits, -1), entropy, top_entropy


def clean_metrics(clip, params, source, batch_size, topk):
  """Accuracy and output diversity on every image of `source` (clean)."""
  correct, ent, top_ent = [], [], []
  for batch in data.eval_batches(source, np.arange(len(source)), batch_size):
    pred, e, t = jax.device_get(_diversity_batch(clip, params, batch["image"], topk))
    m = batch["mask"]
    correct.append((pred == batch["label"])[m])
    ent.append(e[m])
    top_ent.append(t[m])
  correct, ent, top_ent = map(np.concatenate, (correct, ent, top_ent))
  return {"clean_accuracy_full": float(correct.mean()), "num_full": int(len(correct)),
          "entropy": float(ent.mean()), f"top{topk}_entropy": float(top_ent.mean())}


def compact(res):
  """evaluate() output without the per-example lists (those stay in eval.json)."""
  return {
      "clean_accuracy": res["clean_accuracy"],
      "robust": {f"{r['eps'] * 255:g}/255": {
          "robust_accuracy": r["robust_accuracy"], "accuracy_after": r["accuracy_after"],
          "gradient_masking": r["gradient_masking"], "seconds": r["seconds"]}
                 for r in res["robust"]},
      "checks_passed": res["checks"]["passed"],
      "warnings": res["checks"]["warnings"],
  }


def evaluate_model(logits_fn, clip, params, test_source, indices, study):
  out = clean_metrics(clip, params, test_source, 64, study["topk_entropy"])
  common = dict(eps_list=list(study["eps"]), seed=study["eval_seed"],
                batch_size=study["eval_batch_size"], progress=False)
  with warnings.catch_warnings():
    # Recorded in the results (checks.warnings); not repeated on the console.
    warnings.simplefilter("ignore", evaluation.SoundnessWarning)
    t0 = time.time()
    std = evaluation.evaluate(logits_fn, params, test_source, indices, suite="standard",
                              steps=study["apgd_steps"],
                              square_queries=study["square_queries"], **common)
    t1 = time.time()
    pgd = evaluation.evaluate(logits_fn, params, test_source, indices, suite=["pgd-ce"],
                              steps=study["pgd_steps"], **common)
    t2 = time.time()
  out["standard"] = compact(std)
  out["pgd_ce"] = compact(pgd)
  out["seconds"] = {"standard": t1 - t0, "pgd_ce": t2 - t1}
  return out, {"standard": std, "pgd_ce": pgd}


def loss_scales(clip, params, class_emb, source, study, num=192):
  """Scale of CE and R_K, and of their logit gradients, at the starting model.

  On clean training images and on PGD-2 (adv_eps) images of them: the numbers
  the weights above are chosen from.
  """
  from prsl_jax import attacks, losses  # pylint: disable=g-import-not-at-top
  fn = functools.partial(_zs_logits, clip, (params, class_emb))
  idx = np.arange(0, len(source), max(1, len(source) // num))[:num]
  clean, adv, labels = [], [], []
  for b in data.eval_batches(source, idx, 64):
    x, y = jnp.asarray(b["image"]), jnp.asarray(b["label"])
    xa = attacks.pgd(fn, x, y, key=jax.random.key(0), eps=study["adv_eps"],
                     steps=study["adv_steps"])
    m = b["mask"]
    clean.append(np.asarray(fn(x))[m])
    adv.append(np.asarray(fn(xa))[m])
    labels.append(b["label"][m])
  y = jnp.asarray(np.concatenate(labels))
  out = {}
  for kind, z in (("clean", clean), ("pgd2_adv", adv)):
    z = jnp.asarray(np.concatenate(z))
    ce_mean = lambda z: jnp.mean(losses.cross_entropy(z, y))
    g_ce = float(jnp.linalg.norm(jax.grad(ce_mean)(z)))
    rec = {"accuracy": float(jnp.mean(jnp.argmax(z, -1) == y)), "ce": float(ce_mean(z)),
           "grad_ce": g_ce}
    for k in (3, 5, 9):
      for renorm in (False, True):
        r_mean = lambda z, k=k, renorm=renorm: jnp.mean(
            losses.recentralization(z, y, k=k, renormalize=renorm))
        tag = f"R_{k}" + ("_renorm" if renorm else "")
        g = float(jnp.linalg.norm(jax.grad(r_mean)(z)))
        rec[tag] = float(r_mean(z))
        rec[f"grad_ce/grad_{tag}"] = g_ce / g if g else None
    out[kind] = rec
  return out


# ----------------------------------------------------------------------------
# Aggregation and reports.
# ----------------------------------------------------------------------------


def eps_keys(study):
  return [f"{e * 255:g}/255" for e in study["eps"]]


def row_values(runs, study):
  """Per-seed metrics of one row -> {metric: [values]} (fractions, nats)."""
  vals = {}
  def add(key, v):
    vals.setdefault(key, []).append(v)
  topk = study["topk_entropy"]
  for r in runs:
    add("clean_full", r["clean_accuracy_full"])
    add("clean_subset", r["standard"]["clean_accuracy"])
    add("entropy", r["entropy"])
    add(f"top{topk}_entropy", r[f"top{topk}_entropy"])
    for e in eps_keys(study):
      s = r["standard"]["robust"][e]
      add(f"std@{e}", s["robust_accuracy"])
      for a, v in s["accuracy_after"].items():
        add(f"{a}@{e}", v)
      add(f"pgd@{e}", r["pgd_ce"]["robust"][e]["robust_accuracy"])
      # How much a single attack overstates the cascade's robust accuracy (paired
      # per seed: same model, same images).
      add(f"pgd_gap@{e}", vals[f"pgd@{e}"][-1] - s["robust_accuracy"])
      add(f"apgdce_gap@{e}", s["accuracy_after"]["apgd-ce"] - s["robust_accuracy"])
  return vals


def mean_std(v):
  v = np.asarray(v, float)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def fmt(v, pct=True, digits=1):
  if not v:
    return "–"
  m, s = mean_std(v)
  scale = 100 if pct else 1
  if s is None:
    return f"{scale * m:.{digits}f}"
  return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def tables(summary, study):
  """Markdown tables (mean ± sample std over seeds, n = seeds done)."""
  ek = eps_keys(study)
  topk = study["topk_entropy"]
  n_eval = study["eval_examples"]
  lines = [f"Accuracy (%) — clean on the whole digits test split (359 images); robust on "
           f"a fixed subset of {n_eval} test images under the standard cascade "
           f"(APGD-CE, APGD-T, Square; worst case per example), L-inf. Mean ± std over "
           f"the seeds (n).", ""]
  head = ["row", "n", "clean"] + [f"AA ε={e}" for e in ek] + ["checks"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, s in summary.items():
    v = s["values"]
    cells = [s["label"], str(s["n"]), fmt(v.get("clean_full"))]
    cells += [fmt(v.get(f"std@{e}")) for e in ek]
    cells.append(s["checks"])
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"PGD-CE ({study['pgd_steps']} steps) against the cascade, robust accuracy "
            f"(%) on the same {n_eval} images. 'APGD-CE' is the first attack of the cascade "
            "alone; 'AA' the whole cascade.", ""]
  head = ["row"] + [f"{a} ε={e}" for e in ek for a in ("PGD-CE", "APGD-CE", "AA")]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, s in summary.items():
    v = s["values"]
    cells = [s["label"]]
    for e in ek:
      cells += [fmt(v.get(f"pgd@{e}")), fmt(v.get(f"apgd-ce@{e}")), fmt(v.get(f"std@{e}"))]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "How many points (%) a single attack overstates the cascade's robust accuracy "
            "(paired per seed), and the difference to CE of each (+: looks more robust than "
            "CE). A loss that only fools one attack shows up here.", ""]
  head = ["row"] + [f"{a} ε={e}" for e in ek for a in ("PGD−AA", "APGD-CE−AA")]
  head += [f"{a} vs CE ε={e}" for e in ek[1:2] for a in ("PGD-CE", "AA")]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  ce = summary.get("ce", {}).get("values", {})
  for name, s in summary.items():
    v = s["values"]
    cells = [s["label"]]
    for e in ek:
      cells += [fmt(v.get(f"pgd_gap@{e}")), fmt(v.get(f"apgdce_gap@{e}"))]
    for e in ek[1:2]:
      for key in ("pgd", "std"):
        if ce.get(f"{key}@{e}") and v.get(f"{key}@{e}") and name != "ce":
          cells.append(f"{100 * (mean_std(v[f'{key}@{e}'])[0] - mean_std(ce[f'{key}@{e}'])[0]):+.1f}")
        else:
          cells.append("–")
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Output diversity on the clean test split: mean entropy (nats) of the "
            f"softmax (max ln 10 = 2.303) and of its top-{topk} part (softmax renormalised "
            f"over the {topk} most probable classes; max ln {topk} = {np.log(topk):.3f}).", ""]
  head = ["row", "entropy", f"top-{topk} entropy", "clean (subset)"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, s in summary.items():
    v = s["values"]
    cells = [s["label"], fmt(v.get("entropy"), pct=False, digits=4),
             fmt(v.get(f"top{topk}_entropy"), pct=False, digits=4),
             fmt(v.get("clean_subset"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


MARKERS = {"start": "*", "adv_ce": "s", "adv_prsl": "s", "prsl_renorm_k3_w10": "D",
           "topk_ce_k3": "D", "prsl_k3_w1e5": "^", "prsl_k5_w1e5": "^", "prsl_k9_w1e5": "^"}
COLORS = {"start": "black", "ce": "tab:blue", "prsl": "tab:orange", "renorm": "tab:red",
          "topk": "tab:purple", "adv": "tab:green"}


def plots(summary, study, outdir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ek = eps_keys(study)
  paths = []
  # Trade-off: clean accuracy (whole test split) vs robust accuracy, one panel per
  # eps at which some row keeps a robust point (an all-zero panel says nothing).
  shown = [e for e in ek if any(max(s["values"].get(f"std@{e}", [0])) > 0
                                for s in summary.values())] or ek[:1]
  fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4), squeeze=False)
  for ax, e in zip(axes[0], shown):
    for name, s in summary.items():
      v = s["values"]
      if not v.get(f"std@{e}") or name == "prsl_k1":  # k1 trains to CE's exact params
        continue
      (cx, sx), (ry, sy) = mean_std(v["clean_full"]), mean_std(v[f"std@{e}"])
      marker = MARKERS.get(name, "o")
      ax.errorbar(100 * cx, 100 * ry, xerr=100 * (sx or 0), yerr=100 * (sy or 0),
                  fmt=marker, color=COLORS[s["family"]], ms=6, capsize=2, alpha=0.85)
      short = name if name.startswith("adv") else name.replace("prsl_", "")
      short = "ce (= k1)" if name == "ce" and "prsl_k1" in summary else short
      ax.annotate(short, (100 * cx, 100 * ry), fontsize=6, xytext=(3, 2),
                  textcoords="offset points")
    ax.set_xlabel("clean accuracy (%), test split")
    ax.set_ylabel(f"robust accuracy (%), AA ε={e}")
    ax.grid(alpha=0.3)
  handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in COLORS.items()]
  axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
  hidden = [e for e in ek if e not in shown]
  fig.suptitle("Robust (standard cascade) vs clean accuracy, mean ± std over seeds; digits, "
               "tiny CLIP" + (f"; every row is at 0% at ε={', '.join(hidden)}" if hidden else ""),
               fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(outdir, "tradeoff.png"))
  fig.savefig(paths[-1], dpi=90)
  plt.close(fig)

  # Robust accuracy vs eps: the cascade (solid) and PGD-CE (dashed).
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  xs = [0.0] + [e * 255 for e in study["eps"]]
  for ax, (metric, title) in zip(axes, (("std", "standard cascade (APGD-CE, APGD-T, Square)"),
                                        ("pgd", f"PGD-CE, {study['pgd_steps']} steps"))):
    for name, s in summary.items():
      v = s["values"]
      if not v.get(f"{metric}@{ek[0]}"):
        continue
      ys = [mean_std(v["clean_subset"])] + [mean_std(v[f"{metric}@{e}"]) for e in ek]
      style = "--" if name in ("adv_prsl", "topk_ce_k3") or s["family"] == "prsl" else "-"
      ax.errorbar(xs, [100 * m for m, _ in ys], yerr=[100 * (sd or 0) for _, sd in ys],
                  color=COLORS[s["family"]], ls=style, marker="o", ms=3, capsize=2,
                  alpha=0.8, label=name, lw=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("L-inf ε (× 1/255)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"accuracy (%) on {study['eval_examples']} test images")
  axes[0].legend(fontsize=6, ncol=2, loc="lower left")
  fig.tight_layout()
  paths.append(os.path.join(outdir, "robust_vs_eps.png"))
  fig.savefig(paths[-1], dpi=90)
  plt.close(fig)
  return paths


def summarize(rows, results, study):
  summary = {}
  for row in rows:
    runs = [results[(row["name"], s)] for s in SEEDS_OF[row["name"]]
            if (row["name"], s) in results]
    if not runs:
      continue
    failed = sorted({w.split(":")[0] for r in runs for part in ("standard", "pgd_ce")
                     for w in r[part]["warnings"]})
    masked = any(v["gradient_masking"] for r in runs for v in r["standard"]["robust"].values())
    checks = "ok" if all(r[p]["checks_passed"] for r in runs for p in ("standard", "pgd_ce")) \
        else ("MASKING; " if masked else "") + "failed: " + "; ".join(failed)[:80]
    summary[row["name"]] = {"label": row["label"], "family": row["family"], "n": len(runs),
                            "checks": checks, "values": row_values(runs, study)}
  return summary


SEEDS_OF = {}
SCALES = None
FRESH = set()  # (row, seed) evaluated (not read from cache) by this invocation
PREVIOUS_INVOCATIONS = []  # from an earlier study.json in the outdir


def previous_invocations(outdir):
  """Timings of the earlier invocations on this outdir (so a rerun keeps them)."""
  path = os.path.join(outdir, "study.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = json.load(f)
  if "invocations" in old:
    return old["invocations"]
  return [old["this_invocation"]] if "this_invocation" in old else []


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--outdir", default=None, help="default runs/study (runs/study_quick "
                      "with --quick)")
  parser.add_argument("--quick", action="store_true", help="a few rows, 1 seed, tiny budgets "
                      "(smoke test of the whole pipeline)")
  parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
  parser.add_argument("--seeds", default=None, help="comma-separated subset of seeds")
  args = parser.parse_args()

  t_start, cpu_start = time.time(), cpu_seconds()
  load_start = os.getloadavg()
  study = QUICK if args.quick else STUDY
  outdir = args.outdir or ("runs/study_quick" if args.quick else "runs/study")
  os.makedirs(outdir, exist_ok=True)
  PREVIOUS_INVOCATIONS[:] = previous_invocations(outdir)
  rows = [r for r in ROWS if not args.quick or r["name"] in QUICK_ROWS]
  if args.rows:
    wanted = args.rows.split(",")
    unknown = set(wanted) - {r["name"] for r in ROWS}
    if unknown:
      raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {[r['name'] for r in ROWS]}")
    rows = [r for r in rows if r["name"] in wanted]
  seeds = (0,) if args.quick else SEEDS
  if args.seeds:
    seeds = tuple(int(s) for s in args.seeds.split(","))
  for row in rows:
    SEEDS_OF[row["name"]] = (seeds[0],) if row["name"] == "start" else seeds

  # Compiled programs persist across seeds, rows and reruns (same HLO, same binary).
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(outdir,
                                                                             "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  train_lib.logging.set_verbosity(train_lib.logging.WARNING)

  clip = prsl_jax.load_pretrained(base.TINY_CLIP)
  train_source, class_names = data.load("digits", "train", image_size=clip.image_size)
  test_source, _ = data.load("digits", "test", image_size=clip.image_size)
  class_emb = zeroshot.class_embeddings(clip, clip.params, class_names)
  mesh = sharding.make_mesh()
  indices = data.eval_indices(len(test_source), study["eval_examples"], study["eval_seed"])
  logits_fn = functools.partial(_zs_logits, clip)  # one object: attacks compile once
  settings = eval_settings(study)
  scales_path = os.path.join(outdir, "loss_scales.json")
  if os.path.exists(scales_path):
    with open(scales_path) as f:
      scales = json.load(f)
  else:
    scales = loss_scales(clip, clip.params, class_emb, train_source, study)
    with open(scales_path, "w") as f:
      json.dump(scales, f, indent=1)
  print("loss scales at the start (CE, R_3, grad CE / grad R_3): " + "; ".join(
      f"{kind}: {v['ce']:.3g}, {v['R_3']:.3g}, {v['grad_ce/grad_R_3']:.3g}"
      for kind, v in scales.items()), flush=True)
  global SCALES
  SCALES = scales

  print(f"PRSL study: {len(rows)} rows x seeds {list(seeds)}, outdir {outdir}; "
        f"load average {load_start[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
  results, timings, loads = {}, {}, [load_start[0]]
  report_paths = []
  for seed in seeds:
    for row in rows:
      if seed not in SEEDS_OF[row["name"]]:
        continue
      name = row["name"]
      wd = os.path.join(outdir, "runs", name, f"seed{seed}")
      os.makedirs(wd, exist_ok=True)
      cfg = None if name == "start" else row_config(row, study, seed)
      spec = json.loads(json.dumps(
          {"row": row, "train": None if cfg is None else json.loads(cfg.to_json()),
           "eval": settings}, default=str))
      spec_path = os.path.join(wd, "study_spec.json")
      cache = os.path.join(wd, "eval.json")
      if os.path.exists(spec_path):
        with open(spec_path) as f:
          old = json.load(f)
        # Other training settings: the checkpoint is another model; never mix.
        if fingerprint(portable(old["train"])) != fingerprint(portable(spec["train"])):
          raise SystemExit(f"{wd} holds a model trained with other settings "
                           f"(study_spec.json differs); use a new --outdir")
        # Other evaluation settings: keep the model, evaluate it again.
        if fingerprint(old["eval"]) != fingerprint(spec["eval"]) and os.path.exists(cache):
          print(f"[{name} seed {seed}] evaluation settings changed: evaluating again")
          os.remove(cache)
      with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
      if os.path.exists(cache):
        with open(cache) as f:
          results[(name, seed)] = json.load(f)
        print(f"[{name} seed {seed}] cached", flush=True)
        continue

      t0, c0 = time.time(), cpu_seconds()
      record = {"row": name, "seed": seed}
      if cfg is None:
        params = clip.params
      else:
        train_lib.validate(cfg, class_names)
        params = train_lib.train(cfg, wd, clip, train_source, class_emb, None, mesh,
                                 desc=f"{name} s{seed}")
      t1, c1 = time.time(), cpu_seconds()
      record["train_seconds"], record["train_cpu_seconds"] = t1 - t0, c1 - c0

      reuse = None
      if row["same_as"]:
        other = os.path.join(outdir, "runs", row["same_as"], f"seed{seed}")
        ref = checkpoints.restore_params(other, clip)
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
        record[f"max_param_diff_vs_{row['same_as']}"] = diff
        if diff == 0.0 and os.path.exists(os.path.join(other, "eval.json")):
          reuse = os.path.join(other, "eval.json")
      if reuse:
        with open(reuse) as f:
          prev = json.load(f)
        record.update({k: v for k, v in prev.items() if k not in record and k not in
                       ("row", "seed", "train_seconds", "train_cpu_seconds")})
        record["eval_reused_from"] = row["same_as"]
        record["eval_seconds"] = record["eval_cpu_seconds"] = 0.0
      else:
        out, full = evaluate_model(logits_fn, clip, (params, class_emb), test_source,
                                   indices, study)
        record.update(out)
        with open(os.path.join(wd, "eval_full.json"), "w") as f:
          json.dump(full, f, default=str)
        record["eval_seconds"], record["eval_cpu_seconds"] = time.time() - t1, cpu_seconds() - c1
      record["load_average"] = os.getloadavg()[0]
      loads.append(record["load_average"])
      with open(cache, "w") as f:
        json.dump(record, f, indent=2)
      results[(name, seed)] = record
      FRESH.add((name, seed))
      ek = eps_keys(study)
      print(f"[{name} seed {seed}] clean {record['clean_accuracy_full']:.3f}  AA "
            + " ".join(f"{e}:{record['standard']['robust'][e]['robust_accuracy']:.3f}"
                       for e in ek)
            + "  PGD " + " ".join(f"{record['pgd_ce']['robust'][e]['robust_accuracy']:.3f}"
                                  for e in ek)
            + f"  H {record['entropy']:.3f}  train {record['train_seconds']:.0f}s "
              f"(cpu {record['train_cpu_seconds']:.0f}s) eval {record['eval_seconds']:.0f}s "
              f"(cpu {record['eval_cpu_seconds']:.0f}s)  load {record['load_average']:.1f}",
            flush=True)
      report_paths = write_reports(rows, results, study, outdir, seeds, t_start, cpu_start,
                                   loads)

  report_paths = write_reports(rows, results, study, outdir, seeds, t_start, cpu_start, loads)
  with open(os.path.join(outdir, "study.md")) as f:
    print("\n" + f.read())
  wall, cpu = time.time() - t_start, cpu_seconds() - cpu_start
  print(f"wrote {', '.join(report_paths)}")
  print(f"wall time {wall / 60:.1f} min (this invocation: {len(FRESH)} runs done, "
        f"{sum(1 for r in SEEDS_OF.values() for _ in r) - len(FRESH)} cached; process CPU "
        f"time {cpu / 60:.1f} min); load average {np.mean(loads):.1f} (mean over runs) on "
        f"{os.cpu_count()} CPUs")
  if PREVIOUS_INVOCATIONS:
    total = sum(i["wall_seconds"] for i in PREVIOUS_INVOCATIONS) + wall
    print(f"all {len(PREVIOUS_INVOCATIONS) + 1} invocations on {outdir}: {total / 60:.1f} min "
          f"wall")


def write_reports(rows, results, study, outdir, seeds, t_start, cpu_start, loads):
  summary = summarize(rows, results, study)
  md = tables(summary, study)
  with open(os.path.join(outdir, "study.md"), "w") as f:
    f.write(md)
  paths = plots(summary, study, outdir)
  per_run = {f"{n}/seed{s}": {k: v for k, v in r.items()} for (n, s), r in sorted(results.items())}
  current = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
             "wall_seconds": time.time() - t_start, "cpu_seconds": cpu_seconds() - cpu_start,
             "load_average_mean": float(np.mean(loads)),
             "load_average_max": float(np.max(loads)),
             "runs_done": len(FRESH), "runs_cached": len(results) - len(FRESH)}
  totals = {
      "train_seconds": sum(r.get("train_seconds", 0) for r in results.values()),
      "train_cpu_seconds": sum(r.get("train_cpu_seconds", 0) for r in results.values()),
      "eval_seconds": sum(r.get("eval_seconds", 0) for r in results.values()),
      "eval_cpu_seconds": sum(r.get("eval_cpu_seconds", 0) for r in results.values()),
  }
  doc = {
      "command": "python " + " ".join(sys.argv),
      "study": {k: (list(v) if isinstance(v, tuple) else v) for k, v in study.items()},
      "seeds": list(seeds),
      "eval_settings": eval_settings(study),
      "eval_indices": data.eval_indices(359, study["eval_examples"],
                                        study["eval_seed"]).tolist(),
      "rows": rows,
      "loss_scales": SCALES,
      "summary": {n: {"label": s["label"], "n": s["n"], "checks": s["checks"],
                      "mean": {k: mean_std(v)[0] for k, v in s["values"].items()},
                      "std": {k: mean_std(v)[1] for k, v in s["values"].items()}}
                  for n, s in summary.items()},
      "runs": per_run,
      "totals_over_runs": totals,
      "this_invocation": current,
      "invocations": PREVIOUS_INVOCATIONS + [current],
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(), "jax": jax.__version__},
  }
  with open(os.path.join(outdir, "study.json"), "w") as f:
    json.dump(doc, f, indent=1, default=str)
  return [os.path.join(outdir, "study.json"), os.path.join(outdir, "study.md")] + paths


if __name__ == "__main__":
  main()
