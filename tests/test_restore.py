"""Restore real Linen checkpoints into sharded NNX states (and back) through CheckpointManager."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import models
from helpers import save
from models import MLP_RULES, BN_RULES
import orbax_linen_nnx
from orbax_linen_nnx import LinenCompatHandler, LinenCompatRestore, RestorePlan, default_sharding

# optimizer -> (factory, where optax puts ScaleByAdamState in opt_state, other leaves {nnx: linen})
OPTIMIZERS = {
  'adam': (lambda: optax.adam(1e-2), '0', {}),
  'adamw': (lambda: optax.adamw(1e-2, weight_decay=0.1), '0', {}),
  'chained_adamw': (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), '1/0', {}),
  'inject_hyperparams': (
    lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    'inner_state/0',
    {'optimizer/opt_state/count': 'opt_state/count'}
    | {
      f'optimizer/opt_state/hyperparams/{h}': f'opt_state/hyperparams/{h}'
      for h in ('learning_rate', 'b1', 'b2', 'eps', 'eps_root')
    },
  ),
  'scale_by_schedule': (
    lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(optax.linear_schedule(1e-2, 0.0, 10))),
    '0',
    {'optimizer/opt_state/1/count': 'opt_state/1/count'},
  ),
}


def mlp_pairs(adam_at: str, *, variables_as_params: bool = True, nnx_target: bool = True):
  """{target path: source path} for the MLP, written out by hand from LAYOUTS.md."""
  lin = 'params/params' if variables_as_params else 'params'
  lin_mirror = '/params' if variables_as_params else ''
  pairs = {}
  for new, old in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
    for leaf in ('kernel', 'bias'):
      pairs[f'model/{new}/{leaf}'] = f'{lin}/{old}/{leaf}'
      for m in ('mu', 'nu'):
        pairs[f'optimizer/opt_state/{adam_at}/{m}/{new}/{leaf}'] = f'opt_state/{adam_at}/{m}{lin_mirror}/{old}/{leaf}'
  pairs[f'optimizer/opt_state/{adam_at}/count'] = f'opt_state/{adam_at}/count'
  pairs['optimizer/step'] = 'step'
  return pairs if nnx_target else {v: k for k, v in pairs.items()}


def nnx_abstract(module_cls, tx, mesh, policy):
  abstract = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(module_cls, tx)))
  return models.shard_abstract(abstract, mesh, policy)


@pytest.mark.parametrize('opt', sorted(OPTIMIZERS))
@pytest.mark.parametrize('policy', ['replicated', 'one_axis', 'two_axes'])
def test_linen_mlp_into_sharded_nnx(tmp_path, mesh, opt, policy):
  make_tx, adam_at, extra = OPTIMIZERS[opt]
  linen = models.linen_mlp_state(make_tx())
  save(tmp_path, step=2, what=linen)

  abstract = nnx_abstract(models.NnxMLP, make_tx(), mesh, policy)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))

  assert isinstance(restored, nnx.State)
  pairs = mlp_pairs(adam_at) | extra
  assert set(models.flat(restored)) == set(pairs)
  models.assert_same(restored, models.flat(linen), pairs)
  models.assert_sharded_as(restored, abstract)
  assert restored['optimizer']['step'].get_raw_value().dtype == jnp.uint32
  assert int(restored['optimizer']['step'].get_raw_value()) == 2


def test_resume_linen_run_with_nnx(tmp_path, mesh):
  """Loss after restore + one NNX step equals the Linen run's loss one step later."""
  tx = lambda: optax.adam(1e-2)
  linen = models.linen_mlp_state(tx(), steps=3)
  save(tmp_path, step=3, what=linen)
  linen_losses = []
  for _ in range(3):
    linen, loss = models.linen_mlp_step(linen, True)
    linen_losses.append(float(loss))

  abstract = nnx_abstract(models.NnxMLP, tx(), mesh, 'two_axes')
  restored = ocp.CheckpointManager(tmp_path).restore(3, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  ts = models.nnx_train_state(models.NnxMLP, tx())
  nnx.update(ts, restored)
  assert ts['model'].fc1.kernel.get_value().sharding == abstract['model']['fc1']['kernel'].get_raw_value().sharding
  step = nnx.jit(models.nnx_step)
  nnx_losses = [float(step(ts['model'], ts['optimizer'])) for _ in range(3)]
  models.assert_reductions_close(nnx_losses, linen_losses, terms=6 * models.MLP_STEP_TERMS)  # 3 + 3 steps
  assert int(ts['optimizer'].step.get_value()) == 6


def test_batch_stats_and_resume(tmp_path, mesh):
  """A TrainState with a batch_stats field restores into nnx.BatchNorm's BatchStat variables."""
  tx = lambda: optax.adam(1e-2)
  linen = models.linen_bn_state(tx(), steps=2)
  save(tmp_path, step=2, what=linen)
  abstract = nnx_abstract(models.NnxBN, tx(), mesh, 'one_axis')
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=BN_RULES))

  pairs = {
    'model/bn/mean': 'batch_stats/BatchNorm_0/mean',
    'model/bn/var': 'batch_stats/BatchNorm_0/var',
    'model/bn/scale': 'params/BatchNorm_0/scale',
    'model/fc1/kernel': 'params/Dense_0/kernel',
    'optimizer/opt_state/0/mu/bn/scale': 'opt_state/0/mu/BatchNorm_0/scale',
    'optimizer/opt_state/0/nu/fc2/bias': 'opt_state/0/nu/Dense_1/bias',
  }
  models.assert_same(restored, models.flat(linen), pairs)
  models.assert_sharded_as(restored, abstract)
  assert type(restored['model']['bn']['mean']) is nnx.BatchStat

  ts = models.nnx_train_state(models.NnxBN, tx())
  nnx.update(ts, restored)
  linen_next, linen_loss = models.linen_bn_step(linen)
  nnx_loss = nnx.jit(models.nnx_step)(ts['model'], ts['optimizer'])
  # Linen ran this step unsharded, NNX sharded: float32 sums in another order.
  models.assert_reductions_close(nnx_loss, linen_loss, terms=3 * models.BN_STEP_TERMS)  # 2 + 1 steps
  models.assert_reductions_close(
    ts['model'].bn.mean.get_value(), linen_next.batch_stats['BatchNorm_0']['mean'], terms=3 * models.BN_STEP_TERMS
  )


