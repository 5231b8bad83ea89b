"""The field's robust fine-tuning objectives beside PRSL: FARE, PMG-AFT and TeCoA.

Pure functions of arrays (embeddings, logits, images); no model, no trainer.
Each is written from the authors' code, named below, never copied.

FARE (Schlarmann, Singh, Croce, Hein, ICML 2024, arXiv:2402.12336; code: GitHub
chs20/RobustVLM, train/adversarial_training_clip.py, functions `compute_loss`
and `l2`, class `ClipVisionModel`; the attack: train/pgd_train.py, `pgd`,
with vlm_eval/attacks/utils.py):

  fare_loss    mean_b sum_d (phi(x_adv)_bd - phi_0(x)_bd)^2
               phi is the fine-tuned vision tower's *projected* image
               embedding (open_clip's `model.visual(normalize(x))`, here
               `CLIP.encode_images`), phi_0 the frozen original's on the clean
               image. FARE's command (--output_normalize False) uses the
               embeddings *unnormalised*; the squared error is summed over the
               embedding dimension D (their comment: "it does not divide by
               the latent dimension") and averaged over the batch.
  fare_attack  the training attack: maximise the same distance, per example,
               with L-inf PGD from a uniform random start (10 steps of 1/255
               at eps 2/255 or 4/255 in FARE's commands).

PMG-AFT (Wang, Zhang, Yuan, Shan, CVPR 2024, arXiv:2401.04350; code: GitHub
serendipity1122/Pre-trained-Model-Guided-Fine-Tuning-for-Zero-Shot-Adversarial-
Robustness, PMG_AFT.py, function `train`):

  pmg_aft_loss  CE(z_adv, y)                       (mean over the batch)
                + w_g * sum_b KL(P_0(x_adv) || P(x_adv))   "loss_advori"
                + w_c * sum_b KL(P(x)       || P(x_adv))   "loss_advclean"
               z_adv = the fine-tuned model's logits on the adversarial image,
               P = softmax of the fine-tuned model's logits, P_0 = of the
               frozen original model's. torch's KLDivLoss(input=log_softmax
               (z_adv), target=softmax(z_ref)) is KL(target || input) =
               sum_c p_ref (log p_ref - log p_adv). Both KL terms use
               reduction="sum": summed over the batch *and* the classes, with
               no 1/B (CE is a mean), so at their batch size 256 the KL terms
               weigh 256x more per example than CE. w_g = w_c = 1 (the code
               adds the three terms; no temperature beyond the logits
               themselves). The clean term is not detached: its gradient also
               flows into P(x).

               Two cautions from their code. (1) The first code upload
               (commit 4baf55d) had both KLs the other way round,
               KL(P(x_adv) || P_ref); the later edit of PMG_AFT.py alone
               (a53fdd8), which code re-using theirs also carries, is the one
               above. (2) Their `multiGPU_CLIP` L2-normalises the
               text embedding the model had already multiplied by exp(logit
               scale), so their "logits" are plain cosines in [-1, 1]
               (temperature 1, not CLIP's 100; their issue 1), where TeCoA's
               `multiGPU_CLIP`, which theirs modifies, keeps the scale. These
               functions take whatever logits the caller passes: CLIP's scaled
               logits follow the paper and TeCoA, the cosines reproduce
               PMG-AFT's code.

TeCoA (Mao et al., ICLR 2023; code: GitHub cvlab-columbia/
ZSRobust4FoundationModel, finetuning.py, `train`) is adversarial cross-entropy
through the zero-shot head, on CLIP's scaled logits (exp(logit_scale) * cos):
`prsl_jax.losses.mean_cross_entropy(logits_adv, labels)`, the "ce" loss of
prsl_jax.losses under adversarial training; nothing new here. FARE's TeCoA
baseline is the same with L2-normalised embeddings and a fixed scale of 100
(adversarial_training_clip.py, `compute_loss` with loss 'ce').

Data parallelism: with `axis_name` (inside jax.shard_map) the batch means and
sums span every device, as in prsl_jax.losses.
"""

import jax
import jax.numpy as jnp

