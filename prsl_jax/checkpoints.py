"""Orbax checkpoints of the train state and the data iterator, with safe fallback.

Layout: <workdir>/checkpoints/<step>/{state, data}; `state` is the pytree
{"params", "opt", "step", "rng"}, `data` the grain iterator state (JSON).
Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves no half checkpoint behind (a leftover
`<step>.orbax-checkpoint-tmp` is removed when the next run opens the folder, and
an interrupted run waits for its save and removes its own). A checkpoint damaged
afterwards is skipped with a warning in favour of the one before it, and set
aside as `<step>.unreadable` (renamed, never deleted): otherwise the manager
would never save that step again (it skips steps not newer than its latest) and
would garbage-collect the good ones before it.

A save that fails (read-only folder, full disk) raises CheckpointSaveError, an
OSError naming the folder, at the next save or at `finish`.
"""

import json
import os
import shutil
import sys
import warnings
import weakref

import jax
import numpy as np
import orbax.checkpoint as ocp


UNREADABLE = ".unreadable"  # suffix of a step folder set aside by restore_latest


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the run stops (earlier checkpoints are kept)."""


def _save_error(mgr, what, e):
  return CheckpointSaveError(
      f"checkpoint save {what} in {mgr.directory} failed ({type(e).__name__}: "
      f"{' '.join(str(e).split())[:300]}); the run stops here, earlier checkpoints are "
      "kept. Make the folder writable or free space, then rerun the same command to "
      "resume")


def check_writable(workdir: str):
  """Fails before compute if workdir/checkpoints cannot be created or written."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"cannot write checkpoints under {workdir!r}: {existing} is a "
                             "file; choose another workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot write checkpoints in {path}: {existing} is not writable; "
                          "fix its permissions or choose another workdir")


REPORT_FILES = ("results.json", "results.md", "robustness.png")


def check_outputs_writable(folder: str, flag: str, names=REPORT_FILES):
  """Fails before compute if the report files could not be written into `folder`
  at the end of the run (a read-only folder, a folder in a file's place)."""
  path = os.path.abspath(os.path.expanduser(folder))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{flag} {folder!r} cannot hold the results: {existing} is a "
                             f"file; choose another {flag}")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{flag} {folder!r}: the results ({', '.join(names)}) cannot be "
                          f"written, {existing} is not writable; fix its permissions or "
                          f"choose another {flag}")
  for name in names:
    target = os.path.join(path, name)
    if os.path.isdir(target):
      raise IsADirectoryError(f"{flag} {folder!r}: {target} is a folder where the run writes "
                              f"its {name}; move it away or choose another {flag}")


# Managers made by `manager` and not yet finished: `finish_open` completes them
# when a run is interrupted between saves.
_OPEN = weakref.WeakSet()


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  # cleanup_tmp_directories: a save interrupted by a kill leaves its temporary
  # folder; the next manager on the folder removes it.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  mgr = ocp.CheckpointManager(path, options=options, item_names=("state", "data"))
  _OPEN.add(mgr)
  return mgr


def save(mgr: ocp.CheckpointManager, state, data_state: dict):
  """Starts an async save of `state` at its step; raises CheckpointSaveError for a
  failure of this save's synchronous part or of an earlier save."""
  step = int(jax.device_get(state["step"]))
  try:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_state)))
  except Exception as e:  # pylint: disable=broad-except  # PermissionError, ENOSPC, orbax's
    raise _save_error(mgr, f"at step {step} (or an earlier one)", e) from e


def nonfinite_loss_message(mgr: ocp.CheckpointManager, loss: float, step: int) -> str:
  """The trainer's NaN guard's line: which checkpoint a rerun would resume from, if any."""
  mgr.wait_until_finished()  # a save in flight counts once written
  kept = mgr.latest_step()
  if kept is None:
    return (f"loss is {loss} at step {step}; stopping. No checkpoint was saved before it "
            f"(none in {mgr.directory}): lower the learning rate or the loss weight and rerun")
  return (f"loss is {loss} at step {step}; stopping. The last good checkpoint, step {kept}, "
          f"is kept in {mgr.directory}: a rerun resumes from it (lower the learning rate or "
          "the loss weight first)")


