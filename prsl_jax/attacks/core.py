"""What every attack shares: argument checks, keys, the ball, and the best iterate.

This is the internal API the attack modules (pgd, apgd, square, fab) are built
on; it is stable within prsl_jax, not for users.

Candidates. An attack keeps, per example, its best candidate so far as a triple
(x, level, value): images x (B, H, W, C'), an int32 success level (B,) and a
float32 objective value (B,). `better(new, old)` prefers a higher level, then a
higher value; ties keep the old (earlier) one. Levels: 0 robust, 1 fooled
(misclassified, or for targeted attacks the target reached); APGD-T uses 2 for
"target reached" above 1 "misclassified". `merge` keeps the better per example,
`empty_best` is the starting point no candidate loses to, `best_of_restarts`
scans restarts with fold_in(key, r). Loop carries are built from the images
(`batch_zeros`) so they carry shard_map's varying type.

Values jit cannot check. Under jit, eps and labels are tracers: a negative or
NaN eps, or a label outside [0, C) (ignore_index aside), cannot raise; `finalize`
turns the returned images of the affected examples into NaN instead, so the
fault shows at the first finiteness check (evaluation's ball check, the
trainer's NaN guard) and never as a plausible result.
"""

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax import losses
from prsl_jax.attacks import objectives

NORMS = ("linf", "l2")
TINY = 1e-12

is_concrete = losses.is_concrete
check_int = losses.check_int


# ----------------------------------------------------------------------------
# Argument checks (trace time; values only when concrete).
# ----------------------------------------------------------------------------


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")


