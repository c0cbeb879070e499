"""Sampler inputs at the edges: the empty prompt, non-ASCII and very long prompts, and work directories of the
wrong kind. (Missing work directories and runs without a checkpoint: tests/inference/test_text_to_image.py, tests/test_sample_cli.py.)"""
import numpy as np
import pytest

from dalle_jax.data import text as text_lib
from dalle_jax.inference.text_to_image import TextToImage
from tests.inference.test_text_to_image import sampling_workdir

SETTINGS = dict(temperature=1.0, top_k=16, cond_scale=3.0)


@pytest.fixture(scope="module")
def pipe(sampling_workdir):  # noqa: F811
    return TextToImage.from_workdir(sampling_workdir["workdir"], batch_size=4)


def test_empty_prompt_samples_unconditionally(pipe):
    samples = pipe(["", "   "], num_images=2, seed=0, **SETTINGS)
    assert samples.images.shape[:2] == (2, 2) and samples.images.dtype == np.uint8
    for row in samples.text_ids:  # whitespace normalises to the empty caption guidance uses
        np.testing.assert_array_equal(row, pipe.seq2seq.empty_text_ids)


@pytest.mark.parametrize("prompt", ["un cercle rouge à gauche", "赤い円 🔴", "ＡＢＣ\u200b\u0301", "\x00\x07"])
def test_non_ascii_prompts_encode_to_valid_ids_and_sample(pipe, prompt):
    samples = pipe([prompt], num_images=1, seed=0, **SETTINGS)
    ids = samples.text_ids[0]
    assert ids[0] == text_lib.BOS_ID and text_lib.EOS_ID in ids
    assert ids.min() >= 0 and ids.max() < pipe.seq2seq.tokenizer.vocab_size
    assert samples.images.shape == (1, 1, pipe.image_size, pipe.image_size, 3)


def test_a_100k_character_prompt_is_cut_to_text_length_with_a_warning(pipe):
    prompt = "a small red circle in the top left " * 3000
    with pytest.warns(UserWarning, match="longer than the model's text_length"):
        samples = pipe([prompt], num_images=1, seed=0, **SETTINGS)
    assert samples.truncated == (True,) and samples.text_ids.shape == (1, pipe.text_length)
    assert samples.text_ids[0, -1] == text_lib.EOS_ID


def test_work_directories_of_the_other_trainer_are_refused(sampling_workdir):  # noqa: F811
    with pytest.raises(ValueError, match="work directory of the 'vqgan' trainer, not of a seq2seq run"):
        TextToImage.from_workdir(sampling_workdir["vqgan_workdir"])
    with pytest.raises(ValueError, match="work directory of the 'seq2seq' trainer, not of a VQGAN"):
        TextToImage.from_workdir(sampling_workdir["workdir"], vqgan_workdir=sampling_workdir["workdir"])
