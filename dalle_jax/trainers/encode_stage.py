"""The encode stage: a trained VQGAN turns every image of a dataset into its code grid, once, for the seq2seq trainer.

The output is an image-token dataset (`dalle_jax.data.token_records`). Its manifest records the VQGAN's
fingerprint and the dataset's identity, so a later call with the same inputs reuses the files and a call with a
different checkpoint or dataset rebuilds them. Shards are written under a `.tmp` name and renamed when complete;
an interrupted encode keeps its complete shards and continues from there.

Only process 0 reads the manifest and writes files; it decides which shards to encode and tells the other
processes, so every process runs the same compiled steps. Each process reads the images of the batch rows its
own devices hold (process 0 also reads the captions of every row).

The work is pipelined: reader threads decode the next batches while the device encodes the current one, and the
records of a batch are written while the device encodes the batch after it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import sys
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dalle_jax import parallel, storage
from dalle_jax.data import pipeline, shapes_scene, sources, token_records
from dalle_jax.runs import LoadedVQGAN
from dalle_jax.training import gan_losses

DEFAULT_EXAMPLES_PER_SHARD = 8192
_SCENE_FEATURES = ("objects", "relation")
_SCENE_OBJECT_FIELDS = {"color", "shape", "size", "cell", "box"}
# Status codes shared between processes.
_STATUSES = ("reused", "resumed", "built")
# Rows per read task: one ArrayRecord batch read and one decode loop per task, several tasks per batch.
_READ_CHUNK = 64
# Batches read ahead of the one being encoded.
_READ_AHEAD = 2
# Most rows of one encode call per device (see _chunk_rows).
_DEVICE_ROWS = 64
# XLA:CPU's YNNPACK kernels spend ~4x the kernel time of XLA's own on this encoder's narrow convolutions and its
# GroupNorm reductions (the shapes VQGAN on a 2-core x86 VM; ~1.5x less CPU per image end to end). The option
# applies to the encode executable only. It changes float rounding: ~2 in 10,000 codes, near-ties between two
# codebook entries, differ from an encode compiled with the default options.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def encode_dataset(data_cfg, vqgan: LoadedVQGAN, encoded_dir: str, mesh: Mesh, *, batch_size: int,
                   splits: Sequence[str] | None = None,
                   examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD) -> dict:
    """Encodes `splits` (default: every split of the dataset) into `encoded_dir`, or reuses a matching encode.

    `batch_size` is the global batch of the encode step, split over the mesh's batch axes. Returns
    {"status": "reused" | "resumed" | "built", "splits": {split: examples}, "encoded_examples": int,
    "directory": encoded_dir}.
    """
    # 1. Inputs, checked before any work.
    parallel.check_global_batch(batch_size, mesh, "batch_size")
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard={examples_per_shard} must be at least 1.")
    if vqgan.config.get("decode_only", False):
        raise ValueError(f"The VQGAN in {vqgan.workdir} was imported without its encoder "
                         f"({vqgan.config.get('imported_from')}); it can decode samples but not encode images. Train "
                         "on a VQGAN with an encoder, e.g. one imported with --format taming.")
    resolution = int(vqgan.config.model.resolution)
    if int(data_cfg.image_size) != resolution:
        raise ValueError(f"config.data.image_size={data_cfg.image_size} but the VQGAN in {vqgan.workdir} encodes "
                         f"{resolution}x{resolution} images. Set config.data.image_size={resolution}.")
    builder = sources.prepare(data_cfg)
    splits = _resolve_splits(builder, splits)
    identity = dict(vqgan=dict(workdir=vqgan.workdir, step=vqgan.step, fingerprint=vqgan.fingerprint),
                    dataset=_dataset_identity(builder, data_cfg, splits),
                    grid_size=vqgan.grid_size, codebook_size=vqgan.codebook_size,
                    examples_per_shard=int(examples_per_shard))
    plan = {split: _shard_ranges(builder.info.splits[split].num_examples, examples_per_shard) for split in splits}
    manifest = dict(identity, complete=False, splits={
        split: dict(examples=builder.info.splits[split].num_examples,
                    shards=[token_records.shard_filename(split, i) for i in range(len(ranges))])
        for split, ranges in plan.items()})

    # 2. What to do: process 0 compares the manifest on disk with this call's inputs and tells the others.
    status, todo = _decide(encoded_dir, manifest, plan)
    counts = {split: manifest["splits"][split]["examples"] for split in splits}
    summary = dict(status=status, splits=counts, encoded_examples=0, directory=encoded_dir)
    if status == "reused":
        return summary

    # 3. One compiled encode step: replicated VQGAN, batch split over the batch axes, indices gathered. Each batch
    # is encoded in chunks of rows, and chunks holding padding only are skipped.
    params = jax.device_put(vqgan.params, parallel.replicated(mesh))
    batch_sh = parallel.batch_sharding(mesh)
    compiled = _compiled_encode(vqgan.graphdef, mesh)
    chunk = _chunk_rows(batch_size, parallel.batch_parallelism(mesh))
    local_rows = _local_rows(batch_sh, batch_size, chunk, resolution)

    def encode(images: np.ndarray, count: int) -> list[jax.Array]:
        return [compiled(params, _global_images(images[first:first + chunk], batch_sh))
                for first in range(0, count, chunk)]

    transform = pipeline.image_transform(data_cfg.image_key, resolution)
    record_fields = functools.partial(_record_fields, text_key=data_cfg.text_key,
                                      paraphrases="paraphrases" in builder.info.features,
                                      scenes=_has_scenes(builder.info.features))

    # 4. The shards still to write, each a run of padded batches, written under a temporary name then renamed.
    total = sum(counts.values())
    remaining = sum(stop - start for split in splits for (start, stop), due in zip(plan[split], todo[split]) if due)
    bar = tqdm(total=total, initial=total - remaining, desc="encode", unit="image", dynamic_ncols=True,
               disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(int(data_cfg.get("read_threads", 2)), 1)) as pool:
            for split in splits:
                source = sources.open_split(builder, split, data_cfg)
                for index, ((start, stop), due) in enumerate(zip(plan[split], todo[split])):
                    if not due:
                        continue
                    path = storage.join(encoded_dir, token_records.shard_filename(split, index))
                    batches = _read_batches(source, start, stop, batch_size, resolution, local_rows, transform,
                                            record_fields, pool)
                    _encode_shard(path, batches, encode, bar)
                    summary["encoded_examples"] += stop - start
    finally:
        bar.close()

    # 5. The manifest marks the dataset complete only now.
    if jax.process_index() == 0:
        token_records.write_manifest(encoded_dir, dict(manifest, complete=True))
        logging.info("Encoded %d images into %s (%s)", summary["encoded_examples"], encoded_dir, counts)
    _sync("encode finished")
    return summary


@functools.lru_cache(maxsize=4)
def _compiled_encode(graphdef: nnx.GraphDef, mesh: Mesh):
    """(params, uint8 images) -> code indices (B, grid, grid), gathered on every device.

    Only the encoder and the quantizer's lookup are compiled: the decoder's outputs are never asked for.
    """
    def encode(params, images):
        _, indices, _ = nnx.merge(graphdef, params).encode(gan_losses.to_float(images))
        return indices
    replicated = parallel.replicated(mesh)
    return jax.jit(encode, in_shardings=(replicated, parallel.batch_sharding(mesh)), out_shardings=replicated,
                   compiler_options=compiler_options(mesh.devices.flat[0].platform))


@functools.lru_cache(maxsize=None)
def compiler_options(platform: str) -> dict | None:
    """XLA options of the encode executable on `platform`: None (the defaults), or the CPU options above where
    this jaxlib accepts them (an older or newer XLA may lack the flag; the encode then runs with the defaults)."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
    except Exception as e:  # XLA names an unknown flag or value in a runtime error of its own type.
        logging.warning("Encoding with XLA's default CPU kernels, which are slower here: this jaxlib rejects %s (%s).",
                        _CPU_COMPILER_OPTIONS, e)
        return None
    return dict(_CPU_COMPILER_OPTIONS)


