"""Layer stacks converted during restore, between four real decoder layouts, both ways."""

import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import decoders as dec
import models
from orbax_linen_nnx import LinenCompatRestore, PlanError, plan
from helpers import ChunkLoads, chunk_ids, chunks_under

LINEN = {'loop': dec.LinenLoopDecoder, 'scan': dec.LinenScanDecoder}
NNX = {'unrolled': dec.NnxUnrolledDecoder, 'vmap': dec.NnxStackedDecoder}
LAYER_AXIS = {'scan': dec.LINEN_SCAN_AXIS, 'vmap': 0}
FRAMING = [
  ('params/params/', 'model/'),
  ('opt_state/0/mu/params/', 'mu/'),
  ('opt_state/0/nu/params/', 'nu/'),
  ('model/', 'model/'),
  ('optimizer/opt_state/0/mu/', 'mu/'),
  ('optimizer/opt_state/0/nu/', 'nu/'),
  ('opt_state/0/count', 'count'),
  ('optimizer/opt_state/0/count', 'count'),
  ('optimizer/step', 'step'),
  ('step', 'step'),
]


def per_layer(tree, kind) -> dict:
  """The state as {'model/layers/3/mlp/kernel': array, ...}: numpy's own unstacking."""
  out = {}
  for path, arr in models.flat(tree).items():
    arr = np.asarray(arr)
    pre, new = next((pre, new) for pre, new in FRAMING if path.startswith(pre))
    path = re.sub(r'layers_(\d+)', r'layers/\1', new + path[len(pre) :])
    if kind in LAYER_AXIS and '/layers/' in path:
      for i in range(arr.shape[LAYER_AXIS[kind]]):
        out[path.replace('/layers/', f'/layers/{i}/')] = np.take(arr, i, axis=LAYER_AXIS[kind])
    else:
      out[path] = arr
  return out


def sharding_for(shape, mesh):
  """Shard the first axis 4 ways (the layer axis of NNX stacks) and the second 2 ways."""
  spec = [None] * len(shape)
  if len(shape) >= 1 and shape[0] % 4 == 0:
    spec[0] = 'data'
  if len(shape) >= 2 and shape[1] % 2 == 0:
    spec[1] = 'model'
  return NamedSharding(mesh, P(*spec))


def shard(tree, mesh):
  def put(leaf):
    if isinstance(leaf, nnx.Variable):
      v = leaf.get_raw_value()
      return leaf.copy(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_for(v.shape, mesh)))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(leaf.shape, mesh))

  return jax.tree_util.tree_map(put, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def save(directory, tree):
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(2, args=ocp.args.StandardSave(tree))


def assert_equal_per_layer(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k].astype(got[k].dtype), err_msg=k)


@pytest.mark.parametrize('linen_kind', sorted(LINEN))
@pytest.mark.parametrize('nnx_kind', sorted(NNX))
def test_linen_to_nnx(tmp_path, mesh, linen_kind, nnx_kind):
  source = dec.linen_state(LINEN[linen_kind])
  save(tmp_path, source)
  abstract = shard(nnx.state(nnx.eval_shape(lambda: dec.nnx_state(NNX[nnx_kind]))), mesh)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))

  assert_equal_per_layer(per_layer(restored, nnx_kind), per_layer(source, linen_kind))
  models.assert_sharded_as(restored, abstract)

  ts = dec.nnx_state(NNX[nnx_kind])
  nnx.update(ts, restored)
  _, want = dec.linen_step(source)
  got = dec.nnx_step(ts['model'], ts['optimizer'])
  models.assert_reductions_close(got, want, terms=3 * dec.STEP_TERMS)  # 2 + 1 steps


@pytest.mark.parametrize('linen_kind', sorted(LINEN))
@pytest.mark.parametrize('nnx_kind', sorted(NNX))
def test_nnx_to_linen(tmp_path, mesh, linen_kind, nnx_kind):
  ts = dec.nnx_state(NNX[nnx_kind])
  for _ in range(2):
    dec.nnx_step(ts['model'], ts['optimizer'])
  save(tmp_path, nnx.state(ts))
  abstract = shard(jax.eval_shape(lambda: dec.linen_state(LINEN[linen_kind], steps=0)), mesh)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))

  assert_equal_per_layer(per_layer(restored, linen_kind), per_layer(nnx.state(ts), nnx_kind))
  models.assert_sharded_as(restored, abstract)

  restored = restored.replace(apply_fn=LINEN[linen_kind]().apply)
  _, got = dec.linen_step(restored)
  want = dec.nnx_step(ts['model'], ts['optimizer'])
  models.assert_reductions_close(got, want, terms=3 * dec.STEP_TERMS)  # 2 + 1 steps


