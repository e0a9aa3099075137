"""The command line, run as users run it (a subprocess), on real checkpoints: outputs, exit codes, sources untouched."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import decoders as dec
import models
from orbax_linen_nnx import LinenCompatRestore, cli
from helpers import save
from gemma import GEMMA_RULES, LinenGemmaBlock, NnxGemmaBlock, linen_gemma_state

REPO = Path(__file__).resolve().parents[1]
MLP_RULES_FILE = "RULES = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}\n"


def run(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
  """`python -m orbax_linen_nnx ARGS` in a fresh process (one CPU device, as on a workstation)."""
  base = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
  base.update(JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run(
    [sys.executable, '-m', 'orbax_linen_nnx', *map(str, args)],
    cwd=REPO,
    env=base,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def digest(directory: Path) -> str:
  """Every file under `directory`, names and bytes: changes if anything is written there."""
  h = hashlib.sha256()
  for p in sorted(directory.rglob('*')):
    h.update(str(p.relative_to(directory)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()


def restore(directory, step=1, args=None):
  with ocp.CheckpointManager(directory) as m:
    return m.restore(step, args=args)


def without_value(tree) -> dict:
  """{path: array} with NNX's `/value` nodes folded into their Variable's path."""
  return {p.removesuffix('/value'): v for p, v in models.host_values(tree).items()}


def assert_same_leaves(got: dict, want: dict):
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for path, value in want.items():
    assert got[path].dtype == value.dtype, (path, got[path].dtype, value.dtype)
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def nnx_abstract(make):
  return nnx.state(nnx.eval_shape(make))


@pytest.fixture
def linen_mlp(tmp_path):
  state = models.linen_mlp_state(optax.adam(1e-2))
  save(tmp_path / 'linen', state)
  rules = tmp_path / 'mlp_rules.py'
  rules.write_text(MLP_RULES_FILE)
  return tmp_path / 'linen', f'{rules}:RULES'


def test_convert_linen_to_nnx_is_what_the_restore_gives_and_nnx_code_reads_it(tmp_path, linen_mlp):
  src, rules = linen_mlp
  before = digest(src)
  r = run('convert', src / '1', tmp_path / 'nnx' / '1', '--to', 'nnx', '--rules', rules)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"wrote {tmp_path / 'nnx' / '1' / 'default'} (nnx layout): 14 arrays"), r.stdout
  assert digest(src) == before  # the source is only read
  make = lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))
  abstract = nnx_abstract(make)
  want = restore(src, args=LinenCompatRestore(abstract, rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}))
  # NNX code, without this package: a plain StandardRestore of the converted checkpoint into its state.
  plain = restore(tmp_path / 'nnx', args=ocp.args.StandardRestore(abstract))
  assert_same_leaves(without_value(plain), without_value(want))
  # And the checkpoint as written (no target): the same leaves, each under `.../value` as NNX saves it.
  as_saved = restore(tmp_path / 'nnx')
  assert 'model/fc1/kernel/value' in models.host_values(as_saved)
  assert_same_leaves(without_value(as_saved), without_value(want))
  # compare agrees, and exits 0.
  r = run('compare', src, tmp_path / 'nnx', '--rules', rules)
  assert r.returncode == 0, r.stdout + r.stderr
  assert '14 leaves compared: 14 match, 0 differ; 0 missing from A, 0 extra in A (bit for bit)' in r.stdout
  assert r.stdout.rstrip().endswith('MATCH')


@pytest.mark.parametrize(
  'nnx_kind,stacks', [('vmap', '{"layers": {"nnx": 0}}'), ('unrolled', '{"layers": {"nnx": null}}')]
)
def test_convert_linen_scan_stacked_or_unrolled_and_back_to_the_same_bits(tmp_path, nnx_kind, stacks):
  state = dec.linen_state(dec.LinenScanDecoder)
  save(tmp_path / 'scan', state)
  r = run('convert', tmp_path / 'scan' / '1', tmp_path / 'nnx' / '1', '--to', 'nnx', '--stacks', stacks)
  assert r.returncode == 0, r.stderr
  module = {'vmap': dec.NnxStackedDecoder, 'unrolled': dec.NnxUnrolledDecoder}[nnx_kind]
  abstract = nnx_abstract(lambda: dec.nnx_state(module))
  want = restore(tmp_path / 'scan', args=LinenCompatRestore(abstract))
  assert_same_leaves(
    without_value(restore(tmp_path / 'nnx', args=ocp.args.StandardRestore(abstract))), without_value(want)
  )
  # Back into exactly the Linen checkpoint's tree (lists, None entries): the original, bit for bit.
  r = run(
    'convert',
    tmp_path / 'nnx' / '1',
    tmp_path / 'back' / '1',
    '--target',
    tmp_path / 'scan' / '1',
    '--stacks',
    '{"layers": {"linen": 1, "nnx": 0}}' if nnx_kind == 'vmap' else '{"layers": {"linen": 1}}',
  )
  assert r.returncode == 0, r.stderr
  back, original = restore(tmp_path / 'back'), restore(tmp_path / 'scan')
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(original)
  models.assert_all_equal(back, original)
  assert run('compare', tmp_path / 'back', tmp_path / 'scan').returncode == 0


def test_convert_with_rules_split_transpose_reshape_cast(tmp_path):
  state, _ = linen_gemma_state()
  save(tmp_path / 'gemma', state)
  rules = tmp_path / 'gemma_rules.py'
  rules.write_text('from gemma import GEMMA_RULES as RULES\n')
  r = run(
    'convert',
    tmp_path / 'gemma' / '1',
    tmp_path / 'nnx' / '1',
    '--to',
    'nnx',
    '--rules',
    f'{rules}:RULES',
    env={'PYTHONPATH': str(REPO / 'tests')},
  )
  assert r.returncode == 0, r.stderr
  abstract = nnx_abstract(
    lambda: {
      'model': NnxGemmaBlock(nnx.Rngs(0)),
      'optimizer': nnx.Optimizer(NnxGemmaBlock(nnx.Rngs(0)), optax.adam(1e-2), wrt=nnx.Param),
    }
  )
  want = restore(tmp_path / 'gemma', args=LinenCompatRestore(abstract, rules=GEMMA_RULES))
  got = without_value(restore(tmp_path / 'nnx'))
  # The model alone is compared: the derived tree keeps the Linen dtypes where no rule casts (bfloat16 moments).
  assert_same_leaves(
    {p: v for p, v in got.items() if p.startswith('model/')},
    {p: v for p, v in without_value(want).items() if p.startswith('model/')},
  )
  assert LinenGemmaBlock  # the Linen side of the port, see test_rules


def test_plan_with_a_model_target_and_its_errors(tmp_path, linen_mlp):
  src, rules = linen_mlp
  target = tmp_path / 'target.py'
  target.write_text(
    'import optax, models\nfrom flax import nnx\n'
    'def abstract():\n'
    '  return nnx.state(nnx.eval_shape(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2))))\n'
  )
  env = {'PYTHONPATH': str(REPO / 'tests')}
  r = run('plan', src, '--target', f'{target}:abstract', '--rules', rules, env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('linen -> nnx: 14 arrays to read'), r.stdout
  assert '  model/fc1/kernel (16, 32) float32  <-  params.params.Dense_0.kernel  (by rename Dense_0)' in r.stdout
  # convert into exactly that model's state: NNX code restores it with a plain StandardRestore.
  r = run('convert', src, tmp_path / 'model' / '1', '--target', f'{target}:abstract', '--rules', rules, env=env)
  assert r.returncode == 0, r.stderr
  abstract = nnx_abstract(lambda: models.nnx_train_state(models.NnxMLP, optax.adam(1e-2)))
  want = restore(src, args=LinenCompatRestore(abstract, rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}))
  assert_same_leaves(
    without_value(restore(tmp_path / 'model', args=ocp.args.StandardRestore(abstract))), without_value(want)
  )
  # Without the rules: exit 3, every problem named, and the fix.
  r = run('plan', src, '--target', f'{target}:abstract', env=env)
  assert r.returncode == cli.EXIT_PLAN, r.stderr
  assert "target module 'fc1' has no source: bias (32,), kernel (16, 32) (+4 optimizer leaves)" in r.stderr
  assert 'Fix: add --rules auto, which pairs Dense_0 -> fc1, Dense_1 -> fc2' in r.stderr
  assert r.stdout == ''
  # --verbose: leaf by leaf too.
  r = run('plan', src, '--target', f'{target}:abstract', '--verbose', env=env)
  assert r.returncode == cli.EXIT_PLAN and "target 'model/fc1/kernel' (16, 32) float32 has no source" in r.stderr
  # A rules module that is not there: exit 2.
  r = run('plan', src, '--to', 'nnx', '--rules', f'{tmp_path}/nope.py:RULES')
  assert r.returncode == cli.EXIT_USAGE and 'no file' in r.stderr, r.stderr


def test_exit_codes_for_unreadable_sources_and_refused_destinations(tmp_path, linen_mlp):
  src, rules = linen_mlp
  r = run('inspect', tmp_path / 'nothing')
  assert r.returncode == cli.EXIT_UNREADABLE and 'does not exist' in r.stderr, r.stderr
  damaged = tmp_path / 'damaged'
  save(damaged, models.linen_mlp_state(optax.adam(1e-2)))
  (damaged / '1' / 'default' / '_METADATA').write_text('{"not": "orbax"}')
  r = run('convert', damaged / '1', tmp_path / 'out' / '1', '--to', 'nnx')
  assert r.returncode == cli.EXIT_UNREADABLE and 'is damaged' in r.stderr, r.stderr
  assert not (tmp_path / 'out').exists()
  # An existing destination is refused unless --overwrite; the source itself, always.
  (tmp_path / 'taken').mkdir()
  r = run('convert', src / '1', tmp_path / 'taken', '--to', 'nnx', '--rules', rules)
  assert r.returncode == cli.EXIT_DESTINATION and '--overwrite' in r.stderr, r.stderr
  r = run('convert', src / '1', tmp_path / 'taken', '--to', 'nnx', '--rules', rules, '--overwrite', '--quiet')
  assert r.returncode == 0, r.stderr
  r = run('convert', src / '1', src / '1' / 'inside', '--to', 'nnx', '--overwrite')
  assert r.returncode == cli.EXIT_DESTINATION and 'never into its source' in r.stderr, r.stderr
  r = run('convert', src / '1', tmp_path / 'same', '--to', 'linen')
  assert r.returncode == cli.EXIT_USAGE and 'already in the linen layout' in r.stderr, r.stderr


def test_compare_reports_differing_missing_and_extra_leaves(tmp_path, linen_mlp):
  src, rules = linen_mlp
  state = restore(src)
  kernel = np.asarray(state['params']['params']['Dense_0']['kernel'])
  state['params']['params']['Dense_0']['kernel'] = kernel + np.where(
    np.arange(kernel.size).reshape(kernel.shape) < 3, 1e-3, 0
  ).astype(np.float32)
  save(tmp_path / 'changed', state)
  r = run('compare', src, tmp_path / 'changed')
  assert r.returncode == cli.EXIT_DIFFER, r.stdout + r.stderr
  line = next(l for l in r.stdout.splitlines() if l.startswith('  differs'))
  assert line.startswith('  differs  params/params/Dense_0/kernel: 3 of 512 elements, max abs diff 0.001'), line
  assert r.stdout.rstrip().endswith('DIFFER')
  assert run('compare', src, tmp_path / 'changed', '--atol', '2e-3', '--quiet').returncode == 0
  # Leaves one side lacks: B, Linen's `variables` alone, is missing nothing; A has extras.
  save(tmp_path / 'params_only', state['params'])
  r = run('compare', src, tmp_path / 'params_only', '--json')
  report = json.loads(r.stdout)
  assert r.returncode == cli.EXIT_DIFFER and not report['equal']
  assert 'opt_state.0.mu.params.Dense_0.kernel' in report['extra'] and report['missing'] == []
  assert [d['path'] for d in report['differing']] == ['params/Dense_0/kernel']


def test_inspect_shows_layout_step_optimizer_stacks_and_arrays(tmp_path):
  save(tmp_path / 'scan', dec.linen_state(dec.LinenScanDecoder))
  r = run('inspect', tmp_path / 'scan')  # a run directory: its latest step
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[1:5] == [
    '  layout     linen',
    '  step       2',
    '  optimizer  opt_state/0: count, mu (mirrors the params), nu (mirrors the params)',
    '  stack      layers: 4 layers, stacked at axis 1 (from shapes)',
  ], lines[:6]
  assert '          kernel  (8, 4, 8) float32  chunk (8, 4, 8)  1.0 KiB' in lines, r.stdout
  info = json.loads(run('inspect', tmp_path / 'scan' / '1', '--json').stdout)
  assert info['layout'] == 'linen' and info['step'] == 2
  assert info['stacks'] == [{'root': 'layers', 'kind': 'stacked', 'layers': [4], 'layer_axis': [1]}]
  kernel = next(a for a in info['arrays'] if a['path'] == 'params/params/layers/mlp/kernel')
  assert kernel == {
    'path': 'params/params/layers/mlp/kernel',
    'shape': [8, 4, 8],
    'dtype': 'float32',
    'chunk': [8, 4, 8],
    'bytes': 1024,
    'stored_as': 'params.params.layers.mlp.kernel',
  }


def test_progress_bars_on_a_terminal_only(tmp_path, linen_mlp):
  src, rules = linen_mlp
  # rich draws bars only on a terminal; TTY_COMPATIBLE=1 tells it stderr is one.
  r = run('convert', src, tmp_path / 'a' / '1', '--to', 'nnx', '--rules', rules, env={'TTY_COMPATIBLE': '1'})
  assert r.returncode == 0 and 'convert' in r.stderr and '14/14 arrays' in r.stderr, r.stderr
  r = run('convert', src, tmp_path / 'b' / '1', '--to', 'nnx', '--rules', rules, '--quiet', env={'TTY_COMPATIBLE': '1'})
  assert r.returncode == 0 and 'arrays' not in r.stderr, r.stderr
  r = run('convert', src, tmp_path / 'c' / '1', '--to', 'nnx', '--rules', rules)  # a pipe: no bars
  assert r.returncode == 0 and 'arrays' not in r.stderr, r.stderr


def test_arrays_are_written_in_blocks_of_their_stored_chunks_that_orbax_reads_back(tmp_path, mesh):
  """A (64, 512) kernel saved in (16, 256) chunks (a (4, 2) mesh), converted with a 16 KiB budget: stored in
  blocks that tile those chunks ((4, 256): a quarter of a chunk each, so that reads and writes overlap), each
  stored chunk decoded once (tests/test_convert.py counts it); Orbax restores the result with and without a
  target, bit for bit."""
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((64, 512), dtype=np.float32)
  sharded = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', 'model')))
  save(tmp_path / 'linen', {'params': {'Dense_0': {'kernel': sharded}, 'Dense_1': {'bias': np.ones(4, np.float32)}}})
  assert (
    cli.main(
      [
        'convert',
        str(tmp_path / 'linen' / '1'),
        str(tmp_path / 'nnx' / '1'),
        '--to',
        'nnx',
        '--budget',
        '16KiB',
        '--quiet',
      ]
    )
    == 0
  )
  info = json.loads(run('inspect', tmp_path / 'nnx', '--json').stdout)
  assert next(a['chunk'] for a in info['arrays'] if a['path'] == 'Dense_0/kernel/value') == [4, 256]
  plain = restore(tmp_path / 'nnx')
  np.testing.assert_array_equal(np.asarray(plain['Dense_0']['kernel']['value']), kernel)
  abstract = {
    'Dense_0': {'kernel': {'value': jax.ShapeDtypeStruct((64, 512), np.float32, sharding=sharded.sharding)}},
    'Dense_1': {'bias': {'value': jax.ShapeDtypeStruct((4,), np.float32)}},
  }
  got = restore(tmp_path / 'nnx', args=ocp.args.StandardRestore(abstract))
  np.testing.assert_array_equal(np.asarray(got['Dense_0']['kernel']['value']), kernel)
  assert got['Dense_0']['kernel']['value'].sharding == sharded.sharding
  assert run('compare', tmp_path / 'linen', tmp_path / 'nnx').returncode == 0


# Two processes converting (--distributed): tests/test_storage.py, on local disk and on gs://.


def test_an_interrupted_convert_leaves_no_checkpoint(tmp_path):
  """Killed mid-write (SIGKILL, no cleanup): nothing at DST, and what is left is refused as unfinished."""
  rng = np.random.default_rng(0)
  params = {f'Dense_{i}': {'kernel': rng.standard_normal((256, 256), dtype=np.float32)} for i in range(96)}
  save(tmp_path / 'big', {'params': params})  # 24 MiB, 96 arrays of 256 KiB
  cmd = [
    sys.executable,
    '-m',
    'orbax_linen_nnx',
    'convert',
    str(tmp_path / 'big' / '1'),
    str(tmp_path / 'nnx' / '1'),
    '--to',
    'nnx',
    '--budget',
    '256KiB',
    '--quiet',
  ]  # one array per batch: 96 writes
  env = {**{k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 120
    while not list((tmp_path / 'nnx').glob('1.orbax-checkpoint-tmp*/default*/ocdbt.process_0/d/*')):
      assert proc.poll() is None, 'convert finished before it could be interrupted'
      assert time.monotonic() < deadline
      time.sleep(0.01)
    proc.kill()  # some arrays written, the save not committed
    proc.wait(timeout=30)
  finally:
    proc.kill()
  leftovers = list((tmp_path / 'nnx').iterdir())
  assert [p.name for p in leftovers if p.name == '1'] == [], leftovers
  assert run('inspect', tmp_path / 'nnx' / '1').returncode == cli.EXIT_UNREADABLE
  r = run('inspect', leftovers[0])
  assert r.returncode == cli.EXIT_UNREADABLE and 'has not finished writing' in r.stderr, r.stderr
  # Run again: it writes the whole checkpoint.
  assert run(*cmd[3:]).returncode == 0
  assert run('compare', tmp_path / 'big', tmp_path / 'nnx').returncode == 0


def test_maxtext_checkpoint_inspected_and_converted_to_what_nnx_saves(tmp_path):
  """A MaxText pure_nnx checkpoint (Linen layout + nnx_aux: RNG streams, batch stats, a custom Variable; adamw
  with a schedule; item `items`) converts to exactly the tree and values NNX's own StandardSave writes."""
  import maxtext

  state = maxtext.train_state()
  with maxtext.manager(tmp_path / 'maxtext') as mngr:
    maxtext.save(mngr, 1, state)
  save(tmp_path / 'native', nnx.state(state))  # what an NNX run saves itself
  r = run('inspect', tmp_path / 'maxtext' / '1')
  assert r.returncode == 0 and '  layout     linen (MaxText, NNX state under nnx_aux)' in r.stdout, r.stdout + r.stderr
  assert '  optimizer  opt_state/0: count, mu (mirrors the params), nu (mirrors the params)' in r.stdout
  r = run('convert', tmp_path / 'maxtext' / '1', tmp_path / 'nnx' / '1', '--to', 'nnx')
  assert r.returncode == 0, r.stderr
  r = run('compare', tmp_path / 'native', tmp_path / 'nnx')
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.splitlines()[2].startswith(f'{len(models.host_values(nnx.state(state)))} leaves compared: ')
  # And back. An NNX checkpoint does not record Variable types: `--to linen` puts RNG state under nnx_aux and
  # every other Variable with the params (batch stats included); `--target` gives MaxText's tree exactly.
  r = run('convert', tmp_path / 'native' / '1', tmp_path / 'linen' / '1', '--to', 'linen')
  assert r.returncode == 0, r.stderr
  derived = set(models.host_values(restore(tmp_path / 'linen')))
  assert {'params/params/bn/mean', 'nnx_aux/model/drop/rngs/key'} <= derived, sorted(derived)
  r = run('convert', tmp_path / 'native' / '1', tmp_path / 'exact' / '1', '--target', tmp_path / 'maxtext' / '1')
  assert r.returncode == 0, r.stderr
  with maxtext.manager(tmp_path / 'maxtext') as mngr:
    items = mngr.restore(1, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))['items']
  exact = restore(tmp_path / 'exact')
  assert jax.tree_util.tree_structure(exact) == jax.tree_util.tree_structure(items)
  models.assert_all_equal(exact, items)
