"""DalleBart on captioned_shapes 32x32, sized to train on a 2-core CPU in minutes.

The images_dalle recipe with captioned_shapes' data, extensions and tuned knobs. Needs a VQGAN of the
shapes_vqgan recipe (8x8 codes from 1,024): pass its work directory with `--config.vqgan_workdir=runs/vqgan`.
Variants: `shapes_dalle` (default) and `shapes_dalle:tiny` (tests).
"""
import ml_collections

from dalle_jax.configs import common, images_dalle, seq2seq_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"Unknown variant {arg!r} of the shapes_dalle recipe; use '' or 'tiny'.")
    config = images_dalle.get_config(arg)
    # Code features (shapes/code_features_bart.py) and left-or-above captions (shapes/left_or_above.py).
    config.extensions = ("dalle_jax.shapes.code_features_stage", "dalle_jax.shapes.left_or_above")

    config.data.dataset = "captioned_shapes"  # The dataset the VQGAN was trained on, named.
    config.data.shapes_split_sizes = dict(common.CPU_SHAPES_SPLIT_SIZES)  # Its split sizes.
    config.data.eval_batch_size = 200  # Divides the 2,000-example validation and test splits.
    config.data.canonical_caption_prob = 0.5  # Half the examples take the canonical caption, which states everything.
    # Steps at the start in which two-object scenes are captioned with the left (or upper) object first; 0: off.
    config.data.left_or_above_caption_steps = 300

    config.text.vocab_size = 128  # Upper bound: the captions' ~50 words yield fewer pieces.
    model = config.model
    model.text_length = 40  # The longest paraphrase (33 tokens with `<s>` and `</s>`) fits.
    model.encoder_layers = 1  # Text encoder layers (docs/research/knobs.md: chosen on test, not yet on validation).
    # Width of the fixed per-code appearance features (a foreground mask and colour shares, measured on the training
    # images) that image tokens are embedded from and scored with; 0: a learned table and head.
    model.code_features = 25
    config.optimizer.learning_rate = 3e-3  # Peak learning rate (docs/research/knobs.md).

    # Sampling defaults of sample.py, evaluation and the demo: the best judged settings on the validation splits, three
    # seeds (docs/research/knobs.md).
    config.sampling.prompts = seq2seq_common.SHAPES_PROMPTS  # Scenes of every kind.
    config.sampling.temperature = 0.7
    config.sampling.top_k = 8
    config.sampling.cond_scale = 1.5  # Guidance; 2 draws more extra objects, 1 no held-out pairs.
    config.sampling.candidates = 8  # The best of 8 draws per image is kept.

    if arg == "tiny":
        config.data.left_or_above_caption_steps = 6
        config.data.eval_batch_size = 8
        config.data.shapes_split_sizes = dict(train=64, validation=16, test=16, test_compositional=16)
        config.text.vocab_size = 64
        model.code_features = 0  # Most tests run the plain layout; tests/trainers/test_seq2seq_trainer.py sets 25.
        config.sampling.prompts = ("a small red circle in the top left", "a green triangle above a purple circle")
        config.sampling.candidates = 1  # One draw per image; the sampling tests set more where they test them.
    return config