def test_plan_shows_each_stack_with_its_sources_and_axis(tmp_path):
  save(tmp_path, dec.linen_state(dec.LinenLoopDecoder))
  abstract = nnx.state(nnx.eval_shape(lambda: dec.nnx_state(dec.NnxStackedDecoder)))
  p = plan(tmp_path / '2', abstract)
  r = p.read_for('model/layers/mlp/kernel')
  assert [s.name for s in r.sources] == [f'params.params.layers_{i}.mlp.kernel' for i in range(dec.N)]
  assert (
    str(r) == 'model/layers/mlp/kernel (4, 8, 8) float32  <-  params.params.layers_{0..3}.mlp.kernel  [stack axis 0]'
  )
  mu = p.read_for('optimizer/opt_state/0/mu/layers/out/bias')
  assert [s.name for s in mu.sources] == [f'opt_state.0.mu.params.layers_{i}.out.bias' for i in range(dec.N)]
  assert str(p.read_for('optimizer/opt_state/0/count')).endswith('<-  opt_state.0.count')

  save(tmp_path / 'scan', dec.linen_state(dec.LinenScanDecoder))
  p = plan(tmp_path / 'scan' / '2', abstract)
  assert str(p.read_for('model/layers/mlp/bias')).endswith('params.params.layers.mlp.bias  [layer axis 1 -> 0]')
  unrolled = nnx.state(nnx.eval_shape(lambda: dec.nnx_state(dec.NnxUnrolledDecoder)))
  p = plan(tmp_path / 'scan' / '2', unrolled)
  assert str(p.read_for('model/layers/2/mlp/kernel')).endswith('params.params.layers.mlp.kernel  [layer 2 of axis 1]')


def _layer_chunks(indices, layer_axis, shape, chunk):
  """Distinct chunks that slices of a stacked target touch in its per-layer sources."""
  rest_shape = shape[:layer_axis] + shape[layer_axis + 1 :]
  per_layer = [set() for _ in range(shape[layer_axis])]
  for index in indices:
    rest = index[:layer_axis] + index[layer_axis + 1 :]
    for layer in range(*index[layer_axis].indices(shape[layer_axis])):
      per_layer[layer] |= chunk_ids(rest, rest_shape, chunk)
  return sum(len(c) for c in per_layer)


