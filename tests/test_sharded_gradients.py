"""Gradients of the VQGAN and its discriminator under the shipped sharding rules equal the unsharded ones.

Runs in a subprocess with an 8-device CPU mesh (data=2, fsdp=2, tensor=2). This guards the rules table: with conv
input channels also split over `tensor`, jax 0.10's partitioner returned wrong input gradients for the stacked
4x4 convs of the discriminator (off by more than their own size), which this test detects.
"""
import subprocess
import sys
import textwrap

from tests.conftest import REPO, subprocess_env

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dalle_jax.configs import shapes_vqgan
    from dalle_jax import parallel
    from dalle_jax.models.discriminator import PatchDiscriminator
    from dalle_jax.models.vqgan import VQGAN

    config = shapes_vqgan.get_config("tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh = parallel.make_mesh(config.mesh)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32))
    models = {"discriminator": (PatchDiscriminator(config.disc, rngs=nnx.Rngs(0)), lambda m, x: m(x)),
              "vqgan": (VQGAN(config.model, rngs=nnx.Rngs(0)), lambda m, x: m(x)[0])}
    for name, (module, apply) in models.items():
        graphdef, state = nnx.split(module, nnx.Param)
        params = state.to_pure_dict()
        loss = lambda p, x: jnp.mean(apply(nnx.merge(graphdef, p), x) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        reference = grad(params, x)
        shardings = parallel.state_shardings(state, mesh, config.sharding_rules)
        sharded = grad(jax.device_put(params, shardings), jax.device_put(x, parallel.batch_sharding(mesh)))
        # Relative to the largest gradient of the model: some leaves (a conv bias feeding a GroupNorm) have a
        # gradient that is zero up to rounding, where a per-leaf ratio would only compare noise.
        scale = max(float(jnp.max(jnp.abs(ref))) for ref in jax.tree.leaves(reference))
        for path, ref in jax.tree_util.tree_leaves_with_path(reference):
            got = sharded[0] if path[0].idx == 0 else sharded[1]
            for key in path[1:]:
                got = got[key.key]
            error = float(jnp.max(jnp.abs(ref - got))) / scale
            assert error < 1e-5, (name, jax.tree_util.keystr(path), error)
        print(name, "ok")
""")


def test_sharded_gradients_match_unsharded(compilation_cache):
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=subprocess_env(compilation_cache, 8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["discriminator", "ok", "vqgan", "ok"]
