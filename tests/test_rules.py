"""Mapping rules (rename, split, merge, transpose, reshape, cast), both directions, real models."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from orbax_linen_nnx import (
  LinenCompatRestore,
  LinenCompatSave,
  PlanError,
  drop,
  merge,
  plan,
  rearrange,
  rename,
  reshape,
  split,
  to_linen,
  transpose,
)
from gemma import D, F, GEMMA_RULES, H, K, LinenGemmaBlock, NnxGemmaBlock, expected_nnx, linen_gemma_state
from helpers import ChunkLoads, chunks_under, save


def sharded_nnx_abstract(mesh, make):
  state = nnx.state(nnx.eval_shape(make))
  return models.shard_abstract(state, mesh, 'two_axes')


def test_gemma_block_linen_to_nnx(tmp_path, mesh):
  linen, x = linen_gemma_state()
  save(tmp_path, linen)

  def make():
    m = NnxGemmaBlock(nnx.Rngs(0))
    return {'model': m, 'optimizer': nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)}

  abstract = sharded_nnx_abstract(mesh, make)
  mngr = ocp.CheckpointManager(tmp_path)
  p = mngr.restore(1, args=LinenCompatRestore(abstract, rules=GEMMA_RULES, dry_run=True))
  line = str(p.read_for('model/gate_proj/kernel'))
  assert "transpose (1, 0)" in line and "layer 0 of axis 0" in line and 'split(' in line, line

  restored = mngr.restore(1, args=LinenCompatRestore(abstract, rules=GEMMA_RULES))
  got = models.flat(restored)
  for path, want in expected_nnx(linen.params['params']).items():
    np.testing.assert_array_equal(np.asarray(got[f'model/{path}']), want, err_msg=path)
    # The optimizer's moments went through the same rules.
    mu_want = expected_nnx(linen.opt_state[0].mu['params'])[path]
    np.testing.assert_array_equal(np.asarray(got[f'optimizer/opt_state/0/mu/{path}']), mu_want, err_msg=path)
  models.assert_sharded_as(restored, abstract)

  ts = make()
  nnx.update(ts, restored)
  np.testing.assert_allclose(
    np.asarray(ts['model'](x)), np.asarray(linen.apply_fn(linen.params, x), np.float32), rtol=2e-2, atol=2e-2
  )  # Linen computes in bf16 here, NNX in float32
  # The same math on the same (upcast) weights, in Linen's and NNX's summation orders:
  # contractions over D (q), H*K (o), D (gate, up) and F (down).
  models.assert_reductions_close(
    ts['model'](x),
    LinenGemmaBlock().apply(jax.tree.map(lambda a: a.astype(jnp.float32), linen.params), x),
    terms=D + H * K + 2 * D + F,
  )


def test_gemma_block_nnx_to_linen_with_the_same_rules(tmp_path, mesh):
  model = NnxGemmaBlock(nnx.Rngs(3))
  save(tmp_path, nnx.state(model))
  abstract = jax.eval_shape(lambda: LinenGemmaBlock().init(jax.random.key(0), jnp.ones((1, D))))
  abstract = models.shard_abstract(abstract, mesh, 'one_axis')
  restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract, rules=GEMMA_RULES))
  got = {k: np.asarray(v) for k, v in models.flat(restored).items()}
  assert got['params/gating_einsum'].dtype == jnp.bfloat16
  src = {k: np.asarray(v) for k, v in models.flat(nnx.state(model)).items()}
  bf16 = lambda a: np.asarray(a).astype(jnp.bfloat16)
  np.testing.assert_array_equal(
    got['params/gating_einsum'], bf16(np.stack([src['gate_proj/kernel'].T, src['up_proj/kernel'].T]))
  )
  np.testing.assert_array_equal(got['params/q_einsum/kernel'], bf16(src['q/kernel'].reshape(D, H, K)))
  np.testing.assert_array_equal(got['params/linear'], bf16(src['down_proj/kernel']))
  models.assert_sharded_as(restored, abstract)
  # Round trip: Linen -> NNX again gives back the NNX values (up to bf16 rounding).
  want = expected_nnx(restored['params'])
  np.testing.assert_array_equal(want['gate_proj/kernel'], bf16(src['gate_proj/kernel']).astype(np.float32))


def test_merge_concat_and_its_inverse(tmp_path):
  rng = np.random.default_rng(0)
  linen = {'params': {'attn': {n: {'kernel': rng.normal(size=(D, 4)).astype(np.float32)} for n in 'qkv'}}}
  save(tmp_path / 'linen', linen)
  rules = [merge(['{b}/q/kernel', '{b}/k/kernel', '{b}/v/kernel'], '{b}/qkv/kernel', axis=1)]
  target = {'attn': {'qkv': {'kernel': jax.ShapeDtypeStruct((D, 12), np.float32)}}}
  restored = ocp.CheckpointManager(tmp_path / 'linen').restore(1, args=LinenCompatRestore(target, rules=rules))
  want = np.concatenate([linen['params']['attn'][n]['kernel'] for n in 'qkv'], axis=1)
  np.testing.assert_array_equal(np.asarray(restored['attn']['qkv']['kernel']), want)

  # Backwards: the fused NNX kernel splits into three equal parts.
  save(tmp_path / 'nnx', {'model': {'attn': {'qkv': {'kernel': {'value': want}}}}})
  linen_target = {'params': {'attn': {n: {'kernel': jax.ShapeDtypeStruct((D, 4), np.float32)} for n in 'qkv'}}}
  back = ocp.CheckpointManager(tmp_path / 'nnx').restore(1, args=LinenCompatRestore(linen_target, rules=rules))
  for n in 'qkv':
    np.testing.assert_array_equal(np.asarray(back['params']['attn'][n]['kernel']), linen['params']['attn'][n]['kernel'])


def test_split_with_sizes_and_stack_merge(tmp_path):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(D, 12)).astype(np.float32)
  save(tmp_path, {'params': {'fused': w}})
  target = {'a': jax.ShapeDtypeStruct((D, 4), np.float32), 'b': jax.ShapeDtypeStruct((D, 8), np.float32)}
  out = ocp.CheckpointManager(tmp_path).restore(
    1, args=LinenCompatRestore(target, rules=[split('fused', ['a', 'b'], axis=1, sizes=[4, 8])])
  )
  np.testing.assert_array_equal(np.asarray(out['a']), w[:, :4])
  np.testing.assert_array_equal(np.asarray(out['b']), w[:, 4:])

  save(tmp_path / 'two', {'params': {'a': w[:, :6], 'b': w[:, 6:]}})
  target = {'ab': jax.ShapeDtypeStruct((2, D, 6), np.float32)}
  out = ocp.CheckpointManager(tmp_path / 'two').restore(
    1, args=LinenCompatRestore(target, rules=[merge(['a', 'b'], 'ab', axis=0, stack=True)])
  )
  np.testing.assert_array_equal(np.asarray(out['ab']), np.stack([w[:, :6], w[:, 6:]]))


def test_regex_and_callable_renames(tmp_path):
  linen = models.linen_mlp_state(optax.adam(1e-2), variables_as_params=False)
  save(tmp_path, linen)
  abstract = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))
  mngr = ocp.CheckpointManager(tmp_path)
  by_regex = rename(re.compile(r'Dense_(\d+)'), lambda m: f'fc{int(m[1]) + 1}')
  by_fn = rename(lambda path: re.sub(r'^Dense_(\d+)', lambda m: f'fc{int(m[1]) + 1}', path))
  for rule in (by_regex, by_fn):
    restored = mngr.restore(1, args=LinenCompatRestore(abstract, rules=[rule]))
    models.assert_same(
      restored,
      models.flat(linen),
      {'model/fc1/kernel': 'params/Dense_0/kernel', 'optimizer/opt_state/0/nu/fc2/bias': 'opt_state/0/nu/Dense_1/bias'},
    )
  # Placeholders carry text across: Dense_0 -> fc_0 style names, and back.
  p = plan(
    tmp_path / '1',
    {'fc_0': {'kernel': jax.ShapeDtypeStruct((16, 32), np.float32)}},
    rules=[rename('Dense_{i}', 'fc_{i}')],
    partial=True,
  )
  assert p.read_for('fc_0/kernel').sources[0].name == 'params.Dense_0.kernel'


def test_one_way_rules_say_so_backwards(tmp_path):
  save(tmp_path, {'model': {'fc0': {'kernel': {'value': np.zeros((3, 4), np.float32)}}}})
  target = {'params': {'Dense_0': {'kernel': jax.ShapeDtypeStruct((3, 4), np.float32)}}}
  with pytest.raises(PlanError, match=r"rename\('Dense_\(\\\\d\+\)', 'fc\\\\1'\) has no inverse.*pass inverse="):
    plan(tmp_path / '1', target, rules=[rename(re.compile(r'Dense_(\d+)'), r'fc\1')])
  ok = plan(
    tmp_path / '1',
    target,
    rules=[rename(re.compile(r'Dense_(\d+)'), r'fc\1', inverse=rename(re.compile(r'fc(\d+)'), r'Dense_\1'))],
  )
  assert ok.read_for('params/Dense_0/kernel').sources[0].name == 'model.fc0.kernel.value'


def test_rule_errors_name_the_rule(tmp_path):
  w = np.zeros((2, F, D), np.float32)
  save(tmp_path, {'params': {'gating_einsum': w, 'q': np.zeros((D, H, K), np.float32)}})
  target = {
    'gate': jax.ShapeDtypeStruct((F, D), np.float32),
    'up': jax.ShapeDtypeStruct((F, D), np.float32),
    'q': jax.ShapeDtypeStruct((D, H * K), np.float32),
  }
  ok = [split('gating_einsum', ['gate', 'up'], axis=0), reshape('q', (D, H, K), (D, H * K))]
  assert len(plan(tmp_path / '1', target, rules=ok).reads) == 3

  with pytest.raises(PlanError, match=r"rule 'transpose\('nothing', \(1, 0\)\)' matched no source leaf"):
    plan(tmp_path / '1', target, rules=ok + [transpose('nothing', (1, 0))])
  with pytest.raises(
    PlanError,
    match=r"split\('gating_einsum', \['gate', 'up'\], axis=0, sizes=\[1, 2\]\): parts \[1, 2\] do not add up to 'gating_einsum' \(2, 16, 8\) axis 0 \(2\)",
  ):
    plan(tmp_path / '1', target, rules=[split('gating_einsum', ['gate', 'up'], axis=0, sizes=[1, 2]), ok[1]])
  with pytest.raises(
    PlanError,
    match=r"reshape\('q', \(8, 2, 4\), \(8, 9\)\): \(8, 2, 4\) and \(8, 9\) hold different numbers of elements",
  ):
    plan(tmp_path / '1', target, rules=[ok[0], reshape('q', (D, H, K), (D, 9))])
  with pytest.raises(PlanError, match=r"makes 'up', which split\(.*\) already made: two rules claim one target"):
    plan(tmp_path / '1', target, rules=ok + [rename('q', 'up')])


def test_rules_combined_with_layer_stacking(tmp_path, mesh):
  """Per-layer fused Linen weights -> split, transposed and stacked into one NNX tensor per projection."""
  rng = np.random.default_rng(2)
  n = 4
  params = {f'layers_{i}': {'mlp': {'gating_einsum': rng.normal(size=(2, F, D)).astype(np.float32)}} for i in range(n)}
  save(tmp_path, {'params': params})
  sharding = NamedSharding(mesh, P('data', None, 'model'))
  target = {
    'layers': {
      'mlp': {
        name: {'kernel': jax.ShapeDtypeStruct((n, D, F), np.float32, sharding=sharding)}
        for name in ('gate_proj', 'up_proj')
      }
    }
  }
  # `{b...}` spans 'layers_0/mlp'; `{p}` is one segment's text.
  rules = [
    split('{b...}/gating_einsum', ['{b...}/gate_proj/kernel', '{b...}/up_proj/kernel'], axis=0),
    transpose('{b...}/{p}_proj/kernel', (1, 0)),
  ]
  p = plan(tmp_path / '1', target, rules=rules)
  assert str(p.read_for('layers/mlp/up_proj/kernel').transform[0]) == 'stack axis 0'
  restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(target, rules=rules))
  want = np.stack([params[f'layers_{i}']['mlp']['gating_einsum'][1].T for i in range(n)])
  np.testing.assert_array_equal(np.asarray(restored['layers']['mlp']['up_proj']['kernel']), want)
  assert restored['layers']['mlp']['up_proj']['kernel'].sharding == sharding

  # And back: NNX unrolled blocks -> Linen loop, with the same rules inverted.
  nnx_tree = {
    'model': {
      'layers': {
        str(i): {
          'mlp': {
            'gate_proj': {'kernel': {'value': params[f'layers_{i}']['mlp']['gating_einsum'][0].T}},
            'up_proj': {'kernel': {'value': params[f'layers_{i}']['mlp']['gating_einsum'][1].T}},
          }
        }
        for i in range(n)
      }
    }
  }
  save(tmp_path / 'nnx', nnx_tree)
  linen_target = {
    'params': {f'layers_{i}': {'mlp': {'gating_einsum': jax.ShapeDtypeStruct((2, F, D), np.float32)}} for i in range(n)}
  }
  back = ocp.CheckpointManager(tmp_path / 'nnx').restore(1, args=LinenCompatRestore(linen_target, rules=rules))
  for i in range(n):
    np.testing.assert_array_equal(
      np.asarray(back['params'][f'layers_{i}']['mlp']['gating_einsum']), params[f'layers_{i}']['mlp']['gating_einsum']
    )


def test_split_and_transpose_read_only_what_each_shard_needs(tmp_path, mesh):
  """gating_einsum (2, F, D) stored in chunks along F; gate_proj (D, F) sharded along F reads only its half and rows."""
  w = np.random.default_rng(3).normal(size=(2, 64, D)).astype(np.float32)
  stored = jax.device_put(w, NamedSharding(mesh, P(None, 'data')))
  save(tmp_path, {'params': {'gating_einsum': stored}})
  meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / '1' / 'default').tree
  chunk = tuple(meta['params']['gating_einsum'].storage.chunk_shape)
  assert chunk[0] == 2 or chunk[0] == 1
  sharding = NamedSharding(mesh, P(None, 'data'))
  target = {'gate_proj': {'kernel': jax.ShapeDtypeStruct((D, 64), np.float32, sharding=sharding)}}
  rules = [split('gating_einsum', ['gate_proj/kernel', 'up_proj/kernel'], axis=0), transpose('{p}_proj/kernel', (1, 0))]

  slices = {idx[1].indices(64)[:2] for idx in sharding.addressable_devices_indices_map((D, 64)).values()}
  # gate_proj[:, f0:f1] = gating_einsum[0, f0:f1, :]
  expected = chunks_under([(slice(0, 1), slice(*f), slice(None)) for f in slices], w.shape, chunk)
  with ChunkLoads(tmp_path / '1' / 'default') as loads:
    restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(target, rules=rules, partial=True))
  reads = loads.count
  np.testing.assert_array_equal(np.asarray(restored['gate_proj']['kernel']), w[0].T)
  assert restored['gate_proj']['kernel'].sharding == sharding
  print(
    f'{len(slices)} slices, {reads} chunk reads, expected {expected}; whole array {np.prod([-(-a // c) for a, c in zip(w.shape, chunk)])} chunks'
  )
  assert reads == expected


def test_reshape_reads_only_the_rows_a_shard_covers(tmp_path, mesh):
  """(D, H, K) -> (D, H*K), target sharded on D: each slice reads its own rows of the source."""
  w = np.random.default_rng(4).normal(size=(D, H, K)).astype(np.float32)
  save(tmp_path, {'params': {'q': jax.device_put(w, NamedSharding(mesh, P('data')))}})
  chunk = tuple(
    ocp.PyTreeCheckpointHandler().metadata(tmp_path / '1' / 'default').tree['params']['q'].storage.chunk_shape
  )
  sharding = NamedSharding(mesh, P('data', 'model'))
  target = {'q': jax.ShapeDtypeStruct((D, H * K), np.float32, sharding=sharding)}
  with ChunkLoads(tmp_path / '1' / 'default') as loads:
    out = ocp.CheckpointManager(tmp_path).restore(
      1, args=LinenCompatRestore(target, rules=[reshape('q', (D, H, K), (D, H * K))])
    )
  reads = loads.count
  np.testing.assert_array_equal(np.asarray(out['q']), w.reshape(D, H * K))
  assert out['q'].sharding == sharding
  # (D/4 rows, H*K/2 cols) per slice: rows come from the slice's own D range; the H*K/2
  # columns are whole H rows here, so the slices read only the chunks under (rows, h-range),
  # each chunk once although the two column halves of a row range share it.
  regions = []
  for idx in sharding.addressable_devices_indices_map((D, H * K)).values():
    r, c = idx[0].indices(D)[:2], idx[1].indices(H * K)[:2]
    regions.append((slice(*r), slice(c[0] // K, (c[1] - 1) // K + 1), slice(None)))
  expected = chunks_under(regions, w.shape, chunk)
  assert reads == expected, (reads, expected)


class LinenWithVision(nn.Module):
  """A multimodal Linen model: the MLP, plus a vision tower a text-only port has no place for."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(models.D_HID)(x))  # Dense_0
    x = nn.Dense(models.D_OUT)(x)  # Dense_1
    v = nn.Dense(4, name='SigLiPFromPatches_0')(x)
    return x + nn.Dense(models.D_OUT, name='vision_proj')(v)


