"""min-dalle's DALL·E mini encoder and decoder with random weights, sampled the way its generate path does.

`MinDalle` loads (and downloads) pretrained weights, so this builds its torch modules directly and runs the
loop of `MinDalle.generate_raw_image_stream` without the tokenizer and the VQGAN: encode the (unconditional,
conditional) pair of prompts once, repeat each row per image, then one `DalleBartDecoder.sample_tokens` call
per image token on a preallocated attention state.
"""
from __future__ import annotations

import time

import numpy as np
import torch

# Importing min_dalle disables autograd and sets torch's thread count to os.cpu_count(); `MinDallePeer` sets it again.
from min_dalle.models import DalleBartDecoder, DalleBartEncoder  # noqa: E402

IMAGE_LENGTH = 256  # min-dalle hard-codes it (its position table and attention state)


class MinDallePeer:
    """min-dalle's encoder and decoder in float32 on the CPU, parameters drawn by torch's default initialisers."""

    def __init__(self, *, d_model: int, layers: int, heads: int, ffn_dim: int, text_vocab_size: int,
                 text_length: int, image_vocab_size: int, threads: int, seed: int = 0):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.layers, self.d_model, self.text_length = layers, d_model, text_length
        self.encoder = DalleBartEncoder(
            layer_count=layers, embed_count=d_model, attention_head_count=heads, text_vocab_count=text_vocab_size,
            text_token_count=text_length, glu_embed_count=ffn_dim, device="cpu").to(torch.float32).eval()
        self.decoder = DalleBartDecoder(
            image_vocab_count=image_vocab_size, embed_count=d_model, attention_head_count=heads,
            glu_embed_count=ffn_dim, layer_count=layers, device="cpu").to(torch.float32).eval()

    def sample(self, text_ids: np.ndarray, uncond_text_ids: np.ndarray, images: int, *, tokens: int = IMAGE_LENGTH,
               cond_scale: float = 10.0, top_k: int = 256, temperature: float = 1.0,
               seed: int = 1) -> tuple[np.ndarray, float]:
        """Samples `tokens` image tokens for `images` images of one prompt; returns them (images, tokens) and the
        seconds taken from the text encoder to the last token."""
        if not 1 <= tokens <= IMAGE_LENGTH:
            raise ValueError(f"tokens={tokens} must be in [1, {IMAGE_LENGTH}] (min-dalle's image length).")
        pair = torch.tensor(np.stack([uncond_text_ids, text_ids]), dtype=torch.long)  # min-dalle's row order
        if pair.shape != (2, self.text_length):
            raise ValueError(f"prompts must be {self.text_length} padded ids each, got shapes {text_ids.shape} and "
                             f"{uncond_text_ids.shape}.")
        settings = torch.tensor([temperature, top_k, cond_scale], dtype=torch.float32)
        positions = torch.arange(IMAGE_LENGTH)
        torch.manual_seed(seed)
        with torch.no_grad():
            start = time.perf_counter()
            encoder_state = self.encoder.forward(pair)
            rows = [0] * images + [1] * images
            encoder_state, expanded = encoder_state[rows], pair[rows]
            attention_mask = expanded.not_equal(1)[:, None, None, :]
            # Keys and values of every layer stacked on the batch axis: (layers, 2 x 2 x images, length, d_model).
            attention_state = torch.zeros(self.layers, 4 * images, IMAGE_LENGTH, self.d_model)
            image_tokens = torch.full((images, tokens + 1), 2 ** 14 - 1, dtype=torch.long)
            for i in range(tokens):
                image_tokens[:, i + 1], attention_state = self.decoder.sample_tokens(
                    settings=settings, attention_mask=attention_mask, encoder_state=encoder_state,
                    attention_state=attention_state, prev_tokens=image_tokens[:, [i]], token_index=positions[[i]])
            seconds = time.perf_counter() - start
        return image_tokens[:, 1:].numpy(), seconds
