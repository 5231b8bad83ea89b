"""Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prsl_jax.attacks import core
from prsl_jax.attacks import objectives

# Square attack p schedule (Andriushchenko et al. 2020, official code): p_init is
# halved each time it = floor(i / queries * 10000) passes one of these bounds.
_SQUARE_P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SQUARE_TRIES = 8        # colour re-draws when a window would not change (see square)


def _square_p(p_init, i, queries):
  """The paper's piecewise-constant schedule of p, the fraction of pixels changed."""
  # Float, not i * 10000 // queries: that int32 product overflows past 214k queries.
  it = jnp.floor(i * (10000.0 / queries))
  halvings = jnp.sum(it > jnp.array(_SQUARE_P_BOUNDS, jnp.float32))
  return p_init * 2.0 ** (-halvings.astype(jnp.float32))


def _uniforms(keys, n):
  """(B, n) uniforms in [0, 1), one draw per example: all the randomness of a
  query comes from one call, which keeps the loop body (and its compile) small."""
  return core.draw(functools.partial(jax.random.uniform, dtype=jnp.float32), keys, (n,))


def _window(u_row, u_col, size, height, width):
  """Random square of side `size` (traced) per example: (B, H, W, 1) bool.

  u_row, u_col: (B,) uniforms. Any position where the window fits (the official
  code's randint(0, h - s) never picks the last row/column; we do).
  """
  row = jnp.minimum(jnp.floor(u_row * (height - size + 1)).astype(jnp.int32), height - size)
  col = jnp.minimum(jnp.floor(u_col * (width - size + 1)).astype(jnp.int32), width - size)
  hh = jnp.arange(height)[None, :, None]
  ww = jnp.arange(width)[None, None, :]
  inside = ((hh >= row[:, None, None]) & (hh < row[:, None, None] + size)
            & (ww >= col[:, None, None]) & (ww < col[:, None, None] + size))
  return inside[..., None], row, col


def _signs(u):
  return jnp.where(u < 0.5, -1.0, 1.0)


def _square_linf_init(keys, x0, eps):
  # Vertical stripes: one +-eps per (column, channel); they work best (paper).
  _, _, width, chans = x0.shape
  signs = _signs(_uniforms(keys, width * chans)).reshape(-1, 1, width, chans)
  return jnp.clip(x0 + eps * signs, 0.0, 1.0)


def _square_linf_step(keys, x0, x_best, eps, size):
  """Set one random square window to a random +-eps colour per channel."""
  _, height, width, chans = x0.shape
  u = _uniforms(keys, 2 + _SQUARE_TRIES * chans)
  win, _, _ = _window(u[:, 0], u[:, 1], size, height, width)
  colours = _signs(u[:, 2:]).reshape(-1, _SQUARE_TRIES, chans)
  # The paper re-draws the colour while the window would not change (a wasted
  # query). Vectorised: draw a few colours, take the first that changes it.
  def unchanged(sign):
    same = jnp.abs(jnp.clip(x0 + sign * eps, 0.0, 1.0) - x_best) < 1e-7
    return jnp.all(jnp.where(win, same, True), axis=(1, 2))   # (B, C')
  same_up, same_down = unchanged(1.0), unchanged(-1.0)
  same = jnp.where(colours > 0, same_up[:, None], same_down[:, None]).all(-1)
  pick = jnp.argmax(~same, axis=1)
  colour = jnp.take_along_axis(colours, pick[:, None, None], axis=1)[:, 0]
  return jnp.where(win, jnp.clip(x0 + eps * colour[:, None, None, :], 0.0, 1.0), x_best)


def _to_sphere(x0, delta, eps):
  return jnp.clip(x0 + eps * delta / jnp.maximum(core.l2(delta), core.TINY), 0.0, 1.0)


