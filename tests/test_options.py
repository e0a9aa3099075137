"""One options object for every face (issue 30): `RestoreOptions`, built alike by `LinenCompatRestore`,
`plan()`, `restore()` and the command line, documented once, and planned through one `prepare`."""

import dataclasses
import re

import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
from helpers import save
from orbax_linen_nnx import LinenCompatRestore, RestoreOptions, cli, options as options_lib, plan
from orbax_linen_nnx import prepare as prepare_lib

OPTIONS_PAGE = models.__file__.rsplit('/', 2)[0] + '/docs/options.md'
OWN = {'abstract_state', 'dry_run'}  # what LinenCompatRestore holds besides the options


def test_linen_compat_restore_holds_exactly_the_options_with_their_defaults():
  fields = {f.name: f for f in dataclasses.fields(LinenCompatRestore)}
  assert set(fields) - OWN == set(options_lib.FIELDS)
  defaults = RestoreOptions()
  for name in options_lib.FIELDS:
    assert fields[name].default == getattr(defaults, name), name
  args = LinenCompatRestore(None, rules={'Dense_0': 'fc1'}, partial=True, timeout_s=5.0, max_over_read=None)
  assert args.options == RestoreOptions(rules={'Dense_0': 'fc1'}, partial=True, timeout_s=5.0, max_over_read=None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    args.options.partial = False


def test_options_are_documented_once_and_the_docs_show_those_docstrings():
  doc = RestoreOptions.__doc__
  for name in options_lib.FIELDS:
    assert re.search(rf'^    {name}: ', doc, re.M), f'RestoreOptions documents no {name}'
    assert f'    {name}: ' not in LinenCompatRestore.__doc__, f'{name} documented twice'
  for name in OWN:
    assert re.search(rf'^    {name}: ', LinenCompatRestore.__doc__, re.M), f'LinenCompatRestore documents no {name}'
  # The options page is made from these docstrings (tests/test_docs.py builds it and finds every field there).
  page = open(OPTIONS_PAGE).read()
  assert '::: orbax_linen_nnx.RestoreOptions' in page and '::: orbax_linen_nnx.LinenCompatRestore' in page
  assert '| `' not in page, 'the options page holds a table of its own again'


def test_every_option_has_its_flag_or_says_why_not_and_the_command_line_builds_the_same_options(tmp_path):
  parser = cli._parser()
  plan_flags = {
    o
    for a in next(a for a in parser._actions if a.dest == 'command').choices['plan']._actions
    for o in a.option_strings
  }
  given = {
    '--rules': ('auto', 'auto'),
    '--partial': (None, True),
    '--stacks': ('{"layers": {"nnx": 0}}', {'layers': {'nnx': 0}}),
    '--budget': ('8MiB', 8 * 2**20),
    '--max-over-read': ('2.5', 2.5),
    '--host-memory-limit': ('1GiB', 2**30),
    '--strict-cost': (None, True),
  }
  for field in dataclasses.fields(RestoreOptions):
    flag = field.metadata['flag']
    if flag is None:
      assert len(field.metadata['why']) > 20, field.name
      continue
    assert flag in plan_flags, f'{field.name}: plan has no {flag}'
    text, value = given[flag]
    args = parser.parse_args(['plan', str(tmp_path), '--target', 'x.py:f', flag, *([text] if text else [])])
    assert getattr(cli.restore_options(args), field.name) == value, field.name
  # Nothing given: the defaults, as the API's.
  args = parser.parse_args(['plan', str(tmp_path), '--target', 'x.py:f'])
  assert cli.restore_options(args) == RestoreOptions()


def test_every_face_plans_through_prepare_with_the_same_options(tmp_path, monkeypatch):
  """plan(), a manager's dry run and the command line hand prepare() equal RestoreOptions."""
  save(tmp_path, models.linen_mlp_state(optax.adam(1e-2)))
  target = tmp_path / 'target.py'
  target.write_text(
    'import optax, models\nfrom flax import nnx\n'
    'def abstract():\n'
    '  return nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))\n'
  )
  abstract = nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))
  seen = []
  real = prepare_lib.prepare

  def spy(checkpoint, abstract_state, options=options_lib.DEFAULTS, **kw):
    seen.append(options)
    return real(checkpoint, abstract_state, options, **kw)

  monkeypatch.setattr(prepare_lib, 'prepare', spy)
  (tmp_path / 'rules.py').write_text("RULES = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}\n")
  plan(tmp_path, abstract, rules='auto', max_over_read=2.0)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.restore(1, args=LinenCompatRestore(abstract, rules='auto', max_over_read=2.0, dry_run=True))
  monkeypatch.syspath_prepend(models.__file__.rsplit('/', 1)[0])
  assert (
    cli.main(['plan', str(tmp_path), '--target', f'{target}:abstract', '--rules', 'auto', '--max-over-read', '2'])
    == cli.EXIT_OK
  )
  assert seen == [RestoreOptions(rules='auto', max_over_read=2.0)] * 3


