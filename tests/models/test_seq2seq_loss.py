"""image_token_loss against a NumPy reference, including the padded vocabulary columns."""
import numpy as np
import pytest

from dalle_jax.models.seq2seq_loss import image_token_loss

NUM_CLASSES = 10
PADDED = 16


def reference(logits, targets, num_classes, label_smoothing, z_loss):
    real = logits[..., :num_classes].astype(np.float64)
    log_z = np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1)
    log_probs = real - log_z[..., None]
    soft = np.full(real.shape, label_smoothing / num_classes)
    np.put_along_axis(soft, targets[..., None], 1.0 - label_smoothing + label_smoothing / num_classes, axis=-1)
    cross_entropy = -(soft * log_probs).sum(-1).mean()
    z_term = z_loss * (log_z ** 2).mean()
    accuracy = (real.argmax(-1) == targets).mean()
    return cross_entropy + z_term, cross_entropy, z_term, accuracy


def padded_logits(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(3, 5, PADDED)).astype(np.float32)
    logits[..., NUM_CLASSES:] = -1e9  # what DalleBart emits for columns past the codebook
    targets = rng.integers(0, NUM_CLASSES, size=(3, 5))
    return logits, targets


@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_matches_numpy_reference(label_smoothing, z_loss):
    logits, targets = padded_logits()
    loss, metrics = image_token_loss(logits, targets, num_classes=NUM_CLASSES, label_smoothing=label_smoothing,
                                     z_loss=z_loss)
    want_loss, want_ce, want_z, want_acc = reference(logits, targets, NUM_CLASSES, label_smoothing, z_loss)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["cross_entropy"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], want_z, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(metrics["token_accuracy"], want_acc)


def test_padding_columns_get_no_probability_or_smoothing_mass():
    logits, targets = padded_logits()
    # Whatever sits in the padded columns (even huge values) does not change anything...
    garbage = logits.copy()
    garbage[..., NUM_CLASSES:] = 50.0
    kw = {"num_classes": NUM_CLASSES, "label_smoothing": 0.1, "z_loss": 1e-3}
    (loss_a, metrics_a), (loss_b, metrics_b) = image_token_loss(logits, targets, **kw), image_token_loss(
        garbage, targets, **kw)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    np.testing.assert_allclose(metrics_a["token_accuracy"], metrics_b["token_accuracy"])
    # ...and smoothing spreads over the real classes only: spread over the padded width, the -1e9 columns
    # would make the loss astronomically large.
    loss, _ = image_token_loss(logits, targets, num_classes=NUM_CLASSES, label_smoothing=0.1)
    over_padded_width = reference(logits, targets, PADDED, 0.1, 0.0)[0]
    assert np.isfinite(loss) and float(loss) < 20.0 and over_padded_width > 1e6


def test_perfect_prediction_gives_zero_loss_and_full_accuracy():
    targets = np.array([[1, 2, 3]])
    logits = np.full((1, 3, PADDED), -1e9, np.float32)
    logits[..., :NUM_CLASSES] = 0.0
    np.put_along_axis(logits, targets[..., None], 100.0, axis=-1)
    loss, metrics = image_token_loss(logits, targets, num_classes=NUM_CLASSES)
    assert float(loss) < 1e-6 and float(metrics["token_accuracy"]) == 1.0


@pytest.mark.parametrize("kw, message", [
    ({"num_classes": 17}, "num_classes"),
    ({"num_classes": 10, "label_smoothing": 1.0}, "label_smoothing"),
    ({"num_classes": 10, "z_loss": -1.0}, "z_loss"),
])
def test_bad_arguments_are_rejected(kw, message):
    logits, targets = padded_logits()
    with pytest.raises(ValueError, match=message):
        image_token_loss(logits, targets, **kw)


def test_shape_mismatch_is_rejected():
    logits, targets = padded_logits()
    with pytest.raises(ValueError, match="targets shape"):
        image_token_loss(logits, targets[:, :4], num_classes=NUM_CLASSES)
