"""gptrl/hlo.py: loop trip counts, matmul flops and collectives read from HLO text, against hand counts of
hand-written modules, and against XLA's own cost analysis of programs compiled for the CPU and for a TPU slice."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import hlo

# A loop i = 1, 3, 5, 7 (start 1, step 2, i < 8: 4 trips) around a [8,16] x [16,32] dot and an all-reduce of
# f32[256]; inside it a second loop of 3 trips (0..2) around a convolution written as a [4,16] x [16,8] matmul;
# after the loop one all-gather to bf16[64,32].
MODULE = """HloModule test, entry_computation_layout={(f32[8,16]{1,0}, f32[16,32]{1,0})->f32[8,32]{1,0}}

%fused_dot (p0: f32[8,16], p1: f32[16,32]) -> f32[8,32] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner_cond (ip: (s32[], f32[4,16], f32[16,8])) -> pred[] {
  %ip = (s32[], f32[4,16]{1,0}, f32[16,8]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%ip), index=0
  %three = s32[] constant(3)
  ROOT %lt.2 = pred[] compare(%j, %three), direction=LT
}

%inner_body (ib: (s32[], f32[4,16], f32[16,8])) -> (s32[], f32[4,16], f32[16,8]) {
  %ib = (s32[], f32[4,16]{1,0}, f32[16,8]{1,0}) parameter(0)
  %j.1 = s32[] get-tuple-element(%ib), index=0
  %a = f32[4,16]{1,0} get-tuple-element(%ib), index=1
  %b = f32[16,8]{1,0} get-tuple-element(%ib), index=2
  %conv = f32[4,8]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  %one = s32[] constant(1)
  %j.2 = s32[] add(%j.1, %one)
  ROOT %t = (s32[], f32[4,16]{1,0}, f32[16,8]{1,0}) tuple(%j.2, %a, %b)
}

%outer_cond (cp: (s32[], f32[8,16], f32[16,32], f32[256])) -> pred[] {
  %cp = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}, f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%cp), index=0
  %eight = s32[] constant(8)
  ROOT %lt.1 = pred[] compare(%i, %eight), direction=LT
}

%outer_body (bp: (s32[], f32[8,16], f32[16,32], f32[256])) -> (s32[], f32[8,16], f32[16,32], f32[256]) {
  %bp = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}, f32[256]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%bp), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%bp), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%bp), index=2
  %v = f32[256]{0} get-tuple-element(%bp), index=3
  %f = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ar = f32[256]{0} all-reduce(%v), replica_groups={}, to_apply=%add_comp
  %zero.1 = s32[] constant(0)
  %lhs = f32[4,16]{1,0} slice(%x), slice={[0:4], [0:16]}
  %rhs = f32[16,8]{1,0} slice(%w), slice={[0:16], [0:8]}
  %it = (s32[], f32[4,16]{1,0}, f32[16,8]{1,0}) tuple(%zero.1, %lhs, %rhs)
  %inner = (s32[], f32[4,16]{1,0}, f32[16,8]{1,0}) while(%it), condition=%inner_cond, body=%inner_body
  %two = s32[] constant(2)
  %c = s32[] copy(%two)
  %i.2 = s32[] add(%i.1, %c)
  ROOT %t.1 = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}, f32[256]{0}) tuple(%i.2, %x, %w, %ar)
}

%add_comp (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %s = f32[] add(%l, %r)
}

