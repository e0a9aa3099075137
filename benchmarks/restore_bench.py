"""LinenCompatRestore vs native Orbax restore vs the naive host path, on every chunk layout.

    python benchmarks/restore_bench.py [--size-mb 1000] [--runs 3] [--profile] [--sweep] [--json FILE]

Builds once (cached under --cache) a synthetic decoder training state of about
--size-mb (float32 params + Adam mu and nu: 8 layers of attention q, k, v, o and
an MLP gate, up, down; embed and head), saved with Orbax in five layouts from
the same values: Linen loop (layers_0..7), Linen loop with a fused (2, D, F)
MLP gating kernel, Linen nn.scan (layer axis 1), NNX unrolled (layers/0..7)
and NNX stacked (layer axis 0). Each layout is saved three ways:

  host     from host numpy: one stored chunk per array (single-host runs,
           published checkpoints)
  shards   sharded as the target asks: stored chunks = target shards
  mesh     sharded as rows over an (8, 1) mesh: chunks from another topology
  swapped  (built on request: gaps_bench.py) the target's (2, 4) mesh with the
           model axes' names swapped: chunks from another sharding rule

The target is always the NNX state sharded fsdp x tp on a (2, 4) mesh of 8 CPU
devices. Cells (Linen source -> NNX target):

  plain    loop  -> unrolled   renames only
  stack    loop  -> stacked    per-layer arrays stacked while reading
  unstack  scan  -> unrolled   one layer of a stacked array per target
  move     scan  -> stacked    layer axis 1 -> 0
  split    fused -> unrolled   split('{l}/mlp/gating/kernel', [gate, up], axis=0)

and for each, in a fresh process per run:

  native   StandardRestore of the NNX checkpoint in the target layout with the
           same chunking (the same bytes, no conversion: the reference)
  ours     LinenCompatRestore from the Linen checkpoint
  naive    the whole Linen tree to host numpy, remapped in Python (np.stack,
           np.take, ...), then jax.device_put (what offline converters do)

Runs are interleaved, so ratios are taken pair by pair within a round. Last, the
many-leaf case: a Linen loop of 64 layers x 9 weights + Adam (1,733 arrays,
~70 MiB) into NNX unrolled and into an NNX stack (32 targets). --sweep times the
read budget; --profile splits ours into open+list, plan, cost (the plan's cost), read+place, rebuild;
a 4-process x 2-device restore reports bytes read per process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP = 5
CHUNKINGS = ('host', 'shards', 'mesh')
CELLS = {
  'plain': ('loop', 'unrolled'),
  'stack': ('loop', 'stacked'),
  'unstack': ('scan', 'unrolled'),
  'move': ('scan', 'stacked'),
  'split': ('fused', 'unrolled'),
}
LAYOUTS = ('loop', 'fused', 'scan', 'unrolled', 'stacked')
LAYER_AXIS = {'scan': 1, 'stacked': 0}
MODES = ('native', 'ours', 'naive')
SPLIT_RULE = ('{l}/mlp/gating/kernel', ['{l}/mlp/gate/kernel', '{l}/mlp/up/kernel'])


def dims(size_mb: float, layers: int = 8) -> dict:
  """D with about size_mb of params + mu + nu: per layer 4 D^2 + 3 D F (F = 4D), embed and head 4 D^2 each."""
  d = max(64, round(math.sqrt(size_mb * 2**20 / (12 * (layers * 16 + 8))) / 64) * 64)
  return {'D': d, 'F': 4 * d, 'V': 4 * d, 'layers': layers}


MANY = {'D': 96, 'F': 192, 'V': 384, 'layers': 64, 'norms': True}  # 64 x 9 weights: 1,733 arrays


# ------------------------------------------------------------------ the trees


def layer_shapes(dm) -> dict:
  d, f = dm['D'], dm['F']
  shapes = {
    ('attn', 'q'): (d, d),
    ('attn', 'k'): (d, d),
    ('attn', 'v'): (d, d),
    ('attn', 'o'): (d, d),
    ('mlp', 'gate'): (d, f),
    ('mlp', 'up'): (d, f),
    ('mlp', 'down'): (f, d),
  }
  if dm.get('norms'):
    shapes.update({('ln1',): (d,), ('ln2',): (d,)})
  return shapes


def leaf_name(parts) -> tuple:
  return tuple(parts) + (('scale',) if parts[0].startswith('ln') else ('kernel',))


def put(tree: dict, path: tuple, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def model_tree(dm, values, layout: str) -> dict:
  """One copy (params, mu or nu) of the model, as nested dicts of numpy arrays, in `layout`."""
  import numpy as np

  tree = {
    'embed': {'embedding': values(('embed',), (dm['V'], dm['D']))},
    'head': {'kernel': values(('head',), (dm['D'], dm['V']))},
  }
  per = []
  for i in range(dm['layers']):
    layer = {}
    for parts, shape in layer_shapes(dm).items():
      put(layer, leaf_name(parts), values((str(i),) + parts, shape))
    if layout == 'fused':
      mlp = layer['mlp']
      mlp['gating'] = {'kernel': np.stack([mlp.pop('gate')['kernel'], mlp.pop('up')['kernel']])}
    per.append(layer)
  if layout in ('loop', 'fused'):
    tree.update({f'layers_{i}': p for i, p in enumerate(per)})
  elif layout == 'unrolled':
    tree['layers'] = {str(i): p for i, p in enumerate(per)}
  else:
    tree['layers'] = stack_layers(per, LAYER_AXIS[layout])
  return tree


def stack_layers(per: list, axis: int):
  import numpy as np

  if isinstance(per[0], dict):
    return {k: stack_layers([p[k] for p in per], axis) for k in per[0]}
  return np.stack(per, axis=axis)


def train_state_tree(dm, values_of, layout: str) -> dict:
  """The whole training state in the on-disk layout of Linen (loop/fused/scan) or NNX."""
  import numpy as np

  p, mu, nu = (model_tree(dm, values_of(k), layout) for k in ('params', 'mu', 'nu'))
  if layout in ('loop', 'fused', 'scan'):
    return {
      'params': {'params': p},
      'opt_state': [{'count': np.int32(STEP), 'mu': {'params': mu}, 'nu': {'params': nu}}, None],
      'step': np.int32(STEP),
    }
  return {
    'model': wrap(p),
    'optimizer': {
      'opt_state': {'0': {'count': {'value': np.int32(STEP)}, 'mu': wrap(mu), 'nu': wrap(nu)}},
      'step': {'value': np.uint32(STEP)},
    },
  }


def wrap(t):
  return {k: wrap(v) for k, v in t.items()} if isinstance(t, dict) else {'value': t}


def stack_axis_of(path: tuple, layout: str):
  """The layer axis of a leaf in a stacked layout, else None."""
  if layout in LAYER_AXIS and 'layers' in path and not path[path.index('layers') + 1].isdigit():
    return LAYER_AXIS[layout]
  return None


def spec_of(shape, layer_axis=None, fused=False):
  """FSDP over the first model axis, tensor parallel over the second (a typical LLM sharding)."""
  from jax.sharding import PartitionSpec as P

  skip = {layer_axis} if layer_axis is not None else set()
  if fused:
    skip.add(0)
  model = [i for i in range(len(shape)) if i not in skip]
  if not model:
    return P()
  names = ['fsdp', 'tp'] if shape[model[0]] >= shape[model[-1]] else ['tp', 'fsdp']
  spec = [None] * len(shape)
  for i, name in zip(model, names):
    spec[i] = name
  return P(*spec)


def swapped_spec(shape, layer_axis=None, fused=False):
  """The target's (2, 4) mesh with the two model axes' names swapped: a run saved under another sharding rule."""
  from jax.sharding import PartitionSpec as P

  swap = {'fsdp': 'tp', 'tp': 'fsdp'}
  return P(*(swap.get(n, n) for n in spec_of(shape, layer_axis, fused)))


def rows_spec(shape, layer_axis=None, fused=False):
  """Row shards over the (8, 1) 'rows' mesh: the first model axis."""
  from jax.sharding import PartitionSpec as P

  model = [i for i in range(len(shape)) if i != layer_axis and not (fused and i == 0)]
  spec = [None] * len(shape)
  if model:
    spec[model[0]] = 'rows'
  return P(*spec)


def flat_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from flat_paths(v, prefix + (str(k),))
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from flat_paths(v, prefix + (str(i),))
  elif tree is not None:
    yield prefix, tree


def map_tree(fn, tree, prefix=()):
  if isinstance(tree, dict):
    return {k: map_tree(fn, v, prefix + (str(k),)) for k, v in tree.items()}
  if isinstance(tree, list):
    return [map_tree(fn, v, prefix + (str(i),)) for i, v in enumerate(tree)]
  return None if tree is None else fn(prefix, tree)


def standard_args(ap, results: str):
  """The options every benchmark here takes: the model size, runs per mode, the cache, the results file."""
  ap.add_argument('--size-mb', type=float, default=1000)
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=Path('benchmarks') / results)


# ------------------------------------------------------------------ building


def random_values():
  """`values_of(copy)(key, shape)`: standard-normal float32 values, the same for a key in every layout."""
  import numpy as np

  rng = np.random.default_rng(0)
  base = {}

  def values_of(copy):
    def values(key, shape):
      if (copy, key) not in base:
        base[(copy, key)] = rng.standard_normal(shape, dtype=np.float32)
      return base[(copy, key)]

    return values

  return values_of


def build(cache: Path, dm: dict, name: str, chunkings=CHUNKINGS, layouts=LAYOUTS) -> Path:
  """Saves every layout x chunking once, from the same values; returns the directory."""
  import numpy as np

  root = cache / name
  if (root / 'done').exists():
    return root
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding

  cpu = jax.devices('cpu')  # saved from 8 CPU devices on any machine (gpu_bench.py builds on a GPU host)
  target = jax.make_mesh((2, 4), ('fsdp', 'tp'), devices=cpu)
  rows = jax.make_mesh((8, 1), ('rows', 'none'), devices=cpu)
  values_of = random_values()
  for layout in layouts:
    tree = train_state_tree(dm, values_of, layout)
    for chunking in chunkings:

      def place(path, a):
        a = np.asarray(a)
        if chunking == 'host' or a.ndim == 0:
          return a
        axis, fused = stack_axis_of(path, layout), 'gating' in path
        if chunking == 'shards':
          return jax.device_put(a, NamedSharding(target, spec_of(a.shape, axis, fused)))
        if chunking == 'swapped':
          return jax.device_put(a, NamedSharding(target, swapped_spec(a.shape, axis, fused)))
        return jax.device_put(a, NamedSharding(rows, rows_spec(a.shape, axis, fused)))

      with ocp.CheckpointManager(root / chunking / layout) as mngr:
        mngr.save(STEP, args=ocp.args.StandardSave(map_tree(place, tree)))
      print(f'built {name}/{chunking}/{layout}', file=sys.stderr, flush=True)
  (root / 'done').write_text(json.dumps(dm))
  return root


# ------------------------------------------------------------------ one measurement (a fresh process)


def rss_now_and_peak() -> tuple[int, int]:
  status = Path('/proc/self/status').read_text().splitlines()
  get = lambda key: next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))
  return get('VmRSS:'), get('VmHWM:')


def target_mesh():
  """The restore's fsdp x tp mesh: (2, 4) over 8 CPU devices, or `BENCH_MESH` (gpu_bench.py: its accelerators)."""
  import jax

  shape = tuple(int(n) for n in os.environ.get('BENCH_MESH', '2,4').split(','))
  return jax.make_mesh(shape, ('fsdp', 'tp'))


