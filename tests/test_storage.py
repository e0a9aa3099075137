"""Every face of the package on local disk and on gs:// (a real GCS emulator, see object_store.py): the same
case list on both, so that the two cannot drift. On gs:// Orbax writes in place and commits last
(commit_success.txt in each directory it saved), where on local disk it renames a temporary directory.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx
from orbax.checkpoint import v1 as ocp_v1

import models
import orbax_linen_nnx
from helpers import linen_pairs, make_bn_drop, read_with_linen, save, tx
from models import DROP_RULES, MLP_RULES
from orbax_linen_nnx import LinenCompatRestore, LinenCompatSave, cli, convert, source

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_DIR = ocp.path.step.TMP_DIR_SUFFIX


def cli_run(capsys, *args) -> subprocess.CompletedProcess:
  """The command line, in this process (test_cli.py runs it in fresh ones): its status and what it printed."""
  capsys.readouterr()
  status = cli.main([os.fspath(a) for a in args])
  out = capsys.readouterr()
  return subprocess.CompletedProcess(args, status, out.out, out.err)


def files(d: epath.Path) -> dict[str, int]:
  """Every file under `d` and its size (for checking nothing was written there)."""
  out = {}
  for p in d.iterdir():
    if p.is_dir():
      out.update(files(p))
    else:
      out[os.fspath(p)] = p.stat().length if hasattr(p.stat(), 'length') else p.stat().st_size
  return out


def resumed(restored, abstract, latest):
  """The restored Linen run in a fresh NNX model, checked, and its next step taken: the model."""
  models.assert_sharded_as(restored, abstract, left_out={'model/drop/rngs/key', 'model/drop/rngs/count'})
  state = make_bn_drop()
  nnx.update(state, restored)
  models.assert_same(nnx.state(state), models.flat(latest), linen_pairs())
  # The next step, dropout off in both: equal to float32 summation order (sharded NNX vs unsharded Linen).
  _, linen_loss = models.linen_bn_drop_step(latest, jax.random.key(0), False)
  nnx_loss = models.nnx_bn_drop_step(state['model'], state['optimizer'], False)
  models.assert_reductions_close(np.array(nnx_loss), np.array(linen_loss), terms=models.BN_STEP_TERMS)
  return state


def test_linen_run_resumes_in_nnx_from_its_run_directory(storage, mesh):
  """A Linen run (BatchNorm + Dropout) with two steps, restored into sharded NNX from the run directory with
  no step (its latest finished step, as the command line takes it) and trained on."""
  first = models.linen_bn_drop_state(tx(), steps=1)
  latest = models.linen_bn_drop_state(tx(), steps=2)
  save(storage / 'run', step=1, what=ocp.args.StandardSave(first))
  save(storage / 'run', step=2, what=ocp.args.StandardSave(latest))
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')

  restored = orbax_linen_nnx.restore(storage / 'run', abstract, rules=DROP_RULES)
  with ocp.CheckpointManager(storage / 'run') as mngr:
    assert mngr.all_steps() == [1, 2]
    via_manager = mngr.restore(2, args=LinenCompatRestore(abstract, rules=DROP_RULES))
  models.assert_all_equal(restored, via_manager)
  state = resumed(restored, abstract, latest)
  assert int(state['optimizer'].step.get_value()) == 3


def test_bare_saves_in_a_numeric_directory_are_finished_checkpoints(storage, mesh, capsys):
  """Checkpoints saved without a manager into `<x>/1/default` (StandardCheckpointer) and `<x>/0/items`
  (PyTreeCheckpointer, MaxText's parameter-only checkpoints): planned, restored and inspected, although
  their parent is named like a step (on gs:// the commit marker is in the directory Orbax saved)."""
  params = models.linen_mlp_state(tx()).params['params']
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage / 'bare' / '1' / 'default', params)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(storage / 'params_only' / '0' / 'items', params)
  model = lambda: models.NnxMLP(nnx.Rngs(0))  # noqa: E731
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(model)), mesh, 'two_axes')
  for item in (
    storage / 'bare' / '1' / 'default',
    storage / 'params_only' / '0' / 'items',
    storage / 'bare' / '1',
    storage / 'params_only' / '0',
  ):
    plan = orbax_linen_nnx.plan(item, abstract, rules=MLP_RULES)
    assert len(plan.reads) == 4, plan
    restored = orbax_linen_nnx.restore(item, abstract, rules=MLP_RULES)
    models.assert_same(
      restored,
      models.flat(params),
      {
        'fc1/kernel': 'Dense_0/kernel',
        'fc1/bias': 'Dense_0/bias',
        'fc2/kernel': 'Dense_1/kernel',
        'fc2/bias': 'Dense_1/bias',
      },
    )
    models.assert_sharded_as(restored, abstract)
  for item in (storage / 'bare' / '1', storage / 'params_only' / '0' / 'items'):
    r = cli_run(capsys, 'inspect', item)
    assert r.returncode == cli.EXIT_OK and 'Dense_0/' in r.stdout, r.stderr
  fresh = model()
  nnx.update(fresh, restored)
  assert np.isfinite(fresh(models.batch()[0])).all()


