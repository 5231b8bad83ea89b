"""One run per folder: an exclusive advisory lock held for the whole run.

    runlock.hold(workdir, flag="--workdir")   # raises RunLockedError if another process holds it

The lock is `fcntl.flock` on `<folder>/.prsl_jax.lock`, which records the PID and
command of its holder. The OS releases it when the process ends, however it
ends (a kill included), so a dead run never leaves a stale lock; `release` (a
run that ends, with or without an error) also removes the file, and the file a
killed run leaves is reused. Two train.py runs, or train.py and evaluate.py, on one folder
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
  """Takes the folder's lock until this process ends or `release` (creating the folder).

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
  created = []  # the folders made here, innermost first: `release` removes them if empty
  missing = path
  while not os.path.exists(missing):
    created.append(missing)
    missing = os.path.dirname(missing)
  os.makedirs(path, exist_ok=True)
  lock_path = os.path.join(path, LOCK_NAME)
  while True:
    # No O_TRUNC: the holder's record must survive a refused open.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.fdopen(fd, "r+b", buffering=0)
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(f)
      f.close()
      raise RunLockedError(  # pylint: disable=raise-missing-from
          f"{flag} {folder!r} is in use by {holder}; wait for that run to end (or stop "
          f"it), or choose another {flag}") from None
    try:
      same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    f.close()  # its holder removed that file as we opened it: lock the new one
  f.truncate(0)
  f.write(f"PID {os.getpid()} ({' '.join(sys.argv)})\n".encode())
  _HELD[path] = (f, created)
  return True


def release(folder: str):
  """Gives the lock back and removes its file (a run that ends normally), and the
  folders `hold` created if they are still empty.

  A killed run leaves the file; its lock is gone with the process, and the next
  run reuses the file. Removing before unlocking is safe: a process that opened
  the old file sees that it is no longer the folder's and locks the new one.
  """
  path = os.path.abspath(os.path.expanduser(folder))
  f, created = _HELD.pop(path, (None, []))
  if f is not None:
    try:
      os.unlink(os.path.join(path, LOCK_NAME))
    except OSError:
      pass
    f.close()
  for made in created:  # a run refused before writing anything leaves no folder behind
    try:
      os.rmdir(made)
    except OSError:
      break
