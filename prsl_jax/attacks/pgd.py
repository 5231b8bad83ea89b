"""Gradient-sign and projected-gradient attacks: FGSM, PGD, and the paper's BIM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.attacks import core
from prsl_jax.attacks import objectives


def fgsm(logits_fn, images, labels, *, eps, loss="ce", targeted=False):
  """Fast Gradient Sign Method (Goodfellow et al. 2015), L-inf.

  x_adv = clip(x + eps * sign(grad_x objective), 0, 1); per example the better of
  x_adv and x is returned (by success, then objective), like every attack here
  returns its best iterate.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C) or (B, T, V).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) or (B, T) int true classes (targets when targeted).
    eps: L-inf budget in [0, 1] pixel units, >= 0.
    loss: 'ce', 'cw', 'dlr', or a loss of prsl_jax.losses (see objectives).
    targeted: if True, step to decrease the loss toward `labels`.

  Returns:
    (B, H, W, C') float32 adversarial images, |x_adv - x|_inf <= eps, in [0, 1].
  """
  core.check_common(images, labels, eps, "linf")
  num_classes = core.num_classes(logits_fn, images, labels)
  obj = objectives.make_objective(loss, labels=labels, num_classes=num_classes,
                                  targeted=targeted, attack="fgsm")
  success = core.success_fn(labels, targeted)
  x0 = images.astype(jnp.float32)
  vg = core.value_and_grad(logits_fn, obj, labels)
  value0, logits0, grad = vg(x0)
  x1 = core.project(x0 + eps * jnp.sign(grad), x0, eps, "linf")
  logits1 = logits_fn(x1).astype(jnp.float32)
  clean = (x0, success(logits0), value0)
  adv = (x1, success(logits1), obj.values(logits1, labels))
  return core.finalize(core.merge(clean, adv)[0], eps, labels, num_classes)


def _random_start(keys, x0, eps, norm):
  """Uniform in the L-inf ball / uniform in the L2 ball, then clip to [0, 1]."""
  shape = x0.shape[1:]
  if norm == "linf":
    delta = eps * core.draw(core.uniform_pm1, keys, shape)
  else:
    # One draw of n + 1 normals per example (each random call site costs
    # compile time): n for the direction, one mapped to U(0, 1) for the radius.
    n = int(np.prod(shape))
    g = core.draw(core.normal, keys, (n + 1,))
    d = g[:, :n].reshape(x0.shape)
    # Radius eps * U^(1/n) makes the point uniform in the ball.
    r = jax.scipy.special.ndtr(g[:, n]) ** (1.0 / n)
    delta = eps * core.bcast(r, x0) * d / jnp.maximum(core.l2(d), core.TINY)
  return core.project(x0 + delta, x0, eps, norm)


def _pgd_single(logits_fn, vg, obj, success, x0, labels, keys, *, eps, steps,
                step_size, norm, random_start, max_iterations=None):
  """One PGD run; returns the best iterate (x, level, value) per example."""
  x = _random_start(keys, x0, eps, norm) if random_start else x0

  def body(_, carry):
    x, best = carry
    value, logits, grad = vg(x)
    best = core.merge(best, (x, success(logits), value))
    x = core.project(x + step_size * core.direction(grad, norm), x0, eps, norm)
    return x, best

  x, best = jax.lax.fori_loop(0, core.loop_bound(steps, max_iterations), body,
                              (x, core.empty_best(x0)))
  # The last step's point has not been scored yet: one forward pass, no grad.
  logits = logits_fn(x).astype(jnp.float32)
  return core.merge(best, (x, success(logits), obj.values(logits, labels)))


def pgd(logits_fn, images, labels, *, key, eps, steps, step_size=None, norm="linf",
        random_start=True, restarts=1, targeted=False, loss="ce", max_iterations=None):
  """Projected Gradient Descent (Madry et al. 2018), L-inf or L2.

  Each step: x <- Proj_{ball ∩ [0,1]}(x + step_size * d), d = sign(g) (L-inf) or
  g / ||g||_2 (L2), g the gradient of the objective. Every iterate is scored and
  the per-example best is returned.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C), or token
      logits (B, T, V) teacher-forced on a caption.
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) or (B, T) int true classes/tokens (targets when targeted);
      IGNORE_INDEX (-100) masks a position.
    key: a jax.random key, or B keys (one per example, see attacks/__init__);
      may be None when random_start=False and restarts=1 (nothing is drawn).
    eps: budget in [0, 1] pixel units (L-inf: per pixel; L2: per image), >= 0.
    steps: static int >= 1, gradient steps.
    step_size: step length in the same units as eps. Default 2.5 * eps / steps
      (Madry et al.): enough to cross the ball diameter from a random start and
      still leave room to wander along the boundary.
    norm: 'linf' or 'l2'.
    random_start: start uniformly in the ball (else at the clean image).
    restarts: static int >= 1; restart r keyed by fold_in(key, r), run
      sequentially (lax.scan), per-example best kept. Needs random_start.
    targeted: if True, `labels` are targets; the attack minimises the loss
      toward them (maximises -loss) and success means reaching them.
    loss: 'ce', 'cw' (margin), 'dlr' (C >= 3, else warns and uses 'ce'), or a
      loss of prsl_jax.losses (a batch loss such as PRSL is differentiated as
      the scalar it is; see attacks.objectives).
    max_iterations: optional int, possibly traced: stop after this many steps
      (the default step size still follows `steps`); see core.loop_bound.

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  core.check_common(images, labels, eps, norm)
  steps = core.check_int("steps", steps, minimum=1)
  restarts = core.check_int("restarts", restarts, minimum=1)
  if step_size is None:
    step_size = 2.5 * eps / steps
  else:
    core.check_eps(step_size, norm, "step_size")
  num_classes = core.num_classes(logits_fn, images, labels)
  obj = objectives.make_objective(loss, labels=labels, num_classes=num_classes,
                                  targeted=targeted, attack="pgd")
  success = core.success_fn(labels, targeted)
  x0 = images.astype(jnp.float32)
  vg = core.value_and_grad(logits_fn, obj, labels)
  run = functools.partial(
      _pgd_single, logits_fn, vg, obj, success, x0, labels, eps=eps, steps=steps,
      step_size=step_size, norm=norm, random_start=random_start,
      max_iterations=max_iterations)
  if key is None and not random_start and restarts == 1:
    x_adv = run(None)[0]  # deterministic: nothing to draw
  else:
    x_adv = core.best_of_restarts(run, core.example_keys(key, x0.shape[0]), restarts, x0)[0]
  return core.finalize(x_adv, eps, labels, num_classes)


