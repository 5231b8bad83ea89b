"""Tests for prsl_jax.attacks.

Properties (hypothesis) on a tiny fixed MLP, strength against closed-form
answers on linear models, a trained MLP for the attack ordering, compile-once
(jaxpr size), validation errors, and jit / vmap / shard_map agreement.

Compilation dominates the runtime on CPU, so every jitted attack below is built
once at module level with eps, images, labels and key as traced arguments, and
reused across hypothesis examples and tests.
"""

import functools
import re
import warnings

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prsl_jax import attacks

B, H, W, CH = 4, 4, 4, 3
D = H * W * CH
HYP = settings(max_examples=12, deadline=None, derandomize=True)


def _flat(x):
  return x.reshape(x.shape[0], -1)


# A fixed random 3-class tanh MLP: non-linear, so restarts and momentum matter.
_r = np.random.default_rng(0)
_W1 = jnp.asarray(_r.normal(size=(D, 16)).astype(np.float32) * 0.6)
_B1 = jnp.asarray(_r.normal(size=(16,)).astype(np.float32))
_W2 = jnp.asarray(_r.normal(size=(16, 3)).astype(np.float32) * 2.0)


def mlp3(x):
  return jnp.tanh(_flat(x) @ _W1 + _B1) @ _W2


def _images(seed, batch=B):
  """Random images in [0, 1], some pixels exactly 0 or 1 to exercise clipping."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, H, W, CH)).astype(np.float32)
  x[rng.uniform(size=x.shape) < 0.1] = 0.0
  x[rng.uniform(size=x.shape) < 0.1] = 1.0
  y = rng.integers(0, 3, size=(batch,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _jit(attack, model=mlp3, **static):
  """jit(attack) with (images, labels, key, eps) traced and the rest static."""
  if attack is attacks.fgsm:
    return jax.jit(lambda x, y, key, eps: attack(model, x, y, eps=eps, **static))
  return jax.jit(lambda x, y, key, eps: attack(model, x, y, key=key, eps=eps, **static))


ATTACKS = {
    "fgsm-linf": ("linf", _jit(attacks.fgsm)),
    "pgd-linf": ("linf", _jit(attacks.pgd, steps=5)),
    "pgd-l2": ("l2", _jit(attacks.pgd, steps=5, norm="l2")),
    "apgd-linf": ("linf", _jit(attacks.apgd, steps=5)),
    "apgd-l2": ("l2", _jit(attacks.apgd, steps=5, norm="l2")),
    "square-linf": ("linf", _jit(attacks.square, queries=20)),
    "square-l2": ("l2", _jit(attacks.square, queries=20, norm="l2")),
}


def _dist(adv, x, norm):
  d = np.asarray(adv, np.float64) - np.asarray(x, np.float64)
  if norm == "linf":
    return np.abs(d).reshape(len(d), -1).max(1)
  return np.sqrt((d ** 2).reshape(len(d), -1).sum(1))


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ATTACKS))
@HYP
@given(seed=st.integers(0, 2**31 - 1),
       eps=st.one_of(st.just(0.0), st.floats(1e-3, 0.6)))
def test_ball_box_eps0_and_determinism(name, seed, eps):
  norm, attack = ATTACKS[name]
  x, y = _images(seed)
  key = jax.random.key(seed)
  adv = attack(x, y, key, eps)
  assert adv.shape == x.shape and adv.dtype == jnp.float32
  a = np.asarray(adv)
  assert np.all(np.isfinite(a)) and a.min() >= 0.0 and a.max() <= 1.0
  # float32 rounding of x0 + delta may add a few ulps beyond eps.
  assert np.all(_dist(adv, x, norm) <= eps * (1 + 1e-5) + 1e-6)
  # Same key -> bit-identical output.
  np.testing.assert_array_equal(a, np.asarray(attack(x, y, key, eps)))
  # eps = 0 -> the input, exactly.
  np.testing.assert_array_equal(np.asarray(attack(x, y, key, 0.0)), np.asarray(x))


def _restart_pair(attack, **static):
  return (_jit(attack, loss="cw", restarts=1, **static),
          _jit(attack, loss="cw", restarts=3, **static))


RESTARTS = {"pgd": _restart_pair(attacks.pgd, steps=3),
            "apgd": _restart_pair(attacks.apgd, steps=3)}


@pytest.mark.parametrize("name", list(RESTARTS))
@HYP
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.02, 0.3))
def test_restarts_never_weaken(name, seed, eps):
  one, three = RESTARTS[name]
  x, y = _images(seed)
  key = jax.random.key(seed)
  # With the CW margin, "misclassified first, then objective" is the objective
  # order, so the margin itself must not drop (restart 0 is shared).
  m1 = attacks.cw_margin(mlp3(one(x, y, key, eps)), y)
  m3 = attacks.cw_margin(mlp3(three(x, y, key, eps)), y)
  assert np.all(np.asarray(m3) >= np.asarray(m1) - 1e-5), (m1, m3)


def test_restarts_help_somewhere():
  # Guards the test above against a no-op: extra restarts do find better points.
  one, three = RESTARTS["pgd"]
  x, y = _images(1, batch=B)
  gains = []
  for seed in range(4):
    key = jax.random.key(seed)
    m1 = attacks.cw_margin(mlp3(one(x, y, key, 0.1)), y)
    m3 = attacks.cw_margin(mlp3(three(x, y, key, 0.1)), y)
    gains.append(np.asarray(m3 - m1))
  assert np.max(gains) > 1e-3


# ---------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------


def test_objectives_by_hand():
  z = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
  y = jnp.array([0, 0])
  np.testing.assert_allclose(attacks.cw_margin(z, y), [1.0 - 3.0, 2.0 - 0.0])
  np.testing.assert_allclose(attacks.dlr_loss(z, y), [-(3 - 1) / (3 - 0), (2 - 0) / (2 - 0.5)],
                             rtol=1e-6)
  t = jnp.array([1, 2])
  np.testing.assert_allclose(
      attacks.dlr_targeted_loss(z, y, t),
      [-(3 - 1) / (3 - 0.5 * (0 - 1)), -(0 - 1) / (2 - 0.5 * (0.5 + 0))], rtol=1e-6)
  np.testing.assert_allclose(
      attacks.ce_objective(z, y), optax.softmax_cross_entropy_with_integer_labels(z, y),
      rtol=1e-6)
  # float32 whatever the logits dtype; DLR is invariant to scale and shift.
  assert attacks.dlr_loss(z.astype(jnp.bfloat16), y).dtype == jnp.float32
  np.testing.assert_allclose(attacks.dlr_loss(7 * z + 3, y), attacks.dlr_loss(z, y), rtol=1e-5)


def test_dlr_needs_classes():
  z2, z3 = jnp.zeros((2, 2)), jnp.zeros((2, 3))
  y = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="dlr_loss needs at least 3 classes.*C=2"):
    attacks.dlr_loss(z2, y)
  with pytest.raises(ValueError, match="dlr_targeted_loss needs at least 4 classes.*C=3"):
    attacks.dlr_targeted_loss(z3, y, y + 1)


def test_dlr_fallback_warns_and_uses_ce():
  w = jnp.ones((D, 2))
  model2 = lambda x: _flat(x) @ w
  x, y = _images(0)
  y = y % 2
  key = jax.random.key(0)
  trace = lambda **kw: str(jax.make_jaxpr(
      lambda x: attacks.pgd(model2, x, y, key=key, eps=0.1, steps=2, **kw))(x))
  with pytest.warns(UserWarning, match="pgd: loss='dlr' needs at least 3 classes.*falling back"):
    dlr = trace(loss="dlr")
  assert dlr == trace(loss="ce")
  with pytest.warns(UserWarning, match="targeted DLR loss needs at least 4 classes"):
    jax.make_jaxpr(lambda x: attacks.apgd_targeted(mlp3, x, y, key=key, eps=0.1, steps=2))(x)


# ---------------------------------------------------------------------------
# Strength against closed-form answers on linear models.
# ---------------------------------------------------------------------------


def _linear_binary(norm, eps, n=64, gap=0.15, seed=0):
  """Linear 2-class model and n points, half robust and half not, analytically.

  For logits x.w_c + b_c the worst case of margin_y = (w_y - w_o).x + b_y - b_o
  over the ball (interior points, so [0, 1] never binds) is
  margin_y - eps * ||w_y - w_o||_1 (L-inf: each pixel by eps * sign) or
  margin_y - eps * ||w_y - w_o||_2 (L2: eps along (w_o - w_y) / ||.||).
  Points within `gap` of the decision boundary (relative) are left out.
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D, 2)).astype(np.float32)
  wd = w[:, 1] - w[:, 0]
  b = np.array([0.0, -0.5 * wd.sum()], np.float32)  # boundary through x = 0.5
  reach = np.abs(wd) * eps if norm == "linf" else np.abs(wd) / np.linalg.norm(wd) * eps
  x = rng.uniform(reach + 0.01, 1 - reach - 0.01, size=(4000, D)).astype(np.float32)
  z = x @ w + b
  y = z.argmax(1)
  scale = eps * (np.abs(wd).sum() if norm == "linf" else np.linalg.norm(wd))
  robust_margin = np.abs(z[:, 1] - z[:, 0]) - scale
  rob = np.flatnonzero(robust_margin > gap * scale)[: n // 2]
  non = np.flatnonzero(robust_margin < -gap * scale)[: n // 2]
  assert len(rob) == len(non) == n // 2
  idx = np.concatenate([rob, non])
  model = lambda x, w=jnp.asarray(w), b=jnp.asarray(b): _flat(x) @ w + b
  return model, jnp.asarray(x[idx].reshape(-1, H, W, CH)), jnp.asarray(y[idx]), robust_margin[idx] > 0


def _robust(model, adv, y):
  return np.asarray(jnp.argmax(model(adv), -1) == y)


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.1)])
def test_pgd_matches_analytic_robust_accuracy(norm, eps):
  model, x, y, robust = _linear_binary(norm, eps)
  adv = jax.jit(functools.partial(attacks.pgd, model, eps=eps, steps=20, norm=norm))(
      x, y, key=jax.random.key(0))
  # Exactly the analytic answer, point by point (robust accuracy 0.5).
  np.testing.assert_array_equal(_robust(model, adv, y), robust)


