"""What ports written as users write them meet: per-block attributes, abstract targets from `nnx.eval_shape`,
`rules='auto'` on every face (never doing nothing in silence), a port's own train state saved back, and what a
convert leaves out. Each story goes past the call: the restored model computes and trains like the Linen one,
and plain Orbax reads what was written."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import models
import ports
from helpers import TESTS, save
from orbax_linen_nnx import (
  LinenCompatRestore,
  LinenCompatSave,
  PlanError,
  cli,
  compare,
  inspection,
  plan,
  rename,
  source,
)


def linen_run(directory, module, d_in=ports.D_IN):
  variables = ports.linen_variables(module, d_in)
  save(directory, variables)
  return variables


def restored_model(directory, make, rules, **options):
  model = make()
  abstract = nnx.state(nnx.eval_shape(make))
  with ocp.CheckpointManager(directory) as mngr:
    nnx.update(model, mngr.restore(1, args=LinenCompatRestore(abstract, rules=rules, **options)))
  return model


def assert_computes_like_linen(model, module, variables, d_in=ports.D_IN, d_out=ports.D_OUT):
  """Forward outputs, then the loss after one SGD step, agree with Linen's to float32 summation order."""
  x, y = ports.batch(d_in=d_in, d_out=d_out)
  models.assert_reductions_close(model(x), module.apply(variables, x), terms=ports.STEP_TERMS)
  loss = lambda out: jnp.mean((out - y) ** 2)
  grads = jax.grad(lambda v: loss(module.apply(v, x)))(variables)
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, variables, grads)
  nnx_grads = nnx.grad(lambda m: loss(m(x)))(model)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), nnx_grads))
  models.assert_reductions_close(loss(model(x)), loss(module.apply(stepped, x)), terms=2 * ports.STEP_TERMS)


# ---------------------------------------------------------------- attributes named name_N


@pytest.mark.parametrize('target', ['module', 'eval_shape'])
def test_setattr_blocks_stay_attributes_and_auto_pairs_them(tmp_path, target):
  variables = linen_run(tmp_path, ports.LNet())
  make = lambda: ports.Net(nnx.Rngs(1))
  abstract = make() if target == 'module' else nnx.state(nnx.eval_shape(make))
  p = plan(tmp_path, abstract, rules='auto')
  assert p.inferred_renames == ports.NET_RULES
  guesses = [n for n in p.notes if 'a guess' in n]
  # An initialised module keeps its attribute order; eval_shape sorts it away and the numbers are a stated guess.
  assert bool(guesses) == (target == 'eval_shape'), p.notes
  assert {r.target.path[0] for r in p.reads} == {'inp', 'head', 'block_0', 'block_1', 'block_2'}
  by_hand = restored_model(tmp_path, make, ports.NET_RULES)
  auto = restored_model(tmp_path, make, 'auto')
  models.assert_all_equal(nnx.state(auto), nnx.state(by_hand))
  assert_computes_like_linen(auto, ports.LNet(), variables)


def test_numbered_names_pair_by_a_stated_guess_and_names_that_say_nothing_raise(tmp_path):
  """From nnx.eval_shape (no attribute order): fc1/ln1, fc2/ln2 pair with Dense_0/LayerNorm_0, Dense_1/LayerNorm_1
  by their numbers, a guess the plan states; a/b and ln_a/ln_b raise with the line that settles them, which,
  applied, restores (b is made first here, so Dense_0 is b)."""
  variables = linen_run(tmp_path, ports.LRes(), d_in=ports.D)
  numbered = lambda: ports.NRes(nnx.Rngs(1))
  p = plan(tmp_path, nnx.state(nnx.eval_shape(numbered)), rules='auto')
  assert p.inferred_renames == ports.RES_RULES
  assert any('paired as a guess' in n and 'Dense_0 -> fc1, Dense_1 -> fc2' in n for n in p.notes), p.notes
  assert_computes_like_linen(
    restored_model(tmp_path, numbered, 'auto'), ports.LRes(), variables, d_in=ports.D, d_out=ports.D
  )

  lettered = lambda: ports.NResAB(nnx.Rngs(1))
  with pytest.raises(PlanError, match=r"Dense_0, Dense_1 and a, b all hold .*no attribute order") as e:
    plan(tmp_path, nnx.state(nnx.eval_shape(lettered)), rules='auto')
  assert "rules=[rename({'Dense_0': 'a'}), 'auto']" in str(e.value)
  # The line is stated in name order; here b is made first, so the user states its partner instead.
  fixed = [rename({'Dense_0': 'b', 'LayerNorm_0': 'ln_b'}), 'auto']
  assert_computes_like_linen(
    restored_model(tmp_path, lettered, fixed), ports.LRes(), variables, d_in=ports.D, d_out=ports.D
  )
  # The initialised module's attribute order settles it with no rename.
  assert plan(tmp_path, lettered(), rules='auto').inferred_renames == {
    'Dense_0': 'b',
    'LayerNorm_0': 'ln_b',
    'Dense_1': 'a',
    'LayerNorm_1': 'ln_a',
  }