def test_convert_and_compare_plan_through_prepare_too(tmp_path, monkeypatch):
  """convert --to (a layout), convert --target CKPT (another checkpoint's tree) and compare (A as B's tree,
  and B as itself) all plan with prepare(); into Linen's layout with the SaveOptions a save takes."""
  from orbax_linen_nnx import SaveOptions

  save(tmp_path / 'linen', models.linen_mlp_state(optax.adam(1e-2)))
  seen = []
  real = prepare_lib.prepare

  def spy(checkpoint, target, options=options_lib.DEFAULTS, **kw):
    seen.append((target if isinstance(target, str) else type(target).__name__, options))
    return real(checkpoint, target, options, **kw)

  monkeypatch.setattr(prepare_lib, 'prepare', spy)
  (tmp_path / 'rules.py').write_text("RULES = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}\n")
  rules = ['--rules', f'{tmp_path}/rules.py:RULES']
  linen, nnx_dir, back = str(tmp_path / 'linen'), str(tmp_path / 'nnx'), str(tmp_path / 'back')
  assert cli.main(['convert', linen, nnx_dir, '--to', 'nnx', *rules, '--quiet']) == cli.EXIT_OK
  assert cli.main(['convert', nnx_dir, back, '--to', 'linen', *rules, '--quiet']) == cli.EXIT_OK
  assert cli.main(['convert', nnx_dir, str(tmp_path / 'again'), '--target', linen, *rules, '--quiet']) == cli.EXIT_OK
  assert cli.main(['compare', linen, back, '--quiet']) == cli.EXIT_OK
  mapping = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}
  assert seen == [
    ('nnx', RestoreOptions(rules=mapping)),
    ('linen', SaveOptions(rules=mapping)),
    ('Checkpoint', RestoreOptions(rules=mapping)),
    ('Checkpoint', RestoreOptions(partial=True)),  # A as B's tree
    ('Checkpoint', RestoreOptions()),  # B as itself
  ]


SAVE_OWN = {'state', 'plan'}  # what LinenCompatSave holds besides the save options


def test_linen_compat_save_holds_exactly_the_save_options_documented_once():
  import inspect

  from orbax_linen_nnx import LinenCompatSave, SaveOptions, to_linen

  fields = {f.name: f for f in dataclasses.fields(LinenCompatSave)}
  assert set(fields) - SAVE_OWN == set(options_lib.SAVE_FIELDS)
  defaults = SaveOptions()
  for name in options_lib.SAVE_FIELDS:
    assert fields[name].default == getattr(defaults, name), name
    assert re.search(rf'^    {name}: ', SaveOptions.__doc__, re.M), f'SaveOptions documents no {name}'
    assert f'    {name}: ' not in LinenCompatSave.__doc__, f'{name} documented twice'
  # to_linen takes the options that shape the tree (it writes nothing itself), with the same defaults but aux:
  # it returns one tree, so NNX-only state goes in it, as MaxText's nnx_aux (SaveOptions documents that).
  params = inspect.signature(to_linen).parameters
  for name in ('rules', 'stacks', 'aux', 'target'):
    expected = 'nnx_aux' if name == 'aux' else getattr(defaults, name)
    assert params[name].default == expected, name
  assert "the default of\n      `to_linen`" in SaveOptions.__doc__ or 'default of `to_linen`' in ' '.join(
    SaveOptions.__doc__.split()
  )
  model = models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))
  args = LinenCompatSave(model, rules=models.MLP_RULES, aux=None)
  assert args.options == SaveOptions(rules=models.MLP_RULES, aux=None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    args.options.aux = 'sidecar'


def test_every_save_option_has_its_convert_flag_or_says_why_not(tmp_path):
  from orbax_linen_nnx import SaveOptions

  parser = cli._parser()
  convert_flags = {
    o
    for a in next(a for a in parser._actions if a.dest == 'command').choices['convert']._actions
    for o in a.option_strings
  }
  given = {'--rules': ('auto', 'auto'), '--stacks': ('{"layers": {"linen": 1}}', {'layers': {'linen': 1}})}
  for field in dataclasses.fields(SaveOptions):
    flag = field.metadata['flag']
    if flag is None:
      assert len(field.metadata['why']) > 20, field.name
      continue
    assert flag in convert_flags, f'{field.name}: convert has no {flag}'
    if flag in given:
      text, value = given[flag]
      args = parser.parse_args(['convert', str(tmp_path), str(tmp_path / 'out'), '--to', 'linen', flag, text])
      assert getattr(cli.save_options(args), field.name) == value, field.name
  args = parser.parse_args(['convert', str(tmp_path), str(tmp_path / 'out'), '--to', 'linen'])
  assert cli.save_options(args) == SaveOptions()
