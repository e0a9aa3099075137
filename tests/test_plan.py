"""The plan, from paths and shapes alone: no checkpoint, no IO."""

import numpy as np
import pytest

from orbax_linen_nnx import PlanError, layout
from orbax_linen_nnx.planner import build
from helpers import src, tgt

F32 = np.dtype('float32')


def meanings(paths, kind):
  return {'/'.join(l.path): str(l.meaning) for l in layout.describe([tuple(p.split('/')) for p in paths], kind)}


def test_linen_train_state_with_variables_as_params():
  m = meanings(
    [
      'params/params/Dense_0/kernel',
      'params/batch_stats/BN_0/mean',
      'opt_state/0/count',
      'opt_state/0/mu/params/Dense_0/kernel',
      'step',
    ],
    'linen',
  )
  assert m == {
    'params/params/Dense_0/kernel': 'model/Dense_0/kernel',
    'params/batch_stats/BN_0/mean': 'model/BN_0/mean',
    'opt_state/0/count': 'opt_state/0/count',
    'opt_state/0/mu/params/Dense_0/kernel': 'opt_state/0/mu/Dense_0/kernel',
    'step': 'step',
  }


def test_linen_train_state_with_batch_stats_field():
  leaves = layout.describe(
    [
      ('params', 'Dense_0', 'kernel'),
      ('batch_stats', 'BN_0', 'mean'),
      ('opt_state', '0', 'nu', 'Dense_0', 'kernel'),
      ('step',),
    ],
    'linen',
  )
  assert [(str(l.meaning), l.collection) for l in leaves] == [
    ('model/Dense_0/kernel', 'params'),
    ('model/BN_0/mean', 'batch_stats'),
    ('opt_state/0/nu/Dense_0/kernel', None),
    ('step', None),
  ]


def test_nnx_checkpoint_paths():
  m = meanings(
    [
      'model/fc1/kernel/value',
      'optimizer/opt_state/0/mu/fc1/kernel/value',
      'optimizer/opt_state/0/count/value',
      'optimizer/step/value',
    ],
    'nnx',
  )
  assert list(m.values()) == ['model/fc1/kernel', 'opt_state/0/mu/fc1/kernel', 'opt_state/0/count', 'step']


def test_optimizer_subtrees_that_mirror_params_anywhere():
  """inject_hyperparams and chains nest the moments deeper; hyperparameters mirror nothing."""
  m = meanings(
    [
      'params/Dense_0/kernel',
      'params/Dense_0/bias',
      'step',
      'opt_state/hyperparams/learning_rate',
      'opt_state/inner_state/1/0/mu/Dense_0/kernel',
      'opt_state/inner_state/1/0/mu/Dense_0/bias',
      'opt_state/inner_state/1/0/count',
    ],
    'linen',
  )
  assert m['opt_state/inner_state/1/0/mu/Dense_0/kernel'] == 'opt_state/inner_state/1/0/mu/Dense_0/kernel'
  leaves = layout.describe([tuple(p.split('/')) for p in m], 'linen')
  mu = [l for l in leaves if 'mu' in l.path]
  assert all(l.meaning.section == ('opt_state', 'inner_state', '1', '0', 'mu') for l in mu)
  hyper = [l for l in leaves if 'hyperparams' in l.path][0]
  assert hyper.meaning.param == ()


def test_detect():
  assert layout.detect([('model', 'fc1', 'kernel', 'value')]) == 'nnx'
  assert layout.detect([('model', 'fc1', 'kernel'), ('optimizer', 'step')]) == 'nnx'
  assert layout.detect([('params', 'params', 'Dense_0', 'kernel'), ('step',)]) == 'linen'
  assert layout.detect([('fc1', 'kernel', 'value')]) == 'nnx'


def test_build_pairs_and_casts_step():
  sources = [
    src('params/params/Dense_0/kernel'),
    src('step', (), 'int32'),
    src('opt_state/0/mu/params/Dense_0/kernel'),
    src('opt_state/0/count', (), 'int32'),
  ]
  targets = [
    tgt('model/fc1/kernel', variable_type='Param'),
    tgt('optimizer/step', (), 'uint32'),
    tgt('optimizer/opt_state/0/mu/fc1/kernel'),
    tgt('optimizer/opt_state/0/count', (), 'int32'),
  ]
  p = build(sources, targets, source_layout='linen', target_layout='nnx', rules={'Dense_0': 'fc1'})
  assert len(p.reads) == 4 and not p.kept and not p.unused
  assert p.read_for('model/fc1/kernel').sources[0].name == 'params.params.Dense_0.kernel'
  assert p.read_for('optimizer/opt_state/0/mu/fc1/kernel').sources[0].name == 'opt_state.0.mu.params.Dense_0.kernel'
  assert str(p.read_for('optimizer/step').transform[0]) == 'cast int32 -> uint32'
  assert p.read_for('optimizer/opt_state/0/count').transform == ()