def test_model_only_targets(tmp_path, mesh):
  """An abstract nnx.Module, or a plain pytree of ShapeDtypeStruct, holding only the model."""
  linen = models.linen_mlp_state(optax.adam(1e-2), variables_as_params=False)
  save(tmp_path, step=2, what=linen)
  mngr = ocp.CheckpointManager(tmp_path)
  pairs = {'fc1/kernel': 'params/Dense_0/kernel', 'fc2/bias': 'params/Dense_1/bias'}

  module = nnx.eval_shape(lambda: models.NnxMLP(nnx.Rngs(0)))
  restored = mngr.restore(2, args=LinenCompatRestore(module, rules=MLP_RULES))
  assert isinstance(restored, models.NnxMLP)
  models.assert_same(nnx.state(restored), models.flat(linen), pairs)
  # Leaves that ask for no sharding get the documented default: replicated on all devices.
  assert restored.fc1.kernel.get_value().sharding == default_sharding()
  assert restored.fc1.kernel.get_value().sharding.is_fully_replicated

  pure = nnx.to_pure_dict(nnx.state(module))
  pure = models.shard_abstract(pure, mesh, 'two_axes')
  restored = mngr.restore(2, args=LinenCompatRestore(pure, rules=MLP_RULES))
  assert type(restored) is dict and set(restored) == {'fc1', 'fc2'}
  models.assert_same(restored, models.flat(linen), pairs)
  models.assert_sharded_as(restored, pure)

  plan = mngr.restore(2, args=LinenCompatRestore(pure, rules=MLP_RULES, dry_run=True))
  assert {s.name for s in plan.unused} >= {'step', 'opt_state.0.count'}


def test_params_only_checkpoint(tmp_path, mesh):
  """A checkpoint of Linen `variables` alone (no TrainState) restores into the NNX model."""
  variables = models.LinenMLP().init(jax.random.key(3), jnp.ones((1, models.D_IN)))
  save(tmp_path, step=0, what=variables)
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: models.NnxMLP(nnx.Rngs(0)))), mesh, 'one_axis')
  restored = ocp.CheckpointManager(tmp_path).restore(0, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  models.assert_same(
    restored, models.flat(variables), {'fc1/kernel': 'params/Dense_0/kernel', 'fc2/kernel': 'params/Dense_1/kernel'}
  )
  models.assert_sharded_as(restored, abstract)


def test_nnx_checkpoint_into_linen_train_state(tmp_path, mesh):
  """The reverse direction: an NNX run's checkpoint restored into a Linen TrainState."""
  tx = lambda: optax.adam(1e-2)
  ts = models.nnx_train_state(models.NnxMLPWithDropout, tx())
  step = nnx.jit(models.nnx_step)
  for _ in range(2):
    step(ts['model'], ts['optimizer'])
  save(tmp_path, step=2, what=nnx.state(ts))

  abstract = jax.eval_shape(lambda: models.linen_mlp_state(tx(), steps=0))
  abstract = models.shard_abstract(abstract, mesh, 'two_axes')
  mngr = ocp.CheckpointManager(tmp_path)
  plan = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, dry_run=True))
  assert (plan.source_layout, plan.target_layout) == ('nnx', 'linen')
  assert {s.name for s in plan.skipped} == {'model.drop.rngs.key.value', 'model.drop.rngs.count.value'}

  restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  assert isinstance(restored, train_state.TrainState)
  pairs = {k: v + '' for k, v in mlp_pairs('0', nnx_target=False).items()}
  models.assert_same(restored, models.flat(nnx.state(ts)), pairs)
  models.assert_sharded_as(restored, abstract)
  assert restored.step.dtype == jnp.int32 and int(restored.step) == 2

  # The Linen run resumed from the NNX checkpoint takes the same next step.
  restored = restored.replace(apply_fn=models.LinenMLP().apply)
  _, linen_loss = models.linen_mlp_step(restored, True)
  nnx_loss = step(ts['model'], ts['optimizer'])
  models.assert_reductions_close(linen_loss, nnx_loss, terms=3 * models.MLP_STEP_TERMS)  # 2 + 1 steps