from prsl_jax import attacks
from prsl_jax import losses
from prsl_jax.attacks import core

# FARE's training attack (README commands of chs20/RobustVLM): PGD-10, step
# 1/255, momentum 0.9 on the sign of the gradient (train/pgd_train.py).
FARE_STEPS = 10
FARE_STEP_SIZE = 1 / 255
FARE_MOMENTUM = 0.9
FARE_EPS = (2 / 255, 4 / 255)

# PMG-AFT's weights: the code adds CE and both KL terms with weight 1.
PMG_AFT_GENERAL_WEIGHT = 1.0
PMG_AFT_CLEAN_WEIGHT = 1.0
# PMG_AFT.py's argument defaults for the training attack (--train_eps 2,
# --train_numsteps 5, --train_stepsize 1, in 1/255).
PMG_AFT_EPS = 2 / 255
PMG_AFT_STEPS = 5
PMG_AFT_STEP_SIZE = 1 / 255
KL_REDUCTIONS = ("sum", "mean")

# The objectives that compare the model with its frozen original: config.loss.name
# selects one, and prsl_jax.training keeps the original's params in the train state.
OBJECTIVES = ("fare", "pmg_aft")


def paper_attack_loss(loss_config):
  """(name, kwargs) of the loss the 'paper' attack (BIM through the model's own
  training loss) uses for a model trained with loss_config; None = cross-entropy.

  FARE's and PMG-AFT's losses need the frozen original model (and FARE's no
  labels), which an attack on the fine-tuned classifier does not have: their
  models are attacked through CE, PMG-AFT's leading term.

  Args:
    loss_config: config.loss, a run's stored config.json "loss" or an export's
      training-loss file (any mapping with "name" and that loss's fields).
  """
  if not loss_config or loss_config.get("name", "ce") in ("ce", *OBJECTIVES):
    return None
  return loss_config["name"], losses.config_kwargs(loss_config)


# ----------------------------------------------------------------------------
# FARE.
# ----------------------------------------------------------------------------


