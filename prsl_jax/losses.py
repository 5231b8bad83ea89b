"""Losses of logits: the authors' PRSL and DRSL, cross-entropy, CLIP's contrastive loss.

Shapes. Every loss takes logits (..., C) of any floating dtype and integer labels
(...) with labels.shape == logits.shape[:-1]: each leading index is one *row*, so
classifier logits (B, C) and token logits (B, T, V) work as they are. Rows whose
label equals `ignore_index` (-100, as torch and transformers use for padding) are
masked out, never removed, so shapes stay static under jit. Everything is
computed in float32 from log-softmax / logsumexp, stable for logits of any
magnitude.

The authors' losses (Wang, Jiang, Zhang, Li, arXiv:2402.03627; code: GitHub
karlieswift/Mattack, lossfunctions.py, classes PRSL and DRSL; the same PRSL is
`DRSLx`, trained as "DRSL3", in vitgpt2/attackutils/modeling_vision_encoder_decoder.py):

  prsl_loss  a * CE + b * x,  x = -sum_i log_softmax(m)_i over the rows i,
             m_i = mean of the window [start:end] of row i's wrong-class logits
             sorted in descending order. Scalar; couples the rows of a group.
  drsl_loss  a * CE + b * sum_i sum_{j != y_i} (z_ij - mu_i)^2,
             mu_i = sum_{j != y_i} z_ij / C (divided by C, as their code does).

Ours, kept as ablations (not the authors'):
  topk_variance_loss  CE + w * variance of the k largest wrong-class softmax
                      probabilities, per row (the project's first reading of PRSL).
  topk_cross_entropy  CE with the softmax restricted to y and the k largest wrong classes.

`get_loss(name, **kwargs)` is the one registry of loss names: it returns a batch
loss fn(logits, labels, *, axis_name=None) -> scalar that the trainer, the CLIs,
the study and the attacks (the paper's protocol) all use.

Data parallelism. Inside jax.shard_map, pass the mesh axis as `axis_name`: the
batch-coupled quantities (PRSL's logsumexp over rows, row counts, CE means,
DRSL's sum) then span every device, so one device and eight give the same loss
and, with gradients averaged by lax.pmean, the same gradients.

What jit can and cannot check. Shapes, dtypes and static arguments are checked
at trace time and raise with the argument's name. Values (labels in range,
weights) are checked only when they are concrete; under jit a label outside
[0, C) that is not ignore_index makes that row's loss NaN, and a negative or
NaN weight makes the loss NaN (so the trainer's NaN guard stops the run); they
are never silently clipped or used.
"""

import dataclasses
import math
import operator
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------
# Argument checks shared by losses and attacks.
# ----------------------------------------------------------------------------


def is_concrete(x) -> bool:
  """True when x's value can be read now (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_logits_labels(logits, labels, *, labels_name="labels", min_classes=2,
                        ignore_index: Optional[int] = IGNORE_INDEX, min_ndim=1):
  """Raises a one-line error for logits/labels that no loss or attack can use.

  Args:
    logits: (..., C) floating.
    labels: (...) integer, labels.shape == logits.shape[:-1].
    labels_name: the argument's name in messages ('labels', 'targets').
    min_classes: the least C the caller needs.
    ignore_index: a label value that marks a masked row (None: none allowed).
    min_ndim: the least number of leading (row) dimensions of logits.

  Values are checked only when concrete (see the module docstring).
  """
  shape = getattr(logits, "shape", None)
  if shape is None or len(shape) < min_ndim + 1:
    lead = "(B, C)" if min_ndim == 1 else "(B, ..., C)"
    raise ValueError(f"logits must have shape {lead} with at least {min_ndim} leading "
                     f"dimension(s), got shape {shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"logits must be a floating dtype, got {logits.dtype}")
  lshape = getattr(labels, "shape", None)
  if lshape is None or tuple(lshape) != tuple(shape[:-1]):
    raise ValueError(f"{labels_name} must have shape {tuple(shape[:-1])} (logits.shape[:-1] "
                     f"for logits {tuple(shape)}), got {lshape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{labels_name} must be integer class indices, got dtype {labels.dtype}")
  num_classes = shape[-1]
  if num_classes < min_classes:
    raise ValueError(f"logits must have at least {min_classes} classes, got C={num_classes}")
  if is_concrete(labels) and labels.size:
    v = np.asarray(labels)
    bad = (v < 0) | (v >= num_classes)
    if ignore_index is not None:
      bad &= v != ignore_index
    if bad.any():
      allowed = f" or {ignore_index} (ignored)" if ignore_index is not None else ""
      raise ValueError(f"{labels_name} must be in [0, C) = [0, {num_classes}){allowed}, got "
                       f"{v[bad].ravel()[0]} at position {np.argwhere(bad)[0].tolist()}")


def check_weight(name: str, value):
  """A finite number >= 0 (Python, NumPy or a concrete JAX scalar), returned as given.

  A traced weight cannot be checked: it is returned as NaN where it is negative
  or not finite, so the loss built from it is NaN (never a plausible value).
  """
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number, got {value!r}")
  if not is_concrete(value):
    return jnp.where(jnp.isfinite(value) & (value >= 0), value, jnp.nan)
  try:
    v = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number, got {value!r}") from None
  if v.shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
  if not np.isfinite(v) or v < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
  return value


def check_int(name: str, value, *, minimum=None, maximum=None) -> int:
  """A Python or NumPy integer (it fixes a shape), returned as int."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an integer, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer (it fixes a shape), got {value!r}") from None
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {name}={value}")
  return value


