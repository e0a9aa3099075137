"""`orbax-linen-nnx convert` vs the naive converter (everything to host, remap, save), time and peak memory.

    python benchmarks/convert_bench.py [--size-mb 1536] [--runs 3] [--cells ...] [--chunkings ...] [--json FILE]

Uses restore_bench.py's cached decoder (about --size-mb of float32 params +
Adam mu and nu, 8 layers; built on first use) in the layouts a Linen run
saves, and converts it to the NNX layout, in a fresh process per run:

  ours    orbax-linen-nnx convert SRC DST --to nnx [--stacks ...] [--rules ...] --quiet
  naive   StandardRestore() of the whole tree to host numpy, renamed and
          restacked in numpy, StandardSave of the result: what converters that
          load the whole tree do

Cells (every transform on every chunk layout users have):

  plain    Linen loop     -> NNX unrolled   renames only
  stack    Linen loop     -> NNX stack      per-layer arrays stacked at axis 0
  unstack  Linen nn.scan  -> NNX unrolled   one layer of each stacked array per target
  move     Linen nn.scan  -> NNX stack      layer axis 1 -> 0
  split    Linen loop with a fused (2, D, F) gating kernel -> NNX unrolled, split('.../gating/kernel', ...)

  host     one stored chunk per array (a single-host or published checkpoint)
  shards   chunks of a (2, 4) fsdp x tp save (the NNX target's sharding)
  mesh     row chunks of an (8, 1) mesh (another topology)

Each run reports wall time and peak RSS above the baseline of a process that
has imported the same libraries and started JAX (measured the same way). Runs
are interleaved so that each ratio is taken within one round; in the first
round both outputs are compared leaf by leaf (`orbax-linen-nnx compare`, bit
for bit) and must match.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import restore_bench as rb  # noqa: E402

# transform -> (the Linen layout converted, the convert options, what the naive converter does)
TRANSFORMS = {
  'plain': ('loop', [], 'plain'),
  'stack': ('loop', ['--stacks', '{"layers": {"nnx": 0}}'], 'stack'),
  'unstack': ('scan', ['--stacks', '{"layers": {"nnx": null}}'], 'unstack'),
  'move': ('scan', ['--stacks', '{"layers": {"nnx": 0}}'], 'move'),
  'split': ('fused', ['--rules', '{rules}:RULES'], 'split'),
}
MODES = ('ours', 'naive')
RULES = f'from orbax_linen_nnx import split\nRULES = [split({rb.SPLIT_RULE[0]!r}, {rb.SPLIT_RULE[1]!r}, axis=0)]\n'


def naive(src: str, dst: str, kind: str) -> None:
  """The whole tree on the host, remapped in numpy, saved: the reference converter."""
  import re

  import numpy as np
  import orbax.checkpoint as ocp

  import jax

  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ocp.PyTreeCheckpointHandler().metadata(Path(src) / str(rb.STEP) / 'default').tree
  abstract = rb.map_tree(lambda _, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), meta)
  with ocp.CheckpointManager(src) as mngr:
    tree = mngr.restore(rb.STEP, args=ocp.args.StandardRestore(abstract))
  out: dict = {}
  stacked: dict = {}

  def put(path, value):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = {'value': value}

  for path, value in rb.flat_paths(tree):
    value = np.asarray(value)
    if path[:2] == ('params', 'params'):
      new = ('model',) + path[2:]
    elif path[0] == 'opt_state':
      new = ('optimizer', 'opt_state', path[1], path[2]) + (path[4:] if len(path) > 3 else ())
    else:
      new, value = ('optimizer', 'step'), value.astype(np.uint32)
    layer = next((re.fullmatch(r'layers_(\d+)', seg) for seg in new if re.fullmatch(r'layers_\d+', seg)), None)
    if layer is not None:  # a Linen loop: layers_3 -> layers/3, or gathered for a stack
      k = new.index(layer.group(0))
      if kind == 'stack':
        stacked.setdefault(new[:k] + ('layers',) + new[k + 1 :], {})[int(layer.group(1))] = value
        continue
      new = new[:k] + ('layers', layer.group(1)) + new[k + 1 :]
    if kind == 'split' and new[-3:] == ('mlp', 'gating', 'kernel'):
      put(new[:-2] + ('gate', 'kernel'), value[0])
      put(new[:-2] + ('up', 'kernel'), value[1])
      continue
    if kind in ('move', 'unstack') and 'layers' in new and value.ndim >= 2:
      if kind == 'unstack':
        k = new.index('layers')
        for i in range(value.shape[1]):
          put(new[: k + 1] + (str(i),) + new[k + 1 :], np.ascontiguousarray(value[:, i]))
        continue
      value = np.ascontiguousarray(np.moveaxis(value, 1, 0))
    put(new, value)
  for path, layers in stacked.items():
    put(path, np.stack([layers[i] for i in sorted(layers)]))
  del tree
  with ocp.CheckpointManager(Path(dst).parent) as mngr:
    mngr.save(int(Path(dst).name), args=ocp.args.StandardSave(out))


def baseline() -> None:
  import jax
  import orbax.checkpoint  # noqa: F401

  import orbax_linen_nnx  # noqa: F401

  jax.devices()


def run_one(root: Path, cell: str, mode: str, keep: Path | None = None) -> dict:
  """One conversion in a fresh process; `keep` keeps its output there (else it is removed)."""
  chunking, transform = cell.split('/')
  layout, options, kind = TRANSFORMS[transform]
  src = root / chunking / layout / str(rb.STEP)
  work = Path(tempfile.mkdtemp(dir=root))
  dst = (keep or work / 'out') / '1'
  if mode == 'ours':
    rules = work / 'split_rules.py'
    rules.write_text(RULES)
    cmd = [sys.executable, '-m', 'orbax_linen_nnx', 'convert', str(src), str(dst), '--to', 'nnx', '--quiet']
    cmd += [o.replace('{rules}', str(rules)) for o in options]
  else:
    cmd = [sys.executable, __file__, '--naive', str(root / chunking / layout), str(dst), kind]
  # Peak RSS per child, measured in a wrapper process so that each child's own peak is reported.
  done = subprocess.run([sys.executable, __file__, '--peak', json.dumps(cmd)], capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(done.stderr[-3000:])
  result = json.loads(done.stdout.strip().splitlines()[-1])
  written = sum(f.stat().st_size for f in dst.rglob('*') if f.is_file())
  shutil.rmtree(work)
  return {'cell': cell, 'mode': mode, **result, 'bytes_written': written}


def peak_of(cmd: list[str]) -> dict:
  start = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    print(done.stderr[-3000:], file=sys.stderr)
    sys.exit(1)
  return {
    'wall_s': time.perf_counter() - start,
    'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
  }


def largest_chunk(root: Path, cell: str) -> int:
  """Bytes of the largest stored chunk of the cell's source (what one decode holds)."""
  chunking, transform = cell.split('/')
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'orbax_linen_nnx',
      'inspect',
      '--json',
      str(root / chunking / TRANSFORMS[transform][0] / str(rb.STEP)),
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  arrays = json.loads(out.stdout)['arrays']
  return max(4 * math.prod(a["chunk"] or [1]) for a in arrays)