def test_same_rules_serve_the_reverse_direction():
  sources = [src('model/fc1/kernel/value'), src('optimizer/step/value', (), 'uint32')]
  targets = [tgt('params/Dense_0/kernel'), tgt('step', (), 'int32')]
  p = build(sources, targets, source_layout='nnx', target_layout='linen', rules={'Dense_0': 'fc1'})
  assert p.read_for('params/Dense_0/kernel').sources[0].name == 'model.fc1.kernel.value'


def test_callable_rules():
  rename = lambda path: (f'fc{int(path[0].split("_")[1]) + 1}',) + path[1:]
  p = build(
    [src('params/Dense_0/kernel'), src('params/Dense_1/kernel')],
    [tgt('fc1/kernel'), tgt('fc2/kernel')],
    source_layout='linen',
    target_layout='nnx',
    rules=rename,
  )
  assert p.read_for('fc2/kernel').sources[0].name == 'params.Dense_1.kernel'


def test_rules_that_cannot_be_inverted():
  with pytest.raises(ValueError, match='cannot be inverted'):
    build(
      [src('model/fc/kernel/value')],
      [tgt('params/Dense_0/kernel')],
      source_layout='nnx',
      target_layout='linen',
      rules={'Dense_0': 'fc', 'Dense_1': 'fc'},
    )


def test_collection_must_match_variable_type():
  sources = [src('params/Dense_0/kernel'), src('batch_stats/BN_0/mean', (8,)), src('step', (), 'int32')]
  targets = [
    tgt('model/fc1/kernel', variable_type='Param'),
    tgt('model/bn/mean', (8,), variable_type='Param'),
    tgt('optimizer/step', (), 'uint32'),
  ]
  with pytest.raises(
    PlanError,
    match=r"target 'model/bn/mean' \(8,\) float32 is an nnx.Param but source"
    r" 'batch_stats/BN_0/mean' \(8,\) float32 is in Linen collection 'batch_stats'",
  ):
    build(sources, targets, source_layout='linen', target_layout='nnx', rules={'Dense_0': 'fc1', 'BN_0': 'bn'})


def test_two_sources_for_one_meaning_is_an_error():
  with pytest.raises(
    PlanError, match="rename 'Dense_0' makes 'fc1/kernel', which the checkpoint already holds under that name"
  ):
    build(
      [src('params/Dense_0/kernel'), src('params/fc1/kernel')],
      [tgt('fc1/kernel')],
      source_layout='linen',
      target_layout='nnx',
      rules={'Dense_0': 'fc1'},
    )


def test_nnx_only_targets_are_kept_and_nnx_only_sources_skipped():
  p = build(
    [src('params/Dense_0/kernel')],
    [
      tgt('Dense_0/kernel'),
      tgt('to_nnx__rngs/params/key', (), 'uint32', 'RngKey'),
      tgt('drop/rngs/count', (), 'uint32'),
    ],
    source_layout='linen',
    target_layout='nnx',
  )
  assert [layout.render(t.path) for t in p.kept] == ['to_nnx__rngs/params/key', 'drop/rngs/count']
  p = build(
    [src('fc/kernel/value'), src('drop/rngs/key/value', (2,), 'uint32')],
    [tgt('params/fc/kernel')],
    source_layout='nnx',
    target_layout='linen',
  )
  assert [s.name for s in p.skipped] == ['drop.rngs.key.value']


def test_plan_is_deterministic_and_printable():
  args = dict(source_layout='linen', target_layout='nnx', rules={'Dense_0': 'fc1'})
  sources = [src('params/Dense_0/kernel'), src('params/Dense_0/bias', (8,))]
  targets = [tgt('fc1/bias', (8,)), tgt('fc1/kernel')]
  a = build(sources, targets, **args)
  b = build(list(reversed(sources)), targets, **args)
  assert a == b
  assert str(a).splitlines()[1] == '  fc1/bias (8,) float32  <-  params.Dense_0.bias  (by rename Dense_0)'


def test_optimizer_mirrors_in_any_layer_name_form():
  """Moments named `layers_0` mirror params named `layers/0`; per-layer moments mirror stacked params."""
  paths = [
    ('model', 'layers', '0', 'mlp', 'kernel', 'value'),
    ('model', 'stack', 'mlp', 'kernel', 'value'),
    ('optimizer', 'opt_state', '0', 'mu', 'layers_0', 'mlp', 'kernel'),
    ('optimizer', 'opt_state', '0', 'mu', 'stack_1', 'mlp', 'kernel'),
    ('optimizer', 'opt_state', '0', 'count'),
  ]
  leaves = layout.describe(paths, 'nnx')
  mu = ('opt_state', '0', 'mu')
  assert [l.meaning for l in leaves[2:]] == [
    layout.Meaning(mu, ('layers_0', 'mlp', 'kernel')),
    layout.Meaning(mu, ('stack_1', 'mlp', 'kernel')),
    layout.Meaning(('opt_state', '0', 'count')),
  ]


