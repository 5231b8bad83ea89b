"""Losses against float64 references written from the formulas, optax, and invariances.

The references below are written from the formulas of the authors' losses
(docs/design.md section 1; arXiv:2402.03627, karlieswift/Mattack lossfunctions.py),
in NumPy float64, values and analytic gradients, independently of prsl_jax.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from prsl_jax import losses
from tests import processes

IGNORE = -100


def _batch(seed=0, shape=(6,), c=7, scale=3.0, ignore=0):
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=shape + (c,)) * scale).astype(np.float32)
  y = rng.integers(0, c, shape)
  if ignore:
    flat = y.reshape(-1)
    flat[rng.choice(flat.size, ignore, replace=False)] = IGNORE
  return z, y


# ----------------------------------------------------------------------------
# Float64 references from the formulas.
# ----------------------------------------------------------------------------


def _softmax(v):
  e = np.exp(v - v.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _nll(v, label):
  """-log softmax(v)[label], computed stably."""
  return np.log(np.sum(np.exp(v - v.max()))) + v.max() - v[label]


def ref_prsl(z, y, start, end, a, b, group=None):
  """(value, d value / d z) of a * mean CE + b * x per group, groups averaged."""
  z = np.asarray(z, np.float64)
  shape = z.shape
  z, y = z.reshape(-1, shape[-1]), np.asarray(y).reshape(-1)
  n_rows, num_classes = z.shape
  group = group or n_rows
  grad = np.zeros_like(z)
  values = []
  width = end - start
  for g in range(n_rows // group):
    rows = [i for i in range(g * group, (g + 1) * group) if y[i] != IGNORE]
    n = len(rows)
    ce, m, windows = 0.0, [], []
    for i in rows:
      p = _softmax(z[i])
      ce += _nll(z[i], y[i]) / n
      grad[i] += a * (p - np.eye(num_classes)[y[i]]) / n
      wrong = [j for j in range(num_classes) if j != y[i]]
      order = sorted(wrong, key=lambda j: -z[i, j])[start:end]
      windows.append(order)
      m.append(np.mean(z[i, order]))
    m = np.array(m)
    x = n * np.log(np.sum(np.exp(m - m.max()))) + n * m.max() - m.sum()
    dx_dm = n * _softmax(m) - 1.0
    for r, i in enumerate(rows):
      grad[i, windows[r]] += b * dx_dm[r] / width
    values.append(a * ce + b * x)
  num_groups = n_rows // group
  return np.mean(values), (grad / num_groups).reshape(shape)


def ref_drsl(z, y, a, b):
  z = np.asarray(z, np.float64)
  shape = z.shape
  z, y = z.reshape(-1, shape[-1]), np.asarray(y).reshape(-1)
  num_classes = z.shape[-1]
  rows = [i for i in range(len(y)) if y[i] != IGNORE]
  n = len(rows)
  value, grad = 0.0, np.zeros_like(z)
  for i in rows:
    p = _softmax(z[i])
    value += a * _nll(z[i], y[i]) / n
    grad[i] += a * (p - np.eye(num_classes)[y[i]]) / n
    wrong = np.arange(num_classes) != y[i]
    mu = z[i, wrong].sum() / num_classes
    d = z[i, wrong] - mu
    value += b * np.sum(d * d)
    # d/dz_k sum_j (z_j - mu)^2 = 2 (z_k - mu) - (2 / C) sum_j (z_j - mu), j, k wrong.
    grad[i, wrong] += b * (2 * d - 2 * d.sum() / num_classes)
  return value, grad.reshape(shape)


def _value_and_grad(fn, z, y):
  v, g = jax.value_and_grad(lambda z: fn(z, jnp.asarray(y)))(jnp.asarray(z))
  return float(v), np.asarray(g, np.float64)


# ----------------------------------------------------------------------------
# The authors' PRSL and DRSL against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(0, 4), (0, 6), (4, 9), (6, 10), (0, 10), (11, 20)])
@pytest.mark.parametrize("weights", [(1.0, 1e-5), (1.0, 1e-3), (0.7, 0.3), (0.0, 1.0)])
def test_prsl_values_and_gradients_match_the_formula(window, weights):
  start, end = window
  a, b = weights
  z, y = _batch(sum(window), shape=(3, 5), c=23, ignore=3)
  fn = functools.partial(losses.prsl_loss, start=start, end=end, weight=b, ce_weight=a)
  value, grad = _value_and_grad(fn, z, y)
  want_value, want_grad = ref_prsl(z, y, start, end, a, b)
  np.testing.assert_allclose(value, want_value, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group", [2, 3, 6])
def test_prsl_group_size_blocks_are_averaged(group):
  z, y = _batch(7, shape=(12,), c=9, ignore=2)
  z, y = z, y
  y[0] = 1  # group 0 keeps a valid row whatever the draw
  for g in range(0, 12, group):
    y[g] = 3
  fn = functools.partial(losses.prsl_loss, start=1, end=5, weight=0.2, group_size=group)
  value, grad = _value_and_grad(fn, z, y)
  want_value, want_grad = ref_prsl(z, y, 1, 5, 1.0, 0.2, group=group)
  np.testing.assert_allclose(value, want_value, rtol=2e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  # ...and differs from one group over all rows (it is not a relabelling).
  assert abs(value - float(losses.prsl_loss(z, y, start=1, end=5, weight=0.2))) > 1e-3


@pytest.mark.parametrize("weights", [(1.0, 1e-3), (0.5, 2e-2)])
def test_drsl_values_and_gradients_match_the_formula(weights):
  a, b = weights
  z, y = _batch(11, shape=(2, 4), c=6, ignore=1)
  fn = functools.partial(losses.drsl_loss, weight=b, ce_weight=a)
  value, grad = _value_and_grad(fn, z, y)
  want_value, want_grad = ref_drsl(z, y, a, b)
  np.testing.assert_allclose(value, want_value, rtol=2e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_token_logits_equal_the_flattened_rows_and_ignored_rows_change_nothing():
  z, y = _batch(3, shape=(4, 6), c=11, ignore=5)
  flat = losses.prsl_loss(z.reshape(-1, 11), y.reshape(-1), start=0, end=4, weight=0.1)
  np.testing.assert_allclose(losses.prsl_loss(z, y, start=0, end=4, weight=0.1), flat,
                             rtol=1e-6)
  keep = y.reshape(-1) != IGNORE
  dropped = losses.prsl_loss(z.reshape(-1, 11)[keep], y.reshape(-1)[keep], start=0, end=4,
                             weight=0.1)
  np.testing.assert_allclose(flat, dropped, rtol=1e-6)
  # An ignored row's logits get no gradient, whatever they are.
  grad = jax.grad(lambda z: losses.prsl_loss(z, y, start=0, end=4, weight=0.1))(z)
  assert np.all(np.asarray(grad).reshape(-1, 11)[~keep] == 0)
  z2 = z.copy().reshape(-1, 11)
  z2[~keep] = 1e6
  np.testing.assert_allclose(losses.prsl_loss(z2, y.reshape(-1), start=0, end=4, weight=0.1),
                             flat, rtol=1e-6)
  np.testing.assert_allclose(losses.drsl_loss(z, y, weight=0.01),
                             losses.drsl_loss(z.reshape(-1, 11)[keep], y.reshape(-1)[keep],
                                              weight=0.01), rtol=1e-6)


def test_spread_is_at_least_n_log_n_with_equality_when_window_means_agree():
  # Each row's top-4 wrong logits average 2.0: x = n log n exactly.
  z = np.array([[9.0, 2.0, 2.0, 2.0, 2.0, -1.0],
                [1.0, 9.0, 3.0, 1.0, 3.0, -5.0],
                [2.5, 1.5, 9.0, 2.5, 1.5, -3.0]], np.float32)
  y = np.array([0, 1, 2])
  x = float(losses.prsl_loss(z, y, start=0, end=4, weight=1.0, ce_weight=0.0))
  np.testing.assert_allclose(x, losses.prsl_floor(3), rtol=1e-6)
  z[1, 2] += 1.0  # row 1's window mean moves: the spread grows
  assert float(losses.prsl_loss(z, y, start=0, end=4, weight=1.0, ce_weight=0.0)) > \
      losses.prsl_floor(3) + 1e-3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), shift=st.floats(-1e3, 1e3),
       start=st.integers(0, 3), width=st.integers(1, 4))
def test_spread_properties(seed, n, shift, start, width):
  z, y = _batch(seed, shape=(n,), c=9, scale=5.0)
  x = functools.partial(losses.prsl_loss, start=start, end=start + width, weight=1.0,
                        ce_weight=0.0)
  base = float(x(z, y))
  assert base >= losses.prsl_floor(n) - 1e-4 * max(1.0, n)
  # One constant added to every logit of every row: every m_i moves alike.
  np.testing.assert_allclose(float(x(z + np.float32(shift), y)), base, rtol=1e-4,
                             atol=1e-3 * max(1.0, abs(shift)) * 1e-3)
  if n > 1:
    moved = z.copy()
    moved[0] += 3.0  # one row alone: its m moves away from the others'
    assert abs(float(x(moved, y)) - base) > 1e-4


def test_stable_for_huge_logits_and_bfloat16():
  z, y = _batch(2, c=9, scale=1e4)
  for dtype in (jnp.float32, jnp.bfloat16):
    zz = jnp.asarray(z, dtype)
    for name, kw in (("prsl", dict(start=0, end=4, weight=1e-3)), ("drsl", dict(weight=1e-9)),
                     ("ce", {}), ("topk_variance", dict(k=3, weight=5.0)),
                     ("topk_ce", dict(k=3))):
      fn = losses.get_loss(name, **kw)
      value, grad = jax.value_and_grad(lambda z, fn=fn: fn(z, jnp.asarray(y)))(zz)
      assert value.dtype == jnp.float32 and np.isfinite(float(value)), (name, dtype)
      assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32))), name
  want, _ = ref_prsl(z, y, 0, 4, 1.0, 1e-3)
  np.testing.assert_allclose(float(losses.prsl_loss(z, y, weight=1e-3)), want, rtol=1e-5)


def test_jit_and_vmap():
  z, y = _batch(4, shape=(3, 5), c=8)
  fn = functools.partial(losses.prsl_loss, start=0, end=3, weight=0.5)
  np.testing.assert_allclose(jax.jit(fn)(z, y), fn(z, y), rtol=1e-6)
  per_group = jax.vmap(fn)(jnp.asarray(z), jnp.asarray(y))
  np.testing.assert_allclose(per_group.mean(), fn(z.reshape(15, 8), y.reshape(15),
                                                   group_size=5), rtol=1e-6)


# ----------------------------------------------------------------------------
# Cross-entropy, our ablations, the registry.
# ----------------------------------------------------------------------------


def test_cross_entropy_is_optax_and_prsl_with_zero_weight_is_mean_ce():
  z, y = _batch(1)
  want = optax.softmax_cross_entropy_with_integer_labels(z, y)
  np.testing.assert_allclose(losses.cross_entropy(z, y), want, rtol=1e-6)
  np.testing.assert_allclose(losses.prsl_loss(z, y, weight=0.0), np.mean(want), rtol=1e-6)
  np.testing.assert_allclose(losses.get_loss("ce")(z, y), np.mean(want), rtol=1e-6)
  z2, y2 = _batch(1, ignore=2)
  keep = y2 != IGNORE
  np.testing.assert_allclose(losses.mean_cross_entropy(z2, y2),
                             optax.softmax_cross_entropy_with_integer_labels(
                                 z2[keep], y2[keep]).mean(), rtol=1e-6)
  assert np.all(np.asarray(losses.cross_entropy(z2, y2))[~keep] == 0)


def test_topk_variance_ablation_by_hand():
  p = np.array([[0.4, 0.3, 0.2, 0.1]])
  z = jnp.asarray(np.log(p), jnp.float32)
  y = jnp.array([0])
  # N_2 = {1, 2}: v = (0.3, 0.2), mean 0.25, variance 0.05^2 = 0.0025.
  np.testing.assert_allclose(losses.topk_variance_loss(z, y, k=2, weight=2.0),
                             [-np.log(0.4) + 2 * 0.0025], rtol=1e-6)
  # Renormalised: v = (0.6, 0.4), variance 0.1^2 = 0.01.
  np.testing.assert_allclose(losses.topk_variance(z, y, k=2, renormalize=True), [0.01],
                             rtol=1e-5)
  # True class 3 (smallest): N_3 = {0, 1, 2}, v = (.4, .3, .2), variance 2/3 * 0.01.
  np.testing.assert_allclose(losses.topk_variance(z, jnp.array([3]), k=3), [0.02 / 3],
                             rtol=1e-5)
  # top-k CE over {0} and N_2 = {1, 2}: -log(0.4 / 0.9).
  np.testing.assert_allclose(losses.topk_cross_entropy(z, y, k=2), [-np.log(0.4 / 0.9)],
                             rtol=1e-6)


def test_out_of_range_labels_give_nan_under_jit_not_a_clipped_loss():
  z, _ = _batch(5, shape=(3,))
  bad = jnp.array([0, 7, 3])
  with pytest.raises(ValueError, match=r"labels must be in \[0, C\)"):
    losses.prsl_loss(z, bad)
  assert np.isnan(float(jax.jit(losses.prsl_loss)(z, bad)))
  assert np.isnan(float(jax.jit(losses.mean_cross_entropy)(z, bad)))
  per_row = jax.jit(losses.cross_entropy)(z, bad)
  assert np.isfinite(per_row[0]) and np.isnan(per_row[1])


@pytest.mark.parametrize("name,kw", [("prsl", {}), ("drsl", {}),
                                     ("topk_variance", {"k": 3})])
def test_invalid_traced_weight_gives_nan_under_jit_not_a_plausible_loss(name, kw):
  z, y = _batch(5, shape=(4,))
  fn = {"prsl": losses.prsl_loss, "drsl": losses.drsl_loss,
        "topk_variance": losses.topk_variance_loss}[name]
  run = jax.jit(lambda w: jnp.mean(fn(z, y, weight=w, **kw)))
  assert np.isfinite(float(run(0.5)))
  for bad in (-1.0, np.nan, np.inf):
    assert np.isnan(float(run(bad))), (name, bad)
  # Concrete values are refused with the argument's name (NumPy and JAX scalars too).
  for bad in (np.float32(-1.0), jnp.float32(-1.0), float("nan")):
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
      fn(z, y, weight=bad, **kw)


def test_contrastive_loss_symmetric_and_built_from_the_registry_loss():
  kx, kt = jax.random.split(jax.random.key(6))
  img = jax.random.normal(kx, (6, 8))
  txt = jax.random.normal(kt, (6, 8))
  kw = dict(start=0, end=3, weight=0.05)
  got = losses.contrastive_loss(img, txt, 10.0, loss="prsl", **kw)
  n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  logits = 10.0 * n(img) @ n(txt).T
  lab = jnp.arange(6)
  want = 0.5 * (losses.prsl_loss(logits, lab, **kw) + losses.prsl_loss(logits.T, lab, **kw))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, losses.contrastive_loss(txt, img, 10.0, loss="prsl", **kw),
                             rtol=1e-5)
  ce = losses.contrastive_loss(img, txt, 10.0)
  want_ce = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()
                   + optax.softmax_cross_entropy_with_integer_labels(logits.T, lab).mean())
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda z, y: losses.prsl_loss(z, y, start=4, end=4), ValueError, "0 <= start < end"),
    (lambda z, y: losses.prsl_loss(z, y, start=0, end=7), ValueError, "C-1 = 6"),
    (lambda z, y: losses.prsl_loss(z, y, start=-1, end=3), ValueError, "0 <= start"),
    (lambda z, y: losses.prsl_loss(z, y, end=2.0), TypeError, "end must be an integer"),
    (lambda z, y: losses.prsl_loss(z, y, weight=-1e-3), ValueError, "weight must be"),
    (lambda z, y: losses.prsl_loss(z, y, weight=np.float32(-1)), ValueError, "weight"),
    (lambda z, y: losses.prsl_loss(z, y, weight=jnp.float32(np.nan)), ValueError, "finite"),
    (lambda z, y: losses.prsl_loss(z, y, ce_weight=-1.0), ValueError, "ce_weight"),
    (lambda z, y: losses.prsl_loss(z, y, group_size=4), ValueError, "group_size=4 must divide"),
    (lambda z, y: losses.prsl_loss(z, np.full(6, IGNORE)), ValueError, "no row whose label"),
    (lambda z, y: losses.prsl_loss(z, np.r_[np.full(3, IGNORE), y[3:]], group_size=3),
     ValueError, "group 0"),
    (lambda z, y: losses.prsl_loss(z, y[:3]), ValueError, "labels must have shape"),
    (lambda z, y: losses.prsl_loss(z, y.astype(np.float32)), TypeError, "integer"),
    (lambda z, y: losses.prsl_loss(z.astype(np.int32), y), TypeError, "floating"),
    (lambda z, y: losses.drsl_loss(z, y, weight=-2.0), ValueError, "weight"),
    (lambda z, y: losses.topk_variance_loss(z, y, k=7, weight=1.0), ValueError, "k must be <= 6"),
    (lambda z, y: losses.get_loss("hinge"), ValueError, "unknown loss 'hinge'"),
    (lambda z, y: losses.get_loss("prsl", k=3), ValueError, "unknown argument"),
    (lambda z, y: losses.get_loss("prsl", start=5, end=2), ValueError, "start < end"),
])
def test_bad_arguments_name_the_problem(call, exc, match):
  z, y = _batch()
  with pytest.raises(exc, match=match):
    call(z, y)


def test_numpy_integer_window_and_k_are_accepted():
  z, y = _batch()
  np.testing.assert_allclose(losses.prsl_loss(z, y, start=np.int64(0), end=np.int64(3)),
                             losses.prsl_loss(z, y, start=0, end=3), rtol=1e-7)
  np.testing.assert_allclose(losses.topk_cross_entropy(z, y, k=np.int64(3)),
                             losses.topk_cross_entropy(z, y, k=3), rtol=1e-7)


# ----------------------------------------------------------------------------
# Data parallelism: 8 simulated devices with axis_name equal one device.
# ----------------------------------------------------------------------------

_SHARDED = textwrap.dedent("""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from prsl_jax import losses
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    z = rng.normal(size=(32, 5, 13)).astype(np.float32) * 3
    y = rng.integers(0, 13, (32, 5))
    y[rng.random((32, 5)) < 0.2] = -100
    y[:, 0] = 1
    out = {}
    cases = {"prsl": dict(start=0, end=4, weight=0.05), "prsl_g4": dict(start=1, end=6,
             weight=0.3, group_size=4), "drsl": dict(weight=0.01), "ce": {}}
    for name, kw in cases.items():
      fn = losses.get_loss(name.split("_")[0], **kw)
      one = jax.value_and_grad(lambda z: fn(z, jnp.asarray(y)))(jnp.asarray(z))
      def shard(z, y):
        v, g = jax.value_and_grad(lambda z: fn(z, y, axis_name="data"))(z)
        # Every device computes the same global loss, and the transposes of its
        # psums sum the 8 devices' cotangents: a shard's gradient w.r.t. its own
        # rows is 8x the global one (the trainer's pmean over the params'
        # gradients divides it back).
        return v, g / 8
      v8, g8 = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P("data"), P("data")),
                                     out_specs=(P(), P("data")), check_vma=False))(z, y)
      g8 = np.asarray(g8)
      out[name] = [float(one[0]), float(v8), float(np.max(np.abs(np.asarray(one[1]) - g8)))]
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_equal_one_device_values_and_gradients():
  env = processes.env(8)
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for name, (one, eight, grad_diff) in out.items():
    np.testing.assert_allclose(eight, one, rtol=1e-5, err_msg=name)
    assert grad_diff < 1e-6, (name, grad_diff)
