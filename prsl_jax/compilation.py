"""Compilation is part of the user's wait: JAX's persistent cache, its accounting,
and the XLA:CPU settings the CLIs use.

    compilation.set_cpu_flags()       # before JAX starts its backend (the CLIs do)
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


def set_cpu_flags(flags=CPU_XLA_FLAGS) -> bool:
  """Adds `flags` to $XLA_FLAGS unless the user set them; only before JAX's backend starts.

  Returns whether they apply: False once a backend is running (XLA reads the
  variable when it starts), or when $XLA_FLAGS already names the option.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return False
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
  """
  path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
  os.makedirs(path, exist_ok=True)
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
