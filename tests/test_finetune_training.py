"""FARE and PMG-AFT in the trainer: the frozen original in the train state, their steps.

The losses themselves are checked against float64 references in
test_finetune_losses.py; here a train step's loss must equal those functions on
the same batch and keys, the original must stay bit for bit what the run
started from (while the params move), and a killed run must resume to the same
params with the same original.
"""

import os
import signal

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from prsl_jax import data
from prsl_jax import finetune_losses
from prsl_jax import sharding
from prsl_jax import trainer
from prsl_jax import training
from prsl_jax import zeroshot
from tests import small_config
from tests.test_train import _flat
from tests.test_train import _flags
from tests.test_train import _worker

# One config for every test of this file: one compiled FARE step.
FARE = {"loss.name": "fare", "adversarial.enabled": True, "adversarial.steps": 1,
        "total_steps": 4, "checkpoint_every": 2, "log_every": 1}


def _config(**overrides):
  c = small_config.get_config()
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def setup():
  return trainer.setup(_config(**FARE))


def _state_and_step(config, s):
  model, params, _ = s.pretrained
  tx, step_fn = trainer.optimizer_and_step(config, s.mesh, model, params)
  keys = trainer.original_keys(config, model)
  state = sharding.replicate(training.init_state(params, tx, config.seed, keys), s.mesh)
  return state, step_fn, keys


def _batch(config, s):
  it = data.train_iterator(s.train_source, global_batch_size=config.batch_size, seed=0)
  return next(it)


@pytest.mark.parametrize("overrides", [FARE, dict(FARE, **{"loss.name": "pmg_aft"})],
                         ids=["fare", "pmg_aft"])
def test_a_step_scores_finetune_losses_and_keeps_the_original(setup, overrides):
  config = _config(**overrides)
  trainer.validate(config, num_classes=len(setup.class_names))
  model, start, _ = setup.pretrained
  state, step_fn, keys = _state_and_step(config, setup)
  assert keys == tuple(training.trainable_keys(model, "vision"))
  assert set(state["original"]) == set(keys)
  # The optimizer has no state for the original: the same as without one.
  plain = training.init_state(start, trainer.optimizer_and_step(config, setup.mesh, model,
                                                                start)[0], 0)
  assert jax.tree.structure(state["opt"]) == jax.tree.structure(plain["opt"])

  host = _batch(config, setup)
  images, labels = jax.numpy.asarray(host["image"]), jax.numpy.asarray(host["label"])
  adv = config.adversarial
  row_keys = training.row_keys(jax.random.fold_in(jax.random.key(config.seed), 0),
                               config.batch_size)
  step_size = 2.5 * adv.eps / adv.steps  # adversarial.step_size 0
  if config.loss.name == "fare":
    want = jax.jit(lambda p, o: finetune_losses.fare_step_loss(
        model.encode_images, p, o, images, key=row_keys, eps=adv.eps, steps=adv.steps,
        step_size=step_size))(start, start)
  else:
    class_emb = setup.head["class_emb"]
    want = jax.jit(lambda p, o: finetune_losses.pmg_aft_step_loss(
        lambda q, x: zeroshot.logits(model, q, class_emb, x), p, o, images, labels,
        key=row_keys, eps=adv.eps, steps=adv.steps, step_size=step_size))(start, start)

  before = _flat(jax.device_get(state["original"]))
  state, metrics = step_fn(state, sharding.to_global(host, setup.mesh), setup.head)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
  assert float(want) > 0
  assert ("adv_accuracy" in metrics) == (config.loss.name == "pmg_aft")
  state, _ = step_fn(state, sharding.to_global(_batch(config, setup), setup.mesh), setup.head)
  after = _flat(jax.device_get(state["original"]))
  starts = _flat({k: start[k] for k in keys})
  for k in starts:  # the original: bit for bit the start, after two updates
    np.testing.assert_array_equal(after[k], starts[k], err_msg=k)
    np.testing.assert_array_equal(before[k], starts[k], err_msg=k)
  params = _flat(jax.device_get({k: state["params"][k] for k in keys}))
  assert max(np.abs(params[k] - starts[k]).max() for k in starts) > 1e-4


def test_other_losses_have_no_original(setup):
  model, params, _ = setup.pretrained
  assert trainer.original_keys(_config(), model) == ()  # PRSL
  assert trainer.original_keys(_config(**{"loss.name": "ce"}), model) == ()
  assert "original" not in training.init_state(params, optax.set_to_zero(), 0)


@pytest.mark.parametrize("overrides,match", [
    ({"loss.name": "fare"}, r"adversarial fine-tuning: set --config.adversarial.enabled=True"),
    ({"loss.name": "pmg_aft", "adversarial.enabled": True, "objective": "contrastive"},
     r"needs config.objective in \('classification',\)"),
    ({"loss.name": "fare", "adversarial.enabled": True, "adversarial.norm": "l2"},
     r"L-inf attack"),
    ({"loss.name": "pmg_aft", "adversarial.enabled": True, "adversarial.loss": "prsl"},
     r"PGD-CE"),
])
def test_bad_fare_and_pmg_aft_configs_are_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    trainer.validate(_config(**overrides))


def test_paper_attack_of_fare_and_pmg_aft_models_is_ce():
  assert finetune_losses.paper_attack_loss({"name": "fare"}) is None
  assert finetune_losses.paper_attack_loss({"name": "pmg_aft"}) is None
  assert finetune_losses.paper_attack_loss({"name": "ce"}) is None
  assert finetune_losses.paper_attack_loss(
      {"name": "drsl", "weight": 0.1, "ce_weight": 1.0, "k": 3})[0] == "drsl"
  config = _config(**FARE)
  for attack in trainer.eval_suites(config, config.loss)["paper"]:
    assert attack.loss is None
  # evaluate.py on a FARE / PMG-AFT export reads its training loss the same way.
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  assert evaluator.train_loss_of({"train_loss": {"name": "fare"}}) is None
  assert evaluator.train_loss_of({"train_loss": {"name": "pmg_aft"}}) is None
  assert evaluator.train_loss_of({"train_loss": {"name": "drsl", "weight": 0.1,
                                                 "ce_weight": 1.0, "k": 3}})[0] == "drsl"


@pytest.mark.heavy(40, alone=False)
def test_killed_fare_run_resumes_with_the_same_original(setup, tmp_path):
  config = _config(**FARE)
  model, start, _ = setup.pretrained
  ref = _flat(trainer.train(config, str(tmp_path / "ref"), setup)[0])
  workdir = str(tmp_path / "w")
  proc = _worker(workdir, str(tmp_path / "p.npz"), "--kill_after_save=2", *_flags(FARE),
                 check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  params, step = trainer.train(config, workdir, setup)  # resumes in this process
  assert step == 4
  got = _flat(params)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  starts = _flat({k: start[k] for k in trainer.original_keys(config, model)})
  assert any(not np.array_equal(got[k], starts[k]) for k in starts)  # training moved them
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  saved = mgr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  original = _flat(jax.tree.map(np.asarray, saved["state"]["original"]))
  assert original.keys() == starts.keys()
  for k in starts:
    np.testing.assert_array_equal(original[k], starts[k], err_msg=k)
