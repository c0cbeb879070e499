"""DalleBart on captioned_shapes 32x32, sized to train on a 2-core CPU in minutes.

Needs the VQGAN of `configs/shapes_vqgan.py` (8x8 codes from 1,024): pass its work directory with
`--config.vqgan_workdir=runs/vqgan`. Variants: `configs/shapes_dalle.py` (default) and `:tiny` (tests).
"""
import ml_collections

from dalle_jax.configs import common, seq2seq_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = seq2seq_common.base_config()
    # Code features (shapes/code_features_bart.py) and left-or-above captions (shapes/left_or_above.py).
    config.extensions = ("dalle_jax.shapes.code_features_stage", "dalle_jax.shapes.left_or_above")
    config.num_steps = 600  # Optimizer steps in total: with encoding and evaluation, about 6.5 minutes on 2 CPU cores.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 300  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 300  # Steps between checkpoints (and at the last step).

    config.data.image_size = 32  # captioned_shapes s32.
    config.data.shapes_split_sizes = dict(common.CPU_SHAPES_SPLIT_SIZES)  # The dataset the VQGAN was trained on.
    config.data.batch_size = 32  # Global batch size.
    config.data.eval_batch_size = 200  # Divides the 2,000-example validation and test splits.
    config.data.eval_batches = 2  # Validation batches per periodic evaluation (-1: the whole split).
    config.data.encode_batch_size = 500  # Images per encode batch.

    config.text.vocab_size = 128  # Upper bound: the captions' ~50 words yield fewer pieces.
    model = config.model
    model.text_length = 40  # The longest paraphrase (33 tokens with `<s>` and `</s>`) fits.
    model.image_vocab_size = 1024  # The shapes VQGAN's codebook.
    model.image_length = 64  # Its 8x8 grid.
    model.d_model = 128  # Model width.
    model.encoder_layers = 1  # One text encoder layer (docs/research/knobs.md: better than two).
    model.decoder_layers = 4  # Image-token decoder layers.
    model.heads = 4  # Attention heads.
    model.ffn_dim = 384  # GLU hidden width.
    model.vocab_multiple = 64  # Output head padded to 1,088 columns.
    model.image_positions = "rows_cols"  # Row + column vectors: placement words learned from fewer examples.
    # Width of the fixed per-code appearance features (a foreground mask and colour shares, measured on the training
    # images) that image tokens are embedded from and scored with; 0: a learned table and head.
    model.code_features = 25

    config.data.canonical_caption_prob = 0.5  # Half the examples take the canonical caption, which states everything.
    # Steps at the start in which two-object scenes are captioned with the left (or upper) object first; 0: off.
    config.data.left_or_above_caption_steps = 300
    config.optimizer.learning_rate = 3e-3  # Peak learning rate (docs/research/knobs.md).
    config.optimizer.warmup_steps = 50  # Linear warmup steps.

    # Sampling defaults of sample.py, evaluation and the demo: the best judged settings tried (docs/research/knobs.md).
    config.sampling.temperature = 0.7
    config.sampling.top_k = 8
    config.sampling.cond_scale = 2.0
    config.sampling.candidates = 8  # The best of 8 draws per image is kept.

    if arg == "tiny":
        config.num_steps = 12
        config.data.left_or_above_caption_steps = 6
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 4
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.eval_batches = 2
        config.data.encode_batch_size = 16
        config.data.shapes_split_sizes = dict(train=64, validation=16, test=16, test_compositional=16)
        config.text.vocab_size = 64
        model.image_vocab_size = 32  # The tiny VQGAN's codebook.
        model.code_features = 0  # Most tests run the plain layout; tests/trainers/test_seq2seq_trainer.py sets 25.
        model.d_model = 32
        model.encoder_layers = 1
        model.decoder_layers = 2
        model.heads = 2
        model.ffn_dim = 64
        model.vocab_multiple = 16
        config.optimizer.warmup_steps = 2
        config.optimizer.learning_rate = 3e-3
        config.sampling.prompts = ("a small red circle in the top left", "a green triangle above a purple circle")
        config.sampling.images_per_prompt = 2
        config.sampling.candidates = 1  # tests/inference/test_text_to_image.py draws several candidates where it tests them
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/shapes_dalle.py; use '' or 'tiny'.")
    return config
