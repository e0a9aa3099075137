"""Orbax v1: the same restore and save as checkpointables of `ocp.v1` (load_checkpointables, training.Checkpointer)."""

import optax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1

import maxtext
import models
from models import MLP_RULES
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, to_linen


def test_v1_loads_a_linen_run_into_sharded_nnx(tmp_path, mesh):
  linen = models.linen_mlp_state(optax.adamw(1e-2))
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(2, args=ocp.args.StandardSave(linen))
    mngr.wait_until_finished()
  abstract = models.shard_abstract(
    nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adamw(1e-2)))), mesh, 'two_axes'
  )
  # A v0 step directory: its one item, 'default', is the checkpointable.
  got = ocp_v1.load_checkpointables(tmp_path / '2', {'default': LinenCompatRestore(abstract, rules=MLP_RULES)})
  with ocp.CheckpointManager(tmp_path) as mngr:
    want = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  models.assert_all_equal(got['default'], want)
  models.assert_sharded_as(got['default'], abstract)


def test_v1_training_checkpointer_saves_linen_layout_and_loads_it_back(tmp_path, mesh):
  state = maxtext.train_state(seed=0)
  maxtext.train_step(state, *maxtext.batch(0))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(lambda: maxtext.train_state(seed=4))), mesh, 'two_axes')
  with ocp_v1.training.Checkpointer(tmp_path / 'run') as ckptr:
    ckptr.save_checkpointables(1, {'train_state': LinenCompatSave(state)})
    restored = ckptr.load_checkpointables(1, {'train_state': LinenCompatRestore(abstract)})['train_state']
    as_saved = ckptr.load_checkpointables(1, {'train_state': None})['train_state']
  models.assert_all_equal(restored, nnx.state(state))
  models.assert_sharded_as(restored, abstract)
  # On disk: the Linen tree (batch statistics beside the params); the RNG stream and the custom
  # Variable beside it, in the checkpointable's nnx_aux/ directory.
  assert set(as_saved) == {'params', 'batch_stats', 'opt_state', 'step'}
  items = maxtext.to_items(state)
  models.assert_all_equal(as_saved['params'], items['params']['params'])
  models.assert_all_equal(as_saved['batch_stats'], {'bn': items['nnx_aux']['model']['bn']})
  assert (tmp_path / 'run' / '1' / 'train_state' / 'nnx_aux' / '_METADATA').exists()
  # With aux='nnx_aux': the Linen layout as MaxText writes it, NNX-only state in the tree.
  with ocp_v1.training.Checkpointer(tmp_path / 'maxtext') as ckptr:
    ckptr.save_checkpointables(1, {'train_state': LinenCompatSave(state, aux='nnx_aux')})
    models.assert_all_equal(ckptr.load_checkpointables(1, {'train_state': None})['train_state'], items)

  # v1's own PyTree handler keeps the name 'state' for itself; the converted tree goes there as is.
  with ocp_v1.training.Checkpointer(tmp_path / 'plain') as ckptr:
    ckptr.save_checkpointables(1, {'state': to_linen(state)})
    restored = ckptr.load_checkpointables(1, {'state': LinenCompatRestore(abstract)})['state']
  models.assert_all_equal(restored, nnx.state(state))
