"""ldm_jax: latent diffusion (KL-VAE + DiT) in JAX/Flax."""

__version__ = "0.1.0"
