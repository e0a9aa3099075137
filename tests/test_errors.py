"""Bad input gets one clear error before any read, and the checkpoint is never touched."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from models import MLP_RULES
import orbax_linen_nnx
from orbax_linen_nnx import CheckpointNotFoundError, DamagedCheckpointError, LinenCompatRestore, PlanError, layout, plan


@pytest.fixture
def linen_run(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path)
  mngr.save(2, args=ocp.args.StandardSave(models.linen_mlp_state(optax.adam(1e-2))))
  mngr.wait_until_finished()
  return tmp_path


def abstract_of(module_cls=models.NnxMLP):
  return nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(module_cls, optax.adam(1e-2))))


def test_restore_never_writes_to_the_checkpoint(linen_run):
  before = models.tree_hash(linen_run)
  mngr = ocp.CheckpointManager(linen_run)
  mngr.restore(2, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
  with pytest.raises(PlanError):
    mngr.restore(2, args=LinenCompatRestore(abstract_of()))
  mngr.close()
  assert models.tree_hash(linen_run) == before


def test_missing_names_every_target_and_unused_source_with_the_fix(linen_run):
  with pytest.raises(PlanError) as err:
    ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(abstract_of()))
  text = str(err.value)
  # One line a module (its optimizer mirrors counted), leaf by leaf in `details`.
  assert "target module 'fc1' has no source: bias (32,), kernel (16, 32) (+4 optimizer leaves)" in text
  assert "source module 'Dense_0' is not used by any target: bias (32,), kernel (16, 32) (+4 optimizer leaves)" in text
  details = err.value.details
  assert any(
    d.startswith("target 'model/fc1/kernel' (16, 32) float32 has no source (looked for 'model/fc1/kernel')")
    for d in details
  )
  assert any(d.startswith("target 'optimizer/opt_state/0/nu/fc2/bias' (8,) float32 has no source") for d in details)
  assert "source 'params/params/Dense_0/kernel' (16, 32) float32 is not used by any target" in details
  assert "rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}" in text
  assert 'partial=True' in text
  assert 'nothing was read' in text


def test_shape_mismatch_names_path_and_both_shapes(linen_run, monkeypatch):
  monkeypatch.setattr(models, 'D_HID', 24)
  with pytest.raises(PlanError) as err:
    ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
  assert (
    "target 'model/fc1/kernel' (16, 24) float32 cannot be read from source"
    " 'params/params/Dense_0/kernel' (16, 32) float32: shapes differ"
  ) in str(err.value)


def test_rule_that_matches_nothing(linen_run):
  with pytest.raises(PlanError, match="rule 'Dense_7' matched no source leaf"):
    ocp.CheckpointManager(linen_run).restore(
      2, args=LinenCompatRestore(abstract_of(), rules={**MLP_RULES, 'Dense_7': 'fc7'})
    )


def test_a_rule_an_earlier_rule_starved_names_it(tmp_path):
  """A drop written for the name a path had before an earlier rename moved it: the error names that
  rename and the path's new name; the fix it gives (write the drop for the new name) then plans."""
  w = lambda *shape: np.ones(shape, np.float32)
  published = tmp_path / 'gemma'
  ocp.PyTreeCheckpointer().save(
    published, {'transformer/embedder': {'input_embedding': w(8, 4), 'mm_input_projection': {'w': w(4, 4)}}}
  )
  target = {'embedder': {'input_embedding': jax.ShapeDtypeStruct((8, 4), np.float32)}}
  moved = orbax_linen_nnx.rename({'transformer/embedder': 'embedder'})
  with pytest.raises(PlanError) as e:
    plan(
      published,
      target,
      target_layout='nnx',
      rules=[moved, orbax_linen_nnx.drop('transformer/embedder/mm_input_projection')],
    )
  assert (
    "rule 'drop('transformer/embedder/mm_input_projection')' matched no source leaf: rename({'transformer/embedder':"
    " 'embedder'}), earlier in the list, moved 'transformer/embedder/mm_input_projection/w' (which it matches)"
    " to 'embedder/mm_input_projection/w'"
  ) in str(e.value)
  fixed = plan(
    published, target, target_layout='nnx', rules=[moved, orbax_linen_nnx.drop('embedder/mm_input_projection')]
  )
  assert [s.name for s, _ in fixed.dropped] == ['transformer/embedder.mm_input_projection.w']
  # A rule that matched nothing for no such reason: the closest paths it saw.
  with pytest.raises(
    PlanError,
    match="rule 'drop..embeder/mm_input_proj..' matched no source leaf; the closest"
    " paths when it ran: 'embedder/mm_input_projection/w'",
  ):
    plan(published, target, target_layout='nnx', rules=[moved, orbax_linen_nnx.drop('embeder/mm_input_proj')])


