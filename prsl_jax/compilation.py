"""Compilation is part of the user's wait: JAX's persistent cache, its accounting,
and the XLA:CPU settings the CLIs use.

    compilation.set_cpu_flags()       # before JAX starts its backend (the CLIs do)
    compilation.set_cpu_flags(cpu_devices=compilation.auto_cpu_devices(64))  # evaluate.py
    compilation.enable_cache()        # the CLIs do this (--nocompilation_cache: off)
    with compilation.Timer() as t:
      ...
    t.seconds, t.compiles, t.cache_hits

The persistent cache keeps compiled programs on disk, keyed by the program and
the backend, so a second run of the same shapes loads them instead of compiling
(evaluate.py then starts attacking within seconds). The timer adds up JAX's own
monitoring events: tracing, lowering to MLIR, and the backend compile (which
includes reading the persistent cache on a hit).
"""

import os
import threading

import jax
from jax._src import dispatch  # the names of JAX's compile events

_TRACE = dispatch.JAXPR_TRACE_EVENT
_LOWER = dispatch.JAXPR_TO_MLIR_MODULE_EVENT
_COMPILE = dispatch.BACKEND_COMPILE_EVENT
_HITS = "/jax/compilation_cache/cache_hits"


# XLA:CPU settings, measured on a quiet 2-core machine (bench/RESULTS.md, "XLA:CPU
# settings"): XLA's YNNPACK element-wise and reduce fusions make the tiny
# models' attack steps (dominated by attention softmax and layer-norm work on
# small tensors) about 25% slower than XLA's own fused loops; ViT-B/32's steps
# (89% matmuls) are unchanged either way. YNNPACK matmuls stay on.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-eltwise,-reduce",)


# Evaluation on the CPU splits each attack batch over this many host devices
# (one per core), each running its shard on its own thread. Measured on 2 cores
# (bench/RESULTS.md, "Issue 14, second session"): the tiny CLIP's
# input gradient at batch 32 takes 52 ms on one device, whose intra-op threads
# barely use the second core, and 33 ms split over two; evaluate.py's standard
# suite goes from 273 to 184 s. Each device gets at least this many rows.
MIN_ROWS_PER_CPU_DEVICE = 4
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def auto_cpu_devices(batch_size, cores=None) -> int:
  """The host-device count for evaluating batches of `batch_size` rows on the CPU.

  The largest count <= the usable cores that divides batch_size and leaves each
  device at least MIN_ROWS_PER_CPU_DEVICE rows; 1 when none does.
  """
  cores = usable_cores() if cores is None else cores
  for n in range(min(cores, batch_size // MIN_ROWS_PER_CPU_DEVICE), 1, -1):
    if batch_size % n == 0:
      return n
  return 1


def set_cpu_flags(flags=CPU_XLA_FLAGS, cpu_devices=None) -> bool:
  """Adds `flags` to $XLA_FLAGS unless the user set them; only before JAX's backend starts.

  cpu_devices: if > 1, the CPU backend shows that many devices (XLA's
  --xla_force_host_platform_device_count), unless $XLA_FLAGS sets the count.
  It changes nothing on GPU or TPU hosts, whose devices are the accelerators.

  Returns whether they apply: False once a backend is running (XLA reads the
  variable when it starts), or when $XLA_FLAGS already names the options.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return False
  if cpu_devices is not None and cpu_devices > 1:
    flags = tuple(flags) + (f"{_DEVICE_COUNT}={int(cpu_devices)}",)
  current = os.environ.get("XLA_FLAGS", "")
  add = [f for f in flags if f.split("=", 1)[0] not in current]
  if add:
    os.environ["XLA_FLAGS"] = " ".join([current] + add).strip()
  return bool(add)


def default_cache_dir() -> str:
  """$PRSL_JAX_CACHE, else $XDG_CACHE_HOME/prsl_jax/jax (default ~/.cache)."""
  if os.environ.get("PRSL_JAX_CACHE"):
    return os.path.expanduser(os.environ["PRSL_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "prsl_jax", "jax")


def enable_cache(path=None) -> str:
  """Turns on JAX's persistent compilation cache in `path` (default_cache_dir()).

  Every program is cached, however quickly it compiled: the attacks of a small
  model compile in about a second each, and together they are most of a
  short evaluation's wait.

  Raises:
    OSError: the folder cannot be created or written.
  """
  path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
  os.makedirs(path, exist_ok=True)
  if not os.access(path, os.W_OK | os.X_OK):  # JAX would fail at its first write
    raise PermissionError(f"{path} is not writable")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def disable_cache():
  jax.config.update("jax_compilation_cache_dir", None)


class Timer:
  """Adds up the time JAX spends compiling inside a `with` block (all threads).

  seconds: tracing + lowering + backend compile (incl. persistent-cache reads);
  compiles: programs compiled or read from the persistent cache;
  cache_hits: those read from the persistent cache.
  """

  def __init__(self):
    self.seconds = 0.0
    self.compiles = 0
    self.cache_hits = 0
    self._lock = threading.Lock()

  def _on_duration(self, event, duration, **_):
    if event in (_TRACE, _LOWER, _COMPILE):
      with self._lock:
        self.seconds += duration
        self.compiles += event == _COMPILE

  def _on_event(self, event, **_):
    if event == _HITS:
      with self._lock:
        self.cache_hits += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)
    return False

  def as_dict(self):
    return {"compile_seconds": self.seconds, "compiles": self.compiles,
            "cache_hits": self.cache_hits}
