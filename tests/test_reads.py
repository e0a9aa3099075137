"""Proof, from TensorStore's own counters, that each shard reads only its chunks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import ChunkLoads, chunks_under, counter, loads_during
from orbax_linen_nnx import LinenCompatRestore

IN, OUT = 256, 64


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(x)


class NnxWide(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(IN, OUT, rngs=rngs)


@pytest.fixture(scope='module')
def saved(tmp_path_factory, mesh):
  """A Linen `variables` checkpoint whose kernel is stored in (64, 32) chunks (a 4x2 grid)."""
  directory = tmp_path_factory.mktemp('wide')
  variables = Wide().init(jax.random.key(0), jnp.ones((1, IN)))
  save_sharding = NamedSharding(mesh, P('data', 'model'))
  variables = jax.tree.map(
    lambda a: jax.device_put(a, save_sharding if a.ndim == 2 else NamedSharding(mesh, P())), variables
  )
  mngr = ocp.CheckpointManager(directory)
  mngr.save(0, args=ocp.args.StandardSave(variables))
  mngr.wait_until_finished()
  chunk = mngr.item_metadata(0)['params']['Dense_0']['kernel'].storage.chunk_shape
  assert tuple(chunk) == (IN // 4, OUT // 2)
  return directory, variables, tuple(chunk)


@pytest.mark.parametrize('spec', [P('data', 'model'), P('data'), P(None, 'model'), P('model', 'data'), P()])
def test_each_shard_reads_only_its_chunks(saved, mesh, spec):
  directory, variables, chunk = saved
  abstract = nnx.state(nnx.eval_shape(lambda: NnxWide(nnx.Rngs(0))))
  sharding = NamedSharding(mesh, spec)
  abstract['fc']['kernel'] = abstract['fc']['kernel'].copy(
    jax.ShapeDtypeStruct((IN, OUT), jnp.float32, sharding=sharding)
  )
  # Only the kernel is read: the bias would add its own (single) chunk read.
  plan_args = dict(rules={'Dense_0': 'fc'}, partial=True)
  del abstract['fc']['bias']

  # What the target needs: the stored chunks under its device slices, each read once.
  slices = {
    tuple(s.indices(n)[:2] for s, n in zip(idx, (IN, OUT))): idx
    for idx in sharding.addressable_devices_indices_map((IN, OUT)).values()
  }
  expected_chunks = chunks_under(slices.values(), (IN, OUT), chunk)
  mngr = ocp.CheckpointManager(directory)
  before_bytes = counter('/tensorstore/kvstore/file/bytes_read')
  with ChunkLoads(directory / '0' / 'default') as loads:
    restored = mngr.restore(0, args=LinenCompatRestore(abstract, **plan_args))
  chunk_reads = loads.count
  file_bytes = counter('/tensorstore/kvstore/file/bytes_read') - before_bytes

  kernel = restored['fc']['kernel'].get_raw_value()
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(variables['params']['Dense_0']['kernel']))
  assert kernel.sharding == sharding
  for shard in kernel.addressable_shards:  # never materialised replicated
    assert shard.data.shape == sharding.shard_shape((IN, OUT))

  assert chunk_reads == expected_chunks
  # Bytes from disk: those chunks once each, plus a little OCDBT index; a
  # whole-array read per shard would be len(slices) times the array.
  chunk_bytes = int(np.prod(chunk)) * 4
  print(f'{spec}: {len(slices)} slices, {chunk_reads} chunk reads, {file_bytes} bytes from disk')
  assert file_bytes <= chunk_reads * chunk_bytes + 16 * 1024


def test_read_once_per_replica_then_broadcast_is_bit_exact(tmp_path, mesh):
  """replica_axis: replica 0 reads, the others get the same bits by broadcast (-0.0 and NaN payloads too)."""
  x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
  x[0, :3] = [-0.0, np.nan, -np.inf]
  x.view(np.uint32)[1, 0] = 0x7FC00123  # a NaN with a payload
  tree = {'w': x, 'step': np.uint32(7), 'mask': np.array([True, False, True]), 'h': np.arange(6, dtype=np.float16) - 3}
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(0, args=ocp.args.StandardSave(tree))
  shardings = {
    'w': NamedSharding(mesh, P(None, 'model')),
    'step': NamedSharding(mesh, P()),
    'mask': NamedSharding(mesh, P()),
    'h': NamedSharding(mesh, P('model')),
  }
  target = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=shardings[k]) for k, v in tree.items()}
  out, reads = loads_during(
    tmp_path / '0' / 'default',
    lambda: ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(target, replica_axis='data')),
  )
  for k, v in tree.items():
    a = out[k]
    assert a.sharding == shardings[k]
    for shard in a.addressable_shards:  # every replica, bit for bit
      want = np.asarray(v)[shard.index]
      assert np.asarray(shard.data).tobytes() == want.tobytes(), (k, shard.device)
  # Stored unsharded, each array is one chunk, decoded once for all the slices
  # replica 0 holds (w 2, step 1, mask 1, h 2): 4 chunk reads.
  assert reads == len(tree)


@pytest.mark.parametrize('use_ocdbt', [True, False])
@pytest.mark.parametrize('use_zarr3', [False, True])
def test_every_orbax_storage_format(tmp_path, mesh, use_ocdbt, use_zarr3):
  """OCDBT or one directory per array, zarr2 or zarr3: all read through Orbax's own read spec."""
  w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
  with ocp.CheckpointManager(tmp_path, item_handlers=handler) as m:
    m.save(
      1,
      args=ocp.args.PyTreeSave({'params': {'Dense_0': {'kernel': jax.device_put(w, NamedSharding(mesh, P('data')))}}}),
    )
  sharding = NamedSharding(mesh, P('data', 'model'))
  target = {'fc1': {'kernel': jax.ShapeDtypeStruct((64, 8), np.float32, sharding=sharding)}}
  out = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(target, rules={'Dense_0': 'fc1'}))
  np.testing.assert_array_equal(np.asarray(out['fc1']['kernel']), w)
  assert out['fc1']['kernel'].sharding == sharding


