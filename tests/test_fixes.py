"""Every fix an error proposes, applied as the face that proposed it says it (issue 31).

A newcomer's Linen CNN (Conv, BatchNorm, Dropout, Dense; a TrainState with batch statistics and Adam) and its
NNX port named conv1/bn1/fc1: without rules the error fits one screen, fix first, one line a module, the
closest sources by kind and shape; the Python API says its fixes in Python, the command line in flags and
files; each fix is taken as printed, and the restore it makes trains on.
"""

import ast
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
import ports
from helpers import save
from orbax_linen_nnx import LinenCompatRestore, LinenCompatWarning, PlanError, cli

MODULES = ('conv1', 'bn1', 'conv2', 'bn2', 'fc1', 'fc2')


@pytest.fixture(scope='module')
def cnn_run(tmp_path_factory):
  run = tmp_path_factory.mktemp('cnn') / 'run'
  linen = ports.linen_cnn_state()
  save(run, linen)
  return run, linen


@pytest.fixture(scope='module')
def target_file(tmp_path_factory):
  """`--target FILE:abstract` for the port (an absolute path: a printed command runs from anywhere)."""
  path = tmp_path_factory.mktemp('target') / 'target.py'
  path.write_text(
    f'import sys\nsys.path.insert(0, {models.__file__.rsplit("/", 1)[0]!r})\n'
    'from ports import abstract_cnn as abstract\n'
  )
  return f'{path}:abstract'


def restore(run, **options):
  with ocp.CheckpointManager(run) as mngr:
    return mngr.restore(1, args=LinenCompatRestore(ports.abstract_cnn(), **options))


def assert_restored_and_trains(restored, linen):
  """Every leaf as the Linen run saved it, bit for bit; then the port's next step runs on it."""
  model, optimizer = ports.cnn_train_state(rngs_seed=7)
  nnx.update(model, restored['model'])
  nnx.update(optimizer, restored['optimizer'])
  params = {'params': linen.params, 'batch_stats': linen.batch_stats}
  for linen_name, name in ports.CNN_RULES.items():
    for leaves in params.values():
      for leaf, want in leaves.get(linen_name, {}).items():
        np.testing.assert_array_equal(getattr(getattr(model, name), leaf)[...], want, err_msg=f'{name}/{leaf}')
    for leaf, want in linen.opt_state[0].mu[linen_name].items():
      np.testing.assert_array_equal(optimizer.opt_state[0].mu[name][leaf][...], want)
  assert int(optimizer.step[...]) == int(linen.step) == 1
  # Evaluation mode, same weights: the same logits as Linen's own apply, up to float32 reduction order
  # (the largest contraction is conv2's 3 x 3 x 8 inputs, then the mean over 64 pixels and fc1's 16, fc2's 32).
  x, y = ports.cnn_images(seed=3)
  model.eval()
  models.assert_reductions_close(model(x), ports.LCNN().apply(params, x), terms=3 * 3 * 8 + 3 * 3 * 3 + 64 + 16 + 32)
  # The next training step: dropout on, batch statistics updated, Adam's count moves to 2.
  model.train()

  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  value, grads = nnx.value_and_grad(loss)(model)
  before = np.asarray(model.fc2.kernel[...])
  optimizer.update(model, grads)
  assert np.isfinite(float(value)) and int(optimizer.step[...]) == 2
  assert not np.array_equal(model.fc2.kernel[...], before)
  assert not np.array_equal(model.bn1.mean[...], linen.batch_stats['BatchNorm_0']['mean'])


def test_a_cnn_without_rules_fits_one_screen_fix_first_and_the_python_fix_works(cnn_run):
  run, linen = cnn_run
  with pytest.raises(PlanError) as e:
    restore(run)
  lines = str(e.value).splitlines()
  assert len(lines) <= 25, str(e.value)
  assert lines[0].endswith('12 problem(s) (80 leaves); nothing was read.'), lines[0]
  assert lines[1].startswith('Fix: rename modules with rules={') and 'or pass partial=True' in lines[1]
  assert '--rules' not in str(e.value)  # the API's own language
  for name in MODULES:
    assert sum(line.startswith(f"  target module '{name}' has no source") for line in lines) == 1, name
  for name in ports.CNN_RULES:
    assert sum(line.startswith(f"  source module '{name}' is not used by any target") for line in lines) == 1
  bn1 = next(line for line in lines if line.startswith("  target module 'bn1'"))
  assert bn1 == (
    "  target module 'bn1' has no source: bias (8,), mean (8,), scale (8,), var (8,) (+4 optimizer"
    " leaves); closest unused: 'BatchNorm_0' (the same leaves and shapes), 'BatchNorm_1' (the same"
    " leaves, other shapes)"
  )
  # Leaf by leaf behind `details`: 6 modules x (params + batch stats + Adam's two moments), each side.
  assert len(e.value.details) == 80
  assert "source 'batch_stats/BatchNorm_1/var' (16,) float32 is not used by any target" in e.value.details
  # The fix, as printed.
  rules = ast.literal_eval(re.search(r'rules=(\{.*?\})', lines[1])[1])
  assert rules == ports.CNN_RULES
  assert_restored_and_trains(restore(run, rules=rules), linen)
  # The other fix, as printed: partial=True restores what matches (nothing, here) and says what it kept.
  with pytest.warns(LinenCompatWarning, match='no source'):
    kept = restore(run, partial=True)
  assert not jax.tree.leaves(kept['model'])