def test_drop_leaves_out_sources_and_keeps_targets_strict(tmp_path, mesh):
  model = LinenWithVision()
  variables = model.init(jax.random.key(0), jnp.ones((1, models.D_IN)))
  linen = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=optax.adam(1e-2))
  save(tmp_path, linen)
  abstract = models.shard_abstract(
    nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2)))), mesh, 'two_axes'
  )
  rules = [rename(models.MLP_RULES), drop('SigLiPFromPatches_0'), drop('vision_proj')]
  p = plan(tmp_path / '1', abstract, rules=rules)
  dropped = sorted(s.name for s, _ in p.dropped)
  assert len(dropped) == 12 and all('SigLiPFromPatches_0' in n or 'vision_proj' in n for n in dropped), dropped
  assert "  dropped params.params.SigLiPFromPatches_0.kernel (8, 4) float32 (by drop('SigLiPFromPatches_0'))" in str(
    p
  ), str(p)
  assert p.unused == () and str(p).splitlines()[0].endswith(', 12 dropped by rules')
  restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract, rules=rules))
  models.assert_same(
    restored,
    models.flat(linen),
    {
      'model/fc1/kernel': 'params/params/Dense_0/kernel',
      'optimizer/opt_state/0/mu/fc2/bias': 'opt_state/0/mu/params/Dense_1/bias',
    },
  )
  models.assert_sharded_as(restored, abstract)

  # Strict stays strict: a target with no source is an error, dropped sources or not.
  bigger = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLPWithDropout, optax.adam(1e-2))))
  bigger['model']['extra'] = nnx.Param(jax.ShapeDtypeStruct((3,), np.float32))
  with pytest.raises(PlanError, match=r"target 'model/extra' \(3,\) float32 has no source"):
    plan(tmp_path / '1', bigger, rules=rules)
  # A drop that matches nothing is a typo, said as for any rule.
  with pytest.raises(PlanError, match=r"rule 'drop\('SigLip'\)' matched no source leaf"):
    plan(tmp_path / '1', abstract, rules=rules + [drop('SigLip')])


