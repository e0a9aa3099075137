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
from orbax_linen_nnx import LinenCompatRestore, RestoreOptions, cli, options as options_lib, plan, planner

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
  real = planner.prepare

  def spy(checkpoint, abstract_state, options=options_lib.DEFAULTS, **kw):
    seen.append(options)
    return real(checkpoint, abstract_state, options, **kw)

  monkeypatch.setattr(planner, 'prepare', spy)
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
