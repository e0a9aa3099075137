"""Messages a newcomer trusts (issue 31): a near miss of 'auto' is named as such, alone, on each face."""

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import models
import orbax_linen_nnx
import ports
from helpers import save
from orbax_linen_nnx import PlanError, cli, plan


@pytest.mark.parametrize('rules', ['Auto', 'AUTO', 'atuo', ['AUTO']])
def test_a_near_miss_of_auto_is_named_alone(tmp_path, rules):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  with pytest.raises(PlanError) as e:
    plan(tmp_path, ports.abstract_net(), rules=rules)
  assert "did you mean 'auto' (lower case), which infers the renames?" in str(e.value)
  assert '\n' not in str(e.value)  # said alone, not after a list of every unpaired leaf
  # The fix it names works.
  assert plan(tmp_path, ports.abstract_net(), rules='auto').inferred_renames == ports.NET_RULES


def test_a_near_miss_of_auto_on_the_command_line(tmp_path, capsys):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  (tmp_path / 't.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nfrom ports import abstract_net\n' % str(ports.__file__.rsplit('/', 1)[0])
  )
  target = f'{tmp_path}/t.py:abstract_net'
  for typo in ('atuo', 'Auto'):
    assert cli.main(['plan', str(tmp_path), '--target', target, '--rules', typo]) == cli.EXIT_USAGE
    assert f"--rules '{typo}': did you mean --rules auto" in capsys.readouterr().err
  assert cli.main(['plan', str(tmp_path), '--target', target, '--rules', 'auto']) == cli.EXIT_OK


def run_cli(*args, **kw):
  """The command line in a fresh process, as users run it."""
  return subprocess.run(
    [sys.executable, '-m', 'orbax_linen_nnx', *map(str, args)],
    capture_output=True,
    text=True,
    timeout=240,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    **kw,
  )


def test_version():
  done = run_cli('--version')
  assert done.returncode == 0 and done.stdout.strip() == f'orbax-linen-nnx {orbax_linen_nnx.__version__}'


def test_a_closed_pipe_ends_quietly(tmp_path):
  """`inspect --json | head`: the reader stops early; no traceback, no error (1,500 arrays: past a pipe's buffer)."""
  ocp.PyTreeCheckpointer().save(tmp_path / 'c', {f'layer_{i}': {'w': np.zeros((2,), np.float32)} for i in range(1500)})
  shell = (
    f'{sys.executable} -m orbax_linen_nnx inspect --json {tmp_path / "c"} 2>{tmp_path / "err"} | head -c 100;'
    ' exit ${PIPESTATUS[0]}'
  )
  done = subprocess.run(
    ['bash', '-c', shell], capture_output=True, text=True, timeout=240, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}
  )
  assert len(done.stdout) == 100
  assert (tmp_path / 'err').read_text() == '' and done.returncode == 0


def test_a_target_that_needs_arguments_says_how_to_give_one(tmp_path, capsys):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  (tmp_path / 't.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nfrom ports import Net\n\nfrom flax import nnx\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))\n'
    % str(ports.__file__.rsplit('/', 1)[0])
  )
  assert cli.main(['plan', str(tmp_path), '--target', f'{tmp_path}/t.py:Net', '--rules', 'auto']) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert 'calling it with no arguments failed' in err and 'def abstract(): return nnx.state(nnx.eval_shape(' in err
  assert 'Traceback' not in err
  # The fix it names: a function with no arguments.
  assert cli.main(['plan', str(tmp_path), '--target', f'{tmp_path}/t.py:abstract', '--rules', 'auto']) == cli.EXIT_OK


def test_convert_is_quiet_unless_asked_and_never_notes_before_a_refusal(tmp_path, capsys):
  save(tmp_path / 'linen', ports.linen_variables(ports.LNet()))
  (tmp_path / 'rules.py').write_text(f'RULES = {ports.NET_RULES!r}\n')
  convert = [
    'convert',
    str(tmp_path / 'linen'),
    str(tmp_path / 'nnx'),
    '--to',
    'nnx',
    '--rules',
    f'{tmp_path}/rules.py:RULES',
    '--quiet',
  ]
  assert cli.main(convert) == cli.EXIT_OK
  out = capsys.readouterr()
  assert 'note' not in out.err and 'MiB measured' not in out.err + out.out
  # The destination now exists: refused, and nothing about memory said first, --verbose or not.
  assert cli.main(convert + ['--verbose']) == cli.EXIT_DESTINATION
  err = capsys.readouterr().err
  assert err.startswith('orbax-linen-nnx convert: error:') and 'already exists' in err and 'note' not in err
  assert cli.main(convert + ['--verbose', '--overwrite']) == cli.EXIT_OK
  assert 'note    convert: reads' in capsys.readouterr().err


