"""Adversarial attacks on image classifiers: FGSM, PGD, APGD, APGD-T and Square.

Conventions shared by every attack (DESIGN.md section 2):

- `logits_fn(x) -> (B, C)` is any JAX function of images x (B, H, W, C') float32
  NHWC in [0, 1]; pixel normalisation belongs inside it, so budgets are in [0, 1]
  pixel units (eps = 4/255 means 4/255).
- Every attack returns float32 images inside the eps-ball around the input
  (L-inf or L2, over all of H, W, C' of one example) intersected with [0, 1], up
  to float32 rounding of x0 + delta (a few ulps).
- Logits are cast to float32 before the objective, so gradients are float32
  whatever the model's compute dtype.
- Every attack returns, per example, its best iterate: a misclassified iterate
  (target reached, for targeted PGD; for APGD-T reaching the target beats mere
  misclassification) beats a robust one; among equals the higher attack
  objective wins. The last iterate is never returned just for being last.
- Pure, with an explicit PRNG key. `key` is either one key, split here into one
  key per example, or a batch of B keys, one per example. With one key the draws
  depend on the batch (its size and an example's position in it); with
  per-example keys (e.g. fold_in(key, global_index)) they do not, so 1 device
  and N devices under jax.shard_map give the same adversarial images.
- Compiled once whatever `steps` / `queries` / `restarts` / number of targets:
  steps are a lax.fori_loop, restarts and APGD-T targets a lax.scan. `steps`,
  `restarts`, `queries`, `norm`, `loss` are static Python values (mark them
  static under jit); eps and step_size may be Python floats or traced scalars.
- Arguments are validated at trace time, before any compute, with errors naming
  the argument. Checks that need values (eps >= 0, images in [0, 1], labels in
  [0, C)) run with numpy only when the array is concrete; under jit/vmap/
  shard_map the values are tracers and those checks are skipped.

Attack objectives are "higher = stronger attack", per example (B,) float32:
cross-entropy, the CW margin max_{j != y} z_j - z_y, and DLR of Croce & Hein
(2020); `dlr_targeted_loss` is the targeted DLR of APGD-T. DLR needs C >= 3
(targeted DLR C >= 4): the objectives raise ValueError, the attacks warn and use
cross-entropy instead.
"""

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax import losses

LogitsFn = Callable[[jax.Array], jax.Array]

NORMS = ("linf", "l2")
_TINY = 1e-12

# APGD constants of Croce & Hein (2020), as in AutoAttack's autopgd_base.py.
_APGD_ALPHA = 0.75       # weight of the new step; 1 - alpha on the momentum
_APGD_RHO = 0.75         # halve when at most rho of the steps since the check increased f
_APGD_P1 = 0.22          # first checkpoint, as a fraction of steps
_APGD_DECR = 0.03        # each checkpoint interval shrinks by this ...
_APGD_MIN = 0.06         # ... down to this fraction of steps

# Square attack p schedule (Andriushchenko et al. 2020, official code): p_init is
# halved each time it = floor(i / queries * 10000) passes one of these bounds.
_SQUARE_P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SQUARE_TRIES = 8        # colour re-draws when a window would not change (see square)


# ----------------------------------------------------------------------------
# Objectives: (B, C) logits, (B,) labels -> (B,) float32, higher = stronger.
# ----------------------------------------------------------------------------


def _check_objective_args(logits, labels, min_classes, name, labels_name="labels"):
  if not hasattr(logits, "ndim") or logits.ndim != 2:
    raise ValueError(
        f"logits must have shape (B, C), got {getattr(logits, 'shape', None)}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"logits must be floating, got dtype {logits.dtype}")
  if not hasattr(labels, "ndim") or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"{labels_name} must have shape (B,) = {logits.shape[:1]}, got "
        f"{getattr(labels, 'shape', None)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{labels_name} must be integer, got dtype {labels.dtype}")
  if logits.shape[1] < min_classes:
    raise ValueError(
        f"{name} needs at least {min_classes} classes (its denominator uses the "
        f"{min_classes - 1 if min_classes == 3 else min_classes}"
        f"{'rd' if min_classes == 3 else 'th'} largest logit), got C={logits.shape[1]}")


def _pick(z, labels):
  """z[b, labels[b]] as (B,); NaN for labels outside [0, C), like losses.py."""
  num_classes = z.shape[-1]
  safe = jnp.clip(labels, 0, num_classes - 1)
  picked = jnp.take_along_axis(z, safe[:, None], axis=-1)[:, 0]
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, picked, jnp.nan)


