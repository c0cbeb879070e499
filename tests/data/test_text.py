"""Caption normalisation and the sentencepiece tokenizer trained on a tiny corpus."""
import os

import numpy as np
import pytest

from dalle_jax.data.text import TextTokenizer, normalize_caption, train_tokenizer

CORPUS = [
    "a small red circle in the top left",
    "a large blue square in the center",
    "a green triangle above a red square",
    "A purple circle to the left of an orange triangle",
    "a   yellow  square in the bottom right",
    "",
    "a large red triangle below a blue circle",
] * 3


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer(CORPUS, 200, str(tmp_path_factory.mktemp("tok") / "captions"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return TextTokenizer(model_path)


@pytest.mark.parametrize("raw, normalized", [
    ("ＡＢＣ", "abc"),
    ("  A  Red\tCircle\n in the  TOP left ", "a red circle in the top left"),
    ("ﬁve ①", "five 1"),
    ("\u3000wide\u3000space\u3000", "wide space"),
    ("", ""),
])
def test_normalize_caption(raw, normalized):
    assert normalize_caption(raw) == normalized


def test_normalize_caption_rejects_non_strings():
    with pytest.raises(TypeError, match="str"):
        normalize_caption(b"bytes")


def test_special_ids_and_pieces(tokenizer):
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    sp = tokenizer._sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]


def test_vocab_larger_than_corpus_supports_is_capped(tokenizer):
    # 200 was asked for; this corpus cannot fill it, and the tokenizer reports what it really has.
    assert 4 < tokenizer.vocab_size < 200


def test_round_trip_and_layout(tokenizer):
    caption = "a small red circle in the top left"
    ids = tokenizer.encode(caption, 32)
    assert ids.dtype == np.int32 and ids.shape == (32,)
    n = int((ids != 1).sum())
    assert ids[0] == 0 and ids[n - 1] == 2 and np.all(ids[n:] == 1) and n > 3
    assert not np.isin(ids[1:n - 1], [0, 1, 2]).any()
    assert tokenizer.decode(ids) == caption
    # Normalisation runs before encoding: these spell the same caption.
    np.testing.assert_array_equal(tokenizer.encode("  A SMALL red\tcircle in the ＴＯＰ left", 32), ids)


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer.encode("a red ziggurat", 32)
    assert 3 in ids.tolist()


def test_empty_caption_is_bos_eos_then_padding(tokenizer):
    ids, truncated = tokenizer.encode_with_truncation("", 6)
    np.testing.assert_array_equal(ids, [0, 2, 1, 1, 1, 1])
    assert not truncated and tokenizer.decode(ids) == ""
    np.testing.assert_array_equal(tokenizer.encode("   ", 6), ids)


def test_truncation_keeps_eos_last_and_is_reported(tokenizer):
    caption = "a large red triangle below a blue circle"
    full, truncated = tokenizer.encode_with_truncation(caption, 64)
    n = int((full != 1).sum())
    assert not truncated
    exact, truncated = tokenizer.encode_with_truncation(caption, n)
    assert not truncated
    np.testing.assert_array_equal(exact, full[:n])
    short, truncated = tokenizer.encode_with_truncation(caption, 5)
    assert truncated
    np.testing.assert_array_equal(short, [*full[:4], 2])
    tiny, truncated = tokenizer.encode_with_truncation(caption, 3)
    assert truncated and tiny[0] == 0 and tiny[2] == 2


def test_max_length_below_three_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="max_length=2"):
        tokenizer.encode("a red circle", 2)


def test_encode_batch_and_decode_batch(tokenizer):
    captions = ["a red circle", "", "a large blue square in the center"]
    batch = tokenizer.encode_batch(captions, 48)
    assert batch.shape == (3, 48) and batch.dtype == np.int32
    for row, caption in zip(batch, captions):
        np.testing.assert_array_equal(row, tokenizer.encode(caption, 48))
    assert tokenizer.decode_batch(batch) == captions
    assert tokenizer.encode_batch([], 16).shape == (0, 16)


def test_decode_rejects_out_of_vocabulary_ids(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size, 2])


def test_training_is_deterministic(model_path, tmp_path):
    again = train_tokenizer(CORPUS, 200, str(tmp_path / "sub" / "again"))
    assert again == str(tmp_path / "sub" / "again") + ".model"
    with open(model_path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_bpe_model_type_keeps_special_ids(tmp_path):
    tok = TextTokenizer(train_tokenizer(CORPUS, 60, str(tmp_path / "bpe"), model_type="bpe"))
    ids = tok.encode("a red circle", 16)
    assert ids[0] == 0 and 2 in ids.tolist() and tok.decode(ids) == "a red circle"


def test_training_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 8, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_tokenizer(["", "   "], 100, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(CORPUS, 100, str(tmp_path / "x"), model_type="word_piece")


def test_missing_or_foreign_model_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        TextTokenizer(str(tmp_path / "nope.model"))
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[:5]), model_prefix=str(tmp_path / "foreign"),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="special ids"):
        TextTokenizer(str(tmp_path / "foreign.model"))
    assert os.path.isfile(tmp_path / "foreign.model")
