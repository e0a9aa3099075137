"""`LinenCompatSave`: NNX states written as the checkpoint a Linen run of the same model writes.

Every test starts from a real run, saves through a real CheckpointManager, and
compares what Orbax reads back: the tree Orbax records (paths, list or dict,
shapes, dtypes, None entries), the values bit for bit, and what Linen code and
`LinenCompatRestore` make of it.
"""

import math

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import decoders
import maxtext
import models
from models import MLP_RULES
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, PlanError, to_linen
from gemma import GEMMA_RULES, NnxGemmaBlock, linen_gemma_state
from helpers import save


def saved_tree(directory, step, item=None):
  """{key path: (shape, dtype) or None} of what Orbax recorded; lists and dicts keep their own key syntax."""
  meta = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / (item or 'default'))
  flat, _ = jax.tree_util.tree_flatten_with_path(meta.tree, is_leaf=lambda x: x is None)
  out = {jax.tree_util.keystr(k): None if v is None else (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat}
  assert out, f'{directory} step {step} holds no tree'
  return out


def restore_plain(directory, step):
  with ocp.CheckpointManager(directory) as mngr:
    return mngr.restore(step, args=ocp.args.StandardRestore())


def nnx_from_linen(linen_dir, step, make, mesh, rules=None, stacks=None):
  """The NNX train state (real modules) of a Linen run, restored sharded with LinenCompatRestore."""
  state = make()
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make)), mesh, 'two_axes')
  with ocp.CheckpointManager(linen_dir) as mngr:
    nnx.update(state, mngr.restore(step, args=LinenCompatRestore(abstract, rules=rules, stacks=stacks)))
  return state


@pytest.mark.parametrize('tx', ['adam', 'adamw'])
def test_save_writes_what_linen_writes_and_linen_resumes_it(tmp_path, mesh, tx):
  make_tx = {'adam': lambda: optax.adam(1e-2), 'adamw': lambda: optax.adamw(1e-2, weight_decay=0.1)}[tx]
  linen = models.linen_mlp_state(make_tx())
  save(tmp_path / 'linen', step=2, what=ocp.args.StandardSave(linen))
  state = nnx_from_linen(
    tmp_path / 'linen', 2, lambda: models.nnx_train_state(models.NnxMLP, make_tx()), mesh, rules=MLP_RULES
  )
  save(tmp_path / 'nnx', step=2, what=LinenCompatSave(state, rules=MLP_RULES))

  # Same tree as Orbax records it (chain list, None for empty states, shapes, dtypes) and same bits.
  assert saved_tree(tmp_path / 'nnx', 2) == saved_tree(tmp_path / 'linen', 2)
  assert saved_tree(tmp_path / 'nnx', 2)["['opt_state'][1]"] is None
  models.assert_all_equal(restore_plain(tmp_path / 'nnx', 2), restore_plain(tmp_path / 'linen', 2))

  # Linen code restores it with plain StandardRestore, sharded, and trains on with the same losses
  # (the same Linen computation on the same bits and shardings: equal, not close).
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=models.sharding_for(x.shape, mesh, 'two_axes')),
    models.linen_mlp_state(make_tx(), steps=1),
  )
  resumed = {}
  for name in ('linen', 'nnx'):
    with ocp.CheckpointManager(tmp_path / name) as mngr:
      s = mngr.restore(2, args=ocp.args.StandardRestore(abstract))
    models.assert_sharded_as(s.params, abstract.params)
    losses = []
    for _ in range(2):
      s, loss = models.linen_mlp_step(s)
      losses.append(np.asarray(loss))
    resumed[name] = (losses, s)
  np.testing.assert_array_equal(resumed['nnx'][0], resumed['linen'][0])
  models.assert_all_equal(resumed['nnx'][1].params, resumed['linen'][1].params)


