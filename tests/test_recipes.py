"""The pod recipes are valid configs whose models have the published sizes. Their fit and speed on the pods are
checked by `bench/aot_pod.py` (needs libtpu)."""
import importlib

import jax
import pytest
from flax import nnx

from dalle_jax.models import vqgan
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.trainers import seq2seq_step


def recipe(name: str):
    return importlib.import_module(f"dalle_jax.configs.{name}").get_config("")


def parameter_count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# DALL·E mini has about 0.4 billion parameters and DALL·E mega about 2.6 billion (the published, rounded figures).
@pytest.mark.parametrize("name, billions", [("dalle_mini", 0.4), ("dalle_mega", 2.6)])
def test_seq2seq_recipe_is_valid_and_has_the_published_size(name, billions):
    config = recipe(name)
    seq2seq_step.check_config(config)
    model = nnx.eval_shape(lambda: DalleBart(config.model, rngs=nnx.Rngs(params=0, dropout=1)))
    assert abs(parameter_count(model) / 1e9 - billions) < 0.1 * billions


def test_vqgan_recipe_is_valid():
    vqgan.check_config(recipe("vqgan_f16_16384").model)
