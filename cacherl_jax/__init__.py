"""cacherl_jax: JAX-native CacheRL for small tool-calling agent models."""

__version__ = "0.1.0"
