"""t5lite: T5-style encoder-decoders, causal and prefix-LM decoders in JAX/Flax."""

import setuptools

# Versions that install together on Python 3.11 (checked with pip's resolver on a clean venv).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "sentencepiece==0.2.3",
    "gin-config==0.5.0",
    "tensorboard==2.21.0",
    "tqdm>=4.66",
    "numpy>=2.0,<3",
    "scipy>=1.11",  # GPTQ's triangular inverse
    "matplotlib>=3.8",
    "sacrebleu==2.6.0",  # BLEU as T5 reports it (t5lite.data.metrics)
    "rouge-score==0.1.2",  # ROUGE-1/2/Lsum as T5 reports it
]

EXTRAS_REQUIRE = {
    # The CPU build of torch 2.13.0; a bare `torch` pulls a multi-GB CUDA build.
    "hf": ["torch==2.13.0", "transformers==5.23.0", "safetensors>=0.4"],
    "tpu": ["jax[tpu]==0.10.2"],
    # libtpu lets the CPU test suite compile the TPU kernels ahead of time for a v5e topology.
    # nbclient, nbformat and ipykernel run experiments/notebooks in tests/test_notebooks.py; babel is
    # what T5's preprocessors (the span-corruption reference, see the Makefile) import beyond ours.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "libtpu==0.0.42.1",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "babel>=2.12",
        # What t5.evaluation.metrics (the reference the metric tests compare with) imports beyond ours.
        "scikit-learn>=1.3",
        "editdistance>=0.8",
        "ruff==0.17.6",  # `make lint`; pinned, as each release formats a little differently
    ],
}

setuptools.setup(
    name="t5lite",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["t5lite", "t5lite.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["t5lite = t5lite.cli:main"]},
)
