"""The export / import entry points on real work directories: every format's round trip is exact, the min-dalle
import samples with min-dalle's token ids, and a decode-only VQGAN refuses to encode."""
import json

import numpy as np
import pytest
import torch
from min_dalle.models import DalleBartDecoder, DalleBartEncoder
from min_dalle.text_tokenizer import TextTokenizer
from safetensors.numpy import load_file

from dalle_jax.interop import export as export_cli, import_weights
from dalle_jax import runs
from dalle_jax.data import text as text_lib
from dalle_jax.interop import min_dalle_format, names, workdirs
from dalle_jax.data import min_dalle_tokenizer
from dalle_jax.trainers import encode_stage
from tests.interop.helpers import DalleBart, VQGAN, assert_trees_equal, dalle_config, perturb_norms, \
    random_params, tiny_vqgan_config
from tests.data.test_min_dalle_tokenizer import CORPUS, learn_bpe

CAPTIONS = ["a red cube on a blue sphere", "the small green triangle", "a big yellow circle", "photo of a cat"]


def seq2seq_fields(**overrides):
    fields = dict(text_vocab_size=64, text_length=16, image_vocab_size=32, image_length=16, d_model=32,
                  encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=48, vocab_multiple=16)
    fields.update(overrides)
    return fields


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """A VQGAN work directory (4x4 grid of 32 codes) and a seq2seq one with a sentencepiece tokenizer."""
    root = tmp_path_factory.mktemp("runs")
    vqgan_cfg = tiny_vqgan_config(resolution=16, ch_mult=(1, 2, 2), attn_resolutions=(4,), codebook_size=32)
    vqgan_params = random_params(VQGAN, vqgan_cfg, seed=1)
    workdirs.write_vqgan(str(root / "vqgan"), vqgan_cfg, vqgan_params, imported_from="test")
    tokenizer = text_lib.train_tokenizer(CAPTIONS * 4, 40, str(root / "tokenizer"))
    fields = seq2seq_fields()
    params = random_params(DalleBart, dalle_config(**fields), seed=2)
    workdirs.write_seq2seq(str(root / "dalle"), fields, params, vqgan_workdir=str(root / "vqgan"),
                           tokenizer_files=[tokenizer], imported_from="test")
    return dict(root=root, vqgan=str(root / "vqgan"), dalle=str(root / "dalle"), vqgan_params=vqgan_params,
                vqgan_cfg=vqgan_cfg, params=params, fields=fields)


def test_safetensors_round_trip_is_exact(trained_runs, tmp_path):
    export_cli.main(["--workdir", trained_runs["dalle"], "--format", "safetensors", "--out", str(tmp_path / "export")])
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))  # plain safetensors, no dalle_jax
    assert tensors["encoder.layers.1.self_attn.q_proj.kernel"].shape == (32, 32)
    record = json.loads((tmp_path / "export" / "config.json").read_text())
    assert record["token_ids"] == dict(bos=0, pad=1, eos=2, unk=3, image_start=32)
    assert record["image_grid"]["height"] == 4 and record["tokenizer"]["kind"] == "sentencepiece"
    import_weights.main(["--format", "safetensors", "--src", str(tmp_path / "export"), "--workdir",
                         str(tmp_path / "back"), "--vqgan_workdir", trained_runs["vqgan"]])
    kind, config, params = workdirs.read_workdir(str(tmp_path / "back"))
    assert kind == "seq2seq" and config.model.to_json(sort_keys=True) == dalle_config(**trained_runs["fields"]).to_json(
        sort_keys=True)
    assert_trees_equal(params, trained_runs["params"])

    from dalle_jax.interop import safetensors_format
    safetensors_format.export(str(tmp_path / "bf16"), kind, config, params, dtype="bfloat16")
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    import ml_dtypes
    flat = names.flatten(trained_runs["params"])
    assert all(half[k].dtype == ml_dtypes.bfloat16 for k in flat)
    np.testing.assert_array_equal(half["decoder.lm_head.kernel"],
                                  flat["decoder.lm_head.kernel"].astype(ml_dtypes.bfloat16))

    with pytest.raises(FileExistsError, match="already holds a run"):
        import_weights.import_safetensors(str(tmp_path / "export"), str(tmp_path / "back"),
                                          vqgan_workdir=trained_runs["vqgan"])