def bim(logits_fn, images, labels, *, eps, steps=10, step_size=None, loss="ce",
        targeted=False, max_iterations=None):
  """The paper's attack: BIM (Kurakin et al. 2017), sign steps from the clean image.

  arXiv:2402.03627 attacks with 10 iterative sign-gradient steps, no random
  start, through the model's own training loss (a PRSL model through PRSL on
  the attacked batch), with the model's clean output as the label
  (karlieswift/Mattack, vitgpt2/adv_vitgpt2.py). This is PGD L-inf with
  random_start=False and that loss; it returns the best iterate per example, as
  every attack here does (the authors keep the last).

  Their step 0.02 and bound 1 are in the image processor's normalised units
  (mean 0.5, std 0.5 for nlpconnect/vit-gpt2): 0.01 and 0.5 in [0, 1] pixels,
  a practically unbounded budget. Here eps is a [0, 1] pixel budget like every
  other attack's, and the default step is 2.5 * eps / steps.

  Args:
    logits_fn: images -> logits (B, C) or token logits (B, T, V).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) or (B, T) int, the model's clean prediction or caption.
    eps: L-inf budget in [0, 1] pixel units.
    steps: static int >= 1 (the paper: 10).
    step_size: per-step change; default 2.5 * eps / steps.
    loss: the model's training loss: a name in objectives.OBJECTIVES or a loss
      of prsl_jax.losses, e.g. losses.get_loss('prsl', start=0, end=4, weight=b).
    targeted: lower the loss toward `labels` instead.

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  return pgd(logits_fn, images, labels, key=None, eps=eps, steps=steps, step_size=step_size,
             norm="linf", random_start=False, restarts=1, targeted=targeted, loss=loss,
             max_iterations=max_iterations)
