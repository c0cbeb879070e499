"""DALL·E mini's published seq2seq architecture, sized for a TPU pod slice.

d_model 1024, 12 + 12 layers, 16 heads, GLU 2730, 64 text tokens over a 50,264-token vocabulary, 256 image tokens
from a 16,384-code VQGAN (the vqgan_f16_16384 recipe). Parameters and optimizer state are sharded over every
device (FSDP); compute is bf16 over f32 master weights. Compiled ahead of time for v5e:4x4 at a global batch of
1024: 9.2 GiB per chip of 16 (README, "Training on a TPU pod").
"""
import ml_collections

from dalle_jax.configs import common, seq2seq_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    config = seq2seq_common.base_config()
    config.num_steps = 200_000  # Optimizer steps in total.
    config.log_every = 100  # Steps between training-metric lines.
    config.eval_every = 5000  # Steps between evaluations on `validation`.
    config.checkpoint_every = 2000  # Steps between checkpoints.
    config.mesh.data = 1  # The batch is split over fsdp.
    config.mesh.fsdp = -1  # Parameters and optimizer state sharded over every device.
    config.tpu_compiler_options = common.fsdp_tpu_compiler_options()  # On TPUs: gather weights, then multiply.
    config.data.image_size = 256  # Images the VQGAN was trained on.
    config.data.batch_size = 1024  # Global batch size.
    config.data.eval_batch_size = 1024  # Global evaluation batch.
    config.data.eval_batches = 10  # Validation batches per evaluation.
    config.data.encode_batch_size = 1024  # Global batch of the encode stage.
    config.text.vocab_size = 50264  # Text vocabulary (DALL·E mini's BART tokenizer size).
    config.model.text_length = 64  # Text tokens per caption.
    config.model.image_vocab_size = 16384  # Codes of the VQGAN.
    config.model.image_length = 256  # 16x16 codes.
    config.model.d_model = 1024  # Model width.
    config.model.encoder_layers = 12  # Encoder layers.
    config.model.decoder_layers = 12  # Decoder layers.
    config.model.heads = 16  # Attention heads.
    config.model.ffn_dim = 2730  # GLU hidden width.
    config.model.dtype = "bfloat16"  # bf16 compute.
    config.model.param_dtype = "float32"  # f32 master weights.
    config.model.remat = "dots"  # Keep projection outputs, recompute attention on the backward pass.
    config.model.layer_norm_variance = "one_pass"  # mean(x^2) - mean^2: one pass over x per norm on TPUs.
    config.optimizer.learning_rate = 5e-5  # Peak learning rate.
    config.optimizer.warmup_steps = 5000  # Linear warmup steps.
    config.optimizer.schedule = "linear"  # Linear decay to 0.
    return config