ENTRY %main (x0: f32[8,16], w0: f32[16,32]) -> bf16[64,32] {
  %x0 = f32[8,16]{1,0} parameter(0)
  %w0 = f32[16,32]{1,0} parameter(1)
  %start = s32[] constant(1)
  %init_v = f32[256]{0} broadcast(%start), dimensions={}
  %tuple = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}, f32[256]{0}) tuple(%start, %x0, %w0, %init_v)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}, f32[256]{0}) while(%tuple), condition=%outer_cond, body=%outer_body
  %small = bf16[16,32]{1,0} convert(%w0)
  ROOT %ag = bf16[64,32]{1,0} all-gather(%small), dimensions={0}, replica_groups={{0,1,2,3}}
}
"""


def test_trip_counts_flops_and_collectives_of_a_hand_written_module():
  computations = hlo.parse(MODULE)
  assert set(computations) == {"fused_dot", "inner_cond", "inner_body", "outer_cond", "outer_body", "add_comp",
                               "main"}
  assert computations["main"].entry
  counts, unknown = hlo.execution_counts(computations)
  assert not unknown
  assert counts["outer_body"] == 4  # i = 1, 3, 5, 7
  assert counts["fused_dot"] == 4
  assert counts["inner_body"] == 4 * 3
  prof = hlo.profile(MODULE)
  dot, conv = 2 * 8 * 32 * 16, 2 * 4 * 8 * 16
  assert prof.matmul_flops == 4 * dot + 12 * conv
  assert prof.collectives["all-reduce"].count == 4 and prof.collectives["all-reduce"].bytes == 4 * 256 * 4
  assert prof.collectives["all-gather"].count == 1 and prof.collectives["all-gather"].bytes == 64 * 32 * 2
  once = hlo.profile(MODULE, loops=False)
  assert once.matmul_flops == dot + conv and once.collectives["all-reduce"].count == 1


# TPU memory spaces: x (f32[1024], 4 KiB) is prefetched whole into VMEM (S(1)) by a copy-start, and y's first
# half sliced into VMEM by a slice-start; a fusion reads both VMEM copies and writes z to device memory; a second
# fusion reads z and writes its result to VMEM; a copy-start evicts that to device memory.
VMEM_MODULE = """HloModule spaces

%add_fused (a: f32[1024], b: f32[512]) -> f32[1024] {
  %a = f32[1024]{0:T(1024)S(1)} parameter(0)
  %b = f32[512]{0:T(512)S(1)} parameter(1)
  %zero = f32[] constant(0)
  %pad = f32[1024]{0} pad(%b, %zero), padding=0_512
  ROOT %sum = f32[1024]{0} add(%a, %pad)
}

%neg_fused (c: f32[1024]) -> f32[1024] {
  %c = f32[1024]{0:T(1024)} parameter(0)
  ROOT %n = f32[1024]{0:T(1024)S(1)} negate(%c)
}

ENTRY %main (x: f32[1024], y: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0:T(1024)} parameter(0)
  %y = f32[1024]{0:T(1024)} parameter(1)
  %cs = (f32[1024]{0:T(1024)}, f32[1024]{0:T(1024)S(1)}, u32[]{:S(2)}) copy-start(%x)
  %xv = f32[1024]{0:T(1024)S(1)} copy-done(%cs)
  %ss = ((f32[1024]{0:T(1024)}), f32[512]{0:T(512)S(1)}, s32[]{:S(2)}) slice-start(%y), slice={[0:512]}
  %yv = f32[512]{0:T(512)S(1)} slice-done(%ss)
  %z = f32[1024]{0:T(1024)} fusion(%xv, %yv), kind=kLoop, calls=%add_fused
  %w = f32[1024]{0:T(1024)S(1)} fusion(%z), kind=kLoop, calls=%neg_fused
  %ev = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%w)
  ROOT %out = f32[1024]{0:T(1024)} copy-done(%ev)
}
"""


def test_arrays_in_on_chip_memory_are_not_device_memory_traffic():
  """A prefetch reads device memory once (not read and written), its consumer reads on-chip memory, and an
  eviction writes device memory once: 4 KiB (copy-start) + 2 KiB (slice-start) + 4 KiB (fusion writes z) +
  4 KiB (fusion reads z) + 4 KiB (eviction) = 18 KiB."""
  assert [a.space for a in hlo.arrays("(f32[8]{0:T(8)}, bf16[4,2]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)})")] == [0, 1, 2]
  assert hlo.arrays("f32[8]{0}")[0].hbm_bytes == 32 and hlo.arrays("f32[8]{0:S(1)}")[0].hbm_bytes == 0
  assert hlo.profile(VMEM_MODULE).bytes_accessed == 18 * 1024


# A fusion that gathers 10 rows of a [1000, 64] f32 table (through a bitcast) and adds a [10, 64] operand, and
# one that slices a row of the same table and negates the whole of it.
GATHER_MODULE = """HloModule gathers

