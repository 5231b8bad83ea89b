r"""Where does PRSL stand against the field's baselines? The comparison on the digits.

  python -m scripts.field_comparison                                    # runs/comparison
  python -m scripts.field_comparison --quick --outdir /tmp/comparison_q  # a smoke run

Fine-tunes the bundled tiny CLIP (prsl_jax.TINY_CLIP; vision tower, text frozen,
global batch 32) from the same start with the methods robust-CLIP papers compare:

- CE (clean fine-tuning) and the authors' PRSL (arXiv:2402.03627) at the study's
  best cascade row (window 0:6, b = 1e-3; RESULTS.md, "What the numbers say");
- TeCoA: adversarial CE through the zero-shot head (Mao et al., ICLR 2023);
- FARE: the embedding distance to the frozen original on adversarial images,
  no labels (Schlarmann et al., ICML 2024; prsl_jax/finetune_losses.py);
- PMG-AFT: CE on adversarial images plus the KL terms to the frozen original's
  and the clean prediction (CVPR 2024; prsl_jax/finetune_losses.py);
- adversarial PRSL: TeCoA with PRSL in place of CE (window 0:4, b = 0.1).

The training settings are scripts/prsl_study.py's (its STUDY; the rows are
configs/study_common.py's): 80 clean steps, or 100 steps on PGD-2 images at
eps 2/255 for the adversarial rows (FARE's attack maximises its embedding loss,
the others' CE). Three training seeds each.

Every model is evaluated alike: clean accuracy on the whole digits test split
(359 images), and AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T,
Square; worst case per example, soundness checks on) at L-inf 1, 2 and 4/255 on
the study's fixed 64 test images, with the study's reduced attack budgets
(10 steps, 9 targets, 200 Square queries: upper bounds on robust accuracy). The
start model does not depend on the training seed: it is evaluated once.

Resumable: each (row, seed) trains in <outdir>/runs/<row>/seed<s> (the trainer
resumes from its checkpoint) and its numbers are cached there as
comparison.json; a rerun skips what finished. Writes <outdir>/comparison.json
(every number, the settings, timings and machine load), comparison.md (the
table, with each row's per-seed difference to TeCoA and to CE) and
comparison.png (robust accuracy against eps).
"""

import argparse
import json
import os
import platform
import time
import warnings

import jax
import numpy as np
from absl import logging

from prsl_jax import cli
from prsl_jax import compilation
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import reports
from prsl_jax import runlock
from prsl_jax import trainer
from prsl_jax import zeroshot
from scripts import prsl_study
from scripts.prsl_study_reports import eps_key
from scripts.prsl_study_reports import fmt
from scripts.prsl_study_reports import mean_std
from scripts.prsl_study_reports import paired
from scripts.prsl_study_reports import table
from scripts.prsl_study_reports import wins

# The rows, in the table's order, with the names papers use for them.
ROWS = {
    "start": "starting model (zero-shot)",
    "ce": "CE (clean fine-tuning)",
    "prsl_0_6_b1e-3": "PRSL 0:6, b = 1e-3 (clean)",
    "adv_ce": "TeCoA (adversarial CE)",
    "fare": "FARE (embedding loss, adversarial)",
    "pmg_aft": "PMG-AFT (CE + 2 KL, adversarial)",
    "adv_prsl_0_4_b1e-1": "adversarial PRSL 0:4, b = 0.1",
}
QUICK_ROWS = ("start", "ce", "adv_ce", "fare", "pmg_aft")
REFERENCES = ("adv_ce", "ce")  # the per-seed differences the table gives


def suite(study):
  """AutoAttack's standard cascade with the study's budgets."""
  return {"standard": evaluation.make_suite("standard", steps=study["attack_steps"],
                                            queries=study["square_queries"],
                                            num_targets=study["num_targets"])}


