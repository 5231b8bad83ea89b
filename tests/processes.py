"""The environment of the tests' whole processes (train.py, evaluate.py, workers).

    subprocess.run([...], env=processes.env(devices=8))

Each runs as on a user's install: JAX on the CPU, with `devices` simulated
devices, no hub, and torch hidden (tests/no_torch/sitecustomize.py):
requirements.txt does not install torch, so the CLIs must work without it. It
also keeps transformers from importing torch in every process (about 3 s each).
The session's XLA flags (TEST_XLA_FLAGS, set by tests/conftest.py) come along.
"""

import os
import subprocess
import warnings

from prsl_jax import compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = os.path.join(ROOT, "tests", "no_torch")
# The session's XLA:CPU flags: the CLIs' own (prsl_jax.compilation.CPU_XLA_FLAGS),
# plus LLVM without optimisation passes, since most tests compile far more than
# they run. Measured on 2 cores: the attack, captioner and FAB files in process
# 129 s -> 108 s, the captioner CLI run 104 s -> 82 s; but train.py's default
# job (many attack calls) 91 s -> 110 s, so its end-to-end test runs as shipped
# (env(as_shipped=True)). A process whose numbers are compared bit for bit with
# the session's in-process runs keeps these flags.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",) + compilation.CPU_XLA_FLAGS


def xla_flags(devices=None, *, as_shipped=False) -> str:
  """$XLA_FLAGS with the tests' flags (none if as_shipped) and the device count."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not (devices is not None and f.startswith("--xla_force_host_platform_device_count"))
           and not (as_shipped and f in TEST_XLA_FLAGS)]
  flags += [f for f in TEST_XLA_FLAGS if f not in flags and not as_shipped]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def env(devices=1, *, torch=False, as_shipped=False, pythonpath=(), **extra) -> dict:
  """os.environ for a test's subprocess.

  Args:
    devices: simulated CPU devices (None: leave $XLA_FLAGS' count as it is).
    torch: keep torch importable (default: hidden, as without requirements-test.txt).
    as_shipped: XLA flags as a user's run has them (the CLIs set their own),
      not the session's.
    pythonpath: folders put first on PYTHONPATH (e.g. the repository root, for
      `-m tests.train_worker` or `configs` imports from a temp cwd).
    **extra: more variables.
  """
  paths = list(pythonpath) + ([] if torch else [NO_TORCH])
  old = os.environ.get("PYTHONPATH")
  e = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
           XLA_FLAGS=xla_flags(devices, as_shipped=as_shipped),
           PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])))
  e.update(extra)
  return e


def free_port() -> int:
  """A localhost port nobody listens on now (for a test's own coordinator)."""
  import portpicker  # pylint: disable=g-import-not-at-top
  return portpicker.pick_unused_port()


def _report(results):
  return "\n".join(f"--- process {i}: exit {rc}\n{so[-1500:]}\n{se[-3000:]}"
                   for i, (rc, so, se) in enumerate(results))


def launch(argvs_for_port, *, timeout=600, **popen):
  """Runs the processes of one multi-process launch on localhost together.

  argvs_for_port: port -> one argv per process (a fresh free port each try;
    name the try's output folders after it, so a retry starts clean).
  Returns (results, report, port): results[i] = (returncode, stdout, stderr); report
  has every process's output tails (when one process dies the others' collectives
  abort, and the cause is only in the first death's stderr).

  A launch whose process was aborted by the runtime (SIGABRT: the distributed
  service's verdict that a peer is gone, not a Python error of ours, which
  exits 1) is retried once, with a warning that carries the first report: we
  met it once in CI on 2 oversubscribed cores and could not reproduce it.
  """
  for attempt in range(2):
    port = free_port()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              **popen)
             for argv in argvs_for_port(port)]
    results = []
    for p in procs:
      so, se = p.communicate(timeout=timeout)
      results.append((p.returncode, so, se))
    report = _report(results)
    if attempt == 0 and any(rc == -6 for rc, _, _ in results):
      warnings.warn("a multi-process launch was aborted by the runtime; retried once:\n"
                    + report)
      continue
    return results, report, port
