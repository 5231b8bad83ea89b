r"""The paper's setting on the embedded captioner: CE vs the authors' PRSL, three seeds.

  python -m scripts.caption_study                      # runs/caption_study, ~20 min on 2 cores
  python -m scripts.caption_study --quick --outdir /tmp/cs   # a smoke run

For each training seed, configs/digits_captioning.py fine-tunes the bundled tiny
captioner (prsl_jax/assets/tiny_captioner) with the authors' PRSL over token
logits and with cross-entropy, from the same start, and evaluates the start and
both models on the same 64 digits under the paper's protocol (BIM-10 through
each model's own training loss, label = its clean caption) and under APGD-CE on
the token loss, at L-inf 1/255, 2/255 and 4/255, with the diversity of clean
generation. Resumable (each seed's run folder resumes; a finished seed is
read back). Writes <outdir>/caption_study.json and caption_study.md; RESULTS.md
quotes them.
"""

import argparse
import json
import os
import time

from absl import logging
import numpy as np

from configs import digits_captioning
from prsl_jax import compilation
from prsl_jax import runlock
from prsl_jax import trainer

SEEDS = (0, 1, 2)
ROWS = ("start", "prsl fine-tuned", "ce fine-tuned")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--outdir", default="runs/caption_study")
  p.add_argument("--quick", action="store_true", help="2 steps, 8 examples, one seed")
  return p.parse_args(argv)


def seed_config(seed, quick):
  c = digits_captioning.get_config("runlocal" if quick else None)
  c.seed = seed
  if quick:
    c.eval.eps = (4 / 255,)
  return c


def run_seed(seed, outdir, quick):
  """One seed's results.json (trained and evaluated, or read back when done)."""
  workdir = os.path.join(outdir, f"seed{seed}")
  path = os.path.join(workdir, "results.json")
  if os.path.isfile(path):
    with open(path) as f:
      record = json.load(f)
    if record.get("complete", True):
      return record
  config = seed_config(seed, quick)
  trainer.run(config, workdir)
  with open(path) as f:
    return json.load(f)


def _mean_std(values):
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def _fmt(values, pct=True):
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  m, s = _mean_std(values)
  k = 100 if pct else 1
  digits = 1 if pct else 3
  return f"{k * m:.{digits}f}" + ("" if s is None else f" ± {k * s:.{digits}f}")


def summarize(records):
  """{row: {metric: [value per seed]}} from the seeds' results.json."""
  out = {}
  for record in records:
    for row, res in record["results"].items():
      vals = out.setdefault(row, {})
      add = lambda k, v: vals.setdefault(k, []).append(v)
      add("keyword_accuracy", res["clean"].get("keyword_accuracy"))
      for k, v in res["clean"]["diversity"].items():
        add(k, v)
      for suite, rs in res["robust"].items():
        for e in rs:
          tag = f"{suite}@{e['eps'] * 255:g}"
          add(f"changed {tag}", e["change_rate"])
          add(f"kept {tag}", e["keyword_survival"])
          add(f"loss {tag}", e["token_loss_adversarial"] - e["token_loss_clean"])
  return out


def tables(summary, eps_keys):
  lines = ["Captions changed / class word kept (%) under attack, mean ± std over the seeds "
           "(64 digits; L-inf budgets on [0, 1] pixels).", ""]
  for suite, label in (("paper", "the paper's protocol: BIM-10 on each model's training loss"),
                       ("strong", "APGD-CE on the token loss (10 steps)")):
    lines += [f"**{label}**", "",
              "| model | " + " | ".join(f"ε={e}/255 changed | kept" for e in eps_keys) + " |",
              "|---|" + "---|---|" * len(eps_keys)]
    for row, vals in summary.items():
      cells = []
      for e in eps_keys:
        cells += [_fmt(vals.get(f"changed {suite}@{e}", [])),
                  _fmt(vals.get(f"kept {suite}@{e}", []))]
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["Clean generation: keyword accuracy (%) and diversity (the paper's trade-off).", "",
            "| model | keyword acc. | distinct-1 | distinct-2 | vocabulary | mean length |",
            "|---|---|---|---|---|---|"]
  for row, vals in summary.items():
    lines.append(f"| {row} | {_fmt(vals['keyword_accuracy'])} | "
                 f"{_fmt(vals['distinct_1'], False)} | {_fmt(vals['distinct_2'], False)} | "
                 f"{_fmt(vals['vocabulary_size'], False)} | "
                 f"{_fmt(vals['mean_length'], False)} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  compilation.set_cpu_flags()  # train.py's XLA:CPU settings (prsl_jax/compilation.py)
  os.makedirs(args.outdir, exist_ok=True)
  try:
    runlock.hold(args.outdir, flag="--outdir")  # one study per folder
  except runlock.RunLockedError as e:
    raise SystemExit(f"error: {e}") from None
  t0 = time.time()
  seeds = SEEDS[:1] if args.quick else SEEDS
  records = [run_seed(s, args.outdir, args.quick) for s in seeds]
  summary = summarize(records)
  eps_keys = sorted({k.split("@")[1] for v in summary.values() for k in v if "@" in k},
                    key=float)
  md = tables(summary, eps_keys)
  with open(os.path.join(args.outdir, "caption_study.json"), "w") as f:
    json.dump({"seeds": list(seeds), "summary": summary, "seconds": time.time() - t0,
               "load_average": os.getloadavg()}, f, indent=1)
  with open(os.path.join(args.outdir, "caption_study.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  main()
