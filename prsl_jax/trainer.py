"""The trainer: from a config to fine-tuned models and their robustness table.

    results = trainer.run(config, workdir)       # what `python train.py` does

In sections: `validate` the config before any compute; `setup` the mesh, model,
data and zero-shot head; `train` each loss (the main one, then the comparison
ones) from the same start, resuming from the workdir's checkpoints; `evaluate`
the start and every fine-tuned model on the same seeded subset; `report` the
table, results.json and the plot.

A workdir holds config.json, metrics.jsonl (one JSON line per logged step),
checkpoints/ (orbax), export/ (HuggingFace format) per loss, and the reports.
Running again with the same workdir resumes; a config that differs from the
stored one in a field that changes training is refused, naming the fields.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np

import prsl_jax
from prsl_jax import checkpoints
from prsl_jax import data
from prsl_jax import evaluation
from prsl_jax import finetune_losses
from prsl_jax import losses
from prsl_jax import preemption
from prsl_jax import progress
from prsl_jax import reports
from prsl_jax import sharding
from prsl_jax import tasks
from prsl_jax import training
from prsl_jax import zeroshot
from prsl_jax.models import convert
from prsl_jax.models import vision_weights

# Config fields that cannot change what is trained: a resume may change them.
EVAL_FIELDS = ("eval", "log_every", "eval_every", "export", "keep_checkpoints",
               "compare_losses", "workdir")


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def eval_suites(config, loss_config=None):
  """{suite name: tuple of evaluation.Attack} from config.eval.

  The paper's suite attacks each model through its own training loss: pass the
  loss config it was trained with (None: cross-entropy, the start model's; FARE
  and PMG-AFT models: cross-entropy too, finetune_losses.paper_attack_loss).
  Each task takes its own suites (captioning: token-logit attacks).
  """
  e = config.eval
  task = tasks.get(config.objective)
  train_loss = finetune_losses.paper_attack_loss(loss_config)
  out = {}
  for spec in e.suites:
    names = evaluation.suite_spec(spec)
    settings = dict(steps=e.steps or None, queries=e.queries or None,
                    num_targets=e.num_targets or None, train_loss=train_loss)
    out[spec] = task.make_suite(names, e.get("norm", "linf"), **settings)
  return out


def _positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"config.{name} must be an integer >= 1, got {value!r}")


def validate(config, *, num_classes=None):
  """Stops a bad config before any compute, naming the offending key.

  Args:
    config: the run's ConfigDict.
    num_classes: the classes the loss's rows range over, when known (the
      dataset's classes; the global batch for contrastive; the vocabulary for
      captioning): checks PRSL's window and k against it.
  """
  task = tasks.get(config.objective)  # a one-line error naming config.objective
  names = [config.loss.name, *config.compare_losses]
  for name in names:
    if name in finetune_losses.OBJECTIVES:
      _check_original_objective(config, name)
      continue
    if name not in losses.LOSSES:
      raise ValueError(f"config.loss.name / compare_losses has unknown loss {name!r}; "
                       f"choose from {sorted([*losses.LOSSES, *finetune_losses.OBJECTIVES])}")
    try:
      losses.get_loss(name, **losses.config_kwargs(config.loss, name))  # weights, ints, window
    except (ValueError, TypeError) as e:
      raise type(e)(f"config.loss ({name}): {e}") from None
    if num_classes is not None:
      kw = losses.config_kwargs(config.loss, name)
      if "end" in kw:
        losses.check_window(kw.get("start", 0), kw["end"], num_classes)
      if "k" in kw and not 1 <= kw["k"] <= num_classes - 1:
        raise ValueError(f"config.loss.k={kw['k']} must be in 1..{num_classes - 1} for "
                         f"{num_classes} classes")
  _positive(config, "batch_size", "total_steps", "log_every", "checkpoint_every",
            "keep_checkpoints", "eval.batch_size")
  if config.eval_every < 0:
    raise ValueError(f"config.eval_every must be >= 0 (0: off), got {config.eval_every}")
  if config.eval.num_examples < 0:
    raise ValueError(f"config.eval.num_examples must be >= 0 (0: the whole split), got "
                     f"{config.eval.num_examples}")
  group = config.loss.get("group_size") or 0
  rows = task.rows_per_example(config)
  if group and (config.batch_size * rows) % group:
    what = f"{config.batch_size} x {rows} token rows" if rows > 1 else f"{config.batch_size}"
    raise ValueError(f"config.loss.group_size={group} must divide the batch's rows "
                     f"(config.batch_size={what})")
  lr = config.optimizer.lr
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"config.optimizer.lr must be a number > 0, got {lr!r}")
  adv = config.adversarial
  if adv.enabled:
    _positive(config, "adversarial.steps")
    evaluation.attacks.core.check_eps(adv.eps, adv.norm, "config.adversarial.eps")
  evaluation.check_eps_list(config.eval.eps, config.eval.get("norm", "linf"))
  for field in ("steps", "queries", "num_targets"):
    if config.eval[field] < 0:
      raise ValueError(f"config.eval.{field} must be >= 1 (or 0 for the attack's default), "
                       f"got {config.eval[field]}")
  try:
    eval_suites(config, config.loss)  # suite and attack names, settings
  except (ValueError, TypeError) as e:
    raise type(e)(f"config.eval.suites: {e}") from None
  _warn_unusual_budgets(config)
  path = config.model.path
  if not os.path.isdir(os.path.expanduser(path)) and not convert.is_hub_id(path):
    raise FileNotFoundError(f"config.model.path {path!r} is neither a folder nor a hub id "
                            f"(give a local HF checkpoint folder or e.g. "
                            f"openai/clip-vit-base-patch32)")


# The tasks each frozen-original objective trains with: FARE needs the model's
# image embeddings only, PMG-AFT the zero-shot head's logits.
OBJECTIVE_TASKS = {"fare": ("classification", "contrastive"), "pmg_aft": ("classification",)}


def _check_original_objective(config, name):
  """FARE / PMG-AFT: adversarial training on, L-inf, a task it can score."""
  if config.objective not in OBJECTIVE_TASKS[name]:
    raise ValueError(f"config.loss.name={name!r} needs config.objective in "
                     f"{OBJECTIVE_TASKS[name]}, got {config.objective!r}")
  adv = config.adversarial
  if not adv.enabled:
    raise ValueError(f"config.loss.name={name!r} is adversarial fine-tuning: set "
                     "--config.adversarial.enabled=True (its attack's eps, steps, step_size "
                     "are config.adversarial's)")
  if adv.norm != "linf":
    raise ValueError(f"config.loss.name={name!r} trains against an L-inf attack: set "
                     f"config.adversarial.norm='linf', got {adv.norm!r}")
  if name == "pmg_aft" and adv.get("loss", "ce") != "ce":
    raise ValueError(f"PMG-AFT's training attack is PGD-CE: set config.adversarial.loss='ce', "
                     f"got {adv.loss!r}")


def _loss_fields(name):
  """The config.loss fields a loss or objective reads (FARE, PMG-AFT: none)."""
  return () if name in finetune_losses.OBJECTIVES else losses.loss_fields(name)


def _warn_unusual_budgets(config):
  """A warning for budgets far above what the field reports (likely 0-255 units)."""
  found = [("config.eval.eps", e, config.eval.get("norm", "linf")) for e in config.eval.eps]
  if config.adversarial.enabled:
    found.append(("config.adversarial.eps", config.adversarial.eps, config.adversarial.norm))
  for name, eps, norm in found:
    evaluation.warn_unusual_budget(f"{name}={evaluation.format_eps(eps)}", eps, norm)


def run_config(config, loss_name):
  """The config of one fine-tuning run: the main loss or a comparison loss."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.loss.name = loss_name
    c.compare_losses = ()
  return c


