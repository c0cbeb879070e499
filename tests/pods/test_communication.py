"""Bytes each chip sends in a compiled program's collectives: a shard_map program on an 8-device CPU mesh whose
collectives are counted by hand, and HLO text written the way libtpu prints it (iota and mesh-axis groups,
asynchronous pairs, collectives split over fusions, loops)."""
import subprocess
import sys

import pytest

from dalle_jax.pods import communication
from tests.conftest import REPO, subprocess_env

# A 2x4 mesh ("a", "b"); x is f32[8,64] split over both, 4x16 floats (256 bytes) per chip; w is f32[3,32] split over
# "b", scanned over its 3 rows.
PROGRAM = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))

def step(x, w):
    gathered = jax.lax.all_gather(x, "b", tiled=True)  # f32[16,16]
    total = jax.lax.psum(x, "a") + jax.lax.psum(x, ("a", "b"))
    scattered = jax.lax.psum_scatter(gathered, "b", scatter_dimension=0, tiled=True)  # from f32[16,16]
    shifted = jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)])
    exchanged = jax.lax.all_to_all(x, "b", 0, 0, tiled=True)
    def layer(h, row):
        return h * jax.lax.all_gather(row, "b", tiled=True).sum(), None  # f32[32] each of 3 iterations
    h, _ = jax.lax.scan(layer, x.sum(), w)
    return (gathered.sum() + total.sum() + scattered.sum() + shifted.sum() + exchanged.sum() + h)[None]

f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("a", "b"), P(None, "b")), out_specs=P(("a", "b")),
                          check_vma=False))
print(f.lower(jnp.ones((8, 64)), jnp.ones((3, 32))).compile().as_text())
"""

# Per chip: (executions, bytes sent) for each kind, by hand from the shapes above and the ring algorithms.
BY_HAND = {
    "all-gather": (1 + 3, 3 / 4 * 1024 + 3 * (3 / 4 * 128)),
    "all-reduce": (2, 2 * 1 / 2 * 256 + 2 * 7 / 8 * 256),
    "reduce-scatter": (1, 3 / 4 * 1024),
    "collective-permute": (1, 256),
    "all-to-all": (1, 3 / 4 * 256),
}


@pytest.fixture(scope="module")
def cpu_program(tmp_path_factory):
    env = subprocess_env(str(tmp_path_factory.mktemp("cache")), devices=8)
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bytes_of_a_compiled_program_match_the_hand_count(cpu_program):
    collectives = communication.program_collectives(cpu_program)
    # Device d sits at (d // 4, d % 4) on a 2x4 torus: "a" runs along its first axis, "b" along its second.
    coords = [(d // 4, d % 4) for d in range(8)]
    link = communication.Interconnect(link_bytes_per_s=1000.0, ports=4)
    traffic = communication.traffic(communication.program_collectives(cpu_program, coords), link)
    assert traffic.executions == {kind: runs for kind, (runs, _) in BY_HAND.items()}
    assert traffic.sent_bytes == pytest.approx({kind: sent for kind, (_, sent) in BY_HAND.items()})
    # The loop's gather runs once per iteration.
    assert sorted(c.runs for c in collectives if c.kind == "all-gather") == [1, 3]
    # One torus axis: 2 links; the psum over both mesh axes spans both torus axes: 4 links; a permute: one link.
    assert traffic.seconds == pytest.approx({
        "all-gather": BY_HAND["all-gather"][1] / 2000, "reduce-scatter": 768 / 2000, "all-to-all": 192 / 2000,
        "all-reduce": 256 / 2000 + 448 / 4000, "collective-permute": 256 / 1000})


HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%async_start_fusion (p0: bf16[4,8]) -> (bf16[4,8], u32[]) {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %all-gather.1 = bf16[16,8]{1,0} all-gather(%p0), channel_id=5, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %custom-call.1 = (bf16[4,8]{1,0}, u32[]) custom-call(%p0, %all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion (p1: bf16[4,8]) -> bf16[4,8] {
  %p1 = bf16[4,8]{1,0} parameter(0)
  %all-gather.2 = bf16[16,8]{1,0} all-gather(%p1), channel_id=5, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %neg.1 = bf16[4,8]{1,0} negate(%p1)
}

%async_done_fusion (p2: bf16[4,8]) -> bf16[16,8] {
  %p2 = bf16[4,8]{1,0} parameter(0)
  %all-gather.3 = bf16[16,8]{1,0} all-gather(%p2), channel_id=5, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, frontend_attributes={chain_id="3"}
  ROOT %custom-call.2 = bf16[16,8]{1,0} custom-call(%p2, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%body (p.body: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p.body = (s32[]{:T(128)}, f32[64]{0}) parameter(0)
  %i.body = s32[]{:T(128)} get-tuple-element(%p.body), index=0
  %x.body = f32[64]{0} get-tuple-element(%p.body), index=1
  %ars = f32[64]{0} all-reduce-start(%x.body), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add
  %ard = f32[64]{0} all-reduce-done(%ars)
  %ags = (f32[16]{0}, f32[64]{0}, u32[]{:S(2)}, u32[]{:S(2)}) all-gather-start(%x.body), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}
  %agd = f32[64]{0} all-gather-done(%ags)
  ROOT %t.body = (s32[]{:T(128)}, f32[64]{0}) tuple(%i.body, %ard)
}

%cond (c: (s32[], f32[64])) -> pred[] {
  %c = (s32[]{:T(128)}, f32[64]{0}) parameter(0)
  %limit = s32[]{:T(128)} constant(5)
  %i.cond = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.cond, %limit), direction=LT
}

ENTRY %main (x: f32[64], w: bf16[4,8]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %w = bf16[4,8]{1,0} parameter(1)
  %start = (bf16[4,8]{1,0}, u32[]) fusion(%w), kind=kCustom, calls=%async_start_fusion
  %middle = bf16[4,8]{1,0} fusion(%w), kind=kOutput, calls=%async_collective_fusion
  %done = bf16[16,8]{1,0} fusion(%w), kind=kCustom, calls=%async_done_fusion
  %cp = (bf16[16,8]{1,0}, bf16[16,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%done), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[16,8]{1,0} collective-permute-done(%cp)
  %both = (f32[64]{0}, bf16[16,8]{1,0}) all-reduce(%x, %cpd), channel_id=4, replica_groups={}, to_apply=%add
  %zero = s32[]{:T(128)} constant(0)
  %t0 = (s32[]{:T(128)}, f32[64]{0}) tuple(%zero, %x)
  %loop = (s32[]{:T(128)}, f32[64]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[64]{0} get-tuple-element(%loop), index=1
}
"""