def big_checkpoint(directory):
  ocp.PyTreeCheckpointer().save(directory, {'w': np.random.default_rng(0).random((256, 1024), np.float32)})


def test_a_destination_that_cannot_be_written_is_a_runtime_failure(tmp_path, capsys):
  """Exit 6 (storage or runtime failure), not 2 (bad command line)."""
  big_checkpoint(tmp_path / 'c')
  (tmp_path / 'a_file').write_text('')
  assert (
    cli.main(['convert', str(tmp_path / 'c'), str(tmp_path / 'a_file' / 'out'), '--to', 'nnx', '--quiet'])
    == cli.EXIT_RUNTIME
  )
  err = capsys.readouterr().err
  assert 'the run failed in storage or at run time' in err and 'a_file' in err, err


def test_a_full_disk_is_a_runtime_failure_and_leaves_nothing(tmp_path):
  """A convert into a 64 KiB tmpfs (1 MiB to write): exit 6, nothing at DST."""
  tiny = tmp_path / 'tiny'
  tiny.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(tiny)], capture_output=True).returncode:
    pytest.skip('mounting a tmpfs needs root (the same failure without it: the test above)')
  try:
    big_checkpoint(tmp_path / 'c')
    done = run_cli('convert', tmp_path / 'c', tiny / 'out', '--to', 'nnx', '--quiet')
    assert done.returncode == cli.EXIT_RUNTIME, done.stderr[-2000:]
    assert 'No space left on device' in done.stderr and 'run the same command again' in done.stderr
    assert not (tiny / 'out').exists()
  finally:
    subprocess.run(['umount', str(tiny)], check=True)


def test_a_second_convert_into_the_same_destination_is_refused_at_once_and_the_first_finishes(tmp_path, capsys):
  src, dst = tmp_path / 'src', tmp_path / 'out'
  ocp.PyTreeCheckpointer().save(
    src, {f'w{i}': np.random.default_rng(i).random((1024, 2048), np.float32) for i in range(8)}
  )  # 64 MiB: seconds to write in 256 KiB blocks
  first = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'orbax_linen_nnx',
      'convert',
      str(src),
      str(dst),
      '--to',
      'nnx',
      '--quiet',
      '--budget',
      '256KiB',
    ],
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  claim = tmp_path / '.out.orbax-linen-nnx-convert.claim'
  deadline = time.monotonic() + 120
  while not claim.exists():
    assert first.poll() is None and time.monotonic() < deadline, first.communicate()
    time.sleep(0.02)
  started = time.monotonic()
  assert cli.main(['convert', str(src), str(dst), '--to', 'nnx', '--quiet']) == cli.EXIT_DESTINATION
  refused_in = time.monotonic() - started
  err = capsys.readouterr().err
  assert f'another convert is writing {dst} now (process {first.pid} on' in err and '--overwrite' in err, err
  assert refused_in < 10
  out, errors = first.communicate(timeout=240)
  assert first.returncode == 0, errors[-2000:]
  assert not claim.exists()
  assert cli.main(['compare', str(src), str(dst)]) == cli.EXIT_OK  # the first wrote everything, bit for bit


def test_a_claim_whose_convert_is_gone_is_taken_over(tmp_path):
  big_checkpoint(tmp_path / 'src')
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  claim = tmp_path / '.out.orbax-linen-nnx-convert.claim'
  claim.write_text(json.dumps({'pid': int(gone.stdout), 'host': socket.gethostname(), 'source': 'elsewhere'}))
  assert cli.main(['convert', str(tmp_path / 'src'), str(tmp_path / 'out'), '--to', 'nnx', '--quiet']) == cli.EXIT_OK
  assert not claim.exists() and (tmp_path / 'out' / 'default').exists()


