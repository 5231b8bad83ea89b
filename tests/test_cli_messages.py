"""Bad input to the CLIs is one line (exit 2), help is exit 0: real processes, run at once.

Each process stops before any compute, so the test costs the imports of a few
processes running side by side.
"""

import os
import subprocess
import sys

from configs import base
from tests import processes

REPO = processes.ROOT
TRAIN = os.path.join(REPO, "train.py")
EVALUATE = os.path.join(REPO, "evaluate.py")
RUNLOCAL = os.path.join(REPO, "configs", "default.py:runlocal")


def test_one_line_errors_and_help(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(:\n  pass\n")
  (tmp_path / "listrun" / "prsl").mkdir(parents=True)
  (tmp_path / "listrun" / "prsl" / "config.json").write_text("[1, 2]")
  cmds = {
      "syntax": [TRAIN, "--config", str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "a")],
      "json list": [TRAIN, "--config", RUNLOCAL, "--workdir", str(tmp_path / "listrun")],
      "eval override": [EVALUATE, "--config.foo=1", "--outdir", str(tmp_path / "b")],
      "train help": [TRAIN, "--help"],
      "evaluate help": [EVALUATE, "--help"],
      "config help": [TRAIN, "--config", RUNLOCAL, "--config.help"],
  }
  procs = {k: subprocess.Popen([sys.executable] + v, cwd=str(tmp_path), env=processes.env(
      pythonpath=[REPO]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k, v in cmds.items()}
  out = {k: p.communicate(timeout=300) + (p.returncode,) for k, p in procs.items()}
  wants = {
      "syntax": f"--config file {tmp_path / 'bad.py'} has a syntax error at line 1",
      "json list": f"{tmp_path / 'listrun' / 'prsl' / 'config.json'} is not a JSON object",
      "eval override": "unknown flag --config.foo",
  }
  for name, want in wants.items():
    _, err, code = out[name]
    assert code == 2, (name, err[-3000:])
    line, = err.strip().splitlines()
    assert line.startswith("error: ") and want in line, (name, line)
  for name, flag in (("train help", "--workdir"), ("evaluate help", "--outdir")):
    so, err, code = out[name]
    assert code == 0, (name, err[-2000:])
    assert flag in so and "--distributed_timeout" in so and "--compilation_cache" in so
  so, err, code = out["config help"]
  assert code == 0, err[-2000:]
  lines = so.strip().splitlines()
  assert "--config.loss.end" in so and "# PRSL: end (exclusive) of the window of ranks" in so
  assert any(l.startswith("--config.total_steps") and "= 4 " in l for l in lines), so  # runlocal's
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_base_field_has_a_meaning():
  flat = {}
  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = value
  walk("", base.base_config().to_dict())
  assert set(flat) == set(base.FIELD_HELP)


def test_train_preflight_finds_a_workdir_its_results_cannot_be_written_to(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  from tests import small_config  # pylint: disable=g-import-not-at-top
  (tmp_path / "results.md").mkdir()  # found now, not after training
  with pytest.raises(IsADirectoryError, match=r"results.md is a folder where the run writes"):
    trainer.preflight(small_config.get_config(), str(tmp_path))
