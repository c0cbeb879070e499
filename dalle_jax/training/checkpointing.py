"""Checkpoints of a whole run: the train state (params, optimizer states, step) and the data iterator's position.

Saves are asynchronous (the train step goes on while orbax writes into a temporary directory that is renamed into
place once complete); only complete checkpoints are ever listed, so a run killed mid-save resumes from the newest
complete one. A complete checkpoint whose files were damaged later (a truncated copy, a full disk, bit rot) fails
to restore with an error naming its step and the damaged file; with `fall_back=True` the run resumes from the
newest checkpoint that restores, and the damaged ones are moved to `workdir/corrupt_checkpoints/`.
"""
from __future__ import annotations

import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from dalle_jax import storage


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight into place."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Replicated arrays are written in parallel by their replicas only where each replica's slice is at least this
# large. Orbax's default slices every replicated array, compiling one slicing program per array and shape: 168 for
# the tiny VQGAN's first checkpoint on an 8-device mesh, several seconds, to split writes of a few kilobytes.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _write_small_arrays_whole() -> None:
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


# Where orbax-checkpoint 0.12 writes: its tensorstore spec maps only gs:// to a bucket driver. An s3:// directory
# is normalized to the relative path "s3:/...", which it refuses ("Checkpoint path should be absolute").
CHECKPOINT_SCHEMES = ("gs",)


