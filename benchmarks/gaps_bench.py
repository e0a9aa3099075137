"""The cells where a face was behind its reference (issue 32), each as a ratio against that reference, in one run.

    python benchmarks/gaps_bench.py [--runs 5] [--cells many,...] [--profile] [--json FILE]

Every run is a fresh process; the two sides of a cell alternate (the reference
first in even rounds, ours first in odd ones) and every ratio is a pair of the
same round, after one unmeasured run of each side (--warmup), so that the
first measured run does not pay alone for a cold page cache. Medians of the pairs, and every pair, are reported. Each
reference takes seconds at the sizes used here (the `many-small` cell is the
issue's own size, where it takes under one).

  cell                ours                                      reference
  many                LinenCompatRestore: a Linen loop of 64     StandardRestore of the same values stored
                      layers x 9 arrays + Adam (1,736 arrays,    stacked (35 arrays), same chunking
                      1.1 GiB, saved sharded) into an nnx.vmap
                      stack (35 targets)
  many-small          the same at D=96 (68 MiB)                  the same
  misaligned-rows     LinenCompatRestore, loop -> unrolled, of   StandardRestore of the same stored chunks
                      arrays saved as row shards of an (8, 1)    (the NNX layout saved the same way)
                      mesh, into fsdp x tp on a (2, 4) mesh
  misaligned-swapped  the same, saved on the (2, 4) mesh with    the same
                      the model axes' names swapped
  published           orbax_linen_nnx.restore of an upstream     Tunix's own loader
                      Gemma3 layout (a bare PyTree, every array  (`create_model_from_checkpoint`: the whole
                      one chunk, bfloat16) into Tunix's NNX      tree to the host, mapped, then placed)
                      Gemma3, sharded as Tunix shards it
  unroll-save         LinenCompatSave of an nnx.vmap stack as    StandardSave of the same state as it is
                      per-layer Linen arrays (stacks linen=None)

Targets (issue 32): many <= 1.2x, misaligned <= 0.8x, published <= 0.6x,
unroll-save <= 1.0x time and <= 0.3x peak memory above the state.

The restore cells run restore_bench.py's measurement and the save cell
save_bench.py's, on checkpoints built once under --cache. `published` needs
Tunix's Gemma3 (`pip install -e '.[bench]'` and tunix: see benchmarks/README.md);
without it the cell is skipped and says so. --profile runs ours once more per
restore cell under cProfile and splits its time: open (listing and opening the
stored arrays), plan (the rest of prepare), waiting on TensorStore (reads and
decodes), device placement, and the read engine's own Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import restore_bench as rb  # noqa: E402

MANY = {'D': 384, 'F': 768, 'V': 1536, 'layers': 64, 'norms': True}
TARGETS = {
  'many': 1.2,
  'many-small': 1.2,
  'misaligned-rows': 0.8,
  'misaligned-swapped': 0.8,
  'published': 0.6,
  'unroll-save': 1.0,
}
MEMORY_TARGETS = {'unroll-save': 0.3}
GEMMA = 'gemma3_1b_pt'  # 1.0 B parameters, 1.9 GiB in bfloat16; --gemma gemma3_270m for a quick look


# ------------------------------------------------------------------ what each cell reads


def roots(cache: Path, cells: list[str], gemma: str, size_mb: float, many_d: int) -> dict:
  """Builds (once) what the chosen cells read; {cell: its root}."""
  out = {}
  dm = rb.dims(size_mb)
  decoder = f'decoder_D{dm["D"]}_L8_gaps'
  for cell in cells:
    if cell == 'many':
      many = {**MANY, 'D': many_d, 'F': 2 * many_d, 'V': 4 * many_d}
      out[cell] = rb.build(cache, many, f'many_D{many_d}_L64x9', chunkings=('shards',), layouts=('loop', 'stacked'))
    elif cell == 'many-small':
      layouts = ('loop', 'unrolled', 'stacked')  # restore_bench.py builds the same name with these
      out[cell] = rb.build(cache, rb.MANY, 'many_L64x9', chunkings=('host', 'shards'), layouts=layouts)
    elif cell.startswith('misaligned') or cell == 'unroll-save':
      chunkings, layouts = ('mesh', 'swapped', 'shards'), ('loop', 'unrolled', 'stacked')
      out[cell] = rb.build(cache, dm, decoder, chunkings=chunkings, layouts=layouts)
    elif cell == 'published':
      out[cell] = build_published(cache, gemma) if tunix_gemma() is not None else None
  return out


def tunix_gemma():
  """Tunix's Gemma3 model and params modules, or None where Tunix (or what they import) is not installed."""
  sys.path.insert(0, str(HERE.parent / 'tests'))
  try:
    import third_party

    return third_party.tunix_module('models.gemma3.model'), third_party.tunix_module('models.gemma3.params')
  except ImportError:
    return None


