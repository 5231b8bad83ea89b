"""Faults and bad input against train.py, evaluate.py and the library (issue: never
lose finished work, never hang, never misrecord).

Each CLI case runs the real command line (train.py: one process per case, as
its --config overrides are parsed when the flag is defined, forked from a driver
that has done the imports once; evaluate.py: every case in one process through
prsl_jax.cli.run) and checks the exit status, one
line on stderr naming the problem, no traceback and nothing written. Cases that
need permissions to bite run without root's file capabilities (setpriv), since
root ignores read-only folders.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import prsl_jax
from prsl_jax import checkpoints
from prsl_jax import trainer
from configs import base
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
EVALUATE = os.path.join(ROOT, "evaluate.py")
TINY = prsl_jax.TINY_CLIP
DROP_ROOT = ["setpriv", "--inh-caps=-dac_override,-dac_read_search,-fowner",
             "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
# The smallest train.py run: one loss, 6 steps of 16, a checkpoint every 2, one
# cheap attack on 16 examples.
SMALL = ["--config.batch_size=16", "--config.total_steps=6", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.eval_every=0", "--config.compare_losses=()",
         "--config.optimizer.warmup_steps=0", "--config.eval.num_examples=16",
         "--config.eval.batch_size=8", "--config.eval.eps=(0.00392156862745098,)",
         "--config.eval.suites=('fgsm',)"]


def _env(**extra):
  pythonpath = [extra.pop("PYTHONPATH")] if "PYTHONPATH" in extra else []
  env = processes.env(pythonpath=pythonpath, **extra)
  env.pop("PYTHONWARNINGS", None)
  return env


def _drop_root():
  """The command prefix that runs without root's override of file permissions."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("running as root without setpriv: read-only folders would not bite")
  return DROP_ROOT


def _lines(text):
  return [l for l in text.splitlines() if l.strip()]


def _snapshot(path):
  """{relative path: (size, mtime)} of everything under path (None if absent)."""
  if not os.path.exists(path):
    return None
  out = {}
  for dirpath, dirnames, filenames in os.walk(path):
    for name in dirnames + filenames:
      p = os.path.join(dirpath, name)
      st = os.lstat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _assert_one_line_error(name, code, stderr, want_code, text):
  lines = _lines(stderr)
  assert code == want_code, (name, code, stderr[-3000:])
  assert "Traceback" not in stderr, (name, stderr[-3000:])
  assert len(lines) == 1, (name, lines)
  assert lines[0].startswith("error: ") and text in lines[0], (name, lines[0], text)


def _stored_config(**overrides):
  c = base.base_config()
  c.update_from_flattened_dict(overrides)
  return c


# ----------------------------------------------------------------------------
# train.py: bad input is one line, exit 2, before any compute, nothing written.
# ----------------------------------------------------------------------------


