"""Joining the processes of a multi-host run (one process per host) before any JAX computation.

Three cases: explicit flags (`coordinator_address`, `num_processes`, `process_id`) join any set of processes, e.g.
several on one machine over 127.0.0.1; on a Cloud TPU VM, or in a job of several processes under SLURM, Open MPI
(mpirun) or Kubernetes, jax finds the run's processes and its coordinator by itself; otherwise the run is one
process and nothing is done. On CPU the processes exchange collectives over gloo.
"""
from __future__ import annotations

import logging

import jax


def on_cloud_tpu_vm() -> bool:
    """Whether this host has TPU chips attached (a Cloud TPU VM, where jax can discover the pod's workers)."""
    # jax's own PCI scan for TPU chips; it has no public equivalent.
    from jax._src import hardware_utils
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return chips > 0


def cluster_job() -> tuple[str, int] | None:
    """(scheduler, process count) of the multi-process job this process was started in, as jax's own cluster
    detection sees it (SLURM, Open MPI, Kubernetes); None outside one, or in a job of a single process."""
    # jax's registry of cluster environments, which jax.distributed.initialize() consults; it has no public name.
    from jax._src.clusters import ClusterEnv
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method or "Tpu" in env.__name__ or not env.is_env_present():
            continue
        count = env.get_process_count()
        return (env.__name__, count) if count > 1 else None
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to its run; returns whether jax.distributed was initialised.

    Must run before anything touches a device. With a `coordinator_address`, `num_processes` and `process_id`
    are required; without one, a Cloud TPU VM or a SLURM, Open MPI or Kubernetes job of several processes
    initialises automatically, and any other process runs alone.
    """
    explicit = (num_processes, process_id)
    if coordinator_address:
        if None in explicit:
            raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes and --process_id "
                             f"too (got num_processes={num_processes}, process_id={process_id}).")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes}).")
        # gloo carries cross-process collectives on CPU; accelerators bring their own, so this is harmless there.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif any(v is not None for v in explicit):
        raise ValueError("--num_processes and --process_id need --coordinator_address=HOST:PORT (the address of "
                         "process 0) too.")
    elif on_cloud_tpu_vm():
        jax.distributed.initialize()
    elif (job := cluster_job()) is not None:
        logging.info("Joining a %d-process job found by jax's %s detection.", job[1], job[0])
        jax.distributed.initialize()
    else:
        return False
    logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