def _max_other(z, labels):
  """max_{j != labels} z_j as (B,)."""
  mask = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, z), axis=-1)


def ce_objective(logits, labels):
  """Cross-entropy -log softmax(logits)[y], to maximise.

  Args:
    logits: (B, C) floating, any dtype (computed in float32).
    labels: (B,) integer in [0, C).

  Returns:
    (B,) float32; NaN where a label is out of range.
  """
  return losses.cross_entropy(logits, labels)


def cw_margin(logits, labels):
  """Carlini-Wagner margin max_{j != y} z_j - z_y, to maximise.

  Positive exactly when the example is misclassified (ties aside), so the best
  iterate by this objective is also the best by misclassification.

  Args:
    logits: (B, C) floating, C >= 2.
    labels: (B,) integer in [0, C).

  Returns:
    (B,) float32 in logit units; NaN where a label is out of range.
  """
  _check_objective_args(logits, labels, 2, "cw_margin")
  z = logits.astype(jnp.float32)
  return _max_other(z, labels) - _pick(z, labels)


def dlr_loss(logits, labels):
  """Difference of Logits Ratio of Croce & Hein (2020), to maximise.

  DLR = -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), with z_pi1 >= z_pi2
  >= ... the sorted logits. Invariant to shifts and positive rescalings of the
  logits, so a defence cannot hide behind a large or small logit scale.

  Args:
    logits: (B, C) floating, C >= 3.
    labels: (B,) integer in [0, C).

  Returns:
    (B,) float32, positive exactly when misclassified.

  Raises:
    ValueError: if C < 3 (z_pi3 does not exist).
  """
  _check_objective_args(logits, labels, 3, "dlr_loss")
  z = logits.astype(jnp.float32)
  top, _ = jax.lax.top_k(z, 3)
  return -(_pick(z, labels) - _max_other(z, labels)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, labels, targets):
  """Targeted DLR of APGD-T (Croce & Hein 2020), to maximise.

  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12): grows as the target
  logit overtakes the true one, scale-invariant like `dlr_loss`.

  Args:
    logits: (B, C) floating, C >= 4.
    labels: (B,) integer true classes in [0, C).
    targets: (B,) integer target classes in [0, C).

  Returns:
    (B,) float32.

  Raises:
    ValueError: if C < 4 (z_pi4 does not exist).
  """
  _check_objective_args(logits, labels, 4, "dlr_targeted_loss")
  _check_objective_args(logits, targets, 4, "dlr_targeted_loss", "targets")
  z = logits.astype(jnp.float32)
  top, _ = jax.lax.top_k(z, 4)
  denom = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
  return -(_pick(z, labels) - _pick(z, targets)) / denom


OBJECTIVES = {"ce": ce_objective, "cw": cw_margin, "dlr": dlr_loss}


# ----------------------------------------------------------------------------
# Validation (trace time).
# ----------------------------------------------------------------------------


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _check_eps(eps, name="eps"):
  if not _is_concrete(eps):
    return  # traced (e.g. eps passed as a jit argument): cannot look at it
  value = np.asarray(eps)
  if value.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {name}={eps!r}")


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{name} must be a Python int (it is static: it fixes a loop length), "
        f"got {name}={value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")


