"""Imports another framework's weights into a new dalle_jax work directory, for sample.py or fine-tuning.

    python -m dalle_jax.interop.import_weights --format min-dalle --src path/to/min_dalle_dir --workdir runs/mega
    python -m dalle_jax.interop.import_weights --format taming --src path/to/vqgan.ckpt --workdir runs/vqgan_f16
    python -m dalle_jax.interop.import_weights --format safetensors --src export/ --workdir runs/copy \
        [--vqgan_workdir ...]

A min-dalle directory holds `encoder.pt`, `decoder.pt`, `vocab.json` and `merges.txt` (min-dalle's
`pretrained/dalle_bart_mega`); its detokenizer is `detoker.pt` there or in `../vqgan/` (min-dalle's layout), or
`--detoker`. The detokenizer becomes the decode-only VQGAN work directory `<workdir>/vqgan`.
"""
from __future__ import annotations

import argparse
import os

from dalle_jax import storage

FORMATS = ("min-dalle", "taming", "safetensors")


def import_min_dalle(src: str, workdir: str, *, detoker: str | None = None, heads: int | None = None,
                     vqgan_workdir: str | None = None) -> None:
    """`vqgan_workdir` names an existing VQGAN work directory (e.g. DALL·E mini's VQGAN imported with its encoder
    from taming's format, which fine-tuning needs) to use instead of importing the detokenizer."""
    from flax import nnx
    from dalle_jax.interop import min_dalle_format as fmt, torch_files, workdirs
    from dalle_jax.data import min_dalle_tokenizer
    from dalle_jax.models.dalle_bart import DalleBart
    from dalle_jax.models.vqgan import VQGAN
    from dalle_jax.configs import seq2seq_common

    if not min_dalle_tokenizer.has_files(src):
        raise FileNotFoundError(f"{src!r} lacks {min_dalle_tokenizer.VOCAB_FILE} / {min_dalle_tokenizer.MERGES_FILE}; "
                                "a min-dalle model directory has both beside encoder.pt and decoder.pt.")
    detoker = None if vqgan_workdir else detoker or next((p for p in (os.path.join(src, fmt.DETOKER_FILE),
                                           os.path.join(src, os.pardir, "vqgan", fmt.DETOKER_FILE))
                               if os.path.isfile(p)), None)
    if detoker is None and not vqgan_workdir:
        raise FileNotFoundError(f"No {fmt.DETOKER_FILE} in {src!r} or {os.path.join(src, os.pardir, 'vqgan')!r}; "
                                "pass --detoker PATH.")
    encoder = torch_files.load_state_dict(os.path.join(src, fmt.ENCODER_FILE), what="min-dalle encoder")
    decoder = torch_files.load_state_dict(os.path.join(src, fmt.DECODER_FILE), what="min-dalle decoder")
    fields = fmt.infer_model_config(encoder, decoder, heads=heads, extra=fmt.read_sidecar(src), source=src)
    model_cfg = seq2seq_common.base_config().model
    model_cfg.update(fields)
    template = _abstract(lambda: DalleBart(model_cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    params = fmt.import_params(encoder, decoder, template, source=src)

    vqgan_dir = vqgan_workdir
    if not vqgan_dir:
        vqgan_cfg = fmt.detoker_vqgan_config()
        state = torch_files.load_state_dict(detoker, what="min-dalle detokenizer")
        vqgan_params = fmt.import_detoker(state, _abstract(lambda: VQGAN(vqgan_cfg, rngs=nnx.Rngs(0))),
                                          source=detoker)
        vqgan_dir = os.path.join(workdir, "vqgan")
        workdirs.write_vqgan(vqgan_dir, vqgan_cfg, vqgan_params, decode_only=True,
                             imported_from=f"min-dalle detokenizer {os.path.abspath(detoker)} (outputs rescaled from "
                                           "[0, 1] to [-1, 1]; no encoder: it decodes but cannot encode)")
    workdirs.write_seq2seq(workdir, fields, params, vqgan_workdir=vqgan_dir,
                           tokenizer_files=[os.path.join(src, min_dalle_tokenizer.VOCAB_FILE),
                                            os.path.join(src, min_dalle_tokenizer.MERGES_FILE)],
                           imported_from=f"min-dalle {os.path.abspath(src)}")


def import_taming(src: str, workdir: str, *, resolution: int = 256) -> None:
    from flax import nnx
    from dalle_jax.interop import taming_format as fmt, torch_files, workdirs
    from dalle_jax.models.vqgan import VQGAN

    state, skipped = fmt.generator_state(torch_files.load_tensors(src, what="taming VQGAN"), path=src)
    state = torch_files.to_numpy(state, path=src)
    cfg = fmt.infer_config(state, resolution=resolution, path=src)
    params = fmt.import_params(state, _abstract(lambda: VQGAN(cfg, rngs=nnx.Rngs(0))), source=src)
    workdirs.write_vqgan(workdir, cfg, params, imported_from=f"taming-transformers {os.path.abspath(src)} "
                                                             f"({skipped} training-loss tensors skipped)")


def import_safetensors(src: str, workdir: str, *, vqgan_workdir: str | None = None) -> None:
    import ml_collections
    from flax import nnx
    from dalle_jax.interop import safetensors_format as fmt, workdirs
    from dalle_jax.models.dalle_bart import DalleBart
    from dalle_jax.models.vqgan import VQGAN

    record = fmt.read_description(src)
    model_cfg = ml_collections.ConfigDict(record["model"])
    if record["kind"] == "vqgan":
        params = fmt.import_params(src, _abstract(lambda: VQGAN(model_cfg, rngs=nnx.Rngs(0))))
        workdirs.write_vqgan(workdir, model_cfg, params, decode_only=record.get("decode_only", False),
                             imported_from=f"safetensors {os.path.abspath(src)}")
        return
    if not vqgan_workdir:
        raise ValueError("A seq2seq export does not carry its VQGAN; pass --vqgan_workdir (the VQGAN work directory "
                         "its image tokens come from, e.g. one imported from that VQGAN's own export).")
    template = _abstract(lambda: DalleBart(model_cfg, rngs=nnx.Rngs(params=0, dropout=0)))
    params = fmt.import_params(src, template, param_dtype=model_cfg.param_dtype)
    workdirs.write_seq2seq(workdir, model_cfg.to_dict(), params, vqgan_workdir=vqgan_workdir,
                           tokenizer_files=[os.path.join(src, f) for f in record["tokenizer"]["files"]],
                           imported_from=f"safetensors {os.path.abspath(src)}")


def _abstract(make):
    from flax import nnx
    return nnx.state(nnx.eval_shape(make), nnx.Param).to_pure_dict()


def _staged(src: str) -> str:
    """A local copy of `src`: a folder's files (and, for min-dalle, the vqgan/ folder beside it) or one file."""
    if storage.isfile(src):
        return storage.local_copy(src, "weights file")
    local = os.path.join(storage.staging_dir(src), storage.basename(src))
    storage.stage_tree(src, local, "weights to import")
    beside = storage.join(storage.dirname(src), "vqgan")
    if storage.isdir(beside):
        storage.stage_tree(beside, os.path.join(os.path.dirname(local), "vqgan"), "min-dalle detokenizer folder")
    return local


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--src", required=True, help="The files to import (a folder, or a .ckpt for taming).")
    parser.add_argument("--workdir", required=True, help="New work directory to write.")
    parser.add_argument("--detoker", default=None, help="min-dalle: path of detoker.pt (default: found beside --src).")
    parser.add_argument("--heads", type=int, default=None,
                        help="min-dalle: attention heads (default: d_model / 64, as DALL·E mini and mega).")
    parser.add_argument("--resolution", type=int, default=256, help="taming: image side the VQGAN was trained on.")
    parser.add_argument("--vqgan_workdir", default=None,
                        help="safetensors seq2seq (required) or min-dalle (instead of its detokenizer): the work "
                             "directory of the VQGAN whose codes the model predicts.")
    args = parser.parse_args(argv)
    if storage.is_remote(args.src):  # the weight readers read local files: stage the source on local scratch
        args.src = _staged(args.src)
    if args.detoker and storage.is_remote(args.detoker):
        args.detoker = storage.local_copy(args.detoker, "min-dalle detokenizer")
    if args.format == "min-dalle":
        import_min_dalle(args.src, args.workdir, detoker=args.detoker, heads=args.heads,
                         vqgan_workdir=args.vqgan_workdir)
    elif args.format == "taming":
        import_taming(args.src, args.workdir, resolution=args.resolution)
    else:
        import_safetensors(args.src, args.workdir, vqgan_workdir=args.vqgan_workdir)
    print(f"wrote {args.workdir}")


if __name__ == "__main__":
    main()
