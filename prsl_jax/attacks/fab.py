"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally
distorted adversarial examples with a fast adaptive boundary attack", ICML), as
AutoAttack's standard ensemble runs it (fab_base.py, fab_pt.py, fab_projections.py
of fra31/auto-attack), for L-inf and L2."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.attacks import core

# Random restarts start at this fraction of eps from the clean image (AutoAttack:
# 0.5 * min(best distance, eps), where the best distance is reset to 1e10 at the
# start of every run, so 0.5 * eps).
_FAB_START = 0.5
# Floor on the projection norms entering alpha (AutoAttack's 1e-8): at the
# boundary both are 0, and alpha = 0/0 would be NaN.
_FAB_NORM_MIN = 1e-8
# A coordinate whose gradient is at most this moves the linearised margin by
# nothing measurable: it stays fixed. It also keeps the L2 kink t_i / |w_i| finite
# in float32 (AutoAttack freezes |w_i| < 1e-8 for L2, w_i == 0 for L-inf).
_FAB_W_MIN = 1e-20


def _norm(d, norm):
  """(..., n) -> (...) L-inf or L2 norm over the last axis."""
  if norm == "linf":
    return jnp.max(jnp.abs(d), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))


def _solve_kinks(q, r, c):
  """Smallest lam >= 0 with h(lam) = sum_i q_i min(lam, r_i) = c, per row.

  q, r: (..., n) >= 0; c: (...) >= 0. h is concave, nondecreasing and piecewise
  linear with kinks at the r_i. Newton's method from lam = 0 stays left of the
  solution (a tangent of a concave h lies above it) and passes at least one
  kink per step, so it reaches the exact piece in finitely many steps:
  lam <- (c - sum_{r_i <= lam} q_i r_i) / sum_{r_i > lam} q_i, capped at max r.
  It stops when a step passes no new kink, at the latest after n + 1 steps: on
  the solution's piece, where it equals the closed form that sorting the kinks
  gives (AutoAttack's projections sort; equal up to float rounding). On FAB's
  projections of 3072 coordinates a few steps suffice, about 30 times faster
  than the sort (bench/RESULTS.md, issue 14). Where even h(inf) = sum q r < c,
  returns max r (every coordinate at its cap).
  """
  n = r.shape[-1]
  r_max = jnp.max(r, axis=-1)

  def kinks_below(lam):
    return r <= lam[..., None]

  def cond(s):
    i, _, done = s
    return (i <= n) & ~jnp.all(done)

  def body(s):
    i, lam, done = s
    below = kinks_below(lam)
    h = jnp.sum(jnp.where(below, q * r, q * lam[..., None]), axis=-1)
    slope = jnp.sum(jnp.where(below, 0.0, q), axis=-1)
    # No floor on the slope but zero: with L2's q = w^2 it can be 1e-14 and above.
    step = jnp.maximum(c - h, 0.0) / jnp.where(slope > 0, slope, 1.0)
    new = jnp.where(slope > 0, jnp.minimum(lam + step, r_max), r_max)
    passed = jnp.sum(kinks_below(new), axis=-1) != jnp.sum(below, axis=-1)
    return i + 1, jnp.where(done, lam, new), done | ~passed

  zero = jnp.zeros_like(c)
  _, lam, _ = jax.lax.while_loop(cond, body, (0, zero, zero > 0))
  return lam


