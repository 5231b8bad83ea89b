"""Layer helpers and config readers every model family shares (one copy each)."""

import flax.linen as nn
import jax.numpy as jnp


def pick(d, key, default=None):
  """d[key], or default when it is absent or None (HF configs write nulls)."""
  v = d.get(key, default)
  return default if v is None else v


def dense(features, dtype, name, use_bias=True, init=nn.initializers.lecun_normal()):
  """nn.Dense computing in dtype with float32 params."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=init, name=name)


def layer_norm(eps, dtype, name):
  # use_fast_variance=False: E[(x-mu)^2] as torch does, not E[x^2]-mu^2, which
  # loses ~1e-5 relative precision on large residual streams.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def pixel_stats(image_mean, image_std, num_channels, default_mean, default_std):
  """(mean, std) tuples of floats, one per channel (defaults when None), checked."""
  mean = tuple(float(x) for x in (image_mean if image_mean is not None else default_mean))
  std = tuple(float(x) for x in (image_std if image_std is not None else default_std))
  if len(mean) != num_channels or len(std) != num_channels:
    raise ValueError(f"image_mean {mean} and image_std {std} must have "
                     f"num_channels={num_channels} entries")
  return mean, std


def normalize_images(images, image_size, num_channels, mean, std, dtype):
  """(B, S, S, C) images in [0, 1] -> (x - mean) / std in dtype; the shape checked.

  Normalised in float32 (pixel budgets are tiny), then cast to the compute dtype.
  """
  want = (image_size, image_size, num_channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f"images must have shape (B, {want[0]}, {want[1]}, {want[2]}) "
                     f"(NHWC in [0, 1] at the model's resolution), got {images.shape}")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