def _resolve_splits(builder, splits: Sequence[str] | None) -> list[str]:
    available = sorted(builder.info.splits)  # TFDS's own order differs between a fresh and a reloaded builder.
    if splits is None:
        return available
    if isinstance(splits, str):
        splits = [splits]
    unknown = [s for s in splits if s not in available]
    if unknown or not splits:
        raise ValueError(f"splits={list(splits)} names splits that {builder.info.full_name} lacks ({unknown}); "
                         f"it has {available}.")
    return list(dict.fromkeys(splits))


def _dataset_identity(builder, data_cfg, splits: list[str]) -> dict:
    """What decides the encoded content besides the VQGAN: the prepared dataset, the features read, the splits."""
    info = builder.info.splits
    return dict(name=builder.info.full_name, image_size=int(data_cfg.image_size), image_key=data_cfg.image_key,
                text_key=data_cfg.text_key,
                splits={s: dict(examples=info[s].num_examples, num_bytes=int(info[s].num_bytes)) for s in splits})


def _shard_ranges(num_examples: int, examples_per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + examples_per_shard, num_examples))
            for start in range(0, num_examples, examples_per_shard)]


def _has_scenes(features) -> bool:
    """Whether examples carry captioned_shapes scenes (other datasets may have an unrelated `objects`)."""
    if not all(name in features for name in _SCENE_FEATURES):
        return False
    objects = getattr(features["objects"], "feature", None)
    return objects is not None and _SCENE_OBJECT_FIELDS <= set(objects.keys())


