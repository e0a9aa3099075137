"""Messages a newcomer trusts (issue 31): a near miss of 'auto' is named as such, alone, on each face."""

import pytest

import ports
from helpers import save
from orbax_linen_nnx import RuleError, cli, plan


@pytest.mark.parametrize('rules', ['Auto', 'AUTO', 'atuo', ['AUTO']])
def test_a_near_miss_of_auto_is_named_alone(tmp_path, rules):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  with pytest.raises(RuleError) as e:
    plan(tmp_path, ports.abstract_net(), rules=rules)
  assert "did you mean 'auto' (lower case), which infers the renames?" in str(e.value)
  assert '\n' not in str(e.value)  # said alone, not after a list of every unpaired leaf
  # The fix it names works.
  assert plan(tmp_path, ports.abstract_net(), rules='auto').inferred_renames == ports.NET_RULES


def test_a_near_miss_of_auto_on_the_command_line(tmp_path, capsys):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  (tmp_path / 't.py').write_text('import sys\nsys.path.insert(0, %r)\nfrom ports import abstract_net\n'
                                 % str(ports.__file__.rsplit('/', 1)[0]))
  target = f'{tmp_path}/t.py:abstract_net'
  for typo in ('atuo', 'Auto'):
    assert cli.main(['plan', str(tmp_path), '--target', target, '--rules', typo]) == cli.EXIT_USAGE
    assert f"--rules '{typo}': did you mean --rules auto" in capsys.readouterr().err
  assert cli.main(['plan', str(tmp_path), '--target', target, '--rules', 'auto']) == cli.EXIT_OK