@pytest.mark.parametrize('spec', [P('data'), P(None, 'data'), P('model', None, 'data')])
def test_stacking_reads_only_the_layers_and_rows_each_shard_covers(tmp_path, mesh, spec):
  """Per-layer kernels stored in row chunks, stacked lazily into an (N, 8, 8) target."""
  variables = dec.LinenLoopDecoder().init(jax.random.key(0), np.ones((1, dec.IN)))
  row_sharded = NamedSharding(mesh, P('data'))
  variables = jax.tree.map(
    lambda a: jax.device_put(a, row_sharded if a.shape[0] % 4 == 0 else NamedSharding(mesh, P())), variables
  )
  save(tmp_path, variables)
  meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / '2' / 'default').tree
  chunk = tuple(meta['params']['layers_0']['mlp']['kernel'].storage.chunk_shape)
  assert chunk[0] < dec.D  # several row-chunks per layer (Orbax picks the exact size)

  abstract = nnx.state(nnx.eval_shape(lambda: dec.NnxStackedDecoder(nnx.Rngs(0))))
  sharding = NamedSharding(mesh, spec)
  shape = (dec.N, dec.D, dec.D)
  only_kernel = {'layers': {'mlp': {'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)}}}
  slices = {
    tuple(s.indices(n)[:2] for s, n in zip(idx, shape)): idx
    for idx in sharding.addressable_devices_indices_map(shape).values()
  }
  expected = _layer_chunks(slices.values(), 0, shape, chunk)  # each chunk once

  with ChunkLoads(tmp_path / '2' / 'default') as loads:
    restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(only_kernel, partial=True))
  reads = loads.count

  kernel = restored['layers']['mlp']['kernel']
  want = np.stack([np.asarray(variables['params'][f'layers_{i}']['mlp']['kernel']) for i in range(dec.N)])
  np.testing.assert_array_equal(np.asarray(kernel), want)
  assert kernel.sharding == sharding
  for s in kernel.addressable_shards:
    assert s.data.shape == sharding.shard_shape(shape)
  full = dec.N * (dec.D // chunk[0]) * len(slices)
  print(f'{spec}: {len(slices)} slices, {reads} chunk reads (a full stack per slice: {full})')
  assert reads == expected
  del abstract


def _params_only(tmp_path, params):
  save(tmp_path, {'params': params})
  return tmp_path / '2'


def _loop_params(n=dec.N, d=dec.D):
  rng = np.random.default_rng(0)
  return {
    f'layers_{i}': {
      'mlp': {'kernel': rng.normal(size=(d, d)).astype(np.float32), 'bias': rng.normal(size=(d,)).astype(np.float32)}
    }
    for i in range(n)
  }


def _stacked_target(n=dec.N, d=dec.D):
  return {
    'layers': {
      'mlp': {'kernel': jax.ShapeDtypeStruct((n, d, d), np.float32), 'bias': jax.ShapeDtypeStruct((n, d), np.float32)}
    }
  }


def test_missing_layer_is_named_before_any_read(tmp_path):
  params = _loop_params()
  del params['layers_1']['mlp']['kernel']
  with pytest.raises(
    PlanError,
    match=r"target 'layers/mlp/kernel' \(4, 8, 8\) float32 stacks layers 0..3 of 'layers' but layer\(s\) \[1\] have no source",
  ):
    plan(_params_only(tmp_path / 'a', params), _stacked_target())
  params = _loop_params()
  del params['layers_3']
  with pytest.raises(
    PlanError, match=r"holds 4 layers of 'layers' but the checkpoint has layers 0..2 only; layer\(s\) \[3\] are missing"
  ):
    plan(_params_only(tmp_path / 'b', params), _stacked_target())


def test_inconsistent_layers_are_named(tmp_path):
  params = _loop_params()
  params['layers_2']['mlp']['kernel'] = np.zeros((8, 9), np.float32)
  with pytest.raises(
    PlanError,
    match=r"the layers to stack differ: source 'params/layers_0/mlp/kernel' \(8, 8\) float32 but source 'params/layers_2/mlp/kernel' \(8, 9\) float32",
  ):
    plan(_params_only(tmp_path, params), _stacked_target())


def test_ambiguous_layer_axis_names_the_option_that_settles_it(tmp_path):
  """N == D: every axis of the (8, 8, 8) target could be the layer axis."""
  params = _loop_params(n=8)
  ckpt = _params_only(tmp_path, params)
  with pytest.raises(
    PlanError,
    match=r"cannot tell the layer axis of stack 'layers': \[0, 1\] all fit every leaf .*stacks=\{'layers': \{'source': 1, 'target': 0\}\}",
  ):
    plan(ckpt, _stacked_target(n=8))
  restored = ocp.CheckpointManager(tmp_path).restore(
    2, args=LinenCompatRestore(_stacked_target(n=8), stacks={'layers': {'target': 0}})
  )
  np.testing.assert_array_equal(np.asarray(restored['layers']['mlp']['kernel'][5]), params['layers_5']['mlp']['kernel'])
  restored = ocp.CheckpointManager(tmp_path).restore(
    2, args=LinenCompatRestore(_stacked_target(n=8), stacks={'layers': {'linen': 1}})
  )
  np.testing.assert_array_equal(
    np.asarray(restored['layers']['mlp']['kernel'][:, 5]), params['layers_5']['mlp']['kernel']
  )


def test_encoder_and_decoder_stacks_with_different_depths(tmp_path):
  rng = np.random.default_rng(1)
  params = {'embed': {'embedding': rng.normal(size=(10, 8)).astype(np.float32)}}
  for stack, n in (('encoder', 2), ('decoder', 3)):
    params[stack] = {
      f'layers_{i}': {
        'attn': {'kernel': rng.normal(size=(8, 4)).astype(np.float32)},
        'mlp': {'kernel': rng.normal(size=(4, 8)).astype(np.float32)},
      }
      for i in range(n)
    }
  target = {'embed': {'embedding': jax.ShapeDtypeStruct((10, 8), np.float32)}}
  for stack, n in (('encoder', 2), ('decoder', 3)):
    target[stack] = {
      'layers': {
        'attn': {'kernel': jax.ShapeDtypeStruct((8, n, 4), np.float32)},
        'mlp': {'kernel': jax.ShapeDtypeStruct((4, n, 8), np.float32)},
      }
    }
  ckpt = _params_only(tmp_path, params)
  p = plan(ckpt, target)
  assert str(p.read_for('decoder/layers/mlp/kernel').transform[0]) == 'stack axis 1'
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(target))
  np.testing.assert_array_equal(
    np.asarray(restored['decoder']['layers']['attn']['kernel'][:, 2]), params['decoder']['layers_2']['attn']['kernel']
  )
  np.testing.assert_array_equal(
    np.asarray(restored['encoder']['layers']['mlp']['kernel'][:, 1]), params['encoder']['layers_1']['mlp']['kernel']
  )
  np.testing.assert_array_equal(np.asarray(restored['embed']['embedding']), params['embed']['embedding'])


@pytest.mark.parametrize('source_kind,target_kind', [('vmap', 'unrolled'), ('scan', 'vmap')])
def test_unstack_and_move_read_only_each_layers_chunks(tmp_path, mesh, source_kind, target_kind):
  """A stacked source stored one chunk per layer: each target layer/slice reads its own."""
  if source_kind == 'vmap':
    ts = dec.nnx_state(dec.NnxStackedDecoder)
    tree, axis = nnx.state(ts['model']), 0
  else:
    tree, axis = dec.LinenScanDecoder().init(jax.random.key(0), np.ones((1, dec.IN))), dec.LINEN_SCAN_AXIS
  spec = [None] * 3
  spec[axis] = 'data'  # one layer per shard when saved -> one chunk per layer on disk
  tree = jax.tree.map(
    lambda a: jax.device_put(a, NamedSharding(mesh, P(*spec[: a.ndim])) if a.ndim == 3 else NamedSharding(mesh, P())),
    tree,
  )
  save(tmp_path, tree)

  meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / '2' / 'default').tree
  stored = (
    meta['layers']['mlp']['kernel']['value'] if source_kind == 'vmap' else meta['params']['layers']['mlp']['kernel']
  )
  src_shape, chunk = tuple(stored.shape), tuple(stored.storage.chunk_shape)
  assert chunk[axis] == 1  # one layer per chunk

  def source_region(layer, rows):  # the source slice a target (layer, rows) slice reads
    index = [slice(None)] * 3
    index[axis] = slice(layer, layer + 1)
    index[1 if axis == 0 else 0] = rows
    return tuple(index)

  sharding = NamedSharding(mesh, P('data'))
  if target_kind == 'unrolled':
    layer_shape = (dec.D, dec.D)
    target = {
      'layers': {
        str(i): {'mlp': {'kernel': jax.ShapeDtypeStruct(layer_shape, np.float32, sharding=sharding)}}
        for i in range(dec.N)
      }
    }
    slices = {idx[0].indices(dec.D)[:2] for idx in sharding.addressable_devices_indices_map(layer_shape).values()}
    expected = chunks_under([source_region(i, slice(*r)) for i in range(dec.N) for r in slices], src_shape, chunk)
  else:
    target = {'layers': {'mlp': {'kernel': jax.ShapeDtypeStruct((dec.N, dec.D, dec.D), np.float32, sharding=sharding)}}}
    expected = chunks_under([source_region(i, slice(None)) for i in range(dec.N)], src_shape, chunk)
  args = dict(partial=True, target_layout='nnx')
  with ChunkLoads(tmp_path / '2' / 'default') as loads:
    restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(target, **args))
  reads = loads.count
  src = np.asarray(models.flat(tree)['layers/mlp/kernel' if source_kind == 'vmap' else 'params/layers/mlp/kernel'])
  got = models.flat(restored)
  for i in range(dec.N):
    key = f'layers/{i}/mlp/kernel' if target_kind == 'unrolled' else 'layers/mlp/kernel'
    value = np.asarray(got[key]) if target_kind == 'unrolled' else np.asarray(got[key])[i]
    np.testing.assert_array_equal(value, np.take(src, i, axis=axis))
  # Reading whole stacks instead would touch N chunks per slice.
  assert reads == expected, reads
