"""The VQGAN train step on a data=2 x fsdp=2 x tensor=2 mesh of 8 CPU devices gives one device's losses and
parameters, for models deeper than the shipped tiny one: three levels with attention at the middle one, and the
published f16 recipe's layout (five levels, two residual blocks, attention at side 16) at tiny width.

Without the activation pins of models/conv_layers.py the three-level model's step-1 loss (a forward pass) was
8e-4 away from one device's and 24% by step 7: XLA put rows of attention's q.k^T on the wrong devices
(docs/research/spmd_batched_dot.md). The three-level model runs two steps with the discriminator on from the
second, so its convolutions and the adaptive GAN weight are covered too; the f16 layout, whose compiles cost the
most, runs one step without the GAN: its forward loss and its first update.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, subprocess_env

SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, numpy as np
    from dalle_jax import parallel
    from dalle_jax.configs import shapes_vqgan
    from dalle_jax.trainers import vqgan_step

    STEPS = dict(three_levels=2, f16_layout=1)

    def config(name, mesh):
        c = shapes_vqgan.get_config("tiny")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        if name == "three_levels":
            c.model.ch_mult = (1, 2, 2)  # sides 32, 16 (attention), 8
            c.loss.disc_start = 1  # The GAN terms and the discriminator's update from the second step on.
        else:
            c.loss.disc_start = c.num_steps  # No GAN in the program.
            # vqgan_f16_16384's structure at 32x32 and base width 8: sides 32, 16 (attention), 8, 4, 2.
            c.model.update(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                           z_channels=16, embed_dim=8, num_groups=4)
        return c

    rng = np.random.default_rng(0)
    batches = [dict(image=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    out = {}
    for name in ("three_levels", "f16_layout"):
        runs = {}
        for label, mesh, devices in (("one", (1, 1, 1), jax.devices()[:1]), ("mesh", (2, 2, 2), jax.devices())):
            c = config(name, mesh)
            m = parallel.make_mesh(c.mesh, devices)
            setup, state, shardings = vqgan_step.create(c, m)
            step = parallel.jit_sharded_step(functools.partial(vqgan_step.train_step, setup), shardings, m)
            losses = []
            for batch in batches[:STEPS[name]]:
                state, metrics = step(state, parallel.global_batch(batch, m))
                losses.append(float(metrics["loss"]))
            runs[label] = (losses, jax.tree.map(np.asarray, state["params"]),
                           jax.tree.map(np.asarray, state["disc_params"]))
        (loss_1, params_1, disc_1), (loss_8, params_8, disc_8) = runs["one"], runs["mesh"]
        # After the updates, relative to each network's largest parameter.
        def drift(a, b):
            scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a))
            return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale
        out[name] = dict(one=loss_1, mesh=loss_8, params=drift(params_1, params_8), disc=drift(disc_1, disc_8))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def measured(compilation_cache):
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=subprocess_env(compilation_cache, 8),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["three_levels", "f16_layout"])
def test_eight_device_mesh_matches_one_device(measured, model):
    runs = measured[model]
    # Step 1's loss is the forward pass at the initial parameters; step 2's follows one update of both networks.
    assert len(runs["one"]) == (2 if model == "three_levels" else 1)
    for step, (single, sharded) in enumerate(zip(runs["one"], runs["mesh"]), start=1):
        assert sharded == pytest.approx(single, rel=1e-5), (model, step)
    assert runs["params"] < 1e-5 and runs["disc"] < 1e-5, runs


def test_activation_rules_fill_in_the_defaults_and_refuse_channels_over_two_axes():
    from dalle_jax.configs import shapes_vqgan
    from dalle_jax.trainers import vqgan_step

    rules = dict(vqgan_step.activation_rules(shapes_vqgan.get_config("tiny").sharding_rules))
    assert rules["batch"] == ("data", "fsdp") and rules["channels"] == "tensor"
    assert rules["conv_out"] == ("fsdp", "tensor")  # the recipe's own rules are kept
    assert dict(vqgan_step.activation_rules((("channels", None),)))["channels"] is None
    for bad in (("fsdp", "tensor"), "fsdp"):
        with pytest.raises(ValueError, match="config.sharding_rules.*'channels'.*spmd_batched_dot"):
            vqgan_step.activation_rules((("channels", bad),))