def flat_fields(config_dict, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}: a config's fields by dotted name."""
  out = {}
  for key, value in config_dict.items():
    if isinstance(value, dict):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(stored: dict, config) -> list:
  """Fields that differ between a stored config.json and `config`, eval fields aside."""
  new = flat_fields(json.loads(config.to_json_best_effort()))
  old = flat_fields(stored)
  changed = []
  for key in sorted(set(new) | set(old)):
    if key.split(".")[0] in EVAL_FIELDS:
      continue
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, list):
      a = tuple(a)
    if isinstance(b, list):
      b = tuple(b)
    if a != b:
      changed.append(f"{key}: {a!r} -> {b!r}")
  return changed


def check_resume(config, workdir):
  """Refuses to resume a workdir whose stored config trains something else.

  Reads only: called before train() writes config.json, so a refused resume
  leaves the stored config as it was.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    try:
      stored = json.load(f)
    except ValueError as e:
      stored = e
  if not isinstance(stored, dict):
    raise ValueError(f"{path} is not a JSON object (a train.py run's config); the folder "
                     "holds something else: choose another --workdir")
  changed = config_changes(stored, config)
  if changed:
    raise ValueError(f"{workdir} holds a run with another config ({'; '.join(changed)}); "
                     "resume it with the same settings or choose a new --workdir")


def loss_names(config):
  """The main loss, then each comparison loss (once)."""
  return [config.loss.name] + [n for n in config.compare_losses if n != config.loss.name]


def check_workdir(workdir):
  """A workdir train.py may write: not a file, not evaluate.py's output folder."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"--workdir {workdir!r} is a file; pass a folder")
  results = os.path.join(path, "results.json")
  if os.path.isfile(results):
    try:
      with open(results) as f:
        kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
      kind = None
    if kind == "evaluate":
      raise FileExistsError(f"--workdir {workdir!r} holds evaluate.py results "
                            "(results.json); train.py would overwrite them: choose "
                            "another --workdir")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    raise ValueError(f"--workdir {workdir!r} is the run folder of one loss (it has "
                     f"checkpoints/); pass its parent, {os.path.dirname(path)!r}")


