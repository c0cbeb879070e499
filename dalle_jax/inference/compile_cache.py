"""A persistent XLA compilation cache in the user's cache directory, so that a restarted server or a second
`dalle-jax-sample` loads the programs an earlier process compiled instead of compiling them again."""
import os

import jax

# Programs that compile faster than this are cheaper to compile again than to read back.
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> str:
    """$XDG_CACHE_HOME/dalle_jax/jax, or ~/.cache/dalle_jax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dalle_jax", "jax")


def enable() -> str:
    """Turns the cache on and returns its directory. A directory already chosen (JAX_COMPILATION_CACHE_DIR, or
    `jax.config.update("jax_compilation_cache_dir", ...)` as the tests do) is kept as it is."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    path = default_dir()
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