def test_forced_layouts(tmp_path):
  linen = models.linen_mlp_state(optax.adam(1e-2))
  save(tmp_path, step=2, what=linen)
  mngr = ocp.CheckpointManager(tmp_path)
  abstract = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))
  pure = nnx.to_pure_dict(abstract)  # a plain dict in the NNX layout
  plan = mngr.restore(
    2, args=LinenCompatRestore(pure, rules=MLP_RULES, source_layout='linen', target_layout='nnx', dry_run=True)
  )
  assert (plan.source_layout, plan.target_layout) == ('linen', 'nnx')
  assert plan.read_for('optimizer/step').sources[0].name == 'step'
  # Forcing the wrong source layout is honoured, so nothing matches.
  with pytest.raises(ValueError, match='has no source'):
    mngr.restore(2, args=LinenCompatRestore(pure, rules=MLP_RULES, source_layout='nnx', dry_run=True))
  with pytest.raises(ValueError, match="source_layout must be one of"):
    mngr.restore(2, args=LinenCompatRestore(pure, source_layout='flax'))


def test_nnx_only_state_is_kept_or_filled(tmp_path, mesh):
  tx = lambda: optax.adam(1e-2)
  save(tmp_path, step=2, what=models.linen_mlp_state(tx()))
  abstract = nnx_abstract(models.NnxMLPWithDropout, tx(), mesh, 'replicated')
  mngr = ocp.CheckpointManager(tmp_path)

  plan = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, dry_run=True))
  assert {'/'.join(t.path) for t in plan.kept} == {'model/drop/rngs/key', 'model/drop/rngs/count'}
  assert all(t.nnx_only for t in plan.kept)
  assert 'NNX-only state' in str(plan)

  with warnings.catch_warnings():  # the documented resume: kept in the plan, no warning
    warnings.simplefilter('error', orbax_linen_nnx.LinenCompatWarning)
    restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  assert 'drop' not in restored['model']  # nnx.update keeps the model's own streams

  seen = []

  def fill(path, abstract_leaf):
    seen.append(path)
    if jax.dtypes.issubdtype(abstract_leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(7)
    return jnp.zeros(abstract_leaf.shape, abstract_leaf.dtype)

  restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, fill_nnx_only=fill))
  assert sorted(seen) == ['model/drop/rngs/count', 'model/drop/rngs/key']
  ts = models.nnx_train_state(models.NnxMLPWithDropout, tx())
  nnx.update(ts, restored)
  assert int(ts['model'].drop.rngs.count.get_value()) == 0


def test_to_nnx_bridge_rngs(tmp_path, mesh):
  """nnx.bridge.ToNNX keeps Linen names; its to_nnx__rngs state is NNX-only."""
  linen = models.linen_mlp_state(optax.adam(1e-2), variables_as_params=False)
  save(tmp_path, step=2, what=linen)

  def make():
    m = nnx.bridge.ToNNX(models.LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(m, jnp.ones((1, models.D_IN)))
    return m

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make)), mesh, 'one_axis')
  plan = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, dry_run=True))
  assert plan.kept and all('to_nnx__rngs' in t.path for t in plan.kept)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract))
  models.assert_same(restored, models.flat(linen), {'Dense_0/kernel': 'params/Dense_0/kernel'})
  models.assert_sharded_as(restored, abstract, left_out={'/'.join(t.path) for t in plan.kept})