def test_convert_to_nnx_keeps_the_names_rules_write_and_plain_orbax_reads_it(tmp_path):
  variables = linen_run(tmp_path / 'linen', ports.LNet())
  (tmp_path / 'rules.py').write_text(f'RULES = {ports.NET_RULES!r}\n')
  assert (
    cli.main(
      [
        'convert',
        str(tmp_path / 'linen'),
        str(tmp_path / 'nnx'),
        '--to',
        'nnx',
        '--rules',
        f'{tmp_path}/rules.py:RULES',
        '--quiet',
      ]
    )
    == cli.EXIT_OK
  )
  # The port's own nnx.state, restored by plain Orbax: block_0 is an attribute, as the port has it.
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'nnx' / 'default', ports.abstract_net())
  model = ports.Net(nnx.Rngs(3))
  nnx.update(model, restored)
  assert_computes_like_linen(model, ports.LNet(), variables)
  # inspect calls neither the attributes per-layer blocks nor a norm's vectors a stack.
  assert source.open_checkpoint(tmp_path / 'nnx').layout == 'nnx'
  assert inspection.stacks_found(source.open_checkpoint(tmp_path / 'nnx')) == []
  assert inspection.stacks_found(source.open_checkpoint(tmp_path / 'linen')) == []


def test_nnx_lists_stay_list_entries(tmp_path):
  """The control: an nnx.List of blocks (`blocks/0`) pairs with the Linen loop as entries, and converts so."""

  class ListNet(nnx.Module):
    def __init__(self, rngs):
      self.inp = nnx.Linear(ports.D_IN, ports.D, rngs=rngs)
      self.blocks = nnx.List([ports.Block(rngs) for _ in range(ports.BLOCKS)])
      self.head = nnx.Linear(ports.D, ports.D_OUT, rngs=rngs)

    def __call__(self, x):
      x = self.inp(x)
      for b in self.blocks:
        x = b(x)
      return self.head(x)

  variables = linen_run(tmp_path, ports.LNet())
  make = lambda: ListNet(nnx.Rngs(1))
  p = plan(tmp_path, make(), rules='auto')
  assert p.inferred_renames['LBlock_1/Dense_0'] == 'blocks/1/up'
  assert_computes_like_linen(restored_model(tmp_path, make, 'auto'), ports.LNet(), variables)


# ---------------------------------------------------------------- inspect: what is a stack


