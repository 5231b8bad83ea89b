"""The trainer: determinism, 8 devices = 1 device, 2 processes = 1, kill and resume."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import prsl_jax
from prsl_jax import checkpoints
from prsl_jax import sharding
from prsl_jax import trainer
from prsl_jax import training
from tests import processes
from tests import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = ["-m", "tests.train_worker"]


def _flat(params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _run_in_process(workdir, **overrides):
  config = small_config.get_config()
  config.update_from_flattened_dict(overrides)
  return _flat(trainer.train(config, workdir, trainer.setup(config))[0])


def _flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _worker(workdir, out, *args, devices=1, check=True, timeout=600):
  env = processes.env(devices)
  proc = subprocess.run([sys.executable, *WORKER, f"--workdir={workdir}", f"--out={out}", *args],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
  return proc


def _assert_close(a, b, rtol, atol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """One device, in process: the run every other topology must reproduce."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  return workdir, _run_in_process(workdir)


@pytest.mark.heavy(15, alone=False)
def test_same_seed_is_bit_identical_and_training_moves_params(reference, tmp_path):
  workdir, params = reference
  again = _run_in_process(str(tmp_path))
  for k in params:
    np.testing.assert_array_equal(params[k], again[k], err_msg=k)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    m1 = f.read()
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert f.read() == m1
  steps = [json.loads(line)["step"] for line in m1.splitlines()]
  assert steps == list(range(1, 7))
  # The vision tower moved (far beyond the tolerance of the topology tests), the
  # frozen text tower did not.
  start = _flat(prsl_jax.load_pretrained(small_config.get_config().model.path).params)
  assert max(np.abs(start[k] - params[k]).max() for k in params if "vision_model" in k) > 1e-3
  assert all(np.array_equal(start[k], params[k]) for k in params
             if "text_model" in k or "logit_scale" in k)
  # A different seed gives different numbers (the comparison above could fail).
  other = _run_in_process(str(tmp_path / "seed1"), seed=1)
  assert any(not np.array_equal(other[k], params[k]) for k in params)


@pytest.mark.heavy(10, alone=False)
def test_a_second_seed_reuses_the_compiled_step(reference, tmp_path):
  from prsl_jax import compilation  # pylint: disable=g-import-not-at-top
  config = small_config.get_config()
  setup = trainer.setup(config)
  model, params, _ = setup.pretrained
  step = trainer.optimizer_and_step(config, setup.mesh, model, params)[1]
  other_seed = _config(seed=3)
  assert trainer.optimizer_and_step(other_seed, setup.mesh, model, params)[1] is step
  assert trainer.optimizer_and_step(_config(**{"loss.weight": 0.5}), setup.mesh, model,
                                    params)[1] is not step
  with compilation.Timer() as t:  # the reference trained this setup: nothing new to build
    trainer.train(other_seed, str(tmp_path), setup)
  assert t.compiles == 0, t.as_dict()


@pytest.mark.heavy(40, alone=False)
def test_eight_devices_match_one(reference, tmp_path):
  _, params = reference
  out = str(tmp_path / "p.npz")
  proc = _worker(str(tmp_path / "w"), out, devices=8)
  assert "devices=8" in proc.stdout
  _assert_close(dict(np.load(out)), params, rtol=1e-5, atol=2e-6)


@pytest.mark.heavy(65)
def test_adversarial_eight_devices_match_one(tmp_path):
  # Random starts use per-example keys (fold_in of the global row), so the attack
  # draws the same noise however the batch is split. Measured: 7e-6 apart after 2
  # steps; per-shard keys instead give 2e-3.
  args = {"adversarial.enabled": True, "total_steps": 2}
  _worker(str(tmp_path / "w8"), str(tmp_path / "p8.npz"), *_flags(args), devices=8)
  one = _run_in_process(str(tmp_path / "w1"), **args)  # one device
  _assert_close(dict(np.load(tmp_path / "p8.npz")), one, rtol=0, atol=5e-5)


@pytest.mark.heavy(60)
def test_contrastive_eight_devices_match_one(tmp_path):
  # The negatives are gathered from all devices: the loss must not depend on the split.
  args = {"objective": "contrastive", "total_steps": 3, "loss.end": 4}
  _worker(str(tmp_path / "w8"), str(tmp_path / "p8.npz"), *_flags(args), devices=8)
  one = _run_in_process(str(tmp_path / "w1"), **args)  # one device
  _assert_close(dict(np.load(tmp_path / "p8.npz")), one, rtol=1e-5, atol=2e-6)