# ---------------------------------------------------------------- one decode per stored chunk
# Whatever the chunk layout on disk and however many slices, targets or layers
# share a stored chunk, each process decodes it once per restore.

EIGHT_WAYS = P('data', 'model')  # 8 distinct slices of a 2-D array on the (4, 2) mesh


def host_saved(directory, tree):
  """Saved from host numpy, as single-host runs and published checkpoints are: one chunk per array."""
  with ocp.CheckpointManager(directory) as m:
    m.save(0, args=ocp.args.StandardSave(jax.device_get(tree)))
  stored = jax.tree.leaves(stored_metadata(directory))
  assert stored and all(tuple(m.storage.chunk_shape) == tuple(m.shape) for m in stored), 'one chunk per array'


def stored_metadata(directory):
  """Orbax's own metadata of step 0's arrays (shapes, chunk shapes); reads no array data."""
  return ocp.PyTreeCheckpointHandler().metadata(directory / '0' / 'default').tree


@pytest.mark.parametrize('budget', [1, None])
def test_single_chunk_array_into_eight_slices_decodes_once(tmp_path, mesh, budget):
  """A host-saved (one chunk) kernel restored 8 ways decodes 1 chunk, even with a 1-byte budget."""
  variables = Wide().init(jax.random.key(0), jnp.ones((1, IN)))
  host_saved(tmp_path, variables)
  sharding = NamedSharding(mesh, EIGHT_WAYS)
  target = {
    'fc': {
      'kernel': jax.ShapeDtypeStruct((IN, OUT), jnp.float32, sharding=sharding),
      'bias': jax.ShapeDtypeStruct((OUT,), jnp.float32, sharding=NamedSharding(mesh, P('data'))),
    }
  }
  assert len({str(i) for i in sharding.addressable_devices_indices_map((IN, OUT)).values()}) == 8
  out, reads = loads_during(
    tmp_path / '0' / 'default',
    lambda: ocp.CheckpointManager(tmp_path).restore(
      0, args=LinenCompatRestore(target, rules={'Dense_0': 'fc'}, read_budget_bytes=budget)
    ),
  )
  np.testing.assert_array_equal(np.asarray(out['fc']['kernel']), variables['params']['Dense_0']['kernel'])
  np.testing.assert_array_equal(np.asarray(out['fc']['bias']), variables['params']['Dense_0']['bias'])
  assert out['fc']['kernel'].sharding == sharding
  assert reads == 2  # one chunk each for the kernel and the bias


