"""Train state, optimizer and the data-parallel update step.

The state is a plain pytree {"params", "opt", "step", "rng"}: "rng" holds the raw
key data of the run's root key, and the step's key is fold_in(root, step), so a
resumed run draws exactly the numbers an uninterrupted one would.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from prsl_jax import attacks
from prsl_jax import losses
from prsl_jax import sharding
from prsl_jax import zeroshot

VISION_KEYS = ("vision_model", "visual_projection")
TEXT_KEYS = ("text_model", "text_projection", "logit_scale")
TOWERS = {"vision": VISION_KEYS, "text": TEXT_KEYS, "both": VISION_KEYS + TEXT_KEYS}


def loss_fn_from_config(loss_config):
  """fn(logits (B, C), labels (B,)) -> (B,) from a ConfigDict(name, k, weight, renormalize)."""
  name = loss_config.name
  if name == "ce":
    return losses.cross_entropy
  if name == "prsl":
    return functools.partial(losses.prsl_loss, k=loss_config.k, weight=loss_config.weight,
                             renormalize=loss_config.get("renormalize", False))
  if name == "topk_ce":
    return functools.partial(losses.topk_cross_entropy, k=loss_config.k)
  raise ValueError(f"config.loss.name must be one of 'ce', 'prsl', 'topk_ce', got {name!r}")


def make_optimizer(opt_config, total_steps: int, params, train_towers: str):
  """optax chain for the trainable towers; the rest gets zero updates and no state.

  Args:
    opt_config: ConfigDict with name ('adamw' | 'sgd'), lr, weight_decay,
      schedule ('cosine' | 'constant'), warmup_steps, grad_clip (None or norm),
      momentum (sgd).
    total_steps: length of the schedule.
    params: the params pytree (top keys as prsl_jax.models.clip).
    train_towers: 'vision' (default; text frozen), 'text' or 'both'.
  """
  if train_towers not in TOWERS:
    raise ValueError(f"train_towers must be one of {sorted(TOWERS)}, got {train_towers!r}")
  warmup = opt_config.warmup_steps
  if opt_config.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, opt_config.lr, warmup, max(total_steps, warmup + 1))
  elif opt_config.schedule == "constant":
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, opt_config.lr, warmup), optax.constant_schedule(opt_config.lr)],
        [warmup]) if warmup else opt_config.lr
  else:
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {opt_config.schedule!r}")
  if opt_config.name == "adamw":
    tx = optax.adamw(lr, weight_decay=opt_config.weight_decay)
  elif opt_config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay),
                     optax.sgd(lr, momentum=opt_config.get("momentum", 0.9)))
  else:
    raise ValueError(f"optimizer.name must be 'adamw' or 'sgd', got {opt_config.name!r}")
  if opt_config.get("grad_clip"):
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), tx)
  trainable = TOWERS[train_towers]
  labels = {k: ("train" if k in trainable else "freeze") for k in params}
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def init_state(params, tx, seed: int):
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed))}


def make_train_step(clip, config, mesh, tx, *, class_emb=None, prompts=None):
  """The jitted update: (state, batch) -> (state, metrics), state donated.

  Args:
    clip: prsl_jax CLIP (module and pure encoders).
    config: the run's ConfigDict (objective, loss, adversarial, train_towers).
    mesh: data mesh; the step runs per shard and averages gradients with pmean.
    tx: optimizer from make_optimizer.
    class_emb: (C, D) fixed class embeddings (classification, text frozen).
    prompts: (input_ids (C*T, L), attention_mask, C) to recompute the class
      embeddings from the text tower in the step (classification, text trained).

  Returns:
    step(state, batch): batch is a dict of global arrays split over 'data':
    classification: image (B, S, S, 3) float32 in [0, 1], label (B,) int32;
    contrastive: image, input_ids (B, L), attention_mask (B, L).
    Metrics are global means: loss, accuracy, and adv_accuracy when adversarial.
  """
  row_loss = loss_fn_from_config(config.loss)
  adv = config.adversarial
  contrastive = config.objective == "contrastive"
  if config.objective not in ("classification", "contrastive"):
    raise ValueError(f"objective must be 'classification' or 'contrastive', got {config.objective!r}")

  def class_embeddings(params):
    if prompts is None:
      return class_emb
    ids, mask, num_classes = prompts
    return zeroshot.embed_prompts(clip, params, ids, mask, num_classes)

  def classify(params, cls, images):
    return zeroshot.logits(clip, params, cls, images)

  def perturb(params, batch, key, offset):
    """Adversarial images for this shard (the attack sees frozen params)."""
    params = jax.lax.stop_gradient(params)
    if contrastive:
      # Attack the image->text matching of the (gathered) batch: labels = rows.
      txt = _l2n(jax.lax.all_gather(clip.encode_texts(params, batch["input_ids"],
                                                      batch["attention_mask"]),
                                    sharding.DATA, tiled=True))
      logits_fn = lambda x: clip.logit_scale(params) * _l2n(clip.encode_images(params, x)) @ txt.T
      labels = offset + jnp.arange(batch["image"].shape[0])
    else:
      cls = class_embeddings(params)
      logits_fn = functools.partial(classify, params, cls)
      labels = batch["label"]
    # Per-example keys from the example's global row: the same noise whatever the
    # number of devices the batch is split over.
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(
        offset + jnp.arange(batch["image"].shape[0]))
    kw = dict(eps=adv.eps, steps=adv.steps, norm=adv.norm, loss=adv.get("loss", "ce"))
    if adv.get("step_size"):
      kw["step_size"] = adv.step_size
    return attacks.pgd(logits_fn, batch["image"], labels, key=keys, **kw)

  def loss_and_metrics(params, batch, images, offset):
    if contrastive:
      img = clip.encode_images(params, images)
      txt = clip.encode_texts(params, batch["input_ids"], batch["attention_mask"])
      # Gather both sides: the negatives are the whole global batch, so the loss
      # does not depend on how many devices share the batch.
      img_all = jax.lax.all_gather(img, sharding.DATA, tiled=True)
      txt_all = jax.lax.all_gather(txt, sharding.DATA, tiled=True)
      logits = clip.logit_scale(params) * _l2n(img) @ _l2n(txt_all).T
      logits_t = clip.logit_scale(params) * _l2n(txt) @ _l2n(img_all).T
      labels = offset + jnp.arange(img.shape[0])
      loss = 0.5 * (row_loss(logits, labels) + row_loss(logits_t, labels))
    else:
      logits = classify(params, class_embeddings(params), images)
      labels = batch["label"]
      loss = row_loss(logits, labels)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.mean(loss), jnp.mean(acc)

  def step_shard(state, batch):
    params = state["params"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    n_local = batch["image"].shape[0]
    offset = jax.lax.axis_index(sharding.DATA) * n_local
    metrics = {}
    images = batch["image"]
    if adv.enabled:
      images = perturb(params, batch, key, offset)
    (loss, acc), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
        params, batch, images, offset)
    # Each shard holds the mean over its rows; equal shard sizes make the mean of
    # the means the global mean.
    grads = jax.lax.pmean(grads, sharding.DATA)
    updates, opt = tx.update(grads, state["opt"], params)
    params = optax.apply_updates(params, updates)
    metrics["loss"] = jax.lax.pmean(loss, sharding.DATA)
    metrics["adv_accuracy" if adv.enabled else "accuracy"] = jax.lax.pmean(acc, sharding.DATA)
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, metrics

  # check_vma=False: with it on, grad w.r.t. replicated params comes back already
  # summed over devices; we keep the explicit pmean, the documented contract.
  sharded = jax.shard_map(step_shard, mesh=mesh, in_specs=(P(), P(sharding.DATA)),
                          out_specs=(P(), P()), check_vma=False)
  # Donating the state lets XLA update params and optimizer state in place.
  return jax.jit(sharded, donate_argnums=(0,))


def make_eval_step(clip, mesh):
  """Jitted (params, class_emb (C, D), batch) -> correct rows (clean), summed over devices.

  batch: image (B, S, S, 3), label (B,), mask (B,) bool (padding rows are False).
  """
  def shard(params, cls, batch):
    logits = zeroshot.logits(clip, params, cls, batch["image"])
    correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return jax.lax.psum(jnp.sum(correct.astype(jnp.int32)), sharding.DATA)
  return jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(), P(sharding.DATA)),
                               out_specs=P(), check_vma=False))


def _l2n(x):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
