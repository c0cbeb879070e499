"""The metrics writer: TensorBoard event files TensorFlow's own reader accepts, metrics.jsonl, sample PNGs, and no
TensorFlow import on the way."""
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from dalle_jax.training.metrics import MetricsWriter, read_metrics


def _events(workdir):
    import tensorflow as tf  # The reference reader; it checks every record's length and data checksums.

    (name,) = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")]
    return list(tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)))


def test_scalars_and_images_read_back_through_tensorflow(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    writer = MetricsWriter(str(tmp_path))
    writer.write_scalars(3, {"train/loss": 2.5, "train/lr": np.float32(1e-3)})
    writer.write_images(3, {"eval/samples": picture})
    writer.write_scalars(7, {"train/loss": float("nan")})
    writer.close()

    events = _events(tmp_path)
    assert events[0].file_version == "brain.Event:2"
    values = [(e.step, v) for e in events[1:] for v in e.summary.value]
    scalars = [(step, v.tag, v.simple_value) for step, v in values if v.WhichOneof("value") == "simple_value"]
    assert scalars[:2] == [(3, "train/loss", 2.5), (3, "train/lr", np.float32(1e-3))]
    assert scalars[2][:2] == (7, "train/loss") and np.isnan(scalars[2][2])
    (image,) = [v.image for _, v in values if v.WhichOneof("value") == "image"]
    assert (image.height, image.width, image.colorspace) == (12, 20, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), picture)

    saved = np.asarray(Image.open(tmp_path / "samples" / "eval_samples_0000003.png"))
    np.testing.assert_array_equal(saved, picture)
    lines = read_metrics(str(tmp_path))
    assert [line["step"] for line in lines] == [3, 7]
    assert lines[0]["train/loss"] == 2.5 and lines[1]["train/loss"] == "nan"


def test_writing_metrics_does_not_import_tensorflow(tmp_path):
    script = (
        "import json, sys, numpy as np\n"
        "import dalle_jax.trainers.seq2seq_trainer, dalle_jax.trainers.vqgan_trainer\n"
        "from dalle_jax.training.metrics import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r})\n"
        "w.write_scalars(1, {'a': 1.0}); w.write_images(1, {'b': np.zeros((4, 4, 3), np.uint8)}); w.close()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_resumed_run_forgets_later_lines_and_the_final_figures_it_writes_again(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write_scalars(5, {"train/loss": 2.0})
    writer.write_scalars(10, {"train/loss": 1.0})
    writer.write_scalars(10, {"eval/loss": 1.5})
    writer.write_scalars(10, {"test/loss": 1.6})
    writer.write_scalars(12, {"train/loss": 0.5})
    writer.close()

    resumed = MetricsWriter(str(tmp_path))
    resumed.drop_after(10)
    resumed.write_scalars(10, {"test/loss": 1.6})
    resumed.close()
    assert read_metrics(str(tmp_path)) == [{"step": 5, "train/loss": 2.0}, {"step": 10, "train/loss": 1.0},
                                           {"step": 10, "eval/loss": 1.5}, {"step": 10, "test/loss": 1.6}]
