"""Converting restore vs native Orbax restore vs restore-then-convert, on one machine.

    python benchmarks/restore_bench.py [--size-mb 1000] [--runs 5] [--profile] [--json FILE]

Builds once (cached under --cache) a synthetic decoder training state of about
--size-mb (float32 params + Adam mu and nu), saved with Orbax four ways: Linen
loop (layers_0..7), Linen nn.scan (layer axis 1), NNX unrolled (layers/0..7)
and NNX stacked (layer axis 0), all from the same values and each array stored
sharded as it was trained (chunks = shards). Then, each run in a fresh process
on an 8-device CPU mesh ((4, 2) 'fsdp' x 'tp'):

  native         StandardRestore of the NNX checkpoint (the physical limit)
  linen_compat   LinenCompatRestore from the Linen checkpoint (the same bytes)
  convert        restore the Linen tree to host numpy, remap in Python,
                 np.stack the layers, jax.device_put to the shardings
                 (what offline converters do)

for two target layouts: 'plain' (NNX unrolled, from the Linen loop: no
stacking) and 'stacked' (NNX stacked, from the Linen loop: stacking). Runs are
interleaved, so each ratio is taken pair by pair within one round. Last, a
4-process x 2-device restore measures wall time and bytes read per process.
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

N_LAYERS = 8
STEP = 5


def dims(size_mb: float) -> dict:
  """D with about size_mb of params + mu + nu: 8 layers of 12 D^2, embed and head 4 D^2 each."""
  d = max(64, round(math.sqrt(size_mb * 1e6 / (12 * (N_LAYERS * 12 + 8))) / 64) * 64)
  return {'D': d, 'F': 4 * d, 'V': 4 * d}


# ------------------------------------------------------------------ the trees

LAYER_SHAPES = lambda dm: {('attn', 'q'): (dm['D'], dm['D']), ('attn', 'k'): (dm['D'], dm['D']),
                           ('attn', 'v'): (dm['D'], dm['D']), ('attn', 'o'): (dm['D'], dm['D']),
                           ('mlp', 'up'): (dm['D'], dm['F']), ('mlp', 'down'): (dm['F'], dm['D'])}


def spec_of(shape, layer_axis=None):
  """FSDP over the first model axis, tensor parallel over the second (a typical LLM sharding)."""
  from jax.sharding import PartitionSpec as P

  if len(shape) == 0:
    return P()
  model_dims = [s for i, s in enumerate(shape) if i != layer_axis]
  spec = ['fsdp', 'tp'] if model_dims[0] >= model_dims[-1] else ['tp', 'fsdp']
  spec = spec[: len(model_dims)]
  if layer_axis is not None:
    spec.insert(layer_axis, None)
  return P(*spec)


def model_tree(dm, values, layout: str):
  """{path-dict} of one copy (params, mu or nu) in a layout: loop, scan, unrolled, stacked."""
  tree = {'embed': {'embedding': values('embed', (dm['V'], dm['D']))},
          'head': {'kernel': values('head', (dm['D'], dm['V']))}}
  per = [{mod: {sub: {'kernel': values(f'{i}/{mod}/{sub}', shape)} for (m2, sub), shape in LAYER_SHAPES(dm).items() if m2 == mod}
          for mod in ('attn', 'mlp')} for i in range(N_LAYERS)]
  if layout == 'loop':
    tree.update({f'layers_{i}': p for i, p in enumerate(per)})
  elif layout == 'unrolled':
    tree['layers'] = {str(i): p for i, p in enumerate(per)}
  else:
    axis = 1 if layout == 'scan' else 0
    tree['layers'] = {mod: {sub: {'kernel': values(('stack', axis, mod, sub), None, [p[mod][sub]['kernel'] for p in per])}
                            for sub in per[0][mod]} for mod in ('attn', 'mlp')}
  return tree


def train_state_tree(dm, values_of, layout: str):
  """The whole training state in the on-disk layout of Linen (loop/scan) or NNX (unrolled/stacked)."""
  import numpy as np

  p, mu, nu = (model_tree(dm, values_of(k), layout) for k in ('params', 'mu', 'nu'))
  if layout in ('loop', 'scan'):
    return {'params': {'params': p}, 'opt_state': [{'count': np.int32(STEP), 'mu': {'params': mu}, 'nu': {'params': nu}}, None],
            'step': np.int32(STEP)}
  wrap = lambda t: {k: wrap(v) for k, v in t.items()} if isinstance(t, dict) else {'value': t}
  return {'model': wrap(p), 'optimizer': {'opt_state': {'0': {'count': {'value': np.int32(STEP)}, 'mu': wrap(mu), 'nu': wrap(nu)}},
                                          'step': {'value': np.uint32(STEP)}}}


def layer_axis_of(path: tuple, layout: str):
  if 'layers' in path and layout in ('scan', 'stacked') and path[path.index('layers') + 1] in ('attn', 'mlp'):
    return 1 if layout == 'scan' else 0
  return None


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


# ------------------------------------------------------------------ building

def build(cache: Path, size_mb: float) -> Path:
  """Saves the four checkpoints once; returns their directory."""
  import numpy as np

  dm = dims(size_mb)
  root = cache / f'decoder_D{dm["D"]}_L{N_LAYERS}'
  if (root / 'done').exists():
    return root
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding

  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'))
  rng = np.random.default_rng(0)
  base = {}

  def values_of(copy):
    def values(key, shape, stack=None):
      if stack is not None:
        _, axis, _, _ = key
        return np.stack(stack, axis=axis)
      full = (copy, key)
      if full not in base:
        base[full] = rng.standard_normal(shape, dtype=np.float32)
      return base[full]
    return values

  for layout in ('loop', 'scan', 'unrolled', 'stacked'):
    tree = train_state_tree(dm, values_of, layout)
    tree = map_tree(lambda path, a: jax.device_put(a, NamedSharding(mesh, spec_of(np.shape(a), layer_axis_of(path, layout)))), tree)
    with ocp.CheckpointManager(root / layout) as mngr:
      mngr.save(STEP, args=ocp.args.StandardSave(tree))
    print(f'built {layout}', file=sys.stderr, flush=True)
  (root / 'done').write_text(json.dumps(dm))
  return root


# ------------------------------------------------------------------ one measurement (a fresh process)

def rss_now_and_peak() -> tuple[int, int]:
  status = Path('/proc/self/status').read_text().splitlines()
  get = lambda key: next(int(l.split()[1]) * 1024 for l in status if l.startswith(key))
  return get('VmRSS:'), get('VmHWM:')


def measure(root: Path, mode: str, target: str, profile: bool) -> dict:
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  import numpy as np
  import orbax.checkpoint as ocp
  import tensorstore as ts
  from jax.sharding import NamedSharding

  import orbax_linen_nnx

  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'))
  nnx_layout = 'unrolled' if target == 'plain' else 'stacked'
  meta = ocp.PyTreeCheckpointHandler().metadata(root / nnx_layout / str(STEP) / 'default').tree
  sds = lambda path, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=NamedSharding(
      mesh, spec_of(tuple(m.shape), layer_axis_of(path, nnx_layout))))
  abstract = map_tree(sds, meta)
  state_bytes = sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for _, m in flat_paths(meta))

  def counter(name):
    return sum(v.get('value', 0) for m in ts.experimental_collect_matching_metrics(name) if m['name'] == name
               for v in m['values'])

  phases = {}
  before_rss, _ = rss_now_and_peak()
  bytes_before = counter('/tensorstore/kvstore/file/bytes_read')
  start = time.perf_counter()
  if mode == 'native':
    out = ocp.CheckpointManager(root / nnx_layout).restore(STEP, args=ocp.args.StandardRestore(abstract))
  elif mode == 'linen_compat':
    if profile:
      from orbax_linen_nnx import planner as plan_lib, read, source, target as target_lib
      t = time.perf_counter()
      ckpt = source.open_checkpoint(root / 'loop' / str(STEP) / 'default')
      phases['metadata'] = time.perf_counter() - t
      t = time.perf_counter()
      state = target_lib.flatten(abstract)
      p = plan_lib.build(ckpt.arrays, state.targets, source_layout=ckpt.layout, target_layout=state.layout)
      phases['plan'] = time.perf_counter() - t
      t = time.perf_counter()
      values = read.execute(p, ckpt)
      jax.block_until_ready(values)
      phases['read_and_place'] = time.perf_counter() - t
      t = time.perf_counter()
      out = state.rebuild(values)
      phases['rebuild'] = time.perf_counter() - t
    else:
      out = ocp.CheckpointManager(root / 'loop').restore(STEP, args=orbax_linen_nnx.LinenCompatRestore(abstract))
  else:
    out = convert(root, abstract, nnx_layout, ocp, np, jax)
  jax.block_until_ready(out)
  wall = time.perf_counter() - start
  after_rss, peak = rss_now_and_peak()
  got = dict(flat_paths(out))
  assert len(got) == len(dict(flat_paths(abstract))), 'restored tree is incomplete'
  return {'mode': mode, 'target': target, 'wall_s': wall, 'peak_rss': peak, 'rss_before': before_rss,
          'state_bytes': state_bytes, 'overhead_bytes': peak - before_rss - state_bytes,
          'bytes_read': counter('/tensorstore/kvstore/file/bytes_read') - bytes_before, 'phases': phases}


def convert(root, abstract, nnx_layout, ocp, np, jax):
  """The restore-then-convert path: whole Linen tree to host, remapped in Python, then placed."""
  path = root / 'loop' / str(STEP) / 'default'
  meta = ocp.PyTreeCheckpointHandler().metadata(path).tree
  restore_args = map_tree(lambda _, m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  linen = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  def to_nnx(tree):
    out = {k: v for k, v in tree.items() if not k.startswith('layers_')}
    layers = [tree[f'layers_{i}'] for i in range(N_LAYERS)]
    if nnx_layout == 'unrolled':
      out['layers'] = {str(i): l for i, l in enumerate(layers)}
    else:
      out['layers'] = {mod: {sub: {'kernel': np.stack([l[mod][sub]['kernel'] for l in layers])} for sub in layers[0][mod]}
                       for mod in ('attn', 'mlp')}
    return out

  wrap = lambda t: {k: wrap(v) for k, v in t.items()} if isinstance(t, dict) else {'value': t}
  opt = linen['opt_state'][0]
  host = {'model': wrap(to_nnx(linen['params']['params'])),
          'optimizer': {'opt_state': {'0': {'count': {'value': opt['count']}, 'mu': wrap(to_nnx(opt['mu']['params'])),
                                            'nu': wrap(to_nnx(opt['nu']['params']))}},
                        'step': {'value': np.asarray(linen['step'], np.uint32)}}}
  shardings = map_tree(lambda _, a: a.sharding, abstract)
  return jax.device_put(host, shardings)


# ------------------------------------------------------------------ multi-process restore

def mp_worker(root: Path, port: int, pid: int, n: int, out: Path):
  import jax

  jax.config.update('jax_num_cpu_devices', 8 // n)
  jax.distributed.initialize(f'127.0.0.1:{port}', n, pid, coordinator_bind_address=f'127.0.0.1:{port}',
                             initialization_timeout=60)
  import numpy as np
  import orbax.checkpoint as ocp
  import tensorstore as ts
  from jax.sharding import Mesh, NamedSharding

  import orbax_linen_nnx

  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(4, 2), ('fsdp', 'tp'))
  meta = ocp.PyTreeCheckpointHandler().metadata(root / 'stacked' / str(STEP) / 'default').tree
  abstract = map_tree(lambda path, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=NamedSharding(
      mesh, spec_of(tuple(m.shape), layer_axis_of(path, 'stacked')))), meta)
  counter = lambda name: sum(v.get('value', 0) for m in ts.experimental_collect_matching_metrics(name)
                             if m['name'] == name for v in m['values'])
  before = counter('/tensorstore/kvstore/file/bytes_read')
  start = time.perf_counter()
  restored = ocp.CheckpointManager(root / 'loop').restore(STEP, args=orbax_linen_nnx.LinenCompatRestore(abstract))
  jax.block_until_ready(restored)
  wall = time.perf_counter() - start
  out.write_text(json.dumps({'process': pid, 'wall_s': wall,
                             'bytes_read': counter('/tensorstore/kvstore/file/bytes_read') - before}))
  os._exit(0)  # skip the distributed shutdown handshake


def multiprocess(root: Path, workdir: Path, n: int = 4, timeout_s: float = 300) -> list[dict]:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  outs = [workdir / f'mp_{i}.json' for i in range(n)]
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))} | {'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen([sys.executable, __file__, '--mp-worker', str(i), '--port', str(port),
                             '--root', str(root), '--out', str(outs[i]), '--procs', str(n)], env=env)
           for i in range(n)]
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

def run_one(root: Path, mode: str, target: str, profile: bool) -> dict:
  cmd = [sys.executable, __file__, '--one', mode, '--target', target, '--root', str(root)]
  if profile:
    cmd.append('--profile')
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  if done.returncode:
    raise RuntimeError(f'{mode}/{target} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
  walls = [r['wall_s'] for r in runs]
  return {'median_s': statistics.median(walls), 'min_s': min(walls), 'max_s': max(walls),
          'peak_rss_mb': statistics.median(r['peak_rss'] for r in runs) / 2**20,
          'overhead_mb': statistics.median(r['overhead_bytes'] for r in runs) / 2**20,
          'state_mb': runs[0]['state_bytes'] / 2**20,
          'read_mb': statistics.median(r['bytes_read'] for r in runs) / 2**20}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--size-mb', type=float, default=1000)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=Path('benchmarks') / 'results.json')
  ap.add_argument('--profile', action='store_true', help="print where linen_compat's time goes")
  ap.add_argument('--skip-multiprocess', action='store_true')
  ap.add_argument('--one', help=argparse.SUPPRESS)
  ap.add_argument('--target', help=argparse.SUPPRESS)
  ap.add_argument('--root', type=Path, help=argparse.SUPPRESS)
  ap.add_argument('--mp-worker', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--port', type=int, help=argparse.SUPPRESS)
  ap.add_argument('--procs', type=int, default=4, help=argparse.SUPPRESS)
  ap.add_argument('--out', type=Path, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.one:
    print(json.dumps(measure(a.root, a.one, a.target, a.profile)))
    return
  if a.mp_worker is not None:
    mp_worker(a.root, a.port, a.mp_worker, a.procs, a.out)
    return

  root = build(a.cache, a.size_mb)
  dm = json.loads((root / 'done').read_text())
  modes = ('native', 'linen_compat', 'convert')
  runs = {(m, t): [] for t in ('plain', 'stacked') for m in modes}
  ratios = {t: {'linen_compat/native': [], 'convert/linen_compat': [], 'convert/linen_compat overhead': []}
            for t in ('plain', 'stacked')}
  for i in range(a.runs):
    for t in ('plain', 'stacked'):
      r = {m: run_one(root, m, t, False) for m in modes}
      for m in modes:
        runs[(m, t)].append(r[m])
      ratios[t]['linen_compat/native'].append(r['linen_compat']['wall_s'] / r['native']['wall_s'])
      ratios[t]['convert/linen_compat'].append(r['convert']['wall_s'] / r['linen_compat']['wall_s'])
      ratios[t]['convert/linen_compat overhead'].append(
          max(r['convert']['overhead_bytes'], 1) / max(r['linen_compat']['overhead_bytes'], 1))
    print(f'round {i + 1}/{a.runs} done', file=sys.stderr, flush=True)

  result = {'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}',
            'command': ' '.join(['python', 'benchmarks/restore_bench.py'] + (argv or sys.argv[1:])),
            'dims': dm, 'layers': N_LAYERS, 'runs': a.runs,
            'results': {f'{m}/{t}': summarize(v) for (m, t), v in runs.items()},
            'ratios': {t: {k: {'median': statistics.median(v), 'min': min(v), 'max': max(v)} for k, v in rs.items()}
                       for t, rs in ratios.items()},
            'raw': {f'{m}/{t}': v for (m, t), v in runs.items()}}
  if a.profile:
    prof = [run_one(root, 'linen_compat', 'stacked', True) for _ in range(3)]
    result['profile'] = {k: statistics.median(p['phases'][k] for p in prof) for k in prof[0]['phases']}
  if not a.skip_multiprocess:
    work = root / 'mp'
    work.mkdir(exist_ok=True)
    result['multiprocess'] = multiprocess(root, work)
  a.json.parent.mkdir(parents=True, exist_ok=True)
  a.json.write_text(json.dumps(result, indent=1))

  # The table, last.
  print(f"\nDecoder D={dm['D']} F={dm['F']} V={dm['V']} x {N_LAYERS} layers; state"
        f" {result['results']['native/plain']['state_mb']:.0f} MiB (params + Adam mu, nu, float32);"
        f" 8 CPU devices, (4, 2) fsdp x tp; {a.runs} runs each, fresh process per run")
  print(f"{'target':8} {'mode':13} {'median s':>9} {'min':>7} {'max':>7} {'peak RSS MiB':>13} {'overhead MiB':>13} {'read MiB':>9}")
  for (m, t) in runs:
    s = result['results'][f'{m}/{t}']
    print(f"{t:8} {m:13} {s['median_s']:9.3f} {s['min_s']:7.3f} {s['max_s']:7.3f} {s['peak_rss_mb']:13.0f}"
          f" {s['overhead_mb']:13.0f} {s['read_mb']:9.0f}")
  for t, rs in result['ratios'].items():
    print(f"{t:8} ratios (median of per-round pairs): "
          + '; '.join(f"{k} {v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]" for k, v in rs.items()))
  if 'profile' in result:
    print('linen_compat/stacked profile (median of 3): '
          + ', '.join(f'{k} {v:.3f}s' for k, v in result['profile'].items()))
  if 'multiprocess' in result:
    mp = result['multiprocess']
    print(f"multi-process (4 x 2 devices, linen loop -> nnx stacked): wall {max(p['wall_s'] for p in mp):.3f}s;"
          f" read per process MiB {[round(p['bytes_read'] / 2**20, 1) for p in mp]}")


if __name__ == '__main__':
  main()