def check_eps(eps, norm="linf", name="eps", numel=None):
  """A finite budget >= 0 in [0, 1] pixel units; L-inf at most 1, L2 at most sqrt(numel)."""
  if isinstance(eps, bool):
    raise TypeError(f"{name} must be a number, got {eps!r}")
  if not is_concrete(eps):
    return  # traced: see `finalize`
  try:
    value = np.asarray(eps, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number, got {eps!r}") from None
  if value.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {name}={eps!r}")
  if norm == "linf" and value > 1:
    raise ValueError(f"{name}={eps!r} exceeds 1, the whole [0, 1] pixel range: budgets are in "
                     f"[0, 1] pixel units (4/255, not 4)")
  if norm == "l2" and numel is not None and value > np.sqrt(numel):
    raise ValueError(f"{name}={eps!r} exceeds sqrt({numel}), the L2 diameter of [0, 1] "
                     "images of this size: budgets are in [0, 1] pixel units")


def check_images(images, labels):
  """images (B, H, W, C') floating in [0, 1], B >= 1; labels with leading dim B."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"images must be 4-D NHWC (B, H, W, C), got shape {shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating (float32 in [0, 1]), got dtype {images.dtype}")
  if shape[0] == 0:
    raise ValueError("images is an empty batch (B=0); pass at least one image")
  lshape = getattr(labels, "shape", None)
  if lshape is None or len(lshape) < 1 or lshape[0] != shape[0]:
    raise ValueError(f"labels must have shape (B,) or (B, T) with B={shape[0]} to match images "
                     f"{tuple(shape)}, got {lshape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
  if is_concrete(images):
    # Concrete only: this pulls the values to the host, impossible on tracers.
    x = np.asarray(images, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
      raise ValueError(f"images must be finite: {int(bad.sum())} values are NaN or inf "
                       f"(first at index {np.argwhere(bad)[0].tolist()})")
    if x.min() < 0 or x.max() > 1:
      raise ValueError(f"images must be in [0, 1] (budgets are in [0, 1] pixel units; "
                       f"normalise inside logits_fn), got range [{x.min()}, {x.max()}]")


def num_classes(logits_fn, images, labels, *, labels_name="labels"):
  """C from the abstract output of logits_fn (no FLOPs); checks it against labels."""
  out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(images.shape, jnp.float32))
  shape = getattr(out, "shape", None)
  if shape is None or len(shape) < 2 or tuple(shape[:-1]) != tuple(labels.shape):
    raise ValueError(f"logits_fn must map images {tuple(images.shape)} to logits of shape "
                     f"{tuple(labels.shape)} + (C,) to match labels, got {shape}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"logits_fn must return floating logits, got dtype {out.dtype}")
  losses.check_logits_labels(out, labels, labels_name=labels_name)  # values when concrete
  return shape[-1]


def check_common(images, labels, eps, norm):
  check_images(images, labels)
  check_choice("norm", norm, NORMS)
  check_eps(eps, norm, numel=int(np.prod(images.shape[1:])))


def loop_bound(count, max_iterations, name="max_iterations"):
  """The trip count of an attack's loop: `count`, or at most `max_iterations`.

  max_iterations may be traced (a jit argument): the loop then ends early with
  the schedule (APGD's checkpoints, Square's p) still that of `count`. One
  compiled attack then serves a full run and a one-iteration check.
  """
  if max_iterations is None:
    return count
  if is_concrete(max_iterations):
    check_int(name, max_iterations, minimum=0)
  return jnp.minimum(jnp.asarray(max_iterations, jnp.int32), count)


def example_keys(key, batch):
  """One PRNG key per example: (B,) typed keys or (B, 2) raw uint32 keys."""
  if key is None:
    raise ValueError("key is required (a jax.random.key, or one per example)")
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


def success_fn(labels, targeted):
  """logits -> (B,) int32 level: 1 if fooled, else 0.

  Untargeted: some valid position's argmax differs from its label (for (B,)
  labels: misclassified). Targeted: every valid position's argmax is its
  target. Examples with no valid position are never fooled.
  """
  valid = labels != objectives.IGNORE_INDEX
  axes = tuple(range(1, labels.ndim))

  def level(logits):
    pred = jnp.argmax(logits, axis=-1)
    if targeted:
      hit = jnp.all((pred == labels) | ~valid, axis=axes) & jnp.any(valid, axis=axes)
    else:
      hit = jnp.any((pred != labels) & valid, axis=axes)
    return hit.astype(jnp.int32)
  return level


def top_wrong_classes(clean_logits, labels, k):
  """(B, k) the k most likely wrong classes of clean logits (B, C), most likely first.

  AutoAttack's target order for APGD-T and FAB-T (target 1 is the runner-up).
  """
  logits = jax.lax.stop_gradient(clean_logits.astype(jnp.float32))
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  _, top = jax.lax.top_k(jnp.where(true, -jnp.inf, logits), min(k, logits.shape[-1] - 1))
  return top


def targets(logits_fn, x0, labels, *, num_targets, target_labels=None):
  """(B, T) targets of a targeted attack: the top wrong classes of the clean
  logits, or the given target_labels (B,) as one target each (checked)."""
  if target_labels is None:
    return top_wrong_classes(logits_fn(x0), labels, num_targets)
  if not hasattr(target_labels, "ndim") or target_labels.shape != labels.shape:
    raise ValueError(f"target_labels must have shape (B,) = {labels.shape}, got "
                     f"{getattr(target_labels, 'shape', None)}")
  if not jnp.issubdtype(target_labels.dtype, jnp.integer):
    raise TypeError(f"target_labels must be integer, got dtype {target_labels.dtype}")
  num_classes(logits_fn, x0, target_labels, labels_name="target_labels")
  if (is_concrete(target_labels) and is_concrete(labels)
      and np.any(np.asarray(target_labels) == np.asarray(labels))):
    raise ValueError("target_labels must differ from labels for every example")
  return target_labels[:, None]


def finalize(x_adv, eps, labels, num_classes_):
  """NaN images for examples whose eps or labels were invalid (traced values)."""
  bad = jnp.zeros(x_adv.shape[:1], bool)
  if not is_concrete(eps):
    bad = bad | ~(jnp.asarray(eps) >= 0)
  if not is_concrete(labels):
    wrong = ((labels < 0) | (labels >= num_classes_)) & (labels != objectives.IGNORE_INDEX)
    bad = bad | jnp.any(wrong.reshape(labels.shape[0], -1), axis=1)
  if not is_concrete(eps) or not is_concrete(labels):
    return jnp.where(bcast(bad, x_adv), jnp.nan, x_adv)
  return x_adv


# ----------------------------------------------------------------------------
# The ball.
# ----------------------------------------------------------------------------


def sum_axes(x):
  return tuple(range(1, x.ndim))


def bcast(v, x):
  """(B,) -> (B, 1, 1, 1) to broadcast against images x."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def l2(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=sum_axes(x), keepdims=True))