def check_loss_overrides(config, overrides):
  """Stops an override of a config.loss field that none of the run's losses reads.

  The loss fields are shared by every loss (configs/base.py); each loss reads
  its own (losses.loss_fields). `--config.loss.k=5` on a PRSL run would change
  nothing, so it is an error, not a silent no-op.

  Args:
    config: the run's ConfigDict.
    overrides: the dotted keys the user set on the command line ("loss.k", ...).
  """
  names = loss_names(config)
  for key in overrides:
    if not key.startswith("loss.") or key == "loss.name":
      continue
    field = key[len("loss."):]
    if any(field in _loss_fields(n) for n in names):
      continue
    takers = [n for n in sorted(losses.LOSSES) if field in losses.loss_fields(n)]
    raise ValueError(
        f"--config.{key} is read by none of this run's losses ({', '.join(names)}); it is an "
        f"argument of {', '.join(takers)}: set --config.loss.name or --config.compare_losses "
        "to a loss that reads it, or drop it")


def preflight(config, workdir, overrides=()):
  """Everything about a run that can be checked before any compute.

  The config (`validate`; `check_loss_overrides` for the command line's
  `overrides`, dotted keys), the model folder's weight headers, the dataset's
  splits, the workdir (writable, not another tool's output),
  and, for a workdir that holds runs already, that each loss's stored config
  trains the same thing (`check_resume`), so a refused resume fails before the
  first loss trains rather than after it.
  """
  validate(config)
  check_loss_overrides(config, overrides)
  path = os.path.expanduser(config.model.path)
  if os.path.isdir(path):  # a hub id is checked when it is fetched, in setup
    convert.check_weights(path, allow_pickle=config.model.allow_pickle)
    check_objective_fits(config, convert.model_type(path))
  if config.model.get("vision_weights"):
    vision_weights.check_file(config.model.vision_weights,
                              allow_pickle=config.model.allow_pickle)
  for split in (config.data.train_split, config.data.eval_split):
    data.check_available(config.data.name, split, data_dir=config.data.data_dir or None)
  check_workdir(workdir)
  checkpoints.check_outputs_writable(workdir, "--workdir")  # not found after training
  for name in loss_names(config):
    run_dir = os.path.join(workdir, name)
    check_resume(run_config(config, name), run_dir)
    checkpoints.check_writable(run_dir)


def check_objective_fits(config, model_type):
  """The checkpoint's model has what config.objective's task needs (tasks.check_fits)."""
  tasks.check_fits(tasks.get(config.objective), convert.model_class(model_type),
                   f"the {model_type} checkpoint {config.model.path}")


