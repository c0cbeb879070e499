"""The caption model that reranks a DalleBart run's candidates (captioned_shapes 32x32), sized for a 2-core CPU.

Needs a finished seq2seq run: `--config.seq2seq_workdir=runs/dalle`. It learns from that run's encoded `train`
records (their codes, as the sampler draws them), with that run's tokenizer and text length.
Variants: `configs/shapes_captioner.py` (default) and `:tiny` (tests).
"""
import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "captioner"
    config.seq2seq_workdir = ""  # The DalleBart run whose candidates this model ranks (its tokenizer, records, VQGAN).
    config.seed = 0
    # Reading pixels, picking among `make demo`'s 4 draws per prompt (500 per split), judged: 79.6% / 40.6% on test /
    # test_compositional after 300 steps, 78.6% / 39.2% after 200. Reading codes, the best of 8 of 16 draws per
    # prompt: 82.4% / 47.4% after 300 steps (2 min 7 s for the demo's stage), 83.0% / 48.4% after 450 (about 1 min
    # more).
    config.num_steps = 300
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
    # Reads each candidate's codes by their appearance features, not its decoded picture. Picking among 16 draws
    # per prompt of the demo model (500 prompts per split, the best of the first 4 / 8), judged on test /
    # test_compositional: 82.6% / 42.4% and 82.4% / 47.4%, against 79.4% / 37.0% and 82.0% / 40.6% reading
    # 4x4-pixel patches. A 3-layer convolutional stem over the pixels scored 83.2% / 43.0% and 84.2% / 46.0%, but
    # trains slower and needs every candidate decoded. A learned table per code instead of the features: 82.8% /
    # 36.2% (K=4); the features without the convolution: 79.4% / 39.2%.
    model.reads = "code_features"
    # Reading pixels: 4x4-pixel patches, 64 image tokens. Reranking 4 draws of the shapes demo model on 500 examples
    # per split, judged: 8x8 patches (16 tokens) 80.2% / 40.4% (test / test_compositional); 4x4 83.4% / 39.2%; 4x4 with
    # d_model 128 and 2 encoder layers 82.6% / 40.8%, at 2.3x the training time.
    model.patch_size = 4
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
        raise ValueError(f"Unknown variant {arg!r} of configs/shapes_captioner.py; use '' or 'tiny'.")
    return config
