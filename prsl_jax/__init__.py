"""prsl_jax: robust vision-language fine-tuning with PRSL, and strong attacks, in JAX/Flax."""

import os

from prsl_jax import losses

# Loaded on first use, so `from prsl_jax import losses, attacks` stays free of the
# models and transformers (a researcher's jitted code needs arrays only).
_FROM_CONVERT = ("Pretrained", "load_pretrained", "save_pretrained")

__version__ = "0.2.0"

# The tiny CLIP bundled with the package, in HuggingFace format (made by
# scripts/pretrain_tiny_clip.py): the embedded default's starting model.
TINY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_clip")
# The tiny ViT + GPT-2 captioner bundled with the package (made by
# scripts/pretrain_tiny_captioner.py): the captioning default's starting model.
TINY_CAPTIONER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                              "tiny_captioner")
# The tiny BLIP-2 (OPT) bundled with the package (made by
# scripts/pretrain_tiny_blip2.py): captions and answers questions on the digits.
TINY_BLIP2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_blip2")


def __getattr__(name):
  if name in _FROM_CONVERT:
    from prsl_jax.models import convert  # pylint: disable=g-import-not-at-top
    return getattr(convert, name)
  raise AttributeError(f"module 'prsl_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_FROM_CONVERT))
