"""VQGAN image tokenizer for your own captioned images, sized to train on a 2-core CPU.

Reads a folder of images and its captions.jsonl (dalle_jax/data/captioned_folder.py):
    dalle-jax-train --config images_vqgan --workdir runs/vqgan --config.data.folder=~/pictures
then train DalleBart on its codes with `images_dalle` (same variant). Variants `[SIZE][,tiny]`: `images_vqgan`
(32x32 images, 8x8 codes), `images_vqgan:64` (64x64, 16x16 codes), `images_vqgan:tiny` and `images_vqgan:64,tiny`
(tests: a few steps of a tiny model). The shapes_vqgan recipe extends it for captioned_shapes.
"""
import ml_collections

from dalle_jax.configs import common, vqgan_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    size, tiny = common.parse_size_variant(arg, "images_vqgan")
    config = vqgan_common.base_config(image_size=size)
    config.seed = 0  # Seeds parameters, data order and every random draw of the run.
    config.num_steps = 1500  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 750  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 750  # Steps between checkpoints (and at the last step).

    config.data.dataset = "captioned_folder"  # Your images: set --config.data.folder=DIR.
    config.data.batch_size = 8  # Global batch: small batches, many updates, is what converges fastest on a CPU.
    config.data.eval_batch_size = 32  # Evaluation batch (lowered, with a warning, to fit a smaller split).
    config.data.eval_batches = 2  # Validation batches per periodic evaluation (-1: the whole split).

    model = config.model
    model.ch = 16  # Base channel count; level i has ch * ch_mult[i] channels.
    model.ch_mult = (1, 2, 4)  # Channel multipliers per level; downsampling factor 2**(len - 1) = 4.
    model.num_res_blocks = 1  # Residual blocks per level (the decoder has one more).
    model.attn_resolutions = ()  # Feature-map sides that get self-attention; none at this size.
    model.z_channels = 64  # Channels of the encoder output and decoder input.
    model.embed_dim = 32  # Dimension of each code vector.
    model.codebook_size = 1024  # Number of codes (image-token vocabulary).
    model.num_groups = 8  # GroupNorm groups; must divide every channel count.

    config.disc.ch = 32  # Discriminator base channels.
    config.disc.num_layers = 2  # Stride-2 conv layers of the PatchGAN discriminator.
    config.disc.num_groups = 8  # Discriminator GroupNorm groups.

    # Past num_steps: the GAN stays off, which saves a quarter of each step's FLOPs on a CPU; set it below num_steps
    # to turn the adversarial phase on.
    config.loss.disc_start = 10**9
    config.optimizer.learning_rate = 2e-3  # Peak learning rate of both optimizers.
    config.optimizer.b1 = 0.9  # Adam beta1 (0.5 suits the adversarial phase of larger recipes).
    config.optimizer.warmup_steps = 100  # Linear warmup steps.

    if tiny:
        config.num_steps = 12
        config.log_every = 2
        config.eval_every = 6
        config.checkpoint_every = 4
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.eval_batches = 2
        model.ch = 16
        model.ch_mult = (1, 2, 2)  # Still downsampling by 4, so images_dalle:tiny's image_length fits.
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
        config.codebook_restart.decay = 0.5  # Short memory, so unused codes count as dead within a few steps.
        config.codebook_restart.threshold = 0.1
    return config
