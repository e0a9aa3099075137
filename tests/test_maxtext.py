"""MaxText pure_nnx checkpoints (Linen layout + nnx_aux) resume exactly, RNG streams included."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import maxtext as mt
import models
import orbax_linen_nnx
from orbax_linen_nnx import LinenCompatRestore, PlanError


def abstract_state(mesh, seed: int = 0, **kw):
  abstract = nnx.state(nnx.eval_shape(lambda: mt.train_state(seed, **kw)))
  return models.shard_abstract(abstract, mesh, 'two_axes')


def trained(abstract, steps: int = 2):
  """A run trained `steps` steps with its state sharded as `abstract` asks."""
  state = mt.train_state(0)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  nnx.update(state, jax.device_put(nnx.state(state), shardings))
  for s in range(steps):
    mt.train_step(state, *mt.batch(s))
  return state


def assert_resumes(state, restored, abstract):
  """`restored` holds `state` bit for bit, sharded as asked, and trains on exactly as `state` does."""
  models.assert_all_equal(restored, nnx.state(state))
  models.assert_sharded_as(restored, abstract)
  key = restored['model']['drop']['rngs']['key'].get_raw_value()
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  assert str(jax.random.key_impl(key)) == 'threefry2x32'

  resumed = mt.train_state(seed=7)  # another init: everything must come from the checkpoint
  nnx.update(resumed, restored)
  # The same program on the same shardings and inputs: the same bits (dropout
  # masks from the restored stream, batch stats, Adam moments, the schedule's count).
  loss_on = mt.train_step(state, *mt.batch(2))
  loss_resumed = mt.train_step(resumed, *mt.batch(2))
  assert float(loss_resumed) == float(loss_on)
  models.assert_all_equal(nnx.state(resumed), nnx.state(state))


def test_restore_through_maxtexts_item_handlers_manager(tmp_path, mesh):
  """MaxText's manager (item_handlers) takes no other handler for 'items': `restore` reads its step."""
  abstract = abstract_state(mesh)
  state = trained(abstract)
  mt.save(mt.manager(tmp_path), 2, state)

  mngr = mt.manager(tmp_path)
  with pytest.raises(ValueError, match='does not match with any registered handler'):
    mngr.restore(2, args=ocp.args.Composite(items=LinenCompatRestore(abstract)))
  restored = orbax_linen_nnx.restore(mngr, abstract, step=2, item='items')
  assert_resumes(state, restored, abstract)
  assert orbax_linen_nnx.restore(mngr, abstract, item='items').keys() == restored.keys()  # latest step


def test_restore_through_maxtexts_handler_registry_manager(tmp_path, mesh):
  """The same manager configured by a handler registry: the same refusal, the same call."""
  abstract = abstract_state(mesh)
  state = trained(abstract)
  mt.save(mt.manager(tmp_path, registry=True), 2, state)
  mngr = mt.manager(tmp_path, registry=True)
  with pytest.raises(ValueError, match='does not match with any registered handler'):
    mngr.restore(2, args=ocp.args.Composite(items=LinenCompatRestore(abstract)))
  assert_resumes(state, orbax_linen_nnx.restore(mngr, abstract, step=2, item='items'), abstract)


def test_plan_reads_nnx_aux_into_its_variables(tmp_path, mesh):
  abstract = abstract_state(mesh)
  mt.save(mt.manager(tmp_path), 2, trained(abstract))
  plan = orbax_linen_nnx.plan(tmp_path / '2' / 'items', abstract)
  assert not plan.kept and not plan.unused
  key = plan.read_for('model/drop/rngs/key')
  assert [s.name for s in key.sources] == ['nnx_aux.model.drop.rngs.key']
  assert key.sources[0].key_impl == 'threefry2x32' and key.target.key_impl == 'threefry2x32'
  assert [s.name for s in plan.read_for('model/bn/mean').sources] == ['nnx_aux.model.bn.mean']
  assert [s.name for s in plan.read_for('model/routing').sources] == ['nnx_aux.model.routing']
  assert [s.name for s in plan.read_for('optimizer/step').sources] == ['step']
  assert 'threefry2x32 key data' in str(plan)


