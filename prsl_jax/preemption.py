"""SIGTERM (Kubernetes, SLURM, preemptible TPU VMs): checkpoint the current step, stop.

    preemption.install()                        # the CLIs, before anything runs
    preemption.defer(True)                      # the training loop
    for step in ...:
      ...
      if preemption.reached(step):              # save this step, then
        preemption.stop(mgr, step, workdir)     # wait for it and raise Preempted
    preemption.defer(False)

One process: prsl_jax's SIGTERM handler. Inside a training loop it only notes
the signal; the loop saves a checkpoint of the step it is at (a step's time
away) and raises `Preempted`. Anywhere else, or at a second SIGTERM, it raises
`Preempted` at once, which the CLIs treat as Ctrl-C: the save in flight
completes or is cleanly abandoned. Exit status 143 (128 + SIGTERM).

Several processes: jax.distributed.initialize replaces that handler with JAX's
preemption notifier, which tells every process and picks one step for all of
them (`jax.experimental.multihost_utils.reached_preemption_sync_point`, what
orbax's CheckpointManager.reached_preemption calls), so every host saves the
same step. Outside the training loop JAX's notifier only records the signal;
the scheduler's final SIGKILL ends the run, and a rerun resumes from the last
checkpoint.
"""

import os
import signal
import threading

EXIT_CODE = 128 + signal.SIGTERM  # the shell's convention for a process ended by SIGTERM


class Preempted(KeyboardInterrupt):
  """The run was stopped by SIGTERM; args[0] says where to resume, if known."""


_state = {"requested": False, "deferring": 0}


def _on_sigterm(signum, frame):
  del signum, frame
  if _state["deferring"] and not _state["requested"]:
    _state["requested"] = True  # the training loop saves this step and stops
    return
  raise Preempted("terminated (SIGTERM)")  # outside training: as Ctrl-C


def install():
  """prsl_jax's SIGTERM handler (main thread only; a no-op elsewhere)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)
  _state["requested"] = False


def defer(on: bool):
  """On (the training loop): a first SIGTERM waits for the loop's next `reached`
  instead of raising. A loop left by an exception leaves it on; its process is
  ending then (the CLIs exit), and a second SIGTERM still raises."""
  _state["deferring"] = bool(on)


def reached(step: int) -> bool:
  """True when the loop should save `step` and stop: call once per step, on every host."""
  import jax  # pylint: disable=g-import-not-at-top  # lazily: cli imports this module
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return False
  return _state["requested"]


def stop(mgr, step: int, workdir: str):
  """After `reached(step)` and the save of `step`: wait for it, then raise Preempted."""
  from prsl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  defer(False)
  checkpoints.finish(mgr)
  raise Preempted(f"terminated (SIGTERM) at step {step}: checkpoint saved in "
                  f"{os.path.join(workdir, 'checkpoints')}; rerun the same command to resume")