def test_round_trip_is_bit_exact_rng_included(tmp_path, mesh):
  state = maxtext.train_state(seed=0)
  for step in range(2):
    maxtext.train_step(state, *maxtext.batch(step))
  save(tmp_path, step=2, what=LinenCompatSave(state))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: maxtext.train_state(seed=7))), mesh, 'two_axes')
  with ocp.CheckpointManager(tmp_path) as mngr:
    restored = mngr.restore(2, args=LinenCompatRestore(abstract))
  models.assert_all_equal(restored, nnx.state(state))
  models.assert_sharded_as(restored, abstract)
  # The dropout stream goes on where it stopped: the resumed step draws the same mask (another mask
  # moves the loss by far more). The restored state is sharded, the original is not, so the losses
  # agree to float32 summation order (models.assert_reductions_close).
  fresh = maxtext.train_state(seed=7)
  nnx.update(fresh, restored)
  models.assert_reductions_close(
    maxtext.train_step(fresh, *maxtext.batch(2)), maxtext.train_step(state, *maxtext.batch(2)), terms=maxtext.STEP_TERMS
  )


@pytest.mark.parametrize('registry', [False, True])
def test_maxtext_tree_equals_to_checkpoint_dict(tmp_path, registry):
  state = maxtext.train_state(seed=0)
  maxtext.train_step(state, *maxtext.batch(0))
  with maxtext.manager(tmp_path / 'maxtext', registry=registry) as mngr:
    maxtext.save(mngr, 1, state)
  # MaxText's manager takes no other handler for `items`: to_linen gives the tree its PyTreeSave writes.
  with maxtext.manager(tmp_path / 'ours', registry=registry) as mngr:
    mngr.save(1, args=ocp.args.Composite(items=ocp.args.PyTreeSave(to_linen(nnx.state(state)))))
    mngr.wait_until_finished()
  assert saved_tree(tmp_path / 'ours', 1, 'items') == saved_tree(tmp_path / 'maxtext', 1, 'items')
  with maxtext.manager(tmp_path / 'ours', registry=registry) as mngr:
    ours = mngr.restore(1, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))['items']
  models.assert_all_equal(ours, maxtext.to_items(state))


def test_optimizer_module_keeps_trailing_empty_states(tmp_path):
  """From the modules, adam's trailing EmptyState is a None entry as in Linen; from an nnx.State the
  chain ends at its last state holding arrays, as MaxText writes it."""
  state = models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))
  assert len(to_linen(state)['opt_state']) == 2
  assert to_linen(state)['opt_state'][1] is None
  assert len(to_linen(nnx.state(state))['opt_state']) == 1


# Linen run -> NNX (LinenCompatRestore) -> Linen (LinenCompatSave): the checkpoint comes back as it was.
LAYER_CASES = {
  'loop <- unrolled': (decoders.LinenLoopDecoder, decoders.NnxUnrolledDecoder, None),
  'loop <- vmap stack': (decoders.LinenLoopDecoder, decoders.NnxStackedDecoder, {'layers': {'linen': None}}),
  'scan <- vmap stack': (
    decoders.LinenScanDecoder,
    decoders.NnxStackedDecoder,
    {'layers': {'linen': decoders.LINEN_SCAN_AXIS, 'nnx': 0}},
  ),
  'scan <- unrolled': (
    decoders.LinenScanDecoder,
    decoders.NnxUnrolledDecoder,
    {'layers': {'linen': decoders.LINEN_SCAN_AXIS}},
  ),
}


@pytest.mark.parametrize('case', list(LAYER_CASES))
def test_layer_layouts_round_trip(tmp_path, mesh, case):
  linen_cls, nnx_cls, stacks = LAYER_CASES[case]
  save(tmp_path / 'linen', step=2, what=ocp.args.StandardSave(decoders.linen_state(linen_cls)))
  state = nnx_from_linen(tmp_path / 'linen', 2, lambda: decoders.nnx_state(nnx_cls), mesh, stacks=stacks)
  save(tmp_path / 'nnx', step=2, what=LinenCompatSave(state, stacks=stacks))
  assert saved_tree(tmp_path / 'nnx', 2) == saved_tree(tmp_path / 'linen', 2)
  models.assert_all_equal(restore_plain(tmp_path / 'nnx', 2), restore_plain(tmp_path / 'linen', 2))
  # ... and restores into the NNX layout bit for bit.
  abstract = nnx.state(nnx.eval_shape(lambda: decoders.nnx_state(nnx_cls)))
  with ocp.CheckpointManager(tmp_path / 'nnx') as mngr:
    models.assert_all_equal(mngr.restore(2, args=LinenCompatRestore(abstract, stacks=stacks)), nnx.state(state))