def test_row_chunks_into_column_shards_decode_each_chunk_once(tmp_path, mesh):
  """Saved as row shards, restored as (IN, OUT/8) column shards: every slice needs every chunk."""
  variables = Wide().init(jax.random.key(0), jnp.ones((1, IN)))
  rows = NamedSharding(mesh, P('data'))
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(
      0,
      args=ocp.args.StandardSave(
        jax.tree.map(lambda a: jax.device_put(a, rows if a.ndim == 2 else NamedSharding(mesh, P())), variables)
      ),
    )
  chunk = stored_metadata(tmp_path)['params']['Dense_0']['kernel'].storage.chunk_shape
  assert chunk[1] == OUT and chunk[0] <= IN // 4  # row chunks (Orbax may cut a shard into several)
  columns = NamedSharding(mesh, P(None, ('data', 'model')))
  target = {'fc': {'kernel': jax.ShapeDtypeStruct((IN, OUT), jnp.float32, sharding=columns)}}
  out, reads = loads_during(
    tmp_path / '0' / 'default',
    lambda: ocp.CheckpointManager(tmp_path).restore(
      0, args=LinenCompatRestore(target, rules={'Dense_0': 'fc'}, partial=True)
    ),
  )
  np.testing.assert_array_equal(np.asarray(out['fc']['kernel']), variables['params']['Dense_0']['kernel'])
  for shard in out['fc']['kernel'].addressable_shards:
    assert shard.data.shape == (IN, OUT // 8)
  row_chunks = IN // chunk[0]
  assert reads == row_chunks  # each row chunk once (8 slices x row_chunks if read per slice)


def test_stack_of_single_chunk_layers_decodes_each_layer_once(tmp_path, mesh):
  """A Linen loop saved from host, stacked into an NNX vmap stack sharded 8 ways within each layer."""
  import decoders as dec

  state = dec.linen_state(dec.LinenLoopDecoder)
  host_saved(tmp_path, state)
  abstract = nnx.state(nnx.eval_shape(lambda: dec.nnx_state(dec.NnxStackedDecoder)))
  kernel_sharding = NamedSharding(mesh, P(None, 'data', 'model'))

  def shard(v):
    value = v.get_raw_value()
    spec = P(None, 'data', 'model') if value.ndim == 3 else P()
    return v.copy(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

  abstract = jax.tree.map(shard, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  out, reads = loads_during(
    tmp_path / '0' / 'default', lambda: ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(abstract))
  )
  kernel = out['model']['layers']['mlp']['kernel'].get_raw_value()
  want = np.stack([np.asarray(state.params['params'][f'layers_{i}']['mlp']['kernel']) for i in range(dec.N)])
  np.testing.assert_array_equal(np.asarray(kernel), want)
  assert kernel.sharding == kernel_sharding
  stored = len(jax.tree.leaves(stored_metadata(tmp_path)))
  assert stored > 3 * dec.N and reads == stored  # every stored array, layers included, decoded exactly once


@pytest.mark.parametrize('budget', [1, None])
@pytest.mark.parametrize('spec', [P(None, 'data', 'model'), P(None, 'model', 'data'), P(None, None, ('data', 'model'))])
def test_stack_of_sharded_layers_decodes_each_chunk_once(tmp_path, mesh, spec, budget):
  """A Linen loop saved from a mesh (8 chunks per kernel), stacked into NNX slices that cut those chunks or not.

  With a 1-byte budget every read waits for the one before: a chunk that two
  reads need would be decoded twice.
  """
  import decoders as dec

  state = dec.linen_state(dec.LinenLoopDecoder)
  saved = NamedSharding(mesh, P('data', 'model'))
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(
      0,
      args=ocp.args.StandardSave(
        jax.tree.map(
          lambda a: jax.device_put(a, saved if np.shape(a) == (dec.D, dec.D) else NamedSharding(mesh, P())), state
        )
      ),
    )
  abstract = nnx.state(nnx.eval_shape(lambda: dec.nnx_state(dec.NnxStackedDecoder)))

  def shard(v):
    value = v.get_raw_value()
    s = spec if value.ndim == 3 else P()
    return v.copy(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, s)))

  abstract = jax.tree.map(shard, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  out, reads = loads_during(
    tmp_path / '0' / 'default',
    lambda: ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(abstract, read_budget_bytes=budget)),
  )
  kernel = out['model']['layers']['mlp']['kernel'].get_raw_value()
  want = np.stack([np.asarray(state.params['params'][f'layers_{i}']['mlp']['kernel']) for i in range(dec.N)])
  np.testing.assert_array_equal(np.asarray(kernel), want)
  assert kernel.sharding == NamedSharding(mesh, spec)
  stored = jax.tree.leaves(stored_metadata(tmp_path))
  chunks = sum(math.prod(-(-n // c) for n, c in zip(m.shape, m.storage.chunk_shape)) for m in stored)
  assert chunks > len(stored) and reads == chunks  # every stored chunk decoded exactly once


def test_fused_array_split_into_two_targets_decodes_once(tmp_path, mesh):
  """A host-saved (2, F, D) gating einsum split (and transposed) into gate_proj and up_proj, both sharded."""
  from orbax_linen_nnx import split, transpose

  w = np.random.default_rng(0).normal(size=(2, 64, 16)).astype(np.float32)
  host_saved(tmp_path, {'params': {'mlp': {'gating_einsum': w}}})
  sharding = NamedSharding(mesh, EIGHT_WAYS)
  target = {
    'mlp': {
      p: {'kernel': jax.ShapeDtypeStruct((16, 64), np.float32, sharding=sharding)} for p in ('gate_proj', 'up_proj')
    }
  }
  rules = [
    split('{b}/gating_einsum', ['{b}/gate_proj/kernel', '{b}/up_proj/kernel'], axis=0),
    transpose('{b}/{p}_proj/kernel', (1, 0)),
  ]
  out, reads = loads_during(
    tmp_path / '0' / 'default',
    lambda: ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(target, rules=rules)),
  )
  np.testing.assert_array_equal(np.asarray(out['mlp']['gate_proj']['kernel']), w[0].T)
  np.testing.assert_array_equal(np.asarray(out['mlp']['up_proj']['kernel']), w[1].T)
  assert reads == 1  # 16 slices of two targets, one stored chunk


@pytest.mark.parametrize(
  'shape, dtype', [((3, 5), np.float32), ((0, 4), np.int8), ((7,), jnp.bfloat16), ((2, 1, 4), np.int32)]
)
def test_slices_built_on_the_host_are_aligned_so_cpu_devices_take_them_without_a_copy(shape, dtype):
  from orbax_linen_nnx.engine.read import aligned_empty

  a = aligned_empty(shape, dtype)
  assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags['C_CONTIGUOUS'] and a.flags['WRITEABLE']
  if a.size:  # an empty array has no data to align
    assert a.ctypes.data % 64 == 0
    a[...] = np.arange(a.size).reshape(shape).astype(dtype)
    placed = jax.device_put(a, jax.devices()[3])
    # PJRT's CPU client aliases a 64-byte-aligned host array: the device buffer is the array itself.
    assert placed.unsafe_buffer_pointer() == a.ctypes.data
    np.testing.assert_array_equal(np.asarray(placed), a)