def test_an_unfinished_save_is_named_as_one(storage, capsys):
  """A manager step whose save did not finish is refused as unfinished, however it is named; on gs:// it
  has no commit marker, on local disk it is still under Orbax's temporary name."""
  save(storage / 'run', step=1, what=ocp.args.StandardSave({'w': np.ones((4, 4), np.float32)}))
  step = storage / 'run' / '1'
  if os.fspath(storage).startswith('gs://'):
    (step / 'commit_success.txt').unlink()  # as a save interrupted before its commit leaves it
    unfinished = step
  else:
    unfinished = step.parent / ('1' + ocp.path.step.TMP_DIR_SUFFIX + '1')
    step.rename(unfinished)
  with pytest.raises(orbax_linen_nnx.DamagedCheckpointError, match='did not finish|not finished writing'):
    orbax_linen_nnx.plan(unfinished, {'w': jax.ShapeDtypeStruct((4, 4), np.float32)})
  r = cli_run(capsys, 'inspect', unfinished / 'default')
  assert r.returncode == cli.EXIT_UNREADABLE and ('did not finish' in r.stderr or 'not finished' in r.stderr), r.stderr


def test_nnx_saved_as_linen_is_read_by_plain_linen_code(storage, mesh):
  """LinenCompatSave of a trained, sharded NNX model (BatchNorm + Dropout) read by Linen code in a process
  that never imports this package, and the next steps match the NNX run's."""
  state = make_bn_drop()
  nnx.update(state, models.put_sharded(nnx.state(state), mesh, 'two_axes'))
  models.nnx_bn_drop_step(state['model'], state['optimizer'], True)
  save(storage / 'nnx', step=1, what=LinenCompatSave(state, rules=DROP_RULES))
  out = read_with_linen([{'directory': os.fspath(storage / 'nnx'), 'step': 1, 'kind': 'bn_drop', 'steps': 1}])
  got = out['results'][0]
  assert got['sharded_as_asked']
  ours = models.host_values(nnx.state(state))
  for nnx_path, linen_path in linen_pairs().items():
    want = ours[nnx_path]
    np.testing.assert_array_equal(np.asarray(got['values'][linen_path]).astype(want.dtype), want, err_msg=nnx_path)
  nnx_loss = models.nnx_bn_drop_step(state['model'], state['optimizer'], False)
  models.assert_reductions_close(np.array(got['losses']), np.array([nnx_loss]), terms=models.BN_STEP_TERMS)


def test_orbax_v1_loads_and_saves(storage, mesh):
  linen = models.linen_mlp_state(optax.adamw(1e-2))
  save(storage / 'linen', step=2, what=ocp.args.StandardSave(linen))
  make = lambda: models.nnx_train_state(models.NnxMLP, optax.adamw(1e-2))  # noqa: E731
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make)), mesh, 'two_axes')
  got = ocp_v1.load_checkpointables(storage / 'linen' / '2', {'default': LinenCompatRestore(abstract, rules=MLP_RULES)})
  state = make()
  nnx.update(state, got['default'])
  models.assert_sharded_as(got['default'], abstract)
  with ocp_v1.training.Checkpointer(storage / 'v1') as ckptr:
    ckptr.save_checkpointables(1, {'train_state': LinenCompatSave(state, rules=MLP_RULES)})
    back = ckptr.load_checkpointables(1, {'train_state': LinenCompatRestore(abstract, rules=MLP_RULES)})
  models.assert_all_equal(back['train_state'], nnx.state(state))
  assert np.isfinite(models.nnx_step(state['model'], state['optimizer']))


