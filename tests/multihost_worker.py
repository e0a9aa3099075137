"""One process of a multi-controller JAX run on CPU, driven by test_multihost.py.

    python tests/multihost_worker.py --port P --num-processes N --process-id I \
        --local-devices K --dir RUN_DIR --out RESULT.json

All N processes build the same Linen MLP `TrainState` (deterministic init), put
it on one global (4, 2) ('data', 'model') mesh with the big kernels sharded
across processes, and save it together with `CheckpointManager` (a real
multi-process Orbax save). Then, all together:

1. two bad restores (no rules; a shape mismatch) that must fail with a
   `PlanError` before any array byte is read;
2. a full restore with `LinenCompatRestore` into a sharded NNX train state,
   every addressable shard checked against the Linen state this process built;
3. restores of the big kernel alone (`partial=True`), with TensorStore's read
   counters taken around each;
4.-5. replicated targets, layer stacks and a split rule read per process;
6. the restored NNX state saved back in the Linen layout with
   `LinenCompatSave`, TensorStore's bytes-written counter taken around it.

The result (per stage) is written to --out as JSON after every stage, so a
process that hangs still leaves what it got through. The exit status is 0 only
if every stage ran and every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

# Run as a script from tests/, so the suite's own helpers import directly.
from models import flat
from helpers import OCDBT_READS, chunk_ids, chunks_under, counter

D_IN, D_HID, D_OUT = 128, 512, 64  # Dense_0 kernel (128, 512): 256 KiB of float32
MESH_SHAPE, MESH_AXES = (4, 2), ('data', 'model')
RULES = {'Dense_0': 'fc1', 'Dense_1': 'fc2'}
CHUNK_LOADS = OCDBT_READS  # minus one metadata key per stored array opened: see helpers.ChunkLoads
FILE_BYTES = '/tensorstore/kvstore/file/bytes_read'
FILE_BYTES_WRITTEN = '/tensorstore/kvstore/file/bytes_written'


def parse_args(argv):
  p = argparse.ArgumentParser()
  p.add_argument('--port', type=int, required=True)
  p.add_argument('--num-processes', type=int, required=True)
  p.add_argument('--process-id', type=int, required=True)
  p.add_argument('--local-devices', type=int, required=True)
  p.add_argument('--dir', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--hang', action='store_true', help='never start (tests the harness timeout)')
  p.add_argument(
    '--fault',
    choices=['die', 'hang', 'corrupt'],
    help='after the save: process 1 dies (or hangs, alive) as it starts reading its shards, or its'
    ' stored data is garbled',
  )
  return p.parse_args(argv)


def main(argv) -> int:
  args = parse_args(argv)
  result = {'process_id': args.process_id, 'ok': False, 'stage': 'start', 'timings': {}}

  def write():
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, args.out)

  t0 = time.perf_counter()

  def stage(name):
    result['timings'][result['stage']] = round(time.perf_counter() - t0, 2)
    result['stage'] = name
    write()
    print(f'[process {args.process_id}] {time.perf_counter() - t0:.2f}s: {name}', file=sys.stderr, flush=True)

  write()
  try:
    if args.hang:
      time.sleep(3600)
    run(args, result, stage)
    result['ok'] = True
    stage('done')
    if args.fault:
      os._exit(0)  # a peer is dead or failed: skip the runtime's shutdown handshake with it
    return 0
  except BaseException:  # noqa: BLE001 - every failure goes to the JSON
    result['error'] = traceback.format_exc()
    write()
    print(result['error'], file=sys.stderr, flush=True)
    return 1


def run(args, result, stage):
  import jax

  # Before the backend starts: K CPU devices here, gloo for cross-process collectives.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', args.local_devices)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{args.port}',
    coordinator_bind_address=f'127.0.0.1:{args.port}',  # loopback only (default: all interfaces)
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=60,
    shutdown_timeout_seconds=30,
  )
  loopback_gloo()
  stage('initialized')

  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from flax import nnx
  from flax.training import train_state
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from orbax_linen_nnx import LinenCompatRestore, PlanError

  n, k = args.num_processes, args.local_devices
  assert jax.process_count() == n and jax.process_index() == args.process_id
  assert jax.local_device_count() == k and jax.device_count() == n * k == 8, (n, k, jax.devices())
  # Rows of the mesh by process: each process holds whole rows of 'data'.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(MESH_SHAPE), MESH_AXES)

  def spec_for(shape) -> P:
    if len(shape) == 2:
      return P('data', 'model')
    if len(shape) == 1:
      return P('data')
    return P()

  def sharding_for(shape) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape))

  # --- The Linen run: identical on every process (same key, same program).
  class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(D_HID)(x))  # Dense_0
      return nn.Dense(D_OUT)(x)  # Dense_1

  model = LinenMLP()
  variables = model.init(jax.random.key(0), jnp.ones((1, D_IN)))
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables, tx=optax.adam(1e-2))

  @jax.jit
  def train_step(state):
    x = jax.random.normal(jax.random.key(1), (8, D_IN))
    y = jax.random.normal(jax.random.key(2), (8, D_OUT))
    grads = jax.grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  state = train_step(state)  # non-zero mu/nu, an int32 step
  expected = {path: np.asarray(leaf) for path, leaf in flat(state).items()}

  def to_global(a):
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding_for(host.shape), lambda idx: host[idx])

  global_state = jax.tree.map(to_global, state)
  kernel = global_state.params['params']['Dense_0']['kernel']
  assert not kernel.is_fully_addressable
  stage('built')

  # --- Save, all processes together.
  mngr = ocp.CheckpointManager(args.dir)
  mngr.save(1, args=ocp.args.StandardSave(global_state))
  mngr.wait_until_finished()
  mngr.close()
  stage('saved')
  from etils import epath

  item_dir = epath.Path(args.dir) / '1' / 'default'
  meta = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
  chunk = tuple(meta['params']['params']['Dense_0']['kernel'].storage.chunk_shape)
  result['kernel'] = {'shape': [D_IN, D_HID], 'chunk_shape': list(chunk), 'nbytes': D_IN * D_HID * 4}

  # --- The NNX side.
  class NnxMLP(nnx.Module):
    def __init__(self, rngs, hid=D_HID):
      self.fc1 = nnx.Linear(D_IN, hid, rngs=rngs)
      self.fc2 = nnx.Linear(hid, D_OUT, rngs=rngs)

  def nnx_train_state(hid=D_HID):
    m = NnxMLP(nnx.Rngs(0), hid)
    return {'model': m, 'optimizer': nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)}

  def with_shardings(tree, sharding_of=sharding_for):
    def put(v):
      raw = v.get_raw_value()
      return v.copy(jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=sharding_of(raw.shape)))

    return jax.tree_util.tree_map(put, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def abstract_train_state(hid=D_HID):
    return with_shardings(nnx.state(nnx.eval_shape(lambda: nnx_train_state(hid))))

  def counters():
    return {CHUNK_LOADS: counter(CHUNK_LOADS), FILE_BYTES: counter(FILE_BYTES)}

  def delta(before, arrays=None):
    """Chunks loaded (each restore first opens every stored array: one metadata key each) and bytes read."""
    after = counters()
    opened = len(jax.tree.leaves(meta)) if arrays is None else arrays
    return {
      'chunk_reads': after[CHUNK_LOADS] - before[CHUNK_LOADS] - opened,
      'file_bytes': after[FILE_BYTES] - before[FILE_BYTES],
    }

  # --- 1. Bad restores: the same PlanError everywhere, before any read, and no hang.
  errors = {}
  for name, make_args in (
    ('no_rules', lambda: LinenCompatRestore(abstract_train_state())),
    ('shape_mismatch', lambda: LinenCompatRestore(abstract_train_state(hid=384), rules=RULES)),
  ):
    restore_args = make_args()
    before = counters()
    try:
      ocp.CheckpointManager(args.dir).restore(1, args=restore_args)
      errors[name] = {'raised': None}
    except Exception as e:  # noqa: BLE001 - recorded, and checked by the test
      errors[name] = {'raised': type(e).__name__, 'is_plan_error': isinstance(e, PlanError), 'message': str(e)}
    errors[name].update(delta(before))
  result['errors'] = errors
  stage('errors')
  if args.fault:
    # A dead peer is noticed within seconds, whatever timeout_s; one that hangs alive, at timeout_s.
    timeout_s = 10 if args.fault == 'hang' else 300
    return inject_fault(
      args, result, stage, lambda: LinenCompatRestore(abstract_train_state(), rules=RULES, timeout_s=timeout_s)
    )

  # --- 2. The full restore, checked shard by shard against this process's Linen state.
  abstract = abstract_train_state()
  before = counters()
  restored = ocp.CheckpointManager(args.dir).restore(1, args=LinenCompatRestore(abstract, rules=RULES))
  full_reads = delta(before)
  got, want = flat(restored), flat(abstract)
  assert set(got) == set(want), (sorted(got), sorted(want))
  checked, expected_chunks = {}, 0
  for path, w in want.items():
    a = got[path]
    assert isinstance(a, jax.Array), (path, type(a))
    assert a.sharding == w.sharding, (path, a.sharding, w.sharding)
    assert a.dtype == w.dtype and a.shape == w.shape, (path, a.dtype, w.dtype, a.shape, w.shape)
    src = expected[linen_path_of(path)].astype(w.dtype)
    for shard in a.addressable_shards:
      assert shard.data.shape == w.sharding.shard_shape(w.shape), path
      np.testing.assert_array_equal(np.asarray(shard.data), src[shard.index], err_msg=path)
    checked[path] = len(a.addressable_shards)
    # The chunks under this process's distinct slices, from the stored chunk shape.
    stored_chunk = tuple(metadata_at(meta, linen_path_of(path)).storage.chunk_shape)
    slices = {
      tuple(s.indices(d)[:2] for s, d in zip(idx, w.shape)): idx
      for idx in w.sharding.addressable_devices_indices_map(w.shape).values()
    }
    expected_chunks += chunks_under(slices.values(), w.shape, stored_chunk)
  assert not got['model/fc1/kernel'].is_fully_addressable
  result['restored'] = {
    'leaves': len(checked),
    'addressable_shards_checked': sum(checked.values()),
    'paths': sorted(checked),
    **full_reads,
    'expected_chunk_reads': expected_chunks,
  }
  stage('restored')

  # --- 3. Reads of the big kernel alone, counted per process.
  reads = {}
  for spec in (P('data', 'model'), P('data')):
    sharding = NamedSharding(mesh, spec)
    only_kernel = with_shardings(
      nnx.state(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))),
      lambda shape: sharding if len(shape) == 2 else sharding_for(shape),
    )
    del only_kernel['fc2']
    del only_kernel['fc1']['bias']
    shape = (D_IN, D_HID)
    slices = {
      tuple(s.indices(d)[:2] for s, d in zip(idx, shape)): idx
      for idx in sharding.addressable_devices_indices_map(shape).values()
    }
    before = counters()
    out = ocp.CheckpointManager(args.dir).restore(
      1, args=LinenCompatRestore(only_kernel, rules={'Dense_0': 'fc1'}, partial=True)
    )
    measured = delta(before)
    a = out['fc1']['kernel'].get_raw_value()
    assert a.sharding == sharding
    src = expected['params/params/Dense_0/kernel']
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), src[shard.index])
    reads[str(spec)] = {
      **measured,
      'distinct_slices': len(slices),
      'expected_chunk_reads': chunks_under(slices.values(), shape, chunk),
      'addressable_elements': sum(int(np.prod([b - a for a, b in key])) for key in slices),
    }
  result['reads'] = reads
  stage('read')

  # --- 4. A target replicated across processes (data parallel): every process
  # reads it, or (replica_axis='data') only replica 0 reads and broadcasts.
  replicated = NamedSharding(mesh, P(None, 'model'))
  only_kernel = with_shardings(
    nnx.state(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))),
    lambda shape: replicated if len(shape) == 2 else sharding_for(shape),
  )
  del only_kernel['fc2']
  del only_kernel['fc1']['bias']
  modes = {}
  for mode, axis in (('every_replica_reads', None), ('replica_0_reads', 'data')):
    before = counters()
    out = ocp.CheckpointManager(args.dir).restore(
      1, args=LinenCompatRestore(only_kernel, rules={'Dense_0': 'fc1'}, partial=True, replica_axis=axis)
    )
    measured = delta(before)
    a = out['fc1']['kernel'].get_raw_value()
    assert a.sharding == replicated
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected['params/params/Dense_0/kernel'][shard.index])
    modes[mode] = {**measured, 'holds_replica_0': any(d in set(mesh.devices[0].flat) for d in jax.local_devices())}
  result['replicated'] = modes
  stage('replicated')

  # --- 5. Layer stacking and a split rule, per process: Linen per-layer arrays
  # and a fused (2, F, D) kernel, each stored sharded across processes.
  from orbax_linen_nnx import split, transpose

  layers, F, Dm = 4, 64, 128
  rng = np.random.default_rng(7)  # same values on every process
  per_layer = [rng.normal(size=(F, Dm)).astype(np.float32) for _ in range(layers)]
  fused = rng.normal(size=(2, F, Dm)).astype(np.float32)
  store = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])
  tree = {
    'params': {
      **{f'layers_{i}': {'kernel': store(w, P('data', 'model'))} for i, w in enumerate(per_layer)},
      'gating_einsum': store(fused, P(None, 'data', 'model')),
    }
  }
  second = str(Path(args.dir) / 'stacks_and_rules')
  with ocp.CheckpointManager(second) as m:
    m.save(1, args=ocp.args.StandardSave(tree))
  meta2 = ocp.PyTreeCheckpointHandler().metadata(Path(second) / '1' / 'default').tree['params']
  cases = {
    # Stacked target sharded over the layer axis across processes: each reads only its layers.
    'stack': (
      {
        'layers': {
          'kernel': jax.ShapeDtypeStruct(
            (layers, F, Dm), np.float32, sharding=NamedSharding(mesh, P('data', None, 'model'))
          )
        }
      },
      [],
      np.stack(per_layer),
    ),
    # gate_proj (Dm, F) = gating_einsum[0].T, sharded so each process holds 1/N of F.
    'split': (
      {
        'gate_proj': {
          'kernel': jax.ShapeDtypeStruct((Dm, F), np.float32, sharding=NamedSharding(mesh, P('model', 'data')))
        }
      },
      [split('gating_einsum', ['gate_proj/kernel', 'up_proj/kernel'], axis=0), transpose('{p}_proj/kernel', (1, 0))],
      fused[0].T,
    ),
  }
  stacked_reads = {}
  for name, (target, rules, want) in cases.items():
    before = counters()
    out = ocp.CheckpointManager(second).restore(1, args=LinenCompatRestore(target, rules=rules, partial=True))
    measured = delta(before, len(jax.tree.leaves(meta2)))
    a = jax.tree.leaves(out)[0]
    sharding = jax.tree.leaves(target)[0].sharding
    assert a.sharding == sharding
    for shard in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    # Expected chunks: the source region under each distinct local slice.
    slices = {
      tuple(s.indices(d)[:2] for s, d in zip(idx, want.shape)): idx
      for idx in sharding.addressable_devices_indices_map(want.shape).values()
    }
    if name == 'stack':
      chunk = tuple(meta2['layers_0']['kernel'].storage.chunk_shape)
      per_layer = [set() for _ in range(layers)]
      for idx in slices.values():
        for i in range(*idx[0].indices(layers)):
          per_layer[i] |= chunk_ids(idx[1:], (F, Dm), chunk)
      exp = sum(len(c) for c in per_layer)
    else:
      chunk = tuple(meta2['gating_einsum'].storage.chunk_shape)
      exp = chunks_under([(slice(0, 1), idx[1], idx[0]) for idx in slices.values()], fused.shape, chunk)
    stacked_reads[name] = {**measured, 'expected_chunk_reads': exp, 'nbytes': int(want.nbytes)}
  result['stacks_and_rules'] = stacked_reads
  stage('stacks_and_rules')

  # --- 6. The restored NNX state saved back in the Linen layout by every process together
  # (LinenCompatSave), TensorStore's bytes-written counter taken around the save. Each process
  # holds half (or a quarter) of every sharded array and should write only that.
  from orbax_linen_nnx import LinenCompatSave

  nnx_state = nnx_train_state()
  nnx.update(nnx_state, restored)
  written = counter(FILE_BYTES_WRITTEN)
  with ocp.CheckpointManager(Path(args.dir) / 'nnx_saved') as m:
    m.save(1, args=LinenCompatSave(nnx_state, rules=RULES))
    m.wait_until_finished()
  # The bytes of the shards this process is the first holder of (Orbax writes each replica once).
  own = sum(
    int(np.prod(sh.data.shape)) * sh.data.dtype.itemsize
    for leaf in jax.tree.leaves(restored)
    for sh in leaf.addressable_shards
    if sh.replica_id == 0
  )
  total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(restored))
  result['saved'] = {
    'bytes_written': counter(FILE_BYTES_WRITTEN) - written,
    'own_shard_bytes': own,
    'state_bytes': total,
  }
  stage('saved_back')


def inject_fault(args, result, stage, make_args):
  """A restore during which process 1 is dead, or reads garbled data: every process must fail fast."""
  import orbax.checkpoint as ocp

  if args.fault == 'corrupt':
    data = sorted((Path(args.dir) / '1' / 'default' / 'ocdbt.process_1' / 'd').glob('*'))
    if args.process_id == 0:
      assert data, 'process 1 wrote no OCDBT data files'
      for f in data:  # same size, garbage content
        f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256) + b'\0' * (f.stat().st_size % 256))
    ocp.multihost.sync_global_processes('orbax_linen_nnx_test_corrupted')
  if args.fault == 'die' and args.process_id == 1:
    # Die in the middle of the restore: after Orbax's own collectives, when the
    # handler starts reading this process's shards.
    from orbax_linen_nnx import read

    def die(*_, **__):
      stage('dying')
      os._exit(7)

    read.execute = die
  if args.fault == 'hang' and args.process_id == 1:
    from orbax_linen_nnx import read

    def hang(*_, **__):
      stage('hanging')
      time.sleep(3600)

    read.execute = hang
  start = time.perf_counter()
  try:
    ocp.CheckpointManager(args.dir).restore(1, args=make_args())
    result['fault'] = {'raised': None}
  except Exception as e:  # noqa: BLE001 - recorded, and checked by the test
    result['fault'] = {'raised': type(e).__name__, 'message': str(e)[:2000]}
  result['fault']['seconds'] = round(time.perf_counter() - start, 2)
  stage('fault')


def loopback_gloo():
  """Gloo on 127.0.0.1: by default it binds the address the host name resolves to.

  Replaces JAX's CPU backend factory (before the backend exists) with the same
  client, but with gloo TCP collectives given an explicit loopback host.
  """
  from jax._src import distributed, xla_bridge
  from jax._src.lib import _jax

  def make_client():
    collectives = _jax.make_gloo_tcp_collectives(
      distributed_client=distributed.global_state.client, hostname='127.0.0.1'
    )
    return xla_bridge.make_cpu_client(collectives=collectives)

  xla_bridge.register_backend_factory('cpu', make_client, priority=0, fail_quietly=False)


LINEN_MODULE = {nnx_name: linen_name for linen_name, nnx_name in RULES.items()}


def linen_path_of(nnx_path: str) -> str:
  """The Linen TrainState path that an NNX train-state path is restored from (written out by hand)."""
  parts = nnx_path.split('/')
  if parts[0] == 'model':  # model/fc1/kernel <- params/params/Dense_0/kernel
    return '/'.join(['params', 'params', LINEN_MODULE[parts[1]], *parts[2:]])
  if parts[:2] == ['optimizer', 'step']:
    return 'step'
  if parts[:2] == ['optimizer', 'opt_state']:
    rest = parts[2:]
    if len(rest) >= 3 and rest[1] in ('mu', 'nu'):  # 0/mu/fc1/kernel <- 0/mu/params/Dense_0/kernel
      return '/'.join(['opt_state', rest[0], rest[1], 'params', LINEN_MODULE[rest[2]], *rest[3:]])
    return '/'.join(['opt_state', *rest])
  raise KeyError(nnx_path)


def metadata_at(tree, path: str):
  """The Orbax metadata of one leaf, by its '/'-joined path."""
  node = tree
  for part in path.split('/'):
    node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
  return node


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