def test_a_linen_run_without_nnx_aux_keeps_the_targets_rng_and_says_so(tmp_path, mesh):
  abstract = abstract_state(mesh)
  items = mt.to_items(nnx.state(trained(abstract)))
  del items['nnx_aux']
  with ocp.CheckpointManager(tmp_path, item_names=('items',)) as m:
    m.save(2, args=ocp.args.Composite(items=ocp.args.PyTreeSave(items)))
  plan = orbax_linen_nnx.plan(tmp_path / '2' / 'items', abstract, partial=True)
  kept = {'/'.join(t.path) for t in plan.kept}
  assert {'model/drop/rngs/key', 'model/drop/rngs/count'} <= kept
  assert 'NNX-only state' in str(plan)
  with pytest.raises(
    PlanError, match=r"target module 'bn' has no source: mean \(32,\), var \(32,\)"
  ):  # no NNX-only state
    orbax_linen_nnx.plan(tmp_path / '2' / 'items', abstract)


def test_another_key_implementation_is_an_error_naming_both(tmp_path, mesh):
  mt.save(mt.manager(tmp_path), 2, trained(abstract_state(mesh)))

  def rbg_state():
    model = mt.Net(nnx.Rngs(jax.random.key(0, impl='rbg'), dropout=jax.random.key(1, impl='rbg')))
    return {'model': model, 'optimizer': nnx.Optimizer(model, mt.optax.adamw(mt.schedule()), wrt=nnx.Param)}

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(rbg_state)), mesh, 'two_axes')
  with pytest.raises(PlanError) as e:
    orbax_linen_nnx.restore(mt.manager(tmp_path), abstract, item='items')
  msg = str(e.value)
  assert "target 'model/drop/rngs/key'" in msg and 'rbg' in msg and 'threefry2x32' in msg


def test_nnx_checkpoint_rng_keys_restore_as_typed_keys(tmp_path, mesh):
  """NNX -> NNX: the keys Orbax stored as key data come back as keys of their implementation."""
  abstract = abstract_state(mesh)
  state = trained(abstract)
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(2, args=ocp.args.StandardSave(nnx.state(state)))
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))
  assert_resumes(state, restored, abstract)


def test_published_bare_directory_restores_with_one_call(tmp_path, mesh):
  """A checkpoint published as a bare PyTree directory (no manager, no step)."""
  abstract = abstract_state(mesh)
  state = trained(abstract)
  ocp.PyTreeCheckpointer().save(tmp_path / 'published', mt.to_items(nnx.state(state)))
  restored = orbax_linen_nnx.restore(tmp_path / 'published', abstract)
  assert_resumes(state, restored, abstract)


# MaxText's offline converter writes the NNX layout but leaves Adam's moments
# with Linen's per-layer names (`layers_3` under params `layers/3`), or per
# layer under params stacked at axis 1; `step` stays int32 and nothing under
# `optimizer` is wrapped in {'value': ...}.


