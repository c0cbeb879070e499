"""Training on a folder holding every kind of bad image and caption: each is normalised or skipped, counted in the
run's metrics and logged once by name, and training runs to the end."""
import json
import logging
import os

from PIL import Image

from dalle_jax.data import captioned_folder as cf
from dalle_jax.trainers import vqgan_trainer as vqgan
from dalle_jax.training.metrics import read_metrics
from tests.data.test_captioned_folder import EXPECTED_COUNTS, KEPT_FILES, _write_messy_folder
from tests.faults.conftest import fault_config

SKIPPED_FILES = ("empty.jpg", "junk.png", "truncated.jpg", "missing.png", "uncaptioned.png")


def _add_validation_images(folder, count):
    """Good images whose paths hash into the 2% validation split the trainer's folder config uses."""
    lines, i = [], 0
    while len(lines) < count:
        name = f"val/{i}.png"
        if cf.split_of(name, 0.02) == cf.VALIDATION:
            (folder / "val").mkdir(exist_ok=True)
            Image.new("RGB", (40, 40), (i % 256, 80, 160)).save(folder / name)
            lines.append(json.dumps({"file": name, "caption": f"validation picture {i}"}))
        i += 1
    return lines


def test_training_on_a_messy_folder_counts_every_bad_item_and_finishes(tmp_path, caplog, compilation_cache):
    folder = tmp_path / "pictures"
    _write_messy_folder(folder)  # tests/data: bad files, modes, EXIF, captions of every kind
    Image.new("RGB", (10000, 10000), (30, 60, 90)).save(folder / "huge.png", compress_level=1)
    lines = _add_validation_images(folder, 8) + [json.dumps({"file": "huge.png", "caption": "a huge picture"})]
    with open(folder / cf.CAPTIONS_FILE, "ab") as f:
        f.write(("\n".join(lines) + "\n").encode())

    config = fault_config("", **{"data.dataset": "captioned_folder", "data.folder": str(folder),
                                 "data.data_dir": str(tmp_path / "tfds"), "num_steps": 4, "eval_every": 4})
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        final = vqgan.train(config, workdir)

    counts = {k: v for m in read_metrics(workdir) if m["step"] == 0 for k, v in m.items() if k != "step"}
    expected = {f"data/{k}": v for k, v in EXPECTED_COUNTS.items()}
    expected["data/normalised/very_large_image"] = 1
    expected["data/normalised/upscaled"] = len(KEPT_FILES)  # all of them are under the 32 pixels trained on
    expected["data/skipped/total"] = sum(v for k, v in EXPECTED_COUNTS.items() if k.startswith("skipped/"))
    assert {k: v for k, v in counts.items() if not k.startswith("data/examples/")} == expected
    assert counts["data/examples/validation"] == 8 and counts["data/examples/train"] >= 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    for name in SKIPPED_FILES:
        assert sum(name in message for message in warnings) == 1, (name, warnings)
    with open(os.path.join(workdir, "test_metrics.json")) as f:
        assert json.load(f)["split"] == "validation"  # captioned_folder has no test split
    assert final["examples"] == 8 and max(m["step"] for m in read_metrics(workdir)) == 4
