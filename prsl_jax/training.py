"""Train state, optimizer and the data-parallel update step, as pure pieces.

The state is a plain pytree {"params", "opt", "step", "rng"}: "rng" is the run's
root key (typed) and the step's key is fold_in(rng, step), so a resumed run draws
exactly the numbers an uninterrupted one would. An objective that compares the
model with its frozen original (FARE, PMG-AFT: finetune_losses.OBJECTIVES) adds
"original": the starting values of the trained towers' params, a constant of
the run (no optimizer state, never updated; checkpointed, restored and
replicated with the rest of the state).

The step is built from top-level pure functions, each of (arrays, *, statics):

  batch_loss(params, batch, images, head, *, model, task, loss_fn, axis_name) -> loss, metrics
  adversarial_images(params, batch, head, key, *, ..., adversarial, axis_name) -> images
  apply_gradients(state, grads, *, tx) -> state
  train_step(state, batch, head, *, ...) -> state, metrics

`make_train_step` only partials train_step with the statics, shard_maps it over
the mesh's 'data' axis and jits it with the state donated. What the step
scores is the task's (prsl_jax.tasks: its logits, labels and optional loss),
a value the trainer picks once from config.objective.

The loss is any batch loss of the registry (losses.get_loss): it gets the mesh
axis, so PRSL's group is the global batch and one device equals eight. Or it is
the name of an objective of finetune_losses.OBJECTIVES ('fare', 'pmg_aft'),
whose step (`original_step_loss`) makes its own training attack and scores the
model against state["original"].
"""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from prsl_jax import attacks
from prsl_jax import finetune_losses
from prsl_jax import losses
from prsl_jax import sharding

def trainable_keys(model, train_towers: str):
  """Top-level param keys the optimizer updates (model.towers); the rest stays frozen."""
  towers = model.towers
  if train_towers not in towers:
    raise ValueError(f"train_towers must be one of {sorted(towers)}, got {train_towers!r}")
  return towers[train_towers]


def make_optimizer(opt_config, total_steps: int, params, trainable):
  """optax chain for the trainable params; the rest gets zero updates and no state.

  Args:
    opt_config: ConfigDict with name ('adamw' | 'sgd'), lr, weight_decay,
      schedule ('cosine' | 'constant'), warmup_steps, grad_clip (0 or a norm),
      momentum (sgd).
    total_steps: length of the schedule.
    params: the params pytree.
    trainable: top-level keys of params to train (trainable_keys).
  """
  warmup = opt_config.warmup_steps
  if opt_config.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, opt_config.lr, warmup,
                                            max(total_steps, warmup + 1))
  elif opt_config.schedule == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, opt_config.lr, warmup),
         optax.constant_schedule(opt_config.lr)], [warmup]) if warmup else opt_config.lr
  else:
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got "
                     f"{opt_config.schedule!r}")
  if opt_config.name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt_config.weight_decay)
  elif opt_config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay),
                     optax.sgd(lr, momentum=opt_config.get("momentum", 0.9)))
  else:
    raise ValueError(f"optimizer.name must be 'adamw' or 'sgd', got {opt_config.name!r}")
  if opt_config.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), tx)
  labels = {k: ("train" if k in trainable else "freeze") for k in params}
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def init_state(params, tx, seed: int, original_keys=()):
  """The train state; original_keys: top-level param keys kept as state["original"].

  The original holds only the trained towers (the rest never changes, so
  params' own values are the original's): `reference_params` puts them
  together. Its leaves are the params' own arrays here; sharding.replicate
  (copy=True) gives each its own buffer before the state is donated.
  """
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key(seed)}
  if original_keys:
    state["original"] = {k: params[k] for k in original_keys}
  return state


def reference_params(params, original):
  """The frozen original model's full params: params with the original's towers, constant."""
  return {**jax.lax.stop_gradient(params), **original}


# ----------------------------------------------------------------------------
# The pieces of a step (per shard; `axis_name` is the mesh axis or None).
# ----------------------------------------------------------------------------