def device_peak_bytes() -> int | None:
  """The accelerator's peak memory in use, where the backend reports it (not on CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def counter(name: str) -> int:
  import tensorstore as ts

  return sum(
    v.get('value', 0) for m in ts.experimental_collect_matching_metrics(name) if m['name'] == name for v in m['values']
  )


def measure(root: Path, chunking: str, cell: str, mode: str, profile: bool, budget_mb: float | None) -> dict:
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding

  import orbax_linen_nnx

  mesh = target_mesh()
  source, target = CELLS[cell]
  nnx_dir, linen_dir = root / chunking / target, root / chunking / source
  meta = ocp.PyTreeCheckpointHandler().metadata(nnx_dir / str(STEP) / 'default').tree
  abstract = map_tree(
    lambda path, m: jax.ShapeDtypeStruct(
      tuple(m.shape), m.dtype, sharding=NamedSharding(mesh, spec_of(tuple(m.shape), stack_axis_of(path, target)))
    ),
    meta,
  )
  state_bytes = sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for _, m in flat_paths(meta))
  rules = [orbax_linen_nnx.split(*SPLIT_RULE, axis=0)] if source == 'fused' else None
  budget = None if budget_mb is None else int(budget_mb * 2**20)

  phases = {}
  before_rss, _ = rss_now_and_peak()
  bytes_before = counter('/tensorstore/kvstore/file/bytes_read')
  chunks_before = counter('/tensorstore/cache/chunk_cache/reads')
  start = time.perf_counter()
  if mode == 'native':
    out = ocp.CheckpointManager(nnx_dir).restore(STEP, args=ocp.args.StandardRestore(abstract))
  elif mode == 'ours' and profile:
    from orbax_linen_nnx import RestoreOptions
    from orbax_linen_nnx.engine import prepare as prepare_lib, read

    prepared = prepare_lib.prepare(
      linen_dir / str(STEP) / 'default', abstract, RestoreOptions(rules=rules), phases=phases
    )
    state = prepared.state
    t = time.perf_counter()
    values = read.execute(prepared.plan, prepared.checkpoint, budget_bytes=budget)
    jax.block_until_ready(values)
    phases['read_and_place'] = time.perf_counter() - t
    t = time.perf_counter()
    out = state.rebuild(values)
    phases['rebuild'] = time.perf_counter() - t
  elif mode == 'ours':
    out = ocp.CheckpointManager(linen_dir).restore(
      STEP, args=orbax_linen_nnx.LinenCompatRestore(abstract, rules=rules, read_budget_bytes=budget)
    )
  else:
    out = naive(linen_dir, source, target, abstract)
  jax.block_until_ready(out)
  wall = time.perf_counter() - start
  _, peak = rss_now_and_peak()
  got = dict(flat_paths(out))
  assert len(got) == len(dict(flat_paths(abstract))), 'restored tree is incomplete'
  return {
    'mode': mode,
    'chunking': chunking,
    'cell': cell,
    'wall_s': wall,
    'peak_rss': peak,
    'rss_before': before_rss,
    'state_bytes': state_bytes,
    'overhead_bytes': peak - before_rss - state_bytes,
    'bytes_read': counter('/tensorstore/kvstore/file/bytes_read') - bytes_before,
    'chunk_reads': counter('/tensorstore/cache/chunk_cache/reads') - chunks_before,
    'phases': phases,
    'budget_mb': budget_mb,
    'device_peak_bytes': device_peak_bytes(),
  }


def naive(linen_dir: Path, source: str, target: str, abstract):
  """The restore-then-convert path: the whole Linen tree to host, remapped in numpy, then placed."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = linen_dir / str(STEP) / 'default'
  meta = ocp.PyTreeCheckpointHandler().metadata(path).tree
  restore_args = map_tree(lambda _, m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  linen = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  def to_nnx(tree):
    out = {k: v for k, v in tree.items() if not k.startswith('layers')}
    if source == 'scan':
      n = tree['layers']['attn']['q']['kernel'].shape[1]
      layers = [map_tree(lambda _, a, i=i: np.take(a, i, axis=1), tree['layers']) for i in range(n)]
    else:
      layers = [tree[f'layers_{i}'] for i in range(sum(k.startswith('layers_') for k in tree))]
    if source == 'fused':
      for layer in layers:
        gating = layer['mlp'].pop('gating')['kernel']
        layer['mlp']['gate'], layer['mlp']['up'] = {'kernel': gating[0]}, {'kernel': gating[1]}
    out['layers'] = {str(i): l for i, l in enumerate(layers)} if target == 'unrolled' else stack_layers(layers, 0)
    return out

  opt = linen['opt_state'][0]
  host = {
    'model': wrap(to_nnx(linen['params']['params'])),
    'optimizer': {
      'opt_state': {
        '0': {
          'count': {'value': opt['count']},
          'mu': wrap(to_nnx(opt['mu']['params'])),
          'nu': wrap(to_nnx(opt['nu']['params'])),
        }
      },
      'step': {'value': np.asarray(linen['step'], np.uint32)},
    },
  }
  return jax.device_put(host, map_tree(lambda _, a: a.sharding, abstract))


# ------------------------------------------------------------------ multi-process restore


def mp_worker(root: Path, port: int, pid: int, n: int, out: Path):
  import jax

  jax.config.update('jax_num_cpu_devices', 8 // n)
  jax.distributed.initialize(
    f'127.0.0.1:{port}', n, pid, coordinator_bind_address=f'127.0.0.1:{port}', initialization_timeout=60
  )
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh, NamedSharding

  import orbax_linen_nnx

  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(2, 4), ('fsdp', 'tp'))
  meta = ocp.PyTreeCheckpointHandler().metadata(root / 'shards' / 'stacked' / str(STEP) / 'default').tree
  abstract = map_tree(
    lambda path, m: jax.ShapeDtypeStruct(
      tuple(m.shape), m.dtype, sharding=NamedSharding(mesh, spec_of(tuple(m.shape), stack_axis_of(path, 'stacked')))
    ),
    meta,
  )
  before = counter('/tensorstore/kvstore/file/bytes_read')
  start = time.perf_counter()
  restored = ocp.CheckpointManager(root / 'shards' / 'loop').restore(
    STEP, args=orbax_linen_nnx.LinenCompatRestore(abstract)
  )
  jax.block_until_ready(restored)
  wall = time.perf_counter() - start
  out.write_text(
    json.dumps({'process': pid, 'wall_s': wall, 'bytes_read': counter('/tensorstore/kvstore/file/bytes_read') - before})
  )
  os._exit(0)  # skip the distributed shutdown handshake


def multiprocess(root: Path, workdir: Path, n: int = 4, timeout_s: float = 300) -> list[dict]:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  outs = [workdir / f'mp_{i}.json' for i in range(n)]
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))} | {'JAX_PLATFORMS': 'cpu'}
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        __file__,
        '--mp-worker',
        str(i),
        '--port',
        str(port),
        '--root',
        str(root),
        '--out',
        str(outs[i]),
        '--procs',
        str(n),
      ],
      env=env,
    )
    for i in range(n)
  ]
  try:
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [json.loads(o.read_text()) for o in outs]