def test_partial_restores_what_matches_and_reports_the_rest(linen_run):
  rules = {'Dense_0': 'fc1'}  # fc2 has no source under this rule
  mngr = ocp.CheckpointManager(linen_run)
  p = mngr.restore(2, args=LinenCompatRestore(abstract_of(), rules=rules, partial=True, dry_run=True))
  assert {'/'.join(t.path) for t in p.kept} >= {'model/fc2/kernel', 'optimizer/opt_state/0/mu/fc2/bias'}
  assert 'params.params.Dense_1.kernel' in {s.name for s in p.unused}
  with pytest.warns(orbax_linen_nnx.LinenCompatWarning, match='model/fc2/kernel'):
    restored = mngr.restore(2, args=LinenCompatRestore(abstract_of(), rules=rules, partial=True))
  assert isinstance(restored['model']['fc1']['kernel'].get_raw_value(), jax.Array)
  assert 'fc2' not in restored['model']  # left out of the nnx.State: nnx.update keeps the model's own


def test_missing_step(linen_run):
  # Through plan(): a clear error naming the missing directory, and the steps the run holds.
  with pytest.raises(
    CheckpointNotFoundError,
    match=f"{linen_run}/99 does not exist; {linen_run} holds the"
    r" finished steps \[2\]",
  ):
    plan(linen_run / '99', abstract_of())
  with pytest.raises(CheckpointNotFoundError, match=f'{linen_run}/99/default does not exist; {linen_run} holds'):
    plan(linen_run / '99' / 'default', abstract_of())
  # restore() of a run directory: the step asked for, or by default the latest finished one.
  with pytest.raises(
    CheckpointNotFoundError,
    match=rf'{linen_run} holds no finished step 99; its finished steps are'
    r' \[2\]',
  ):
    orbax_linen_nnx.restore(linen_run, abstract_of(), step=99, rules=MLP_RULES)
  with pytest.raises(CheckpointNotFoundError, match='holds no finished step 99; its finished steps are \\[2\\]'):
    orbax_linen_nnx.restore(ocp.CheckpointManager(linen_run), abstract_of(), step=99, rules=MLP_RULES)
  latest = orbax_linen_nnx.restore(linen_run, abstract_of(), rules=MLP_RULES)
  assert int(latest['optimizer']['step'].get_value()) == 2
  assert orbax_linen_nnx.plan(linen_run, abstract_of(), rules=MLP_RULES) == orbax_linen_nnx.plan(
    linen_run / '2' / 'default', abstract_of(), rules=MLP_RULES
  )
  # A manager that has seen the run's layout names the missing step itself.
  mngr = ocp.CheckpointManager(linen_run)
  mngr.item_metadata(2)
  with pytest.raises(FileNotFoundError, match='99'):
    mngr.restore(99, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
  # A fresh manager fails inside Orbax, before this package runs, with Orbax's
  # own (misleading) message; the docs (Errors) tell users to check mngr.all_steps().
  with pytest.raises(ValueError, match='Composite'):
    ocp.CheckpointManager(linen_run).restore(99, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))


