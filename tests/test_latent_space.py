"""One record of a denoiser's latent space: the cache's VAE, its normalisation, checks at sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bundles import random_params
from ldm_jax import latent_space
from ldm_jax.data import latent_cache, pipeline, sources
from ldm_jax.inference import generation
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.parallel.mesh import make_mesh

IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def vae():
    """A tiny random VAE (f2, 4 channels) with its own scaling and shift factors: (module, params, identity)."""
    module = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                           scaling_factor=0.7, shift_factor=0.2)
    params = random_params(module, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    return module, params, latent_space.vae_identity(module, params)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, vae):
    module, params, identity = vae
    out_dir = str(tmp_path_factory.mktemp("cache"))
    sharding = pipeline.batch_sharding(make_mesh({"data": -1}))
    encode = jax.jit(lambda images: module.apply({"params": params}, images, method=module.encode))
    latent_cache.cache_latents(sources.DigitsSource("test"), encode, out_dir, image_size=IMAGE_SIZE,
                               downsample_factor=2, batch_size=16, sharding=sharding, flip=False, shard_size=128,
                               vae=identity)
    return sources.LatentSource(out_dir)


def _data(cache, **fields):
    return pipeline.resolve_config(dict(source="latents", path=cache.cache_dir, **fields))


def test_the_cache_records_its_vae_and_vae_norm_uses_its_factors(cache, vae):
    assert cache.meta["vae"] == vae[2]
    assert latent_space.normalisation(_data(cache), None, cache) == (0.2, pytest.approx(0.7))
    record = latent_space.training_record(_data(cache), "", None, cache)
    assert (record["space"], record["norm"], record["vae"]["weights_sha256"]) == ("latents", "vae", vae[2]["weights_sha256"])


def test_a_cache_of_another_vae_is_refused(cache, vae):
    module, params, _ = vae
    other = latent_space.vae_identity(module, jax.tree.map(lambda p: p + 1.0, params))
    with pytest.raises(ValueError, match=r"data.path=.* was encoded by the VAE with weights sha256 .* vae.path=other"):
        latent_space.training_record(_data(cache), "other", other, cache)


def test_channel_normalised_latents_round_trip_through_the_decoder(cache, vae):
    """Training normalises per channel; the decoder built from the bundle's record undoes exactly that."""
    module, params, identity = vae
    record = latent_space.training_record(_data(cache, latent_norm="channel", latent_sample=False, random_flip=False,
                                                batch_size=16, shuffle=False), "vae", identity, cache)
    assert len(record["shift"]) == len(record["scale"]) == 4
    batch = next(pipeline.make_pipeline(_data(cache, latent_norm="channel", latent_sample=False, random_flip=False,
                                              batch_size=16, shuffle=False),
                                        pipeline.batch_sharding(make_mesh({"data": -1}))))
    normalised = np.asarray(batch["latent"])
    decoder = generation.LatentDecoder(module, *latent_space.as_arrays(record))
    decoded = decoder(params, jnp.asarray(normalised))
    means = np.stack([cache[i]["mean"][0] for i in range(16)]).astype(np.float32)  # the raw VAE latents
    mean, std = cache.channel_stats()
    np.testing.assert_allclose(normalised, (means - mean) / std, rtol=1e-4, atol=1e-6)
    direct = jnp.clip(module.apply({"params": params}, jnp.asarray(means), method=module.decode), -1, 1)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(direct), atol=2e-5)


def test_sampling_checks_the_vae_against_the_record(vae):
    module, params, identity = vae
    record = {"space": "latents", "norm": "vae", "shift": 0.2, "scale": 0.7, "vae": dict(identity, path="/v")}
    latent_space.check_vae(record, "/v", identity, "model")
    other = dict(identity, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"model was trained on the latents of the VAE with weights sha256 .* at /v, "
                                         r"but vae.path=/w holds weights 0000"):
        latent_space.check_vae(record, "/w", other, "model")
    with pytest.raises(ValueError, match="set vae.path"):
        latent_space.check_vae(record, "", None, "model")
    with pytest.raises(ValueError, match="trained in pixel space"):
        latent_space.check_vae({"space": "pixels"}, "/v", identity, "model")
    latent_space.check_vae(None, "/v", identity, "model")  # converted weights record nothing: the VAE's factors
