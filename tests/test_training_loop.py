"""A training run's loop, not one call: restore once, train, save every N steps through the same manager.

The run resumes a Linen checkpoint in NNX code and keeps writing Linen checkpoints into the same run
directory, as a run that moved to NNX does: async and sync, with `max_to_keep`, plain and inside
`Composite`, and through Orbax v1's training Checkpointer. The last step is then read back by this
package and by plain Linen code in a process that never imports it.
"""

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1

import models
from helpers import linen_pairs, make_bn_drop, read_with_linen, save, tx
from models import DROP_RULES
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave

SAVE_EVERY = 2
LAST = 8  # the Linen run stopped at step 2; the NNX run saves steps 4, 6 and 8


def resumed_state(mngr, abstract, step, **item):
  """A fresh NNX train state updated from `step` of the manager's run, restored sharded as `abstract` asks."""
  state = make_bn_drop()
  args = LinenCompatRestore(abstract, rules=DROP_RULES)
  restored = mngr.restore(step, args=ocp.args.Composite(**{item['item']: args}) if item else args)
  nnx.update(state, restored[item['item']] if item else restored)
  return state


def train_and_save(state, save_step):
  """Steps 3..LAST of the run, a save every SAVE_EVERY steps (`save_step(step, state)`)."""
  for step in range(3, LAST + 1):
    models.nnx_bn_drop_step(state['model'], state['optimizer'], True)
    if step % SAVE_EVERY == 0:
      save_step(step, state)


def assert_restores_to(mngr, step, abstract, state, **item):
  """`step` restores (LinenCompatRestore, same manager) to `state`'s every leaf, RNG stream included, bit for bit."""
  again = resumed_state(mngr, abstract, step, **item)
  models.assert_all_equal(nnx.state(again), nnx.state(state))


@pytest.mark.parametrize('enable_async', [True, False], ids=['async', 'sync'])
def test_resume_then_save_every_n_steps_through_one_manager(tmp_path, mesh, enable_async):
  save(tmp_path, step=2, what=ocp.args.StandardSave(models.linen_bn_drop_state(tx())))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=enable_async)
  with ocp.CheckpointManager(tmp_path, options=options) as mngr:
    state = resumed_state(mngr, abstract, mngr.latest_step())
    train_and_save(state, lambda step, s: mngr.save(step, args=LinenCompatSave(s, rules=DROP_RULES)))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [6, LAST]  # max_to_keep dropped the Linen step and step 4
    assert_restores_to(mngr, LAST, abstract, state)

  # Plain Linen code (another process, no orbax_linen_nnx) reads the last step and trains on; the NNX run
  # takes the same two steps, dropout off in both: equal to float32 summation order (models.assert_reductions_close).
  out = read_with_linen([{'directory': str(tmp_path), 'step': LAST, 'kind': 'bn_drop', 'steps': 2}])['results'][0]
  assert out['sharded_as_asked'] and out['step'] == LAST + 2
  ours = models.host_values(nnx.state(state))
  for nnx_path, linen_path in linen_pairs().items():
    np.testing.assert_array_equal(
      np.asarray(out['values'][linen_path]).astype(ours[nnx_path].dtype), ours[nnx_path], err_msg=nnx_path
    )
  nnx_losses = [models.nnx_bn_drop_step(state['model'], state['optimizer'], False) for _ in range(2)]
  models.assert_reductions_close(np.array(out['losses']), np.array(nnx_losses), terms=2 * models.BN_STEP_TERMS)


def test_save_loop_inside_composite(tmp_path, mesh):
  """The run's state beside another item (metrics as JSON), every save through one manager."""
  save(
    tmp_path,
    step=2,
    state=ocp.args.StandardSave(models.linen_bn_drop_state(tx())),
    metrics=ocp.args.JsonSave({'loss': 1.0}),
  )
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')
  with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=3)) as mngr:
    state = resumed_state(mngr, abstract, 2, item='state')
    train_and_save(
      state,
      lambda step, s: mngr.save(
        step,
        args=ocp.args.Composite(state=LinenCompatSave(s, rules=DROP_RULES), metrics=ocp.args.JsonSave({'step': step})),
      ),
    )
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 6, LAST]
    assert_restores_to(mngr, LAST, abstract, state, item='state')
    assert mngr.restore(LAST, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))['metrics'] == {'step': LAST}


def test_save_loop_through_orbax_v1(tmp_path, mesh):
  save(tmp_path / 'linen', step=2, what=ocp.args.StandardSave(models.linen_bn_drop_state(tx())))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')
  state = make_bn_drop()
  loaded = ocp_v1.load_checkpointables(
    tmp_path / 'linen' / '2', {'default': LinenCompatRestore(abstract, rules=DROP_RULES)}
  )
  nnx.update(state, loaded['default'])
  with ocp_v1.training.Checkpointer(tmp_path / 'run') as ckptr:
    train_and_save(
      state, lambda step, s: ckptr.save_checkpointables(step, {'train_state': LinenCompatSave(s, rules=DROP_RULES)})
    )
    ckptr.wait()
    assert [s.step for s in ckptr.checkpoints] == [4, 6, LAST]
    again = make_bn_drop()
    nnx.update(
      again,
      ckptr.load_checkpointables(LAST, {'train_state': LinenCompatRestore(abstract, rules=DROP_RULES)})['train_state'],
    )
  models.assert_all_equal(nnx.state(again), nnx.state(state))
