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


# The recipes for your own images: every variant is valid, its VQGAN's grid is its DalleBart's image length, and it
# carries nothing of captioned_shapes.
IMAGE_VARIANTS = ["", "64", "tiny", "64,tiny", "tiny,64"]


@pytest.mark.parametrize("variant", IMAGE_VARIANTS)
def test_image_recipes_fit_each_other_and_name_no_shapes_setting(variant):
    from dalle_jax import recipes
    spec = (lambda name: f"{name}:{variant}" if variant else name)
    vqgan_config, dalle_config = recipes.load(spec("images_vqgan")), recipes.load(spec("images_dalle"))
    vqgan.check_config(vqgan_config.model)
    seq2seq_step.check_config(dalle_config)
    size = 64 if "64" in variant else 32
    assert vqgan_config.data.image_size == vqgan_config.model.resolution == dalle_config.data.image_size == size
    model = nnx.eval_shape(lambda: vqgan.VQGAN(vqgan_config.model, rngs=nnx.Rngs(0)))
    assert model.grid_size ** 2 == dalle_config.model.image_length
    assert model.codebook_size == dalle_config.model.image_vocab_size
    assert (vqgan_config.data.dataset, dalle_config.data.dataset) == ("captioned_folder", "")  # "": the VQGAN's
    for config in (vqgan_config, dalle_config):
        assert config.extensions == () and config.data.shapes_split_sizes is None
        assert "left_or_above_caption_steps" not in config.data and "code_features" not in config.model
    assert dalle_config.sampling.prompts == ()  # the sample grid takes validation captions


@pytest.mark.parametrize("bad", ["48", "huge", "tiny,tiny", "32,64", ",", "64,"])
def test_an_unknown_image_recipe_variant_lists_the_valid_ones(bad):
    from dalle_jax import recipes
    with pytest.raises(ValueError, match=r"of images_vqgan: give an image size \(32, 64; default 32\), 'tiny'"):
        recipes.load(f"images_vqgan:{bad}")


@pytest.mark.parametrize("name", ["shapes_vqgan", "shapes_dalle"])
def test_shapes_recipes_extend_the_image_recipes_with_captioned_shapes_settings(name):
    from dalle_jax import recipes
    for variant in ("", "tiny"):
        shapes = recipes.load(f"{name}:{variant}" if variant else name)
        generic = recipes.load(name.replace("shapes", "images") + (f":{variant}" if variant else ""))
        assert shapes.data.dataset == "captioned_shapes" and shapes.extensions
        assert shapes.data.shapes_split_sizes is not None
        assert (shapes.num_steps, shapes.data.batch_size, shapes.model.image_length if "dalle" in name else 0) == (
            generic.num_steps, generic.data.batch_size, generic.model.image_length if "dalle" in name else 0)
    with pytest.raises(ValueError, match=f"Unknown variant '64' of the {name} recipe; use '' or 'tiny'"):
        recipes.load(f"{name}:64")