def test_inspect_calls_no_norm_a_stack(tmp_path):
  class Norms(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.LayerNorm()(nn.Dense(32)(x))
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
      x = nn.RMSNorm()(x)
      x = nn.GroupNorm(num_groups=4)(x)
      return nn.Dense(16)(x)  # a square kernel beside its (16,) bias

  save(tmp_path, Norms().init(jax.random.key(0), jnp.ones((2, 8))))
  assert cli.main(['inspect', str(tmp_path)]) == cli.EXIT_OK
  assert inspection.stacks_found(source.open_checkpoint(tmp_path)) == []


# ---------------------------------------------------------------- rules='auto' on every face, never silent


def test_auto_with_partial_still_pairs_and_says_so(tmp_path):
  linen_run(tmp_path, ports.LNet())
  p = plan(tmp_path, ports.abstract_net(), rules='auto', partial=True)
  assert not p.kept and len(p.reads) == 2 * 2 + ports.BLOCKS * 6
  assert any(n.startswith("rules='auto' paired LBlock_0/Dense_0 -> block_0/up") for n in p.notes), p.notes


def test_auto_that_pairs_nothing_is_an_error_or_a_loud_warning(tmp_path):
  """Sources and targets both left over, with no module of one like one of the other (another width)."""
  linen_run(tmp_path, ports.LNet())

  class Wider(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(ports.D_IN, 3, rngs=rngs)

  with pytest.raises(PlanError, match=r"rules='auto' paired nothing: the target's modules proj have no source"):
    plan(tmp_path, Wider(nnx.Rngs(0)), rules='auto')
  with pytest.warns(UserWarning, match=r"rules='auto' paired nothing"):
    p = plan(tmp_path, Wider(nnx.Rngs(0)), rules='auto', partial=True)
  assert not p.reads


def test_auto_with_no_target_to_pair_with_says_so_on_convert_and_save(tmp_path, capsys):
  linen_run(tmp_path / 'linen', ports.LNet())
  assert (
    cli.main(['convert', str(tmp_path / 'linen'), str(tmp_path / 'nnx'), '--to', 'nnx', '--rules', 'auto'])
    == cli.EXIT_PLAN
  )
  assert "rules='auto' has nothing to pair with" in capsys.readouterr().err
  assert not (tmp_path / 'nnx').exists()
  model = ports.Net(nnx.Rngs(0))
  with pytest.raises(PlanError, match="rules='auto' has nothing to pair with.*target=jax.eval_shape"):
    LinenCompatSave(model, rules='auto')
  # The fix it states: the Linen tree to pair with. Plain Linen then restores what was written.
  linen_abstract = jax.eval_shape(lambda: ports.linen_variables(ports.LNet()))
  save(tmp_path / 'saved', LinenCompatSave(model, rules='auto', target=linen_abstract))
  got = ocp.StandardCheckpointer().restore(tmp_path / 'saved' / '1' / 'default', linen_abstract)
  models.assert_all_equal(
    got['params']['LBlock_2']['Dense_1'],
    {'kernel': model.block_2.down.kernel.get_value(), 'bias': model.block_2.down.bias.get_value()},
  )


def test_compare_with_auto_matches_a_bit_exact_conversion(tmp_path, capsys):
  linen_run(tmp_path / 'linen', ports.LNet())
  model = restored_model(tmp_path / 'linen', lambda: ports.Net(nnx.Rngs(1)), ports.NET_RULES)
  save(tmp_path / 'nnx', nnx.state(model))  # NNX leaves as Orbax writes nnx.state: .../kernel/value
  for a, b in (('linen', 'nnx'), ('nnx', 'linen')):
    found = compare.compare(
      source.open_checkpoint(tmp_path / a), source.open_checkpoint(tmp_path / b), rules=ports.NET_RULES
    )
    assert found.equal and found.compared == 22, (a, b, found)
    assert cli.main(['compare', str(tmp_path / a), str(tmp_path / b), '--rules', 'auto']) == cli.EXIT_OK
    assert 'MATCH' in capsys.readouterr().out


# ---------------------------------------------------------------- a port's own train state, saved back


@pytest.mark.parametrize('kind', [ports.PortState, train_state.TrainState], ids=['struct_dataclass', 'TrainState'])
def test_a_ports_train_state_saves_back_with_the_rules_it_restored_with(tmp_path, mesh, kind):
  linen = models.linen_mlp_state(ports.tx(), variables_as_params=False)
  save(tmp_path / 'linen', linen, step=2)
  abstract = jax.eval_shape(lambda: ports.port_state(models.NnxMLP, kind=kind))
  with ocp.CheckpointManager(tmp_path / 'linen') as mngr:
    state = mngr.restore(2, args=LinenCompatRestore(abstract, rules=models.MLP_RULES))
  assert isinstance(state, kind) and int(state.step) == 2
  with ocp.CheckpointManager(tmp_path / 'run', options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step in (3, 4, 5):
      state = state.replace(step=state.step + 1)
      mngr.save(step, args=LinenCompatSave(state, rules=models.MLP_RULES))
    mngr.wait_until_finished()
  # Plain Linen code, in a process that never imports this package, restores the last step as its own
  # TrainState (params=variables['params']): the same tree as the Linen run's, None for adam's empty state.
  code = f'''
import sys, json
sys.path.insert(0, {TESTS!r})
import jax
jax.config.update('jax_num_cpu_devices', 8)
import numpy as np, orbax.checkpoint as ocp, optax, models
target = jax.eval_shape(lambda: models.linen_mlp_state(optax.adam(1e-2), variables_as_params=False))
with ocp.CheckpointManager({str(tmp_path / 'run')!r}) as m:
  got = m.restore(5, args=ocp.args.StandardRestore(target))
print(json.dumps({{'step': int(got.step), 'empty': got.opt_state[1] == optax.EmptyState(),
                   'kernel': np.asarray(got.params['Dense_1']['kernel']).tolist(),
                   'mu': np.asarray(got.opt_state[0].mu['Dense_0']['bias']).tolist(),
                   'imported': 'orbax_linen_nnx' in sys.modules}}))
'''
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out == {
    'step': 5,
    'empty': True,
    'imported': False,
    'kernel': np.asarray(state.params['fc2']['kernel'].get_value()).tolist(),
    'mu': np.asarray(state.opt_state[0].mu['fc1']['bias'].get_value()).tolist(),
  }


# ---------------------------------------------------------------- what a convert leaves out


def test_convert_says_what_it_left_out_and_the_plain_restore_it_states_works(tmp_path, capsys):
  variables = linen_run(tmp_path / 'linen', models.LinenMLP(), d_in=models.D_IN)
  (tmp_path / 'target.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nimport models\nfrom flax import nnx\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(lambda: models.NnxMLPWithDropout(nnx.Rngs(0))))\n' % TESTS
  )
  assert (
    cli.main(
      [
        'convert',
        str(tmp_path / 'linen'),
        str(tmp_path / 'nnx'),
        '--target',
        f'{tmp_path}/target.py:abstract',
        '--rules',
        'auto',
        '--quiet',
      ]
    )
    == cli.EXIT_OK
  )
  out = capsys.readouterr().out
  assert 'left out: 2 target leaves that no source holds (drop/rngs/count, drop/rngs/key)' in out, out
  assert 'nnx.state(abstract_model, nnx.Not(nnx.RngState))' in out
  # The restore it states, with plain Orbax.
  model = models.NnxMLPWithDropout(nnx.Rngs(5))
  abstract = nnx.state(nnx.eval_shape(lambda: models.NnxMLPWithDropout(nnx.Rngs(0))), nnx.Not(nnx.RngState))
  nnx.update(model, ocp.StandardCheckpointer().restore(tmp_path / 'nnx' / 'default', abstract))
  x = np.ones((2, models.D_IN), np.float32)
  models.assert_reductions_close(model(x), models.LinenMLP().apply(variables, x), terms=models.D_IN + models.D_HID)
  np.testing.assert_array_equal(model.fc2.kernel.get_value(), variables['params']['Dense_1']['kernel'])


def test_convert_fills_nnx_only_leaves_from_a_built_target_so_plain_orbax_reads_all(tmp_path, capsys):
  variables = linen_run(tmp_path / 'linen', models.LinenMLP(), d_in=models.D_IN)
  (tmp_path / 'target.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nimport models\nfrom flax import nnx\n\n'
    'def built():\n  return nnx.state(models.NnxMLPWithDropout(nnx.Rngs(7)))\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(lambda: models.NnxMLPWithDropout(nnx.Rngs(0))))\n' % TESTS
  )
  convert = [
    'convert',
    str(tmp_path / 'linen'),
    str(tmp_path / 'nnx'),
    '--rules',
    'auto',
    '--fill-nnx-only',
    'from-target',
    '--quiet',
    '--target',
  ]
  # An abstract target has no values to write: said before anything is written.
  assert cli.main(convert + [f'{tmp_path}/target.py:abstract']) == cli.EXIT_USAGE
  assert 'hold none (an abstract state, from nnx.eval_shape)' in capsys.readouterr().err
  assert not (tmp_path / 'nnx').exists()
  assert cli.main(convert + [f'{tmp_path}/target.py:built']) == cli.EXIT_OK
  assert 'left out' not in capsys.readouterr().out
  # Plain Orbax restores the port's whole nnx.state, RNG stream included: the built target's own.
  abstract = nnx.state(nnx.eval_shape(lambda: models.NnxMLPWithDropout(nnx.Rngs(0))))
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'nnx' / 'default', abstract)
  model = models.NnxMLPWithDropout(nnx.Rngs(1))
  nnx.update(model, restored)
  own = models.NnxMLPWithDropout(nnx.Rngs(7)).drop.rngs.key.get_value()
  np.testing.assert_array_equal(jax.random.key_data(model.drop.rngs.key.get_value()), jax.random.key_data(own))
  np.testing.assert_array_equal(model.fc1.kernel.get_value(), variables['params']['Dense_0']['kernel'])
  model(np.ones((2, models.D_IN), np.float32))  # and it runs


def test_auto_with_partial_keeps_a_module_without_a_partner_and_pairs_the_rest(tmp_path):
  """partial=True is for targets the checkpoint lacks: an extra module has no partner, is kept, and said so."""

  class NetWithExtraHead(ports.Net):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.aux_head = nnx.Linear(ports.D, 5, rngs=rngs)

  variables = linen_run(tmp_path, ports.LNet())
  make = lambda: NetWithExtraHead(nnx.Rngs(1))
  with pytest.raises(PlanError, match='aux_head has no partner'):
    plan(tmp_path, nnx.state(nnx.eval_shape(make)), rules='auto')
  p = plan(tmp_path, nnx.state(nnx.eval_shape(make)), rules='auto', partial=True)
  assert p.inferred_renames == ports.NET_RULES
  assert {'/'.join(t.path) for t in p.kept} == {'aux_head/kernel', 'aux_head/bias'}
  assert "rules='auto' found no partner for aux_head (partial=True: kept as given, or unused)" in p.notes
  model = restored_model(tmp_path, make, 'auto', partial=True)
  assert_computes_like_linen(model, ports.LNet(), variables)