def check_workdir(workdir: str) -> None:
    """Fails before any work when checkpoints cannot be written under `workdir` (a bucket orbax cannot reach)."""
    if storage.is_remote(workdir) and os.fspath(workdir).split("://", 1)[0] not in CHECKPOINT_SCHEMES:
        raise ValueError(f"--workdir={storage.shown(workdir)}: checkpoints can be written to local paths and gs:// "
                         "only (orbax-checkpoint has no writer for this scheme). Keep the work directory on gs:// or a "
                         "local disk; datasets (--config.data.data_dir) and exports (--out) may live on s3://.")


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, save_every: int):
        check_workdir(workdir)
        _write_small_arrays_whole()
        self.directory = storage.join(storage.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(save_every, 1), create=True,
            enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True at the step all processes agreed to stop at after a preemption notice (multi-process runs)."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """`data_iterator` None: a trainer whose batches follow from the step alone keeps no iterator position."""
        items = dict(state=ocp.args.StandardSave(state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state into the shardings `abstract_state` carries, and rewinds the iterator in place.
        Raises `CorruptCheckpoint` when the checkpoint's files cannot be read."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except Exception as e:  # orbax, tensorstore and grain raise many types for damaged files
            raise CorruptCheckpoint(self.directory, step, e) from e

    def set_aside(self, step: int) -> str:
        """Moves a damaged checkpoint out of the way (to `workdir/corrupt_checkpoints/STEP`); returns where."""
        target = storage.join(storage.dirname(self.directory), "corrupt_checkpoints", str(step))
        if jax.process_index() == 0:
            storage.makedirs(storage.dirname(target))
            storage.rmtree(target)
            storage.move_tree(storage.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CorruptCheckpoint(RuntimeError):
    """A listed (complete) checkpoint whose files cannot be read back."""

    def __init__(self, directory: str, step: int, error: BaseException, fix: str = ""):
        self.directory, self.step = directory, int(step)
        self.damaged = find_damaged_file(storage.join(directory, str(step)))
        where = f"{self.damaged[0]} ({self.damaged[1]})" if self.damaged else "one of its files"
        super().__init__(f"Checkpoint step {step} in {directory} is corrupt: {where}. The reader said: "
                         f"{_root_cause(error)}{fix}")


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain: tensorstore's names the entry and the database it failed to read."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error)[:500]}"


def find_damaged_file(step_dir: str) -> tuple[str, str] | None:
    """The first file of a checkpoint directory that is visibly damaged: a missing item, an empty file, or a
    metadata file that is not valid JSON. None when every file looks whole (the damage is inside array data)."""
    if not storage.isdir(step_dir):
        return step_dir, "missing directory"
    for item in ("state", "data"):
        if not storage.isdir(storage.join(step_dir, item)):
            return storage.join(step_dir, item), "missing item directory"
    for root, dirs, files in storage.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            path = storage.join(root, name)
            if storage.getsize(path) == 0:
                return path, "empty file"
            if name.endswith(".json") or name in ("_METADATA", "_CHECKPOINT_METADATA"):
                try:
                    json.loads(storage.read_bytes(path))
                except ValueError as e:
                    return path, f"not valid JSON: {e}"
    return None


def restore_or_keep(checkpointer: Checkpointer, state, shardings, data_iterator, *,
                    fall_back: bool = False) -> tuple[object, int]:
    """The newest checkpoint's state (and iterator position) if there is one, else `state`; with its step.

    A checkpoint that cannot be read raises `CorruptCheckpoint` naming its step and file; with `fall_back` it is
    set aside (logged) and the next older one is tried; if none restores, the error says so."""
    abstract, set_aside = abstract_like(state, shardings), []
    # Imported weights (params-only) are a starting point, not a run to resume: dalle_jax.trainers.init_from.
    for step in reversed(training_steps(checkpointer.directory, checkpointer.all_steps())):
        logging.info("Resuming from step %d in %s", step, checkpointer.directory)
        try:
            return checkpointer.restore(step, abstract, data_iterator), int(step)
        except CorruptCheckpoint as e:
            if not fall_back:
                older = [s for s in checkpointer.all_steps() if s < step]
                raise CorruptCheckpoint(e.directory, step, e.__cause__, fix=(
                    f" Resume from the newest intact checkpoint (older steps on disk: {older or 'none'}) with "
                    "--config.faults.restore_fallback=true, which moves the corrupt ones to corrupt_checkpoints/; "
                    "or delete this step directory yourself.")) from e.__cause__
            logging.error("%s Moved to %s; trying the next older checkpoint.", e, checkpointer.set_aside(step))
            set_aside.append(step)
    if set_aside:
        raise CorruptCheckpoint(checkpointer.directory, set_aside[-1], RuntimeError("no checkpoint was intact"), fix=(
            f" None of the checkpoints (steps {sorted(set_aside)}) could be restored; all were moved to "
            "corrupt_checkpoints/. Run again to start from scratch."))
    return state, 0


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in `workdir`, oldest first (empty when there are none)."""
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    if not storage.isdir(directory):
        return []
    with _read_only_manager(directory) as manager:
        return sorted(manager.all_steps())


def is_params_only(directory: str, step: int) -> bool:
    """True for a checkpoint of the `checkpoints` directory `directory` written by `save_params`: no data item,
    and a state holding nothing but "params". A damaged full checkpoint is not params-only (it fails to restore)."""
    step_dir = storage.join(directory, str(step))
    if storage.isdir(storage.join(step_dir, "data")):
        return False
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return list(handler.metadata(epath.Path(step_dir) / "state").tree) == ["params"]
    except Exception:  # unreadable metadata: left for the restore to report as damage
        return False
    finally:
        handler.close()


def training_steps(directory: str, steps) -> list[int]:
    """The steps among `steps` whose checkpoints a trainer can resume from (not params-only), oldest first."""
    return [s for s in sorted(steps) if not is_params_only(directory, s)]


def save_params(workdir: str, step: int, params) -> None:
    """Writes a checkpoint holding only `state["params"]` (weights imported from another framework): what
    `restore_params` reads; a trainer cannot resume from it, as it has no optimizer state or data position."""
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "data")) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})), force=True)


def restore_params(workdir: str, step: int, abstract_params):
    """Only `state["params"]` of a checkpoint (a partial restore: optimizer states and the data iterator stay on
    disk), into the shardings `abstract_params` carries."""
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    directory = storage.join(storage.abspath(workdir), "checkpoints")
    with _read_only_manager(directory) as manager:
        try:
            return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
        except Exception as e:  # orbax, tensorstore and grain raise many types for damaged files
            older = [s for s in manager.all_steps() if s < step]
            raise CorruptCheckpoint(directory, step, e, fix=(
                f" Load an older checkpoint instead (steps {sorted(older) or 'none'}; sample.py: --step)."
                if older else "")) from e