def test_placeholders_one_segment_or_many_and_the_most_specific_entry_wins():
  from orbax_linen_nnx.planner import build
  from helpers import src, tgt

  # `{n}` is one segment: 'query/kernel' is not one name, so the kernel keeps its own level.
  sources = [src('blk/MultiHeadDotProductAttention_0/query/kernel'), src('blk/MultiHeadDotProductAttention_0/key/bias')]
  targets = [tgt('blk/attn/query_proj/kernel'), tgt('blk/attn/key_proj/bias')]
  p = build(
    sources,
    targets,
    source_layout='linen',
    target_layout='nnx',
    rules=[rename('{b}/MultiHeadDotProductAttention_0/{n}', '{b}/attn/{n}_proj')],
  )
  assert p.read_for('blk/attn/query_proj/kernel').sources[0].name == 'blk.MultiHeadDotProductAttention_0.query.kernel'

  # `{path...}` spans segments; the entry with the longer literal head wins over it.
  p = build(
    [src('Dense_0/kernel'), src('enc/blocks/w/kernel')],
    [tgt('fc1/kernel'), tgt('enc/blocks/w/weight')],
    source_layout='linen',
    target_layout='nnx',
    rules=[rename({'Dense_0': 'fc1', '{path...}/kernel': '{path...}/weight'})],
  )
  assert p.read_for('enc/blocks/w/weight').sources[0].name == 'enc.blocks.w.kernel'
  assert p.read_for('fc1/kernel').sources[0].name == 'Dense_0.kernel'

  # Two placeholder entries, one longer: the longer one takes its paths, the other the rest; and back.
  rules = [rename({'blocks_{i}': 'layers/{i}', 'blocks_{i}/mlp': 'layers/{i}/ffn'})]
  sources = [src('blocks_0/mlp/kernel'), src('blocks_0/attn/kernel'), src('blocks_1/mlp/kernel')]
  targets = [tgt('layers/0/ffn/kernel'), tgt('layers/0/attn/kernel'), tgt('layers/1/ffn/kernel')]
  p = build(sources, targets, source_layout='linen', target_layout='nnx', rules=rules)
  assert [r.sources[0].name for r in p.reads] == ['blocks_0.mlp.kernel', 'blocks_0.attn.kernel', 'blocks_1.mlp.kernel']
  back = build(
    [src('layers/0/ffn/kernel'), src('layers/0/attn/kernel')],
    [tgt('blocks_0/mlp/kernel'), tgt('blocks_0/attn/kernel')],
    source_layout='nnx',
    target_layout='linen',
    rules=rules,
  )
  assert [r.sources[0].name for r in back.reads] == ['layers.0.ffn.kernel', 'layers.0.attn.kernel']


