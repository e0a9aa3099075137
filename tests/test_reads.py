"""Proof, from TensorStore's own counters, that each shard reads only its chunks."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from orbax_linen_nnx import LinenCompatRestore

IN, OUT = 256, 64


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(x)


class NnxWide(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(IN, OUT, rngs=rngs)


def counter(name: str) -> int:
  total = 0
  for m in ts.experimental_collect_matching_metrics(name):
    if m['name'] == name:
      total += sum(v.get('value', 0) for v in m['values'])
  return total


def chunk_ids(index, shape, chunk) -> set[tuple[int, ...]]:
  """Grid indices of the stored chunks a slice of the array intersects."""
  ranges = []
  for sl, size, c in zip(index, shape, chunk):
    start, stop, _ = sl.indices(size)
    ranges.append(range(start // c, (stop - 1) // c + 1))
  return set(itertools.product(*ranges))


def chunks_touched(index, shape, chunk) -> int:
  """How many stored chunks a slice of the array intersects."""
  return len(chunk_ids(index, shape, chunk))


def chunks_under(indices, shape, chunk) -> int:
  """How many distinct stored chunks some slices intersect together (each is read once)."""
  return len(set().union(*(chunk_ids(i, shape, chunk) for i in indices)))


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
  abstract['fc']['kernel'] = abstract['fc']['kernel'].copy(jax.ShapeDtypeStruct((IN, OUT), jnp.float32, sharding=sharding))
  # Only the kernel is read: the bias would add its own (single) chunk read.
  plan_args = dict(rules={'Dense_0': 'fc'}, partial=True)
  del abstract['fc']['bias']

  # What the target needs: the stored chunks under its device slices, each read once.
  slices = {tuple(s.indices(n)[:2] for s, n in zip(idx, (IN, OUT))): idx
            for idx in sharding.addressable_devices_indices_map((IN, OUT)).values()}
  expected_chunks = chunks_under(slices.values(), (IN, OUT), chunk)
  mngr = ocp.CheckpointManager(directory)
  before_chunks = counter('/tensorstore/cache/chunk_cache/reads')
  before_bytes = counter('/tensorstore/kvstore/file/bytes_read')
  restored = mngr.restore(0, args=LinenCompatRestore(abstract, **plan_args))
  chunk_reads = counter('/tensorstore/cache/chunk_cache/reads') - before_chunks
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
  tree = {'w': x, 'step': np.uint32(7), 'mask': np.array([True, False, True]),
          'h': np.arange(6, dtype=np.float16) - 3}
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(0, args=ocp.args.StandardSave(tree))
  shardings = {'w': NamedSharding(mesh, P(None, 'model')), 'step': NamedSharding(mesh, P()),
               'mask': NamedSharding(mesh, P()), 'h': NamedSharding(mesh, P('model'))}
  target = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=shardings[k]) for k, v in tree.items()}
  before = counter('/tensorstore/cache/chunk_cache/reads')
  out = ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(target, replica_axis='data'))
  reads = counter('/tensorstore/cache/chunk_cache/reads') - before
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
    m.save(1, args=ocp.args.PyTreeSave({'params': {'Dense_0': {'kernel': jax.device_put(w, NamedSharding(mesh, P('data')))}}}))
  sharding = NamedSharding(mesh, P('data', 'model'))
  target = {'fc1': {'kernel': jax.ShapeDtypeStruct((64, 8), np.float32, sharding=sharding)}}
  out = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(target, rules={'Dense_0': 'fc1'}))
  np.testing.assert_array_equal(np.asarray(out['fc1']['kernel']), w)
  assert out['fc1']['kernel'].sharding == sharding
