"""A seq2seq run's registered reranker (`reranker.json`): written whole, found again after the pair moves, and a
clear error when it is gone. The trainer that writes it and the samplers that use it are tested with real runs in
tests/trainers/test_captioner_trainer.py and tests/inference/test_reranked_sampling.py."""
import json
import os

import jax
import pytest

from dalle_jax import runs


@pytest.fixture
def pair(tmp_path):
    """ROOT/dalle and ROOT/reranker side by side, as `make demo` leaves them; only their directories matter here."""
    root = tmp_path / "root"
    (root / "dalle").mkdir(parents=True)
    (root / "reranker").mkdir()
    return root


def test_the_registration_names_the_reranker_relative_to_the_run(pair):
    path = runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 500)
    assert path == os.path.join(str(pair / "dalle"), runs.RERANKER_FILE)
    with open(path) as f:
        entry = json.load(f)
    assert entry["workdir"] == os.path.join("..", "reranker") and entry["step"] == 500
    assert entry["absolute_workdir"] == str(pair / "reranker")
    assert os.listdir(pair / "dalle") == [runs.RERANKER_FILE]  # no temporary file left behind
    assert runs.registered_reranker(str(pair / "dalle")) == str(pair / "reranker")


def test_the_pair_moved_together_still_finds_its_reranker(pair, tmp_path):
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 5)
    moved = tmp_path / "elsewhere"
    os.rename(pair, moved)
    assert runs.registered_reranker(str(moved / "dalle")) == str(moved / "reranker")


def test_a_run_moved_alone_falls_back_to_the_absolute_path(pair, tmp_path):
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 5)
    os.rename(pair / "dalle", tmp_path / "dalle_alone")
    assert runs.registered_reranker(str(tmp_path / "dalle_alone")) == str(pair / "reranker")


def test_the_newest_registration_wins(pair):
    (pair / "reranker2").mkdir()
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 5)
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker2"), 7)
    assert runs.registered_reranker(str(pair / "dalle")) == str(pair / "reranker2")


def test_a_deleted_reranker_names_the_file_and_how_to_turn_it_off(pair):
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 5)
    os.rmdir(pair / "reranker")
    registration = os.path.join(str(pair / "dalle"), runs.RERANKER_FILE)
    with pytest.raises(FileNotFoundError) as error:
        runs.registered_reranker(str(pair / "dalle"))
    message = str(error.value)
    assert f"{registration} registers the reranker" in message and "no longer exists" in message
    assert '--reranker_workdir=""' in message and f"delete {registration}" in message
    assert f"--config.seq2seq_workdir={pair / 'dalle'}" in message
    # Turning it off, or naming another, does not read the registration at all.
    assert runs.reranker_workdir_for(str(pair / "dalle"), "") is None
    assert runs.reranker_workdir_for(str(pair / "dalle"), "other") == "other"


def test_flag_values_choose_the_reranker(pair):
    dalle = str(pair / "dalle")
    assert runs.registered_reranker(dalle) is None and runs.reranker_workdir_for(dalle, None) is None
    runs.register_reranker(dalle, str(pair / "reranker"), 5)
    assert runs.reranker_workdir_for(dalle, None) == str(pair / "reranker")
    assert runs.reranker_workdir_for(dalle, "") is None
    assert runs.reranker_workdir_for(dalle, "runs/mine") == "runs/mine"


def test_an_unreadable_registration_is_refused_with_the_fix(pair):
    (pair / "dalle" / runs.RERANKER_FILE).write_text("{\"step\": 5")
    with pytest.raises(ValueError, match=r"reranker.json does not register a reranker \(JSONDecodeError.*"
                                         r"--reranker_workdir=\"\""):
        runs.registered_reranker(str(pair / "dalle"))


def test_only_process_zero_registers(pair, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    runs.register_reranker(str(pair / "dalle"), str(pair / "reranker"), 5)
    assert not os.listdir(pair / "dalle")