def test_a_source_that_reads_like_a_missing_target_says_why_it_is_not_used():
  sources = [
    src('model/fc/kernel/value'),
    src('optimizer/opt_state/0/mu/fc/kernel'),
    src('optimizer/opt_state/0/mu/extra', ()),
  ]
  targets = [tgt('model/fc/kernel'), tgt('optimizer/opt_state/0/mu/fc/kernel')]
  with pytest.raises(PlanError) as e:
    build(sources, targets, source_layout='nnx', target_layout='nnx')
  msg = str(e.value)
  assert "looked for 'opt_state/0/mu/fc/kernel'" in msg
  assert "reads like 'opt_state/0/mu/fc/kernel', but is not read as a mirror of model variable 'fc/kernel'" in msg


def test_nnx_aux_holds_nnx_state_of_the_model():
  leaves = layout.describe(
    [
      ('params', 'params', 'bn', 'scale'),
      ('nnx_aux', 'model', 'bn', 'mean'),
      ('nnx_aux', 'model', 'drop', 'rngs', 'key'),
      ('step',),
      ('opt_state', '0', 'count'),
    ],
    'linen',
  )
  assert [(str(l.meaning), l.collection) for l in leaves] == [
    ('model/bn/scale', 'params'),
    ('model/bn/mean', 'nnx_aux'),
    ('model/drop/rngs/key', 'nnx_aux'),
    ('step', None),
    ('opt_state/0/count', None),
  ]
  plan = build(
    [src('params/params/bn/scale', (4,)), src('nnx_aux/model/bn/mean', (4,)), src('step', (), 'int32')],
    [
      tgt('model/bn/scale', (4,), variable_type='Param'),
      tgt('model/bn/mean', (4,), variable_type='BatchStat'),
      tgt('optimizer/step', (), 'uint32', 'OptState'),
    ],
    source_layout='linen',
    target_layout='nnx',
    partial=True,
  )
  assert plan.read_for('model/bn/mean').sources[0].name == 'nnx_aux.model.bn.mean'
  with pytest.raises(PlanError, match="is an nnx.Param but source 'nnx_aux/model/bn/mean'"):
    build(
      [src('params/params/bn/scale', (4,)), src('nnx_aux/model/bn/mean', (4,))],
      [tgt('model/bn/scale', (4,), variable_type='Param'), tgt('model/bn/mean', (4,), variable_type='Param')],
      source_layout='linen',
      target_layout='nnx',
    )


@pytest.mark.parametrize(
  'linen_shape, nnx_shape, fix',
  [
    ((8, 3), (3, 8), "add transpose('fc/kernel', (1, 0)) at the end of rules="),
    ((2, 3, 4), (4, 3, 2), "add transpose('fc/kernel', (2, 1, 0)) at the end of rules="),
    ((4, 6), (4, 2, 3), "add reshape('fc/kernel', (4, 6), (4, 2, 3)) at the end of rules="),
    ((4, 6), (4, 7), 'only dimension 1 differs (7 in the target, 6 in the checkpoint)'),
  ],
)
def test_shape_mismatch_proposes_the_rule_that_fits(linen_shape, nnx_shape, fix):
  with pytest.raises(PlanError) as e:
    build(
      [src('params/fc/kernel', linen_shape)], [tgt('fc/kernel', nnx_shape)], source_layout='linen', target_layout='nnx'
    )
  assert 'shapes differ; ' + fix in str(e.value) or fix in str(e.value)
  if 'add ' in fix:  # the proposed rule, applied, plans
    import orbax_linen_nnx as oln

    rule = eval(fix.split('add ')[1].split(' at the end')[0], {'transpose': oln.transpose, 'reshape': oln.reshape})
    plan = build(
      [src('params/fc/kernel', linen_shape)],
      [tgt('fc/kernel', nnx_shape)],
      source_layout='linen',
      target_layout='nnx',
      rules=[rule],
    )
    assert plan.read_for('fc/kernel').target.shape == nnx_shape


def test_shape_fix_going_back_is_stated_linen_to_nnx():
  with pytest.raises(PlanError, match=r"add transpose\('fc/kernel', \(1, 0\)\) first in rules="):
    build(
      [src('model/fc/kernel/value', (3, 8))],
      [tgt('params/fc/kernel', (8, 3))],
      source_layout='nnx',
      target_layout='linen',
    )


def test_stacks_naming_no_model_path_is_an_error():
  sources = [src('params/layers_0/k', (2, 2)), src('params/layers_1/k', (2, 2))]
  targets = [tgt('layers/k', (2, 2, 2))]
  with pytest.raises(
    PlanError, match=r"stacks= names 'blocks', which is no model path .* \(layer stacks found: 'layers'\)"
  ):
    build(sources, targets, source_layout='linen', target_layout='nnx', stacks={'blocks': {'nnx': 0}})
  with pytest.raises(PlanError, match=r"stacks= must be a dict like"):
    build(sources, targets, source_layout='linen', target_layout='nnx', stacks=[('layers', 0)])
