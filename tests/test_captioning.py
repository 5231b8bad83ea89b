"""Captioning: token-level PRSL through the captioner, attacks on captions, the
caption evaluation, the captioning trainer on 8 devices and after a kill, and
both CLIs on the bundled tiny captioner."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prsl_jax
from prsl_jax import attacks
from prsl_jax import captioning
from prsl_jax import data
from prsl_jax import losses
from prsl_jax import reports
from prsl_jax import tasks
from prsl_jax import trainer
from prsl_jax import training
from tests import processes
from tests import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = prsl_jax.TINY_CAPTIONER


@pytest.fixture(scope="session")
def tiny():
  return prsl_jax.load_pretrained(TINY)


@pytest.fixture(scope="session")
def batch(tiny):
  """8 digits, their captions as labels (padding ignored) and teacher-forcing inputs."""
  model, _, tokenizer = tiny
  source, _ = data.load("digits", "test", image_size=model.image_size)
  images = np.stack([source[i]["image"] for i in range(8)])
  texts = [data.DIGIT_CAPTIONS[i % 6].format(source.keyword(i)) for i in range(8)]
  labels = captioning.tokenize_captions(tokenizer, texts, length=12,
                                        eos_token_id=model.eos_token_id)
  return dict(image=images, **captioning.teacher_forcing(model, labels))


def test_token_prsl_through_the_model_equals_the_flattened_loss(tiny, batch):
  model, params, _ = tiny
  assert (batch["labels"] == losses.IGNORE_INDEX).any()  # some captions are padded
  logits = model.logits(params, batch["image"], batch["decoder_input_ids"])
  kw = dict(start=0, end=4, weight=1e-2)
  v = logits.shape[-1]
  token = losses.prsl_loss(logits, batch["labels"], **kw)
  flat = losses.prsl_loss(logits.reshape(-1, v), batch["labels"].reshape(-1), **kw)
  np.testing.assert_allclose(token, flat, rtol=1e-6)
  # The trainer's captioning loss is that loss.
  loss, metrics = training.batch_loss(params, batch, batch["image"], {}, model=model,
                                      task=tasks.get("captioning"),
                                      loss_fn=losses.get_loss("prsl", **kw))
  np.testing.assert_allclose(loss, token, rtol=1e-6)
  assert 0 <= float(metrics["accuracy"]) <= 1
  # Padding changes nothing: other tokens after a caption's EOS, in the decoder
  # inputs, leave the loss as it is (causal attention, ignored labels).
  padded = batch["labels"] == losses.IGNORE_INDEX
  dec = np.where(np.roll(padded, 1, axis=1) & padded, 7, batch["decoder_input_ids"])
  assert not np.array_equal(dec, batch["decoder_input_ids"])
  other = losses.prsl_loss(model.logits(params, batch["image"], dec), batch["labels"], **kw)
  np.testing.assert_allclose(other, token, rtol=1e-6)


@pytest.mark.heavy(55)
def test_attacks_on_captions_stay_in_the_ball_and_move_the_token_loss(tiny, batch):
  model, params, _ = tiny
  from prsl_jax.models import generation  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(batch["image"])
  tokens = generation.greedy(model, params, x)
  dec, labels = captioning.generated_labels(tokens, model.eos_token_id)  # the clean caption
  logits_fn = lambda z: model.logits(params, z, dec)
  caption_loss = lambda z, y: attacks.ce_objective(logits_fn(z), y)
  eps = 4 / 255
  clean = np.asarray(caption_loss(x, labels))
  for name, run in (
      ("pgd", lambda: attacks.pgd(logits_fn, x, labels, key=jax.random.key(0), eps=eps,
                                  steps=5)),
      ("apgd", lambda: attacks.apgd(logits_fn, x, labels, key=jax.random.key(0), eps=eps,
                                    steps=5)),
      ("bim-prsl", lambda: attacks.bim(logits_fn, x, labels, eps=eps,
                                       loss=losses.get_loss("prsl", weight=1e-2)))):
    adv = np.asarray(run())
    assert np.abs(adv - batch["image"]).max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    raised = np.asarray(caption_loss(adv, labels))
    if name == "bim-prsl":
      # Steps along PRSL's gradient need not raise a caption's own loss. The
      # best iterate rule: a point that flips a token of the caption beats one
      # that does not; otherwise the higher loss wins, so it is never lower.
      pred = np.asarray(jnp.argmax(logits_fn(adv), -1))
      valid = np.asarray(labels) != losses.IGNORE_INDEX
      flipped = np.any((pred != np.asarray(labels)) & valid, axis=1)
      assert np.all(flipped | (raised >= clean)) and np.any(raised > clean + 1e-3), name
    else:
      assert np.all(raised > clean), name
  # Targeted: lower the token loss of a target caption.
  target = captioning.tokenize_captions(tiny.tokenizer, ["a handwritten seven"] * 8,
                                        length=dec.shape[1], eos_token_id=model.eos_token_id)
  tf = captioning.teacher_forcing(model, target)
  target_fn = lambda z: model.logits(params, z, tf["decoder_input_ids"])
  adv = attacks.pgd(target_fn, x, tf["labels"], key=jax.random.key(1), eps=eps, steps=5,
                    targeted=True)
  before = attacks.ce_objective(target_fn(x), tf["labels"])
  after = attacks.ce_objective(target_fn(adv), tf["labels"])
  assert np.all(np.asarray(after) < np.asarray(before))


@pytest.mark.heavy(70)
def test_caption_evaluation_checks_and_metrics(tiny):
  model, params, tokenizer = tiny
  source, _ = data.load("digits", "test", image_size=model.image_size)
  suites = {"paper": captioning.make_suite("paper", steps=3),
            "strong": captioning.make_suite("strong", steps=3)}
  r = captioning.evaluate(model, params, tokenizer, source, np.arange(8),
                          eps_list=[0.0, 16 / 255], suites=suites, batch_size=8,
                          target_caption="a handwritten seven", progress_bar=False)
  assert r.checks.passed, r.checks
  assert r.checks.eps0_ok and set(r.checks.eps0) == {"bim", "apgd-ce"}
  assert r.timing["compiles"] > 0 and r.timing["attack_seconds"] > 0  # compile vs attack
  assert r.timing["compile_seconds"] + r.timing["attack_seconds"] <= r.seconds
  assert r.clean["keyword_accuracy"] >= 0.75  # the bundled captioner names the digits
  for suite in ("paper", "strong"):
    at0, big = r.robust[suite]
    assert at0.change_rate == 0 and at0.keyword_survival == 1.0
    assert big.change_rate > 0.5 and big.token_loss_adversarial > big.token_loss_clean
    assert big.captions != r.clean_captions
    assert 0 <= big.keyword_survival < 1 and big.bleu4_vs_clean < 0.9
    assert r.targeted[suite][0].targeted_success == 0
  d = r.clean["diversity"]
  assert 0 < d["distinct_1"] <= 1 and d["vocabulary_size"] >= 10
  table = reports.format_caption_table({"tiny": r})
  assert "keyword acc." in table and "Targeted success" in table
  with pytest.raises(ValueError, match="attack classifiers"):
    captioning.make_suite("standard")


# The trainer tests' small config (tests/small_config.py) on the bundled captioner.
CAPTION_CONFIG = {"model.path": TINY, "objective": "captioning", "data.caption_length": 12,
                  "eval.suites": ("paper",), "loss.weight": 0.05, "optimizer.lr": 0.2}


def _worker(workdir, out, *args, devices=1, check=True):
  env = processes.env(devices)
  caption = [f"--config.{k}={v}" for k, v in CAPTION_CONFIG.items()]
  proc = subprocess.run([sys.executable, "-m", "tests.train_worker", f"--workdir={workdir}",
                         f"--out={out}", *caption, *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.heavy(120)
def test_captioning_step_on_eight_devices_equals_one_and_a_killed_run_resumes(tmp_path):
  config = small_config.get_config()
  config.update_from_flattened_dict(CAPTION_CONFIG)
  trained, _ = trainer.train(config, str(tmp_path / "w1"), trainer.setup(config))  # one device
  one = {jax.tree_util.keystr(p): np.asarray(x)
         for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]}
  _worker(tmp_path / "w8", tmp_path / "p8.npz", devices=8)
  eight = dict(np.load(tmp_path / "p8.npz"))
  start = prsl_jax.load_pretrained(TINY).params
  moved = max(float(np.abs(one[k] - v).max()) for k, v in
              {jax.tree_util.keystr(p): np.asarray(x)
               for p, x in jax.tree_util.tree_flatten_with_path(start)[0]}.items())
  assert moved > 1e-3  # training moved the params, far beyond the tolerance below
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-5, atol=2e-6, err_msg=k)
  proc = _worker(tmp_path / "wk", tmp_path / "pk.npz", "--kill_after_save=4", check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  _worker(tmp_path / "wk", tmp_path / "pk.npz")
  resumed = dict(np.load(tmp_path / "pk.npz"))
  for k in one:
    np.testing.assert_array_equal(resumed[k], one[k], err_msg=k)


@pytest.mark.heavy(165)
def test_cli_end_to_end_on_the_bundled_captioner(tmp_path):
  env = processes.env()
  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), "--config",
       os.path.join(ROOT, "configs", "digits_captioning.py"), f"--workdir={tmp_path / 'run'}",
       "--config.total_steps=2", "--config.checkpoint_every=2", "--config.eval.num_examples=8",
       "--config.eval.batch_size=8", "--config.eval.steps=2",
       "--config.eval.eps=(0.0156862745,)",
       # The CE baseline run is the trainer's own code path, covered by train.py's
       # end-to-end test; here it would only double the captioner's training.
       "--config.compare_losses=()"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  assert "keyword acc." in run.stdout and "prsl fine-tuned" in run.stdout
  with open(tmp_path / "run" / "results.json") as f:
    results = json.load(f)["results"]
  assert set(results) == {"start", "prsl fine-tuned"}
  assert results["prsl fine-tuned"]["suites"]["paper"][0]["loss"][0] == "prsl"
  ev = subprocess.run(
      [sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint",
       f"{TINY},{tmp_path / 'run' / 'prsl' / 'export'}", "--num_examples=8", "--batch_size=8",
       "--steps=2", "--eps=2/255", "--suite=pgd", "--target_caption=a handwritten seven",
       f"--outdir={tmp_path / 'eval'}"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
  assert ev.returncode == 0, ev.stderr[-4000:]
  with open(tmp_path / "eval" / "results.json") as f:
    record = json.load(f)
  assert record["complete"] and record["model_kind"] == "vision-encoder-decoder"
  (start, tuned) = record["models"].values()
  assert start["kind"] == "captioner" and len(start["clean_captions"]) == 8
  # The result family is "captioner" for every generative model; model_type
  # says which (BLIP-2's is "blip-2"), prompt None: captions, not answers.
  assert start["model_type"] == "vision-encoder-decoder" and start["prompt"] is None
  assert tuned["robust"]["pgd"][0]["eps"] == pytest.approx(2 / 255)
  assert "pgd" in tuned["targeted"]


def test_paper_objective_on_captions_groups_each_caption_alone():
  # The authors attack one image at a time: PRSL's group is one caption's tokens,
  # whatever the training group; an all-padding caption (a padded batch) adds
  # nothing and leaves every gradient finite.
  from prsl_jax import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(3, 5, 13)) * 3, jnp.float32)
  y = rng.integers(0, 13, (3, 5)).astype(np.int32)
  y[0, 3:] = -100
  y[2, :] = -100  # a padding caption
  kw = dict(start=0, end=4, weight=0.3, ce_weight=1.0)
  objective = captioning.per_caption_loss(("prsl", tuple(sorted(dict(kw, group_size=96).items()))))
  want = sum(float(losses.prsl_loss(z[i], y[i], **kw)) for i in (0, 1))
  np.testing.assert_allclose(float(objective(z, jnp.asarray(y))), want, rtol=1e-5)
  grad = np.asarray(jax.grad(objective)(z, jnp.asarray(y)))
  assert np.all(np.isfinite(grad)) and not np.any(grad[2])
  # Not the batch as one group: the rows of other captions change caption 0's term.
  assert abs(float(losses.prsl_loss(z[:2], y[:2], **kw)) - want) > 1e-3
