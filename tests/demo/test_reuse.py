"""`make demo` keeps an earlier run only when the current recipe trained it, after the run it learned from."""
import json
import os

import ml_collections

from dalle_jax.configs import shapes_captioner, shapes_dalle
from dalle_jax.demo import reuse as demo_reuse


def _recipe() -> ml_collections.ConfigDict:
    config = shapes_captioner.get_config("tiny")
    config.seq2seq_workdir = "runs/demo/dalle"
    return config


# What the caption model's trainer fills in from the seq2seq run it serves.
CAPTIONER_FILLED = dict(image_size=32, image_length=64, image_vocab_size=1024, text_length=40, vocab_size=55)


def _write_run(workdir, config, *, finished_at=None, edit=None, filled=CAPTIONER_FILLED) -> None:
    """A work directory as the trainer leaves it: config.json with the fields it fills in, and test_metrics.json
    once finished."""
    saved = json.loads(config.to_json_best_effort())
    saved["model"].update(filled)
    saved["tokenizer_sha256"] = "ab" * 32
    if edit:
        edit(saved)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(saved, f)
    os.makedirs(os.path.join(workdir, "checkpoints"))
    if finished_at is not None:
        with open(os.path.join(workdir, "test_metrics.json"), "w") as f:
            json.dump(dict(step=finished_at, loss=0.2), f)


def _moved_aside(tmp_path, name):
    return sorted(p for p in os.listdir(tmp_path) if p.startswith(f"{name}.replaced-"))


def test_filled_in_fields_are_not_compared(tmp_path):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe)
    assert demo_reuse.changed_fields(str(tmp_path / "run"), recipe) == {}


def test_sampling_settings_are_not_compared(tmp_path):
    recipe = shapes_dalle.get_config("tiny")
    recipe.vqgan_workdir = "runs/demo/vqgan"
    _write_run(tmp_path / "run", recipe, filled={},
               edit=lambda saved: saved["sampling"].update(candidates=recipe.sampling.candidates + 3, top_k=2))
    assert demo_reuse.changed_fields(str(tmp_path / "run"), recipe) == {}


def test_changed_and_missing_settings_are_named(tmp_path):
    recipe = _recipe()

    def older_recipe(saved):
        del saved["model"]["reads"]
        saved["optimizer"]["learning_rate"] = 1e-3

    _write_run(tmp_path / "run", recipe, edit=older_recipe)
    assert demo_reuse.changed_fields(str(tmp_path / "run"), recipe) == {
        "model.reads": ("code_features", None), "optimizer.learning_rate": (recipe.optimizer.learning_rate, 1e-3)}


def test_a_finished_run_of_the_recipe_is_kept(tmp_path):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe, finished_at=recipe.num_steps)
    assert demo_reuse.keep_or_move_aside(str(tmp_path / "run"), recipe)
    assert os.path.exists(tmp_path / "run" / "test_metrics.json") and not _moved_aside(tmp_path, "run")


def test_an_unfinished_run_of_the_recipe_stays_to_be_resumed(tmp_path):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe)
    assert not demo_reuse.keep_or_move_aside(str(tmp_path / "run"), recipe)
    assert os.path.exists(tmp_path / "run" / "checkpoints") and not _moved_aside(tmp_path, "run")


def test_a_run_of_an_older_recipe_is_moved_aside_whole(tmp_path, caplog):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe, finished_at=recipe.num_steps,
               edit=lambda saved: saved["model"].update(reads="pixels"))
    assert not demo_reuse.keep_or_move_aside(str(tmp_path / "run"), recipe)
    assert not os.path.exists(tmp_path / "run")
    [aside] = _moved_aside(tmp_path, "run")
    assert os.path.exists(tmp_path / aside / "test_metrics.json") and os.path.exists(tmp_path / aside / "checkpoints")
    assert "model.reads: 'pixels' -> 'code_features'" in caplog.text


def test_a_run_whose_upstream_trains_again_is_moved_aside(tmp_path, caplog):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe, finished_at=recipe.num_steps)
    assert not demo_reuse.keep_or_move_aside(str(tmp_path / "run"), recipe, upstream_kept=False)
    assert not os.path.exists(tmp_path / "run") and len(_moved_aside(tmp_path, "run")) == 1
    assert "the run it learned from trains again" in caplog.text


def test_a_finished_run_of_other_length_is_not_kept(tmp_path):
    recipe = _recipe()
    _write_run(tmp_path / "run", recipe, finished_at=recipe.num_steps)
    recipe.num_steps += 1
    assert not demo_reuse.keep_or_move_aside(str(tmp_path / "run"), recipe)
    assert len(_moved_aside(tmp_path, "run")) == 1


def test_no_run_yet(tmp_path):
    assert not demo_reuse.keep_or_move_aside(str(tmp_path / "run"), _recipe(), upstream_kept=False)
    assert not os.listdir(tmp_path)
