"""CLIP's image preprocessing in numpy + PIL (for data pipelines; no jax).

Resize the shorter side to `size` (bicubic), centre crop to size x size, return
float32 in [0, 1]. Mean/std normalisation is NOT done here: it happens inside
the model (prsl_jax.models.clip), so attack budgets are on [0, 1] pixels. The
geometry follows transformers' CLIPImageProcessor (shortest_edge resize with
the long side int(size * long / short), crop offset (dim - size) // 2).
"""

import numpy as np
from PIL import Image


def _resize_channel(ch, width, height):
  """Bicubic resize of one float32 (H, W) channel, values unclipped."""
  return np.asarray(Image.fromarray(ch).resize((width, height), Image.BICUBIC))


def clip_preprocess(image, size):
  """One raw image -> CLIP model input.

  Args:
    image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array; uint8 in [0, 255]
      or float in [0, 1]. Grayscale is repeated to RGB; alpha is dropped.
    size: output side in pixels (the model's image_size).

  Returns:
    (size, size, 3) float32 in [0, 1].
  """
  image = np.asarray(image)
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise ValueError(f"image must be HW or HWC with C in (1, 3, 4), got shape {image.shape}")
  if image.shape[-1] == 4:
    image = image[..., :3]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)

  h, w = image.shape[:2]
  short, long = min(h, w), max(h, w)
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if w <= h else (size, new_long)

  if image.dtype == np.uint8:
    # 8-bit PIL resize, as transformers' processor does for uint8 inputs.
    pil = Image.fromarray(np.ascontiguousarray(image))
    out = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
    out = out.astype(np.float32) / 255.0
  elif np.issubdtype(image.dtype, np.floating):
    img = image.astype(np.float32)
    out = np.stack([_resize_channel(np.ascontiguousarray(img[..., c]), new_w, new_h)
                    for c in range(3)], axis=-1)
  else:
    raise TypeError(f"image dtype must be uint8 or floating, got {image.dtype}")

  top, left = (new_h - size) // 2, (new_w - size) // 2
  out = out[top:top + size, left:left + size]
  # Bicubic overshoots at edges; the model and attacks assume [0, 1].
  return np.clip(out, 0.0, 1.0).astype(np.float32)
