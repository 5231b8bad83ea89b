"""scripts/prsl_study.py end to end: the quick study into a temp dir, then again.

Runs `--quick` on the rows start, ce and prsl_0_4_b1e-3 (seeds 0 and 1; the adversarial
row's training path has its own tests in test_train.py) as a subprocess, so the
script's JAX settings stay out of this session. Compiled programs go to a
persistent cache in the system temp dir, shared by later runs of this test: the
first run on a machine compiles for about 1.5 minutes, later ones take well under
one.
"""

import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "prsl_jax_test_study_jax_cache")
ROWS = ("start", "ce", "prsl_0_4_b1e-3")
SEEDS = (0, 1)
# One worker runs the whole file: its tests read one costly study (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("prsl_study")


def _run(outdir):
  env = processes.env(pythonpath=[ROOT])
  proc = subprocess.run(
      [sys.executable, "-m", "scripts.prsl_study", "--quick", "--outdir", outdir,
       "--rows", ",".join(ROWS), "--jax_cache", CACHE],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  with open(os.path.join(outdir, "study.json")) as f:
    return proc.stdout, json.load(f)


def _snapshot(outdir):
  files = glob.glob(os.path.join(outdir, "runs", "**", "*"), recursive=True)
  return {p: os.stat(p).st_mtime_ns for p in files if os.path.isfile(p)}


@pytest.fixture(scope="session")
def study(tmp_path_factory):
  outdir = str(tmp_path_factory.mktemp("study"))
  out1, doc1 = _run(outdir)
  before = _snapshot(outdir)
  out2, doc2 = _run(outdir)
  return {"outdir": outdir, "out1": out1, "doc": doc1, "out2": out2, "doc2": doc2,
          "before": before, "after": _snapshot(outdir)}


def _run_record(doc, row, seed):
  return doc["runs"][f"{row}/seed{seed}"]


@pytest.mark.heavy(115)  # the study fixture
def test_outputs_and_their_structure(study):
  doc, outdir = study["doc"], study["outdir"]
  for name in ("study.json", "study.md", "weights.png", "tradeoff.png", "robust_vs_eps.png",
               "gradient_ratios.json"):
    assert os.path.getsize(os.path.join(outdir, name)) > 0, name
  assert set(doc["runs"]) == {f"{r}/seed{s}" for r in ROWS for s in SEEDS}
  assert set(doc["summary"]) == set(ROWS)
  assert all(doc["summary"][r]["n"] == len(SEEDS) for r in ROWS)
  with open(os.path.join(outdir, "study.md")) as f:
    md = f.read()
  for heading in ("## Gradient ratios at the start", "## Clean and robust accuracy",
                  "## The paper's attack against the cascade", "## Control:",
                  "## Output diversity"):
    assert heading in md, heading
  for key, run in doc["runs"].items():
    robust = run["eval"]["robust"]
    suites = {"standard", "pgd-ce", "paper"}
    if key.startswith("prsl"):
      suites.add("bim-ce")
    else:  # the start and CE models are also attacked through every quick row's loss
      suites |= {"bim@prsl_0_4_b1e-3", "bim@adv_prsl_0_4_b1e-1"}
    assert set(robust) == suites, key
    assert run["eval"]["checks_passed"], (key, run["eval"]["warnings"])


def test_accuracies_are_consistent(study):
  """Fractions in [0, 1]; no suite beats the clean accuracy; the cascade only goes down."""
  for key, run in study["doc"]["runs"].items():
    clean = run["eval"]["clean_accuracy"]
    assert 0.8 <= run["clean_accuracy_full"] <= 1.0, key
    for suite, by_eps in run["eval"]["robust"].items():
      for rec in by_eps.values():
        assert 0.0 <= rec["robust_accuracy"] <= clean, (key, suite)
        after = list(rec["accuracy_after"].values())
        assert after == sorted(after, reverse=True), (key, suite, after)
        assert after[-1] == rec["robust_accuracy"]
    assert list(run["eval"]["robust"]["standard"]["2/255"]["accuracy_after"]) == [
        "apgd-ce", "apgd-t", "fab-t", "square"]


def test_start_row_equals_across_seeds(study):
  doc = study["doc"]
  assert doc["start_identical_across_seeds"] is True
  a, b = (_run_record(doc, "start", s) for s in SEEDS)
  for suite, by_eps in a["eval"]["robust"].items():
    for e, rec in by_eps.items():
      other = b["eval"]["robust"][suite][e]
      for field in ("robust_accuracy", "accuracy_after", "broken"):
        assert rec[field] == other[field], (suite, e, field)
  assert (a["entropy"], a["spread_0_4"]) == (b["entropy"], b["spread_0_4"])
  assert a["param_change"] == b["param_change"] == 0.0


def test_rows_trained_with_their_own_loss(study):
  doc = study["doc"]
  floor = 16 * math.log(16)  # PRSL's x >= n log n over the quick batch of 16 rows
  ce = [_run_record(doc, "ce", s) for s in SEEDS]
  prsl = [_run_record(doc, "prsl_0_4_b1e-3", s) for s in SEEDS]
  for run in ce + prsl:
    assert run["param_change"] > 1e-5
    assert run["train_last_logged"]["step"] == doc["study"]["train_steps"]
  # The seed moves the data order: the two CE models differ.
  assert ce[0]["param_change"] != ce[1]["param_change"]
  assert ce[0]["entropy"] != ce[1]["entropy"]
  # CE's loss on confident digits is ~1e-4; PRSL's is CE + b x >= b n log n.
  for c, p in zip(ce, prsl):
    assert c["train_last_logged"]["loss"] < 0.01
    assert p["train_last_logged"]["loss"] >= 1e-3 * floor
  # The paper's attack goes through each model's own training loss.
  with open(os.path.join(study["outdir"], "runs", "prsl_0_4_b1e-3", "seed0",
                         "eval_full.json")) as f:
    suites = json.load(f)["suites"]
  loss = suites["paper"][0]["loss"]
  assert loss[0] == "prsl" and dict(loss[1])["weight"] == 1e-3
  assert dict(loss[1])["start"] == 0 and dict(loss[1])["end"] == 4
  assert suites["bim-ce"][0]["loss"] is None


def test_gradient_ratios(study):
  doc = study["doc"]
  ratios = doc["gradient_ratios"]
  for images in ("clean", "pgd"):
    rec = ratios[images]["prsl 0:4"]
    for wrt in ("logits", "params"):
      r = rec[f"ratio_{wrt}"]
      assert 0 < r["min"] <= r["median"] <= r["max"] < math.inf
  # Confident clean digits: CE's gradient is far below the spread's; PGD images raise it.
  assert ratios["clean"]["prsl 0:4"]["ratio_logits"]["median"] < 1e-2
  assert (ratios["pgd"]["prsl 0:4"]["ratio_logits"]["median"]
          > 10 * ratios["clean"]["prsl 0:4"]["ratio_logits"]["median"])
  assert ratios["clean"]["prsl 0:4"]["value"]["min"] >= 16 * math.log(16) - 1e-3
  share = doc["shares"]["prsl_0_4_b1e-3"]
  assert share["logits"] == pytest.approx(
      1e-3 / ratios["clean"]["prsl 0:4"]["ratio_logits"]["median"])


def test_rerun_does_nothing_new(study):
  doc2 = study["doc2"]
  assert doc2["this_invocation"]["runs_done"] == 0
  assert doc2["this_invocation"]["runs_cached"] == len(ROWS) * len(SEEDS)
  assert len(doc2["invocations"]) == 2
  assert study["out2"].count("] cached") == len(ROWS) * len(SEEDS)
  # No checkpoint, evaluation or spec under runs/ was written again.
  assert study["after"] == study["before"]
  assert doc2["summary"] == study["doc"]["summary"]
  assert doc2["runs"] == study["doc"]["runs"]
