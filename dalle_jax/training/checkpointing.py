"""Checkpoints of a whole run: the train state (params, optimizer states, step) and the data iterator's position.

Saves are asynchronous (the train step goes on while orbax writes); only complete checkpoints are ever listed, so
a run killed mid-save resumes from the newest complete one.
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight into place."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, save_every: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(save_every, 1), create=True,
            enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state into the shardings `abstract_state` carries, and rewinds the iterator in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_or_keep(checkpointer: Checkpointer, state, shardings, data_iterator) -> tuple[object, int]:
    """The newest checkpoint's state (and iterator position) if there is one, else `state`; with its step."""
    step = checkpointer.latest_step()
    if step is None:
        return state, 0
    logging.info("Resuming from step %d in %s", step, checkpointer.directory)
    return checkpointer.restore(step, abstract_like(state, shardings), data_iterator), int(step)


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in `workdir`, oldest first (empty when there are none)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    with _read_only_manager(directory) as manager:
        return sorted(manager.all_steps())


def restore_params(workdir: str, step: int, abstract_params):
    """Only `state["params"]` of a checkpoint (a partial restore: optimizer states and the data iterator stay on
    disk), into the shardings `abstract_params` carries."""
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with _read_only_manager(os.path.join(os.path.abspath(workdir), "checkpoints")) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
