"""What train.py and evaluate.py share: user errors as one line, and quiet logs.

A user error (a bad flag or config value, a missing or broken checkpoint, an
unprepared dataset) prints one line naming the problem and the fix, and exits
with status 2, no traceback; --debug shows the traceback. Ctrl-C exits 130.
"""

import sys
import traceback

from absl import flags
from absl import logging

# Exceptions that mean "the input is wrong", not "prsl_jax is broken".
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, OSError, KeyError)

DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of an error.")
COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in JAX's persistent cache, so the "
    "next run of the same shapes starts at once (--nocompilation_cache: off).")
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Where (default: $PRSL_JAX_CACHE, else "
    "~/.cache/prsl_jax/jax).")


def setup_compilation_cache():
  """The persistent compilation cache, on unless --nocompilation_cache."""
  from prsl_jax import compilation  # pylint: disable=g-import-not-at-top
  if COMPILATION_CACHE.value:
    return compilation.enable_cache(COMPILATION_CACHE_DIR.value)
  compilation.disable_cache()
  return None


def quiet_logs():
  """orbax and TFDS log every step at INFO; keep the console to progress and tables."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, KeyError):
    text = f"missing key {text}"
  return f"error: {text}"


def run(main, argv):
  """Calls main(argv); turns user errors into one line on stderr and exit status 2."""
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except USER_ERRORS as e:
    if DEBUG.value:
      traceback.print_exc()
    print(one_line(e), file=sys.stderr, flush=True)
    sys.exit(2)
