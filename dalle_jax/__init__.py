"""dalle_jax: train DALL·E-mini-style text-to-image models in JAX/Flax."""
import flax

# Parameters carry logical axis names as metadata; the mapping onto a mesh is ours (dalle_jax.parallel),
# so NNX must not try to shard variables eagerly when they are created.
flax.config.update("flax_always_shard_variable", False)