@pytest.mark.heavy(50, alone=False)
def test_two_processes_match_one(reference, tmp_path):
  _, params = reference
  results, report, port = processes.launch(
      lambda port: [[sys.executable, *WORKER, f"--workdir={tmp_path / f'w{port}'}",
                     f"--out={tmp_path / f'p{port}.npz'}", f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", f"--process_id={i}"] for i in range(2)],
      env=processes.env(), cwd=ROOT)
  for rc, so, _ in results:
    assert rc == 0, report
    assert "devices=2 processes=2" in so
  _assert_close(dict(np.load(tmp_path / f"p{port}.npz")), params, rtol=1e-5, atol=2e-6)


@pytest.mark.heavy(50, alone=False)
def test_killed_run_resumes_to_the_same_params(reference, tmp_path):
  _, params = reference
  workdir, out = str(tmp_path / "w"), str(tmp_path / "p.npz")
  proc = _worker(workdir, out, "--kill_after_save=4", check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not os.path.exists(out)
  _worker(workdir, out)
  _assert_close(dict(np.load(out)), params, rtol=0, atol=0)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  # Logged steps 1-4 before the kill, then resumed after a checkpoint (2 or 4), not 0.
  assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 6 and steps.count(1) == 1


def test_corrupt_latest_checkpoint_falls_back_with_warning(reference, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[0], workdir)
  for f in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"),
                     recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  config = small_config.get_config()
  model, params, _ = prsl_jax.load_pretrained(config.model.path)
  mesh = sharding.make_mesh(jax.devices()[:1])
  tx = training.make_optimizer(config.optimizer, config.total_steps, params,
                               training.trainable_keys(model, config.train_towers))
  state = sharding.replicate(training.init_state(params, tx, 0), mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  mgr = checkpoints.manager(workdir, max_to_keep=5)
  with pytest.warns(UserWarning, match="resumed from step 4"):
    restored, data_state = checkpoints.restore_latest(mgr, abstract)
  assert int(restored["step"]) == 4 and data_state["next_index"] == 4
  # The damaged step is set aside (renamed, not deleted), so the manager saves step
  # 6 again instead of skipping it, and keeps the good steps before it.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6.unreadable"]
  assert list(mgr.all_steps()) == [2, 4]
  checkpoints.save(mgr, dict(restored, step=np.int32(6)), data_state)
  checkpoints.finish(mgr)
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6", "6.unreadable"]


def _config(**overrides):
  c = small_config.get_config()
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("overrides,classes,error,match", [
    ({"loss.name": "topk_variance", "loss.k": 10}, 10, ValueError,
     r"config.loss.k=10 must be in 1..9"),
    ({"loss.name": "topk_variance", "loss.k": 0}, 10, ValueError, r"k must be >= 1"),
    ({"loss.end": 10}, 10, ValueError, r"C-1 = 9"),
    ({"objective": "contrastive", "loss.end": 16}, 16, ValueError, r"C-1 = 15"),
    ({"loss.start": 3, "loss.end": 3}, None, ValueError, "start < end"),
    ({"loss.name": "hinge"}, None, ValueError, "config.loss.name"),
    ({"loss.weight": -1.0}, None, ValueError, "config.loss"),
    ({"loss.group_size": 5}, None, ValueError, "group_size=5 must divide"),
    ({"optimizer.lr": -1.0}, None, ValueError, "config.optimizer.lr"),
    ({"optimizer.lr": 0.0}, None, ValueError, "config.optimizer.lr"),
    ({"checkpoint_every": 0}, None, ValueError, "config.checkpoint_every"),
    ({"eval.batch_size": 0}, None, ValueError, "config.eval.batch_size"),
    ({"eval.suites": ("strongest",)}, None, ValueError, "unknown"),
    ({"eval.eps": (4.0,)}, None, ValueError, "exceeds 1"),
    ({"model.path": "/no/such/folder"}, None, FileNotFoundError, "/no/such/folder"),
    ({"eval.eps": (-1.0,)}, None, ValueError, ">= 0"),
    ({"objective": "segmentation"}, None, ValueError, "config.objective"),
])
def test_bad_configs_are_refused(overrides, classes, error, match):
  with pytest.raises(error, match=match):
    trainer.validate(_config(**overrides), num_classes=classes)


def test_an_override_no_loss_of_the_run_reads_is_refused():
  c = _config()  # prsl, compared with ce
  trainer.check_loss_overrides(c, {"loss.end": 6, "loss.weight": 0.1, "total_steps": 3,
                                   "loss.name": "ce"})
  with pytest.raises(ValueError, match=r"--config.loss.k is read by none of this run's losses "
                                       r"\(prsl, ce\); it is an argument of topk_ce, topk_variance"):
    trainer.check_loss_overrides(c, {"loss.k": 5})
  with pytest.raises(ValueError, match=r"--config.loss.renormalize .* topk_variance:"):
    trainer.check_loss_overrides(c, {"loss.renormalize": True})
  # A comparison loss that reads the field makes it count.
  trainer.check_loss_overrides(_config(compare_losses=("topk_variance",)), {"loss.k": 5})
  trainer.check_loss_overrides(_config(**{"loss.name": "topk_ce"}), {"loss.k": 5})


def test_batch_not_divisible_by_devices():
  mesh = types.SimpleNamespace(devices=np.empty(8))  # only .devices.size is read
  with pytest.raises(ValueError, match=r"batch_size=20 must be divisible by the number of "
                                       r"devices \(8\)"):
    sharding.check_global_batch(20, mesh)
  sharding.check_global_batch(16, mesh)


def test_unknown_config_key_stops_train_py_before_compute(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                         "--config.loss.kk=3", f"--workdir={tmp_path}"], cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "unknown config key in '--config.loss.kk=3'" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.heavy(135)
def test_train_py_end_to_end_prints_table_and_exports(tmp_path):
  # Two losses from one start: also guards against donating the caller's params.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path}",
       "--config.total_steps=3", "--config.batch_size=16", "--config.checkpoint_every=3",
       "--config.eval.num_examples=32", "--config.eval.batch_size=8", "--config.eval.steps=2"],
      capture_output=True, text=True, timeout=900,
      env=processes.env(as_shipped=True))  # the README's main job, as users run it
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = proc.stdout
  for row in ("start", "prsl fine-tuned", "ce fine-tuned"):
    assert row in out, out[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)["results"]
  assert set(results) == {"start", "prsl fine-tuned", "ce fine-tuned"}
  for r in results.values():
    assert set(r["robust"]) == {"paper", "pgd-ce", "apgd-ce,apgd-t"}
    for rs in r["robust"].values():
      assert [e["eps"] for e in rs] == pytest.approx([1 / 255, 2 / 255])
      assert all(e["robust_accuracy"] <= r["clean_accuracy"] for e in rs)
  # The paper suite attacks each model through its own training loss.
  assert results["prsl fine-tuned"]["suites"]["paper"][0]["loss"][0] == "prsl"
  assert results["ce fine-tuned"]["suites"]["paper"][0]["loss"] is None
  assert (tmp_path / "robustness.png").stat().st_size > 1000
  # The export is a HF folder our loader (and transformers) reads, with new weights.
  exported = prsl_jax.load_pretrained(str(tmp_path / "prsl" / "export"))
  start = prsl_jax.load_pretrained(small_config.get_config().model.path)
  a, b = _flat(exported.params), _flat(start.params)
  assert any(not np.array_equal(a[k], b[k]) for k in a if "vision_model" in k)


@pytest.mark.heavy(40, alone=False)
def test_sigterm_saves_the_current_step_and_resumes_to_the_same_params(reference, tmp_path):
  # What a scheduler sends: SIGTERM to our own child mid-training. The step in
  # progress ends, is checkpointed (whatever checkpoint_every says), the process
  # says where to resume and exits 143; the rerun ends bit-identical.
  _, params = reference
  workdir, out = str(tmp_path / "w"), str(tmp_path / "p.npz")
  proc = subprocess.Popen([sys.executable, *WORKER, f"--workdir={workdir}", f"--out={out}",
                           "--step_delay=1"], env=processes.env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and open(metrics).read().strip()):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  last = err.strip().splitlines()[-1]
  step = int(last.split("at step ")[1].split(":")[0])
  assert last == (f"terminated (SIGTERM) at step {step}: checkpoint saved in "
                  f"{workdir}/checkpoints; rerun the same command to resume")
  assert step < 6 and str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(out)
  _worker(workdir, out)
  _assert_close(dict(np.load(out)), params, rtol=0, atol=0)
  with open(metrics) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 7))  # resumed from the SIGTERM's step: nothing repeated


