"""`orbax-linen-nnx convert` vs the naive converter (everything to host, remap, save), time and peak memory.

    python benchmarks/convert_bench.py [--size-mb 1000] [--runs 3] [--json FILE]

Uses restore_bench.py's cached decoder (about --size-mb of float32 params +
Adam mu and nu, 8 layers; built on first use), saved by Linen code, and
converts it to the NNX layout, in a fresh process per run:

  ours    orbax-linen-nnx convert SRC DST --to nnx [--stacks ...] --quiet
  naive   StandardRestore() of the whole tree to host numpy, renamed and
          restacked in Python (np.moveaxis), StandardSave of the result: what
          converters that load the whole tree do

Cells: plain (Linen loop -> NNX unrolled: renames only) and move (Linen
nn.scan, layer axis 1 -> an NNX stack at axis 0), each on the chunk layouts
users have: host (one stored chunk per array, as a single-host or published
checkpoint) and shards (chunks of a (2, 4) fsdp x tp save). Each run reports
wall time and peak RSS above the baseline of a process that has imported the
same libraries and started JAX (measured the same way). Runs are interleaved
so that each ratio is taken within one round.
"""

from __future__ import annotations

import argparse
import json
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

CELLS = {'plain-host': ('host', 'loop', None), 'move-host': ('host', 'scan', {'layers': {'nnx': 0}}),
         'move-shards': ('shards', 'scan', {'layers': {'nnx': 0}})}
MODES = ('ours', 'naive')


def naive(src: str, dst: str, stacks: str) -> None:
  """The whole tree on the host, remapped in Python, saved: the reference converter."""
  import re

  import numpy as np
  import orbax.checkpoint as ocp

  import jax

  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ocp.PyTreeCheckpointHandler().metadata(Path(src) / str(rb.STEP) / 'default').tree
  abstract = rb.map_tree(lambda _, m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), meta)
  with ocp.CheckpointManager(src) as mngr:
    tree = mngr.restore(rb.STEP, args=ocp.args.StandardRestore(abstract))
  move = bool(json.loads(stacks))
  out: dict = {}

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
    new = tuple(p for seg in new for p in (re.fullmatch(r'(layers)_(\d+)', seg).groups()
                                           if re.fullmatch(r'layers_\d+', seg) else (seg,)))
    if move and 'layers' in new and value.ndim >= 2:
      value = np.ascontiguousarray(np.moveaxis(value, 1, 0))
    put(new, value)
  del tree
  with ocp.CheckpointManager(Path(dst).parent) as mngr:
    mngr.save(int(Path(dst).name), args=ocp.args.StandardSave(out))


def baseline() -> None:
  import jax
  import orbax.checkpoint  # noqa: F401

  import orbax_linen_nnx  # noqa: F401
  jax.devices()


def run_one(root: Path, cell: str, mode: str) -> dict:
  chunking, layout, stacks = CELLS[cell]
  src = root / chunking / layout / str(rb.STEP)
  work = Path(tempfile.mkdtemp(dir=root))
  dst = work / 'out' / '1'
  if mode == 'ours':
    cmd = [sys.executable, '-m', 'orbax_linen_nnx', 'convert', str(src), str(dst), '--to', 'nnx', '--quiet']
    cmd += ['--stacks', json.dumps(stacks)] if stacks else []
  else:
    cmd = [sys.executable, __file__, '--naive', str(root / chunking / layout), str(dst), json.dumps(stacks)]
  # Peak RSS per child, measured in a wrapper process so that each child's own peak is reported.
  wrapped = [sys.executable, __file__, '--peak', json.dumps(cmd)]
  done = subprocess.run(wrapped, capture_output=True, text=True)
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
  return {'wall_s': time.perf_counter() - start,
          'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def summary(rounds: list[dict], cell: str) -> dict:
  """Medians per mode (seconds, MiB above baseline) and the median of same-round ratios ours/naive."""
  out = {}
  for key, name, scale in (('wall_s', 's', 1), ('extra_rss', 'extra_mib', 2**20)):
    runs = {mode: [x[key] for x in rounds if x['cell'] == cell and x['mode'] == mode] for mode in MODES}
    out.update({f'{mode}_{name}': statistics.median(v) / scale for mode, v in runs.items()})
    out[f"{'time' if key == 'wall_s' else 'extra'}_ratio"] = statistics.median(
        o / n for o, n in zip(runs['ours'], runs['naive']))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  rb.standard_args(ap, 'convert_results.json')
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
  base = json.loads(subprocess.run([sys.executable, __file__, '--peak', json.dumps(
      [sys.executable, __file__, '--baseline'])], capture_output=True, text=True, check=True).stdout)['peak_rss']
  rounds = []
  for r in range(args.runs):
    for cell in CELLS:
      for mode in MODES:
        rounds.append({**run_one(root, cell, mode), 'round': r})
        rounds[-1]['extra_rss'] = rounds[-1]['peak_rss'] - base
        print(rounds[-1], file=sys.stderr, flush=True)
  size = sum(f.stat().st_size for f in (root / 'host' / 'loop' / str(rb.STEP)).rglob('*') if f.is_file())
  table = {cell: summary(rounds, cell) for cell in CELLS}
  for cell, t in table.items():
    print(f"{cell:12s} ours {t['ours_s']:.2f} s, naive {t['naive_s']:.2f} s ({t['time_ratio']:.2f}x); peak RSS"
          f" above baseline: ours {t['ours_extra_mib']:.0f} MiB, naive {t['naive_extra_mib']:.0f} MiB"
          f" ({t['extra_ratio']:.2f}x)")
  args.json.write_text(json.dumps({'dims': dm, 'runs': args.runs, 'baseline_rss_mib': base / 2**20,
                                   'checkpoint_bytes': size, 'cells': table, 'raw': rounds}, indent=1))


if __name__ == '__main__':
  main()
