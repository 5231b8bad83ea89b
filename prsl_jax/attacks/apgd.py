"""Auto-PGD and its targeted version (Croce & Hein 2020, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks"),
step for step as AutoAttack's APGD-CE / APGD-DLR / APGD-T."""

import functools
import warnings

import jax
import jax.numpy as jnp

from prsl_jax.attacks import core
from prsl_jax.attacks import objectives

# APGD constants of Croce & Hein (2020), as in AutoAttack's autopgd_base.py.
_APGD_ALPHA = 0.75       # weight of the new step; 1 - alpha on the momentum
_APGD_RHO = 0.75         # halve when at most rho of the steps since the check increased f
_APGD_P1 = 0.22          # first checkpoint, as a fraction of steps
_APGD_DECR = 0.03        # each checkpoint interval shrinks by this ...
_APGD_MIN = 0.06         # ... down to this fraction of steps


def _apgd_single(vg, success, x0, keys, *, eps, steps, norm, max_iterations=None):
  """One APGD run (AutoAttack's attack_single_run); best (x, success, obj).

  Step size starts at 2 * eps per example and is halved at checkpoints
  w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
  max(p_j - p_{j-1} - 0.03, 0.06) (AutoAttack's integer form: the interval starts
  at int(0.22 steps) and shrinks by int(0.03 steps) down to int(0.06 steps)), when
  1. at most rho = 0.75 of the steps since the last checkpoint increased f
     (AutoAttack's `<=`; the paper writes `<`), or
  2. the step size was not halved at the last checkpoint and the best f has not
     improved since.
  On halving the iterate (and its gradient) restarts from the best point so far.
  Difference from AutoAttack's code: the first step of the first interval is
  compared with f at the start point (the paper's definition); AutoAttack's
  loss history compares it with an unfilled row of zeros.
  """
  period0 = max(int(_APGD_P1 * steps), 1)
  decr = max(int(_APGD_DECR * steps), 1)
  period_min = max(int(_APGD_MIN * steps), 1)
  shape = x0.shape[1:]

  # AutoAttack's start: a random point on the ball's boundary (L-inf: max |t| = 1).
  if norm == "linf":
    t = core.draw(core.uniform_pm1, keys, shape)
    t = t / (jnp.max(jnp.abs(t), axis=core.sum_axes(t), keepdims=True) + core.TINY)
  else:
    t = core.draw(core.normal, keys, shape)
    t = t / (core.l2(t) + core.TINY)
  x = core.project(x0 + eps * t, x0, eps, norm)
  obj, logits, grad = vg(x)

  state = dict(
      x=x, x_old=x, grad=grad, obj=obj,
      x_max=x, grad_max=grad, obj_max=obj,
      step=core.batch_zeros(x0) + 2.0 * eps,
      best=(x, success(logits), obj),
      n_up=core.batch_zeros(x0).astype(jnp.int32),
      obj_max_at_check=obj,
      # AutoAttack starts this at ones so condition 2 cannot fire at w_1.
      halved_at_check=core.batch_zeros(x0) == 0.0,
      since_check=jnp.zeros((), jnp.int32),
      period=jnp.full((), period0, jnp.int32))

  def body(i, s):
    x = s["x"]
    # No momentum on the very first step (there is no previous step yet).
    a = jnp.where(i > 0, _APGD_ALPHA, 1.0)
    z = core.project(x + core.bcast(s["step"], x) * core.direction(s["grad"], norm), x0, eps, norm)
    x_new = core.project(x + a * (z - x) + (1.0 - a) * (x - s["x_old"]), x0, eps, norm)
    obj, logits, grad = vg(x_new)
    best = core.merge(s["best"], (x_new, success(logits), obj))

    n_up = s["n_up"] + (obj > s["obj"]).astype(jnp.int32)
    improved = obj > s["obj_max"]
    x_max, grad_max, obj_max = core.select(
        improved, (x_new, grad, obj), (s["x_max"], s["grad_max"], s["obj_max"]))

    since = s["since_check"] + 1
    check = since == s["period"]
    oscillating = n_up.astype(jnp.float32) <= _APGD_RHO * s["period"].astype(jnp.float32)
    stalled = ~s["halved_at_check"] & (s["obj_max_at_check"] >= obj_max)
    halve = check & (oscillating | stalled)
    x_next, grad_next = core.select(halve, (x_max, grad_max), (x_new, grad))
    return dict(
        x=x_next, x_old=x, grad=grad_next,
        # AutoAttack's loss history keeps f at the stepped point, even on restart.
        obj=obj,
        x_max=x_max, grad_max=grad_max, obj_max=obj_max,
        step=jnp.where(halve, 0.5 * s["step"], s["step"]),
        best=best,
        n_up=jnp.where(check, 0, n_up),
        obj_max_at_check=jnp.where(check, obj_max, s["obj_max_at_check"]),
        halved_at_check=jnp.where(check, oscillating | stalled, s["halved_at_check"]),
        since_check=jnp.where(check, 0, since),
        period=jnp.where(check, jnp.maximum(s["period"] - decr, period_min), s["period"]))

  return jax.lax.fori_loop(0, core.loop_bound(steps, max_iterations), body, state)["best"]