def test_square_linf_close_to_analytic():
  model, x, y, robust = _linear_binary("linf", 0.03)
  adv = jax.jit(functools.partial(attacks.square, model, eps=0.03, queries=300))(
      x, y, key=jax.random.key(0))
  found = _robust(model, adv, y)
  assert np.all(found[robust])            # cannot beat the optimum
  assert found.mean() <= robust.mean() + 2 / 64, (found.mean(), robust.mean())


def test_square_l2_in_ball_and_lowers_margin():
  # The L2 variant is simplified (flat windows, see square's docstring): test
  # only that it lowers the margin of every point and stays in the ball.
  model, x, y, _ = _linear_binary("l2", 0.1)
  adv = jax.jit(functools.partial(attacks.square, model, eps=0.1, queries=100, norm="l2"))(
      x, y, key=jax.random.key(0))
  assert np.all(_dist(adv, x, "l2") <= 0.1 * (1 + 1e-5))
  m_clean = attacks.cw_margin(model(x), y)
  m_adv = attacks.cw_margin(model(adv), y)
  assert np.all(np.asarray(m_adv) > np.asarray(m_clean))


def test_apgd_targeted_reaches_reachable_targets():
  """4 classes on disjoint pixel sets S_c: z_c = sum_{i in S_c} x_i.

  delta* = +eps on S_t, -eps elsewhere maximises z_t - z_j for every j at
  once, so target t is reachable iff z_t - max_{j != t} z_j + 2 * 12 * eps > 0.
  """
  rng = np.random.default_rng(1)
  eps, num_classes = 0.05, 4
  sets = np.zeros((D, num_classes), np.float32)
  sets[rng.permutation(D), np.repeat(np.arange(num_classes), D // num_classes)] = 1.0
  model = lambda x, s=jnp.asarray(sets): _flat(x) @ s
  x = rng.uniform(eps + 0.01, 1 - eps - 0.01, size=(4000, D)).astype(np.float32)
  z = x @ sets
  y = z.argmax(1)
  t = (y + rng.integers(1, num_classes, size=len(y))) % num_classes
  z_t = z[np.arange(len(y)), t]
  z_other = np.where(np.eye(num_classes, dtype=bool)[t], -np.inf, z).max(1)
  slack = z_t - z_other + 2 * (D // num_classes) * eps
  gap = 0.15 * 2 * (D // num_classes) * eps
  idx = np.concatenate([np.flatnonzero(slack > gap)[:32], np.flatnonzero(slack < -gap)[:32]])
  assert len(idx) == 64
  reachable = slack[idx] > 0
  adv = jax.jit(functools.partial(attacks.apgd_targeted, model, eps=eps, steps=10))(
      jnp.asarray(x[idx].reshape(-1, H, W, CH)), jnp.asarray(y[idx]),
      key=jax.random.key(0), target_labels=jnp.asarray(t[idx]))
  hit = np.asarray(jnp.argmax(model(adv), -1)) == t[idx]
  np.testing.assert_array_equal(hit, reachable)


# ---------------------------------------------------------------------------
# Ordering on a trained MLP: FGSM <= PGD <= APGD in strength.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mlp():
  rng = np.random.default_rng(0)
  num_classes, n = 3, 256 + 128
  means = rng.choice([-1.0, 1.0], size=(num_classes, D)).astype(np.float32)
  y = rng.integers(0, num_classes, size=n)
  x = np.clip(0.5 + 0.12 * means[y] + 0.12 * rng.normal(size=(n, D)), 0, 1).astype(np.float32)
  x, y = jnp.asarray(x.reshape(n, H, W, CH)), jnp.asarray(y.astype(np.int32))

  def apply(p, x):
    return jnp.tanh(_flat(x) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (D, 32)) / np.sqrt(D), "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, num_classes)) / np.sqrt(32),
            "b2": jnp.zeros(num_classes)}
  opt = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          apply(p, x[:256]), y[:256]).mean())(p)
      u, s = opt.update(g, s)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, opt.init(params)), length=300)[0][0]

  params = train(params)
  model = functools.partial(apply, params)
  return model, x[256:], y[256:]


