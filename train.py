r"""Fine-tune a CLIP with PRSL (and baselines), then compare their robustness.

  python train.py                                   # embedded default, no download
  python train.py --config configs/vitb32_cifar10.py:adv_prsl --workdir runs/x
  python train.py --config.loss.k=5 --config.total_steps=400

A workdir with a checkpoint resumes from it. Multi-host: add
--coordinator_address=auto on TPU pods (or host:port --num_processes
--process_id for explicit launches); every host runs the same command.
"""

import functools
import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import tqdm

import prsl_jax
from prsl_jax import checkpoints
from prsl_jax import data
from prsl_jax import sharding
from prsl_jax import training
from prsl_jax import zeroshot

def _define_config_flag():
  """--config, with a clear message for an override of a field the config lacks.

  config_flags applies the --config.* overrides when the flag is defined, and a
  missing field fails there with only the bare key ("'kk'"): name the argument.
  """
  try:
    return config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "default.py"),
        "Training config file (ml_collections get_config); override with --config.key=value.")
  except (AttributeError, KeyError) as e:
    key = str(e).strip("\"'")
    bad = [a for a in sys.argv[1:]
           if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
    if not bad:
      raise
    sys.exit(f"error: unknown config key in {bad[0]!r}: the config has no field {key!r} "
             f"(an override must name an existing field of the --config file)")


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: config.workdir).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: 'auto' (TPU pods, SLURM) or host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def quiet_logs():
  """orbax logs every save at INFO; keep the console to the progress bar and table."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def validate(config, class_names=None):
  """Stops a bad config before any compute, with the offending key in the message."""
  loss = config.loss
  if loss.name not in ("ce", "prsl", "topk_ce"):
    raise ValueError(f"config.loss.name must be ce, prsl or topk_ce, got {loss.name!r}")
  for name in config.compare_losses:
    if name not in ("ce", "prsl", "topk_ce"):
      raise ValueError(f"config.compare_losses has unknown loss {name!r}")
  if config.objective not in ("classification", "contrastive"):
    raise ValueError(f"config.objective must be classification or contrastive, got "
                     f"{config.objective!r}")
  if config.objective == "classification" and class_names is not None and len(class_names) < 2:
    raise ValueError(f"dataset {config.data.name!r} has no class names to classify")
  # k counts wrong classes: at most C-1 (classification) or B-1 (contrastive rows).
  limit = None
  if config.objective == "contrastive":
    limit, what = config.batch_size - 1, f"a contrastive batch of {config.batch_size}"
  elif class_names is not None:
    limit, what = len(class_names) - 1, f"{len(class_names)} classes"
  uses_k = any(n != "ce" for n in (loss.name, *config.compare_losses))
  if limit is not None and uses_k and not 1 <= loss.k <= limit:
    raise ValueError(f"config.loss.k={loss.k} must be in 1..{limit} for {what}")
  if loss.weight < 0:
    raise ValueError(f"config.loss.weight must be >= 0, got {loss.weight}")
  if config.batch_size < 1 or config.total_steps < 1:
    raise ValueError("config.batch_size and config.total_steps must be >= 1")
  if config.adversarial.enabled and (config.adversarial.eps < 0 or config.adversarial.steps < 1):
    raise ValueError("config.adversarial needs eps >= 0 and steps >= 1")
  for e in config.eval.eps:
    if e < 0:
      raise ValueError(f"config.eval.eps must be >= 0, got {e}")
  path = config.model.path
  if not os.path.isdir(os.path.expanduser(path)) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
    raise FileNotFoundError(f"config.model.path {path!r} is neither a folder nor a hub id "
                            f"(give a local HF checkpoint folder or e.g. "
                            f"openai/clip-vit-base-patch32)")


def run_config(config, loss_name):
  """The config of one fine-tuning run: the main loss or a comparison loss."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.loss.name = loss_name
  return c