def test_missing_item(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path)
  mngr.save(2, args=ocp.args.Composite(train=ocp.args.StandardSave(models.linen_mlp_state(optax.adam(1e-2)))))
  mngr.wait_until_finished()
  with pytest.raises(KeyError, match='Item "state" was not found'):
    ocp.CheckpointManager(tmp_path).restore(
      2, args=ocp.args.Composite(state=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
    )


def test_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointNotFoundError, match='no _METADATA file'):
    plan(tmp_path / 'empty', abstract_of())
  with pytest.raises(CheckpointNotFoundError, match='does not exist'):
    plan(tmp_path / 'nowhere', abstract_of())


def test_abstract_leaves_that_are_not_arrays_are_reported_together(linen_run):
  bad = {'params': {'Dense_0': {'kernel': 'not an array', 'bias': 3}, 'Dense_1': {'kernel': nnx.Param(1.5)}}}
  with pytest.raises(PlanError) as e:
    ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(bad))
  msg = str(e.value)
  for leaf in (
    "'params/Dense_0/kernel' is a str",
    "'params/Dense_0/bias' is a int",
    "'params/Dense_1/kernel' is a float",
  ):
    assert leaf in msg
  assert 'jax.ShapeDtypeStruct' in msg and 'nothing was read' in msg


def test_plan_function_reads_from_item_or_step_directory(linen_run):
  p1 = plan(linen_run / '2' / 'default', abstract_of(), rules=MLP_RULES)
  p2 = plan(linen_run / '2', abstract_of(), rules=MLP_RULES)
  assert str(p1) == str(p2)


def test_saving_with_restore_args_is_refused(tmp_path):
  with pytest.raises(TypeError, match=r'only restores. Save with LinenCompatSave\(state\) .* or ocp.args.StandardSave'):
    mngr = ocp.CheckpointManager(tmp_path)
    mngr.save(1, args=LinenCompatRestore(abstract_of()))
    mngr.wait_until_finished()


class PartitionedMLP(nnx.Module):
  """Initializers carry their partitioning, as NNX 0.12 models do."""

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.fc1 = nnx.Linear(
      models.D_IN, models.D_HID, kernel_init=nnx.with_partitioning(init, ('data', 'model')), rngs=rngs
    )
    self.fc2 = nnx.Linear(
      models.D_HID, models.D_OUT, kernel_init=nnx.with_partitioning(init, ('model', None)), rngs=rngs
    )


def partitioned_state():
  model = PartitionedMLP(nnx.Rngs(0))
  return {'model': model, 'optimizer': nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)}


def test_abstract_mesh_shardings_from_set_mesh(linen_run, mesh):
  """The NNX 0.12 recipe: nnx.eval_shape under jax.set_mesh gives shardings over an AbstractMesh."""
  with jax.set_mesh(mesh):
    abstract = nnx.state(nnx.eval_shape(partitioned_state))
  kernel = abstract['model']['fc1']['kernel'].get_raw_value()
  assert isinstance(kernel.sharding.mesh, jax.sharding.AbstractMesh)
  mngr = ocp.CheckpointManager(linen_run)

  with pytest.raises(PlanError) as e:  # no mesh in context: one error naming every such leaf
    mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  msg = str(e.value)
  assert 'AbstractMesh (data=4, model=2)' in msg and 'jax.set_mesh' in msg and 'mesh=' in msg
  assert "'model/fc1/kernel'" in msg and "'model/fc2/kernel'" in msg and "'optimizer/opt_state/0/mu/fc1/kernel'" in msg

  with jax.set_mesh(mesh):  # the mesh in context
    in_context = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES))
  passed = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, mesh=mesh))  # or passed
  linen = models.flat(models.linen_mlp_state(optax.adam(1e-2)))
  for restored in (in_context, passed):
    kernel = restored['model']['fc1']['kernel'].get_raw_value()
    assert kernel.sharding == NamedSharding(mesh, P('data', 'model'))
    np.testing.assert_array_equal(np.asarray(kernel), linen['params/params/Dense_0/kernel'])
    assert restored['optimizer']['opt_state'][0]['nu']['fc2']['kernel'].get_raw_value().sharding.spec == P(
      'model', None
    )


