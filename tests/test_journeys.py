"""Whole user stories, each carried past the call: the restored model trains on, the saved checkpoint is read
by the other side's own code, the proposed fix is applied and works.

Every story runs on the (4, 2) mesh of 8 CPU devices with real models (Dropout, BatchNorm), real optax
optimizers and real CheckpointManager saves, and ends in two more training steps in a freshly built model.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import orbax_linen_nnx
from helpers import linen_pairs, make_bn_drop, read_with_linen, save, tx
from models import DROP_RULES
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, LinenCompatWarning, PlanError


def test_linen_run_with_dropout_and_batchnorm_resumes_in_nnx(tmp_path, mesh):
  """The README pattern on the most common model: abstract from nnx.eval_shape, restore, nnx.update into a
  fresh model, train. The Linen checkpoint holds no RNG stream: the fresh model keeps its own (it seeded
  it), the restore says so, and dropout draws from it."""
  linen = models.linen_bn_drop_state(tx())
  save(tmp_path, step=2, what=ocp.args.StandardSave(linen))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')

  plan = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=DROP_RULES, dry_run=True))
  assert {'/'.join(t.path) for t in plan.kept} == {'model/drop/rngs/key', 'model/drop/rngs/count'}
  with warnings.catch_warnings():  # keeping the model's RNG streams is the documented resume: a plan line, no warning
    warnings.simplefilter('error', LinenCompatWarning)
    restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(abstract, rules=DROP_RULES))
  jax.tree.map(lambda a: a.shape, restored)  # a restored tree can be looked at
  assert restored.to_pure_dict()['model']['fc1']['kernel'].shape == (models.D_IN, models.D_HID)

  state = make_bn_drop()
  own_key = jax.random.key_data(state['model'].drop.rngs.key.get_value())
  nnx.update(state, restored)
  models.assert_same(nnx.state(state), models.flat(linen), linen_pairs())
  models.assert_sharded_as(restored, abstract, left_out={'model/drop/rngs/key', 'model/drop/rngs/count'})
  np.testing.assert_array_equal(jax.random.key_data(state['model'].drop.rngs.key.get_value()), own_key)

  # Two more steps, dropout off in both frameworks: the same losses to float32 summation order (the
  # restored NNX state is sharded, Linen's is not, and the two frameworks order their sums differently).
  # The batch statistics are compared after the first step, which they take from the restored values
  # alone: Adam turns summation-order noise in gradients near zero into updates of up to the learning
  # rate, which the second step's statistics would carry.
  linen_next, linen_losses, nnx_losses = linen, [], []
  for k in range(2):
    linen_next, loss = models.linen_bn_drop_step(linen_next, jax.random.key(0), False)
    linen_losses.append(loss)
    nnx_losses.append(models.nnx_bn_drop_step(state['model'], state['optimizer'], False))
    if k == 0:
      models.assert_reductions_close(
        state['model'].bn.mean.get_value(), linen_next.batch_stats['BatchNorm_0']['mean'], terms=models.BN_STEP_TERMS
      )
  models.assert_reductions_close(np.array(nnx_losses), np.array(linen_losses), terms=2 * models.BN_STEP_TERMS)
  # ... and with dropout on, the fresh model's own stream draws the masks.
  count = int(state['model'].drop.rngs.count.get_value())
  assert np.isfinite(models.nnx_bn_drop_step(state['model'], state['optimizer'], True))
  assert int(state['model'].drop.rngs.count.get_value()) == count + 1
  assert int(state['optimizer'].step.get_value()) == 2 + 3


class LinenDrop(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Dense(models.D_HID)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(models.D_OUT)(x)


def test_bridge_model_restored_with_partial_flattens_and_trains(tmp_path, mesh):
  """An nnx.bridge.ToNNX model (Linen code inside NNX) restored with partial=True: its to_nnx__rngs streams
  are left to the model, the result flattens, and the model trains with dropout on."""
  variables = LinenDrop().init(jax.random.key(3), jnp.ones((1, models.D_IN)))
  save(tmp_path, step=1, what=ocp.args.StandardSave(variables))

  def make():
    model = nnx.bridge.ToNNX(LinenDrop(), rngs=nnx.Rngs(params=0, dropout=1))
    nnx.bridge.lazy_init(model, jnp.ones((1, models.D_IN)))
    return model

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make)), mesh, 'two_axes')
  with warnings.catch_warnings():  # its RNG streams kept: a plan line, no warning
    warnings.simplefilter('error', LinenCompatWarning)
    restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract, partial=True))
  shapes = jax.tree.map(lambda a: a.shape, restored.to_pure_dict())
  assert shapes == {
    'Dense_0': {'bias': (models.D_HID,), 'kernel': (models.D_IN, models.D_HID)},
    'Dense_1': {'bias': (models.D_OUT,), 'kernel': (models.D_HID, models.D_OUT)},
  }
  model = make()
  nnx.update(model, restored)
  models.assert_same(
    nnx.state(model),
    models.flat(variables),
    {f'{m}/{leaf}': f'params/{m}/{leaf}' for m in ('Dense_0', 'Dense_1') for leaf in ('kernel', 'bias')},
  )
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
  x, y = models.batch()
  before = np.asarray(model.Dense_0['kernel'].get_value())
  for _ in range(2):
    loss, grads = nnx.value_and_grad(lambda m: models.mse(m(x, train=True), y))(model)
    optimizer.update(model, grads)
    assert np.isfinite(loss)
  assert not np.array_equal(np.asarray(model.Dense_0['kernel'].get_value()), before)
  assert model.Dense_0['kernel'].get_value().sharding == abstract['Dense_0']['kernel'].sharding


def test_pure_dict_with_unsharded_rng_keys_computes_in_one_jit(tmp_path, mesh):
  """A pure-dict abstract state whose RNG leaves give no sharding, the rest on the ('data', 'model') mesh:
  the keys come back replicated on that same mesh, so the restored model runs under one jit and its
  dropout stream continues exactly (same masks, so the same losses to summation order)."""
  trained = make_bn_drop()
  nnx.update(trained, models.put_sharded(nnx.state(trained), mesh, 'two_axes'))
  for _ in range(2):
    models.nnx_bn_drop_step(trained['model'], trained['optimizer'], True)
  save(tmp_path, step=2, what=ocp.args.StandardSave(nnx.state(trained)))

  pure = nnx.to_pure_dict(nnx.state(nnx.eval_shape(make_bn_drop)))
  pure = jax.tree_util.tree_map_with_path(
    lambda kp, x: (
      x
      if 'rngs' in jax.tree_util.keystr(kp)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=models.sharding_for(x.shape, mesh, 'two_axes'))
    ),
    pure,
  )
  plan = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(pure, dry_run=True))
  assert '2 target(s) give no sharding: replicated on the mesh (data=4, model=2) the others use' in str(plan)
  restored = ocp.CheckpointManager(tmp_path).restore(2, args=LinenCompatRestore(pure))
  key = restored['model']['drop']['rngs']['key']
  assert key.sharding == NamedSharding(mesh, P()) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)

  state = make_bn_drop()
  flat_state = nnx.state(state)
  nnx.replace_by_pure_dict(flat_state, restored)
  nnx.update(state, flat_state)
  models.assert_all_equal(nnx.state(state), nnx.state(trained))
  resumed = [models.nnx_bn_drop_step(state['model'], state['optimizer'], True) for _ in range(2)]
  original = [models.nnx_bn_drop_step(trained['model'], trained['optimizer'], True) for _ in range(2)]
  models.assert_reductions_close(np.array(resumed), np.array(original), terms=2 * models.BN_STEP_TERMS)


def test_nnx_run_saved_as_linen_is_read_and_trained_by_plain_linen_code(tmp_path, mesh):
  """NNX (BatchNorm + Dropout, trained sharded) -> LinenCompatSave -> Linen code in another process:
  StandardRestore of Flax's BatchNorm-guide TrainState with no flags, two steps with the losses the NNX
  run takes. The dropout stream is kept beside the Linen tree, and LinenCompatRestore continues it."""
  state = make_bn_drop()
  nnx.update(state, models.put_sharded(nnx.state(state), mesh, 'two_axes'))
  for _ in range(2):
    models.nnx_bn_drop_step(state['model'], state['optimizer'], True)
  save(tmp_path / 'bn', step=2, what=LinenCompatSave(state, rules=DROP_RULES))

  # A model without batch statistics written as a given Linen tree: params=variables['params'] (Flax's
  # MNIST example), not the default params=variables.
  mlp = models.nnx_train_state(models.NnxMLP, tx())
  models.nnx_step(mlp['model'], mlp['optimizer'])
  linen_mlp = models.LinenMLP()
  target = jax.eval_shape(
    lambda: models.train_state.TrainState.create(
      apply_fn=linen_mlp.apply, params=linen_mlp.init(jax.random.key(0), jnp.ones((1, models.D_IN)))['params'], tx=tx()
    )
  )
  save(tmp_path / 'mlp', step=1, what=LinenCompatSave(mlp, rules=models.MLP_RULES, target=target))

  out = read_with_linen(
    [
      {'directory': str(tmp_path / 'bn'), 'step': 2, 'kind': 'bn_drop', 'steps': 2},
      {'directory': str(tmp_path / 'mlp'), 'step': 1, 'kind': 'mlp_params', 'steps': 2},
    ]
  )
  bn, mlp_read = out['results']
  assert bn['sharded_as_asked'] and mlp_read['sharded_as_asked']
  # Every value bit for bit, under the names Linen gives it.
  ours = models.host_values(nnx.state(state))
  for nnx_path, linen_path in linen_pairs().items():
    np.testing.assert_array_equal(
      np.asarray(bn['values'][linen_path], ours[nnx_path].dtype).astype(
        np.int64 if 'step' in nnx_path else ours[nnx_path].dtype
      ),
      ours[nnx_path],
      err_msg=nnx_path,
    )
  assert bn['step'] == 2 + 2

  nnx_losses = [models.nnx_bn_drop_step(state['model'], state['optimizer'], False) for _ in range(2)]
  models.assert_reductions_close(np.array(bn['losses']), np.array(nnx_losses), terms=2 * models.BN_STEP_TERMS)
  mlp_losses = [models.nnx_step(mlp['model'], mlp['optimizer']) for _ in range(2)]
  models.assert_reductions_close(np.array(mlp_read['losses']), np.array(mlp_losses), terms=2 * models.MLP_STEP_TERMS)


def test_linen_compat_save_keeps_the_dropout_stream_for_nnx(tmp_path, mesh):
  """The same save read back by NNX: every leaf bit for bit, the RNG stream included, so the resumed run
  draws the masks the original would have (losses equal to summation order)."""
  state = make_bn_drop()
  for _ in range(2):
    models.nnx_bn_drop_step(state['model'], state['optimizer'], True)
  args = LinenCompatSave(state, rules=DROP_RULES)
  assert "nnx_aux/ arrays (RNG streams, custom Variables) are written beside the Linen tree" in str(args.plan)
  save(tmp_path, step=2, what=args)
  assert (tmp_path / '2' / 'default' / 'nnx_aux' / '_METADATA').exists()
  with ocp.CheckpointManager(tmp_path) as mngr:
    as_saved = mngr.restore(2, args=ocp.args.StandardRestore())
  assert set(as_saved) == {'params', 'batch_stats', 'opt_state', 'step'}  # nothing a Linen reader trips over

  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')
  with ocp.CheckpointManager(tmp_path) as mngr:
    restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=DROP_RULES))
  models.assert_all_equal(restored, nnx.state(state))
  models.assert_sharded_as(restored, abstract)
  fresh = models.nnx_train_state(models.NnxBNDrop, tx())
  nnx.update(fresh, restored)
  resumed = [models.nnx_bn_drop_step(fresh['model'], fresh['optimizer'], True) for _ in range(2)]
  original = [models.nnx_bn_drop_step(state['model'], state['optimizer'], True) for _ in range(2)]
  models.assert_reductions_close(np.array(resumed), np.array(original), terms=2 * models.BN_STEP_TERMS)

  # aux=None: the stream is left out, with a plan line and a warning; the restore then keeps the model's own.
  plain = LinenCompatSave(state, rules=DROP_RULES, aux=None)
  assert '  skipped model/drop/rngs/key (2,) uint32 (NNX-only)' in str(plain.plan)
  with pytest.warns(LinenCompatWarning, match='not saved \\(aux=None\\): model/drop/rngs/count'):
    save(tmp_path / 'plain', step=2, what=plain)
  assert not (tmp_path / 'plain' / '2' / 'default' / 'nnx_aux').exists()


class LinenSix(nn.Module):
  """Six modules of four kinds. Linen names them as they are made, and `f(g(x))` makes f first: the (32, 16)
  Dense is Dense_1, the (32, 32) one inside it Dense_2."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(32)(x))
    x = nn.Dense(16)(nn.relu(nn.Dense(32)(x)))
    y = nn.Conv(8, (3,))(x[:, :, None] * jnp.ones((1, 1, 4)))
    return nn.Dense(8)(y.reshape(y.shape[0], -1))