def _square_l2_init(keys, x0, eps):
  # A grid of blocks of side ~H/5, each a random +-1 per channel (the paper puts
  # a pseudo-Gaussian bump in each block; we keep the flat block), scaled onto
  # the eps-sphere.
  _, height, width, chans = x0.shape
  side = max(min(height, width) // 5, 1)
  grid = (-(-height // side), -(-width // side))
  signs = _signs(_uniforms(keys, grid[0] * grid[1] * chans)).reshape((-1,) + grid + (chans,))
  delta = signs[:, np.arange(height) // side][:, :, np.arange(width) // side]
  return _to_sphere(x0, delta, eps)


def _square_l2_step(keys, x0, x_best, eps, size):
  """Move L2 mass from a random window 2 into a random window 1 (simplified).

  As the paper's L2 update: window 1 gets its old (normalised) content plus a
  zero-mean pattern with a random sign per channel, rescaled to hold the mass of
  windows 1 and 2 plus the unused budget; window 2 is zeroed; the whole
  perturbation is put back on the eps-sphere and clipped to [0, 1]. Simplified:
  the pattern is +1 on one half of the window and -1 on the other (split along
  a random axis) instead of the paper's pair of pseudo-Gaussian bumps.
  """
  _, height, width, chans = x0.shape
  u = _uniforms(keys, 5 + chans)
  win1, row, col = _window(u[:, 0], u[:, 1], size, height, width)
  win2, _, _ = _window(u[:, 2], u[:, 3], size, height, width)
  delta = x_best - x0

  def chan_norm(mask):  # (B, 1, 1, C') L2 norm of delta over a window, per channel
    return jnp.sqrt(jnp.sum(jnp.square(jnp.where(mask, delta, 0.0)), axis=(1, 2), keepdims=True))

  unused = jnp.maximum(eps ** 2 - jnp.square(core.l2(delta)), 0.0) / chans
  target = jnp.sqrt(unused + jnp.square(chan_norm(win1 | win2)))

  rel_h = jnp.arange(height)[None, :, None] - row[:, None, None]
  rel_w = jnp.arange(width)[None, None, :] - col[:, None, None]
  by_rows = (u[:, 4] < 0.5)[:, None, None]
  first_half = jnp.where(by_rows, rel_h, rel_w) < size // 2
  pattern = jnp.where(first_half, 1.0, -1.0)[..., None] / size.astype(jnp.float32)
  signs = _signs(u[:, 5:])
  new = pattern * signs[:, None, None, :] + delta / (chan_norm(win1) + 1e-10)
  new = jnp.where(win1, new, 0.0)
  new = new / (jnp.sqrt(jnp.sum(jnp.square(new), axis=(1, 2), keepdims=True)) + core.TINY) * target
  delta = jnp.where(win1, new, jnp.where(win2, 0.0, delta))
  return _to_sphere(x0, delta, eps)


def square(logits_fn, images, labels, *, key, eps, queries=5000, norm="linf",
           p_init=0.8, max_iterations=None):
  """Square Attack (Andriushchenko et al. 2020): random search on logits only.

  Minimises the margin z_y - max_{j != y} z_j (= -cw_margin) by random square
  updates, accepting a candidate only when it lowers the margin; an example
  stops changing once misclassified (as in the paper). One forward pass per
  query and no gradients, so it is blind to gradient masking.

  L-inf: the paper's algorithm (vertical-stripe init, one window per query set
  to a random +-eps colour per channel, re-drawn while it would not change the
  image). Window side s = round(sqrt(p * H * W)) clipped to [1, min(H, W) - 1],
  with p from the paper's schedule (p_init halved at 10, 50, 200, 500, 1000,
  2000, 4000, 6000, 8000 ten-thousandths of the queries).
  L2: simplified, see `_square_l2_step`; every candidate is x0 + eps * delta /
  ||delta||_2 clipped to [0, 1], so it is always in the ball.

  Args:
    logits_fn: images (B, H, W, C') float32 in [0, 1] -> logits (B, C).
    images: (B, H, W, C') float in [0, 1], H, W >= 2.
    labels: (B,) int true classes.
    key: a jax.random key, or B keys (one per example).
    eps: budget in [0, 1] pixel units, >= 0.
    queries: static int >= 1, forward passes per example (1 init + queries - 1).
    norm: 'linf' or 'l2'.
    p_init: initial fraction of pixels per window, in (0, 1].
    max_iterations: optional int, possibly traced: stop after this many queries
      (p's schedule still that of `queries`; core.loop_bound).

  Returns:
    (B, H, W, C') float32 adversarial images in the eps-ball and in [0, 1].
  """
  core.check_common(images, labels, eps, norm)
  queries = core.check_int("queries", queries, minimum=1)
  if labels.ndim != 1:
    raise ValueError(f"square attacks classifiers: labels must be (B,), got shape {labels.shape}")
  if not isinstance(p_init, (int, float, np.floating)) or not 0 < p_init <= 1:
    raise ValueError(f"p_init must be a number in (0, 1], got p_init={p_init!r}")
  _, height, width, _ = images.shape
  if min(height, width) < 2:
    raise ValueError(f"square needs images of at least 2x2 pixels, got H={height}, W={width}")
  num_classes = core.num_classes(logits_fn, images, labels)
  x0 = images.astype(jnp.float32)
  keys = core.example_keys(key, x0.shape[0])

  def margin(x):
    return -objectives.cw_margin(logits_fn(x).astype(jnp.float32), labels)

  init, step = ((_square_linf_init, _square_linf_step) if norm == "linf"
                else (_square_l2_init, _square_l2_step))
  # The init draws from `keys`, query i from fold_in(keys, i).
  x_best = init(keys, x0, eps)
  m_best = margin(x_best)

  def body(i, carry):
    x_best, m_best = carry
    p = _square_p(p_init, i, queries)
    size = jnp.clip(jnp.round(jnp.sqrt(p * height * width)), 1, min(height, width) - 1)
    x_new = step(core.fold(keys, i), x0, x_best, eps, size.astype(jnp.int32))
    m_new = margin(x_new)
    accept = (m_best > 0) & (m_new < m_best)
    return core.select(accept, (x_new, m_new), (x_best, m_best))

  x_best, _ = jax.lax.fori_loop(
      0, core.loop_bound(queries - 1, None if max_iterations is None else
                         jnp.maximum(max_iterations - 1, 0)), body, (x_best, m_best))
  return core.finalize(x_best, eps, labels, num_classes)