class LinenNormed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.relu(nn.Dense(models.D_HID)(x)))  # Dense_0, LayerNorm_0
    return nn.LayerNorm()(nn.Dense(models.D_OUT)(x))  # Dense_1, LayerNorm_1


class NnxNormed(nnx.Module):
  """Counts from 1 where Linen counts from 0."""

  def __init__(self, rngs):
    self.layers_1 = nnx.Linear(models.D_IN, models.D_HID, rngs=rngs)
    self.ln1 = nnx.LayerNorm(models.D_HID, rngs=rngs)
    self.layers_2 = nnx.Linear(models.D_HID, models.D_OUT, rngs=rngs)
    self.ln2 = nnx.LayerNorm(models.D_OUT, rngs=rngs)


def test_index_arithmetic_is_written_once_and_inverts(tmp_path, mesh):
  model = LinenNormed()
  linen = train_state.TrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(0), jnp.ones((1, models.D_IN))), tx=optax.adam(1e-2)
  )
  save(tmp_path / 'linen', linen)
  rules = {'Dense_{i}': 'layers_{i+1}', 'LayerNorm_{j}': 'ln{j+1}'}
  make = lambda: models.nnx_train_state(NnxNormed, optax.adam(1e-2))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make)), mesh, 'two_axes')
  restored = ocp.CheckpointManager(tmp_path / 'linen').restore(1, args=LinenCompatRestore(abstract, rules=rules))
  models.assert_same(
    restored,
    models.flat(linen),
    {
      'model/layers_1/kernel': 'params/params/Dense_0/kernel',
      'model/ln2/scale': 'params/params/LayerNorm_1/scale',
      'optimizer/opt_state/0/nu/layers_2/bias': 'opt_state/0/nu/params/Dense_1/bias',
    },
  )
  # The same rules, inverted: the NNX state saved back is the Linen checkpoint.
  state = make()
  nnx.update(state, restored)
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    mngr.save(1, args=LinenCompatSave(state, rules=rules))
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    back = mngr.restore(1, args=LinenCompatRestore())
  assert int(back.pop('step')) == linen.step  # never stepped: a Python int there, int32 here
  models.assert_all_equal(back, {'params': linen.params, 'opt_state': linen.opt_state})