def test_near_misses_are_ranked_by_kind_and_shape(cnn_run):
  """A port configured wider (conv1 with 12 features): bn1 has no same-shaped partner. Its hints are the
  BatchNorm sources (the same leaves), never a Conv's or a Dense's bias of a matching shape."""
  run, _ = cnn_run
  with ocp.CheckpointManager(run) as mngr, pytest.raises(PlanError) as e:
    mngr.restore(1, args=LinenCompatRestore(ports.abstract_cnn(width=12)))
  bn1 = next(line for line in str(e.value).splitlines() if line.startswith("  target module 'bn1'"))
  hints = re.findall(r"'(\w+)' \(the same leaves, other shapes\)", bn1.split('closest unused: ')[1])
  assert sorted(hints) == ['BatchNorm_0', 'BatchNorm_1'], bn1


def test_every_fix_the_command_line_proposes_works_as_printed(cnn_run, target_file, tmp_path, capsys):
  run, linen = cnn_run
  src = str(run / '1')
  assert cli.main(['plan', src, '--target', target_file]) == cli.EXIT_PLAN
  err = capsys.readouterr().err.splitlines()
  assert len(err) <= 25
  fix = err[1]
  assert fix.startswith('Fix: add --rules auto, which pairs ') and '; or add --partial' in fix, fix
  assert 'rules={' not in '\n'.join(err) and 'partial=True' not in '\n'.join(err)  # flags and files only
  assert err[-1] == '(80 leaves in all: --verbose lists each)'
  # 1. --rules auto.
  assert cli.main(['plan', src, '--target', target_file, '--rules', 'auto']) == cli.EXIT_OK
  # 2. The file, by the command printed, run as printed in a shell (the installed entry point).
  command = re.search(r'to keep them as a file: (.*? --suggest-rules) > rules\.py, then --rules rules\.py:RULES', fix)[
    1
  ]
  bin_dir = os.path.dirname(sys.executable)
  done = subprocess.run(
    ['bash', '-c', f'{command} > rules.py'],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=240,
    env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'JAX_PLATFORMS': 'cpu'},
  )
  assert done.returncode == 0, done.stderr
  capsys.readouterr()
  convert = [
    'convert',
    src,
    str(tmp_path / 'nnx' / '1'),
    '--target',
    target_file,
    '--rules',
    f'{tmp_path}/rules.py:RULES',
    '--quiet',
  ]
  assert cli.main(convert) == cli.EXIT_OK, capsys.readouterr().err
  abstract = ports.abstract_cnn()  # plain Orbax reads what the fix made (the Dropout's RNG stream: none in Linen)
  abstract['model'] = abstract['model'].filter(nnx.Not(nnx.RngState))
  with ocp.CheckpointManager(tmp_path / 'nnx') as mngr:
    converted = mngr.restore(1, args=ocp.args.StandardRestore(abstract))
  assert_restored_and_trains(converted, linen)
  # 3. --partial.
  assert cli.main(['plan', src, '--target', target_file, '--partial']) == cli.EXIT_OK


def test_a_typo_is_dropped_from_the_fix_on_both_faces(cnn_run, target_file, tmp_path, capsys):
  run, linen = cnn_run
  typo = {('Conv_O' if k == 'Conv_0' else k): v for k, v in ports.CNN_RULES.items()}
  # Python.
  with pytest.raises(PlanError) as e:
    restore(run, rules=typo)
  message = str(e.value)
  assert "rule 'Conv_O' matched no source leaf" in message
  rules = ast.literal_eval(re.search(r'Fix: rename modules with rules=(\{.*?\})', message)[1])
  assert 'Conv_O' not in rules
  assert_restored_and_trains(restore(run, rules=rules), linen)
  # The command line: a rules file with the typo; the fix names the file to write, which then works.
  (tmp_path / 'mine.py').write_text(f'RULES = {typo!r}\n')
  capsys.readouterr()
  assert (
    cli.main(['plan', str(run / '1'), '--target', target_file, '--rules', f'{tmp_path}/mine.py:RULES']) == cli.EXIT_PLAN
  )
  err = capsys.readouterr().err
  table = re.search(
    r'Fix: write the renames in a file, rules\.py holding RULES = (\{.*?\}), and pass --rules'
    r' rules\.py:RULES',
    err,
  )
  assert table, err
  (tmp_path / 'rules.py').write_text(f'RULES = {table[1]}\n')
  assert (
    cli.main(['plan', str(run / '1'), '--target', target_file, '--rules', f'{tmp_path}/rules.py:RULES']) == cli.EXIT_OK
  )