def check_window(start, end, num_classes: int):
  """0 <= start < end <= C - 1: a window of ranks among the C - 1 wrong classes."""
  start = check_int("start", start)
  end = check_int("end", end)
  if not 0 <= start < end <= num_classes - 1:
    raise ValueError(f"the window start:end = {start}:{end} must satisfy 0 <= start < end <= "
                     f"C-1 = {num_classes - 1} (ranks among the {num_classes - 1} wrong classes)")
  return start, end


# ----------------------------------------------------------------------------
# Rows.
# ----------------------------------------------------------------------------


def _rows(logits, labels, ignore_index):
  """(N, C) float32 logits, (N,) labels with ignored rows set to 0, (N,) valid mask."""
  z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
  y = labels.reshape(-1)
  valid = y != ignore_index if ignore_index is not None else jnp.ones(y.shape, bool)
  return z, jnp.where(valid, y, 0), valid


def _row_cross_entropy(z, y):
  """-log softmax(z)[y] per row; NaN where y is outside [0, C)."""
  logp = jax.nn.log_softmax(z, axis=-1)
  num_classes = z.shape[-1]
  picked = jnp.take_along_axis(logp, jnp.clip(y, 0, num_classes - 1)[:, None], axis=-1)[:, 0]
  return jnp.where((y >= 0) & (y < num_classes), -picked, jnp.nan)


def _sum(x, axis_name):
  s = jnp.sum(x)
  return jax.lax.psum(s, axis_name) if axis_name is not None else s


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / ||x|| along `axis`, float32 kept; eps guards an all-zero row."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX):
  """Softmax cross-entropy per row, like optax.softmax_cross_entropy_with_integer_labels.

  Args:
    logits: (..., C) floating.
    labels: (...) integer in [0, C), or ignore_index.

  Returns:
    (...) float32: -log softmax(logits)[label]; 0 where label == ignore_index,
    NaN where a label is otherwise outside [0, C).
  """
  check_logits_labels(logits, labels, ignore_index=ignore_index)
  z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
  y = labels.reshape(-1)
  ce = _row_cross_entropy(z, y)
  if ignore_index is not None:
    ce = jnp.where(y == ignore_index, 0.0, ce)
  return ce.reshape(labels.shape)


def mean_cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX, axis_name=None):
  """Cross-entropy averaged over the rows whose label is not ignore_index: scalar.

  With axis_name (inside shard_map), the mean is over the rows of every device.
  """
  check_logits_labels(logits, labels, ignore_index=ignore_index)
  z, y, valid = _rows(logits, labels, ignore_index)
  ce = jnp.where(valid, _row_cross_entropy(z, y), 0.0)
  return _sum(ce, axis_name) / _sum(valid.astype(jnp.float32), axis_name)


# ----------------------------------------------------------------------------
# The authors' losses.
# ----------------------------------------------------------------------------