%gather_fused (t: f32[1000,64], i: s32[10,1], y: f32[10,64]) -> f32[10,64] {
  %t = f32[1000,64]{1,0} parameter(0)
  %view = f32[1000,64]{1,0} bitcast(%t)
  %i = s32[10,1]{1,0} parameter(1)
  %rows = f32[10,64]{1,0} gather(%view, %i), GATHER_DIMS
  %y = f32[10,64]{1,0} parameter(2)
  ROOT %sum = f32[10,64]{1,0} add(%rows, %y)
}

%slice_and_whole (u: f32[1000,64]) -> (f32[1,64], f32[1000,64]) {
  %u = f32[1000,64]{1,0} parameter(0)
  %row = f32[1,64]{1,0} slice(%u), slice={[0:1], [0:64]}
  %neg = f32[1000,64]{1,0} negate(%u)
  ROOT %out = (f32[1,64]{1,0}, f32[1000,64]{1,0}) tuple(%row, %neg)
}

ENTRY %main (table: f32[1000,64], idx: s32[10,1], y: f32[10,64]) -> f32[10,64] {
  %table = f32[1000,64]{1,0} parameter(0)
  %idx = s32[10,1]{1,0} parameter(1)
  %y = f32[10,64]{1,0} parameter(2)
  %both = (f32[1,64]{1,0}, f32[1000,64]{1,0}) fusion(%table), kind=kLoop, calls=%slice_and_whole
  ROOT %g = f32[10,64]{1,0} fusion(%table, %idx, %y), kind=kLoop, calls=%gather_fused
}
""".replace("GATHER_DIMS", "offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, "
            "slice_sizes={1,64}")


def test_a_fused_operand_that_is_only_gathered_from_is_read_where_the_rows_are():
  """The gather fusion reads 10 of the table's 1000 rows (2,560 bytes), the 40 bytes of indices and y (2,560),
  and writes 2,560; the second fusion reads the whole table (a negate uses it whole: 256,000) and writes a row
  and the negated table (256 + 256,000)."""
  assert hlo.profile(GATHER_MODULE).bytes_accessed == (2560 + 40 + 2560 + 2560) + (256000 + 256 + 256000)


def test_convolution_flops_count_only_window_positions_inside_the_input():
  # A 1-D convolution over 10 positions with a window of 3 and one position of padding each side: the two edge
  # outputs each see one padded position, so 10 * 3 - 2 = 28 multiply-adds per (input, output) feature pair.
  text = """HloModule conv

ENTRY %main (a: f32[2,10,3], k: f32[3,3,5]) -> f32[2,10,5] {
  %a = f32[2,10,3]{2,1,0} parameter(0)
  %k = f32[3,3,5]{2,1,0} parameter(1)
  ROOT %c = f32[2,10,5]{2,1,0} convolution(%a, %k), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""
  assert hlo.profile(text).matmul_flops == 2 * 2 * 3 * 5 * 28
  # Stride 2 without padding: outputs 0..3 read positions 2o..2o+2, all inside: 4 * 3 positions.
  strided = text.replace("f32[2,10,5]{2,1,0} convolution", "f32[2,4,5]{2,1,0} convolution").replace(
      "window={size=3 pad=1_1}", "window={size=3 stride=2}")
  assert hlo.profile(strided).matmul_flops == 2 * 2 * 3 * 5 * 12


def _scan_matmul(w, x):
  def body(c, xi):
    return c + (xi @ w).sum(), None
  return jax.lax.scan(body, 0.0, x)[0]


def test_cpu_program_loop_counted_once_matches_xla_and_by_trips_multiplies():
  compiled = jax.jit(_scan_matmul).lower(jnp.ones((16, 32)), jnp.ones((6, 8, 16))).compile()
  text = compiled.as_text()
  xla = compiled.cost_analysis()["flops"]
  once = hlo.profile(text, loops=False).matmul_flops
  assert once == 2 * 8 * 32 * 16
  assert 0.9 * xla <= once <= xla  # XLA adds the elementwise sums
  assert hlo.profile(text).matmul_flops == 6 * once


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extras install it)")
def test_tpu_program_matches_xla_cost_analysis():
  """A sharded two-layer MLP in a scan of 5, compiled for a v5e:2x2 slice: XLA's TPU compiler rewrites the
  matmuls as convolutions; counted once they are XLA's flops (less its elementwise ones), and the loop runs 5
  times; the fsdp-sharded weights are gathered."""
  from gptrl import compile as compile_lib  # pylint: disable=import-outside-toplevel
  devices = compile_lib.tpu_topology("v5e:2x2").devices
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4), ("fsdp",))
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

  def f(w1, w2, x):
    def body(c, xi):
      return c + jnp.sum(jnp.maximum(xi @ w1, 0) @ w2), None
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), x)[0]

  args = (jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=spec("fsdp", None)),
          jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=spec("fsdp", None)),
          jax.ShapeDtypeStruct((5, 64, 256), jnp.bfloat16, sharding=spec(None, "fsdp", None)))
  compiled = jax.jit(f).lower(*args).compile()
  text = compiled.as_text()
  xla = compiled.cost_analysis()["flops"]
  once = hlo.profile(text, loops=False)
  per_device = 2 * 16 * 256 * 512 * 2  # 16 rows per device, two matmuls
  assert once.matmul_flops == pytest.approx(per_device, rel=0.01)
  assert 0.9 * xla <= once.matmul_flops <= 1.001 * xla
  looped = hlo.profile(text)
  # Bytes of device memory: at least the arguments' shards, each read once (w1, w2: 64 KiB each; x: 40 KiB);
  # at most XLA's own count, which also counts operands that the TPU compiler keeps in on-chip memory (it is
  # 8x the arguments here: the gathered weights and the loop's slices never leave VMEM).
  arguments = 2 * (256 * 512 // 4) * 2 + 5 * 16 * 256 * 2
  assert arguments <= looped.bytes_accessed and once.bytes_accessed <= compiled.cost_analysis()["bytes accessed"]
  assert looped.matmul_flops == pytest.approx(5 * per_device, rel=0.01)
  assert looped.collectives["all-gather"].count + looped.collectives["collective-permute"].count > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extras install it)")