def _remove_tmp_dirs(mgr):
  if jax.process_index() != 0:
    return
  folder = os.fspath(mgr.directory)
  for name in os.listdir(folder) if os.path.isdir(folder) else ():
    if name.endswith(".orbax-checkpoint-tmp"):
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def finish(mgr: ocp.CheckpointManager, *, interrupted: bool = False):
  """Waits for the pending save and closes the manager.

  Args:
    mgr: from `manager`.
    interrupted: the run is stopping on Ctrl-C: wait for the save in flight (a
      second Ctrl-C abandons it), then remove any temporary folder it left.

  Raises:
    CheckpointSaveError: a save failed. The manager is not closed then: closing
      joins orbax's threads, which wait for signals the failed save never sends
      (the CLIs exit without them).
  """
  _OPEN.discard(mgr)
  try:
    mgr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    if interrupted:
      return
    raise _save_error(mgr, "in the background", e) from e
  mgr.close()
  if interrupted:
    _remove_tmp_dirs(mgr)


def finish_open(*, interrupted: bool = True):
  """`finish` every manager still open (a run stopped by Ctrl-C between saves)."""
  for mgr in list(_OPEN):
    finish(mgr, interrupted=interrupted)


# What orbax/TensorStore print, from their own threads, for the reads still in
# flight when a restore fails: the failure itself is reported once, by the warning
# or error that names the checkpoint.
_FAILED_READ_ECHOES = ("Event loop is closed", "Encountered error while reading array index")


def _is_echo(exc) -> bool:
  return exc is not None and str(exc).startswith(_FAILED_READ_ECHOES)