def test_sharding_problems_are_found_while_planning_all_together(linen_run, mesh, monkeypatch):
  """The issue's case: (16, 10) and (10, 8) kernels split 4 ways along their 10 rows/columns."""
  monkeypatch.setattr(models, 'D_HID', 10)
  specs = {('model', 'fc1', 'kernel'): P(None, 'data'), ('model', 'fc2', 'kernel'): P('data')}

  def put(path, v):
    value = v.get_raw_value()
    spec = specs.get(layout.key_path(path), P())
    return v.copy(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

  abstract = jax.tree_util.tree_map_with_path(put, abstract_of(), is_leaf=lambda x: isinstance(x, nnx.Variable))
  before = models.tree_hash(linen_run)
  for attempt in (
    lambda: plan(linen_run / '2', abstract, rules=MLP_RULES, replica_axis='dp'),
    lambda: ocp.CheckpointManager(linen_run).restore(
      2, args=LinenCompatRestore(abstract, rules=MLP_RULES, replica_axis='dp')
    ),
  ):
    with pytest.raises(PlanError) as e:
      attempt()
    msg = str(e.value)
    assert (
      "target 'model/fc1/kernel' (16, 10): dimension 1 (10) is not divisible by mesh axes ('data',) (size 4)"
    ) in msg
    assert "target 'model/fc2/kernel' (10, 8): dimension 0 (10) is not divisible" in msg
    assert "replica_axis='dp' is no axis of the target meshes (axes: 'data', 'model')" in msg
    assert 'shapes differ' in msg  # with the plan's own problems, in one error
  assert models.tree_hash(linen_run) == before


def test_rules_of_the_wrong_type_name_the_option(linen_run):
  for bad in (42, 'Dense_0', [{'Dense_0': 'fc1'}]):
    with pytest.raises(PlanError, match='rules= must be') as e:
      plan(linen_run / '2', abstract_of(), rules=bad)
    assert '\n' not in str(e.value)  # said alone, not among every leaf it then could not pair


def test_truncated_metadata_names_the_file(linen_run):
  meta = linen_run / '2' / 'default' / '_METADATA'
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])
  for attempt in (
    lambda: plan(linen_run / '2', abstract_of(), rules=MLP_RULES),
    lambda: ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES)),
  ):
    with pytest.raises(DamagedCheckpointError) as e:
      attempt()
    assert str(meta) in str(e.value) and 'JSONDecodeError' in str(e.value) and 'all_steps()' in str(e.value)


def test_a_step_orbax_is_still_writing_is_refused(linen_run):
  (linen_run / '2').rename(linen_run / '2.orbax-checkpoint-tmp-1700000000')
  with pytest.raises(DamagedCheckpointError, match='has not finished writing'):
    plan(linen_run / '2.orbax-checkpoint-tmp-1700000000', abstract_of(), rules=MLP_RULES)
  with pytest.raises(DamagedCheckpointError, match='save is still running or was interrupted'):
    orbax_linen_nnx.restore(linen_run / '2.orbax-checkpoint-tmp-1700000000', abstract_of(), rules=MLP_RULES)


def test_missing_array_data_names_the_arrays(linen_run):
  for f in (linen_run / '2' / 'default').rglob('*'):
    if f.is_file() and f.parent.name == 'd':  # OCDBT data files
      f.unlink()
  with pytest.raises(DamagedCheckpointError) as e:
    plan(linen_run / '2', abstract_of(), rules=MLP_RULES)
  assert "'params/params/Dense_0/kernel'" in str(e.value) and 'missing or damaged' in str(e.value)


def test_unreadable_array_metadata_names_the_file(linen_run):
  for f in (linen_run / '2' / 'default' / 'array_metadatas').iterdir():
    f.write_text('{not json')
  with pytest.raises(DamagedCheckpointError, match='array_metadatas is damaged'):
    plan(linen_run / '2', abstract_of(), rules=MLP_RULES)


