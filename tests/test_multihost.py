"""`LinenCompatRestore` on a real multi-controller JAX runtime: N local CPU processes.

Each configuration starts N processes of `multihost_worker.py` (K CPU devices
each, one (4, 2) mesh over all 8), which save one Linen `TrainState` together
with Orbax and restore it into a sharded NNX train state (see the worker's
docstring for the stages). Every process reports to a JSON file; the tests
here compare what the processes report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name('multihost_worker.py')
REPO = WORKER.parent.parent
TIMEOUT_S = 120  # hard limit for one configuration's processes, all together
CONFIGS = [(2, 4), (4, 2)]  # (processes, CPU devices per process)
EXPECTED_ERRORS = {
  'no_rules': [
    "target module 'fc1' has no source: bias (512,), kernel (128, 512)",
    "source module 'Dense_0' is not used by any target: bias (512,), kernel (128, 512)",
    "rules={'Dense_0': 'fc1', 'Dense_1': 'fc2'}",
  ],
  'shape_mismatch': [
    "target 'model/fc1/kernel' (128, 384) float32 cannot be read from source"
    " 'params/params/Dense_0/kernel' (128, 512) float32: shapes differ"
  ],
}


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def worker_env(process_id: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_', 'TPU_', 'CUDA_', 'TF_'))}
  env.update(
    JAX_PLATFORMS='cpu',
    # A different hash seed in each process: any decision that depends on
    # set or dict-of-set iteration order would differ between them.
    PYTHONHASHSEED=str(101 + process_id),
    OMP_NUM_THREADS='1',
    TF_CPP_MIN_LOG_LEVEL='1',
  )
  return env


def tail(path: Path, n: int = 3000) -> str:
  try:
    return path.read_text(errors='replace')[-n:]
  except FileNotFoundError:
    return '<none>'


def launch(
  num_processes: int,
  local_devices: int,
  workdir: Path,
  timeout_s: float = TIMEOUT_S,
  extra_args: dict[int, list[str]] | None = None,
  may_fail: tuple[int, ...] = (),
  grace_s: float = 5,
):
  """Runs the worker in N processes; returns their JSON results, or fails with their output tails.

  Every process is killed when the time is up or when anything goes wrong here:
  none outlives this call.
  """
  run_dir, port = workdir / 'run', free_port()
  procs, logs, outs = [], [], []
  start = time.monotonic()
  try:
    for i in range(num_processes):
      out, log = workdir / f'result_{i}.json', workdir / f'worker_{i}'
      stdout, stderr = open(f'{log}.out', 'wb'), open(f'{log}.err', 'wb')
      logs.append((Path(f'{log}.out'), Path(f'{log}.err')))
      outs.append(out)
      cmd = [
        sys.executable,
        str(WORKER),
        '--port',
        str(port),
        '--num-processes',
        str(num_processes),
        '--process-id',
        str(i),
        '--local-devices',
        str(local_devices),
        '--dir',
        str(run_dir),
        '--out',
        str(out),
        *(extra_args or {}).get(i, []),
      ]
      with stdout, stderr:  # the child keeps its own copies of the descriptors
        procs.append(
          subprocess.Popen(cmd, cwd=REPO, env=worker_env(i), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        )
    # Done when every process expected to finish has (one that may fail may also hang: it is killed then).
    while (
      any(p.poll() is None for i, p in enumerate(procs) if i not in may_fail) and time.monotonic() - start < timeout_s
    ):
      # One failed process leaves the others waiting on it: stop them all.
      if any(p.poll() not in (None, 0) for p in procs):
        # Let the others fail on their own and report, if they do, then stop.
        grace_end = min(start + timeout_s, time.monotonic() + grace_s)
        while any(p.poll() is None for p in procs) and time.monotonic() < grace_end:
          time.sleep(0.2)
        break
      time.sleep(0.2)
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  wall = time.monotonic() - start

  results = []
  for out in outs:
    try:
      results.append(json.loads(out.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
      results.append(None)
  codes = [p.returncode for p in procs]
  expected_ok = [i for i in range(num_processes) if i not in may_fail]
  if (
    any(i in expected_ok for i in hung)
    or any(codes[i] for i in expected_ok)
    or not all(results[i] and results[i]['ok'] for i in expected_ok)
  ):
    report = [
      f'{num_processes} processes x {local_devices} devices (time limit {timeout_s}s):'
      f' exit codes {codes}; still running after {wall:.1f}s, so killed: {hung}'
    ]
    for i, ((o, e), r) in enumerate(zip(logs, results)):
      stage = r['stage'] if r else 'no result file'
      report.append(
        f'--- process {i}: stage {stage!r}\n'
        f'{(r or {}).get("error", "")}\nstdout tail:\n{tail(o)}\nstderr tail:\n{tail(e)}'
      )
    pytest.fail('\n'.join(report), pytrace=False)
  return results, wall, run_dir


def running_workers(marker: Path) -> list[int]:
  """Pids of live processes whose command line names `marker` (a test's own directory)."""
  pids = []
  for cmdline in Path('/proc').glob('[0-9]*/cmdline'):
    try:
      if str(marker).encode() in cmdline.read_bytes():
        pids.append(int(cmdline.parent.name))
    except OSError:
      pass
  return pids


def test_a_hung_process_fails_the_run_with_every_process_output_and_none_survives(tmp_path):
  # Process 1 never starts, so process 0 waits for it in jax.distributed.initialize.
  with pytest.raises(pytest.fail.Exception) as failed:
    # Long enough for both to import JAX and report their first stage on a loaded 2-core machine
    # (4 s was not: imports alone took longer while another suite ran).
    launch(2, 1, tmp_path, timeout_s=20, extra_args={1: ['--hang']})
  message = str(failed.value)
  assert 'exit codes [-9, -9]; still running after 20' in message and 'so killed: [0, 1]' in message, message
  assert "--- process 0: stage 'start'" in message and "--- process 1: stage 'start'" in message, message
  assert 'stderr tail:' in message
  assert running_workers(tmp_path) == []


@pytest.fixture(scope='module', params=CONFIGS, ids=[f'{n}procs_x_{k}devs' for n, k in CONFIGS])
def multihost(request, tmp_path_factory):
  n, k = request.param
  workdir = tmp_path_factory.mktemp(f'multihost_{n}x{k}')
  results, wall, run_dir = launch(n, k, workdir)
  print(f'\n{n} processes x {k} devices: {wall:.1f}s wall; per-process stage times {[r["timings"] for r in results]}')
  return n, k, results, run_dir


def test_save_together_then_restore_every_addressable_shard(multihost):
  n, k, results, run_dir = multihost
  # A real multi-process Orbax save: one OCDBT store per process, one step.
  item = run_dir / '1' / 'default'
  assert sorted(p.name for p in item.glob('ocdbt.process_*')) == [f'ocdbt.process_{i}' for i in range(n)]
  print(
    'full restore, per process: '
    + ', '.join(
      f'{r["restored"]["chunk_reads"]} chunk reads (expected {r["restored"]["expected_chunk_reads"]}),'
      f' {r["restored"]["file_bytes"]} bytes'
      for r in results
    )
  )
  for r in results:
    restored = r['restored']
    # 2 kernels + 2 biases for the model, mu and nu; count; step.
    assert restored['leaves'] == 14, restored['paths']
    assert restored['addressable_shards_checked'] == 14 * k  # every local device, every leaf
    assert restored['chunk_reads'] == restored['expected_chunk_reads'], restored


def test_each_process_reads_only_the_chunks_under_its_own_shards(multihost):
  n, k, results, _ = multihost
  kernel = results[0]['kernel']
  shape, chunk, nbytes = kernel['shape'], kernel['chunk_shape'], kernel['nbytes']
  total_chunks = (shape[0] // chunk[0]) * (shape[1] // chunk[1])
  assert total_chunks >= 8, chunk  # stored as several chunks: one per device shard at save time
  for spec in results[0]['reads']:
    per_process = [r['reads'][spec] for r in results]
    lines = [
      f'  process {r["process_id"]}: {m["chunk_reads"]} chunk reads (expected'
      f' {m["expected_chunk_reads"]}, {m["distinct_slices"]} distinct slices),'
      f' {m["file_bytes"]} bytes from disk'
      for r, m in zip(results, per_process)
    ]
    print(f'{spec}: kernel {shape} in {total_chunks} chunks of {chunk}, {nbytes} bytes\n' + '\n'.join(lines))
    for m in per_process:
      assert m['chunk_reads'] == m['expected_chunk_reads'], (spec, m)
      # The kernel is sharded across processes: each holds 1/N of it.
      assert m['addressable_elements'] * n == shape[0] * shape[1], (spec, m)
      assert m['file_bytes'] < nbytes / n * 1.3 + 16 * 1024, (spec, m)
    # Together the processes read every chunk exactly once.
    assert sum(m['chunk_reads'] for m in per_process) == total_chunks, spec


def test_the_plan_simulated_on_one_machine_reads_what_each_real_process_read(multihost):
  """The worker's restores planned here, in one process, over an AbstractMesh of the same shape and
  `processes=N` (devices split into N consecutive runs of the mesh, as the workers build it): every
  process's planned chunk count is what TensorStore's counters saw that process load, full restore and
  kernel-only reads alike."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

  import orbax_linen_nnx
  from multihost_worker import D_HID, D_IN, D_OUT, MESH_AXES, MESH_SHAPE, RULES

  n, k, results, run_dir = multihost
  pod = AbstractMesh(MESH_SHAPE, MESH_AXES)  # the workers' (4, 2) mesh, with no device of it here

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
      self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

  def make():
    m = Mlp(nnx.Rngs(0))
    return {'model': m, 'optimizer': nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)}

  def sharded(v, spec_of=lambda shape: P(*('data', 'model')[: len(shape)])):
    raw = v.get_raw_value()
    return v.copy(jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=NamedSharding(pod, spec_of(raw.shape))))

  abstract = jax.tree.map(sharded, nnx.state(nnx.eval_shape(make)), is_leaf=lambda x: isinstance(x, nnx.Variable))
  plan = orbax_linen_nnx.plan(run_dir / '1', abstract, rules=RULES, processes=n)
  assert [p.process for p in plan.cost.processes] == list(range(n)) and {p.devices for p in plan.cost.processes} == {k}
  print('\n'.join(plan.cost.lines(every=True)))
  for r in results:
    assert plan.cost.of(r['process_id']).chunks == r['restored']['chunk_reads'], (r['process_id'], r['restored'])
  for spec in (P('data', 'model'), P('data')):
    only = {
      'fc1': {'kernel': nnx.Param(jax.ShapeDtypeStruct((D_IN, D_HID), np.float32, sharding=NamedSharding(pod, spec)))}
    }
    kernel = orbax_linen_nnx.plan(run_dir / '1', only, rules={'Dense_0': 'fc1'}, partial=True, processes=n)
    for r in results:
      assert kernel.cost.of(r['process_id']).chunks == r['reads'][str(spec)]['chunk_reads'], (spec, r['reads'])


@pytest.mark.parametrize('case', sorted(EXPECTED_ERRORS))
def test_bad_restore_fails_alike_everywhere_before_any_read(multihost, case):
  # The workers went on to restore successfully after these errors, so no
  # process was left waiting at a barrier either.
  _, _, results, run_dir = multihost
  # TensorStore reads the checkpoint's metadata files; none of the OCDBT data
  # files (under d/) may be touched, and no chunk read.
  metadata_bytes = sum(f.stat().st_size for f in run_dir.rglob('*') if f.is_file() and f.parent.name != 'd')
  errors = [r['errors'][case] for r in results]
  print(f'{case}: bytes read per process {[e["file_bytes"] for e in errors]} (metadata files: {metadata_bytes} bytes)')
  for e in errors:
    assert e['raised'] == 'PlanError' and e['is_plan_error'], e
    assert e['chunk_reads'] == 0 and e['file_bytes'] <= metadata_bytes, e
    for text in EXPECTED_ERRORS[case]:
      assert text in e['message'], (text, e['message'])
  assert len({e['message'] for e in errors}) == 1, '\n\n'.join(
    f'process {i}:\n{e["message"]}' for i, e in enumerate(errors)
  )


def test_a_process_that_dies_mid_restore_is_named_by_the_survivor_within_seconds(tmp_path):
  """Process 1 is gone (os._exit) as it starts reading its shards; the restore's timeout_s is 300 s."""
  n = 2
  results, wall, _ = launch(
    n, 4, tmp_path, extra_args={i: ['--fault', 'die'] for i in range(n)}, may_fail=(1,), grace_s=60
  )
  assert results[1]["stage"] == "dying", results[1].get("fault")
  fault = results[0]['fault']
  print(f'survivor: {fault}; whole run {wall:.1f}s')
  assert fault['raised'] == 'RestoreFailedElsewhere', fault
  assert 'process 1 died: it stopped saying it is alive' in fault['message'], fault
  assert fault['seconds'] < 30, fault  # seconds, not timeout_s (300) nor Orbax's barrier timeout


def test_a_process_that_hangs_alive_is_named_at_the_timeout(tmp_path):
  """Process 1 sleeps where it would read (alive, saying so): the survivor waits timeout_s (10 s), then names it."""
  n = 2
  results, wall, _ = launch(
    n, 4, tmp_path, timeout_s=90, extra_args={i: ['--fault', 'hang'] for i in range(n)}, may_fail=(1,), grace_s=30
  )
  assert results[1]['stage'] == 'hanging', results[1]
  fault = results[0]['fault']
  print(f'survivor: {fault}; whole run {wall:.1f}s')
  assert fault['raised'] == 'RestoreFailedElsewhere', fault
  assert 'process 1 did not report within 10 s (it died or hangs)' in fault['message'], fault
  assert 10 <= fault['seconds'] < 10 + 15, fault


def test_a_corrupt_array_file_fails_every_process_naming_the_cause(tmp_path):
  n = 2
  results, wall, _ = launch(n, 4, tmp_path, extra_args={i: ['--fault', 'corrupt'] for i in range(n)})
  faults = [r['fault'] for r in results]
  print(f'corrupt data: {faults}; whole run {wall:.1f}s')
  assert all(f['raised'] for f in faults), faults
  # Process 1 read the garbled chunks itself; process 0 learns of it and names process 1 and the cause.
  assert faults[1]['raised'] != 'RestoreFailedElsewhere', faults[1]
  assert faults[0]['raised'] == 'RestoreFailedElsewhere', faults[0]
  assert 'process 1 failed: ' in faults[0]['message'] and faults[1]['raised'] in faults[0]['message'], faults
  assert all(f['seconds'] < 30 for f in faults), faults


def test_replicated_target_read_once_per_replica_group(multihost):
  """Data parallel: without replica_axis every process reads the whole kernel; with it, only replica 0."""
  n, _, results, _ = multihost
  nbytes = results[0]['kernel']['nbytes']
  for mode in ('every_replica_reads', 'replica_0_reads'):
    print(
      f'{mode}: '
      + ', '.join(
        f'process {r["process_id"]} {r["replicated"][mode]["file_bytes"]} bytes'
        f' ({r["replicated"][mode]["chunk_reads"]} chunks)'
        for r in results
      )
    )
  for r in results:
    every, once = r['replicated']['every_replica_reads'], r['replicated']['replica_0_reads']
    assert every['file_bytes'] > 0.9 * nbytes, every  # its own full copy
    if once['holds_replica_0']:
      assert once['file_bytes'] > 0.9 * nbytes, once
    else:
      assert once['chunk_reads'] == 0 and once['file_bytes'] < 32 * 1024, once  # metadata only
  assert sum(r['replicated']['replica_0_reads']['holds_replica_0'] for r in results) < n


def test_stacked_layers_and_split_rules_read_per_process(multihost):
  n, _, results, _ = multihost
  for case in ('stack', 'split'):
    per = [r['stacks_and_rules'][case] for r in results]
    print(
      f'{case}: '
      + ', '.join(
        f'process {r["process_id"]} {m["chunk_reads"]} chunks (expected'
        f' {m["expected_chunk_reads"]}), {m["file_bytes"]} bytes'
        for r, m in zip(results, per)
      )
      + f'; target {per[0]["nbytes"]} bytes'
    )
    for m in per:
      assert m['chunk_reads'] == m['expected_chunk_reads'], (case, m)
      assert m['file_bytes'] < m['nbytes'] / n * 1.3 + 32 * 1024, (case, m)


def test_save_back_writes_only_own_shards_and_restores_on_another_process_count(multihost):
  """LinenCompatSave on N processes: each writes its own shards; this one process reads the result."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  n, _, results, run_dir = multihost
  saved = [r['saved'] for r in results]
  total_written = sum(s['bytes_written'] for s in saved)
  print(
    'LinenCompatSave, bytes written per process: '
    + ', '.join(
      f'process {r["process_id"]} {s["bytes_written"]} (own shards {s["own_shard_bytes"]})'
      for r, s in zip(results, saved)
    )
    + f'; state {saved[0]["state_bytes"]} bytes'
  )
  assert sum(s['own_shard_bytes'] for s in saved) == saved[0]['state_bytes']
  for s in saved:
    # Its own shards (1/N of the state: the kernels, biases and moments are sharded across
    # processes) plus its share of the metadata, never another process's shards.
    assert s['own_shard_bytes'] <= saved[0]['state_bytes'] / n + 64, s
    assert s['bytes_written'] < total_written / n * 1.3, (s, total_written)
    assert s['bytes_written'] < s['own_shard_bytes'] * 1.1 + 32 * 1024, s
  item = run_dir / 'nnx_saved' / '1' / 'default'
  assert sorted(p.name for p in item.glob('ocdbt.process_*')) == [f'ocdbt.process_{i}' for i in range(n)]

  # One process (another count than the writers') reads both checkpoints: the same tree, the same bits.
  def read(step_dir):
    meta = ocp.PyTreeCheckpointHandler().metadata(step_dir).tree
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      meta,
    )
    with ocp.StandardCheckpointer() as c:
      return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), meta), c.restore(step_dir, abstract)

  ours, linen = read(item), read(run_dir / '1' / 'default')
  assert ours[0] == linen[0]
  for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(linen[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
