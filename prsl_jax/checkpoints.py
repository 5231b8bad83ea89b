"""Orbax checkpoints of the train state and the data iterator, with safe fallback.

Layout: <workdir>/checkpoints/<step>/{state, data}; `state` is the pytree
{"params", "opt", "step", "rng"}, `data` the grain iterator state (JSON).
Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves no half checkpoint behind; a checkpoint damaged
afterwards is skipped with a warning in favour of the one before it.
"""

import json
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, state, data_state: dict):
  step = int(jax.device_get(state["step"]))
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=ocp.args.JsonSave(data_state)))


def restore_latest(mgr: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable checkpoint.

  Args:
    mgr: from `manager`.
    abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) like the state.

  Returns:
    (state, data_state), or None when the workdir has no checkpoint.

  Raises:
    ValueError: when checkpoints exist but none can be read (e.g. they belong to a
      different model or config); nothing is deleted.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      if errors:
        warnings.warn(f"checkpoint(s) unreadable, resumed from step {step} instead: "
                      + "; ".join(errors))
      return out["state"], out["data"]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
  if errors:
    raise ValueError(
        f"no checkpoint in {mgr.directory} could be restored for this config (different "
        f"model or optimizer?). Use a new workdir; nothing was deleted. Errors: "
        + " | ".join(errors))
  return None


def restore_params(workdir: str, model=None):
  """Params of the newest checkpoint in a training workdir, as host numpy arrays.

  Args:
    workdir: a train.py workdir (has checkpoints/<step>/state).
    model: optional static model (Pretrained.model) whose param shapes the
      checkpoint must match.

  Returns:
    the params pytree.
  """
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints folder in workdir {workdir!r}")
  mgr = ocp.CheckpointManager(os.path.abspath(path), item_names=("state", "data"))
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {path!r}")
  for step in steps:
    try:
      state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      params = jax.tree.map(np.asarray, state["state"]["params"])
      break
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"checkpoint step {step} in {path} unreadable ({e}); trying older")
  else:
    raise ValueError(f"no readable checkpoint in {path!r}")
  if model is not None:
    want = jax.tree.map(lambda x: tuple(x.shape), model.param_shapes())
    got = jax.tree.map(np.shape, params)
    if want != got:
      raise ValueError(f"checkpoint params in {workdir!r} do not match the model config")
  return params


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
