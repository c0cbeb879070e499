"""Config blocks every recipe shares: the device mesh, the dataset, and what to do about faults."""
import ml_collections


# captioned_shapes as the CPU recipes use it: 20,000 training images are more than 600 steps of 32 draw, and
# building and encoding them takes a third of the default 50,000's time. Evaluation splits keep their default sizes.
CPU_SHAPES_SPLIT_SIZES = dict(train=20_000, validation=2_000, test=2_000, test_compositional=1_000,
                              validation_compositional=1_000)


# Image sides the recipes for your own images (images_vqgan, images_dalle) are sized for on a 2-core CPU.
IMAGE_SIZES = (32, 64)
# Their VQGANs downsample by 4 (three levels), so an image of side S gives (S / 4)**2 image tokens.
DOWNSAMPLING = 4


def parse_size_variant(arg: str, recipe: str) -> tuple[int, bool]:
    """A recipe variant `[SIZE][,tiny]` -> (image side, tiny): "" (32), "64", "tiny", "64,tiny"."""
    parts = [p.strip() for p in arg.split(",")] if arg else []
    sizes = [p for p in parts if p.isdigit() and int(p) in IMAGE_SIZES]
    tiny = parts.count("tiny")
    if len(sizes) > 1 or tiny > 1 or len(sizes) + tiny != len(parts):
        raise ValueError(
            f"Unknown variant {arg!r} of {recipe}: give an image size ({', '.join(map(str, IMAGE_SIZES))}; "
            f"default {IMAGE_SIZES[0]}), 'tiny' (tests), or both, e.g. {recipe}:64, {recipe}:tiny, "
            f"{recipe}:64,tiny.")
    return (int(sizes[0]) if sizes else IMAGE_SIZES[0]), bool(tiny)


def mesh_config() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # Data-parallel axis size (-1: whatever the other axes leave).
    mesh.fsdp = 1  # Axis over which parameters and optimizer state are sharded (and the batch).
    mesh.tensor = 1  # Axis over which channels, heads and vocabularies are split inside each layer.
    return mesh


def data_config(image_size) -> ml_collections.ConfigDict:
    """`image_size` may be a FieldReference shared with the model."""
    data = ml_collections.ConfigDict()
    # TFDS name: captioned_shapes, captioned_folder or any prepared set; "" (seq2seq runs): the VQGAN run's.
    data.dataset = "captioned_shapes"
    data.folder = ""  # Folder of images + captions.jsonl, for dataset=captioned_folder.
    data.data_dir = ""  # Where TFDS datasets are prepared and read ("" = TFDS's default).
    data.image_key = "image"  # Image feature of the dataset.
    data.text_key = "caption"  # Caption feature of the dataset.
    data.image_size = image_size  # Side of the square training images (seq2seq runs: 0 = the VQGAN run's).
    data.batch_size = 32  # Global batch size (all devices and processes together).
    data.eval_batch_size = 64  # Global batch size of evaluation (forward passes only).
    data.eval_batches = -1  # Validation batches per evaluation (-1: the whole split, remainder dropped).
    data.read_threads = 2  # Threads decoding examples for each process.
    data.prefetch = 4  # Batches prepared ahead of the train step.
    # captioned_shapes only: examples per split (None = the dataset's defaults).
    data.shapes_split_sizes = ml_collections.config_dict.placeholder(dict)
    return data


def faults_config() -> ml_collections.ConfigDict:
    faults = ml_collections.ConfigDict()
    # Updates with a non-finite loss, gradient or result are skipped; this many in a row stop the run.
    faults.max_consecutive_nonfinite = 10
    # On a corrupt newest checkpoint: False fails naming it; True moves it to corrupt_checkpoints/ and resumes
    # from the newest intact one.
    faults.restore_fallback = False
    return faults


def fsdp_tpu_compiler_options() -> ml_collections.ConfigDict:
    """libtpu flags for FSDP recipes, each kept because it wins at both ends of the estimated step-time range
    (`dalle_jax.pods.aot`: the compiler's cycle sum, plus or overlapped with the modelled communication).

    No windowed einsums: by default XLA overlaps each sharded weight's all-gather with its matmul by looping over the
    weight's shards and adding each partial product into the whole activation, which it reads and writes once per
    shard; for DalleBart's large activations and small weight shards that is slower (DALL·E mini, v5e:4x4: 1,309-1,398
    ms per step with both on, against 403-417 ms).
    All-gathers as all-gathers: otherwise XLA gathers a layer's weights by zero-filling a weight-sized buffer, writing
    its shard in and all-reducing (DALL·E mega, v5e:16x16: 269-415 ms per step and 29.1 GB sent per chip, against
    202-300 ms)."""
    return ml_collections.ConfigDict({"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
                                      "xla_tpu_prefer_async_allgather_to_allreduce": True})