def window_mean(logits, labels, *, start, end):
  """m_i: mean of row i's wrong-class logits ranked start..end-1 (descending).

  Args:
    logits: (N, C) float32.
    labels: (N,) integer in [0, C) (the true column is excluded).
    start, end: static ints, 0 <= start < end <= C - 1.

  Returns:
    (N,) float32. Computed with top_k(end) on the row with its true column set
    to -inf, which never reaches the top `end` since end <= C - 1.
  """
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  top, _ = jax.lax.top_k(jnp.where(true, -jnp.inf, logits), end)
  return jnp.mean(top[:, start:end], axis=-1)


def _spread(m, valid, axis_name=None):
  """x = -sum_i log_softmax(m)_i over the valid rows = n * logsumexp(m) - sum(m).

  The logsumexp subtracts a stop-gradient max (over every device with
  axis_name), so it is exact for m of any magnitude. m, valid: (..., G); the sum
  runs over the last axis. Returns (...,) x and (...,) the row count n.
  """
  neg_inf = jnp.asarray(-jnp.inf, m.dtype)
  # The shift is a constant for differentiation (pmax has no derivative rule, and
  # logsumexp's value does not depend on it).
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(valid, m, neg_inf), axis=-1, keepdims=True))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  expsum = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, m - shift, neg_inf)), 0.0), -1)
  msum = jnp.sum(jnp.where(valid, m, 0.0), axis=-1)
  n = jnp.sum(valid.astype(jnp.float32), axis=-1)
  if axis_name is not None:
    expsum, msum, n = (jax.lax.psum(v, axis_name) for v in (expsum, msum, n))
  lse = shift[..., 0] + jnp.log(expsum)
  return n * lse - msum, n


