"""What train.py and evaluate.py share: user errors as one line, and quiet logs.

A user error (a bad flag or config value, a missing or broken checkpoint, an
unprepared dataset, a checkpoint that cannot be written) prints one line naming
the problem and the fix, and exits with status 2, no traceback; --debug shows
the traceback. A misspelt flag or --config.key is one line too. Warnings are
one line each. Ctrl-C prints one line and exits 130; SIGTERM (a scheduler's stop)
checkpoints the training step in progress (prsl_jax.preemption), prints where to
resume and exits 143.

The process ends promptly: when background threads are still alive at the end
(orbax's checkpoint writers after a failed save wait for signals that never
come), they get a few seconds, then the process exits without them.
"""

import contextlib
import difflib
import logging as std_logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings

from absl import app
from absl import flags
from absl import logging

from prsl_jax import preemption

# Exceptions that mean "the input is wrong", not "prsl_jax is broken".
# FloatingPointError: the trainer's NaN guard ("loss is nan at step N"), which
# names the step and the checkpoint kept, or that none was saved.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, OSError, KeyError, FloatingPointError)

DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error.")
COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in JAX's persistent cache, so the "
    "next run of the same shapes starts at once (--nocompilation_cache: off).")
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Where (default: $PRSL_JAX_CACHE, else "
    "~/.cache/prsl_jax/jax).")

DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout", 120, "Multi-host: seconds to wait for every process to join "
    "before failing with what to check (a pod of many hosts may need more, e.g. 900).")


def setup_compilation_cache(cpu_devices=None):
  """The XLA:CPU settings and the persistent compilation cache (unless
  --nocompilation_cache); call before anything runs on a device. A cache folder
  that cannot be written is one warning line, and the run goes on without it.

  cpu_devices: host devices for the CPU backend (compilation.set_cpu_flags).
  """
  from prsl_jax import compilation  # pylint: disable=g-import-not-at-top
  compilation.set_cpu_flags(cpu_devices=cpu_devices)
  if COMPILATION_CACHE.value:
    try:
      return compilation.enable_cache(COMPILATION_CACHE_DIR.value)
    except OSError as e:  # a read-only HOME: the run goes on, compiling everything
      where = COMPILATION_CACHE_DIR.value or compilation.default_cache_dir()
      print(f"warning: no compilation cache: {where} cannot be written "
            f"({' '.join(str(e).split())}); running without it. Choose a writable folder "
            "with --compilation_cache_dir=DIR (or $PRSL_JAX_CACHE), or pass "
            "--nocompilation_cache", file=sys.stderr, flush=True)
  compilation.disable_cache()
  return None

# Seconds background threads get to finish once main() is done.
EXIT_GRACE_S = 5.0
# Longest message printed; TFDS's "not found" lists every dataset it knows.
MAX_CHARS = 1500


def _debug():
  try:
    return bool(DEBUG.value)
  except flags.UnparsedFlagAccessError:
    return "--debug" in sys.argv


class _DropLibraryErrors(std_logging.Filter):
  """orbax logs each failed background write as an ERROR with a traceback; the
  same failure reaches the user as one line (prsl_jax.checkpoints), so its log
  records are kept for --debug and --verbosity only."""

  def filter(self, record):
    return "/orbax/" not in (record.pathname or "").replace(os.sep, "/")


def _one_line_warning(message, category, filename, lineno, line=None):
  del filename, lineno, line
  return f"warning: {' '.join(str(message).split())} ({category.__name__})\n"


def quiet_transformers():
  """Drops transformers' advisory line "PyTorch was not found..." (printed when it
  is imported without torch, as in an install from requirements.txt): prsl_jax
  never needs torch, and a user error stays one line. Call before its import."""
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def quiet_logs():
  """orbax and TFDS log every step at INFO; keep the console to progress and tables.

  Also `quiet_transformers`.
  """
  quiet_transformers()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    if not _debug():
      logging.get_absl_handler().addFilter(_DropLibraryErrors())
  if not _debug():
    warnings.formatwarning = _one_line_warning


# Raised for bad input by prsl_jax's own checks, but also by a bug: their one
# line says where the traceback is.
_MAYBE_BUGS = (TypeError, KeyError)


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, KeyError):
    text = f"missing key {text}"
  if isinstance(e, _MAYBE_BUGS) and not _debug():
    text += " (--debug shows the traceback)"
  if len(text) > MAX_CHARS:
    text = text[:MAX_CHARS] + " ... (--debug for all of it)"
  return f"error: {text}"


def exit_now(code: int):
  """sys.exit(code); after an error, os._exit once non-daemon threads outlive a grace.

  A failed orbax save leaves threads waiting (for up to orbax's coordination
  timeout) for signals its failed step never sends; interpreter shutdown would
  join them, so a batch job would hang instead of failing.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  if code == 0:
    sys.exit(0)  # a finished run closed its checkpoint managers: nothing is left waiting
  def alive():
    return [t.name for t in threading.enumerate()
            if t is not threading.current_thread() and not t.daemon and t.is_alive()]
  deadline = time.time() + EXIT_GRACE_S
  while alive() and time.time() < deadline:
    time.sleep(0.05)  # not Thread.join: orbax's threads override it to raise on timeout
  if alive():
    if _debug():
      print(f"background threads {alive()[:4]} still running after {EXIT_GRACE_S:.0f} s; "
            "exiting without them", file=sys.stderr, flush=True)
    logging.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def fail(message: str, code: int = 2):
  """One line on stderr, exit `code`."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  exit_now(code)