def test_a_wrong_rule_shows_next_to_the_target_it_missed(tmp_path):
  """The issue's trap, made visible: `{n}` written for a name that spans two segments."""
  tree = {
    'params': {
      'blk': {
        'MultiHeadDotProductAttention_0': {
          'query': {'kernel': np.ones((4, 4), np.float32)},
          'key': {'kernel': np.ones((4, 4), np.float32)},
        }
      }
    }
  }
  save(tmp_path, tree)
  target = {
    'blk': {
      'attn': {
        'query_proj': {'kernel': jax.ShapeDtypeStruct((4, 4), np.float32)},
        'key_proj': {'kernel': jax.ShapeDtypeStruct((4, 4), np.float32)},
      }
    }
  }
  wrong = [rename('{b}/MultiHeadDotProductAttention_0/{n...}', '{b}/attn/{n...}_proj')]
  with pytest.raises(PlanError) as e:
    plan(tmp_path / '1', target, rules=wrong)
  assert (
    "target 'blk/attn/query_proj/kernel' (4, 4) float32 has no source (looked for"
    " 'model/blk/attn/query_proj/kernel'); closest sources after the rules:"
    " 'model/blk/attn/query/kernel_proj' (made by rename {b}/MultiHeadDotProductAttention_0/{n...})"
  ) in str(e.value)
  # Written right, the plan lists what each rule matched.
  right = [rename('{b}/MultiHeadDotProductAttention_0/{n}', '{b}/attn/{n}_proj')]
  p = plan(tmp_path / '1', target, rules=right)
  assert (
    '  rule    {b}/MultiHeadDotProductAttention_0/{n} matched blk/MultiHeadDotProductAttention_0/key/kernel,'
    ' blk/MultiHeadDotProductAttention_0/query/kernel'
  ) in str(p), str(p)


