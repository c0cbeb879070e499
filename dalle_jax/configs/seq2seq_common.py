"""Fields shared by every seq2seq (DalleBart) recipe; each recipe starts from `base_config` and sets its sizes."""
import ml_collections

from dalle_jax.configs import common

# captioned_shapes captions of every kind: one object, two objects, each relation.
SHAPES_PROMPTS = (
    "a small red circle in the top left",
    "a large blue square in the center",
    "a green triangle above a purple circle",
    "a yellow square to the left of a orange square",
)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "seq2seq"  # Which trainer train.py runs: "vqgan" or "seq2seq".
    config.vqgan_workdir = ""  # Work directory of the trained VQGAN whose codes the model predicts (required).
    config.seed = 0  # Seeds parameters, data order and every random draw of the run.
    config.init_from = ""  # Work directory (imported or trained) whose newest parameters start a new run.
    config.extensions = ()  # Modules of research code the trainers run (dalle_jax/extensions.py); none.
    config.num_steps = 1000  # Optimizer steps in total.
    config.log_every = 50  # Steps between training-metric lines.
    config.eval_every = 500  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 500  # Steps between checkpoints (and at the last step).
    config.keep_checkpoints = 3  # Newest checkpoints kept on disk.
    config.faults = common.faults_config()  # Non-finite updates and corrupt checkpoints.

    config.mesh = common.mesh_config()
    # Logical axis -> mesh axes, for parameters and activations alike. A mesh axis that does not divide a
    # dimension is skipped for it; an axis already used by an earlier dimension is skipped too.
    config.sharding_rules = (
        ("batch", ("data", "fsdp")),  # examples of a batch
        ("embed", "fsdp"),  # model width: parameters sharded over fsdp (FSDP)
        ("heads", "tensor"),  # attention heads split over tensor
        ("mlp", "tensor"),  # feed-forward hidden units split over tensor
        ("vocab", "tensor"),  # embedding tables and the output head split over tensor
        ("length", None),
        ("norm", None),
        ("layers", None),
    )

    config.data = common.data_config(ml_collections.FieldReference(256))
    config.data.blank_caption_prob = 0.1  # Chance a training caption is replaced by "" (for guidance).
    # Chance a training example uses its first (canonical) caption; otherwise one of all its captions at random.
    config.data.canonical_caption_prob = 0.0
    config.data.encode_batch_size = 64  # Global batch of the encode stage (images -> VQGAN codes).

    config.text = ml_collections.ConfigDict()
    config.text.tokenizer_model = ""  # A sentencepiece .model with BART ids to use ("" = train one on captions).
    config.text.vocab_size = ml_collections.FieldReference(50264)  # Vocabulary of a tokenizer trained here.

    config.model = ml_collections.ConfigDict()
    config.model.text_vocab_size = config.text.get_ref("vocab_size")  # Text embedding rows.
    config.model.text_length = 64  # Text tokens per caption, `<s>` and `</s>` included.
    config.model.image_vocab_size = 16384  # VQGAN codebook size (the start token is this id).
    config.model.image_length = 256  # Image tokens per image (the VQGAN grid, row-major).
    config.model.d_model = 1024  # Model width.
    config.model.encoder_layers = 12  # Text encoder layers (at least 1).
    config.model.decoder_layers = 12  # Image-token decoder layers.
    config.model.heads = 16  # Attention heads.
    config.model.ffn_dim = 2730  # Feed-forward hidden width.
    config.model.ffn = "glu"  # Feed-forward kind: "glu" (DALL·E mini's) or "mlp".
    config.model.dropout = 0.0  # Dropout on residual branches and embeddings.
    config.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16".
    config.model.param_dtype = "float32"  # Parameter (master weight) dtype.
    config.model.scan_layers = True  # Stack layers and scan over them (compile time independent of depth).
    config.model.remat = "none"  # Rematerialisation per layer: "none", "dots" or "full".
    config.model.vocab_multiple = 128  # The output head is padded to a multiple of this (for sharding).
    config.model.image_positions = "flat"  # "flat" (DALL·E mini's) or "rows_cols" (row + column embeddings).
    config.model.layer_norm_variance = "two_pass"  # "two_pass" (torch's) or "one_pass" (fewer passes on TPUs).

    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.0  # Label-smoothing mass spread over the codebook.
    config.loss.z_loss = 0.0  # Weight of logsumexp(logits)**2, which keeps logits from drifting.

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # "adamw" or "adafactor".
    config.optimizer.learning_rate = 1e-4  # Peak learning rate.
    config.optimizer.b1 = 0.9  # Adam beta1 (Adafactor: momentum, 0 = none).
    config.optimizer.b2 = 0.999  # Adam beta2.
    config.optimizer.weight_decay = 0.0  # Decoupled weight decay on matrices.
    config.optimizer.warmup_steps = 1000  # Linear warmup steps.
    config.optimizer.schedule = "cosine"  # After warmup: "cosine" (to 10%), "linear" (to 0) or "constant".
    config.optimizer.grad_clip = 1.0  # Global gradient-norm clip (0: none).
    config.optimizer.accumulation_steps = 1  # Micro-batches per update; each is batch_size / this.

    config.sampling = ml_collections.ConfigDict()
    config.sampling.prompts = SHAPES_PROMPTS  # Captions sampled at every evaluation for the sample grid.
    config.sampling.images_per_prompt = 4  # Images per prompt in the grid.
    config.sampling.temperature = 1.0  # Softmax temperature.
    config.sampling.top_k = 64  # Sample among the k most likely codes (0: all).
    config.sampling.top_p = 1.0  # Nucleus mass (1: off).
    config.sampling.cond_scale = 3.0  # Classifier-free guidance scale (1: off).
    # Draws per image of sample.py, evaluation and the demo; the one the model finds likeliest given its prompt is
    # kept (1: every draw). The training run's sample grid draws one.
    config.sampling.candidates = 1
    config.sampling.seed = 0  # Seed of the sample grid.
    return config
