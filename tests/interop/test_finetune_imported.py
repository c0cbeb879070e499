"""Fine-tuning imported weights: the seq2seq trainer starts from an imported work directory's parameters (with its
min-dalle BPE tokenizer), resumes from its own checkpoints afterwards, starts fresh work directories with
`config.init_from`, and refuses a config that builds another architecture before compiling anything."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dalle_jax.configs import shapes_vqgan
from dalle_jax.interop import import_weights
from dalle_jax.data import min_dalle_tokenizer
from dalle_jax.interop import safetensors_format
from dalle_jax.models.dalle_bart import DalleBart
from dalle_jax.trainers import seq2seq_trainer as seq2seq
from dalle_jax.training import checkpointing
from dalle_jax.trainers import init_from
from dalle_jax import runs
from tests.trainers.test_seq2seq_trainer import tiny_config, train_losses, vqgan_workdir  # noqa: F401 (fixture)

WORDS = ("a", "small", "large", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
         "triangle", "in", "the", "top", "left", "right", "bottom", "center", "above", "below", "of", "to")


def write_bpe_tokenizer(directory) -> list[str]:
    """A small min-dalle-style BPE vocabulary: BART's specials, the letters, and the shape captions' words whole."""
    start = min_dalle_tokenizer.WORD_START
    pieces = ["<s>", "<pad>", "</s>", "<unk>", start, *"abcdefghijklmnopqrstuvwxyz"] + [start + w for w in WORDS]
    merges = []
    for word in WORDS:
        merged = start
        for letter in word:
            merges.append(f"{merged} {letter}")
            merged += letter
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, min_dalle_tokenizer.VOCAB_FILE), "w", encoding="utf8") as f:
        json.dump({p: i for i, p in enumerate(pieces)}, f)
    with open(os.path.join(directory, min_dalle_tokenizer.MERGES_FILE), "w", encoding="utf8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return [os.path.join(directory, min_dalle_tokenizer.VOCAB_FILE),
            os.path.join(directory, min_dalle_tokenizer.MERGES_FILE)]


def random_seq2seq_params(model_cfg, seed: int) -> dict:
    abstract = nnx.state(nnx.eval_shape(lambda: DalleBart(model_cfg, rngs=nnx.Rngs(params=0, dropout=0))),
                         nnx.Param).to_pure_dict()
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), abstract)


def finetune_config(data_dir, vqgan_dir):
    """The seq2seq trainer tests' tiny run (same compiled steps, so one compilation cache serves both), logging
    every step and checkpointing every other; the test stops it early, before any evaluation."""
    config = tiny_config(data_dir, vqgan_dir)
    config.log_every, config.checkpoint_every = 1, 2
    # Imported weights are a plain DalleBart's: the recipe's code-features model is left out.
    config.extensions = tuple(e for e in config.extensions if e != "dalle_jax.shapes.code_features_stage")
    del config.model["code_features"]
    return config


def imported_workdir(tmp_path, name, config, vqgan_dir, seed=0):
    """Exports random DalleBart weights of `config`'s sizes with a BPE tokenizer, then imports them."""
    export_dir = str(tmp_path / f"{name}_export")
    params = random_seq2seq_params(config.model, seed)
    safetensors_format.export(export_dir, "seq2seq", ml_collections.ConfigDict(dict(model=config.model.to_dict())),
                              params, tokenizer_files=write_bpe_tokenizer(str(tmp_path / f"{name}_bpe")))
    workdir = str(tmp_path / name)
    import_weights.import_safetensors(export_dir, workdir, vqgan_workdir=vqgan_dir)
    return workdir, params


@pytest.fixture
def first_states(monkeypatch):
    """The state each `train` call's first step receives, fetched to the host before the step updates it."""
    seen, real = [], seq2seq.jit_train_step

    def recording(setup, shardings, mesh):
        step_fn, calls = real(setup, shardings, mesh), []

        def step(state, batch):
            if not calls:
                seen.append(jax.device_get(state))
            calls.append(1)
            return step_fn(state, batch)
        return step

    monkeypatch.setattr(seq2seq, "jit_train_step", recording)
    return seen


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def checkpoint_params(workdir, step, like):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return jax.device_get(checkpointing.restore_params(workdir, step, target))


