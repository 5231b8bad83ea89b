"""Layer helpers, config readers and HF key-map rows every model family shares
(one copy each)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# HF activation names (hidden_act, activation_function, pooler_act) -> functions.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # NewGELUActivation, FastGELUActivation and PytorchGELUTanh are all the tanh
    # form (gelu_fast rounds sqrt(2/pi) to 10 digits: ~1e-11 relative).
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


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


def one_id(name, v):
  """One int token id from an int, a one-element list or None; name is the config field."""
  if v is None or isinstance(v, int):
    return v
  if isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], int):
    return v[0]
  raise ValueError(f"{name} must be one int token id (several EOS ids are not "
                   f"supported), got {v!r}")


def square_side(name, val):
  """An int side from an int or an equal (h, w) pair; name is the config field."""
  if isinstance(val, (list, tuple)) and len(val) == 2 and val[0] == val[1]:
    val = val[0]
  if not isinstance(val, int):
    raise ValueError(f"{name} must be an int (square images and patches), got {val!r}")
  return val


def attend(q, k, v, mask, scale, upcast=False):
  """Scaled dot-product attention, softmax in float32.

  q: (B, Tq, H, Dh); k, v: (B, Tk, H, Dh); mask: bool broadcastable to
  (B, H, Tq, Tk), True = attend, or None. Returns (B, Tq, H * Dh) in v's dtype.
  A query whose keys are all masked attends uniformly (as transformers' eager
  path with its large negative bias). upcast: q.k in float32 (GPT-2's option).
  """
  if upcast:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale).astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  return y.reshape(*y.shape[:2], -1)


def split_heads(x, num_heads):
  """(B, T, H * Dh) -> (B, T, H, Dh)."""
  return x.reshape(*x.shape[:2], num_heads, x.shape[-1] // num_heads)


# Key-map rows (hf_name, flax_path, layout kind) of convert's explicit key maps:
# "linear" is torch nn.Linear's (out, in) weight <-> flax's (in, out) kernel.


def linear_keys(hf, fx, bias=True):
  """Rows of a torch nn.Linear `hf` stored as the flax Dense at path fx (a tuple)."""
  out = [(f"{hf}.weight", fx + ("kernel",), "linear")]
  return out + ([(f"{hf}.bias", fx + ("bias",), "copy")] if bias else [])


def layer_norm_keys(hf, fx):
  """Rows of a torch nn.LayerNorm `hf` stored as the flax LayerNorm at path fx."""
  return [(f"{hf}.weight", fx + ("scale",), "copy"), (f"{hf}.bias", fx + ("bias",), "copy")]