def test_command_line_inspects_plans_converts_and_compares(storage, capsys):
  linen = models.linen_bn_drop_state(tx())
  save(storage / 'run', step=2, what=ocp.args.StandardSave(linen))
  assert cli_run(capsys, 'inspect', storage / 'run').returncode == cli.EXIT_OK
  r = cli_run(capsys, 'plan', storage / 'run' / '2', '--to', 'nnx')
  assert r.returncode == cli.EXIT_OK and 'Dense_0' in r.stdout, r.stderr
  r = cli_run(capsys, 'convert', storage / 'run' / '2', storage / 'nnx' / '2', '--to', 'nnx', '--quiet')
  assert r.returncode == cli.EXIT_OK, r.stderr
  assert cli_run(capsys, 'compare', storage / 'run' / '2', storage / 'nnx' / '2').returncode == cli.EXIT_OK
  with ocp.CheckpointManager(storage / 'nnx') as mngr:  # a finished step of a run directory
    assert mngr.all_steps() == [2]
  # Never into its own source, named as the storage names it (a gs:// path has no local resolve()).
  before = files(storage / 'run')
  r = cli_run(capsys, 'convert', storage / 'run' / '2', storage / 'run' / '2' / 'x', '--to', 'nnx', '--quiet')
  assert r.returncode == cli.EXIT_DESTINATION and 'overlap' in r.stderr, r.stderr
  src = source.open_checkpoint(storage / 'run' / '2')
  for dst in (storage / 'run' / '2', storage / 'run', storage / 'run' / '2' / 'default' / 'y'):
    with pytest.raises(convert.DestinationExistsError, match='overlap'):
      convert.convert(src, dst, convert.plan_to(src, 'nnx'))
  assert files(storage / 'run') == before


INTERRUPTED = """
import os, sys
from orbax_linen_nnx import convert, source
src = source.open_checkpoint(sys.argv[1])
convert.convert(src, sys.argv[2], convert.plan_to(src, 'nnx'), batch_bytes=64 * 1024,
                on_written=lambda nbytes, arrays: os._exit(9))  # dies after its first block: no cleanup
"""


def test_an_interrupted_convert_is_redone_by_running_it_again(storage, capsys):
  """Killed after its first block: what it left is refused as unfinished, and running the same command
  again (no --overwrite) writes the whole checkpoint, on both storages. Something else unfinished at DST
  is not replaced without --overwrite."""
  rng = np.random.default_rng(0)
  params = {f'Dense_{i}': {'kernel': rng.standard_normal((128, 128), dtype=np.float32)} for i in range(8)}
  save(storage / 'big', {'params': params})
  src, dst = storage / 'big' / '1', storage / 'nnx' / '1'
  env = {**{k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}, 'JAX_PLATFORMS': 'cpu'}
  died = subprocess.run(
    [sys.executable, '-c', INTERRUPTED, os.fspath(src), os.fspath(dst)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert died.returncode == 9, died.stderr[-3000:]
  if os.fspath(storage).startswith('gs://'):  # written in place: there, unfinished
    r = cli_run(capsys, 'inspect', dst)
    assert r.returncode == cli.EXIT_UNREADABLE and 'did not finish' in r.stderr, r.stderr
  else:  # under a temporary name: nothing at DST
    assert not dst.exists()
  r = cli_run(capsys, 'convert', src, dst, '--to', 'nnx', '--quiet')
  assert r.returncode == cli.EXIT_OK, r.stderr
  assert cli_run(capsys, 'compare', src, dst).returncode == cli.EXIT_OK

  other = storage / 'other' / '1'
  (other / 'default').mkdir(parents=True)
  (other / 'default' / 'something').write_text('not a convert')
  r = cli_run(capsys, 'convert', src, other, '--to', 'nnx', '--quiet')
  assert r.returncode == cli.EXIT_DESTINATION, r.stderr
  expected = 'did not finish' if os.fspath(storage).startswith('gs://') else 'already exists'
  assert expected in r.stderr and '--overwrite' in r.stderr, r.stderr
  assert (other / 'default' / 'something').read_text() == 'not a convert'


def test_convert_on_two_processes_each_writes_its_share(storage, capsys):
  """`--distributed`: two processes (2 CPU devices each, loopback only) read and write their own shards."""
  import socket

  rng = np.random.default_rng(2)
  save(
    storage / 'linen',
    {
      'params': {
        'Dense_0': {'kernel': rng.standard_normal((256, 512), dtype=np.float32)},
        'Dense_1': {'kernel': rng.standard_normal((512, 8), dtype=np.float32)},
      }
    },
  )
  src = storage / 'linen'
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  base = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
  base.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2', PYTHONPATH=str(REPO / 'tests'))
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(REPO / 'tests' / 'cli_loopback.py'),
        'convert',
        os.fspath(src / '1'),
        os.fspath(storage / 'nnx' / '1'),
        '--to',
        'nnx',
        '--quiet',
        '--distributed',
        '--coordinator',
        f'127.0.0.1:{port}',
        '--num-processes',
        '2',
        '--process-id',
        str(i),
      ],
      cwd=REPO,
      env=base,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=180) for p in procs]  # a hang fails here instead of stalling CI
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  # One report, from process 0. Gloo's C++ side also prints connection lines to stdout, not always with
  # its '[Gloo]' prefix ("1 is connected to 1 peer ranks ..."), so only the CLI's own lines are counted.
  reports = [[line for line in out.splitlines() if line.startswith('wrote ')] for out, _ in outs]
  assert len(reports[0]) == 1 and reports[1] == [], [out for out, _ in outs]
  # Each process wrote its own OCDBT files, each about half of the 528 KiB of arrays (split over the 4
  # devices, two per process; random float32 values barely compress): no process wrote everything.
  item = storage / 'nnx' / '1' / 'default'
  written = [sum(files(item / f'ocdbt.process_{i}').values()) for i in range(2)]
  with ocp.CheckpointManager(src) as mngr:
    total = sum(a.nbytes for a in jax.tree.leaves(mngr.restore(1)))
  assert all(0.4 * total < w < 0.6 * total for w in written), (written, total)
  assert cli_run(capsys, 'compare', src, storage / 'nnx').returncode == cli.EXIT_OK