def prsl_loss(logits, labels, *, start=0, end=4, weight=1e-3, ce_weight=1.0,
              ignore_index=IGNORE_INDEX, group_size=None, axis_name=None):
  """The authors' Partially Recentralization Softmax Loss (arXiv:2402.03627).

  For the rows i of a group (rows with label ignore_index dropped), with z_i the
  logits, y_i the label and w_i = z_i without column y_i (C-1 raw logits):

      m_i  = mean(sort_descending(w_i)[start:end])
      x    = -sum_i log_softmax(m)_i     (softmax over the rows of the group)
           = n * logsumexp_i(m_i) - sum_i m_i  >= n log n, equal iff all m_i agree
      PRSL = ce_weight * mean_i CE(z_i, y_i) + weight * x

  x penalises the spread of the window means across the rows: it pulls the
  top wrong-class logits of every row toward a common level. It grows with the
  group's size n, so `weight` is tied to the batch size.

  Args:
    logits: (..., C) floating; every leading index is a row ((B, C) classifier
      logits, (B, T, V) token logits).
    labels: (...) integer in [0, C), or ignore_index for masked rows (padding).
    start, end: static ints, the window of ranks; 0 <= start < end <= C - 1.
      The authors used 0:4 (their default), 0:6, 0:10, 0:20, 0:100, 4:13, 6:10,
      6:15 and 11:20.
    weight: b >= 0 (authors: 1e-5 for ViT-GPT2, 1e-6 for BLIP-2; default 1e-3,
      their class default).
    ce_weight: a >= 0 (authors: 1).
    ignore_index: label value of masked rows.
    group_size: None: the rows of this call form one group (with axis_name: the
      rows of every device, i.e. the global batch). G: consecutive blocks of G
      rows are independent groups and the loss is the mean of their losses
      (what the authors' per-GPU DDP batches computed; the same on any device
      count as long as G divides each device's rows).
    axis_name: mesh axis inside shard_map; see the module docstring.

  Returns:
    scalar float32. NaN if a group has no valid row (raised when concrete).
  """
  check_logits_labels(logits, labels, ignore_index=ignore_index)
  num_classes = logits.shape[-1]
  start, end = check_window(start, end, num_classes)
  weight = check_weight("weight", weight)
  ce_weight = check_weight("ce_weight", ce_weight)
  z, y, valid = _rows(logits, labels, ignore_index)
  num_rows = z.shape[0]
  if group_size is not None:
    group_size = check_int("group_size", group_size, minimum=1)
    if num_rows % group_size:
      raise ValueError(f"group_size={group_size} must divide the number of rows "
                       f"{num_rows} (logits {tuple(logits.shape)})")
  _check_nonempty_groups(labels, ignore_index, group_size)

  ce_rows = jnp.where(valid, _row_cross_entropy(z, y), 0.0)
  m = window_mean(z, y, start=start, end=end)
  if group_size is None:
    x, n = _spread(m, valid, axis_name)
    ce = _sum(ce_rows, axis_name) / n
    return ce_weight * ce + weight * x
  shape = (num_rows // group_size, group_size)
  valid_g = valid.reshape(shape)
  x, n = _spread(m.reshape(shape), valid_g)
  ce = jnp.sum(ce_rows.reshape(shape), axis=-1) / n
  loss = jnp.mean(ce_weight * ce + weight * x)
  return jax.lax.pmean(loss, axis_name) if axis_name is not None else loss


def _check_nonempty_groups(labels, ignore_index, group_size):
  if ignore_index is None or not is_concrete(labels) or not labels.size:
    return
  valid = np.asarray(labels).reshape(-1) != ignore_index
  groups = valid.reshape(-1, group_size or valid.size)
  empty = np.flatnonzero(~groups.any(axis=1))
  if empty.size:
    what = "the batch" if group_size is None else f"group {empty[0]} (rows " \
        f"{empty[0] * group_size}..{(empty[0] + 1) * group_size - 1})"
    raise ValueError(f"{what} has no row whose label is not ignore_index={ignore_index}; "
                     "PRSL needs at least one valid row per group")


def drsl_loss(logits, labels, *, weight=1e-3, ce_weight=1.0, ignore_index=IGNORE_INDEX,
              axis_name=None):
  """The authors' Distribution-restrained Softmax Loss (arXiv:2303.12363).

      mu_i = sum_{j != y_i} z_ij / C          (divided by C, as their code does)
      DRSL = ce_weight * mean_i CE(z_i, y_i) + weight * sum_i sum_{j != y_i} (z_ij - mu_i)^2

  The penalty is a sum over rows (not a mean), as in the authors' class DRSL.

  Args:
    logits: (..., C) floating, every leading index a row.
    labels: (...) integer in [0, C), or ignore_index for masked rows.
    weight: b >= 0 (the authors' class default 1e-3).
    ce_weight: a >= 0.
    axis_name: mesh axis inside shard_map: CE mean and sum over every device.

  Returns:
    scalar float32.
  """
  check_logits_labels(logits, labels, ignore_index=ignore_index)
  weight = check_weight("weight", weight)
  ce_weight = check_weight("ce_weight", ce_weight)
  _check_nonempty_groups(labels, ignore_index, None)
  z, y, valid = _rows(logits, labels, ignore_index)
  num_classes = z.shape[-1]
  ce_rows = jnp.where(valid, _row_cross_entropy(z, y), 0.0)
  wrong = ~jax.nn.one_hot(y, num_classes, dtype=bool)
  mu = jnp.sum(jnp.where(wrong, z, 0.0), axis=-1, keepdims=True) / num_classes
  penalty = jnp.sum(jnp.where(wrong, jnp.square(z - mu), 0.0), axis=-1)
  ce = _sum(ce_rows, axis_name) / _sum(valid.astype(jnp.float32), axis_name)
  return ce_weight * ce + weight * _sum(jnp.where(valid, penalty, 0.0), axis_name)


# ----------------------------------------------------------------------------
# Our ablations (not the authors' losses).
# ----------------------------------------------------------------------------


def _topk_wrong(z, y, k):
  """Indices (N, k) of the k largest wrong-class logits (true class excluded)."""
  true = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(jnp.where(true, -jnp.inf, z)), k)
  return idx


def topk_variance(logits, labels, *, k, renormalize=False):
  """Ours: variance of the k largest wrong-class softmax probabilities, per row.

  With p = softmax(z) and N_k the k wrong classes of largest p: v = p[N_k]
  (v / sum(v) when renormalize) and the result is mean_j (v_j - mean(v))^2.

  Args:
    logits: (..., C) floating.
    labels: (...) integer in [0, C).
    k: static int in 1..C-1.
    renormalize: divide v by its sum first (scale-free, at most (k-1)/k^2).

  Returns:
    (...) float32 >= 0.
  """
  check_logits_labels(logits, labels, ignore_index=None)
  k = check_int("k", k, minimum=1, maximum=logits.shape[-1] - 1)
  z, y, _ = _rows(logits, labels, None)
  logv = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), _topk_wrong(z, y, k), axis=-1)
  v = jax.nn.softmax(logv, axis=-1) if renormalize else jnp.exp(logv)
  var = jnp.mean(jnp.square(v - jnp.mean(v, axis=-1, keepdims=True)), axis=-1)
  return var.reshape(labels.shape)


