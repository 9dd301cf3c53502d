"""peftdebias-jax: parameter-efficient debiasing patches for pretrained encoders, in JAX/Flax."""

__version__ = "0.1.0"