def _per_layer_names(tree):
  """{'layers': {0: a, 1: b}} -> {'layers_0': a, 'layers_1': b}, wherever it occurs."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v and all(str(i).isdigit() for i in v):
      out.update({f'{k}_{i}': _per_layer_names(x) for i, x in v.items()})
    else:
      out[k] = _per_layer_names(v)
  return out


def _unstack_layers(tree, axis: int, n: int):
  """Every array under a 'layers' key cut into n per-layer arrays named layers_i."""
  out = {}
  for k, v in tree.items():
    if k == 'layers':
      out.update(
        {f'layers_{i}': jax.tree.map(lambda a, i=i: np.take(np.asarray(a), i, axis=axis), v) for i in range(n)}
      )
    else:
      out[k] = _unstack_layers(v, axis, n) if isinstance(v, dict) else v
  return out


def converter_output(state, *, stacked: bool):
  import decoders as dec

  pure = nnx.state(state).to_pure_dict()
  model = pure['model']
  if stacked:  # MaxText's param_scan_axis: the layer axis at 1
    model = dict(model, layers=jax.tree.map(lambda a: np.moveaxis(np.asarray(a), 0, 1), model['layers']))
  opt = dict(pure['optimizer']['opt_state'][0])
  for m in ('mu', 'nu'):
    opt[m] = _unstack_layers(opt[m], 0, dec.N) if stacked else _per_layer_names(opt[m])
  return {
    'model': jax.tree.map(lambda a: {'value': a}, model),
    'optimizer': {'opt_state': {'0': opt}, 'step': np.asarray(pure['optimizer']['step'], np.int32)},
  }


@pytest.mark.parametrize('stacked', [False, True], ids=['unrolled', 'stacked_axis1'])
def test_converter_output_with_linen_named_moments(tmp_path, mesh, stacked):
  import decoders as dec

  make = dec.NnxStackedDecoder if stacked else dec.NnxUnrolledDecoder
  state = dec.nnx_state(make)
  for _ in range(2):
    dec.nnx_step(state['model'], state['optimizer'])
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(2, args=ocp.args.StandardSave(converter_output(state, stacked=stacked)))

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: dec.nnx_state(make))), mesh, 'one_axis')
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))
  models.assert_all_equal(restored, nnx.state(state))
  models.assert_sharded_as(restored, abstract)


# MaxText's scanned decoders stack params at `param_scan_axis` (1) but the
# non-param state under the same stack root (batch stats, RNG streams) at 0.

N_SCAN, D_SCAN = 4, 8


class BnBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.mlp = nnx.Linear(D_SCAN, D_SCAN, rngs=rngs)
    self.bn = nnx.BatchNorm(D_SCAN, rngs=rngs)


class ScannedNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=N_SCAN)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return BnBlock(rngs)

    self.layers = blocks(rngs)


class UnrolledNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([BnBlock(rngs) for _ in range(N_SCAN)])


def _scan_state(make):
  model = make(nnx.Rngs(3))
  return {'model': model, 'optimizer': nnx.Optimizer(model, mt.optax.adam(1e-2), wrt=nnx.Param)}


def maxtext_scanned_items(rng):
  """What a MaxText pure_nnx run with scan_layers writes: params (and moments) at axis 1, batch stats at 0."""
  pure = nnx.state(_scan_state(ScannedNet)).to_pure_dict()
  fill = lambda a: (
    np.asarray(rng.normal(size=a.shape), a.dtype) if np.issubdtype(a.dtype, np.floating) else np.asarray(a)
  )
  pure = jax.tree.map(fill, pure)
  to_axis1 = lambda tree: jax.tree.map(lambda a: np.moveaxis(a, 0, 1), tree)
  layers = pure['model']['layers']
  params = {'mlp': layers['mlp'], 'bn': {k: layers['bn'][k] for k in ('scale', 'bias')}}
  opt = pure['optimizer']['opt_state'][0]
  return {
    'params': {'params': {'layers': to_axis1(params)}},
    'opt_state': [
      {'count': opt['count'], 'mu': {'params': to_axis1(opt['mu'])}, 'nu': {'params': to_axis1(opt['nu'])}}
    ],
    'step': np.asarray(pure['optimizer']['step'], np.int32),
    'nnx_aux': {'model': {'layers': {'bn': {k: layers['bn'][k] for k in ('mean', 'var')}}}},
  }


@pytest.mark.parametrize('target', ['vmap_stack', 'unrolled'])
def test_maxtext_scan_layout_params_at_axis_1_state_at_axis_0(tmp_path, mesh, target):
  items = maxtext_scanned_items(np.random.default_rng(0))
  with ocp.CheckpointManager(tmp_path, item_names=('items',)) as m:
    m.save(2, args=ocp.args.Composite(items=ocp.args.PyTreeSave(items)))

  make = ScannedNet if target == 'vmap_stack' else UnrolledNet
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: _scan_state(make))), mesh, 'one_axis')
  restored = orbax_linen_nnx.restore(tmp_path, abstract, step=2)
  got = models.flat(restored)
  p = items['params']['params']['layers']
  aux = items['nnx_aux']['model']['layers']
  mu = items['opt_state'][0]['mu']['params']['layers']
  for i in range(N_SCAN):
    at = (lambda name: f'model/layers/{name}') if target == 'vmap_stack' else (lambda name: f'model/layers/{i}/{name}')
    pick = lambda a, axis: np.take(a, i, axis=axis)
    layer = (lambda a: a[i]) if target == 'vmap_stack' else (lambda a: a)
    np.testing.assert_array_equal(layer(np.asarray(got[at('mlp/kernel')])), pick(p['mlp']['kernel'], 1))
    np.testing.assert_array_equal(layer(np.asarray(got[at('bn/scale')])), pick(p['bn']['scale'], 1))
    np.testing.assert_array_equal(layer(np.asarray(got[at('bn/mean')])), pick(aux['bn']['mean'], 0))
    np.testing.assert_array_equal(
      layer(np.asarray(got['optimizer/opt_state/0/mu/' + at('mlp/bias')[6:]])), pick(mu['mlp']['bias'], 1)
    )
  models.assert_sharded_as(restored, abstract)


def test_per_layer_checkpoint_into_maxtext_scan_layout(tmp_path, mesh):
  """The other way: unrolled NNX blocks stacked into params at axis 1 and batch stats at axis 0."""
  state = _scan_state(UnrolledNet)
  rng = np.random.default_rng(1)
  nnx.update(
    state['model'], jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape), a.dtype), nnx.state(state['model']))
  )
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(2, args=ocp.args.StandardSave(nnx.state(state)))

  def axis1(v, path):
    value = v.get_raw_value()
    if 'layers' not in path or type(v).__name__ == 'BatchStat' or value.ndim == 0:
      return v
    return v.copy(jax.ShapeDtypeStruct(value.shape[1:2] + value.shape[:1] + value.shape[2:], value.dtype))

  abstract = nnx.state(nnx.eval_shape(lambda: _scan_state(ScannedNet)))
  abstract = jax.tree_util.tree_map_with_path(
    lambda p, v: axis1(v, jax.tree_util.keystr(p)), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  abstract = models.shard_abstract(abstract, mesh, 'replicated')
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))
  got, want = models.flat(restored), models.flat(nnx.state(state))
  for i in range(N_SCAN):
    np.testing.assert_array_equal(
      np.asarray(got['model/layers/mlp/kernel'])[:, i], want[f'model/layers/{i}/mlp/kernel']
    )
    np.testing.assert_array_equal(np.asarray(got['model/layers/bn/scale'])[:, i], want[f'model/layers/{i}/bn/scale'])
    np.testing.assert_array_equal(np.asarray(got['model/layers/bn/mean'])[i], want[f'model/layers/{i}/bn/mean'])
    np.testing.assert_array_equal(
      np.asarray(got['optimizer/opt_state/0/nu/layers/mlp/bias'])[:, i],
      want[f'optimizer/opt_state/0/nu/layers/{i}/mlp/bias'],
    )
  models.assert_sharded_as(restored, abstract)


def test_to_nnx_bridge_rng_state_restores_exactly(tmp_path, mesh):
  """NNX -> NNX through nnx.bridge.ToNNX: its to_nnx__rngs keys and counts come back as they were."""

  def make(seed):
    m = nnx.bridge.ToNNX(models.LinenMLP(), rngs=nnx.Rngs(seed, dropout=seed + 1))
    nnx.bridge.lazy_init(m, np.ones((1, models.D_IN), np.float32))
    return m

  model = make(0)
  model.to_nnx__rngs.dropout()  # advance a stream: its count moves on, its key stays
  with ocp.CheckpointManager(tmp_path) as m:
    m.save(1, args=ocp.args.StandardSave(nnx.state(model)))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: make(5))), mesh, 'one_axis')
  plan = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract, dry_run=True))
  assert not plan.kept and any('to_nnx__rngs' in r.target.path for r in plan.reads)
  restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract))
  assert any('to_nnx__rngs' in p for p in models.host_values(restored))
  models.assert_all_equal(restored, nnx.state(model))
  key = restored['to_nnx__rngs']['dropout']['key'].get_raw_value()
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