def batch_loss(params, batch, images, head, *, model, task, loss_fn, axis_name=None):
  """The loss of one batch (global over `axis_name`) and its accuracy (this shard's).

  task: a prsl_jax.tasks.Task (its logits, labels and, when it has one, its own
  loss; else loss_fn of its logits and labels).

  Returns:
    (scalar loss, {"accuracy": scalar}); accuracy is top-1 over rows (tokens
    for captioning, ignoring padding), a mean over this shard.
  """
  if task.loss is not None:
    loss = task.loss(params, batch, images, head, model=model, loss_fn=loss_fn,
                     axis_name=axis_name)
    logits = task.logits(jax.lax.stop_gradient(params), batch, images, head, model=model,
                         axis_name=axis_name)
  else:
    logits = task.logits(params, batch, images, head, model=model, axis_name=axis_name)
  labels = task.labels(batch, axis_name)
  if task.loss is None:
    loss = loss_fn(logits, labels, axis_name=axis_name)
  valid = labels != losses.IGNORE_INDEX
  hit = (jnp.argmax(logits, axis=-1) == labels) & valid
  accuracy = jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)
  return loss, {"accuracy": accuracy}


def row_keys(key, n, axis_name=None):
  """(n,) keys, fold_in(key, global row) for this shard's n rows.

  Per-example attack keys make the noise independent of how many devices the
  batch is split over.
  """
  rows = (0 if axis_name is None else jax.lax.axis_index(axis_name) * n) + jnp.arange(n)
  return jax.vmap(functools.partial(jax.random.fold_in, key))(rows)


def adversarial_images(params, batch, head, key, *, model, task, adversarial,
                       axis_name=None):
  """PGD images for this shard against frozen params (TeCoA-style training).

  Each example's attack key is fold_in(key, its global row) (row_keys).
  """
  params = jax.lax.stop_gradient(params)
  def logits_fn(x):
    return task.logits(params, batch, x, head, model=model, axis_name=axis_name)
  keys = row_keys(key, batch["image"].shape[0], axis_name)
  return attacks.pgd(logits_fn, batch["image"], task.labels(batch, axis_name), key=keys,
                     eps=adversarial.eps, steps=adversarial.steps,
                     step_size=adversarial.get("step_size") or None,
                     norm=adversarial.norm, loss=adversarial.get("loss", "ce"))


def fare_images(params, original, batch, key, *, model, adversarial, axis_name=None):
  """FARE's training attack on this shard: (x_adv, phi_0(x)), both constants.

  finetune_losses.fare_attack against the current params (frozen for the
  attack), from a random start with per-row keys (row_keys); step size
  adversarial.step_size, 0 meaning 2.5 eps / steps as for PGD.
  """
  images = batch["image"]
  target = jax.lax.stop_gradient(model.encode_images(reference_params(params, original),
                                                     images))
  frozen = jax.lax.stop_gradient(params)
  step_size = adversarial.get("step_size") or 2.5 * adversarial.eps / adversarial.steps
  x_adv = finetune_losses.fare_attack(
      lambda x: model.encode_images(frozen, x), images, target,
      key=row_keys(key, images.shape[0], axis_name), eps=adversarial.eps,
      steps=adversarial.steps, step_size=step_size)
  return jax.lax.stop_gradient(x_adv), target


def original_step_loss(params, original, batch, head, key, *, model, task, objective,
                       adversarial, axis_name=None):
  """(loss fn(params) -> (loss, metrics), images) of a frozen-original objective.

  The training attack runs here, once, against the current params; the returned
  function is what the step differentiates.

    'fare':    loss = finetune_losses.fare_loss(phi(x_adv), phi_0(x)), x_adv from
               fare_images; images only (no labels, no text); metrics {}.
    'pmg_aft': x_adv = PGD-CE (adversarial_images, as TeCoA's); loss =
               finetune_losses.pmg_aft_loss(f(x_adv), f(x), f_0(x_adv), y) with
               the authors' weights (1, 1) and summed KLs; f the task's logits
               (CLIP's scaled zero-shot logits); metrics {"accuracy"} on x_adv.

  Args:
    params: the params being trained; original: state["original"].
    objective: a name of finetune_losses.OBJECTIVES.
  """
  if objective == "fare":
    x_adv, target = fare_images(params, original, batch, key, model=model,
                                adversarial=adversarial, axis_name=axis_name)

    def fare(p):
      return finetune_losses.fare_loss(model.encode_images(p, x_adv), target,
                                       axis_name=axis_name), {}
    return fare, x_adv
  if objective == "pmg_aft":
    x_adv = adversarial_images(params, batch, head, key, model=model, task=task,
                               adversarial=adversarial, axis_name=axis_name)
    labels = task.labels(batch, axis_name)
    reference = reference_params(params, original)
    logits_original = jax.lax.stop_gradient(
        task.logits(reference, batch, x_adv, head, model=model, axis_name=axis_name))

    def pmg_aft(p):
      logits_adv = task.logits(p, batch, x_adv, head, model=model, axis_name=axis_name)
      logits_clean = task.logits(p, batch, batch["image"], head, model=model,
                                 axis_name=axis_name)
      loss = finetune_losses.pmg_aft_loss(logits_adv, logits_clean, logits_original, labels,
                                          axis_name=axis_name)
      accuracy = jnp.mean(jnp.argmax(logits_adv, axis=-1) == labels)
      return loss, {"accuracy": accuracy}
    return pmg_aft, x_adv
  raise ValueError(f"objective must be one of {finetune_losses.OBJECTIVES}, got {objective!r}")