def test_replica_groups_in_every_form():
    assert communication.replica_groups("replica_groups=[2,4]<=[4,2]T(1,0), x", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert communication.replica_groups("replica_groups=[4,2]<=[8], x", 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert communication.replica_groups("replica_groups=mesh['x'=2,'y'=4] {'x'}, d", 8) == [[0, 4], [1, 5],
                                                                                            [2, 6], [3, 7]]
    assert communication.replica_groups("replica_groups=mesh['x'=2,'y'=4] {'x','y'}, d", 8) == [list(range(8))]
    assert communication.replica_groups("replica_groups={{0,3},{1,2}}, d", 4) == [[0, 3], [1, 2]]
    assert communication.replica_groups("replica_groups={}, d", 4) == [[0, 1, 2, 3]]


def test_async_pairs_and_split_collectives_count_once_and_loops_by_their_trips():
    found = {c.name: c for c in communication.program_collectives(HLO)}
    # The gather libtpu split over three fusions counts at its start: 4 bf16[4,8] shards gathered into bf16[16,8].
    assert set(found) == {"all-gather.1", "cp", "both", "ars", "ags"}
    assert (found["all-gather.1"].data_bytes, found["all-gather.1"].group_size) == (256, 4)
    assert found["all-gather.1"].sent_bytes == 192 and found["all-gather.1"].runs == 1
    # A permute's start returns (operand, result, context): it sends its operand.
    assert (found["cp"].kind, found["cp"].sent_bytes) == ("collective-permute", 256)
    # Two arrays reduced in one all-reduce over all 8 devices (no groups given): 256 + 256 bytes.
    assert (found["both"].group_size, found["both"].sent_bytes) == (8, 2 * 7 / 8 * 512)
    # In the loop of 5 iterations: an all-reduce over groups of 4, an all-gather from f32[16] to f32[64] over 2.
    assert (found["ars"].kind, found["ars"].group_size, found["ars"].runs) == ("all-reduce", 4, 5)
    assert found["ars"].sent_bytes == 2 * 3 / 4 * 256
    assert (found["ags"].kind, found["ags"].group_size, found["ags"].data_bytes) == ("all-gather", 2, 256)
    assert found["ags"].sent_bytes == 128 and found["ags"].runs == 5


def test_a_permute_that_stays_on_the_chip_sends_nothing():
    hlo = HLO.replace("source_target_pairs={{0,1},{1,0}}", "source_target_pairs={{0,0}}")
    cp = next(c for c in communication.program_collectives(hlo) if c.name == "cp")
    assert cp.sent_bytes == 0


def test_a_loop_whose_count_cannot_be_read_gives_no_traffic():
    assert communication.program_collectives(HLO.replace("constant(5)", "parameter(1)")) is None