def flag_error_line(e: BaseException) -> str:
  """absl's flag errors ("Unknown command line flag 'x'. Did you mean: y ?") -> one line."""
  text = " ".join(str(e).split())
  m = re.search(r"Unknown command line flag '([^']+)'(?:\. Did you mean: ([^?]+?) ?\?)?", text)
  if m:
    name, close = m.group(1), (m.group(2) or "").strip()
    hint = f" (did you mean --{close.split(',')[0].strip()}?)" if close else ""
    return f"unknown flag --{name}{hint}; --helpshort lists the flags"
  return f"{text}; --helpshort lists the flags"


HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def print_help():
  """The main script's docstring and flags, then prsl_jax.cli's (--help: exit 0)."""
  main = sys.modules.get("__main__")
  print((getattr(main, "__doc__", None) or "").strip() + "\n")
  print(flags.FLAGS.main_module_help())
  print(flags.FLAGS.module_help(sys.modules[__name__]))
  print("\n--helpfull lists every flag, absl's and JAX's too.")


def config_file_error(e: BaseException) -> str:
  """The one line for a --config file that cannot be loaded (a syntax error, ...)."""
  if isinstance(e, SyntaxError):
    return (f"--config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}; "
            "fix the file")
  return (f"--config file cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())}); "
          "fix the file (--debug shows the traceback)")


def parse_flags_or_exit(argv, parse=None):
  """absl flags_parser: a bad flag is one line and exit 2 (absl prints usage, exit 1);
  --help prints the flags and exits 0."""
  if any(a in HELP_ARGS for a in argv[1:]):
    print_help()
    sys.exit(0)
  try:
    return (parse or flags.FLAGS)(argv)
  except flags.Error as e:
    if "--debug" in argv:
      traceback.print_exc()
    fail(flag_error_line(e))
  except (SyntaxError, ImportError, AttributeError, NameError, TypeError, ValueError,
          KeyError, OSError) as e:  # a --config file's own error, raised while loading it
    if "--debug" in argv:
      traceback.print_exc()
    fail(config_file_error(e))


def config_key_error(e: BaseException, argv, field_names=()) -> str:
  """The one line for a --config.key override the config has no field for."""
  text = " ".join(str(e).replace("\\n", " ").replace("\\", "").split())
  keys = re.findall(r"'([A-Za-z_][\w]*)'", text)
  key = keys[0] if keys else text.strip("\"' ")
  bad = [a for a in argv[1:] if a.startswith("--config.")
         and key in a.split("=", 1)[0][len("--config."):].split(".")]
  m = re.search(r'Did you mean "([^"]+)"', text)
  close = m.group(1) if m else None
  if close is None and field_names:
    near = difflib.get_close_matches(key, list(field_names), n=1)
    close = near[0] if near else None
  hint = f" (did you mean {close!r}?)" if close else ""
  if bad:
    return (f"unknown config key in {bad[0]!r}: the config has no field {key!r}{hint}; "
            "an override must name an existing field of the --config file")
  return f"bad --config: {text}"


def start_distributed(coordinator_address, num_processes, process_id):
  """sharding.maybe_initialize_distributed with --distributed_timeout and Ctrl-C.

  Its waiting thread cannot be stopped, and JAX would abort the process from it
  later: a timeout or Ctrl-C ends the process at once (one line, exit 2 or 130).
  """
  from prsl_jax import sharding  # pylint: disable=g-import-not-at-top
  if DISTRIBUTED_TIMEOUT.value <= 0:
    raise ValueError(f"--distributed_timeout={DISTRIBUTED_TIMEOUT.value:g} must be > 0 seconds")
  try:
    sharding.maybe_initialize_distributed(coordinator_address, num_processes, process_id,
                                          timeout_s=DISTRIBUTED_TIMEOUT.value)
  except sharding.DistributedStartError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access
  except preemption.Preempted:
    print("terminated (SIGTERM)", file=sys.stderr, flush=True)
    os._exit(preemption.EXIT_CODE)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # pylint: disable=protected-access


@contextlib.contextmanager
def lock_output(folder: str, flag: str):
  """Process 0 holds `folder`'s run lock (prsl_jax.runlock) inside the block.

  Enter after the distributed set-up (the process index is known then) and before
  anything is written. Other processes of a multi-host run write nothing there.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from prsl_jax import runlock  # pylint: disable=g-import-not-at-top
  held = jax.process_index() == 0 and runlock.hold(folder, flag=flag)
  try:
    yield
  finally:
    if held:
      runlock.release(folder)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def run(main, argv):
  """Calls main(argv); turns user errors into one line on stderr and exit status 2."""
  # Ctrl-C raises KeyboardInterrupt wherever the main thread is. With Python's
  # default handler, asyncio.run (orbax saves and restores) installs its own,
  # which only cancels its task: a Ctrl-C during a checkpoint save could be lost.
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _interrupt)
  preemption.install()  # SIGTERM: as Ctrl-C, but a training step's checkpoint first
  try:
    main(argv)
  except preemption.Preempted as e:
    print(" ".join(str(e).split()) or "terminated (SIGTERM)", file=sys.stderr, flush=True)
    exit_now(preemption.EXIT_CODE)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    exit_now(130)
  except USER_ERRORS as e:
    if _debug():
      traceback.print_exc()
    print(one_line(e), file=sys.stderr, flush=True)
    exit_now(2)
  except app.UsageError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    exit_now(2)
  except SystemExit:
    raise
  except BaseException:  # pylint: disable=broad-except  # a bug: traceback, then exit promptly
    traceback.print_exc()
    exit_now(1)
  exit_now(0)