def _check_images_labels(images, labels):
  if not hasattr(images, "ndim") or images.ndim != 4:
    raise ValueError(
        f"images must be 4-D NHWC (B, H, W, C), got shape {getattr(images, 'shape', None)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating (float32 in [0, 1]), got dtype {images.dtype}")
  if not hasattr(labels, "ndim") or labels.shape != images.shape[:1]:
    raise ValueError(
        f"labels must have shape (B,) = {images.shape[:1]} to match images "
        f"{images.shape}, got {getattr(labels, 'shape', None)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
  if _is_concrete(images) and images.size:
    # Concrete only: this pulls the values to the host, impossible on tracers.
    x = np.asarray(images, dtype=np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
      raise ValueError(
          f"images must be finite and in [0, 1] (budgets are in [0, 1] pixel units; "
          f"normalise inside logits_fn), got range [{np.nanmin(x)}, {np.nanmax(x)}]")


def _check_class_indices(name, values, num_classes):
  if _is_concrete(values) and values.size:
    v = np.asarray(values)
    if v.min() < 0 or v.max() >= num_classes:
      raise ValueError(
          f"{name} must be in [0, C) = [0, {num_classes}), got range [{v.min()}, {v.max()}]")


def _num_classes(logits_fn, images, labels):
  """C from the abstract output of logits_fn; no FLOPs spent."""
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != images.shape[0]:
    raise ValueError(
        f"logits_fn must map images {images.shape} to logits (B, C) with "
        f"B={images.shape[0]}, got {getattr(out, 'shape', out)}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"logits_fn must return floating logits, got dtype {out.dtype}")
  num_classes = out.shape[1]
  if num_classes < 2:
    raise ValueError(f"logits_fn must return at least 2 classes, got C={num_classes}")
  _check_class_indices("labels", labels, num_classes)
  return num_classes


def _example_keys(key, batch):
  """One PRNG key per example: (B,) typed keys or (B, 2) raw uint32 keys."""
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed and key.dtype != jnp.uint32:
    raise TypeError(f"key must be a jax.random key, got dtype {key.dtype}")
  single_ndim = 0 if typed else 1
  if key.ndim == single_ndim:
    return jax.random.split(key, batch)
  if key.ndim == single_ndim + 1 and key.shape[0] == batch:
    return key
  raise ValueError(
      f"key must be one PRNG key or one per example ({batch} keys), got shape {key.shape}")


def _common_checks(images, labels, eps, norm):
  _check_images_labels(images, labels)
  _check_eps(eps)
  _check_choice("norm", norm, NORMS)


def _objective(loss, num_classes, targeted, attack):
  """obj(logits, labels) to maximise, after the DLR fallback for C < 3."""
  if loss == "dlr" and num_classes < 3:
    warnings.warn(
        f"{attack}: loss='dlr' needs at least 3 classes, got C={num_classes}; "
        "falling back to cross-entropy ('ce')", stacklevel=3)
    loss = "ce"
  base = OBJECTIVES[loss]
  if targeted:
    # labels are the targets: minimising the loss toward them = maximising -loss.
    return lambda logits, t: -base(logits, t)
  return base


def _success_fn(labels, targeted):
  """logits -> (B,) int32 success level: 1 if fooled (misclassified, or target
  reached when targeted), else 0. Compared before the objective (see _better)."""
  if targeted:
    return lambda logits: (jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
  return lambda logits: (jnp.argmax(logits, axis=-1) != labels).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Shared pieces.
# ----------------------------------------------------------------------------


def _sum_axes(x):
  return tuple(range(1, x.ndim))


def _bcast(v, x):
  """(B,) -> (B, 1, 1, 1) to broadcast against images x."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _l2(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=_sum_axes(x), keepdims=True))


def _project(x, x0, eps, norm):
  """Nearest point of the eps-ball around x0 (norm), then clip to [0, 1].

  Clipping after the L2 projection keeps the point in the ball: x0 is in
  [0, 1], so clipping only moves coordinates toward x0.
  """
  if norm == "linf":
    x = jnp.clip(x, x0 - eps, x0 + eps)
  else:
    delta = x - x0
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_l2(delta), _TINY))
    x = x0 + delta
  return jnp.clip(x, 0.0, 1.0)


def _direction(grad, norm):
  """Steepest ascent direction of unit norm (L-inf: sign; L2: grad / ||grad||)."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_l2(grad), _TINY)


def _value_and_grad(logits_fn, obj_fn, labels):
  """x -> (obj (B,), logits (B, C) float32, d sum(obj) / dx)."""
  def total(x):
    logits = logits_fn(x).astype(jnp.float32)
    obj = obj_fn(logits, labels)
    return jnp.sum(obj), (obj, logits)
  grad_fn = jax.value_and_grad(total, has_aux=True)

  def fn(x):
    (_, (obj, logits)), grad = grad_fn(x)
    return obj, logits, grad
  return fn


def _better(new, old):
  """(B,) mask: `new` = (x, level, obj) beats `old`: higher success level first,
  then higher objective; ties keep the old (earlier) one."""
  _, s_new, o_new = new
  _, s_old, o_old = old
  return (s_new > s_old) | ((s_new == s_old) & (o_new > o_old))


def _select(mask, new, old):
  return jax.tree.map(lambda n, o: jnp.where(_bcast(mask, n), n, o), new, old)


def _merge(old, new):
  return _select(_better(new, old), new, old)


def _batch_zeros(x0):
  """(B,) float32 zeros computed from x0, not created from scratch.

  Under jax.shard_map the images vary across devices, and so does every value a
  loop computes from them; a loop carry must start with the same "varying" type
  it ends with, which a fresh jnp.zeros does not have.
  """
  return x0[:, 0, 0, 0] * 0.0


def _empty_best(x0):
  zero = _batch_zeros(x0)
  return (x0, zero.astype(jnp.int32), zero - jnp.inf)


def _fold(keys, data):
  """fold_in per example: (B,) keys, scalar data -> (B,) keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def _draw(sample, keys, shape):
  """Per-example draws: sample(key, (n,)) per key, reshaped to (B,) + shape.

  Drawn flat because JAX's partitionable threefry compiles several times slower
  for a multi-dimensional shape than for the same number of values in 1-D.
  """
  n = int(np.prod(shape))
  return jax.vmap(lambda k: sample(k, (n,)))(keys).reshape((-1,) + tuple(shape))


def _uniform_pm1(key, shape):
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


def _normal(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def _best_of_restarts(run, keys, restarts, x0):
  """Per-example best of `run(keys_r)` over restarts r = 0..restarts-1.

  Restart r uses fold_in(keys, r), so restart 0 is the same whatever `restarts`
  is: more restarts can only add candidates, never weaken the result. A
  lax.scan (not vmap) keeps memory at one restart and compiles one body.
  """
  def body(best, r):
    return _merge(best, run(_fold(keys, r))), None
  best, _ = jax.lax.scan(body, _empty_best(x0), jnp.arange(restarts))
  return best


# ----------------------------------------------------------------------------
# FGSM and PGD.
# ----------------------------------------------------------------------------


def fgsm(logits_fn: LogitsFn, images, labels, *, eps, loss="ce", targeted=False):
  """Fast Gradient Sign Method (Goodfellow et al. 2015), L-inf.

  x_adv = clip(x + eps * sign(grad_x objective), 0, 1); per example the better of
  x_adv and x is returned (by misclassification, then objective), like every
  attack here returns its best iterate.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) int true classes, or target classes when targeted=True.
    eps: L-inf budget in [0, 1] pixel units, >= 0.
    loss: 'ce', 'cw' or 'dlr' (DLR needs C >= 3, else warns and uses 'ce').
    targeted: if True, step to decrease the loss toward `labels`.

  Returns:
    (B, H, W, C') float32 adversarial images, |x_adv - x|_inf <= eps, in [0, 1].
  """
  _common_checks(images, labels, eps, "linf")
  _check_choice("loss", loss, OBJECTIVES)
  obj_fn = _objective(loss, _num_classes(logits_fn, images, labels), targeted, "fgsm")
  success = _success_fn(labels, targeted)
  x0 = images.astype(jnp.float32)
  vg = _value_and_grad(logits_fn, obj_fn, labels)
  obj0, logits0, grad = vg(x0)
  x1 = _project(x0 + eps * jnp.sign(grad), x0, eps, "linf")
  logits1 = logits_fn(x1).astype(jnp.float32)
  clean = (x0, success(logits0), obj0)
  adv = (x1, success(logits1), obj_fn(logits1, labels))
  return _merge(clean, adv)[0]


def _random_start(keys, x0, eps, norm):
  """Uniform in the L-inf ball / uniform in the L2 ball, then clip to [0, 1]."""
  shape = x0.shape[1:]
  if norm == "linf":
    delta = eps * _draw(_uniform_pm1, keys, shape)
  else:
    # One draw of n + 1 normals per example (each random call site costs
    # compile time): n for the direction, one mapped to U(0, 1) for the radius.
    n = int(np.prod(shape))
    g = _draw(_normal, keys, (n + 1,))
    d = g[:, :n].reshape(x0.shape)
    # Radius eps * U^(1/n) makes the point uniform in the ball.
    r = jax.scipy.special.ndtr(g[:, n]) ** (1.0 / n)
    delta = eps * _bcast(r, x0) * d / jnp.maximum(_l2(d), _TINY)
  return _project(x0 + delta, x0, eps, norm)


def _pgd_single(logits_fn, vg, obj_fn, success, x0, labels, keys, *, eps, steps,
                step_size, norm, random_start):
  """One PGD run; returns the best iterate (x, success, obj) per example."""
  x = _random_start(keys, x0, eps, norm) if random_start else x0

  def body(_, carry):
    x, best = carry
    obj, logits, grad = vg(x)
    best = _merge(best, (x, success(logits), obj))
    x = _project(x + step_size * _direction(grad, norm), x0, eps, norm)
    return x, best

  x, best = jax.lax.fori_loop(0, steps, body, (x, _empty_best(x0)))
  # The last step's point has not been scored yet: one forward pass, no grad.
  logits = logits_fn(x).astype(jnp.float32)
  return _merge(best, (x, success(logits), obj_fn(logits, labels)))


def pgd(logits_fn: LogitsFn, images, labels, *, key, eps, steps, step_size=None,
        norm="linf", random_start=True, restarts=1, targeted=False, loss="ce"):
  """Projected Gradient Descent (Madry et al. 2018), L-inf or L2.

  Each step: x <- Proj_{ball ∩ [0,1]}(x + step_size * d), d = sign(g) (L-inf) or
  g / ||g||_2 (L2), g the gradient of the objective. Every iterate is scored and
  the per-example best is returned.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) int true classes, or target classes when targeted=True.
    key: a jax.random key, or B keys (one per example, see the module doc).
    eps: budget in [0, 1] pixel units (L-inf: per pixel; L2: per image), >= 0.
    steps: static int >= 1, gradient steps.
    step_size: step length in the same units as eps. Default 2.5 * eps / steps
      (Madry et al.): enough to cross the ball diameter from a random start and
      still leave room to wander along the boundary.
    norm: 'linf' or 'l2'.
    random_start: start uniformly in the ball (else at the clean image).
    restarts: static int >= 1; random restarts, restart r keyed by fold_in(key, r)
      and run sequentially (lax.scan). Per example the best result over restarts
      is kept (misclassified first, then highest objective). Only useful with
      random_start=True.
    targeted: if True, `labels` are target classes; the attack minimises the loss
      toward them (maximises -loss) and success means argmax == target.
    loss: 'ce', 'cw' (margin) or 'dlr' (C >= 3, else warns and uses 'ce');
      targeted 'cw'/'dlr' use the margin/DLR of the target class, negated.

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  _common_checks(images, labels, eps, norm)
  _check_int("steps", steps, 1)
  _check_int("restarts", restarts, 1)
  _check_choice("loss", loss, OBJECTIVES)
  if step_size is None:
    step_size = 2.5 * eps / steps
  else:
    _check_eps(step_size, "step_size")
  obj_fn = _objective(loss, _num_classes(logits_fn, images, labels), targeted, "pgd")
  success = _success_fn(labels, targeted)
  x0 = images.astype(jnp.float32)
  keys = _example_keys(key, x0.shape[0])
  vg = _value_and_grad(logits_fn, obj_fn, labels)
  run = functools.partial(
      _pgd_single, logits_fn, vg, obj_fn, success, x0, labels, eps=eps, steps=steps,
      step_size=step_size, norm=norm, random_start=random_start)
  return _best_of_restarts(run, keys, restarts, x0)[0]


# ----------------------------------------------------------------------------
# APGD and APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial
# robustness with an ensemble of diverse parameter-free attacks").
# ----------------------------------------------------------------------------


def _apgd_single(vg, success, x0, keys, *, eps, steps, norm):
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
    t = _draw(_uniform_pm1, keys, shape)
    t = t / (jnp.max(jnp.abs(t), axis=_sum_axes(t), keepdims=True) + _TINY)
  else:
    t = _draw(_normal, keys, shape)
    t = t / (_l2(t) + _TINY)
  x = _project(x0 + eps * t, x0, eps, norm)
  obj, logits, grad = vg(x)

  state = dict(
      x=x, x_old=x, grad=grad, obj=obj,
      x_max=x, grad_max=grad, obj_max=obj,
      step=_batch_zeros(x0) + 2.0 * eps,
      best=(x, success(logits), obj),
      n_up=_batch_zeros(x0).astype(jnp.int32),
      obj_max_at_check=obj,
      # AutoAttack starts this at ones so condition 2 cannot fire at w_1.
      halved_at_check=_batch_zeros(x0) == 0.0,
      since_check=jnp.zeros((), jnp.int32),
      period=jnp.full((), period0, jnp.int32))

  def body(i, s):
    x = s["x"]
    # No momentum on the very first step (there is no previous step yet).
    a = jnp.where(i > 0, _APGD_ALPHA, 1.0)
    z = _project(x + _bcast(s["step"], x) * _direction(s["grad"], norm), x0, eps, norm)
    x_new = _project(x + a * (z - x) + (1.0 - a) * (x - s["x_old"]), x0, eps, norm)
    obj, logits, grad = vg(x_new)
    best = _merge(s["best"], (x_new, success(logits), obj))

    n_up = s["n_up"] + (obj > s["obj"]).astype(jnp.int32)
    improved = obj > s["obj_max"]
    x_max, grad_max, obj_max = _select(
        improved, (x_new, grad, obj), (s["x_max"], s["grad_max"], s["obj_max"]))

    since = s["since_check"] + 1
    check = since == s["period"]
    oscillating = n_up.astype(jnp.float32) <= _APGD_RHO * s["period"].astype(jnp.float32)
    stalled = ~s["halved_at_check"] & (s["obj_max_at_check"] >= obj_max)
    halve = check & (oscillating | stalled)
    x_next, grad_next = _select(halve, (x_max, grad_max), (x_new, grad))
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

  return jax.lax.fori_loop(0, steps, body, state)["best"]


def apgd(logits_fn: LogitsFn, images, labels, *, key, eps, steps, norm="linf",
         loss="ce", restarts=1):
  """Auto-PGD (Croce & Hein 2020) exactly as AutoAttack's APGD-CE / APGD-DLR.

  Momentum alpha = 0.75, initial step 2 * eps, the checkpoint schedule and the
  two halving conditions of the paper (details in `_apgd_single`), restart from
  the best point on halving; returns the best iterate per example
  (misclassified first, then highest objective). steps + 1 gradient evaluations.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) int true classes.
    key: a jax.random key, or B keys (one per example).
    eps: budget in [0, 1] pixel units, >= 0.
    steps: static int >= 1, iterations.
    norm: 'linf' or 'l2'.
    loss: 'ce' or 'dlr' (also 'cw'); 'dlr' needs C >= 3, else warns, uses 'ce'.
    restarts: static int >= 1, random starts, restart r keyed by fold_in(key, r),
      run sequentially in a lax.scan, per-example best kept.

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  _common_checks(images, labels, eps, norm)
  _check_int("steps", steps, 1)
  _check_int("restarts", restarts, 1)
  _check_choice("loss", loss, OBJECTIVES)
  obj_fn = _objective(loss, _num_classes(logits_fn, images, labels), False, "apgd")
  success = _success_fn(labels, False)
  x0 = images.astype(jnp.float32)
  keys = _example_keys(key, x0.shape[0])
  vg = _value_and_grad(logits_fn, obj_fn, labels)
  run = functools.partial(_apgd_single, vg, success, x0, eps=eps, steps=steps, norm=norm)
  return _best_of_restarts(run, keys, restarts, x0)[0]


def apgd_targeted(logits_fn: LogitsFn, images, labels, *, key, eps, steps,
                  norm="linf", num_targets=9, restarts=1, target_labels=None):
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

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].

  With C < 4 the targeted DLR is undefined: warns and minimises the
  cross-entropy toward each target instead.
  """
  _common_checks(images, labels, eps, norm)
  _check_int("steps", steps, 1)
  _check_int("restarts", restarts, 1)
  _check_int("num_targets", num_targets, 1)
  num_classes = _num_classes(logits_fn, images, labels)
  x0 = images.astype(jnp.float32)
  keys = _example_keys(key, x0.shape[0])

  if target_labels is None:
    clean = jax.lax.stop_gradient(logits_fn(x0).astype(jnp.float32))
    masked = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, clean)
    _, targets = jax.lax.top_k(masked, min(num_targets, num_classes - 1))
  else:
    if not hasattr(target_labels, "ndim") or target_labels.shape != labels.shape:
      raise ValueError(
          f"target_labels must have shape (B,) = {labels.shape}, got "
          f"{getattr(target_labels, 'shape', None)}")
    if not jnp.issubdtype(target_labels.dtype, jnp.integer):
      raise TypeError(f"target_labels must be integer, got dtype {target_labels.dtype}")
    _check_class_indices("target_labels", target_labels, num_classes)
    if (_is_concrete(target_labels) and _is_concrete(labels)
        and np.any(np.asarray(target_labels) == np.asarray(labels))):
      raise ValueError("target_labels must differ from labels for every example")
    targets = target_labels[:, None]

  if num_classes < 4:
    warnings.warn(
        f"apgd_targeted: the targeted DLR loss needs at least 4 classes, got "
        f"C={num_classes}; falling back to cross-entropy toward the target",
        stacklevel=2)
    obj = lambda logits, t: -ce_objective(logits, t)
  else:
    obj = lambda logits, t: dlr_targeted_loss(logits, labels, t)

  def per_target(best, xs):
    target, j = xs
    vg = _value_and_grad(logits_fn, lambda logits, _: obj(logits, target), labels)

    def level(logits):  # 2: target reached, 1: misclassified, 0: robust
      pred = jnp.argmax(logits, axis=-1)
      return (pred != labels).astype(jnp.int32) + (pred == target).astype(jnp.int32)
    run = functools.partial(_apgd_single, vg, level, x0, eps=eps, steps=steps, norm=norm)
    return _merge(best, _best_of_restarts(run, _fold(keys, j), restarts, x0)), None

  best, _ = jax.lax.scan(
      per_target, _empty_best(x0), (targets.T, jnp.arange(targets.shape[1])))
  return best[0]


# ----------------------------------------------------------------------------
# Square attack (Andriushchenko et al. 2020), score-based.
# ----------------------------------------------------------------------------


def _square_p(p_init, i, queries):
  """The paper's piecewise-constant schedule of p, the fraction of pixels changed."""
  # Float, not i * 10000 // queries: that int32 product overflows past 214k queries.
  it = jnp.floor(i * (10000.0 / queries))
  halvings = jnp.sum(it > jnp.array(_SQUARE_P_BOUNDS, jnp.float32))
  return p_init * 2.0 ** (-halvings.astype(jnp.float32))


def _uniforms(keys, n):
  """(B, n) uniforms in [0, 1), one draw per example: all the randomness of a
  query comes from one call, which keeps the loop body (and its compile) small."""
  return _draw(functools.partial(jax.random.uniform, dtype=jnp.float32), keys, (n,))


def _window(u_row, u_col, size, height, width):
  """Random square of side `size` (traced) per example: (B, H, W, 1) bool.

  u_row, u_col: (B,) uniforms. Any position where the window fits (the official
  code's randint(0, h - s) never picks the last row/column; we do).
  """
  row = jnp.minimum(jnp.floor(u_row * (height - size + 1)).astype(jnp.int32), height - size)
  col = jnp.minimum(jnp.floor(u_col * (width - size + 1)).astype(jnp.int32), width - size)
  hh = jnp.arange(height)[None, :, None]
  ww = jnp.arange(width)[None, None, :]
  inside = ((hh >= row[:, None, None]) & (hh < row[:, None, None] + size)
            & (ww >= col[:, None, None]) & (ww < col[:, None, None] + size))
  return inside[..., None], row, col


def _signs(u):
  return jnp.where(u < 0.5, -1.0, 1.0)


def _square_linf_init(keys, x0, eps):
  # Vertical stripes: one +-eps per (column, channel); they work best (paper).
  _, _, width, chans = x0.shape
  signs = _signs(_uniforms(keys, width * chans)).reshape(-1, 1, width, chans)
  return jnp.clip(x0 + eps * signs, 0.0, 1.0)


def _square_linf_step(keys, x0, x_best, eps, size):
  """Set one random square window to a random +-eps colour per channel."""
  _, height, width, chans = x0.shape
  u = _uniforms(keys, 2 + _SQUARE_TRIES * chans)
  win, _, _ = _window(u[:, 0], u[:, 1], size, height, width)
  colours = _signs(u[:, 2:]).reshape(-1, _SQUARE_TRIES, chans)
  # The paper re-draws the colour while the window would not change (a wasted
  # query). Vectorised: draw a few colours, take the first that changes it.
  def unchanged(sign):
    same = jnp.abs(jnp.clip(x0 + sign * eps, 0.0, 1.0) - x_best) < 1e-7
    return jnp.all(jnp.where(win, same, True), axis=(1, 2))   # (B, C')
  same_up, same_down = unchanged(1.0), unchanged(-1.0)
  same = jnp.where(colours > 0, same_up[:, None], same_down[:, None]).all(-1)
  pick = jnp.argmax(~same, axis=1)
  colour = jnp.take_along_axis(colours, pick[:, None, None], axis=1)[:, 0]
  return jnp.where(win, jnp.clip(x0 + eps * colour[:, None, None, :], 0.0, 1.0), x_best)


def _to_sphere(x0, delta, eps):
  return jnp.clip(x0 + eps * delta / jnp.maximum(_l2(delta), _TINY), 0.0, 1.0)


def _square_l2_init(keys, x0, eps):
  # A grid of blocks of side ~H/5, each a random +-1 per channel (the paper puts
  # a pseudo-Gaussian bump in each block; we keep the flat block), scaled onto
  # the eps-sphere.
  _, height, width, chans = x0.shape
  side = max(min(height, width) // 5, 1)
  grid = (-(-height // side), -(-width // side))
  signs = _signs(_uniforms(keys, grid[0] * grid[1] * chans)).reshape((-1,) + grid + (chans,))
  delta = signs[:, np.arange(height) // side][:, :, np.arange(width) // side]
  return _to_sphere(x0, delta, eps)


def _square_l2_step(keys, x0, x_best, eps, size):
  """Move L2 mass from a random window 2 into a random window 1 (simplified).

  As the paper's L2 update: window 1 gets its old (normalised) content plus a
  zero-mean pattern with a random sign per channel, rescaled to hold the mass of
  windows 1 and 2 plus the unused budget; window 2 is zeroed; the whole
  perturbation is put back on the eps-sphere and clipped to [0, 1]. Simplified:
  the pattern is +1 on one half of the window and -1 on the other (split along
  a random axis) instead of the paper's pair of pseudo-Gaussian bumps.
  """
  _, height, width, chans = x0.shape
  u = _uniforms(keys, 5 + chans)
  win1, row, col = _window(u[:, 0], u[:, 1], size, height, width)
  win2, _, _ = _window(u[:, 2], u[:, 3], size, height, width)
  delta = x_best - x0

  def chan_norm(mask):  # (B, 1, 1, C') L2 norm of delta over a window, per channel
    return jnp.sqrt(jnp.sum(jnp.square(jnp.where(mask, delta, 0.0)), axis=(1, 2), keepdims=True))

  unused = jnp.maximum(eps ** 2 - jnp.square(_l2(delta)), 0.0) / chans
  target = jnp.sqrt(unused + jnp.square(chan_norm(win1 | win2)))

  rel_h = jnp.arange(height)[None, :, None] - row[:, None, None]
  rel_w = jnp.arange(width)[None, None, :] - col[:, None, None]
  by_rows = (u[:, 4] < 0.5)[:, None, None]
  first_half = jnp.where(by_rows, rel_h, rel_w) < size // 2
  pattern = jnp.where(first_half, 1.0, -1.0)[..., None] / size.astype(jnp.float32)
  signs = _signs(u[:, 5:])
  new = pattern * signs[:, None, None, :] + delta / (chan_norm(win1) + 1e-10)
  new = jnp.where(win1, new, 0.0)
  new = new / (jnp.sqrt(jnp.sum(jnp.square(new), axis=(1, 2), keepdims=True)) + _TINY) * target
  delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
  return _to_sphere(x0, delta, eps)


def square(logits_fn: LogitsFn, images, labels, *, key, eps, queries=5000, norm="linf",
           p_init=0.8):
  """Square Attack (Andriushchenko et al. 2020): random search on logits only.

  Minimises the margin z_y - max_{j != y} z_j (= -cw_margin) by random square
  updates, accepting a candidate only when it lowers the margin; an example
  stops changing once misclassified (as in the paper). One forward pass per
  query and no gradients, so it is blind to gradient masking.

  L-inf: the paper's algorithm (vertical-stripe init, one window per query set
  to a random +-eps colour per channel, re-drawn while it would not change the
  image). Window side s = round(sqrt(p * H * W)) clipped to [1, min(H, W) - 1],
  with p from the paper's schedule (p_init halved at 10, 50, 200, 500, 1000,
  2000, 4000, 6000, 8000 ten-thousandths of the queries).
  L2: simplified, see `_square_l2_step`; every candidate is x0 + eps * delta /
  ||delta||_2 clipped to [0, 1], so it is always in the ball.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1], H, W >= 2.
    labels: (B,) int true classes.
    key: a jax.random key, or B keys (one per example).
    eps: budget in [0, 1] pixel units, >= 0.
    queries: static int >= 1, forward passes per example (1 init + queries - 1).
    norm: 'linf' or 'l2'.
    p_init: initial fraction of pixels per window, in (0, 1].

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  _common_checks(images, labels, eps, norm)
  _check_int("queries", queries, 1)
  if not isinstance(p_init, (int, float, np.floating)) or not 0 < p_init <= 1:
    raise ValueError(f"p_init must be a number in (0, 1], got p_init={p_init!r}")
  _, height, width, _ = images.shape
  if min(height, width) < 2:
    raise ValueError(f"square needs images of at least 2x2 pixels, got H={height}, W={width}")
  _num_classes(logits_fn, images, labels)
  x0 = images.astype(jnp.float32)
  keys = _example_keys(key, x0.shape[0])

  def margin(x):
    return -cw_margin(logits_fn(x).astype(jnp.float32), labels)

  init, step = ((_square_linf_init, _square_linf_step) if norm == "linf"
                else (_square_l2_init, _square_l2_step))
  # The init draws from `keys`, query i from fold_in(keys, i).
  x_best = init(keys, x0, eps)
  m_best = margin(x_best)

  def body(i, carry):
    x_best, m_best = carry
    p = _square_p(p_init, i, queries)
    size = jnp.clip(jnp.round(jnp.sqrt(p * height * width)), 1, min(height, width) - 1)
    x_new = step(_fold(keys, i), x0, x_best, eps, size.astype(jnp.int32))
    m_new = margin(x_new)
    accept = (m_best > 0) & (m_new < m_best)
    return _select(accept, (x_new, m_new), (x_best, m_best))

  x_best, _ = jax.lax.fori_loop(0, queries - 1, body, (x_best, m_best))
  return x_best
