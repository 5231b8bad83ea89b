"""One run per folder: an exclusive advisory lock held for the whole run.

    runlock.hold(workdir, flag="--workdir")   # raises RunLockedError if another process holds it

The lock is `fcntl.flock` on `<folder>/.prsl_jax.lock`, which records the PID and
command of its holder. The OS releases it when the process ends, however it
ends (a kill included), so a dead run never leaves a stale lock; the file itself
stays and is reused. Two train.py runs, or train.py and evaluate.py, on one folder
would otherwise interleave metrics.jsonl and replace each other's records.

Remote folders (gs://...) and systems without fcntl are not locked.
"""

import os
import sys

try:
  import fcntl
except ImportError:  # not POSIX
  fcntl = None

LOCK_NAME = ".prsl_jax.lock"

# Open lock files of this process, by folder (kept open: closing releases the lock).
_HELD: dict = {}


class RunLockedError(OSError):
  """Another process holds the folder's lock."""


def _describe_holder(f) -> str:
  f.seek(0)
  text = " ".join(f.read().decode("utf-8", "replace").split())
  return text or "another process (its PID is not recorded yet)"


def hold(folder: str, *, flag: str = "--workdir") -> bool:
  """Takes the folder's lock until this process ends (creating the folder).

  Args:
    folder: the run's output folder.
    flag: how the user named it, for the message.

  Returns:
    True if locked, False for a remote folder (not lockable).

  Raises:
    RunLockedError: another live process holds it; the message names its PID and
      command.
  """
  if fcntl is None or "://" in folder:
    return False
  path = os.path.abspath(os.path.expanduser(folder))
  if path in _HELD:
    return True
  os.makedirs(path, exist_ok=True)
  # No O_TRUNC: the holder's record must survive a refused open.
  fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  f = os.fdopen(fd, "r+b", buffering=0)
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _describe_holder(f)
    f.close()
    raise RunLockedError(  # pylint: disable=raise-missing-from
        f"{flag} {folder!r} is in use by {holder}; wait for that run to end (or stop it), "
        f"or choose another {flag}") from None
  f.truncate(0)
  f.write(f"PID {os.getpid()} ({' '.join(sys.argv)})\n".encode())
  _HELD[path] = f
  return True


def release(folder: str):
  """Gives the lock back early (the end of the process does it anyway)."""
  f = _HELD.pop(os.path.abspath(os.path.expanduser(folder)), None)
  if f is not None:
    f.close()
