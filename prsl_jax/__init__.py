"""prsl_jax: robust CLIP fine-tuning with PRSL, and strong attacks, in JAX/Flax."""

from prsl_jax import losses
from prsl_jax.models.convert import CLIP, load_pretrained, save_pretrained

__version__ = "0.1.0"