class MLPWithExtraLayer(models.NnxMLP):
  def __init__(self, rngs: nnx.Rngs):
    super().__init__(rngs)
    self.fc3 = nnx.Linear(models.D_OUT, models.D_OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc3(super().__call__(x))


def test_partial_leaves_what_it_did_not_fill_to_the_model(linen_run):
  """A model with an extra fc3, restored with partial=True into an nnx.State: fc3 is left out, and
  nnx.update keeps the fresh model's fc3 (warned, and kept in the plan), so the model runs."""
  mngr = ocp.CheckpointManager(linen_run)
  abstract = abstract_of(MLPWithExtraLayer)
  with pytest.warns(orbax_linen_nnx.LinenCompatWarning, match='model/fc3/kernel.*nnx.update'):
    restored = mngr.restore(2, args=LinenCompatRestore(abstract, rules=MLP_RULES, partial=True))
  assert 'fc3' not in restored['model'] and 'fc3' not in restored['optimizer']['opt_state'][0]['mu']
  assert not orbax_linen_nnx.not_restored(restored)
  ts = models.nnx_train_state(MLPWithExtraLayer, optax.adam(1e-2))
  fresh = np.asarray(ts['model'].fc3.kernel.get_value())
  nnx.update(ts, restored)
  np.testing.assert_array_equal(np.asarray(ts['model'].fc3.kernel.get_value()), fresh)
  np.testing.assert_array_equal(
    np.asarray(ts['model'].fc1.kernel.get_value()), np.asarray(restored['model']['fc1']['kernel'].get_value())
  )
  assert ts['model'](np.ones((1, models.D_IN), np.float32)).shape == (1, models.D_OUT)


def test_a_placeholder_can_be_looked_at_but_not_used(linen_run, mesh):
  """A plain pytree target has no model to keep values: unfilled leaves hold NotRestored, which
  flattens, maps and prints, and raises NotRestoredError naming the leaf wherever it is used as an array."""
  mngr = ocp.CheckpointManager(linen_run)
  pure = models.shard_abstract(nnx.to_pure_dict(abstract_of(MLPWithExtraLayer)), mesh, 'two_axes')
  with pytest.warns(orbax_linen_nnx.LinenCompatWarning, match='NotRestored placeholders.*model/fc3/kernel'):
    restored = mngr.restore(2, args=LinenCompatRestore(pure, rules=MLP_RULES, partial=True))
  missing = orbax_linen_nnx.not_restored(restored)
  assert {'model/fc3/kernel', 'model/fc3/bias', 'optimizer/opt_state/0/mu/fc3/kernel'} <= set(missing)
  shapes = jax.tree.map(lambda a: a.shape, restored)
  assert shapes['model']['fc3']['kernel'] == (models.D_OUT, models.D_OUT)
  assert shapes['model']['fc1']['kernel'] == (models.D_IN, models.D_HID)
  assert len(jax.tree.leaves(restored)) == len(jax.tree.leaves(pure))
  assert "NotRestored('model/fc3/kernel'" in repr(restored['model']['fc3'])
  kernel = restored['model']['fc3']['kernel']
  assert isinstance(kernel, jax.ShapeDtypeStruct) and kernel.sharding == pure['model']['fc3']['kernel'].sharding
  x = np.ones((1, models.D_OUT), np.float32)
  for use in (
    lambda: x @ kernel,
    lambda: jax.numpy.dot(x, kernel),
    lambda: jax.jit(lambda k: x @ k)(kernel),
    lambda: jax.device_put(kernel),
    lambda: np.asarray(kernel),
    lambda: jax.eval_shape(jnp_sum, kernel),
  ):
    with pytest.raises(orbax_linen_nnx.NotRestoredError, match="'model/fc3/kernel' .* was not restored.*nnx.update"):
      use()
  # Filled by hand, the tree restores the model.
  ts = models.nnx_train_state(MLPWithExtraLayer, optax.adam(1e-2))
  fresh = nnx.to_pure_dict(nnx.state(ts))
  filled = jax.tree.map(lambda r, f: f if isinstance(r, orbax_linen_nnx.NotRestored) else r, restored, fresh)
  state = nnx.state(ts)
  nnx.replace_by_pure_dict(state, filled)
  nnx.update(ts, state)
  assert ts['model'](np.ones((1, models.D_IN), np.float32)).shape == (1, models.D_OUT)


def jnp_sum(a):
  return a.sum()


def test_partial_into_an_initialised_state_keeps_its_values(linen_run):
  """With an initialised model's state as the target, kept leaves keep its values: nothing to fill."""
  mngr = ocp.CheckpointManager(linen_run)
  concrete = nnx.state(models.nnx_train_state(MLPWithExtraLayer, optax.adam(1e-2)))
  fresh = concrete['model']['fc3']['kernel'].get_raw_value()
  restored = mngr.restore(2, args=LinenCompatRestore(concrete, rules=MLP_RULES, partial=True))
  assert not orbax_linen_nnx.not_restored(restored)
  np.testing.assert_array_equal(np.asarray(restored['model']['fc3']['kernel'].get_raw_value()), np.asarray(fresh))
  ts = models.nnx_train_state(MLPWithExtraLayer, optax.adam(1e-2))
  nnx.update(ts, restored)
  assert ts['model'](np.ones((1, models.D_IN), np.float32)).shape == (1, models.D_OUT)


def test_leaves_without_a_sharding_join_the_mesh_the_others_use(tmp_path, mesh):
  """Replicated on the one mesh the other targets use; a large one noted in the plan and warned of (every
  device holds all of it); on several meshes, a problem naming mesh=, whose fix then restores."""
  big = np.arange(1024 * 4200, dtype=np.float32).reshape(1024, 4200)  # 16.4 MiB, above UNSHARDED_NOTE_BYTES
  ocp.PyTreeCheckpointer().save(
    tmp_path / 'c', {'embed': big, 'w': np.ones((8, 8), np.float32), 'v': np.ones((8,), np.float32)}
  )
  other = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b'))
  target = {
    'embed': jax.ShapeDtypeStruct(big.shape, np.float32),
    'w': jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P('data', 'model'))),
    'v': jax.ShapeDtypeStruct((8,), np.float32, sharding=NamedSharding(mesh, P('data'))),
  }
  notes = plan(tmp_path / 'c', target).notes
  assert notes == (
    '1 target(s) give no sharding: replicated on the mesh (data=4, model=2) the others use',
    "'embed' (16.4 MiB) gives no sharding: replicated, every one of the 8 devices holds all of it"
    ' (131.2 MiB in all); give it a sharding to split it',
  )
  with pytest.warns(orbax_linen_nnx.LinenCompatWarning, match="'embed' .16.4 MiB. gives no sharding"):
    restored = orbax_linen_nnx.restore(tmp_path / 'c', target)
  assert restored['embed'].sharding == NamedSharding(mesh, P())
  np.testing.assert_array_equal(np.asarray(restored['embed']), big)
  # The restored arrays compute together in one jit (one mesh). XLA's sum and numpy's reduce in other
  # orders; both reduce pairwise, so each is within about log2(n) * eps of the exact sum (Higham, section
  # 4.2), and they within twice that of each other (they were seen one ulp apart).
  total = float(jax.jit(lambda e, w: e.sum() + w.sum())(restored['embed'], restored['w']))
  exact = float(big.astype(np.float64).sum()) + 64
  assert abs(total - exact) <= 2 * np.ceil(np.log2(big.size)) * np.finfo(np.float32).eps * exact

  target['v'] = jax.ShapeDtypeStruct((8,), np.float32, sharding=NamedSharding(other, P('b')))
  with pytest.raises(
    PlanError,
    match=r"1 target\(s\) give no sharding \('embed'\) and the others use 2 meshes"
    r' \(a=2, b=4; data=4, model=2\): say which one they are replicated on with'
    r' LinenCompatRestore\(..., mesh=mesh\)',
  ):
    plan(tmp_path / 'c', target)
  with pytest.warns(orbax_linen_nnx.LinenCompatWarning):
    restored = orbax_linen_nnx.restore(tmp_path / 'c', target, mesh=other)
  assert restored['embed'].sharding == NamedSharding(other, P())