def with_workdir(config, workdir):
  """A copy of config whose workdir field is the folder the run really uses."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.workdir = str(workdir)
  return c


# ----------------------------------------------------------------------------
# Setup: mesh, model, data, zero-shot head.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """Everything a run shares across its losses."""
  mesh: Any
  pretrained: prsl_jax.Pretrained
  train_source: Any
  eval_source: Any
  class_names: Optional[tuple]
  templates: tuple
  head: dict  # replicated arrays for the train step (training.make_train_step)


def setup(config) -> Setup:
  task = tasks.get(config.objective)
  mesh = sharding.make_mesh()
  sharding.check_global_batch(config.batch_size, mesh)
  group = config.loss.get("group_size") or 0
  rows = task.rows_per_example(config)
  if group and (config.batch_size // mesh.devices.size * rows) % group:
    raise ValueError(f"config.loss.group_size={group} must divide each device's rows "
                     f"({config.batch_size} / {mesh.devices.size} devices x "
                     f"{rows} rows per example)")
  pretrained = vision_weights.load_on(
      prsl_jax.load_pretrained(config.model.path, allow_pickle=config.model.allow_pickle,
                               dtype=config.model.dtype, remat=config.model.remat),
      config.model.get("vision_weights"), allow_pickle=config.model.allow_pickle)
  model, params, tokenizer = pretrained
  data_dir = config.data.data_dir or None
  train_source, class_names = data.load(config.data.name, config.data.train_split,
                                        image_size=model.image_size, data_dir=data_dir)
  eval_source = None
  if class_names or not task.needs_class_names:
    eval_source, _ = data.load(config.data.name, config.data.eval_split,
                               image_size=model.image_size, data_dir=data_dir)
  # Bad pixels or labels are named before any compute (prsl_jax.data.check_examples).
  data.check_split(train_source, class_names, name=config.data.name,
                   split=config.data.train_split)
  if eval_source is not None:
    data.check_split(eval_source, class_names, name=config.data.name,
                     split=config.data.eval_split, indices=data.eval_indices(
                         len(eval_source), config.eval.num_examples or None, config.eval.seed))
  check_objective_fits(config, model.kind)
  validate(config, num_classes=task.num_classes(config, model, class_names))
  templates = (zeroshot.IMAGENET_TEMPLATES if config.data.templates == "imagenet"
               else zeroshot.DEFAULT_TEMPLATES)
  head = task.head(config, model, params, tokenizer, class_names, templates)
  return Setup(mesh, pretrained, train_source, eval_source, class_names, tuple(templates),
               sharding.replicate(head, mesh))


# ----------------------------------------------------------------------------
# Training one loss.
# ----------------------------------------------------------------------------


def _clean_accuracy_fn(config, s: Setup, model):
  """fn(params) -> clean zero-shot accuracy on the seeded eval subset (host float)."""
  indices = data.eval_indices(len(s.eval_source), config.eval.num_examples or None,
                              config.eval.seed)
  batches = [sharding.put_eval_batch(b, s.mesh)
             for b in data.eval_batches(s.eval_source, indices, config.eval.batch_size)]
  count = training.make_eval_step(s.mesh, model=model, task=tasks.get(config.objective))

  def accuracy(params):
    hits = sum(int(count(params, b, s.head)[0]) for b in batches)
    return hits / len(indices)
  return accuracy


def _trim_metrics(path, last_step):
  """Drops metrics.jsonl lines after `last_step` (logged past the checkpoint a resume
  starts from; they are logged again), so no step appears twice."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut by a kill
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


# (tx, jitted step) of the last few training setups of this process, so that a
# second train() of one setup (another seed, a resume, the study's next seed)
# reuses the traced and compiled step instead of building it again. Holds no
# params: they are arguments of the step.
_STEPS: dict = {}
_MAX_STEPS = 8


def optimizer_and_step(config, mesh, model, params):
  """(optax tx, training.make_train_step(...)) for config on mesh, built once a setup.

  The key is everything the step depends on: the mesh, the static model, the
  task, the loss, adversarial and optimizer configs, the schedule length,
  and the params' top-level keys with the trainable ones. The seed is not in it.
  """
  trainable = training.trainable_keys(model, config.train_towers)
  adversarial = config.adversarial if config.adversarial.enabled else None
  task = tasks.get(config.objective)
  key = (mesh, model, task, config.loss.to_json(),
         None if adversarial is None else adversarial.to_json(), config.optimizer.to_json(),
         int(config.total_steps), tuple(params), tuple(trainable))
  if key not in _STEPS:
    tx = training.make_optimizer(config.optimizer, config.total_steps, params, trainable)
    step_fn = training.make_train_step(mesh, model=model, task=task,
                                       loss_fn=loss_function(config.loss),
                                       adversarial=adversarial, tx=tx)
    if len(_STEPS) >= _MAX_STEPS:
      _STEPS.pop(next(iter(_STEPS)))
    _STEPS[key] = (tx, step_fn)
  return _STEPS[key]


