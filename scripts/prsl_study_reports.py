"""The PRSL study's tables and plots (scripts/prsl_study.py writes them with its
records): markdown tables of the per-seed summaries and the PNG figures.

A summary is {row: {label, family, n, seeds, checks, values: {metric: [per seed]}}}
(prsl_study.summarize); `study` the study's settings; `rows` the row specs
(configs/study_common.py plus the start row).
"""

import math
import os

import numpy as np

from configs import study_common

# The eps of the tables' headline comparisons (the one where models differ).
KEY_EPS = 2 / 255


def eps_key(e):
  return f"{e * 255:g}/255"


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


def plots(summary, study, outdir, rows):
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
                    and rows[n]["family"] == "prsl" for n in summary)]
  if windows and "ce" in summary:
    fig, axes = plt.subplots(1, len(windows), figsize=(3.6 * len(windows), 3.6), sharey=True,
                             squeeze=False)
    ce = summary["ce"]["values"]
    for ax, w in zip(axes[0], windows):
      names = [n for n in summary if rows[n]["family"] == "prsl"
               and (rows[n]["loss"]["start"], rows[n]["loss"]["end"]) == w]
      bs = [rows[n]["loss"]["weight"] for n in names]
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
  shown = [n for n in summary if rows[n]["family"] in ("start", "ce", "drsl", "ours", "adv")
           or n.startswith("prsl_0_4_b") and rows[n]["family"] == "prsl"]
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