def _check_embeddings(embeddings, targets, names=("embeddings", "target_embeddings")):
  for name, e in zip(names, (embeddings, targets)):
    shape = getattr(e, "shape", None)
    if shape is None or len(shape) != 2:
      raise ValueError(f"{name} must have shape (B, D), got shape {shape}")
    if not jnp.issubdtype(e.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got dtype {e.dtype}")
  if tuple(embeddings.shape) != tuple(targets.shape):
    raise ValueError(f"{names[0]} {tuple(embeddings.shape)} and {names[1]} "
                     f"{tuple(targets.shape)} must have the same shape (B, D)")


def fare_distances(embeddings, target_embeddings):
  """Per-example squared L2 distance, summed over the embedding dimension.

  Args:
    embeddings: (B, D) floating, phi(x_adv): the fine-tuned model's projected,
      unnormalised image embeddings of the adversarial images.
    target_embeddings: (B, D) floating, phi_0(x): the frozen original model's
      embeddings of the clean images.

  Returns:
    (B,) float32: sum_d (embeddings - target_embeddings)^2.
  """
  _check_embeddings(embeddings, target_embeddings)
  diff = embeddings.astype(jnp.float32) - target_embeddings.astype(jnp.float32)
  return jnp.sum(jnp.square(diff), axis=-1)


def fare_loss(embeddings, target_embeddings, *, axis_name=None):
  """FARE's loss: mean over the batch of fare_distances (chs20/RobustVLM `l2`).

  Args:
    embeddings: (B, D) phi(x_adv), fine-tuned, unnormalised (see the module
      docstring: FARE's --output_normalize False).
    target_embeddings: (B, D) phi_0(x), frozen original on clean images; a
      constant for the update (compute it outside the differentiated function
      or pass it through jax.lax.stop_gradient).
    axis_name: mesh axis inside shard_map: the mean over every device's rows.

  Returns:
    scalar float32 >= 0; 0 when the embeddings agree.
  """
  d = fare_distances(embeddings, target_embeddings)
  count = jnp.asarray(d.shape[0], jnp.float32)
  if axis_name is not None:
    return jax.lax.psum(jnp.sum(d), axis_name) / jax.lax.psum(count, axis_name)
  return jnp.sum(d) / count


def fare_attack(embed_fn, images, target_embeddings, *, key, eps, steps=FARE_STEPS,
                step_size=FARE_STEP_SIZE, momentum=FARE_MOMENTUM, random_start=True,
                keep_best=True):
  """FARE's training attack: L-inf PGD that maximises fare_distances per example.

  From x = clip(x0 + U(-eps, eps)^n, 0, 1) (random_start), each step

      g = d/dx sum_b ||embed_fn(x)_b - target_b||^2
      v <- sign(momentum * v + sign(g))           (v starts at 0)
      x <- clip(clip(x + step_size * v, x0 - eps, x0 + eps), 0, 1)

  as chs20/RobustVLM's train/pgd_train.py `pgd` (mode='max', norm 'linf'):
  the gradient is normalised (sign), momentum added and the velocity
  normalised again. For L-inf this equals plain sign PGD except where a
  gradient coordinate is exactly 0, which keeps its previous direction. The
  authors differentiate the batch mean (reduction 'mean'), whose sign is the
  per-example sum's: each example's step depends on its own image only.

  Two departures, both to keep prsl_jax's attack contract: the random start is
  clipped to [0, 1] before the first gradient (theirs is not), and with
  keep_best (default) each example gets its iterate of largest distance,
  scored after every step (one extra forward pass); keep_best=False returns
  the last iterate, as the authors do.

  Args:
    embed_fn: images (B, H, W, C') float32 in [0, 1] -> (B, D) embeddings of
      the model being trained (pixel normalisation inside), e.g.
      `lambda x: model.encode_images(params, x)`.
    images: (B, H, W, C') float in [0, 1], the clean images x0.
    target_embeddings: (B, D) phi_0(x0), the frozen original's clean embeddings.
    key: a jax.random key or B keys (one per example); may be None when
      random_start=False.
    eps: L-inf budget in [0, 1] pixel units (FARE: 2/255 or 4/255); may be traced.
    steps: static int >= 1 (FARE: 10).
    step_size: per-step change in [0, 1] pixel units (FARE: 1/255); may be traced.
    momentum: >= 0 (FARE: 0.9).
    random_start: start uniformly in the ball (FARE: yes). Without it the
      attack cannot move while phi = phi_0 (the first step of fine-tuning):
      at x0 the distance is a minimum, 0, and so is its gradient.
    keep_best: return the per-example best iterate instead of the last.

  Returns:
    (B, H, W, C') float32 images with |x - x0|_inf <= eps, in [0, 1].
  """
  dummy_labels = jnp.zeros(getattr(images, "shape", (0,))[:1], jnp.int32)
  core.check_images(images, dummy_labels)
  core.check_eps(eps, "linf")
  core.check_eps(step_size, "linf", "step_size")
  steps = core.check_int("steps", steps, minimum=1)
  momentum = losses.check_weight("momentum", momentum)
  out = jax.eval_shape(embed_fn, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  if getattr(out, "shape", None) is None or len(out.shape) != 2:
    raise ValueError(f"embed_fn must map images {tuple(images.shape)} to (B, D) embeddings, "
                     f"got {getattr(out, 'shape', out)}")
  _check_embeddings(out, target_embeddings, ("embed_fn(images)", "target_embeddings"))
  target = jax.lax.stop_gradient(target_embeddings.astype(jnp.float32))
  x0 = images.astype(jnp.float32)

  def distances(x):
    return fare_distances(embed_fn(x).astype(jnp.float32), target)

  def total(x):
    d = distances(x)
    return jnp.sum(d), d
  value_and_grad = jax.value_and_grad(total, has_aux=True)

  if random_start:
    keys = core.example_keys(key, x0.shape[0])
    x = core.project(x0 + eps * core.draw(core.uniform_pm1, keys, x0.shape[1:]), x0, eps, "linf")
  else:
    x = x0
  level = core.batch_zeros(x0).astype(jnp.int32)  # FARE has no "fooled": rank by distance

  def body(_, carry):
    x, v, best = carry
    (_, d), g = value_and_grad(x)
    if keep_best:
      best = core.merge(best, (x, level, d))
    v = jnp.sign(momentum * v + jnp.sign(g))
    x = core.project(x + step_size * v, x0, eps, "linf")
    return x, v, best

  best = core.empty_best(x0) if keep_best else None  # None: an empty carry
  x, _, best = jax.lax.fori_loop(0, steps, body, (x, x0 * 0.0, best))
  if not keep_best:
    return x
  return core.merge(best, (x, level, distances(x)))[0]


# ----------------------------------------------------------------------------
# PMG-AFT.
# ----------------------------------------------------------------------------


def kl_divergence(p_logits, q_logits):
  """KL(softmax(p) || softmax(q)) per row, from log-softmax (stable).

  Args:
    p_logits, q_logits: (B, C) floating.

  Returns:
    (B,) float32 >= 0: sum_c p_c (log p_c - log q_c).
  """
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _check_pmg_args(logits_adv, logits_clean, logits_original_adv, labels, kl_reduction):
  losses.check_logits_labels(logits_adv, labels, ignore_index=None)
  if logits_adv.ndim != 2:
    raise ValueError(f"logits_adv must have shape (B, C), got {tuple(logits_adv.shape)}")
  for name, z in (("logits_clean", logits_clean), ("logits_original_adv", logits_original_adv)):
    shape = getattr(z, "shape", None)
    if shape is None or tuple(shape) != tuple(logits_adv.shape):
      raise ValueError(f"{name} must have the shape of logits_adv {tuple(logits_adv.shape)}, "
                       f"got {shape}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got dtype {z.dtype}")
  core.check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)


def pmg_aft_terms(logits_adv, logits_clean, logits_original_adv, labels, *,
                  kl_reduction="sum", axis_name=None):
  """PMG-AFT's three terms, unweighted: (ce, kl_general, kl_clean).

  Args:
    logits_adv: (B, C) the fine-tuned model's logits on the adversarial images.
    logits_clean: (B, C) the fine-tuned model's logits on the clean images.
    logits_original_adv: (B, C) the frozen original model's logits on the
      *adversarial* images (PMG_AFT.py's `output_ori`).
    labels: (B,) int in [0, C).
    kl_reduction: 'sum' (the authors': summed over the batch, no 1/B) or
      'mean' (averaged over the batch, so the weights do not scale with B).
    axis_name: mesh axis inside shard_map: CE mean and KL sum/mean over every
      device's rows.

  Returns:
    ce = mean_b CE(logits_adv_b, y_b);
    kl_general = reduce_b KL(softmax(logits_original_adv_b) || softmax(logits_adv_b));
    kl_clean = reduce_b KL(softmax(logits_clean_b) || softmax(logits_adv_b));
    scalars float32.
  """
  _check_pmg_args(logits_adv, logits_clean, logits_original_adv, labels, kl_reduction)
  ce = losses.mean_cross_entropy(logits_adv, labels, ignore_index=None, axis_name=axis_name)

  def reduce(rows):
    total = jnp.sum(rows)
    if axis_name is not None:
      total = jax.lax.psum(total, axis_name)
    if kl_reduction == "sum":
      return total
    count = jnp.asarray(rows.shape[0], jnp.float32)
    return total / (jax.lax.psum(count, axis_name) if axis_name is not None else count)

  kl_general = reduce(kl_divergence(logits_original_adv, logits_adv))
  kl_clean = reduce(kl_divergence(logits_clean, logits_adv))
  return ce, kl_general, kl_clean


def pmg_aft_loss(logits_adv, logits_clean, logits_original_adv, labels, *,
                 general_weight=PMG_AFT_GENERAL_WEIGHT, clean_weight=PMG_AFT_CLEAN_WEIGHT,
                 kl_reduction="sum", axis_name=None):
  """PMG-AFT's loss: ce + general_weight * kl_general + clean_weight * kl_clean.

  See pmg_aft_terms for the arguments and the module docstring for the
  authors' code. Defaults are the authors': weights 1 and 1, KL summed over
  the batch.

  Returns:
    scalar float32.
  """
  general_weight = losses.check_weight("general_weight", general_weight)
  clean_weight = losses.check_weight("clean_weight", clean_weight)
  ce, kl_general, kl_clean = pmg_aft_terms(
      logits_adv, logits_clean, logits_original_adv, labels, kl_reduction=kl_reduction,
      axis_name=axis_name)
  return ce + general_weight * kl_general + clean_weight * kl_clean


# ----------------------------------------------------------------------------
# One training step's loss, attack included: what a trainer differentiates.
# ----------------------------------------------------------------------------


def fare_step_loss(embed_fn, params, original_params, images, *, key, eps,
                   steps=FARE_STEPS, step_size=FARE_STEP_SIZE, momentum=FARE_MOMENTUM,
                   keep_best=True, axis_name=None):
  """FARE's training loss for one batch, its attack included (no labels, no text).

      target = phi_0(x)                      (the frozen original, clean images)
      x_adv  = fare_attack(phi, x, target)   (a constant for the update)
      loss   = fare_loss(phi(x_adv), target)

  Args:
    embed_fn: (params, images (B, H, W, C') in [0, 1]) -> (B, D) projected,
      unnormalised image embeddings, e.g. `model.encode_images`.
    params: the params being trained; the loss is differentiable in them.
    original_params: the frozen original's params (never differentiated).
    images: (B, H, W, C') clean images in [0, 1].
    key, eps, steps, step_size, momentum, keep_best: see fare_attack.
    axis_name: mesh axis inside shard_map (the batch mean spans every device).

  Returns:
    scalar float32.
  """
  target = jax.lax.stop_gradient(embed_fn(original_params, images))
  frozen = jax.lax.stop_gradient(params)
  x_adv = jax.lax.stop_gradient(fare_attack(
      lambda x: embed_fn(frozen, x), images, target, key=key, eps=eps, steps=steps,
      step_size=step_size, momentum=momentum, keep_best=keep_best))
  return fare_loss(embed_fn(params, x_adv), target, axis_name=axis_name)


def pmg_aft_step_loss(logits_fn, params, original_params, images, labels, *, key,
                      eps=PMG_AFT_EPS, steps=PMG_AFT_STEPS, step_size=PMG_AFT_STEP_SIZE,
                      general_weight=PMG_AFT_GENERAL_WEIGHT,
                      clean_weight=PMG_AFT_CLEAN_WEIGHT, kl_reduction="sum",
                      axis_name=None):
  """PMG-AFT's training loss for one batch, its attack included.

      x_adv  = PGD-CE on the fine-tuned model (labels y; L-inf, random start)
      loss   = pmg_aft_loss(f(x_adv), f(x), f_0(x_adv), y)

  PMG_AFT.py's `attack_pgd`: uniform start in the ball, `steps` sign steps of
  `step_size`, cross-entropy of the fine-tuned model (their defaults: eps
  2/255, 5 steps of 1/255). prsl_jax.attacks.pgd returns the per-example best
  iterate, theirs the last.

  Args:
    logits_fn: (params, images) -> (B, C) zero-shot logits (the frozen class
      embeddings closed over; see the module docstring on their scale).
    params: the params being trained; original_params: the frozen original's.
    images: (B, H, W, C') clean images in [0, 1]; labels: (B,) int.
    key, eps, steps, step_size: the attack's.
    general_weight, clean_weight, kl_reduction, axis_name: see pmg_aft_loss.

  Returns:
    scalar float32.
  """
  frozen = jax.lax.stop_gradient(params)
  x_adv = jax.lax.stop_gradient(attacks.pgd(
      lambda x: logits_fn(frozen, x), images, labels, key=key, eps=eps, steps=steps,
      step_size=step_size, loss="ce"))
  logits_original_adv = jax.lax.stop_gradient(logits_fn(original_params, x_adv))
  return pmg_aft_loss(logits_fn(params, x_adv), logits_fn(params, images),
                      logits_original_adv, labels, general_weight=general_weight,
                      clean_weight=clean_weight, kl_reduction=kl_reduction,
                      axis_name=axis_name)
