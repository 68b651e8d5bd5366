"""Inference: model bundles, the `Generator` (sampler + guidance + decoding) and `ldm-jax sample`.

Nothing here imports `ldm_jax.training`.
"""