def test_rules_run_backward(tmp_path, mesh):
  """Gemma's rules (rename, split, transpose, reshape, cast) inverted: the Linen shapes come back,
  holding the NNX values (float32: the save writes the state's dtype)."""
  linen, _ = linen_gemma_state()
  save(tmp_path / 'linen', step=1, what=ocp.args.StandardSave(linen))
  make = lambda: {
    'model': NnxGemmaBlock(nnx.Rngs(0)),
    'optimizer': nnx.Optimizer(NnxGemmaBlock(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param),
  }
  state = nnx_from_linen(tmp_path / 'linen', 1, make, mesh, rules=GEMMA_RULES)
  save(tmp_path / 'nnx', step=1, what=LinenCompatSave(state, rules=GEMMA_RULES))
  want, got = saved_tree(tmp_path / 'linen', 1), saved_tree(tmp_path / 'nnx', 1)
  # This Linen run kept `step` a Python int (no jit), which Orbax stores as an int64 scalar; a
  # TrainState stepped under jit (every other test here) holds the int32 the save writes.
  assert want.pop("['step']") == ((), np.dtype('int64')) and got.pop("['step']") == ((), np.dtype('int32'))
  assert set(got) == set(want)
  for path, w in want.items():
    assert got[path] == (None if w is None else (w[0], np.dtype('float32') if w[1] == jnp.bfloat16 else w[1])), path
  linen_values, ours = restore_plain(tmp_path / 'linen', 1), restore_plain(tmp_path / 'nnx', 1)
  assert int(ours.pop('step')) == linen_values.pop('step') == 1
  linen_values = models.host_values(linen_values)
  for path, value in models.host_values(ours).items():
    np.testing.assert_array_equal(value, linen_values[path].astype(value.dtype), err_msg=path)
  with ocp.CheckpointManager(tmp_path / 'nnx') as mngr:
    back = mngr.restore(1, args=LinenCompatRestore(nnx.state(nnx.eval_shape(make)), rules=GEMMA_RULES))
  models.assert_all_equal(back, nnx.state(state))


def test_inside_composite_with_async_save(tmp_path):
  state = maxtext.train_state(seed=0)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path, options=options) as mngr:
    mngr.save(1, args=ocp.args.Composite(state=LinenCompatSave(state), meta=ocp.args.JsonSave({'run': 'x'})))
    mngr.wait_until_finished()
    abstract = nnx.state(nnx.eval_shape(lambda: maxtext.train_state(seed=3)))
    restored = mngr.restore(1, args=ocp.args.Composite(state=LinenCompatRestore(abstract), meta=ocp.args.JsonRestore()))
  assert restored['meta'] == {'run': 'x'}
  models.assert_all_equal(restored['state'], nnx.state(state))


def test_plan_is_printed_and_problems_come_before_any_write(tmp_path):
  state = maxtext.train_state(seed=0)
  plan = to_linen(nnx.state(nnx.eval_shape(lambda: maxtext.train_state(seed=0))), aux=None, dry_run=True)
  text = str(plan)
  # aux=None: the batch statistics where Linen keeps them, the RNG stream and custom Variable nowhere.
  assert text.startswith(
    'nnx -> linen: 23 arrays to read, 0 kept as given, 0 unused sources, 3 NNX-only sources skipped'
  ), text
  assert '  step () int32  <-  optimizer/step  [cast uint32 -> uint32]' not in text
  assert '  step () int32  <-  optimizer/step  [cast uint32 -> int32]' in text
  assert '  skipped model/drop/rngs/key (2,) uint32 (NNX-only)' in text
  assert '  params/fc1/kernel (16, 32) float32  <-  model/fc1/kernel' in text
  assert '  batch_stats/bn/mean (32,) float32  <-  model/bn/mean' in text

  # The save's own plan is the same, and (the state holding arrays) says what this process writes.
  saved = str(LinenCompatSave(state, aux=None).plan)
  assert saved.startswith(text + '\n  cost    process 0 (1 devices): writes '), saved
  with pytest.raises(PlanError) as e:  # raised by the args, before the manager creates anything
    with ocp.CheckpointManager(tmp_path) as mngr:
      mngr.save(1, args=LinenCompatSave(state, rules={'nowhere': 'fc9'}, stacks={'layers': {'linen': 1}}))
  message = str(e.value)
  assert message.startswith(
    'LinenCompatSave cannot write the NNX state in the Linen layout: 2 problem(s); nothing was written.'
  ), message
  assert "rule 'fc9' matched no source leaf" in message  # the rename run backward looks for the NNX name
  assert "stacks= names 'layers', which is no model path" in message
  assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())

  with pytest.raises(ValueError, match=r"needs the state's arrays, but 26 leaves hold none .*model/bn/bias"):
    LinenCompatSave(nnx.state(nnx.eval_shape(lambda: maxtext.train_state(seed=0))))