def test_plan_json_is_a_documented_schema(tmp_path, capsys):
  save(tmp_path, ports.linen_variables(ports.LNet()))
  (tmp_path / 't.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nfrom ports import abstract_net\n' % str(ports.__file__.rsplit('/', 1)[0])
  )
  assert (
    cli.main(['plan', str(tmp_path), '--target', f'{tmp_path}/t.py:abstract_net', '--rules', 'auto', '--json'])
    == cli.EXIT_OK
  )
  got = json.loads(capsys.readouterr().out)
  assert set(got) == {
    'source_layout',
    'target_layout',
    'reads',
    'kept',
    'unused',
    'skipped',
    'dropped',
    'notes',
    'inferred_renames',
    'cost',
  }
  assert (got['source_layout'], got['target_layout']) == ('linen', 'nnx')
  assert got['inferred_renames'] == ports.NET_RULES
  read = next(r for r in got['reads'] if r['target'] == 'block_1/up/kernel')
  assert read == {
    'target': 'block_1/up/kernel',
    'shape': [ports.D, 2 * ports.D],
    'dtype': 'float32',
    'sources': ['params.LBlock_1.Dense_0.kernel'],
    'ops': [],
    'rules': read['rules'],
  }
  assert got['cost']['processes'] == 1 and got['cost']['summary']['read_bytes']['total'] > 0


def test_a_checkpoint_that_links_outside_itself_is_refused_on_every_face(tmp_path, capsys):
  """A planted symlink inside a checkpoint's item directory, to a file outside: refused before any read,
  naming the link, by inspect, plan, convert, compare and a restore."""
  save(tmp_path / 'run', ports.linen_variables(ports.LNet()))
  secret = tmp_path / 'secret.txt'
  secret.write_text('not part of any checkpoint')
  link = tmp_path / 'run' / '1' / 'default' / 'notes'
  link.symlink_to(secret)
  src = str(tmp_path / 'run')
  (tmp_path / 't.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nfrom ports import abstract_net\n' % str(ports.__file__.rsplit('/', 1)[0])
  )
  for command in (
    ['inspect', src],
    ['plan', src, '--to', 'nnx'],
    ['convert', src, str(tmp_path / 'out'), '--to', 'nnx'],
    ['compare', src, src],
  ):
    assert cli.main(command) == cli.EXIT_UNREADABLE, command
    assert f'{link} is a symlink to {secret}, outside the checkpoint' in capsys.readouterr().err, command
  assert not (tmp_path / 'out').exists()
  with pytest.raises(orbax_linen_nnx.UntrustedCheckpointError, match='is a symlink to .*outside the checkpoint'):
    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
      mngr.restore(1, args=orbax_linen_nnx.LinenCompatRestore(ports.abstract_net(), rules='auto'))
  # The fix it names: the file copied in (the link replaced by what it points to) restores.
  link.unlink()
  link.write_text(secret.read_text())
  with ocp.CheckpointManager(tmp_path / 'run') as mngr:
    assert mngr.restore(1, args=orbax_linen_nnx.LinenCompatRestore(ports.abstract_net(), rules='auto'))


def test_array_names_that_climb_out_of_the_checkpoint_are_refused(tmp_path, capsys):
  """Without OCDBT each array is the directory <item>/<name>: metadata naming '../escape' would open one
  outside. (Orbax never writes such a name; a planted one is refused before any array is opened.)"""
  item = tmp_path / 'c'
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
    ckptr.save(item, args=ocp.args.PyTreeSave({'w': np.ones((4,), np.float32)}))
  meta = item / '_METADATA'
  meta.write_text(meta.read_text().replace("('w',)", "('../escape',)").replace('"w"', '"../escape"'))
  assert cli.main(['inspect', str(item)]) == cli.EXIT_UNREADABLE
  assert "names arrays outside the checkpoint ('../escape')" in capsys.readouterr().err


def test_a_typo_in_the_rules_is_not_kept_in_the_fix(tmp_path):
  """'Conv_O' (a letter O) matches nothing: the proposed table leaves it out and pairs Conv_0; applied, it works."""
  save(tmp_path, ports.linen_variables(ports.LNet()))
  typo = {**ports.NET_RULES, 'Dense_O': 'inp'}
  del typo['Dense_0']
  with pytest.raises(PlanError, match="rule 'Dense_O' matched no source leaf") as e:
    plan(tmp_path, ports.abstract_net(), rules=typo)
  proposed = ast.literal_eval(re.search(r'rename modules with rules=(\{.*?\})', str(e.value))[1])
  assert 'Dense_O' not in proposed and proposed['Dense_0'] == 'inp'
  assert plan(tmp_path, ports.abstract_net(), rules=proposed).reads