def settings(study, seeds, rows):
  keys = ("batch_size", "train_steps", "adv_train_steps", "lr", "warmup_steps", "adv_eps",
          "adv_steps", "eval_examples", "eval_batch_size", "eval_seed", "eps",
          "attack_steps", "num_targets", "square_queries")
  return {"rows": {n: ROWS[n] for n in rows}, "seeds": list(seeds),
          "study": {k: study[k] for k in keys},
          "suite": "AutoAttack standard cascade: APGD-CE, APGD-T, FAB-T, Square"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--outdir", default=None, help="default runs/comparison "
                 "(runs/comparison_quick with --quick)")
  p.add_argument("--quick", action="store_true", help=f"rows {', '.join(QUICK_ROWS)}, "
                 "seeds (0, 1) and the study's tiny --quick budgets (a smoke run)")
  p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
  return p.parse_args(argv)


def evaluate_run(name, seed, s, study, indices, classify, class_emb, start_params, wd):
  model = s.pretrained[0]
  """Trains (row != start) and evaluates one (row, seed); its record."""
  t0 = time.time()
  record = {"row": name, "seed": seed, "load_average_start": os.getloadavg()[0]}
  params = start_params
  if name != "start":
    cfg = prsl_study.row_config(name, study, seed)
    trainer.validate(cfg, num_classes=len(s.class_names))
    params, step = trainer.train(cfg, wd, s, desc=f"{name} s{seed}")
    if step != cfg.total_steps:
      raise RuntimeError(f"{wd}: training ended at step {step}, not {cfg.total_steps}")
  record["train_seconds"] = time.time() - t0
  record["param_change"] = prsl_study.param_change(params, start_params)
  full = prsl_study.clean_metrics(model, params, class_emb, s.eval_source, study)
  record["clean_accuracy_full"] = full["clean_accuracy_full"]
  t1 = time.time()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", evaluation.SoundnessWarning)  # kept in the record
    result = evaluation.evaluate(
        classify, {"params": params, "class_emb": class_emb}, s.eval_source, indices,
        eps_list=list(study["eps"]), suites=suite(study), seed=study["eval_seed"],
        batch_size=study["eval_batch_size"], progress_bar=False)
  record["eval"] = prsl_study.compact(result)
  record["eval_seconds"] = time.time() - t1
  record["load_average"] = os.getloadavg()[0]
  return record


def summarize(records, rows, study):
  """{row: {label, seeds, clean, robust: {eps key: [per seed]}, checks}}."""
  out = {}
  for name in rows:
    runs = sorted((r for r in records if r["row"] == name), key=lambda r: r["seed"])
    if not runs:
      continue
    out[name] = {
        "label": ROWS[name], "seeds": [r["seed"] for r in runs],
        "values": {"clean": [r["clean_accuracy_full"] for r in runs],
                   **{eps_key(e): [r["eval"]["robust"]["standard"][eps_key(e)]
                                   ["robust_accuracy"] for r in runs] for e in study["eps"]}},
        "checks": "ok" if all(r["eval"]["checks_passed"] for r in runs) else "failed: " + "; ".join(
            sorted({w.split(":")[0] for r in runs for w in r["eval"]["warnings"]})),
    }
  return out


def markdown(summary, study):
  ek = [eps_key(e) for e in study["eps"]]
  key = eps_key(2 / 255) if 2 / 255 in study["eps"] else ek[0]
  head = ["method", "clean (359)", *[f"AA {k}" for k in ek],
          *[f"AA {key} − {ROWS[r].split(' (')[0]} (seeds)" for r in REFERENCES], "checks"]
  rows_ = []
  for name, s in summary.items():
    diffs = []
    for ref in REFERENCES:
      d = paired(summary, name, key, ref=ref) if name != ref else []
      diffs.append(f"{fmt(d, signed=True)} ({wins(d)})" if d else "–")
    rows_.append([s["label"], fmt(s["values"]["clean"]),
                  *[fmt(s["values"][k]) for k in ek], *diffs, s["checks"]])
  return "\n".join(
      [f"Robust accuracy (%) under AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, "
       f"Square; {study['attack_steps']} steps, {study['num_targets']} targets, "
       f"{study['square_queries']} queries) on {study['eval_examples']} fixed test digits, "
       "L-inf; clean accuracy on the whole test split. Mean ± sample std over the training "
       "seeds; the differences are paired by seed (same data order), the start row against "
       "each seed of the reference.", ""] + table(head, rows_)) + "\n"


