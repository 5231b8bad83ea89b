"""scripts/field_comparison.py's summary and table, on hand-made records.

The script's training and evaluation are the trainer's and evaluation.evaluate's
(tested elsewhere); what is its own is the pairing by seed and the table.
"""

from scripts import field_comparison
from scripts import prsl_study

STUDY = dict(prsl_study.STUDY, eps=(1 / 255, 2 / 255))


def _record(row, seed, clean, at1, at2, passed=True):
  rob = {k: {"robust_accuracy": v} for k, v in (("1/255", at1), ("2/255", at2))}
  return {"row": row, "seed": seed, "clean_accuracy_full": clean,
          "eval": {"robust": {"standard": rob}, "checks_passed": passed,
                   "warnings": [] if passed else ["deterministic: logits differ"]}}


RECORDS = [
    _record("start", 0, 0.98, 0.80, 0.75),
    _record("ce", 0, 0.99, 0.60, 0.50), _record("ce", 1, 0.99, 0.62, 0.40),
    _record("adv_ce", 0, 0.98, 0.80, 0.60), _record("adv_ce", 1, 0.97, 0.82, 0.70),
    _record("fare", 1, 0.97, 0.81, 0.65), _record("fare", 0, 0.96, 0.78, 0.55, passed=False),
]


def test_summary_orders_seeds_and_keeps_every_budget():
  s = field_comparison.summarize(RECORDS, ["start", "ce", "adv_ce", "fare", "pmg_aft"], STUDY)
  assert list(s) == ["start", "ce", "adv_ce", "fare"]  # a row without runs is left out
  assert s["fare"]["seeds"] == [0, 1]
  assert s["fare"]["values"]["2/255"] == [0.55, 0.65]
  assert s["fare"]["checks"].startswith("failed: deterministic")
  assert s["adv_ce"]["checks"] == "ok"


def test_table_pairs_each_row_with_tecoa_and_ce_by_seed():
  s = field_comparison.summarize(RECORDS, list(field_comparison.ROWS), STUDY)
  lines = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
           for line in field_comparison.markdown(s, STUDY).splitlines() if line.startswith("| ")}
  fare = lines[field_comparison.ROWS["fare"]]
  # FARE - TeCoA at 2/255 per seed: 0.55 - 0.60 = -5, 0.65 - 0.70 = -5 points.
  assert fare[4] == "-5.0 ± 0.0 (0↑ 2↓ 0=)"
  # FARE - CE: +5, +25 -> mean +15.0, sample std 14.1.
  assert fare[5] == "+15.0 ± 14.1 (2↑ 0↓ 0=)"
  # The start model (one) against each seed of TeCoA: +15, +5.
  assert lines[field_comparison.ROWS["start"]][4] == "+10.0 ± 7.1 (2↑ 0↓ 0=)"
  assert lines[field_comparison.ROWS["adv_ce"]][4] == "–"  # no difference to itself
  assert lines[field_comparison.ROWS["ce"]][1:4] == ["99.0 ± 0.0", "61.0 ± 1.4", "45.0 ± 7.1"]


def test_results_md_holds_the_committed_comparison_verbatim():
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "RESULTS.md")) as f:
    page = f.read()
  with open(os.path.join(root, "results", "comparison.md")) as f:
    table = f.read().strip()
  block = page.split("<!-- COMPARISON -->\n", 1)[1].split("\n<!-- /COMPARISON -->", 1)[0]
  assert block == table