def test_pgd_at_least_fgsm_and_apgd_at_least_pgd(trained_mlp):
  model, x, y = trained_mlp
  eps, key = 0.06, jax.random.key(0)
  clean = _robust(model, x, y).mean()
  acc = {
      "fgsm": _robust(model, jax.jit(functools.partial(attacks.fgsm, model, eps=eps))(x, y), y),
      "pgd": _robust(model, jax.jit(functools.partial(attacks.pgd, model, eps=eps, steps=10))(
          x, y, key=key), y),
      "apgd": _robust(model, jax.jit(functools.partial(attacks.apgd, model, eps=eps, steps=10))(
          x, y, key=key), y),
  }
  acc = {k: v.mean() for k, v in acc.items()}
  # Non-trivial regime: the model is accurate and the attacks bite.
  assert clean > 0.9 and 0.05 < acc["pgd"] < clean - 0.2, (clean, acc)
  assert acc["pgd"] <= acc["fgsm"] + 0.02, acc
  assert acc["apgd"] <= acc["pgd"] + 0.02, acc


# ---------------------------------------------------------------------------
# Compile once: the jaxpr does not grow with steps / queries.
# ---------------------------------------------------------------------------


def _jaxpr_text(fn, *args):
  # Numeric literals (the loop bound, checkpoint lengths) differ in digit count;
  # strip them so the comparison is about structure.
  return re.sub(r"\d+", "0", str(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("attack,arg", [(attacks.pgd, "steps"), (attacks.apgd, "steps"),
                                        (attacks.square, "queries")])
def test_jaxpr_size_independent_of_steps(attack, arg):
  x, y = _images(0)
  key = jax.random.key(0)
  sizes = [len(_jaxpr_text(
      lambda x: attack(mlp3, x, y, key=key, eps=0.1, **{arg: n}), x)) for n in (10, 1000)]
  assert sizes[0] == sizes[1], sizes


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


_X, _Y = _images(0)
_K = jax.random.key(0)
BAD = [
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=-0.1, steps=2), ValueError, "eps must be"),
    (lambda: attacks.fgsm(mlp3, _X, _Y, eps=float("nan")), ValueError, "eps must be"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=0), ValueError, "steps must be >= 1"),
    (lambda: attacks.apgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2.5), TypeError, "steps must be a Python int"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, restarts=0), ValueError, "restarts must be >= 1"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, norm="l1"), ValueError, "unknown norm 'l1'"),
    (lambda: attacks.apgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, loss="hinge"), ValueError, "unknown loss 'hinge'"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, step_size=-1.0), ValueError, "step_size must be"),
    (lambda: attacks.pgd(mlp3, _X[0], _Y, key=_K, eps=0.1, steps=2), ValueError, "images must be 4-D NHWC"),
    (lambda: attacks.pgd(mlp3, (_X * 255).astype(jnp.uint8), _Y, key=_K, eps=0.1, steps=2), TypeError, "images must be floating"),
    (lambda: attacks.pgd(mlp3, _X * 2, _Y, key=_K, eps=0.1, steps=2), ValueError, r"images must be finite and in \[0, 1\]"),
    (lambda: attacks.pgd(mlp3, _X, _Y[:, None], key=_K, eps=0.1, steps=2), ValueError, r"labels must have shape \(B,\)"),
    (lambda: attacks.pgd(mlp3, _X, _Y.astype(jnp.float32), key=_K, eps=0.1, steps=2), TypeError, "labels must be integer"),
    (lambda: attacks.pgd(mlp3, _X, _Y + 3, key=_K, eps=0.1, steps=2), ValueError, r"labels must be in \[0, C\)"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=jax.random.split(_K, 3), eps=0.1, steps=2), ValueError, "key must be one PRNG key or one per example"),
    (lambda: attacks.square(mlp3, _X, _Y, key=_K, eps=0.1, queries=0), ValueError, "queries must be >= 1"),
    (lambda: attacks.square(mlp3, _X, _Y, key=_K, eps=0.1, p_init=0.0), ValueError, "p_init must be"),
    (lambda: attacks.square(mlp3, _X[:, :1], _Y, key=_K, eps=0.1), ValueError, "at least 2x2"),
    (lambda: attacks.apgd_targeted(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, target_labels=_Y), ValueError, "target_labels must differ"),
    (lambda: attacks.apgd_targeted(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, num_targets=0), ValueError, "num_targets must be >= 1"),
    (lambda: attacks.pgd(lambda x: _flat(x), _X, _Y, key=_K, eps=0.1, steps=2), ValueError, r"labels must be in \[0, C\)"),
    (lambda: attacks.pgd(lambda x: x, _X, _Y, key=_K, eps=0.1, steps=2), ValueError, r"logits_fn must map images"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


# ---------------------------------------------------------------------------
# Transformations.
# ---------------------------------------------------------------------------


def test_jit_equals_eager():
  x, y = _images(3)
  key = jax.random.key(3)
  eager = attacks.pgd(mlp3, x, y, key=key, eps=0.1, steps=5)
  np.testing.assert_allclose(eager, ATTACKS["pgd-linf"][1](x, y, key, 0.1), atol=1e-6)


def test_vmap_over_batches_equals_per_batch():
  xs, ys = zip(*[_images(s) for s in (4, 5)])
  xs, ys = jnp.stack(xs), jnp.stack(ys)
  key, eps = jax.random.key(4), 0.1
  names = ["fgsm-linf", "pgd-l2", "apgd-linf", "square-linf"]

  @jax.jit
  def all_attacks(x, y):
    return [ATTACKS[n][1](x, y, key, eps) for n in names]

  batched = jax.vmap(all_attacks)(xs, ys)
  for n, out in zip(names, batched):
    for i in range(2):
      np.testing.assert_allclose(out[i], ATTACKS[n][1](xs[i], ys[i], key, eps), atol=1e-6,
                                 err_msg=n)


def test_per_example_keys_make_results_batch_independent_and_shard_map():
  # One key per example: a half batch gives the same rows as the full batch,
  # and jax.shard_map over a 'data' mesh gives the same as plain jit.
  x, y = _images(6)
  keys = jax.random.split(jax.random.key(6), B)
  attack = jax.jit(functools.partial(attacks.square, mlp3, eps=0.1, queries=20))
  full = attack(x, y, key=keys)
  np.testing.assert_array_equal(full[:2], attack(x[:2], y[:2], key=keys[:2]))
  mesh = jax.make_mesh((1,), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  sharded = jax.jit(jax.shard_map(
      lambda x, y, k: attacks.square(mlp3, x, y, key=k, eps=0.1, queries=20),
      mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec))(x, y, keys)
  np.testing.assert_allclose(sharded, full, atol=1e-6)
