"""Losses against optax, hand-computed cases and their invariances."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from prsl_jax import losses


def _batch(seed=0, b=6, c=7, scale=3.0):
  kz, ky = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(kz, (b, c)) * scale
  y = jax.random.randint(ky, (b,), 0, c)
  return z, y


def test_weight_zero_is_optax_cross_entropy_exactly():
  z, y = _batch()
  got = losses.prsl_loss(z, y, k=3, weight=0.0)
  want = optax.softmax_cross_entropy_with_integer_labels(z, y)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cross_entropy_matches_numpy_reference():
  z, y = _batch(1)
  zn = np.asarray(z, np.float64)
  ref = -(zn[np.arange(len(y)), y] - np.log(np.exp(zn).sum(-1)))
  np.testing.assert_allclose(losses.cross_entropy(z, y), ref, rtol=1e-6)


def test_hand_computed_four_class_case():
  p = np.array([[0.4, 0.3, 0.2, 0.1]])
  z = jnp.asarray(np.log(p), jnp.float32)
  y = jnp.array([0])
  # N_2 = {1, 2}: v = (0.3, 0.2), mean 0.25, R = 0.05^2 = 0.0025.
  np.testing.assert_allclose(
      losses.prsl_loss(z, y, k=2, weight=2.0), [-np.log(0.4) + 2 * 0.0025], rtol=1e-6)
  # Renormalised: v = (0.6, 0.4), R = 0.1^2 = 0.01.
  np.testing.assert_allclose(
      losses.prsl_loss(z, y, k=2, weight=1.0, renormalize=True),
      [-np.log(0.4) + 0.01], rtol=1e-6)
  # k=3 with true class 3 (smallest): N = {0, 1, 2}, v = (.4, .3, .2), R = 2/3 * 0.01.
  np.testing.assert_allclose(
      losses.recentralization(z, jnp.array([3]), k=3), [0.02 / 3], rtol=1e-5)
  # top-k CE over {0} and N_2 = {1, 2}: -log(0.4 / 0.9).
  np.testing.assert_allclose(
      losses.topk_cross_entropy(z, y, k=2), [-np.log(0.4 / 0.9)], rtol=1e-6)


def test_recentralization_is_zero_when_the_k_values_are_equal():
  z = jnp.array([[5.0, 1.0, 1.0, 1.0, -3.0]])
  np.testing.assert_allclose(losses.recentralization(z, jnp.array([0]), k=3), [0.0], atol=1e-12)
  # ...and positive when they are not.
  assert losses.recentralization(z, jnp.array([0]), k=4)[0] > 1e-5


def test_topk_ce_with_all_wrong_classes_is_cross_entropy():
  z, y = _batch(2)
  np.testing.assert_allclose(
      losses.topk_cross_entropy(z, y, k=z.shape[1] - 1), losses.cross_entropy(z, y), rtol=1e-6)


def test_top_k_excludes_the_true_class():
  # True class has the largest logit; if it leaked into N_K the penalty would change.
  z = jnp.array([[10.0, 2.0, 1.0, 0.0]])
  y = jnp.array([0])
  p = np.asarray(jax.nn.softmax(z))[0]
  v = p[[1, 2]]
  np.testing.assert_allclose(losses.recentralization(z, y, k=2), [np.var(v)], rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-1e3, 1e3), k=st.integers(1, 6), renorm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_invariant_to_adding_a_constant(shift, k, renorm, seed):
  z, y = _batch(seed)
  a = losses.prsl_loss(z, y, k=k, weight=3.0, renormalize=renorm)
  b = losses.prsl_loss(z + shift, y, k=k, weight=3.0, renormalize=renorm)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(losses.topk_cross_entropy(z, y, k=k),
                             losses.topk_cross_entropy(z + shift, y, k=k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["prsl", "topk_ce", "ce"])
def test_finite_values_and_gradients_for_huge_logits(dtype, name):
  z, y = _batch(3, scale=1e4)
  z = z.astype(dtype)
  kwargs = {"prsl": dict(k=3, weight=5.0), "topk_ce": dict(k=3), "ce": {}}[name]
  fn = functools.partial(losses.get_loss(name), **kwargs)
  val = fn(z, y)
  grad = jax.grad(lambda z: fn(z, y).sum())(z)
  assert val.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(val)))
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  assert grad.dtype == dtype


def test_gradient_of_penalty_pulls_top_k_together():
  # Descending along R_K must shrink the spread of the K values.
  z = jnp.array([[3.0, 2.5, 0.0, -1.0, -2.0]])
  y = jnp.array([0])
  r = lambda z: losses.recentralization(z, y, k=3).sum()
  z2 = z - 10.0 * jax.grad(r)(z)
  assert r(z2) < r(z)


def test_vmap_of_single_examples_equals_batch_and_jit_equals_eager():
  z, y = _batch(4)
  fn = functools.partial(losses.prsl_loss, k=2, weight=1.5, renormalize=True)
  batch = fn(z, y)
  single = jax.vmap(lambda zi, yi: fn(zi[None], yi[None])[0])(z, y)
  np.testing.assert_allclose(single, batch, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(z, y), batch, rtol=1e-6)


def test_out_of_range_labels_give_nan_not_a_clipped_loss():
  z, _ = _batch(5, b=3)
  out = losses.prsl_loss(z, jnp.array([0, 7, -1]), k=2, weight=1.0)
  assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


def test_contrastive_loss_symmetric_and_built_from_the_row_loss():
  kx, kt = jax.random.split(jax.random.key(6))
  img = jax.random.normal(kx, (5, 8))
  txt = jax.random.normal(kt, (5, 8))
  got = losses.contrastive_loss(img, txt, 10.0, loss="prsl", k=2, weight=2.0)
  n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  logits = 10.0 * n(img) @ n(txt).T
  lab = jnp.arange(5)
  want = 0.5 * (losses.prsl_loss(logits, lab, k=2, weight=2.0).mean()
                + losses.prsl_loss(logits.T, lab, k=2, weight=2.0).mean())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, losses.contrastive_loss(txt, img, 10.0, loss="prsl", k=2,
                                                          weight=2.0), rtol=1e-5)
  # Plain CE version equals the CLIP loss written directly.
  ce = losses.contrastive_loss(img, txt, 10.0)
  want_ce = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()
                   + optax.softmax_cross_entropy_with_integer_labels(logits.T, lab).mean())
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0, weight=1.0), "k must be in 1..C-1"),
    (dict(k=7, weight=1.0), "k must be in 1..C-1"),
    (dict(k=2.0, weight=1.0), "k must be a Python int"),
    (dict(k=2, weight=-1.0), "weight must be >= 0"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
  z, y = _batch()
  with pytest.raises((ValueError, TypeError), match=match):
    losses.prsl_loss(z, y, **kwargs)


def test_bad_shapes_and_dtypes():
  z, y = _batch()
  with pytest.raises(ValueError, match="labels must have shape"):
    losses.prsl_loss(z, y[:3], k=2, weight=1.0)
  with pytest.raises(TypeError, match="labels must be integer"):
    losses.cross_entropy(z, y.astype(jnp.float32))
  with pytest.raises(TypeError, match="logits must be a floating"):
    losses.cross_entropy(z.astype(jnp.int32), y)
  with pytest.raises(ValueError, match=r"logits must have shape \(B, C\)"):
    losses.cross_entropy(z[0], y)
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss("hinge")
