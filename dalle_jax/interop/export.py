"""Exports a work directory's weights to another framework's format.

    python -m dalle_jax.interop.export --workdir runs/demo/dalle --format safetensors --out export/
    python -m dalle_jax.interop.export --workdir runs/demo/dalle --format min-dalle   --out export_min_dalle/
    python -m dalle_jax.interop.export --workdir runs/demo/vqgan --format taming      --out vqgan_taming.ckpt
    python -m dalle_jax.interop.export --workdir runs/demo/vqgan --format diffusers   --out vqmodel/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dalle_jax import runs, storage

FORMATS = {"safetensors": ("seq2seq", "vqgan"), "min-dalle": ("seq2seq",), "taming": ("vqgan",),
           "diffusers": ("vqgan",)}


def _tokenizer_files(workdir: str) -> list[str]:
    return [storage.local_copy(storage.join(workdir, f), "tokenizer file") for f in runs.TOKENIZER_FILES
            if storage.isfile(storage.join(workdir, f))]


def export(workdir: str, fmt: str, out: str, *, dtype: str = "float32", step: int | None = None) -> list[str]:
    """Writes `workdir`'s weights to `out` in `fmt`; returns notes on what could not be written. An `out` in a
    bucket is written on local scratch first (the weight writers write local files), then uploaded."""
    if storage.is_remote(out):
        local = storage.staging_dir(out)
        storage.rmtree(local)
        notes = export(workdir, fmt, local, dtype=dtype, step=step)
        if os.path.isdir(local):
            storage.upload_tree_last(local, out, last=sorted(os.listdir(local))[0])
        else:
            storage.copyfile(local, out)
        return notes
    from dalle_jax.interop import workdirs
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is unknown; use one of {sorted(FORMATS)}.")
    kind = runs.load_config(workdir).get("trainer")
    if kind not in FORMATS[fmt]:
        raise ValueError(f"--format={fmt} exports {' or '.join(FORMATS[fmt])} work directories; {workdir!r} is a "
                         f"{kind} run.")
    kind, config, params = workdirs.read_workdir(workdir, step=step)
    notes = []
    if fmt == "safetensors":
        from dalle_jax.interop import safetensors_format
        safetensors_format.export(out, kind, config, params, dtype=dtype,
                                  tokenizer_files=_tokenizer_files(workdir) if kind == "seq2seq" else [])
    elif fmt == "min-dalle":
        notes += _export_min_dalle(workdir, config, params, out, dtype)
    elif fmt == "taming":
        from dalle_jax.interop import taming_format, torch_files
        state = taming_format.export_state_dict(params, config.model)
        torch_files.save_state_dict(state, out, dtype=dtype)
    else:
        from dalle_jax.interop import diffusers_format
        import numpy as np
        diffusers_format.write_folder(params, config.model, out, dtype=np.dtype(dtype))
    return notes


def _export_min_dalle(workdir, config, params, out: str, dtype: str) -> list[str]:
    from dalle_jax.interop import min_dalle_format as fmt, torch_files, workdirs
    encoder, decoder = fmt.export_state_dicts(params, config.model)
    torch_files.save_state_dict(encoder, os.path.join(out, fmt.ENCODER_FILE), dtype=dtype)
    torch_files.save_state_dict(decoder, os.path.join(out, fmt.DECODER_FILE), dtype=dtype)
    with open(os.path.join(out, fmt.SIDECAR_FILE), "w") as f:
        json.dump(fmt.sidecar(config.model), f, indent=2)
    notes = []
    tokenizer = [p for p in _tokenizer_files(workdir) if not p.endswith(".model")]
    for path in tokenizer:
        import shutil
        shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
    if not tokenizer:
        notes.append("The run's tokenizer is sentencepiece; min-dalle's TextTokenizer reads only BPE vocab.json + "
                     "merges.txt, so no tokenizer was written.")
    try:
        _, vqgan_config, vqgan_params = workdirs.read_workdir(config.vqgan_workdir)
        state = fmt.export_detoker(vqgan_params, vqgan_config.model)
        torch_files.save_state_dict(state, os.path.join(out, fmt.DETOKER_FILE), dtype=dtype)
    except (ValueError, FileNotFoundError) as err:
        notes.append(f"{fmt.DETOKER_FILE} was not written: {err}")
    return notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Work directory of a seq2seq or VQGAN run.")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", required=True, help="Output folder (a file for --format taming).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="Tensor dtype of the files (bfloat16: safetensors only).")
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the newest).")
    args = parser.parse_args(argv)
    if args.dtype == "bfloat16" and args.format != "safetensors":
        parser.error("--dtype bfloat16 is for --format safetensors; torch formats take float32 or float16.")
    for note in export(args.workdir, args.format, args.out, dtype=args.dtype, step=args.step):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