def gemma_config(name: str):
  """Tunix's config of that name, or 'tiny' (2 layers, width 128: tests/test_benchmark_harness.py)."""
  model, _ = tunix_gemma()
  if name == 'tiny':
    return model.ModelConfig(
      num_layers=2,
      num_embed=512,
      embed_dim=128,
      hidden_dim=256,
      num_heads=4,
      head_dim=32,
      num_kv_heads=1,
      sliding_window_size=16,
    )
  return getattr(model.ModelConfig, name)()


def build_published(cache: Path, name: str) -> Path:
  """An upstream Gemma3 text checkpoint as published: a bare PyTree, '/' in its keys, one chunk per array."""
  root = cache / f'{name}_upstream'
  if (root / 'done').exists():
    return root
  import ml_dtypes
  import numpy as np
  import orbax.checkpoint as ocp

  c = gemma_config(name)
  D, N, K, KV, F = c.embed_dim, c.num_heads, c.head_dim, c.num_kv_heads, c.hidden_dim
  rng = np.random.default_rng(0)
  w = lambda *shape: rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
  tree = {'transformer/embedder': {'input_embedding': w(c.num_embed, D)}, 'transformer/final_norm': {'scale': w(D)}}
  for i in range(c.num_layers):
    at = f'transformer/layer_{i}'
    tree |= {
      f'{at}/attn/_key_norm': {'scale': w(K)},
      f'{at}/attn/_query_norm': {'scale': w(K)},
      f'{at}/attn/q_einsum': {'w': w(N, D, K)},
      f'{at}/attn/kv_einsum': {'w': w(2, KV, D, K)},
      f'{at}/attn/attn_vec_einsum': {'w': w(N, K, D)},
      f'{at}/mlp/gating_einsum': {'w': w(2, F, D)},
      f'{at}/mlp/linear': {'w': w(F, D)},
      **{f'{at}/{n}': {'scale': w(D)} for n in ('pre_attention_norm', 'post_attention_norm')},
      **{f'{at}/{n}': {'scale': w(D)} for n in ('pre_ffw_norm', 'post_ffw_norm')},
    }
  ocp.PyTreeCheckpointer().save(root / 'checkpoint', tree)
  (root / 'done').write_text(name)
  print(f'built {root.name}', file=sys.stderr, flush=True)
  return root


def gemma_rules():
  """Upstream Gemma3 -> Tunix's Gemma3: what Tunix's `map_from_upstream_checkpoint` does, as rules."""
  from orbax_linen_nnx import rearrange, rename, split

  return [
    rename({'transformer/layer_{i}': 'layers/{i}', 'transformer/embedder': 'embedder'}),
    rename({'transformer/final_norm': 'final_norm'}),
    split('{l...}/mlp/gating_einsum/w', ['{l...}/mlp/gate_proj/kernel', '{l...}/mlp/up_proj/kernel'], axis=0),
    rearrange('{l...}/mlp/{p}_proj/kernel', 'f d -> d f'),
    rename('{l...}/mlp/linear/w', '{l...}/mlp/down_proj/kernel'),
  ]


