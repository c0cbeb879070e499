"""The caption model's score log p(caption | image): a NumPy reference, padding, what it depends on, config checks."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dalle_jax.configs import shapes_captioner
from dalle_jax.data.text import BOS_ID, EOS_ID, PAD_ID
from dalle_jax.models.captioner import Captioner, validate_config

IMAGE_SIZE, TEXT_LENGTH, VOCAB_SIZE = 32, 12, 20
GRID, CODEBOOK, FEATURES = 4, 10, 6


def tiny_model_config() -> ml_collections.ConfigDict:
    config = shapes_captioner.get_config("tiny").model
    config.reads = "pixels"
    config.image_size, config.text_length, config.vocab_size = IMAGE_SIZE, TEXT_LENGTH, VOCAB_SIZE
    return config


def code_reader_config() -> ml_collections.ConfigDict:
    config = shapes_captioner.get_config("tiny").model
    assert config.reads == "code_features"
    config.image_size, config.text_length, config.vocab_size = IMAGE_SIZE, TEXT_LENGTH, VOCAB_SIZE
    config.image_length, config.image_vocab_size, config.code_features = GRID * GRID, CODEBOOK, FEATURES
    return config


@pytest.fixture(scope="module")
def model():
    return Captioner(tiny_model_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def jitted(model):
    """The model's methods, compiled (eager calls compile every op for every new shape: several times slower)."""
    names = ("__call__", "encode_images", "token_log_probs", "caption_log_likelihood", "log_likelihood")
    return {name: jax.jit(getattr(model, name)) for name in names}


@pytest.fixture(scope="module")
def log_likelihood(jitted):
    return jitted["log_likelihood"]