def test_imported_weights_fine_tune_resume_and_seed_a_new_run(tmp_path, shapes_data_dir, vqgan_workdir, first_states):
    config = finetune_config(shapes_data_dir, vqgan_workdir)
    workdir, imported = imported_workdir(tmp_path, "imported", config, vqgan_workdir)

    # The first step starts from the imported parameters, a fresh optimizer state and step 0.
    assert seq2seq.train(config, workdir, stop_after=2) is None
    first = first_states[0]
    assert int(first["step"]) == 0
    assert_trees_equal(first["params"], imported)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(first["opt_state"]))
    assert sorted(train_losses(workdir)) == [1, 2] and all(np.isfinite(list(train_losses(workdir).values())))
    # It trained with min-dalle's BPE ids: no sentencepiece model was made.
    assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))
    assert min_dalle_tokenizer.has_files(workdir)

    # Later checkpoints are full ones: the next call resumes from step 2, not from the imported weights.
    assert checkpointing.checkpoint_steps(workdir) == [0, 2]
    assert seq2seq.train(config, workdir, stop_after=3) is None
    resumed = first_states[1]
    assert int(resumed["step"]) == 2
    assert_trees_equal(resumed["params"], checkpoint_params(workdir, 2, imported))
    assert np.any(np.asarray(resumed["params"]["decoder"]["lm_head"]["kernel"])
                  != imported["decoder"]["lm_head"]["kernel"])
    assert sorted(train_losses(workdir)) == [1, 2, 3]

    # init_from: a fresh work directory starts at step 0 from that run's newest parameters (loaded as above)
    # and takes its tokenizer; once the fresh run has its own checkpoints, it resumes from them.
    config.init_from = workdir
    fresh = str(tmp_path / "fresh")
    assert init_from.find_start(config, fresh) == init_from.Start(os.path.abspath(workdir), 3, 0)
    assert min_dalle_tokenizer.has_files(fresh)
    checkpointing.save_params(workdir, 5, imported)  # a newer params-only checkpoint is a newer start as well
    assert init_from.find_start(config, fresh).step == 5


def test_a_config_of_another_architecture_fails_before_compiling(tmp_path, shapes_data_dir, vqgan_workdir):
    config = finetune_config(shapes_data_dir, vqgan_workdir)
    workdir, _ = imported_workdir(tmp_path, "imported", config, vqgan_workdir)
    config.model.heads, config.model.ffn_dim = 4, 96
    with pytest.raises(ValueError) as err:
        seq2seq.train(config, workdir)
    message = str(err.value)
    assert "config.model.heads=4 but the weights in" in message and "have 2: pass --config.model.heads=2" in message
    assert "config.model.ffn_dim=96" in message and "--config.model.ffn_dim=64" in message
    # Nothing was written: the imported record and its only checkpoint are untouched.
    assert runs.load_config(workdir).get("imported_from", "").startswith("safetensors")
    assert checkpointing.checkpoint_steps(workdir) == [0]
    # The same check guards config.init_from, which cannot be combined with weights imported into the workdir.
    config.init_from = str(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="holds imported weights .* drop --config.init_from"):
        seq2seq.train(config, workdir)
    config.init_from = workdir
    with pytest.raises(ValueError, match="pass --config.model.heads=2"):
        seq2seq.train(config, str(tmp_path / "fresh"))
    assert not os.path.exists(tmp_path / "fresh" / "checkpoints")


def test_vqgan_checks_name_fields_and_refuse_a_decode_only_source():
    config = shapes_vqgan.get_config("tiny")
    source = ml_collections.ConfigDict(json.loads(config.to_json()))
    init_from.check_matches(config, source, "src")
    source.model.ch_mult, source.model.dtype = [1, 2, 2], "bfloat16"  # dtype may differ: it is not architecture
    with pytest.raises(ValueError, match=r"pass --config.model.ch_mult=\(1,2,2\)"):
        init_from.check_matches(config, source, "src")
    source.model.ch_mult = list(config.model.ch_mult)
    source.decode_only = True
    with pytest.raises(ValueError, match="decode-only VQGAN"):
        init_from.check_matches(config, source, "src")
    source.decode_only, source.trainer = False, "seq2seq"
    with pytest.raises(ValueError, match="'seq2seq' trainer"):
        init_from.check_matches(config, source, "src")
