from setuptools import find_packages, setup

setup(
    name="dalle_jax",
    version="0.1.0",
    description="Train DALL·E-mini-style text-to-image models in JAX/Flax, from one CPU to a TPU pod.",
    packages=find_packages(include=["dalle_jax", "dalle_jax.*"]),
    package_data={"dalle_jax.serve": ["page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8,<0.9",
        "tensorflow-datasets>=4.9.10,<4.10",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        "importlib_resources>=6,<8",  # tensorflow-datasets uses it to locate builder code but does not declare it.
        "scipy>=1.13,<2",
        "sentencepiece>=0.2.1,<0.3",
        "ml_collections>=1.1,<2",
        "pillow>=11,<14",
        "safetensors>=0.6,<0.9",
        "tqdm>=4.67,<5",
        "msgpack>=1,<2",  # the image-token records (dalle_jax.data.token_records)
        "numpy>=2.0,<3",
        "starlette>=0.40,<2",  # dalle-jax-serve: the page and the API
        "uvicorn>=0.30,<1",
        "etils[epath]>=1.15,<2",  # dalle_jax.storage: local paths and bucket URLs alike
        "gcsfs>=2026.10,<2027",  # gs:// work directories and datasets (epath reaches them through fsspec)
    ],
    entry_points={"console_scripts": [
        "dalle-jax-train = dalle_jax.train:cli",
        "dalle-jax-sample = dalle_jax.inference.sample:cli",
        "dalle-jax-export = dalle_jax.interop.export:main",
        "dalle-jax-import = dalle_jax.interop.import_weights:main",
        "dalle-jax-evaluate = dalle_jax.shapes.evaluate_samples:cli",
        "dalle-jax-demo = dalle_jax.demo.stages:cli",
        "dalle-jax-serve = dalle_jax.serve.cli:cli",
    ]},
    extras_require={
        # -n 2: two workers; shared runs. The server's tests: a real HTTP client, and a browser (the system chromium).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "filelock>=3.12,<5", "httpx>=0.27,<1",
                 "playwright>=1.45,<2",
                 "gcp-storage-emulator==2026.7.19",  # tests/storage: a GCS server on 127.0.0.1
                 "moto[server]>=5.1,<6", "s3fs>=2026.9,<2027"],  # tests/storage: an S3 server on 127.0.0.1
        # Interop tests: the other frameworks' own modules. taming-transformers-rom1504 is installed apart, with
        # --no-deps (see the Makefile): its declared deps pull torchvision and a newer torch, its modules need neither.
        "torch": ["torch==2.13.0", "min-dalle==0.4.11", "diffusers>=0.42,<0.43", "einops>=0.8,<0.9",
                  "emoji>=2.16,<3"],
        "s3": ["s3fs>=2026.9,<2027"],  # s3:// datasets and exports (epath reaches them through fsspec)
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "cuda": ["jax[cuda12]>=0.10.2,<0.11"],  # GPU clusters: the CUDA plugin pinned to the installed jax's version
    },
)