@pytest.mark.parametrize("b", [8, 4], ids=["two_rows_per_device", "one_row_per_device"])
def test_splash_kernels_compiled_for_a_tpu_slice_are_counted_by_their_tiles(b):
  """gptrl/splash.py's causal kernel, forward and backward, rows split over a v5e:2x2 slice: XLA sees custom
  calls (no flops of its own); the profile counts the tiles on and below the diagonal (384 tokens: 128-token
  tiles, 6 of 9) x 2 (forward), 3 (dq) and 4 (dkv) matmuls of 128 x 128 x K per row and head. With one row per
  device the kernels' operands have no batch axis."""
  from gptrl import compile as compile_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sharding, splash  # pylint: disable=import-outside-toplevel
  from gptrl.config import MeshConfig  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), compile_lib.tpu_topology("v5e:2x2").devices,
                            whole=True)
  t, h, k = 384, 4, 64
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

  def loss(q, keys, values):
    return jnp.sum(splash.causal_attention(q, keys, values, None).astype(jnp.float32))
  args = (jax.ShapeDtypeStruct((b, t, h, k), jnp.bfloat16, sharding=rows),
          jax.ShapeDtypeStruct((b, h, t, k), jnp.bfloat16, sharding=rows),
          jax.ShapeDtypeStruct((b, h, t, k), jnp.bfloat16, sharding=rows))
  with sharding.activate(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  text = compiled.as_text()
  assert "splash_mha_fwd" in text and "splash_mha_dkv" in text and "splash_mha_dq" in text
  per_matmul = 2 * 128 * 128 * k * 6 * (b // 4) * h  # per device: b / 4 rows
  profile = hlo.profile(text)
  assert not profile.unknown_loops
  assert profile.matmul_flops == pytest.approx((2 + 3 + 4) * per_matmul, rel=0.02)


def test_attributes_over_several_lines_and_other_threads_do_not_end_or_merge_computations():
  # Pallas kernels' frontend_attributes span lines ("}}, metadata=..." is not a computation's end); a computation
  # of another execution thread closes with '}, execution_thread="host"'.
  text = """HloModule m

%host_side (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}, execution_thread="host"

ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %d1 = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, frontend_attributes={k={
"x": 1
}}, metadata={op_name="a"}
  ROOT %d2 = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
  assert set(hlo.parse(text)) == {"host_side", "main"}
  assert hlo.profile(text).matmul_flops == 2 * (2 * 8 * 4 * 16)