class LoRAStyleParam(nnx.Param):
  """A Param subclass (as nnx.LoRAParam is): saved with the params, not under nnx_aux."""


def test_variable_subclasses_go_where_their_base_goes():
  model = models.NnxMLP(nnx.Rngs(0))
  model.fc1.kernel = LoRAStyleParam(model.fc1.kernel.get_value())
  model.cache = nnx.Cache(jnp.zeros(3))
  plan = to_linen(model, dry_run=True)
  assert '  params/fc1/kernel (16, 32) float32  <-  fc1/kernel\n' in str(plan), str(plan)
  assert [s.name for s in plan.skipped] == ['cache'], plan  # caches are recomputed, never saved


def test_a_model_alone_is_written_as_linen_variables(tmp_path, mesh):
  """No optimizer: the Linen `variables` dict ({'params': ...}), as `model.init` gives it and published
  checkpoints hold it."""
  variables = models.LinenMLP().init(jax.random.key(3), jnp.ones((1, models.D_IN)))
  save(tmp_path / 'linen', step=1, what=ocp.args.StandardSave(variables))
  model = models.NnxMLP(nnx.Rngs(0))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: models.NnxMLP(nnx.Rngs(0)))), mesh, 'two_axes')
  with ocp.CheckpointManager(tmp_path / 'linen') as mngr:
    nnx.update(model, mngr.restore(1, args=LinenCompatRestore(abstract, rules=MLP_RULES)))
  save(tmp_path / 'nnx', step=1, what=LinenCompatSave(model, rules=MLP_RULES))
  assert saved_tree(tmp_path / 'nnx', 1) == saved_tree(tmp_path / 'linen', 1)
  models.assert_all_equal(restore_plain(tmp_path / 'nnx', 1), restore_plain(tmp_path / 'linen', 1))


def test_a_model_with_batchnorm_alone_is_written_as_linen_variables(tmp_path, mesh):
  """BatchNorm statistics go in the variables' batch_stats collection beside params, as `model.init` gives
  them: the same tree Orbax records for the Linen model's own variables, and the same bits."""
  variables = models.LinenBN().init(jax.random.key(2), jnp.ones((4, models.D_IN)))
  save(tmp_path / 'linen', step=1, what=ocp.args.StandardSave(variables))
  model = models.NnxBN(nnx.Rngs(0))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: models.NnxBN(nnx.Rngs(0)))), mesh, 'two_axes')
  with ocp.CheckpointManager(tmp_path / 'linen') as mngr:
    nnx.update(model, mngr.restore(1, args=LinenCompatRestore(abstract, rules=models.BN_RULES)))
  save(tmp_path / 'nnx', step=1, what=LinenCompatSave(model, rules=models.BN_RULES))
  assert saved_tree(tmp_path / 'nnx', 1) == saved_tree(tmp_path / 'linen', 1)
  assert "['batch_stats']['BatchNorm_0']['mean']" in saved_tree(tmp_path / 'nnx', 1)
  models.assert_all_equal(restore_plain(tmp_path / 'nnx', 1), restore_plain(tmp_path / 'linen', 1))


