"""Fields shared by every VQGAN recipe; each recipe starts from `base_config` and sets its sizes."""
import ml_collections

from dalle_jax.configs import common


def base_config(image_size: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "vqgan"  # Which trainer train.py runs: "vqgan" or "seq2seq".
    config.seed = 0  # Seeds parameters, data order and every random draw of the run.
    config.init_from = ""  # Work directory (imported or trained) whose newest parameters start a new run.
    config.extensions = ()  # Modules of research code the trainers run (dalle_jax/extensions.py); none.
    config.num_steps = 1000  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 500  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 500  # Steps between checkpoints (and at the last step).
    config.keep_checkpoints = 3  # Newest checkpoints kept on disk.
    config.num_recon_images = 8  # Images shown in the reconstruction grids.
    config.faults = common.faults_config()  # Non-finite updates and corrupt checkpoints.

    config.mesh = common.mesh_config()
    # Logical parameter axis -> mesh axes. A mesh axis that does not divide a dimension is skipped for it.
    # Conv kernels are split on output channels only: with input channels also split over `tensor`, jax 0.10's
    # partitioner computed wrong input gradients for stacked 4x4 convs. Activations are pinned (batch over data and
    # fsdp, channels over tensor; trainers/vqgan_step.py) because of a partitioner bug on three-axis meshes
    # (docs/research/spmd_batched_dot.md).
    config.sharding_rules = (
        ("conv_out", ("fsdp", "tensor")),
        ("conv_in", None),
        ("codebook", "fsdp"),
        ("code", None),
        ("norm", None),
    )

    image_size_ref = ml_collections.FieldReference(image_size)
    config.data = common.data_config(image_size_ref)

    config.model = ml_collections.ConfigDict()
    config.model.resolution = image_size_ref  # Image side the model is built for (follows data.image_size).
    config.model.in_channels = 3  # Image channels in.
    config.model.out_channels = 3  # Image channels out.
    config.model.ch = 128  # Base channel count; level i has ch * ch_mult[i] channels.
    config.model.ch_mult = (1, 1, 2, 2, 4)  # Channel multipliers per level; downsampling 2**(len - 1).
    config.model.num_res_blocks = 2  # Residual blocks per level (the decoder has one more).
    config.model.attn_resolutions = (16,)  # Feature-map sides that get self-attention.
    config.model.z_channels = 256  # Channels of the encoder output and decoder input.
    config.model.embed_dim = 256  # Dimension of each code vector.
    config.model.codebook_size = 16384  # Number of codes (image-token vocabulary).
    config.model.beta = 0.25  # Commitment weight, applied to the encoder's term.
    config.model.l2_normalize_codes = False  # Compare l2-normalised codes (cosine) instead of raw vectors.
    config.model.num_groups = 32  # GroupNorm groups; must divide every channel count.
    # True: each code is encoded from its own patch alone (easy for the seq2seq model to predict; no taming export).
    config.model.local_encoder = False
    config.model.dropout = 0.0  # Dropout in residual blocks.
    config.model.dtype = "float32"  # Compute dtype ("float32" or "bfloat16"); parameters stay float32.

    config.disc = ml_collections.ConfigDict()
    config.disc.ch = 64  # Discriminator base channels.
    config.disc.num_layers = 3  # Stride-2 conv layers of the PatchGAN discriminator.
    config.disc.norm = "group"  # Discriminator normalisation: "group" or "none" (never batch statistics).
    config.disc.num_groups = 32  # Discriminator GroupNorm groups.

    config.loss = ml_collections.ConfigDict()
    config.loss.reconstruction = "l1"  # Pixel loss: "l1" or "l2".
    config.loss.codebook_weight = 1.0  # Weight of the codebook + commitment terms.
    config.loss.disc_start = 10000  # Step from which the GAN loss is on.
    config.loss.disc_weight = 0.8  # Multiplier of the adaptive GAN weight (gradient-norm ratio at the last layer).
    config.loss.disc_factor = 1.0  # Weight of the discriminator's hinge loss once on.

    config.codebook_restart = ml_collections.ConfigDict()
    config.codebook_restart.every = 100  # Steps between dead-code restarts (0: never).
    config.codebook_restart.decay = 0.99  # EMA decay of per-code usage counts.
    config.codebook_restart.threshold = 0.03  # Dead below this fraction of uniform usage.

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # "adamw" or "adafactor".
    config.optimizer.learning_rate = 1e-4  # Peak learning rate of the generator.
    config.optimizer.disc_learning_rate = ml_collections.config_dict.placeholder(float)  # None: as learning_rate.
    config.optimizer.b1 = 0.5  # Adam beta1.
    config.optimizer.b2 = 0.9  # Adam beta2.
    config.optimizer.weight_decay = 0.0  # Decoupled weight decay.
    config.optimizer.warmup_steps = 1000  # Linear warmup steps.
    config.optimizer.schedule = "cosine"  # After warmup: "cosine" (to 10%), "linear" (to 0) or "constant".
    config.optimizer.grad_clip = 1.0  # Global gradient-norm clip (0: none).
    return config
