"""The BPE tokenizer gives exactly min-dalle's TextTokenizer ids, on a vocabulary learned here from a small corpus."""
import collections
import json

import numpy as np
import pytest
from min_dalle.text_tokenizer import TextTokenizer

from dalle_jax.data.min_dalle_tokenizer import WORD_START, MinDalleTokenizer

CORPUS = ("a red cube on a blue sphere . the small green triangle left of the big yellow circle , "
          "an astronaut riding a horse in space ; photo of a cat wearing sunglasses ! painting of the eiffel tower "
          "at night ? sunset over the mountains ( oil on canvas ) - 3d render 1024x1024 pixel art 's 'quoted' "
          "\"double\" [brackets] {braces} #hash @at $dollar %percent &and *star +plus =equals ~tilde")
PROMPTS = [
    "A red cube on a blue sphere", "an ASTRONAUT riding a horse, in space!", "  double  spaces   and trailing ",
    "tab\tseparated\twords", "new\nline", "café crème brûlée", "naïve façade — em dash", "日本の桜 cherry blossoms",
    "emoji 🐶 dog and 🚀 rocket", "👍🏽 thumbs", "", "   ", "punctuation... ?! ;:,.'\"()[]{}", "x" * 40,
    "unknownzzqq words", "3d render, 1024x1024", "it's the cat's hat", "Ω≈ç√∫ math", "ünïcödé ÜBER",
    "the eiffel tower at night", "sunsetovermountains", "a" * 3 + " " + "b" * 5,
]


def learn_bpe(corpus: str, merges: int):
    words = collections.Counter(tuple([WORD_START, *w]) for w in corpus.lower().split(" ") if w)
    learned = []
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word[:-1], word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        learned.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return learned


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    merges = learn_bpe(CORPUS, 150)
    pieces = sorted({c for c in CORPUS.lower() if c != " "} | {WORD_START} | {WORD_START + c for c in "abcst"})
    pieces += [a + b for a, b in merges]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in pieces:
        if piece not in vocab and piece != "z":  # leave a character out, so `<unk>` is exercised
            vocab[piece] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf8")
    return directory


def reference_tokenizer(directory):
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf8"))
    merges = (directory / "merges.txt").read_text(encoding="utf8").split("\n")[1:-1]  # as MinDalle reads it
    return TextTokenizer(vocab, merges)


def test_ids_match_min_dalle(tokenizer_dir):
    ours, reference = MinDalleTokenizer(str(tokenizer_dir)), reference_tokenizer(tokenizer_dir)
    merged_somewhere = False
    for prompt in PROMPTS:
        expected = reference.tokenize(prompt)
        assert ours.ids(prompt) == expected, prompt
        merged_somewhere |= any(len(ours._pieces[i]) > 2 for i in expected[1:-1])
    assert merged_somewhere
    assert 3 in reference.tokenize("unknownzzqq")  # the vocabulary does lack a piece


def test_fixed_length_rows_follow_min_dalle(tokenizer_dir):
    ours, reference = MinDalleTokenizer(str(tokenizer_dir)), reference_tokenizer(tokenizer_dir)
    row, truncated = ours.encode_with_truncation("a red cube", 16)
    expected = reference.tokenize("a red cube")
    assert not truncated and row.tolist() == expected + [1] * (16 - len(expected))
    long = " ".join(["sphere"] * 40)
    row, truncated = ours.encode_with_truncation(long, 16)
    assert truncated and row.tolist() == reference.tokenize(long)[:16]  # min-dalle keeps the first 16 ids
    assert ours.encode("", 8).tolist() == [0, 2, 1, 1, 1, 1, 1, 1]
    assert ours.decode(ours.encode("the big yellow circle", 16)) == "the big yellow circle"


def test_bad_files_are_refused(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        MinDalleTokenizer(str(tmp_path))
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf8"))
    vocab["<pad>"], vocab["</s>"] = 2, 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="BART"):
        MinDalleTokenizer(str(tmp_path))
    np.testing.assert_array_equal(MinDalleTokenizer(str(tokenizer_dir)).encode_batch([], 4).shape, (0, 4))