def _decide(encoded_dir: str, manifest: dict, plan: dict) -> tuple[str, dict[str, list[bool]]]:
    """Process 0 picks reuse, resume or rebuild (and prepares the directory); every process gets its answer."""
    flat = [(split, i) for split in plan for i in range(len(plan[split]))]
    code = np.zeros(1 + len(flat), np.int32)
    if jax.process_index() == 0:
        status, done = _prepare_directory(encoded_dir, manifest)
        code[0] = _STATUSES.index(status)
        code[1:] = [status != "reused" and (split, i) not in done for split, i in flat]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        code = np.asarray(multihost_utils.broadcast_one_to_all(code))
    todo = {split: [] for split in plan}
    for (split, _), due in zip(flat, code[1:]):
        todo[split].append(bool(due))
    return _STATUSES[int(code[0])], todo


def _prepare_directory(encoded_dir: str, manifest: dict) -> tuple[str, set]:
    """Returns (status, {(split, shard index) already complete}), leaving the directory ready to write into."""
    storage.makedirs(encoded_dir)
    try:
        old = token_records.read_manifest(encoded_dir)
        reason = _mismatch(old, manifest)
    except FileNotFoundError:
        old, reason = None, "no earlier encode"
    except ValueError as e:
        old, reason = None, f"the old manifest is unreadable ({e})"
    if reason is None:
        done = _complete_shards(encoded_dir, old)
        if old["complete"] and len(done) == sum(len(entry["shards"]) for entry in old["splits"].values()):
            logging.info("Reusing the image tokens in %s: same VQGAN (step %d, fingerprint %s) and dataset.",
                         encoded_dir, manifest["vqgan"]["step"], manifest["vqgan"]["fingerprint"][:12])
            return "reused", done
        if old.get("examples_per_shard") != manifest["examples_per_shard"]:
            reason = (f"the encode on disk is incomplete and used {old.get('examples_per_shard')} examples per "
                      f"shard, this one {manifest['examples_per_shard']}")
    if reason is None:
        # Marked incomplete first, so an interruption from here on is resumed rather than reused.
        token_records.write_manifest(encoded_dir, manifest)
        _remove(encoded_dir, keep={manifest["splits"][s]["shards"][i] for s, i in done} | {token_records.MANIFEST})
        logging.info("Resuming the encode in %s: %d shards already complete.", encoded_dir, len(done))
        return "resumed", done
    logging.info("Encoding into %s from scratch: %s.", encoded_dir, reason)
    _remove(encoded_dir, keep=set())
    token_records.write_manifest(encoded_dir, manifest)
    return "built", set()


def _mismatch(old: dict, new: dict) -> str | None:
    """Why an encode on disk cannot serve this call, or None if it can."""
    old_vqgan = old.get("vqgan", {})
    if old_vqgan.get("fingerprint") != new["vqgan"]["fingerprint"]:
        return (f"the VQGAN differs (on disk: step {old_vqgan.get('step')} of {old_vqgan.get('workdir')}; now: "
                f"step {new['vqgan']['step']} of {new['vqgan']['workdir']})")
    if old.get("dataset") != new["dataset"]:
        return f"the dataset differs (on disk: {old.get('dataset')}; now: {new['dataset']})"
    return None


def _complete_shards(encoded_dir: str, manifest: dict) -> set:
    """(split, shard index) of the manifest's shards that exist under their final name with every record."""
    size = manifest["examples_per_shard"]
    done = set()
    for split, entry in manifest["splits"].items():
        for i, name in enumerate(entry["shards"]):
            path = storage.join(encoded_dir, name)
            expected = min(size, entry["examples"] - i * size)
            if storage.exists(path) and token_records.count_records(path) == expected:
                done.add((split, i))
    return done


def _remove(encoded_dir: str, keep: set) -> None:
    """Removes this format's files (shards, unfinished shards, manifest) except `keep`; nothing else is touched."""
    ours = {token_records.MANIFEST, token_records.MANIFEST + ".tmp"}
    for name in storage.listdir(encoded_dir):
        if (token_records.is_shard_filename(name) or name in ours) and name not in keep:
            storage.remove(storage.join(encoded_dir, name))


