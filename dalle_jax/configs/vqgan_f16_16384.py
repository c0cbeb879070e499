"""The published-scale VQGAN recipe: f16 downsampling, 16384 codes of dimension 256, 256x256 images.

Architecture as taming-transformers' f16_16384 model, so its weights import without surgery. Data parallel: the
generator and discriminator (about 80M parameters; 0.9 GiB with their Adam moments) are replicated on every chip,
and the batch is split over all of them. Compiled ahead of time for v5e:8x8 (4 images per chip): 10.3 GiB per chip
of 16 (README, "Training on a TPU pod"); 16 images per chip do not fit a v5e chip.
"""
import ml_collections

from dalle_jax.configs import vqgan_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    config = vqgan_common.base_config(image_size=256)
    config.num_steps = 400_000  # Optimizer steps in total.
    config.log_every = 100  # Steps between training-metric lines.
    config.eval_every = 5000  # Steps between evaluations on `validation`.
    config.checkpoint_every = 2000  # Steps between checkpoints.
    # Data parallel: FSDP, which gathers every kernel in every step, took 3x the chip time per image (bench/aot_pod.py).
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.data.batch_size = 256  # Global batch size.
    config.data.eval_batches = 20  # Validation batches per evaluation.
    config.model.ch = 128  # Base channel count.
    config.model.ch_mult = (1, 1, 2, 2, 4)  # f16: 256x256 images -> 16x16 codes.
    config.model.num_res_blocks = 2  # Residual blocks per level.
    config.model.attn_resolutions = (16,)  # Self-attention at the 16x16 level.
    config.model.z_channels = 256  # Encoder output channels.
    config.model.embed_dim = 256  # Code dimension.
    config.model.codebook_size = 16384  # Number of codes.
    config.model.dtype = "bfloat16"  # Compute in bf16 on TPU, f32 master weights.
    config.disc.ch = 64  # Discriminator base channels.
    config.disc.num_layers = 3  # PatchGAN depth.
    config.loss.disc_start = 250_001  # GAN loss from this step on, once reconstructions are good.
    config.optimizer.learning_rate = 4.5e-6 * 256  # Base rate scaled by the global batch.
    config.optimizer.warmup_steps = 2000  # Linear warmup steps.
    return config
