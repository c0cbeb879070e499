"""DALL·E mega's published seq2seq architecture, sized for a TPU pod.

d_model 2048, 24 + 24 layers, 32 heads, GLU 4096, 64 text tokens over a 50,272-token vocabulary, 256 image tokens
with 16,415 image ids (a 16,384-code VQGAN; the ids above the codebook are never targets). FSDP over every device,
bf16 compute over f32 master weights, rematerialisation of everything but the projections and Adafactor's factored
moments. Compiled ahead of time at a global batch of 2048 (README, "Training on a TPU pod"): 3.9 GiB per chip of
16 on v5e:16x16, 15.5 GiB of 32 on v4:4x4x4.
"""
import ml_collections

from dalle_jax.configs import common, seq2seq_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    config = seq2seq_common.base_config()
    config.num_steps = 200_000  # Optimizer steps in total.
    config.log_every = 100  # Steps between training-metric lines.
    config.eval_every = 5000  # Steps between evaluations on `validation`.
    config.checkpoint_every = 1000  # Steps between checkpoints.
    config.mesh.data = 1  # The batch is split over fsdp.
    config.mesh.fsdp = -1  # Parameters and optimizer state sharded over every device.
    config.tpu_compiler_options = common.fsdp_tpu_compiler_options()  # On TPUs: gather weights, then multiply.
    config.data.image_size = 256  # Images the VQGAN was trained on.
    config.data.batch_size = 2048  # Global batch size.
    config.data.eval_batch_size = 2048  # Global evaluation batch.
    config.data.eval_batches = 5  # Validation batches per evaluation.
    config.data.encode_batch_size = 2048  # Global batch of the encode stage.
    config.text.vocab_size = 50272  # Text vocabulary (DALL·E mega's tokenizer size).
    config.model.text_length = 64  # Text tokens per caption.
    config.model.image_vocab_size = 16415  # Image ids (the VQGAN's 16,384 codes and 31 unused ids).
    config.model.image_length = 256  # 16x16 codes.
    config.model.d_model = 2048  # Model width.
    config.model.encoder_layers = 24  # Encoder layers.
    config.model.decoder_layers = 24  # Decoder layers.
    config.model.heads = 32  # Attention heads.
    config.model.ffn_dim = 4096  # GLU hidden width.
    config.model.dtype = "bfloat16"  # bf16 compute.
    config.model.param_dtype = "float32"  # f32 master weights.
    config.model.remat = "dots"  # Keep the projections' outputs, recompute the rest (fits v5e:16x16 and v4:4x4x4).
    config.model.layer_norm_variance = "one_pass"  # mean(x^2) - mean^2: one pass over x per norm on TPUs.
    config.optimizer.name = "adafactor"  # Factored second moments: far less optimizer memory than AdamW.
    config.optimizer.b1 = 0.0  # No first moment.
    config.optimizer.learning_rate = 1e-4  # Peak learning rate.
    config.optimizer.warmup_steps = 5000  # Linear warmup steps.
    config.optimizer.schedule = "linear"  # Linear decay to 0.
    return config
