"""Per-example classification losses: PRSL, top-k cross-entropy, cross-entropy.

Every loss takes logits (B, C) of any floating dtype and integer labels (B,), and
returns float32 values of shape (B,), like
optax.softmax_cross_entropy_with_integer_labels. They are pure, jit/vmap-able,
work from log_softmax in float32 (stable for logits of any magnitude) and are
differentiable wherever the logits are finite.

Reading of PRSL (Wang et al., arXiv:2402.03627). The paper's equations are not
public; its abstract says the loss "restricts the top K softmax outputs". Its
predecessor, the Distribution-restrained Softmax Loss (arXiv:2303.12363),
suppresses the spread of the softmax values of the non-true classes. PRSL does that
*partially*: only over the K most probable wrong classes.

Labels outside [0, C) cannot raise inside jit; the losses return NaN for those
rows, so a bad label shows up at the first NaN guard instead of silently training
on a clipped index.
"""

from typing import Callable, Union

import jax
import jax.numpy as jnp
import optax


def _check_logits_labels(logits, labels):
  if not hasattr(logits, "ndim") or logits.ndim != 2:
    raise ValueError(
        f"logits must have shape (B, C), got shape {getattr(logits, 'shape', None)}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"logits must be a floating dtype, got {logits.dtype}")
  if not hasattr(labels, "ndim") or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"labels must have shape (B,) = {logits.shape[:1]} to match logits "
        f"{logits.shape}, got {getattr(labels, 'shape', None)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")


def _check_k(k, num_classes):
  if not isinstance(k, int) or isinstance(k, bool):
    raise TypeError(f"k must be a Python int (it fixes a shape), got {k!r}")
  if not 1 <= k <= num_classes - 1:
    raise ValueError(
        f"k must be in 1..C-1 = 1..{num_classes - 1} for C={num_classes} classes, got k={k}")


def _nan_for_bad_labels(loss, labels, num_classes):
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, loss, jnp.nan)


def _topk_wrong(logits, labels, k):
  """Indices (B, k) of the k largest wrong-class logits (true class excluded)."""
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  masked = jnp.where(true, -jnp.inf, logits)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(masked), k)
  return idx


def cross_entropy(logits, labels):
  """Softmax cross-entropy with integer labels.

  Args:
    logits: (B, C) floating.
    labels: (B,) integer in [0, C).

  Returns:
    (B,) float32, -log softmax(logits)[label]; NaN where a label is out of range.
  """
  _check_logits_labels(logits, labels)
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.clip(labels, 0, logits.shape[-1] - 1))
  return _nan_for_bad_labels(loss, labels, logits.shape[-1])


def recentralization(logits, labels, *, k, renormalize=False):
  """The PRSL penalty R_K: variance of the top-k wrong-class softmax values.

  With p = softmax(logits) and N_K the k wrong classes of largest p,
  v = p[N_K] (divided by sum(v) when renormalize=True) and
  R_K = mean_j (v_j - mean(v))^2.

  Args:
    logits: (B, C) floating.
    labels: (B,) integer in [0, C).
    k: static int in 1..C-1.
    renormalize: if True, v is renormalised to sum to one (scale-free variant).

  Returns:
    (B,) float32, R_K >= 0.
  """
  _check_logits_labels(logits, labels)
  _check_k(k, logits.shape[-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  idx = _topk_wrong(logits, labels, k)
  logv = jnp.take_along_axis(logp, idx, axis=-1)
  v = jax.nn.softmax(logv, axis=-1) if renormalize else jnp.exp(logv)
  return jnp.mean(jnp.square(v - jnp.mean(v, axis=-1, keepdims=True)), axis=-1)


def prsl_loss(logits, labels, *, k, weight, renormalize=False):
  """Partially Recentralization Softmax Loss, per example.

  For p = softmax(logits) and N_K(y) the k classes j != y with the largest p_j:

      v    = p[N_K]                      (v / sum(v) if renormalize)
      R_K  = mean_j (v_j - mean(v))^2
      PRSL = -log p_y + weight * R_K

  Args:
    logits: (B, C) floating, any magnitude (computed from log_softmax in float32).
    labels: (B,) integer class indices in [0, C).
    k: static int in 1..C-1, number of wrong classes restrained.
    weight: float >= 0, strength of the recentralization term.
    renormalize: divide the k values by their sum before taking the variance.

  Returns:
    (B,) float32 losses; NaN where a label is outside [0, C).

  Raises:
    ValueError/TypeError naming the argument for bad shapes, dtypes, k or weight.
  """
  if isinstance(weight, (int, float)) and weight < 0:
    raise ValueError(f"weight must be >= 0, got weight={weight}")
  ce = cross_entropy(logits, labels)
  return ce + weight * recentralization(logits, labels, k=k, renormalize=renormalize)


def topk_cross_entropy(logits, labels, *, k):
  """Cross-entropy with the softmax renormalised over N_K(y) plus y.

  loss = -z_y + logsumexp(z over {y} and the k largest wrong-class logits).

  Args:
    logits: (B, C) floating.
    labels: (B,) integer in [0, C).
    k: static int in 1..C-1.

  Returns:
    (B,) float32; NaN where a label is out of range.
  """
  _check_logits_labels(logits, labels)
  _check_k(k, logits.shape[-1])
  z = logits.astype(jnp.float32)
  safe = jnp.clip(labels, 0, z.shape[-1] - 1)
  z_true = jnp.take_along_axis(z, safe[:, None], axis=-1)
  z_wrong = jnp.take_along_axis(z, _topk_wrong(z, safe, k), axis=-1)
  z_set = jnp.concatenate([z_true, z_wrong], axis=-1)
  loss = jax.nn.logsumexp(z_set, axis=-1) - z_true[:, 0]
  return _nan_for_bad_labels(loss, labels, z.shape[-1])


LOSSES = {"ce": cross_entropy, "prsl": prsl_loss, "topk_ce": topk_cross_entropy}

LossFn = Callable[..., jax.Array]


def get_loss(name: str) -> LossFn:
  """Returns the per-example loss called `name` ('ce', 'prsl' or 'topk_ce')."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
  return LOSSES[name]


def contrastive_loss(image_emb, text_emb, logit_scale, *,
                     loss: Union[str, LossFn] = cross_entropy, **loss_kwargs):
  """CLIP's symmetric image-text loss with any per-example loss above.

  Embeddings are L2-normalised here; row i of each is a matching pair, so the
  labels are arange(B), in both directions (image->text and text->image).

  Args:
    image_emb: (B, D) image embeddings (need not be normalised).
    text_emb: (B, D) text embeddings of the matching captions.
    logit_scale: scalar, the multiplicative temperature (already exponentiated,
      as CLIP's exp(logit_scale) param; 100 for OpenAI CLIP).
    loss: a per-example loss (logits (B, B), labels (B,)) -> (B,), or its name
      'ce', 'prsl', 'topk_ce'. For 'prsl'/'topk_ce', k must be <= B-1.
    **loss_kwargs: passed to the loss (k, weight, renormalize).

  Returns:
    scalar float32, mean over both directions and the batch.
  """
  if isinstance(loss, str):
    loss = get_loss(loss)
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(
        f"image_emb and text_emb must both be (B, D) with equal shapes, got "
        f"{image_emb.shape} and {text_emb.shape}")
  img = _l2_normalize(image_emb.astype(jnp.float32))
  txt = _l2_normalize(text_emb.astype(jnp.float32))
  logits = logit_scale * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  per_image = loss(logits, labels, **loss_kwargs)
  per_text = loss(logits.T, labels, **loss_kwargs)
  return 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))


def _l2_normalize(x, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))
