"""One run per folder (prsl_jax.runlock): a second process is refused in one line.

The holder is a real second process taking the lock; train.py and evaluate.py
are real CLI processes refused by it before any compute. Killing the holder
frees the folder (the OS drops the lock), with no stale lock left behind, and a
run that ends removes the lock file.
"""

import os
import subprocess
import sys

import pytest

from prsl_jax import runlock
from tests import processes

REPO = processes.ROOT
_HOLDER = ("import sys, time; from prsl_jax import runlock; runlock.hold(sys.argv[1]); "
           "print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def holder(tmp_path):
  """A child process holding tmp_path/run's lock until its stdin closes."""
  folder = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, folder], cwd=REPO,
                          env=processes.env(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  yield folder, proc
  if proc.poll() is None:
    proc.kill()  # our own child only
  proc.wait(timeout=30)


def test_second_process_refused_then_free_after_kill(holder):
  folder, proc = holder
  with pytest.raises(runlock.RunLockedError, match=rf"in use by PID {proc.pid} \(.*-c"):
    runlock.hold(folder)
  proc.kill()  # a killed run leaves no stale lock
  proc.wait(timeout=30)
  assert runlock.hold(folder)
  runlock.release(folder)
  assert os.listdir(folder) == []  # a run that ends removes the lock file
  new = os.path.join(folder, "new", "run")
  assert runlock.hold(new) and os.listdir(new) == [runlock.LOCK_NAME]
  runlock.release(new)  # refused before writing anything: no folder left behind
  assert os.listdir(folder) == []


def test_train_and_evaluate_refused_in_one_line(holder, tiny_ckpt):
  folder, proc = holder
  cmds = {
      "train": [os.path.join(REPO, "train.py"), "--config",
                os.path.join(REPO, "configs", "default.py:runlocal"), "--workdir", folder],
      "evaluate": [os.path.join(REPO, "evaluate.py"), "--checkpoint", tiny_ckpt.path,
                   "--num_examples", "8", "--batch_size", "8", "--outdir", folder],
  }
  for name, argv in cmds.items():
    out = subprocess.run([sys.executable] + argv, cwd=REPO, env=processes.env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (name, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by PID {proc.pid}" in lines[0], (name, out.stderr)
    assert os.listdir(folder) == [runlock.LOCK_NAME], name  # the holder's; nothing written
