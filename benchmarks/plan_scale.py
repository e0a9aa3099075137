"""A pod-sized restore planned on one machine: a Llama-70B-shaped Linen checkpoint, metadata only.

    python benchmarks/plan_scale.py [--rounds 3] [--processes 64 256] [--json FILE]

The checkpoint: a Linen `TrainState` of a Llama-70B-shaped decoder (vocab 128,256, width 8,192, 80 layers as
a Linen loop `layers_0..79`, 64 query and 8 key/value heads of 128, MLP 28,672; bf16 params and float32 Adam
mu and nu: 2,169 arrays, 140 GB of params, 700 GB in all), chunked as Orbax saves it from a 256-chip
(fsdp 64 x tp 4) mesh: each stored chunk is one device's shard, cut to at most 2 MiB (Orbax's OCDBT
`chunk_byte_size`, halving the largest dimension). No array data is written. How: Orbax's own save of the
same tree with one-element arrays (so `_METADATA`, `_CHECKPOINT_METADATA`, the OCDBT manifest and
`array_metadatas/` are Orbax's), then only what Orbax's formats document is rewritten: each leaf's
`write_shape` in `_METADATA` and in `array_metadatas/process_0`, and each array's zarr metadata (`.zarray`:
shape, chunks, dtype) through TensorStore's zarr driver on the same OCDBT store (opened with
`delete_existing`, which writes metadata and no chunk). The result is under 2 MB on disk.

The restore planned: into an NNX state (`nnx.vmap`-style stacked `layers`, layer axis 0), every array sharded
fsdp x tp over an `AbstractMesh` of 64 x 4 = 256 devices, on `--processes` processes of 4 devices (none of
which exist here). Measured, each in a fresh process, medians of `--rounds`:

  all        orbax_linen_nnx.plan(..., processes=N): the plan and every process's cost, as a planning
             machine runs it
  one        what one process of the real restore plans before reading: the plan and its own cost
             (process N // 2)

with wall time and peak RSS of each (then, in a second run in the same process, not timed, the planner's own
Python allocations at their peak, by tracemalloc). Then, once: each
process's reads from the plan, and a check that every stored chunk is read by exactly the processes whose
devices need it, computed here independently of the package (the target boxes each device holds, mapped
back through the stack to each layer's array and its chunk grid).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VOCAB, D, L, H, KV, DH, F = 128256, 8192, 80, 64, 8, 128, 28672
SAVE_MESH = (64, 4)  # (fsdp, tp): the 256 chips that saved it
CHUNK_LIMIT = 2 * 2**20  # Orbax's OCDBT chunk_byte_size (its target data file size)

# Per layer: name -> (shape, the saving mesh axes per dimension).
LAYER = {
  'attention/query/kernel': ((D, H, DH), ('fsdp', 'tp', None)),
  'attention/key/kernel': ((D, KV, DH), ('fsdp', 'tp', None)),
  'attention/value/kernel': ((D, KV, DH), ('fsdp', 'tp', None)),
  'attention/out/kernel': ((H, DH, D), ('tp', None, 'fsdp')),
  'mlp/wi_0/kernel': ((D, F), ('fsdp', 'tp')),
  'mlp/wi_1/kernel': ((D, F), ('fsdp', 'tp')),
  'mlp/wo/kernel': ((F, D), ('tp', 'fsdp')),
  'pre_attention_norm/scale': ((D,), ('fsdp',)),
  'post_attention_norm/scale': ((D,), ('fsdp',)),
}
TOP = {
  'token_embedder/embedding': ((VOCAB, D), ('tp', 'fsdp')),
  'decoder_norm/scale': ((D,), (None,)),
  'logits_dense/kernel': ((D, VOCAB), ('fsdp', 'tp')),
}


def itemsize(dtype: str) -> int:
  return {'bfloat16': 2, 'float32': 4, 'int32': 4}[dtype]


def chunk_of(shape, axes, itemsize) -> tuple[int, ...]:
  """The stored chunk of an array saved by the 256-chip mesh: one shard, halved along its largest dimension
  until it fits CHUNK_LIMIT."""
  sizes = dict(zip(('fsdp', 'tp'), SAVE_MESH))
  chunk = [n // (sizes[a] if a else 1) for n, a in zip(shape, axes)]
  while math.prod(chunk) * itemsize > CHUNK_LIMIT:
    i = max(range(len(chunk)), key=lambda k: chunk[k])
    chunk[i] = -(-chunk[i] // 2)
  return tuple(chunk)


def linen_arrays() -> dict[str, tuple[tuple[int, ...], str, tuple]]:
  """Every stored array of the Linen TrainState: '.'-joined name -> (shape, dtype, saving axes)."""
  params = {f'layers_{i}/{k}': v for i in range(L) for k, v in LAYER.items()} | TOP
  out = {}
  for path, (shape, axes) in params.items():
    out['params.params.' + path.replace('/', '.')] = (shape, 'bfloat16', axes)
    for moment in ('mu', 'nu'):
      out[f'opt_state.0.{moment}.params.' + path.replace('/', '.')] = (shape, 'float32', axes)
  out['opt_state.0.count'] = ((), 'int32', ())
  out['step'] = ((), 'int32', ())
  return out


def build(directory: Path) -> Path:
  """The metadata-only checkpoint (see the module docstring); returns its item directory."""
  import jax
  import orbax.checkpoint as ocp
  import tensorstore as ts

  arrays = linen_arrays()
  tree: dict = {}
  for name, (shape, dtype, _) in arrays.items():
    node = tree
    *head, last = name.split('.')
    for k in head:
      node = node.setdefault(k, {})
    node[last] = jax.numpy.zeros((1,) * len(shape), jax.numpy.dtype(dtype))  # jax.Array: Orbax records its metadata
  with ocp.CheckpointManager(directory) as mngr:
    mngr.save(1, args=ocp.args.StandardSave(tree))
  item = directory / '1' / 'default'
  meta = json.loads((item / '_METADATA').read_text())
  for _key, entry in meta['tree_metadata'].items():
    name = '.'.join(k['key'] for k in entry['key_metadata'])
    if 'write_shape' in entry['value_metadata']:
      entry['value_metadata']['write_shape'] = list(arrays[name][0])
  (item / '_METADATA').write_text(json.dumps(meta))
  store_file = item / 'array_metadatas' / 'process_0'
  records = json.loads(store_file.read_text())
  for r in records['array_metadatas']:
    shape, dtype, axes = arrays[r['array_metadata']['param_name']]
    r['array_metadata']['write_shape'] = list(shape)
    r['array_metadata']['chunk_shape'] = list(chunk_of(shape, axes, itemsize(dtype)))
  store_file.write_text(json.dumps(records))
  context = ts.Context()
  opening = []
  for name, (shape, dtype, axes) in arrays.items():
    spec = {
      'driver': 'zarr',
      'kvstore': {'driver': 'ocdbt', 'base': f'file://{item}/', 'path': name},
      'metadata': {
        'shape': list(shape),
        'chunks': list(chunk_of(shape, axes, itemsize(dtype))),
        'dtype': {'bfloat16': 'bfloat16', 'float32': '<f4', 'int32': '<i4'}[dtype],
        'compressor': {'id': 'zstd', 'level': 1},
      },
    }
    opening.append(ts.open(spec, create=True, delete_existing=True, context=context))
  for f in opening:
    f.result()
  return item


def _abstract(processes: int):
  """The NNX target: stacked layers, every leaf sharded fsdp x tp over a 256-device AbstractMesh."""
  import jax
  import numpy as np
  from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

  pod = AbstractMesh(SAVE_MESH, ('fsdp', 'tp'))

  def leaf(shape, axes, dtype, stacked):
    spec = P(*(((None,) if stacked else ()) + tuple(axes)))
    return jax.ShapeDtypeStruct(((L,) if stacked else ()) + tuple(shape), dtype, sharding=NamedSharding(pod, spec))

  def tree(dtype):
    out: dict = {}
    for group, stacked in ((LAYER, True), (TOP, False)):
      for path, (shape, axes) in group.items():
        node = out.setdefault('layers', {}) if stacked else out
        *head, last = path.split('/')
        for k in head:
          node = node.setdefault(k, {})
        node[last] = leaf(shape, axes, dtype, stacked)
    return out

  scalar = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(pod, P()))
  bf16 = jax.numpy.bfloat16
  return {
    'model': tree(bf16),
    'optimizer': {
      'step': scalar,
      'opt_state': {'0': {'count': scalar, 'mu': tree(np.float32), 'nu': tree(np.float32)}},
    },
  }


def one(item: str, mode: str, processes: int) -> dict:
  """One measurement, in this (fresh) process."""
  import tracemalloc

  import orbax_linen_nnx
  from orbax_linen_nnx.faces import args as args_lib
  from orbax_linen_nnx.planning import cost as cost_lib
  from orbax_linen_nnx.engine import prepare as prepare_lib

  abstract = _abstract(processes)

  def run():
    if mode == 'all':
      return orbax_linen_nnx.plan(item, abstract, processes=processes, target_layout='nnx', max_over_read=None)
    args = args_lib.LinenCompatRestore(abstract, target_layout='nnx', max_over_read=None)
    return prepare_lib.prepare(
      item, args.abstract_state, args.options, topology=cost_lib.Topology(processes, only=processes // 2)
    ).plan

  start = time.perf_counter()
  plan = run()
  wall = time.perf_counter() - start
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  tracemalloc.start()  # once more, for the planner's own allocations (tracing slows it: not timed)
  run()
  _, peak_py = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  row = {
    'mode': mode,
    'wall_s': wall,
    'peak_python_bytes': peak_py,
    'max_rss_bytes': rss,
    'arrays': sum(len(r.sources) for r in plan.reads) + 3,
    'targets': len(plan.reads),
    'cost_processes': len(plan.cost.processes),
  }
  if mode == 'all':
    row['per_process'] = [
      {
        'process': p.process,
        'read_bytes': p.read_bytes,
        'chunks': p.chunks,
        'placed_bytes': p.placed_bytes,
        'device_max_bytes': p.device_max_bytes,
        'host_bound_bytes': p.host_bound_bytes,
      }
      for p in plan.cost.processes
    ]
    row['summary'] = plan.cost.summary()
  return row


def check(item: str, processes: int) -> dict:
  """Every stored chunk is read by exactly the processes whose devices need it (counted here)."""
  import itertools

  import jax

  import orbax_linen_nnx
  from orbax_linen_nnx.planning import cost as cost_lib
  from orbax_linen_nnx.engine import source

  abstract = _abstract(processes)
  plan = orbax_linen_nnx.plan(item, abstract, processes=processes, target_layout='nnx', max_over_read=None)
  ckpt = source.open_checkpoint(item)
  grids = cost_lib.grids_of(plan, ckpt.stores)
  cost = cost_lib.estimate(plan, grids, topology=cost_lib.Topology(processes), chunks_of=True)
  planned: dict[tuple[str, tuple], set] = {}
  for p in cost.processes:
    for name, ids in p.chunk_ids.items():
      for c in ids:
        planned.setdefault((name, c), set()).add(p.process)
  arrays = linen_arrays()
  per = SAVE_MESH[0] * SAVE_MESH[1] // processes
  needed: dict[tuple[str, tuple], set] = {}
  for r in plan.reads:
    t = r.target
    sharding = t.sharding
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
    spec = list(sharding.spec) + [None] * (len(t.shape) - len(sharding.spec))
    names = sorted({x.name for s in r.sources for x in getattr(s, 'leaves', lambda: [s])()})
    stacked = len(r.sources) > 1 or t.shape != arrays[names[0]][0]
    by_layer = {int(x.split('.layers_')[1].split('.')[0]): x for x in names} if stacked else {}
    for position, at in enumerate(itertools.product(*(range(n) for n in sizes.values()))):
      coord = dict(zip(sizes, at))
      box = []
      for n, entry in zip(t.shape, spec):
        parts = n // (sizes[entry] if entry else 1)
        i = coord[entry] if entry else 0
        box.append((i * parts, (i + 1) * parts))
      for layer in range(*box[0]) if stacked else [None]:
        name, rest = (by_layer[layer], box[1:]) if stacked else (names[0], box)
        shape, dtype, axes = arrays[name]
        chunk = chunk_of(shape, axes, itemsize(dtype))
        ranges = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(rest, chunk)]
        for c in itertools.product(*ranges):
          needed.setdefault((name, c), set()).add(position // per)
  return {
    'stored_chunks_read': len(planned),
    'exact': planned == needed,
    'mismatches': sum(1 for k in set(planned) | set(needed) if planned.get(k) != needed.get(k)),
    'reads': sum(len(v) for v in planned.values()),
    'jax': jax.__version__,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument(
    '--processes',
    type=int,
    nargs='+',
    default=[64, 256],
    help='simulated process counts (each divides the 256 devices)',
  )
  ap.add_argument('--json', type=Path, default=HERE / 'plan_scale_results.json')
  ap.add_argument('--one', nargs=3, help=argparse.SUPPRESS)
  ap.add_argument('--check', nargs=2, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
    return
  if args.check:
    print(json.dumps(check(args.check[0], int(args.check[1]))))
    return
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}

  def fresh(*extra):
    done = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    item = build(Path(tmp) / 'llama70b')
    built = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in Path(tmp).rglob('*') if f.is_file())
    print(f'built in {built:.1f} s, {disk / 1e6:.1f} MB on disk', file=sys.stderr)
    for n in args.processes:
      rows = [fresh('--one', str(item), mode, str(n)) for _ in range(args.rounds) for mode in ('all', 'one')]
      results[n] = {'rows': rows, 'check': fresh('--check', str(item), str(n))}
  gib = 2**30
  for n, res in results.items():
    rows, checked = res['rows'], res['check']
    median = {
      m: {
        k: statistics.median(r[k] for r in rows if r['mode'] == m)
        for k in ('wall_s', 'max_rss_bytes', 'peak_python_bytes')
      }
      for m in ('all', 'one')
    }
    res['median'] = median
    all_row = next(r for r in rows if r['mode'] == 'all')
    s = all_row['summary']
    print(
      f"\n{n} processes x {SAVE_MESH[0] * SAVE_MESH[1] // n} devices (simulated): {all_row['targets']} targets"
      f" from {len(linen_arrays())} stored arrays"
    )
    for m, label in (('all', "plan + every process's cost"), ('one', "one process's plan + own cost")):
      walls = ', '.join(f"{r['wall_s']:.2f}" for r in rows if r['mode'] == m)
      print(
        f"  {label}: {median[m]['wall_s']:.2f} s (rounds {walls}), peak RSS"
        f" {median[m]['max_rss_bytes'] / 2**20:.0f} MiB, planner Python peak"
        f" {median[m]['peak_python_bytes'] / 2**20:.0f} MiB"
      )
    print(
      f"  reads per process: {s['read_bytes']['min'] / gib:.2f}-{s['read_bytes']['max'] / gib:.2f} GiB,"
      f" {s['chunks']['min']:,}-{s['chunks']['max']:,} chunks; {s['read_bytes']['total'] / gib:.1f} GiB in all;"
      f" device max {s['device_max_bytes']['max'] / gib:.2f} GiB; host bound max"
      f" {s['host_bound_bytes']['max'] / 2**20:.0f} MiB"
    )
    print(
      f"  every stored chunk read by exactly the processes that need it: {checked['exact']}"
      f" ({checked['stored_chunks_read']:,} chunks, {checked['reads']:,} reads,"
      f" {checked['mismatches']} mismatches)"
    )
  args.json.write_text(
    json.dumps(
      {'rounds': args.rounds, 'built_s': built, 'disk_bytes': disk, 'results': {str(n): r for n, r in results.items()}},
      indent=1,
    )
  )


if __name__ == '__main__':
  main()