@pytest.mark.parametrize('case', ['scan <- vmap stack', 'loop <- vmap stack'])
def test_a_moved_or_unstacked_stack_is_written_from_its_own_shards(tmp_path, mesh, case):
  """No converted copy of the state is made on any device: the arrays whose layout changes reach Orbax as
  `save.Converted` leaves holding the state's own arrays, written from their shards into the boxes the
  layout sends them to (stored in chunks of those boxes); Linen's own checkpoint and the round trip agree
  bit for bit (test_layer_layouts_round_trip)."""
  from orbax_linen_nnx import LinenCompatHandler, save as save_lib

  linen_cls, nnx_cls, stacks = LAYER_CASES[case]
  save(tmp_path / 'linen', step=2, what=ocp.args.StandardSave(decoders.linen_state(linen_cls)))
  state = nnx_from_linen(tmp_path / 'linen', 2, lambda: decoders.nnx_state(nnx_cls), mesh, stacks=stacks)
  args = LinenCompatSave(state, stacks=stacks)
  main, _ = LinenCompatHandler().standard_args(args, carry=True)
  converted = [x for x in jax.tree.leaves(main.item) if isinstance(x, save_lib.Converted)]
  own = {id(v) for v in jax.tree.leaves(nnx.state(state))} | {
    id(v.get_value()) for v in jax.tree.leaves(nnx.state(state), is_leaf=lambda x: isinstance(x, nnx.Variable))
  }
  assert converted and all(id(a) in own for c in converted for a in c.sources.values())
  assert not [x for x in jax.tree.leaves(main.item) if isinstance(x, jax.Array) and id(x) not in own]
  save(tmp_path / 'nnx', step=2, what=args)
  models.assert_all_equal(restore_plain(tmp_path / 'nnx', 2), restore_plain(tmp_path / 'linen', 2))
  # Each converted array is stored in chunks of the box one NNX shard fills (a part of it, not all of it).
  from orbax_linen_nnx import inspection, source

  stored = {
    a['path']: tuple(a['chunk']) for a in inspection.inspect(source.open_checkpoint(tmp_path / 'nnx'))['arrays']
  }
  for c in converted:
    assert stored['/'.join(c.read.target.path)] == c.chunk
  assert any(math.prod(c.chunk) < math.prod(c.shape) for c in converted)
  # Orbax's per-process array records list every array, those ArrayHandler wrote and the converted ones
  # (both append to one file per process: appended at once, one list was lost).
  from orbax_linen_nnx import _internals

  item = epath.Path(tmp_path / 'nnx' / '2' / 'default')
  records = _internals.run_sync(_internals.ArrayMetadataStore().read(item, process_index=0))
  assert sorted(r.param_name for r in records) == sorted(p.replace('/', '.') for p in stored)  # Orbax's names
  assert len(stored) > len(converted)


@pytest.mark.parametrize('case', ['scan <- vmap stack', 'loop <- vmap stack'])
def test_the_sharding_recorded_for_a_moved_axis_is_where_each_shard_lands(tmp_path, mesh, case):
  """Each op states its own sharding rule (`ops.Op.spec`): a moved layer axis moves its PartitionSpec entry,
  a taken layer drops it. Checked against the boxes, on every device: the box its NNX shard lands in (the
  ops' images) is the box the recorded sharding gives that device, for every converted array."""
  from orbax_linen_nnx import LinenCompatHandler, ops, save as save_lib

  linen_cls, nnx_cls, stacks = LAYER_CASES[case]
  save(tmp_path / 'linen', step=2, what=ocp.args.StandardSave(decoders.linen_state(linen_cls)))
  state = nnx_from_linen(tmp_path / 'linen', 2, lambda: decoders.nnx_state(nnx_cls), mesh, stacks=stacks)
  main, _ = LinenCompatHandler().standard_args(LinenCompatSave(state, stacks=stacks), carry=True)
  converted = [x for x in jax.tree.leaves(main.item) if isinstance(x, save_lib.Converted)]
  assert converted
  moved_sharded_axis = False
  for c in converted:
    ((name, source),) = c.sources.items()
    assert isinstance(c.sharding, jax.sharding.NamedSharding) and c.sharding.mesh == source.sharding.mesh
    lands = c.sharding.devices_indices_map(c.shape)
    for device, index in source.sharding.devices_indices_map(source.shape).items():
      box = tuple(s.indices(n)[:2] for s, n in zip(index, source.shape))
      want = tuple(s.indices(n)[:2] for s, n in zip(lands[device], c.shape))
      for image in ops.images(c.expr, name, box):
        assert image == want, (c.read.target.path, device, box, image, want)
    spec = list(source.sharding.spec) + [None] * (len(source.shape) - len(source.sharding.spec))
    moved_sharded_axis |= any(e is not None for e in spec) and list(c.sharding.spec)[: len(spec)] != spec
  assert moved_sharded_axis  # some sharded entry really moved: the rule was exercised, not the identity