def loss_function(loss_config):
  """What make_train_step takes as loss_fn: a batch loss, or a frozen-original
  objective's name (finetune_losses.OBJECTIVES)."""
  if loss_config.name in finetune_losses.OBJECTIVES:
    return loss_config.name
  return losses.from_config(loss_config)


def original_keys(config, model):
  """Top-level param keys the state keeps as its frozen original: the trained
  towers' for FARE and PMG-AFT, none for the other losses."""
  if config.loss.name not in finetune_losses.OBJECTIVES:
    return ()
  return tuple(training.trainable_keys(model, config.train_towers))


def train(config, workdir, s: Setup, *, desc="train", info=None):
  """Fine-tunes the pretrained params with config; resumes from workdir.

  Args:
    info: optional dict, filled with resumed_from (step or None) and set_aside
      (unreadable checkpoint folders renamed on resume).

  Returns:
    (final params on the host, the step the run ended at).

  Raises:
    checkpoints.CheckpointSaveError: a checkpoint could not be written.
  """
  model, params, tokenizer = s.pretrained
  check_resume(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    # Atomic: the other processes' check_resume may read it at this moment, and
    # half a file would read as a foreign config (a two-host launch died of it).
    reports.write_atomic(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2))

  # Data: this process's rows of each global batch (see prsl_jax.data).
  train_iter = data.train_iterator(
      s.train_source, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **tasks.get(config.objective).data_fields(config, model, tokenizer))

  # Model, optimizer and state, replicated over the mesh.
  tx, step_fn = optimizer_and_step(config, s.mesh, model, params)
  # FARE, PMG-AFT: the start's trained towers kept as state["original"]; replicate
  # copies them, so they do not share buffers with the (donated) params.
  state = sharding.replicate(training.init_state(params, tx, config.seed,
                                                 original_keys(config, model)), s.mesh)

  # Resume: state and data position from the newest readable checkpoint.
  mgr = checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpoints.restore_latest_info(mgr, abstract)
  if restored is not None:
    state = restored["state"]
    train_iter.set_state(restored["data"])
  start = int(jax.device_get(state["step"]))
  if info is not None:
    info.update(resumed_from=start if restored is not None else None,
                set_aside=list(restored["set_aside"]) if restored is not None else [])
  if start and is_main:
    print(f"{desc}: resumed from step {start} of {config.total_steps} ({workdir})", flush=True)

  clean_accuracy = None
  if s.class_names and config.eval_every and tasks.get(config.objective).track_accuracy:
    clean_accuracy = _clean_accuracy_fn(config, s, model)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    _trim_metrics(metrics_path, start)
  bar = progress.bar(total=config.total_steps, initial=start, desc=desc, enabled=is_main)
  preemption.defer(True)  # a SIGTERM from here on waits for the end of its step
  for step in range(start + 1, config.total_steps + 1):
    batch = sharding.to_global(next(train_iter), s.mesh)
    state, metrics = step_fn(state, batch, s.head)
    bar.update(1)
    log_now = step % config.log_every == 0 or step == config.total_steps
    eval_now = clean_accuracy is not None and step % config.eval_every == 0
    if log_now or eval_now:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if eval_now:
        metrics["eval_accuracy"] = clean_accuracy(state["params"])
      if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(checkpoints.nonfinite_loss_message(mgr, metrics["loss"], step))
      bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k != "grad_norm"})
      if is_main:
        with open(metrics_path, "a") as f:
          f.write(json.dumps({"step": step, **metrics}) + "\n")
    stop = preemption.reached(step)  # SIGTERM: every host saves this step, then stops
    if stop or step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpoints.save(mgr, state, train_iter.get_state())
    if stop:
      preemption.stop(mgr, step, workdir)  # waits for the save, raises Preempted
  preemption.defer(False)
  bar.close()
  checkpoints.finish(mgr)  # raises CheckpointSaveError if a background save failed
  return jax.device_get(state["params"]), int(jax.device_get(state["step"]))


# ----------------------------------------------------------------------------
# Evaluation and report.
# ----------------------------------------------------------------------------


