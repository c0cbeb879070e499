"""With no flags, a process of a SLURM or Open MPI job joins its run through jax's own cluster detection; flags
still override it. The environment is faked and jax.distributed.initialize is recorded, not run."""
import jax
import pytest

from dalle_jax.pods import distributed

SLURM = dict(SLURM_JOB_ID="4321", SLURM_STEP_NODELIST="gpu[007-008]", SLURM_NTASKS="2", SLURM_PROCID="1",
             SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="2")
OMPI = dict(OMPI_MCA_orte_hnp_uri="1234.0;tcp://10.1.2.3:5678", OMPI_COMM_WORLD_SIZE="4",
            OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_LOCAL_RANK="1")


@pytest.fixture
def calls(monkeypatch):
    for name in [*SLURM, *OMPI, "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_PORT"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    return recorded


def _detected():
    from jax._src.clusters import ClusterEnv
    return ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None)[:3]


@pytest.mark.parametrize("env, scheduler, expected", [
    (SLURM, "SlurmCluster", ("gpu007:", 2, 1)),
    (OMPI, "OmpiCluster", ("10.1.2.3:", 4, 3)),
])
def test_a_job_of_several_processes_joins_by_jax_detection(calls, monkeypatch, env, scheduler, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is True
    assert calls == [{}]  # jax.distributed.initialize() with nothing given: jax detects the rest
    assert distributed.cluster_job() == (scheduler, expected[1])
    address, count, index = _detected()
    assert address.startswith(expected[0]) and (count, index) == expected[1:]


def test_flags_override_the_detected_job(calls, monkeypatch):
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    distributed.initialize("127.0.0.1:9999", 3, 2)
    assert calls == [dict(coordinator_address="127.0.0.1:9999", num_processes=3, process_id=2)]


def test_a_single_task_job_or_no_job_runs_alone(calls, monkeypatch):
    assert distributed.initialize() is False
    for name, value in dict(SLURM, SLURM_NTASKS="1").items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False
    assert calls == []
