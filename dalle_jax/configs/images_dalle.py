"""DalleBart for your own captioned images, sized to train on a 2-core CPU.

Predicts the codes of a VQGAN trained with the images_vqgan recipe (same variant) and, unless told otherwise, reads
the dataset that VQGAN was trained on:
    dalle-jax-train --config images_dalle --workdir runs/dalle --config.vqgan_workdir=runs/vqgan
Variants `[SIZE][,tiny]` as images_vqgan's: `images_dalle` (32x32 images, 64 image tokens), `images_dalle:64`
(256 tokens), `images_dalle:tiny` and `images_dalle:64,tiny` (tests). The shapes_dalle recipe extends it.
"""
import ml_collections

from dalle_jax.configs import common, seq2seq_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    size, tiny = common.parse_size_variant(arg, "images_dalle")
    config = seq2seq_common.base_config()
    config.num_steps = 600  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 300  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 300  # Steps between checkpoints (and at the last step).

    # "": the dataset of the VQGAN run (its dataset, folder, data_dir and split sizes), read from its config.json.
    config.data.dataset = ""
    config.data.image_size = size  # Side of the images the VQGAN encodes.
    config.data.batch_size = 32  # Global batch size.
    config.data.eval_batch_size = 32  # Evaluation batch (lowered, with a warning, to fit a smaller split).
    config.data.eval_batches = 2  # Validation batches per periodic evaluation (-1: the whole split).
    config.data.encode_batch_size = 500  # Images per encode batch.

    config.text.vocab_size = 1024  # Upper bound: a small set of captions yields fewer pieces.
    model = config.model
    model.text_length = 64  # Text tokens per caption, `<s>` and `</s>` included.
    model.image_vocab_size = 1024  # The VQGAN's codebook.
    model.image_length = (size // common.DOWNSAMPLING) ** 2  # The VQGAN's grid, row-major.
    model.d_model = 128  # Model width.
    model.encoder_layers = 1  # Text encoder layers.
    model.decoder_layers = 4  # Image-token decoder layers.
    model.heads = 4  # Attention heads.
    model.ffn_dim = 384  # GLU hidden width.
    model.vocab_multiple = 64  # Output head padded to 1,088 columns.
    model.image_positions = "rows_cols"  # Row + column vectors: placement words learned from fewer examples.
    config.optimizer.learning_rate = 1e-3  # Peak learning rate.
    config.optimizer.warmup_steps = 50  # Linear warmup steps.
    config.sampling.prompts = ()  # Captions of the sample grid; (): the first captions of the validation split.

    if tiny:
        config.num_steps = 12
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 4
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.eval_batches = 2
        config.data.encode_batch_size = 16
        config.text.vocab_size = 64
        model.text_length = 40
        model.image_vocab_size = 32  # The tiny VQGAN's codebook.
        model.d_model = 32
        model.encoder_layers = 1
        model.decoder_layers = 2
        model.heads = 2
        model.ffn_dim = 64
        model.vocab_multiple = 16
        config.optimizer.warmup_steps = 2
        config.optimizer.learning_rate = 3e-3
        config.sampling.images_per_prompt = 2
    return config