# Runs train.py once per case, each in a process forked from this driver after
# the imports train.py needs (half a minute of start-up saved over 20 cases):
# the child runs the script as __main__ with the case's argv and its own stderr
# file, so the exit status and stderr are the command line's own.
_TRAIN_CASES_DRIVER = textwrap.dedent("""
    import json, os, runpy, sys, time, traceback
    import jax, transformers, absl.app, ml_collections  # paid once, before the forks
    from prsl_jax import cli, trainer
    script, cases, outdir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    result = {}
    for name, argv in cases.items():
      t0, err = time.time(), os.path.join(outdir, name + ".stderr")
      pid = os.fork()
      if pid == 0:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv, code = [script] + argv, 0
        try:
          runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
          code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # pylint: disable=broad-except
          traceback.print_exc()
          code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
      _, status = os.waitpid(pid, 0)
      with open(err) as f:
        result[name] = (os.waitstatus_to_exitcode(status), f.read(), time.time() - t0)
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.heavy(10)
def test_train_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
  fresh = str(tmp_path / "fresh")
  trunc = str(tmp_path / "trunc")
  shutil.copytree(TINY, trunc)
  weights = os.path.join(trunc, "model.safetensors")
  with open(weights, "rb") as f:
    blob = f.read()
  with open(weights, "wb") as f:
    f.write(blob[:len(blob) // 2])
  evaldir = tmp_path / "evaluated"
  evaldir.mkdir()
  (evaldir / "results.json").write_text(json.dumps({"kind": "evaluate", "models": {}}))
  afile = tmp_path / "afile"
  afile.write_text("x")
  readonly = tmp_path / "readonly"
  (readonly / "prsl" / "checkpoints").mkdir(parents=True)
  os.chmod(readonly / "prsl" / "checkpoints", 0o555)
  # A run whose stored configs say adamw (the default); and one where only the
  # comparison loss's stored config differs, so today's code would train prsl first.
  resumed = tmp_path / "resumed"
  for name in ("prsl", "ce"):
    (resumed / name).mkdir(parents=True)
    (resumed / name / "config.json").write_text(
        trainer.run_config(_stored_config(), name).to_json_best_effort(indent=2))
  ce_only = tmp_path / "ce_only"
  (ce_only / "ce").mkdir(parents=True)
  (ce_only / "ce" / "config.json").write_text(
      trainer.run_config(_stored_config(seed=5), "ce").to_json_best_effort(indent=2))
  stored = (resumed / "prsl" / "config.json").read_text()

  w = f"--workdir={fresh}"
  cases = {
      "config_key_typo": ([w, "--config.total_stepz=5"], "did you mean 'total_steps'"),
      "flag_typo": ([f"--workdirr={fresh}"], "unknown flag --workdirr (did you mean --workdir?)"),
      "not_an_int": ([w, "--config.total_steps=abc"], "--config.total_steps=abc"),
      "extra_argument": ([w, "extra"], "unexpected arguments"),
      "checkpoint_every_0": ([w, "--config.checkpoint_every=0"], "config.checkpoint_every"),
      "eval_batch_size_0": ([w, "--config.eval.batch_size=0"], "config.eval.batch_size"),
      "negative_lr": ([w, "--config.optimizer.lr=-1"], "config.optimizer.lr must be a number > 0"),
      "unknown_attack": ([w, "--config.eval.suites=('pgd-xx',)"], "unknown suite 'pgd-xx'"),
      "negative_eval_steps": ([w, "--config.eval.steps=-1"], "config.eval.steps"),
      "eps_in_255_units": ([w, "--config.eval.eps=(4.0,)"], "exceeds 1"),
      "adversarial_eps_4": ([w, "--config.adversarial.enabled=True",
                             "--config.adversarial.eps=4"], "config.adversarial.eps=4"),
      "unknown_dataset": ([w, "--config.data.name=notadataset"], "unknown dataset 'notadataset'"),
      "missing_model": ([w, "--config.model.path=/no/such/folder"], "/no/such/folder"),
      "truncated_weights": ([w, f"--config.model.path={trunc}"],
                            f"{weights} is not a readable safetensors file"),
      "workdir_is_evaluate_outdir": ([f"--workdir={evaldir}"], "evaluate.py results"),
      "workdir_is_a_file": ([f"--workdir={afile}"], "is a file"),
      "read_only_checkpoints": ([f"--workdir={readonly}"], "is not writable"),
      "changed_optimizer": ([f"--workdir={resumed}", "--config.optimizer.name=sgd"],
                            "optimizer.name: 'adamw' -> 'sgd'"),
      "changed_window": ([f"--workdir={resumed}", "--config.loss.end=5"], "loss.end: 4 -> 5"),
      "unread_loss_field": ([w, "--config.loss.k=5"],
                            "--config.loss.k is read by none of this run's losses (prsl, ce)"),
      "comparison_loss_changed": ([f"--workdir={ce_only}"], "seed: 5 -> 0"),
  }
  before = {p: _snapshot(str(p)) for p in (evaldir, readonly, resumed, ce_only)}
  driver = tmp_path / "cases_driver.py"
  driver.write_text(_TRAIN_CASES_DRIVER)
  errors = tmp_path / "stderr"
  errors.mkdir()
  os.chmod(errors, 0o777)
  proc = subprocess.run(
      _drop_root() + [sys.executable, str(driver), TRAIN,
                      json.dumps({name: argv for name, (argv, _) in cases.items()}), str(errors)],
      cwd=str(tmp_path), env=_env(PYTHONPATH=ROOT), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert set(results) == set(cases)
  for name, (argv, text) in cases.items():
    code, stderr, seconds = results[name]
    _assert_one_line_error(name, code, stderr, 2, text)
    assert seconds < 60, name  # no model trained or compiled
  assert not os.path.exists(fresh)
  for path, snap in before.items():
    assert _snapshot(str(path)) == snap, path
  assert (resumed / "prsl" / "config.json").read_text() == stored
  assert not (ce_only / "prsl").exists()


# ----------------------------------------------------------------------------
# evaluate.py: every case in one process, through prsl_jax.cli.run.
# ----------------------------------------------------------------------------

_EVALUATE_DRIVER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys
    spec = importlib.util.spec_from_file_location("evaluate_cli", sys.argv[1])
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    from prsl_jax import cli
    out = {}
    for name, argv in json.loads(sys.argv[2]).items():
      ev.FLAGS.unparse_flags()
      buf, code = io.StringIO(), None
      with contextlib.redirect_stderr(buf):
        try:
          cli.run(ev.main, ev.parse_flags(["evaluate.py"] + argv))
        except SystemExit as e:
          code = e.code
      out[name] = (code, buf.getvalue())
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.heavy(25)
def test_evaluate_cli_bad_input_is_one_line_and_finished_work_is_kept(tmp_path):
  good = str(tmp_path / "good")
  shutil.copytree(TINY, good)
  trunc, garbage, pickled = (str(tmp_path / n) for n in ("trunc", "garbage", "pickled"))
  for folder in (trunc, garbage):
    shutil.copytree(TINY, folder)
  with open(os.path.join(good, "model.safetensors"), "rb") as f:
    blob = f.read()
  with open(os.path.join(trunc, "model.safetensors"), "wb") as f:
    f.write(blob[:len(blob) // 2])
  with open(os.path.join(garbage, "model.safetensors"), "wb") as f:
    f.write(b"not a safetensors file" * 10)
  os.makedirs(pickled)
  shutil.copy(os.path.join(TINY, "config.json"), pickled)
  with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04 a pickle")
  afile = tmp_path / "afile"
  afile.write_text("x")
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  train_out = tmp_path / "train_out"
  train_out.mkdir()
  (train_out / "results.json").write_text(json.dumps({"kind": "train"}))
  # A run folder whose checkpoint does not fit its model: found on loading, which
  # happens for every checkpoint before the first is evaluated.
  mismatched = tmp_path / "mismatched_run"
  mismatched.mkdir()
  (mismatched / "config.json").write_text(json.dumps({"model": {"path": TINY}}))
  mgr = checkpoints.manager(str(mismatched))
  checkpoints.save(mgr, {"params": {"w": np.zeros(3, np.float32)}, "step": np.int32(5)}, {})
  checkpoints.finish(mgr)
  fresh = str(tmp_path / "fresh")
  kept = str(tmp_path / "kept")

  def ok(*extra, outdir=fresh):
    return ["--checkpoint", good, "--outdir", outdir, *extra]
  cases = {
      "flag_typo": (ok("--num_exampels", "5"),
                    "unknown flag --num_exampels (did you mean --num_examples?)"),
      "dashed_flag_typo": (ok("--num-exampels=5"), "unknown flag --num-exampels"),
      "extra_argument": (ok("extra"), "unexpected arguments"),
      "unknown_dataset": (ok("--dataset", "notadataset"), "unknown dataset 'notadataset'"),
      "truncated_weights": (["--checkpoint", trunc, "--outdir", fresh],
                            f"{trunc}/model.safetensors is not a readable safetensors"),
      "garbage_weights": (["--checkpoint", garbage, "--outdir", fresh],
                          f"{garbage}/model.safetensors is not a readable safetensors"),
      "second_checkpoint_truncated": (["--checkpoint", f"{good},{trunc}", "--outdir", fresh],
                                      f"{trunc}/model.safetensors"),
      "second_checkpoint_mistyped_hub_id": (
          ["--checkpoint", f"{good},opneai/clip-vit-nope", "--outdir", fresh],
          "'opneai/clip-vit-nope' is not a local folder"),
      "pickle_refused": (["--checkpoint", pickled, "--outdir", fresh], "--allow_pickle"),
      "eps_300_of_255": (ok("--eps", "300/255"), "exceeds 1"),
      "eps_4": (ok("--eps", "4"), "exceeds 1"),
      "batch_size_0": (ok("--batch_size", "0"), "--batch_size must be >= 1"),
      "outdir_is_a_file": (ok(outdir=str(afile)), "is a file"),
      "outdir_not_writable": (ok(outdir=str(locked / "sub")), "cannot be written"),
      "outdir_is_train_output": (ok("--overwrite", outdir=str(train_out)),
                                 "is a train.py run folder"),
  }
  later_failure = ["--checkpoint", f"{good},{mismatched}", "--outdir", kept, "--dataset",
                   "digits", "--num_examples", "4", "--batch_size", "4", "--eps", "1/255",
                   "--suite", "fgsm"]
  driver = tmp_path / "driver.py"
  driver.write_text(_EVALUATE_DRIVER)
  before = {p: _snapshot(str(p)) for p in (locked, train_out, afile)}
  proc = subprocess.run(
      _drop_root() + [sys.executable, str(driver), EVALUATE,
                      json.dumps({**{n: a for n, (a, _) in cases.items()},
                                  "later_failure": later_failure})],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for name, (argv, text) in cases.items():
    code, stderr = out[name]
    _assert_one_line_error(name, code, stderr, 2, text)
  assert not os.path.exists(fresh)
  for path, snap in before.items():
    assert _snapshot(str(path)) == snap, path

  # The second checkpoint does not fit its model: found before the first model is
  # evaluated, so nothing is computed or written.
  code, stderr = out["later_failure"]
  _assert_one_line_error("later_failure", code, stderr, 2, "do not match the model config")
  assert not os.path.exists(os.path.join(kept, "results.json"))


# ----------------------------------------------------------------------------
# Faults: a failed checkpoint save, Ctrl-C, a corrupt checkpoint, a silent hub.
# ----------------------------------------------------------------------------

# train.py as the user runs it, with os.makedirs failing for checkpoint step 4's
# temporary folder (as a full disk would); the time of the failure is written out.
_FAILING_SAVE_DRIVER = textwrap.dedent("""
    import errno, os, runpy, sys, time
    real = os.makedirs
    def makedirs(path, *args, **kwargs):
      if "checkpoints/4.orbax-checkpoint-tmp" in os.fspath(path):
        with open(os.environ["FAILED_AT"], "w") as f:
          f.write(repr(time.time()))
        raise OSError(errno.ENOSPC, "No space left on device (injected)", os.fspath(path))
      return real(path, *args, **kwargs)
    os.makedirs = makedirs
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.mark.heavy(30)
def test_failed_checkpoint_save_ends_the_process_promptly(tmp_path):
  driver = tmp_path / "driver.py"
  driver.write_text(_FAILING_SAVE_DRIVER)
  workdir, failed_at = tmp_path / "run", tmp_path / "failed_at"
  proc = subprocess.run(
      [sys.executable, str(driver), TRAIN, f"--workdir={workdir}", *SMALL],
      cwd=str(tmp_path), env=_env(FAILED_AT=str(failed_at), PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)  # a hang lasts orbax's 300 s coordination timeout, then some
  ended = time.time()
  assert failed_at.exists(), proc.stderr[-3000:]
  assert ended - float(failed_at.read_text()) < 45, proc.stderr[-3000:]
  _assert_one_line_error("failed_save", proc.returncode, proc.stderr, 2,
                         "No space left on device (injected)")
  assert "checkpoint save" in proc.stderr and "rerun the same command to resume" in proc.stderr
  # The checkpoint before the failure is intact and is what a rerun resumes from.
  assert checkpoints.restore_params_and_step(str(workdir / "prsl"))[1] == 2


# train.py with each train step slowed down, so that Ctrl-C lands mid-run.
_SLOW_DRIVER = textwrap.dedent("""
    import os, runpy, sys, time
    from prsl_jax import training
    make = training.make_train_step
    def slow_make(*args, **kwargs):
      step = make(*args, **kwargs)
      def slow(*a, **k):
        time.sleep(0.5)
        return step(*a, **k)
      return slow
    training.make_train_step = slow_make
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def _metrics_steps(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _train(workdir, *args, driver=None, timeout=600):
  cmd = [sys.executable] + ([str(driver)] if driver else []) + [TRAIN, f"--workdir={workdir}",
                                                               *SMALL, *args]
  # A driver runs train.py with runpy, which (unlike `python train.py`) does not put
  # the script's folder first on sys.path: PYTHONPATH does.
  env = _env(PYTHONPATH=ROOT) if driver else _env()
  return subprocess.run(cmd, cwd=os.path.dirname(str(workdir)), env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy(90)
def test_interrupt_resume_and_corrupt_checkpoint_keep_a_true_record(tmp_path):
  workdir = tmp_path / "run"
  run_dir = str(workdir / "prsl")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  driver = tmp_path / "slow.py"
  driver.write_text(_SLOW_DRIVER)

  # 1. Ctrl-C mid-run: one line, exit 130, the save in flight completed, no tmp folder.
  proc = subprocess.Popen([sys.executable, str(driver), TRAIN, f"--workdir={workdir}", *SMALL],
                          cwd=str(tmp_path), env=_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    try:
      if max(_metrics_steps(run_dir)) >= 3:
        break
    except (OSError, ValueError):  # not written yet, or a line half written
      pass
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  assert _lines(stderr) == ["interrupted"], stderr[-3000:]
  assert not glob.glob(os.path.join(ckpt_dir, "*orbax-checkpoint-tmp*"))
  interrupted_at = max(_metrics_steps(run_dir))
  assert 3 <= interrupted_at < 6

  # 2. The rerun resumes from the last checkpoint and logs each step once.
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = int(re.search(r"resumed from step (\d+) of 6", proc.stdout).group(1))
  assert resumed in (2, 4) and resumed <= interrupted_at
  assert _metrics_steps(run_dir) == [1, 2, 3, 4, 5, 6]

  # 3. A truncated newest checkpoint: resume from the one before, set the bad one
  #    aside (renamed), save step 6 again, keep the good ones, record it all.
  files = [f for f in glob.glob(os.path.join(ckpt_dir, "6", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  with open(largest, "rb") as f:
    blob = f.read()
  with open(largest, "wb") as f:
    f.write(blob[:len(blob) // 2])
  proc = _train(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 4 of 6" in proc.stdout
  assert "Traceback" not in proc.stderr
  assert any(l.startswith("warning: checkpoint(s) unreadable, resumed from step 4") and
             "6.unreadable" in l for l in _lines(proc.stderr)), proc.stderr[-3000:]
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6", "6.unreadable"]
  assert checkpoints.restore_params_and_step(run_dir)[1] == 6  # re-saved, readable
  assert _metrics_steps(run_dir) == [1, 2, 3, 4, 5, 6]
  with open(workdir / "results.json") as f:
    record = json.load(f)
  assert record["kind"] == "train" and record["complete"] is True
  assert record["workdir"] == str(workdir) and record["config"]["workdir"] == str(workdir)
  assert record["steps"] == {"prsl": 6}
  assert record["resumed"] == {"prsl": {"resumed_from": 4, "set_aside": [
      os.path.join(os.path.abspath(ckpt_dir), "6.unreadable")]}}


def test_hub_endpoint_that_never_answers_fails_in_seconds_with_offline_advice(tmp_path):
  # A loopback server that accepts connections and never answers.
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(16)
  port = server.getsockname()[1]
  held, stop = [], threading.Event()

  def accept():
    server.settimeout(0.2)
    while not stop.is_set():
      try:
        held.append(server.accept()[0])
      except OSError:
        pass
  thread = threading.Thread(target=accept, daemon=True)
  thread.start()
  code = textwrap.dedent("""
      import time, prsl_jax
      t0 = time.time()
      try:
        prsl_jax.load_pretrained("some-org/some-model")
        print("LOADED")
      except OSError as e:
        print("ERROR", " ".join(str(e).split()))
      print("SECONDS", time.time() - t0)
  """)
  env = _env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_ETAG_TIMEOUT="2",
             HF_HOME=str(tmp_path / "hf_home"))
  env.pop("HF_HUB_OFFLINE")
  try:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  finally:
    stop.set()
    thread.join()
    for c in held:
      c.close()
    server.close()
  assert held, "the hub request never reached the local server"
  out = proc.stdout
  assert "ERROR" in out, out + proc.stderr[-3000:]
  assert f"127.0.0.1:{port} did not answer within 2 s" in out
  assert "HF_HUB_OFFLINE=1" in out and "--local-dir DIR" in out
  assert float(out.split("SECONDS")[1]) < 30


# ----------------------------------------------------------------------------
# TFDS: the documented preparation (ArrayRecord) works, on a builder made here.
# ----------------------------------------------------------------------------

_BUILDER = textwrap.dedent('''
    """A three-class image set made in the test (PIL images: no tensorflow needed)."""
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    class PrslTestShapes(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(12, 12, 3)),
            "label": tfds.features.ClassLabel(names=["dark", "mid", "bright"])}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(9), "test": self._generate_examples(6)}

      def _generate_examples(self, n):
        for i in range(n):
          pixels = np.full((12, 12, 3), 40 + 80 * (i % 3), np.uint8)
          yield i, {"image": Image.fromarray(pixels), "label": i % 3}
''')


_INT_LABELS_BUILDER = textwrap.dedent('''
    import numpy as np
    import tensorflow_datasets as tfds

    class PrslTestIntLabels(tfds.core.GeneratorBasedBuilder):
      """Labels as plain integers (no ClassLabel, so no class names)."""
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
            "label": tfds.features.Scalar(dtype=np.int64)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples(2)}

      def _generate_examples(self, n):
        for i in range(n):
          yield i, {"image": np.zeros((4, 4, 3), np.uint8), "label": i}
''')


def test_tfds_label_that_is_not_a_class_label_is_one_line(tmp_path, monkeypatch):
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  (tmp_path / "prsl_test_int_labels.py").write_text(_INT_LABELS_BUILDER)
  monkeypatch.syspath_prepend(str(tmp_path))
  import prsl_test_int_labels  # pylint: disable=g-import-not-at-top,unused-import  # registers it
  data.prepare("prsl_test_int_labels", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"TFDS dataset 'prsl_test_int_labels' has a 'label' "
                     r"feature of type Scalar, not a ClassLabel with class names"):
    data.load("prsl_test_int_labels", "test", image_size=8, data_dir=str(tmp_path / "tfds"))


def test_tfds_dataset_prepared_as_documented_is_read(tmp_path, monkeypatch):
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  (tmp_path / "prsl_test_shapes.py").write_text(_BUILDER)
  monkeypatch.syspath_prepend(str(tmp_path))
  import prsl_test_shapes  # pylint: disable=g-import-not-at-top,unused-import  # registers it
  data_dir = str(tmp_path / "tfds")
  name = "prsl_test_shapes"
  with pytest.raises(FileNotFoundError, match=re.escape(data.prepare_command(name, data_dir))):
    data.check_available(name, "test", data_dir=data_dir)
  data.prepare(name, data_dir=data_dir)
  assert glob.glob(os.path.join(data_dir, name, "1.0.0", "*.array_record*"))
  data.check_available(name, "test", data_dir=data_dir)
  source, class_names = data.load(name, "test", image_size=8, data_dir=data_dir)
  assert class_names == ("dark", "mid", "bright") and len(source) == 6
  labels = sorted(int(source[i]["label"]) for i in range(6))
  assert labels == [0, 0, 1, 1, 2, 2]
  ex = source[0]
  assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32
  bright = [source[i] for i in range(6) if int(source[i]["label"]) == 2][0]["image"]
  np.testing.assert_allclose(bright, 200 / 255, atol=1e-2)
  # The command the error gives is the one that works.
  ns = {}
  exec(data.prepare_command(name, str(tmp_path / "tfds2")).split('"')[1], ns)  # pylint: disable=exec-used
  assert glob.glob(os.path.join(tmp_path, "tfds2", name, "1.0.0", "*.array_record*"))


def test_ctrl_c_inside_asyncio_run_is_not_lost(tmp_path):
  # orbax saves and restores in asyncio.run, whose own SIGINT handler only cancels
  # its task: a coroutine that finishes anyway would swallow Python's default Ctrl-C.
  code = textwrap.dedent("""
      import asyncio, os, signal, sys, threading
      from prsl_jax import cli
      async def save():
        try:
          await asyncio.sleep(5)
        except asyncio.CancelledError:
          return "finished anyway"
      def main(argv):
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        print(asyncio.run(save()))
      cli.run(main, sys.argv)
  """)
  proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 130, (proc.stdout, proc.stderr[-2000:])
  assert _lines(proc.stderr) == ["interrupted"] and "finished anyway" not in proc.stdout


def test_cli_processes_run_as_an_install_without_torch(tmp_path):
  # requirements.txt has no torch: the CLI tests' processes hide it
  # (tests/processes.py), and transformers' "PyTorch was not found" advisory
  # stays off the CLIs' stderr (prsl_jax.cli.quiet_transformers), so a user error is
  # one line.
  code = ("import importlib.util, transformers; "
          "print('TORCH', importlib.util.find_spec('torch'), "
          "transformers.utils.is_torch_available())")
  proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert "TORCH None False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
  assert "PyTorch was not found" in proc.stderr  # what a user would see without the fix
  # A config error found after the model's config.json is read (transformers imported).
  proc = subprocess.run([sys.executable, TRAIN, f"--workdir={tmp_path / 'run'}",
                         "--config.loss.end=10"], env=_env(), capture_output=True, text=True,
                        timeout=120, cwd=str(tmp_path))
  _assert_one_line_error("no torch", proc.returncode, proc.stderr, 2, "C-1 = 9")
  assert not (tmp_path / "run").exists()  # before any compute, nothing written