class NnxSix(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.hidden = nnx.Linear(32, 32, rngs=rngs)
    self.proj = nnx.Linear(32, 16, rngs=rngs)
    self.conv = nnx.Conv(4, 8, (3,), rngs=rngs)
    self.out = nnx.Linear(128, 8, rngs=rngs)

  def __call__(self, x):
    x = self.proj(nnx.relu(self.hidden(self.norm(self.inp(x)))))
    y = self.conv(x[:, :, None] * jnp.ones((1, 1, 4)))
    return self.out(y.reshape(y.shape[0], -1))


def proposed_rules(error: PlanError) -> dict:
  """The rules= dict an error proposes, as the user would copy it."""
  found = re.search(r'rules=(\{.*?\})', str(error))
  assert found, str(error)
  return eval(found.group(1))  # noqa: S307 (a dict literal the error printed)


def test_the_proposed_rules_are_a_one_to_one_pairing_that_restores(tmp_path, mesh):
  """No rules: the error proposes the one pairing the shapes allow (Dense_0 -> inp, not two Linen modules
  onto one NNX name); applied, it restores bit for bit and the model trains on."""
  x = jnp.ones((4, 16))
  variables = LinenSix().init(jax.random.key(0), x)
  save(tmp_path, step=1, what=ocp.args.StandardSave(variables))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: NnxSix(nnx.Rngs(0)))), mesh, 'one_axis')
  with pytest.raises(PlanError) as e:
    ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract))
  rules = proposed_rules(e.value)
  assert rules == {
    'Conv_0': 'conv',
    'Dense_0': 'inp',
    'Dense_1': 'proj',
    'Dense_2': 'hidden',
    'Dense_3': 'out',
    'LayerNorm_0': 'norm',
  }
  restored = ocp.CheckpointManager(tmp_path).restore(1, args=LinenCompatRestore(abstract, rules=rules))
  model = NnxSix(nnx.Rngs(1))
  nnx.update(model, restored)
  models.assert_same(
    nnx.state(model),
    models.flat(variables),
    {f'{n}/{leaf}': f'params/{l}/{leaf}' for l, n in rules.items() for leaf in ('kernel', 'bias') if l != 'LayerNorm_0'}
    | {'norm/scale': 'params/LayerNorm_0/scale'},
  )
  # The same forward pass: Linen's apply and NNX's call on the same bits, summed in other orders.
  models.assert_reductions_close(model(x), LinenSix().apply(variables, x), terms=16 + 32 + 32 + 32 + 12 + 128)
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
  y = jnp.zeros((4, 8))
  for _ in range(2):
    loss, grads = nnx.value_and_grad(lambda m: models.mse(m(x), y))(model)
    optimizer.update(model, grads)
  assert np.isfinite(loss)


