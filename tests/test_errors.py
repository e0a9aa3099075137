"""Bad input gets one clear error before any read, and the checkpoint is never touched."""

import jax
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
from models import MLP_RULES
from orbax_linen_nnx import CheckpointNotFoundError, LinenCompatRestore, PlanError, plan


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
  assert "target 'model/fc1/kernel' (16, 32) float32 has no source" in text
  assert "target 'optimizer/opt_state/0/nu/fc2/bias' (8,) float32 has no source" in text
  assert "source 'params/params/Dense_0/kernel' (16, 32) float32 is not used by any target" in text
  assert "rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}" in text
  assert 'partial=True' in text
  assert 'nothing was read' in text


def test_shape_mismatch_names_path_and_both_shapes(linen_run, monkeypatch):
  monkeypatch.setattr(models, 'D_HID', 24)
  with pytest.raises(PlanError) as err:
    ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
  assert ("target 'model/fc1/kernel' (16, 24) float32 cannot be read from source"
          " 'params/params/Dense_0/kernel' (16, 32) float32: shapes differ") in str(err.value)


def test_rule_that_matches_nothing(linen_run):
  with pytest.raises(PlanError, match="rule 'Dense_7' matched no source leaf"):
    ocp.CheckpointManager(linen_run).restore(
        2, args=LinenCompatRestore(abstract_of(), rules={**MLP_RULES, 'Dense_7': 'fc7'}))


def test_partial_restores_what_matches_and_reports_the_rest(linen_run):
  rules = {'Dense_0': 'fc1'}  # fc2 has no source under this rule
  mngr = ocp.CheckpointManager(linen_run)
  p = mngr.restore(2, args=LinenCompatRestore(abstract_of(), rules=rules, partial=True, dry_run=True))
  assert {'/'.join(t.path) for t in p.kept} >= {'model/fc2/kernel', 'optimizer/opt_state/0/mu/fc2/bias'}
  assert 'params.params.Dense_1.kernel' in {s.name for s in p.unused}
  restored = mngr.restore(2, args=LinenCompatRestore(abstract_of(), rules=rules, partial=True))
  assert isinstance(restored['model']['fc1']['kernel'].get_raw_value(), jax.Array)
  assert isinstance(restored['model']['fc2']['kernel'].get_raw_value(), jax.ShapeDtypeStruct)


def test_missing_step(linen_run):
  # Through plan(): a clear error naming the missing directory.
  with pytest.raises(CheckpointNotFoundError, match="2/../99' does not exist|99 does not exist"):
    plan(linen_run / '99', abstract_of())
  # A manager that has seen the run's layout names the missing step itself.
  mngr = ocp.CheckpointManager(linen_run)
  mngr.item_metadata(2)
  with pytest.raises(FileNotFoundError, match='99'):
    mngr.restore(99, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))
  # A fresh manager fails inside Orbax, before this package runs, with Orbax's
  # own (misleading) message; the README tells users to check mngr.all_steps().
  with pytest.raises(ValueError, match='Composite'):
    ocp.CheckpointManager(linen_run).restore(99, args=LinenCompatRestore(abstract_of(), rules=MLP_RULES))


def test_missing_item(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path)
  mngr.save(2, args=ocp.args.Composite(train=ocp.args.StandardSave(models.linen_mlp_state(optax.adam(1e-2)))))
  mngr.wait_until_finished()
  with pytest.raises(KeyError, match='Item "state" was not found'):
    ocp.CheckpointManager(tmp_path).restore(
        2, args=ocp.args.Composite(state=LinenCompatRestore(abstract_of(), rules=MLP_RULES)))


def test_directory_that_is_not_a_checkpoint(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointNotFoundError, match='no _METADATA file'):
    plan(tmp_path / 'empty', abstract_of())
  with pytest.raises(CheckpointNotFoundError, match='does not exist'):
    plan(tmp_path / 'nowhere', abstract_of())


def test_abstract_leaf_that_is_not_an_array(linen_run):
  bad = {'params': {'Dense_0': {'kernel': 'not an array'}}}
  with pytest.raises(TypeError, match="abstract leaf 'params/Dense_0/kernel' is a str"):
    ocp.CheckpointManager(linen_run).restore(2, args=LinenCompatRestore(bad))


def test_plan_function_reads_from_item_or_step_directory(linen_run):
  p1 = plan(linen_run / '2' / 'default', abstract_of(), rules=MLP_RULES)
  p2 = plan(linen_run / '2', abstract_of(), rules=MLP_RULES)
  assert str(p1) == str(p2)


def test_saving_with_restore_args_is_refused(tmp_path):
  with pytest.raises(TypeError, match='StandardSave'):
    mngr = ocp.CheckpointManager(tmp_path)
    mngr.save(1, args=LinenCompatRestore(abstract_of()))
    mngr.wait_until_finished()