def plot(summary, study, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  xs = [0] + [e * 255 for e in study["eps"]]
  for name, s in summary.items():
    ms = [mean_std(s["values"]["clean"])] + [mean_std(s["values"][eps_key(e)])
                                            for e in study["eps"]]
    ax.errorbar(xs, [100 * m for m, _ in ms], yerr=[100 * (sd or 0) for _, sd in ms],
                fmt="-o", ms=4, capsize=2, label=s["label"])
  ax.set_xlabel("L-inf eps (× 1/255); 0 = clean accuracy")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Tiny CLIP on the digits: AutoAttack cascade (reduced budgets)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  compilation.set_cpu_flags()  # train.py's XLA:CPU settings
  cli.quiet_transformers()
  t_start = time.time()
  study = prsl_study.QUICK if args.quick else prsl_study.STUDY
  rows = list(QUICK_ROWS if args.quick else ROWS)
  seeds = (tuple(int(x) for x in args.seeds.split(",")) if args.seeds
           else prsl_study.QUICK_SEEDS if args.quick else prsl_study.SEEDS)
  outdir = args.outdir or ("runs/comparison_quick" if args.quick else "runs/comparison")
  os.makedirs(outdir, exist_ok=True)
  try:
    runlock.hold(outdir, flag="--outdir")  # one comparison per folder
  except runlock.RunLockedError as e:
    raise SystemExit(f"error: {e}") from None
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(outdir,
                                                                              "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.set_verbosity(logging.WARNING)

  s = trainer.setup(prsl_study.row_config("ce", study, 0))
  model, start_params, _ = s.pretrained
  class_emb = jax.device_get(s.head["class_emb"])
  classify = zeroshot.Classifier(model)  # one object: every model shares the compilations
  indices = data.eval_indices(len(s.eval_source), study["eval_examples"], study["eval_seed"])
  spec = settings(study, seeds, rows)
  print(f"field comparison: {len(rows)} rows x seeds {list(seeds)}, outdir {outdir}; load "
        f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

  records = []
  for seed in seeds:
    for name in rows:
      if name == "start" and seed != seeds[0]:
        continue  # the start does not depend on the training seed
      wd = os.path.join(outdir, "runs", name, f"seed{seed}")
      os.makedirs(wd, exist_ok=True)
      path = os.path.join(wd, "comparison.json")
      want = json.loads(json.dumps({"row": name, "seed": seed, "study": spec["study"]}))
      if os.path.exists(path):
        with open(path) as f:
          cached = json.load(f)
        if cached.get("spec") == want:
          records.append(cached["record"])
          print(f"[{name} seed {seed}] cached", flush=True)
          continue
        raise SystemExit(f"{wd} holds a run with other settings; use a new --outdir")
      record = evaluate_run(name, seed, s, study, indices, classify, class_emb, start_params,
                            wd)
      reports.write_atomic(path, json.dumps({"spec": want, "record": record}, indent=1))
      records.append(record)
      rob = record["eval"]["robust"]["standard"]
      print(f"[{name} seed {seed}] clean {record['clean_accuracy_full']:.3f}  AA "
            + "  ".join(f"{k} {v['robust_accuracy']:.3f}" for k, v in rob.items())
            + f"  train {record['train_seconds']:.0f}s eval {record['eval_seconds']:.0f}s "
            f"load {record['load_average']:.1f}", flush=True)

  summary = summarize(records, rows, study)
  text = markdown(summary, study)
  wall = time.time() - t_start
  reports.write_atomic(os.path.join(outdir, "comparison.md"), text)
  reports.write_atomic(os.path.join(outdir, "comparison.json"), json.dumps({
      "settings": spec, "summary": summary, "runs": records,
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "jax": jax.__version__, "wall_seconds_this_invocation": wall}}, indent=1))
  plot(summary, study, os.path.join(outdir, "comparison.png"))
  print("\n" + text)
  print(f"wrote {outdir}/comparison.json, comparison.md, comparison.png; wall time "
        f"{wall / 60:.1f} min")


if __name__ == "__main__":
  main()
