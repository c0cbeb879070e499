"""A checkpoint moves between meshes (8 devices data=8 -> data=2,fsdp=2,tensor=2 -> 1 device) with identical state
and evaluation loss; impossible configs fail before anything is compiled, naming the field and the fix. (The
bad configs run in the 8-device process of the reshard test, to share its start-up.)"""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.faults import mesh_probe


def _probe_in_subprocess(compilation_cache, out, *args):
    command = [sys.executable, "-m", "tests.faults.mesh_probe", f"--out={out}", *args]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(compilation_cache, devices=8),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, reference_run, shapes_data_dir, compilation_cache):
    """The reference run's newest checkpoint (written on 1 device) restored and re-written on 8 devices as data=8,
    that restored and re-written as data=2,fsdp=2,tensor=2, and that restored on 1 device."""
    root = tmp_path_factory.mktemp("reshard")
    data8, mesh222 = str(root / "data8"), str(root / "mesh222")
    on_data8 = _probe_in_subprocess(compilation_cache, str(root / "data8.json"), f"--data_dir={shapes_data_dir}",
                                    f"--workdir={reference_run[0]}", "--mesh=8,1,1", f"--save_to={data8}")
    on_mesh222 = _probe_in_subprocess(compilation_cache, str(root / "mesh222.json"), f"--data_dir={shapes_data_dir}",
                                      f"--workdir={data8}", "--mesh=2,2,2", f"--save_to={mesh222}",
                                      f"--bad_configs_with_vqgan={reference_run[0]}")
    on_one = mesh_probe.probe(shapes_data_dir, mesh222, (1, 1, 1))
    return on_data8, on_mesh222, on_one


def test_state_and_eval_loss_survive_two_mesh_changes(reports):
    data8, mesh222, one = reports[0]["probe"], reports[1]["probe"], reports[2]
    assert (data8["devices"], mesh222["devices"], one["devices"]) == (8, 8, 1)
    assert mesh222["mesh"] == dict(data=2, fsdp=2, tensor=2)
    assert data8["step"] == mesh222["step"] == one["step"] == 12
    assert data8["digests"] == mesh222["digests"] == one["digests"]  # every parameter and moment, bit for bit
    # Restored straight into each mesh's own layout: replicated under data=8, split 4 ways over fsdp x tensor.
    assert data8["most_shards_of_a_parameter"] == 1 and mesh222["most_shards_of_a_parameter"] == 4
    assert data8["params_on_target_shardings"] and mesh222["params_on_target_shardings"]
    for report in (mesh222, one):
        assert report["eval_reconstruction"] == pytest.approx(data8["eval_reconstruction"], rel=1e-5)
        assert report["eval_psnr"] == pytest.approx(data8["eval_psnr"], rel=1e-5)


@pytest.mark.parametrize("name, message", [
    ("mesh_does_not_divide_devices", r"config.mesh \(data,fsdp,tensor = \[3, 1, 1\]\) needs 3 devices but 8 are "
                                     r"available. Set the sizes so their product is 8"),
    ("mesh_rest_does_not_divide", r"cannot fill 8 devices: 3 does not divide 8. Choose sizes whose product divides"),
    ("batch_not_divisible", r"config.data.batch_size=12 is not divisible by the data-parallel size 8 .* Use a "
                            r"multiple of 8"),
    ("eval_batch_not_divisible", r"config.data.eval_batch_size=4 is not divisible by the data-parallel size 8"),
    ("seq2seq_batch_not_divisible", r"config.data.batch_size=12 is not divisible by the data-parallel size 8"),
    ("text_too_short_for_special_tokens", r"config.model.text_length=2 leaves no room for `<s>`, a token and `</s>`; "
                                          r"use at least"),
    ("codebook_smaller_than_the_vqgan", r"has 32 codes but config.model.image_vocab_size=16; set "
                                        r"config.model.image_vocab_size=32"),
])
def test_impossible_configs_fail_before_compiling(reports, name, message):
    result = reports[1]["bad_configs"][name]
    assert result["error"] is not None and re.search(message, result["error"]), result
    assert result["compile_events"] == 0