def test_rearrange_patterns_serve_leaves_of_any_size_both_ways(tmp_path):
  """Grouped-query attention: q has 4 heads, k 2; one pattern (with the head size) serves both, and back."""
  D, K, Hq, Hk, F = 8, 4, 4, 2, 16
  rng = np.random.default_rng(0)
  linen = {
    'params': {
      'blk': {
        'q_einsum': {'kernel': rng.normal(size=(D, Hq, K)).astype(np.float32)},
        'k_einsum': {'kernel': rng.normal(size=(D, Hk, K)).astype(np.float32)},
        'out': {'kernel': rng.normal(size=(Hq, K, D)).astype(np.float32)},
        'gate': {'kernel': rng.normal(size=(F, D)).astype(np.float32)},
      }
    }
  }
  save(tmp_path / 'linen', linen)
  rules = [
    rearrange('{b}/{n}_einsum/kernel', 'd h k -> d (h k)', k=K),
    rename('{b}/{n}_einsum', '{b}/{n}_proj'),
    rearrange('{b}/out/kernel', 'h k d -> (h k) d', k=K),
    rearrange('{b}/gate/kernel', 'f d -> d f'),
  ]
  sds = lambda *shape: {'kernel': jax.ShapeDtypeStruct(shape, np.float32)}
  target = {'blk': {'q_proj': sds(D, Hq * K), 'k_proj': sds(D, Hk * K), 'out': sds(Hq * K, D), 'gate': sds(D, F)}}
  ported = ocp.CheckpointManager(tmp_path / 'linen').restore(1, args=LinenCompatRestore(target, rules=rules))
  p = linen['params']['blk']
  want = {
    'blk': {
      'q_proj': {'kernel': p['q_einsum']['kernel'].reshape(D, Hq * K)},
      'k_proj': {'kernel': p['k_einsum']['kernel'].reshape(D, Hk * K)},
      'out': {'kernel': p['out']['kernel'].reshape(Hq * K, D)},
      'gate': {'kernel': p['gate']['kernel'].T},
    }
  }
  models.assert_all_equal(ported, want)
  # The way back: the same rules, inverted, give the Linen tree (shapes and bits).
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    mngr.save(1, args=LinenCompatSave(ported, rules=rules))
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    models.assert_all_equal(mngr.restore(1, args=LinenCompatRestore()), linen)
  # A pattern that cannot fit a leaf says so with the leaf's shape.
  with pytest.raises(
    PlanError,
    match=r"rearrange\('\{b\}/\{n\}_einsum/kernel', 'd h -> h d'\): 'blk/q_einsum/kernel'"
    r" \(8, 4, 4\) has 3 axes, the pattern's left side 2",
  ):
    plan(tmp_path / 'linen' / '1', target, rules=[rearrange('{b}/{n}_einsum/kernel', 'd h -> h d')] + rules[1:])
  # Without the head size, a save cannot tell it (it has no target): said, with the fix.
  unsized = [
    rearrange('{b}/{n}_einsum/kernel', 'd h k -> d (h k)'),
    rules[1],
    rearrange('{b}/out/kernel', 'h k d -> (h k) d'),
    rules[3],
  ]
  with pytest.raises(PlanError, match=r"leaves h and k in \(h k\) = 16 open; give all but one of them as sizes"):
    to_linen(ported, rules=unsized, dry_run=True)
  # A restore has one: the Linen tree it restores into binds h and k, leaf by leaf.
  save(tmp_path / 'nnx', ported)
  linen_abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), linen)
  back = ocp.CheckpointManager(tmp_path / 'nnx').restore(
    1, args=LinenCompatRestore(linen_abstract, rules=unsized, source_layout='nnx')
  )
  models.assert_all_equal(back, linen)
  # A target the pattern cannot make is reported with both shapes.
  linen_abstract['params']['blk']['q_einsum']['kernel'] = jax.ShapeDtypeStruct((D, 3, 5), np.float32)
  with pytest.raises(
    PlanError, match=re.escape("'blk/q_einsum/kernel' (8, 16) cannot become the target's (8, 3, 5): (h k) cannot be 16")
  ):
    plan(tmp_path / 'nnx' / '1', linen_abstract, rules=unsized, source_layout='nnx')