def topk_variance_loss(logits, labels, *, k, weight, renormalize=False):
  """Ours, an ablation (NOT the authors' PRSL): CE + weight * topk_variance, per row.

  This was prsl_jax's first reading of PRSL, before the authors' code was read.
  Raw variances scale with p^2 and vanish on confident rows (about 5e-9 on the
  tiny CLIP's fine-tuned logits), so only renormalize=True or very large
  weights change training.

  Returns:
    (...) float32; NaN where a label is outside [0, C).
  """
  weight = check_weight("weight", weight)
  return cross_entropy(logits, labels, ignore_index=None) + weight * topk_variance(
      logits, labels, k=k, renormalize=renormalize)


def topk_cross_entropy(logits, labels, *, k):
  """Ours: cross-entropy with the softmax over {y} and the k largest wrong classes.

  loss = logsumexp(z over {y} and N_k) - z_y, per row.

  Returns:
    (...) float32; NaN where a label is outside [0, C).
  """
  check_logits_labels(logits, labels, ignore_index=None)
  k = check_int("k", k, minimum=1, maximum=logits.shape[-1] - 1)
  z, _, _ = _rows(logits, labels, None)
  y = labels.reshape(-1)
  safe = jnp.clip(y, 0, z.shape[-1] - 1)
  z_true = jnp.take_along_axis(z, safe[:, None], axis=-1)
  z_wrong = jnp.take_along_axis(z, _topk_wrong(z, safe, k), axis=-1)
  loss = jax.nn.logsumexp(jnp.concatenate([z_true, z_wrong], axis=-1), axis=-1) - z_true[:, 0]
  loss = jnp.where((y >= 0) & (y < z.shape[-1]), loss, jnp.nan)
  return loss.reshape(labels.shape)


# ----------------------------------------------------------------------------
# The registry: name -> batch loss (scalar).
# ----------------------------------------------------------------------------

BatchLoss = Callable[..., jax.Array]  # fn(logits, labels, *, axis_name=None) -> scalar


def _mean_of_rows(row_loss, **kwargs):
  """A per-row loss -> its mean over the non-ignored rows (of every device)."""
  def batch_loss(logits, labels, *, axis_name=None):
    check_logits_labels(logits, labels)
    valid = labels != IGNORE_INDEX
    rows = row_loss(logits, jnp.where(valid, labels, 0), **kwargs)
    return _sum(jnp.where(valid, rows, 0.0), axis_name) / _sum(
        valid.astype(jnp.float32), axis_name)
  return batch_loss


@dataclasses.dataclass(frozen=True)
class Loss:
  """One loss of the registry: everything the rest of the library asks of it.

  fn: the function. fields: the keyword arguments it takes, which are also the
  config.loss fields it reads (configs/base.py). per_row: fn(logits, labels,
  **kw) -> (rows,) losses, averaged here over the non-ignored rows; otherwise fn
  is batch-coupled, a scalar that takes axis_name itself. description: its
  table label. authors: the paper's authors' loss (else our ablation).
  """
  fn: Callable
  fields: Tuple[str, ...]
  per_row: bool
  description: str
  authors: bool


# name -> record. Adding a loss: its function above and one record here.
LOSSES = {
    "ce": Loss(mean_cross_entropy, (), False, "cross-entropy", True),
    "prsl": Loss(prsl_loss, ("start", "end", "weight", "ce_weight", "group_size"), False,
                 "PRSL (the authors')", True),
    "drsl": Loss(drsl_loss, ("weight", "ce_weight"), False, "DRSL (the authors')", True),
    "topk_variance": Loss(topk_variance_loss, ("k", "weight", "renormalize"), True,
                          "top-k probability variance (ours, ablation)", False),
    "topk_ce": Loss(topk_cross_entropy, ("k",), True, "top-k cross-entropy (ours, ablation)",
                    False),
}