def outputs_match(root: Path, cell: str) -> bool:
  """Both converters' outputs, compared leaf by leaf, bit for bit."""
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    run_one(root, cell, 'ours', keep=Path(tmp) / 'ours')
    run_one(root, cell, 'naive', keep=Path(tmp) / 'naive')
    done = subprocess.run(
      [
        sys.executable,
        '-m',
        'orbax_linen_nnx',
        'compare',
        str(Path(tmp) / 'ours' / '1'),
        str(Path(tmp) / 'naive' / '1'),
        '--quiet',
      ],
      capture_output=True,
      text=True,
    )
    return done.returncode == 0


def summary(rounds: list[dict], cell: str) -> dict:
  """Medians per mode (seconds, MiB above baseline) and the median of same-round ratios ours/naive."""
  out = {}
  for key, name, scale in (('wall_s', 's', 1), ('extra_rss', 'extra_mib', 2**20)):
    runs = {mode: [x[key] for x in rounds if x['cell'] == cell and x['mode'] == mode] for mode in MODES}
    out.update({f'{mode}_{name}': statistics.median(v) / scale for mode, v in runs.items()})
    out[f"{'time' if key == 'wall_s' else 'extra'}_ratio"] = statistics.median(
      o / n for o, n in zip(runs['ours'], runs['naive'])
    )
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  rb.standard_args(ap, 'convert_results.json')
  ap.set_defaults(size_mb=1536)
  ap.add_argument('--cells', default=','.join(TRANSFORMS), help='comma-separated transforms (default: all)')
  ap.add_argument('--chunkings', default=','.join(rb.CHUNKINGS), help='comma-separated chunkings (default: all)')
  ap.add_argument('--naive', nargs=3, help=argparse.SUPPRESS)
  ap.add_argument('--peak', help=argparse.SUPPRESS)
  ap.add_argument('--baseline', action='store_true', help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.naive:
    return naive(*args.naive)
  if args.baseline:
    return baseline()
  if args.peak:
    print(json.dumps(peak_of(json.loads(args.peak))))
    return
  dm = rb.dims(args.size_mb)
  root = rb.build(args.cache, dm, f'decoder_D{dm["D"]}_L{dm["layers"]}')
  base = json.loads(
    subprocess.run(
      [sys.executable, __file__, '--peak', json.dumps([sys.executable, __file__, '--baseline'])],
      capture_output=True,
      text=True,
      check=True,
    ).stdout
  )['peak_rss']
  cells = [f'{ch}/{t}' for ch in args.chunkings.split(',') for t in args.cells.split(',')]
  checks = {
    cell: {'outputs_match': outputs_match(root, cell), 'largest_chunk_mib': largest_chunk(root, cell) / 2**20}
    for cell in cells
  }
  print(checks, file=sys.stderr, flush=True)
  rounds = []
  for r in range(args.runs):
    for cell in cells:
      for mode in MODES if r % 2 == 0 else MODES[::-1]:
        rounds.append({**run_one(root, cell, mode), 'round': r})
        rounds[-1]['extra_rss'] = rounds[-1]['peak_rss'] - base
        print(rounds[-1], file=sys.stderr, flush=True)
  size = sum(f.stat().st_size for f in (root / 'host' / 'loop' / str(rb.STEP)).rglob('*') if f.is_file())
  table = {cell: {**summary(rounds, cell), **checks[cell]} for cell in cells}
  print(
    '| cell | ours s | naive s | ours/naive time | ours MiB | naive MiB | ours/naive memory | largest chunk MiB'
    ' | outputs equal |'
  )
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |')
  for cell, t in table.items():
    print(
      f"| {cell} | {t['ours_s']:.2f} | {t['naive_s']:.2f} | {t['time_ratio']:.2f} | {t['ours_extra_mib']:.0f}"
      f" | {t['naive_extra_mib']:.0f} | {t['extra_ratio']:.2f} | {t['largest_chunk_mib']:.1f}"
      f" | {'yes' if t['outputs_match'] else 'NO'} |"
    )
  args.json.write_text(
    json.dumps(
      {
        'dims': dm,
        'runs': args.runs,
        'baseline_rss_mib': base / 2**20,
        'checkpoint_bytes': size,
        'cells': table,
        'raw': rounds,
      },
      indent=1,
    )
  )


if __name__ == '__main__':
  main()
