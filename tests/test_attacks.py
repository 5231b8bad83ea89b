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

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prsl_jax import attacks

B, H, W, CH = 64, 4, 4, 3
D = H * W * CH
HYP = settings(max_examples=12, deadline=None, derandomize=True)


def _flat(x):
  return x.reshape(x.shape[0], -1)


def model(params, x):
  """3-class logits x.w0 + b0 + tanh(x.w1 + b1).w2: one family for all tests.

  Params are traced arguments of the jitted attacks below, so a random MLP, a
  linear model (w1 = w2 = 0) and a trained MLP share one compilation per attack.
  """
  x = _flat(x)
  return x @ params["w0"] + params["b0"] + jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _params(w0=None, b0=None, w1=None, b1=None, w2=None):
  z = lambda *s: np.zeros(s, np.float32)
  p = dict(w0=z(D, 3) if w0 is None else w0, b0=z(3) if b0 is None else b0,
           w1=z(D, 16) if w1 is None else w1, b1=z(16) if b1 is None else b1,
           w2=z(16, 3) if w2 is None else w2)
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


# A fixed random tanh MLP: non-linear, so restarts and momentum matter.
_r = np.random.default_rng(0)
RANDOM_MLP = _params(w1=_r.normal(size=(D, 16)) * 0.6, b1=_r.normal(size=(16,)),
                     w2=_r.normal(size=(16, 3)) * 2.0)
mlp3 = functools.partial(model, RANDOM_MLP)