def loss_fields(name: str):
  """The keyword arguments loss `name` takes (the config fields it reads)."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
  return LOSSES[name].fields


def config_kwargs(loss_config, name=None) -> dict:
  """The keyword arguments of loss `name` (default loss_config["name"]) from a config.

  loss_config: config.loss (a ConfigDict) or any mapping of its fields, e.g. a
  run's stored config.json "loss" or an export's prsl_jax_training_loss.json.
  Fields the loss does not read are left out. The one place where a config's
  `group_size` 0 (the whole global batch) becomes the loss's None.
  """
  name = name or loss_config["name"]
  kwargs = {k: loss_config[k] for k in loss_fields(name) if k in loss_config}
  if "group_size" in kwargs:
    kwargs["group_size"] = kwargs["group_size"] or None  # 0: the whole global batch
  return kwargs


def from_config(loss_config, name=None) -> BatchLoss:
  """get_loss for config.loss (or loss `name` with config.loss's fields)."""
  name = name or loss_config["name"]
  return get_loss(name, **config_kwargs(loss_config, name))


def get_loss(name: str, **kwargs) -> BatchLoss:
  """The batch loss called `name`, with its keyword arguments bound.

  Args:
    name: 'ce', 'prsl', 'drsl' (the authors'), 'topk_variance', 'topk_ce' (ours).
    **kwargs: that loss's arguments (loss_fields(name)); others are an error.

  Returns:
    fn(logits (..., C), labels (...), *, axis_name=None) -> scalar float32,
    averaged over non-ignored rows (per-row losses) or as defined (PRSL, DRSL).
  """
  fields = loss_fields(name)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"loss {name!r} takes {list(fields) or 'no arguments'}, got unknown "
                     f"argument(s) {unknown}")
  for key in ("weight", "ce_weight"):
    if key in kwargs:
      check_weight(key, kwargs[key])
  if "k" in kwargs:
    kwargs["k"] = check_int("k", kwargs["k"], minimum=1)
  if "start" in kwargs or "end" in kwargs:
    start = check_int("start", kwargs.get("start", 0), minimum=0)
    end = check_int("end", kwargs.get("end", 4))
    if start >= end:
      raise ValueError(f"the window start:end = {start}:{end} needs start < end")
  if kwargs.get("group_size") is not None:
    kwargs["group_size"] = check_int("group_size", kwargs["group_size"], minimum=1)
  record = LOSSES[name]
  fn = record.fn
  if record.per_row:
    return _mean_of_rows(fn, **kwargs)

  def batch_loss(logits, labels, *, axis_name=None):
    return fn(logits, labels, axis_name=axis_name, **kwargs)
  return batch_loss


def contrastive_loss(image_emb, text_emb, logit_scale, *,
                     loss: Union[str, BatchLoss] = "ce", axis_name=None, **loss_kwargs):
  """CLIP's symmetric image-text loss with any batch loss of the registry.

  Embeddings are L2-normalised here; row i of each is a matching pair, so the
  labels are the diagonal, in both directions (image->text, text->image).

  Args:
    image_emb: (B, D) image embeddings (need not be normalised).
    text_emb: (B, D) text embeddings of the matching captions.
    logit_scale: scalar, the multiplicative temperature (already exponentiated,
      as CLIP's exp(logit_scale); 100 for OpenAI CLIP).
    loss: a name for get_loss, or fn(logits, labels, *, axis_name) -> scalar.
      PRSL's window must fit the B_global - 1 wrong columns.
    axis_name: mesh axis inside shard_map: each device's rows are scored
      against the gathered columns of every device (the negatives are the
      global batch) and the loss's groups span every device.
    **loss_kwargs: passed to get_loss.

  Returns:
    scalar float32, the mean of the two directions.
  """
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"image_emb and text_emb must both be (B, D) with equal shapes, got "
                     f"{image_emb.shape} and {text_emb.shape}")
  loss_fn = get_loss(loss, **loss_kwargs) if isinstance(loss, str) else loss
  img = l2_normalize(image_emb.astype(jnp.float32))
  txt = l2_normalize(text_emb.astype(jnp.float32))
  offset = 0
  img_all, txt_all = img, txt
  if axis_name is not None:
    img_all = jax.lax.all_gather(img, axis_name, tiled=True)
    txt_all = jax.lax.all_gather(txt, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * img.shape[0]
  labels = offset + jnp.arange(img.shape[0])
  per_image = loss_fn(logit_scale * img @ txt_all.T, labels, axis_name=axis_name)
  per_text = loss_fn(logit_scale * txt @ img_all.T, labels, axis_name=axis_name)
  return 0.5 * (per_image + per_text)


def prsl_floor(num_rows: int) -> float:
  """The least value of PRSL's x for n rows: n log n (all window means equal)."""
  return num_rows * math.log(num_rows)
