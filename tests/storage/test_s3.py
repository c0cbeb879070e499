"""s3:// against a local S3 server (moto's, on 127.0.0.1): what works and what is refused.

Files, datasets and image folders work through epath and s3fs. Checkpoints do not: orbax-checkpoint 0.12 maps only
gs:// to a bucket writer (it turns `s3://b/run` into the relative path `s3:/b/run` and refuses it), so an s3:// work
directory is refused before any work, with the reason, rather than failing at its first checkpoint."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO
from tests.data.test_captioned_folder import _examples, _write_messy_folder
from tests.storage.conftest import machine_env, run
from tests.storage.gcs_server import free_port

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1", EPATH_USE_TF="false")
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    import boto3
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            break
        except Exception:  # the server is still starting
            assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
            time.sleep(0.2)
    yield env
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    server.terminate()
    server.wait(timeout=30)


def test_files_round_trip_through_an_s3_bucket(s3, tmp_path, monkeypatch):
    from dalle_jax import storage
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))
    root = f"s3://{BUCKET}/files"
    storage.write_atomic(storage.join(root, "a.json"), '{"x": 1}')
    storage.write_atomic(storage.join(root, "deep", "b.bin"), b"\x00\x01" * 500)
    assert storage.isdir(root) and storage.isfile(storage.join(root, "a.json"))
    assert sorted(storage.listdir(root)) == ["a.json", "deep"]
    assert storage.getsize(storage.join(root, "deep", "b.bin")) == 1000
    local = storage.local_copy(storage.join(root, "deep", "b.bin"))
    assert local.startswith(str(tmp_path / "scratch")) and open(local, "rb").read() == b"\x00\x01" * 500
    assert storage.stage_tree(root, str(tmp_path / "staged"), "test files") == 1008
    assert open(tmp_path / "staged" / "a.json").read() == '{"x": 1}'
    storage.rmtree(root)
    assert not storage.exists(storage.join(root, "a.json"))


def test_an_image_folder_in_an_s3_bucket_prepares_the_same_dataset_as_on_disk(s3, tmp_path, monkeypatch):
    from dalle_jax import storage
    from dalle_jax.data import captioned_folder as cf
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))
    _write_messy_folder(tmp_path / "pictures")
    url = f"s3://{BUCKET}/pictures"
    for directory, _, files in os.walk(tmp_path / "pictures"):
        relative = os.path.relpath(directory, tmp_path / "pictures")
        for name in files:
            storage.copyfile(os.path.join(directory, name),
                             storage.join(url, *([] if relative == "." else [relative]), name))
    built = {}
    for where, folder in (("disk", tmp_path / "pictures"), ("bucket", url)):
        builder = cf.CaptionedFolder(config=cf.CaptionedFolderConfig(folder=folder, image_size=16),
                                     data_dir=tmp_path / f"tfds_{where}")
        builder.download_and_prepare(file_format="array_record")
        built[where] = _examples(builder)
        counts = cf.read_bad_examples(builder.data_dir)
    assert sorted(built["bucket"]) == sorted(built["disk"]) and built["disk"]
    for key, (split, image) in built["disk"].items():
        assert built["bucket"][key][0] == split
        np.testing.assert_array_equal(built["bucket"][key][1], image)
    assert counts["skipped/total"] > 0  # the messy folder's bad items are counted from the bucket too
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing_here"):
        cf.scan_folder(cf.CaptionedFolderConfig(folder=f"s3://{BUCKET}/nothing_here", image_size=16))


def test_an_s3_work_directory_is_refused_before_any_work(s3, tmp_path, compilation_cache):
    from dalle_jax import storage
    workdir = f"s3://{BUCKET}/vqgan"
    done, _ = run([sys.executable, os.path.join(REPO, "train.py"), "--config=shapes_vqgan:tiny",
                   f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}"],
                  machine_env(compilation_cache, None, tmp_path / "home", **s3))
    assert done.returncode != 0
    assert f"--workdir={workdir}: checkpoints can be written to local paths and gs:// only" in done.stderr, \
        done.stderr[-4000:]
    assert not storage.exists(workdir) and not (tmp_path / "tfds").exists()