def measure_published(root: Path, name: str, mode: str, on_this_thread: bool = False) -> dict:
  """One restore of the published checkpoint into Tunix's Gemma3 (a fresh process)."""
  import jax

  jax.config.update('jax_num_cpu_devices', 8)
  from flax import nnx

  import orbax_linen_nnx

  model_lib, params_lib = tunix_gemma()
  config = gemma_config(name)
  # Auto axes, as Tunix's loader needs (its placement is a `jnp.asarray(..., device=sharding)` per leaf).
  mesh = jax.make_mesh((2, 4), ('fsdp', 'tp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  path = root / 'checkpoint'
  before, _ = rb.rss_now_and_peak()
  start = time.perf_counter()
  if mode == 'tunix':
    model = params_lib.create_model_from_checkpoint(str(path), config, mesh=mesh)
  else:
    model = nnx.eval_shape(lambda: model_lib.Gemma3(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    abstract = jax.tree.map(
      lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, nnx.get_named_sharding(state, mesh)
    )
    options = orbax_linen_nnx.RestoreOptions(rules=gemma_rules(), target_layout='nnx')
    if on_this_thread:  # the engine's own steps, for --profile (see profile_one)
      from orbax_linen_nnx.engine import prepare as prepare_lib, read

      prepared = prepare_lib.prepare(path, abstract, options)
      restored = prepared.state.rebuild(read.execute(prepared.plan, prepared.checkpoint))
    else:
      restored = orbax_linen_nnx.restore(path, abstract, rules=gemma_rules(), target_layout='nnx')
    nnx.update(model, restored)
  leaves = jax.tree.leaves(nnx.state(model))
  jax.block_until_ready(leaves)
  wall = time.perf_counter() - start
  _, peak = rb.rss_now_and_peak()
  assert all(isinstance(x, jax.Array) and not isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  return {
    'mode': mode,
    'wall_s': wall,
    'peak_rss': peak,
    'overhead_bytes': peak - before - sum(x.nbytes for x in leaves),
    'checksum': float(sum(float(jax.numpy.sum(x.astype('float32'))) for x in leaves)),  # both sides: the same
  }


# ------------------------------------------------------------------ one run of one side of one cell


RESTORE = {  # cell -> (restore_bench chunking, restore_bench cell)
  'many': ('shards', 'stack'),
  'many-small': ('shards', 'stack'),
  'misaligned-rows': ('mesh', 'plain'),
  'misaligned-swapped': ('swapped', 'plain'),
}


def reference_of(cell: str) -> str:
  return {'published': 'tunix', 'unroll-save': 'native'}.get(cell, 'native')


def run(root: Path, cell: str, mode: str, gemma: str) -> dict:
  if cell in RESTORE:
    chunking, rcell = RESTORE[cell]
    cmd = [str(HERE / 'restore_bench.py'), '--one', mode, '--cell', rcell, '--chunking', chunking, '--root', str(root)]
  elif cell == 'unroll-save':
    cmd = [str(HERE / 'save_bench.py'), '--one', str(root), 'unstack', mode]
  else:
    cmd = [__file__, '--one', mode, '--cell', cell, '--root', str(root), '--gemma', gemma]
  done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=1200)
  if done.returncode:
    raise RuntimeError(f'{cell}/{mode} failed:\n{done.stderr[-3000:]}')
  out = json.loads(done.stdout.strip().splitlines()[-1])
  if 'peak_over_state' in out:  # save_bench's memory: the peak above the restored state
    out['overhead_bytes'] = out['peak_over_state']
  return out


# ------------------------------------------------------------------ where ours' time goes


def profile(root: Path, cell: str, gemma: str) -> dict:
  """Ours once under cProfile (a fresh process): seconds in open, plan, TensorStore, placement, the engine."""
  cmd = [sys.executable, __file__, '--profile-one', cell, '--root', str(root), '--gemma', gemma]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  if done.returncode:
    raise RuntimeError(f'profile {cell} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def profile_one(root: Path, cell: str, gemma: str) -> dict:
  import cProfile
  import pstats

  pr = cProfile.Profile()
  start = time.perf_counter()
  pr.enable()
  # The restore's own steps on this thread (prepare, execute, rebuild): cProfile sees only the thread it
  # runs on, and Orbax may run a handler's restore on another (it does on Python 3.12 with jax 0.12).
  if cell in RESTORE:
    rb.measure(root, RESTORE[cell][0], RESTORE[cell][1], 'ours', True, None)
  else:
    measure_published(root, gemma, 'ours', on_this_thread=True)
  pr.disable()
  wall = time.perf_counter() - start
  stats = pstats.Stats(pr).stats  # type: ignore[attr-defined]

  def cumulative(match) -> float:  # the outermost of the functions matched (they may call one another)
    return max((v[3] for k, v in stats.items() if match(k)), default=0.0)

  by = lambda file, fn: lambda k: k[0].replace(os.sep, '/').endswith(file) and k[2] == fn

  def called_from(match, file: str) -> float:  # time in `match` under callers in `file`
    under = lambda caller: caller[0].replace(os.sep, '/').endswith(file)
    return sum(ct for k, v in stats.items() if match(k) for c, (_, _, _, ct) in v[4].items() if under(c))

  open_s = cumulative(by('engine/source.py', 'open_checkpoint'))
  prepare_s = cumulative(by('engine/prepare.py', 'prepare'))
  execute_s = cumulative(by('engine/read.py', 'execute'))
  rebuild_s = cumulative(by('engine/target.py', 'rebuild'))
  restore_s = prepare_s + execute_s + rebuild_s
  if not execute_s:  # said, not reported as zeros
    return {'missed': f'cProfile recorded none of the restore on Python {platform.python_version()} (3.12.1 does this)'}
  waiting = called_from(lambda k: 'tensorstore' in k[2] and 'result' in k[2], 'engine/read.py')
  placing = cumulative(lambda k: k[2] == 'batched_device_put')
  return {
    'wall_s (the process, under the profiler)': wall,
    'restore': restore_s,
    'open (list, open arrays)': open_s,
    'plan (prepare, less open)': prepare_s - open_s,
    'read: waiting on TensorStore (read + decode)': waiting,
    'read: device placement': placing,
    'read: the engine (schedule, copy, trim)': execute_s - waiting - placing,
    'rebuild (the target tree)': rebuild_s,
  }


# ------------------------------------------------------------------ the run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--warmup', type=int, default=1, help='unmeasured runs of each side per cell (default: 1)')
  ap.add_argument('--cells', default=','.join(TARGETS), help='comma-separated cells (default: all)')
  ap.add_argument('--size-mb', type=float, default=1000, help='the decoder of the misaligned and save cells')
  ap.add_argument('--many-d', type=int, default=MANY['D'], help="the width of the `many` cell's layers")
  ap.add_argument('--gemma', default=GEMMA, help="Tunix's Gemma3 config for `published` (default: %(default)s)")
  ap.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'orbax_linen_nnx_bench')
  ap.add_argument('--json', type=Path, default=HERE / 'gaps_results.json')
  ap.add_argument('--profile', action='store_true', help="split ours' time (restore cells)")
  ap.add_argument('--one', help=argparse.SUPPRESS)
  ap.add_argument('--cell', help=argparse.SUPPRESS)
  ap.add_argument('--root', type=Path, help=argparse.SUPPRESS)
  ap.add_argument('--profile-one', help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.one:
    print(json.dumps(measure_published(a.root, a.gemma, a.one)))
    return
  if a.profile_one:
    print(json.dumps(profile_one(a.root, a.profile_one, a.gemma)))
    return

  cells = a.cells.split(',')
  unknown = set(cells) - set(TARGETS)
  if unknown:
    ap.error(f'unknown cells {sorted(unknown)}; known: {", ".join(TARGETS)}')
  built = roots(a.cache, cells, a.gemma, a.size_mb, a.many_d)
  skipped = {c: 'Tunix Gemma3 is not installed' for c in cells if built.get(c) is None}
  cells = [c for c in cells if c not in skipped]
  for c in cells:  # one unmeasured run of each side first: the page cache then holds what both read
    for _ in range(a.warmup):
      for m in (reference_of(c), 'ours'):
        run(built[c], c, m, a.gemma)
  pairs: dict[str, list] = {c: [] for c in cells}
  for r in range(a.runs):
    for c in cells:
      ref = reference_of(c)
      order = (ref, 'ours') if r % 2 == 0 else ('ours', ref)
      got = {m: run(built[c], c, m, a.gemma) for m in order}
      pairs[c].append({'round': r, 'first': order[0], 'reference': got[ref], 'ours': got['ours']})
    print(f'round {r + 1}/{a.runs} done', file=sys.stderr, flush=True)
  result = {
    'machine': f'{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}',
    'command': ' '.join(['python', 'benchmarks/gaps_bench.py'] + (argv if argv is not None else sys.argv[1:])),
    'date': time.strftime('%Y-%m-%d'),
    'runs': a.runs,
    'warmup': a.warmup,
    'skipped': skipped,
    'cells': {c: summary(c, ps) for c, ps in pairs.items()},
  }
  if a.profile:
    result['profile'] = {c: profile(built[c], c, a.gemma) for c in cells if c != 'unroll-save'}
  a.json.write_text(json.dumps(result, indent=1))
  report(result)


def summary(cell: str, ps: list) -> dict:
  time_ratios = [p['ours']['wall_s'] / p['reference']['wall_s'] for p in ps]
  memory_ratios = [p['ours']['overhead_bytes'] / max(p['reference']['overhead_bytes'], 1) for p in ps]
  return {
    'reference': reference_of(cell),
    'reference_s': statistics.median(p['reference']['wall_s'] for p in ps),
    'ours_s': statistics.median(p['ours']['wall_s'] for p in ps),
    'time_ratio': statistics.median(time_ratios),
    'time_ratios': time_ratios,
    'memory_ratio (above the state)': statistics.median(memory_ratios),
    'memory_ratios': memory_ratios,
    'target': TARGETS[cell],
    'memory_target': MEMORY_TARGETS.get(cell),
    'same values': len({p[side].get('checksum') for p in ps for side in ('reference', 'ours')}) == 1,
    'met': statistics.median(time_ratios) <= TARGETS[cell]
    and (cell not in MEMORY_TARGETS or statistics.median(memory_ratios) <= MEMORY_TARGETS[cell]),
    'pairs': ps,
  }


def report(result: dict):
  print(f"\n{result['machine']}; {result['runs']} rounds, a fresh process per run, ratios are same-round pairs")
  print(
    '| cell | reference | reference s | ours s | ours/reference time | every pair | memory above state | target | met |'
  )
  print('| --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- |')
  for c, s in result['cells'].items():
    target = f"<= {s['target']}x" + (f", memory <= {s['memory_target']}x" if s['memory_target'] else '')
    print(
      f"| {c} | {s['reference']} | {s['reference_s']:.2f} | {s['ours_s']:.2f} | {s['time_ratio']:.2f}"
      f" | {', '.join(f'{x:.2f}' for x in s['time_ratios'])} | {s['memory_ratio (above the state)']:.2f}"
      f" | {target} | {'yes' if s['met'] else 'no'} |"
    )
  for c, why in result['skipped'].items():
    print(f'| {c} | skipped: {why} |')
  for c, parts in result.get('profile', {}).items():
    print(f'profile {c}: ' + ', '.join(f'{k} {v:.2f}s' if isinstance(v, float) else v for k, v in parts.items()))


if __name__ == '__main__':
  main()
