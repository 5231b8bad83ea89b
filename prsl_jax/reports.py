"""Tables and plots of evaluation results: classifiers (evaluation.Result) and
captioners (captioning.CaptionResult), or their to_dict(); and the one atomic
writer of the records beside them (results.json, results.md)."""

import os

from prsl_jax.evaluation import format_eps


def write_atomic(path, text):
  """Writes text to path through a temporary file and a rename: a reader (or a
  kill) never sees half a file."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)

SUITE_LABELS = {
    "standard": "AutoAttack standard cascade",
    "fast": "APGD-CE + APGD-T",
    "pgd": "PGD-CE + PGD-CW",
    "paper": "paper: BIM-10 on the training loss",
}


def _as_dict(result):
  return result.to_dict() if hasattr(result, "to_dict") else result


def _pct(x):
  return "–" if x is None else f"{100 * x:.1f}"


def _failed(checks):
  names = [("deterministic", "nondeterministic"), ("outputs_are_logits", "probabilities"),
           ("gradients_ok", "gradients"), ("ball_ok", "ball"), ("eps0_ok", "eps=0")]
  out = [label for key, label in names if not checks.get(key, True)]
  return out + (["MASKING"] if checks.get("gradient_masking") else [])


def format_table(results_by_model):
  """Markdown: accuracy (%) per model and suite, clean and per eps; then per attack.

  The first table has each suite's robust accuracy (worst case per example over
  its cascade); the second the accuracy after each attack of each cascade
  (cumulative: that attack and all before it).
  """
  results = {m: _as_dict(r) for m, r in results_by_model.items()}
  eps_all = sorted({r["eps"] for res in results.values() for rs in res["robust"].values()
                    for r in rs})
  head = ["model", "attack", "clean"] + [f"ε={format_eps(e)}" for e in eps_all] + ["checks"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for model, res in results.items():
    checks = ", ".join(_failed(res["checks"])) or "ok"
    for suite, rs in res["robust"].items():
      by_eps = {r["eps"]: r for r in rs}
      cells = [model, SUITE_LABELS.get(suite, suite), _pct(res["clean_accuracy"])]
      cells += [_pct(by_eps[e]["robust_accuracy"]) if e in by_eps else "–" for e in eps_all]
      cells.append(checks)
      lines.append("| " + " | ".join(cells) + " |")
  multi = [(m, suite, rs) for m, res in results.items() for suite, rs in res["robust"].items()
           if len(res["suites"][suite]) > 1]
  if multi:
    norm = next(iter(results.values()))["norm"]
    lines += ["", f"Robust accuracy (%) after each attack of a cascade ({norm}; cumulative: "
              "an attack runs only on the points the attacks before it failed on).", ""]
    lines += ["| model | attack | eps | after each attack |", "|---|---|---|---|"]
    for model, suite, rs in multi:
      for r in rs:
        steps = " → ".join(f"{a} {_pct(v)}" for a, v in r["accuracy_after"].items())
        lines.append(f"| {model} | {SUITE_LABELS.get(suite, suite)} | "
                     f"{format_eps(r['eps'])} | {steps} |")
  return "\n".join(lines) + "\n"


def plot(results_by_model, path):
  """PNG of robust accuracy (%) against eps: one colour per model, one line style per suite."""
  results = {m: _as_dict(r) for m, r in results_by_model.items()}
  all_eps = [r["eps"] for res in results.values() for rs in res["robust"].values()
             for r in rs]
  norms = {res["norm"] for res in results.values()}
  # In 1/255 units when every budget is a multiple of it (the usual L-inf budgets).
  in_255 = all(abs(e * 255 - round(e * 255)) < 1e-6 for e in all_eps)
  unit = 255.0 if in_255 else 1.0
  suites = list(dict.fromkeys(s for res in results.values() for s in res["robust"]))
  plt, fig, ax, colours = _figure()
  for i, (model, res) in enumerate(results.items()):
    for suite, rs in res["robust"].items():
      pts = sorted((r["eps"], r["robust_accuracy"]) for r in rs)
      if not pts or pts[0][0] > 0:
        pts = [(0.0, res["clean_accuracy"])] + pts
      label = model if len(suites) == 1 else f"{model} ({SUITE_LABELS.get(suite, suite)})"
      ax.plot([e * unit for e, _ in pts], [100 * a for _, a in pts], marker="o",
              color=colours[i % len(colours)],
              linestyle=_STYLES[suites.index(suite) % len(_STYLES)], label=label)
  ax.set_xlabel(("ε (× 1/255)" if in_255 else "ε") + f", {'/'.join(sorted(norms))}")
  return _save(plt, fig, ax, "robust accuracy (%)", path)


_STYLES = ["-", "--", ":", "-."]


# Several datasets in one run (prsl_jax.evaluator.run_benchmark's record).

# Trained on, not zero-shot: FARE's tables give it a column of its own, outside
# the average (so do TeCoA's descendants' "zero-shot average").
NOT_ZERO_SHOT = ("imagenet2012",)


def _mean(values):
  return sum(values) / len(values) if values else None


def benchmark_summary(record):
  """{model: {"clean": {dataset: acc, "average": acc}, "robust": {suite: {eps
  label: {dataset: acc, "average": acc}}}}} from a benchmark record; the average
  is over the zero-shot datasets done (every one but NOT_ZERO_SHOT when others
  are there)."""
  out = {}
  for ds_name, ds in record["datasets"].items():
    for model, res in ds["models"].items():
      m = out.setdefault(model, {"clean": {}, "robust": {}})
      m["clean"][ds_name] = res["clean_accuracy"]
      for suite, rs in res["robust"].items():
        for r in rs:
          m["robust"].setdefault(suite, {}).setdefault(format_eps(r["eps"]), {})[ds_name] = (
              r["robust_accuracy"])
  for m in out.values():
    for row in [m["clean"]] + [r for by_eps in m["robust"].values() for r in by_eps.values()]:
      names = [d for d in row if d not in NOT_ZERO_SHOT] or list(row)
      row["average"] = _mean([row[d] for d in names])
  return out


def benchmark_title(record):
  s, proto = record["settings"], record.get("protocol")
  what = f"benchmark {record['benchmark']}" if record.get("benchmark") else "datasets"
  eps = ", ".join(format_eps(e) for e in s["eps"])
  how = (f"protocol {proto['name']}" + (f" (overridden by --{', --'.join(proto['overridden_by'])})"
                                         if proto["overridden_by"] else "")
         if proto else "no protocol")
  state = "" if record.get("complete") else " (partial: a rerun of its command finishes it)"
  return (f"Zero-shot accuracy (%) on the {what} {', '.join(record['datasets'])}; {how}; "
          f"suites {', '.join(s['suite'] or ['standard'])}, steps {s['steps']}, "
          f"{s['norm']} eps {eps} on [0, 1] pixels; seed {s['seed']}{state}.")


def format_benchmark_table(record):
  """Markdown: one table per model, a column per dataset and the average (over
  the zero-shot sets: NOT_ZERO_SHOT sits outside it), a row for clean accuracy
  and one per suite and eps (robust accuracy: each suite's cascade)."""
  summary = benchmark_summary(record)
  datasets = list(record["datasets"])
  lines = []
  for model, m in summary.items():
    head = ["", *datasets, "average"]
    lines += [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("clean", m["clean"])] + [
        (f"{SUITE_LABELS.get(suite, suite)} ε={eps}", row)
        for suite, by_eps in m["robust"].items() for eps, row in by_eps.items()]
    for label, row in rows:
      lines.append("| " + " | ".join([label] + [_pct(row.get(d)) for d in datasets]
                                     + [_pct(row["average"])]) + " |")
    failed = sorted({d for d in datasets for mm, r in record["datasets"][d]["models"].items()
                     if mm == model and not r["checks"].get("passed", True)})
    outside = [d for d in datasets if d in NOT_ZERO_SHOT and len(datasets) > 1]
    lines += ["", (f"Average over the zero-shot sets ({', '.join(outside)} outside it). "
                   if outside else "")
              + f"Soundness checks: {'failed on ' + ', '.join(failed) if failed else 'ok'}.",
              ""]
  return "\n".join(lines)


def plot_benchmark(record, path):
  """PNG: robust accuracy (%) per dataset (and the average), a colour per model,
  a marker per eps (and a line style per suite when there are several)."""
  summary = benchmark_summary(record)
  datasets = list(record["datasets"]) + ["average"]
  plt, fig, ax, colours = _figure()
  fig.set_size_inches(max(6, 0.6 * len(datasets) + 2), 4.2)
  markers = ["o", "s", "^", "D", "v"]
  suites = list(dict.fromkeys(s for m in summary.values() for s in m["robust"]))
  for i, (model, m) in enumerate(summary.items()):
    for suite, by_eps in m["robust"].items():
      for j, (eps, row) in enumerate(by_eps.items()):
        xs = [k for k, d in enumerate(datasets) if row.get(d) is not None]
        label = f"{model} ε={eps}" + (f" ({SUITE_LABELS.get(suite, suite)})"
                                      if len(suites) > 1 else "")
        ax.plot(xs, [100 * row[datasets[k]] for k in xs], marker=markers[j % len(markers)],
                color=colours[i % len(colours)],
                linestyle=_STYLES[suites.index(suite) % len(_STYLES)], label=label)
  ax.set_xticks(range(len(datasets)))
  ax.set_xticklabels(datasets, rotation=45, ha="right", fontsize=7)
  return _save(plt, fig, ax, "robust accuracy (%)", path)


def _figure():
  """(pyplot, figure, axes, colour cycle) for a headless accuracy-vs-eps plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.2))
  return plt, fig, ax, plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(plt, fig, ax, ylabel, path):
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# Captioners.

CAPTION_SUITE_LABELS = {"paper": "paper: BIM-10 on the training loss",
                        "strong": "APGD-CE (token loss)", "pgd": "PGD-CE (token loss)"}



def format_caption_table(results_by_model):
  """Markdown: per model and suite, clean quality and per eps the caption change
  rate / keyword survival (%), then diversity and caption scores. Answers to a
  question (VQA, a result with a prompt): clean VQA accuracy and per eps the
  answer change rate / VQA accuracy (%)."""
  results = {m: (r.to_dict() if hasattr(r, "to_dict") else r)
             for m, r in results_by_model.items()}
  eps_all = sorted({e["eps"] for r in results.values() for rs in r["robust"].values()
                    for e in rs})
  vqa = any(r.get("prompt") for r in results.values())
  if vqa:
    head = ["model", "attack", "VQA acc."] + [
        f"ε={format_eps(e)} answer changed / VQA acc." for e in eps_all] + ["checks"]
  else:
    head = ["model", "attack", "keyword acc."] + [
        f"ε={format_eps(e)} changed / kept" for e in eps_all] + ["checks"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for model, r in results.items():
    failed = [k for k in ("deterministic", "gradients_ok", "ball_ok", "eps0_ok")
              if not r["checks"].get(k, True)]
    for suite, rs in r["robust"].items():
      by_eps = {e["eps"]: e for e in rs}
      cells = [model, CAPTION_SUITE_LABELS.get(suite, suite),
               _pct(r["clean"].get("vqa_accuracy" if vqa else "keyword_accuracy"))]
      for e in eps_all:
        x = by_eps.get(e)
        if x is None:
          cells.append("–")
        elif vqa:
          cells.append(f"{_pct(x.get('answer_change_rate'))} / {_pct(x.get('vqa_accuracy'))}")
        else:
          cells.append(f"{_pct(x['change_rate'])} / {_pct(x['keyword_survival'])}")
      cells.append(", ".join(failed) or "ok")
      lines.append("| " + " | ".join(cells) + " |")
  if vqa:
    lines += ["", "Answers to \"" + next(r["prompt"] for r in results.values() if r.get("prompt"))
              + "\"; VQA accuracy against the reference answers (caption_metrics.vqa_score)."]
  lines += ["", "Clean generation: diversity (the paper's trade-off) and scores against the "
            "references.", "",
            "| model | distinct-1 | distinct-2 | vocabulary | mean length | BLEU-4 | CIDEr |",
            "|---|---|---|---|---|---|---|"]
  for model, r in results.items():
    d, c = r["clean"]["diversity"], r["clean"]
    # None: not measured; nan: undefined (distinct-2 of one-word answers).
    fmt = lambda v, f="{:.3f}": "–" if v is None or v != v else f.format(v)
    lines.append(f"| {model} | {fmt(d['distinct_1'])} | {fmt(d['distinct_2'])} | "
                 f"{d['vocabulary_size']} | {fmt(d['mean_length'], '{:.2f}')} | "
                 f"{fmt(c.get('bleu4'))} | {fmt(c.get('cider'))} |")
  if any(r["targeted"] for r in results.values()):
    lines += ["", f"Targeted success (%) toward "
              f"\"{next(iter(results.values()))['target_caption']}\".", "",
              "| model | attack | " + " | ".join(f"ε={format_eps(e)}"
                                                for e in eps_all) + " |",
              "|" + "---|" * (2 + len(eps_all))]
    for model, r in results.items():
      for suite, rs in r["targeted"].items():
        by_eps = {e["eps"]: e for e in rs}
        lines.append(f"| {model} | {CAPTION_SUITE_LABELS.get(suite, suite)} | " + " | ".join(
            _pct(by_eps[e]["targeted_success"]) if e in by_eps else "–" for e in eps_all)
                     + " |")
  return "\n".join(lines) + "\n"


def plot_captions(results_by_model, path):
  """PNG: captions unchanged (%) against eps, one colour per model, a style per suite."""
  results = {m: _as_dict(r) for m, r in results_by_model.items()}
  plt, fig, ax, colours = _figure()
  for i, (model, r) in enumerate(results.items()):
    for j, (suite, rs) in enumerate(r["robust"].items()):
      pts = sorted((e["eps"], 1 - e["change_rate"]) for e in rs)
      pts = [(0.0, 1.0)] + [p for p in pts if p[0] > 0]
      ax.plot([e * 255 for e, _ in pts], [100 * v for _, v in pts], marker="o",
              color=colours[i % len(colours)], linestyle=_STYLES[j % len(_STYLES)],
              label=f"{model} ({CAPTION_SUITE_LABELS.get(suite, suite)})")
  ax.set_xlabel("ε (× 1/255), L-inf")
  return _save(plt, fig, ax, "captions unchanged (%)", path)
