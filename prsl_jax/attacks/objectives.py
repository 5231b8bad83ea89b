"""Attack objectives: logits and labels -> one value per example, higher = stronger.

Shapes. logits (B, C) with labels (B,), or token logits (B, T, V) with labels
(B, T) (a caption teacher-forced through a captioner); labels may hold
IGNORE_INDEX (-100) for masked positions (padding). A sequence example's value
is the mean over its unmasked positions; an example with no unmasked position
scores 0 and is never counted as fooled.

  ce_objective        cross-entropy, per example
  cw_margin           max_{j != y} z_j - z_y (positive iff misclassified)
  dlr_loss            Difference of Logits Ratio (Croce & Hein 2020), (B, C) only
  dlr_targeted_loss   APGD-T's targeted DLR, (B, C) only

Any loss of prsl_jax.losses is an objective too (`make_objective` below): a
per-row loss (cross_entropy) is averaged per example like ce_objective; a batch
loss (get_loss('prsl', ...), whose value couples the rows) is differentiated as
the scalar it is, which is how the paper attacks a model through its own
training loss, while iterates are ranked per example by cross-entropy.
"""

import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from prsl_jax import losses

IGNORE_INDEX = losses.IGNORE_INDEX


def _valid(labels):
  return labels != IGNORE_INDEX


def per_example(values, labels):
  """(B, ...) per-position values -> (B,) mean over each example's valid positions."""
  if values.ndim == 1:
    return jnp.where(_valid(labels), values, 0.0)
  axes = tuple(range(1, values.ndim))
  valid = _valid(labels)
  total = jnp.sum(jnp.where(valid, values, 0.0), axis=axes)
  return total / jnp.maximum(jnp.sum(valid, axis=axes), 1).astype(values.dtype)


def _pick(z, labels):
  """z[..., labels] as labels.shape; NaN for labels outside [0, C) (ignore_index aside)."""
  num_classes = z.shape[-1]
  safe = jnp.clip(labels, 0, num_classes - 1)
  picked = jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
  ok = ((labels >= 0) & (labels < num_classes)) | ~_valid(labels)
  return jnp.where(ok, picked, jnp.nan)


def _max_other(z, labels):
  """max_{j != labels} z_j, labels.shape."""
  mask = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, z), axis=-1)


def ce_objective(logits, labels):
  """Cross-entropy -log softmax(logits)[y], to maximise.

  Args:
    logits: (B, C) or (B, T, V) floating, any dtype (computed in float32).
    labels: (B,) or (B, T) integer in [0, C), or IGNORE_INDEX.

  Returns:
    (B,) float32 (sequences: mean over valid positions); NaN for a label
    outside [0, C).
  """
  losses.check_logits_labels(logits, labels)
  return per_example(losses.cross_entropy(logits, labels), labels)


def cw_margin(logits, labels):
  """Carlini-Wagner margin max_{j != y} z_j - z_y, to maximise.

  Positive exactly when the example is misclassified (ties aside), so the best
  iterate by this objective is also the best by misclassification.

  Args:
    logits: (B, C) or (B, T, V) floating, C >= 2.
    labels: (B,) or (B, T) integer in [0, C), or IGNORE_INDEX.

  Returns:
    (B,) float32 in logit units (sequences: mean over valid positions).
  """
  losses.check_logits_labels(logits, labels)
  z = logits.astype(jnp.float32)
  return per_example(_max_other(z, labels) - _pick(z, labels), labels)


def _check_classifier(logits, labels, min_classes, name, labels_name="labels"):
  losses.check_logits_labels(logits, labels, labels_name=labels_name, ignore_index=None)
  if logits.ndim != 2:
    raise ValueError(f"{name} takes classifier logits (B, C), got shape {logits.shape}")
  if logits.shape[1] < min_classes:
    rank = {3: "3rd", 4: "4th"}[min_classes]
    raise ValueError(f"{name} needs at least {min_classes} classes (its denominator uses the "
                     f"{rank} largest logit), got C={logits.shape[1]}")


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
  _check_classifier(logits, labels, 3, "dlr_loss")
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
  _check_classifier(logits, labels, 4, "dlr_targeted_loss")
  _check_classifier(logits, targets, 4, "dlr_targeted_loss", "targets")
  z = logits.astype(jnp.float32)
  top, _ = jax.lax.top_k(z, 4)
  denom = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
  return -(_pick(z, labels) - _pick(z, targets)) / denom


OBJECTIVES = {"ce": ce_objective, "cw": cw_margin, "dlr": dlr_loss}


class Objective(NamedTuple):
  """What an attack climbs.

  values(logits, labels) -> (B,): per example, ranks iterates (higher = better).
  total(logits, labels) -> scalar: what is differentiated w.r.t. the images.
  """
  values: Callable
  total: Callable


def make_objective(loss, *, labels, num_classes, targeted=False, attack="attack"):
  """An Objective from a name in OBJECTIVES or a loss of prsl_jax.losses.

  Args:
    loss: 'ce', 'cw', 'dlr', or fn(logits, labels) -> per-row values
      (labels.shape) or a scalar batch loss (e.g. losses.get_loss('prsl')).
    labels: the attack's labels (to tell a per-row from a batch loss by shape).
    num_classes: C.
    targeted: maximise minus the loss toward `labels` (the targets).
    attack: the attack's name, for messages.

  'dlr' with C < 3 warns and falls back to 'ce', as AutoAttack does.
  """
  if isinstance(loss, str):
    if loss not in OBJECTIVES:
      raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(OBJECTIVES)} or pass a "
                       "loss function of prsl_jax.losses")
    if loss == "dlr" and num_classes < 3:
      warnings.warn(f"{attack}: loss='dlr' needs at least 3 classes, got C={num_classes}; "
                    "falling back to cross-entropy ('ce')", stacklevel=3)
      loss = "ce"
    values = OBJECTIVES[loss]
    total = lambda logits, y: jnp.sum(values(logits, y))
  elif callable(loss):
    shape = jax.eval_shape(
        loss, jax.ShapeDtypeStruct(labels.shape + (num_classes,), jnp.float32),
        jax.ShapeDtypeStruct(labels.shape, labels.dtype)).shape
    if shape == ():
      # A batch loss couples the rows: differentiate it whole; rank by CE.
      values, total = ce_objective, loss
    elif tuple(shape) == tuple(labels.shape):
      values = lambda logits, y: per_example(loss(logits, y), y)
      total = lambda logits, y: jnp.sum(values(logits, y))
    else:
      raise ValueError(f"the loss passed to {attack} must return a scalar (batch loss) or "
                       f"one value per label {tuple(labels.shape)}, got shape {shape}")
  else:
    raise TypeError(f"loss must be a name in {sorted(OBJECTIVES)} or a function, got {loss!r}")
  if targeted:
    return Objective(lambda z, y: -values(z, y), lambda z, y: -total(z, y))
  return Objective(values, total)