def evaluate_models(config, s: Setup, models: dict, loss_configs: dict, *, on_result=None):
  """Clean and robust results of each model on the same seeded subset (the task's
  evaluation: zero-shot classification, attacks on captions, ...).

  Args:
    models: {row name: params}.
    loss_configs: {row name: the loss ConfigDict it was trained with, or None}.
    on_result: optional fn(results so far, indices), called after each model
      (run() rewrites the record with it, so a later failure keeps these).

  Returns:
    ({row name: the task's result (evaluation.Result, captioning.CaptionResult)},
    indices).
  """
  task = tasks.get(config.objective)
  model, _, tokenizer = s.pretrained
  indices = data.eval_indices(len(s.eval_source), config.eval.num_examples or None,
                              config.eval.seed)
  options = dict(max_length=config.eval.get("max_length") or None,
                 target_caption=config.eval.get("target_caption") or None,
                 prompt=config.eval.get("prompt") or None)
  results = {}
  for name, params in models.items():
    results[name] = task.evaluate(
        model, params, tokenizer, s.eval_source, indices, class_names=s.class_names,
        templates=s.templates, eps_list=list(config.eval.eps),
        suites=eval_suites(config, loss_configs.get(name)),
        norm=config.eval.get("norm", "linf"), seed=config.eval.seed,
        batch_size=config.eval.batch_size, mesh=s.mesh, options=options)
    if on_result is not None:
      on_result(results, indices)
  return results, indices


def report(config, workdir, results, *, indices, extra=None, complete=True):
  """Writes results.json, results.md and robustness.png into workdir; returns the table.

  With complete=False (after each model of a run) the record says so and the
  plot waits for the end; each file is replaced atomically.
  """
  task = tasks.get(config.objective)
  table = task.format_table(results)
  if jax.process_index() != 0:
    return table
  if complete:
    task.plot(results, os.path.join(workdir, "robustness.png"))
  record = {"kind": "train", "config": json.loads(config.to_json_best_effort()),
            "workdir": workdir, "complete": complete,
            "results": {k: r.to_dict() for k, r in results.items()},
            "eval_indices": [int(i) for i in indices], **(extra or {})}
  reports.write_atomic(os.path.join(workdir, "results.json"),
                       json.dumps(record, indent=1, default=str))
  reports.write_atomic(os.path.join(workdir, "results.md"), table)
  return table


def run(config, workdir: str, *, checked=False):
  """Fine-tunes with the main loss and each comparison loss, then evaluates them all.

  Checks everything it can first (`preflight`, unless checked=True: the caller
  ran it, as train.py does before starting JAX's distributed runtime); results.json is rewritten after
  each evaluated model ("complete": false until the last) and records, per loss,
  the step evaluated and the step a resume started from.

  Returns:
    {"results": {row: evaluation.Result}, "table": markdown str, "steps": {loss: step}}.
  """
  if not checked:
    preflight(config, workdir)
  config = with_workdir(config, workdir)  # the record names the folder really used
  try:
    return _run(config, workdir)
  except KeyboardInterrupt:
    checkpoints.finish_open(interrupted=True)  # the save in flight completes, no tmp left
    raise


def _run(config, workdir):
  s = setup(config)
  model = s.pretrained.model
  finals, steps, loss_configs, resumed = {}, {}, {}, {}
  t0 = time.time()
  for name in loss_names(config):
    c = run_config(config, name)
    run_dir = os.path.join(workdir, name)
    resumed[name] = {}
    finals[name], steps[name] = train(c, run_dir, s, desc=f"fine-tune {name}",
                                      info=resumed[name])
    loss_configs[f"{name} fine-tuned"] = c.loss
    if config.export and jax.process_index() == 0:
      export = os.path.join(run_dir, "export")
      # The format the run started from (HF, or open_clip for an open_clip folder).
      prsl_jax.save_pretrained(model, finals[name], export, tokenizer=s.pretrained.tokenizer,
                               format=convert.source_format(config.model.path))
      checkpoints.write_training_loss(export, c.loss.to_dict())
  train_seconds = time.time() - t0
  models = {"start": s.pretrained.params, **{f"{n} fine-tuned": p for n, p in finals.items()}}
  # steps: the step each fine-tuned row's params were saved at (what is evaluated).
  extra = {"train_seconds": train_seconds, "steps": steps, "resumed": resumed}
  on_result = lambda r, i: report(config, workdir, r, indices=i, extra=extra, complete=False)
  if tasks.get(config.objective).needs_class_names and not s.class_names:
    return {"results": {}, "table": "", "steps": steps}  # nothing to classify
  results, indices = evaluate_models(config, s, models, loss_configs, on_result=on_result)
  table = report(config, workdir, results, indices=indices, extra=extra)
  return {"results": results, "table": table, "steps": steps}
