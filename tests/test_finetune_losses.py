"""FARE's and PMG-AFT's losses against float64 torch references written from the
authors' formulas (values and gradients), and FARE's training attack on a linear
embedding, where its gradient is analytic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prsl_jax import finetune_losses as fl

B, D, C = 5, 7, 6
HWC = (4, 4, 3)


def _t(x):
  return torch.tensor(np.asarray(x, np.float64), requires_grad=True)


def _close(a, b, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# FARE's loss.
# ----------------------------------------------------------------------------


def test_fare_loss_value_and_gradients_match_float64_reference():
  rng = np.random.default_rng(0)
  e, t = (rng.normal(size=(B, D)).astype(np.float32) * 3 for _ in range(2))
  value, grads = jax.value_and_grad(fl.fare_loss, argnums=(0, 1))(jnp.asarray(e), jnp.asarray(t))
  # chs20/RobustVLM `l2`: squared error summed over D, averaged over B.
  te, tt = _t(e), _t(t)
  ref = F.mse_loss(te, tt, reduction="none").sum(dim=1).mean()
  ref.backward()
  _close(value, ref.item())
  _close(grads[0], te.grad.numpy())
  _close(grads[1], tt.grad.numpy())
  _close(fl.fare_distances(e, t), ((e.astype(np.float64) - t) ** 2).sum(1))


def test_fare_loss_is_zero_for_identical_embeddings_and_rejects_bad_shapes():
  e = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
  assert float(fl.fare_loss(e, e)) == 0.0
  with pytest.raises(ValueError, match="same shape"):
    fl.fare_loss(e, e[:, :3])
  with pytest.raises(ValueError, match=r"\(B, D\)"):
    fl.fare_loss(e[0], e[0])
  with pytest.raises(TypeError, match="floating"):
    fl.fare_loss(e, e.astype(jnp.int32))


# ----------------------------------------------------------------------------
# PMG-AFT's loss.
# ----------------------------------------------------------------------------


def _pmg_reference(z_adv, z_clean, z_ori, y, w_g, w_c, reduction):
  """PMG_AFT.py `train` (commit a53fdd8) in float64 torch, with its own KLDivLoss."""
  kl = torch.nn.KLDivLoss(reduction="sum")
  general = kl(F.log_softmax(z_adv, dim=1), F.softmax(z_ori, dim=1))
  clean = kl(F.log_softmax(z_adv, dim=1), F.softmax(z_clean, dim=1))
  if reduction == "mean":
    general, clean = general / z_adv.shape[0], clean / z_adv.shape[0]
  return F.cross_entropy(z_adv, torch.tensor(y)) + w_g * general + w_c * clean


@pytest.mark.parametrize("w_g,w_c,reduction", [(1.0, 1.0, "sum"), (0.7, 2.5, "mean")])
def test_pmg_aft_value_and_gradients_match_float64_reference(w_g, w_c, reduction):
  rng = np.random.default_rng(2)
  zs = [rng.normal(size=(B, C)).astype(np.float32) * 4 for _ in range(3)]
  y = rng.integers(0, C, size=B)
  fn = lambda a, c, o: fl.pmg_aft_loss(a, c, o, jnp.asarray(y), general_weight=w_g,
                                       clean_weight=w_c, kl_reduction=reduction)
  value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(*map(jnp.asarray, zs))
  tz = [_t(z) for z in zs]
  ref = _pmg_reference(*tz, y, w_g, w_c, reduction)
  ref.backward()
  _close(value, ref.item())
  for g, t in zip(grads, tz):  # the clean logits get a gradient too (not detached)
    _close(g, t.grad.numpy())
  assert np.abs(np.asarray(grads[1])).max() > 1e-3


def test_pmg_aft_terms_and_defaults():
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=B))
  ce, general, clean = fl.pmg_aft_terms(z, z, z, y)
  assert abs(float(general)) < 1e-6 and abs(float(clean)) < 1e-6  # identical: KL = 0
  _close(fl.pmg_aft_loss(z, z, z, y), float(ce))
  # The authors' defaults: weights 1, KL summed over the batch (B times the mean).
  ce, general, clean = fl.pmg_aft_terms(z, z2, z2, y)
  _, general_mean, _ = fl.pmg_aft_terms(z, z2, z2, y, kl_reduction="mean")
  _close(general, B * float(general_mean))
  _close(fl.pmg_aft_loss(z, z2, z2, y), float(ce + general + clean))
  # KL(P_ref || P_adv), not the reverse: it is asymmetric for these logits.
  p, q = jax.nn.softmax(z2), jax.nn.softmax(z)
  _close(general, float(jnp.sum(p * (jnp.log(p) - jnp.log(q)))), rtol=1e-5)


def test_pmg_aft_rejects_bad_arguments():
  z = jnp.zeros((B, C), jnp.float32)
  y = jnp.zeros((B,), jnp.int32)
  with pytest.raises(ValueError, match="logits_clean must have the shape"):
    fl.pmg_aft_loss(z, z[:, :3], z, y)
  with pytest.raises(ValueError, match="logits_original_adv must have the shape"):
    fl.pmg_aft_loss(z, z, z[:2], y)
  with pytest.raises(ValueError, match="kl_reduction"):
    fl.pmg_aft_loss(z, z, z, y, kl_reduction="batchmean")
  with pytest.raises(ValueError, match="general_weight"):
    fl.pmg_aft_loss(z, z, z, y, general_weight=-1.0)
  with pytest.raises(ValueError, match=r"labels must be in \[0, C\)"):
    fl.pmg_aft_loss(z, z, z, y + C)


# ----------------------------------------------------------------------------
# FARE's training attack on a linear embedding phi(x) = W vec(x).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(int(np.prod(HWC)), D)).astype(np.float32)
  images = rng.uniform(0.2, 0.8, size=(4,) + HWC).astype(np.float32)
  embed = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(w)
  return w, jnp.asarray(images), embed


def test_fare_attack_first_step_follows_the_analytic_gradient(linear):
  w, images, embed = linear
  target = jnp.asarray(np.random.default_rng(5).normal(size=(4, D)), jnp.float32)
  x1 = fl.fare_attack(embed, images, target, key=None, eps=4 / 255, steps=1,
                      step_size=1 / 255, random_start=False, keep_best=False)
  x = np.asarray(images, np.float64).reshape(4, -1)
  grad = 2 * (x @ w - np.asarray(target, np.float64)) @ w.T.astype(np.float64)
  assert np.abs(grad).min() > 1e-4  # no sign is ambiguous
  expected = x + np.sign(grad) / 255
  _close(np.asarray(x1).reshape(4, -1), expected, rtol=0, atol=1e-6)


def test_fare_attack_raises_the_embedding_loss_within_the_ball(linear):
  w, images, embed = linear
  target = embed(images)  # FARE's target: the clean embedding, distance 0 at x0
  eps = 4 / 255
  key = jax.random.key(0)
  keys = jax.random.split(key, 4)
  adv = fl.fare_attack(embed, images, target, key=keys, eps=eps)
  assert float(jnp.max(jnp.abs(adv - images))) <= eps + 1e-6
  assert float(adv.min()) >= 0 and float(adv.max()) <= 1
  d_adv = np.asarray(fl.fare_distances(embed(adv), target))
  # The start it climbs from, and random vertices of the ball (where a convex
  # function's maximum lies): PGD must beat both, per example.
  start = fl.fare_attack(embed, images, target, key=keys, eps=eps, steps=1, step_size=0.0,
                         keep_best=False)
  d_start = np.asarray(fl.fare_distances(embed(start), target))
  signs = np.sign(np.random.default_rng(6).normal(size=(32, 4) + HWC)).astype(np.float32)
  vertices = (images[None] + eps * signs).reshape((-1,) + HWC)
  d_vertex = np.asarray(fl.fare_distances(embed(vertices), jnp.tile(target, (32, 1))))
  d_vertex = d_vertex.reshape(32, 4)
  assert (d_adv > 2 * d_start).all(), (d_adv, d_start)
  assert (d_adv > d_vertex.max(axis=0)).all(), (d_adv, d_vertex.max(axis=0))
  # Per-example keys: an example's result does not depend on the rest of its batch.
  adv2 = fl.fare_attack(embed, images[:2], target[:2], key=keys[:2], eps=eps)
  _close(adv2, np.asarray(adv[:2]), rtol=0, atol=1e-7)


def test_fare_attack_rejects_bad_arguments(linear):
  _, images, embed = linear
  target = embed(images)
  with pytest.raises(ValueError, match="exceeds 1"):
    fl.fare_attack(embed, images, target, key=jax.random.key(0), eps=4)
  with pytest.raises(ValueError, match="same shape"):
    fl.fare_attack(embed, images, target[:, :2], key=jax.random.key(0), eps=4 / 255)
  with pytest.raises(ValueError, match=r"to \(B, D\) embeddings"):
    fl.fare_attack(lambda x: x, images, target, key=jax.random.key(0), eps=4 / 255)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    fl.fare_attack(embed, images * 255, target, key=jax.random.key(0), eps=4 / 255)
  with pytest.raises(ValueError, match="key is required"):
    fl.fare_attack(embed, images, target, key=None, eps=4 / 255)


def test_axis_name_spans_every_shard():
  """With axis_name, the batch means and sums are over every shard's rows (vmap
  stands in for the devices of shard_map: same collectives)."""
  rng = np.random.default_rng(7)
  zs = [jnp.asarray(rng.normal(size=(4, C)), jnp.float32) for _ in range(3)]
  y = jnp.asarray(rng.integers(0, C, size=4))
  e, t = (jnp.asarray(rng.normal(size=(4, D)), jnp.float32) for _ in range(2))
  split = lambda x: x.reshape((2, 2) + x.shape[1:])
  sharded = jax.vmap(lambda e, t: fl.fare_loss(e, t, axis_name="d"), axis_name="d")
  _close(sharded(split(e), split(t)), np.full(2, float(fl.fare_loss(e, t))))
  for reduction in fl.KL_REDUCTIONS:
    fn = lambda a, c, o, y: jnp.stack(fl.pmg_aft_terms(a, c, o, y, kl_reduction=reduction,
                                                       axis_name="d"))
    out = jax.vmap(fn, axis_name="d")(*map(split, zs), split(y))
    ref = np.stack(fl.pmg_aft_terms(*zs, y, kl_reduction=reduction))
    _close(out, np.stack([ref, ref]))


def test_fare_attack_jits_with_traced_budget(linear):
  _, images, embed = linear
  target = embed(images)
  keys = jax.random.split(jax.random.key(1), 4)
  run = jax.jit(lambda x, eps: fl.fare_attack(embed, x, target, key=keys, eps=eps, steps=3))
  _close(run(images, 2 / 255), np.asarray(fl.fare_attack(embed, images, target, key=keys,
                                                          eps=2 / 255, steps=3)),
         rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# A training step's loss, attack included, on linear models.
# ----------------------------------------------------------------------------


def test_fare_step_loss_gradient_is_fare_loss_at_the_fixed_attack(linear):
  w0, images, _ = linear
  w = w0 + 0.05 * np.random.default_rng(8).normal(size=w0.shape).astype(np.float32)
  embed = lambda p, x: x.reshape(x.shape[0], -1) @ p
  keys = jax.random.split(jax.random.key(2), 4)
  fn = lambda p, p0: fl.fare_step_loss(embed, p, p0, images, key=keys, eps=4 / 255, steps=2)
  value, (g, g0) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(w), jnp.asarray(w0))
  target = embed(jnp.asarray(w0), images)
  x_adv = fl.fare_attack(lambda x: embed(jnp.asarray(w), x), images, target, key=keys,
                         eps=4 / 255, steps=2)
  xa = np.asarray(x_adv, np.float64).reshape(4, -1)
  x = np.asarray(images, np.float64).reshape(4, -1)
  resid = xa @ w - x @ w0.astype(np.float64)
  _close(value, (resid ** 2).sum(1).mean(), rtol=1e-5)
  _close(g, 2 * xa.T @ resid / 4, rtol=1e-4, atol=1e-5)  # x_adv is a constant
  assert not np.asarray(g0).any()  # the original is frozen


def test_pmg_aft_step_loss_matches_reference_at_the_fixed_attack(linear):
  _, images, _ = linear
  rng = np.random.default_rng(9)
  w0 = rng.normal(size=(int(np.prod(HWC)), C)).astype(np.float32)
  w = w0 + 0.3 * rng.normal(size=w0.shape).astype(np.float32)
  y = jnp.asarray(rng.integers(0, C, size=4))
  logits = lambda p, x: x.reshape(x.shape[0], -1) @ p
  keys = jax.random.split(jax.random.key(3), 4)
  fn = lambda p: fl.pmg_aft_step_loss(logits, p, jnp.asarray(w0), images, y, key=keys,
                                      steps=2)
  value, g = jax.value_and_grad(fn)(jnp.asarray(w))
  from prsl_jax import attacks
  x_adv = attacks.pgd(lambda x: logits(jnp.asarray(w), x), images, y, key=keys,
                      eps=fl.PMG_AFT_EPS, steps=2, step_size=fl.PMG_AFT_STEP_SIZE)
  xa = torch.tensor(np.asarray(x_adv, np.float64).reshape(4, -1))
  x = torch.tensor(np.asarray(images, np.float64).reshape(4, -1))
  tw = _t(w)
  ref = _pmg_reference(xa @ tw, x @ tw, xa @ torch.tensor(w0, dtype=torch.float64),
                       np.asarray(y, np.int64), 1.0, 1.0, "sum")
  ref.backward()
  _close(value, ref.item(), rtol=1e-5)
  _close(g, tw.grad.numpy(), rtol=1e-4, atol=1e-5)