def apgd(logits_fn, images, labels, *, key, eps, steps, norm="linf",
         loss="ce", restarts=1, targeted=False, max_iterations=None):
  """Auto-PGD (Croce & Hein 2020) exactly as AutoAttack's APGD-CE / APGD-DLR.

  Momentum alpha = 0.75, initial step 2 * eps, the checkpoint schedule and the
  two halving conditions of the paper (details in `_apgd_single`), restart from
  the best point on halving; returns the best iterate per example
  (misclassified first, then highest objective). steps + 1 gradient evaluations.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C), or token
      logits (B, T, V) teacher-forced on a caption.
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) or (B, T) int true classes/tokens (IGNORE_INDEX masks a position).
    key: a jax.random key, or B keys (one per example).
    eps: budget in [0, 1] pixel units, >= 0.
    steps: static int >= 1, iterations.
    norm: 'linf' or 'l2'.
    loss: 'ce' or 'dlr' (also 'cw', or a loss of prsl_jax.losses); 'dlr' needs
      classifier logits with C >= 3, else warns, uses 'ce'.
    restarts: static int >= 1, random starts, restart r keyed by fold_in(key, r),
      run sequentially in a lax.scan, per-example best kept.
    targeted: `labels` are targets: minimise the loss toward them (e.g. a
      target caption's tokens); success means reaching them. For classifiers
      AutoAttack's targeted APGD is `apgd_targeted`.
    max_iterations: optional int, possibly traced: stop after this many steps,
      the schedule still that of `steps` (core.loop_bound).

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  core.check_common(images, labels, eps, norm)
  steps = core.check_int("steps", steps, minimum=1)
  restarts = core.check_int("restarts", restarts, minimum=1)
  num_classes = core.num_classes(logits_fn, images, labels)
  obj = objectives.make_objective(loss, labels=labels, num_classes=num_classes,
                                  targeted=targeted, attack="apgd")
  success = core.success_fn(labels, targeted)
  x0 = images.astype(jnp.float32)
  keys = core.example_keys(key, x0.shape[0])
  vg = core.value_and_grad(logits_fn, obj, labels)
  run = functools.partial(_apgd_single, vg, success, x0, eps=eps, steps=steps, norm=norm,
                          max_iterations=max_iterations)
  x_adv = core.best_of_restarts(run, keys, restarts, x0)[0]
  return core.finalize(x_adv, eps, labels, num_classes)


def apgd_targeted(logits_fn, images, labels, *, key, eps, steps,
                  norm="linf", num_targets=9, restarts=1, target_labels=None,
                  max_iterations=None):
  """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, several targets.

  Targets are the `num_targets` (capped at C-1) wrong classes with the largest
  clean logits, attacked in that order (a lax.scan over targets, restarts inside
  each), target j with keys fold_in(key, j). With `target_labels` given, only
  those targets are attacked.

  Which iterate is returned, per example, over steps, restarts and targets:
  one that reaches its target beats one that is only misclassified (to another
  class), which beats one still correctly classified; ties go to the higher
  targeted-DLR objective. So, as in AutoAttack, a point counts as broken as
  soon as any iterate is misclassified, and a caller who asked for specific
  targets gets the target whenever an iterate reached it. (The targeted DLR is
  not always largest with the target on top, so "highest objective" alone
  would not guarantee that.)

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) int true classes.
    key: a jax.random key, or B keys (one per example).
    eps: budget in [0, 1] pixel units, >= 0.
    steps: static int >= 1, iterations per target and restart.
    norm: 'linf' or 'l2'.
    num_targets: static int >= 1 (AutoAttack: 9), capped at C-1.
    restarts: static int >= 1, random starts per target.
    target_labels: optional (B,) int targets, != labels; overrides num_targets.
    max_iterations: optional int, possibly traced: stop each run after this many
      steps (core.loop_bound).

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].

  With C < 4 the targeted DLR is undefined: warns and minimises the
  cross-entropy toward each target instead.
  """
  core.check_common(images, labels, eps, norm)
  steps = core.check_int("steps", steps, minimum=1)
  restarts = core.check_int("restarts", restarts, minimum=1)
  num_targets = core.check_int("num_targets", num_targets, minimum=1)
  if labels.ndim != 1:
    raise ValueError(f"apgd_targeted attacks classifiers: labels must be (B,), got shape "
                     f"{labels.shape}")
  num_classes = core.num_classes(logits_fn, images, labels)
  x0 = images.astype(jnp.float32)
  keys = core.example_keys(key, x0.shape[0])

  targets = core.targets(logits_fn, x0, labels, num_targets=num_targets,
                         target_labels=target_labels)

  if num_classes < 4:
    warnings.warn(
        f"apgd_targeted: the targeted DLR loss needs at least 4 classes, got "
        f"C={num_classes}; falling back to cross-entropy toward the target",
        stacklevel=2)
    value = lambda logits, t: -objectives.ce_objective(logits, t)
  else:
    value = lambda logits, t: objectives.dlr_targeted_loss(logits, labels, t)

  def per_target(best, xs):
    target, j = xs
    values = lambda logits, _: value(logits, target)
    obj = objectives.Objective(values, lambda logits, y: jnp.sum(values(logits, y)))
    vg = core.value_and_grad(logits_fn, obj, labels)

    def level(logits):  # 2: target reached, 1: misclassified, 0: robust
      pred = jnp.argmax(logits, axis=-1)
      return (pred != labels).astype(jnp.int32) + (pred == target).astype(jnp.int32)
    run = functools.partial(_apgd_single, vg, level, x0, eps=eps, steps=steps, norm=norm,
                            max_iterations=max_iterations)
    return core.merge(best, core.best_of_restarts(run, core.fold(keys, j), restarts, x0)), None

  best, _ = jax.lax.scan(
      per_target, core.empty_best(x0), (targets.T, jnp.arange(targets.shape[1])))
  return core.finalize(best[0], eps, labels, num_classes)