def test_s3_is_refused_before_any_request_and_the_proposed_copy_works(s3, tmp_path, mesh, capsys):
  """s3:// on moto's S3 server. The installed Orbax opens no checkpoint there (its TensorStore specs cover
  local paths and gs:// only), so every face refuses an s3:// path before its first request, saying so and
  what to do; plain Orbax fails on the same checkpoint too. The proposed fix, a local copy, then restores and
  trains. Should an Orbax open s3://, the check lets it through and this test runs the restore there."""
  import s3fs

  latest = models.linen_bn_drop_state(tx(), steps=2)
  save(tmp_path / 'run', step=2, what=ocp.args.StandardSave(latest))
  run = s3.root('run')
  bucket = s3fs.S3FileSystem()
  bucket.put(os.fspath(tmp_path / 'run'), os.fspath(run).removeprefix('s3://'), recursive=True)
  assert (run / '2' / 'default' / '_METADATA').exists()  # the checkpoint is there, whole
  abstract = models.shard_abstract(nnx.state(nnx.eval_shape(make_bn_drop)), mesh, 'two_axes')

  try:
    source.check_storage(run)
    where = run  # an Orbax that opens s3://: restored in place
  except orbax_linen_nnx.UnsupportedStorageError:
    with pytest.raises(Exception), ocp.CheckpointManager(run) as mngr:  # noqa: B017 - Orbax's own limit, any error
      mngr.restore(2, args=ocp.args.StandardRestore())
    before = s3.requests()
    faces = {
      'plan': lambda: orbax_linen_nnx.plan(run, abstract, rules=DROP_RULES),
      'restore': lambda: orbax_linen_nnx.restore(run / '2', abstract, rules=DROP_RULES),
      'open': lambda: source.open_checkpoint(run),
      'convert into': lambda: convert.convert(
        source.open_checkpoint(tmp_path / 'run'),
        run / 'nnx',
        convert.plan_to(source.open_checkpoint(tmp_path / 'run'), 'nnx'),
      ),
    }
    for face, call in faces.items():
      with pytest.raises(orbax_linen_nnx.UnsupportedStorageError) as e:
        call()
      message = str(e.value)
      assert 's3://' in message and 'Mount the bucket' in message and 'copy the checkpoint' in message, (face, message)
      assert TMP_DIR not in message, message
      assert f'Orbax {ocp.__version__}' in message, message
    for args in (
      ('inspect', run),
      ('plan', run / '2', '--to', 'nnx'),
      ('convert', tmp_path / 'run' / '2', run / 'x', '--to', 'nnx', '--quiet'),
    ):
      r = cli_run(capsys, *args)
      assert r.returncode == cli.EXIT_UNREADABLE and 'cannot open checkpoints on s3://' in r.stderr, (args, r.stderr)
    assert s3.requests() == before  # refused from the path alone
    # LinenCompatSave, by a manager (async and not) and by Orbax v1: refused too, when the save's error
    # comes (plain StandardSave fails there as well), and the process is not held after.
    for asynchronous in (True, False):
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous)
      with pytest.raises(orbax_linen_nnx.UnsupportedStorageError, match='save to local disk and copy'):
        with ocp.CheckpointManager(s3.root('saved'), options=options) as mngr:
          mngr.save(1, args=LinenCompatSave(nnx.state(make_bn_drop()), rules=DROP_RULES))
          mngr.wait_until_finished()
    with pytest.raises(orbax_linen_nnx.UnsupportedStorageError, match='save to local disk and copy'):
      with ocp_v1.training.Checkpointer(s3.root('v1')) as ckptr:
        ckptr.save_checkpointables(1, {'train_state': LinenCompatSave(nnx.state(make_bn_drop()), rules=DROP_RULES)})
    # The proposed fix: copy the checkpoint to local disk (as `aws s3 cp --recursive` does) and pass that.
    where = tmp_path / 'copied'
    bucket.get(os.fspath(run).removeprefix('s3://'), os.fspath(where), recursive=True)

  resumed(orbax_linen_nnx.restore(where, abstract, rules=DROP_RULES), abstract, latest)