def test_vqgan_exports_round_trip(trained_runs, tmp_path):
    export_cli.main(["--workdir", trained_runs["vqgan"], "--format", "taming", "--out", str(tmp_path / "vqgan.ckpt")])
    import_weights.main(["--format", "taming", "--src", str(tmp_path / "vqgan.ckpt"), "--workdir",
                         str(tmp_path / "taming_back"), "--resolution", "16"])
    _, config, params = workdirs.read_workdir(str(tmp_path / "taming_back"))
    assert config.model.to_json(sort_keys=True) == trained_runs["vqgan_cfg"].to_json(sort_keys=True)
    assert_trees_equal(params, trained_runs["vqgan_params"])

    export_cli.main(["--workdir", trained_runs["vqgan"], "--format", "diffusers", "--out", str(tmp_path / "vqmodel")])
    assert json.loads((tmp_path / "vqmodel" / "config.json").read_text())["_class_name"] == "VQModel"
    with pytest.raises(ValueError, match="exports seq2seq work directories"):
        export_cli.export(trained_runs["vqgan"], "min-dalle", str(tmp_path / "x"))


def test_min_dalle_import_samples_with_min_dalle_ids(trained_runs, tmp_path):
    src = tmp_path / "dalle_bart_mini"
    src.mkdir()
    merges = learn_bpe(CORPUS, 60)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in sorted({c for c in CORPUS.lower() if c != " "} | {min_dalle_tokenizer.WORD_START}) + \
            [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    torch.manual_seed(0)
    encoder = DalleBartEncoder(layer_count=1, embed_count=32, attention_head_count=4, text_vocab_count=len(vocab),
                               text_token_count=16, glu_embed_count=48, device="cpu")
    decoder = DalleBartDecoder(image_vocab_count=32, embed_count=32, attention_head_count=4, glu_embed_count=48,
                               layer_count=1, device="cpu")
    perturb_norms(encoder, 1)
    perturb_norms(decoder, 2)
    torch.save(encoder.state_dict(), src / "encoder.pt")
    torch.save(decoder.state_dict(), src / "decoder.pt")

    with pytest.raises(FileNotFoundError, match="detoker.pt"):
        import_weights.import_min_dalle(str(src), str(tmp_path / "none"))
    # A 16x16 grid VQGAN of 32 codes stands in for the full-size detokenizer (test_min_dalle_detoker covers that).
    vqgan_cfg = tiny_vqgan_config(resolution=32, ch_mult=(1, 2), attn_resolutions=(16,), codebook_size=32)
    workdirs.write_vqgan(str(tmp_path / "vqgan"), vqgan_cfg, random_params(VQGAN, vqgan_cfg, seed=3),
                         imported_from="test", decode_only=True)
    import_weights.main(["--format", "min-dalle", "--src", str(src), "--workdir", str(tmp_path / "mini"),
                         "--heads", "4", "--vqgan_workdir", str(tmp_path / "vqgan")])

    loaded = runs.load_seq2seq(str(tmp_path / "mini"))
    assert isinstance(loaded.tokenizer, min_dalle_tokenizer.MinDalleTokenizer)
    enc, dec = min_dalle_format.export_state_dicts(jax_to_numpy(loaded.params), loaded.config.model)
    for state, module in ((enc, encoder), (dec, decoder)):
        for k, v in module.state_dict().items():
            np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)

    # The sampling API tokenizes with min-dalle's ids (sampling itself does not depend on the tokenizer).
    from dalle_jax.inference.text_to_image import TextToImage
    pipe = TextToImage(loaded, runs.load_vqgan(str(tmp_path / "vqgan")), runs.default_mesh())
    prompt = "Cube, 🐶!"
    text_ids, truncated = pipe.encode_prompts([prompt])
    expected = TextTokenizer(vocab, (src / "merges.txt").read_text().split("\n")[1:-1]).tokenize(prompt)
    assert not truncated[0] and text_ids[0].tolist() == expected + [1] * (16 - len(expected))
    short = TextTokenizer(vocab, (src / "merges.txt").read_text().split("\n")[1:-1]).tokenize("cube")
    assert pipe.encode_prompts(["cube"])[0][0].tolist() == short + [1] * (16 - len(short))

    vqgan = runs.load_vqgan(str(tmp_path / "vqgan"))
    with pytest.raises(ValueError, match="not encode images"):
        encode_stage.encode_dataset(loaded.config.data, vqgan, str(tmp_path / "encoded"), pipe.mesh, batch_size=1)


def jax_to_numpy(tree):
    import jax
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