# ------------------------------------------------------------------ driver


def run_one(root: Path, chunking: str, cell: str, mode: str, profile=False, budget_mb=None) -> dict:
  cmd = [sys.executable, __file__, '--one', mode, '--cell', cell, '--chunking', chunking, '--root', str(root)]
  if profile:
    cmd.append('--profile')
  if budget_mb is not None:
    cmd += ['--budget-mb', str(budget_mb)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  if done.returncode:
    raise RuntimeError(f'{chunking}/{cell}/{mode} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
  med = lambda key: statistics.median(r[key] for r in runs)
  walls = [r['wall_s'] for r in runs]
  return {
    'median_s': statistics.median(walls),
    'min_s': min(walls),
    'max_s': max(walls),
    'peak_rss_mb': med('peak_rss') / 2**20,
    'overhead_mb': med('overhead_bytes') / 2**20,
    'state_mb': runs[0]['state_bytes'] / 2**20,
    'read_mb': med('bytes_read') / 2**20,
    'chunk_reads': med('chunk_reads'),
  }


def paired(rounds: list[dict], a: str, b: str, key: str) -> dict:
  """Median, min and max over rounds of a[key] / b[key] (same round: same machine state)."""
  ratios = [r[a][key] / r[b][key] for r in rounds]
  return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios)}