def apply_gradients(state, grads, *, tx):
  """The optimizer's update of state["params"]; the rest (original, rng) passes through."""
  updates, opt = tx.update(grads, state["opt"], state["params"])
  return {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt,
          "step": state["step"] + 1}


def train_step(state, batch, head, *, model, task, loss_fn, adversarial, tx,
               axis_name=sharding.DATA):
  """One update: (state, batch, head) -> (state, metrics), per shard.

  Gradients are averaged with lax.pmean. Each shard's loss is either its own
  mean (per-row losses over equal shards) or the global value itself (batch
  losses given axis_name); with shard_map's psum/all_gather transposes, the
  pmean of the per-shard gradients is the gradient of the mean of the
  per-shard losses, which is the global loss in both cases.

  loss_fn: a batch loss (logits, labels), or the name of a frozen-original
  objective (finetune_losses.OBJECTIVES; the state has "original"), which
  makes its own training attack (original_step_loss).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  if isinstance(loss_fn, str):
    fn, _ = original_step_loss(state["params"], state["original"], batch, head, key,
                               model=model, task=task, objective=loss_fn,
                               adversarial=adversarial, axis_name=axis_name)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(state["params"])
  else:
    images = batch["image"]
    if adversarial is not None and adversarial.enabled:
      images = adversarial_images(state["params"], batch, head, key, model=model, task=task,
                                  adversarial=adversarial, axis_name=axis_name)
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    (loss, metrics), grads = grad_fn(state["params"], batch, images, head, model=model,
                                     task=task, loss_fn=loss_fn, axis_name=axis_name)
  grads = jax.lax.pmean(grads, axis_name)
  state = apply_gradients(state, grads, tx=tx)
  metrics = jax.lax.pmean(dict(metrics, loss=loss), axis_name)
  if adversarial is not None and adversarial.enabled and "accuracy" in metrics:
    metrics["adv_accuracy"] = metrics.pop("accuracy")
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state, metrics


def make_train_step(mesh, *, model, task, loss_fn, adversarial, tx):
  """jit(shard_map(train_step)): (state, batch, head) -> (state, metrics).

  batch: dict of global arrays split over 'data' (sharding.to_global):
    classification: image (B, S, S, 3) float32 in [0, 1], label (B,) int32;
    contrastive: image, input_ids (B, L), attention_mask (B, L);
    captioning: image, decoder_input_ids (B, T), decoder_attention_mask (B, T),
      labels (B, T) with IGNORE_INDEX on padding.
  head: replicated dict: {"class_emb": (C, D)} (text frozen), or
    {"prompt_ids", "prompt_mask": (C, T, L)} (C classes x T templates) to
    recompute the class embeddings in the step (text trained); {} otherwise.
  """
  step = functools.partial(train_step, model=model, task=task, loss_fn=loss_fn,
                           adversarial=adversarial, tx=tx, axis_name=sharding.DATA)
  # check_vma=False: with it on, grad w.r.t. replicated params comes back already
  # summed over devices; we keep the explicit pmean, the documented contract.
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(sharding.DATA), P()),
                          out_specs=(P(), P()), check_vma=False)
  # Donating the state lets XLA update params and optimizer state in place.
  return jax.jit(sharded, donate_argnums=(0,))


def make_eval_step(mesh, *, model, task):
  """jit: (params, batch, head) -> (correct rows, counted rows), summed over devices.

  batch as for make_train_step plus mask (B,) bool (padding rows are False).
  """
  def shard(params, batch, head):
    logits = task.logits(params, batch, batch["image"], head, model=model,
                         axis_name=sharding.DATA)
    labels = task.labels(batch, sharding.DATA)
    valid = labels != losses.IGNORE_INDEX
    mask = batch["mask"].reshape(batch["mask"].shape + (1,) * (labels.ndim - 1))
    counted = valid & mask
    correct = (jnp.argmax(logits, -1) == labels) & counted
    total = lambda v: jax.lax.psum(jnp.sum(v.astype(jnp.int32)), sharding.DATA)
    return total(correct), total(counted)
  return jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(sharding.DATA), P()),
                               out_specs=(P(), P()), check_vma=False))

