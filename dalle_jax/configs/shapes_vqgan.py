"""VQGAN image tokenizer on captioned_shapes 32x32, sized to train on a 2-core CPU in minutes.

The images_vqgan recipe with captioned_shapes' data, extension and tuned encoder. Variants: `shapes_vqgan`
(default) and `shapes_vqgan:tiny` (tests: a few steps, tiny data).
"""
import ml_collections

from dalle_jax.configs import common, images_vqgan


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of the shapes_vqgan recipe; use '' or 'tiny'.")
    config = images_vqgan.get_config(arg)
    # The final test figures judge each reconstruction against its scene (judge_* figures).
    config.extensions = ("dalle_jax.shapes.judged_reconstructions",)
    config.data.dataset = "captioned_shapes"  # Built in: prepared on first use.
    config.data.shapes_split_sizes = dict(common.CPU_SHAPES_SPLIT_SIZES)
    config.data.eval_batch_size = 80  # Evaluation batch; divides the 2,000-image validation and test splits.
    # Each code from its own 4x4 patch: the background is one code everywhere and a shape's codes do not depend on
    # anything else in the picture, which is what lets DalleBart learn the captions in minutes (judge accuracy of
    # its samples, README "Performance"). taming's whole-image encoder gives a 1,024-code VQGAN whose codes change
    # across the image when one object moves.
    config.model.local_encoder = True

    if arg == "tiny":
        config.data.eval_batch_size = 8
        config.data.shapes_split_sizes = dict(train=64, validation=16, test=16, test_compositional=16)
        config.model.ch_mult = (1, 2)
        # taming's encoder: in 12 steps a patch-local one maps every patch to the same code, and the tests that
        # encode and sample need varied codes. tests/models/test_vqgan_local_encoder.py covers the local encoder.
        config.model.local_encoder = False
    return config