def _project_hyperplane(t, w, c, norm):
  """Box-constrained projection of t onto the hyperplane {z : <w, z - t> = -c}.

  The minimum-norm d with <w, d> = -c and t + d in [0, 1]^n (the paper's
  projection, AutoAttack's projection_linf / projection_l2), per row; where the
  hyperplane misses the box, the point of the box closest to it (each coordinate
  at the bound that lowers <w, z> most).

  With c >= 0 (flip w otherwise), coordinate i may move by at most cap_i (to 0
  if w_i > 0, to 1 if w_i < 0) in the direction -sign(w_i). KKT:
    L2:    d_i = -w_i min(lam, cap_i / |w_i|),  sum_i w_i^2 min(lam, cap_i / |w_i|) = c;
    L-inf: d_i = -sign(w_i) min(lam, cap_i),    sum_i |w_i| min(lam, cap_i) = c,
  lam being the L-inf norm of d; both are `_solve_kinks`.

  Args:
    t: (..., n) points in [0, 1].
    w: (..., n) hyperplane normals.
    c: (...) <w, t> minus the offset: the (linearised) margin at t.
    norm: 'linf' or 'l2'.

  Returns:
    (..., n) float32 displacements d.
  """
  w = w * jnp.where(c < 0, -1.0, 1.0)[..., None]
  c = jnp.abs(c)
  cap = jnp.maximum(jnp.where(w > 0, t, 1.0 - t), 0.0)
  live = jnp.abs(w) > _FAB_W_MIN
  abs_w = jnp.where(live, jnp.abs(w), 1.0)
  if norm == "l2":
    r = jnp.where(live, cap / abs_w, 0.0)
    lam = _solve_kinks(jnp.where(live, jnp.square(w), 0.0), r, c)
    return -w * jnp.minimum(lam[..., None], r)
  r = jnp.where(live, cap, 0.0)
  lam = _solve_kinks(jnp.where(live, abs_w, 0.0), r, c)
  return -jnp.sign(w) * jnp.minimum(lam[..., None], r)


def _fab_single(grad_fn, predict, x0, labels, x_start, *, steps, norm, alpha_max, eta, beta,
                max_iterations=None):
  """One FAB run from x_start (AutoAttack's attack_single_run, targeted).

  Step: linearise g = z_t - z_y at x and project both x and the clean x0 onto
  {g = 0} within the box: d1, d0. With alpha = min(|d1| / (|d1| + |d0|),
  alpha_max), x <- clip((1 - alpha)(x + eta d1) + alpha (x0 + eta d0), 0, 1):
  a step to the boundary biased toward x0, overshooting by eta. If x is then
  misclassified it is recorded when closer to x0 than the best so far, and
  pulled back to x0 + beta (x - x0).

  Returns:
    (x, level, value): the closest misclassified iterate per example, level 1
    (0 and x0 if none), value = -distance to x0 (-inf if none).
  """
  b = x0.shape[0]
  flat = lambda v: v.reshape(b, -1)
  x0f = flat(x0)

  def body(_, s):
    x = s["x"]
    g, margin = grad_fn(x)
    w, xf = flat(g), flat(x)
    # The linearised margin at z is margin + <w, z - x>: its value at x and x0.
    c = jnp.stack([margin, margin + jnp.sum(w * (x0f - xf), axis=-1)])
    d = _project_hyperplane(jnp.stack([xf, x0f]), jnp.stack([w, w]), c, norm)
    a = jnp.maximum(_norm(d, norm), _FAB_NORM_MIN)
    alpha = jnp.clip(a[0] / (a[0] + a[1]), 0.0, alpha_max)[:, None]
    x_new = jnp.clip((1.0 - alpha) * (xf + eta * d[0]) + alpha * (x0f + eta * d[1]), 0.0, 1.0)
    dist = _norm(x_new - x0f, norm)
    x_new = x_new.reshape(x0.shape)
    adv = predict(x_new) != labels
    closer = adv & (dist < s["dist"])
    return dict(
        x=jnp.where(core.bcast(adv, x_new), x0 + beta * (x_new - x0), x_new),
        best=jnp.where(core.bcast(closer, x_new), x_new, s["best"]),
        dist=jnp.where(closer, dist, s["dist"]))

  init = dict(x=x_start, best=x0, dist=core.batch_zeros(x0) + jnp.inf)
  s = jax.lax.fori_loop(0, core.loop_bound(steps, max_iterations), body, init)
  found = jnp.isfinite(s["dist"])
  return s["best"], found.astype(jnp.int32), -s["dist"]


