"""TFDS builder for `captioned_shapes`, the built-in procedurally generated text-to-image dataset.

Nothing is downloaded: every example is drawn by `shapes_scene` from a generator seeded by its split and
index alone, so a builder version and config always produce the same bytes. Prepare it with
`download_and_prepare(file_format="array_record")` to read it by random access (`as_data_source`).
"""
from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dalle_jax.data import shapes_scene

# Split ids are part of each example's seed: never renumber them.
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "test_compositional": 3, "validation_compositional": 4}
# The *_compositional splits put a held-out (colour, shape) pair in every scene: validation_compositional is for
# choosing recipes and sampling settings, test_compositional only for reporting the chosen ones.
HELD_OUT_MODE = {
    "train": "exclude",
    "validation": "exclude",
    "test": "exclude",
    "test_compositional": "require",
    "validation_compositional": "require",
}
DEFAULT_SPLIT_SIZES = {"train": 50_000, "validation": 2_000, "test": 2_000, "test_compositional": 1_000,
                       "validation_compositional": 1_000}
PARAPHRASES_PER_SCENE = 4


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    """Canvas side in pixels and number of examples per split."""

    image_size: int = 32
    split_sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))

    def __post_init__(self):
        shapes_scene.check_image_size(self.image_size)
        unknown = set(self.split_sizes) - set(SPLIT_IDS)
        if unknown:
            raise ValueError(
                f"split_sizes names unknown splits {sorted(unknown)}: use names from {tuple(SPLIT_IDS)}."
            )
        for split, count in self.split_sizes.items():
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
                raise ValueError(f"split_sizes[{split!r}]={count!r} must be a positive integer.")


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_key(scene: dict) -> tuple:
    """What makes two scenes the same for evaluation: their relation and objects (not the pixel boxes)."""
    return scene["relation"], tuple(sorted((o["color"], o["shape"], o["size"], o["cell"]) for o in scene["objects"]))


def _draw_scene(split: str, index: int, image_size: int, excluded: frozenset) -> tuple[dict, np.random.Generator]:
    """The scene of example `index` and the generator its captions continue from. A scene in `excluded` is drawn
    again from a generator seeded by the attempt too."""
    for attempt in itertools.count():
        rng = np.random.default_rng([SPLIT_IDS[split], index] + ([attempt] if attempt else []))
        scene = shapes_scene.sample_scene(rng, image_size, held_out=HELD_OUT_MODE[split])
        if scene_key(scene) not in excluded:
            return scene, rng


def compositional_test_scenes(count: int, image_size: int) -> frozenset:
    """The scene keys of the first `count` test_compositional examples, which validation_compositional avoids. A
    held-out pair has few one-object scenes and test_compositional's 1,000 draw all of them, so validation_compositional
    holds two-object scenes only (test_compositional: 61% one-object)."""
    return frozenset(scene_key(_draw_scene("test_compositional", i, image_size, frozenset())[0]) for i in range(count))


def make_example(split: str, index: int, image_size: int, excluded: frozenset = frozenset()) -> dict:
    """The example `index` of `split`, as the features' input (image as PNG bytes, names as strings); its scene is
    none of `excluded` (validation_compositional: `compositional_test_scenes` of the config's test split size)."""
    scene, rng = _draw_scene(split, index, image_size, excluded)
    captions = shapes_scene.paraphrases(scene, rng, count=PARAPHRASES_PER_SCENE)
    return {
        "image": _encode_png(shapes_scene.render(scene, image_size)),
        "caption": captions[0],
        "paraphrases": captions,
        "objects": [
            {
                "color": obj["color"],
                "shape": obj["shape"],
                "size": obj["size"],
                "cell": obj["cell"],
                "box": np.asarray(obj["box"], dtype=np.int32),
            }
            for obj in scene["objects"]
        ],
        "relation": scene["relation"],
    }


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned images of one or two coloured shapes on a plain background, with their scenes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        CaptionedShapesConfig(name=f"s{size}", image_size=size, description=f"{size}x{size} images.")
        for size in (32, 64, 128, 256)
    ]
    DEFAULT_CONFIG_NAME = "s32"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=(
                "Procedurally generated scenes of one or two coloured shapes (circle, square, triangle) in a "
                "3x3 grid, each with a canonical caption, paraphrases and the structured scene."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "paraphrases": tfds.features.Sequence(tfds.features.Text()),
                    "objects": tfds.features.Sequence(
                        {
                            "color": tfds.features.ClassLabel(names=list(shapes_scene.COLORS)),
                            "shape": tfds.features.ClassLabel(names=list(shapes_scene.SHAPES)),
                            "size": tfds.features.ClassLabel(names=list(shapes_scene.SIZES)),
                            "cell": tfds.features.ClassLabel(names=list(shapes_scene.CELLS)),
                            "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                        }
                    ),
                    "relation": tfds.features.ClassLabel(names=list(shapes_scene.RELATIONS)),
                }
            ),
            supervised_keys=("caption", "image"),
            # Keep examples in index order, so record i of a split is `make_example(split, i, size[, excluded])`.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is generated.
        return {
            split: self._generate_examples(split, count)
            for split, count in self.builder_config.split_sizes.items()
        }

    def _generate_examples(self, split: str, count: int):
        size = self.builder_config.image_size
        excluded = frozenset()
        if split == "validation_compositional":
            excluded = compositional_test_scenes(self.builder_config.split_sizes.get("test_compositional", 0), size)
        for index in range(count):
            yield index, make_example(split, index, size, excluded)
