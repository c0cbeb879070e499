"""Your own images end to end: a folder of captioned pictures trains images_vqgan:tiny and images_dalle:tiny through
the command line, the seq2seq run reads its VQGAN's dataset and reports on `validation`, and sample.py draws from
it. Plus the checks that stop a bad data config before any work."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dalle_jax import recipes, runs
from dalle_jax.data import captioned_folder, split_checks
from dalle_jax.trainers import vqgan_dataset
from tests.conftest import REPO, subprocess_env

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
VALIDATION_IMAGES = 4
TRAIN_IMAGES = 56
# Four steps, one evaluation and one checkpoint per run: what is tested here is the path through the stages.
SHORT = ["--config.num_steps=4", "--config.eval_every=4", "--config.checkpoint_every=4", "--config.log_every=2"]


def draw(color: str, shape: str, size: int = 40) -> Image.Image:
    """A white picture of one coloured shape (40 pixels: the dataset resizes it to the 32 trained on)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    paint = ImageDraw.Draw(image)
    (paint.ellipse if shape == "circle" else paint.rectangle)(box, fill=COLORS[color])
    return image


def write_folder(folder) -> int:
    """TRAIN_IMAGES + VALIDATION_IMAGES captioned PNGs and their captions.jsonl; the file names are picked so that
    the dataset's hash split puts VALIDATION_IMAGES of them in `validation`. Returns the number of images."""
    os.makedirs(folder)
    lines, counts, i = [], {captioned_folder.TRAIN: 0, captioned_folder.VALIDATION: 0}, 0
    wanted = {captioned_folder.TRAIN: TRAIN_IMAGES, captioned_folder.VALIDATION: VALIDATION_IMAGES}
    while counts != wanted:
        name = f"picture_{i}.png"
        split = captioned_folder.split_of(name, 0.02)
        if counts[split] < wanted[split]:
            color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
            draw(color, shape).save(os.path.join(folder, name))
            lines.append(json.dumps({"file": name, "caption": f"a {color} {shape}"}))
            counts[split] += 1
        i += 1
    with open(os.path.join(folder, captioned_folder.CAPTIONS_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def run(args, compilation_cache) -> str:
    """Runs a command of the checkout; returns its log (stderr), failing with it on a non-zero exit."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            env=subprocess_env(compilation_cache), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
    root = tmp_path_factory.mktemp("own_images")
    folder, vqgan_dir, dalle_dir = str(root / "pictures"), str(root / "vqgan"), str(root / "dalle")
    write_folder(folder)
    vqgan_log = run(["train.py", "--config=images_vqgan:tiny", f"--workdir={vqgan_dir}",
                     f"--config.data.folder={folder}", f"--config.data.data_dir={root / 'tfds'}", *SHORT],
                    compilation_cache)
    dalle_log = run(["train.py", "--config=images_dalle:tiny", f"--workdir={dalle_dir}",
                     f"--config.vqgan_workdir={vqgan_dir}", *SHORT], compilation_cache)
    return dict(root=root, folder=folder, vqgan=vqgan_dir, dalle=dalle_dir, vqgan_log=vqgan_log, dalle_log=dalle_log)


def test_the_seq2seq_run_reads_the_vqgans_folder_and_says_so(trained):
    assert (f"Data: captioned_folder (folder {trained['folder']}), the dataset of the VQGAN run in "
            f"{trained['vqgan']}") in trained["dalle_log"]
    recorded = runs.read_config(trained["dalle"], "seq2seq").data
    assert (recorded.dataset, recorded.folder, recorded.data_dir) == (
        "captioned_folder", trained["folder"], str(trained["root"] / "tfds"))
    # The 8-example evaluation batch of the tiny recipes is lowered to the 4 validation images, with a warning.
    for name in ("vqgan", "dalle"):
        assert "evaluating in batches of 4 instead" in trained[f"{name}_log"]
        assert runs.load_config(trained[name]).data.eval_batch_size == VALIDATION_IMAGES
    # With no prompts in the recipe, the sample grid shows validation captions.
    prompts = runs.read_config(trained["dalle"], "seq2seq").sampling.prompts
    assert prompts and all(p.startswith("a ") and p.split()[1] in COLORS for p in prompts)


def test_both_runs_report_their_final_figures_on_validation(trained):
    for name in ("vqgan", "dalle"):
        with open(os.path.join(trained[name], "test_metrics.json")) as f:
            figures = json.load(f)
        assert figures["split"] == "validation" and figures["step"] == 4
        assert figures["examples"] == VALIDATION_IMAGES


def test_sample_draws_a_grid_from_the_run(trained, compilation_cache):
    out = str(trained["root"] / "grid.png")
    run(["sample.py", f"--workdir={trained['dalle']}", "--prompt=a red circle", "--num_images=3", f"--out={out}"],
        compilation_cache)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (34 + 2, 3 * 34 + 2, 3)  # one row of three 32x32 images with 2-pixel gaps
    assert grid.std() > 0


# The checks before any work.

def tiny_folder_config(folder=""):
    config = recipes.load("images_vqgan:tiny")
    config.data.folder = folder
    return config


def test_a_folder_dataset_without_a_folder_fails_naming_the_flag(tmp_path):
    from dalle_jax.trainers import vqgan_trainer
    with pytest.raises(ValueError, match="captioned_folder reads your images: pass --config.data.folder=DIR"):
        vqgan_trainer.train(tiny_folder_config(), str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="config.data.folder='/no/such/dir' is not a directory"):
        vqgan_trainer.train(tiny_folder_config("/no/such/dir"), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_shapes_only_settings_on_a_folder_fail_before_any_work(tmp_path):
    from dalle_jax.trainers import seq2seq_trainer
    config = recipes.load("shapes_dalle:tiny")
    config.vqgan_workdir = str(tmp_path / "no_vqgan")  # never read: the checks stop the run first
    config.data.dataset, config.data.folder = "captioned_folder", str(tmp_path)
    config.model.code_features = 25
    with pytest.raises(ValueError, match="config.model.code_features=25 describes codes by the captioned_shapes"):
        seq2seq_trainer.train(config, str(tmp_path / "run"))
    config.model.code_features = 0
    with pytest.raises(ValueError, match="config.data.left_or_above_caption_steps=6 rewords captioned_shapes"):
        seq2seq_trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_an_evaluation_batch_larger_than_a_split_is_lowered_to_fit_it(caplog):
    data = recipes.load("images_vqgan:tiny").data
    data.eval_batch_size = 64
    with caplog.at_level(logging.WARNING):
        assert split_checks.fitted_eval_batch(data, dict(train=100, validation=13), multiple=4) == 12
    assert "eval_batch_size=64 is larger than the 13 examples" in caplog.text
    assert split_checks.fitted_eval_batch(data, dict(train=100, validation=80, test=40), multiple=1) == 40
    data.eval_batch_size = 8
    assert split_checks.fitted_eval_batch(data, dict(train=100, validation=13), multiple=4) == 8


def test_missing_splits_and_too_little_data_fail_naming_the_fix():
    data = recipes.load("images_vqgan:tiny").data
    with pytest.raises(ValueError, match="has no 'validation' split .* add images"):
        split_checks.fitted_eval_batch(data, dict(train=100))
    with pytest.raises(ValueError, match="train split of 'captioned_folder' has 5 examples.*batch_size to at most 5"):
        split_checks.fitted_eval_batch(data, dict(train=5, validation=5))
    with pytest.raises(ValueError, match="hold 3 examples, fewer than the 4 devices"):
        split_checks.fitted_eval_batch(data, dict(train=100, validation=3), multiple=4)


def test_the_final_split_is_test_where_there_is_one():
    assert split_checks.final_split(dict(train=9, validation=2, test=2)) == "test"
    assert split_checks.final_split(dict(train=9, validation=2)) == "validation"


def vqgan_run(workdir, **data):
    config = recipes.load("images_vqgan:tiny")
    config.data.update(data)
    runs.save_config(config, str(workdir))
    return str(workdir)


def test_an_empty_dataset_takes_the_vqgans_and_logs_it(tmp_path, caplog):
    vqgan_dir = vqgan_run(tmp_path / "vqgan", folder=str(tmp_path), data_dir="/data/tfds", image_size=64)
    config = recipes.load("images_dalle:tiny")
    config.vqgan_workdir, config.data.image_size = vqgan_dir, 0
    with caplog.at_level(logging.INFO):
        resolved = vqgan_dataset.resolve(config)
    assert (resolved.data.dataset, resolved.data.folder, resolved.data.data_dir, resolved.data.image_size) == (
        "captioned_folder", str(tmp_path), "/data/tfds", 64)
    assert config.data.dataset == "" and config.data.image_size == 0  # the caller's config is left as it was
    assert f"Data: captioned_folder (folder {tmp_path}), the dataset of the VQGAN run in {vqgan_dir}" in caplog.text
    config.data.data_dir = "/mine"  # what the seq2seq config sets stays
    assert vqgan_dataset.resolve(config).data.data_dir == "/mine"


def test_a_dataset_other_than_the_vqgans_is_used_with_a_warning_naming_both(tmp_path, caplog):
    vqgan_dir = vqgan_run(tmp_path / "vqgan", folder=str(tmp_path / "a"))
    config = recipes.load("images_dalle:tiny")
    config.vqgan_workdir = vqgan_dir
    config.data.dataset, config.data.folder = "captioned_folder", str(tmp_path / "b")
    with caplog.at_level(logging.WARNING):
        assert vqgan_dataset.resolve(config).data.folder == str(tmp_path / "b")
    assert (f"reads captioned_folder (folder {tmp_path / 'b'}), but its VQGAN ({vqgan_dir}) was trained on "
            f"captioned_folder (folder {tmp_path / 'a'})") in caplog.text
    caplog.clear()
    config.data.folder = str(tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        vqgan_dataset.resolve(config)
    assert "was trained on" not in caplog.text


def test_an_imported_vqgan_has_no_dataset_to_take(tmp_path):
    config = recipes.load("images_vqgan:tiny")
    config.imported_from = "taming:model.ckpt"
    runs.save_config(config, str(tmp_path / "imported"))
    seq2seq = recipes.load("images_dalle:tiny")
    seq2seq.vqgan_workdir = str(tmp_path / "imported")
    with pytest.raises(ValueError, match="was imported .* --config.data.dataset=captioned_folder --config.data.folder"):
        vqgan_dataset.resolve(seq2seq)