@pytest.mark.parametrize('command', ['inspect', 'plan', 'convert', 'compare'])
def test_every_subcommand_help_has_a_description_examples_and_its_exit_codes(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, '--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert f'examples:\n  orbax-linen-nnx {command} ' in out and 'exit status: 0 done' in out
  assert '2 bad command line' in out and '6 storage or runtime failure' in out


def test_convert_json_summary(tmp_path, capsys):
  save(tmp_path / 'linen', ports.linen_variables(models.LinenMLP(), models.D_IN))
  (tmp_path / 'target.py').write_text(
    'import sys\nsys.path.insert(0, %r)\nimport models\nfrom flax import nnx\n\n'
    'def abstract():\n  return nnx.state(nnx.eval_shape(lambda: models.NnxMLPWithDropout(nnx.Rngs(0))))\n'
    % str(ports.__file__.rsplit('/', 1)[0])
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
        '--json',
      ]
    )
    == cli.EXIT_OK
  )
  got = json.loads(capsys.readouterr().out)
  assert got['written'] == str(tmp_path / 'nnx' / 'default') and got['layout'] == 'nnx' and got['arrays'] == 4
  d_in, d_hid, d_out = models.D_IN, models.D_HID, models.D_OUT
  assert got['bytes'] == 4 * (d_in * d_hid + d_hid + d_hid * d_out + d_out)  # float32
  assert sorted(got['left_out']) == ['drop/rngs/count', 'drop/rngs/key'] and got['filled'] == []
  assert (got['source_layout'], got['dropped'], got['skipped']) == ('linen', [], [])


def test_every_command_takes_quiet_and_verbose_and_they_say_less_and_more(tmp_path, capsys):
  parser = cli._parser()
  commands = next(a for a in parser._actions if a.dest == 'command').choices
  for name, sub in commands.items():
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {'--quiet', '--verbose'} <= flags, name
  save(tmp_path / 'linen', ports.linen_variables(ports.LNet()))
  (tmp_path / 'rules.py').write_text(f'RULES = {ports.NET_RULES!r}\n')
  rules = ['--rules', f'{tmp_path}/rules.py:RULES']
  assert cli.main(['convert', str(tmp_path / 'linen'), str(tmp_path / 'nnx'), '--to', 'nnx', *rules, '--quiet']) == 0
  said = {}
  for command in (
    ['inspect', str(tmp_path / 'linen')],
    ['plan', str(tmp_path / 'linen'), '--to', 'nnx', *rules],
    ['compare', str(tmp_path / 'linen'), str(tmp_path / 'nnx'), *rules],
  ):
    capsys.readouterr()
    for level in ('--quiet', None, '--verbose'):
      assert cli.main(command + ([level] if level else [])) == cli.EXIT_OK
      said[command[0], level] = capsys.readouterr().out.splitlines()
  quiet, plain, verbose = (said['inspect', k] for k in ('--quiet', None, '--verbose'))
  assert quiet == plain[: len(quiet)] and not any('chunk' in line for line in quiet)
  assert len(plain) == len(verbose) and not any('stored as' in line for line in plain)
  assert "  stored as params.Dense_0.kernel" in '\n'.join(verbose)
  quiet, plain, verbose = (said['plan', k] for k in ('--quiet', None, '--verbose'))
  assert quiet == plain[:1] and len(plain) > 20 and quiet[0].startswith('linen -> nnx: ')
  assert any('convert: reads' in line for line in verbose) and not any('convert: reads' in line for line in plain)
  quiet, plain, verbose = (said['compare', k] for k in ('--quiet', None, '--verbose'))
  assert quiet[-1] == plain[-1] == verbose[-1] == 'MATCH'
  same = [line for line in verbose if line.startswith('  same     ')]
  assert len(same) == 22 and '  same     inp/kernel/value  <-  params.Dense_0.kernel' in same, verbose
  assert not any(line.startswith('  same') for line in plain + quiet)