def project(x, x0, eps, norm):
  """Nearest point of the eps-ball around x0 (norm), then clip to [0, 1].

  Clipping after the L2 projection keeps the point in the ball: x0 is in
  [0, 1], so clipping only moves coordinates toward x0.
  """
  if norm == "linf":
    x = jnp.clip(x, x0 - eps, x0 + eps)
  else:
    delta = x - x0
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(l2(delta), TINY))
    x = x0 + delta
  return jnp.clip(x, 0.0, 1.0)


def direction(grad, norm):
  """Steepest ascent direction of unit norm (L-inf: sign; L2: grad / ||grad||)."""
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(l2(grad), TINY)


def value_and_grad(logits_fn, objective, labels):
  """x -> (values (B,), logits float32, d total / dx) for an objectives.Objective."""
  def total(x):
    logits = logits_fn(x).astype(jnp.float32)
    return objective.total(logits, labels), (objective.values(logits, labels), logits)
  grad_fn = jax.value_and_grad(total, has_aux=True)

  def fn(x):
    (_, (values, logits)), grad = grad_fn(x)
    return values, logits, grad
  return fn


# ----------------------------------------------------------------------------
# Best iterate.
# ----------------------------------------------------------------------------


def better(new, old):
  """(B,) mask: candidate `new` beats `old` (higher level, then higher value)."""
  _, s_new, o_new = new
  _, s_old, o_old = old
  return (s_new > s_old) | ((s_new == s_old) & (o_new > o_old))


def select(mask, new, old):
  return jax.tree.map(lambda n, o: jnp.where(bcast(mask, n), n, o), new, old)


def merge(old, new):
  return select(better(new, old), new, old)


def batch_zeros(x0):
  """(B,) float32 zeros computed from x0, not created from scratch.

  Under jax.shard_map the images vary across devices, and so does every value a
  loop computes from them; a loop carry must start with the same "varying" type
  it ends with, which a fresh jnp.zeros does not have.
  """
  return x0[:, 0, 0, 0] * 0.0


def empty_best(x0):
  zero = batch_zeros(x0)
  return (x0, zero.astype(jnp.int32), zero - jnp.inf)


def fold(keys, data):
  """fold_in per example: (B,) keys, scalar data -> (B,) keys."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def draw(sample, keys, shape):
  """Per-example draws: sample(key, (n,)) per key, reshaped to (B,) + shape.

  Drawn flat because JAX's partitionable threefry compiles several times slower
  for a multi-dimensional shape than for the same number of values in 1-D.
  """
  n = int(np.prod(shape))
  return jax.vmap(lambda k: sample(k, (n,)))(keys).reshape((-1,) + tuple(shape))


def uniform_pm1(key, shape):
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


def normal(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


def best_of_restarts(run, keys, restarts, x0):
  """Per-example best of `run(keys_r)` over restarts r = 0..restarts-1.

  Restart r uses fold_in(keys, r), so restart 0 is the same whatever `restarts`
  is: more restarts can only add candidates, never weaken the result. A
  lax.scan (not vmap) keeps memory at one restart and compiles one body.
  """
  def body(best, r):
    return merge(best, run(fold(keys, r))), None
  best, _ = jax.lax.scan(body, empty_best(x0), jnp.arange(restarts))
  return best