def matrix(roots: dict, cells: list[tuple[str, str, str]], runs: int, modes_of) -> dict:
  rounds = {c: [] for c in cells}
  for i in range(runs):
    for c in cells:
      root, chunking, cell = roots[c[0]], c[1], c[2]
      rounds[c].append({m: run_one(root, chunking, cell, m) for m in modes_of(c)})
    print(f'round {i + 1}/{runs} done', file=sys.stderr, flush=True)
  out = {}
  for c, rs in rounds.items():
    modes = modes_of(c)
    entry = {
      'results': {m: summarize([r[m] for r in rs]) for m in modes},
      'ratios': {
        'ours/native time': paired(rs, 'ours', 'native', 'wall_s'),
        'ours/native peak RSS': paired(rs, 'ours', 'native', 'peak_rss'),
      },
      'raw': rs,
    }
    if 'naive' in modes:
      entry['ratios']['naive/ours time'] = paired(rs, 'naive', 'ours', 'wall_s')
      entry['ratios']['naive/ours peak RSS'] = paired(rs, 'naive', 'ours', 'peak_rss')
      entry['ratios']['naive/ours RSS overhead'] = paired(rs, 'naive', 'ours', 'overhead_bytes')
    out['/'.join(c)] = entry
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--size-mb', type=float, default=1000)
  ap.add_argument('--runs', type=int, default=3)
  ap.add_argument('--cells', default=','.join(CELLS), help='comma-separated cells (default: all)')
  ap.add_argument('--chunkings', default=','.join(CHUNKINGS), help='comma-separated chunkings (default: all)')
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=Path('benchmarks') / 'results.json')
  ap.add_argument('--profile', action='store_true', help="print where ours' time goes")
  ap.add_argument('--sweep', action='store_true', help='time the read budget at 16, 64 and 256 MiB')
  ap.add_argument('--skip-many', action='store_true', help='skip the 1,733-array case')
  ap.add_argument('--skip-multiprocess', action='store_true')
  ap.add_argument('--one', help=argparse.SUPPRESS)
  ap.add_argument('--cell', help=argparse.SUPPRESS)
  ap.add_argument('--chunking', help=argparse.SUPPRESS)
  ap.add_argument('--root', type=Path, help=argparse.SUPPRESS)
  ap.add_argument('--budget-mb', type=float, help=argparse.SUPPRESS)
  ap.add_argument('--mp-worker', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--port', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--procs', type=int, default=4, help=argparse.SUPPRESS)
  ap.add_argument('--out', type=Path, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.one:
    print(json.dumps(measure(a.root, a.chunking, a.cell, a.one, a.profile, a.budget_mb)))
    return
  if a.mp_worker is not None:
    mp_worker(a.root, a.port, a.mp_worker, a.procs, a.out)
    return

  dm = dims(a.size_mb)
  roots = {'decoder': build(a.cache, dm, f'decoder_D{dm["D"]}_L{dm["layers"]}')}
  cells = [('decoder', ch, c) for ch in a.chunkings.split(',') for c in a.cells.split(',')]
  if not a.skip_many:
    roots['many'] = build(
      a.cache, MANY, 'many_L64x9', chunkings=('host', 'shards'), layouts=('loop', 'unrolled', 'stacked')
    )
    cells += [('many', ch, c) for ch in ('host', 'shards') for c in ('plain', 'stack')]
  result = {
    'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}',
    'command': ' '.join(['python', 'benchmarks/restore_bench.py'] + (argv or sys.argv[1:])),
    'dims': dm,
    'many_dims': MANY,
    'runs': a.runs,
    'cells': matrix(roots, cells, a.runs, lambda c: MODES if c[0] == 'decoder' else ('native', 'ours')),
  }
  if a.profile:
    prof = {}
    for c in [('decoder', 'host', 'stack'), ('decoder', 'shards', 'plain')] + (
      [('many', 'shards', 'stack')] if 'many' in roots else []
    ):
      ps = [run_one(roots[c[0]], c[1], c[2], 'ours', profile=True) for _ in range(3)]
      prof['/'.join(c)] = {k: statistics.median(p['phases'][k] for p in ps) for k in ps[0]['phases']}
    result['profile'] = prof
  if a.sweep:
    sweep = {}
    for c in [('decoder', 'host', 'stack'), ('decoder', 'shards', 'plain'), ('decoder', 'mesh', 'move')]:
      for mb in (16, 64, 256):
        rs = [run_one(roots[c[0]], c[1], c[2], 'ours', budget_mb=mb) for _ in range(2)]
        sweep[f"{'/'.join(c)}@{mb}"] = summarize(rs)
    result['sweep'] = sweep
  if not a.skip_multiprocess:
    work = roots['decoder'] / 'mp'
    work.mkdir(exist_ok=True)
    result['multiprocess'] = multiprocess(roots['decoder'], work)
  a.json.parent.mkdir(parents=True, exist_ok=True)
  a.json.write_text(json.dumps(result, indent=1))
  report(result)


def report(result: dict):
  """The table (docs/benchmarks.md's), printed last."""
  dm = result['dims']
  print(
    f"\nDecoder D={dm['D']} F={dm['F']} V={dm['V']} x {dm['layers']} layers, float32 params + Adam mu, nu;"
    f" target NNX sharded fsdp x tp on a (2, 4) mesh of 8 CPU devices; {result['runs']} runs per mode,"
    ' fresh process per run; ratios are medians of per-round pairs'
  )
  print(
    '| cell | state MiB | native s | ours s | naive s | ours/native time | ours/native peak RSS'
    ' | naive/ours time | naive/ours peak RSS (overhead) | peak RSS MiB native / ours |'
  )
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for name, cell in result['cells'].items():
    res, rat = cell['results'], cell['ratios']
    fmt = lambda key: f"{rat[key]['median']:.2f} [{rat[key]['min']:.2f}-{rat[key]['max']:.2f}]" if key in rat else '-'
    naive = f"{res['naive']['median_s']:.2f}" if 'naive' in res else '-'
    over = f" ({rat['naive/ours RSS overhead']['median']:.1f})" if 'naive/ours RSS overhead' in rat else ''
    print(
      f"| {name} | {res['native']['state_mb']:.0f} | {res['native']['median_s']:.2f}"
      f" | {res['ours']['median_s']:.2f}"
      f" | {naive} | {fmt('ours/native time')} | {fmt('ours/native peak RSS')} | {fmt('naive/ours time')}"
      f" | {fmt('naive/ours peak RSS')}{over}"
      f" | {res['native']['peak_rss_mb']:.0f} / {res['ours']['peak_rss_mb']:.0f} |"
    )
  for name, phases in result.get('profile', {}).items():
    print(f'profile {name} (median of 3): ' + ', '.join(f'{k} {v:.3f}s' for k, v in phases.items()))
  for name, s in result.get('sweep', {}).items():
    print(
      f"budget {name} MiB: {s['median_s']:.2f}s, peak RSS {s['peak_rss_mb']:.0f} MiB,"
      f" chunk reads {s['chunk_reads']:.0f}"
    )
  if 'multiprocess' in result:
    mp = result['multiprocess']
    print(
      f"multi-process (4 x 2 devices, shards loop -> stacked): wall {max(p['wall_s'] for p in mp):.3f}s;"
      f" read per process MiB {[round(p['bytes_read'] / 2**20, 1) for p in mp]}"
    )


if __name__ == '__main__':
  main()