def test_composite_named_items(tmp_path, mesh):
  tx = lambda: optax.adam(1e-2)
  linen = models.linen_mlp_state(tx())
  save(tmp_path, step=2, what=None, state=ocp.args.StandardSave(linen), meta=ocp.args.JsonSave({'run': 'linen'}))
  abstract = nnx_abstract(models.NnxMLP, tx(), mesh, 'two_axes')
  out = ocp.CheckpointManager(tmp_path).restore(
    2, args=ocp.args.Composite(state=LinenCompatRestore(abstract, rules=MLP_RULES), meta=ocp.args.JsonRestore())
  )
  assert out.meta == {'run': 'linen'}
  models.assert_same(out.state, models.flat(linen), mlp_pairs('0'))
  models.assert_sharded_as(out.state, abstract)


def test_handler_registry_route_for_managers_that_also_save(tmp_path, mesh):
  """One manager that saves with StandardSave and restores with LinenCompatRestore."""
  tx = lambda: optax.adam(1e-2)
  linen = models.linen_mlp_state(tx())
  abstract = nnx_abstract(models.NnxMLP, tx(), mesh, 'one_axis')

  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('default', ocp.args.StandardSave, ocp.StandardCheckpointHandler())
  registry.add('default', LinenCompatRestore, LinenCompatHandler())
  mngr = ocp.CheckpointManager(tmp_path / 'with_registry', handler_registry=registry)
  mngr.save(2, args=ocp.args.StandardSave(linen))
  mngr.wait_until_finished()
  restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  models.assert_same(restored, models.flat(linen), mlp_pairs('0'))
  models.assert_sharded_as(restored, abstract)

  # Without the registry, Orbax binds the item to StandardSave's handler and refuses.
  plain = ocp.CheckpointManager(tmp_path / 'plain')
  plain.save(2, args=ocp.args.StandardSave(linen))
  plain.wait_until_finished()
  with pytest.raises(Exception, match='registered'):
    plain.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))


def test_dry_run_returns_printable_plan(tmp_path):
  save(tmp_path, step=2, what=models.linen_mlp_state(optax.adam(1e-2)))
  abstract = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))
  plan = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, dry_run=True))
  assert isinstance(plan, RestorePlan)
  text = str(plan)
  assert 'linen -> nnx: 14 arrays to read' in text
  assert 'model/fc1/kernel (16, 32) float32  <-  params.params.Dense_0.kernel' in text
  assert 'optimizer/step () uint32  <-  step  [cast int32 -> uint32]' in text


def test_dtype_cast_on_read(tmp_path, mesh):
  """A bfloat16 target reads the float32 checkpoint and casts it shard by shard."""
  linen = models.linen_mlp_state(optax.adam(1e-2))
  save(tmp_path, step=2, what=linen)
  module = nnx.eval_shape(lambda: models.NnxMLP(nnx.Rngs(0)))
  state = nnx.state(module)
  state = jax.tree.map(
    lambda v: v.copy(jax.ShapeDtypeStruct(v.shape, jnp.bfloat16)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  state = models.shard_abstract(state, mesh, 'two_axes')
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(state, rules=MLP_RULES))
  kernel = restored['fc1']['kernel'].get_raw_value()
  assert kernel.dtype == jnp.bfloat16
  want = np.asarray(linen.params['params']['Dense_0']['kernel']).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(kernel), want)
  models.assert_sharded_as(restored, state)


class PartitionedMLP(nnx.Module):
  """Sharding declared the NNX way, with partitioning metadata on the Variables."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.fc1 = nnx.Linear(
      models.D_IN, models.D_HID, rngs=rngs, kernel_init=nnx.with_partitioning(init, ('data', 'model'))
    )
    self.fc2 = nnx.Linear(
      models.D_HID, models.D_OUT, rngs=rngs, kernel_init=nnx.with_partitioning(init, ('model', None))
    )


def test_shardings_from_nnx_partitioning_metadata(tmp_path):
  """The usual NNX recipe: eval_shape under a mesh, then nnx.get_named_sharding."""
  linen = models.linen_mlp_state(optax.adam(1e-2))
  save(tmp_path, step=2, what=linen)
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  with jax.set_mesh(mesh):
    state = nnx.state(nnx.eval_shape(lambda: PartitionedMLP(nnx.Rngs(0))))
  shardings = nnx.get_named_sharding(state, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  assert restored['fc1']['kernel'].get_value().sharding.spec == jax.sharding.PartitionSpec('data', 'model')
  assert restored['fc2']['kernel'].get_value().sharding.spec == jax.sharding.PartitionSpec('model', None)
  models.assert_sharded_as(restored, abstract)
  models.assert_same(
    restored,
    models.flat(linen),
    {'fc1/kernel': 'params/params/Dense_0/kernel', 'fc2/kernel': 'params/params/Dense_1/kernel'},
  )