def _chunk_rows(batch_size: int, ways: int) -> int:
    """Rows per encode call: the largest divisor of the batch that splits evenly `ways` ways and gives each device
    at most `_DEVICE_ROWS` rows, or the whole batch where that divisor would be tiny (a prime batch size).

    On CPU, a call on 500 32x32 images takes ~130 MB of temporaries, which glibc maps afresh on every call: the
    page faults cost more than a few more calls cost dispatch time (50-image calls: ~15% more images/s).
    """
    limit = _DEVICE_ROWS * ways
    best = max(rows for rows in range(ways, min(batch_size, limit) + 1, ways) if batch_size % rows == 0)
    return best if 4 * best >= min(batch_size, limit) else batch_size


def _local_rows(sharding, batch_size: int, chunk: int, resolution: int) -> list[int]:
    """The rows of a global image batch that live on this process's devices, the batch encoded `chunk` rows at a
    time."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((chunk, resolution, resolution, 3)).values():
        for first in range(0, batch_size, chunk):
            rows.update(first + r for r in range(*index[0].indices(chunk)))
    return sorted(rows)


def _read_batches(source, start: int, stop: int, batch_size: int, resolution: int, local_rows: list[int], transform,
                  record_fields, pool: concurrent.futures.Executor) -> Iterator[tuple[int, np.ndarray, list]]:
    """(examples in the batch, padded images, record fields) per batch of [start, stop), read `_READ_AHEAD` ahead.

    `images` holds this process's rows (zeros elsewhere and in the padding); the fields (captions and scene) are
    every real row's on process 0, which writes the records, and empty on the others.
    """
    writes = jax.process_index() == 0
    wanted = range(batch_size) if writes else local_rows
    local = set(local_rows)
    get_many = getattr(source, "__getitems__", None) or (lambda keys: [source[k] for k in keys])

    def read(first: int, rows: list[int], images: np.ndarray) -> list:
        examples = get_many([first + r for r in rows])
        for row, example in zip(rows, examples):
            if row in local:
                images[row] = transform(example)["image"]
        return [record_fields(example) for example in examples] if writes else []

    def submit(first: int):
        count = min(batch_size, stop - first)
        rows = [r for r in wanted if r < count]
        images = np.zeros((batch_size, resolution, resolution, 3), np.uint8)
        chunks = [pool.submit(read, first, rows[i:i + _READ_CHUNK], images) for i in range(0, len(rows), _READ_CHUNK)]
        return count, images, chunks

    firsts = iter(range(start, stop, batch_size))
    pending = collections.deque(submit(first) for _, first in zip(range(_READ_AHEAD + 1), firsts))
    while pending:
        count, images, chunks = pending.popleft()
        fields = [f for chunk in chunks for f in chunk.result()]
        first = next(firsts, None)
        if first is not None:
            pending.append(submit(first))
        yield count, images, fields


def _global_images(images: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(images.shape, sharding, lambda index: images[index])


def _record_fields(example, text_key: str, paraphrases: bool, scenes: bool) -> dict:
    captions = [pipeline.as_text(example[text_key])]
    if paraphrases:
        captions += [pipeline.as_text(p) for p in example["paraphrases"]]
    # captioned_shapes lists the canonical caption among the paraphrases too; each caption is kept once.
    scene = shapes_scene.scene_from_example(example) if scenes else None
    return dict(captions=list(dict.fromkeys(captions)), scene=scene)


def _encode_shard(path: str, batches, encode, bar) -> None:
    """Encodes one shard's batches; process 0 writes the records to `path.tmp`, renamed to `path` once complete.

    A batch's records are written while the device encodes the next batch (dispatch does not wait for results).
    """
    # ArrayRecord writes local files: a bucket's shard is written on local scratch and uploaded once complete.
    local = os.path.join(storage.staging_dir(storage.dirname(path)), storage.basename(path)) \
        if storage.is_remote(path) else path
    if storage.is_remote(path) and jax.process_index() == 0:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    writer = token_records.ShardWriter(local + ".tmp") if jax.process_index() == 0 else None

    def finish(count: int, chunks: list, fields: list) -> None:
        codes = np.concatenate(jax.device_get(chunks))[:count]
        if writer is not None:
            for grid, record in zip(codes, fields):
                writer.write(grid.reshape(-1), **record)
        bar.update(count)

    try:
        in_flight = None
        for count, images, fields in batches:
            chunks = encode(images, count)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (count, chunks, fields)
        if in_flight is not None:
            finish(*in_flight)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        os.replace(local + ".tmp", local)
        if local != path:
            storage.copyfile(local, path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