def test_modules_the_shapes_cannot_tell_apart_are_said_so(tmp_path):
  """Two (32, 32) Dense layers into an nnx.State or an abstract module (sorted keys, no attribute order):
  the proposal says it could not settle them and why; into the model itself, the order its __init__ made
  them settles it against Linen's creation order, and says so."""

  class LinenTwins(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(32)(nn.Dense(32)(x))

  class NnxTwins(nnx.Module):
    def __init__(self, rngs):
      self.second = nnx.Linear(32, 32, rngs=rngs)  # made first: Linen's Dense_0 is the inner, first-made one
      self.first = nnx.Linear(32, 32, rngs=rngs)

  variables = LinenTwins().init(jax.random.key(0), jnp.ones((1, 32)))
  save(tmp_path, step=1, what=ocp.args.StandardSave(variables))
  abstract = nnx.eval_shape(lambda: NnxTwins(nnx.Rngs(0)))
  for sorted_keys in (abstract, nnx.state(abstract)):
    with pytest.raises(
      PlanError,
      match=r'Dense_0, Dense_1 and first, second all hold bias \(32,\), kernel'
      r' \(32, 32\) \(no attribute order on the NNX side.*check them',
    ):
      orbax_linen_nnx.plan(tmp_path / '1', sorted_keys)
  module = NnxTwins(nnx.Rngs(0))
  with pytest.raises(PlanError, match='paired in creation and attribute order') as e:
    orbax_linen_nnx.plan(tmp_path / '1', module)
  assert proposed_rules(e.value) == {'Dense_0': 'second', 'Dense_1': 'first'}
  restored = orbax_linen_nnx.restore(tmp_path / '1', module, rules=proposed_rules(e.value))
  np.testing.assert_array_equal(
    np.asarray(restored.second.kernel.get_value()), np.asarray(variables['params']['Dense_0']['kernel'])
  )
