"""Restores the newest tiny-VQGAN checkpoint of a work directory onto this process's mesh and reports what it holds:
a digest of every part of the state, how finely the parameters are split, and the validation loss (test helper).

    python -m tests.faults.mesh_probe --data_dir D --workdir W --mesh 2,2,2 --out report.json [--save_to W2] \
        [--bad_configs_with_vqgan V]

`--save_to` writes the restored state as a checkpoint (of the same step) written from this mesh;
`--bad_configs_with_vqgan` also reports what impossible configs raise here (the seq2seq ones use the VQGAN work
directory V), and how many programs were lowered or compiled before they failed.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os

import jax
import numpy as np

from dalle_jax import parallel
from dalle_jax.data import pipeline, sources
from dalle_jax.trainers import vqgan_trainer as vqgan, vqgan_step
from dalle_jax.training import checkpointing
from tests.faults.conftest import fault_config


def _digest(tree) -> str:
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def probe(data_dir: str, workdir: str, mesh_shape: tuple[int, int, int], save_to: str | None = None) -> dict:
    config = fault_config(data_dir, **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh_shape)))
    mesh = parallel.make_mesh(config.mesh)
    setup, state, shardings = vqgan_step.create(config, mesh)
    builder = sources.prepare(config.data)
    transform = pipeline.image_transform(config.data.image_key, config.data.image_size)
    iterator = pipeline.train_iterator(sources.open_split(builder, "train", config.data), transform,
                                       global_batch=config.data.batch_size, seed=config.seed)
    checkpointer = checkpointing.Checkpointer(workdir, keep=3, save_every=config.checkpoint_every)
    state, step = checkpointing.restore_or_keep(checkpointer, state, shardings, iterator)
    checkpointer.close()
    eval_step = jax.jit(functools.partial(vqgan_step.eval_step, setup),
                        in_shardings=(shardings["params"], parallel.batch_sharding(mesh)),
                        out_shardings=parallel.replicated(mesh))
    figures, _ = vqgan._evaluate(setup, eval_step, mesh, builder, transform, state["params"], "validation", -1)
    if save_to:
        writer = checkpointing.Checkpointer(save_to, keep=3, save_every=1)
        writer.save(step, state, iterator, force=True)
        writer.close()
    split = {jax.tree_util.keystr(path): len({str(shard.index) for shard in leaf.addressable_shards})
             for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    return dict(step=step, devices=jax.device_count(), mesh=dict(mesh.shape),
                digests={key: _digest(value) for key, value in state.items()},
                eval_reconstruction=figures["reconstruction"], eval_psnr=figures["psnr"],
                most_shards_of_a_parameter=max(split.values()),
                params_on_target_shardings=all(leaf.sharding.is_equivalent_to(target, leaf.ndim) for leaf, target
                                               in zip(jax.tree.leaves(state["params"]),
                                                      jax.tree.leaves(shardings["params"]))))


BAD_CONFIGS = {  # name: (trainer, overrides)
    "mesh_does_not_divide_devices": ("vqgan", {"mesh.data": 3}),
    "mesh_rest_does_not_divide": ("vqgan", {"mesh.data": -1, "mesh.fsdp": 3}),
    "batch_not_divisible": ("vqgan", {"mesh.data": 8, "data.batch_size": 12}),
    "eval_batch_not_divisible": ("vqgan", {"mesh.data": 8, "data.eval_batch_size": 4}),
    "seq2seq_batch_not_divisible": ("seq2seq", {"mesh.data": 8, "data.batch_size": 12}),
    "text_too_short_for_special_tokens": ("seq2seq", {"model.text_length": 2}),
    "codebook_smaller_than_the_vqgan": ("seq2seq", {"model.image_vocab_size": 16}),  # the VQGAN has 32 codes
}


def bad_config_errors(data_dir: str, vqgan_workdir: str, scratch: str) -> dict:
    """Each bad config's error message, and the programs lowered or compiled before it was raised."""
    from dalle_jax.configs import shapes_dalle
    from dalle_jax.trainers import seq2seq_trainer as seq2seq
    events = []
    lowering_or_compiling = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration")  # tracing (eval_shape) is not counted
    listener = lambda name, *args, **kwargs: events.append(name) if name in lowering_or_compiling else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    results = {}
    for name, (trainer, overrides) in BAD_CONFIGS.items():
        if trainer == "vqgan":
            config, train = fault_config(data_dir), vqgan.train
        else:
            config, train = shapes_dalle.get_config("tiny"), seq2seq.train
            config.data.data_dir = data_dir
            config.vqgan_workdir = vqgan_workdir
        for key, value in overrides.items():
            section, field = key.split(".")
            config[section][field] = value
        events.clear()
        try:
            train(config, os.path.join(scratch, name))
            results[name] = dict(error=None, compile_events=len(events), events=list(events))
        except ValueError as e:
            results[name] = dict(error=str(e), compile_events=len(events), events=list(events))
    jax.monitoring.unregister_event_duration_listener(listener)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mesh", required=True, help="data,fsdp,tensor")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save_to")
    parser.add_argument("--bad_configs_with_vqgan")
    args = parser.parse_args()
    mesh_shape = tuple(int(n) for n in args.mesh.split(","))
    report = {}
    if args.bad_configs_with_vqgan:
        report["bad_configs"] = bad_config_errors(args.data_dir, args.bad_configs_with_vqgan, args.out + ".bad")
    report["probe"] = probe(args.data_dir, args.workdir, mesh_shape, args.save_to)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
