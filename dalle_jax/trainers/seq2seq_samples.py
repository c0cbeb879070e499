"""The sample grid of a seq2seq run: fixed prompts sampled with the current parameters, decoded by the VQGAN.

One row per prompt (`config.sampling.prompts`), `images_per_prompt` images per row; image (p, i) always uses the
same seed and index, so grids of successive evaluations show how the same draws change as the model trains.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from dalle_jax.data import image_grid as images
from dalle_jax import parallel
from dalle_jax.inference import sampling
from dalle_jax.training import gan_losses


class SampleGrid:
    def __init__(self, config, setup, vqgan, tokenizer, mesh):
        prompts = list(config.sampling.prompts)
        if not prompts or config.sampling.images_per_prompt < 1:
            raise ValueError("config.sampling.prompts must name at least one prompt and "
                             "config.sampling.images_per_prompt must be >= 1.")
        self.columns = int(config.sampling.images_per_prompt)
        self.text_ids = tokenizer.encode_batch([p for p in prompts for _ in range(self.columns)],
                                               config.model.text_length)
        self.settings = sampling.SamplingSettings.from_config(config.sampling)
        self.seed = int(config.sampling.seed)
        self.setup, self.vqgan, self.rules = setup, vqgan, config.sharding_rules
        rows = self.text_ids.shape[0]
        # The batch is split over the mesh when it divides evenly; otherwise it runs where the parameters are.
        self.mesh = mesh if rows % parallel.batch_parallelism(mesh) == 0 else None
        grid = vqgan.grid_size
        # Replicated, so that every process of a multi-host run can fetch the whole grid.
        self._decode = jax.jit(lambda params, codes: gan_losses.to_uint8(
            nnx.merge(vqgan.graphdef, params).decode_code(codes.reshape(codes.shape[0], grid, grid))),
            out_shardings=parallel.replicated(mesh))

    def tokens(self, params) -> jax.Array:
        graphdef, state = nnx.split(self.setup.model(params))
        return sampling.sample_image_tokens(
            graphdef, state, self.text_ids, self.setup.empty_text_ids, self.seed, np.arange(len(self.text_ids)),
            self.settings, mesh=self.mesh, sharding_rules=self.rules if self.mesh is not None else None)

    def __call__(self, params) -> np.ndarray:
        """A uint8 picture: one row of `images_per_prompt` samples per prompt."""
        decoded = jax.device_get(self._decode(self.vqgan.params, self.tokens(params)))
        return images.image_grid(np.asarray(decoded), columns=self.columns)