def random_images(count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def caption(tokens, length=TEXT_LENGTH):
    """`<s> tokens </s>` padded to `length`."""
    ids = np.full((length,), PAD_ID, np.int32)
    ids[:len(tokens) + 2] = [BOS_ID, *tokens, EOS_ID]
    return ids


def test_log_likelihood_matches_a_numpy_reference(jitted, log_likelihood):
    images = random_images(2)
    ids = np.stack([caption([4, 5, 6]), caption(list(range(4, 14)))])
    logits = np.asarray(jitted["__call__"](images, ids[:, :-1]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = ids[:, 1:]
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    want = np.where(targets != PAD_ID, picked, 0.0).sum(1)
    got = np.asarray(log_likelihood(images, ids))
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Summing the padding's log-probabilities too would give another figure for the short caption.
    assert abs(picked[0].sum() - want[0]) > 1e-2


def test_per_token_parts_add_up_to_the_caption_score(jitted, log_likelihood):
    images = random_images(2, seed=1)
    ids = np.stack([caption([4, 5]), caption([9, 8, 7, 6])])
    patches = jitted["encode_images"](images)
    assert patches.shape == (2, (IMAGE_SIZE // 8) ** 2, 32)
    token_log_probs, real = jitted["token_log_probs"](patches, ids)
    assert token_log_probs.shape == real.shape == (2, TEXT_LENGTH - 1)
    # `</s>` is scored, `<s>` and padding are not.
    np.testing.assert_array_equal(np.asarray(real).sum(1), [3, 5])
    caption_log_likelihood = jitted["caption_log_likelihood"](patches, ids)
    np.testing.assert_allclose(caption_log_likelihood, np.where(real, token_log_probs, 0.0).sum(1), rtol=1e-6)
    np.testing.assert_allclose(caption_log_likelihood, log_likelihood(images, ids), rtol=1e-5)


def test_padding_does_not_change_the_score(log_likelihood):
    images = random_images(2, seed=2)
    short = np.stack([caption([5, 9, 4], length=7), caption([6, 6, 7, 8, 9], length=7)])
    long = np.stack([caption([5, 9, 4]), caption([6, 6, 7, 8, 9])])
    # The same captions with five more padding tokens appended.
    np.testing.assert_array_equal(long, np.concatenate([short, np.full((2, 5), PAD_ID, np.int32)], axis=1))
    np.testing.assert_allclose(log_likelihood(images, short), log_likelihood(images, long), atol=1e-5)


def test_tokens_after_the_caption_do_not_change_its_tokens_scores(jitted):
    images = random_images(2, seed=3)
    ids = np.stack([caption([5, 9, 4])] * 2)
    ids[1, 7] = 11  # after `</s>` (position 4) and the first padding
    patches = jitted["encode_images"](np.repeat(images[:1], 2, axis=0))
    token_log_probs, real = map(np.asarray, jitted["token_log_probs"](patches, ids))
    # Decoding is causal: the caption's own tokens (targets 0..3) see nothing of what follows them.
    np.testing.assert_allclose(token_log_probs[1, :4], token_log_probs[0, :4], atol=1e-6)
    assert real[0].sum() == 4


def test_the_score_depends_on_the_image_and_on_the_caption(log_likelihood):
    images = random_images(2, seed=4)
    ids = np.stack([caption([5, 6, 7])] * 2)
    by_image = np.asarray(log_likelihood(images, ids))
    assert abs(by_image[0] - by_image[1]) > 1e-4
    same_image = np.repeat(images[:1], 2, axis=0)
    by_caption = np.asarray(log_likelihood(same_image, np.stack([caption([5, 6, 7]), caption([5, 6, 8])])))
    assert abs(by_caption[0] - by_caption[1]) > 1e-4
    # Rows do not see each other: the first row's score is the same beside another image.
    np.testing.assert_allclose(by_caption[0], by_image[0], rtol=1e-6)


def test_a_code_reader_sees_codes_only_through_their_features():
    model = Captioner(code_reader_config(), rngs=nnx.Rngs(0))
    features = np.random.default_rng(5).normal(size=(CODEBOOK + 1, FEATURES)).astype(np.float32)
    features[7] = features[3]  # codes 3 and 7 look alike
    model.code_features.value = features
    score = jax.jit(model.log_likelihood)
    codes = np.tile(np.random.default_rng(6).integers(0, CODEBOOK, (1, GRID * GRID)).astype(np.int32), (3, 1))
    codes[:, :2] = 3
    codes[1, 0] = 7  # the same picture as row 0 to the model
    codes[2, 0] = 5  # another
    ids = np.stack([caption([4, 5, 6])] * 3)
    scores = np.asarray(score(codes, ids))
    assert model.encode_images(codes).shape == (3, GRID * GRID, 32)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert abs(scores[0] - scores[2]) > 1e-4
    # A code's neighbours matter too: the convolution over the grid reads them.
    patches = np.asarray(model.encode_images(codes[[0, 2]]))
    assert np.abs(patches[0, 1] - patches[1, 1]).max() > 1e-4


@pytest.mark.parametrize("make_config, field, value, message", [
    (tiny_model_config, "patch_size", 5, "patch_size=5 must divide config.model.image_size=32"),
    (tiny_model_config, "heads", 3, "heads=3 must divide config.model.d_model=32"),
    (tiny_model_config, "vocab_size", 0, "vocab_size=0 must be at least 1"),
    (tiny_model_config, "encoder_layers", 0, "encoder_layers=0 must be at least 1"),
    (code_reader_config, "reads", "captions", "reads='captions'; use one of"),
    (code_reader_config, "image_length", 15, "image_length=15 must be a square grid"),
    (code_reader_config, "code_features", 0, "code_features=0 must be at least 1"),
    (code_reader_config, "image_vocab_size", 0, "image_vocab_size=0 must be at least 1"),
])
def test_validate_config_names_the_bad_field(make_config, field, value, message):
    config = make_config()
    validate_config(config)
    config[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)
    with pytest.raises(ValueError, match=message):
        Captioner(config, rngs=nnx.Rngs(0))


def test_the_trainers_config_leaves_the_run_shapes_unset():
    # The trainer fills these in from the seq2seq run; a model built straight from the config file fails early.
    with pytest.raises(ValueError, match="image_length=0"):
        validate_config(shapes_captioner.get_config("tiny").model)
    with pytest.raises(ValueError, match="Unknown variant"):
        shapes_captioner.get_config("huge")

