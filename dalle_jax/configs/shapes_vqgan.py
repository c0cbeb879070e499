"""VQGAN image tokenizer on captioned_shapes 32x32, sized to train on a 2-core CPU in minutes.

Variants: `configs/shapes_vqgan.py` (default) and `configs/shapes_vqgan.py:tiny` (tests: a few steps, tiny data).
"""
import ml_collections

from dalle_jax.configs import common, vqgan_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = vqgan_common.base_config(image_size=32)
    config.seed = 0  # Seeds parameters, data order and every random draw of the run.
    # The final test figures judge each reconstruction against its scene (judge_* figures).
    config.extensions = ("dalle_jax.shapes.judged_reconstructions",)
    config.num_steps = 1500  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 750  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 750  # Steps between checkpoints (and at the last step).

    config.data.shapes_split_sizes = dict(common.CPU_SHAPES_SPLIT_SIZES)
    config.data.batch_size = 8  # Global batch: small batches, many updates, is what converges fastest on a CPU.
    config.data.eval_batch_size = 80  # Evaluation batch; divides the 2,000-image validation and test splits.
    config.data.eval_batches = 2  # Validation batches per periodic evaluation (-1: the whole split).

    model = config.model
    model.ch = 16  # Base channel count; level i has ch * ch_mult[i] channels.
    model.ch_mult = (1, 2, 4)  # Channel multipliers per level; downsampling factor 2**(len - 1) -> an 8x8 grid.
    model.num_res_blocks = 1  # Residual blocks per level (the decoder has one more).
    model.attn_resolutions = ()  # Feature-map sides that get self-attention; none at this size.
    model.z_channels = 64  # Channels of the encoder output and decoder input.
    model.embed_dim = 32  # Dimension of each code vector.
    model.codebook_size = 1024  # Number of codes (image-token vocabulary).
    model.num_groups = 8  # GroupNorm groups; must divide every channel count.
    # Each code from its own 4x4 patch: the background is one code everywhere and a shape's codes do not depend on
    # anything else in the picture, which is what lets DalleBart learn the captions in minutes (judge accuracy of
    # its samples, README "Performance"). taming's whole-image encoder gives a 1,024-code VQGAN whose codes change
    # across the image when one object moves.
    model.local_encoder = True

    config.disc.ch = 32  # Discriminator base channels.
    config.disc.num_layers = 2  # Stride-2 conv layers of the PatchGAN discriminator.
    config.disc.num_groups = 8  # Discriminator GroupNorm groups.

    # Past num_steps: the GAN stays off. At 32x32 the pixel losses alone reach the quality bar, and each GAN step
    # does 24% more FLOPs (bench/vqgan_step.py); set it below num_steps to turn the adversarial phase on.
    config.loss.disc_start = 10**9
    config.optimizer.learning_rate = 2e-3  # Peak learning rate of both optimizers.
    config.optimizer.b1 = 0.9  # Adam beta1 (0.5 suits the adversarial phase of larger recipes).
    config.optimizer.warmup_steps = 100  # Linear warmup steps.

    if arg == "tiny":
        config.num_steps = 12
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 4
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.eval_batches = 2
        config.data.shapes_split_sizes = dict(train=64, validation=16, test=16, test_compositional=16)
        model.ch = 16
        model.ch_mult = (1, 2)
        model.z_channels = 16
        model.embed_dim = 8
        model.codebook_size = 32
        model.num_groups = 4
        model.attn_resolutions = (16,)
        # taming's encoder: in 12 steps a patch-local one maps every patch to the same code, and the tests that
        # encode and sample need varied codes. tests/models/test_vqgan_local_encoder.py covers the local encoder.
        model.local_encoder = False
        config.disc.ch = 8
        config.disc.num_groups = 4
        config.loss.disc_start = 6
        config.optimizer.warmup_steps = 2
        config.codebook_restart.every = 4
        config.codebook_restart.decay = 0.5  # Short memory, so unused codes count as dead within a few steps.
        config.codebook_restart.threshold = 0.1
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of configs/shapes_vqgan.py; use '' or 'tiny'.")
    return config