def _images(seed, batch=B):
  """Random images in [0, 1], some pixels exactly 0 or 1 to exercise clipping."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, H, W, CH)).astype(np.float32)
  x[rng.uniform(size=x.shape) < 0.1] = 0.0
  x[rng.uniform(size=x.shape) < 0.1] = 1.0
  y = rng.integers(0, 3, size=(batch,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _jit(attack, **static):
  """jit(attack on model(params)) with (params, images, labels, key, eps) traced."""
  if attack is attacks.fgsm:
    return jax.jit(lambda p, x, y, key, eps: attack(
        functools.partial(model, p), x, y, eps=eps, **static))
  return jax.jit(lambda p, x, y, key, eps: attack(
      functools.partial(model, p), x, y, key=key, eps=eps, **static))


STEPS = 5
ATTACKS = {
    "fgsm-linf": ("linf", _jit(attacks.fgsm)),
    "pgd-linf": ("linf", _jit(attacks.pgd, steps=STEPS)),
    "pgd-l2": ("l2", _jit(attacks.pgd, steps=STEPS, norm="l2")),
    "apgd-linf": ("linf", _jit(attacks.apgd, steps=STEPS)),
    "apgd-l2": ("l2", _jit(attacks.apgd, steps=STEPS, norm="l2")),
    "square-linf": ("linf", _jit(attacks.square, queries=300)),
    "square-l2": ("l2", _jit(attacks.square, queries=100, norm="l2")),
}


def _run(name, params, x, y, key, eps):
  return ATTACKS[name][1](params, x, y, key, eps)


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
  norm = ATTACKS[name][0]
  x, y = _images(seed)
  key = jax.random.key(seed)
  adv = _run(name, RANDOM_MLP, x, y, key, eps)
  assert adv.shape == x.shape and adv.dtype == jnp.float32
  a = np.asarray(adv)
  assert np.all(np.isfinite(a)) and a.min() >= 0.0 and a.max() <= 1.0
  # float32 rounding of x0 + delta may add a few ulps beyond eps.
  assert np.all(_dist(adv, x, norm) <= eps * (1 + 1e-5) + 1e-6)
  # Same key -> bit-identical output.
  np.testing.assert_array_equal(a, np.asarray(_run(name, RANDOM_MLP, x, y, key, eps)))
  # eps = 0 -> the input, exactly.
  np.testing.assert_array_equal(
      np.asarray(_run(name, RANDOM_MLP, x, y, key, 0.0)), np.asarray(x))


RESTARTS3 = {"pgd": _jit(attacks.pgd, steps=STEPS, restarts=3),
             "apgd": _jit(attacks.apgd, steps=STEPS, restarts=3)}


def _level_and_ce(adv, y):
  logits = mlp3(adv)
  return np.asarray(jnp.argmax(logits, -1) != y), np.asarray(attacks.ce_objective(logits, y))


@pytest.mark.parametrize("name", list(RESTARTS3))
@HYP
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.02, 0.3))
def test_restarts_never_weaken(name, seed, eps):
  x, y = _images(seed)
  key = jax.random.key(seed)
  # Restart r is keyed fold_in(key, r), so restarts=3 contains restarts=1's run
  # and keeps, per example, misclassified first, then the higher objective.
  s1, f1 = _level_and_ce(_run(name + "-linf", RANDOM_MLP, x, y, key, eps), y)
  s3, f3 = _level_and_ce(RESTARTS3[name](RANDOM_MLP, x, y, key, eps), y)
  assert np.all(s3 >= s1)
  same = s3 == s1
  assert np.all(f3[same] >= f1[same] - 1e-5), (f1[same], f3[same])


def test_restarts_help_somewhere():
  # Guards the test above against a no-op: extra restarts do find better points.
  x, y = _images(1)
  gains = []
  for seed in range(3):
    key = jax.random.key(seed)
    _, f1 = _level_and_ce(_run("pgd-linf", RANDOM_MLP, x, y, key, 0.1), y)
    _, f3 = _level_and_ce(RESTARTS3["pgd"](RANDOM_MLP, x, y, key, 0.1), y)
    gains.append(f3 - f1)
  assert np.max(gains) > 1e-3


def _pgd_fixed_path(steps):
  # No random start and a step as wide as the ball: a deterministic path that
  # oscillates between corners, so its last iterate is often not its best.
  return jax.jit(lambda x, y, eps: attacks.pgd(
      mlp3, x, y, key=jax.random.key(0), eps=eps, steps=steps, step_size=eps,
      random_start=False))


PGD_PATH = {n: _pgd_fixed_path(n) for n in (3, 8)}


@HYP
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.05, 0.4))
def test_pgd_returns_best_iterate_not_last(seed, eps):
  # The 8-step path extends the 3-step one, so its best iterate is at least as
  # strong (misclassified first, then objective); a last-iterate PGD fails this.
  x, y = _images(seed)
  s3, f3 = _level_and_ce(PGD_PATH[3](x, y, eps), y)
  s8, f8 = _level_and_ce(PGD_PATH[8](x, y, eps), y)
  assert np.all(s8 >= s3)
  same = s8 == s3
  assert np.all(f8[same] >= f3[same] - 1e-5)


# ---------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------


def test_objectives_by_hand():
  z = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
  y, t = jnp.array([0, 0]), jnp.array([1, 2])

  @jax.jit  # one compilation instead of one per eager op
  def values(z):
    return dict(cw=attacks.cw_margin(z, y), dlr=attacks.dlr_loss(z, y),
                dlr_t=attacks.dlr_targeted_loss(z, y, t), ce=attacks.ce_objective(z, y),
                ce_ref=optax.softmax_cross_entropy_with_integer_labels(z, y),
                dlr_bf16=attacks.dlr_loss(z.astype(jnp.bfloat16), y),
                dlr_affine=attacks.dlr_loss(7 * z + 3, y))

  v = values(z)
  np.testing.assert_allclose(v["cw"], [1.0 - 3.0, 2.0 - 0.0])
  np.testing.assert_allclose(v["dlr"], [-(3 - 1) / (3 - 0), (2 - 0) / (2 - 0.5)], rtol=1e-6)
  np.testing.assert_allclose(
      v["dlr_t"], [-(3 - 1) / (3 - 0.5 * (0 - 1)), -(0 - 1) / (2 - 0.5 * (0.5 + 0))], rtol=1e-6)
  np.testing.assert_allclose(v["ce"], v["ce_ref"], rtol=1e-6)
  # float32 whatever the logits dtype; DLR is invariant to scale and shift.
  assert v["dlr_bf16"].dtype == jnp.float32
  np.testing.assert_allclose(v["dlr_affine"], v["dlr"], rtol=1e-5)


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


def _linear_binary(norm, eps, n=B, gap=0.15, seed=0):
  """A linear 2-class model (a third class pinned at -1000) and n points, half
  robust and half not, by the closed form.

  For logits x.w_c + b_c the worst case of margin_y = (w_y - w_o).x + b_y - b_o
  over the ball (interior points, so [0, 1] never binds) is
  margin_y - eps * ||w_y - w_o||_1 (L-inf: each pixel by eps * sign) or
  margin_y - eps * ||w_y - w_o||_2 (L2: eps along (w_o - w_y) / ||.||).
  Points within `gap` (relative) of that boundary are left out.
  """
  rng = np.random.default_rng(seed)
  w = np.concatenate([rng.normal(size=(D, 2)), np.zeros((D, 1))], 1).astype(np.float32)
  wd = w[:, 1] - w[:, 0]
  b = np.array([0.0, -0.5 * wd.sum(), -1000.0], np.float32)  # boundary through x = 0.5
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
  return (_params(w0=w, b0=b), jnp.asarray(x[idx].reshape(-1, H, W, CH)),
          jnp.asarray(y[idx].astype(np.int32)), robust_margin[idx] > 0)


def _robust(params, adv, y):
  return np.asarray(jnp.argmax(model(params, adv), -1) == y)


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.1)])
def test_pgd_matches_analytic_robust_accuracy(norm, eps):
  params, x, y, robust = _linear_binary(norm, eps)
  adv = _run("pgd-" + norm, params, x, y, jax.random.key(0), eps)
  # Exactly the analytic answer, point by point (robust accuracy 0.5).
  np.testing.assert_array_equal(_robust(params, adv, y), robust)


def test_square_linf_close_to_analytic():
  params, x, y, robust = _linear_binary("linf", 0.03)
  found = _robust(params, _run("square-linf", params, x, y, jax.random.key(0), 0.03), y)
  assert np.all(found[robust])            # cannot beat the optimum
  assert found.mean() <= robust.mean() + 2 / B, (found.mean(), robust.mean())


def test_square_l2_lowers_margin():
  # The L2 variant is simplified (flat windows, see square's docstring) and
  # random search converges slowly on an unstructured linear model: test that
  # it lowers the margin of every point, in the ball.
  params, x, y, _ = _linear_binary("l2", 0.1)
  adv = _run("square-l2", params, x, y, jax.random.key(0), 0.1)
  assert np.all(_dist(adv, x, "l2") <= 0.1 * (1 + 1e-5))
  m_clean = attacks.cw_margin(model(params, x), y)
  m_adv = attacks.cw_margin(model(params, adv), y)
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
  linear4 = lambda x, s=jnp.asarray(sets): _flat(x) @ s
  x = rng.uniform(eps + 0.01, 1 - eps - 0.01, size=(4000, D)).astype(np.float32)
  z = x @ sets
  y = z.argmax(1)
  t = (y + rng.integers(1, num_classes, size=len(y))) % num_classes
  z_t = z[np.arange(len(y)), t]
  z_other = np.where(np.eye(num_classes, dtype=bool)[t], -np.inf, z).max(1)
  slack = z_t - z_other + 2 * (D // num_classes) * eps
  gap = 0.2 * 2 * (D // num_classes) * eps
  idx = np.concatenate([np.flatnonzero(slack > gap)[:32], np.flatnonzero(slack < -gap)[:32]])
  assert len(idx) == 64
  reachable = slack[idx] > 0
  # The targeted DLR can push a third class over the target before the target
  # itself wins (its denominator rewards raising z_pi3, z_pi4); 20 steps give it
  # room, and the iterate that reaches the target is preferred when one does.
  adv = jax.jit(functools.partial(attacks.apgd_targeted, linear4, eps=eps, steps=20))(
      jnp.asarray(x[idx].reshape(-1, H, W, CH)), jnp.asarray(y[idx].astype(np.int32)),
      key=jax.random.key(0), target_labels=jnp.asarray(t[idx].astype(np.int32)))
  hit = np.asarray(jnp.argmax(linear4(adv), -1)) == t[idx]
  np.testing.assert_array_equal(hit, reachable)


# ---------------------------------------------------------------------------
# Ordering on a trained MLP: FGSM <= PGD <= APGD in strength.
# ---------------------------------------------------------------------------


def _trained_mlp():
  """A few hundred Adam steps on 3 separable Gaussian blobs (fixed seed)."""
  rng = np.random.default_rng(0)
  n = 256 + 2 * B
  means = rng.choice([-1.0, 1.0], size=(3, D)).astype(np.float32)
  y = rng.integers(0, 3, size=n).astype(np.int32)
  x = np.clip(0.5 + 0.12 * means[y] + 0.12 * rng.normal(size=(n, D)), 0, 1).astype(np.float32)
  x, y = jnp.asarray(x.reshape(n, H, W, CH)), jnp.asarray(y)
  params = _params(w1=rng.normal(size=(D, 16)) / np.sqrt(D), w2=rng.normal(size=(16, 3)) / 4)
  opt = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model(p, x[:256]), y[:256]).mean())(p)
      u, s = opt.update(g, s)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, opt.init(params)), length=300)[0][0]

  return train(params), x[256:], y[256:]


def test_pgd_at_least_fgsm_and_apgd_at_least_pgd():
  params, x, y = _trained_mlp()
  eps, key = 0.1, jax.random.key(0)
  halves = [(x[:B], y[:B]), (x[B:], y[B:])]   # two batches of B: reuse the compiled attacks
  acc = {name: np.mean([_robust(params, _run(name, params, xb, yb, key, eps), yb)
                        for xb, yb in halves])
         for name in ("fgsm-linf", "pgd-linf", "apgd-linf")}
  clean = np.mean(_robust(params, x, y))
  # Non-trivial regime: the model is accurate and the attacks bite.
  assert clean > 0.9 and 0.05 < acc["pgd-linf"] < clean - 0.2, (clean, acc)
  assert acc["pgd-linf"] <= acc["fgsm-linf"] + 0.02, acc
  assert acc["apgd-linf"] <= acc["pgd-linf"] + 0.02, acc


# ---------------------------------------------------------------------------
# Compile once: the jaxpr does not grow with steps / queries.
# ---------------------------------------------------------------------------


def _jaxpr_text(fn, *args):
  # Numeric literals (the loop bound, APGD's checkpoint lengths) differ in digit
  # count, and the printer re-wraps lines around them: normalise both, so the
  # comparison is about structure. An unrolled loop would be ~100x longer.
  return re.sub(r"\s+", "", re.sub(r"\d+", "0", str(jax.make_jaxpr(fn)(*args))))


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
    (lambda: attacks.apgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2.5), TypeError, "steps must be an integer"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, restarts=0), ValueError, "restarts must be >= 1"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, norm="l1"), ValueError, "unknown norm 'l1'"),
    (lambda: attacks.apgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, loss="hinge"), ValueError, "unknown loss 'hinge'"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, step_size=-1.0), ValueError, "step_size must be"),
    (lambda: attacks.pgd(mlp3, _X[0], _Y, key=_K, eps=0.1, steps=2), ValueError, "images must be 4-D NHWC"),
    (lambda: attacks.pgd(mlp3, (_X * 255).astype(jnp.uint8), _Y, key=_K, eps=0.1, steps=2), TypeError, "images must be floating"),
    (lambda: attacks.pgd(mlp3, _X * 2, _Y, key=_K, eps=0.1, steps=2), ValueError, r"images must be in \[0, 1\]"),
    (lambda: attacks.pgd(mlp3, _X.at[0, 0, 0, 0].set(jnp.nan), _Y, key=_K, eps=0.1, steps=2), ValueError, "1 values are NaN or inf"),
    (lambda: attacks.pgd(mlp3, _X[:0], _Y[:0], key=_K, eps=0.1, steps=2), ValueError, "empty batch"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=_K, eps=4, steps=2), ValueError, "4/255, not 4"),
    (lambda: attacks.fgsm(mlp3, _X, _Y, eps=np.float32(-1)), ValueError, "eps must be"),
    (lambda: attacks.pgd(mlp3, _X, _Y[:, None], key=_K, eps=0.1, steps=2), ValueError, r"logits_fn must map images"),
    (lambda: attacks.pgd(mlp3, _X, _Y.astype(jnp.float32), key=_K, eps=0.1, steps=2), TypeError, "labels must be integer"),
    (lambda: attacks.pgd(mlp3, _X, _Y + 3, key=_K, eps=0.1, steps=2), ValueError, r"labels must be in \[0, C\)"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=jax.random.split(_K, 3), eps=0.1, steps=2), ValueError, "key must be one PRNG key or one per example"),
    (lambda: attacks.pgd(mlp3, _X, _Y, key=None, eps=0.1, steps=2), ValueError, "key is required"),
    (lambda: attacks.apgd_targeted(mlp3, _X, _Y[:, None] * 0, key=_K, eps=0.1, steps=2), ValueError, "labels must be"),
    (lambda: attacks.square(mlp3, _X, _Y, key=_K, eps=0.1, queries=0), ValueError, "queries must be >= 1"),
    (lambda: attacks.square(mlp3, _X, _Y, key=_K, eps=0.1, p_init=0.0), ValueError, "p_init must be"),
    (lambda: attacks.square(mlp3, _X[:, :1], _Y, key=_K, eps=0.1), ValueError, "at least 2x2"),
    (lambda: attacks.apgd_targeted(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, target_labels=_Y), ValueError, "target_labels must differ"),
    (lambda: attacks.apgd_targeted(mlp3, _X, _Y, key=_K, eps=0.1, steps=2, num_targets=0), ValueError, "num_targets must be >= 1"),
    (lambda: attacks.pgd(lambda x: _flat(x)[:, :1], _X, _Y, key=_K, eps=0.1, steps=2), ValueError, "at least 2 classes"),
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
  eager = attacks.pgd(mlp3, x, y, key=key, eps=0.1, steps=STEPS)
  np.testing.assert_allclose(eager, _run("pgd-linf", RANDOM_MLP, x, y, key, 0.1), atol=1e-6)


def test_vmap_over_batches_equals_per_batch():
  xs, ys = zip(*[_images(s) for s in (4, 5)])
  xs, ys = jnp.stack(xs), jnp.stack(ys)
  key, eps = jax.random.key(4), 0.1
  names = ["apgd-linf", "square-linf"]
  batched = jax.jit(jax.vmap(
      lambda x, y: [_run(n, RANDOM_MLP, x, y, key, eps) for n in names]))(xs, ys)
  for n, out in zip(names, batched):
    for i in range(2):
      np.testing.assert_allclose(out[i], _run(n, RANDOM_MLP, xs[i], ys[i], key, eps),
                                 atol=1e-6, err_msg=n)


def test_per_example_keys_batch_independent_under_shard_map():
  # With one key per example, an example's result does not depend on its batch:
  # the full batch under jax.shard_map (a 'data' mesh) equals batches of one.
  x, y = _images(6)
  keys = jax.random.split(jax.random.key(6), B)
  attack = lambda x, y, k: attacks.pgd(mlp3, x, y, key=k, eps=0.1, steps=STEPS, norm="l2")
  mesh = jax.make_mesh((1,), ("data",))
  spec = jax.sharding.PartitionSpec("data")
  x, y, keys = jax.device_put((x, y, keys), jax.sharding.NamedSharding(mesh, spec))
  full = jax.jit(jax.shard_map(attack, mesh=mesh, in_specs=(spec, spec, spec),
                               out_specs=spec))(x, y, keys)
  ones = jax.jit(jax.vmap(lambda x, y, k: attack(x[None], y[None], k[None])[0]))(x, y, keys)
  np.testing.assert_allclose(full, ones, atol=1e-6)
  assert not np.array_equal(full, x)   # the attack did move the images


def test_invalid_traced_eps_or_labels_give_nan_images_not_plausible_ones():
  x, y = _images(7)
  key = jax.random.key(7)
  for attack in (lambda x, y, e: attacks.pgd(mlp3, x, y, key=key, eps=e, steps=2),
                 lambda x, y, e: attacks.apgd(mlp3, x, y, key=key, eps=e, steps=2),
                 lambda x, y, e: attacks.square(mlp3, x, y, key=key, eps=e, queries=3),
                 lambda x, y, e: attacks.bim(mlp3, x, y, eps=e, steps=2)):
    run = jax.jit(attack)
    assert np.all(np.isnan(np.asarray(run(x, y, -0.1))))
    assert np.all(np.isfinite(np.asarray(run(x, y, 0.1))))
    bad = y.at[2].set(5)  # C = 3: out of range, which jit cannot raise on
    out = np.asarray(run(x, bad, 0.1))
    assert np.all(np.isnan(out[2])) and np.all(np.isfinite(np.delete(out, 2, axis=0)))


# ---------------------------------------------------------------------------
# The paper's protocol and token-level objectives.
# ---------------------------------------------------------------------------


def test_bim_on_a_linear_model_is_a_sign_step_along_the_training_loss_gradient():
  # Linear logits z = x W; one BIM step of size a from x0 is x0 + a sign(dL/dx),
  # with L the batch loss (the authors' PRSL over the rows), computed by hand:
  # dL/dz from the formula, dL/dx = dL/dz W^T.
  from prsl_jax import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b, h, c = 6, 4, 7
  w = rng.normal(size=(h * h * 3, c)).astype(np.float32)
  x = rng.uniform(0.2, 0.8, (b, h, h, 3)).astype(np.float32)
  z = x.reshape(b, -1) @ w
  y = np.argmax(z, -1)  # the label is the model's clean prediction (the paper's)
  start, end, a_w, b_w = 0, 3, 1.0, 0.5
  # dL/dz by hand: CE part (softmax - onehot)/n; spread part b (n softmax(m) - 1)/width
  # on each row's window of top wrong-class logits.
  zz = z.astype(np.float64)
  p = np.exp(zz - zz.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = a_w * (p - np.eye(c)[y]) / b
  m, windows = [], []
  for i in range(b):
    wrong = [j for j in range(c) if j != y[i]]
    win = sorted(wrong, key=lambda j: -zz[i, j])[start:end]
    windows.append(win)
    m.append(zz[i, win].mean())
  m = np.array(m)
  sm = np.exp(m - m.max())
  sm /= sm.sum()
  for i in range(b):
    dz[i, windows[i]] += b_w * (b * sm[i] - 1) / (end - start)
  dx = (dz @ w.T).reshape(x.shape)
  step = 1e-3  # small: the step stays in the linear regime and inside the ball
  want = np.clip(x + step * np.sign(dx), x - 0.1, x + 0.1)
  loss = losses.get_loss("prsl", start=start, end=end, weight=b_w, ce_weight=a_w)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
  got = attacks.pgd(logits_fn, x, y, key=None, eps=0.1, steps=1, step_size=step,
                    random_start=False, loss=loss)
  # pgd returns the best iterate per example, ranked by that row's CE: the
  # stepped point where the step raised the row's CE, else the start.
  got = np.asarray(got)
  ce = lambda x: np.asarray(attacks.ce_objective(logits_fn(x), y))
  stepped = ce(want) > ce(x)
  assert stepped.sum() >= b - 2  # the hand step raises most rows' CE
  np.testing.assert_allclose(got[stepped], want[stepped], atol=1e-7)
  np.testing.assert_array_equal(got[~stepped], x[~stepped])
  # bim is that attack (10 steps by default): each of its steps is such a step.
  ten = attacks.bim(logits_fn, x, y, eps=0.1, steps=10, loss=loss)
  assert np.all(np.abs(ten - x) <= 0.1 + 1e-6) and not np.allclose(ten, x)


def test_token_level_objectives_average_valid_positions_and_ignore_padding():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 5, 11)).astype(np.float32)
  y = rng.integers(0, 11, (3, 5))
  y[0, 3:] = -100
  y[2, :] = -100
  ce = attacks.ce_objective(z, y)
  from prsl_jax import losses  # pylint: disable=g-import-not-at-top
  rows = np.asarray(losses.cross_entropy(z, y))
  np.testing.assert_allclose(ce[0], rows[0, :3].mean(), rtol=1e-6)
  np.testing.assert_allclose(ce[1], rows[1].mean(), rtol=1e-6)
  assert float(ce[2]) == 0.0  # nothing valid: scores 0
  cw = attacks.cw_margin(z, y)
  assert cw.shape == (3,) and np.isfinite(np.asarray(cw)).all()


def test_attacks_on_token_logits_raise_the_caption_loss_and_stay_in_the_ball():
  # A toy "captioner": token logits (B, T, V) linear in the image.
  rng = np.random.default_rng(2)
  b, t, v = 4, 3, 6
  w = rng.normal(size=(4 * 4 * 3, t * v)).astype(np.float32)
  logits_fn = lambda x: (x.reshape(x.shape[0], -1) @ w).reshape(-1, t, v)
  x = rng.uniform(0, 1, (b, 4, 4, 3)).astype(np.float32)
  caption = np.array(jnp.argmax(logits_fn(x), -1))  # the clean "caption"
  caption[1, 2] = -100
  eps = 4 / 255
  for attack in (lambda: attacks.pgd(logits_fn, x, caption, key=jax.random.key(0), eps=eps,
                                     steps=5),
                 lambda: attacks.apgd(logits_fn, x, caption, key=jax.random.key(0), eps=eps,
                                      steps=5),
                 lambda: attacks.bim(logits_fn, x, caption, eps=eps)):
    adv = np.asarray(attack())
    assert np.all(np.abs(adv - x) <= eps + 1e-6) and adv.min() >= 0 and adv.max() <= 1
    assert np.all(np.asarray(attacks.ce_objective(logits_fn(adv), caption))
                  > np.asarray(attacks.ce_objective(logits_fn(x), caption)))
  # Targeted: lower the loss of a target caption.
  target = (caption + 1) % v
  target[1, 2] = -100
  adv = attacks.pgd(logits_fn, x, target, key=jax.random.key(1), eps=eps, steps=5,
                    targeted=True)
  assert np.all(np.asarray(attacks.ce_objective(logits_fn(adv), target))
                < np.asarray(attacks.ce_objective(logits_fn(x), target)))


@pytest.mark.parametrize("attack,arg", [(attacks.pgd, "steps"), (attacks.apgd, "steps"),
                                        (attacks.square, "queries")])
def test_max_iterations_traced_one_compilation_and_full_count_is_the_default(attack, arg):
  x, y = _images(8)
  key = jax.random.key(8)
  n = 6
  full = attack(mlp3, x, y, key=key, eps=0.1, **{arg: n})
  run = jax.jit(lambda it: attack(mlp3, x, y, key=key, eps=0.1, max_iterations=it,
                                  **{arg: n}))
  np.testing.assert_allclose(run(n), full, atol=1e-6)
  np.testing.assert_allclose(run(10 * n), full, atol=1e-6)  # capped at the schedule's n
  early = run(1)
  assert not np.allclose(early, full)  # it did stop early
  assert run._cache_size() == 1  # pylint: disable=protected-access