def _silence_failed_read_echoes():
  """Drops the echoes of a failed restore from sys.excepthook and sys.unraisablehook.

  Installed once per process, before the first restore; every other exception
  goes to the hooks that were there before.
  """
  if getattr(sys.excepthook, "_prsl_jax", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(exc_type, exc, tb):
    if not _is_echo(exc):
      excepthook(exc_type, exc, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_echo(unraisable.exc_value):
      unraisablehook(unraisable)

  quiet_excepthook._prsl_jax = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _describe(e) -> str:
  """One line: the exception's type and message, without TensorStore's spec dump."""
  text = " ".join(str(e).split(" See full TensorStore details")[0].split())
  return f"{type(e).__name__}: {text[:300]}"


def _set_aside(mgr, steps):
  """Renames unreadable step folders to <step>.unreadable[.N]; returns the new paths."""
  moved = []
  if jax.process_index() == 0:
    folder = os.fspath(mgr.directory)
    for step in steps:
      src = os.path.join(folder, str(step))
      if not os.path.isdir(src):
        continue
      dst, n = src + UNREADABLE, 1
      while os.path.exists(dst):
        dst, n = f"{src}{UNREADABLE}.{n}", n + 1
      os.rename(src, dst)
      moved.append(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("prsl_jax.checkpoints.set_aside")
  mgr.reload()
  return moved


def restore_latest_info(mgr: ocp.CheckpointManager, abstract_state, *,
                        set_aside: bool = True):
  """Restores the newest readable checkpoint, setting aside newer unreadable ones.

  Args:
    mgr: from `manager`.
    abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) like the state.
    set_aside: rename the step folders newer than the restored one (they failed
      to restore with the same abstract state, so they are damaged) to
      `<step>.unreadable`, so that the run saves those steps again and keeps the
      good checkpoints.

  Returns:
    dict(state, data, step, unreadable: [(step, error)], set_aside: [paths]), or
    None when the workdir has no checkpoint.

  Raises:
    ValueError: when checkpoints exist but none can be read (e.g. they belong to a
      different model or config); nothing is renamed or deleted.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  errors = []
  _silence_failed_read_echoes()
  for step in steps:
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      errors.append((step, _describe(e)))
      continue
    moved = _set_aside(mgr, [s for s, _ in errors]) if errors and set_aside else []
    if errors:
      where = f"; set aside as {', '.join(moved)}" if moved else ""
      warnings.warn(f"checkpoint(s) unreadable, resumed from step {step} instead"
                    f"{where}: " + "; ".join(f"step {s}: {m}" for s, m in errors))
    return dict(state=out["state"], data=out["data"], step=step, unreadable=errors,
                set_aside=moved)
  if errors:
    causes = " | ".join(f"step {s}: {m[:300]}" for s, m in errors[:3])
    if all(_is_damage(m) for _, m in errors):
      raise ValueError(
          f"every checkpoint in {mgr.directory} is damaged (its files cannot be read: "
          f"{causes}); nothing was deleted. Restore the folder from a copy, or move it "
          "aside to train from the start")
    raise ValueError(
        f"no checkpoint in {mgr.directory} could be restored for this config (different "
        f"model or optimizer?). Use a new workdir; nothing was deleted. Errors: {causes}")
  return None


# What a checkpoint whose files are truncated, overwritten or missing fails with,
# as opposed to one of another model (a tree or shape mismatch).
_DAMAGE_MARKERS = ("OUT_OF_RANGE", "DATA_LOSS", "Error reading", "Byte range", "JSONDecodeError",
                   "NOT_FOUND", "FileNotFoundError", "Unexpected end", "corrupt")


def _is_damage(message: str) -> bool:
  return any(m in message for m in _DAMAGE_MARKERS)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state):
  """(state, data_state) of the newest readable checkpoint, or None (restore_latest_info)."""
  info = restore_latest_info(mgr, abstract_state)
  return None if info is None else (info["state"], info["data"])


def restore_params_and_step(workdir: str, model=None):
  """(params, step) of the newest readable checkpoint in a training workdir.

  Args:
    workdir: a train.py workdir (has checkpoints/<step>/state).
    model: optional static model (Pretrained.model) whose param shapes the
      checkpoint must match.

  Returns:
    (params pytree of host numpy arrays, the step they were saved at). An
    unreadable newer checkpoint is skipped with a warning (nothing is renamed:
    evaluation only reads).
  """
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints folder in workdir {workdir!r}")
  mgr = ocp.CheckpointManager(os.path.abspath(path), item_names=("state", "data"),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {path!r}")
  _silence_failed_read_echoes()
  causes = []
  for step in steps:
    try:
      state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      params = jax.tree.map(np.asarray, state["state"]["params"])
      break
    except Exception as e:  # pylint: disable=broad-except
      causes.append(f"step {step}: {_describe(e)[:300]}")
      if step != steps[-1]:
        warnings.warn(f"checkpoint step {step} in {path} unreadable "
                      f"({_describe(e)}); trying older")
  else:
    raise ValueError(f"no readable checkpoint in {path!r}, all {len(steps)} damaged "
                     f"({'; '.join(causes[:2])}); evaluate the run's export/ folder, or "
                     "retrain")
  if model is not None:
    want = jax.tree.map(lambda x: tuple(x.shape), model.param_shapes())
    got = jax.tree.map(np.shape, params)
    if want != got:
      raise ValueError(f"checkpoint params in {workdir!r} do not match the model config")
  return params, step


def restore_params(workdir: str, model=None):
  """Params of the newest readable checkpoint in a training workdir (host numpy)."""
  return restore_params_and_step(workdir, model)[0]


def check_workdir(workdir: str):
  """A train.py workdir with at least one finished checkpoint (nothing is read)."""
  path = os.path.join(workdir, "checkpoints")
  steps = [d for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(f"train.py run folder {workdir!r} has no finished checkpoint in "
                            "checkpoints/ (was the run started?)")


# The loss a model was fine-tuned with, written beside its HF export, so that
# evaluate.py's 'paper' suite attacks an exported model through it.
TRAINING_LOSS = "prsl_jax_training_loss.json"


def write_training_loss(export_dir: str, loss_config: dict):
  with open(os.path.join(export_dir, TRAINING_LOSS), "w") as f:
    json.dump(dict(loss_config), f, indent=1)
