"""prsl_jax: robust CLIP fine-tuning with PRSL, and strong attacks, in JAX/Flax."""

from prsl_jax import losses

__version__ = "0.1.0"
