"""sample.py: the grid, the per-image files and their record, each error, and an 8-device mesh."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

from dalle_jax.inference import sample
from dalle_jax.inference import text_to_image as pipeline, sampling
from dalle_jax.inference.text_to_image import TextToImage
from tests.conftest import REPO, subprocess_env
from tests.inference.test_text_to_image import sampling_workdir

PROMPTS = ["a small red circle in the top left", "a green triangle above a purple circle", ""]
SETTINGS = ["--temperature=1.2", "--top_k=16", "--top_p=0.95", "--cond_scale=3"]
RECORD_KEYS = {"prompt", "seed", "index", "temperature", "top_k", "top_p", "cond_scale", "candidates", "text_ids",
               "uncond_text_ids", "image_ids", "score", "scorer", "reranker", "draw", "file", "workdir", "step"}


def run_cli(*args):
    fv = flags.FlagValues()
    sample.define_flags(fv)
    fv(["sample.py", *args])
    return sample.run(fv)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    # A blank line is skipped; an empty prompt needs --prompt "".
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    return str(path)


@pytest.fixture(scope="module")
def written(sampling_workdir, prompts_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("written")
    samples = run_cli(f"--workdir={sampling_workdir['workdir']}", f"--prompts_file={prompts_file}",
                      "--num_images=3", "--seed=7", "--batch_size=4", f"--out={out / 'grid.png'}",
                      f"--out_dir={out / 'images'}", *SETTINGS)
    with open(out / "images" / sample.SAMPLES_FILE) as f:
        records = [json.loads(line) for line in f]
    return samples, records, out


def test_grid_has_a_row_per_prompt(written):
    samples, _, out = written
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    np.testing.assert_array_equal(grid, samples.grid())
    np.testing.assert_array_equal(grid[2:34, 36:68], samples.images[0, 1])  # row 0, column 1


def test_each_image_has_a_png_and_a_record(written, sampling_workdir):  # noqa: F811
    samples, records, out = written
    assert len(records) == 6 and all(set(r) == RECORD_KEYS for r in records)
    assert [r["index"] for r in records] == list(range(6))
    assert [r["prompt"] for r in records] == [p for p in PROMPTS[:2] for _ in range(3)]
    assert {(r["seed"], r["temperature"], r["top_k"], r["top_p"], r["cond_scale"]) for r in records} == {
        (7, 1.2, 16, 0.95, 3.0)}
    assert records[0]["step"] == 12 and records[0]["workdir"] == os.path.abspath(sampling_workdir["workdir"])
    # No reranker is registered for the run, so none picked (and one candidate per image leaves nothing to pick).
    assert all(r["scorer"] == "seq2seq" and r["reranker"] is None for r in records)
    # The recorded codes decode, through the run's VQGAN, to exactly the PNG written.
    pipe = TextToImage.from_workdir(sampling_workdir["workdir"])
    decoded = pipe.decode([r["image_ids"] for r in records])
    for record, image in zip(records, decoded):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / record["file"])), image)
    tokenizer = pipe.seq2seq.tokenizer
    assert tokenizer.decode(records[3]["text_ids"]) == PROMPTS[1]
    assert tokenizer.decode(records[3]["uncond_text_ids"]) == ""


def test_eight_devices_give_the_same_images(written, sampling_workdir, prompts_file, tmp_path,  # noqa: F811
                                            compilation_cache):
    """On an 8-device CPU mesh (batches of 4 padded to 8 and split over the devices) image i is unchanged."""
    out_dir = tmp_path / "mesh8"
    cmd = [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={sampling_workdir['workdir']}",
           f"--prompts_file={prompts_file}", "--num_images=3", "--seed=7", "--batch_size=4", f"--out_dir={out_dir}",
           *SETTINGS]
    subprocess.run(cmd, check=True, cwd=REPO, env=subprocess_env(compilation_cache, devices=8), timeout=600,
                   capture_output=True)
    with open(out_dir / sample.SAMPLES_FILE) as f:
        eight = [json.loads(line) for line in f]
    assert [r["image_ids"] for r in eight] == [r["image_ids"] for r in written[1]]


def test_guidance_off_records_no_unconditional_prompt(sampling_workdir, tmp_path):  # noqa: F811
    run_cli(f"--workdir={sampling_workdir['workdir']}", "--prompt=", "--num_images=4", "--batch_size=4",
            "--cond_scale=1", "--top_k=16", f"--out_dir={tmp_path}")
    with open(tmp_path / sample.SAMPLES_FILE) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 4
    assert all(r["prompt"] == "" and r["uncond_text_ids"] is None and r["cond_scale"] == 1.0 for r in records)


@pytest.mark.parametrize("args, message", [
    ([], "Give exactly one of --prompt"),
    (["--prompt=x", "--prompts_file=p.txt"], "Give exactly one of --prompt"),
    (["--prompts_file=/nonexistent/prompts.txt"], "does not exist; write one prompt per line"),
    (["--prompt=x", "--num_images=0"], "--num_images=0 must be at least 1"),
    (["--prompt=x", "--batch_size=0"], "--batch_size=0 must be at least 1"),
    (["--prompt=x", "--top_k=-1"], "--top_k=-1 must be an integer >= 1"),
    (["--prompt=x", "--top_p=0"], r"--top_p=0.0 must be in \(0, 1\]"),
    (["--prompt=x", "--top_p=1.5"], r"--top_p=1.5 must be in \(0, 1\]"),
    (["--prompt=x", "--temperature=0"], "--temperature=0.0 must be a finite number > 0"),
    (["--prompt=x", "--temperature=-1"], "--temperature=-1.0 must be a finite number > 0"),
    (["--prompt=x", "--candidates=0"], "--candidates=0 must be an integer >= 1"),
    (["--prompt=x", "--reranker_workdir=/nonexistent/reranker"],
     "--reranker_workdir=.* does not exist.*or pass --reranker_workdir=\"\" for none"),
])
def test_bad_flags_fail_before_loading(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.TextToImage, "from_workdir", lambda *a, **k: pytest.fail("loaded the run"))
    with pytest.raises(app.UsageError, match=message):
        run_cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'grid.png'}", *args)


def test_nowhere_to_write_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.TextToImage, "from_workdir", lambda *a, **k: pytest.fail("loaded the run"))
    with pytest.raises(app.UsageError, match="give --out grid.png and/or --out_dir DIR"):
        run_cli(f"--workdir={tmp_path}", "--prompt=x")


def test_bad_work_directories_fail_before_sampling(sampling_workdir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sampling, "sample_image_tokens", lambda *a, **k: pytest.fail("sampled"))
    out = f"--out={tmp_path / 'grid.png'}"
    with pytest.raises(FileNotFoundError, match="does not exist. Train one with"):
        run_cli(f"--workdir={tmp_path / 'missing'}", "--prompt=x", out)
    with pytest.raises(ValueError, match="work directory of the 'vqgan' trainer"):
        run_cli(f"--workdir={sampling_workdir['vqgan_workdir']}", "--prompt=x", out)
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (no_checkpoint / name).write_bytes(open(os.path.join(sampling_workdir["workdir"], name), "rb").read())
    with pytest.raises(FileNotFoundError, match="has no checkpoint in"):
        run_cli(f"--workdir={no_checkpoint}", "--prompt=x", out)
    with pytest.raises(FileNotFoundError, match=r"VQGAN work directory .* \(vqgan_workdir\) does not exist"):
        run_cli(f"--workdir={sampling_workdir['workdir']}", f"--vqgan_workdir={tmp_path / 'gone'}", "--prompt=x",
                out)
    assert not os.path.exists(tmp_path / "grid.png")


def test_top_k_zero_turns_off_the_runs_filter(sampling_workdir, tmp_path):  # noqa: F811
    assert TextToImage.from_workdir(sampling_workdir["workdir"]).default_settings.top_k is not None
    run_cli(f"--workdir={sampling_workdir['workdir']}", "--prompt=", "--num_images=4", "--batch_size=4",
            "--cond_scale=1", "--top_k=0", f"--out_dir={tmp_path}")
    with open(tmp_path / sample.SAMPLES_FILE) as f:
        assert [json.loads(line)["top_k"] for line in f] == [None] * 4
