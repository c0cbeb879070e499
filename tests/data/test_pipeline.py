"""The grain pipeline: per-epoch reshuffling, determinism, and resuming from a saved iterator state."""
import numpy as np
import pytest

from dalle_jax.data import pipeline


class ArraySource:
    def __init__(self, n):
        self.images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": b"x"}


def ids(batch):
    return batch["image"][:, 0, 0, 0].tolist()


def make(seed=0, n=20, batch=4):
    return pipeline.train_iterator(ArraySource(n), pipeline.image_transform("image", 2), global_batch=batch,
                                   seed=seed, read_threads=1, prefetch=2)


def test_epochs_cover_the_data_and_reshuffle():
    it = make()
    first = sum((ids(next(it)) for _ in range(5)), [])
    second = sum((ids(next(it)) for _ in range(5)), [])
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert first != second


def test_same_seed_same_order_other_seed_other_order():
    a, b, c = make(0), make(0), make(1)
    seq_a = [ids(next(a)) for _ in range(6)]
    assert seq_a == [ids(next(b)) for _ in range(6)]
    assert seq_a != [ids(next(c)) for _ in range(6)]


def test_resume_from_state_continues_exactly():
    it = make()
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [ids(next(it)) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    assert [ids(next(resumed)) for _ in range(5)] == expected


def test_eval_batches_are_ordered_and_drop_the_remainder():
    batches = list(pipeline.eval_batches(ArraySource(10), pipeline.image_transform("image", 2), global_batch=4))
    assert [ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(list(pipeline.eval_batches(ArraySource(10), pipeline.image_transform("image", 2),
                                          global_batch=4, num_batches=1))) == 1


def test_wrong_image_size_is_a_clear_error():
    it = pipeline.train_iterator(ArraySource(8), pipeline.image_transform("image", 4), global_batch=4, seed=0)
    with pytest.raises(ValueError, match="config.data.image_size"):
        next(it)


def test_too_small_split_is_a_clear_error():
    with pytest.raises(ValueError, match="config.data.batch_size"):
        make(n=3, batch=4)


def test_eval_split_smaller_than_a_batch_names_the_eval_field():
    with pytest.raises(ValueError, match="config.data.eval_batch_size"):
        next(pipeline.eval_batches(ArraySource(3), pipeline.image_transform("image", 2), global_batch=4))


class _WordTokenizer:
    def encode(self, caption, length):
        return caption


def _caption_counts(canonical_prob, draws=4000):
    transform = pipeline.caption_and_codes(_WordTokenizer(), 8, random_caption=True, canonical_prob=canonical_prob)
    example = {"captions": ["canonical", "p1", "p2", "p3", "p4"], "codes": [1, 2]}
    rng = np.random.default_rng(0)
    drawn = [transform(example, rng)["text_ids"] for _ in range(draws)]
    return {c: drawn.count(c) / draws for c in example["captions"]}


def test_canonical_caption_probability_mixes_the_first_caption_in():
    assert _caption_counts(1.0)["canonical"] == 1.0
    uniform = _caption_counts(0.0)
    assert all(abs(share - 0.2) < 0.03 for share in uniform.values())
    # Half the draws take the canonical caption; the other half pick uniformly among all five.
    assert abs(_caption_counts(0.5)["canonical"] - 0.6) < 0.03
    evaluation = pipeline.caption_and_codes(_WordTokenizer(), 8, random_caption=False)
    assert evaluation({"captions": ["canonical", "p1"], "codes": [1]})["text_ids"] == "canonical"


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_canonical_caption_probability_outside_zero_one_is_an_error(bad):
    with pytest.raises(ValueError, match="canonical_caption_prob"):
        pipeline.caption_and_codes(_WordTokenizer(), 8, random_caption=True, canonical_prob=bad)


def test_random_transforms_see_each_examples_position_in_the_stream():
    source = [{"x": np.int64(i)} for i in range(12)]
    it = pipeline.train_iterator(source, None, global_batch=4, seed=0, read_threads=0, prefetch=0,
                                 random_transform=lambda example, rng: {"at": example[pipeline.STREAM_INDEX]})
    for step in range(5):  # over an epoch boundary: positions keep counting
        np.testing.assert_array_equal(next(it)["at"], np.arange(4 * step, 4 * step + 4))


def test_a_train_caption_override_replaces_the_draw_where_it_gives_one():
    transform = pipeline.caption_and_codes(
        _WordTokenizer(), 8, random_caption=True, canonical_prob=1.0,
        train_caption=lambda example: "override" if example[pipeline.STREAM_INDEX] < 2 else None)
    example = {"captions": ["canonical", "p1"], "codes": [1]}
    rng = np.random.default_rng(0)
    at = lambda position: transform({**example, pipeline.STREAM_INDEX: position}, rng)["text_ids"]
    assert at(0) == at(1) == "override"
    assert at(2) == "canonical"  # no override: the usual draw (canonical, here)