def test_rules_written_for_one_layer_apply_to_declared_stacks(tmp_path, mesh):
  """Linen nn.scan (layer axis 1) with a fused gating kernel -> an NNX vmap stack, split and transposed by
  rules written for one layer; and back. Each device slice reads only the chunks under it."""
  rng = np.random.default_rng(5)
  n = 4
  fused = rng.normal(size=(2, n, F, D)).astype(np.float32)  # nn.scan: per-layer (2, F, D), layer axis 1
  q = rng.normal(size=(D, n, H, K)).astype(np.float32)  # per-layer (D, H, K)
  save(tmp_path / 'scan', {'params': {'layers': {'mlp': {'gating_einsum': fused}, 'q': {'kernel': q}}}})
  sharding = NamedSharding(mesh, P('data', None, 'model'))
  sds = lambda shape: {'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)}
  target = {'layers': {'mlp': {'gate_proj': sds((n, D, F)), 'up_proj': sds((n, D, F))}, 'q': sds((n, D, H * K))}}
  rules = [
    split('{b...}/gating_einsum', ['{b...}/gate_proj/kernel', '{b...}/up_proj/kernel'], axis=0),
    transpose('{b...}/{p}_proj/kernel', (1, 0)),
    rearrange('{b...}/q/kernel', 'd h k -> d (h k)', k=K),
  ]
  stacks = {'layers': {'linen': 1, 'nnx': 0}}
  with ChunkLoads(tmp_path / 'scan' / '1' / 'default') as loads:
    restored = ocp.CheckpointManager(tmp_path / 'scan').restore(
      1, args=LinenCompatRestore(target, rules=rules, stacks=stacks, target_layout='nnx')
    )
  want = {
    'layers': {
      'mlp': {'gate_proj': {'kernel': fused[0].transpose(0, 2, 1)}, 'up_proj': {'kernel': fused[1].transpose(0, 2, 1)}},
      'q': {'kernel': np.moveaxis(q, 1, 0).reshape(n, D, H * K)},
    }
  }
  models.assert_all_equal(restored, want)
  assert restored['layers']['mlp']['up_proj']['kernel'].sharding == sharding
  stored_chunks = 2  # each array saved from host: one chunk each, decoded once for every slice that needs it
  assert loads.count == stored_chunks, loads.count

  # And back: the NNX stack written as Linen's nn.scan tree by the same rules, inverted.
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    mngr.save(1, args=LinenCompatSave(restored, rules=rules, stacks=stacks))
  with ocp.CheckpointManager(tmp_path / 'back') as mngr:
    models.assert_all_equal(
      mngr.restore(1, args=LinenCompatRestore()),
      {'params': {'layers': {'mlp': {'gating_einsum': fused}, 'q': {'kernel': q}}}},
    )
  # Restoring the NNX stack into Linen's tree: the target's one layer (D, H, K) binds the head sizes.
  save(tmp_path / 'nnx', restored)
  scan_tree = {'params': {'layers': {'mlp': {'gating_einsum': fused}, 'q': {'kernel': q}}}}
  unsized = rules[:2] + [rearrange('{b...}/q/kernel', 'd h k -> d (h k)')]
  back = ocp.CheckpointManager(tmp_path / 'nnx').restore(
    1,
    args=LinenCompatRestore(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), scan_tree),
      rules=unsized,
      stacks=stacks,
      source_layout='nnx',
    ),
  )
  models.assert_all_equal(back, scan_tree)
  # Without stacks=, the source's shapes tell the layer axis (1 is the only axis of one size in every array
  # under 'layers'): the planner infers it, says so, and reads the same values.
  p = plan(tmp_path / 'scan' / '1' / 'default', target, rules=rules, target_layout='nnx')
  assert "note    layer axis 1 of source stack 'layers' inferred from its shapes: rules see one layer" in str(p)
  models.assert_all_equal(
    ocp.CheckpointManager(tmp_path / 'scan').restore(
      1, args=LinenCompatRestore(target, rules=rules, target_layout='nnx')
    ),
    want,
  )
