"""An open_clip folder and a SigLIP folder each go through train.py (runlocal
size) and evaluate.py on the digits, and come back out in their own format."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import prsl_jax
from tests import processes
from tests import test_open_clip
from tests import test_siglip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.total_steps=2", "--config.batch_size=8", "--config.checkpoint_every=2",
         "--config.eval_every=0", "--config.eval.num_examples=8", "--config.eval.batch_size=8",
         "--config.eval.steps=1", "--config.compare_losses=()", "--config.eval.suites=('pgd-ce',)",
         "--config.eval.eps=(0.00392156862745098,)"]


def _make(fmt, folder):
  if fmt == "open_clip":
    ref = test_open_clip._reference("gelu")  # pylint: disable=protected-access
    test_open_clip._write_folder(ref, test_open_clip.CONFIGS["gelu"], folder)  # pylint: disable=protected-access
    return ["--config.objective=classification"]
  words = "this is a photo of the digit handwritten zero one two three four five six seven " \
      "eight nine"
  test_siglip.make_siglip_folder("head", folder, max_len=12, words=words)
  return ["--config.objective=contrastive"]


def _run(script, args):
  t0 = time.time()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env=processes.env(as_shipped=True))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  print(script, f"{time.time() - t0:.1f} s")
  return proc


@pytest.mark.parametrize("fmt", [pytest.param("open_clip", marks=pytest.mark.heavy(80)),
                                 pytest.param("siglip", marks=pytest.mark.heavy(130))])
def test_train_then_evaluate_on_the_digits(fmt, tmp_path):
  folder = str(tmp_path / "start")
  objective = _make(fmt, folder)
  work = str(tmp_path / "run")
  _run("train.py", [f"--workdir={work}", f"--config.model.path={folder}", *objective, *SMALL])
  with open(os.path.join(work, "results.json")) as f:
    results = json.load(f)["results"]
  assert set(results) == {"start", "prsl fine-tuned"}
  export = os.path.join(work, "prsl", "export")
  names = set(os.listdir(export))
  if fmt == "open_clip":  # exported in the format the run started from
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= names
    assert "config.json" not in names
    theirs, _, _ = test_open_clip.open_clip.create_model_and_transforms("local-dir:" + export)
    ours = prsl_jax.load_pretrained(export)
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 3)).astype(np.float32)
    want, _, _, _ = test_open_clip._ref_outputs(theirs.eval(), test_open_clip.CONFIGS["gelu"],  # pylint: disable=protected-access
                                                images, ["a"])
    np.testing.assert_allclose(np.asarray(ours.model.encode_images(ours.params, images)), want,
                               atol=2e-5, rtol=1e-4)
  else:
    with open(os.path.join(export, "config.json")) as f:
      assert json.load(f)["model_type"] == "siglip"
  start, tuned = prsl_jax.load_pretrained(folder), prsl_jax.load_pretrained(export)
  assert tuned.model == start.model
  moved = lambda t: np.asarray(t["vision_model"]["post_layernorm"]["bias"])
  assert not np.array_equal(moved(tuned.params), moved(start.params))
  out = str(tmp_path / "eval")
  proc = _run("evaluate.py", [f"--checkpoint={export}", f"--outdir={out}", "--num_examples=8",
                              "--batch_size=8", "--steps=1", "--suite=pgd-ce", "--eps=1/255"])
  with open(os.path.join(out, "results.json")) as f:
    record = json.load(f)
  assert record["complete"]
  (row,) = record["models"].values()
  assert 0.0 <= row["clean_accuracy"] <= 1.0
  assert row["robust"]["pgd-ce"][0]["robust_accuracy"] <= row["clean_accuracy"]
  assert "Traceback" not in proc.stderr
