"""The caption model that reranks a DalleBart run's candidates (captioned_shapes 32x32), sized for a 2-core CPU.

Needs a finished seq2seq run: `--config.seq2seq_workdir=runs/dalle`. It learns from that run's encoded `train`
records (their codes, as the sampler draws them), with that run's tokenizer and text length.
Variants: the shapes_captioner recipe (default) and `:tiny` (tests).
"""
import ml_collections

from dalle_jax.configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "captioner"
    config.seq2seq_workdir = ""  # The DalleBart run whose candidates this model ranks (its tokenizer, records, VQGAN).
    config.seed = 0
    # The code features the model reads, and twin captions for the evaluation's `twin_accuracy`.
    config.extensions = ("dalle_jax.shapes.captioner_code_features", "dalle_jax.shapes.twin_captions")
    config.num_steps = 300  # Optimizer steps in total (docs/research/knobs.md).
    config.log_every = 50
    config.eval_every = 300  # Steps between evaluations on `validation` (and at the last step).
    config.checkpoint_every = 150
    config.keep_checkpoints = 2
    # First records of `train` learned from (-1: all); each is decoded once (3.7 ms here, 75 s for all 20,000).
    config.train_examples = 6000
    config.batch_size = 128  # Images per step, each with one of its captions drawn at random.
    config.eval_batch_size = 250
    config.eval_examples = 250  # First examples of `validation` (and at the end `test`) evaluated, every caption.
    config.mesh = common.mesh_config()
    config.faults = common.faults_config()

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.01
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"
    config.optimizer.grad_clip = 1.0

    model = config.model = ml_collections.ConfigDict()
    # The seq2seq run's shapes; the trainer fills them in.
    model.image_size = 0
    model.image_length = 0
    model.image_vocab_size = 0
    model.code_features = 0
    model.text_length = 0
    model.vocab_size = 0
    model.reads = "code_features"  # Reads each candidate's codes by their appearance features, not its picture.
    model.patch_size = 4  # Reading pixels: 4x4-pixel patches, 64 image tokens.
    model.d_model = 96
    model.heads = 4
    model.ffn_dim = 192
    model.encoder_layers = 1
    model.decoder_layers = 2

    if arg == "tiny":
        config.num_steps = 6
        config.log_every = 2
        config.eval_every = 3
        config.checkpoint_every = 3
        config.batch_size = 8
        config.eval_batch_size = 8
        config.eval_examples = 16
        model.patch_size = 8  # for tests that read pixels
        model.d_model = 32
        model.heads = 2
        model.ffn_dim = 64
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of the shapes_captioner recipe; use '' or 'tiny'.")
    return config