def _random_start(keys, x0, eps, norm):
  """x0 + 0.5 eps t / ||t|| clipped to [0, 1]; t uniform in [-1, 1] (L-inf) or Gaussian (L2)."""
  shape = x0.shape[1:]
  if norm == "linf":
    t = core.draw(core.uniform_pm1, keys, shape)
    t = t / jnp.maximum(jnp.max(jnp.abs(t), axis=core.sum_axes(t), keepdims=True), core.TINY)
  else:
    t = core.draw(core.normal, keys, shape)
    t = t / jnp.maximum(core.l2(t), core.TINY)
  return jnp.clip(x0 + _FAB_START * eps * t, 0.0, 1.0)


def _check_hyper(name, value, low, high=None, low_open=False):
  """A finite number in [low, high] ((low, ...] if low_open; no upper bound if
  high is None), checked when concrete."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number, got {value!r}")
  if not core.is_concrete(value):
    return
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number, got {value!r}") from None
  below = v <= low if low_open else v < low
  if v.shape != () or not np.isfinite(v) or below or (high is not None and v > high):
    interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
    raise ValueError(f"{name} must be a number in {interval}, got {name}={value!r}")


def fab_targeted(logits_fn, images, labels, *, key, eps, steps=100, norm="linf",
                 num_targets=9, restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                 target_labels=None, max_iterations=None):
  """FAB-T (Croce & Hein 2020) as in AutoAttack's standard version, L-inf / L2.

  FAB is a minimum-norm attack: it looks for the misclassified point closest to
  the clean image x0, without a budget. For each target t it repeats `steps`
  times (details in `_fab_single`): linearise the boundary z_t = z_y (y the true
  class) with the gradient of z_t - z_y at the iterate x; project x and x0 onto
  that hyperplane intersected with the [0, 1] box (exact minimum-norm
  projections, `_project_hyperplane`); step to a convex combination of the two
  projections, weighted toward x0 by alpha = min(|d_x| / (|d_x| + |d_x0|),
  alpha_max), extrapolated by eta; when the new point is misclassified, record
  it if it is the closest so far and step back toward x0 by beta. As in
  AutoAttack, success is any misclassification (argmax != y), not only reaching
  t: the target only picks the boundary that is linearised.

  Constants (AutoAttack's FAB-T in the standard version, autoattack.py /
  fab_base.py; the paper's defaults): steps 100, num_targets 9, restarts 1,
  alpha_max 0.1, eta 1.05, beta 0.9. Restart 0 starts at x0; restart r >= 1 at a
  random point at distance 0.5 * eps from x0 (AutoAttack: uniform in [-1, 1]^n
  scaled to L-inf norm, or Gaussian scaled to L2 norm; then clipped to [0, 1]),
  keyed fold_in(fold_in(key, j), r) for target j. With restarts=1 (the
  standard version) FAB-T is deterministic and the key is unused.

  Targets: the `num_targets` (capped at C-1) wrong classes with the largest
  clean logits, attacked in that order in a lax.scan, or `target_labels`.

  What is returned (AutoAttack's use of FAB-T: robust accuracy at budget eps):
  per example, over targets and restarts, the closest misclassified point found
  if its distance to x0 is <= eps, else the clean image x0. So every returned
  image is in the eps-ball and [0, 1], and an example is broken at eps exactly
  when FAB-T found a misclassified point within eps. A clean image that is
  already misclassified is its own closest point (distance 0) and is returned.
  AutoAttack stops attacking a point once an earlier target broke it; here
  every target runs on every point (static shapes) and the closest point wins,
  which breaks the same points.

  Cost per step: one forward and backward pass (gradient of z_t - z_y) and one
  forward pass (is the new point misclassified?), plus a sort of the H*W*C'
  coordinates of two points per example (the projections). Total:
  targets * restarts * steps steps. Compiled once whatever steps, restarts and
  targets (lax loops).

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C), C >= 2.
      Examples must not interact (no batch statistics).
    images: (B, H, W, C') float in [0, 1].
    labels: (B,) int true classes.
    key: a jax.random key, or B keys (one per example); used by restarts >= 1.
    eps: budget in [0, 1] pixel units, >= 0 (L-inf at most 1): the success
      radius and the radius of the random starts. May be traced.
    steps: static int >= 1, iterations per target and restart.
    max_iterations: optional int, possibly traced: stop each run after this many
      steps (core.loop_bound).
    norm: 'linf' or 'l2'; both the norm minimised and the ball.
    num_targets: static int >= 1 (AutoAttack: 9), capped at C-1.
    restarts: static int >= 1 (AutoAttack's FAB-T: 1), starts per target.
    alpha_max: in [0, 1], the largest weight of the step from x0.
    eta: > 0, extrapolation of the projection step (overshoot).
    beta: in (0, 1], backward step factor toward x0 after a success.
    target_labels: optional (B,) int targets, != labels; overrides num_targets.

  Returns:
    (B, H, W, C') float32 images: inside the eps-ball around `images` and in
    [0, 1]; misclassified where FAB-T found a misclassified point within eps,
    else the clean image.
  """
  core.check_common(images, labels, eps, norm)
  steps = core.check_int("steps", steps, minimum=1)
  restarts = core.check_int("restarts", restarts, minimum=1)
  num_targets = core.check_int("num_targets", num_targets, minimum=1)
  _check_hyper("alpha_max", alpha_max, 0.0, 1.0, low_open=False)
  _check_hyper("eta", eta, 0.0, low_open=True)
  _check_hyper("beta", beta, 0.0, 1.0, low_open=True)
  if labels.ndim != 1:
    raise ValueError(f"fab_targeted attacks classifiers: labels must be (B,), got shape "
                     f"{labels.shape}")
  num_classes = core.num_classes(logits_fn, images, labels)
  x0 = images.astype(jnp.float32)
  keys = core.example_keys(key, x0.shape[0])
  logits = lambda x: logits_fn(x).astype(jnp.float32)
  clean = jax.lax.stop_gradient(logits(x0))

  targets = core.targets(logits, x0, labels, num_targets=num_targets,
                         target_labels=target_labels)

  predict = lambda x: jnp.argmax(logits(x), axis=-1)
  pick = lambda z, k: jnp.take_along_axis(z, k[:, None], axis=-1)[:, 0]

  def per_target(best, xs):
    target, j = xs

    def margin(x):  # z_t - z_y per example; the sum's gradient is per example
      z = logits(x)
      m = pick(z, target) - pick(z, labels)
      return jnp.sum(m), m
    run = functools.partial(
        _fab_single, jax.grad(margin, has_aux=True), predict, x0, labels,
        steps=steps, norm=norm, alpha_max=alpha_max, eta=eta, beta=beta,
        max_iterations=max_iterations)
    keys_j = core.fold(keys, j)

    def per_restart(best, r):
      start = jnp.where(r > 0, _random_start(core.fold(keys_j, r), x0, eps, norm), x0)
      return core.merge(best, run(start)), None
    best, _ = jax.lax.scan(per_restart, best, jnp.arange(restarts))
    return best, None

  # A misclassified clean image is its own closest misclassified point.
  wrong = jnp.argmax(clean, axis=-1) != labels
  zero = core.batch_zeros(x0)
  best = (x0, wrong.astype(jnp.int32), jnp.where(wrong, zero, zero - jnp.inf))
  best, _ = jax.lax.scan(per_target, best, (targets.T, jnp.arange(targets.shape[1])))
  x_best, found, neg_dist = best
  broken = (found > 0) & (-neg_dist <= eps)
  # Within eps already up to the float32 distance; project clips the last ulps.
  x_adv = core.project(jnp.where(core.bcast(broken, x0), x_best, x0), x0, eps, norm)
  return core.finalize(x_adv, eps, labels, num_classes)