@pytest.mark.heavy(15, alone=False)
def test_nan_loss_says_which_checkpoint_is_kept(tmp_path):
  # lr 1e30 blows the params up after the first update: the loss logged at step 2
  # is not finite. Whether a checkpoint was saved before it decides the message.
  overrides = {"optimizer.lr": 1e30, "total_steps": 3}
  for every, want in ((2, r"No checkpoint was saved before it \(none in "),
                      (1, r"The last good checkpoint, step 1, is kept in ")):
    config = _config(checkpoint_every=every, **overrides)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 2; stopping\. " + want):
      trainer.train(config, str(tmp_path / str(every)), trainer.setup(config))


def test_the_only_checkpoint_damaged_is_one_true_line(reference, tmp_path, capfd):
  # Its data files overwritten: training and evaluation both say it is damaged
  # (not "another config"), in one line, without the reads' tracebacks.
  workdir = str(tmp_path / "w")
  shutil.copytree(reference[0], workdir)
  for step in ("2", "4"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  for f in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "d", "*"),
                     recursive=True):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  capfd.readouterr()
  config = small_config.get_config()
  with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged \(its files cannot "
                     r"be read: step 6: .*nothing was deleted") as e:
    trainer.train(config, workdir, trainer.setup(config))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"no readable checkpoint in .*, all 1 damaged \(step 6: "):
    checkpoints.restore_params_and_step(workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["6"]  # nothing renamed
  assert "Traceback" not in "".join(capfd.readouterr())
