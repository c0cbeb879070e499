"""dalle_jax: train DALL·E-mini-style text-to-image models in JAX/Flax."""
import flax

# Parameters carry logical axis names as metadata; the mapping onto a mesh is ours (dalle_jax.parallel),
# so NNX must not try to shard variables eagerly when they are created.
flax.config.update("flax_always_shard_variable", False)


def __getattr__(name):
    # The sampling API is imported on first use, so `import dalle_jax.data...` stays free of orbax and TensorFlow.
    if name in ("TextToImage", "Samples"):
        from dalle_jax.inference import text_to_image
        return getattr(text_to_image, name)
    raise AttributeError(f"module 'dalle_jax' has no attribute {name!r}")