def train(config, workdir, clip, train_source, class_emb, prompts, mesh, *, desc="train",
          eval_source=None):
  """Fine-tunes clip.params with config; resumes from workdir. Returns final params.

  With eval_source (classification only) and config.eval_every > 0, logs the clean
  accuracy on the seeded eval subset as eval_accuracy every eval_every steps.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Data: this process's rows of each global batch (see prsl_jax.data).
  tokenize = None
  if config.objective == "contrastive":
    tokenize = functools.partial(zeroshot.tokenize, clip)
  train_iter = data.train_iterator(
      train_source, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      caption_templates=data.DIGIT_CAPTIONS if config.data.name == "digits" else (),
      tokenize=tokenize)

  # Model, optimizer and state, replicated over the mesh.
  tx = training.make_optimizer(config.optimizer, config.total_steps, clip.params,
                               config.train_towers)
  state = sharding.replicate(training.init_state(clip.params, tx, config.seed), mesh)
  step_fn = training.make_train_step(clip, config, mesh, tx, class_emb=class_emb,
                                     prompts=prompts)

  # Resume: state and data position from the newest readable checkpoint.
  mgr = checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = checkpoints.restore_latest(mgr, abstract)
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
    logging.info("resumed %s from step %d", workdir, int(state["step"]))
  start = int(jax.device_get(state["step"]))

  clean_accuracy = None
  if eval_source is not None and config.eval_every and class_emb is not None:
    clean_accuracy = make_clean_accuracy(config, clip, eval_source, class_emb, prompts, mesh)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  bar = tqdm.tqdm(total=config.total_steps, initial=start, desc=desc, disable=not is_main,
                  dynamic_ncols=True, file=sys.stdout)
  for step in range(start + 1, config.total_steps + 1):
    batch = sharding.shard_batch(next(train_iter), mesh)
    state, metrics = step_fn(state, batch)
    bar.update(1)
    log_now = step % config.log_every == 0 or step == config.total_steps
    eval_now = clean_accuracy is not None and step % config.eval_every == 0
    if log_now or eval_now:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if eval_now:
        metrics["eval_accuracy"] = clean_accuracy(state["params"])
      if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; stopping "
                                 f"(last good checkpoint is kept in {workdir})")
      bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k != "grad_norm"})
      if is_main:
        with open(metrics_path, "a") as f:
          f.write(json.dumps({"step": step, **metrics}) + "\n")
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpoints.save(mgr, state, train_iter.get_state())
  bar.close()
  mgr.wait_until_finished()
  mgr.close()
  return jax.device_get(state["params"])


def make_clean_accuracy(config, clip, eval_source, class_emb, prompts, mesh):
  """fn(params) -> clean zero-shot accuracy on the seeded eval subset (host float)."""
  indices = data.eval_indices(len(eval_source), config.eval.num_examples, config.eval.seed)
  batches = [sharding.shard_batch(b, mesh)
             for b in data.eval_batches(eval_source, indices, config.eval.batch_size)]
  count = training.make_eval_step(clip, mesh)
  embed = jax.jit(lambda p: zeroshot.embed_prompts(clip, p, *prompts)) if prompts else None
  def accuracy(params):
    cls = class_emb if embed is None else embed(params)
    return sum(int(count(params, cls, b)) for b in batches) / len(indices)
  return accuracy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_logs()
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir

  # Config first: a bad config stops before any compute.
  validate(config)
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  clip = prsl_jax.load_pretrained(config.model.path, allow_pickle=config.model.allow_pickle,
                                  dtype=jnp.dtype(config.model.dtype), remat=config.model.remat)
  data_dir = config.data.data_dir or None
  train_source, class_names = data.load(config.data.name, config.data.train_split,
                                        image_size=clip.image_size, data_dir=data_dir)
  validate(config, class_names)
  mesh = sharding.make_mesh()
  sharding.check_global_batch(config.batch_size, mesh)
  logging.info("mesh: %d devices over %d processes", mesh.devices.size, jax.process_count())

  # Zero-shot head from the frozen text tower (recomputed in-step if text trains).
  templates = (zeroshot.IMAGENET_TEMPLATES if config.data.templates == "imagenet"
               else zeroshot.DEFAULT_TEMPLATES)
  class_emb = prompts = None
  if class_names:
    class_emb = zeroshot.class_embeddings(clip, clip.params, class_names, templates)
    if config.train_towers != "vision" and config.objective == "classification":
      ids, mask = zeroshot.tokenize(clip, [t.format(c) for c in class_names for t in templates])
      prompts = (ids, mask, len(class_names))

  eval_source = None
  if class_names:
    eval_source, _ = data.load(config.data.name, config.data.eval_split,
                               image_size=clip.image_size, data_dir=data_dir)

  # Fine-tune with the main loss and each comparison loss, from the same start.
  losses_to_run = [config.loss.name] + [n for n in config.compare_losses
                                        if n != config.loss.name]
  finals = {}
  t0 = time.time()
  for name in losses_to_run:
    cfg = run_config(config, name)
    finals[name] = train(cfg, os.path.join(workdir, name), clip, train_source, class_emb,
                         prompts, mesh, desc=f"fine-tune {name}", eval_source=eval_source)
    if config.export and jax.process_index() == 0:
      prsl_jax.save_pretrained(clip, finals[name], os.path.join(workdir, name, "export"))
  train_time = time.time() - t0

  # Evaluate the start and every fine-tuned model on the same seeded subset.
  if class_names:
    evaluate_and_report(config, workdir, clip, class_names, templates, finals, mesh,
                        train_time, eval_source)


def evaluate_and_report(config, workdir, clip, class_names, templates, finals, mesh,
                        train_time, eval_source):
  """Clean and robust accuracy of start vs fine-tuned models: table, JSON, plot."""
  from prsl_jax import evaluation  # pylint: disable=g-import-not-at-top
  indices = data.eval_indices(len(eval_source), config.eval.num_examples, config.eval.seed)
  models = {"start": clip.params, **{f"{n} fine-tuned": p for n, p in finals.items()}}
  # One logits_fn for every model (weights and class embeddings are its params), so
  # the evaluation compiles each attack once, not once per model.
  logits_fn = lambda p, x: zeroshot.logits(clip, p["params"], p["class_emb"], x)
  results = {}
  for name, params in models.items():
    # The text tower may have trained: class embeddings from each model's own params.
    cls = zeroshot.class_embeddings(clip, params, class_names, templates)
    results[name] = evaluation.evaluate(
        logits_fn, {"params": params, "class_emb": cls}, eval_source, indices,
        eps_list=list(config.eval.eps),
        suite=list(config.eval.attacks), seed=config.eval.seed,
        batch_size=config.eval.batch_size, mesh=mesh, steps=config.eval.steps)
  if jax.process_index() != 0:
    return
  table = evaluation.format_table(results)
  evaluation.plot(results, os.path.join(workdir, "robustness.png"))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()), "results": results,
               "train_seconds": train_time, "command": sys.argv,
               "eval_indices": [int(i) for i in indices]}, f, indent=2, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(f"\nRobust accuracy on {len(indices)} {config.data.name} {config.data.eval_split} "
        f"examples ({', '.join(config.eval.attacks)}, {config.eval.steps} steps; L-inf eps "
        f"on [0,1] pixels):\n")
  print(table)
  print(f"\nwrote {workdir}/results.json, results.md, robustness.png; fine-tuned models in "
        f"{workdir}/<loss>/export")


if __name__ == "__main__":
  app.run(main)
