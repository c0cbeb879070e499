"""VQGAN image tokenizer on captioned_shapes 32x32, sized to train on a 2-core CPU in minutes.

Variants: `configs/shapes_vqgan.py` (default) and `configs/shapes_vqgan.py:tiny` (tests: a few steps, tiny data).
"""
import ml_collections

from configs import vqgan_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = vqgan_common.base_config(image_size=32)
    config.seed = 0  # Seeds parameters, data order and every random draw of the run.
    config.num_steps = 1500  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 500  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 250  # Steps between checkpoints (and at the last step).

    config.data.batch_size = 32  # Global batch, split over the mesh's data and fsdp axes and the processes.
    config.data.eval_batches = 8  # Validation batches per periodic evaluation (-1: the whole split).

    model = config.model
    model.ch = 32  # Base channel count; level i has ch * ch_mult[i] channels.
    model.ch_mult = (1, 2, 2)  # Channel multipliers per level; downsampling factor 2**(len - 1) -> an 8x8 grid.
    model.num_res_blocks = 1  # Residual blocks per level (the decoder has one more).
    model.attn_resolutions = ()  # Feature-map sides that get self-attention; none at this size.
    model.z_channels = 64  # Channels of the encoder output and decoder input.
    model.embed_dim = 32  # Dimension of each code vector.
    model.codebook_size = 256  # Number of codes (image-token vocabulary).
    model.num_groups = 8  # GroupNorm groups; must divide every channel count.

    config.disc.ch = 32  # Discriminator base channels.
    config.disc.num_layers = 2  # Stride-2 conv layers of the PatchGAN discriminator.
    config.disc.num_groups = 8  # Discriminator GroupNorm groups.

    config.loss.disc_start = 1000  # Step from which the GAN loss is on (0: from the start).
    config.optimizer.learning_rate = 2e-3  # Peak learning rate of both optimizers.
    config.optimizer.warmup_steps = 100  # Linear warmup steps.

    if arg == "tiny":
        config.num_steps = 12
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 4
        config.data.batch_size = 8
        config.data.eval_batches = 2
        config.data.shapes_split_sizes = dict(train=64, validation=16, test=16, test_compositional=16)
        model.ch = 16
        model.ch_mult = (1, 2)
        model.z_channels = 16
        model.embed_dim = 8
        model.codebook_size = 32
        model.num_groups = 4
        model.attn_resolutions = (16,)
        config.disc.ch = 8
        config.disc.num_groups = 4
        config.loss.disc_start = 6
        config.optimizer.warmup_steps = 2
        config.codebook_restart.every = 4
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/shapes_vqgan.py; use '' or 'tiny'.")
    return config
